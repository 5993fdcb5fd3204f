//! vCPU threads: one per vCPU, each looping on `KVM_RUN` and dispatching
//! exits to the port and MMIO buses.
//!
//! Between two `KVM_RUN`s a thread asks the [`control::VcpuControl`] what to
//! do, which is how the flush engine parks every vCPU and borrows their
//! threads to flush caches on the cores they run on.

pub mod control;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cache_flush_abi::boot::EXIT_PORT;
use devices::bus::Bus;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;

#[cfg(test)]
use control::RunState;
use control::{Directive, VcpuControl};

/// How a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmOutcome {
    /// The guest wrote this status to the exit port (0 = success).
    GuestExit {
        /// The status.
        status: u32,
        /// The vCPU that wrote it.
        vcpu: usize,
    },
    /// The VM cannot go on: a triple fault, an emulation failure, a failed
    /// entry, a `KVM_RUN` error, or every vCPU halted with no verdict.
    Crash {
        /// The vCPU concerned, if any.
        vcpu: Option<usize>,
        /// What happened, for the one-line report.
        reason: String,
    },
    /// A vCPU thread panicked (a VMM bug, never a guest's doing): the VM
    /// cannot go on without that vCPU.
    VcpuPanicked {
        /// The vCPU whose thread panicked.
        vcpu: usize,
        /// The panic message.
        message: String,
    },
    /// The VMM was asked to stop (SIGINT, SIGTERM).
    Signal(i32),
}

/// Where vCPU threads report how the VM ended; the first report wins and
/// wakes the control loop.
pub struct OutcomeSink {
    outcome: Mutex<Option<VmOutcome>>,
    wakeup: EventFd,
}

impl OutcomeSink {
    /// A sink whose reports are signalled on a new eventfd.
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            outcome: Mutex::new(None),
            wakeup: EventFd::new(libc::EFD_NONBLOCK)?,
        }))
    }

    /// Records `outcome` unless one is recorded already.
    pub fn report(&self, outcome: VmOutcome) {
        let mut slot = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(outcome);
            // A full counter still leaves the eventfd readable, which is all
            // the control loop needs.
            let _ = self.wakeup.write(1);
        }
    }

    /// The recorded outcome.
    pub fn outcome(&self) -> Option<VmOutcome> {
        self.outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The eventfd that becomes readable on the first report.
    pub fn eventfd(&self) -> &EventFd {
        &self.wakeup
    }
}

/// The buses a vCPU dispatches its exits to.
#[derive(Clone)]
pub struct IoBuses {
    /// Port I/O (UART).
    pub pio: Bus,
    /// MMIO (virtio devices).
    pub mmio: Bus,
    /// The cache-flush device's QueueNotify, when this thread serves it.
    pub notify: Option<NotifyRoute>,
}

/// A QueueNotify address whose writes the vCPU thread serves itself, after
/// the bus write (so with no bus or device lock held).
#[derive(Clone)]
pub struct NotifyRoute {
    /// Guest-physical address of the QueueNotify register.
    pub addr: u64,
    /// The device's queue worker.
    pub worker: devices::cache_flush::QueueWorker,
}

/// Per-VM counters the vCPU threads keep.
#[derive(Default)]
pub struct VcpuStats {
    /// Accesses to addresses no device claims.
    pub unclaimed_accesses: AtomicU64,
    /// Extra exits served while completing a pending exit before a park
    /// (string PIO, split MMIO): each would have been lost before.
    pub pending_io_trips: AtomicU64,
}

/// Runs a vCPU thread's `body` registered with `control`, and whatever
/// happens (return or panic) unregisters it before returning, so no pause
/// ever kicks through the `kvm_run` page of a thread that is gone. A panic
/// is reported as [`VmOutcome::VcpuPanicked`] (which ends the VM: a vCPU
/// is missing) instead of leaving a slot that looks alive.
///
/// Why a pointer plus a guard, and not a second mapping of `kvm_run` (as a
/// kick through a dup'd vCPU fd would need): the pointer is only ever
/// written under the control lock while registered, and the unregistration
/// below takes the same lock before the caller drops the mapping. A second
/// mapping would outlive the thread but still points at a vCPU nobody runs.
///
/// # Safety
/// `immediate_exit` must stay valid until this function returns.
pub unsafe fn run_registered(
    control: &VcpuControl,
    outcome: &OutcomeSink,
    index: usize,
    immediate_exit: *mut u8,
    body: impl FnOnce(),
) {
    /// Unregisters on drop, i.e. also while unwinding.
    struct Registered<'a>(&'a VcpuControl, usize);
    impl Drop for Registered<'_> {
        fn drop(&mut self) {
            self.0.exited(self.1);
        }
    }
    // SAFETY: forwarded from the caller; `Registered` withdraws the pointer
    // before we return.
    unsafe { control.register(index, immediate_exit) };
    let registered = Registered(control, index);
    if let Err(payload) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        log::error!("vcpu {index}: its thread panicked: {message}");
        drop(registered);
        outcome.report(VmOutcome::VcpuPanicked {
            vcpu: index,
            message,
        });
    }
}

