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
//!   buffer too, so the comparison is the target after a request that
//!   pauses the guest the same way but flushes one line elsewhere;
//! * a no-op exit (a device register read), reported only: an exit alone
//!   leaves the lines cached.
//!
//! A flush counts as evicting when the measured median is at least twice
//! the comparison's. The host is shared and noisy, and a pause can move the
//! VMM's threads (and evict this core's caches) on a host with fewer cores
//! than threads, so an attempt whose comparison itself reloads at least
//! twice as slowly as cached lines is void, and a failing measurement is
//! repeated up to [`HostProbeOptions::attempts`] times.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use cache_flush_abi::host_probe as protocol;
use protocol::{op, reply};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::{PinnedToCurrentCpu, Region, Reload, ReloadError, ReloadTimer};
use crate::alias::{AliasError, SharedAlias};
use crate::vcpu::VmOutcome;
use crate::vm::{Vm, VmConfig, VmError};

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
    /// The measured median is at least twice the comparison's.
    pub fn evicted(&self) -> bool {
        self.measured.median() >= 2 * self.comparison.median()
    }
}

impl fmt::Display for Measurement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let threshold = 2 * self.comparison.median();
        write!(
            f,
            "median {} cycles ({}/{} lines >= {threshold}) vs comparison median {}",
            self.measured.median(),
            self.measured.at_least(threshold),
            self.measured.lines(),
            self.comparison.median()
        )
    }
}

/// How a series of attempts ended.
#[derive(Clone, Debug)]
pub enum Verdict {
    /// Attempt `attempt` showed eviction.
    Evicted {
        /// Which attempt (from 1).
        attempt: u32,
        /// Its measurement.
        measurement: Measurement,
        /// The (measured, comparison) medians of the attempts before it.
        earlier: Vec<(u64, u64)>,
    },
    /// No attempt did, though at least one comparison was cached.
    NotEvicted {
        /// The last attempt's measurement.
        last: Measurement,
    },
    /// Every attempt's comparison was itself evicted: no conclusion.
    Inconclusive {
        /// The last attempt's measurement.
        last: Measurement,
    },
    /// The device does not offer the request.
    Unsupported,
}

impl Verdict {
    /// Evicted, or not offered (nothing to prove).
    pub fn passed(&self) -> bool {
        matches!(self, Verdict::Evicted { .. } | Verdict::Unsupported)
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Evicted {
                attempt,
                measurement,
                earlier,
            } => {
                write!(f, "evicted (attempt {attempt}): {measurement}")?;
                if !earlier.is_empty() {
                    write!(f, "; earlier attempts' medians (measured/comparison):")?;
                    for (measured, comparison) in earlier {
                        write!(f, " {measured}/{comparison}")?;
                    }
                }
                Ok(())
            }
            Verdict::NotEvicted { last } => write!(f, "NOT evicted: {last}"),
            Verdict::Inconclusive { last } => {
                write!(f, "INCONCLUSIVE (every comparison was evicted too): {last}")
            }
            Verdict::Unsupported => f.write_str("not offered by the device, skipped"),
        }
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
}

impl Default for HostProbeOptions {
    fn default() -> Self {
        Self {
            region: GuestAddress(protocol::DEFAULT_REGION),
            attempts: 10,
            answer_timeout: Duration::from_secs(10),
        }
    }
}

/// What [`run`] found.
#[derive(Clone, Debug)]
pub struct HostProbeReport {
    /// The host CPU the measuring thread was pinned to.
    pub cpu: i32,
    /// Median reload of freshly warmed lines (the best of three).
    pub cached_median: u64,
    /// Range flush, timed through the alias.
    pub range_alias: Verdict,
    /// Range flush, timed through the VMM's own mapping.
    pub range_vmm: Verdict,
    /// Full flush, timed through the alias.
    pub full_alias: Verdict,
    /// A no-op exit, timed through the alias (reported only).
    pub noop_exit: Measurement,
}

impl HostProbeReport {
    /// Every flush measurement showed eviction (or was not offered).
    pub fn passed(&self) -> bool {
        self.verdicts().iter().all(|v| v.passed())
    }

