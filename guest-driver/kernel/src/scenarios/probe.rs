//! `probe`: proves from inside the guest, by Flush+Reload in ring 3, that the
//! device's flushes really evict the guest's lines, and shows that the
//! guest's own WBINVD does not (see `shared/HOST-NOTES.md`).
//!
//! vCPU 0 uses two buffers of 64 pages (256 KiB each) of scratch RAM: a
//! target and a control. A measurement loads and dirties every line (so it
//! is cached), acts, then times the first touch of **one line per page**:
//! the pages in a random order, a random line within each (`rdtscp` between
//! fences). Only first touches are timed because after a few misses in a
//! page the CPU's prefetchers bring the rest of the page back: on the
//! project's Intel host a random-order reload of all 4096 lines of a flushed
//! buffer looked cached in 3-4 of 6 runs, one line per page never did.
//!
//! The verdict is `cache_flush_abi::flush_reload`'s, shared with the host
//! probe: a line is slow when its load took at least the threshold half-way
//! between the cached and the flushed (by the guest's own ring-3 CLFLUSH)
//! first-touch medians, measured first; an attempt is *evicted* only when
//! every sampled line of the flushed buffer is slow, and *void* when more
//! than half of its comparison's lines are slow too. The measurements:
//!
//! * range: flush the target through the device; the comparison is the
//!   control buffer, which went through the same pause unflushed;
//! * full: a full flush (when offered) evicts the control buffer too, so the
//!   comparison is the target after a request that pauses the guest the same
//!   way but flushes one line elsewhere;
//! * WBINVD: the guest's own, from ring 0 ([`crate::ring0::wbinvd`]);
//!   reported, not asserted (KVM makes it a no-op unless non-coherent DMA is
//!   assigned), against the target after a no-op exit (a device register
//!   read).
//!
//! Attempts are repeated, up to `attempts=N` (default 10): the first
//! not-evicted attempt fails the scenario at once, and so does the second
//! partial one (one is measured again: the hardware brings a line back now
//! and then; see `cache_flush_abi::flush_reload`), and a pass needs
//! `CONFIRMATIONS` (3) evicted
//! attempts, so noise that happens to slow every sampled line once cannot
//! pass a flush that does nothing. Every attempt prints how many sampled
//! lines were slow. A run that uses up its attempts before either ends
//! INCONCLUSIVE ([`status::INCONCLUSIVE`]), as does one where the
//! calibration cannot tell a hit from a miss; neither passes.
//!
//! `sham=1` is the end-to-end negative control: every "flush" the probe
//! measures is replaced by a range flush of one line elsewhere (the same
//! pause, nothing of the target flushed), so the scenario must end FAILED
//! (`NOT evicted`); `tests/probe.rs` checks that it does.
//!
//! Why a pause-based comparison: a request pauses every vCPU, and on resume
//! the host may run this vCPU's thread on another core, or have left this
//! core idle long enough for its lines to decay (measured on the project's
//! host, itself a VM: lines a host thread warmed reload at DRAM latency after
//! it slept 10 ms, and mostly still cached after 1 ms). So a no-op exit is no
//! fair comparison for a request. The other vCPUs halt ([`crate::io::park`])
//! so they take no host core while vCPU 0 measures.

use core::cell::UnsafeCell;

use cache_flush_abi::boot::PAGE_SIZE;
use cache_flush_abi::flush_reload::{
    judge_attempt, Attempt, Calibration, Outcome as Decided, Series, SlowCount, CONFIRMATIONS,
};

use super::{Env, Outcome, Scenario};
use crate::cpu::{clflush, mfence, rdtsc, time_load, Rng};
use crate::flush::Flush;
use crate::scratch::Scratch;
use crate::status;

pub const SCENARIO: Scenario = Scenario {
    name: "probe",
    description: "Flush+Reload from ring 3 (first touch, one line per page): the device's range and full flushes evict every sampled line, the guest's WBINVD does not",
    run,
};

