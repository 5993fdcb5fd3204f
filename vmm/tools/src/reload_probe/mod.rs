//! Flush+Reload from the host: proof, taken through the host's own mappings
//! of guest memory, that a flush the guest asked for evicted the lines.
//!
//! Why from the host: the device flushes by guest-physical address through
//! the VMM's mapping of guest RAM. The claim that this covers *every* mapping
//! of the same memory (every guest-virtual alias, every other host mapping,
//! every core) is best shown from a mapping the engine never used: a
//! [`SharedAlias`], a second `mmap` of the same memfd at another host address.
//!
//! The method (see `shared/HOST-NOTES.md`): load and dirty every line of a
//! buffer so it is cached on this core, let something happen, then time the
//! *first touch* of one random line in each 4 KiB page, the pages in a random
//! order (`rdtscp` between fences). Only first touches count because after a
//! few misses in a page the CPU's prefetchers fetch the rest of it, which
//! makes a flushed buffer look partly cached. The lines are judged by
//! [`cache_flush_abi::flush_reload`], the same rule the guest's `probe`
//! applies: slow at or above the threshold half-way between the cached and
//! the self-flushed latency ([`ReloadTimer::calibrate`]). Timing is only
//! meaningful on one core, so the measuring thread pins itself
//! ([`PinnedToCurrentCpu`]) for the whole measurement.
//!
//! * [`ReloadTimer`] and [`Region`]: the measurement itself.
//! * [`host_probe`]: the host half of the bundled guest's `host-probe`
//!   scenario, built on them (the `host_probe` test and anyone's own
//!   integration test drive it).

pub mod host_probe;

use std::marker::PhantomData;

use cache_flush_abi::flush_reload::{Calibration, SlowCount};
use vm_memory::mmap::MmapRegion;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use vmm::alias::SharedAlias;

use crate::affinity;

/// The cache-line size the probe works in (x86-64).
pub const LINE: usize = 64;
/// The page size whose first touches the probe times (x86-64 base pages;
/// the prefetchers do not cross them).
pub const PAGE: usize = 4096;

/// Errors of the probe's set-up.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReloadError {
    /// The range is not inside the mapping, or not whole pages.
    #[error("{what}: {offset:#x}+{len:#x} is not whole {PAGE}-byte pages inside the mapping")]
    BadRange {
        /// Which mapping.
        what: &'static str,
        /// Offset (alias) or guest-physical address (guest memory).
        offset: u64,
        /// Length.
        len: usize,
    },
    /// `sched_setaffinity` failed.
    #[error("cannot pin the measuring thread to its CPU: errno {0}")]
    Pin(i32),
}

/// Whole pages of some host mapping of guest memory, valid for `'a`.
#[derive(Clone, Copy)]
pub struct Region<'a> {
    ptr: *mut u8,
    len: usize,
    _mapping: PhantomData<&'a ()>,
}

impl<'a> Region<'a> {
    /// `[offset, offset + len)` of `alias`.
    pub fn in_alias(
        alias: &'a SharedAlias,
        offset: usize,
        len: usize,
    ) -> Result<Self, ReloadError> {
        let bad = || ReloadError::BadRange {
            what: "alias",
            offset: offset as u64,
            len,
        };
        let end = offset.checked_add(len).ok_or_else(bad)?;
        let start = alias.as_ptr() as usize + offset;
        if end > alias.len() || len == 0 || len % PAGE != 0 || start % PAGE != 0 {
            return Err(bad());
        }
        Ok(Self {
            // The alias is writable shared memory; `as_ptr` is only `*const`
            // because its own API copies in and out.
            ptr: start as *mut u8,
            len,
            _mapping: PhantomData,
        })
    }

