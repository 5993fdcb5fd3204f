//! Discovery, initialisation and the two flush calls.

use core::hint::spin_loop;
use core::mem::offset_of;
use core::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};

use cache_flush_abi::boot::{
    BootInfo, DeviceEntry, DeviceKind, BOOT_INFO_MAGIC, BOOT_INFO_VERSION,
};
use cache_flush_abi::cache_flush::{
    self, Config, RequestHeader, RequestType, Status, HEADER_SIZE, MAX_QUEUES, SEGMENT_SIZE,
};

use crate::error::Error;
use crate::mem::{PhysMem, QueueMemory, MEMORY_ALIGN};
use crate::mmio::{reg, status, MmioRegisters, Registers, MAGIC_VALUE, VERSION, WINDOW_SIZE};
use crate::plan::{plan, Limits, Sink, Validate};
use crate::queue::{Options, QueueState, Ring, QUEUE_SIZE, STATUS_UNWRITTEN};
use crate::translate::Translate;

/// How many spins of the used-index poll between two looks at the device's
/// Status register for DEVICE_NEEDS_RESET. A look is an exit to the VMM
/// (tens of µs here), so it must be rare next to a normal request, which
/// pauses the whole VM (ms); but without it a device that gave up would
/// leave the caller spinning forever.
const NEEDS_RESET_CHECK_PERIOD: u32 = if cfg!(test) { 1 << 12 } else { 1 << 20 };

/// How many times init reads Status back after a reset before giving up.
const RESET_READBACK_LIMIT: u32 = 1 << 16;

/// The feature bits this driver understands.
const DRIVER_FEATURES: u64 =
    1 << cache_flush::F_VERSION_1 | 1 << cache_flush::F_RANGE | 1 << cache_flush::F_FULL;

/// The feature bits negotiated with the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Features(u64);

impl Features {
    /// The raw 64-bit feature word.
    pub fn bits(self) -> u64 {
        self.0
    }

    /// FLUSH_RANGE is available.
    pub fn range(self) -> bool {
        self.0 & (1 << cache_flush::F_RANGE) != 0
    }

    /// FLUSH_ALL is available (not on hosts that cannot flush everything).
    pub fn full(self) -> bool {
        self.0 & (1 << cache_flush::F_FULL) != 0
    }
}

/// The boot device table's entry for the cache-flush device: the first
/// virtio-mmio entry whose `device_id` is [`cache_flush::DEVICE_ID`].
pub fn find_device(boot: &BootInfo) -> Result<DeviceEntry, Error> {
    if boot.magic != BOOT_INFO_MAGIC || boot.version != BOOT_INFO_VERSION {
        return Err(Error::BadBootInfo);
    }
    boot.device_entries()
        .iter()
        .find(|e| {
            DeviceKind::from_raw(e.kind) == Some(DeviceKind::VirtioMmio)
                && e.device_id == cache_flush::DEVICE_ID
                && e.size >= WINDOW_SIZE
        })
        .copied()
        .ok_or(Error::DeviceNotFound)
}