/// One vCPU and what its thread needs.
pub struct Vcpu {
    index: usize,
    fd: VcpuFd,
    buses: IoBuses,
    control: Arc<VcpuControl>,
    outcome: Arc<OutcomeSink>,
    stats: Arc<VcpuStats>,
    halted: Arc<AtomicU64>,
    /// Host quirks this vCPU applies (Linux guests on hosts that need them).
    quirks: Option<Arc<crate::host_quirks::VcpuQuirks>>,
    /// The VM has KVM's in-kernel interrupt controller: an interrupt can
    /// wake a halted vCPU, so HLT is idling, not the end of this vCPU.
    irqchip: bool,
}

/// Unclaimed accesses are logged for the first few, then every this many, so
/// a guest probing the MMIO hole cannot flood the log.
const UNCLAIMED_LOG_EVERY: u64 = 1000;

impl Vcpu {
    /// Wraps a configured vCPU. `halted` counts vCPUs that executed HLT; when
    /// all have, the VM has nothing left to run.
    pub fn new(
        index: usize,
        fd: VcpuFd,
        buses: IoBuses,
        control: Arc<VcpuControl>,
        outcome: Arc<OutcomeSink>,
        stats: Arc<VcpuStats>,
        halted: Arc<AtomicU64>,
    ) -> Self {
        Self {
            index,
            fd,
            buses,
            control,
            outcome,
            stats,
            halted,
            quirks: None,
            irqchip: false,
        }
    }

    /// Marks the VM as having KVM's in-kernel irqchip (a Linux guest): a
    /// `KVM_EXIT_HLT` then re-enters `KVM_RUN`, where the local APIC wakes
    /// the vCPU on its next interrupt, instead of parking the thread for good
    /// (which left another CPU's IPIs unanswered for ever).
    pub fn with_in_kernel_irqchip(mut self) -> Self {
        self.irqchip = true;
        self
    }

    /// Applies `quirks` after this vCPU's exits (see [`crate::host_quirks`]).
    pub fn with_quirks(mut self, quirks: Arc<crate::host_quirks::VcpuQuirks>) -> Self {
        self.quirks = Some(quirks);
        self
    }

    /// The thread body: runs until the guest ends, the VM crashes or the
    /// control channel says finish.
    pub fn run(mut self) {
        let immediate_exit = &mut self.fd.get_kvm_run().immediate_exit as *mut u8;
        let (control, outcome, index) = (self.control.clone(), self.outcome.clone(), self.index);
        // SAFETY: `immediate_exit` points into this VcpuFd's kvm_run mapping,
        // which lives until `self` is dropped at the end of this function;
        // the closure only borrows `self`, and `run_registered` withdraws
        // the pointer before it returns, on return and on unwinding alike.
        unsafe {
            run_registered(&control, &outcome, index, immediate_exit, || {
                self.run_loop()
            })
        };
    }

    fn run_loop(&mut self) {
        let mut pending_io = false;
        loop {
            match self.control.before_run(self.index) {
                Directive::Run => {}
                Directive::Finish => break,
                Directive::Park => {
                    if pending_io {
                        pending_io = false;
                        if let Err(conclusion) = self.complete_pending_io() {
                            if let Step::Stop = self.conclude(conclusion) {
                                break;
                            }
                        }
                    }
                    match self.control.park(self.index) {
                        Directive::Finish => break,
                        _ => continue,
                    }
                }
            }
            let result = self.fd.run();
            self.control.after_run(self.index);
            let step = match dispatch(self.index, &self.buses, &self.stats, result) {
                Ok(step) => step,
                Err(Conclusion::InternalError) if self.complete_emulation_gap() => Step::Continue {
                    io: false,
                    notify: None,
                },
                Err(conclusion) => self.conclude(conclusion),
            };
            if let Some(quirks) = &self.quirks {
                quirks.after_exit(&self.fd, self.index);
            }
            match step {
                Step::Continue { io, notify } => {
                    pending_io = io;
                    if let (Some(queue), Some(route)) = (notify, &self.buses.notify) {
                        // Serve it here: this thread is out of guest mode,
                        // the engine's pause does not wait for it, and the
                        // guest finds its request done when the write
                        // returns.
                        route.worker.serve_notify(queue);
                    }
                }
                Step::Stop => break,
            }
        }
    }

