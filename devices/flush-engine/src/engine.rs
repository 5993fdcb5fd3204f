//! The flush engine: what answers the cache-flush device's batches.
//!
//! For one batch (every request pending at the same moment):
//! 1. turn the batch into guest-physical extents of whole lines ([`plan`]),
//!    cut at region edges; for a full flush, every page resident now
//!    ([`resident`]). This runs before the pause, so the guest does not wait
//!    for the residency scan. It is still exact: every line written before
//!    the request was submitted lies in a page that was resident when the
//!    request arrived; a page first touched after that holds only writes
//!    concurrent with the request, which no cache-invalidation call orders.
//!    Anything that cannot be planned fails the batch without a pause;
//! 2. pause every vCPU ([`VcpuPause`]);
//! 3. split the extents into one share per worker and run them
//!    ([`PausedVcpus::run_on_vcpus`]: on the paused vCPUs' own threads in
//!    this project's VMM, on host threads by default), each flushing through
//!    a [`LineFlush`] (CLFLUSHOPT in production);
//! 4. count: only if every planned line was flushed, and no vCPU was seen
//!    in guest mode, is the batch answered OK. A share that never ran,
//!    panicked, missed its deadline or met unmapped memory makes it
//!    HOST_ERROR, with a log line saying which;
//! 5. answer the batch ([`BatchCompletion`]) **while still paused**, and
//!    only then resume.
//!
//! The flush itself would be correct from any one core (CLFLUSH acts on the
//! whole coherence domain); running the shares on the vCPU threads spreads
//! the work over the cores the guest occupies, which is where the bandwidth
//! is.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::cache_flush::{BatchCompletion, FlushBackend, FlushBatch, FlushError};
use smallvec::SmallVec;
use vm_memory::{GuestAddressSpace, GuestMemoryBackend, GuestMemoryRegion};

use crate::cache_ops::{self, CacheOps, HostRange, LineFlush};
use crate::flush_log::{BatchOutcome, FlushLog, PhaseTimes, MAX_EXTENTS_PER_RECORD};
use crate::hooks::{HookFilter, HookId, HookPoint, PauseHook, PausedBatch};
use crate::pause::{PauseError, PausedVcpus, VcpuPause, Worker};
use crate::plan::{self, Extent, Extents};
use crate::resident;

/// How long a flush waits for every vCPU to stop, by default.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The default [`EngineConfig::inline_max_bytes`], measured by
/// `vmm-tools bench` (its crossover section: range flushes on 2 vCPUs,
/// always inline against always split, 64 KiB to 64 MiB). On a quiet
/// 2-CPU host the split flush phase wins from 512 KiB and the guest-timed
/// request from 1 MiB (64 MiB: 1.75 ms split against 3.25 ms inline), as
/// two threads flush ~1.8x as fast as one and handing a share to a parked
/// vCPU thread costs ~15-25 µs. With the host's CPUs busy with other work
/// the parked threads wait for a CPU and splitting lost at every size up
/// to 64 MiB (runs at load average 6-10, `resources/bench/summary.md`
/// history): an embedder on an oversubscribed host may want it higher.
pub const DEFAULT_INLINE_MAX_BYTES: u64 = 1 << 20;

/// Deadlines of the engine. The guest is paused for the whole of a flush, so
/// every wait is bounded; a batch that misses a deadline is answered
/// HOST_ERROR and the vCPUs are resumed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineConfig {
    /// How long a pause may take to stop every vCPU.
    pub pause_timeout: Duration,
    /// The work deadline is `work_timeout_base` plus the planned bytes at
    /// `min_flush_bytes_per_sec`: small batches get a short deadline, large
    /// full flushes a proportionate one, never an open-ended pause.
    pub work_timeout_base: Duration,
    /// The slowest flush rate still considered healthy (bytes/s). CLFLUSHOPT
    /// runs at 20-50 GB/s on one core here; 1 GiB/s leaves a 20x margin.
    pub min_flush_bytes_per_sec: u64,
    /// How long one pause-hook call may take.
    pub hook_timeout: Duration,
    /// Batches of at most this many bytes are flushed on the controlling
    /// thread alone (CLFLUSHOPT acts on the whole coherence domain); larger
    /// ones are split over the paused vCPUs' threads, where handing out the
    /// shares (tens of µs here) pays for itself. `vmm-tools bench` prints
    /// the measured crossover.
    pub inline_max_bytes: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            pause_timeout: PAUSE_TIMEOUT,
            work_timeout_base: Duration::from_secs(1),
            min_flush_bytes_per_sec: 1 << 30,
            hook_timeout: Duration::from_secs(1),
            inline_max_bytes: DEFAULT_INLINE_MAX_BYTES,
        }
    }
}

