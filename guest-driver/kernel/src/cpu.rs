//! Unprivileged processor instructions the scenarios use, all valid in ring 3:
//! the time-stamp counter, fences, `clflush`, and a timed load for
//! Flush+Reload. (CR4.TSD is clear at boot, so `rdtsc`/`rdtscp` work in ring 3;
//! see `resources/boot-protocol.md`.)

use core::arch::asm;

/// The time-stamp counter, read after every earlier instruction has completed
/// and before any later one starts (`lfence` on both sides), so a
/// [`rdtsc`]–call–[`rdtsc`] pair brackets the call.
#[inline(always)]
pub fn rdtsc() -> u64 {
    let low: u32;
    let high: u32;
    // SAFETY: reads the TSC; no memory access. The fences only order.
    unsafe {
        asm!(
            "lfence",
            "rdtsc",
            "lfence",
            out("eax") low,
            out("edx") high,
            options(nostack, preserves_flags),
        );
    }
    u64::from(high) << 32 | u64::from(low)
}

/// Runs `f` and returns its result with the TSC cycles it took.
#[inline(always)]
pub fn timed<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let start = rdtsc();
    let value = f();
    let end = rdtsc();
    (value, end.wrapping_sub(start))
}

/// Cycles one load of the byte at `address` takes, for Flush+Reload: `mfence`
/// so that nothing earlier is in flight, `rdtscp` (+ `lfence` so the load
/// cannot start early), the load, `rdtscp` (which waits for the load), then
/// `mfence` again so the next measurement starts clean. About 50 cycles when
/// the line is cached, several hundred when it comes from DRAM.
#[inline(always)]
pub fn time_load(address: *const u8) -> u64 {
    let cycles: u64;
    // SAFETY: the caller passes the address of a mapped, readable byte (every
    // caller times loads of its own buffers); the load's value is discarded.
    // rdtscp writes rax, rdx and rcx, declared as clobbered.
    unsafe {
        asm!(
            "mfence",
            "rdtscp",
            "lfence",
            "shl rdx, 32",
            "or rax, rdx",
            "mov {start}, rax",
            "movzx {scratch:e}, byte ptr [{address}]",
            "rdtscp",
            "lfence",
            "shl rdx, 32",
            "or rax, rdx",
            "sub rax, {start}",
            "mfence",
            address = in(reg) address,
            start = out(reg) _,
            scratch = out(reg) _,
            out("rax") cycles,
            out("rdx") _,
            out("rcx") _,
            options(nostack, readonly),
        );
    }
    cycles
}

/// Writes back and invalidates the line holding `address`, from ring 3 (runs
/// natively there, unlike in ring 0 where the software KVM makes it a no-op).
#[inline(always)]
pub fn clflush(address: *const u8) {
    // SAFETY: the caller passes a mapped address (its own buffer); clflush
    // does not change memory contents.
    unsafe {
        asm!("clflush [{}]", in(reg) address, options(nostack, preserves_flags));
    }
}

/// A full memory fence.
#[inline(always)]
pub fn mfence() {
    // SAFETY: orders memory accesses; no other effect.
    unsafe { asm!("mfence", options(nostack, preserves_flags)) };
}

/// Busy work that the compiler cannot remove: `iterations` dependent steps.
/// Returns a value derived from them so the loop has a use.
#[inline(never)]
pub fn spin(iterations: u64) -> u64 {
    let mut x = iterations;
    for i in 0..iterations {
        x = core::hint::black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(i));
    }
    x
}

/// A small, fast pseudo-random generator (xorshift64*), for shuffles and
/// varied request sizes. Deterministic: the same seed gives the same run.
pub struct Rng(u64);

impl Rng {
    /// A generator; `seed` 0 is replaced (xorshift must not start at 0).
    pub const fn new(seed: u64) -> Self {
        Self(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A value in `0..bound` (`bound` > 0; the tiny modulo bias is harmless
    /// here).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }
}
