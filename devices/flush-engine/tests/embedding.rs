//! The engine embedded by a VMM that is not this project's: its "vCPUs" are
//! plain threads with a pause flag, no `VcpuControl`, no KVM. These tests
//! are deterministic (no timing): each fails if the engine answers OK
//! without flushing every requested line while no vCPU ran, or answers
//! after the vCPUs resumed.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use devices::cache_flush::{BatchCompletion, FlushBackend, FlushBatch, GuestExtent};
use flush_engine::{
    CacheOps, FlushEngine, FlushPhase, HostRange, LineFlush, PauseError, PausedVcpus, VcpuPause,
    WorkFn,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const LINE: u64 = 64;

/// What happened, in order, as seen by the embedder's own code.
type Journal = Arc<Mutex<Vec<String>>>;

fn note(journal: &Journal, event: impl Into<String>) {
    journal.lock().unwrap().push(event.into());
}

// ------------------------------------------------------- the embedder's VMM --

/// A vCPU manager of another VMM: threads that "run guest code" (bump a
/// counter in guest memory) until asked to pause, then acknowledge and
/// block on a condition variable.
struct ThreadVcpus {
    state: Mutex<PauseState>,
    wakeup: Condvar,
    running: Vec<AtomicBool>,
    stop: AtomicBool,
    journal: Journal,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Test knob: `run_on_vcpus` skips this worker (a lost share).
    skip_worker: Option<usize>,
    /// Test knob: report this many vCPUs in guest mode during the flush.
    claim_in_guest: usize,
    /// Test knob: never acknowledge a pause.
    never_pause: bool,
}

#[derive(Default)]
struct PauseState {
    requested: bool,
    parked: usize,
}

impl ThreadVcpus {
    fn start(count: usize, memory: GuestMemoryMmap, journal: Journal) -> Arc<Self> {
        Self::start_with(count, memory, journal, |_| {})
    }

    fn start_with(
        count: usize,
        memory: GuestMemoryMmap,
        journal: Journal,
        tweak: impl FnOnce(&mut Self),
    ) -> Arc<Self> {
        let mut vcpus = Self {
            state: Mutex::new(PauseState::default()),
            wakeup: Condvar::new(),
            running: (0..count).map(|_| AtomicBool::new(false)).collect(),
            stop: AtomicBool::new(false),
            journal,
            threads: Mutex::new(Vec::new()),
            skip_worker: None,
            claim_in_guest: 0,
            never_pause: false,
        };
        tweak(&mut vcpus);
        let vcpus = Arc::new(vcpus);
        for index in 0..count {
            let (me, memory) = (vcpus.clone(), memory.clone());
            let handle = std::thread::spawn(move || me.vcpu_loop(index, &memory));
            vcpus.threads.lock().unwrap().push(handle);
        }
        vcpus
    }

    fn vcpu_loop(&self, index: usize, memory: &GuestMemoryMmap) {
        let counter = GuestAddress(0x1000 + 64 * index as u64);
        while !self.stop.load(Ordering::SeqCst) {
            {
                let mut st = self.state.lock().unwrap();
                if st.requested {
                    st.parked += 1;
                    self.wakeup.notify_all();
                    while st.requested && !self.stop.load(Ordering::SeqCst) {
                        st = self.wakeup.wait(st).unwrap();
                    }
                    st.parked -= 1;
                    continue;
                }
                self.running[index].store(true, Ordering::SeqCst);
            }
            // "Guest code": a few increments, then look at the flag again.
            for _ in 0..100 {
                let n: u64 = memory.read_obj(counter).unwrap();
                memory.write_obj(n + 1, counter).unwrap();
            }
            self.running[index].store(false, Ordering::SeqCst);
        }
    }

    fn counters(memory: &GuestMemoryMmap, count: usize) -> Vec<u64> {
        (0..count)
            .map(|i| {
                memory
                    .read_obj(GuestAddress(0x1000 + 64 * i as u64))
                    .unwrap()
            })
            .collect()
    }

    fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wakeup.notify_all();
        for t in self.threads.lock().unwrap().drain(..) {
            t.join().unwrap();
        }
    }
}

struct ThreadPause<'a>(&'a ThreadVcpus);

impl VcpuPause for ThreadVcpus {
    type Paused<'a> = ThreadPause<'a>;