impl EngineConfig {
    /// The work deadline for `bytes` of planned lines.
    pub fn work_timeout(&self, bytes: u64) -> Duration {
        let rate = self.min_flush_bytes_per_sec.max(1);
        self.work_timeout_base
            + Duration::from_nanos(
                (u128::from(bytes) * 1_000_000_000 / u128::from(rate)).min(u128::from(u64::MAX))
                    as u64,
            )
    }
}

/// Points in a flush at which an observer is called. Tests use them to
/// check the order (Paused, Flushed, Completed, Resumed) and the pause
/// invariant from the host side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushPhase {
    /// Every vCPU is stopped; no line has been flushed yet.
    Paused,
    /// Every line has been flushed; the answer is not written yet.
    Flushed,
    /// The batch has been answered (OK or HOST_ERROR); vCPUs still stopped.
    Completed,
    /// The pause guard is gone: vCPUs may run again.
    Resumed,
}

/// A callback for [`FlushPhase`]s.
pub type FlushObserver = Arc<dyn Fn(FlushPhase) + Send + Sync>;

/// What one share of one flush did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShareRecord {
    /// The vCPU whose thread flushed it (`None`: a host thread, or the
    /// engine's own thread when the VMM offered no worker).
    pub vcpu: Option<usize>,
    /// The host CPU the share ran on.
    pub host_cpu: i32,
    /// The host CPU that vCPU last ran guest code on (-1 if unknown).
    pub vcpu_last_host_cpu: i32,
    /// Lines flushed.
    pub lines: u64,
}

/// The shares of one flush: one on the inline path, one per worker
/// otherwise. Up to two are kept inline, so that recording a batch
/// allocates nothing on the path of most requests.
pub type Shares = SmallVec<[ShareRecord; 2]>;

/// What the last flush did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlushRecord {
    /// One entry per share.
    pub shares: Shares,
    /// Whether it was a full flush.
    pub full: bool,
    /// Bytes flushed (whole lines).
    pub bytes: u64,
    /// How long each phase took (the same figures as the batch's flush log
    /// record).
    pub times: PhaseTimes,
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
    /// Batches answered HOST_ERROR (plan, pause or work failure, missing
    /// lines).
    pub failures: AtomicU64,
    /// Of those, batches where not every planned line was flushed, or a
    /// vCPU was seen in guest mode: the fail-closed checks that fired.
    pub incomplete: AtomicU64,
    /// Shares that panicked (each fails its batch).
    pub share_panics: AtomicU64,
    /// Times a share found a vCPU in guest mode while it flushed (as far as
    /// the VMM can tell). The design makes this impossible; it is counted so
    /// tests can assert it, and a batch that sees it fails.
    pub vcpus_running_during_flush: AtomicU64,
    /// One lock for both, taken once per batch.
    recent: Mutex<Recent>,
}

/// The last flush, and the most recent pause and flush durations (for
/// percentiles).
#[derive(Default)]
struct Recent {
    last: Option<FlushRecord>,
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
    /// Keeps a successful flush as the last one, and its durations.
    fn record(&self, record: FlushRecord) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let PhaseTimes {
            pause_ns, flush_ns, ..
        } = record.times;
        recent.last = Some(record);
        if recent.pause_ns.len() < LATENCY_WINDOW {
            recent.pause_ns.push(pause_ns);
            recent.flush_ns.push(flush_ns);
        } else {
            let i = recent.next;
            recent.pause_ns[i] = pause_ns;
            recent.flush_ns[i] = flush_ns;
            recent.next = (i + 1) % LATENCY_WINDOW;
        }
    }

    /// Percentiles of the pause and flush times of the last
    /// [`LATENCY_WINDOW`] flushes.
    pub fn latency_percentiles(&self) -> (Percentiles, Percentiles) {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        (
            Percentiles::of(&recent.pause_ns),
            Percentiles::of(&recent.flush_ns),
        )
    }

    /// The record of the last flush that ran.
    pub fn last_flush(&self) -> Option<FlushRecord> {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.last.clone()
    }
}