/// The driver of one cache-flush device.
///
/// Generic over the kernel's [`Translate`] (the range call's virtual-to-
/// physical translation) and over how registers are reached ([`Registers`],
/// [`MmioRegisters`] unless a kernel or a test supplies another).
///
/// # Choosing a queue
///
/// Each queue is behind its own spinlock, held for the whole call (every
/// request of a split range goes through the same queue). Two ways to pick:
///
/// * [`CacheFlushDriver::invalidate_range_all_caches`] and
///   [`CacheFlushDriver::invalidate_all_caches`] take any free queue: they
///   try each lock once, starting from a rotating hint, and spin only if
///   every queue is busy. No per-CPU knowledge needed, and safe to call from
///   code that interrupted another caller on the same CPU as long as some
///   other queue is free.
/// * [`CacheFlushDriver::for_vcpu`] pins queue `vcpu % num_queues`: with one
///   queue per vCPU, callers on different vCPUs never touch the same lock or
///   ring cache lines. Do not use it from a context that can interrupt a
///   caller on the same vCPU (it would spin on a lock its own CPU holds).
///
/// Both are polling and never sleep, so they may be called wherever spinning
/// is allowed (the `DISPATCH_LEVEL` of the Windows calls).
#[derive(Debug)]
pub struct CacheFlushDriver<T: Translate, R: Registers = MmioRegisters> {
    regs: R,
    translator: T,
    memory: QueueMemory,
    block_size: usize,
    queues: [QueueState; MAX_QUEUES as usize],
    num_queues: u16,
    features: Features,
    config: Config,
    /// The device's live full-flush figures (`full_flush_cost_ns`,
    /// `full_break_even_bytes`): the host refreshes them as the guest's
    /// resident memory grows, on every full flush, the request that changes
    /// them.
    full_estimate: [AtomicU64; 2],
    /// A full flush completed since `full_estimate` was read: re-read it
    /// when next asked. Lazily, because the read is six configuration
    /// accesses (an exit each), which a FLUSH_ALL's caller should not wait
    /// for (measured by `vmm-tools bench`: re-reading the whole configuration
    /// there put 571 µs outside the host's phases of a 4.6 ms full flush;
    /// none now).
    full_estimate_stale: AtomicBool,
    /// `None` when FLUSH_RANGE was not negotiated.
    limits: Option<Limits>,
    /// Where `lock_any` starts looking, so that concurrent callers spread
    /// over the queues instead of all trying queue 0 first.
    hint: AtomicUsize,
    /// Set when the device can no longer be trusted (it asked for a reset,
    /// or completed something unexpected); every later call fails.
    broken: AtomicBool,
    /// Set once DRIVER_OK is written: only then does dropping the driver
    /// reset the device.
    live: bool,
}

impl<T: Translate> CacheFlushDriver<T, MmioRegisters> {
    /// Finds the device in `boot`'s device table, maps its window through
    /// `mem`, and initialises it (see [`CacheFlushDriver::new`]).
    pub fn probe<M: PhysMem>(
        boot: &BootInfo,
        mem: &M,
        translator: T,
        memory: QueueMemory,
        options: Options,
    ) -> Result<Self, Error> {
        let entry = find_device(boot)?;
        let base = mem
            .map(entry.base, WINDOW_SIZE as usize)
            .ok_or(Error::WindowUnmapped { base: entry.base })?;
        // SAFETY: `PhysMem` guarantees the pointer is valid for WINDOW_SIZE
        // bytes for the rest of the program, and the boot table says a
        // virtio-mmio window lives there.
        let regs = unsafe { MmioRegisters::new(base) };
        Self::new(regs, translator, memory, options)
    }
}

impl<T: Translate, R: Registers> CacheFlushDriver<T, R> {
    /// Checks that `regs` is a version-2 virtio-mmio window of the
    /// cache-flush device, and initialises it (virtio 1.2, §3.1.1): reset,
    /// ACKNOWLEDGE, DRIVER, accept VERSION_1, RANGE and FULL as offered,
    /// FEATURES_OK (checked), read the configuration, set up
    /// `min(options.queues, config.num_queues)` queues in `memory`,
    /// DRIVER_OK. On failure after ACKNOWLEDGE the device is left with FAILED
    /// set.
    pub fn new(
        regs: R,
        translator: T,
        memory: QueueMemory,
        options: Options,
    ) -> Result<Self, Error> {
        let magic = regs.read32(reg::MAGIC_VALUE);
        if magic != MAGIC_VALUE {
            return Err(Error::BadMagic(magic));
        }
        let version = regs.read32(reg::VERSION);
        if version != VERSION {
            return Err(Error::BadVersion(version));
        }
        let device_id = regs.read32(reg::DEVICE_ID);
        if device_id != cache_flush::DEVICE_ID {
            return Err(Error::BadDeviceId(device_id));
        }

        // Reset, and wait until the device says it is done (§2.4.1); the
        // device may still hold queues of an earlier driver (a kexec, or a
        // kernel that re-probes).
        regs.write32(reg::STATUS, 0);
        let mut reads = 0;
        while regs.read32(reg::STATUS) != 0 {
            reads += 1;
            if reads == RESET_READBACK_LIMIT {
                return Err(Error::DeviceNeedsReset);
            }
            spin_loop();
        }

        let mut driver = Self {
            regs,
            translator,
            memory,
            block_size: options.block_size(),
            queues: [const { QueueState::new() }; MAX_QUEUES as usize],
            num_queues: 0,
            features: Features(0),
            config: Config::default(),
            full_estimate: [AtomicU64::new(0), AtomicU64::new(0)],
            full_estimate_stale: AtomicBool::new(false),
            limits: None,
            hint: AtomicUsize::new(0),
            broken: AtomicBool::new(false),
            live: false,
        };
        let mut device_status = status::ACKNOWLEDGE;
        driver.regs.write32(reg::STATUS, device_status);
        device_status |= status::DRIVER;
        driver.regs.write32(reg::STATUS, device_status);

        match driver.init(&mut device_status, options) {
            Ok(()) => Ok(driver),
            Err(e) => {
                // Tell the device we gave up (§3.1.1), so it does not wait
                // for a driver that will never come. `live` stays false, so
                // dropping the driver does not reset the device and erase
                // the FAILED status the host may want to see.
                driver
                    .regs
                    .write32(reg::STATUS, device_status | status::FAILED);
                Err(e)
            }
        }
    }