    fn pause_all(&self, timeout: Duration) -> Result<ThreadPause<'_>, PauseError> {
        let mut st = self.state.lock().unwrap();
        st.requested = true;
        let total = self.running.len();
        let (mut st, result) = self
            .wakeup
            .wait_timeout_while(st, timeout, |st| self.never_pause || st.parked < total)
            .unwrap();
        if result.timed_out() {
            st.requested = false;
            self.wakeup.notify_all();
            return Err(PauseError::PauseTimeout {
                vcpus: (0..total).collect(),
                timeout,
            });
        }
        drop(st);
        note(&self.journal, "paused");
        Ok(ThreadPause(self))
    }

    fn vcpus_in_guest(&self) -> Option<usize> {
        let real = self
            .running
            .iter()
            .filter(|r| r.load(Ordering::SeqCst))
            .count();
        Some(real + self.claim_in_guest)
    }
}

impl PausedVcpus for ThreadPause<'_> {
    fn worker_count(&self) -> usize {
        self.0.running.len()
    }

    /// The default host-thread runner, minus one worker if the knob says so.
    fn run_on_vcpus(&self, work: WorkFn, timeout: Duration) -> Result<(), PauseError> {
        let skip = self.0.skip_worker;
        flush_engine::pause::run_on_host_threads(
            self.worker_count(),
            Arc::new(move |worker| {
                if Some(worker.index) != skip {
                    work(worker)
                }
            }),
            timeout,
        )
    }
}

impl Drop for ThreadPause<'_> {
    fn drop(&mut self) {
        note(&self.0.journal, "resumed");
        self.0.state.lock().unwrap().requested = false;
        self.0.wakeup.notify_all();
    }
}

// ------------------------------------------------------ flush operations ----

/// Records the lines it is given, then really flushes them.
struct Recorder {
    real: CacheOps,
    lines: Mutex<Vec<u64>>,
    journal: Journal,
}

impl LineFlush for Recorder {
    fn flush_lines(&self, gpa: GuestAddress, range: HostRange) -> u64 {
        let first = gpa.0 / LINE;
        let last = (gpa.0 + range.len() as u64).div_ceil(LINE);
        self.lines.lock().unwrap().extend(first..last);
        note(&self.journal, "flush");
        self.real.flush_lines(gpa, range)
    }
}

/// Flushes nothing and says so (0 lines).
struct Nothing;
impl LineFlush for Nothing {
    fn flush_lines(&self, _: GuestAddress, _: HostRange) -> u64 {
        0
    }
}

/// Panics on the extent at `at`.
struct PanicsAt(u64, CacheOps);
impl LineFlush for PanicsAt {
    fn flush_lines(&self, gpa: GuestAddress, range: HostRange) -> u64 {
        if gpa.0 <= self.0 && self.0 < gpa.0 + range.len() as u64 {
            panic!(
                "flush operation panics at {:#x} (expected in this test)",
                self.0
            );
        }
        self.1.flush_lines(gpa, range)
    }
}

// ----------------------------------------------------------------- helpers --

fn memory(regions: &[(u64, usize)]) -> GuestMemoryMmap {
    let ranges: Vec<(GuestAddress, usize)> =
        regions.iter().map(|&(b, l)| (GuestAddress(b), l)).collect();
    GuestMemoryMmap::from_ranges(&ranges).unwrap()
}

fn recorder(journal: &Journal) -> Arc<Recorder> {
    Arc::new(Recorder {
        real: CacheOps {
            line: LINE as usize,
            ..CacheOps::detect()
        },
        lines: Mutex::new(Vec::new()),
        journal: journal.clone(),
    })
}

fn range_batch(extents: &[(u64, u64)]) -> FlushBatch {
    FlushBatch {
        extents: extents
            .iter()
            .map(|&(addr, len)| GuestExtent {
                addr: GuestAddress(addr),
                len,
            })
            .collect(),
        full: false,
        requests: Vec::new(),
    }
}

/// Runs one batch; returns whether it was answered OK and the journal.
fn flush<P: VcpuPause + 'static>(
    engine: &FlushEngine<P, Arc<GuestMemoryMmap>>,
    batch: FlushBatch,
    journal: &Journal,
) -> bool {
    let answer = Arc::new(Mutex::new(None));
    let (a, j) = (answer.clone(), journal.clone());
    engine.flush(
        &batch,
        BatchCompletion::new(move |result| {
            note(
                &j,
                if result.is_ok() {
                    "completed ok"
                } else {
                    "completed error"
                },
            );
            *a.lock().unwrap() = Some(result.is_ok());
        }),
    );
    let answered = answer.lock().unwrap().take();
    answered.expect("the engine answered before returning")
}

