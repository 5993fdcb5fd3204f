//! `bad-requests`: a hostile guest. Every vCPU drives a split queue of its
//! own, built by hand in identity-mapped RAM (virtual address = guest-physical
//! address), and submits every malformed request of
//! `resources/validation-table.md` that a guest can express, one at a time,
//! checking that each gets its documented answer: the status byte, or a used
//! length of 0 with the status byte left alone. Valid requests are mixed in
//! (before, between and after) to show that the device still serves them.
//!
//! Three phases, each after a reset and a hand-made initialisation:
//! A with every offered feature accepted (all the request rules), B without
//! F_FULL and C without F_RANGE (the feature rule). Then the guest driver
//! takes the device over (`flush::setup`: a reset and a normal
//! initialisation) and every vCPU makes a good range flush and a good full
//! flush (Unsupported where FLUSH_ALL is not offered).
//!
//! vCPU 0 prints one line per case (`bad-requests: A09 chain-too-long ...:
//! got INVALID, expected INVALID: ok`); other vCPUs print only their
//! mismatches. Exit 0 when every answer on every vCPU matched.
//!
//! Each vCPU's 64 KiB area comes from scratch RAM rather than a static:
//! 32 vCPUs' worth would not fit in the kernel image's 4 MiB.
//!
//! Not expressed here: the rate limit (rule 18, a policy rather than a
//! malformed request; see `busy-requests` with `--full-flush-rate`) and the
//! transport's register rules (unit-tested in `devices`).

#[path = "raw_virtio.rs"]
pub(super) mod raw_virtio;

use core::fmt;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use cache_flush_abi::boot::{HIGH_RAM_START, KERNEL_MIN_GPA, MMIO_HOLE_START};
use cache_flush_abi::cache_flush::{RequestType, Status, HEADER_SIZE, SEGMENT_SIZE};
use guest_driver::Error;

use self::raw_virtio::{
    Area, Deadline, RawDevice, RawQueue, DESC_INDIRECT, DESC_NEXT, DESC_WRITE, FULL, RANGE,
    VERSION_1,
};
use super::{Env, Outcome, Scenario};
use crate::scratch::Scratch;
use crate::status;

pub const SCENARIO: Scenario = Scenario {
    name: "bad-requests",
    description: "a hostile guest: every malformed request a guest can build, each must get its documented answer",
    run,
};

// Layout of one vCPU's area.
const AREA_SIZE: u64 = 64 * 1024;
/// The status byte (and 7 more bytes for a longer writable part).
const STATUS: u64 = 0x200;
/// The request: header, then segments.
const REQ: u64 = 0x1000;
const REQ_LEN: u64 = 0x3000;
/// Lines the valid requests flush.
const DATA: u64 = 0x4000;
const DATA_LEN: u64 = 0x1000;
/// An indirect descriptor table of [`TABLE_ENTRIES`].
const TABLE: u64 = 0x5000;
/// One more than the device's chain limit (1024).
const TABLE_ENTRIES: u64 = 1025;
/// One readable byte, for the indirect table's entries.
const BYTE: u64 = TABLE + 16 * TABLE_ENTRIES;
const _: () = assert!(BYTE < AREA_SIZE);

const QUEUE_SIZE: u16 = 16;
/// What the status byte holds before each request: not a status.
const UNTOUCHED: u8 = 0xff;
/// An address in the MMIO hole with no device.
const HOLE: u64 = MMIO_HOLE_START + 0x2000_0000;
/// How long one request may take before the scenario gives up.
const REQUEST_TIMEOUT_MS: u64 = 5_000;

const T_RANGE: u32 = RequestType::FlushRange as u32;
const T_ALL: u32 = RequestType::FlushAll as u32;

/// What one vCPU needs to build a case.
struct Ctx {
    area: Area,
    range: bool,
    full: bool,
    max_segments: u32,
    max_bytes: u64,
    /// First address past the last RAM region.
    ram_end: u64,
    /// Size of the RAM region at 0.
    low_ram: u64,
    two_regions: bool,
}

