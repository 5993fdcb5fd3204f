//! Boots one benchmark guest through the library and collects what it
//! printed (`bench: KIND key=value ...` lines), the device's counters and
//! the record of every flush the engine made.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::cache_flush::metrics::MetricsSnapshot;

use vmm::flush_engine::{BatchOutcome, EngineConfig, FlushLogRecord};
use vmm::vcpu::VmOutcome;
use vmm::vm::{NotifyPath, Vm, VmConfig};

/// One `bench:` line: its kind and its `key=value` numbers.
#[derive(Clone, Debug)]
pub struct Line {
    /// The word after `bench:`.
    pub kind: String,
    /// The numbers.
    pub values: BTreeMap<String, u64>,
}

impl Line {
    /// The value of `key` (0 if absent).
    pub fn get(&self, key: &str) -> u64 {
        self.values.get(key).copied().unwrap_or(0)
    }
}

/// What one guest run gave.
pub struct GuestRun {
    /// Its `bench:` lines, in order.
    pub lines: Vec<Line>,
    /// The device's counters at the end.
    pub device: MetricsSnapshot,
    /// Every flush the engine answered OK, in order (from its flush log,
    /// read after the run: nothing of the bench runs inside a pause).
    pub flushes: Vec<FlushLogRecord>,
    /// Wall time from start to end.
    pub wall: Duration,
    /// Full-flush runs: the residency scan alone (what a full flush does
    /// first, before the pause), timed on the guest's memory after the run.
    pub scan_ns: Vec<f64>,
}

/// Parses the `bench:` lines of `output`.
pub fn parse(output: &str) -> Vec<Line> {
    output
        .lines()
        .filter_map(|l| l.trim().strip_prefix("bench: "))
        .filter_map(|rest| {
            let mut words = rest.split_whitespace();
            let kind = words.next()?.to_string();
            let values = words
                .filter_map(|w| w.split_once('='))
                .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
                .collect();
            Some(Line { kind, values })
        })
        .collect()
}

/// How the VMM serves the guest's flushes in one bench boot: the variants a
/// run compares side by side.
#[derive(Clone, Copy, Debug, Default)]
pub struct Variant {
    /// Where a QueueNotify is served.
    pub notify: NotifyPath,
    /// `EngineConfig::inline_max_bytes`; `None` keeps the engine's default.
    pub inline_max_bytes: Option<u64>,
    /// Keep the dirty-page audit (`--audit`).
    pub audit: bool,
}

/// Boots the bundled guest with `scenario=bench` and `args`, waits for it,
/// and fails with the guest's own output if it did not succeed.
pub fn run(vcpus: u32, memory_mib: u64, args: &str, variant: Variant) -> Result<GuestRun, String> {
    let mut engine = EngineConfig::default();
    if let Some(bytes) = variant.inline_max_bytes {
        engine.inline_max_bytes = bytes;
    }
    let sink = Arc::new(Mutex::new(Vec::new()));
    let config = VmConfig {
        vcpus,
        memory_mib,
        cmdline: format!("scenario=bench {args}"),
        serial_out: Some(sink.clone()),
        notify: variant.notify,
        engine,
        audit: variant.audit,
        ..VmConfig::new(vmm::BUNDLED_GUEST_KERNEL.to_vec())
    };
    let start = Instant::now();
    let vm = Vm::new(&config).map_err(|e| format!("VM set-up: {e}"))?;
    let running = vm.start().map_err(|e| format!("VM start: {e}"))?;
    let metrics = running.flush_metrics().clone();
    let engine = running.flush_engine().clone();
    let memory = running.memory().clone();
    let outcome = running.wait().map_err(|e| format!("VM: {e}"))?;
    let wall = start.elapsed();
    let log = engine.flush_log();
    if log.dropped() > 0 {
        return Err(format!(
            "guest `scenario=bench {args}`: the flush log dropped {} of its records (capacity {}); fewer repetitions per boot would keep them all",
            log.dropped(),
            log.capacity()
        ));
    }
    let flushes: Vec<FlushLogRecord> = log
        .since(0)
        .into_iter()
        .filter(|f| f.outcome == BatchOutcome::Ok)
        .collect();
    let scan_ns = if args.contains("part=full") {
        (0..3)
            .filter_map(|_| {
                let start = Instant::now();
                vmm::flush_engine::resident::resident_extents(&memory).ok()?;
                Some(start.elapsed().as_nanos() as f64)
            })
            .collect()
    } else {
        Vec::new()
    };
    drop(memory);
    let output =
        String::from_utf8_lossy(&sink.lock().unwrap_or_else(|p| p.into_inner())).into_owned();
    match outcome {
        VmOutcome::GuestExit { status: 0, .. } if output.contains("bench: done") => Ok(GuestRun {
            lines: parse(&output),
            device: metrics.snapshot(),
            flushes,
            wall,
            scan_ns,
        }),
        other => Err(format!(
            "guest `scenario=bench {args}` on {vcpus} vCPU(s), {memory_mib} MiB ended with {other:?}; its output:\n{output}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn parses_bench_lines_only() {
        let lines = parse(
            "demo: hello\nbench: range size=4096 floor=10 dev=20 guest=x\n\
             bench: done\nnot bench: full dev=1\n",
        );
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].kind, "range");
        assert_eq!(
            (
                lines[0].get("size"),
                lines[0].get("dev"),
                lines[0].get("guest")
            ),
            (4096, 20, 0)
        );
        assert_eq!(lines[1].kind, "done");
    }
}
