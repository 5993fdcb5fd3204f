//! The flush engine: the VMM side of the cache-flush device.
//!
//! For one batch (every request pending at the same moment):
//! 1. turn the batch into guest-physical extents of whole lines ([`plan`]);
//!    for a full flush, every page resident now ([`resident`]). This runs
//!    before the pause, so the guest does not wait for the residency scan
//!    (it is most of a full flush's time in a large guest). It is still
//!    exact: every line written before the request was submitted lies in a
//!    page that was resident when the request arrived; a page first touched
//!    after that holds only writes concurrent with the request, which no
//!    cache-invalidation call orders;
//! 2. pause every vCPU through the [`crate::vcpu::control`] channel;
//! 3. split the extents into one share per vCPU thread (parked, or halted
//!    for good: its thread stays); each flushes its share ([`cache_ops`]) on
//!    the host core it is running on, through the VMM's mapping of guest
//!    RAM;
//! 4. when every share is done, the device writes the completions (the
//!    `complete` callback), and only then are the vCPUs resumed.
//!
//! The flush itself would be correct from any one core (CLFLUSH acts on the
//! whole coherence domain); running the shares on the vCPU threads spreads the
//! work over the cores the guest occupies, which is where the bandwidth is.

pub mod cache_ops;
pub mod plan;
pub mod resident;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::cache_flush::{CacheFlusher, FlushBatch, FlushError};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap};

use crate::vcpu::control::{PauseGuard, VcpuControl};
use cache_ops::FlushInstruction;
use plan::Extent;

/// How long a flush waits for every vCPU to park.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a flush waits for every share to be done. A full flush of the
/// largest guest (64 GiB resident) takes a few seconds at the ~20-50 GB/s
/// a core flushes at.
pub const WORK_TIMEOUT: Duration = Duration::from_secs(60);

/// Points in a flush at which an observer is called (all with every vCPU
/// paused): tests use it to check the pause invariant from the host side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushPhase {
    /// Every vCPU is parked; no line has been flushed yet.
    Paused,
    /// Every line has been flushed; the completions are not written yet.
    Flushed,
}

/// A callback for [`FlushPhase`]s.
pub type FlushObserver = Arc<dyn Fn(FlushPhase) + Send + Sync>;

/// What one share of one flush did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShareRecord {
    /// The vCPU whose thread flushed it (`None`: the engine's own thread,
    /// when no vCPU thread was left to take it).
    pub vcpu: Option<usize>,
    /// The host CPU the share ran on.
    pub host_cpu: i32,
    /// The host CPU that vCPU last ran guest code on (-1 if unknown).
    pub vcpu_last_host_cpu: i32,
    /// Lines flushed.
    pub lines: u64,
}

/// What the last flush did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlushRecord {
    /// One entry per share.
    pub shares: Vec<ShareRecord>,
    /// Whether it was a full flush.
    pub full: bool,
    /// Bytes flushed (whole lines).
    pub bytes: u64,
    /// Time to plan the extents (for a full flush: the residency scan),
    /// before the pause.
    pub plan_ns: u64,
    /// Time to pause every vCPU.
    pub pause_ns: u64,
    /// Time from paused to every line flushed.
    pub flush_ns: u64,
}

/// Counters of the engine since the VM started.
#[derive(Default)]
pub struct EngineStats {
    /// Batches flushed (successfully or not).
    pub batches: AtomicU64,
    /// Batches that contained a full flush.
    pub full_flushes: AtomicU64,
    /// Bytes flushed.
    pub bytes: AtomicU64,
    /// Lines flushed.
    pub lines: AtomicU64,
    /// Total time spent pausing vCPUs.
    pub pause_ns: AtomicU64,
    /// Total time spent flushing with every vCPU paused.
    pub flush_ns: AtomicU64,
    /// Batches that failed (pause or work timeout, residency scan).
    pub failures: AtomicU64,
    /// Times a share found a vCPU inside `KVM_RUN` while it flushed. The
    /// design makes this impossible; it is counted so tests can assert it.
    pub vcpus_running_during_flush: AtomicU64,
    last: Mutex<Option<FlushRecord>>,
    latencies: Mutex<Latencies>,
}

