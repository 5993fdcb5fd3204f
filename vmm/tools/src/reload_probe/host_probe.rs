//! The host half of the bundled guest's `host-probe` scenario: the host
//! warms a buffer through one of its own mappings of guest memory, the guest
//! asks the device for a flush, and the host times the reload through the
//! same mapping. The protocol's numbers are in [`protocol`]
//! (`cache_flush_abi::host_probe`).
//!
//! Three measurements, each against a comparison that went through the
//! same kind of exit:
//!
//! * range flush, through the alias and through the VMM's own mapping: the
//!   target buffer against the control buffer, which was warmed alike and
//!   paused alike but not flushed;
//! * full flush (when offered), through the alias: it evicts the control
//!   buffer too, so the comparison is a buffer of the host's own memory
//!   (not guest memory: no flush of the guest touches it), warmed alike
//!   and timed after the same pause;
//! * a no-op exit (a device register read), reported only: an exit alone
//!   leaves the lines cached.
//!
//! Every measurement is judged by [`cache_flush_abi::flush_reload`], the
//! rule the guest's `probe` applies too: the first touch of one line per
//! page, a line slow at or above the threshold half-way between the cached
//! and the self-flushed latency of this core; an attempt is evicted only
//! when every sampled line is slow, void when more than half of the
//! comparison's lines are slow too. Attempts are repeated up to
//! [`HostProbeOptions::attempts`] times: no eviction decides at once, and
//! so does a second partial one (it is not retried until one passes), a
//! pass needs
//! [`cache_flush_abi::flush_reload::CONFIRMATIONS`] evicted attempts.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cache_flush_abi::flush_reload::{judge_attempt, Attempt, Calibration, Outcome, Series};
pub use cache_flush_abi::host_probe as protocol;
use protocol::{op, reply};
use vm_memory::mmap::MmapRegion;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::{PinnedToCurrentCpu, Region, Reload, ReloadError, ReloadTimer};
use vmm::alias::{AliasError, SharedAlias};
use vmm::vcpu::VmOutcome;
use vmm::vm::{Vm, VmConfig, VmError};

/// Errors of the host half.
#[derive(Debug, thiserror::Error)]
pub enum HostProbeError {
    /// The region could not be mapped or measured.
    #[error(transparent)]
    Reload(#[from] ReloadError),
    /// The mailbox could not be read or written.
    #[error("mailbox: {0}")]
    Alias(#[from] AliasError),
    /// The guest did not answer a command in time.
    #[error("the guest did not answer command {seq} (op {op}) within {waited:?}")]
    Timeout {
        /// Sequence number.
        seq: u64,
        /// Operation.
        op: u8,
        /// How long the host waited.
        waited: Duration,
    },
    /// The VM ended before the guest answered.
    #[error("the VM ended before the guest answered command {seq} (op {op})")]
    VmEnded {
        /// Sequence number.
        seq: u64,
        /// Operation.
        op: u8,
    },
    /// The host-private comparison buffer could not be mapped.
    #[error("cannot map the private comparison buffer")]
    PrivateBuffer(#[source] vm_memory::mmap::MmapRegionError),
    /// The host half's thread panicked.
    #[error("the host half panicked")]
    Panicked,
    /// The guest answered with something other than done.
    #[error("the guest answered command {seq} (op {op}) with reply {reply}")]
    Refused {
        /// Sequence number.
        seq: u64,
        /// Operation.
        op: u8,
        /// The reply code (see [`protocol::reply`]).
        reply: u8,
    },
}

/// How long [`HostProbe::command`] spins for the answer before it starts
/// yielding its core (about two requests' worth on the project's host).
const SPIN_BEFORE_YIELD: Duration = Duration::from_micros(500);

/// Which host mapping the probe warms and times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum View {
    /// A second mapping of the memfd (a [`SharedAlias`]): one the flush
    /// engine never touches.
    Alias,
    /// The VMM's own mapping of guest RAM, the one the engine flushes
    /// through.
    VmmMapping,
}

impl fmt::Display for View {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            View::Alias => "a second host mapping (alias)",
            View::VmmMapping => "the VMM's own mapping",
        })
    }
}

