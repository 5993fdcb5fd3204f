//! `--metrics PATH`: the VMM's counters as one JSON object, written every
//! interval and once more at exit.
//!
//! The file is replaced atomically (written beside it, then renamed), so a
//! reader never sees half a document.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use devices::cache_flush::metrics::CacheFlushMetrics;
use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use crate::flush_engine::{FlushEngine, Percentiles};
use crate::vcpu::VcpuStats;

/// Where and how often metrics are written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsConfig {
    /// The JSON file.
    pub path: PathBuf,
    /// Time between two writes (the last write is at exit anyway).
    pub interval: Duration,
}

/// Everything the metrics are read from.
#[derive(Clone)]
pub struct MetricsSources {
    /// The cache-flush device's counters.
    pub device: Arc<CacheFlushMetrics>,
    /// The flush engine.
    pub engine: FlushEngine,
    /// The vCPU threads' counters.
    pub vcpus: Arc<VcpuStats>,
}

fn percentiles_json(p: &Percentiles) -> String {
    format!(
        "{{\"count\":{},\"p50\":{},\"p90\":{},\"p99\":{},\"max\":{}}}",
        p.count, p.p50, p.p90, p.p99, p.max
    )
}

impl MetricsSources {
    /// The metrics as a JSON object.
    pub fn to_json(&self) -> String {
        let stats = self.engine.stats();
        let (pause, flush) = stats.latency_percentiles();
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        let mut out = String::new();
        let _ = write!(
            out,
            "{{\"device\":{},\"engine\":{{\"instruction\":\"{}\",\"line_size\":{},\"batches\":{},\"full_flushes\":{},\"bytes\":{},\"lines\":{},\"failures\":{},\"vcpus_running_during_flush\":{},\"pause_ns\":{},\"flush_ns\":{}",
            self.device.snapshot().to_json(),
            self.engine.instruction().name(),
            self.engine.line_size(),
            load(&stats.batches),
            load(&stats.full_flushes),
            load(&stats.bytes),
            load(&stats.lines),
            load(&stats.failures),
            load(&stats.vcpus_running_during_flush),
            percentiles_json(&pause),
            percentiles_json(&flush),
        );
        out.push_str(",\"last_flush\":");
        match stats.last_flush() {
            None => out.push_str("null"),
            Some(record) => {
                let _ = write!(
                    out,
                    "{{\"full\":{},\"bytes\":{},\"plan_ns\":{},\"pause_ns\":{},\"flush_ns\":{},\"shares\":[",
                    record.full, record.bytes, record.plan_ns, record.pause_ns, record.flush_ns
                );
                for (i, share) in record.shares.iter().enumerate() {
                    let vcpu = share.vcpu.map_or("null".to_string(), |v| v.to_string());
                    let _ = write!(
                        out,
                        "{}{{\"vcpu\":{vcpu},\"host_cpu\":{},\"vcpu_last_host_cpu\":{},\"lines\":{}}}",
                        if i == 0 { "" } else { "," },
                        share.host_cpu,
                        share.vcpu_last_host_cpu,
                        share.lines
                    );
                }
                out.push_str("]}");
            }
        }
        let _ = write!(
            out,
            "}},\"vcpus\":{{\"unclaimed_accesses\":{}}}}}",
            load(&self.vcpus.unclaimed_accesses)
        );
        out
    }

    /// Writes the JSON to `path`, atomically.
    pub fn write_to(&self, path: &Path) -> std::io::Result<()> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        std::fs::write(&tmp, self.to_json() + "\n")?;
        std::fs::rename(&tmp, path)
    }
}

/// Writes the metrics on a timer in the control loop.
pub struct MetricsWriter {
    config: MetricsConfig,
    sources: MetricsSources,
    timer: TimerFd,
}

impl MetricsWriter {
    /// A writer armed to fire every `config.interval`.
    pub fn new(config: MetricsConfig, sources: MetricsSources) -> std::io::Result<Self> {
        let mut timer = TimerFd::new()?;
        timer.reset(config.interval, Some(config.interval))?;
        Ok(Self {
            config,
            sources,
            timer,
        })
    }

    /// Writes once now; failures are logged (metrics must not stop a VM).
    pub fn write_now(&self) {
        if let Err(e) = self.sources.write_to(&self.config.path) {
            log::warn!(
                "cannot write metrics to {}: {e}",
                self.config.path.display()
            );
        }
    }
}

impl MutEventSubscriber for MetricsWriter {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.timer, EventSet::IN)) {
            log::error!("cannot schedule metrics writes: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.timer.wait();
        self.write_now();
    }
}