/// Lines of `[addr, addr + len)`.
fn lines_of(extents: &[(u64, u64)]) -> Vec<u64> {
    let mut lines: Vec<u64> = extents
        .iter()
        .flat_map(|&(addr, len)| addr / LINE..(addr + len).div_ceil(LINE))
        .collect();
    lines.sort_unstable();
    lines.dedup();
    lines
}

fn events(journal: &Journal) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for e in journal.lock().unwrap().iter() {
        // Collapse runs of flushes: their number depends on the split.
        if e == "flush" && out.last().is_some_and(|l| l == "flush") {
            continue;
        }
        out.push(e.clone());
    }
    out
}

/// Every batch split over the workers, however small.
fn split_always() -> flush_engine::EngineConfig {
    flush_engine::EngineConfig {
        inline_max_bytes: 0,
        ..Default::default()
    }
}

// ------------------------------------------------------------------- tests --

#[test]
fn small_batches_run_on_the_controlling_thread_and_large_ones_are_split() {
    let journal = Journal::default();
    let mem = memory(&[(0, 8 << 20)]);
    let vcpus = ThreadVcpus::start(3, mem.clone(), journal.clone());
    let engine = FlushEngine::new(vcpus.clone(), Arc::new(mem.clone())).with_config(
        flush_engine::EngineConfig {
            inline_max_bytes: 1 << 20,
            ..Default::default()
        },
    );
    assert!(flush(&engine, range_batch(&[(0, 1 << 20)]), &journal));
    let small = engine.stats().last_flush().unwrap();
    assert!(flush(&engine, range_batch(&[(0, 4 << 20)]), &journal));
    let large = engine.stats().last_flush().unwrap();
    vcpus.shutdown();
    assert_eq!(small.shares.len(), 1, "{small:?}");
    assert_eq!(large.shares.len(), 3, "{large:?}");
    assert!(small.shares[0].host_cpu >= 0);
}

#[test]
fn the_answer_is_written_after_the_flush_and_before_the_resume() {
    let journal = Journal::default();
    let mem = memory(&[(0, 1 << 20)]);
    let vcpus = ThreadVcpus::start(2, mem.clone(), journal.clone());
    let rec = recorder(&journal);
    let engine = FlushEngine::new(vcpus.clone(), Arc::new(mem.clone())).with_line_flush(rec);
    assert!(flush(&engine, range_batch(&[(0x8000, 4096)]), &journal));
    vcpus.shutdown();
    assert_eq!(
        events(&journal),
        ["paused", "flush", "completed ok", "resumed"],
        "the engine must flush, then answer, then resume"
    );
}

#[test]
fn exactly_the_requested_lines_reach_the_flush_operation() {
    let journal = Journal::default();
    let mem = memory(&[(0, 4 << 20)]);
    let vcpus = ThreadVcpus::start(3, mem.clone(), journal.clone());
    let rec = recorder(&journal);
    let engine = FlushEngine::new(vcpus.clone(), Arc::new(mem.clone()))
        .with_line_flush(rec.clone())
        .with_config(split_always());
    // Unaligned starts and ends, an overlap, a page crossing, a 1-byte one.
    let request = [
        (0x10_0003, 5000),
        (0x10_1000, 100),
        (0x20_0fff, 2),
        (0x30_0000, 1),
    ];
    assert!(flush(&engine, range_batch(&request), &journal));
    vcpus.shutdown();
    let mut flushed = rec.lines.lock().unwrap().clone();
    flushed.sort_unstable();
    assert_eq!(
        flushed,
        lines_of(&request),
        "every requested line exactly once"
    );
}

