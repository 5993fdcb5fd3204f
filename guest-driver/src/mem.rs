//! How the driver reaches guest-physical memory: the kernel's [`PhysMem`], and
//! the region it donates for the virtqueues ([`QueueMemory`]).

use core::ptr::NonNull;

/// Maps guest-physical addresses to pointers the driver can dereference. The
/// driver uses it for the device's MMIO window and to read page tables.
///
/// # Safety
///
/// A pointer returned by [`PhysMem::map`] must be valid for volatile reads
/// and writes of `len` bytes at `gpa`, and must stay valid for the rest of
/// the program: the driver keeps the MMIO window's pointer for as long as it
/// exists (kernels normally map RAM and device windows permanently).
pub unsafe trait PhysMem {
    /// A pointer to `len` bytes of guest-physical memory at `gpa`, or `None`
    /// if (part of) that range cannot be reached.
    fn map(&self, gpa: u64, len: usize) -> Option<NonNull<u8>>;
}

// SAFETY: forwards to `M`, which upholds the contract.
unsafe impl<M: PhysMem + ?Sized> PhysMem for &M {
    fn map(&self, gpa: u64, len: usize) -> Option<NonNull<u8>> {
        (**self).map(gpa, len)
    }
}

/// [`PhysMem`] for a kernel whose page tables map every guest-physical
/// address the driver touches at the same virtual address — as the bundled
/// kernel's do (RAM and the MMIO hole, user-accessible, up to
/// `BootInfo::identity_map_end`).
#[derive(Clone, Copy, Debug)]
pub struct IdentityMap {
    end: u64,
}

impl IdentityMap {
    /// An identity map of `[0, end)`.
    ///
    /// # Safety
    ///
    /// Every address below `end` must be mapped readable and writable at the
    /// same virtual address, for the rest of the program, for the privilege
    /// level the driver runs at.
    pub const unsafe fn new(end: u64) -> Self {
        Self { end }
    }
}

// SAFETY: `IdentityMap::new`'s caller promised that everything below `end` is
// identity-mapped for good; `map` refuses anything beyond it (and address 0,
// which `NonNull` cannot represent and no device lives at).
unsafe impl PhysMem for IdentityMap {
    fn map(&self, gpa: u64, len: usize) -> Option<NonNull<u8>> {
        let end = gpa.checked_add(len as u64)?;
        if end > self.end {
            return None;
        }
        NonNull::new(usize::try_from(gpa).ok()? as *mut u8)
    }
}

/// Alignment the driver requires of [`QueueMemory`], both its virtual and its
/// guest-physical address. One cache line: each queue then starts on its own
/// line, so vCPUs using different queues never share a line.
pub const MEMORY_ALIGN: usize = 64;

/// The memory donated to the driver for its virtqueues and request buffers.
///
/// The device reads and writes it by guest-physical address, the driver
/// through `ptr`; the two must name the same, physically contiguous, bytes.
#[derive(Debug)]
pub struct QueueMemory {
    ptr: NonNull<u8>,
    gpa: u64,
    len: usize,
}

// SAFETY: `QueueMemory` is an opaque handle with no accessors: the driver
// reaches a queue's part of it only while holding that queue's lock, so
// moving or sharing the handle between CPUs cannot create a data race.
unsafe impl Send for QueueMemory {}
// SAFETY: as for `Send`.
unsafe impl Sync for QueueMemory {}

impl QueueMemory {
    /// Memory at virtual `ptr` and guest-physical `gpa`, `len` bytes.
    ///
    /// # Safety
    ///
    /// `[ptr, ptr + len)` must be valid for reads and writes and used by
    /// nothing else for as long as the driver exists (the device writes it
    /// at any time while a request is in flight), and must be backed by the
    /// physically contiguous guest RAM `[gpa, gpa + len)`.
    pub const unsafe fn new(ptr: NonNull<u8>, gpa: u64, len: usize) -> Self {
        Self { ptr, gpa, len }
    }

    /// A `'static` buffer (typically a [`QueueArea`]) whose guest-physical
    /// address is `gpa`.
    ///
    /// # Safety
    ///
    /// `buf` must be backed by the physically contiguous guest RAM
    /// `[gpa, gpa + buf.len())`.
    pub unsafe fn from_static(buf: &'static mut [u8], gpa: u64) -> Self {
        let len = buf.len();
        // SAFETY: the exclusive 'static borrow gives validity and exclusivity
        // for good; the caller vouches for `gpa`.
        unsafe { Self::new(NonNull::from(buf).cast(), gpa, len) }
    }

    pub(crate) fn ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    pub(crate) fn gpa(&self) -> u64 {
        self.gpa
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

/// A page-aligned (hence [`MEMORY_ALIGN`]-aligned) zeroed buffer for
/// [`QueueMemory`], for a kernel to place in a `static`:
///
/// ```
/// use guest_driver::{queue_memory_size, QueueArea, DEFAULT_SEGMENTS_PER_REQUEST};
/// static mut AREA: QueueArea<{ queue_memory_size(4, DEFAULT_SEGMENTS_PER_REQUEST as usize) }> =
///     QueueArea::new();
/// ```
#[repr(C, align(4096))]
#[derive(Debug)]
pub struct QueueArea<const N: usize>(pub [u8; N]);

impl<const N: usize> QueueArea<N> {
    /// A zeroed area.
    pub const fn new() -> Self {
        Self([0; N])
    }
}

impl<const N: usize> Default for QueueArea<N> {
    fn default() -> Self {
        Self::new()
    }
}
