//! `handoff`: the guest half of a confidential-VM memory hand-off, for a host
//! program that maps the same buffer a second time (`RunningVm::alias`) and
//! plays the host half (`vmm/examples/handoff.rs`, `tests/handoff.rs`).
//!
//! Options: `buffer=GPA` (default [`DEFAULT_BUFFER`], printed), `len=N` bytes
//! (default 64 KiB, a multiple of 64, at least 128) and `timeout=SECS`
//! (default 10): how long vCPU 0 waits for the host.
//!
//! The protocol, through a mailbox `u64` at `buffer` (the first cache line;
//! the data is `[buffer + 64, buffer + len)`):
//!
//! 1. the guest writes [`GUEST_PATTERN`]` ^ offset` into every `u64` of the
//!    data (`offset` from the data's start), range-flushes the data through
//!    the device, and sets the mailbox to [`HANDED_TO_HOST`] (1);
//! 2. the host sees 1, checks the guest pattern, writes
//!    [`HOST_PATTERN`]` ^ offset` into every `u64` of the data, and sets the
//!    mailbox to [`HOST_DONE`] (2);
//! 3. the guest sees 2, invalidates the data (a range flush: no stale line
//!    may survive on any CPU), reads it back, checks the host pattern, sets
//!    the mailbox to [`GUEST_VERIFIED`] (3) and exits 0.
//!
//! `variant=` plants the bug a dirty-page audit (`--audit`) must find; the
//! data stays correct in every variant, so no data check can:
//! * `flush` (default): as above;
//! * `no-flush`: step 1 hands the data over without flushing it;
//! * `late-write`: step 1 flushes, then writes the word at buffer offset
//!   [`LATE_WRITE_OFFSET`] once more (the same value) before handing over.
//!
//! On a wrong word the guest prints one line naming it and exits 1; if the
//! mailbox does not reach 2 within the timeout it prints one line saying so
//! and exits 1. Meanwhile vCPUs 1.. keep reading the data, so every vCPU has
//! its lines cached when the guest asks for the invalidation.

use core::sync::atomic::{AtomicU64, Ordering};


use super::bad_requests::raw_virtio::Deadline;
use super::{Env, Outcome, Scenario};
use crate::scratch;
use crate::status;

pub const SCENARIO: Scenario = Scenario {
    name: "handoff",
    description: "hands buffer=GPA (len=N) to the host and back through a mailbox u64; see README",
    run,
};

/// The buffer without a `buffer=` option: 16 MiB, in the scratch RAM of any
/// guest of at least 17 MiB (the default is 256 MiB).
pub const DEFAULT_BUFFER: u64 = 0x100_0000;
/// The default `len=`.
pub const DEFAULT_LEN: u64 = 64 * 1024;
/// The default `timeout=`, in seconds.
pub const DEFAULT_TIMEOUT_SECS: u64 = 10;
/// The mailbox line; the data starts after it.
pub const MAILBOX_BYTES: u64 = 64;

/// Mailbox: the guest has written and flushed its pattern.
pub const HANDED_TO_HOST: u64 = 1;
/// Mailbox: the host has checked it and written its own.
pub const HOST_DONE: u64 = 2;
/// Mailbox: the guest has invalidated the data and found the host's pattern.
pub const GUEST_VERIFIED: u64 = 3;

/// The `u64` at data offset `o` is `GUEST_PATTERN ^ o` ("GUEST" in the top
/// bytes) after step 1 and `HOST_PATTERN ^ o` ("HOST") after step 2.
pub const GUEST_PATTERN: u64 = 0x4755_4553_5400_0000;
/// See [`GUEST_PATTERN`].
pub const HOST_PATTERN: u64 = 0x484f_5354_0000_0000;

/// The buffer offset (third page) of the word `variant=late-write` writes
/// again after the flush.
pub const LATE_WRITE_OFFSET: u64 = 0x2008;

/// What step 1 does (`variant=`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    Flush,
    NoFlush,
    LateWrite,
}

/// Mailbox value until the host has answered, read by the other vCPUs to
/// know when to stop reading the data.
static DONE: AtomicU64 = AtomicU64::new(0);