    fn init(&mut self, device_status: &mut u32, options: Options) -> Result<(), Error> {
        let regs = &self.regs;
        regs.write32(reg::DEVICE_FEATURES_SEL, 0);
        let low = regs.read32(reg::DEVICE_FEATURES);
        regs.write32(reg::DEVICE_FEATURES_SEL, 1);
        let high = regs.read32(reg::DEVICE_FEATURES);
        let offered = u64::from(high) << 32 | u64::from(low);
        if offered & (1 << cache_flush::F_VERSION_1) == 0 {
            return Err(Error::NoVersion1 { offered });
        }
        let accepted = offered & DRIVER_FEATURES;
        regs.write32(reg::DRIVER_FEATURES_SEL, 0);
        regs.write32(reg::DRIVER_FEATURES, accepted as u32);
        regs.write32(reg::DRIVER_FEATURES_SEL, 1);
        regs.write32(reg::DRIVER_FEATURES, (accepted >> 32) as u32);
        *device_status |= status::FEATURES_OK;
        regs.write32(reg::STATUS, *device_status);
        if regs.read32(reg::STATUS) & status::FEATURES_OK == 0 {
            *device_status &= !status::FEATURES_OK;
            return Err(Error::FeaturesRefused { accepted });
        }
        self.features = Features(accepted);

        self.config = read_config(regs);
        self.full_estimate[0].store(self.config.full_flush_cost_ns, Ordering::Relaxed);
        self.full_estimate[1].store(self.config.full_break_even_bytes, Ordering::Relaxed);
        if self.features.range() {
            self.limits = Some(limits(&self.config, options.segment_capacity())?);
        }

        let wanted = options.queues.max(1);
        let num_queues = u32::from(wanted)
            .min(self.config.num_queues)
            .min(u32::from(MAX_QUEUES)) as u16;
        if num_queues == 0 {
            return Err(Error::BadConfig);
        }
        let needed = usize::from(num_queues) * self.block_size;
        let memory = &self.memory;
        if memory.len() < needed
            || memory.ptr().as_ptr() as usize % MEMORY_ALIGN != 0
            || memory.gpa() % MEMORY_ALIGN as u64 != 0
        {
            return Err(Error::BadQueueMemory {
                needed,
                provided: memory.len(),
            });
        }
        for queue in 0..num_queues {
            let size = self.setup_queue(queue)?;
            self.queues[usize::from(queue)].set_size(size);
        }
        self.num_queues = num_queues;

        *device_status |= status::DRIVER_OK;
        self.regs.write32(reg::STATUS, *device_status);
        self.live = true;
        Ok(())
    }

