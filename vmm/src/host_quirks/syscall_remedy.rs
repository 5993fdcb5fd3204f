//! The ring-3 `syscall` remedy, for hosts that interpret guest ring 0.
//!
//! **What is wrong there**: a `syscall` executed in guest ring 3 jumps to
//! LSTAR with RCX/R11 set as it should, but the vCPU stays in ring 3. Linux's
//! entry code lives on supervisor-only pages, so fetching it faults: a #PF
//! from ring 3 with RIP == LSTAR, and `/init` dies on its first system call.
//! `sysenter` and `int $0x80` raise #UD there; exceptions do reach guest
//! ring 0 correctly (`shared/reference/linux-on-this-host/NOTES.md`).
//!
//! **The remedy** turns exactly that #PF into the system call it should have
//! been. Once the kernel has finished booting (the console says "Run /init
//! as init process": the kernel's page tables and IDT are final), the VMM
//! 1. writes a 64-byte stub into a 2 MiB page it reserved in the e820 map,
//! 2. maps that page at [`STUB_VA`], an unused 2 MiB slot of the kernel-image
//!    range (PGD 511, PUD 510, PMD 255: shared by every process), supervisor
//!    and executable,
//! 3. points IDT vector 14 at the stub (one aligned 8-byte store: the old and
//!    the new handler share their upper 32 address bits).
//!
//! The stub: a #PF from ring 3 that is an instruction fetch at RIP == LSTAR
//! continues at LSTAR in ring 0 on the user's stack, which is the state a
//! real `syscall` leaves (RCX, R11, RAX and the masked RFLAGS are already
//! right; IF is 0 after the interrupt gate). Every other #PF goes on to the
//! kernel's own handler. The kernel image is not changed; one IDT entry and
//! one page-table entry are. Page-table isolation must be off
//! (`mitigations=off`): with it the stub would not be mapped in user page
//! tables' kernel half. Each system call costs a #PF detour on top of the
//! emulated entry and exit (~0.25 ms in all, NOTES.md).

use std::sync::atomic::{AtomicU8, Ordering};

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Size of the page the VMM reserves for the stub (one 2 MiB mapping).
pub const STUB_PAGE_SIZE: u64 = 2 << 20;
/// Where the stub is mapped in the guest: PGD 511, PUD 510, PMD 255.
pub const STUB_VA: u64 = 0xffff_ffff_9fe0_0000;
const PGD_INDEX: u64 = 511;
const PUD_INDEX: u64 = 510;
const PMD_INDEX: u64 = 255;

/// The stub (GNU as, AT&T syntax; the two quadwords at 0x30 and 0x38 are
/// filled in by the VMM):
///
/// ```text
/// 00: testb $3, 16(%rsp)       # CS of the frame: from ring 3?
///     jz    kernel
///     testb $0x10, (%rsp)      # error code: an instruction fetch?
///     jz    kernel
///     push  %rax
///     movq  lstar(%rip), %rax
///     cmpq  %rax, 16(%rsp)     # RIP of the frame == LSTAR?
///     pop   %rax
///     jne   kernel
///     movq  32(%rsp), %rsp     # the user's RSP, as `syscall` leaves it
///     cld
///     jmp   *lstar(%rip)       # entry_SYSCALL_64, now in ring 0
/// kernel:
///     jmp   *old_pf(%rip)      # the kernel's own #PF handler
/// 30: lstar:  .quad MSR_LSTAR
/// 38: old_pf: .quad the old vector-14 handler
/// ```
const STUB: [u8; 48] = [
    0xf6, 0x44, 0x24, 0x10, 0x03, 0x74, 0x22, 0xf6, 0x04, 0x24, 0x10, 0x74, 0x1c, 0x50, 0x48, 0x8b,
    0x05, 0x1b, 0x00, 0x00, 0x00, 0x48, 0x39, 0x44, 0x24, 0x10, 0x58, 0x75, 0x0c, 0x48, 0x8b, 0x64,
    0x24, 0x20, 0xfc, 0xff, 0x25, 0x07, 0x00, 0x00, 0x00, 0xff, 0x25, 0x09, 0x00, 0x00, 0x00, 0x90,
];
const STUB_LSTAR_OFFSET: u64 = 0x30;
const STUB_OLD_PF_OFFSET: u64 = 0x38;