    /// `[gpa, gpa + len)` of the VMM's own mapping of guest RAM (the one the
    /// flush engine flushes through).
    pub fn in_guest_memory(
        memory: &'a GuestMemoryMmap,
        gpa: GuestAddress,
        len: usize,
    ) -> Result<Self, ReloadError> {
        let bad = || ReloadError::BadRange {
            what: "guest memory",
            offset: gpa.0,
            len,
        };
        if len == 0 || len % PAGE != 0 || gpa.0 % PAGE as u64 != 0 {
            return Err(bad());
        }
        let slice = memory.get_slice(gpa, len).map_err(|_| bad())?;
        let ptr = slice.ptr_guard_mut().as_ptr();
        Ok(Self {
            ptr,
            len,
            _mapping: PhantomData,
        })
    }

    /// The whole of `mapping`, a buffer of the host's own (for a
    /// comparison that no flush of guest memory can touch).
    pub fn in_private(mapping: &'a MmapRegion) -> Result<Self, ReloadError> {
        let len = mapping.size();
        let ptr = mapping.as_ptr();
        if len == 0 || len % PAGE != 0 || ptr as usize % PAGE != 0 {
            return Err(ReloadError::BadRange {
                what: "private buffer",
                offset: 0,
                len,
            });
        }
        Ok(Self {
            ptr,
            len,
            _mapping: PhantomData,
        })
    }

    /// Lines in the region.
    pub fn lines(&self) -> usize {
        self.len / LINE
    }

    /// Pages in the region.
    pub fn pages(&self) -> usize {
        self.len / PAGE
    }

    fn line(&self, index: usize) -> *mut u8 {
        assert!(index < self.lines(), "line {index} of {}", self.lines());
        // SAFETY: `index < lines()`, so the address is inside the region.
        unsafe { self.ptr.add(index * LINE) }
    }
}

/// The sorted timings (TSC cycles) of one reload of a region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reload {
    sorted: Vec<u64>,
}

impl Reload {
    /// From raw timings.
    pub fn from_samples(mut samples: Vec<u64>) -> Self {
        samples.sort_unstable();
        Self { sorted: samples }
    }

    /// The median (0 for no samples).
    pub fn median(&self) -> u64 {
        self.sorted.get(self.sorted.len() / 2).copied().unwrap_or(0)
    }

    /// How many lines took at least `cycles`.
    pub fn at_least(&self, cycles: u64) -> usize {
        self.sorted.len() - self.sorted.partition_point(|&s| s < cycles)
    }

    /// How many lines were slow at `threshold`, for the verdict.
    pub fn slow(&self, threshold: u64) -> SlowCount {
        SlowCount {
            slow: self.at_least(threshold) as u32,
            lines: self.sorted.len() as u32,
        }
    }

    /// Lines timed.
    pub fn lines(&self) -> usize {
        self.sorted.len()
    }
}

/// Warms regions and times their reloads, in a fresh random order each time.
pub struct ReloadTimer {
    order: Vec<usize>,
    rng: u64,
}

impl ReloadTimer {
    /// A timer with a random order seeded from the TSC.
    pub fn new() -> Self {
        Self {
            order: Vec::new(),
            rng: rdtsc() | 1,
        }
    }

    /// Loads and writes every line of `region` twice (so each is cached and
    /// dirty on this core), then fences. The bytes' values change.
    pub fn warm(&self, region: &Region<'_>) {
        for pass in 0..2u8 {
            for i in 0..region.lines() {
                let p = region.line(i);
                // SAFETY: `p` is inside the region, a live shared mapping for
                // the region's lifetime; volatile because the guest may look
                // at the same memory (the probe protocol keeps it away).
                unsafe { p.write_volatile(p.read_volatile().wrapping_add(pass)) };
            }
        }
        mfence();
    }

    /// Times the first touch of one random line in each page of `region`,
    /// the pages in a fresh random order. The order and lines are chosen
    /// before the first timed load, so nothing but the loads runs between
    /// them.
    pub fn time(&mut self, region: &Region<'_>) -> Reload {
        self.choose_lines(region.pages());
        let samples = self
            .order
            .iter()
            .map(|&line| time_load(region.line(line)))
            .collect();
        Reload::from_samples(samples)
    }