    /// Hands queue `queue` to the device; returns its size.
    fn setup_queue(&self, queue: u16) -> Result<u16, Error> {
        let regs = &self.regs;
        regs.write32(reg::QUEUE_SEL, u32::from(queue));
        if regs.read32(reg::QUEUE_READY) != 0 {
            return Err(Error::QueueUnavailable { queue });
        }
        let max = regs.read32(reg::QUEUE_NUM_MAX).min(u32::from(QUEUE_SIZE));
        // A request is two descriptors.
        if max < 2 {
            return Err(Error::QueueUnavailable { queue });
        }
        // The largest power of two the device accepts: split rings need one.
        let size = 1u16 << (31 - max.leading_zeros());
        let ring = self.ring(queue);
        ring.clear();
        regs.write32(reg::QUEUE_NUM, u32::from(size));
        for (low, gpa) in [
            (reg::QUEUE_DESC_LOW, ring.desc_gpa()),
            (reg::QUEUE_DRIVER_LOW, ring.avail_gpa()),
            (reg::QUEUE_DEVICE_LOW, ring.used_gpa()),
        ] {
            regs.write32(low, gpa as u32);
            regs.write32(low + 4, (gpa >> 32) as u32);
        }
        // QueueReady is the last write: the device may use the queue from
        // here on, so everything above (the cleared rings included, which
        // the MMIO write orders after) must be in place.
        regs.write32(reg::QUEUE_READY, 1);
        Ok(size)
    }

    fn ring(&self, queue: u16) -> Ring {
        let offset = usize::from(queue) * self.block_size;
        // SAFETY: init checked that the memory holds `num_queues` blocks and
        // is aligned; callers hold the queue's lock or are in init, so this
        // CPU alone (with the device) uses the block meanwhile.
        unsafe {
            Ring::new(
                self.memory.ptr().add(offset),
                self.memory.gpa() + offset as u64,
            )
        }
    }

    /// The device's configuration, as read at init: cache-line size, request
    /// limits, and the cost figures a caller can use to choose between a
    /// range flush and a full one.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The negotiated features.
    pub fn features(&self) -> Features {
        self.features
    }

    /// Number of queues set up.
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// Segments one request carries at most: the smaller of the device's
    /// `max_segments` and the request buffer's capacity (0 without RANGE).
    pub fn max_segments_per_request(&self) -> usize {
        self.limits.map_or(0, |l| l.max_segments)
    }

    /// The translation the range call uses.
    pub fn translator(&self) -> &T {
        &self.translator
    }

    /// True when the host expects one FLUSH_ALL to be cheaper than flushing
    /// `len` bytes by range: FULL is available and the device's break-even
    /// is known and at most `len`. The break-even is the device's latest
    /// (see [`Self::full_flush_estimate`]).
    pub fn full_flush_recommended(&self, len: u64) -> bool {
        let break_even = self.full_flush_estimate().1;
        self.features.full() && break_even != 0 && len >= break_even
    }

    /// The device's full-flush figures: (cost in ns, break-even range
    /// bytes). Read at init, and again on the first call after a full flush
    /// this driver made, since the host refreshes them from real full
    /// flushes.
    pub fn full_flush_estimate(&self) -> (u64, u64) {
        if self.full_estimate_stale.swap(false, Ordering::AcqRel) {
            self.refresh_full_estimate();
        }
        (
            self.full_estimate[0].load(Ordering::Relaxed),
            self.full_estimate[1].load(Ordering::Relaxed),
        )
    }

    /// Re-reads the full-flush figures (two 64-bit fields, consistent under
    /// ConfigGeneration).
    fn refresh_full_estimate(&self) {
        let (cost_ns, break_even) = read_full_estimate(&self.regs);
        self.full_estimate[0].store(cost_ns, Ordering::Relaxed);
        self.full_estimate[1].store(break_even, Ordering::Relaxed);
    }

