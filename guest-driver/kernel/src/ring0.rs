//! Everything that runs in ring 0, in assembly: the entry point `_start`, the
//! exception entry, and two services for ring 3 ([`wbinvd`], [`halt`]). It is
//! all the ring-0 code of the kernel.
//!
//! Why so little, and why assembly: on this project's hosts the software KVM
//! runs guest ring 3 natively but interprets guest ring 0 (~1 µs per
//! instruction, and AVX instructions there end the VM with an emulation
//! error). So ring 0 only sets up what the CPU needs to run ring 3 and to
//! deliver exceptions (GDT, TSS, IDT), then drops to ring 3 with `iretq`; no
//! compiler-generated code ever runs in ring 0.
//!
//! Cost, per vCPU: `_start` executes about 60 instructions plus 5 per IDT gate
//! (~220 in all, ~0.2 ms emulated; every vCPU writes the same IDT rather than
//! wait for vCPU 0, since waiting would be emulated too). An exception costs
//! about 30 instructions before the ring-3 reporter runs (#UD 5 more, for the
//! check below).
//!
//! The WBINVD service: ring 3 calls `guest_wbinvd_call`, whose `ud2` raises
//! #UD; the #UD entry checks whether the faulting RIP is that very `ud2` and
//! if so runs `wbinvd`, steps over the `ud2` and returns with `iretq` (seven
//! emulated instructions); any other #UD goes to the reporter as before. It
//! is the negative control of the `probe` scenario: the guest's own WBINVD,
//! which the software KVM completes without evicting anything. Why not a
//! DPL-3 gate and `int n`, or `syscall`: on the software KVM of our hosts
//! `int 0x81` from ring 3 raised #UD, and after `syscall` the `wbinvd` at
//! LSTAR raised #GP reported at CPL 3 — both measured; exceptions from ring 3
//! are delivered through the IDT faithfully.
//!
//! Memory (all in `.bss`, zero at start, indexed by the vCPU index):
//! * a [`Ring0Area`] of 4 KiB, aligned to its size: the vCPU index, a "fault
//!   being reported" flag, the vCPU's TSS with its I/O permission bitmap, and
//!   two small ring-0 stacks (the `rsp0` stack and the IST stack for #NMI, #DF
//!   and #MC). Any ring-0 stack pointer of a vCPU, rounded down to 4 KiB, finds
//!   its area, hence its index.
//! * a ring-3 stack of [`RING3_STACK_SIZE`] for the Rust code;
//! * a ring-3 stack of [`FAULT_STACK_SIZE`] for the exception reporter, fresh
//!   for every report, so a broken main stack can still be reported.
//!
//! Port I/O from ring 3: `_start` enters ring 3 with RFLAGS.IOPL = 3, which is
//! enough on hardware KVM, but the software KVM of our hosts does not carry
//! IOPL through `iretq` (ring 3 then runs with IOPL 0 and `out` raises #GP:
//! measured). It does honour the TSS's I/O permission bitmap, so each TSS has
//! one, all zero: ports `0..IO_PORTS` (the UART at 0x3f8, the exit port at
//! 0x500) are open to ring 3 either way.

use core::cell::UnsafeCell;
use core::mem::{offset_of, size_of};

use cache_flush_abi::boot::{gdt, EXIT_PORT, MAX_VCPUS, SERIAL_PORT};

use crate::status;

/// Most vCPUs the kernel supports (the VMM's limit).
pub const MAX_CPUS: usize = MAX_VCPUS as usize;
/// Bytes of each vCPU's ring-3 stack. The whole image (stacks included) must
/// fit below 4 MiB, the smallest guest the VMM creates.
pub const RING3_STACK_SIZE: usize = 32 * 1024;
/// Bytes of each vCPU's exception-reporter stack.
pub const FAULT_STACK_SIZE: usize = 8 * 1024;
/// Bytes (and alignment) of each vCPU's [`Ring0Area`].
const RING0_AREA_SIZE: usize = 4096;
/// Ring 3 may use ports `0..IO_PORTS` (the I/O permission bitmap's size).
const IO_PORTS: usize = 0x800;
/// Bytes of the I/O permission bitmap: one bit per port, 0 = allowed.
const IO_BITMAP_SIZE: usize = IO_PORTS / 8;
const _: () =
    assert!((SERIAL_PORT as usize) + 8 <= IO_PORTS && (EXIT_PORT as usize) + 4 <= IO_PORTS);
