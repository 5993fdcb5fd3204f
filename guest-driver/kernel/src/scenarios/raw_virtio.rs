//! Raw access to the cache-flush device, for the scenarios that must do what
//! the driver never would: initialise the device by hand, build split-queue
//! descriptor chains field by field (malformed ones included), notify a
//! queue that does not exist yet, reset the device with a request in flight.
//!
//! Used by `bad-requests`, `no-driver-ok` and `reset-outstanding`. It is not a
//! scenario, so it is not in the registry: `bad_requests.rs` declares it
//! (`#[path]`) and the others reach it as `super::bad_requests::raw_virtio`.
//!
//! Everything here works on identity-mapped guest RAM (the kernel's statics
//! and its scratch RAM): a virtual address is the guest-physical address the
//! device sees. The registers are reached through the guest driver's public
//! [`MmioRegisters`].

use core::sync::atomic::{fence, AtomicU64, Ordering};

use cache_flush_abi::boot::BootInfo;
use cache_flush_abi::cache_flush::{Config, F_FULL, F_RANGE, F_VERSION_1};
use guest_driver::mmio::{reg, status, WINDOW_SIZE};
use guest_driver::{find_device, IdentityMap, MmioRegisters, PhysMem, Registers};

use crate::cpu::rdtsc;

/// Feature bit masks (the `F_*` numbers are bit positions).
pub const VERSION_1: u64 = 1 << F_VERSION_1;
/// FLUSH_RANGE.
pub const RANGE: u64 = 1 << F_RANGE;
/// FLUSH_ALL.
pub const FULL: u64 = 1 << F_FULL;

/// Descriptor flags (virtio 1.2, §2.7.5).
pub const DESC_NEXT: u16 = 1;
/// The device writes this buffer.
pub const DESC_WRITE: u16 = 2;
/// The buffer is a table of descriptors.
pub const DESC_INDIRECT: u16 = 4;

/// Status bits the scenarios expect after a hand-made initialisation.
pub const INITIALISED: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
/// ... and once DRIVER_OK is set.
pub const RUNNING: u32 = INITIALISED | status::DRIVER_OK;

/// The integer types an [`Area`] reads and writes: every bit pattern is a
/// value, so reading one from memory the device wrote is always sound.
pub trait Int: Copy {}
impl Int for u8 {}
impl Int for u16 {}
impl Int for u32 {}
impl Int for u64 {}

/// A range of identity-mapped guest RAM that one vCPU uses for hand-built
/// queues and requests (shared only with the device). Accesses are volatile
/// and bounds-checked: a bad offset is a bug of the scenario and panics.
#[derive(Clone, Copy, Debug)]
pub struct Area {
    base: u64,
    len: u64,
}

impl Area {
    /// The area `[base, base + len)`.
    ///
    /// # Safety
    ///
    /// The range must be guest RAM that the boot page tables identity-map
    /// writable for ring 3, that nothing but this vCPU (through this value
    /// and its copies) and the device uses while the area is in use, and that
    /// holds no Rust object.
    pub const unsafe fn new(base: u64, len: u64) -> Self {
        Self { base, len }
    }

    /// Guest-physical (= virtual) address of byte `offset`.
    pub fn gpa(&self, offset: u64) -> u64 {
        assert!(offset <= self.len, "offset {offset:#x} outside the area");
        self.base + offset
    }

    /// The part `[offset, offset + len)` of this area.
    pub fn sub(&self, offset: u64, len: u64) -> Area {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len),
            "sub-area {offset:#x}+{len:#x} outside the area"
        );
        Area {
            base: self.base + offset,
            len,
        }
    }

    fn ptr<T: Int>(&self, offset: u64) -> *mut T {
        let size = core::mem::size_of::<T>() as u64;
        assert!(
            offset.checked_add(size).is_some_and(|end| end <= self.len),
            "access at {offset:#x} outside the area"
        );
        let address = self.base + offset;
        assert!(address % size == 0, "misaligned access at {address:#x}");
        address as *mut T
    }

    /// Writes `value` at `offset` (naturally aligned).
    pub fn write<T: Int>(&self, offset: u64, value: T) {
        let ptr = self.ptr::<T>(offset);
        // SAFETY: inside the area (checked), aligned (checked), and the area
        // is identity-mapped RAM reserved for this vCPU and the device
        // (`new`'s contract). Volatile: the device reads it behind the
        // compiler's back.
        unsafe { ptr.write_volatile(value) }
    }

    /// Reads the value at `offset` (naturally aligned).
    pub fn read<T: Int>(&self, offset: u64) -> T {
        let ptr = self.ptr::<T>(offset);
        // SAFETY: as in `write`; `T` is an integer, so any content is a value.
        unsafe { ptr.read_volatile() }
    }

    /// Sets `len` bytes at `offset` to `byte`.
    pub fn fill(&self, offset: u64, len: u64, byte: u8) {
        for i in 0..len {
            self.write::<u8>(offset + i, byte);
        }
    }
}

