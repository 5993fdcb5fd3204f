//! `bench`: the guest half of `vmm-tools bench`. Prints its measurements as
//! `bench: KIND key=value ...` lines (TSC cycles) for the VMM to parse; the
//! VMM does the statistics. `part=` chooses what is measured:
//!
//! * `part=range max=BYTES reps=N [min=BYTES] [ladder=pow2]`: vCPU 0, for
//!   every size of 64 B, 4 KiB, 64 KiB, 1 MiB, 16 MiB, 64 MiB from `min` up
//!   to `max` (with `ladder=pow2`: every power of two from `min` to `max`,
//!   the finer ladder the inline/split crossover needs), `reps` times (sizes
//!   interleaved, largest first): one no-op exit (the MMIO floor: a read of the device's
//!   MagicValue), one notify of the vCPU's queue with nothing in it (an
//!   exit down the notify path that finds no work), one range flush through
//!   the device and the guest's own ring-3 CLFLUSHOPT loop over the same
//!   freshly dirtied bytes, and one more no-op exit right after dirtying
//!   the bytes again (the exit a request of that size pays: with the caches
//!   full of dirty lines it costs more than the floor). One line
//!   `bench: range size=S floor=F notify=N dev=D guest=G dirty_exit=E`
//!   each.
//! * `part=full touch=BYTES reps=N`: vCPU 0 dirties `touch` bytes of scratch
//!   RAM (making them resident), then `reps` times re-dirties them and makes
//!   one full flush: `bench: full touch=T floor=F dev=D`.
//! * `part=writes size=BYTES reps=N`: vCPU 0 writes one `u64` in every
//!   4 KiB page of `size` bytes (first touches since the last flush: with
//!   `--audit` each one takes KVM's write-protect fault) and then flushes
//!   them with one range flush, `reps` times: `bench: writes size=S pages=P
//!   write=W flush=F`. The dirty-page audit's cost, with and without.
//! * `part=tput size=BYTES requests=N`: every vCPU flushes its own `size`
//!   bytes `requests` times, all at once; vCPU 0 times the whole burst
//!   between two barriers: `bench: tput vcpus=V requests=N size=S cycles=C`.
//!
//! The other vCPUs of `range` and `full` spin in ring 3
//! ([`crate::io::busy_forever`]: busy vCPUs that every flush has to pause),
//! where other scenarios halt their idle vCPUs. Every line ends with
//! `bench: done`.

use core::arch::asm;

use super::{Env, Outcome, Scenario};
use crate::cpu::{rdtsc, timed};
use crate::flush::Flush;
use crate::scratch::Scratch;
use crate::status;

pub const SCENARIO: Scenario = Scenario {
    name: "bench",
    description: "measurements for `vmm-tools bench`: part=range|full|tput (prints bench: lines)",
    run,
};

const MIB: u64 = 1 << 20;
/// The range sizes, smallest first.
const SIZES: [u64; 6] = [64, 4096, 64 * 1024, MIB, 16 * MIB, 64 * MIB];
/// Byte pattern the buffers are dirtied with (varied per pass).
const PATTERN: u8 = 0x5a;

fn run(env: &Env) -> Outcome {
    let flush = match crate::flush::setup(env) {
        Ok(flush) => flush,
        Err(outcome) => return outcome,
    };
    let part = env.cmdline.get("part").unwrap_or("range");
    let outcome = match part {
        "range" => range(env, &flush),
        "full" => full(env, &flush),
        "tput" => throughput(env, &flush),
        "writes" => writes(env, &flush),
        other => {
            return env.bad_option(format_args!(
                "part={other}: expected range, full, tput or writes"
            ))
        }
    };
    if env.is_first() && outcome == Outcome::Exit(status::SUCCESS) {
        crate::println!("bench: done");
    }
    outcome
}

