//! Helpers shared by the end-to-end tests.
#![allow(dead_code)] // Each test binary uses a different subset.

use std::io::Write;
use std::process::{Command, Output};

/// Returns `true` if `/dev/kvm` can be opened. Otherwise prints a loud
/// SKIPPED line for `test` straight to the terminal (past libtest's output
/// capture), so a machine without KVM never passes these tests silently.
pub fn kvm_or_skip(test: &str) -> bool {
    let Some(reason) = vmm::vm::kvm_unavailable() else {
        return true;
    };
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: needs KVM: {reason}");
    false
}

/// The `vmm` binary built for this test run.
pub fn vmm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vmm"))
}

/// Runs the `vmm` binary with `args`; returns its output.
pub fn run_vmm(args: &[&str]) -> Output {
    vmm().args(args).output().expect("the vmm binary runs")
}

/// Stdout and stderr of `out`, for assertion messages.
pub fn describe(out: &Output) -> String {
    format!(
        "exit status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Where `raw_kernel` code is loaded and starts.
pub const RAW_KERNEL_BASE: u64 = 0x20_0000;

/// A minimal static ELF64 x86-64 executable: `code` as one RWX PT_LOAD
/// segment at [`RAW_KERNEL_BASE`] (memsz one page), entry at its start.
pub fn raw_kernel(code: &[u8]) -> Vec<u8> {
    elf_image(
        RAW_KERNEL_BASE,
        RAW_KERNEL_BASE,
        0x1000.max(code.len() as u64),
        7,
        2,
        62,
        code,
    )
}

/// An ELF64 image with one PT_LOAD segment, every field chosen by the caller,
/// for the loader's negative tests.
pub fn elf_image(
    entry: u64,
    paddr: u64,
    memsz: u64,
    flags: u32,
    e_type: u16,
    machine: u16,
    code: &[u8],
) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let mut b = vec![0u8; EHDR + PHDR];
    b[..4].copy_from_slice(b"\x7fELF");
    b[4] = 2; // ELFCLASS64
    b[5] = 1; // little-endian
    b[6] = 1; // EV_CURRENT
    b[16..18].copy_from_slice(&e_type.to_le_bytes());
    b[18..20].copy_from_slice(&machine.to_le_bytes());
    b[20..24].copy_from_slice(&1u32.to_le_bytes());
    b[24..32].copy_from_slice(&entry.to_le_bytes());
    b[32..40].copy_from_slice(&(EHDR as u64).to_le_bytes());
    b[52..54].copy_from_slice(&(EHDR as u16).to_le_bytes());
    b[54..56].copy_from_slice(&(PHDR as u16).to_le_bytes());
    b[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = EHDR;
    b[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    b[ph + 4..ph + 8].copy_from_slice(&flags.to_le_bytes());
    b[ph + 8..ph + 16].copy_from_slice(&((EHDR + PHDR) as u64).to_le_bytes());
    b[ph + 16..ph + 24].copy_from_slice(&paddr.to_le_bytes());
    b[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
    b[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    b[ph + 40..ph + 48].copy_from_slice(&memsz.to_le_bytes());
    b[ph + 48..ph + 56].copy_from_slice(&0x1000u64.to_le_bytes());
    b.extend_from_slice(code);
    b
}
