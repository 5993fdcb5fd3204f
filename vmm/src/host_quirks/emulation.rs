//! Instructions KVM's emulator cannot execute in guest ring 0 on hosts that
//! interpret it, and which the VMM completes itself: INT3 (delivered as the
//! #BP trap it is) and FWAIT (a no-op when no x87 exception is pending, which
//! Linux never leaves pending). Anything else stays an emulation failure.
//!
//! KVM reports such an instruction as `KVM_EXIT_INTERNAL_ERROR` with
//! suberror `KVM_INTERNAL_ERROR_EMULATION` and, when it has them, the
//! instruction bytes; only exits that carry the bytes are fixed.

use std::sync::atomic::{AtomicU64, Ordering};

use kvm_bindings::{
    KVM_INTERNAL_ERROR_EMULATION, KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
    KVM_VCPUEVENT_VALID_PAYLOAD,
};
use kvm_ioctls::VcpuFd;

/// Errors of completing an instruction for the guest.
#[derive(Debug, thiserror::Error)]
pub enum EmulationError {
    /// A KVM call failed.
    #[error("KVM {what} failed while completing {insn} for the guest")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// Which instruction.
        insn: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// An instruction the VMM completes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gap {
    /// `int3` (0xcc): deliver #BP with RIP after the instruction.
    Int3,
    /// `fwait` (0x9b): step over it.
    Fwait,
}

impl Gap {
    fn name(self) -> &'static str {
        match self {
            Gap::Int3 => "INT3",
            Gap::Fwait => "FWAIT",
        }
    }
}

/// Which gap the instruction at RIP is, from its bytes.
pub fn classify(insn: &[u8]) -> Option<Gap> {
    match insn.first() {
        Some(0xcc) => Some(Gap::Int3),
        Some(0x9b) => Some(Gap::Fwait),
        _ => None,
    }
}

const BP_VECTOR: u8 = 3;

/// Counts of the instructions completed, for the log.
#[derive(Debug, Default)]
pub struct EmulationGaps {
    int3: AtomicU64,
    fwait: AtomicU64,
}

impl EmulationGaps {
    /// After an internal-error exit: completes the instruction if it is a
    /// known gap and returns which; `None` leaves the exit a failure.
    pub fn try_complete(
        &self,
        fd: &mut VcpuFd,
        vcpu: usize,
    ) -> Result<Option<Gap>, EmulationError> {
        let Some(gap) = classify(&failed_instruction(fd)) else {
            return Ok(None);
        };
        let kvm = |what, source| EmulationError::Kvm {
            what,
            insn: gap.name(),
            source,
        };
        let mut regs = fd.get_regs().map_err(|e| kvm("KVM_GET_REGS", e))?;
        let rip = regs.rip;
        regs.rip = rip.wrapping_add(1);
        fd.set_regs(&regs).map_err(|e| kvm("KVM_SET_REGS", e))?;
        if gap == Gap::Int3 {
            // #BP is a trap: the frame's RIP is the byte after the INT3, as
            // the kernel's do_int3 expects (it looks at RIP - 1).
            let mut events = fd
                .get_vcpu_events()
                .map_err(|e| kvm("KVM_GET_VCPU_EVENTS", e))?;
            events.exception.injected = 1;
            events.exception.nr = BP_VECTOR;
            events.exception.has_error_code = 0;
            events.exception.pending = 0;
            events.exception.error_code = 0;
            events.flags &= !KVM_VCPUEVENT_VALID_PAYLOAD;
            fd.set_vcpu_events(&events)
                .map_err(|e| kvm("KVM_SET_VCPU_EVENTS", e))?;
        }
        let counter = match gap {
            Gap::Int3 => &self.int3,
            Gap::Fwait => &self.fwait,
        };
        if counter.fetch_add(1, Ordering::Relaxed) == 0 {
            log::info!(
                "host quirk: vcpu {vcpu}: the emulator cannot execute {} at {rip:#x}; the VMM completes it (logged once)",
                gap.name()
            );
        }
        Ok(Some(gap))
    }

    /// (INT3s delivered, FWAITs skipped).
    pub fn counts(&self) -> (u64, u64) {
        (
            self.int3.load(Ordering::Relaxed),
            self.fwait.load(Ordering::Relaxed),
        )
    }
}

/// The instruction bytes of the last emulation failure, if KVM gave them.
fn failed_instruction(fd: &mut VcpuFd) -> Vec<u8> {
    let run = fd.get_kvm_run();
    // SAFETY: called only after KVM_EXIT_INTERNAL_ERROR, for which KVM fills
    // the `internal`/`emulation_failure` member of the exit union; both are
    // plain integers, so any content is a valid value.
    let failure = unsafe { run.__bindgen_anon_1.emulation_failure };
    if failure.suberror != KVM_INTERNAL_ERROR_EMULATION
        || failure.ndata < 3
        || failure.flags & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) == 0
    {
        return Vec::new();
    }
    // SAFETY: the flag above says the union holds instruction bytes; they
    // are plain bytes.
    let bytes = unsafe { failure.__bindgen_anon_1.__bindgen_anon_1 };
    let n = usize::from(bytes.insn_size).min(bytes.insn_bytes.len());
    bytes.insn_bytes[..n].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_only_int3_and_fwait() {
        assert_eq!(classify(&[0xcc]), Some(Gap::Int3));
        assert_eq!(classify(&[0x9b, 0x90]), Some(Gap::Fwait));
        assert_eq!(classify(&[0xcd, 0x03]), None, "INT imm8 is not INT3");
        assert_eq!(classify(&[0x0f, 0x01, 0xca]), None, "CLAC is not fixed");
        assert_eq!(classify(&[]), None);
    }
}
