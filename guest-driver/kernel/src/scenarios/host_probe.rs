//! `host-probe`: the guest half of the host-side Flush+Reload proof
//! (`vmm_tools::reload_probe`). The host times reloads of guest memory through its
//! *own* mappings of guest RAM after the guest asked the device for a flush:
//! a flush requested by guest-physical address must leave no line of that
//! memory cached under any virtual mapping, the VMM's included. `probe`
//! shows the same from inside the guest; this shows it from the host.
//!
//! The guest only serves requests; the host decides what they prove. Every
//! number (offsets, ops, replies, word encoding, defaults) is in
//! [`cache_flush_abi::host_probe`]. In brief: a region at `buffer=GPA`
//! (default [`DEFAULT_REGION`](host_probe::DEFAULT_REGION), page-aligned, in free scratch RAM) holds a
//! command word the host writes, a reply word the guest writes, and two
//! buffers, target and control. vCPU 0 polls the command word for a command
//! whose sequence number is one more than the last it served (the first is
//! 1), carries out its op through the device (a range flush of the target, a
//! full flush, a no-op exit, or a range flush of one line of the control
//! buffer), then stores the reply word with the same sequence number. `FINISH`
//! ends the run with status 0.
//!
//! What the guest must not do: touch the target or control buffer (every
//! cached line of them is the host's), or print per command (each UART byte
//! is an exit of tens of µs, which would disturb the host's timing). A
//! request the device fails is answered `FAILED` with one line, and the run
//! goes on; an unknown op is answered `BAD_OP` and fails the run; no new
//! command within `timeout=SECS` (default
//! [`DEFAULT_TIMEOUT_SECS`](host_probe::DEFAULT_TIMEOUT_SECS)) fails it
//! too. vCPUs 1.. park after setting up their queues.

use core::sync::atomic::{AtomicU64, Ordering};

use cache_flush_abi::boot::PAGE_SIZE;
use cache_flush_abi::host_probe::{
    self, op, reply, BUFFER_BYTES, COMMAND, CONTROL, REGION_BYTES, REPLY, TARGET,
};

use super::bad_requests::raw_virtio::Deadline;
use super::{Env, Outcome, Scenario};
use crate::flush::Flush;
use crate::scratch;
use crate::status;

pub const SCENARIO: Scenario = Scenario {
    name: "host-probe",
    description: "serves the host's flush commands from a mailbox at buffer=GPA (host-side Flush+Reload); exits 0 on FINISH",
    run,
};

/// How many commands of each op vCPU 0 served, and how many of them it
/// answered other than DONE, for the summary line.
#[derive(Default)]
struct Served {
    target: u64,
    full: u64,
    unsupported: u64,
    noop: u64,
    elsewhere: u64,
    failed: u64,
}

fn run(env: &Env) -> Outcome {
    let options = (|| {
        Ok((
            env.option_u64("buffer", host_probe::DEFAULT_REGION)?,
            env.option_u64("timeout", host_probe::DEFAULT_TIMEOUT_SECS)?,
        ))
    })();
    let (buffer, timeout) = match options {
        Ok(values) => values,
        Err(outcome) => return outcome,
    };
    // Every vCPU checks the same values and leaves the same way, so none is
    // left waiting at setup's barrier.
    if let Err(why) = check_region(env, buffer) {
        return env.bad_option(format_args!(
            "buffer={buffer:#x} (a region of {REGION_BYTES} bytes): {why}"
        ));
    }
    if timeout == 0 {
        return env.bad_option(format_args!(
            "timeout=0: the guest would give up before the host's first command; give at least 1 (seconds)"
        ));
    }
    let flush = match crate::flush::setup(env) {
        Ok(flush) => flush,
        Err(outcome) => return outcome,
    };
    if !env.is_first() {
        return Outcome::Park;
    }
    serve(&flush, buffer, timeout)
}