impl Ctx {
    fn header(&self, request_type: u32, flags: u32) {
        self.area.write(REQ, request_type);
        self.area.write(REQ + 4, flags);
    }

    fn segment(&self, index: u64, addr: u64, len: u64) {
        let offset = REQ + HEADER_SIZE as u64 + SEGMENT_SIZE as u64 * index;
        self.area.write(offset, addr);
        self.area.write(offset + 8, len);
    }

    /// The first `len` bytes of the request, readable.
    fn req(&self, len: u64) -> (u64, u32, bool) {
        (self.area.gpa(REQ), len as u32, false)
    }

    /// The status byte, writable.
    fn status(&self) -> (u64, u32, bool) {
        (self.area.gpa(STATUS), 1, true)
    }

    fn data(&self) -> u64 {
        self.area.gpa(DATA)
    }

    /// Segments the request buffer holds.
    fn capacity(&self) -> u64 {
        (REQ_LEN - HEADER_SIZE as u64) / SEGMENT_SIZE as u64
    }

    /// `status` if FLUSH_RANGE was negotiated, else UNSUPPORTED (rule 9
    /// comes before every rule about flags and segments).
    fn range_answer(&self, status: Status) -> Expect {
        Expect::Status(if self.range { status } else { Status::Unsupported })
    }

    /// The same for FLUSH_ALL.
    fn full_answer(&self, status: Status) -> Expect {
        Expect::Status(if self.full { status } else { Status::Unsupported })
    }

    /// A FLUSH_RANGE of one valid segment and a status byte.
    fn one_range(&self, q: &RawQueue) {
        self.header(T_RANGE, 0);
        self.segment(0, self.data(), 64);
        q.set_chain(&[self.req(32), self.status()]);
    }

    /// A FLUSH_RANGE whose segments are `segments`, with a status byte.
    fn range_of(&self, q: &RawQueue, segments: &[(u64, u64)]) -> Expect {
        self.header(T_RANGE, 0);
        for (i, &(addr, len)) in segments.iter().enumerate() {
            self.segment(i as u64, addr, len);
        }
        let len = HEADER_SIZE as u64 + SEGMENT_SIZE as u64 * segments.len() as u64;
        q.set_chain(&[self.req(len), self.status()]);
        Expect::Status(Status::Ok)
    }
}

/// The documented answer to a case.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Used length 1, this status byte.
    Status(Status),
    /// Used length 0, the status byte left alone.
    NoStatus,
}

/// What the device did.
#[derive(Clone, Copy)]
struct Got {
    id: u32,
    len: u32,
    status: u8,
}

impl Got {
    fn matches(&self, expect: Expect) -> bool {
        self.id == 0
            && match expect {
                Expect::Status(s) => self.len == 1 && self.status == s as u8,
                Expect::NoStatus => self.len == 0 && self.status == UNTOUCHED,
            }
    }
}

fn status_name(raw: u8) -> &'static str {
    match Status::from_raw(raw) {
        Some(Status::Ok) => "OK",
        Some(Status::Invalid) => "INVALID",
        Some(Status::Unsupported) => "UNSUPPORTED",
        Some(Status::OutOfRange) => "OUT_OF_RANGE",
        Some(Status::TooLarge) => "TOO_LARGE",
        Some(Status::Busy) => "BUSY",
        Some(Status::HostError) => "HOST_ERROR",
        None if raw == UNTOUCHED => "untouched",
        None => "not a status",
    }
}

impl fmt::Display for Expect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expect::Status(s) => f.write_str(status_name(*s as u8)),
            Expect::NoStatus => f.write_str("no status (used len 0)"),
        }
    }
}