/// The pause-all flush engine, generic over how the VMM pauses its vCPUs
/// (`P`) and over its guest memory (`AS`: anything vm-memory's
/// [`GuestAddressSpace`] gives, e.g. `Arc<GuestMemoryMmap>` or a
/// `GuestMemoryAtomic` that follows hotplug; a fresh snapshot is taken per
/// batch). Clones share everything (counters, observer).
pub struct FlushEngine<P, AS: GuestAddressSpace> {
    pauser: Arc<P>,
    memory: AS,
    flush_op: Arc<dyn LineFlush>,
    instruction: cache_ops::FlushInstruction,
    line: u64,
    config: EngineConfig,
    stats: Arc<EngineStats>,
    observer: Arc<Slot<FlushObserver>>,
    log: Arc<FlushLog>,
    seq: Arc<AtomicU64>,
    hooks: Arc<HookSet<AS>>,
    /// [`monotonic_ns`] when the engine was created.
    created_ns: u64,
    estimate_sink: Arc<Slot<EstimateSink>>,
}

/// A callback an embedder may set, looked at several times per batch: unset
/// (the usual case) it costs one flag load, not a lock.
struct Slot<T> {
    set: AtomicBool,
    value: Mutex<Option<T>>,
}

impl<T: Clone> Slot<T> {
    fn empty() -> Self {
        Self {
            set: AtomicBool::new(false),
            value: Mutex::new(None),
        }
    }

    fn put(&self, value: Option<T>) {
        let mut slot = self.value.lock().unwrap_or_else(|p| p.into_inner());
        self.set.store(value.is_some(), Ordering::SeqCst);
        *slot = value;
    }

