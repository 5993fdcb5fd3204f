//! The driver's one error type.

use core::fmt;

use cache_flush_abi::cache_flush::Status;

/// Everything that can go wrong, from discovery to a request's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// The boot information block has the wrong magic or version.
    BadBootInfo,
    /// The boot device table has no virtio-mmio entry with the cache-flush
    /// device ID, or its window is too small to hold the registers.
    DeviceNotFound,
    /// The kernel's [`PhysMem`](crate::PhysMem) could not map the device's
    /// MMIO window.
    WindowUnmapped {
        /// Guest-physical base of the window.
        base: u64,
    },
    /// The MagicValue register does not read "virt".
    BadMagic(u32),
    /// The Version register is not 2 (only modern virtio-mmio is supported).
    BadVersion(u32),
    /// The DeviceID register is not the cache-flush device's.
    BadDeviceId(u32),
    /// The device does not offer VIRTIO_F_VERSION_1, which the wire format
    /// requires.
    NoVersion1 {
        /// The feature bits the device offered.
        offered: u64,
    },
    /// The device cleared FEATURES_OK: it refused the features we accepted.
    FeaturesRefused {
        /// The feature bits we tried to accept.
        accepted: u64,
    },
    /// The configuration space is unusable (a cache-line size that is not a
    /// power of two, no segments or fewer bytes per request than one line,
    /// no queues).
    BadConfig,
    /// The queue memory handed in at init is too small or not aligned to
    /// [`MEMORY_ALIGN`](crate::MEMORY_ALIGN) (virtually or physically).
    BadQueueMemory {
        /// Bytes needed for the queues being set up.
        needed: usize,
        /// Bytes provided.
        provided: usize,
    },
    /// A queue could not be set up: it is already live, or the device's
    /// QueueNumMax is below the two descriptors a request needs.
    QueueUnavailable {
        /// Index of the queue.
        queue: u16,
    },
    /// The requested operation's feature was not negotiated: FLUSH_ALL on a
    /// device that does not offer it (as on hosts that cannot flush
    /// everything), or FLUSH_RANGE on one that does not offer that.
    Unsupported,
    /// A virtual address of the range is not mapped; nothing was submitted.
    Unmapped {
        /// The first unmapped address of the range.
        va: u64,
    },
    /// `va + len` overflows the address space (or a translated physical
    /// extent would).
    AddressOverflow,
    /// The device completed a request with a status other than OK. For a
    /// range split into several requests, the requests before this one were
    /// served; none after it was submitted. [`Status::Busy`] means a rate
    /// limit refused it and nothing was flushed: try again later.
    Status(Status),
    /// The device wrote a status byte this driver does not know (or none at
    /// all: the driver pre-fills the byte with 0xFF).
    UnknownStatus(u8),
    /// The device completed something other than the request in flight
    /// (wrong descriptor head, or the used index jumped). The driver stops
    /// using the device: every later call fails with
    /// [`Error::DeviceNeedsReset`].
    BadCompletion,
    /// The device set DEVICE_NEEDS_RESET while a request was in flight, or an
    /// earlier request left the device unusable. The driver stops using it.
    DeviceNeedsReset,
    /// The device lost DRIVER_OK while a request was in flight: something
    /// reset it under the driver. The request may or may not have been
    /// flushed and is never completed; the driver stops using the device
    /// (later calls fail with [`Error::DeviceNeedsReset`]).
    DeviceReset,
}

impl Error {
    /// True when the same call may succeed if simply repeated later (a rate
    /// limit refused it).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Status(Status::Busy))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::BadBootInfo => write!(f, "boot information block has a bad magic or version"),
            Error::DeviceNotFound => write!(f, "no cache-flush device in the boot device table"),
            Error::WindowUnmapped { base } => {
                write!(f, "cannot map the device's MMIO window at {base:#x}")
            }
            Error::BadMagic(v) => write!(f, "bad virtio-mmio magic {v:#x}"),
            Error::BadVersion(v) => write!(f, "unsupported virtio-mmio version {v}"),
            Error::BadDeviceId(v) => write!(f, "unexpected virtio device id {v:#x}"),
            Error::NoVersion1 { offered } => {
                write!(
                    f,
                    "device does not offer VIRTIO_F_VERSION_1 (offered {offered:#x})"
                )
            }
            Error::FeaturesRefused { accepted } => {
                write!(f, "device refused features {accepted:#x}")
            }
            Error::BadConfig => write!(f, "device configuration space is unusable"),
            Error::BadQueueMemory { needed, provided } => write!(
                f,
                "queue memory too small or misaligned ({provided} bytes given, {needed} needed)"
            ),
            Error::QueueUnavailable { queue } => write!(f, "virtqueue {queue} is unavailable"),
            Error::Unsupported => write!(f, "operation not offered by the device"),
            Error::Unmapped { va } => write!(f, "virtual address {va:#x} is not mapped"),
            Error::AddressOverflow => write!(f, "address range overflows"),
            Error::Status(s) => write!(f, "device returned status {s:?}"),
            Error::UnknownStatus(raw) => write!(f, "device returned unknown status {raw:#x}"),
            Error::BadCompletion => write!(f, "device completed an unexpected request"),
            Error::DeviceNeedsReset => write!(f, "device needs a reset"),
            Error::DeviceReset => write!(f, "device was reset under the request"),
        }
    }
}

impl core::error::Error for Error {}