/// Offset in a [`Ring0Area`] of the top of the IST stack (IST1).
const IST_STACK_TOP: usize = 2048;
/// Number of exception vectors the IDT covers (the CPU's own, 0 to 31).
const VECTORS: usize = 32;
/// Distance between two exception stubs (see `guest_exception_stubs`).
const STUB_SIZE: usize = 16;
/// RFLAGS in ring 3: IOPL = 3 (ring 3 may use `in`/`out` for the UART and the
/// exit port; see the module documentation for why the TSS also has an I/O
/// bitmap), bit 1 (always set), interrupts off (there are none to take).
const USER_RFLAGS: u64 = 0x3002;
/// The first TSS descriptor's byte offset in the GDT (= its selector).
const FIRST_TSS_SELECTOR: usize = gdt::FIRST_FREE_ENTRY * 8;

/// A 64-bit task-state segment with an I/O permission bitmap; of the stack
/// pointers only `rsp0` and `ist1` are used.
#[repr(C, packed)]
struct Tss {
    reserved0: u32,
    /// Stack pointers loaded on a switch to rings 0, 1 and 2.
    rsp: [u64; 3],
    reserved1: u64,
    /// Interrupt stack table: stacks selected by an IDT gate's IST field.
    ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    /// Offset of the I/O permission bitmap from the TSS base.
    iomap_base: u16,
    /// The I/O permission bitmap (all zero: every port in it is allowed).
    io_bitmap: [u8; IO_BITMAP_SIZE],
}
/// Size of the architectural part of the TSS, where the bitmap starts.
const TSS_HEADER_SIZE: usize = offset_of!(Tss, io_bitmap);
const _: () = assert!(TSS_HEADER_SIZE == 104);
/// The TSS descriptor's limit: the header and the bitmap.
const TSS_LIMIT: usize = size_of::<Tss>() - 1;
/// TSS descriptor, low half, without the base: limit[15:0], type 9
/// (available 64-bit TSS), present. (The limit fits in 16 bits.)
const TSS_DESCRIPTOR_BITS: u64 = 0x0000_8900_0000_0000 | TSS_LIMIT as u64;
const _: () = assert!(TSS_LIMIT < 0x1_0000);

/// One vCPU's ring-0 state. Only the assembly touches it.
#[repr(C, align(4096))]
struct Ring0Area {
    /// This vCPU's index, written by `_start`.
    vcpu: u64,
    /// Non-zero while the ring-3 reporter handles an exception of this vCPU:
    /// another exception then stops the VM from ring 0.
    in_fault: u64,
    tss: Tss,
    /// The IST stack (growing down from [`IST_STACK_TOP`]), then the `rsp0`
    /// stack (growing down from the end of the area).
    stacks: [u8; RING0_AREA_SIZE - 16 - size_of::<Tss>()],
}
const _: () = assert!(size_of::<Ring0Area>() == RING0_AREA_SIZE);
// Room for a few exception frames on either stack.
const _: () = assert!(IST_STACK_TOP >= offset_of!(Ring0Area, stacks) + 512);
const _: () = assert!(RING0_AREA_SIZE >= IST_STACK_TOP + 512);

/// Memory written by ring 0 or by the CPU while Rust code may read it: every
/// access goes through raw pointers, never through references.
#[repr(C, align(64))]
struct Shared<T>(UnsafeCell<T>);
// SAFETY: Rust code never creates references into these statics; the
// assembly and the CPU write them, Rust only computes their addresses.
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    /// Address of the first byte.
    fn addr(&self) -> usize {
        self.0.get() as usize
    }
}

/// Number of GDT entries: the five of `cache_flush_abi::boot::gdt`, then one
/// 16-byte TSS descriptor per vCPU.
const GDT_ENTRIES: usize = gdt::FIRST_FREE_ENTRY + 2 * MAX_CPUS;

