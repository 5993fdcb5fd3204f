//! Guest side of the paravirtual cache-flush service, for any guest kernel:
//! finds the device in the boot device table, initialises it, and offers
//! [`CacheFlushDriver::invalidate_range_all_caches`] and
//! [`CacheFlushDriver::invalidate_all_caches`], the counterparts of Windows'
//! `KeInvalidateRangeAllCaches` and `KeInvalidateAllCaches`.
//!
//! # Why not `virtio-drivers`
//!
//! rcore-os's `virtio-drivers` was the obvious base, but its
//! `MmioTransport::new` rejects every device ID it does not know
//! (`DeviceType::try_from` fails with `InvalidDeviceID`), and our device uses
//! an unassigned ID ([`cache_flush::DEVICE_ID`]). So this crate carries its own
//! small driver-side virtio-mmio (version 2) transport and split virtqueue,
//! modelled on that crate's design: the kernel supplies everything
//! platform-specific through small traits ([`PhysMem`], [`Translate`], and
//! optionally [`Registers`]), and each request is one synchronous, polling
//! "add, notify, wait, pop" — what a caller that may not sleep needs.
//!
//! # What a kernel provides
//!
//! * [`PhysMem`]: a pointer for a guest-physical address (the MMIO window and
//!   the page tables). [`IdentityMap`] is the implementation for kernels whose
//!   page tables identity-map RAM and the MMIO hole, as the bundled one does.
//! * [`Translate`]: virtual to physical. [`PageTableWalker`] walks x86-64
//!   4-level tables from a root the kernel names (ring 3 cannot read CR3).
//! * [`QueueMemory`]: a physically contiguous, driver-owned region of
//!   [`Options::memory_size`] bytes for the rings and request buffers
//!   ([`QueueArea`] is a suitably aligned static for it).
//!
//! # Request path
//!
//! No allocation (the crate does not use `alloc` at all), no interrupts, no
//! sleeping: a caller takes one queue's spinlock, writes the request into that
//! queue's buffer, publishes it, notifies, and spins on the used index. See
//! [`CacheFlushDriver`] for how a queue is chosen.
#![no_std]
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

#[cfg(test)]
extern crate std;

mod driver;
mod error;
mod mem;
pub mod mmio;
mod plan;
mod queue;
mod translate;

#[cfg(test)]
mod driver_tests;
#[cfg(test)]
mod fake;

pub use cache_flush_abi::cache_flush;
pub use cache_flush_abi::cache_flush::{Config, Status};
pub use driver::{find_device, CacheFlushDriver, Features, PinnedQueue};
pub use error::Error;
pub use mem::{IdentityMap, PhysMem, QueueArea, QueueMemory, MEMORY_ALIGN};
pub use mmio::{MmioRegisters, Registers};
pub use queue::{queue_memory_size, Options, DEFAULT_SEGMENTS_PER_REQUEST, QUEUE_SIZE};
pub use translate::{Level, Mapping, PageTableWalker, Translate, WalkError};
