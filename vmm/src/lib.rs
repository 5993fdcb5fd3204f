//! A small KVM VMM on the rust-vmm crates, built around a paravirtual
//! cache-flush service.
//!
//! * [`alias`]: a second host mapping of guest RAM (hand-off tests).
//! * [`audit`]: the dirty-page audit (guest writes not covered by a flush).
//! * [`memory`]: guest RAM (memfd-backed, lazily allocated) and its layout.
//! * [`loader`]: ELF kernel validation and loading.
//! * [`boot`]: boot information block, GDT, page tables, initial registers.
//! * [`vcpu`]: vCPU threads and their exit handling; [`vcpu::control`] pauses
//!   and releases them.
//! * [`flush_engine`]: the pause-all flush engine behind the cache-flush
//!   device (its own crate, `devices/flush-engine`, instantiated here).
//! * [`metrics`]: `--metrics` JSON.
//! * [`linux`]: booting a stock Linux kernel (bzImage or vmlinux, ACPI,
//!   console watch).
//! * [`host_quirks`]: work-arounds for hosts whose KVM interprets guest
//!   ring 0, for Linux guests only.
//! * [`vm`]: puts it all together and runs the control loop.
//!
//! The benchmark and the host-side Flush+Reload probe are tools built on this
//! library, not part of it: the `vmm-tools` crate (`tools/`).
#![deny(missing_docs)]

pub mod alias;
pub mod audit;
pub mod boot;
/// The flush engine (crate `flush-engine`), as this VMM instantiates it: its
/// vCPU control channel implements the engine's pause traits
/// ([`vcpu::control`]), over guest memory held in an `Arc`.
pub mod flush_engine {
    pub use ::flush_engine::*;

    /// The engine over this VMM's vCPUs and guest memory.
    pub type FlushEngine = ::flush_engine::FlushEngine<
        crate::vcpu::control::VcpuControl,
        std::sync::Arc<vm_memory::GuestMemoryMmap>,
    >;
}
pub mod host_quirks;
pub mod linux;
pub mod loader;
pub mod memory;
pub mod metrics;
pub mod vcpu;
pub mod vm;

/// The guest kernel bundled with the VMM (built from `guest-driver/kernel`).
pub const BUNDLED_GUEST_KERNEL: &[u8] = include_bytes!(env!("BUNDLED_GUEST_KERNEL"));

/// The VMM's process exit codes.
pub mod exit_code {
    /// The guest reported success (status 0 on the exit port).
    pub const GUEST_SUCCESS: i32 = 0;
    /// The guest reported failure (a non-zero status on the exit port).
    pub const GUEST_FAILURE: i32 = 1;
    /// Bad command-line usage (clap's own code).
    pub const USAGE: i32 = 2;
    /// The VM could not be set up: bad kernel, bad flag value, no KVM, ...
    pub const SETUP_ERROR: i32 = 3;
    /// The VM ended abnormally: triple fault, emulation failure, failed
    /// entry, every vCPU halted without a verdict, a vCPU thread that
    /// panicked, or a VMM runtime error.
    pub const VM_CRASH: i32 = 4;
    /// Stopped by SIGINT or SIGTERM: 128 + the signal number (130, 143), as
    /// shells report it.
    pub const SIGNAL_BASE: i32 = 128;
}

use vcpu::VmOutcome;

/// An error and its sources as one line: "outer: inner: innermost" (the
/// `error:` lines of the binaries, and log lines).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// The process exit code for an outcome.
pub fn exit_code_for(outcome: &VmOutcome) -> i32 {
    match outcome {
        VmOutcome::GuestExit { status: 0, .. } => exit_code::GUEST_SUCCESS,
        VmOutcome::GuestExit { .. } => exit_code::GUEST_FAILURE,
        VmOutcome::Crash { .. } | VmOutcome::VcpuPanicked { .. } => exit_code::VM_CRASH,
        VmOutcome::Signal(signo) => exit_code::SIGNAL_BASE + signo,
    }
}