impl fmt::Display for Got {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.len, self.status) {
            (0, UNTOUCHED) => f.write_str("no status (used len 0)")?,
            (0, s) => write!(f, "used len 0 but status byte {s:#x}")?,
            (1, s) => f.write_str(status_name(s))?,
            (len, s) => write!(f, "used len {len}, status byte {s:#x}")?,
        }
        if self.id != 0 {
            write!(f, " (used id {}, not 0)", self.id)?;
        }
        Ok(())
    }
}

/// One case: builds its chain at descriptor 0 and returns the documented
/// answer, or `None` when this configuration cannot express it.
struct Case {
    /// The rule's name in the host log (`rule=`), or `valid` / `order`.
    rule: &'static str,
    what: &'static str,
    build: fn(&Ctx, &RawQueue) -> Option<Expect>,
}

/// Phase A: every offered feature accepted.
const CASES_A: &[Case] = &[
    Case {
        rule: "valid",
        what: "FLUSH_RANGE, one 64-byte segment",
        build: |c, q| {
            c.one_range(q);
            Some(c.range_answer(Status::Ok))
        },
    },
    Case {
        rule: "valid",
        what: "header and segments split at odd bytes (7+20+0+21), 8-byte writable part",
        build: |c, q| {
            c.header(T_RANGE, 0);
            c.segment(0, c.data(), 100);
            c.segment(1, c.data() + 2048, 1);
            let base = c.area.gpa(REQ);
            q.set_chain(&[
                (base, 7, false),
                (base + 7, 20, false),
                (base + 27, 0, false),
                (base + 27, 21, false),
                (c.area.gpa(STATUS), 8, true),
            ]);
            Some(c.range_answer(Status::Ok))
        },
    },
    Case {
        rule: "valid",
        what: "FLUSH_RANGE without segments",
        build: |c, q| {
            c.header(T_RANGE, 0);
            q.set_chain(&[c.req(16), c.status()]);
            Some(c.range_answer(Status::Ok))
        },
    },
    Case {
        rule: "valid",
        what: "FLUSH_ALL",
        build: |c, q| {
            c.header(T_ALL, 0);
            q.set_chain(&[c.req(16), c.status()]);
            Some(c.full_answer(Status::Ok))
        },
    },
    Case {
        rule: "no-status-byte",
        what: "no writable descriptor",
        build: |c, q| {
            c.header(T_RANGE, 0);
            q.set_chain(&[c.req(16)]);
            Some(Expect::NoStatus)
        },
    },
    Case {
        rule: "no-status-byte",
        what: "writable descriptor of 0 bytes",
        build: |c, q| {
            c.header(T_RANGE, 0);
            q.set_chain(&[c.req(16), (c.area.gpa(STATUS), 0, true)]);
            Some(Expect::NoStatus)
        },
    },
    Case {
        rule: "status-outside-memory",
        what: "status byte just past the end of RAM",
        build: |c, q| {
            c.header(T_RANGE, 0);
            q.set_chain(&[c.req(16), (c.ram_end, 1, true)]);
            Some(Expect::NoStatus)
        },
    },
    Case {
        rule: "status-outside-memory",
        what: "status byte in the MMIO hole",
        build: |c, q| {
            c.header(T_RANGE, 0);
            q.set_chain(&[c.req(16), (HOLE, 1, true)]);
            Some(Expect::NoStatus)
        },
    },
    Case {
        rule: "chain-too-long",
        what: "indirect table of 1025 descriptors",
        build: |c, q| {
            let table = c.area.sub(TABLE, 16 * TABLE_ENTRIES);
            for i in 0..TABLE_ENTRIES {
                let (addr, len, mut flags) = if i == 0 {
                    (c.area.gpa(STATUS), 1u32, DESC_WRITE)
                } else {
                    (c.area.gpa(BYTE), 1, 0)
                };
                if i + 1 < TABLE_ENTRIES {
                    flags |= DESC_NEXT;
                }
                table.write(16 * i, addr);
                table.write(16 * i + 8, len);
                table.write(16 * i + 12, flags);
                table.write(16 * i + 14, (i + 1) as u16);
            }
            q.set_desc(
                0,
                table.gpa(0),
                (16 * TABLE_ENTRIES) as u32,
                DESC_INDIRECT,
                0,
            );
            Some(Expect::Status(Status::Invalid))
        },
    },
    Case {
        rule: "broken-chain",
        what: "chain loops (0 -> 1 -> 0 ...)",
        build: |c, q| {
            c.one_range(q);
            q.set_desc(0, c.area.gpa(REQ), 32, DESC_NEXT, 1);
            q.set_desc(1, c.area.gpa(STATUS), 1, DESC_WRITE | DESC_NEXT, 0);
            Some(Expect::Status(Status::Invalid))
        },
    },
    Case {
        rule: "broken-chain",
        what: "next index outside the descriptor table",
        build: |c, q| {
            c.one_range(q);
            q.set_desc(1, c.area.gpa(STATUS), 1, DESC_WRITE | DESC_NEXT, QUEUE_SIZE);
            Some(Expect::Status(Status::Invalid))
        },
    },
    Case {
        rule: "writable-before-readable",
        what: "status descriptor first, the request after it",
        build: |c, q| {
            c.header(T_RANGE, 0);
            c.segment(0, c.data(), 64);
            q.set_chain(&[c.status(), c.req(32)]);
            Some(Expect::Status(Status::Invalid))
        },
    },
    Case {
        rule: "descriptor-outside-memory",
        what: "readable descriptor in the MMIO hole",
        build: |c, q| {
            c.header(T_RANGE, 0);
            q.set_chain(&[c.req(16), (HOLE, 16, false), c.status()]);
            Some(Expect::Status(Status::Invalid))
        },
    },
    Case {
        rule: "descriptor-outside-memory",
        what: "readable descriptor running off the end of RAM",
        build: |c, q| {
            c.header(T_RANGE, 0);
            q.set_chain(&[c.req(16), (c.ram_end - 8, 16, false), c.status()]);
            Some(Expect::Status(Status::Invalid))
        },
    },
    Case {
        rule: "too-short",
        what: "15 readable bytes",
        build: |c, q| {
            c.header(T_RANGE, 0);
            q.set_chain(&[c.req(15), c.status()]);
            Some(Expect::Status(Status::Invalid))
        },
    },
    Case {
        rule: "too-short",
        what: "no readable bytes",
        build: |c, q| {
            q.set_chain(&[c.status()]);
            Some(Expect::Status(Status::Invalid))
        },
    },
    Case {
        rule: "unknown-type",
        what: "type 0",
        build: |c, q| {
            c.header(0, 0);
            q.set_chain(&[c.req(16), c.status()]);
            Some(Expect::Status(Status::Unsupported))
        },
    },
    Case {
        rule: "unknown-type",
        what: "type 3",
        build: |c, q| {
            c.header(3, 0);
            q.set_chain(&[c.req(16), c.status()]);
            Some(Expect::Status(Status::Unsupported))
        },
    },
    Case {
        rule: "nonzero-flags",
        what: "FLUSH_RANGE with flags 1",
        build: |c, q| {
            c.one_range(q);
            c.header(T_RANGE, 1);
            Some(c.range_answer(Status::Invalid))
        },
    },
    Case {
        rule: "nonzero-flags",
        what: "FLUSH_ALL with flags 0x80000000",
        build: |c, q| {
            c.header(T_ALL, 0x8000_0000);
            q.set_chain(&[c.req(16), c.status()]);
            Some(c.full_answer(Status::Invalid))
        },
    },
    Case {
        rule: "payload-not-segments",
        what: "8 bytes after a segment",
        build: |c, q| {
            c.one_range(q);
            q.set_chain(&[c.req(40), c.status()]);
            Some(c.range_answer(Status::Invalid))
        },
    },
    Case {
        rule: "payload-not-segments",
        what: "1 byte after the header",
        build: |c, q| {
            c.header(T_RANGE, 0);
            q.set_chain(&[c.req(17), c.status()]);
            Some(c.range_answer(Status::Invalid))
        },
    },
    Case {
        rule: "flush-all-with-segments",
        what: "FLUSH_ALL with one segment",
        build: |c, q| {
            c.header(T_ALL, 0);
            c.segment(0, c.data(), 64);
            q.set_chain(&[c.req(32), c.status()]);
            Some(c.full_answer(Status::Invalid))
        },
    },
    Case {
        rule: "too-many-segments",
        what: "max_segments + 1 segments",
        build: |c, q| {
            let count = u64::from(c.max_segments) + 1;
            if count > c.capacity() {
                return None;
            }
            let segments = (0..count).map(|i| (c.data() + 64 * (i % 64), 64));
            for (i, (addr, len)) in segments.enumerate() {
                c.segment(i as u64, addr, len);
            }
            c.header(T_RANGE, 0);
            q.set_chain(&[c.req(16 + 16 * count), c.status()]);
            Some(c.range_answer(Status::TooLarge))
        },
    },
    Case {
        rule: "zero-length-segment",
        what: "second segment of length 0",
        build: |c, q| {
            c.range_of(q, &[(c.data(), 64), (c.data() + 64, 0)]);
            Some(c.range_answer(Status::Invalid))
        },
    },
    Case {
        rule: "segment-overflow",
        what: "addr 2^64 - 64, len 128",
        build: |c, q| {
            c.range_of(q, &[(u64::MAX - 63, 128)]);
            Some(c.range_answer(Status::Invalid))
        },
    },
    Case {
        rule: "segment-overflow",
        what: "len 2^64 - 1",
        build: |c, q| {
            c.range_of(q, &[(c.data(), u64::MAX)]);
            Some(c.range_answer(Status::Invalid))
        },
    },
    Case {
        rule: "segment-out-of-range",
        what: "segment in the MMIO hole",
        build: |c, q| {
            c.range_of(q, &[(HOLE, 64)]);
            Some(c.range_answer(Status::OutOfRange))
        },
    },
    Case {
        rule: "segment-out-of-range",
        what: "segment just past the end of RAM",
        build: |c, q| {
            c.range_of(q, &[(c.ram_end, 64)]);
            Some(c.range_answer(Status::OutOfRange))
        },
    },
    Case {
        rule: "segment-out-of-range",
        what: "segment running off the end of RAM",
        build: |c, q| {
            c.range_of(q, &[(c.ram_end - 64, 128)]);
            Some(c.range_answer(Status::OutOfRange))
        },
    },
    Case {
        rule: "segment-out-of-range",
        what: "segment across the MMIO hole, 3 GiB - 64 to 4 GiB + 64",
        build: |c, q| {
            let start = MMIO_HOLE_START - 64;
            c.range_of(q, &[(start, HIGH_RAM_START + 64 - start)]);
            Some(c.range_answer(Status::OutOfRange))
        },
    },
    Case {
        rule: "too-many-bytes",
        what: "segments over low RAM adding up to max_bytes + more",
        build: |c, q| {
            let seg_len = (c.low_ram - KERNEL_MIN_GPA).min(c.max_bytes);
            let count = c.max_bytes / seg_len + 1;
            if count > u64::from(c.max_segments) || count > c.capacity() {
                return None;
            }
            for i in 0..count {
                c.segment(i, KERNEL_MIN_GPA, seg_len);
            }
            c.header(T_RANGE, 0);
            q.set_chain(&[c.req(16 + 16 * count), c.status()]);
            Some(c.range_answer(Status::TooLarge))
        },
    },
    Case {
        rule: "order",
        what: "type 3 with flags 1: unknown type decides",
        build: |c, q| {
            c.header(3, 1);
            q.set_chain(&[c.req(16), c.status()]);
            Some(Expect::Status(Status::Unsupported))
        },
    },
    Case {
        rule: "order",
        what: "max_segments + 1 segments, the first of length 0: count decides",
        build: |c, q| {
            let count = u64::from(c.max_segments) + 1;
            if count > c.capacity() {
                return None;
            }
            for i in 0..count {
                c.segment(i, c.data(), if i == 0 { 0 } else { 64 });
            }
            c.header(T_RANGE, 0);
            q.set_chain(&[c.req(16 + 16 * count), c.status()]);
            Some(c.range_answer(Status::TooLarge))
        },
    },
    Case {
        rule: "order",
        what: "segment in the hole, then one of length 0: the first segment decides",
        build: |c, q| {
            c.range_of(q, &[(HOLE, 64), (c.data(), 0)]);
            Some(c.range_answer(Status::OutOfRange))
        },
    },
    Case {
        rule: "valid",
        what: "FLUSH_RANGE of three segments, after all of the above",
        build: |c, q| {
            c.range_of(
                q,
                &[(c.data(), 1), (c.data() + 100, 200), (c.data() + 4000, 96)],
            );
            Some(c.range_answer(Status::Ok))
        },
    },
];

