//! The virtio-mmio (version 2) register interface, driver side: register
//! offsets and status bits (virtio 1.2, §4.2.2), the [`Registers`] trait the
//! driver talks through, and [`MmioRegisters`], its real implementation.

use core::ptr::NonNull;

/// "virt", little-endian.
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// The modern (non-legacy) virtio-mmio version.
pub const VERSION: u32 = 2;

/// Register offsets in the virtio-mmio window.
pub mod reg {
    /// MagicValue (R).
    pub const MAGIC_VALUE: u32 = 0x000;
    /// Version (R).
    pub const VERSION: u32 = 0x004;
    /// DeviceID (R).
    pub const DEVICE_ID: u32 = 0x008;
    /// VendorID (R).
    pub const VENDOR_ID: u32 = 0x00c;
    /// DeviceFeatures (R): 32 bits of the page DeviceFeaturesSel selects.
    pub const DEVICE_FEATURES: u32 = 0x010;
    /// DeviceFeaturesSel (W).
    pub const DEVICE_FEATURES_SEL: u32 = 0x014;
    /// DriverFeatures (W): 32 bits of the page DriverFeaturesSel selects.
    pub const DRIVER_FEATURES: u32 = 0x020;
    /// DriverFeaturesSel (W).
    pub const DRIVER_FEATURES_SEL: u32 = 0x024;
    /// QueueSel (W).
    pub const QUEUE_SEL: u32 = 0x030;
    /// QueueNumMax (R).
    pub const QUEUE_NUM_MAX: u32 = 0x034;
    /// QueueNum (W).
    pub const QUEUE_NUM: u32 = 0x038;
    /// QueueReady (RW).
    pub const QUEUE_READY: u32 = 0x044;
    /// QueueNotify (W): the index of the queue with new buffers.
    pub const QUEUE_NOTIFY: u32 = 0x050;
    /// InterruptStatus (R).
    pub const INTERRUPT_STATUS: u32 = 0x060;
    /// InterruptACK (W).
    pub const INTERRUPT_ACK: u32 = 0x064;
    /// Status (RW): the device status bits; writing 0 resets the device.
    pub const STATUS: u32 = 0x070;
    /// QueueDescLow (W).
    pub const QUEUE_DESC_LOW: u32 = 0x080;
    /// QueueDescHigh (W).
    pub const QUEUE_DESC_HIGH: u32 = 0x084;
    /// QueueDriverLow (W): the available ring.
    pub const QUEUE_DRIVER_LOW: u32 = 0x090;
    /// QueueDriverHigh (W).
    pub const QUEUE_DRIVER_HIGH: u32 = 0x094;
    /// QueueDeviceLow (W): the used ring.
    pub const QUEUE_DEVICE_LOW: u32 = 0x0a0;
    /// QueueDeviceHigh (W).
    pub const QUEUE_DEVICE_HIGH: u32 = 0x0a4;
    /// ConfigGeneration (R).
    pub const CONFIG_GENERATION: u32 = 0x0fc;
    /// Start of the device-specific configuration space.
    pub const CONFIG: u32 = 0x100;
}

/// Device status bits (virtio 1.2, §2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest knows how to drive it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The guest gave up on the device.
    pub const FAILED: u32 = 128;
}

/// 32-bit access to the registers of one virtio-mmio window.
///
/// [`MmioRegisters`] is the real thing. The trait exists so the driver can run
/// against a fake device on the host (as `virtio-drivers` does with its fake
/// transport), and so an unusual kernel can route register accesses its own
/// way. Only 32-bit accesses are used — the spec requires them for the
/// control registers, and for the 32- and 64-bit fields of the configuration
/// space (a 64-bit field is read as two 32-bit halves).
///
/// After initialisation the driver only writes QueueNotify and reads Status,
/// both from several CPUs at once, so implementations must allow concurrent
/// calls (hence `&self`).
pub trait Registers {
    /// Reads the 32-bit register at `offset`.
    fn read32(&self, offset: u32) -> u32;
    /// Writes the 32-bit register at `offset`.
    fn write32(&self, offset: u32, value: u32);
}

impl<R: Registers + ?Sized> Registers for &R {
    fn read32(&self, offset: u32) -> u32 {
        (**self).read32(offset)
    }
    fn write32(&self, offset: u32, value: u32) {
        (**self).write32(offset, value)
    }
}

/// Size of the window the driver needs: the registers plus [`Config`]
/// (`cache_flush_abi::cache_flush::Config`).
///
/// [`Config`]: cache_flush_abi::cache_flush::Config
pub const WINDOW_SIZE: u64 =
    reg::CONFIG as u64 + core::mem::size_of::<cache_flush_abi::cache_flush::Config>() as u64;

/// The registers of a virtio-mmio window, accessed with volatile 32-bit loads
/// and stores (each one an exit to the VMM).
#[derive(Debug)]
pub struct MmioRegisters {
    base: NonNull<u8>,
}

// SAFETY: the window is device memory; each access is one independent
// volatile 32-bit load or store, which the VMM serialises. After init the
// driver only writes QueueNotify and reads Status, which have no
// per-accessor state, so concurrent use from several CPUs is sound.
unsafe impl Send for MmioRegisters {}
// SAFETY: as for `Send`.
unsafe impl Sync for MmioRegisters {}

impl MmioRegisters {
    /// The window at `base`.
    ///
    /// # Safety
    ///
    /// `base` must point to a virtio-mmio window of at least [`WINDOW_SIZE`]
    /// bytes, mapped uncached (device memory) for as long as the value lives.
    pub const unsafe fn new(base: NonNull<u8>) -> Self {
        Self { base }
    }

    fn reg(&self, offset: u32) -> *mut u32 {
        debug_assert!(offset % 4 == 0 && u64::from(offset) + 4 <= WINDOW_SIZE);
        // SAFETY: every offset the driver uses lies inside the window, which
        // `new`'s caller guaranteed to be WINDOW_SIZE bytes.
        unsafe { self.base.as_ptr().add(offset as usize).cast() }
    }
}

impl Registers for MmioRegisters {
    fn read32(&self, offset: u32) -> u32 {
        // SAFETY: `reg` gives an aligned pointer inside the mapped window.
        // Volatile, because every load is a device access with side effects
        // the compiler must neither merge nor elide.
        unsafe { self.reg(offset).read_volatile() }
    }

    fn write32(&self, offset: u32, value: u32) {
        // SAFETY: as in `read32`.
        unsafe { self.reg(offset).write_volatile(value) }
    }
}