#[test]
fn the_vcpus_do_not_run_between_pause_and_answer() {
    let journal = Journal::default();
    let mem = memory(&[(0, 1 << 20)]);
    let vcpus = ThreadVcpus::start(2, mem.clone(), journal.clone());
    let engine = FlushEngine::new(vcpus.clone(), Arc::new(mem.clone()));
    let at_pause = Arc::new(Mutex::new(Vec::new()));
    let moved = Arc::new(AtomicUsize::new(0));
    let checked = Arc::new(AtomicUsize::new(0));
    {
        let (m, at_pause, moved, checked) = (
            mem.clone(),
            at_pause.clone(),
            moved.clone(),
            checked.clone(),
        );
        engine.set_observer(Some(Arc::new(move |phase| match phase {
            FlushPhase::Paused => *at_pause.lock().unwrap() = ThreadVcpus::counters(&m, 2),
            FlushPhase::Flushed | FlushPhase::Completed => {
                checked.fetch_add(1, Ordering::SeqCst);
                if *at_pause.lock().unwrap() != ThreadVcpus::counters(&m, 2) {
                    moved.fetch_add(1, Ordering::SeqCst);
                }
            }
            FlushPhase::Resumed => {}
        })));
    }
    for i in 0..50u64 {
        assert!(flush(
            &engine,
            range_batch(&[(0x4_0000 + i * 4096, 4096)]),
            &journal
        ));
    }
    let before = ThreadVcpus::counters(&mem, 2);
    std::thread::sleep(Duration::from_millis(20));
    let after = ThreadVcpus::counters(&mem, 2);
    vcpus.shutdown();
    assert_eq!(checked.load(Ordering::SeqCst), 100);
    assert_eq!(moved.load(Ordering::SeqCst), 0, "a vCPU ran during a flush");
    assert!(
        before.iter().zip(&after).all(|(b, a)| a > b),
        "the vCPUs were really running between flushes: {before:?} -> {after:?}"
    );
}

#[test]
fn a_flush_operation_that_flushes_nothing_is_host_error() {
    let journal = Journal::default();
    let mem = memory(&[(0, 1 << 20)]);
    let vcpus = ThreadVcpus::start(2, mem.clone(), journal.clone());
    let engine =
        FlushEngine::new(vcpus.clone(), Arc::new(mem.clone())).with_line_flush(Arc::new(Nothing));
    assert!(!flush(&engine, range_batch(&[(0x8000, 4096)]), &journal));
    vcpus.shutdown();
    assert_eq!(engine.stats().incomplete.load(Ordering::SeqCst), 1);
    // Still answered while paused.
    assert_eq!(events(&journal), ["paused", "completed error", "resumed"]);
}

#[test]
fn a_share_that_never_runs_is_host_error() {
    let journal = Journal::default();
    let mem = memory(&[(0, 1 << 20)]);
    let vcpus =
        ThreadVcpus::start_with(3, mem.clone(), journal.clone(), |v| v.skip_worker = Some(1));
    let engine = FlushEngine::new(vcpus.clone(), Arc::new(mem.clone())).with_config(split_always());
    // Enough lines for three shares.
    assert!(!flush(&engine, range_batch(&[(0, 64 * 4096)]), &journal));
    vcpus.shutdown();
    assert_eq!(engine.stats().incomplete.load(Ordering::SeqCst), 1);
    assert_eq!(engine.stats().failures.load(Ordering::SeqCst), 1);
}

#[test]
fn a_panicking_share_is_host_error_and_the_vcpus_resume() {
    let journal = Journal::default();
    let mem = memory(&[(0, 1 << 20)]);
    let vcpus = ThreadVcpus::start(2, mem.clone(), journal.clone());
    let engine = FlushEngine::new(vcpus.clone(), Arc::new(mem.clone()))
        .with_line_flush(Arc::new(PanicsAt(0x9000, CacheOps::detect())));
    assert!(!flush(&engine, range_batch(&[(0x8000, 0x4000)]), &journal));
    assert_eq!(engine.stats().share_panics.load(Ordering::SeqCst), 1);
    assert_eq!(events(&journal), ["paused", "completed error", "resumed"]);
    // The engine still works afterwards.
    let engine = engine.with_line_flush(Arc::new(CacheOps::detect()));
    assert!(flush(&engine, range_batch(&[(0x8000, 64)]), &journal));
    vcpus.shutdown();
}

#[test]
fn an_extent_outside_guest_memory_is_host_error_without_a_pause() {
    let journal = Journal::default();
    // A gap between 1 MiB and 2 MiB.
    let mem = memory(&[(0, 1 << 20), (2 << 20, 1 << 20)]);
    let vcpus = ThreadVcpus::start(1, mem.clone(), journal.clone());
    let engine = FlushEngine::new(vcpus.clone(), Arc::new(mem.clone()));
    assert!(!flush(
        &engine,
        range_batch(&[((1 << 20) - 64, 128)]),
        &journal
    ));
    vcpus.shutdown();
    assert_eq!(
        events(&journal),
        ["completed error"],
        "no pause for a plan that fails"
    );
}