    /// An emulation failure the host quirks know how to complete.
    fn complete_emulation_gap(&mut self) -> bool {
        match self.quirks.clone() {
            Some(quirks) => quirks.complete_emulation_gap(&mut self.fd, self.index),
            None => false,
        }
    }

    /// After an I/O or MMIO exit the instruction completes only at the next
    /// `KVM_RUN`. Re-entering with `immediate_exit` set completes it and
    /// returns at once, so a parked vCPU's registers are consistent. Some
    /// instructions need more than one trip to user space (string PIO, an
    /// MMIO access split across pages): each further exit is served like
    /// any other, until `KVM_RUN` returns `EINTR` (nothing left pending).
    /// An exit that ends the vCPU is returned for the caller to act on.
    fn complete_pending_io(&mut self) -> Result<(), Conclusion> {
        let (fd, index, buses, stats) = (&mut self.fd, self.index, &self.buses, &self.stats);
        drain_pending_exits(stats, || {
            fd.set_kvm_immediate_exit(1);
            match fd.run() {
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    Trip::Interrupted
                }
                // A notify seen here is served by the event loop: the bus
                // write signalled the queue's eventfd, and this thread is
                // about to park for someone else's pause.
                result => Trip::Exit(dispatch(index, buses, stats, result)),
            }
        })
    }

    fn crash(&self, reason: String) -> Step {
        log::error!("vcpu {}: {reason}", self.index);
        self.outcome.report(VmOutcome::Crash {
            vcpu: Some(self.index),
            reason,
        });
        Step::Stop
    }

    fn rip(&self) -> u64 {
        self.fd.get_regs().map(|r| r.rip).unwrap_or(u64::MAX)
    }

    /// Acts on an exit that ends this vCPU's loop.
    fn conclude(&mut self, exit: Conclusion) -> Step {
        let index = self.index;
        match exit {
            Conclusion::GuestExit(status) => {
                log::info!("vcpu {index}: guest exit with status {status}");
                self.outcome.report(VmOutcome::GuestExit {
                    status,
                    vcpu: index,
                });
                Step::Stop
            }
            Conclusion::Halt if self.irqchip => {
                // Idle, not finished: back into KVM_RUN, which waits in the
                // kernel for the next interrupt.
                Step::Continue {
                    io: false,
                    notify: None,
                }
            }
            Conclusion::Halt => {
                // No interrupt controller: nothing can wake a halted vCPU.
                // Its thread stays, like an idle CPU's, so pauses and flush
                // work still reach it (the flush runs on every vCPU's core).
                log::info!("vcpu {index}: halted at rip {:#x}", self.rip());
                let halted = self.halted.fetch_add(1, Ordering::SeqCst) + 1;
                if halted as usize == self.control.count() {
                    self.outcome.report(VmOutcome::Crash {
                        vcpu: None,
                        reason: "every vCPU halted without a verdict on the exit port".into(),
                    });
                }
                self.control.halted(index);
                Step::Stop
            }
            Conclusion::Shutdown => {
                let rip = self.rip();
                self.crash(format!(
                    "triple fault (KVM_EXIT_SHUTDOWN) at rip {rip:#x}: the guest took an exception it could not deliver (no usable IDT, TSS or stack)"
                ))
            }
            Conclusion::FailEntry(reason, cpu) => self.crash(format!(
                "KVM_EXIT_FAIL_ENTRY: hardware entry failure reason {reason:#x} on host cpu {cpu}"
            )),
            Conclusion::InternalError => {
                // SAFETY: for KVM_EXIT_INTERNAL_ERROR the kernel fills the
                // `internal` member of the exit union.
                let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
                let rip = self.rip();
                let data = &internal.data[..(internal.ndata as usize).min(internal.data.len())];
                self.crash(format!(
                    "KVM_EXIT_INTERNAL_ERROR suberror {} ({}) at rip {rip:#x}, data {data:x?}",
                    internal.suberror,
                    internal_error_name(internal.suberror)
                ))
            }
            Conclusion::Failed(reason) => self.crash(reason),
        }
    }
}