    /// No measurement failed, but at least one could not conclude: the host
    /// was too noisy to tell, and a new run may.
    pub fn inconclusive(&self) -> bool {
        let verdicts = self.verdicts();
        verdicts
            .iter()
            .any(|v| matches!(v, Verdict::Inconclusive { .. }))
            && !verdicts
                .iter()
                .any(|v| matches!(v, Verdict::NotEvicted { .. }))
    }

    fn verdicts(&self) -> [&Verdict; 3] {
        [&self.range_alias, &self.range_vmm, &self.full_alias]
    }
}

impl fmt::Display for HostProbeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "host probe on host CPU {}: cached lines reload in a median of {} cycles",
            self.cpu, self.cached_median
        )?;
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
        writeln!(
            f,
            "  full flush, seen through {}: {}",
            View::Alias,
            self.full_alias
        )?;
        write!(
            f,
            "  no-op exit, seen through {} (reported, not asserted): {}",
            View::Alias,
            self.noop_exit
        )
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
    ) -> Self {
        Self {
            alias,
            memory,
            region: alias.guest_addr(),
            vm_ended,
            answer_timeout,
            seq: 0,
            timer: ReloadTimer::new(),
        }
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
        self.timer.warm(&target);
        self.timer.warm(&control);
        self.request(op::FLUSH_TARGET)?;
        let measured = self.timer.time(&target);
        let comparison = self.timer.time(&control);
        Ok(Measurement {
            measured,
            comparison,
        })
    }

    /// Full flush, timed through `view` on the target, against the target
    /// after a one-line flush elsewhere; `None` when not offered.
    pub fn full_flush(&mut self, view: View) -> Result<Option<Measurement>, HostProbeError> {
        let target = self.buffer(view, protocol::TARGET)?;
        self.timer.warm(&target);
        match self.command(op::FLUSH_ALL)? {
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
        self.timer.warm(&target);
        self.request(op::FLUSH_ELSEWHERE)?;
        let comparison = self.timer.time(&target);
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

    /// Repeats `measure` until it shows eviction, at most `attempts` times.
    fn attempts(
        &mut self,
        attempts: u32,
        cached: u64,
        mut measure: impl FnMut(&mut Self) -> Result<Option<Measurement>, HostProbeError>,
    ) -> Result<Verdict, HostProbeError> {
        judge(attempts, cached, || measure(self))
    }
}

/// The verdict over at most `attempts` measurements (at least one) taken by
/// `measure` (`None`: not offered): evicted at the first that shows it;
/// inconclusive when every comparison reloaded at least twice as slowly as
/// `cached` lines (void attempts); not evicted otherwise.
fn judge<E>(
    attempts: u32,
    cached: u64,
    mut measure: impl FnMut() -> Result<Option<Measurement>, E>,
) -> Result<Verdict, E> {
    let attempts = attempts.max(1);
    let mut void = 0;
    let mut earlier = Vec::new();
    let mut attempt = 1;
    loop {
        let Some(measurement) = measure()? else {
            return Ok(Verdict::Unsupported);
        };
        if measurement.evicted() {
            return Ok(Verdict::Evicted {
                attempt,
                measurement,
                earlier,
            });
        }
        if measurement.comparison.median() >= 2 * cached {
            void += 1;
        }
        if attempt == attempts {
            return Ok(if void == attempts {
                Verdict::Inconclusive { last: measurement }
            } else {
                Verdict::NotEvicted { last: measurement }
            });
        }
        earlier.push((
            measurement.measured.median(),
            measurement.comparison.median(),
        ));
        attempt += 1;
    }
}

/// Runs the host half of `host-probe` against a running guest, through
/// `alias` (a mapping of the guest's region, [`protocol::REGION_BYTES`] at
/// its `buffer=`): pins the calling thread, measures, and tells the guest to
/// finish.
/// Run it on a thread of its own while another runs the VM's control loop
/// ([`crate::vm::RunningVm::wait`]), which serves the device, and sets
/// `vm_ended` when that returns.
pub fn run(
    alias: &SharedAlias,
    memory: &GuestMemoryMmap,
    vm_ended: &AtomicBool,
    options: &HostProbeOptions,
) -> Result<HostProbeReport, HostProbeError> {
    let pinned = PinnedToCurrentCpu::new()?;
    let mut probe = HostProbe::new(alias, memory, vm_ended, options.answer_timeout);
    let mut cached = u64::MAX;
    for _ in 0..3 {
        cached = cached.min(probe.cached(View::Alias)?.median());
    }
    let attempts = options.attempts;
    let range_alias = probe.attempts(attempts, cached, |p| p.range_flush(View::Alias).map(Some))?;
    let range_vmm = probe.attempts(attempts, cached, |p| {
        p.range_flush(View::VmmMapping).map(Some)
    })?;
    let full_alias = probe.attempts(attempts, cached, |p| p.full_flush(View::Alias))?;
    let noop_exit = probe.noop_exit(View::Alias)?;
    probe.finish()?;
    Ok(HostProbeReport {
        cpu: pinned.cpu(),
        cached_median: cached,
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

    /// A measurement whose lines all reloaded in `measured` and `comparison`
    /// cycles.
    fn m(measured: u64, comparison: u64) -> Measurement {
        Measurement {
            measured: Reload::from_samples(vec![measured; 9]),
            comparison: Reload::from_samples(vec![comparison; 9]),
        }
    }

    fn judged(attempts: u32, series: &[(u64, u64)]) -> Verdict {
        let mut next = series.iter();
        judge::<()>(attempts, 80, || Ok(next.next().map(|&(a, b)| m(a, b)))).unwrap()
    }

    #[test]
    fn a_flush_that_does_not_evict_never_passes() {
        // Lines still cached after the "flush": not evicted, however often
        // it is tried.
        let v = judged(30, &[(80, 80); 30]);
        assert!(matches!(v, Verdict::NotEvicted { .. }), "{v}");
        assert!(!v.passed());
        // Both slow (the host evicted everything): void, so inconclusive,
        // which is not a pass either.
        let v = judged(3, &[(400, 400); 3]);
        assert!(matches!(v, Verdict::Inconclusive { .. }), "{v}");
        assert!(!v.passed());
        // One cached comparison among void ones: a real "not evicted".
        let v = judged(3, &[(400, 400), (90, 80), (400, 400)]);
        assert!(matches!(v, Verdict::NotEvicted { .. }), "{v}");
    }

    #[test]
    fn the_first_evicting_attempt_decides_and_earlier_ones_are_kept() {
        let v = judged(5, &[(400, 400), (90, 80), (400, 100), (80, 80)]);
        match &v {
            Verdict::Evicted {
                attempt, earlier, ..
            } => {
                assert_eq!(*attempt, 3);
                assert_eq!(earlier, &vec![(400, 400), (90, 80)]);
            }
            other => panic!("{other}"),
        }
        assert!(v.passed());
        // Exactly twice the comparison counts.
        assert!(judged(1, &[(160, 80)]).passed());
        assert!(!judged(1, &[(159, 80)]).passed());
    }

    #[test]
    fn not_offered_is_skipped_and_zero_attempts_still_measure_once() {
        assert!(matches!(judged(3, &[]), Verdict::Unsupported));
        assert!(judged(0, &[(400, 80)]).passed());
    }

    #[test]
    fn a_report_is_inconclusive_only_if_nothing_failed() {
        let report = |range_vmm| HostProbeReport {
            cpu: 0,
            cached_median: 80,
            range_alias: judged(1, &[(400, 80)]),
            range_vmm,
            full_alias: Verdict::Unsupported,
            noop_exit: m(80, 80),
        };
        let r = report(judged(2, &[(400, 400); 2]));
        assert!(r.inconclusive() && !r.passed());
        let r = report(judged(2, &[(80, 80); 2]));
        assert!(!r.inconclusive() && !r.passed());
        let r = report(judged(2, &[(400, 80)]));
        assert!(!r.inconclusive() && r.passed());
    }
}