const LINE: u64 = 64;
const LINES_PER_PAGE: u64 = PAGE_SIZE / LINE;
/// Pages per buffer, hence lines timed per reload.
const PAGES: usize = 64;
const BUFFER: u64 = PAGES as u64 * PAGE_SIZE;

/// vCPU 0's working memory: the random page order and two sets of timings.
struct Work {
    order: [u16; PAGES],
    samples: [[u64; PAGES]; 2],
}
struct WorkCell(UnsafeCell<Work>);
// SAFETY: only vCPU 0 runs the measurements and touches the cell.
unsafe impl Sync for WorkCell {}
static WORK: WorkCell = WorkCell(UnsafeCell::new(Work {
    order: [0; PAGES],
    samples: [[0; PAGES]; 2],
}));

/// Which set of timings: the measured buffer, or its comparison.
#[derive(Clone, Copy)]
enum Set {
    Measured = 0,
    Comparison = 1,
}

struct Probe<'a> {
    flush: &'a Flush,
    work: &'a mut Work,
    rng: Rng,
}

impl Probe<'_> {
    /// Loads and writes every line of `buffer` twice (so each is cached and
    /// dirty), then fences.
    fn warm(&self, buffer: u64) {
        for pass in 0..2u8 {
            for line in 0..BUFFER / LINE {
                let p = (buffer + line * LINE) as *mut u8;
                // SAFETY: `buffer` is one of this scenario's scratch buffers
                // of BUFFER bytes, used by vCPU 0 only.
                unsafe { p.write_volatile(p.read_volatile().wrapping_add(pass)) };
            }
        }
        mfence();
    }

    /// Times the first touch of one random line of each page of `buffer`,
    /// the pages in a fresh random order, into `set`; then sorts the
    /// timings. The random choices are made before the first timed load.
    fn reload(&mut self, buffer: u64, set: Set) {
        for (i, slot) in self.work.order.iter_mut().enumerate() {
            *slot = i as u16;
        }
        for i in (1..PAGES).rev() {
            let j = self.rng.below(i as u64 + 1) as usize;
            self.work.order.swap(i, j);
        }
        let mut lines = [0u8; PAGES];
        for line in lines.iter_mut() {
            *line = self.rng.below(LINES_PER_PAGE) as u8;
        }
        let samples = &mut self.work.samples[set as usize];
        for (sample, (&page, &line)) in samples.iter_mut().zip(self.work.order.iter().zip(&lines)) {
            let address = buffer + u64::from(page) * PAGE_SIZE + u64::from(line) * LINE;
            *sample = time_load(address as *const u8);
        }
        samples.sort_unstable();
    }

    fn median(&self, set: Set) -> u64 {
        self.work.samples[set as usize][PAGES / 2]
    }

    /// How many lines of `set` took at least `threshold` cycles.
    fn slow(&self, set: Set, threshold: u64) -> SlowCount {
        let samples = &self.work.samples[set as usize];
        SlowCount {
            slow: (PAGES - samples.partition_point(|&s| s < threshold)) as u32,
            lines: PAGES as u32,
        }
    }

    /// Warms `target` (and `also` before it, so the target is the most
    /// recently used), runs `act`, reloads `target` into `set`.
    fn measure(&mut self, target: u64, also: Option<u64>, set: Set, act: impl FnOnce(&Flush)) {
        if let Some(other) = also {
            self.warm(other);
        }
        self.warm(target);
        act(self.flush);
        self.reload(target, set);
    }

    /// The guest's own ring-3 CLFLUSH of every line of `buffer`.
    fn clflush_all(buffer: u64) {
        for line in 0..BUFFER / LINE {
            clflush((buffer + line * LINE) as *const u8);
        }
        mfence();
    }

    /// The calibration: the lowest of three first-touch medians of lines
    /// just warmed, and of lines just flushed by the guest itself (noise
    /// only ever adds cycles, so the lowest is the truest).
    fn calibrate(&mut self, buffer: u64) -> Calibration {
        let mut cal = Calibration {
            cached: u64::MAX,
            flushed: u64::MAX,
        };
        for _ in 0..3 {
            self.measure(buffer, None, Set::Comparison, |_| {});
            cal.cached = cal.cached.min(self.median(Set::Comparison));
            self.measure(buffer, None, Set::Measured, |_| Self::clflush_all(buffer));
            cal.flushed = cal.flushed.min(self.median(Set::Measured));
        }
        cal
    }

    /// Runs `attempt` (which fills both sets, and returns the request's
    /// error if any) until the series is decided (see the module
    /// documentation), printing every attempt.
    fn attempts(
        &mut self,
        what: &str,
        against: &str,
        attempts: u32,
        threshold: u64,
        mut attempt: impl FnMut(&mut Self) -> Result<(), guest_driver::Error>,
    ) -> Result<Decided, Outcome> {
        let mut series = Series::new(attempts);
        loop {
            if let Err(e) = attempt(self) {
                return Err(crate::fail!("probe: FAILED: the {what}: {e}"));
            }
            let measured = self.slow(Set::Measured, threshold);
            let comparison = self.slow(Set::Comparison, threshold);
            let judged = judge_attempt(measured, comparison);
            crate::println!(
                "probe: {what}, attempt {}: {}/{PAGES} lines slow (median {}); {against}: {}/{PAGES} slow (median {}): {}{}",
                series.attempts() + 1,
                measured.slow,
                self.median(Set::Measured),
                comparison.slow,
                self.median(Set::Comparison),
                match judged {
                    Attempt::Evicted => "evicted",
                    Attempt::Partial => "PARTIAL: some lines still cached",
                    Attempt::NotEvicted => "NOT evicted",
                    Attempt::Void => "void: the comparison was evicted too (the pause moved this vCPU's lines away; more vCPUs than host cores?)",
                },
                if judged == Attempt::Evicted {
                    // Counted before this attempt is recorded.
                    Confirmed(series.evicted() + 1)
                } else {
                    Confirmed(0)
                }
            );
            if let Some(decided) = series.record(judged) {
                return Ok(decided);
            }
        }
    }
}

