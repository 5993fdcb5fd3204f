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
//! buffer so it is cached on this core, let something happen, then time one
//! load of each line (`rdtscp` between fences) in a random order (a constant
//! stride is prefetched back and looks cached) and take the median. Timing
//! is only meaningful on one core, so the measuring thread pins itself
//! ([`PinnedToCurrentCpu`]) for the whole measurement.
//!
//! * [`ReloadTimer`] and [`Region`]: the measurement itself.
//! * [`host_probe`]: the host half of the bundled guest's `host-probe`
//!   scenario, built on them (the `host_probe` test and anyone's own
//!   integration test drive it).

pub mod host_probe;

use std::marker::PhantomData;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::alias::SharedAlias;

/// The cache-line size the probe works in (x86-64).
pub const LINE: usize = 64;

/// Errors of the probe's set-up.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReloadError {
    /// The range is not inside the mapping, or not whole lines.
    #[error("{what}: {offset:#x}+{len:#x} is not whole {LINE}-byte lines inside the mapping")]
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

/// Whole lines of some host mapping of guest memory, valid for `'a`.
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
        if end > alias.len() || len == 0 || len % LINE != 0 || start % LINE != 0 {
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
        if len == 0 || len % LINE != 0 || gpa.0 % LINE as u64 != 0 {
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

    /// Lines in the region.
    pub fn lines(&self) -> usize {
        self.len / LINE
    }

    fn line(&self, index: usize) -> *mut u8 {
        debug_assert!(index < self.lines());
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

    /// Times one load of every line of `region`, in a random order.
    pub fn time(&mut self, region: &Region<'_>) -> Reload {
        let lines = region.lines();
        self.order.clear();
        self.order.extend(0..lines);
        // Fisher-Yates with xorshift64: uniform enough for defeating the
        // prefetchers, and no allocation or syscall between the loads.
        for i in (1..lines).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            self.order.swap(i, j);
        }
        let samples = self
            .order
            .iter()
            .map(|&i| time_load(region.line(i)))
            .collect();
        Reload::from_samples(samples)
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
        // SAFETY: cpu_set_t is plain bits; all zero is the empty set.
        let mut previous: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::cpu_set_t>();
        // SAFETY: `previous` is a cpu_set_t of `size` bytes; pid 0 is this
        // thread.
        if unsafe { libc::sched_getaffinity(0, size, &mut previous) } != 0 {
            return Err(ReloadError::Pin(errno()));
        }
        let cpu = crate::flush_engine::current_cpu();
        // SAFETY: as above.
        let mut only: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `cpu` is a CPU number the kernel just gave, below
        // CPU_SETSIZE.
        unsafe { libc::CPU_SET(cpu as usize, &mut only) };
        // SAFETY: `only` is a valid cpu_set_t of `size` bytes.
        if unsafe { libc::sched_setaffinity(0, size, &only) } != 0 {
            return Err(ReloadError::Pin(errno()));
        }
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
        let size = std::mem::size_of::<libc::cpu_set_t>();
        // SAFETY: `previous` is the set sched_getaffinity returned.
        if unsafe { libc::sched_setaffinity(0, size, &self.previous) } != 0 {
            log::warn!(
                "could not restore the probe thread's CPU set: errno {}",
                errno()
            );
        }
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
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
    use crate::memory::GuestRam;

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
        let r = Reload::from_samples(vec![300, 50, 60, 310, 55]);
        assert_eq!(r.median(), 60);
        assert_eq!(r.at_least(120), 2);
        assert_eq!(r.at_least(0), 5);
        assert_eq!(r.lines(), 5);
        assert_eq!(Reload::from_samples(Vec::new()).median(), 0);
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
