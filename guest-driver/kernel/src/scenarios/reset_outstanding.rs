//! `reset-outstanding`: the driver resets the device while a request is
//! outstanding. vCPU 0 initialises the device with raw register accesses and
//! a hand-built one-request split queue in a static page, submits a FLUSH_ALL
//! (a FLUSH_RANGE where FLUSH_ALL is not offered), notifies, and writes
//! Status = 0 right behind the notify; `rounds=N` times (default 20, at most
//! 64), each round with a status byte of its own.
//!
//! After each reset the request must be either completed (used index 1,
//! status OK: the flush finished before the reset landed) or not at all
//! (used index 0, status byte untouched) — and nothing may be written for it
//! afterwards: every earlier round's status byte and the last round's used
//! index are checked again later. Then the guest driver re-initialises the
//! device (`flush::setup`), every vCPU makes a good range flush (and a full
//! one where offered), vCPU 0 checks once more that no late completion
//! arrived, and exits 0.

use core::cell::UnsafeCell;

use guest_driver::mmio::reg;

use super::bad_requests::raw_virtio::{Area, RawDevice, RawQueue, FULL, RANGE, VERSION_1};
use super::{Env, Outcome, Scenario};
use crate::status;

pub const SCENARIO: Scenario = Scenario {
    name: "reset-outstanding",
    description: "raw queue: notify then reset at once, rounds=N times; then the driver re-initialises and flushes",
    run,
};

/// The hand-built queue, the request, the status bytes and the data, in one
/// page of the kernel image (identity-mapped: its address is its
/// guest-physical address).
#[repr(C, align(4096))]
struct Page(UnsafeCell<[u8; 4096]>);
// SAFETY: only vCPU 0 writes the page (through `Area`, with raw pointers);
// the other vCPUs only flush its data lines, which reads nothing.
unsafe impl Sync for Page {}
static PAGE: Page = Page(UnsafeCell::new([0; 4096]));

const REQ: u64 = 0x200;
/// Round `r`'s status byte is at `STATUS + r`.
const STATUS: u64 = 0x280;
const MAX_ROUNDS: u64 = 64;
const DATA: u64 = 0x400;
const DATA_LEN: u64 = 0x1000 - DATA;
const QUEUE_SIZE: u16 = 4;
const UNTOUCHED: u8 = 0xff;

fn run(env: &Env) -> Outcome {
    let rounds = match env.option_u64("rounds", 20) {
        Ok(n) if (1..=MAX_ROUNDS).contains(&n) => n,
        Ok(n) => return env.bad_option(format_args!("rounds={n}: 1 to {MAX_ROUNDS}")),
        Err(outcome) => return outcome,
    };
    // SAFETY: a page-aligned static of the identity-mapped image, used only
    // through this `Area` (vCPU 0) and by the device.
    let area = unsafe { Area::new(PAGE.0.get() as u64, 4096) };
    let mut last = None;
    if env.is_first() {
        match raw_rounds(env, area, rounds) {
            Ok(state) => last = Some(state),
            Err(outcome) => return outcome,
        }
    }

    // The driver takes over: a reset and a normal initialisation.
    let flush = match crate::flush::setup(env) {
        Ok(flush) => flush,
        Err(outcome) => return outcome,
    };
    if let Err(e) = flush.range(area.gpa(DATA), DATA_LEN) {
        return crate::fail!(
            "reset-outstanding: FAILED: vcpu {}: range flush after re-initialisation: {e}",
            env.vcpu
        );
    }
    if flush.features().full() {
        if let Err(e) = flush.all() {
            return crate::fail!(
                "reset-outstanding: FAILED: vcpu {}: full flush after re-initialisation: {e}",
                env.vcpu
            );
        }
    }
    env.barrier();
    let Some(last) = last else {
        return Outcome::Park;
    };
    // Every batch popped before the last reset has finished by now: the
    // device served the requests above after it.
    if let Err(why) = last.unchanged(area) {
        return crate::fail!("reset-outstanding: FAILED: {why}");
    }
    crate::println!(
        "reset-outstanding: after re-initialisation by the driver, {} vCPU(s) made good range{} flushes; still nothing written for any reset request",
        env.vcpu_count,
        if flush.features().full() { " and full" } else { "" }
    );
    Outcome::Exit(status::SUCCESS)
}

/// What the hand-built queue held after the last reset.
struct AfterReset {
    rounds: u64,
    status: [u8; MAX_ROUNDS as usize],
    used_idx: u16,
    queue: RawQueue,
}

impl AfterReset {
    /// Whether anything was written since the snapshots.
    fn unchanged(&self, area: Area) -> Result<(), &'static str> {
        for round in 0..self.rounds {
            if area.read::<u8>(STATUS + round) != self.status[round as usize] {
                return Err("a status byte changed after its request's reset");
            }
        }
        if self.queue.used_idx() != self.used_idx {
            return Err("the used ring changed after the last reset");
        }
        Ok(())
    }
}

/// vCPU 0: the raw rounds.
fn raw_rounds(env: &Env, area: Area, rounds: u64) -> Result<AfterReset, Outcome> {
    let fail = |why: &str| crate::fail!("reset-outstanding: FAILED: {why}");
    let device = RawDevice::find(env.boot_info).map_err(fail)?;
    let mut after = AfterReset {
        rounds: 0,
        status: [UNTOUCHED; MAX_ROUNDS as usize],
        used_idx: 0,
        queue: RawQueue::new(area, QUEUE_SIZE),
    };
    let (mut completed, mut not_completed) = (0u64, 0u64);
    let mut full = false;
    for round in 0..rounds {
        let accepted = device.start(VERSION_1 | RANGE | FULL).map_err(fail)?;
        full = accepted & FULL != 0;
        let queue = &mut after.queue;
        queue.clear();
        device.setup_queue(0, queue).map_err(fail)?;
        device.driver_ok().map_err(fail)?;

        let status_at = STATUS + round;
        area.write(status_at, UNTOUCHED);
        if full {
            area.write(REQ, 2u32);
            area.write(REQ + 4, 0u32);
            area.write(REQ + 8, round);
            queue.set_chain(&[(area.gpa(REQ), 16, false), (area.gpa(status_at), 1, true)]);
        } else {
            area.write(REQ, 1u32);
            area.write(REQ + 4, 0u32);
            area.write(REQ + 8, round);
            area.write(REQ + 16, area.gpa(DATA));
            area.write(REQ + 24, DATA_LEN);
            queue.set_chain(&[(area.gpa(REQ), 32, false), (area.gpa(status_at), 1, true)]);
        }
        queue.publish(0);
        device.notify(0);
        device.write(reg::STATUS, 0);
        // The reset is done (its MMIO write has returned): from here on the
        // device must write nothing for this request.
        let used = queue.used_idx();
        let status = area.read::<u8>(status_at);
        match (used, status) {
            (1, 0) => completed += 1,
            (0, UNTOUCHED) => not_completed += 1,
            _ => {
                return Err(crate::fail!(
                    "reset-outstanding: FAILED: round {round}: used index {used} with status byte {status:#x} right after the reset"
                ))
            }
        }
        after.status[round as usize] = status;
        after.used_idx = used;
        after.rounds = round + 1;
        // A late completion of an earlier round would show here.
        if let Err(why) = after.unchanged(area) {
            return Err(fail(why));
        }
    }
    crate::println!(
        "reset-outstanding: {rounds} rounds of {} request, notify, reset at once: {completed} completed before the reset landed, {not_completed} never completed; nothing written after a reset",
        if full { "a FLUSH_ALL" } else { "a FLUSH_RANGE" }
    );
    Ok(after)
}
