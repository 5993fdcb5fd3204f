//! The kernel's cache-flush driver: one [`guest_driver::CacheFlushDriver`]
//! for the whole guest, set up by vCPU 0 while the others wait, then used by
//! every vCPU on a queue of its own.
//!
//! What the kernel hands the driver:
//! * [`IdentityMap`] up to `BootInfo::identity_map_end`: the boot page tables
//!   map RAM and the MMIO hole at their physical addresses, user-accessible,
//!   so ring 3 reaches the device window and the page tables directly;
//! * a [`PageTableWalker`] rooted at [`BOOT_PML4_GPA`] (ring 3 cannot read
//!   CR3, and the kernel never replaces the boot tables), so the range call
//!   sees every mapping the kernel adds, aliases included;
//! * a static [`QueueArea`] sized for [`MAX_QUEUES`] queues, so any vCPU count
//!   the VMM allows gets one queue per vCPU.

use core::cell::UnsafeCell;
use core::mem::MaybeUninit;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU8, Ordering};

use cache_flush_abi::boot::{BootInfo, DeviceEntry, BOOT_PML4_GPA};
use cache_flush_abi::cache_flush::MAX_QUEUES;
use guest_driver::mmio::{reg, WINDOW_SIZE};
use guest_driver::{
    find_device, queue_memory_size, CacheFlushDriver, Config, Error, Features, IdentityMap,
    Mapping, MmioRegisters, Options, PageTableWalker, PhysMem, PinnedQueue, QueueArea, QueueMemory,
    Registers, Translate, DEFAULT_SEGMENTS_PER_REQUEST,
};

use crate::scenarios::{Env, Outcome};
use crate::status;

/// The translation the driver uses.
pub type Walker = PageTableWalker<IdentityMap>;
/// The driver type of this kernel.
pub type Driver = CacheFlushDriver<Walker>;

/// Bytes of queue memory for the most queues the device offers.
const AREA_SIZE: usize =
    queue_memory_size(MAX_QUEUES as usize, DEFAULT_SEGMENTS_PER_REQUEST as usize);

/// Memory shared with the device or written once by vCPU 0 before the others
/// look at it (see [`STATE`]); only raw pointers reach inside.
struct Cell<T>(UnsafeCell<T>);
// SAFETY: `QUEUE_AREA` is handed to the driver once (vCPU 0, before
// `STATE` becomes READY) and never touched by the kernel again; `DRIVER` is
// written once by vCPU 0 before the Release store of READY, and only read
// (as `&Driver`, which is `Sync`) after an Acquire load of READY.
unsafe impl<T> Sync for Cell<T> {}

static QUEUE_AREA: Cell<QueueArea<AREA_SIZE>> = Cell(UnsafeCell::new(QueueArea::new()));
static DRIVER: Cell<MaybeUninit<Driver>> = Cell(UnsafeCell::new(MaybeUninit::uninit()));

const NOT_STARTED: u8 = 0;
const READY: u8 = 1;
const FAILED: u8 = 2;
/// Where initialisation stands: set by vCPU 0 only.
static STATE: AtomicU8 = AtomicU8::new(NOT_STARTED);

/// One vCPU's handle on the driver: its own queue, plus what the scenarios
/// like to show about the device.
pub struct Flush {
    driver: &'static Driver,
    queue: PinnedQueue<'static, Walker, MmioRegisters>,
    device: DeviceEntry,
    /// The device's registers, for a harmless read that costs one exit.
    regs: MmioRegisters,
}

/// Sets the driver up (vCPU 0) and hands each vCPU its handle. Every vCPU of
/// the scenario must call it: it contains a barrier. On failure vCPU 0 prints
/// one line and returns the exit outcome; the others return
/// [`Outcome::Park`].
pub fn setup(env: &Env) -> Result<Flush, Outcome> {
    if env.is_first() && STATE.load(Ordering::Relaxed) == NOT_STARTED {
        let state = match init(env.boot_info, env.vcpu_count) {
            Ok(()) => READY,
            Err(Error::DeviceNotFound) => {
                crate::println!("guest: no cache-flush device in the device table");
                FAILED
            }
            Err(e) => {
                crate::println!("guest: cannot initialise the cache-flush device: {e}");
                FAILED
            }
        };
        STATE.store(state, Ordering::Release);
    }
    env.barrier();
    if STATE.load(Ordering::Acquire) != READY {
        return Err(if env.is_first() {
            // A missing device is an ordinary scenario failure (status 1);
            // a device the driver cannot bring up has its own status.
            match find_device(env.boot_info) {
                Err(_) => Outcome::Exit(status::SCENARIO_FAILED),
                Ok(_) => Outcome::Exit(status::DEVICE_INIT_FAILED),
            }
        } else {
            Outcome::Park
        });
    }
    // SAFETY: READY was stored (Release) after `DRIVER` was written, and this
    // vCPU has seen it (Acquire); nothing writes `DRIVER` again.
    let driver: &'static Driver = unsafe { (*DRIVER.0.get()).assume_init_ref() };
    // Both worked for vCPU 0's probe just now; should they fail after all,
    // vCPU 0 still ends the run rather than park.
    let unusable = || {
        if env.is_first() {
            crate::println!("guest: the cache-flush device's window is no longer reachable");
            Outcome::Exit(status::DEVICE_INIT_FAILED)
        } else {
            Outcome::Park
        }
    };
    let device = find_device(env.boot_info).map_err(|_| unusable())?;
    let regs = registers(env.boot_info, &device).ok_or_else(unusable)?;
    Ok(Flush {
        driver,
        queue: driver.for_vcpu(env.vcpu as usize),
        device,
        regs,
    })
}