fn run(env: &Env) -> Outcome {
    let options = (|| {
        Ok((
            env.option_u64("buffer", DEFAULT_BUFFER)?,
            env.option_u64("len", DEFAULT_LEN)?,
            env.option_u64("timeout", DEFAULT_TIMEOUT_SECS)?,
        ))
    })();
    let (buffer, len, timeout) = match options {
        Ok(values) => values,
        Err(outcome) => return outcome,
    };
    let variant = match env.cmdline.get("variant") {
        None | Some("flush") => Variant::Flush,
        Some("no-flush") => Variant::NoFlush,
        Some("late-write") => Variant::LateWrite,
        Some(other) => {
            return env.bad_option(format_args!(
                "variant={other}: expected flush, no-flush or late-write"
            ))
        }
    };
    if variant == Variant::LateWrite && len < LATE_WRITE_OFFSET + 8 {
        return env.bad_option(format_args!(
            "variant=late-write needs len >= {:#x}",
            LATE_WRITE_OFFSET + 8
        ));
    }
    if let Err(why) = check_buffer(env, buffer, len) {
        return env.bad_option(format_args!("buffer={buffer:#x} len={len}: {why}"));
    }
    let flush = match crate::flush::setup(env) {
        Ok(flush) => flush,
        Err(outcome) => return outcome,
    };
    let data = buffer + MAILBOX_BYTES;
    let words = (len - MAILBOX_BYTES) / 8;
    // SAFETY: `buffer` is 64-byte aligned, identity-mapped RAM clear of the
    // kernel image (checked above); the host reaches the same u64 only with
    // plain loads and stores through its own mapping.
    let mailbox = unsafe { AtomicU64::from_ptr(buffer as *mut u64) };
    let word = |i: u64| (data + 8 * i) as *mut u64;

    if !env.is_first() {
        // Keep the data cached on this vCPU until vCPU 0 is done with it.
        let mut sum = 0u64;
        while DONE.load(Ordering::Relaxed) == 0 {
            for i in (0..words).step_by(8) {
                // SAFETY: a word of the checked buffer; plain data.
                sum = sum.wrapping_add(unsafe { word(i).read_volatile() });
            }
        }
        core::hint::black_box(sum);
        return Outcome::Park;
    }

    crate::println!(
        "handoff: buffer at {buffer:#x}, {len} bytes: mailbox u64 at +0, data at +{MAILBOX_BYTES}; waiting about {timeout} s at most for the host"
    );
    mailbox.store(0, Ordering::SeqCst);
    for i in 0..words {
        // SAFETY: a word of the checked buffer, which only this vCPU writes
        // until it hands the buffer over.
        unsafe { word(i).write_volatile(GUEST_PATTERN ^ (8 * i)) };
    }
    if variant != Variant::NoFlush {
        if let Err(e) = flush.range(data, len - MAILBOX_BYTES) {
            DONE.store(1, Ordering::Relaxed);
            return crate::fail!("handoff: FAILED: flushing the guest pattern: {e}");
        }
    }
    if variant == Variant::LateWrite {
        let o = LATE_WRITE_OFFSET - MAILBOX_BYTES;
        // SAFETY: a word of the checked buffer (len was checked above); the
        // same value again: a write after the flush that changes no data.
        unsafe { ((data + o) as *mut u64).write_volatile(GUEST_PATTERN ^ o) };
    }
    // Printed before the mailbox moves, so that the host's own lines never
    // land in the middle of this one.
    crate::println!(
        "handoff: guest pattern written{}; mailbox=1: handed to the host",
        match variant {
            Variant::Flush => " and flushed",
            Variant::NoFlush => ", NOT flushed (variant=no-flush)",
            Variant::LateWrite => " and flushed, then one word written again (variant=late-write)",
        }
    );
    // Release: the pattern before the mailbox value that hands it over.
    mailbox.store(HANDED_TO_HOST, Ordering::Release);

    let deadline = Deadline::after_ms(timeout.saturating_mul(1000));
    let seen = loop {
        let value = mailbox.load(Ordering::Acquire);
        if value != HANDED_TO_HOST || deadline.passed() {
            break value;
        }
        core::hint::spin_loop();
    };
    DONE.store(1, Ordering::Relaxed);
    if seen == HANDED_TO_HOST {
        return crate::fail!(
            "handoff: FAILED: no answer from the host: mailbox still 1 after about {timeout} s; the host must write 2"
        );
    }
    if seen != HOST_DONE {
        return crate::fail!("handoff: FAILED: the host wrote {seen} to the mailbox, expected 2");
    }
    // Invalidate before reading: no line cached before the hand-over may
    // survive on any CPU.
    if let Err(e) = flush.range(data, len - MAILBOX_BYTES) {
        return crate::fail!("handoff: FAILED: invalidating the data: {e}");
    }
    for i in 0..words {
        // SAFETY: a word of the checked buffer; the host is done with it.
        let value = unsafe { word(i).read_volatile() };
        let expected = HOST_PATTERN ^ (8 * i);
        if value != expected {
            return crate::fail!(
                "handoff: FAILED: data word at +{:#x} (gpa {:#x}) is {value:#018x}, expected the host's {expected:#018x}",
                8 * i,
                data + 8 * i
            );
        }
    }
    crate::println!(
        "handoff: mailbox=2; data invalidated and read back: the host's pattern in all {} bytes; mailbox=3",
        len - MAILBOX_BYTES
    );
    mailbox.store(GUEST_VERIFIED, Ordering::Release);
    Outcome::Exit(status::SUCCESS)
}

/// Whether `[buffer, buffer + len)` can be handed over.
fn check_buffer(env: &Env, buffer: u64, len: u64) -> Result<(), &'static str> {
    if buffer % MAILBOX_BYTES != 0 {
        return Err("the buffer must be 64-byte aligned (the mailbox is its first cache line)");
    }
    if len < 2 * MAILBOX_BYTES || len % MAILBOX_BYTES != 0 {
        return Err("len must be a multiple of 64, at least 128 (mailbox line + data)");
    }
    scratch::check_free_ram(env.boot_info, buffer, len).map_err(|why| match why {
        scratch::NOT_IN_ONE_RAM_REGION => {
            "not inside one RAM region (pass another buffer= or a larger --memory)"
        }
        other => other,
    })
}