/// vCPU 0: serves commands until `FINISH`, an unknown op or the timeout.
fn serve(flush: &Flush, buffer: u64, timeout: u64) -> Outcome {
    // SAFETY: `buffer` is page-aligned, identity-mapped RAM clear of the
    // kernel image (checked in `run`), so the word is 8-byte aligned and
    // valid for the whole run; nothing else in the guest uses the region, and
    // the host reaches it only with aligned 8-byte loads and stores through
    // its own mapping, which are atomic on x86-64.
    let command = unsafe { AtomicU64::from_ptr((buffer + COMMAND) as *mut u64) };
    // SAFETY: as for the command word, 64 bytes further on.
    let reply_to_host = unsafe { AtomicU64::from_ptr((buffer + REPLY) as *mut u64) };
    let target = buffer + TARGET;
    let control = buffer + CONTROL;
    let elsewhere = buffer + host_probe::ELSEWHERE;

    // The first deadline reads the TSC rate (CPUID exits) here, before the
    // host's timing starts; later ones reuse it.
    let mut deadline = Deadline::after_ms(timeout.saturating_mul(1000));
    crate::println!(
        "host-probe: region at {buffer:#x} ({REGION_BYTES} bytes): command u64 at +{COMMAND}, reply u64 at +{REPLY}, target {target:#x} and control {control:#x} ({BUFFER_BYTES} bytes each); FLUSH_ALL {}; waiting for the host's commands ({timeout} s at most between two)",
        if flush.features().full() { "offered" } else { "not offered" }
    );
    // The reply word is the guest's: a stale value must not match the host's
    // first sequence number (the host may have filled the region before the
    // boot). The command word is the host's and only read here: a command
    // written before this point is still served.
    reply_to_host.store(0, Ordering::Release);

    let mut served = Served::default();
    let mut last_seq = 0u64;
    loop {
        // Acquire: pairs with the host's store of the command.
        let word = command.load(Ordering::Acquire);
        let (seq, code) = host_probe::split(word);
        if seq != last_seq + 1 {
            // The old command (or 0 before the first): keep polling. The TSC
            // is read in ring 3 without an exit, so every poll may check it.
            if deadline.passed() {
                return if seq == last_seq {
                    crate::fail!(
                        "host-probe: FAILED: no command from the host for {timeout} s (after {last_seq} commands)"
                    )
                } else {
                    crate::fail!(
                        "host-probe: FAILED: no command from the host for {timeout} s (after {last_seq} commands); the command word holds seq {seq} op {code}, expected seq {}",
                        last_seq + 1
                    )
                };
            }
            core::hint::spin_loop();
            continue;
        }

        // The driver's calls return after the device completed the request,
        // so the reply below follows the flush.
        let result = match code {
            op::FLUSH_TARGET => {
                served.target += 1;
                flush.range(target, BUFFER_BYTES).map(|()| reply::DONE)
            }
            op::FLUSH_ALL => {
                served.full += 1;
                if flush.features().full() {
                    flush.all().map(|()| reply::DONE)
                } else {
                    served.unsupported += 1;
                    Ok(reply::UNSUPPORTED)
                }
            }
            op::NOOP_EXIT => {
                served.noop += 1;
                flush.noop_exit();
                Ok(reply::DONE)
            }
            op::FLUSH_ELSEWHERE => {
                served.elsewhere += 1;
                flush
                    .range(elsewhere, host_probe::ELSEWHERE_BYTES)
                    .map(|()| reply::DONE)
            }
            op::FINISH => {
                answer(reply_to_host, seq, reply::DONE);
                crate::println!(
                    "host-probe: FINISH after {last_seq} commands: {} FLUSH_TARGET, {} FLUSH_ALL, {} NOOP_EXIT, {} FLUSH_ELSEWHERE; {} answered UNSUPPORTED, {} answered FAILED",
                    served.target,
                    served.full,
                    served.noop,
                    served.elsewhere,
                    served.unsupported,
                    served.failed
                );
                return Outcome::Exit(status::SUCCESS);
            }
            unknown => {
                answer(reply_to_host, seq, reply::BAD_OP);
                return crate::fail!(
                    "host-probe: FAILED: unknown op {unknown} in command seq {seq}"
                );
            }
        };
        let code = result.unwrap_or_else(|e| {
            served.failed += 1;
            // One line, printed before the reply so that the host's reaction
            // cannot land in the middle of it; the host decides what a
            // failed request means.
            crate::println!("host-probe: command seq {seq} op {code} failed: {e}; answered FAILED");
            reply::FAILED
        });
        answer(reply_to_host, seq, code);
        last_seq = seq;
        deadline = Deadline::after_ms(timeout.saturating_mul(1000));
    }
}

/// Stores the reply for round `seq`. Release: the request (and anything
/// the guest did for it) is done before the host can see the reply.
fn answer(reply_to_host: &AtomicU64, seq: u64, code: u8) {
    reply_to_host.store(host_probe::reply_word(seq, code), Ordering::Release);
}

/// Whether the region `[buffer, buffer + REGION_BYTES)` can be used.
fn check_region(env: &Env, buffer: u64) -> Result<(), &'static str> {
    if buffer % PAGE_SIZE != 0 {
        return Err("not page-aligned (the target and control buffers must be)");
    }
    scratch::check_free_ram(env.boot_info, buffer, REGION_BYTES).map_err(|why| match why {
        scratch::NOT_IN_ONE_RAM_REGION => {
            "not inside one RAM region (pass another buffer= or a larger --memory)"
        }
        other => other,
    })
}