/// Phase B: F_FULL not accepted.
const CASES_B: &[Case] = &[
    Case {
        rule: "feature-not-negotiated",
        what: "FLUSH_ALL, F_FULL not accepted",
        build: |c, q| {
            c.header(T_ALL, 0);
            q.set_chain(&[c.req(16), c.status()]);
            Some(c.full_answer(Status::Ok))
        },
    },
    Case {
        rule: "order",
        what: "FLUSH_ALL with a segment, F_FULL not accepted: the feature decides",
        build: |c, q| {
            c.header(T_ALL, 0);
            c.segment(0, c.data(), 64);
            q.set_chain(&[c.req(32), c.status()]);
            Some(c.full_answer(Status::Invalid))
        },
    },
    Case {
        rule: "valid",
        what: "FLUSH_RANGE, F_FULL not accepted",
        build: |c, q| {
            c.one_range(q);
            Some(c.range_answer(Status::Ok))
        },
    },
];

/// Phase C: F_RANGE not accepted.
const CASES_C: &[Case] = &[
    Case {
        rule: "feature-not-negotiated",
        what: "FLUSH_RANGE, F_RANGE not accepted",
        build: |c, q| {
            c.one_range(q);
            Some(c.range_answer(Status::Ok))
        },
    },
    Case {
        rule: "order",
        what: "FLUSH_RANGE with 8 stray bytes, F_RANGE not accepted: the feature decides",
        build: |c, q| {
            c.one_range(q);
            q.set_chain(&[c.req(40), c.status()]);
            Some(c.range_answer(Status::Invalid))
        },
    },
    Case {
        rule: "valid",
        what: "FLUSH_ALL, F_RANGE not accepted",
        build: |c, q| {
            c.header(T_ALL, 0);
            q.set_chain(&[c.req(16), c.status()]);
            Some(c.full_answer(Status::Ok))
        },
    },
];