    /// Writes back and invalidates every cache line holding any byte of the
    /// virtual range `[va, va + len)` — and so every other virtual mapping of
    /// the same physical memory, as the device works on physical addresses.
    /// Uses any free queue.
    ///
    /// `len == 0` succeeds without touching the device. The whole range is
    /// translated first; if any of it is unmapped, nothing is submitted and
    /// [`Error::Unmapped`] names the first unmapped address. A range that
    /// needs several requests fails at the first request that fails.
    pub fn invalidate_range_all_caches(&self, va: u64, len: u64) -> Result<(), Error> {
        let Some(limits) = self.validate_range(va, len)? else {
            return Ok(());
        };
        let queue = self.lock_any();
        self.range_on(&queue, va, len, limits)
    }

    /// Writes back and invalidates every line of guest memory that can be in
    /// a cache, with one FLUSH_ALL request. [`Error::Unsupported`] if the
    /// device does not offer it. Uses any free queue.
    pub fn invalidate_all_caches(&self) -> Result<(), Error> {
        self.check_full()?;
        let queue = self.lock_any();
        self.submit(&queue, RequestType::FlushAll, 0)?;
        drop(queue);
        self.full_estimate_stale.store(true, Ordering::Release);
        Ok(())
    }

    /// The calls of this driver, pinned to queue `vcpu % num_queues`.
    pub fn for_vcpu(&self, vcpu: usize) -> PinnedQueue<'_, T, R> {
        PinnedQueue {
            driver: self,
            queue: (vcpu % usize::from(self.num_queues.max(1))) as u16,
        }
    }

    fn validate_range(&self, va: u64, len: u64) -> Result<Option<Limits>, Error> {
        if len == 0 {
            return Ok(None);
        }
        let limits = self.limits.ok_or(Error::Unsupported)?;
        self.check_usable()?;
        // Plan everything once without sending, so that an unmapped page or
        // an overflow anywhere in the range is reported before any request
        // reaches the device. Translating twice is cheap next to one request.
        plan(&self.translator, va, len, limits, &mut Validate)?;
        Ok(Some(limits))
    }

    fn check_full(&self) -> Result<(), Error> {
        if !self.features.full() {
            return Err(Error::Unsupported);
        }
        self.check_usable()
    }

    fn check_usable(&self) -> Result<(), Error> {
        if self.broken.load(Ordering::Relaxed) {
            return Err(Error::DeviceNeedsReset);
        }
        Ok(())
    }

    fn range_on(
        &self,
        queue: &QueueGuard<'_>,
        va: u64,
        len: u64,
        limits: Limits,
    ) -> Result<(), Error> {
        let mut sink = QueueSink {
            driver: self,
            queue,
        };
        plan(&self.translator, va, len, limits, &mut sink)
    }

    /// Takes a free queue, trying each once from a rotating start before
    /// spinning for another round.
    fn lock_any(&self) -> QueueGuard<'_> {
        let n = usize::from(self.num_queues);
        let start = self.hint.fetch_add(1, Ordering::Relaxed) % n;
        loop {
            for i in 0..n {
                let queue = ((start + i) % n) as u16;
                if self.queues[usize::from(queue)].try_lock() {
                    return self.guard(queue);
                }
            }
            spin_loop();
        }
    }

    fn lock_queue(&self, queue: u16) -> QueueGuard<'_> {
        self.queues[usize::from(queue)].lock();
        self.guard(queue)
    }

    /// Wraps a queue whose lock the caller has just taken.
    fn guard(&self, queue: u16) -> QueueGuard<'_> {
        QueueGuard {
            state: &self.queues[usize::from(queue)],
            index: queue,
            ring: self.ring(queue),
        }
    }

    /// Sends the request in `queue`'s buffer (`segments` segments already
    /// written) and waits for its completion.
    fn submit(
        &self,
        queue: &QueueGuard<'_>,
        request_type: RequestType,
        segments: usize,
    ) -> Result<(), Error> {
        self.check_usable()?;
        let ring = &queue.ring;
        let state = queue.state;
        let size = state.size();
        // The tag names queue and sequence number in host logs.
        let tag = u64::from(queue.index) << 48 | (state.next_seq() & ((1 << 48) - 1));
        ring.write_header(RequestHeader {
            request_type: request_type as u32,
            flags: 0,
            tag,
        });
        ring.write_status(STATUS_UNWRITTEN);
        ring.write_chain((HEADER_SIZE + segments * SEGMENT_SIZE) as u32);
        let idx = state.next_avail();
        ring.write_avail_slot(idx & (size - 1), 0);
        let next = idx.wrapping_add(1);
        state.set_next_avail(next);
        // Release: the device must see the request, the chain and the slot
        // before it can see the index that publishes them.
        ring.avail_idx().store(next, Ordering::Release);
        // The notify is an MMIO store, which the language's memory model
        // does not order after the atomic store above. A full fence makes
        // the new index visible before the device (possibly on another host
        // thread, via an ioeventfd) looks at the ring.
        fence(Ordering::SeqCst);
        self.regs.write32(reg::QUEUE_NOTIFY, u32::from(queue.index));

        // One request in flight on this queue, so the used index moves from
        // `idx` to `next` exactly once.
        let used = ring.used_idx();
        let mut spins: u32 = 0;
        let seen = loop {
            // Acquire pairs with the device's publication of the used index,
            // so the used element and the status byte read below are the
            // device's final writes.
            let seen = used.load(Ordering::Acquire);
            if seen != idx {
                break seen;
            }
            spins = spins.wrapping_add(1);
            if spins % NEEDS_RESET_CHECK_PERIOD == 0 {
                // A device that gave up, or one reset under the request
                // (DRIVER_OK gone): either way the used index will never
                // move.
                let device_status = self.regs.read32(reg::STATUS);
                if device_status & status::DEVICE_NEEDS_RESET != 0 {
                    self.broken.store(true, Ordering::Relaxed);
                    return Err(Error::DeviceNeedsReset);
                }
                if device_status & status::DRIVER_OK == 0 {
                    self.broken.store(true, Ordering::Relaxed);
                    return Err(Error::DeviceReset);
                }
            }
            spin_loop();
        };
        let (id, _len) = ring.read_used_slot(idx & (size - 1));
        if seen != next || id != 0 {
            self.broken.store(true, Ordering::Relaxed);
            return Err(Error::BadCompletion);
        }
        // The used length is not checked: the status byte was pre-filled
        // with an invalid value, which says more reliably whether the device
        // wrote it than a length some devices get wrong.
        let raw = ring.read_status();
        match Status::from_raw(raw) {
            Some(Status::Ok) => Ok(()),
            Some(status) => Err(Error::Status(status)),
            None => Err(Error::UnknownStatus(raw)),
        }
    }
}

