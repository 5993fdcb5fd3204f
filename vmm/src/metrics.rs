//! `--metrics PATH`: the VMM's counters as one JSON object, written every
//! interval and once more at exit.
//!
//! The file is replaced atomically (written beside it, then renamed), so a
//! reader never sees half a document.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use devices::cache_flush::metrics::{CacheFlushMetrics, MetricsSnapshot};
use event_manager::{EventOps, Events, MutEventSubscriber};
use serde::Serialize;
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

/// The `--metrics` document. Field names are part of the interface
/// (`tests/faults.rs`, `tests/flush_service.rs` and the README rely on them).
#[derive(Debug, Serialize)]
pub struct MetricsDocument {
    /// The cache-flush device's counters.
    pub device: DeviceMetrics,
    /// The flush engine's.
    pub engine: EngineMetrics,
    /// The vCPU threads'.
    pub vcpus: VcpuMetrics,
}

/// The device: its counters, and its rejections by validation rule.
#[derive(Debug, Serialize)]
pub struct DeviceMetrics {
    /// Requests by type and outcome, bytes, batches (flattened: the keys sit
    /// directly in `device`).
    #[serde(flatten)]
    pub counters: MetricsSnapshot,
    /// Rejected requests by rule name (`rule=` in the log); every rule is
    /// present, zeros included.
    pub rejected_by_rule: BTreeMap<&'static str, u64>,
}

/// The flush engine.
#[derive(Debug, Serialize)]
pub struct EngineMetrics {
    /// The flush instruction (`clflushopt`, `clflush`).
    pub instruction: &'static str,
    /// Cache-line size in bytes.
    pub line_size: u64,
    /// Flushes performed.
    pub batches: u64,
    /// Of which full flushes.
    pub full_flushes: u64,
    /// Bytes flushed.
    pub bytes: u64,
    /// Lines flushed.
    pub lines: u64,
    /// Failed flushes (answered HOST_ERROR).
    pub failures: u64,
    /// Of those, batches where not every planned line was flushed, or a vCPU
    /// was seen in guest mode: the fail-closed checks that fired.
    pub incomplete: u64,
    /// Shares that panicked (each failed its batch).
    pub share_panics: u64,
    /// The flush log's ring.
    pub flush_log: FlushLogMetrics,
    /// Flushes during which a vCPU was found running (must stay 0).
    pub vcpus_running_during_flush: u64,
    /// Time to pause every vCPU, ns.
    pub pause_ns: PercentileMetrics,
    /// Time from paused to flushed, ns.
    pub flush_ns: PercentileMetrics,
    /// The last flush, `null` before the first.
    pub last_flush: Option<LastFlush>,
}

/// The flush log (one record per batch).
#[derive(Debug, Serialize)]
pub struct FlushLogMetrics {
    /// Records kept now.
    pub len: usize,
    /// Records the ring holds at most.
    pub capacity: usize,
    /// Records dropped because the ring was full.
    pub dropped: u64,
    /// Sequence number of the newest record (0: none yet).
    pub last_seq: u64,
}

/// A latency distribution.
#[derive(Debug, Serialize)]
pub struct PercentileMetrics {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Largest.
    pub max: u64,
}

impl From<&Percentiles> for PercentileMetrics {
    fn from(p: &Percentiles) -> Self {
        Self {
            count: p.count,
            p50: p.p50,
            p90: p.p90,
            p99: p.p99,
            max: p.max,
        }
    }
}

/// What the last flush did.
#[derive(Debug, Serialize)]
pub struct LastFlush {
    /// A full flush.
    pub full: bool,
    /// Bytes flushed.
    pub bytes: u64,
    /// Planning time before the pause, ns.
    pub plan_ns: u64,
    /// Pause time, ns.
    pub pause_ns: u64,
    /// Flush time, ns.
    pub flush_ns: u64,
    /// One entry per share.
    pub shares: Vec<ShareMetrics>,
}

