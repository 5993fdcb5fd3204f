//! Port I/O from ring 3 (allowed because `_start` enters ring 3 with
//! RFLAGS.IOPL = 3): the UART console and the exit port.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicU32, Ordering};

use cache_flush_abi::boot::{EXIT_PORT, SERIAL_PORT};

/// Writes one byte to an I/O port.
fn outb(port: u16, value: u8) {
    // SAFETY: port output has no effect on the memory of this program; the
    // ports used are the VMM's UART and exit device.
    unsafe {
        core::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags));
    }
}

/// Writes four bytes to an I/O port.
fn outl(port: u16, value: u32) {
    // SAFETY: as in `outb`.
    unsafe {
        core::arch::asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags));
    }
}

/// Ends the VM with `status` (see [`crate::status`]). The VMM stops every vCPU
/// once the exit port is written; until it has, this vCPU halts ([`park`]).
pub fn exit(status: u32) -> ! {
    outl(EXIT_PORT, status);
    park()
}

/// Idles this vCPU for good: for vCPUs that have nothing more to do. It
/// halts ([`crate::ring0::halt`]), so its host thread sleeps instead of
/// taking a host core from the vCPUs that still work (and from the
/// cache-timing scenarios); the VMM still pauses it and runs flush work on
/// its thread. When every vCPU has halted without a verdict on the exit port,
/// the VM ends (exit code 4).
pub fn park() -> ! {
    crate::ring0::halt()
}

/// Spins in ring 3 for good: a busy vCPU, which every flush has to take out
/// of guest mode (what the benchmark measures against). Use [`park`] for a
/// vCPU that merely has nothing left to do.
pub fn busy_forever() -> ! {
    loop {
        core::hint::spin_loop();
    }
}

/// Owner of the console: 0 when free, otherwise the owning vCPU's index + 1.
static CONSOLE_OWNER: AtomicU32 = AtomicU32::new(0);

/// Exclusive access to the UART, for one line or a few. Lines from different
/// vCPUs never interleave. Each byte is one port exit to the VMM, so keep
/// output short.
pub struct Console {
    _private: (),
}

impl Console {
    /// Waits for the console.
    pub fn lock(vcpu: u32) -> Self {
        while CONSOLE_OWNER
            .compare_exchange_weak(0, vcpu + 1, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
        Console { _private: () }
    }

    /// The console for a last report (panic or exception) of `vcpu`: taken
    /// even if this vCPU died holding it, or if another vCPU holds it for too
    /// long, because the report matters more than a clean line.
    pub fn lock_for_report(vcpu: u32) -> Self {
        const PATIENCE: u32 = 50_000_000;
        for _ in 0..PATIENCE {
            match CONSOLE_OWNER.compare_exchange_weak(
                0,
                vcpu + 1,
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(owner) if owner == vcpu + 1 => break,
                Err(_) => core::hint::spin_loop(),
            }
        }
        CONSOLE_OWNER.store(vcpu + 1, Ordering::Relaxed);
        Console { _private: () }
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        CONSOLE_OWNER.store(0, Ordering::Release);
    }
}

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // Only the transmit register is written: the VMM's UART takes every
        // byte at once, and reading the line status would cost a second exit
        // per byte.
        for byte in s.bytes() {
            outb(SERIAL_PORT, byte);
        }
        Ok(())
    }
}

/// Prints one line on the console (used by [`println!`]).
pub fn print_line(args: fmt::Arguments) {
    let vcpu = crate::ring0::current_vcpu().unwrap_or(0);
    let mut console = Console::lock(vcpu);
    // Writing to the UART cannot fail.
    let _ = console.write_fmt(args);
    let _ = console.write_str("\n");
}

/// Prints a line on the UART, whole: lines of different vCPUs do not
/// interleave.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {
        $crate::io::print_line(format_args!($($arg)*))
    };
}