fn range(env: &Env, flush: &Flush) -> Outcome {
    if !env.is_first() {
        crate::io::busy_forever();
    }
    let (max, reps) = match (env.option_u64("max", 64 * MIB), env.option_u64("reps", 5)) {
        (Ok(max), Ok(reps)) => (max, reps),
        (Err(o), _) | (_, Err(o)) => return o,
    };
    let min = match env.option_u64("min", 64) {
        Ok(min) => min.max(1),
        Err(o) => return o,
    };
    let ladder = match env.cmdline.get("ladder") {
        None | Some("table") => false,
        Some("pow2") => true,
        Some(other) => return env.bad_option(format_args!("ladder={other}: expected table or pow2")),
    };
    // The sizes, smallest first: the fixed table, or powers of two.
    let mut sizes = [0u64; 64];
    let mut count = 0;
    if ladder {
        let mut size = min.next_power_of_two();
        while size <= max && count < sizes.len() {
            sizes[count] = size;
            count += 1;
            size *= 2;
        }
    } else {
        for &size in SIZES.iter().filter(|&&s| (min..=max).contains(&s)) {
            sizes[count] = size;
            count += 1;
        }
    }
    let line = u64::from(flush.config().cache_line_size.max(16));
    let buffer = match Scratch::new(env.boot_info).take(max.max(64), 2 * MIB) {
        Ok(base) => base,
        Err(e) => return crate::fail!("bench: FAILED: {e}"),
    };
    for rep in 0..reps {
        // Largest first, so that each small request follows another small
        // one: right after a 64 MiB flush (and the 64 MiB of writes around
        // it) the VMM's own working set is cold, and a 64 B request measured
        // there cost 2.1x the exit instead of 1.4x (one run, 40 reps each).
        for &size in sizes[..count].iter().rev() {
            let floor = timed(|| flush.noop_exit()).1;
            // Alternate which of the two flushes goes first.
            let mut dev = 0;
            let mut guest = 0;
            for turn in 0..2 {
                dirty(buffer, size, rep as u8);
                if (turn + rep) % 2 == 0 {
                    let (result, cycles) = timed(|| flush.range(buffer, size));
                    if let Err(e) = result {
                        return crate::fail!("bench: FAILED: range flush of {size} B: {e}");
                    }
                    dev = cycles;
                } else {
                    guest = timed(|| clflushopt_range(buffer, size, line)).1;
                }
            }
            // After the request, so that it does not warm the notify path
            // for the request (the floor before it warms the exit path as
            // before).
            let notify = timed(|| flush.empty_notify()).1;
            // The exit a request of this size pays: taken with the caches
            // full of the lines just dirtied. Flushed again afterwards, so
            // the next size starts from the state a request leaves.
            dirty(buffer, size, rep as u8);
            let dirty_exit = timed(|| flush.noop_exit()).1;
            clflushopt_range(buffer, size, line);
            crate::println!(
                "bench: range size={size} floor={floor} notify={notify} dev={dev} guest={guest} dirty_exit={dirty_exit}"
            );
        }
    }
    Outcome::Exit(status::SUCCESS)
}

fn full(env: &Env, flush: &Flush) -> Outcome {
    if !env.is_first() {
        crate::io::busy_forever();
    }
    let (touch, reps) = match (env.option_u64("touch", 64 * MIB), env.option_u64("reps", 5)) {
        (Ok(touch), Ok(reps)) => (touch, reps),
        (Err(o), _) | (_, Err(o)) => return o,
    };
    let buffer = match Scratch::new(env.boot_info).take(touch.max(64), 2 * MIB) {
        Ok(base) => base,
        Err(e) => return crate::fail!("bench: FAILED: {e}"),
    };
    for rep in 0..reps {
        let floor = timed(|| flush.noop_exit()).1;
        dirty(buffer, touch, rep as u8);
        let (result, dev) = timed(|| flush.all());
        if let Err(e) = result {
            return crate::fail!("bench: FAILED: full flush: {e}");
        }
        crate::println!("bench: full touch={touch} floor={floor} dev={dev}");
    }
    Outcome::Exit(status::SUCCESS)
}