/// One measurement: the lines after a request, against a comparison.
#[derive(Clone, Debug)]
pub struct Measurement {
    /// The buffer the request was about.
    pub measured: Reload,
    /// The comparison (see the module documentation).
    pub comparison: Reload,
}

impl Measurement {
    /// The attempt's judgement at `threshold`.
    pub fn judge(&self, threshold: u64) -> Attempt {
        judge_attempt(
            self.measured.slow(threshold),
            self.comparison.slow(threshold),
        )
    }

    /// "41/64 lines slow (median 312) vs comparison 1/64 (median 80)".
    pub fn describe(&self, threshold: u64) -> String {
        let (m, c) = (
            self.measured.slow(threshold),
            self.comparison.slow(threshold),
        );
        format!(
            "{}/{} lines slow (median {}) vs comparison {}/{} (median {})",
            m.slow,
            m.lines,
            self.measured.median(),
            c.slow,
            c.lines,
            self.comparison.median()
        )
    }
}

/// How a series of attempts ended, with every attempt.
#[derive(Clone, Debug)]
pub struct Verdict {
    /// The outcome ([`Outcome::Evicted`] is the only pass).
    pub outcome: Outcome,
    /// The slow/fast threshold the attempts were judged at (0 when the
    /// calibration could not separate cached from flushed lines and nothing
    /// was measured).
    pub threshold: u64,
    /// Every attempt, in order, with its judgement; the last one decided.
    pub attempts: Vec<(Measurement, Attempt)>,
}

impl Verdict {
    /// Evicted.
    pub fn passed(&self) -> bool {
        self.outcome.passed()
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(((last, _), earlier)) = self.attempts.split_last() else {
            return f.write_str(
                "INCONCLUSIVE: nothing measured (the calibration cannot tell a hit from a miss)",
            );
        };
        f.write_str(match self.outcome {
            Outcome::Evicted => "evicted",
            Outcome::Partial => "PARTIAL (some sampled lines still cached)",
            Outcome::NotEvicted => "NOT evicted",
            Outcome::Inconclusive => {
                "INCONCLUSIVE (attempts used up before enough evicted ones; the rest void)"
            }
        })?;
        write!(
            f,
            " (attempt {}): {}",
            self.attempts.len(),
            last.describe(self.threshold)
        )?;
        if !earlier.is_empty() {
            write!(f, "; earlier:")?;
            for (m, attempt) in earlier {
                let (a, b) = (
                    m.measured.slow(self.threshold),
                    m.comparison.slow(self.threshold),
                );
                let kind = match attempt {
                    Attempt::Evicted => "evicted",
                    Attempt::Void => "void",
                    // Never earlier: they decide at once.
                    Attempt::Partial => "partial",
                    Attempt::NotEvicted => "not evicted",
                };
                write!(
                    f,
                    " {}/{} vs {}/{} {kind},",
                    a.slow, a.lines, b.slow, b.lines
                )?;
            }
        }
        Ok(())
    }
}

/// Knobs of [`run`] and [`run_vm`].
#[derive(Clone, Copy, Debug)]
pub struct HostProbeOptions {
    /// Guest-physical address of the region (the guest's `buffer=`); used
    /// by [`run_vm`], which maps it.
    pub region: GuestAddress,
    /// Attempts per measurement before giving up.
    pub attempts: u32,
    /// How long to wait for each answer of the guest.
    pub answer_timeout: Duration,
    /// The negative control: ask for a one-line flush elsewhere
    /// ([`op::FLUSH_ELSEWHERE`], the same pause) wherever a flush of the
    /// target is measured, so a sound probe must report it NOT evicted.
    pub sham: bool,
}