/// The TSC's rate: CPUID leaf 0x15 (TSC/crystal ratio) or 0x16 (base
/// frequency) when the host reports them, otherwise an assumed 3 GHz. Used
/// only for "give up after about N seconds", never to measure anything.
fn tsc_hz() -> u64 {
    static CACHED: AtomicU64 = AtomicU64::new(0);
    let cached = CACHED.load(Ordering::Relaxed);
    if cached != 0 {
        return cached;
    }
    let (max_leaf, ..) = cpuid(0);
    let mut hz = 0;
    if max_leaf >= 0x15 {
        let (denominator, numerator, crystal, _) = cpuid(0x15);
        if denominator != 0 && numerator != 0 && crystal != 0 {
            hz = u64::from(crystal) * u64::from(numerator) / u64::from(denominator);
        }
    }
    if hz == 0 && max_leaf >= 0x16 {
        hz = u64::from(cpuid(0x16).0 & 0xffff) * 1_000_000;
    }
    if hz == 0 {
        hz = 3_000_000_000;
    }
    CACHED.store(hz, Ordering::Relaxed);
    hz
}

/// CPUID `leaf` (subleaf 0): (eax, ebx, ecx, edx). One exit to the VMM.
fn cpuid(leaf: u32) -> (u32, u32, u32, u32) {
    let (eax, ecx, edx): (u32, u32, u32);
    let rbx: u64;
    // SAFETY: CPUID only reads processor information into registers. rbx is
    // reserved by LLVM, so it is saved in a scratch register around the
    // instruction.
    unsafe {
        core::arch::asm!(
            "mov {saved:r}, rbx",
            "cpuid",
            "xchg {saved:r}, rbx",
            saved = out(reg) rbx,
            inout("eax") leaf => eax,
            inout("ecx") 0u32 => ecx,
            out("edx") edx,
            options(nostack, preserves_flags),
        );
    }
    (eax, rbx as u32, ecx, edx)
}

/// A point in time, in TSC cycles, after which a wait gives up.
#[derive(Clone, Copy, Debug)]
pub struct Deadline(u64);

impl Deadline {
    /// About `ms` milliseconds from now.
    pub fn after_ms(ms: u64) -> Self {
        let cycles = tsc_hz().saturating_mul(ms) / 1000;
        Self(rdtsc().saturating_add(cycles))
    }

    /// Whether the deadline has passed.
    pub fn passed(&self) -> bool {
        rdtsc() >= self.0
    }
}

/// Bytes a [`RawQueue`] of up to [`RawQueue::MAX_SIZE`] entries occupies at
/// the start of its area: descriptors at 0, available ring at 0x100, used
/// ring at 0x140.
pub const RING_BYTES: u64 = 0x200;
const DESC_OFF: u64 = 0;
const AVAIL_OFF: u64 = 0x100;
const USED_OFF: u64 = 0x140;

/// A split virtqueue built by hand in an [`Area`]; one request in flight at
/// a time, whose chain the scenario writes itself (any shape, any lie).
pub struct RawQueue {
    ring: Area,
    size: u16,
    next_avail: u16,
    last_used: u16,
}

impl RawQueue {
    /// The largest size this layout holds.
    pub const MAX_SIZE: u16 = 16;

    /// A queue of `size` entries (a power of two up to [`Self::MAX_SIZE`])
    /// in the first [`RING_BYTES`] of `area` (which must be 16-byte
    /// aligned), cleared.
    pub fn new(area: Area, size: u16) -> Self {
        assert!(size.is_power_of_two() && size <= Self::MAX_SIZE);
        assert!(area.gpa(0) % 16 == 0);
        let mut queue = Self {
            ring: area.sub(0, RING_BYTES),
            size,
            next_avail: 0,
            last_used: 0,
        };
        queue.clear();
        queue
    }

    /// The queue already laid out in `area` by its owner, without touching
    /// it: for the vCPU that hands other vCPUs' queues to the device.
    pub fn attach(area: Area, size: u16) -> Self {
        assert!(size.is_power_of_two() && size <= Self::MAX_SIZE);
        assert!(area.gpa(0) % 16 == 0);
        Self {
            ring: area.sub(0, RING_BYTES),
            size,
            next_avail: 0,
            last_used: 0,
        }
    }

