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
}

/// Per-VM counters the vCPU threads keep.
#[derive(Default)]
pub struct VcpuStats {
    /// Accesses to addresses no device claims.
    pub unclaimed_accesses: AtomicU64,
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
        }
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
        // SAFETY: `immediate_exit` points into this VcpuFd's kvm_run mapping,
        // which lives until `self.fd` is dropped at the end of this function,
        // after `exited` below.
        unsafe { self.control.register(self.index, immediate_exit) };
        let mut pending_io = false;
        loop {
            match self.control.before_run(self.index) {
                Directive::Run => {}
                Directive::Finish => break,
                Directive::Park => {
                    if pending_io {
                        self.complete_pending_io();
                        pending_io = false;
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
                Err(Conclusion::InternalError) if self.complete_emulation_gap() => {
                    Step::Continue { io: false }
                }
                Err(conclusion) => self.conclude(conclusion),
            };
            if let Some(quirks) = &self.quirks {
                quirks.after_exit(&self.fd, self.index);
            }
            match step {
                Step::Continue { io } => pending_io = io,
                Step::Stop => break,
            }
        }
        self.control.exited(self.index);
    }

    /// An emulation failure the host quirks know how to complete.
    fn complete_emulation_gap(&mut self) -> bool {
        match self.quirks.clone() {
            Some(quirks) => quirks.complete_emulation_gap(&mut self.fd, self.index),
            None => false,
        }
    }

    /// After an I/O or MMIO exit the instruction completes only at the next
    /// `KVM_RUN`. Re-entering with `immediate_exit` still set completes it
    /// and returns at once, so a parked vCPU's registers are consistent.
    fn complete_pending_io(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => log::warn!("vcpu {}: completing a pending exit failed: {e}", self.index),
            Ok(exit) => log::warn!(
                "vcpu {}: unexpected exit while completing a pending exit: {exit:?}",
                self.index
            ),
        }
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
            return Ok(Step::Continue { io: false })
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
            Ok(Step::Continue { io: true })
        }
        VcpuExit::IoIn(port, data) => {
            if !buses.pio.read(u64::from(port), data) {
                data.fill(0xff);
                unclaimed("port read", u64::from(port), data.len());
            }
            Ok(Step::Continue { io: true })
        }
        VcpuExit::MmioRead(addr, data) => {
            if !buses.mmio.read(addr, data) {
                data.fill(0xff);
                unclaimed("MMIO read", addr, data.len());
            }
            Ok(Step::Continue { io: true })
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !buses.mmio.write(addr, data) {
                unclaimed("MMIO write", addr, data.len());
            }
            Ok(Step::Continue { io: true })
        }
        VcpuExit::Hlt => Err(Conclusion::Halt),
        VcpuExit::Shutdown => Err(Conclusion::Shutdown),
        VcpuExit::FailEntry(reason, cpu) => Err(Conclusion::FailEntry(reason, cpu)),
        VcpuExit::InternalError => Err(Conclusion::InternalError),
        other => Err(Conclusion::Failed(format!("unexpected exit {other:?}"))),
    }
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
    /// Keep running; `io` is true after an I/O or MMIO exit.
    Continue { io: bool },
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
