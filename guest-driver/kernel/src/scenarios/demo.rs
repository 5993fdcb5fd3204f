//! `demo`: a short, plain-words tour of the device for a newcomer (the
//! default scenario of `cargo run`). vCPU 0 shows what the device offers,
//! flushes one buffer by range (showing how its virtual addresses map to
//! physical extents), makes one full flush (or says it is not offered), each
//! with the TSC cycles the call took next to the cost of one plain exit to
//! the VMM, and ends with a one-line conclusion.

use core::cell::UnsafeCell;

use cache_flush_abi::boot::PAGE_SIZE;

use super::{Env, Outcome, Scenario};
use crate::cpu::timed;
use crate::flush::Flush;
use crate::status;

pub const SCENARIO: Scenario = Scenario {
    name: "demo",
    description: "a short tour: what the device offers, one range flush, one full flush, with timings",
    run,
};

/// The buffer the demo flushes: 64 KiB of the kernel's own data.
const BUFFER_SIZE: usize = 64 * 1024;
#[repr(C, align(4096))]
struct Buffer(UnsafeCell<[u8; BUFFER_SIZE]>);
// SAFETY: only vCPU 0 touches the buffer, through a raw pointer.
unsafe impl Sync for Buffer {}
static BUFFER: Buffer = Buffer(UnsafeCell::new([0; BUFFER_SIZE]));

fn run(env: &Env) -> Outcome {
    let flush = match crate::flush::setup(env) {
        Ok(flush) => flush,
        Err(outcome) => return outcome,
    };
    if !env.is_first() {
        return Outcome::Park;
    }
    let device = flush.device();
    let config = flush.config();
    let features = flush.features();
    crate::println!(
        "demo: found the cache-flush device (virtio-mmio, device ID {:#x}) at {:#x}; {} vCPU(s), {} queue(s): one per vCPU",
        device.device_id,
        device.base,
        env.vcpu_count,
        flush.driver().num_queues()
    );
    crate::println!(
        "demo: it offers: range flushes{}; cache line {} B; per request at most {} segments and {} MiB",
        if features.full() { " and full flushes" } else { " (full flushes: not offered)" },
        config.cache_line_size,
        config.max_segments,
        config.max_bytes >> 20
    );
    crate::println!(
        "demo: the host's own figures: full-flush cost {}; rate limits: full flushes {}, range bytes {}",
        Figure(config.full_flush_cost_ns, " ns", "not measured"),
        Figure(config.full_per_sec_limit, "/s", "unlimited"),
        Figure(config.range_bytes_per_sec_limit, "/s", "unlimited")
    );
    let exit = noop_exit_cycles(&flush);
    crate::println!("demo: for scale: one plain exit to the VMM (a device register read) takes {exit} TSC cycles here");

    let va = BUFFER.0.get() as u64;
    // SAFETY: the buffer is a static only vCPU 0 touches. Writing it leaves
    // 1024 dirty lines in the cache for the flush to write back.
    unsafe { core::ptr::write_bytes(va as *mut u8, 0x5a, BUFFER_SIZE) };
    print_extents(&flush, va, BUFFER_SIZE as u64);
    let lines = BUFFER_SIZE as u64 / u64::from(config.cache_line_size.max(1));
    let (result, cycles) = timed(|| flush.range(va, BUFFER_SIZE as u64));
    if let Err(e) = result {
        return crate::fail!("demo: FAILED: the range flush of the buffer: {e}");
    }
    crate::println!(
        "demo: range flush of those 64 KiB ({lines} lines): Ok in {cycles} cycles ({}x an exit): the VMM paused every vCPU, wrote back and invalidated the lines, resumed",
        ratio(cycles, exit)
    );
    if features.full() {
        let (result, cycles) = timed(|| flush.all());
        if let Err(e) = result {
            return crate::fail!("demo: FAILED: the full flush: {e}");
        }
        crate::println!(
            "demo: full flush (every cached line of guest memory): Ok in {cycles} cycles ({}x an exit)",
            ratio(cycles, exit)
        );
    } else {
        crate::println!("demo: full flush: not offered by this VMM (--no-full-flush), so not tried");
    }
    crate::println!(
        "demo: conclusion: from ring 3, the guest had the host write back and invalidate its caches on every vCPU, one request per call"
    );
    Outcome::Exit(status::SUCCESS)
}

/// The fastest of a few no-op exits, in TSC cycles.
fn noop_exit_cycles(flush: &Flush) -> u64 {
    (0..5)
        .map(|_| timed(|| flush.noop_exit()).1)
        .min()
        .unwrap_or(0)
}

/// `a / b` with one decimal, as text-ready integers.
fn ratio(a: u64, b: u64) -> Ratio {
    Ratio(a * 10 / b.max(1))
}

/// A configuration figure, where 0 means "not known" or "no limit".
struct Figure(u64, &'static str, &'static str);
impl core::fmt::Display for Figure {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Figure(0, _, none) => f.write_str(none),
            Figure(value, unit, _) => write!(f, "{value}{unit}"),
        }
    }
}

struct Ratio(u64);
impl core::fmt::Display for Ratio {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}.{}", self.0 / 10, self.0 % 10)
    }
}

/// Prints how `[va, va + len)` maps to guest-physical extents, as the driver
/// sees it (coalescing physically contiguous pages).
fn print_extents(flush: &Flush, va: u64, len: u64) {
    let mut extents = 0;
    let mut current: Option<(u64, u64)> = None;
    let mut offset = 0;
    let mut first_line = true;
    let mut show = |(start, end): (u64, u64)| {
        if first_line {
            crate::println!(
                "demo: wrote a {} KiB buffer at virtual {va:#x} (dirty lines now); the driver's page walk maps it to guest-physical {start:#x}..{end:#x}",
                len / 1024
            );
            first_line = false;
        } else {
            crate::println!("demo:   and {start:#x}..{end:#x}");
        }
    };
    while offset < len {
        let Some(mapping) = flush.translate(va + offset) else {
            break;
        };
        let step = mapping.len.min(len - offset).min(PAGE_SIZE);
        current = match current {
            Some((start, end)) if end == mapping.phys => Some((start, end + step)),
            Some(extent) => {
                show(extent);
                extents += 1;
                Some((mapping.phys, mapping.phys + step))
            }
            None => Some((mapping.phys, mapping.phys + step)),
        };
        offset += step;
    }
    if let Some(extent) = current {
        show(extent);
        extents += 1;
    }
    crate::println!(
        "demo: that is {extents} physical extent(s): the request carries them as segments, whole cache lines"
    );
}