impl Default for HostProbeOptions {
    fn default() -> Self {
        Self {
            region: GuestAddress(protocol::DEFAULT_REGION),
            attempts: 10,
            answer_timeout: Duration::from_secs(10),
            sham: false,
        }
    }
}

/// What [`run`] found.
#[derive(Clone, Debug)]
pub struct HostProbeReport {
    /// The host CPU the measuring thread was pinned to.
    pub cpu: i32,
    /// Cached and self-flushed first-touch medians on that CPU.
    pub calibration: Calibration,
    /// Range flush, timed through the alias.
    pub range_alias: Verdict,
    /// Range flush, timed through the VMM's own mapping.
    pub range_vmm: Verdict,
    /// Full flush, timed through the alias; `None` when not offered.
    pub full_alias: Option<Verdict>,
    /// A no-op exit, timed through the alias (reported only).
    pub noop_exit: Measurement,
}

impl HostProbeReport {
    /// Every flush measurement showed eviction (or was not offered).
    pub fn passed(&self) -> bool {
        self.verdicts().all(|v| v.passed())
    }

    /// No measurement failed, but at least one could not conclude: the host
    /// was too noisy to tell, and a new run may.
    pub fn inconclusive(&self) -> bool {
        self.verdicts().any(|v| v.outcome == Outcome::Inconclusive)
            && self
                .verdicts()
                .all(|v| matches!(v.outcome, Outcome::Evicted | Outcome::Inconclusive))
    }

    fn verdicts(&self) -> impl Iterator<Item = &Verdict> {
        [
            Some(&self.range_alias),
            Some(&self.range_vmm),
            self.full_alias.as_ref(),
        ]
        .into_iter()
        .flatten()
    }
}

impl fmt::Display for HostProbeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cal = &self.calibration;
        write!(
            f,
            "host probe on host CPU {}: first touch of one line per page; cached lines reload in a median of {} cycles, lines this thread flushed in {}",
            self.cpu, cal.cached, cal.flushed
        )?;
        match cal.threshold() {
            Some(t) => writeln!(f, ": a line is slow at >= {t}")?,
            None => writeln!(f, ": not 2x apart, nothing can be judged")?,
        }
        writeln!(
            f,
            "  range flush, seen through {}: {}",
            View::Alias,
            self.range_alias
        )?;
        writeln!(
            f,
            "  range flush, seen through {}: {}",
            View::VmmMapping,
            self.range_vmm
        )?;
        match &self.full_alias {
            Some(v) => writeln!(f, "  full flush, seen through {}: {v}", View::Alias)?,
            None => writeln!(f, "  full flush: not offered by the device, skipped")?,
        }
        let noop = &self.noop_exit;
        write!(
            f,
            "  no-op exit, seen through {} (reported, not asserted): ",
            View::Alias
        )?;
        match cal.threshold() {
            Some(t) => f.write_str(&noop.describe(t)),
            None => write!(
                f,
                "median {} vs comparison median {}",
                noop.measured.median(),
                noop.comparison.median()
            ),
        }
    }
}

/// The host half of one `host-probe` run, over an alias of the region.
pub struct HostProbe<'a> {
    alias: &'a SharedAlias,
    memory: &'a GuestMemoryMmap,
    region: GuestAddress,
    vm_ended: &'a AtomicBool,
    answer_timeout: Duration,
    seq: u64,
    timer: ReloadTimer,
    /// The full flush's comparison: host memory, not guest memory (shared,
    /// so a measurement can hold it while it sends commands).
    private: Arc<MmapRegion>,
    /// See [`HostProbeOptions::sham`].
    pub sham: bool,
}

