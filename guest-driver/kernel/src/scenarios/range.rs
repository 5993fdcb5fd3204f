//! `range`: the range call on every kind of range, from vCPU 0.
//!
//! Sizes 1 B, 63, 64, 65, 4 KiB ± 1, 2 MiB + 3, 16 MiB and 64 MiB with
//! unaligned starts and ends, in a buffer of scratch RAM past the kernel image
//! (see [`crate::scratch`]; 68 MiB, so the default 256 MiB guest has room),
//! plus ranges over the 4 KiB-paged boot structures and across the boundary
//! between 4 KiB and 2 MiB pages. Each buffer range is filled with a pattern
//! first (dirty lines for the host to write back) and checked after the flush
//! (a flush must not lose data). Then the edge cases: length 0 (Ok, and no
//! request: far faster than one exit), unmapped addresses (page 0, past the
//! identity map, non-canonical: `Unmapped` naming the first bad address,
//! nothing sent), an overflowing range (`AddressOverflow`), and ranges the
//! device itself refuses (the MMIO hole, past the end of RAM: status
//! OUT_OF_RANGE). One line per case; the first unexpected result fails.
//!
//! The other vCPUs only help set the driver up, then park.

use guest_driver::{Error, Status};

use super::{Env, Outcome, Scenario};
use crate::cpu::timed;
use crate::scratch::Scratch;
use crate::status;

pub const SCENARIO: Scenario = Scenario {
    name: "range",
    description: "range flushes of 1 B to 64 MiB, unaligned; length 0, unmapped, overflowing, outside RAM",
    run,
};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
/// The scratch buffer: the largest case (64 MiB) at an unaligned offset, with
/// room to spare.
const BUFFER: u64 = 68 * MIB;
/// A call that sends no request returns well within this many TSC cycles;
/// one exit to the VMM alone costs ~40,000 (HOST-NOTES), a request more.
const NO_REQUEST_CYCLES: u64 = 20_000;

/// What a case must return.
#[derive(Clone, Copy)]
enum Expect {
    /// Ok, after a real request; `fill` says the range is in the scratch
    /// buffer, to be filled before and checked after.
    Flushed { fill: bool },
    /// Ok without any request (length 0).
    NoRequest,
    /// This error.
    Refused(Error),
}

struct Case {
    name: &'static str,
    va: u64,
    len: u64,
    expect: Expect,
}

fn run(env: &Env) -> Outcome {
    let flush = match crate::flush::setup(env) {
        Ok(flush) => flush,
        Err(outcome) => return outcome,
    };
    if !env.is_first() {
        return Outcome::Park;
    }
    let mut scratch = Scratch::new(env.boot_info);
    let b = match scratch.take(BUFFER, 2 * MIB) {
        Ok(base) => base,
        Err(e) => return crate::fail!("range: {e}"),
    };
    let info = env.boot_info;
    let ram_end = info.ram_regions().first().map_or(0, |r| r.base + r.size);
    let map_end = info.identity_map_end;
    crate::println!(
        "range: buffer of {} MiB at {b:#x} (scratch RAM past the kernel image); identity map ends at {map_end:#x}, first RAM region ends at {ram_end:#x}",
        BUFFER / MIB
    );

    let fill = Expect::Flushed { fill: true };
    // One case a line reads best as a table.
    #[rustfmt::skip]
    let cases = [
        Case { name: "1 B, mid-line", va: b + 5, len: 1, expect: fill },
        Case { name: "63 B, across a line boundary", va: b + 0x1021, len: 63, expect: fill },
        Case { name: "64 B, line-aligned", va: b + 0x2000, len: 64, expect: fill },
        Case { name: "64 B, unaligned (2 lines)", va: b + 0x2020, len: 64, expect: fill },
        Case { name: "65 B", va: b + 0x3000, len: 65, expect: fill },
        Case { name: "4 KiB - 1, unaligned start", va: b + 0x4001, len: 4 * KIB - 1, expect: fill },
        Case { name: "4 KiB + 1, across a page", va: b + 0x5fff, len: 4 * KIB + 1, expect: fill },
        Case { name: "2 MiB + 3, across a 2 MiB page", va: b + 2 * MIB - 0x801, len: 2 * MIB + 3, expect: fill },
        Case { name: "16 MiB, line- not page-aligned", va: b + 0x40, len: 16 * MIB, expect: fill },
        Case { name: "64 MiB, unaligned both ends", va: b + 0x1_0007, len: 64 * MIB, expect: fill },
        Case { name: "boot structures, 4 KiB pages", va: 0x1008, len: 0x2000, expect: Expect::Flushed { fill: false } },
        Case { name: "across 4 KiB into 2 MiB pages", va: 0x1f_f010, len: 0x2000, expect: Expect::Flushed { fill: false } },
        Case { name: "length 0 at 0x0", va: 0, len: 0, expect: Expect::NoRequest },
        Case { name: "length 0 at the top of memory", va: u64::MAX, len: 0, expect: Expect::NoRequest },
        Case { name: "page 0 (not mapped)", va: 0, len: 64, expect: Expect::Refused(Error::Unmapped { va: 0 }) },
        Case { name: "page 0, mid-page", va: 0x10, len: 1, expect: Expect::Refused(Error::Unmapped { va: 0x10 }) },
        Case { name: "runs past the identity map", va: map_end - 0x100, len: 0x200, expect: Expect::Refused(Error::Unmapped { va: map_end }) },
        Case { name: "non-canonical address", va: 0x0000_8000_0000_0000, len: 64, expect: Expect::Refused(Error::Unmapped { va: 0x0000_8000_0000_0000 }) },
        Case { name: "ends exactly at 2^64 (unmapped)", va: 0xffff_ffff_ffff_f000, len: 0x1000, expect: Expect::Refused(Error::Unmapped { va: 0xffff_ffff_ffff_f000 }) },
        Case { name: "overflowing range", va: u64::MAX - 0xf, len: 0x20, expect: Expect::Refused(Error::AddressOverflow) },
        Case { name: "MMIO hole (not RAM)", va: 0xc000_0000, len: 64, expect: Expect::Refused(Error::Status(Status::OutOfRange)) },
        Case { name: "across the end of RAM", va: ram_end - 64, len: 128, expect: Expect::Refused(Error::Status(Status::OutOfRange)) },
    ];

    for (index, case) in cases.iter().enumerate() {
        if let Err(reason) = run_case(&flush, index, case) {
            return crate::fail!(
                "range: FAILED: {} (va {:#x}, len {:#x}): {reason}",
                case.name,
                case.va,
                case.len
            );
        }
    }
    crate::println!("range: all {} cases gave the expected result", cases.len());
    Outcome::Exit(status::SUCCESS)
}