    /// Fills `order` with one random line index of each of `pages` pages,
    /// the pages in a random order.
    fn choose_lines(&mut self, pages: usize) {
        self.order.clear();
        self.order.extend(0..pages);
        // Fisher-Yates with xorshift64: uniform enough for defeating the
        // prefetchers, and no allocation or syscall between the loads.
        for i in (1..pages).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            self.order.swap(i, j);
        }
        const LINES_PER_PAGE: usize = PAGE / LINE;
        for i in 0..pages {
            let line = (self.next() % LINES_PER_PAGE as u64) as usize;
            self.order[i] = self.order[i] * LINES_PER_PAGE + line;
        }
    }

    /// Writes back and invalidates every line of `region` from this thread
    /// (CLFLUSH), then fences: the prober's own flush, for the calibration.
    pub fn flush(&self, region: &Region<'_>) {
        for i in 0..region.lines() {
            // SAFETY: CLFLUSH of an address inside the region, a live
            // mapping; it does not change memory contents.
            unsafe { std::arch::x86_64::_mm_clflush(region.line(i)) };
        }
        mfence();
    }

    /// The calibration on this core (see `cache_flush_abi::flush_reload`):
    /// the lowest of `rounds` first-touch medians of `region` just warmed,
    /// and just warmed then flushed by this thread. Noise only adds cycles,
    /// so the lowest median is the truest.
    pub fn calibrate(&mut self, region: &Region<'_>, rounds: u32) -> Calibration {
        let mut cal = Calibration {
            cached: u64::MAX,
            flushed: u64::MAX,
        };
        for _ in 0..rounds.max(1) {
            self.warm(region);
            cal.cached = cal.cached.min(self.time(region).median());
            self.warm(region);
            self.flush(region);
            cal.flushed = cal.flushed.min(self.time(region).median());
        }
        cal
    }

    fn next(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }
}

impl Default for ReloadTimer {
    fn default() -> Self {
        Self::new()
    }
}

/// Keeps the calling thread on the CPU it runs on until dropped, then gives
/// it back its previous CPU set. Lines warmed on one core and timed on
/// another look evicted when they are not.
pub struct PinnedToCurrentCpu {
    previous: libc::cpu_set_t,
    cpu: i32,
    /// Affinity belongs to a thread: dropping elsewhere would restore the
    /// wrong thread's set, so the guard is neither `Send` nor `Sync`.
    _this_thread: PhantomData<*const ()>,
}

impl PinnedToCurrentCpu {
    /// Pins the calling thread.
    pub fn new() -> Result<Self, ReloadError> {
        let pin_error = |e: std::io::Error| ReloadError::Pin(e.raw_os_error().unwrap_or(0));
        let previous = affinity::current().map_err(pin_error)?;
        // A CPU number the kernel just gave: below CPU_SETSIZE.
        let cpu = vmm::flush_engine::current_cpu();
        affinity::set(&affinity::only(cpu as usize)).map_err(pin_error)?;
        Ok(Self {
            previous,
            cpu,
            _this_thread: PhantomData,
        })
    }

    /// The CPU the thread is pinned to.
    pub fn cpu(&self) -> i32 {
        self.cpu
    }
}

impl Drop for PinnedToCurrentCpu {
    fn drop(&mut self) {
        if let Err(e) = affinity::set(&self.previous) {
            log::warn!("could not restore the probe thread's CPU set: {e}");
        }
    }
}

fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no memory effects; every x86-64 CPU has it.
    unsafe { std::arch::x86_64::_rdtsc() }
}

fn mfence() {
    // SAFETY: MFENCE has no effect but ordering (SSE2, on every x86-64 CPU).
    unsafe { std::arch::x86_64::_mm_mfence() }
}