fn writes(env: &Env, flush: &Flush) -> Outcome {
    if !env.is_first() {
        crate::io::busy_forever();
    }
    let (size, reps) = match (env.option_u64("size", 16 * MIB), env.option_u64("reps", 5)) {
        (Ok(size), Ok(reps)) => (size.max(4096), reps),
        (Err(o), _) | (_, Err(o)) => return o,
    };
    let buffer = match Scratch::new(env.boot_info).take(size, 2 * MIB) {
        Ok(base) => base,
        Err(e) => return crate::fail!("bench: FAILED: {e}"),
    };
    let pages = size / 4096;
    // Make the pages resident first: the passes time writes, not faults of
    // never-touched memory.
    dirty(buffer, size, 0);
    if let Err(e) = flush.range(buffer, size) {
        return crate::fail!("bench: FAILED: range flush of {size} B: {e}");
    }
    for rep in 0..reps {
        let write = timed(|| {
            for page in 0..pages {
                // SAFETY: inside the scratch buffer taken above.
                unsafe { ((buffer + page * 4096) as *mut u64).write_volatile(rep ^ page) };
            }
        })
        .1;
        let (result, flush_cycles) = timed(|| flush.range(buffer, size));
        if let Err(e) = result {
            return crate::fail!("bench: FAILED: range flush of {size} B: {e}");
        }
        crate::println!("bench: writes size={size} pages={pages} write={write} flush={flush_cycles}");
    }
    Outcome::Exit(status::SUCCESS)
}

fn throughput(env: &Env, flush: &Flush) -> Outcome {
    let (size, requests) = match (env.option_u64("size", 4096), env.option_u64("requests", 100))
    {
        (Ok(size), Ok(requests)) => (size.max(1), requests),
        (Err(o), _) | (_, Err(o)) => return o,
    };
    let stride = size.next_multiple_of(4096);
    let all = stride * u64::from(env.vcpu_count);
    // Every vCPU computes the same base; each uses its own slice of it.
    let base = match Scratch::new(env.boot_info).take(all, 2 * MIB) {
        Ok(base) => base,
        Err(e) if env.is_first() => return crate::fail!("bench: FAILED: {e}"),
        Err(_) => return Outcome::Park,
    };
    let mine = base + stride * u64::from(env.vcpu);
    dirty(mine, size, 1);
    env.barrier();
    let start = rdtsc();
    let mut failed = None;
    for _ in 0..requests {
        if let Err(e) = flush.range(mine, size) {
            failed = Some(e);
            break;
        }
    }
    env.barrier();
    let cycles = rdtsc().wrapping_sub(start);
    if let Some(e) = failed {
        return if env.is_first() {
            crate::fail!("bench: FAILED: vCPU {} range flush: {e}", env.vcpu)
        } else {
            crate::println!("bench: FAILED: vCPU {} range flush: {e}", env.vcpu);
            Outcome::Park
        };
    }
    if !env.is_first() {
        return Outcome::Park;
    }
    crate::println!(
        "bench: tput vcpus={} requests={requests} size={size} cycles={cycles}",
        env.vcpu_count
    );
    Outcome::Exit(status::SUCCESS)
}

/// Writes `len` bytes at `va` (dirty lines for a flush to write back).
fn dirty(va: u64, len: u64, pass: u8) {
    // SAFETY: every caller passes a range of scratch RAM it took for itself
    // (identity-mapped, writable from ring 3, used by nothing else).
    unsafe { core::ptr::write_bytes(va as *mut u8, PATTERN ^ pass, len as usize) };
}

/// The guest's own ring-3 flush of `[va, va + len)`: CLFLUSHOPT on every
/// line, then MFENCE (what the host's flush does, but from inside the guest).
#[inline(never)]
fn clflushopt_range(va: u64, len: u64, line: u64) {
    let mut p = va & !(line - 1);
    let end = va + len;
    while p < end {
        // SAFETY: `p` lies in a line of a mapped scratch range; CLFLUSHOPT
        // does not change memory contents.
        unsafe { asm!("clflushopt [{}]", in(reg) p, options(nostack, preserves_flags)) };
        p += line;
    }
    crate::cpu::mfence();
}
