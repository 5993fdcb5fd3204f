//! `busy-requests`: requests while the other vCPUs are busy, for the VMM's
//! pause-invariant test (a vCPU's counter must not move while the host
//! flushes).
//!
//! Options: `requests=N` (default 1000) and `counters=GPA` (default: a static
//! array of the kernel). vCPU 0 prints `busy-requests: counters at 0x...`;
//! vCPUs 1.. then increment the `u64` at `counters + 64 * vcpu` in a tight
//! loop forever, while vCPU 0 makes N range flushes of varied sizes over
//! 4 MiB of scratch RAM (every 10th over the counters' own lines), with a
//! full flush as every 100th request when the device offers FLUSH_ALL. vCPU 0
//! keeps the number of requests it has completed in its own slot,
//! `counters + 0`. Then it prints the totals and exits 0. A request refused
//! with BUSY (a rate limit set with `--full-flush-rate`/`--range-flush-rate`)
//! is counted, not failed; any other error fails the scenario.
//!
//! A `counters=` address must be 8-byte aligned, in RAM at or above 1 MiB,
//! and clear of the kernel image and of the flush buffer; with one vCPU only
//! vCPU 0's slot is used.

use core::cell::UnsafeCell;

use guest_driver::{Error, Status};

use super::{Env, Outcome, Scenario};
use crate::cpu::{rdtsc, Rng};
use crate::ring0::MAX_CPUS;
use crate::scratch::{self, Scratch};
use crate::status;

pub const SCENARIO: Scenario = Scenario {
    name: "busy-requests",
    description: "vCPUs 1.. count at counters+64*vcpu forever; vCPU 0 makes requests=N flushes, exits 0",
    run,
};

/// Bytes between two vCPUs' counters: one cache line each, so counting
/// vCPUs never share a line.
const STRIDE: u64 = 64;
const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
/// The scratch buffer the range flushes cover.
const BUFFER: u64 = 4 * MIB;
/// Range sizes, cycled through.
const SIZES: [u64; 9] = [64, 1, 4 * KIB, 4 * KIB + 1, 64 * KIB, MIB, 2 * MIB + 3, 100, 512 * KIB];
/// Every this many requests is a full flush (when offered).
const FULL_EVERY: u64 = 100;
/// Every this many requests flushes the counters' lines.
const COUNTERS_EVERY: u64 = 10;

/// The default counters: one line per vCPU.
#[repr(C, align(64))]
struct Counters(UnsafeCell<[u64; MAX_CPUS * STRIDE as usize / 8]>);
// SAFETY: each vCPU writes only its own slot, through raw pointers; the VMM
// reads them from outside.
unsafe impl Sync for Counters {}
static COUNTERS: Counters = Counters(UnsafeCell::new([0; MAX_CPUS * STRIDE as usize / 8]));

fn run(env: &Env) -> Outcome {
    let requests = match env.option_u64("requests", 1000) {
        Ok(n) => n,
        Err(outcome) => return outcome,
    };
    let buffer = match Scratch::new(env.boot_info).take(BUFFER, 2 * MIB) {
        Ok(base) => base,
        Err(e) => {
            return if env.is_first() {
                crate::fail!("busy-requests: {e}")
            } else {
                Outcome::Park
            }
        }
    };
    let span = STRIDE * u64::from(env.vcpu_count);
    let counters = match env.option_u64("counters", COUNTERS.0.get() as u64) {
        Ok(gpa) => gpa,
        Err(outcome) => return outcome,
    };
    if env.cmdline.get("counters").is_some() {
        if let Err(why) = check_counters(env, counters, span, buffer) {
            return env.bad_option(format_args!("counters={counters:#x}: {why}"));
        }
    }
    let flush = match crate::flush::setup(env) {
        Ok(flush) => flush,
        Err(outcome) => return outcome,
    };
    // Identity map: the guest-physical address is the virtual address.
    let counter = (counters + STRIDE * u64::from(env.vcpu)) as *mut u64;
    if !env.is_first() {
        // Wait for vCPU 0's announcement, so counting starts after it.
        env.barrier();
        loop {
            // SAFETY: the slot is this vCPU's own u64 in the checked counter
            // range (or the static); only this vCPU writes it. Volatile: every
            // increment must reach memory, where the VMM reads it.
            unsafe { counter.write_volatile(counter.read_volatile().wrapping_add(1)) };
        }
    }

    crate::println!("busy-requests: counters at {counters:#x}");
    crate::println!(
        "busy-requests: u64 at counters + 64 * vcpu; vcpus 1..{} count, vcpu 0's slot is its completed requests; {requests} requests over {} MiB at {buffer:#x}{}",
        env.vcpu_count,
        BUFFER / MIB,
        if flush.features().full() { ", every 100th a full flush" } else { ", range only (FLUSH_ALL not offered)" }
    );
    env.barrier();

    let full = flush.features().full();
    let mut rng = Rng::new(0xb05e ^ rdtsc());
    let (mut range_ok, mut full_ok, mut busy) = (0u64, 0u64, 0u64);
    let started = rdtsc();
    for request in 0..requests {
        let is_full = full && request % FULL_EVERY == FULL_EVERY - 1;
        let result = if is_full {
            flush.all()
        } else if request % COUNTERS_EVERY == COUNTERS_EVERY - 1 {
            flush.range(counters, span)
        } else {
            let len = SIZES[(request % SIZES.len() as u64) as usize];
            let va = buffer + rng.below(BUFFER - len + 1);
            // SAFETY: `[va, va + len)` lies in the scratch buffer, which only
            // vCPU 0 uses and which the counters are clear of.
            unsafe { core::ptr::write_bytes(va as *mut u8, request as u8, len as usize) };
            flush.range(va, len)
        };
        match result {
            Ok(()) if is_full => full_ok += 1,
            Ok(()) => range_ok += 1,
            Err(Error::Status(Status::Busy)) => busy += 1,
            Err(e) => {
                return crate::fail!(
                    "busy-requests: FAILED: request {request} ({}): {e}",
                    if is_full { "full" } else { "range" }
                )
            }
        }
        // SAFETY: vCPU 0's own slot; see the counting loop above.
        unsafe { counter.write_volatile(request + 1) };
    }
    let cycles = rdtsc().wrapping_sub(started);
    crate::println!(
        "busy-requests: {requests} requests: {range_ok} range Ok, {full_ok} full Ok, {busy} refused BUSY; {cycles} cycles, mean {} per request",
        cycles / requests.max(1)
    );
    Outcome::Exit(status::SUCCESS)
}

/// Whether `[gpa, gpa + span)` is usable for the counters.
fn check_counters(env: &Env, gpa: u64, span: u64, buffer: u64) -> Result<(), &'static str> {
    if gpa % 8 != 0 {
        return Err("not 8-byte aligned");
    }
    scratch::check_free_ram(env.boot_info, gpa, span)?;
    let end = gpa + span;
    if gpa < buffer + BUFFER && buffer < end {
        return Err("overlaps the flush buffer");
    }
    Ok(())
}