/// TSC cycles one load of the byte at `address` takes, between fences.
fn time_load(address: *const u8) -> u64 {
    let mut aux = 0u32;
    // SAFETY: the fences and RDTSCP have no memory effects (RDTSCP writes
    // `aux`, a local); the load reads a byte of a live mapping (the caller's
    // region) and its value is discarded.
    unsafe {
        use std::arch::x86_64::{__rdtscp, _mm_lfence, _mm_mfence};
        _mm_mfence();
        let start = __rdtscp(&mut aux);
        _mm_lfence();
        let _ = address.read_volatile();
        let end = __rdtscp(&mut aux);
        _mm_lfence();
        _mm_mfence();
        end.wrapping_sub(start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm::memory::GuestRam;

    #[test]
    fn regions_must_be_whole_lines_inside_the_mapping() {
        let ram = GuestRam::new(16).unwrap();
        let alias = SharedAlias::new(&ram, GuestAddress(0x10_0000), 0x1000).unwrap();
        assert!(Region::in_alias(&alias, 0, 0x1000).is_ok());
        assert!(Region::in_alias(&alias, 64, 0x1000).is_err());
        assert!(Region::in_alias(&alias, 1, 64).is_err());
        assert!(Region::in_alias(&alias, 0, 65).is_err());
        assert!(Region::in_alias(&alias, 0, 0).is_err());
        assert!(Region::in_alias(&alias, usize::MAX, 64).is_err());
        assert!(Region::in_guest_memory(&ram.memory, GuestAddress(0), 0x1000).is_ok());
        assert!(Region::in_guest_memory(&ram.memory, GuestAddress(16 << 20), 64).is_err());
        assert!(Region::in_guest_memory(&ram.memory, GuestAddress(8), 64).is_err());
    }

    #[test]
    fn reload_statistics() {
        assert_eq!(
            Reload::from_samples(vec![300, 50, 60, 310, 55]).slow(120),
            SlowCount { slow: 2, lines: 5 }
        );
        let r = Reload::from_samples(vec![300, 50, 60, 310, 55]);
        assert_eq!(r.median(), 60);
        assert_eq!(r.at_least(120), 2);
        assert_eq!(r.at_least(0), 5);
        assert_eq!(r.lines(), 5);
        assert_eq!(Reload::from_samples(Vec::new()).median(), 0);
    }

    #[test]
    fn a_reload_touches_one_line_of_every_page_once() {
        let mut timer = ReloadTimer::new();
        let mut seen_lines = std::collections::HashSet::new();
        for _ in 0..20 {
            timer.choose_lines(64);
            let mut pages: Vec<usize> = timer.order.iter().map(|l| l * LINE / PAGE).collect();
            seen_lines.extend(timer.order.iter().map(|l| l % (PAGE / LINE)));
            pages.sort_unstable();
            assert_eq!(pages, (0..64).collect::<Vec<_>>());
        }
        // The line within a page varies (a fixed offset would be a constant
        // stride across pages).
        assert!(seen_lines.len() > 32, "{seen_lines:?}");
        let ram = GuestRam::new(16).unwrap();
        let region = Region::in_guest_memory(&ram.memory, GuestAddress(0x10_0000), 0x4000).unwrap();
        assert_eq!(timer.time(&region).lines(), 4);
    }

    #[test]
    fn warm_touches_every_line_through_the_alias() {
        let ram = GuestRam::new(16).unwrap();
        let alias = SharedAlias::new(&ram, GuestAddress(0x10_0000), 0x1000).unwrap();
        let region = Region::in_alias(&alias, 0, 0x1000).unwrap();
        let timer = ReloadTimer::new();
        timer.warm(&region);
        // 0 + 0 + 1 after two passes, seen through the VMM's mapping.
        let view = Region::in_guest_memory(&ram.memory, GuestAddress(0x10_0000), 0x1000).unwrap();
        for i in 0..view.lines() {
            // SAFETY: inside the region, a live mapping.
            assert_eq!(unsafe { view.line(i).read_volatile() }, 1);
        }
    }
}