struct Phase {
    name: char,
    features: u64,
    cases: &'static [Case],
}

const PHASES: [Phase; 3] = [
    Phase {
        name: 'A',
        features: VERSION_1 | RANGE | FULL,
        cases: CASES_A,
    },
    Phase {
        name: 'B',
        features: VERSION_1 | RANGE,
        cases: CASES_B,
    },
    Phase {
        name: 'C',
        features: VERSION_1 | FULL,
        cases: CASES_C,
    },
];

/// The features vCPU 0 negotiated for the current phase.
static NEGOTIATED: AtomicU64 = AtomicU64::new(0);
/// Answers checked and answers that did not match, over every vCPU.
static CHECKED: AtomicU32 = AtomicU32::new(0);
static MISMATCHES: AtomicU32 = AtomicU32::new(0);
static NOT_EXPRESSIBLE: AtomicU32 = AtomicU32::new(0);

fn run(env: &Env) -> Outcome {
    // On the first vCPU a failure ends the run with its reason; the others
    // never see one they could report on their own (they park).
    let fail_first = |why: fmt::Arguments| {
        if env.is_first() {
            crate::fail!("bad-requests: FAILED: {why}")
        } else {
            Outcome::Park
        }
    };
    let device = match RawDevice::find(env.boot_info) {
        Ok(device) => device,
        Err(why) => return fail_first(format_args!("{why}")),
    };
    let base = match Scratch::new(env.boot_info).take(AREA_SIZE * u64::from(env.vcpu_count), AREA_SIZE)
    {
        Ok(base) => base,
        Err(e) => return fail_first(format_args!("{e}")),
    };
    let area_of = |vcpu: u32| {
        // SAFETY: scratch RAM (identity-mapped, user-writable, used by
        // nothing else), AREA_SIZE bytes per vCPU; each vCPU touches only its
        // own, and vCPU 0 only reads the others' addresses.
        unsafe { Area::new(base + AREA_SIZE * u64::from(vcpu), AREA_SIZE) }
    };
    let area = area_of(env.vcpu);
    let regions = env.boot_info.ram_regions();
    let config = device.config();
    let mut ctx = Ctx {
        area,
        range: false,
        full: false,
        max_segments: config.max_segments,
        max_bytes: config.max_bytes,
        ram_end: regions.iter().map(|r| r.base + r.size).max().unwrap_or(0),
        low_ram: regions
            .iter()
            .find(|r| r.base == 0)
            .map_or(0, |r| r.size),
        two_regions: regions.len() > 1,
    };
    let mut queue = RawQueue::new(area, QUEUE_SIZE);
    let queue_index = env.vcpu as u16;

    if env.is_first() {
        crate::println!(
            "bad-requests: {} vCPU(s), one hand-built queue each ({QUEUE_SIZE} entries) at {base:#x} + 64 KiB * vcpu; max_segments {}, max_bytes {:#x}; RAM ends at {:#x}{}",
            env.vcpu_count,
            ctx.max_segments,
            ctx.max_bytes,
            ctx.ram_end,
            if ctx.two_regions { ", in two regions around the MMIO hole" } else { ", one region" }
        );
    }
    let mut count = 0u32;
    for phase in &PHASES {
        env.barrier();
        if env.is_first() {
            match device.start(phase.features) {
                Ok(accepted) => NEGOTIATED.store(accepted, Ordering::Relaxed),
                Err(why) => return fail_first(format_args!("phase {}: {why}", phase.name)),
            }
        }
        env.barrier();
        queue.clear();
        env.barrier();
        if env.is_first() {
            let set_up = (0..env.vcpu_count)
                .try_for_each(|v| {
                    device.setup_queue(v as u16, &RawQueue::attach(area_of(v), QUEUE_SIZE))
                })
                .and_then(|()| device.driver_ok());
            if let Err(why) = set_up {
                return fail_first(format_args!("phase {}: {why}", phase.name));
            }
            let accepted = NEGOTIATED.load(Ordering::Relaxed);
            crate::println!(
                "bad-requests: phase {}: reset, features {accepted:#x} accepted (range {}, full {}), {} queue(s) set up, DRIVER_OK",
                phase.name,
                yes_no(accepted & RANGE != 0),
                yes_no(accepted & FULL != 0),
                env.vcpu_count
            );
        }
        env.barrier();
        let accepted = NEGOTIATED.load(Ordering::Relaxed);
        ctx.range = accepted & RANGE != 0;
        ctx.full = accepted & FULL != 0;
        for case in phase.cases {
            count += 1;
            let label = Label {
                phase: phase.name,
                number: count,
                case,
            };
            ctx.area.fill(STATUS, 8, UNTOUCHED);
            // The tag names vCPU and case in the host's log lines.
            ctx.area
                .write(REQ + 8, u64::from(env.vcpu) << 32 | u64::from(count));
            let Some(expect) = (case.build)(&ctx, &queue) else {
                NOT_EXPRESSIBLE.fetch_add(1, Ordering::Relaxed);
                if env.is_first() {
                    crate::println!("bad-requests: {label}: not expressible with this configuration: skipped");
                }
                continue;
            };
            let answer = device.submit_and_wait(
                queue_index,
                &mut queue,
                0,
                Deadline::after_ms(REQUEST_TIMEOUT_MS),
            );
            let (id, len) = match answer {
                Ok(used) => used,
                Err(why) => {
                    // The queue is in an unknown state: end the run (from
                    // any vCPU), with the reason.
                    return crate::fail!(
                        "bad-requests: FAILED: vcpu {}: {label}: {why}",
                        env.vcpu
                    );
                }
            };
            let got = Got {
                id,
                len,
                status: ctx.area.read(STATUS),
            };
            CHECKED.fetch_add(1, Ordering::Relaxed);
            let ok = got.matches(expect);
            if !ok {
                MISMATCHES.fetch_add(1, Ordering::Relaxed);
            }
            if env.is_first() {
                crate::println!(
                    "bad-requests: {label}: got {got}, expected {expect}: {}",
                    if ok { "ok" } else { "MISMATCH" }
                );
            } else if !ok {
                crate::println!(
                    "bad-requests: vcpu {}: {label}: got {got}, expected {expect}: MISMATCH",
                    env.vcpu
                );
            }
        }
    }

    // The driver takes the device over (a reset and a normal
    // initialisation); good requests must work on every vCPU. vCPU 0 resets
    // the device inside `setup`, before its barrier: every vCPU must be done
    // with phase C first, or a request still in flight there is never
    // completed (seen with 8 vCPUs: "no completion before the deadline").
    env.barrier();
    let flush = match crate::flush::setup(env) {
        Ok(flush) => flush,
        Err(outcome) => return outcome,
    };
    let range = flush.range(area.gpa(DATA), DATA_LEN);
    let full = flush.all();
    let full_expected = if flush.features().full() {
        Ok(())
    } else {
        Err(Error::Unsupported)
    };
    if range.is_err() || full != full_expected {
        MISMATCHES.fetch_add(1, Ordering::Relaxed);
        crate::println!(
            "bad-requests: vcpu {}: through the driver afterwards: range flush {range:?}, full flush {full:?}, expected Ok and {full_expected:?}: MISMATCH",
            env.vcpu
        );
    }
    env.barrier();
    if !env.is_first() {
        return Outcome::Park;
    }
    let checked = CHECKED.load(Ordering::Relaxed);
    let mismatches = MISMATCHES.load(Ordering::Relaxed);
    let skipped = NOT_EXPRESSIBLE.load(Ordering::Relaxed);
    if mismatches != 0 {
        return crate::fail!(
            "bad-requests: FAILED: {mismatches} answers differ from the documented ones (see the MISMATCH lines)"
        );
    }
    if skipped != 0 {
        crate::println!(
            "bad-requests: {skipped} case(s) over all vCPUs could not be expressed with this configuration (see above)"
        );
    }
    crate::println!(
        "bad-requests: all {checked} answers as documented ({count} cases x {} vCPU(s)); afterwards the driver's range and full flushes work on every vCPU",
        env.vcpu_count,
    );
    Outcome::Exit(status::SUCCESS)
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// `A09 chain-too-long (indirect table of 1025 descriptors)`.
struct Label<'a> {
    phase: char,
    number: u32,
    case: &'a Case,
}

impl fmt::Display for Label<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}{:02} {} ({})",
            self.phase, self.number, self.case.rule, self.case.what
        )
    }
}