#[test]
fn an_extent_across_adjacent_regions_is_flushed_in_full() {
    let journal = Journal::default();
    let mem = memory(&[(0, 1 << 20), (1 << 20, 1 << 20)]);
    let vcpus = ThreadVcpus::start(1, mem.clone(), journal.clone());
    let rec = recorder(&journal);
    let engine =
        FlushEngine::new(vcpus.clone(), Arc::new(mem.clone())).with_line_flush(rec.clone());
    let request = [((1 << 20) - 4096, 8192)];
    assert!(flush(&engine, range_batch(&request), &journal));
    vcpus.shutdown();
    let mut flushed = rec.lines.lock().unwrap().clone();
    flushed.sort_unstable();
    assert_eq!(flushed, lines_of(&request));
}

#[test]
fn a_vcpu_seen_in_guest_mode_during_the_flush_is_host_error() {
    let journal = Journal::default();
    let mem = memory(&[(0, 1 << 20)]);
    let vcpus = ThreadVcpus::start_with(1, mem.clone(), journal.clone(), |v| v.claim_in_guest = 1);
    let engine = FlushEngine::new(vcpus.clone(), Arc::new(mem.clone()));
    assert!(!flush(&engine, range_batch(&[(0x8000, 64)]), &journal));
    vcpus.shutdown();
    assert_eq!(
        engine
            .stats()
            .vcpus_running_during_flush
            .load(Ordering::SeqCst),
        1
    );
}

#[test]
fn a_pause_that_times_out_is_host_error_and_flushes_nothing() {
    let journal = Journal::default();
    let mem = memory(&[(0, 1 << 20)]);
    let vcpus = ThreadVcpus::start_with(1, mem.clone(), journal.clone(), |v| v.never_pause = true);
    let rec = recorder(&journal);
    let engine = FlushEngine::new(vcpus.clone(), Arc::new(mem.clone()))
        .with_line_flush(rec.clone())
        .with_config(flush_engine::EngineConfig {
            pause_timeout: Duration::from_millis(50),
            ..Default::default()
        });
    assert!(!flush(&engine, range_batch(&[(0x8000, 64)]), &journal));
    vcpus.shutdown();
    assert!(rec.lines.lock().unwrap().is_empty());
    assert_eq!(events(&journal), ["completed error"]);
}

#[test]
fn a_full_flush_covers_every_page_the_guest_touched() {
    let journal = Journal::default();
    let mem = memory(&[(0, 4 << 20)]);
    // The vCPUs' counters are on page 1, but they may not have run yet when
    // the pause comes: the test touches every page it checks itself.
    for page in [1u64, 7, 8, 300, 1023] {
        mem.write_obj(1u8, GuestAddress(page * 4096)).unwrap();
    }
    let vcpus = ThreadVcpus::start(2, mem.clone(), journal.clone());
    let rec = recorder(&journal);
    let engine =
        FlushEngine::new(vcpus.clone(), Arc::new(mem.clone())).with_line_flush(rec.clone());
    let batch = FlushBatch {
        full: true,
        ..FlushBatch::default()
    };
    assert!(flush(&engine, batch, &journal));
    vcpus.shutdown();
    let flushed = rec.lines.lock().unwrap().clone();
    for page in [1u64, 7, 8, 300, 1023] {
        let lines: Vec<u64> = (page * 4096 / LINE..(page + 1) * 4096 / LINE).collect();
        assert!(
            lines.iter().all(|l| flushed.contains(l)),
            "page {page} was touched but not flushed in full"
        );
    }
}