/// Handles one `KVM_RUN` result. I/O goes to the buses here; whatever ends
/// the vCPU's loop is returned as a [`Conclusion`], to be acted on once the
/// exit's borrow of the `kvm_run` page is over.
fn dispatch(
    index: usize,
    buses: &IoBuses,
    stats: &VcpuStats,
    result: Result<VcpuExit<'_>, vmm_sys_util::errno::Error>,
) -> Result<Step, Conclusion> {
    let exit = match result {
        Ok(exit) => exit,
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
            return Ok(Step::Continue {
                io: false,
                notify: None,
            })
        }
        Err(e) => return Err(Conclusion::Failed(format!("KVM_RUN failed: {e}"))),
    };
    let unclaimed = |kind: &str, addr: u64, len: usize| {
        let n = stats.unclaimed_accesses.fetch_add(1, Ordering::Relaxed);
        if n < 10 || n % UNCLAIMED_LOG_EVERY == 0 {
            log::warn!(
                "vcpu {index}: {kind} of {len} bytes at {addr:#x} claimed by no device (reads as all-ones); {} so far",
                n + 1
            );
        }
    };
    match exit {
        VcpuExit::IoOut(port, data) if port == EXIT_PORT => {
            let mut raw = [0u8; 4];
            let n = data.len().min(4);
            raw[..n].copy_from_slice(&data[..n]);
            Err(Conclusion::GuestExit(u32::from_le_bytes(raw)))
        }
        VcpuExit::IoOut(port, data) => {
            if !buses.pio.write(u64::from(port), data) {
                unclaimed("port write", u64::from(port), data.len());
            }
            Ok(Step::Continue {
                io: true,
                notify: None,
            })
        }
        VcpuExit::IoIn(port, data) => {
            if !buses.pio.read(u64::from(port), data) {
                data.fill(0xff);
                unclaimed("port read", u64::from(port), data.len());
            }
            Ok(Step::Continue {
                io: true,
                notify: None,
            })
        }
        VcpuExit::MmioRead(addr, data) => {
            if !buses.mmio.read(addr, data) {
                data.fill(0xff);
                unclaimed("MMIO read", addr, data.len());
            }
            Ok(Step::Continue {
                io: true,
                notify: None,
            })
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !buses.mmio.write(addr, data) {
                unclaimed("MMIO write", addr, data.len());
            }
            let notify = buses
                .notify
                .as_ref()
                .filter(|route| route.addr == addr && data.len() == 4)
                .map(|_| u32::from_le_bytes([data[0], data[1], data[2], data[3]]));
            Ok(Step::Continue { io: true, notify })
        }
        VcpuExit::Hlt => Err(Conclusion::Halt),
        VcpuExit::Shutdown => Err(Conclusion::Shutdown),
        VcpuExit::FailEntry(reason, cpu) => Err(Conclusion::FailEntry(reason, cpu)),
        VcpuExit::InternalError => Err(Conclusion::InternalError),
        other => Err(Conclusion::Failed(format!("unexpected exit {other:?}"))),
    }
}

/// One re-entry of `KVM_RUN` with `immediate_exit` set, while completing a
/// pending exit.
enum Trip {
    /// `EINTR`: nothing was pending any more.
    Interrupted,
    /// Another exit, already dispatched.
    Exit(Result<Step, Conclusion>),
}

/// The loop of [`Vcpu::complete_pending_io`], apart from KVM so that it can
/// be tested: re-enter until `KVM_RUN` says nothing is pending, serving every
/// exit on the way (an instruction may need several: string PIO, an MMIO
/// access split across pages). An exit that ends the vCPU is returned.
fn drain_pending_exits(
    stats: &VcpuStats,
    mut trip: impl FnMut() -> Trip,
) -> Result<(), Conclusion> {
    // A guest cannot keep this going: each round trip advances one
    // instruction's pending I/O; the bound only guards against a host that
    // never returns EINTR.
    const MAX_TRIPS: usize = 4096;
    for _ in 0..MAX_TRIPS {
        match trip() {
            Trip::Interrupted => return Ok(()),
            Trip::Exit(step) => {
                stats.pending_io_trips.fetch_add(1, Ordering::Relaxed);
                match step? {
                    Step::Continue { .. } => {}
                    Step::Stop => return Ok(()),
                }
            }
        }
    }
    Err(Conclusion::Failed(format!(
        "completing a pending exit took more than {MAX_TRIPS} trips to user space"
    )))
}