    /// Zeroes the rings and forgets every index: for a queue about to be
    /// handed to a freshly reset device.
    pub fn clear(&mut self) {
        self.ring.fill(0, RING_BYTES, 0);
        // VIRTQ_AVAIL_F_NO_INTERRUPT: we poll.
        self.ring.write::<u16>(AVAIL_OFF, 1);
        self.next_avail = 0;
        self.last_used = 0;
    }

    /// Number of entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Guest-physical address of the descriptor table.
    pub fn desc_gpa(&self) -> u64 {
        self.ring.gpa(DESC_OFF)
    }

    /// Guest-physical address of the available (driver) ring.
    pub fn avail_gpa(&self) -> u64 {
        self.ring.gpa(AVAIL_OFF)
    }

    /// Guest-physical address of the used (device) ring.
    pub fn used_gpa(&self) -> u64 {
        self.ring.gpa(USED_OFF)
    }

    /// Writes descriptor `index` of the table, fields as given.
    pub fn set_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        assert!(index < self.size);
        let offset = DESC_OFF + 16 * u64::from(index);
        self.ring.write(offset, addr);
        self.ring.write(offset + 8, len);
        self.ring.write(offset + 12, flags);
        self.ring.write(offset + 14, next);
    }

    /// Writes descriptors `0..parts.len()` as one chain, each `(addr, len,
    /// device-writable)`, linked in order, the last without NEXT.
    pub fn set_chain(&self, parts: &[(u64, u32, bool)]) {
        for (i, &(addr, len, writable)) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            let flags = if writable { DESC_WRITE } else { 0 } | if last { 0 } else { DESC_NEXT };
            let next = if last { 0 } else { i as u16 + 1 };
            self.set_desc(i as u16, addr, len, flags, next);
        }
    }

    /// Offers the chain at `head` to the device (not yet notified).
    pub fn publish(&mut self, head: u16) {
        let slot = u64::from(self.next_avail & (self.size - 1));
        self.ring.write(AVAIL_OFF + 4 + 2 * slot, head);
        self.next_avail = self.next_avail.wrapping_add(1);
        // The chain and the slot before the index that publishes them.
        fence(Ordering::SeqCst);
        self.ring.write(AVAIL_OFF + 2, self.next_avail);
        // The index before the notify (an MMIO store) that follows.
        fence(Ordering::SeqCst);
    }

    /// The used ring's index as the device left it.
    pub fn used_idx(&self) -> u16 {
        self.ring.read(USED_OFF + 2)
    }

    /// The next used element `(id, len)`, if the device has added one.
    pub fn poll(&mut self) -> Option<(u32, u32)> {
        if self.used_idx() == self.last_used {
            return None;
        }
        // The element after the index that published it.
        fence(Ordering::SeqCst);
        let slot = u64::from(self.last_used & (self.size - 1));
        let id = self.ring.read(USED_OFF + 4 + 8 * slot);
        let len = self.ring.read(USED_OFF + 8 + 8 * slot);
        self.last_used = self.last_used.wrapping_add(1);
        Some((id, len))
    }
}

/// The cache-flush device's registers, driven by hand.
pub struct RawDevice {
    regs: MmioRegisters,
}