/// Our own GDT, with the selectors of `cache_flush_abi::boot::gdt` (the VMM's
/// has the same first five entries) and room for a TSS descriptor per vCPU.
/// Loading our own keeps the kernel independent of the size of the VMM's.
/// The accessed bits are preset so the CPU never writes these entries.
static GDT: Shared<[u64; GDT_ENTRIES]> = Shared(UnsafeCell::new({
    let mut table = [0u64; GDT_ENTRIES];
    table[gdt::KERNEL_CODE as usize / 8] = 0x00af_9b00_0000_ffff; // 64-bit code, DPL 0
    table[gdt::KERNEL_DATA as usize / 8] = 0x00cf_9300_0000_ffff; // data, DPL 0
    table[gdt::USER_DATA as usize / 8] = 0x00cf_f300_0000_ffff; // data, DPL 3
    table[gdt::USER_CODE as usize / 8] = 0x00af_fb00_0000_ffff; // 64-bit code, DPL 3
    table
}));
/// The IDT: 16-byte gates for vectors 0 to 31, written by `_start`.
static IDT: Shared<[u64; 2 * VECTORS]> = Shared(UnsafeCell::new([0; 2 * VECTORS]));
/// Per vCPU: index, fault flag, TSS, ring-0 stacks (see [`Ring0Area`]).
static RING0_AREAS: Shared<[Ring0Area; MAX_CPUS]> = Shared(UnsafeCell::new(
    // SAFETY: `Ring0Area` is plain integers; all zeros is a valid value.
    unsafe { core::mem::zeroed() },
));
/// Per vCPU: the stack the Rust code starts on in ring 3.
static RING3_STACKS: Shared<[[u8; RING3_STACK_SIZE]; MAX_CPUS]> =
    Shared(UnsafeCell::new([[0; RING3_STACK_SIZE]; MAX_CPUS]));
/// Per vCPU: the ring-3 stack of the exception reporter.
static FAULT_STACKS: Shared<[[u8; FAULT_STACK_SIZE]; MAX_CPUS]> =
    Shared(UnsafeCell::new([[0; FAULT_STACK_SIZE]; MAX_CPUS]));

/// The index of the vCPU running this code, found from the stack pointer (the
/// ring-3 stacks are per-vCPU slots of one array). `None` on an unknown stack.
/// This is how the panic handler knows its vCPU without thread-local storage.
pub fn current_vcpu() -> Option<u32> {
    let sp: usize;
    // SAFETY: reads the stack pointer into a register; no memory access.
    unsafe {
        core::arch::asm!("mov {}, rsp", out(reg) sp, options(nomem, nostack, preserves_flags));
    }
    let slot = |base: usize, size: usize| {
        let index = sp.checked_sub(base)? / size;
        (index < MAX_CPUS).then_some(index as u32)
    };
    slot(RING3_STACKS.addr(), RING3_STACK_SIZE)
        .or_else(|| slot(FAULT_STACKS.addr(), FAULT_STACK_SIZE))
}

