//! The seam a VMM implements to host the engine: how to stop every vCPU, and
//! where to run work while they are stopped.
//!
//! Two small traits, nothing else:
//!
//! * [`VcpuPause`]: stop every vCPU of the VM (each out of guest mode, any
//!   half-done MMIO/PIO exit completed) within a deadline, and hand back a
//!   guard;
//! * [`PausedVcpus`]: that guard. While it lives no vCPU runs guest code;
//!   dropping it resumes them. It can run work on the paused vCPUs' own
//!   threads ([`PausedVcpus::run_on_vcpus`]); a VMM that cannot borrow its
//!   vCPU threads keeps the default, which runs the work on short-lived host
//!   threads instead. Both are correct: CLFLUSH/CLFLUSHOPT act on the whole
//!   coherence domain from any core; running on the vCPUs' threads only puts
//!   the work on the cores the guest occupies.
//!
//! The engine never learns how a VMM kicks its vCPUs (signals,
//! `immediate_exit`, a hypervisor API): that stays behind these traits, so
//! the engine (and the device in front of it) has no KVM dependency.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Errors of a pause or of work run during one.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    /// These vCPUs did not stop before the deadline; nothing is paused.
    #[error("vCPUs {vcpus:?} did not pause within {timeout:?}")]
    PauseTimeout {
        /// The vCPUs still running.
        vcpus: Vec<usize>,
        /// The deadline.
        timeout: Duration,
    },
    /// These workers did not finish before the deadline.
    #[error("workers {workers:?} did not finish their work within {timeout:?}")]
    WorkTimeout {
        /// The workers still busy.
        workers: Vec<usize>,
        /// The deadline.
        timeout: Duration,
    },
    /// The VMM could not pause for another reason (it is shutting down, a
    /// thread could not be created, ...).
    #[error("cannot pause the vCPUs: {0}")]
    Other(String),
}

/// Who runs one share of work during a pause.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Worker {
    /// 0..[`PausedVcpus::worker_count`]: which share to take.
    pub index: usize,
    /// The paused vCPU whose thread runs it, `None` for a host thread.
    pub vcpu: Option<usize>,
}

/// Work run during a pause, once per worker. It is `'static` because a
/// worker that misses its deadline may still be running it after
/// [`PausedVcpus::run_on_vcpus`] returned: whatever it touches must be kept
/// alive by the closure itself.
pub type WorkFn = Arc<dyn Fn(Worker) + Send + Sync>;

/// Stops every vCPU of a VM. Implemented by the VMM.
pub trait VcpuPause: Send + Sync {
    /// The guard of a pause.
    type Paused<'a>: PausedVcpus
    where
        Self: 'a;

    /// Stops every vCPU and returns once none runs guest code, or fails
    /// (with nothing left paused) after `timeout`. Pauses are serialised:
    /// a second caller waits for the first guard to drop.
    fn pause_all(&self, timeout: Duration) -> Result<Self::Paused<'_>, PauseError>;

    /// The host CPU vCPU `vcpu` last ran guest code on, if known (recorded
    /// beside each share, so a report can show where the work ran).
    fn last_host_cpu(&self, _vcpu: usize) -> Option<i32> {
        None
    }

    /// How many vCPUs are inside guest mode right now, if the VMM can tell.
    /// The engine checks it after each share: anything but `Some(0)` while
    /// paused is a broken pause and fails the batch.
    fn vcpus_in_guest(&self) -> Option<usize> {
        None
    }
}

/// The host CPUs this process may run on (its affinity and CPU quota), at
/// least 1.
pub fn host_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Every vCPU stopped; dropping the value resumes them.
pub trait PausedVcpus {
    /// How many workers [`Self::run_on_vcpus`] runs work on. The default:
    /// one host thread per host CPU.
    fn worker_count(&self) -> usize {
        host_cpus()
    }

    /// The vCPU whose thread took this pause (a VMM that serves a notify on
    /// the notifying vCPU's thread), if any: recorded beside the shares
    /// that thread runs.
    fn controller_vcpu(&self) -> Option<usize> {
        None
    }

    /// Runs `work` once for every worker `0..worker_count()`, in parallel,
    /// and returns when all are done, or with [`PauseError::WorkTimeout`]
    /// naming the late ones after `timeout`. A worker that never ran its
    /// share is simply missing from the engine's count: the engine checks
    /// that every planned line was flushed, so an implementation cannot
    /// make a batch succeed by skipping work.
    ///
    /// The default runs on short-lived host threads (not scoped threads: a
    /// scoped thread cannot be abandoned at a deadline, and every wait of
    /// the engine has one).
    fn run_on_vcpus(&self, work: WorkFn, timeout: Duration) -> Result<(), PauseError> {
        run_on_host_threads(self.worker_count(), work, timeout)
    }
}

/// Runs `work` for workers `0..count` on new host threads; see
/// [`PausedVcpus::run_on_vcpus`].
pub fn run_on_host_threads(
    count: usize,
    work: WorkFn,
    timeout: Duration,
) -> Result<(), PauseError> {
    let deadline = Instant::now() + timeout;
    let (done_tx, done_rx) = mpsc::channel();
    for index in 0..count {
        let (work, done) = (work.clone(), done_tx.clone());
        std::thread::Builder::new()
            .name(format!("flush-worker{index}"))
            .spawn(move || {
                work(Worker { index, vcpu: None });
                // The receiver may have given up at its deadline.
                let _ = done.send(index);
            })
            .map_err(|e| PauseError::Other(format!("cannot start a flush worker thread: {e}")))?;
    }
    drop(done_tx);
    let mut pending: Vec<usize> = (0..count).collect();
    while !pending.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        match done_rx.recv_timeout(left) {
            Ok(index) => pending.retain(|&i| i != index),
            // A worker that panicked dropped its sender without sending:
            // once every sender is gone, the rest never ran to the end.
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(PauseError::WorkTimeout {
                    workers: pending,
                    timeout,
                })
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct HostOnly;
    impl PausedVcpus for HostOnly {
        fn worker_count(&self) -> usize {
            3
        }
    }

    #[test]
    fn the_default_runs_every_worker_once_on_host_threads() {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let s = seen.clone();
        HostOnly
            .run_on_vcpus(
                Arc::new(move |w| s.lock().unwrap().push(w)),
                Duration::from_secs(5),
            )
            .unwrap();
        let mut seen = seen.lock().unwrap().clone();
        seen.sort_by_key(|w| w.index);
        let expected: Vec<Worker> = (0..3).map(|index| Worker { index, vcpu: None }).collect();
        assert_eq!(seen, expected);
    }

    #[test]
    fn the_default_names_late_workers() {
        let ran = Arc::new(AtomicUsize::new(0));
        let r = ran.clone();
        let err = HostOnly
            .run_on_vcpus(
                Arc::new(move |w| {
                    if w.index == 1 {
                        std::thread::sleep(Duration::from_millis(500));
                    }
                    r.fetch_add(1, Ordering::SeqCst);
                }),
                Duration::from_millis(50),
            )
            .unwrap_err();
        assert!(
            matches!(&err, PauseError::WorkTimeout { workers, .. } if workers == &[1]),
            "{err}"
        );
    }

    #[test]
    fn a_panicking_worker_does_not_hang_the_default() {
        let result = HostOnly.run_on_vcpus(
            Arc::new(|w| {
                if w.index == 0 {
                    panic!("share 0 panics (expected in this test)");
                }
            }),
            Duration::from_secs(5),
        );
        assert!(result.is_ok(), "{result:?}");
    }
}
