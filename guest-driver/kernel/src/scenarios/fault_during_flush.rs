//! `fault-during-flush`: a vCPU takes a page fault while the others are
//! making flush requests. Every vCPU but the last makes range flushes over
//! its own 64 KiB of scratch RAM in a loop that never ends; once each has
//! completed `requests=N` (default 20), the last vCPU reads address 0x0,
//! which the boot page tables leave unmapped. The exception report (`guest:
//! exception 14 (#PF) ... cr2=0x0 vcpu=LAST ...`) must reach the UART and
//! end the VM with `status::EXCEPTION`, the VMM with exit code 1, although
//! requests are in flight. On one vCPU, that vCPU makes the N requests and
//! then faults.

use core::sync::atomic::{AtomicU64, Ordering};

use super::bad_requests::raw_virtio::Deadline;
use super::{Env, Outcome, Scenario};
use crate::ring0::MAX_CPUS;

pub const SCENARIO: Scenario = Scenario {
    name: "fault-during-flush",
    description: "vCPUs flush in a loop; the last reads 0x0 once they are under way: #PF report, exit 1",
    run,
};

const SLICE: u64 = 64 * 1024;
/// How long the faulting vCPU waits for the others to get going.
const START_TIMEOUT_MS: u64 = 30_000;

/// Requests each vCPU has completed.
static DONE: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

fn run(env: &Env) -> Outcome {
    let requests = match env.option_u64("requests", 20) {
        Ok(n) => n,
        Err(outcome) => return outcome,
    };
    let flush = match crate::flush::setup(env) {
        Ok(flush) => flush,
        Err(outcome) => return outcome,
    };
    let (_, mine) = match crate::scratch::per_vcpu_slices(env, "fault-during-flush", SLICE) {
        Ok(slices) => slices,
        Err(outcome) => return outcome,
    };
    let faulter = env.vcpu_count - 1;
    let alone = env.vcpu_count == 1;

    if env.vcpu != faulter || alone {
        let mut made = 0u64;
        loop {
            if alone && made == requests {
                break;
            }
            // SAFETY: this vCPU's own slice of scratch RAM.
            unsafe { core::ptr::write_bytes(mine as *mut u8, made as u8, 4096) };
            let len = 64 + (made % 16) * 256;
            if let Err(e) = flush.range(mine + (made % 8) * 64, len) {
                return crate::fail!(
                    "fault-during-flush: FAILED: vcpu {} request {made}: {e}",
                    env.vcpu
                );
            }
            made += 1;
            DONE[env.vcpu as usize].store(made, Ordering::Relaxed);
        }
    } else {
        let deadline = Deadline::after_ms(START_TIMEOUT_MS);
        while (0..faulter).any(|v| DONE[v as usize].load(Ordering::Relaxed) < requests) {
            if deadline.passed() {
                return crate::fail!(
                    "fault-during-flush: FAILED: the other vCPUs did not complete {requests} requests each within 30 s"
                );
            }
            core::hint::spin_loop();
        }
    }
    crate::println!(
        "fault-during-flush: {} completed {requests}+ requests{}; vcpu {} now reads address 0x0",
        if alone { "vcpu 0" } else { "the other vCPUs have each" },
        if alone { "" } else { " and keep making more" },
        env.vcpu
    );
    let address: usize = 0;
    let value: u64;
    // SAFETY: a load from page 0, which is not mapped: it faults, and the
    // exception path never returns here. Assembly, so that the compiler can
    // neither remove nor reason about the null access.
    unsafe {
        core::arch::asm!("mov {value}, qword ptr [{address}]", address = in(reg) address, value = out(reg) value, options(nostack, readonly, preserves_flags));
    }
    crate::fail!("fault-during-flush: FAILED: reading address 0x0 did not fault (read {value:#x})")
}