/// One share of the last flush.
#[derive(Debug, Serialize)]
pub struct ShareMetrics {
    /// The vCPU whose thread flushed it (`null`: the engine's thread).
    pub vcpu: Option<usize>,
    /// The host CPU the share ran on.
    pub host_cpu: i32,
    /// The host CPU that vCPU last ran guest code on (-1 if unknown).
    pub vcpu_last_host_cpu: i32,
    /// Lines flushed.
    pub lines: u64,
}

/// The vCPU threads.
#[derive(Debug, Serialize)]
pub struct VcpuMetrics {
    /// MMIO/PIO accesses no device claimed.
    pub unclaimed_accesses: u64,
    /// Extra exits served while completing a pending exit before a park.
    pub pending_io_trips: u64,
}

impl MetricsSources {
    /// The metrics now.
    pub fn document(&self) -> MetricsDocument {
        let stats = self.engine.stats();
        let (pause, flush) = stats.latency_percentiles();
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MetricsDocument {
            device: DeviceMetrics {
                counters: self.device.snapshot(),
                rejected_by_rule: self.device.rejected_by_rule(),
            },
            engine: EngineMetrics {
                instruction: self.engine.instruction().name(),
                line_size: self.engine.line_size(),
                batches: load(&stats.batches),
                full_flushes: load(&stats.full_flushes),
                bytes: load(&stats.bytes),
                lines: load(&stats.lines),
                failures: load(&stats.failures),
                incomplete: load(&stats.incomplete),
                share_panics: load(&stats.share_panics),
                flush_log: {
                    let log = self.engine.flush_log();
                    FlushLogMetrics {
                        len: log.len(),
                        capacity: log.capacity(),
                        dropped: log.dropped(),
                        last_seq: log.last_seq(),
                    }
                },
                vcpus_running_during_flush: load(&stats.vcpus_running_during_flush),
                pause_ns: (&pause).into(),
                flush_ns: (&flush).into(),
                last_flush: stats.last_flush().map(|record| LastFlush {
                    full: record.full,
                    bytes: record.bytes,
                    plan_ns: record.times.plan_ns,
                    pause_ns: record.times.pause_ns,
                    flush_ns: record.times.flush_ns,
                    shares: record
                        .shares
                        .iter()
                        .map(|share| ShareMetrics {
                            vcpu: share.vcpu,
                            host_cpu: share.host_cpu,
                            vcpu_last_host_cpu: share.vcpu_last_host_cpu,
                            lines: share.lines,
                        })
                        .collect(),
                }),
            },
            vcpus: VcpuMetrics {
                unclaimed_accesses: load(&self.vcpus.unclaimed_accesses),
                pending_io_trips: load(&self.vcpus.pending_io_trips),
            },
        }
    }

    /// The metrics as a JSON object.
    pub fn to_json(&self) -> String {
        // Only plain numbers, strings and maps with string keys: cannot fail.
        serde_json::to_string(&self.document()).expect("metrics serialize to JSON")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_counters_sit_in_device_beside_their_rules() {
        let metrics = CacheFlushMetrics::default();
        metrics.rules[2].fetch_add(3, Ordering::Relaxed);
        metrics.completed_ok.fetch_add(7, Ordering::Relaxed);
        let device = DeviceMetrics {
            counters: metrics.snapshot(),
            rejected_by_rule: metrics.rejected_by_rule(),
        };
        let json: serde_json::Value = serde_json::to_value(&device).unwrap();
        assert_eq!(json["completed_ok"], 7);
        assert_eq!(json["rejected_busy"], 0);
        assert_eq!(json["rejected_by_rule"]["chain-too-long"], 3);
        assert_eq!(json["rejected_by_rule"]["no-status-byte"], 0);
        let share = ShareMetrics {
            vcpu: None,
            host_cpu: 1,
            vcpu_last_host_cpu: -1,
            lines: 2,
        };
        assert_eq!(
            serde_json::to_string(&share).unwrap(),
            r#"{"vcpu":null,"host_cpu":1,"vcpu_last_host_cpu":-1,"lines":2}"#
        );
    }
}