/// The most recent pause and flush durations, for percentiles.
#[derive(Default)]
struct Latencies {
    pause_ns: Vec<u64>,
    flush_ns: Vec<u64>,
    next: usize,
}

/// How many recent flushes the percentiles are taken over.
pub const LATENCY_WINDOW: usize = 1 << 16;

/// Percentiles of a set of durations, in nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Percentiles {
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

impl Percentiles {
    /// Nearest-rank percentiles of `samples`.
    pub fn of(samples: &[u64]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        let rank = |p: usize| sorted[(sorted.len() * p).div_ceil(100).saturating_sub(1)];
        Self {
            count: sorted.len() as u64,
            p50: rank(50),
            p90: rank(90),
            p99: rank(99),
            max: sorted[sorted.len() - 1],
        }
    }
}

impl EngineStats {
    fn record_latency(&self, pause_ns: u64, flush_ns: u64) {
        let mut l = self.latencies.lock().unwrap_or_else(|p| p.into_inner());
        if l.pause_ns.len() < LATENCY_WINDOW {
            l.pause_ns.push(pause_ns);
            l.flush_ns.push(flush_ns);
        } else {
            let i = l.next;
            l.pause_ns[i] = pause_ns;
            l.flush_ns[i] = flush_ns;
            l.next = (i + 1) % LATENCY_WINDOW;
        }
    }

    /// Percentiles of the pause and flush times of the last
    /// [`LATENCY_WINDOW`] flushes.
    pub fn latency_percentiles(&self) -> (Percentiles, Percentiles) {
        let l = self.latencies.lock().unwrap_or_else(|p| p.into_inner());
        (Percentiles::of(&l.pause_ns), Percentiles::of(&l.flush_ns))
    }