impl<T: Translate, R: Registers> Drop for CacheFlushDriver<T, R> {
    /// Resets an initialised device, so that it lets go of the queue memory
    /// before that memory can be reused.
    fn drop(&mut self) {
        if self.live {
            self.regs.write32(reg::STATUS, 0);
        }
    }
}

/// Runs `read` (configuration reads) until the configuration generation is
/// the same before and after it (§4.2.2: a 64-bit field takes two 32-bit
/// reads, which a concurrent change could tear).
fn read_stable<R: Registers, T>(regs: &R, read: impl Fn(&ConfigReader<'_, R>) -> T) -> T {
    let reader = ConfigReader(regs);
    loop {
        let generation = regs.read32(reg::CONFIG_GENERATION);
        let value = read(&reader);
        if regs.read32(reg::CONFIG_GENERATION) == generation {
            return value;
        }
    }
}

/// 32-bit accesses to the configuration space, by field offset.
struct ConfigReader<'a, R>(&'a R);

impl<R: Registers> ConfigReader<'_, R> {
    fn u32_at(&self, offset: usize) -> u32 {
        self.0.read32(reg::CONFIG + offset as u32)
    }

    fn u64_at(&self, offset: usize) -> u64 {
        u64::from(self.u32_at(offset + 4)) << 32 | u64::from(self.u32_at(offset))
    }
}

