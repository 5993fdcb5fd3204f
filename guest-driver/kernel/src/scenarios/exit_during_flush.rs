//! `exit-during-flush`: the guest ends while a vCPU is making requests.
//! vCPU 0 (and vCPUs 2..) make range flushes in a loop that never ends; once
//! vCPU 0 has completed `requests=N` (default 20), vCPU 1 prints one line and
//! writes status 0 to the exit port. The VMM must stop every vCPU, with a
//! request possibly in flight, and exit 0. Needs at least 2 vCPUs.

use core::sync::atomic::{AtomicU64, Ordering};

use super::bad_requests::raw_virtio::Deadline;
use super::{Env, Outcome, Scenario};
use crate::status;

pub const SCENARIO: Scenario = Scenario {
    name: "exit-during-flush",
    description: "vCPU 0 flushes in a loop; vCPU 1 ends the VM with status 0 meanwhile (2+ vCPUs)",
    run,
};

const SLICE: u64 = 64 * 1024;
/// How long vCPU 1 waits for vCPU 0 to get going.
const START_TIMEOUT_MS: u64 = 30_000;

/// Requests vCPU 0 has completed.
static DONE: AtomicU64 = AtomicU64::new(0);

fn run(env: &Env) -> Outcome {
    let requests = match env.option_u64("requests", 20) {
        Ok(n) => n,
        Err(outcome) => return outcome,
    };
    if env.vcpu_count < 2 {
        return env.bad_option(format_args!(
            "for exit-during-flush: it needs at least 2 vCPUs (--vcpus 2)"
        ));
    }
    let flush = match crate::flush::setup(env) {
        Ok(flush) => flush,
        Err(outcome) => return outcome,
    };
    let (_, mine) = match crate::scratch::per_vcpu_slices(env, "exit-during-flush", SLICE) {
        Ok(slices) => slices,
        Err(outcome) => return outcome,
    };

    if env.vcpu == 1 {
        let deadline = Deadline::after_ms(START_TIMEOUT_MS);
        while DONE.load(Ordering::Relaxed) < requests {
            if deadline.passed() {
                return crate::fail!(
                    "exit-during-flush: FAILED: vcpu 0 did not complete {requests} requests within 30 s"
                );
            }
            core::hint::spin_loop();
        }
        crate::println!(
            "exit-during-flush: vcpu 0 has completed {}+ requests and keeps making more; vcpu 1 ends the VM with status 0",
            DONE.load(Ordering::Relaxed)
        );
        return Outcome::Exit(status::SUCCESS);
    }
    let mut made = 0u64;
    loop {
        // SAFETY: this vCPU's own slice of scratch RAM.
        unsafe { core::ptr::write_bytes(mine as *mut u8, made as u8, 4096) };
        if let Err(e) = flush.range(mine + (made % 8) * 64, 64 + (made % 16) * 256) {
            return crate::fail!(
                "exit-during-flush: FAILED: vcpu {} request {made}: {e}",
                env.vcpu
            );
        }
        made += 1;
        if env.is_first() {
            DONE.store(made, Ordering::Relaxed);
        }
    }
}
