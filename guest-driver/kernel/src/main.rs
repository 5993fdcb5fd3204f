//! The bundled guest kernel: the test guest the VMM boots by default.
//!
//! It follows the boot protocol of `cache_flush_abi::boot`: the VMM loads this
//! ELF and starts every vCPU at `_start` in 64-bit mode, in ring 0, with the
//! vCPU index in `rdi` and the boot information block in `rsi`.
//!
//! **Why nearly everything runs in ring 3.** On this project's development
//! and CI hosts KVM is a software implementation that runs guest ring 3
//! natively but interprets guest ring 0, at about 1 µs per instruction, and
//! cannot emulate AVX there at all. So ring 0 ([`ring0`]) is a couple of
//! hundred instructions of assembly: it installs a GDT, a TSS and an IDT and
//! drops to ring 3 with `iretq`. All Rust code — the runtime, the scenarios,
//! the exception reporter, the panic handler — runs in ring 3, with
//! RFLAGS.IOPL = 3 so that it can drive the UART and the exit port itself, on
//! pages the VMM maps user-accessible.
//!
//! The command line selects a scenario (`scenario=NAME`, see [`scenarios`]).
//! The kernel ends the VM by writing a status to the exit port ([`status`]).
#![no_std]
#![no_main]

mod cmdline;
mod cpu;
mod fault;
mod flush;
mod io;
mod mem;
mod ring0;
mod scenarios;
mod scratch;
mod status;
mod sync;

use core::fmt::Write;

use cache_flush_abi::boot::{BootInfo, BOOT_INFO_MAGIC, BOOT_INFO_VERSION};

use crate::cmdline::Cmdline;
use crate::io::{exit, park, Console};
use crate::ring0::MAX_CPUS;
use crate::scenarios::{Env, Outcome};

/// The ring-3 entry of every vCPU, entered from `_start` with `iretq`.
pub extern "C" fn guest_main(vcpu: u64, boot_info: u64) -> ! {
    // `_start` only lets indices below MAX_CPUS through.
    let vcpu = vcpu as u32;
    let outcome = match validate_boot_info(boot_info) {
        Ok(info) => run(vcpu, info),
        Err(problem) => {
            if vcpu == 0 {
                println!("guest: bad boot information block at {boot_info:#x}: {problem}");
                Outcome::Exit(status::BAD_BOOT_INFO)
            } else {
                Outcome::Park
            }
        }
    };
    match outcome {
        Outcome::Exit(status) => exit(status),
        Outcome::Park => park(),
    }
}

/// Never called: the kernel aborts on panic and has no unwinder. The
/// precompiled `core` (built for unwinding) still names this symbol in its
/// unwind tables, which the linker script discards; the link needs a
/// definition all the same.
#[no_mangle]
extern "C" fn rust_eh_personality() {}

/// The boot information block at `address`, if it looks valid.
fn validate_boot_info(address: u64) -> Result<&'static BootInfo, &'static str> {
    if address == 0 || address % core::mem::align_of::<BootInfo>() as u64 != 0 {
        return Err("null or misaligned");
    }
    // SAFETY: the boot protocol puts a `BootInfo` at this address, in memory
    // the identity map makes readable from ring 3, which nothing writes
    // during the run. `BootInfo` is plain integers: any content is a value.
    let info = unsafe { &*(address as *const BootInfo) };
    if info.magic != BOOT_INFO_MAGIC || info.version != BOOT_INFO_VERSION {
        return Err("wrong magic or version");
    }
    if info.vcpu_count == 0 || info.vcpu_count as usize > MAX_CPUS {
        return Err("vcpu_count out of range");
    }
    if info.cmdline().is_none() {
        return Err("command line too long or not UTF-8");
    }
    Ok(info)
}

/// Runs the scenario of the command line on this vCPU.
fn run(vcpu: u32, boot_info: &'static BootInfo) -> Outcome {
    if vcpu >= boot_info.vcpu_count {
        // Started beyond the count the VMM announced: stay out of the way.
        return Outcome::Park;
    }
    let cmdline = Cmdline::new(boot_info.cmdline().unwrap_or(""));
    let name = cmdline.get("scenario");
    let Some(scenario) = name.and_then(scenarios::find) else {
        if vcpu != 0 {
            return Outcome::Park;
        }
        let mut console = Console::lock(vcpu);
        let hint = if name.is_none() {
            " (no scenario=NAME on the command line)"
        } else {
            ""
        };
        let _ = write!(
            console,
            "guest: unknown scenario '{}'{hint}; scenarios: ",
            name.unwrap_or("")
        );
        let _ = scenarios::write_list(&mut console);
        drop(console);
        return Outcome::Exit(status::UNKNOWN_SCENARIO);
    };
    let env = Env {
        vcpu,
        vcpu_count: boot_info.vcpu_count,
        boot_info,
        cmdline,
    };
    (scenario.run)(&env)
}