impl RawDevice {
    /// The device of the boot device table.
    pub fn find(boot_info: &BootInfo) -> Result<Self, &'static str> {
        let device =
            find_device(boot_info).map_err(|_| "no cache-flush device in the device table")?;
        // SAFETY: the boot protocol identity-maps `[0, identity_map_end)`,
        // readable and writable from ring 3, for good.
        let mem = unsafe { IdentityMap::new(boot_info.identity_map_end) };
        let base = mem
            .map(device.base, WINDOW_SIZE as usize)
            .ok_or("the device window is not identity-mapped")?;
        // SAFETY: the device table names a virtio-mmio window of at least
        // WINDOW_SIZE bytes at `base` (checked by `find_device`), which the
        // boot page tables map uncached for good.
        let regs = unsafe { MmioRegisters::new(base) };
        Ok(Self { regs })
    }

    /// Reads register `offset`.
    pub fn read(&self, offset: u32) -> u32 {
        self.regs.read32(offset)
    }

    /// Writes register `offset`.
    pub fn write(&self, offset: u32, value: u32) {
        self.regs.write32(offset, value)
    }

    /// The Status register.
    pub fn status(&self) -> u32 {
        self.read(reg::STATUS)
    }

    /// Writes 0 to Status and waits until it reads back 0.
    pub fn reset(&self) -> Result<(), &'static str> {
        self.write(reg::STATUS, 0);
        for _ in 0..1000 {
            if self.status() == 0 {
                return Ok(());
            }
        }
        Err("Status does not read 0 after a reset")
    }

    /// The 64 feature bits the device offers.
    pub fn offered(&self) -> u64 {
        self.write(reg::DEVICE_FEATURES_SEL, 0);
        let low = self.read(reg::DEVICE_FEATURES);
        self.write(reg::DEVICE_FEATURES_SEL, 1);
        let high = self.read(reg::DEVICE_FEATURES);
        u64::from(high) << 32 | u64::from(low)
    }

    /// Reset, ACKNOWLEDGE, DRIVER, accept `wanted & offered`, FEATURES_OK
    /// (checked). Returns the accepted features; the device is then in
    /// [`INITIALISED`], ready for queue set-up.
    pub fn start(&self, wanted: u64) -> Result<u64, &'static str> {
        self.reset()?;
        self.write(reg::STATUS, status::ACKNOWLEDGE);
        self.write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        let accepted = wanted & self.offered();
        self.write(reg::DRIVER_FEATURES_SEL, 0);
        self.write(reg::DRIVER_FEATURES, accepted as u32);
        self.write(reg::DRIVER_FEATURES_SEL, 1);
        self.write(reg::DRIVER_FEATURES, (accepted >> 32) as u32);
        self.write(reg::STATUS, INITIALISED);
        if self.status() != INITIALISED {
            return Err("the device refused FEATURES_OK");
        }
        Ok(accepted)
    }

    /// The configuration space, as 32-bit reads.
    pub fn config(&self) -> Config {
        let u32_at = |offset: u32| self.read(reg::CONFIG + offset);
        let u64_at = |offset: u32| u64::from(u32_at(offset + 4)) << 32 | u64::from(u32_at(offset));
        Config {
            cache_line_size: u32_at(0),
            num_queues: u32_at(4),
            max_segments: u32_at(8),
            reserved0: u32_at(12),
            max_bytes: u64_at(16),
            full_flush_cost_ns: u64_at(24),
            full_break_even_bytes: u64_at(32),
            full_per_sec_limit: u64_at(40),
            range_bytes_per_sec_limit: u64_at(48),
        }
    }

    /// Hands `queue` to the device as queue `index` (between FEATURES_OK and
    /// DRIVER_OK).
    pub fn setup_queue(&self, index: u16, queue: &RawQueue) -> Result<(), &'static str> {
        self.write(reg::QUEUE_SEL, u32::from(index));
        if self.read(reg::QUEUE_NUM_MAX) < u32::from(queue.size()) {
            return Err("the queue does not exist or is too small");
        }
        self.write(reg::QUEUE_NUM, u32::from(queue.size()));
        for (low, gpa) in [
            (reg::QUEUE_DESC_LOW, queue.desc_gpa()),
            (reg::QUEUE_DRIVER_LOW, queue.avail_gpa()),
            (reg::QUEUE_DEVICE_LOW, queue.used_gpa()),
        ] {
            self.write(low, gpa as u32);
            self.write(low + 4, (gpa >> 32) as u32);
        }
        self.write(reg::QUEUE_READY, 1);
        if self.read(reg::QUEUE_READY) != 1 {
            return Err("QueueReady does not read 1");
        }
        Ok(())
    }

    /// Sets DRIVER_OK and checks the device accepted the queues.
    pub fn driver_ok(&self) -> Result<(), &'static str> {
        self.write(reg::STATUS, RUNNING);
        match self.status() {
            RUNNING => Ok(()),
            s if s & status::DEVICE_NEEDS_RESET != 0 => {
                Err("the device set DEVICE_NEEDS_RESET at DRIVER_OK")
            }
            _ => Err("DRIVER_OK did not stick"),
        }
    }

    /// Writes QueueNotify.
    pub fn notify(&self, queue: u16) {
        self.write(reg::QUEUE_NOTIFY, u32::from(queue));
    }

    /// Notifies queue `index` and waits for the next used element of
    /// `queue`: `(id, len)`. Gives up at `deadline`.
    pub fn submit_and_wait(
        &self,
        index: u16,
        queue: &mut RawQueue,
        head: u16,
        deadline: Deadline,
    ) -> Result<(u32, u32), &'static str> {
        queue.publish(head);
        self.notify(index);
        loop {
            if let Some(used) = queue.poll() {
                return Ok(used);
            }
            if deadline.passed() {
                return Err(if self.status() & status::DEVICE_NEEDS_RESET != 0 {
                    "no completion: the device set DEVICE_NEEDS_RESET"
                } else {
                    "no completion before the deadline"
                });
            }
            core::hint::spin_loop();
        }
    }
}