#[test]
fn a_full_flush_publishes_its_estimate_before_it_answers() {
    // A driver re-reads the full-flush figures when it sees its FLUSH_ALL
    // answered, possibly while the engine's thread is still returning: the
    // figures must already be the ones this flush measured.
    let journal = Journal::default();
    let mem = memory(&[(0, 4 << 20)]);
    for page in 0..64u64 {
        mem.write_obj(1u8, GuestAddress(page * 4096)).unwrap();
    }
    let vcpus = ThreadVcpus::start(2, mem.clone(), journal.clone());
    let engine = FlushEngine::new(vcpus.clone(), Arc::new(mem.clone()));
    let published = Arc::new(Mutex::new(Vec::new()));
    let (p, j) = (published.clone(), journal.clone());
    engine.set_full_flush_estimate_sink(Some(Arc::new(move |cost_ns, break_even| {
        note(&j, "estimate");
        p.lock().unwrap().push((cost_ns, break_even));
    })));
    let full = FlushBatch {
        full: true,
        ..FlushBatch::default()
    };
    assert!(flush(&engine, full, &journal));
    assert!(flush(&engine, range_batch(&[(0, 4096)]), &journal));
    vcpus.shutdown();
    assert_eq!(
        events(&journal),
        [
            "paused",
            "estimate",
            "completed ok",
            "resumed",
            "paused",
            "completed ok",
            "resumed"
        ],
        "one estimate, from the full flush, before its answer"
    );
    let (cost_ns, break_even) = published.lock().unwrap()[0];
    assert!(
        cost_ns > 0 && break_even >= 64 * 4096,
        "{cost_ns} ns, {break_even} B"
    );
}

#[test]
fn the_engine_counts_what_it_did() {
    let journal = Journal::default();
    let mem = memory(&[(0, 1 << 20)]);
    let vcpus = ThreadVcpus::start(2, mem.clone(), journal.clone());
    let engine = FlushEngine::new(vcpus.clone(), Arc::new(mem.clone()));
    let lines = Arc::new(AtomicU64::new(0));
    assert!(flush(&engine, range_batch(&[(0, 64 * 10)]), &journal));
    vcpus.shutdown();
    lines.store(
        engine.stats().lines.load(Ordering::SeqCst),
        Ordering::SeqCst,
    );
    assert_eq!(lines.load(Ordering::SeqCst), 10);
    let record = engine.stats().last_flush().expect("a record");
    assert_eq!(record.shares.iter().map(|s| s.lines).sum::<u64>(), 10);
    assert!(record
        .shares
        .iter()
        .all(|s| s.vcpu.is_none() && s.host_cpu >= 0));
}

// ------------------------------------------------- flush log and pause hooks --

fn tagged_batch(extents: &[(u64, u64)], tags: &[u64]) -> FlushBatch {
    FlushBatch {
        requests: tags
            .iter()
            .map(|&tag| devices::cache_flush::BatchRequest { queue: 0, tag })
            .collect(),
        ..range_batch(extents)
    }
}

/// Notes its calls in the journal; fails or stalls when told to.
struct JournalHook {
    journal: Journal,
    fail_after: bool,
    stall: Option<Duration>,
}

impl flush_engine::PauseHook<GuestMemoryMmap> for JournalHook {
    fn before_flush(
        &self,
        batch: &flush_engine::PausedBatch,
        _: &GuestMemoryMmap,
    ) -> Result<(), String> {
        note(&self.journal, format!("hook before {}", batch.seq));
        Ok(())
    }

    fn after_flush(
        &self,
        batch: &flush_engine::PausedBatch,
        _: &GuestMemoryMmap,
    ) -> Result<(), String> {
        if let Some(stall) = self.stall {
            std::thread::sleep(stall);
        }
        note(&self.journal, format!("hook after {}", batch.seq));
        if self.fail_after {
            Err("the buffer was not what the test expected".into())
        } else {
            Ok(())
        }
    }
}

#[test]
fn every_batch_gets_a_numbered_record_with_its_requests_and_outcome() {
    let journal = Journal::default();
    let mem = memory(&[(0, 1 << 20), (2 << 20, 1 << 20)]);
    let vcpus = ThreadVcpus::start(2, mem.clone(), journal.clone());
    let engine = FlushEngine::new(vcpus.clone(), Arc::new(mem.clone()));
    assert!(flush(
        &engine,
        tagged_batch(&[(0x8000, 100)], &[7, 8]),
        &journal
    ));
    // In the gap: HOST_ERROR, logged all the same.
    assert!(!flush(
        &engine,
        tagged_batch(&[(1 << 20, 64)], &[9]),
        &journal
    ));
    vcpus.shutdown();
    let records = engine.flush_log().since(0);
    assert_eq!(records.len(), 2);
    assert_eq!((records[0].seq, records[1].seq), (1, 2));
    assert_eq!(records[0].extents.as_slice(), [(GuestAddress(0x8000), 128)]);
    assert_eq!(
        records[0]
            .requests
            .iter()
            .map(|r| r.tag)
            .collect::<Vec<_>>(),
        [7, 8]
    );
    assert_eq!(records[0].outcome, flush_engine::BatchOutcome::Ok);
    assert!(!records[0].share_host_cpus.is_empty());
    // The record carries what the engine's statistics keep for the last
    // batch only: bytes and phase times.
    let last_ok = engine.stats().last_flush().unwrap();
    assert_eq!(records[0].bytes, 128);
    assert_eq!(records[0].times, last_ok.times);
    assert!(records[0].times.flush_ns > 0);
    assert!(matches!(
        &records[1].outcome,
        flush_engine::BatchOutcome::HostError(why) if why.contains("not in guest RAM")
    ));
    // Refused while planning: nothing paused, nothing flushed.
    assert_eq!(records[1].bytes, 0);
    assert_eq!(
        (records[1].times.pause_ns, records[1].times.flush_ns),
        (0, 0)
    );
    assert_eq!(engine.flush_log().since(1).len(), 1);
    assert_eq!(engine.next_seq(), 3);
}