impl<'a> HostProbe<'a> {
    /// Drives the guest through `alias` (which must map exactly the
    /// region at `region`), measuring through it or through `memory`.
    /// `vm_ended` is set by whoever runs the VM's control loop when it
    /// returns, so a dead guest is noticed at once.
    pub fn new(
        alias: &'a SharedAlias,
        memory: &'a GuestMemoryMmap,
        vm_ended: &'a AtomicBool,
        answer_timeout: Duration,
    ) -> Result<Self, HostProbeError> {
        let private = Arc::new(
            MmapRegion::new(protocol::BUFFER_BYTES as usize)
                .map_err(HostProbeError::PrivateBuffer)?,
        );
        Ok(Self {
            alias,
            memory,
            region: alias.guest_addr(),
            vm_ended,
            answer_timeout,
            seq: 0,
            timer: ReloadTimer::new(),
            private,
            sham: false,
        })
    }

    fn buffer(&self, view: View, offset: u64) -> Result<Region<'a>, ReloadError> {
        let len = protocol::BUFFER_BYTES as usize;
        match view {
            View::Alias => Region::in_alias(self.alias, offset as usize, len),
            View::VmmMapping => {
                Region::in_guest_memory(self.memory, GuestAddress(self.region.0 + offset), len)
            }
        }
    }

    /// Sends `op` and waits for the guest's answer; returns the reply code.
    pub fn command(&mut self, op: u8) -> Result<u8, HostProbeError> {
        self.seq += 1;
        let seq = self.seq;
        let reply_offset = protocol::REPLY as usize;
        self.alias
            .store_u64(protocol::COMMAND as usize, protocol::command(seq, op))?;
        let start = Instant::now();
        loop {
            // Read whether the VM had ended before the reply word: if it
            // had, a missing reply is final.
            let ended = self.vm_ended.load(Ordering::SeqCst);
            let (got, code) = protocol::split(self.alias.load_u64(reply_offset)?);
            if got == seq {
                return Ok(code);
            }
            if ended {
                return Err(HostProbeError::VmEnded { seq, op });
            }
            if start.elapsed() > self.answer_timeout {
                return Err(HostProbeError::Timeout {
                    seq,
                    op,
                    waited: start.elapsed(),
                });
            }
            // Spin through a typical request (this core must stay busy: a
            // core given away or idle for milliseconds loses the lines being
            // measured), then yield, so that on a host with more threads
            // than cores the vCPU and the control loop can finish the very
            // flush being waited for.
            if start.elapsed() < SPIN_BEFORE_YIELD {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }

    fn request(&mut self, op: u8) -> Result<(), HostProbeError> {
        match self.command(op)? {
            reply::DONE => Ok(()),
            code => Err(HostProbeError::Refused {
                seq: self.seq,
                op,
                reply: code,
            }),
        }
    }

    /// The calibration through the alias, on the target buffer (see
    /// [`ReloadTimer::calibrate`]): the best of three rounds.
    pub fn calibrate(&mut self) -> Result<Calibration, HostProbeError> {
        let target = self.buffer(View::Alias, protocol::TARGET)?;
        Ok(self.timer.calibrate(&target, 3))
    }

    /// Freshly warmed target lines, timed at once through `view`.
    pub fn cached(&mut self, view: View) -> Result<Reload, HostProbeError> {
        let target = self.buffer(view, protocol::TARGET)?;
        self.timer.warm(&target);
        Ok(self.timer.time(&target))
    }

    /// Range flush of the target, timed through `view`, against the
    /// control buffer.
    pub fn range_flush(&mut self, view: View) -> Result<Measurement, HostProbeError> {
        let target = self.buffer(view, protocol::TARGET)?;
        let control = self.buffer(view, protocol::CONTROL)?;
        // The target last, so it is the most recently used: anything that
        // evicts by age takes the control first (a void attempt, not a pass).
        self.timer.warm(&control);
        self.timer.warm(&target);
        self.request(if self.sham {
            op::FLUSH_ELSEWHERE
        } else {
            op::FLUSH_TARGET
        })?;
        let measured = self.timer.time(&target);
        let comparison = self.timer.time(&control);
        Ok(Measurement {
            measured,
            comparison,
        })
    }

    /// Full flush, timed through `view` on the target, against a buffer of
    /// the host's own memory through the same pause; `None` when not
    /// offered.
    pub fn full_flush(&mut self, view: View) -> Result<Option<Measurement>, HostProbeError> {
        let target = self.buffer(view, protocol::TARGET)?;
        let private_map = Arc::clone(&self.private);
        let private = Region::in_private(&private_map)?;
        self.timer.warm(&private);
        self.timer.warm(&target);
        match self.command(if self.sham {
            op::FLUSH_ELSEWHERE
        } else {
            op::FLUSH_ALL
        })? {
            reply::DONE => {}
            reply::UNSUPPORTED => return Ok(None),
            code => {
                return Err(HostProbeError::Refused {
                    seq: self.seq,
                    op: op::FLUSH_ALL,
                    reply: code,
                })
            }
        }
        let measured = self.timer.time(&target);
        let comparison = self.timer.time(&private);
        Ok(Some(Measurement {
            measured,
            comparison,
        }))
    }

    /// A no-op exit, timed through `view` on the target, against the target
    /// timed at once after warming.
    pub fn noop_exit(&mut self, view: View) -> Result<Measurement, HostProbeError> {
        let target = self.buffer(view, protocol::TARGET)?;
        self.timer.warm(&target);
        self.request(op::NOOP_EXIT)?;
        let measured = self.timer.time(&target);
        let comparison = self.cached(view)?;
        Ok(Measurement {
            measured,
            comparison,
        })
    }

    /// Tells the guest to end the run (it exits with status 0).
    pub fn finish(mut self) -> Result<(), HostProbeError> {
        self.request(op::FINISH)
    }

    /// Repeats `measure` while its attempts are void, at most `attempts`
    /// times.
    fn attempts(
        &mut self,
        attempts: u32,
        threshold: Option<u64>,
        mut measure: impl FnMut(&mut Self) -> Result<Option<Measurement>, HostProbeError>,
    ) -> Result<Option<Verdict>, HostProbeError> {
        judge(attempts, threshold, || measure(self))
    }
}

/// The verdict over a series of at most `attempts` measurements taken by
/// `measure` (`None`: the request is not offered), judged at `threshold`
/// by [`cache_flush_abi::flush_reload`]'s [`Series`]: no eviction decides
/// at once, and so does a second partial one; a pass needs its
/// confirmations. Without a threshold (the calibration failed) nothing is
/// measured and the verdict is inconclusive.
fn judge<E>(
    attempts: u32,
    threshold: Option<u64>,
    mut measure: impl FnMut() -> Result<Option<Measurement>, E>,
) -> Result<Option<Verdict>, E> {
    let Some(threshold) = threshold else {
        return Ok(Some(Verdict {
            outcome: Outcome::Inconclusive,
            threshold: 0,
            attempts: Vec::new(),
        }));
    };
    let mut series = Series::new(attempts);
    let mut seen = Vec::new();
    loop {
        let Some(measurement) = measure()? else {
            return Ok(None);
        };
        let attempt = measurement.judge(threshold);
        seen.push((measurement, attempt));
        if let Some(outcome) = series.record(attempt) {
            return Ok(Some(Verdict {
                outcome,
                threshold,
                attempts: seen,
            }));
        }
    }
}

/// Runs the host half of `host-probe` against a running guest, through
/// `alias` (a mapping of the guest's region, [`protocol::REGION_BYTES`] at
/// its `buffer=`): pins the calling thread, measures, and tells the guest to
/// finish.
/// Run it on a thread of its own while another runs the VM's control loop
/// ([`vmm::vm::RunningVm::wait`]), which serves the device, and sets
/// `vm_ended` when that returns.
pub fn run(
    alias: &SharedAlias,
    memory: &GuestMemoryMmap,
    vm_ended: &AtomicBool,
    options: &HostProbeOptions,
) -> Result<HostProbeReport, HostProbeError> {
    let pinned = PinnedToCurrentCpu::new()?;
    let mut probe = HostProbe::new(alias, memory, vm_ended, options.answer_timeout)?;
    probe.sham = options.sham;
    let calibration = probe.calibrate()?;
    let threshold = calibration.threshold();
    let attempts = options.attempts;
    let range = |view| move |p: &mut HostProbe<'_>| p.range_flush(view).map(Some);
    let always = "a range flush is always offered";
    let range_alias = probe
        .attempts(attempts, threshold, range(View::Alias))?
        .expect(always);
    let range_vmm = probe
        .attempts(attempts, threshold, range(View::VmmMapping))?
        .expect(always);
    let full_alias = probe.attempts(attempts, threshold, |p| p.full_flush(View::Alias))?;
    let noop_exit = probe.noop_exit(View::Alias)?;
    probe.finish()?;
    Ok(HostProbeReport {
        cpu: pinned.cpu(),
        calibration,
        range_alias,
        range_vmm,
        full_alias,
        noop_exit,
    })
}

/// What [`run_vm`] found.
pub struct ProbeRun {
    /// How the VM ended (the bundled guest exits 0 after the host's FINISH).
    pub outcome: VmOutcome,
    /// The host half's report, or why it stopped.
    pub report: Result<HostProbeReport, HostProbeError>,
}

/// Boots a VM from `config` (for the bundled guest: `cmdline` with
/// `scenario=host-probe`, and `buffer=` if `options.region` is not the
/// default), runs the host half against it on a thread of its own while this
/// thread runs the control loop, and returns both results. If the host half
/// fails early, the guest gives up after its own timeout, so this returns.
pub fn run_vm(config: &VmConfig, options: &HostProbeOptions) -> Result<ProbeRun, VmError> {
    let vm = Vm::new(config)?.start()?;
    let alias = match vm.alias(options.region, protocol::REGION_BYTES as usize) {
        Ok(alias) => alias,
        Err(e) => {
            let outcome = vm.stop();
            return Ok(ProbeRun {
                outcome,
                report: Err(e.into()),
            });
        }
    };
    let memory = vm.memory().clone();
    let vm_ended = Arc::new(AtomicBool::new(false));
    let host = {
        let vm_ended = vm_ended.clone();
        let options = *options;
        std::thread::spawn(move || run(&alias, &memory, &vm_ended, &options))
    };
    let outcome = vm.wait();
    vm_ended.store(true, Ordering::SeqCst);
    let report = host.join().unwrap_or(Err(HostProbeError::Panicked));
    Ok(ProbeRun {
        outcome: outcome?,
        report,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const THRESHOLD: u64 = 190;

    /// A measurement of 64 lines: `slow` of the measured ones at 340
    /// cycles, the rest at 60, and `comparison_slow` of the comparison's.
    fn m(slow: usize, comparison_slow: usize) -> Measurement {
        let lines = |slow: usize| {
            let mut v = vec![340; slow];
            v.resize(64, 60);
            Reload::from_samples(v)
        };
        Measurement {
            measured: lines(slow),
            comparison: lines(comparison_slow),
        }
    }

    fn judged(attempts: u32, series: &[(usize, usize)]) -> Option<Verdict> {
        let mut next = series.iter();
        judge::<()>(attempts, Some(THRESHOLD), || {
            Ok(next.next().map(|&(a, b)| m(a, b)))
        })
        .unwrap()
    }

    fn outcome(attempts: u32, series: &[(usize, usize)]) -> Outcome {
        judged(attempts, series).expect("offered").outcome
    }

    #[test]
    fn a_flush_that_does_not_evict_never_passes() {
        // Lines still cached after the "flush": not evicted at once.
        assert_eq!(outcome(30, &[(0, 0); 30]), Outcome::NotEvicted);
        // Both slow (the host evicted everything): void, so inconclusive,
        // which is not a pass either.
        let v = judged(3, &[(64, 64); 3]).unwrap();
        assert_eq!(v.outcome, Outcome::Inconclusive);
        assert_eq!(v.attempts.len(), 3);
        assert!(!v.passed());
        // Whatever the noise, a flushed buffer that looks like its
        // comparison never passes.
        for slow in 0..=64 {
            assert!(!judged(1, &[(slow, slow)]).unwrap().passed(), "{slow}");
        }
    }

    #[test]
    fn a_second_partial_eviction_decides_and_is_not_retried() {
        let v = judged(10, &[(64, 64), (40, 1), (63, 0), (64, 0)]).unwrap();
        assert_eq!(v.outcome, Outcome::Partial);
        assert_eq!(v.attempts.len(), 3);
        assert!(!v.passed());
        // One line still cached in two attempts is a partial eviction, even
        // with evicted attempts around them.
        assert_eq!(
            outcome(10, &[(64, 0), (63, 0), (64, 0), (63, 0), (64, 0)]),
            Outcome::Partial
        );
        // One partial attempt is measured again, and out of attempts it
        // stays partial.
        assert_eq!(
            outcome(10, &[(63, 0), (64, 0), (64, 0), (64, 0)]),
            Outcome::Evicted
        );
        assert_eq!(outcome(2, &[(63, 0), (64, 64)]), Outcome::Partial);
    }

    #[test]
    fn a_pass_is_confirmed_and_void_attempts_are_kept() {
        let v = judged(10, &[(64, 64), (64, 0), (64, 40), (64, 2), (64, 1)]).unwrap();
        assert_eq!(v.outcome, Outcome::Evicted);
        assert_eq!(
            v.attempts.iter().map(|(_, a)| *a).collect::<Vec<_>>(),
            [
                Attempt::Void,
                Attempt::Evicted,
                Attempt::Void,
                Attempt::Evicted,
                Attempt::Evicted
            ]
        );
        assert!(v.passed());
        assert!(
            v.to_string()
                .contains("earlier: 64/64 vs 64/64 void, 64/64 vs 0/64 evicted,"),
            "{v}"
        );
        // Two evicted attempts are not enough within the bound.
        assert_eq!(
            outcome(3, &[(64, 0), (64, 64), (64, 0)]),
            Outcome::Inconclusive
        );
    }

    #[test]
    fn not_offered_is_none_and_no_threshold_measures_nothing() {
        assert!(judged(3, &[]).is_none());
        let mut calls = 0;
        let v = judge::<()>(3, None, || {
            calls += 1;
            Ok(Some(m(64, 0)))
        })
        .unwrap()
        .unwrap();
        assert_eq!((v.outcome, calls), (Outcome::Inconclusive, 0));
    }

    #[test]
    fn a_report_is_inconclusive_only_if_nothing_failed() {
        let report = |range_vmm, full_alias| HostProbeReport {
            cpu: 0,
            calibration: Calibration {
                cached: 60,
                flushed: 320,
            },
            range_alias: judged(3, &[(64, 0); 3]).unwrap(),
            range_vmm,
            full_alias,
            noop_exit: m(0, 0),
        };
        let r = report(judged(2, &[(64, 64); 2]).unwrap(), None);
        assert!(r.inconclusive() && !r.passed());
        let r = report(judged(2, &[(0, 0)]).unwrap(), None);
        assert!(!r.inconclusive() && !r.passed());
        let r = report(judged(3, &[(64, 0); 3]).unwrap(), None);
        assert!(!r.inconclusive() && r.passed());
        let r = report(judged(2, &[(64, 64); 2]).unwrap(), judged(1, &[(50, 0)]));
        assert!(!r.inconclusive() && !r.passed());
    }
}