const MSR_LSTAR: u32 = 0xc000_0082;
const PF_VECTOR: u64 = 14;
const IDT_ENTRY_SIZE: u64 = 16;
const ADDRESS_MASK: u64 = 0x000f_ffff_ffff_f000;
const PTE_PRESENT: u64 = 1 << 0;
const PTE_ACCESSED: u64 = 1 << 5;
const PTE_DIRTY: u64 = 1 << 6;
const PTE_LARGE: u64 = 1 << 7;
const PTE_GLOBAL: u64 = 1 << 8;

/// Why the remedy could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum RemedyError {
    /// A KVM call failed.
    #[error("KVM {what} failed")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The guest's state is not what the remedy knows how to patch.
    #[error("{0}")]
    Unexpected(String),
    /// Guest memory could not be read or written.
    #[error("guest memory access at {0:#x} failed")]
    Memory(u64, #[source] vm_memory::GuestMemoryError),
}

const PENDING: u8 = 0;
const ARMED: u8 = 1;
const DONE: u8 = 2;

/// The remedy for one VM.
#[derive(Debug)]
pub struct SyscallRemedy {
    memory: GuestMemoryMmap,
    stub_gpa: u64,
    state: AtomicU8,
}

impl SyscallRemedy {
    /// A remedy whose stub goes to `stub_gpa` (2 MiB aligned, inside RAM,
    /// reserved in the guest's e820 map).
    pub fn new(memory: GuestMemoryMmap, stub_gpa: u64) -> Self {
        Self {
            memory,
            stub_gpa,
            state: AtomicU8::new(PENDING),
        }
    }

    /// The guest-physical range to reserve in the e820 map.
    pub fn reserved(&self) -> (u64, u64) {
        (self.stub_gpa, STUB_PAGE_SIZE)
    }