/// Runs one case and prints its line; `Err` says what was unexpected.
fn run_case(flush: &crate::flush::Flush, index: usize, case: &Case) -> Result<(), &'static str> {
    let pattern = (index as u8).wrapping_mul(37) | 1;
    if let Expect::Flushed { fill: true } = case.expect {
        // SAFETY: the range lies inside this scenario's scratch buffer
        // (identity-mapped RAM nobody else uses), as the case table is built.
        unsafe { core::ptr::write_bytes(case.va as *mut u8, pattern, case.len as usize) };
    }
    let (result, cycles) = match case.expect {
        // A no-request call is timed several times and the fastest kept, so
        // that a host preemption cannot make it look like a request.
        Expect::NoRequest => (0..5)
            .map(|_| timed(|| flush.range(case.va, case.len)))
            .min_by_key(|(_, cycles)| *cycles)
            .unwrap_or((Ok(()), 0)),
        _ => timed(|| flush.range(case.va, case.len)),
    };
    let line = |verdict: &dyn core::fmt::Display| {
        crate::println!(
            "range: {:<34} va={:#018x} len={:#010x}: {verdict}",
            case.name,
            case.va,
            case.len
        )
    };
    match (case.expect, result) {
        (Expect::Flushed { fill }, Ok(())) => {
            if fill {
                // SAFETY: as for the fill above.
                let bytes =
                    unsafe { core::slice::from_raw_parts(case.va as *const u8, case.len as usize) };
                if bytes.iter().any(|&b| b != pattern) {
                    line(&"Ok, but the data changed");
                    return Err("the flushed range no longer holds what was written");
                }
            }
            line(&format_args!("Ok in {cycles} cycles"));
            Ok(())
        }
        (Expect::NoRequest, Ok(())) => {
            line(&format_args!("Ok in {cycles} cycles, no request"));
            if cycles > NO_REQUEST_CYCLES {
                return Err("took as long as a request: length 0 must not reach the device");
            }
            Ok(())
        }
        (Expect::Refused(expected), Err(e)) if e == expected => {
            line(&format_args!("refused as expected: {e}"));
            Ok(())
        }
        (_, Ok(())) => {
            line(&"Ok (unexpected)");
            Err("expected an error, got Ok")
        }
        (_, Err(e)) => {
            line(&format_args!("unexpected error: {e} ({e:?})"));
            Err("unexpected error")
        }
    }
}