/// " (n of CONFIRMATIONS)" after an evicted attempt, nothing otherwise.
struct Confirmed(u32);

impl core::fmt::Display for Confirmed {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        if self.0 == 0 {
            Ok(())
        } else {
            write!(f, " ({} of {CONFIRMATIONS} needed)", self.0)
        }
    }
}

fn run(env: &Env) -> Outcome {
    let attempts = match env.option_u64("attempts", 10) {
        Ok(0) => return env.bad_option(format_args!("attempts=0: at least one attempt")),
        Ok(n) => u32::try_from(n).unwrap_or(u32::MAX),
        Err(outcome) => return outcome,
    };
    let sham = match env.option_u64("sham", 0) {
        Ok(n @ (0 | 1)) => n == 1,
        Ok(n) => return env.bad_option(format_args!("sham={n}: 0 or 1")),
        Err(outcome) => return outcome,
    };
    let flush = match crate::flush::setup(env) {
        Ok(flush) => flush,
        Err(outcome) => return outcome,
    };
    if !env.is_first() {
        return Outcome::Park;
    }
    let mut scratch = Scratch::new(env.boot_info);
    let (target, control) = match (scratch.take(BUFFER, PAGE_SIZE), scratch.take(BUFFER, PAGE_SIZE)) {
        (Ok(t), Ok(c)) => (t, c),
        (Err(e), _) | (_, Err(e)) => return crate::fail!("probe: {e}"),
    };
    // SAFETY: only vCPU 0 gets here, once; nothing else touches WORK.
    let work = unsafe { &mut *WORK.0.get() };
    let mut probe = Probe {
        flush: &flush,
        work,
        rng: Rng::new(0x9e0b ^ rdtsc()),
    };

    let cal = probe.calibrate(target);
    let Some(threshold) = cal.threshold() else {
        crate::println!(
            "probe: INCONCLUSIVE: cached lines reload in {} cycles and lines the guest flushed itself in {}: not 2x apart, so a hit cannot be told from a miss on this core now",
            cal.cached,
            cal.flushed
        );
        return Outcome::Exit(status::INCONCLUSIVE);
    };
    crate::println!(
        "probe: Flush+Reload, first touch of one random line in each of {PAGES} pages, random page order, target {target:#x}, control {control:#x}; cached lines reload in a median of {} cycles, lines flushed by the guest's own ring-3 CLFLUSH in {}: a line is slow at >= {threshold}",
        cal.cached,
        cal.flushed
    );

    // The one line a request that should only pause flushes: the last line
    // of the control buffer.
    let pause_only = control + BUFFER - LINE;
    if sham {
        crate::println!("probe: sham=1: every flush below is a 64 B flush elsewhere; this run must FAIL");
    }

    // 1. Range flush of the target; the control buffer, not flushed, went
    // through the same pause.
    let range = probe.attempts("range flush", "control buffer (not flushed)", attempts, threshold, |p| {
        let mut result = Ok(());
        p.measure(target, Some(control), Set::Measured, |f| {
            result = if sham { f.range(pause_only, LINE) } else { f.range(target, BUFFER) }
        });
        p.reload(control, Set::Comparison);
        result
    });
    let range = match range {
        Ok(decided) => Some(decided),
        Err(outcome) => return outcome,
    };

    // 2. Full flush (it evicts the control buffer too), against the target
    // after a request that pauses the guest just the same but flushes one
    // line elsewhere.
    let full = if flush.features().full() {
        let full = probe.attempts("full flush", "target after a 64 B flush elsewhere", attempts, threshold, |p| {
            let mut result = Ok(());
            p.measure(target, None, Set::Measured, |f| {
                result = if sham { f.range(pause_only, LINE) } else { f.all() }
            });
            result?;
            p.measure(target, None, Set::Comparison, |f| result = f.range(pause_only, LINE));
            result
        });
        match full {
            Ok(decided) => Some(decided),
            Err(outcome) => return outcome,
        }
    } else {
        crate::println!("probe: full flush: not offered by this VMM (--no-full-flush), skipped");
        None
    };

    // 3. The guest's own WBINVD: reported only, against the target after a
    // no-op exit (neither pauses the guest).
    probe.measure(target, None, Set::Comparison, |f| {
        f.noop_exit();
    });
    probe.measure(target, None, Set::Measured, |_| crate::ring0::wbinvd());
    let wbinvd = probe.slow(Set::Measured, threshold);
    let noop = probe.slow(Set::Comparison, threshold);
    crate::println!(
        "probe: guest WBINVD (ring 0): {}/{PAGES} lines slow (median {}); target after a no-op exit: {}/{PAGES} slow (median {}) -- reported, not asserted: KVM does not honour a guest WBINVD",
        wbinvd.slow,
        probe.median(Set::Measured),
        noop.slow,
        probe.median(Set::Comparison)
    );

    // A failure outranks an inconclusive measurement of the other request.
    let decided = [("range", range), ("full", full)];
    for (what, decided) in decided {
        match decided {
            Some(Decided::Partial) => {
                return crate::fail!("probe: FAILED: after the {what} flush some sampled lines were still cached (see the deciding attempt above)");
            }
            Some(Decided::NotEvicted) => {
                return crate::fail!("probe: FAILED: after the {what} flush the sampled lines were still cached like the comparison's");
            }
            None | Some(Decided::Evicted) | Some(Decided::Inconclusive) => {}
        }
    }
    if let Some((what, _)) = decided.iter().find(|(_, d)| *d == Some(Decided::Inconclusive)) {
        crate::println!("probe: INCONCLUSIVE: {attempts} attempts of the {what} flush gave fewer than {CONFIRMATIONS} evicted ones, the rest void (the pause alone evicted the comparison too); run with fewer vCPUs than host cores or on a quieter host");
        return Outcome::Exit(status::INCONCLUSIVE);
    }
    crate::println!(
        "probe: pass: the device's range{} flush evicted every sampled line (seen from ring 3); the guest's own WBINVD left {}/{PAGES} slow",
        if full == Some(Decided::Evicted) { " and full" } else { "" },
        wbinvd.slow
    );
    Outcome::Exit(status::SUCCESS)
}