    /// The record of the last flush that ran.
    pub fn last_flush(&self) -> Option<FlushRecord> {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The pause-all flush engine. Clones share everything (counters, observer).
#[derive(Clone)]
pub struct FlushEngine {
    control: Arc<VcpuControl>,
    memory: GuestMemoryMmap,
    instruction: FlushInstruction,
    line: u64,
    stats: Arc<EngineStats>,
    observer: Arc<Mutex<Option<FlushObserver>>>,
}

impl FlushEngine {
    /// An engine flushing `memory` with the vCPUs of `control`.
    pub fn new(control: Arc<VcpuControl>, memory: GuestMemoryMmap) -> Self {
        Self {
            control,
            memory,
            instruction: FlushInstruction::detect(),
            line: cache_ops::cache_line_size() as u64,
            stats: Arc::new(EngineStats::default()),
            observer: Arc::new(Mutex::new(None)),
        }
    }

    /// Measures, without pausing anything, what a full flush costs now:
    /// returns (cost in ns, the range size in bytes that costs as much).
    /// The pause both kinds of request share is left out. Called once when
    /// the VM is created, so the device can publish the figures in its
    /// configuration space; (0, 0) if the residency scan fails.
    pub fn measure_full_flush(&self) -> (u64, u64) {
        let start = Instant::now();
        let Ok(extents) = resident::resident_extents(&self.memory) else {
            return (0, 0);
        };
        let scanned = Instant::now();
        let bytes: u64 = extents
            .iter()
            .map(|&(addr, len)| {
                flush_extent(
                    &self.memory,
                    self.instruction,
                    self.line as usize,
                    addr,
                    len,
                ) * self.line
            })
            .sum();
        let done = Instant::now();
        let cost_ns = (done - start).as_nanos().max(1) as u64;
        let flush_ns = (done - scanned).as_nanos().max(1) as u64;
        // A range of B bytes costs about B / (bytes / flush_ns).
        let break_even = (u128::from(cost_ns) * u128::from(bytes) / u128::from(flush_ns)) as u64;
        (cost_ns, break_even.max(self.line))
    }

    /// The cache-line size flushes work in.
    pub fn line_size(&self) -> u64 {
        self.line
    }

    /// The instruction in use.
    pub fn instruction(&self) -> FlushInstruction {
        self.instruction
    }

    /// The engine's counters.
    pub fn stats(&self) -> &Arc<EngineStats> {
        &self.stats
    }

    /// Installs (or removes) the phase observer.
    pub fn set_observer(&self, observer: Option<FlushObserver>) {
        *self.observer.lock().unwrap_or_else(|p| p.into_inner()) = observer;
    }

    fn observe(&self, phase: FlushPhase) {
        let observer = self
            .observer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(observer) = observer {
            observer(phase);
        }
    }

    /// The extents a batch covers, in whole lines.
    fn extents(&self, batch: &FlushBatch) -> Result<Vec<Extent>, FlushError> {
        if batch.full {
            resident::resident_extents(&self.memory).map_err(|e| FlushError {
                reason: e.to_string(),
            })
        } else {
            let raw: Vec<Extent> = batch.extents.iter().map(|e| (e.addr, e.len)).collect();
            Ok(plan::normalise(&raw, self.line))
        }
    }

    /// Plans, pauses, flushes, calls `complete` (success or failure) while
    /// still paused, resumes; returns what happened. A failed plan completes
    /// the batch with the error without pausing. `complete` is not called
    /// only when the pause itself failed (nothing was flushed, nothing
    /// paused).
    fn run(
        &self,
        batch: &FlushBatch,
        complete: &mut dyn FnMut(Result<(), FlushError>),
    ) -> Result<FlushRecord, FlushError> {
        let start = Instant::now();
        let extents = match self.extents(batch) {
            Ok(extents) => extents,
            Err(e) => {
                // Nothing paused, nothing flushed: the requests fail.
                complete(Err(FlushError {
                    reason: e.reason.clone(),
                }));
                return Err(e);
            }
        };
        let planned = Instant::now();
        let pause = self
            .control
            .pause_all(PAUSE_TIMEOUT)
            .map_err(|e| FlushError {
                reason: e.to_string(),
            })?;
        let paused = Instant::now();
        self.observe(FlushPhase::Paused);
        let result = self.flush_paused(&pause, &extents);
        let flushed = Instant::now();
        match &result {
            Ok(_) => {
                self.observe(FlushPhase::Flushed);
                complete(Ok(()));
            }
            Err(e) => complete(Err(FlushError {
                reason: e.reason.clone(),
            })),
        }
        drop(pause);
        let (shares, bytes) = result?;
        Ok(FlushRecord {
            shares,
            bytes,
            full: batch.full,
            plan_ns: (planned - start).as_nanos() as u64,
            pause_ns: (paused - planned).as_nanos() as u64,
            flush_ns: (flushed - paused).as_nanos() as u64,
        })
    }

    /// Flushes `extents` on the parked vCPU threads of `pause`; returns the
    /// share records and the bytes flushed.
    fn flush_paused(
        &self,
        pause: &PauseGuard<'_>,
        extents: &[Extent],
    ) -> Result<(Vec<ShareRecord>, u64), FlushError> {
        let bytes = extents.iter().map(|e| e.1).sum();
        let workers = pause.parked();
        let shares = Arc::new(plan::split(extents, workers.len().max(1), self.line));
        let records = Arc::new(Mutex::new(Vec::with_capacity(shares.len())));
        let share_of = {
            let shares = shares.clone();
            let records = records.clone();
            let memory = self.memory.clone();
            let control = self.control.clone();
            let stats = self.stats.clone();
            let (instruction, line) = (self.instruction, self.line as usize);
            move |slot: usize, vcpu: Option<usize>| {
                let Some(share) = shares.get(slot) else {
                    return;
                };
                let mut lines = 0;
                for &(addr, len) in share {
                    lines += flush_extent(&memory, instruction, line, addr, len);
                }
                // Checked after the share: a vCPU that ran during it would
                // still be in KVM_RUN.
                let running = control.vcpus_in_kvm_run() as u64;
                stats
                    .vcpus_running_during_flush
                    .fetch_add(running, Ordering::Relaxed);
                let record = ShareRecord {
                    vcpu,
                    host_cpu: current_cpu(),
                    vcpu_last_host_cpu: vcpu.map_or(-1, |v| control.last_host_cpu(v)),
                    lines,
                };
                records
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(record);
            }
        };
        if workers.is_empty() {
            // Every vCPU thread has ended (the guest is shutting down): do the
            // work here; the completion is still owed to the driver.
            share_of(0, None);
        } else {
            let share_of = Arc::new(share_of);
            pause
                .run_on_parked(
                    Arc::new(move |vcpu| {
                        if let Some(slot) = workers.iter().position(|&v| v == vcpu) {
                            share_of(slot, Some(vcpu));
                        }
                    }),
                    WORK_TIMEOUT,
                )
                .map_err(|e| FlushError {
                    reason: e.to_string(),
                })?;
        }
        let shares = std::mem::take(&mut *records.lock().unwrap_or_else(|p| p.into_inner()));
        Ok((shares, bytes))
    }
}

impl CacheFlusher for FlushEngine {
    fn flush(&self, batch: &FlushBatch, complete: &mut dyn FnMut(Result<(), FlushError>)) {
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        if batch.full {
            self.stats.full_flushes.fetch_add(1, Ordering::Relaxed);
        }
        let completed = std::cell::Cell::new(false);
        let mut complete_once = |result: Result<(), FlushError>| {
            completed.set(true);
            complete(result);
        };
        match self.run(batch, &mut complete_once) {
            Ok(record) => {
                let lines: u64 = record.shares.iter().map(|s| s.lines).sum();
                self.stats.lines.fetch_add(lines, Ordering::Relaxed);
                self.stats.bytes.fetch_add(record.bytes, Ordering::Relaxed);
                self.stats
                    .pause_ns
                    .fetch_add(record.pause_ns, Ordering::Relaxed);
                self.stats
                    .flush_ns
                    .fetch_add(record.flush_ns, Ordering::Relaxed);
                self.stats.record_latency(record.pause_ns, record.flush_ns);
                log::debug!(
                    "flushed {} bytes ({} lines, full: {}) in {} shares; pause {} µs, flush {} µs",
                    record.bytes,
                    lines,
                    record.full,
                    record.shares.len(),
                    record.pause_ns / 1000,
                    record.flush_ns / 1000
                );
                *self.stats.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(record);
            }
            Err(e) => {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                log::error!("{e}");
                if !completed.get() {
                    complete_once(Err(e));
                }
            }
        }
    }
}

/// Flushes one extent of guest RAM through the VMM's mapping.
fn flush_extent(
    memory: &GuestMemoryMmap,
    instruction: FlushInstruction,
    line: usize,
    addr: vm_memory::GuestAddress,
    len: u64,
) -> u64 {
    // The device validated the extent against this memory, and the plan only
    // rounds within pages, so the slice exists; if it did not, nothing is
    // touched and the lines are simply not counted.
    let Ok(slice) = memory.get_slice(addr, len as usize) else {
        log::error!(
            "flush extent {:#x}+{len:#x} is not in guest RAM; skipped",
            addr.0
        );
        return 0;
    };
    let guard = slice.ptr_guard();
    // SAFETY: `slice` is a live mapping of `len` bytes of guest RAM, kept
    // mapped by `memory` (which this closure owns a handle of).
    unsafe { cache_ops::flush_range(instruction, guard.as_ptr(), slice.len(), line) }
}

/// The host CPU this thread runs on.
pub fn current_cpu() -> i32 {
    // SAFETY: sched_getcpu has no memory effects.
    unsafe { libc::sched_getcpu() }
}

#[cfg(test)]
mod tests {
    use super::Percentiles;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<u64> = (1..=100).rev().collect();
        let p = Percentiles::of(&samples);
        assert_eq!(
            (p.count, p.p50, p.p90, p.p99, p.max),
            (100, 50, 90, 99, 100)
        );
        assert_eq!(Percentiles::of(&[]), Percentiles::default());
        assert_eq!(Percentiles::of(&[7]).p50, 7);
    }
}