    /// The kernel has finished booting: install at the next chance.
    pub fn arm(&self) {
        let _ = self
            .state
            .compare_exchange(PENDING, ARMED, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Installs the remedy if it is armed and not installed yet. Called by a
    /// vCPU thread after an exit, with its own vCPU (whose registers say
    /// where the IDT and the page tables are).
    pub fn install_if_armed(&self, fd: &VcpuFd, vcpu: usize) {
        if self.state.load(Ordering::Relaxed) != ARMED
            || self
                .state
                .compare_exchange(ARMED, DONE, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
        {
            return;
        }
        match self.install(fd) {
            Ok(report) => log::info!("host quirk: vcpu {vcpu}: ring-3 syscall remedy installed: {report}"),
            Err(e) => log::error!(
                "host quirk: cannot install the ring-3 syscall remedy ({}); the guest's system calls will fault",
                crate::error_chain(&e)
            ),
        }
    }

    /// Whether the remedy is in place.
    pub fn installed(&self) -> bool {
        self.state.load(Ordering::SeqCst) == DONE
    }

    fn read_u64(&self, gpa: u64) -> Result<u64, RemedyError> {
        self.memory
            .read_obj(GuestAddress(gpa))
            .map_err(|e| RemedyError::Memory(gpa, e))
    }

    fn install(&self, fd: &VcpuFd) -> Result<String, RemedyError> {
        let kvm = |what| move |source| RemedyError::Kvm { what, source };
        let sregs = fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
        let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: MSR_LSTAR,
            ..Default::default()
        }])
        .map_err(|_| RemedyError::Unexpected("cannot build an MSR list".into()))?;
        if fd.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))? != 1 {
            return Err(RemedyError::Unexpected("MSR_LSTAR cannot be read".into()));
        }
        let lstar = msrs.as_slice()[0].data;

        let entry_va = sregs.idt.base + PF_VECTOR * IDT_ENTRY_SIZE;
        let tr = fd.translate_gva(entry_va).map_err(kvm("KVM_TRANSLATE"))?;
        if tr.valid == 0 {
            return Err(RemedyError::Unexpected(format!(
                "the IDT entry at {entry_va:#x} is not mapped"
            )));
        }
        let entry_gpa = tr.physical_address;
        let low = self.read_u64(entry_gpa)?;
        let high = self.read_u64(entry_gpa + 8)?;
        let old_handler = (low & 0xffff) | ((low >> 48) << 16) | ((high & 0xffff_ffff) << 32);
        if old_handler >> 32 != STUB_VA >> 32 {
            return Err(RemedyError::Unexpected(format!(
                "the #PF handler {old_handler:#x} is not in the kernel's top 4 GiB"
            )));
        }

        let pgd = sregs.cr3 & ADDRESS_MASK;
        let table = |base: u64, index: u64, level: &str| -> Result<u64, RemedyError> {
            let e = self.read_u64(base + 8 * index)?;
            if e & PTE_PRESENT == 0 || e & PTE_LARGE != 0 {
                return Err(RemedyError::Unexpected(format!(
                    "{level} entry {index} is {e:#x}, not a present table"
                )));
            }
            Ok(e & ADDRESS_MASK)
        };
        let pud = table(pgd, PGD_INDEX, "PGD")?;
        let pmd = table(pud, PUD_INDEX, "PUD")?;
        let slot = pmd + 8 * PMD_INDEX;
        let current = self.read_u64(slot)?;
        if current & PTE_PRESENT != 0 {
            return Err(RemedyError::Unexpected(format!(
                "the PMD slot for {STUB_VA:#x} is in use ({current:#x})"
            )));
        }

        let write = |gpa: u64, bytes: &[u8]| {
            self.memory
                .write_slice(bytes, GuestAddress(gpa))
                .map_err(|e| RemedyError::Memory(gpa, e))
        };
        write(self.stub_gpa, &STUB)?;
        write(self.stub_gpa + STUB_LSTAR_OFFSET, &lstar.to_le_bytes())?;
        write(
            self.stub_gpa + STUB_OLD_PF_OFFSET,
            &old_handler.to_le_bytes(),
        )?;
        // Supervisor, read-only, executable (NX clear), 2 MiB, global.
        let pmd_entry =
            self.stub_gpa | PTE_PRESENT | PTE_ACCESSED | PTE_DIRTY | PTE_LARGE | PTE_GLOBAL;
        self.memory
            .store(pmd_entry, GuestAddress(slot), Ordering::SeqCst)
            .map_err(|e| RemedyError::Memory(slot, e))?;
        // Offset bits 0-15 and 16-31 of the handler are in the entry's first
        // quadword; bits 32-63 are the same for both handlers.
        let new_low =
            (low & 0x0000_ffff_ffff_0000) | (STUB_VA & 0xffff) | (((STUB_VA >> 16) & 0xffff) << 48);
        self.memory
            .store(new_low, GuestAddress(entry_gpa), Ordering::SeqCst)
            .map_err(|e| RemedyError::Memory(entry_gpa, e))?;
        Ok(format!(
            "IDT {:#x} vector 14 {old_handler:#x} -> stub at {STUB_VA:#x} (gpa {:#x}), LSTAR {lstar:#x}",
            sregs.idt.base, self.stub_gpa
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stub_va_is_the_slot_it_claims() {
        let va = STUB_VA;
        assert_eq!((va >> 39) & 0x1ff, PGD_INDEX);
        assert_eq!((va >> 30) & 0x1ff, PUD_INDEX);
        assert_eq!((va >> 21) & 0x1ff, PMD_INDEX);
        assert_eq!(va % STUB_PAGE_SIZE, 0);
    }

    #[test]
    fn stub_jumps_read_the_quadwords_they_name() {
        // `mov lstar(%rip), %rax` at 0x0e (7 bytes): disp32 at 0x11.
        let disp = |at: usize| i32::from_le_bytes(STUB[at..at + 4].try_into().unwrap()) as i64;
        assert_eq!(0x0e + 7 + disp(0x11), STUB_LSTAR_OFFSET as i64);
        // `jmp *lstar(%rip)` at 0x23 (6 bytes), `jmp *old_pf(%rip)` at 0x29.
        assert_eq!(0x23 + 6 + disp(0x25), STUB_LSTAR_OFFSET as i64);
        assert_eq!(0x29 + 6 + disp(0x2b), STUB_OLD_PF_OFFSET as i64);
        assert!(STUB.len() as u64 <= STUB_LSTAR_OFFSET);
    }
}
