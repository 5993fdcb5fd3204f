//! `concurrent`: every vCPU flushes at the same time. Each makes
//! `requests=N` calls (default 200) on its own queue: range flushes of varied
//! sizes and alignments over its own 1 MiB of scratch RAM (written first, so
//! the lines are dirty), and every 10th call a full flush when the device
//! offers one; between calls it runs a busy loop of pseudo-random length, so
//! requests arrive while the other vCPUs compute. Every call must return Ok.
//! vCPU 0 prints each vCPU's totals and the sum.

use guest_driver::Error;

use super::{Env, Outcome, Scenario};
use crate::cpu::{rdtsc, spin, timed, Rng};
use crate::ring0::MAX_CPUS;
use crate::status;
use crate::sync::SpinMutex;

pub const SCENARIO: Scenario = Scenario {
    name: "concurrent",
    description: "every vCPU makes requests=N range (and full) flushes at once, busy between them",
    run,
};

const KIB: u64 = 1024;
/// Each vCPU's share of scratch RAM.
const SLICE: u64 = 1024 * KIB;
/// Range sizes, cycled through.
const SIZES: [u64; 8] = [1, 63, 64, 65, 4 * KIB - 1, 4 * KIB + 1, 64 * KIB, 512 * KIB + 3];
/// Every this many calls is a full flush (when offered).
const FULL_EVERY: u64 = 10;

#[derive(Clone, Copy)]
struct Totals {
    range: u64,
    full: u64,
    cycles: u64,
    busy_iterations: u64,
    /// Calls the device refused with BUSY (a rate limit), each retried.
    retried_busy: u64,
    /// The first failing call: its number and error.
    error: Option<(u64, Error)>,
}

const ZERO: Totals = Totals {
    range: 0,
    full: 0,
    cycles: 0,
    busy_iterations: 0,
    retried_busy: 0,
    error: None,
};

static TOTALS: SpinMutex<[Totals; MAX_CPUS]> = SpinMutex::new([ZERO; MAX_CPUS]);

fn run(env: &Env) -> Outcome {
    let requests = match env.option_u64("requests", 200) {
        Ok(n) => n,
        Err(outcome) => return outcome,
    };
    let flush = match crate::flush::setup(env) {
        Ok(flush) => flush,
        Err(outcome) => return outcome,
    };
    let (base, mine) = match crate::scratch::per_vcpu_slices(env, "concurrent", SLICE) {
        Ok(slices) => slices,
        Err(outcome) => return outcome,
    };
    let full = flush.features().full();
    if env.is_first() {
        crate::println!(
            "concurrent: {} vCPUs x {requests} requests ({}), 1 MiB of scratch RAM each from {base:#x}",
            env.vcpu_count,
            if full { "every 10th a full flush" } else { "range only: FLUSH_ALL not offered" }
        );
    }
    env.barrier();

    let mut rng = Rng::new(0x5eed ^ (u64::from(env.vcpu) << 32) ^ rdtsc());
    let mut totals = ZERO;
    let started = rdtsc();
    let mut call = 0;
    while call < requests {
        let is_full = full && call % FULL_EVERY == FULL_EVERY - 1;
        let (result, cycles) = if is_full {
            timed(|| flush.all())
        } else {
            let len = SIZES[(call % SIZES.len() as u64) as usize];
            let offset = rng.below(SLICE - len + 1);
            let va = mine + offset;
            // SAFETY: `[va, va + len)` lies in this vCPU's own slice of
            // scratch RAM (offset + len <= SLICE).
            unsafe { core::ptr::write_bytes(va as *mut u8, call as u8, len as usize) };
            timed(|| flush.range(va, len))
        };
        match result {
            Ok(()) if is_full => totals.full += 1,
            Ok(()) => totals.range += 1,
            // The device's rate limit (on by default) said "later": what a
            // driver's caller does with BUSY is wait and try again.
            Err(e) if e.is_retryable() => {
                totals.retried_busy += 1;
                core::hint::black_box(spin(100_000));
                continue;
            }
            Err(e) => {
                totals.error = Some((call, e));
                break;
            }
        }
        totals.cycles += cycles;
        let iterations = 1_000 + rng.below(50_000);
        core::hint::black_box(spin(iterations));
        totals.busy_iterations += iterations;
        call += 1;
    }
    let elapsed = rdtsc().wrapping_sub(started);
    TOTALS.lock()[env.vcpu as usize] = totals;
    env.barrier();
    if !env.is_first() {
        return Outcome::Park;
    }

    let all = *TOTALS.lock();
    let mut sum = ZERO;
    let mut failed = false;
    for (vcpu, t) in all.iter().enumerate().take(env.vcpu_count as usize) {
        let calls = t.range + t.full;
        crate::println!(
            "concurrent: vcpu {vcpu}: {calls} Ok ({} range, {} full), mean {} cycles per call, {} busy-loop steps between, {} BUSY answers retried",
            t.range,
            t.full,
            t.cycles / calls.max(1),
            t.busy_iterations,
            t.retried_busy
        );
        if let Some((call, e)) = t.error {
            failed = true;
            crate::println!("concurrent: vcpu {vcpu}: call {call} failed: {e}");
        }
        sum.range += t.range;
        sum.full += t.full;
    }
    if failed {
        return crate::fail!("concurrent: FAILED: a call returned an error (see above)");
    }
    crate::println!(
        "concurrent: all {} calls Ok ({} range, {} full) in {elapsed} cycles on vcpu 0",
        sum.range + sum.full,
        sum.range,
        sum.full
    );
    Outcome::Exit(status::SUCCESS)
}