    /// The callback now, cloned so that it runs without the lock held (it
    /// may take a while, and may set the slot itself).
    fn get(&self) -> Option<T> {
        if !self.set.load(Ordering::SeqCst) {
            return None;
        }
        self.value.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The registered pause hooks, and whether there are any (checked without
/// the lock on every batch).
struct HookSet<AS: GuestAddressSpace> {
    any: AtomicBool,
    hooks: Mutex<Hooks<AS>>,
}

/// Receives a fresh (full-flush cost in ns, break-even range bytes) from
/// every successful full flush, before the batch is answered (so a driver
/// that re-reads the figures when it sees its answer finds these).
pub type EstimateSink = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// The registered pause hooks.
struct Hooks<AS: GuestAddressSpace> {
    next_id: u64,
    list: Vec<Registered<AS::M>>,
}

/// One registered hook.
type Registered<M> = (HookId, HookFilter, Arc<dyn PauseHook<M>>);

impl<P, AS: GuestAddressSpace> Clone for FlushEngine<P, AS> {
    fn clone(&self) -> Self {
        Self {
            pauser: self.pauser.clone(),
            memory: self.memory.clone(),
            flush_op: self.flush_op.clone(),
            instruction: self.instruction,
            line: self.line,
            config: self.config,
            stats: self.stats.clone(),
            observer: self.observer.clone(),
            log: self.log.clone(),
            seq: self.seq.clone(),
            hooks: self.hooks.clone(),
            created_ns: self.created_ns,
            estimate_sink: self.estimate_sink.clone(),
        }
    }
}

/// Why one batch failed, before it is turned into the device's
/// [`FlushError`].
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The extents could not be planned (nothing was paused).
    #[error("cannot plan the flush: {0}")]
    Plan(#[from] plan::PlanError),
    /// The residency scan of a full flush failed (nothing was paused).
    #[error("cannot find the resident guest pages: {0}")]
    Resident(#[from] resident::ResidentError),
    /// The vCPUs could not be paused (nothing was flushed).
    #[error("cannot pause the vCPUs: {0}")]
    Pause(#[source] crate::pause::PauseError),
    /// The shares did not all finish in time.
    #[error("flush work failed: {0}")]
    Work(#[source] crate::pause::PauseError),
    /// Fewer lines were flushed than planned.
    #[error("flushed {flushed} of {planned} planned lines ({missing_shares} of {shares} shares did not run to the end, {panicked} panicked)")]
    Incomplete {
        /// Lines planned.
        planned: u64,
        /// Lines flushed.
        flushed: u64,
        /// Shares.
        shares: usize,
        /// Shares without a record.
        missing_shares: usize,
        /// Shares that panicked.
        panicked: u64,
    },
    /// A vCPU was seen in guest mode while lines were being flushed.
    #[error("{0} vCPUs were in guest mode during the flush: the pause did not hold")]
    PauseBroken(u64),
    /// A pause hook failed.
    #[error("pause hook failed: {0}")]
    Hook(String),
}

impl<P, AS> FlushEngine<P, AS>
where
    P: VcpuPause + 'static,
    AS: GuestAddressSpace + Send + Sync,
    AS::M: GuestMemoryBackend + 'static,
    AS::T: Send + Sync + 'static,
{
    /// An engine flushing `memory` with the vCPUs `pauser` stops, with
    /// CLFLUSHOPT (or CLFLUSH) and the default deadlines.
    pub fn new(pauser: Arc<P>, memory: AS) -> Self {
        let ops = CacheOps::detect();
        Self {
            pauser,
            memory,
            flush_op: Arc::new(ops),
            instruction: ops.instruction,
            line: ops.line as u64,
            config: EngineConfig::default(),
            stats: Arc::new(EngineStats::default()),
            observer: Arc::new(Slot::empty()),
            log: Arc::new(FlushLog::default()),
            seq: Arc::new(AtomicU64::new(0)),
            hooks: Arc::new(HookSet {
                any: AtomicBool::new(false),
                hooks: Mutex::new(Hooks {
                    next_id: 0,
                    list: Vec::new(),
                }),
            }),
            created_ns: monotonic_ns(),
            estimate_sink: Arc::new(Slot::empty()),
        }
    }

    /// Where fresh full-flush figures go (the device's published estimate):
    /// after each successful full flush, its cost without the pause (the
    /// residency scan plus the flush) and the range size that costs as much
    /// at the bandwidth it flushed at.
    pub fn set_full_flush_estimate_sink(&self, sink: Option<EstimateSink>) {
        self.estimate_sink.put(sink);
    }

    /// The flush log: one record per batch, with its sequence number.
    pub fn flush_log(&self) -> &Arc<FlushLog> {
        &self.log
    }

    /// The sequence number the next batch will get.
    pub fn next_seq(&self) -> u64 {
        self.seq.load(Ordering::SeqCst) + 1
    }

    /// Registers `hook` for the batches `filter` selects; it runs during
    /// their pause (see [`PauseHook`]), each call bounded by
    /// [`EngineConfig::hook_timeout`].
    pub fn add_pause_hook(&self, filter: HookFilter, hook: Arc<dyn PauseHook<AS::M>>) -> HookId {
        let mut hooks = self.hooks.hooks.lock().unwrap_or_else(|p| p.into_inner());
        hooks.next_id += 1;
        let id = HookId(hooks.next_id);
        hooks.list.push((id, filter, hook));
        self.hooks.any.store(true, Ordering::SeqCst);
        id
    }

    /// Removes a hook; false if it was not registered.
    pub fn remove_pause_hook(&self, id: HookId) -> bool {
        let mut hooks = self.hooks.hooks.lock().unwrap_or_else(|p| p.into_inner());
        let before = hooks.list.len();
        hooks.list.retain(|(h, _, _)| *h != id);
        self.hooks
            .any
            .store(!hooks.list.is_empty(), Ordering::SeqCst);
        hooks.list.len() != before
    }

    /// Runs the matching hooks at `point`; the first failure is returned.
    fn run_hooks(
        &self,
        hooks: &[Arc<dyn PauseHook<AS::M>>],
        point: HookPoint,
        batch: &Option<Arc<PausedBatch>>,
        memory: &AS::T,
    ) -> Result<(), EngineError> {
        let Some(batch) = batch else {
            return Ok(());
        };
        for hook in hooks {
            crate::hooks::run_bounded(
                hook.clone(),
                point,
                batch.clone(),
                memory.clone(),
                self.config.hook_timeout,
            )
            .map_err(EngineError::Hook)?;
        }
        Ok(())
    }

    /// Appends the batch's record to the flush log.
    fn log_batch(&self, seq: u64, batch: &FlushBatch, extents: &[Extent], answer: Answer<'_>) {
        let answered_at_ns = monotonic_ns().saturating_sub(self.created_ns);
        self.log.push_with(|record| {
            record.seq = seq;
            record.answered_at_ns = answered_at_ns;
            record.full = batch.full;
            // Plain pushes: SmallVec's generic `extend` costs several times
            // as many instructions for the one or two items of most batches.
            record.extents.clear();
            for &extent in extents.iter().take(MAX_EXTENTS_PER_RECORD) {
                record.extents.push(extent);
            }
            record.extents_truncated = extents.len() > MAX_EXTENTS_PER_RECORD;
            record.share_host_cpus.clear();
            for share in answer.shares {
                record.share_host_cpus.push(share.host_cpu);
            }
            record.requests.clear();
            for &request in &batch.requests {
                record.requests.push(request);
            }
            record.outcome = answer.outcome;
            record.bytes = answer.bytes;
            record.times = answer.times;
        });
    }

    /// Replaces the deadlines.
    pub fn with_config(mut self, config: EngineConfig) -> Self {
        self.config = config;
        self
    }

    /// Replaces the flush operation (tests record the lines it is given).
    pub fn with_line_flush(mut self, flush_op: Arc<dyn LineFlush>) -> Self {
        self.flush_op = flush_op;
        self
    }

    /// The deadlines in use.
    pub fn config(&self) -> EngineConfig {
        self.config
    }

    /// Measures, without pausing anything, what a full flush costs now:
    /// returns (cost in ns, the range size in bytes that costs as much).
    /// The pause both kinds of request share is left out. (0, 0) if the
    /// residency scan fails.
    pub fn measure_full_flush(&self) -> (u64, u64) {
        let start = monotonic_ns();
        let memory = self.memory.memory();
        let Ok(extents) = resident::resident_extents(&*memory) else {
            return (0, 0);
        };
        let scanned = monotonic_ns();
        let lines: u64 = extents
            .iter()
            .map(|&e| flush_extent(&*memory, &*self.flush_op, e).unwrap_or(0))
            .sum();
        let bytes = lines * self.line;
        let done = monotonic_ns();
        // The same clock and arithmetic as a full flush's own phase times,
        // which refresh this estimate later.
        full_flush_estimate(
            scanned.saturating_sub(start),
            done.saturating_sub(scanned),
            bytes,
            self.line,
        )
    }

    /// The cache-line size flushes work in.
    pub fn line_size(&self) -> u64 {
        self.line
    }

    /// The instruction the default flush operation uses.
    pub fn instruction(&self) -> cache_ops::FlushInstruction {
        self.instruction
    }

    /// The engine's counters.
    pub fn stats(&self) -> &Arc<EngineStats> {
        &self.stats
    }

    /// Installs (or removes) the phase observer.
    pub fn set_observer(&self, observer: Option<FlushObserver>) {
        self.observer.put(observer);
    }

    fn observe(&self, phase: FlushPhase) {
        if let Some(observer) = self.observer.get() {
            observer(phase);
        }
    }

    /// The extents a batch covers, in whole lines, each inside one region.
    fn extents(&self, memory: &AS::M, batch: &FlushBatch) -> Result<Extents, EngineError> {
        if batch.full {
            // One extent per run of resident pages of one region.
            return Ok(Extents::from_vec(resident::resident_extents(memory)?));
        }
        // Pushed, not collected: see `plan::normalise`.
        let mut regions: SmallVec<[(u64, u64); 8]> = SmallVec::new();
        for region in memory.iter() {
            regions.push((region.start_addr().0, region.len()));
        }
        Ok(plan::split_at_regions(
            &plan::normalise(batch.extents.iter().map(|e| (e.addr, e.len)), self.line),
            &regions,
        )?)
    }

    /// Plans, pauses, runs the hooks and flushes, logs the batch, answers
    /// `done` while still paused, resumes. Every path answers `done` exactly
    /// once and logs one record.
    fn run(&self, batch: &FlushBatch, done: BatchCompletion) -> Result<FlushRecord, EngineError> {
        let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        let start = monotonic_ns();
        let memory = self.memory.memory();
        let fail_unpaused = |e: EngineError, done: BatchCompletion, times: PhaseTimes| {
            // Nothing paused, nothing flushed: the requests fail.
            let reason = e.to_string();
            let answer = Answer {
                outcome: BatchOutcome::HostError(reason.clone()),
                shares: &[],
                bytes: 0,
                times,
            };
            self.log_batch(seq, batch, &[], answer);
            done.complete(Err(FlushError { reason }));
            e
        };
        let extents = match self.extents(&memory, batch) {
            Ok(extents) => extents,
            Err(e) => {
                let times = PhaseTimes {
                    plan_ns: monotonic_ns().saturating_sub(start),
                    ..PhaseTimes::default()
                };
                return Err(fail_unpaused(e, done, times));
            }
        };
        let hooks: Vec<Arc<dyn PauseHook<AS::M>>> = if self.hooks.any.load(Ordering::SeqCst) {
            let hooks = self.hooks.hooks.lock().unwrap_or_else(|p| p.into_inner());
            hooks
                .list
                .iter()
                .filter(|(_, filter, _)| filter.matches(&batch.requests))
                .map(|(_, _, hook)| hook.clone())
                .collect()
        } else {
            Vec::new()
        };
        // What the hooks see, built only if a hook runs.
        let paused_batch = (!hooks.is_empty()).then(|| {
            Arc::new(PausedBatch {
                seq,
                full: batch.full,
                extents: extents.to_vec(),
                requests: batch.requests.clone(),
            })
        });
        let planned = monotonic_ns();
        let pause = match self.pauser.pause_all(self.config.pause_timeout) {
            Ok(pause) => pause,
            Err(e) => {
                let times = PhaseTimes {
                    plan_ns: planned.saturating_sub(start),
                    pause_ns: monotonic_ns().saturating_sub(planned),
                    flush_ns: 0,
                };
                return Err(fail_unpaused(EngineError::Pause(e), done, times));
            }
        };
        let paused = monotonic_ns();
        self.observe(FlushPhase::Paused);
        let result = self
            .run_hooks(&hooks, HookPoint::BeforeFlush, &paused_batch, &memory)
            .and_then(|()| self.flush_paused(&pause, &memory, &extents));
        let flushed = monotonic_ns();
        let result = result.and_then(|flushed| {
            self.observe(FlushPhase::Flushed);
            self.run_hooks(&hooks, HookPoint::AfterFlush, &paused_batch, &memory)?;
            Ok(flushed)
        });
        // Logged before the answer, so whoever sees the answer finds the
        // record.
        let plan_ns = planned.saturating_sub(start);
        let flush_ns = flushed.saturating_sub(paused);
        let pause_ns = paused.saturating_sub(planned);
        let times = PhaseTimes {
            plan_ns,
            pause_ns,
            flush_ns,
        };
        let answer = match &result {
            Ok((shares, bytes)) => Answer {
                outcome: BatchOutcome::Ok,
                shares,
                bytes: *bytes,
                times,
            },
            Err(e) => Answer {
                outcome: BatchOutcome::HostError(e.to_string()),
                shares: &[],
                bytes: 0,
                times,
            },
        };
        self.log_batch(seq, batch, &extents, answer);
        if let (true, Ok((_, bytes))) = (batch.full, &result) {
            // Published before the answer: a driver re-reads the figures as
            // soon as it sees its FLUSH_ALL answered, and must find the ones
            // this flush measured (the answer may reach it from another
            // thread before this one returns).
            self.publish_full_estimate(plan_ns, flush_ns, *bytes);
        }
        match &result {
            Ok(_) => done.complete(Ok(())),
            Err(e) => done.complete(Err(FlushError {
                reason: e.to_string(),
            })),
        }
        self.observe(FlushPhase::Completed);
        drop(pause);
        self.observe(FlushPhase::Resumed);
        let (shares, bytes) = result?;
        Ok(FlushRecord {
            shares,
            bytes,
            full: batch.full,
            times,
        })
    }

    /// Hands the figures of a full flush that flushed `bytes` to the
    /// estimate sink, if one is set.
    fn publish_full_estimate(&self, plan_ns: u64, flush_ns: u64, bytes: u64) {
        if bytes == 0 {
            return;
        }
        if let Some(sink) = self.estimate_sink.get() {
            let (cost_ns, break_even) = full_flush_estimate(plan_ns, flush_ns, bytes, self.line);
            sink(cost_ns, break_even);
        }
    }

    /// Flushes `extents` on the workers of `pause`; returns the share
    /// records and the bytes flushed, or why not every line was.
    fn flush_paused(
        &self,
        pause: &P::Paused<'_>,
        memory: &AS::T,
        extents: &[Extent],
    ) -> Result<(Shares, u64), EngineError> {
        let bytes: u64 = extents.iter().map(|e| e.1).sum();
        let planned_lines = plan::lines_in(extents, self.line);
        // Small batches on this thread alone: see `inline_max_bytes`.
        let inline = bytes <= self.config.inline_max_bytes;
        let workers = if inline { 0 } else { pause.worker_count() };
        let ShareOutcome {
            records,
            panicked,
            in_guest,
            work_result,
        } = if workers == 0 {
            // A small batch, or the VMM offers no worker (e.g. every vCPU
            // thread has ended while the guest shuts down): do the work
            // here, with nothing handed to another thread (this is the path
            // of most requests; the answer is still owed to the driver).
            self.flush_here(pause.controller_vcpu(), &**memory, extents)
        } else {
            // The workers' closure owns its snapshot of the memory map.
            self.flush_on_workers(pause, memory.clone(), extents, workers, bytes)
        };
        // Counted only when there is something to count: every locked
        // add is paid cold on every request.
        if in_guest > 0 {
            self.stats
                .vcpus_running_during_flush
                .fetch_add(in_guest, Ordering::Relaxed);
        }
        if panicked > 0 {
            self.stats
                .share_panics
                .fetch_add(panicked, Ordering::Relaxed);
        }
        work_result.map_err(EngineError::Work)?;
        if in_guest > 0 {
            return Err(EngineError::PauseBroken(in_guest));
        }
        let share_count = records.len();
        let missing_shares = records.iter().filter(|r| r.is_none()).count();
        let mut shares = Shares::new();
        for record in records.into_iter().flatten() {
            shares.push(record);
        }
        let flushed: u64 = shares.iter().map(|s| s.lines).sum();
        if flushed != planned_lines || missing_shares > 0 {
            return Err(EngineError::Incomplete {
                planned: planned_lines,
                flushed,
                shares: share_count,
                missing_shares,
                panicked,
            });
        }
        Ok((shares, bytes))
    }

    /// Flushes every extent on the calling thread, as one share (none when
    /// there is nothing to flush).
    fn flush_here(&self, vcpu: Option<usize>, memory: &AS::M, extents: &[Extent]) -> ShareOutcome {
        if extents.is_empty() {
            return ShareOutcome {
                records: SmallVec::new(),
                panicked: 0,
                in_guest: 0,
                work_result: Ok(()),
            };
        }
        let lines = flush_share(&*self.flush_op, memory, extents);
        // Checked after the flush: a vCPU that ran during it would still be
        // in guest mode.
        let in_guest = self.pauser.vcpus_in_guest().unwrap_or(0) as u64;
        ShareOutcome {
            panicked: u64::from(lines.is_none()),
            records: smallvec::smallvec![lines.map(|lines| ShareRecord {
                vcpu,
                host_cpu: current_cpu(),
                vcpu_last_host_cpu: vcpu
                    .and_then(|v| self.pauser.last_host_cpu(v))
                    .unwrap_or(-1),
                lines,
            })],
            in_guest,
            work_result: Ok(()),
        }
    }

    /// Splits the extents over the paused vCPUs' threads and waits for them.
    fn flush_on_workers(
        &self,
        pause: &P::Paused<'_>,
        memory: AS::T,
        extents: &[Extent],
        workers: usize,
        bytes: u64,
    ) -> ShareOutcome {
        let shares = Arc::new(plan::split(extents, workers, self.line));
        let share_count = shares.len();
        let records: Arc<Mutex<Vec<Option<ShareRecord>>>> =
            Arc::new(Mutex::new(vec![None; share_count]));
        let panicked = Arc::new(AtomicU64::new(0));
        let in_guest = Arc::new(AtomicU64::new(0));
        let share_of = {
            let (shares, records) = (shares.clone(), records.clone());
            let (panicked, in_guest) = (panicked.clone(), in_guest.clone());
            let flush_op = self.flush_op.clone();
            let pauser = self.pauser.clone();
            move |worker: Worker| {
                let Some(share) = shares.get(worker.index) else {
                    return;
                };
                // A panic in one share must not take a vCPU thread (or the
                // engine) with it: the share is just not counted, and the
                // batch fails closed.
                let Some(lines) = flush_share(&*flush_op, &*memory, share) else {
                    panicked.fetch_add(1, Ordering::SeqCst);
                    return;
                };
                // Checked after the share: a vCPU that ran during it would
                // still be in guest mode.
                if let Some(n) = pauser.vcpus_in_guest() {
                    in_guest.fetch_add(n as u64, Ordering::SeqCst);
                }
                let record = ShareRecord {
                    vcpu: worker.vcpu,
                    host_cpu: current_cpu(),
                    vcpu_last_host_cpu: worker
                        .vcpu
                        .and_then(|v| pauser.last_host_cpu(v))
                        .unwrap_or(-1),
                    lines,
                };
                records.lock().unwrap_or_else(|p| p.into_inner())[worker.index] = Some(record);
            }
        };
        let work_result = pause.run_on_vcpus(Arc::new(share_of), self.config.work_timeout(bytes));
        let records = std::mem::take(&mut *records.lock().unwrap_or_else(|p| p.into_inner()));
        ShareOutcome {
            records: SmallVec::from_vec(records),
            panicked: panicked.load(Ordering::SeqCst),
            in_guest: in_guest.load(Ordering::SeqCst),
            work_result,
        }
    }
}

/// What a batch came to, for its log record.
struct Answer<'a> {
    outcome: BatchOutcome,
    shares: &'a [ShareRecord],
    bytes: u64,
    times: PhaseTimes,
}

/// What the shares of one batch did.
struct ShareOutcome {
    /// One entry per share; `None` where a share did not report (panicked,
    /// or its worker never ran it).
    records: SmallVec<[Option<ShareRecord>; 2]>,
    /// Shares that panicked.
    panicked: u64,
    /// vCPUs found in guest mode after a share.
    in_guest: u64,
    /// Whether every worker ran its share in time.
    work_result: Result<(), PauseError>,
}

/// Flushes one share's extents; `None` if the flush panicked (contained
/// here, so that the batch fails closed instead of a thread ending).
fn flush_share<M: GuestMemoryBackend>(
    flush_op: &dyn LineFlush,
    memory: &M,
    share: &[Extent],
) -> Option<u64> {
    catch_unwind(AssertUnwindSafe(|| {
        share
            .iter()
            // An extent that cannot be mapped is not counted.
            .map(|&extent| flush_extent(memory, flush_op, extent).unwrap_or(0))
            .sum()
    }))
    .ok()
}

impl<P, AS> FlushBackend for FlushEngine<P, AS>
where
    P: VcpuPause + 'static,
    AS: GuestAddressSpace + Send + Sync,
    AS::M: GuestMemoryBackend + 'static,
    AS::T: Send + Sync + 'static,
{
    fn flush(&self, batch: &FlushBatch, done: BatchCompletion) {
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        if batch.full {
            self.stats.full_flushes.fetch_add(1, Ordering::Relaxed);
        }
        match self.run(batch, done) {
            Ok(record) => {
                let lines: u64 = record.shares.iter().map(|s| s.lines).sum();
                self.stats.lines.fetch_add(lines, Ordering::Relaxed);
                self.stats.bytes.fetch_add(record.bytes, Ordering::Relaxed);
                self.stats
                    .pause_ns
                    .fetch_add(record.times.pause_ns, Ordering::Relaxed);
                self.stats
                    .flush_ns
                    .fetch_add(record.times.flush_ns, Ordering::Relaxed);
                log::debug!(
                    "flushed {} bytes ({} lines, full: {}) in {} shares; pause {} µs, flush {} µs",
                    record.bytes,
                    lines,
                    record.full,
                    record.shares.len(),
                    record.times.pause_ns / 1000,
                    record.times.flush_ns / 1000
                );
                self.stats.record(record);
            }
            Err(e) => {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                if matches!(
                    e,
                    EngineError::Incomplete { .. } | EngineError::PauseBroken(_)
                ) {
                    self.stats.incomplete.fetch_add(1, Ordering::Relaxed);
                }
                // A host-side failure, not a guest mistake: the guest cannot
                // cause it, so it cannot flood the log with it.
                log::error!("cache flush answered HOST_ERROR: {e}");
            }
        }
    }
}

/// A full flush's cost without the pause, and the range size that costs as
/// much at the bandwidth the flush ran at.
pub fn full_flush_estimate(plan_ns: u64, flush_ns: u64, bytes: u64, line: u64) -> (u64, u64) {
    let cost_ns = (plan_ns + flush_ns).max(1);
    let break_even = (u128::from(cost_ns) * u128::from(bytes) / u128::from(flush_ns.max(1))) as u64;
    (cost_ns, break_even.max(line))
}

/// Flushes one extent (inside one region) through the VMM's mapping;
/// `None` if the extent is not mapped.
fn flush_extent<M: GuestMemoryBackend>(
    memory: &M,
    flush_op: &dyn LineFlush,
    (addr, len): Extent,
) -> Option<u64> {
    let slice = memory.get_slice(addr, usize::try_from(len).ok()?).ok()?;
    let guard = slice.ptr_guard();
    // SAFETY: `slice` maps `len` bytes of guest RAM, kept mapped by `memory`
    // (a snapshot the caller holds across this call).
    let range = unsafe { HostRange::new(guard.as_ptr(), slice.len()) };
    Some(flush_op.flush_lines(addr, range))
}

/// CLOCK_MONOTONIC, in ns. A batch's phase times are differences of these,
/// plain subtractions: each `Instant` difference normalises a timespec
/// (~40 instructions), and every request took five.
fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec; the call writes nothing
    // else. CLOCK_MONOTONIC always exists, so it cannot fail (and `now`
    // stays zero if it did).
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    (now.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(now.tv_nsec as u64)
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
