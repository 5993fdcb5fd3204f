//! Last words: the ring-3 exception reporter and the panic handler. Both print
//! one line on the UART and end the VM with a failure status.

use core::fmt::Write;
use core::panic::PanicInfo;
use core::sync::atomic::{AtomicBool, Ordering};

use crate::io::{exit, Console};
use crate::ring0::{current_vcpu, MAX_CPUS};
use crate::status;

/// Mnemonic of an exception vector.
fn exception_name(vector: u64) -> &'static str {
    const NAMES: [&str; 32] = [
        "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP", "#SS",
        "#GP", "#PF", "reserved", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "reserved", "reserved",
        "reserved", "reserved", "reserved", "reserved", "#HV", "#VC", "#SX", "reserved",
    ];
    NAMES.get(vector as usize).copied().unwrap_or("?")
}

/// Entered from the ring-0 exception path (`guest_exception_common`) with
/// `iretq`, in ring 3 on this vCPU's fresh fault stack: the first six
/// arguments in registers, `cs` (of the interrupted code: its low bits are the
/// ring it ran in) on the stack.
pub extern "C" fn report_exception(
    vcpu: u64,
    vector: u64,
    error: u64,
    rip: u64,
    cr2: u64,
    rsp: u64,
    cs: u64,
) -> ! {
    let mut console = Console::lock_for_report(vcpu as u32);
    let _ = writeln!(
        console,
        "guest: exception {vector} ({}) error={error:#x} rip={rip:#x} cr2={cr2:#x} vcpu={vcpu} rsp={rsp:#x} cpl={}",
        exception_name(vector),
        cs & 3
    );
    // Exit holding the console: nothing printed after the report.
    exit(status::EXCEPTION)
}

/// Set when a vCPU starts reporting a panic, so that a panic while reporting
/// ends the VM instead of recursing.
static PANICKING: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    let vcpu = current_vcpu();
    let slot = vcpu.unwrap_or(0) as usize;
    if PANICKING[slot].swap(true, Ordering::Relaxed) {
        exit(status::PANIC);
    }
    let mut console = Console::lock_for_report(vcpu.unwrap_or(0));
    let _ = match vcpu {
        Some(vcpu) => write!(console, "guest: panic on vcpu {vcpu}: {}", info.message()),
        None => write!(console, "guest: panic on vcpu ?: {}", info.message()),
    };
    if let Some(location) = info.location() {
        let _ = write!(console, " at {}:{}", location.file(), location.line());
    }
    let _ = console.write_str("\n");
    // Exit holding the console: nothing printed after the report.
    exit(status::PANIC)
}