/// Reads the whole configuration space.
fn read_config<R: Registers>(regs: &R) -> Config {
    read_stable(regs, |c| Config {
        cache_line_size: c.u32_at(offset_of!(Config, cache_line_size)),
        num_queues: c.u32_at(offset_of!(Config, num_queues)),
        max_segments: c.u32_at(offset_of!(Config, max_segments)),
        reserved0: c.u32_at(offset_of!(Config, reserved0)),
        max_bytes: c.u64_at(offset_of!(Config, max_bytes)),
        full_flush_cost_ns: c.u64_at(offset_of!(Config, full_flush_cost_ns)),
        full_break_even_bytes: c.u64_at(offset_of!(Config, full_break_even_bytes)),
        full_per_sec_limit: c.u64_at(offset_of!(Config, full_per_sec_limit)),
        range_bytes_per_sec_limit: c.u64_at(offset_of!(Config, range_bytes_per_sec_limit)),
    })
}

/// Reads `full_flush_cost_ns` and `full_break_even_bytes` alone (four
/// accesses and the generation twice, against nineteen for the whole
/// space).
fn read_full_estimate<R: Registers>(regs: &R) -> (u64, u64) {
    read_stable(regs, |c| {
        (
            c.u64_at(offset_of!(Config, full_flush_cost_ns)),
            c.u64_at(offset_of!(Config, full_break_even_bytes)),
        )
    })
}

/// The request limits for a FLUSH_RANGE-capable device.
fn limits(config: &Config, capacity: usize) -> Result<Limits, Error> {
    let line = u64::from(config.cache_line_size);
    if !line.is_power_of_two() || config.max_segments == 0 || config.max_bytes < line {
        return Err(Error::BadConfig);
    }
    Ok(Limits {
        line,
        max_segments: (config.max_segments as usize).min(capacity),
        max_bytes: config.max_bytes & !(line - 1),
    })
}

/// A locked queue; unlocks on drop.
struct QueueGuard<'a> {
    state: &'a QueueState,
    index: u16,
    ring: Ring,
}

impl Drop for QueueGuard<'_> {
    fn drop(&mut self) {
        self.state.unlock();
    }
}

/// Writes planned segments into a locked queue's buffer and submits them.
struct QueueSink<'a, T: Translate, R: Registers> {
    driver: &'a CacheFlushDriver<T, R>,
    queue: &'a QueueGuard<'a>,
}

impl<T: Translate, R: Registers> Sink for QueueSink<'_, T, R> {
    fn segment(&mut self, index: usize, segment: cache_flush::Segment) {
        // `index` < max_segments <= the buffer's capacity (see `limits`).
        self.queue.ring.write_segment(index, segment);
    }

    fn submit(&mut self, count: usize) -> Result<(), Error> {
        self.driver
            .submit(self.queue, RequestType::FlushRange, count)
    }
}

/// The driver's calls on one fixed queue; see
/// [`CacheFlushDriver::for_vcpu`].
#[derive(Debug)]
pub struct PinnedQueue<'a, T: Translate, R: Registers> {
    driver: &'a CacheFlushDriver<T, R>,
    queue: u16,
}

impl<T: Translate, R: Registers> PinnedQueue<'_, T, R> {
    /// The queue these calls use.
    pub fn queue(&self) -> u16 {
        self.queue
    }

    /// [`CacheFlushDriver::invalidate_range_all_caches`] on this queue.
    pub fn invalidate_range_all_caches(&self, va: u64, len: u64) -> Result<(), Error> {
        let Some(limits) = self.driver.validate_range(va, len)? else {
            return Ok(());
        };
        let queue = self.driver.lock_queue(self.queue);
        self.driver.range_on(&queue, va, len, limits)
    }

    /// [`CacheFlushDriver::invalidate_all_caches`] on this queue.
    pub fn invalidate_all_caches(&self) -> Result<(), Error> {
        self.driver.check_full()?;
        let queue = self.driver.lock_queue(self.queue);
        self.driver.submit(&queue, RequestType::FlushAll, 0)?;
        drop(queue);
        self.driver
            .full_estimate_stale
            .store(true, Ordering::Release);
        Ok(())
    }
}