#[test]
fn a_tag_hook_runs_inside_the_pause_around_the_flush_of_its_batches_only() {
    let journal = Journal::default();
    let mem = memory(&[(0, 1 << 20)]);
    let vcpus = ThreadVcpus::start(2, mem.clone(), journal.clone());
    let rec = recorder(&journal);
    let engine = FlushEngine::new(vcpus.clone(), Arc::new(mem.clone())).with_line_flush(rec);
    let id = engine.add_pause_hook(
        flush_engine::HookFilter::Tag(42),
        Arc::new(JournalHook {
            journal: journal.clone(),
            fail_after: false,
            stall: None,
        }),
    );
    assert!(flush(
        &engine,
        tagged_batch(&[(0x8000, 64)], &[1]),
        &journal
    ));
    assert!(flush(
        &engine,
        tagged_batch(&[(0x9000, 64)], &[1, 42]),
        &journal
    ));
    assert!(engine.remove_pause_hook(id));
    assert!(flush(
        &engine,
        tagged_batch(&[(0xa000, 64)], &[42]),
        &journal
    ));
    vcpus.shutdown();
    assert_eq!(
        events(&journal),
        [
            "paused",
            "flush",
            "completed ok",
            "resumed", // tag 1 only: no hook
            "paused",
            "hook before 2",
            "flush",
            "hook after 2",
            "completed ok",
            "resumed",
            "paused",
            "flush",
            "completed ok",
            "resumed", // removed
        ]
    );
}

#[test]
fn a_failing_hook_makes_the_batch_host_error() {
    let journal = Journal::default();
    let mem = memory(&[(0, 1 << 20)]);
    let vcpus = ThreadVcpus::start(1, mem.clone(), journal.clone());
    let engine = FlushEngine::new(vcpus.clone(), Arc::new(mem.clone()));
    engine.add_pause_hook(
        flush_engine::HookFilter::EveryBatch,
        Arc::new(JournalHook {
            journal: journal.clone(),
            fail_after: true,
            stall: None,
        }),
    );
    assert!(!flush(&engine, range_batch(&[(0x8000, 64)]), &journal));
    vcpus.shutdown();
    let record = &engine.flush_log().since(0)[0];
    assert!(matches!(
        &record.outcome,
        flush_engine::BatchOutcome::HostError(why) if why.contains("not what the test expected")
    ));
}

#[test]
fn a_hook_that_overruns_its_deadline_is_host_error_and_the_vcpus_resume() {
    let journal = Journal::default();
    let mem = memory(&[(0, 1 << 20)]);
    let vcpus = ThreadVcpus::start(1, mem.clone(), journal.clone());
    let engine = FlushEngine::new(vcpus.clone(), Arc::new(mem.clone())).with_config(
        flush_engine::EngineConfig {
            hook_timeout: Duration::from_millis(50),
            ..Default::default()
        },
    );
    engine.add_pause_hook(
        flush_engine::HookFilter::EveryBatch,
        Arc::new(JournalHook {
            journal: journal.clone(),
            fail_after: false,
            stall: Some(Duration::from_millis(500)),
        }),
    );
    assert!(!flush(&engine, range_batch(&[(0x8000, 64)]), &journal));
    let seen = events(&journal);
    assert_eq!(seen.last().map(String::as_str), Some("resumed"), "{seen:?}");
    vcpus.shutdown();
}