/// The identity map of the boot page tables.
fn identity(boot_info: &BootInfo) -> IdentityMap {
    // SAFETY: the boot protocol maps `[0, identity_map_end)` at the same
    // virtual addresses, readable, writable and user-accessible, and this
    // kernel never removes those mappings.
    unsafe { IdentityMap::new(boot_info.identity_map_end) }
}

/// The device's registers, through the identity map.
fn registers(boot_info: &BootInfo, device: &DeviceEntry) -> Option<MmioRegisters> {
    let base = identity(boot_info).map(device.base, WINDOW_SIZE as usize)?;
    // SAFETY: the device table names a virtio-mmio window at `base`, of at
    // least WINDOW_SIZE bytes (checked by `find_device`), which the boot page
    // tables map uncached for good.
    Some(unsafe { MmioRegisters::new(base) })
}

/// vCPU 0: finds and initialises the device, one queue per vCPU.
fn init(boot_info: &BootInfo, vcpu_count: u32) -> Result<(), Error> {
    let mem = identity(boot_info);
    let walker = PageTableWalker::new(mem, BOOT_PML4_GPA);
    let area = QUEUE_AREA.0.get().cast::<u8>();
    // The area is a static of the identity-mapped image: its virtual
    // address is its guest-physical address.
    let gpa = area as u64;
    // SAFETY: the area is a static (valid for good), handed over exactly
    // once (STATE is NOT_STARTED and only vCPU 0 gets here), never accessed
    // by the kernel afterwards, and physically contiguous at `gpa` (the
    // image is loaded contiguously at its link address, identity-mapped).
    let memory =
        unsafe { QueueMemory::new(NonNull::new(area).ok_or(Error::BadConfig)?, gpa, AREA_SIZE) };
    let queues = u16::try_from(vcpu_count).unwrap_or(MAX_QUEUES);
    let driver = Driver::probe(boot_info, &mem, walker, memory, Options::new(queues))?;
    // SAFETY: only vCPU 0 writes here, once, before publishing READY; no
    // other vCPU reads `DRIVER` before it sees READY.
    unsafe { (*DRIVER.0.get()).write(driver) };
    Ok(())
}

impl Flush {
    /// The whole driver (for its any-queue calls, features and config).
    pub fn driver(&self) -> &'static Driver {
        self.driver
    }

    /// `KeInvalidateRangeAllCaches` on this vCPU's queue.
    pub fn range(&self, va: u64, len: u64) -> Result<(), Error> {
        self.queue.invalidate_range_all_caches(va, len)
    }

    /// `KeInvalidateAllCaches` on this vCPU's queue.
    pub fn all(&self) -> Result<(), Error> {
        self.queue.invalidate_all_caches()
    }

    /// The negotiated features.
    pub fn features(&self) -> Features {
        self.driver.features()
    }

    /// The device's configuration.
    pub fn config(&self) -> &Config {
        self.driver.config()
    }

    /// The driver's translation of `va`.
    pub fn translate(&self, va: u64) -> Option<Mapping> {
        self.driver.translator().translate(va)
    }

    /// The device's table entry (window base, device ID).
    pub fn device(&self) -> &DeviceEntry {
        &self.device
    }

    /// Reads the device's MagicValue register: one exit to the VMM that
    /// does nothing else, the yardstick for a request's cost and the "no-op
    /// exit" control of Flush+Reload.
    pub fn noop_exit(&self) -> u32 {
        self.regs.read32(reg::MAGIC_VALUE)
    }

    /// Notifies this vCPU's queue with no new request in it: one exit down
    /// the notify path (an MMIO write the host serves by looking at the
    /// queues and finding nothing), the part of a request's cost that is not
    /// its own work. Only while no request of this queue is in flight.
    pub fn empty_notify(&self) {
        self.regs
            .write32(reg::QUEUE_NOTIFY, u32::from(self.queue.queue()));
    }
}