// The code. Conventions: Intel syntax; `{name}` operands are the constants and
// symbols listed at the end; numeric labels are local.
core::arch::global_asm!(
    // Pseudo-descriptors for `lgdt` and `lidt`: 16-bit limit, 64-bit base.
    ".section .data.ring0, \"aw\"",
    // (Padded so that each base is 8-byte aligned.)
    ".balign 8",
    ".word 0, 0, 0",
    "guest_gdtr:",
    ".word {gdt_size} - 1",
    ".quad {gdt}",
    ".word 0, 0, 0",
    "guest_idtr:",
    ".word {vectors} * 16 - 1",
    ".quad {idt}",
    // Printed by ring 0 when the exception reporter itself faults.
    "guest_nested_fault_message:",
    ".asciz \"guest: exception while reporting an exception; vector, error, rip, cs, rflags, rsp, ss:\"",

    ".section .text.ring0, \"ax\"",

    // ---- _start: every vCPU, 64-bit mode, CPL 0, interrupts off, RSP = 0.
    // rdi = vCPU index, rsi = boot information block: both are passed on
    // untouched to the ring-3 entry (the first two arguments of the C ABI).
    ".global _start",
    "_start:",
    "    cmp rdi, {max_cpus}",
    "    jae 90f",                                 // index out of range: stop
    // rbx = this vCPU's ring-0 area; its end is the ring-0 stack top.
    "    mov rbx, rdi",
    "    shl rbx, 12",                             // * RING0_AREA_SIZE
    "    lea rax, [rip + {ring0_areas}]",
    "    add rbx, rax",
    "    lea rsp, [rbx + {ring0_area_size}]",
    "    mov [rbx + {area_vcpu}], rdi",            // for the exception entry
    // TSS: rsp0 = top of the area, ist1 = the IST stack, the I/O bitmap
    // right after the 104-byte header (its content is already zero).
    "    mov [rbx + {area_tss} + 4], rsp",
    "    lea rax, [rbx + {ist_top}]",
    "    mov [rbx + {area_tss} + 36], rax",
    "    mov word ptr [rbx + {area_tss} + 102], {tss_header_size}",
    // Our GDT (same selectors as the VMM's one; CS and SS stay valid).
    "    lgdt [rip + guest_gdtr]",
    // TSS descriptor, low half: limit[15:0] in bits 0..15, base[23:0] in bits
    // 16..39, type 9 (available 64-bit TSS) and present in bits 40..47,
    // base[31:24] in bits 56..63. The high half (base[63:32]) stays 0: the
    // image is below 4 GiB (the linker script checks it).
    "    lea rax, [rbx + {area_tss}]",
    "    mov edx, eax",
    "    and edx, 0xffffff",
    "    shl rdx, 16",
    "    shr eax, 24",
    "    shl rax, 56",
    "    or rax, rdx",
    "    movabs rdx, {tss_descriptor_bits}",
    "    or rax, rdx",
    "    mov rcx, rdi",
    "    shl rcx, 4",                              // 16 bytes per descriptor
    "    add rcx, {first_tss}",                    // = this vCPU's TSS selector
    "    lea rdx, [rip + {gdt}]",
    "    mov [rdx + rcx], rax",
    "    ltr cx",
    // IDT: gate i points at stub i = guest_exception_stubs + 16 * i. Every
    // vCPU writes the same values, which is harmless and needs no waiting.
    // Gate, low half: offset[15:0], selector 0x08 in bits 16..31, type 0xE
    // (64-bit interrupt gate, DPL 0) and present in bits 40..47, offset[31:16]
    // in bits 48..63; high half: offset[63:32] = 0 (below 4 GiB). The stubs lie
    // in one 512-byte-aligned block, so from gate to gate only offset[15:0]
    // grows, by 16, without carry: the loop just adds 16.
    "    lea rax, [rip + guest_exception_stubs]",
    "    mov edx, eax",
    "    and edx, 0xffff0000",
    "    shl rdx, 32",                             // offset[31:16] -> bits 48..63
    "    and eax, 0xffff",                         // offset[15:0]
    "    or rax, rdx",
    "    movabs rdx, {gate_bits}",
    "    or rax, rdx",
    "    lea rdx, [rip + {idt}]",
    "    lea rcx, [rdx + {vectors} * 16]",
    "2:",
    "    mov [rdx], rax",
    "    add rax, {stub_size}",
    "    add rdx, 16",
    "    cmp rdx, rcx",
    "    jne 2b",
    // #NMI (2), #DF (8) and #MC (18) run on the IST1 stack (gate bits 32..34).
    "    lea rdx, [rip + {idt}]",
    "    mov byte ptr [rdx + 2 * 16 + 4], 1",
    "    mov byte ptr [rdx + 8 * 16 + 4], 1",
    "    mov byte ptr [rdx + 18 * 16 + 4], 1",
    // #UD (6) enters `guest_ud_entry` (the WBINVD service, see the module
    // documentation): offset[15:0] and offset[31:16] of its gate change.
    "    lea rax, [rip + guest_ud_entry]",
    "    mov word ptr [rdx + 6 * 16], ax",
    "    shr eax, 16",
    "    mov word ptr [rdx + 6 * 16 + 6], ax",
    "    lidt [rip + guest_idtr]",
    // Drop to ring 3: iretq pops RIP, CS, RFLAGS, RSP, SS. The ring-3 stack
    // starts 8 bytes below its top, as if `call` had pushed a (zero) return
    // address, so the C ABI's stack alignment holds at the entry.
    "    lea rax, [rdi + 1]",
    "    imul rax, rax, {ring3_stack_size}",
    "    lea rdx, [rip + {ring3_stacks} - 8]",
    "    add rax, rdx",
    "    push {user_data}",                        // SS
    "    push rax",                                // RSP
    "    push {user_rflags}",                      // RFLAGS (IOPL 3, see above)
    "    push {user_code}",                        // CS
    "    lea rax, [rip + {main}]",
    "    push rax",                                // RIP
    "    iretq",
    // Bad vCPU index: report it on the exit port and stop.
    "90:",
    "    mov eax, {status_bad_vcpu}",
    "    mov edx, {exit_port}",
    "    out dx, eax",
    "91:",
    "    hlt",
    "    jmp 91b",

    // ---- Exception stubs: one per vector, STUB_SIZE bytes apart (`.org`
    // fails the build if one outgrows its slot). Each pushes a dummy error
    // code where the CPU pushes none, then the vector number.
    ".macro EXCEPTION_STUB vector, has_error_code",
    "    .org guest_exception_stubs + \\vector * {stub_size}",
    "    .if \\has_error_code == 0",
    "    push 0",
    "    .endif",
    "    push \\vector",
    "    jmp guest_exception_common",
    ".endm",
    ".balign 512",
    "guest_exception_stubs:",
    "EXCEPTION_STUB 0, 0",                          // #DE
    "EXCEPTION_STUB 1, 0",                          // #DB
    "EXCEPTION_STUB 2, 0",                          // NMI
    "EXCEPTION_STUB 3, 0",                          // #BP
    "EXCEPTION_STUB 4, 0",                          // #OF
    "EXCEPTION_STUB 5, 0",                          // #BR
    "EXCEPTION_STUB 6, 0",                          // #UD
    "EXCEPTION_STUB 7, 0",                          // #NM
    "EXCEPTION_STUB 8, 1",                          // #DF (error code 0)
    "EXCEPTION_STUB 9, 0",                          // coprocessor segment overrun
    "EXCEPTION_STUB 10, 1",                         // #TS
    "EXCEPTION_STUB 11, 1",                         // #NP
    "EXCEPTION_STUB 12, 1",                         // #SS
    "EXCEPTION_STUB 13, 1",                         // #GP
    "EXCEPTION_STUB 14, 1",                         // #PF
    "EXCEPTION_STUB 15, 0",                         // reserved
    "EXCEPTION_STUB 16, 0",                         // #MF
    "EXCEPTION_STUB 17, 1",                         // #AC
    "EXCEPTION_STUB 18, 0",                         // #MC
    "EXCEPTION_STUB 19, 0",                         // #XM
    "EXCEPTION_STUB 20, 0",                         // #VE
    "EXCEPTION_STUB 21, 1",                         // #CP
    "EXCEPTION_STUB 22, 0",
    "EXCEPTION_STUB 23, 0",
    "EXCEPTION_STUB 24, 0",
    "EXCEPTION_STUB 25, 0",
    "EXCEPTION_STUB 26, 0",
    "EXCEPTION_STUB 27, 0",
    "EXCEPTION_STUB 28, 0",                         // #HV
    "EXCEPTION_STUB 29, 1",                         // #VC
    "EXCEPTION_STUB 30, 1",                         // #SX
    "EXCEPTION_STUB 31, 0",
    ".org guest_exception_stubs + {vectors} * {stub_size}",

    // ---- #UD: the WBINVD service if the fault is the `ud2` of
    // `guest_wbinvd_call`, the HALT service if it is the one of
    // `guest_halt_call`, else the ordinary stub. Stack: the CPU's frame
    // (RIP first; #UD pushes no error code). `pop` leaves the flags of the
    // `cmp` intact, and rax is restored before either way out.
    "guest_ud_entry:",
    "    push rax",
    "    lea rax, [rip + guest_wbinvd_site]",
    "    cmp [rsp + 8], rax",
    "    je 71f",
    "    lea rax, [rip + guest_halt_site]",
    "    cmp [rsp + 8], rax",
    "    pop rax",
    "    jne guest_exception_stubs + 6 * {stub_size}",
    // The HALT service: interrupts are off and there are none, so HLT exits
    // to the VMM, which never runs this vCPU again; halt again if it did.
    "72:",
    "    hlt",
    "    jmp 72b",
    "71:",
    "    pop rax",
    "    wbinvd",
    "    add qword ptr [rsp], 2",                  // past the 2-byte ud2
    "    iretq",

    // ---- Common exception path. Stack (rsp0 or IST1): vector, error code,
    // then the CPU's frame RIP, CS, RFLAGS, RSP, SS. Rewrites that frame so
    // that `iretq` enters the ring-3 reporter on this vCPU's fault stack with
    // (vcpu, vector, error, rip, cr2, rsp) in registers and cs on the stack
    // (the C ABI's first six arguments and the seventh).
    "guest_exception_common:",
    "    mov rax, rsp",
    "    and rax, -{ring0_area_size}",             // this vCPU's ring-0 area
    "    cmp qword ptr [rax + {area_in_fault}], 0",
    "    jne 80f",                                 // the reporter faulted
    "    mov qword ptr [rax + {area_in_fault}], 1",
    "    mov rdi, [rax + {area_vcpu}]",            // vcpu
    "    pop rsi",                                 // vector
    "    pop rdx",                                 // error code
    "    mov rcx, [rsp]",                          // rip
    "    mov r8, cr2",                             // cr2
    "    mov r9, [rsp + 24]",                      // rsp
    // r10 = the fault stack: [r10] = zero return address, [r10 + 8] = cs.
    "    lea r10, [rdi + 1]",
    "    imul r10, r10, {fault_stack_size}",
    "    lea rax, [rip + {fault_stacks} - 24]",
    "    add r10, rax",
    "    mov rax, [rsp + 8]",
    "    mov [r10 + 8], rax",                      // cs
    "    lea rax, [rip + {report}]",
    "    mov [rsp], rax",                          // RIP
    "    mov qword ptr [rsp + 8], {user_code}",    // CS
    "    mov qword ptr [rsp + 16], {user_rflags}", // RFLAGS
    "    mov [rsp + 24], r10",                     // RSP
    "    mov qword ptr [rsp + 32], {user_data}",   // SS
    "    iretq",
    // An exception while this vCPU reports one: print a fixed text and the
    // new exception's frame (vector, error code, RIP, CS, RFLAGS, RSP, SS; in
    // hex) from ring 0, and stop the VM rather than loop.
    "80:",
    "    lea rsi, [rip + guest_nested_fault_message]",
    "    mov edx, {serial_port}",
    "81:",
    "    mov al, [rsi]",
    "    test al, al",
    "    jz 82f",
    "    out dx, al",
    "    inc rsi",
    "    jmp 81b",
    "82:",
    "    xor esi, esi",                            // frame word index
    "84:",
    "    mov al, ' '",
    "    out dx, al",
    "    mov rbx, [rsp + rsi * 8]",
    "    mov ecx, 16",                             // hex digits
    "85:",
    "    rol rbx, 4",                              // next digit to bits 0..3
    "    mov eax, ebx",
    "    and eax, 15",
    "    add eax, '0'",
    "    cmp eax, '9'",
    "    jbe 86f",
    "    add eax, 'a' - '0' - 10",
    "86:",
    "    out dx, al",
    "    dec ecx",
    "    jnz 85b",
    "    inc esi",
    "    cmp esi, 7",
    "    jne 84b",
    "    mov al, 10",                              // newline
    "    out dx, al",
    "    mov eax, {status_nested}",
    "    mov edx, {exit_port}",
    "    out dx, eax",
    "83:",
    "    hlt",
    "    jmp 83b",

    max_cpus = const MAX_CPUS,
    ring0_area_size = const RING0_AREA_SIZE,
    area_vcpu = const offset_of!(Ring0Area, vcpu),
    area_in_fault = const offset_of!(Ring0Area, in_fault),
    area_tss = const offset_of!(Ring0Area, tss),
    ist_top = const IST_STACK_TOP,
    tss_header_size = const TSS_HEADER_SIZE,
    tss_descriptor_bits = const TSS_DESCRIPTOR_BITS,
    first_tss = const FIRST_TSS_SELECTOR,
    gdt_size = const GDT_ENTRIES * 8,
    vectors = const VECTORS,
    stub_size = const STUB_SIZE,
    // Selector 0x08, type 0xE (interrupt gate), DPL 0, present.
    gate_bits = const ((gdt::KERNEL_CODE as u64) << 16) | (0x8e << 40),
    ring3_stack_size = const RING3_STACK_SIZE,
    fault_stack_size = const FAULT_STACK_SIZE,
    user_code = const gdt::USER_CODE,
    user_data = const gdt::USER_DATA,
    user_rflags = const USER_RFLAGS,
    serial_port = const SERIAL_PORT,
    exit_port = const EXIT_PORT,
    status_bad_vcpu = const status::BAD_VCPU_INDEX,
    status_nested = const status::NESTED_EXCEPTION,
    gdt = sym GDT,
    idt = sym IDT,
    ring0_areas = sym RING0_AREAS,
    ring3_stacks = sym RING3_STACKS,
    fault_stacks = sym FAULT_STACKS,
    main = sym crate::guest_main,
    report = sym crate::fault::report_exception,
);