/// An exit after which this vCPU does not run again.
enum Conclusion {
    GuestExit(u32),
    Halt,
    Shutdown,
    FailEntry(u64, u32),
    InternalError,
    Failed(String),
}

enum Step {
    /// Keep running; `io` is true after an I/O or MMIO exit, `notify` names
    /// the queue of a cache-flush QueueNotify this thread serves.
    Continue { io: bool, notify: Option<u32> },
    /// Leave the loop.
    Stop,
}

fn internal_error_name(suberror: u32) -> &'static str {
    match suberror {
        1 => "instruction emulation failed",
        2 => "simultaneous exceptions",
        3 => "delivery event failed",
        4 => "unexpected exit reason",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A scripted `KVM_RUN`: each call takes the next trip.
    fn script(trips: Vec<Trip>) -> (impl FnMut() -> Trip, Arc<AtomicU64>) {
        let taken = Arc::new(AtomicU64::new(0));
        let counter = taken.clone();
        let mut trips = trips.into_iter();
        let trip = move || {
            counter.fetch_add(1, Ordering::SeqCst);
            trips.next().expect("re-entered after EINTR")
        };
        (trip, taken)
    }

    fn io() -> Trip {
        Trip::Exit(Ok(Step::Continue {
            io: true,
            notify: None,
        }))
    }

    #[test]
    fn a_second_exit_while_completing_a_pending_one_is_served_not_dropped() {
        // A string PIO that needs two more trips to user space before
        // KVM_RUN returns EINTR: both are served (the VMM used to re-enter
        // once and drop the second exit with a warning).
        let stats = VcpuStats::default();
        let (trip, taken) = script(vec![io(), io(), Trip::Interrupted]);
        assert!(drain_pending_exits(&stats, trip).is_ok());
        assert_eq!(taken.load(Ordering::SeqCst), 3);
        assert_eq!(stats.pending_io_trips.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn an_exit_that_ends_the_vcpu_while_completing_is_returned() {
        let stats = VcpuStats::default();
        let (trip, taken) = script(vec![io(), Trip::Exit(Err(Conclusion::GuestExit(7)))]);
        assert!(matches!(
            drain_pending_exits(&stats, trip),
            Err(Conclusion::GuestExit(7))
        ));
        assert_eq!(taken.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_host_that_never_says_eintr_is_a_bounded_failure() {
        let stats = VcpuStats::default();
        let result = drain_pending_exits(&stats, io);
        assert!(matches!(result, Err(Conclusion::Failed(_))));
    }

    #[test]
    fn a_panicking_vcpu_thread_unregisters_and_is_reported() {
        control::install_kick_handler().unwrap();
        let control = VcpuControl::new(1);
        let outcome = OutcomeSink::new().unwrap();
        // Stands in for the kvm_run page: it outlives the thread here, so the
        // test can see whether anything wrote through the stale pointer.
        let immediate_exit = Arc::new(std::sync::atomic::AtomicU8::new(0));
        let thread = {
            let (control, outcome, byte) =
                (control.clone(), outcome.clone(), immediate_exit.clone());
            std::thread::spawn(move || {
                // SAFETY: the byte outlives the call (the test holds an Arc).
                unsafe {
                    run_registered(&control, &outcome, 0, byte.as_ptr(), || {
                        panic!("boom (expected in this test)")
                    })
                }
            })
        };
        thread
            .join()
            .expect("the panic was contained in the thread");
        assert_eq!(control.run_state(0), RunState::Exited);
        assert!(
            matches!(outcome.outcome(), Some(VmOutcome::VcpuPanicked { vcpu: 0, message }) if message.contains("boom")),
            "{:?}",
            outcome.outcome()
        );
        // A later pause neither waits for the dead thread nor kicks it.
        let pause = control
            .pause_all(Duration::from_millis(100))
            .expect("pause");
        assert!(pause.parked().is_empty());
        drop(pause);
        assert_eq!(
            immediate_exit.load(Ordering::SeqCst),
            0,
            "kicked a thread that is gone"
        );
    }
}