// Ring-3 side of the WBINVD service (ordinary code, C ABI, no arguments):
// the `ud2` is the one `guest_ud_entry` recognises.
core::arch::global_asm!(
    ".section .text.wbinvd, \"ax\"",
    ".global guest_wbinvd_call",
    ".type guest_wbinvd_call, @function",
    "guest_wbinvd_call:",
    "guest_wbinvd_site:",
    "    ud2",
    "    ret",
    ".global guest_halt_call",
    ".type guest_halt_call, @function",
    "guest_halt_call:",
    "guest_halt_site:",
    "    ud2",
    "    ud2", // never reached
);

extern "C" {
    /// See [`wbinvd`].
    fn guest_wbinvd_call();
    /// See [`halt`].
    fn guest_halt_call() -> !;
}

/// Halts this vCPU for good, from ring 3, through the #UD entry like
/// [`wbinvd`] (HLT is privileged): about ten emulated ring-0 instructions.
/// There are no interrupts, so nothing wakes it: the VMM keeps the vCPU's
/// thread asleep (it still takes part in pauses and flush work) until the VM
/// ends. This is how the kernel idles a vCPU without taking a host core.
pub fn halt() -> ! {
    // SAFETY: `guest_halt_call` takes no arguments and never returns: its
    // `ud2` enters the #UD entry, which halts (and halts again if resumed).
    unsafe { guest_halt_call() }
}

/// Executes the guest's own WBINVD (a privileged instruction) from ring 3,
/// through the #UD entry (see the module documentation): seven emulated
/// ring-0 instructions. On the project's software-KVM hosts it completes but
/// evicts nothing; it is the negative control of the `probe` scenario.
pub fn wbinvd() {
    // SAFETY: `guest_wbinvd_call` is a C-ABI function without arguments
    // whose `ud2` the #UD entry turns into `wbinvd` and a return to the
    // following `ret`, with every register and flag preserved (`iretq`
    // restores RFLAGS); writing back caches changes no memory contents.
    unsafe { guest_wbinvd_call() }
}

const _: () = assert!(RING0_AREA_SIZE == 1 << 12); // `shl rbx, 12` in _start
const _: () = assert!(VECTORS * STUB_SIZE <= 512); // the stubs' block alignment
