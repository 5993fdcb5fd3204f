//! The driver side of a split virtqueue (virtio 1.2, §2.7): the memory layout
//! of one queue, the ring accesses, and the per-queue spinlock.
//!
//! A caller holds a queue for a whole request, and a request is always the
//! same two-descriptor chain (descriptor 0: header and segments, readable;
//! descriptor 1: the status byte, writable), so only one chain is ever in
//! flight per queue and the descriptor table never needs a free list.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};

use cache_flush_abi::cache_flush::{RequestHeader, Segment, HEADER_SIZE, SEGMENT_SIZE};

use crate::mem::MEMORY_ALIGN;

/// Descriptors per queue. Two would do (one request in flight per queue is all
/// a synchronous caller needs); 8 keeps the rings a small, power-of-two size
/// while leaving room for the device to round down if its QueueNumMax is
/// smaller. Must be a power of two.
pub const QUEUE_SIZE: u16 = 8;

/// The segment capacity of a queue's request buffer that [`Options::new`]
/// picks: 2 KiB of segments per queue. Each request pauses the whole VM, so
/// fewer, larger requests are much cheaper than many small ones; the device's
/// `max_segments` still caps what is sent.
pub const DEFAULT_SEGMENTS_PER_REQUEST: u32 = 128;

const DESC_SIZE: usize = 16;
const QSIZE: usize = QUEUE_SIZE as usize;

const fn align_up(v: usize, a: usize) -> usize {
    (v + a - 1) & !(a - 1)
}

// Layout of one queue's block, sized for QUEUE_SIZE descriptors. The rings
// are contiguous and meet the split ring's alignment rules (descriptors 16,
// available ring 2, used ring 4); a device that takes a smaller queue size
// simply uses the start of each ring.
const DESC_OFF: usize = 0;
const AVAIL_OFF: usize = DESC_OFF + DESC_SIZE * QSIZE;
/// flags, idx, ring[QUEUE_SIZE], used_event.
const AVAIL_LEN: usize = 2 + 2 + 2 * QSIZE + 2;
const USED_OFF: usize = align_up(AVAIL_OFF + AVAIL_LEN, 4);
/// flags, idx, ring[QUEUE_SIZE] of (id: u32, len: u32), avail_event.
const USED_LEN: usize = 2 + 2 + 8 * QSIZE + 2;
const STATUS_OFF: usize = USED_OFF + USED_LEN;
/// The request buffer (header, then segments) starts on its own cache line.
const REQUEST_OFF: usize = align_up(STATUS_OFF + 1, MEMORY_ALIGN);
const RINGS_END: usize = STATUS_OFF + 1;

// The split ring's alignment rules (descriptors 16, available ring 2, used
// ring 4), no overlap, and a cache-line aligned request buffer, checked at
// compile time.
const _: () = {
    assert!(DESC_OFF % 16 == 0 && AVAIL_OFF % 2 == 0 && USED_OFF % 4 == 0);
    assert!(AVAIL_OFF + AVAIL_LEN <= USED_OFF && USED_OFF + USED_LEN <= STATUS_OFF);
    assert!(RINGS_END <= REQUEST_OFF && REQUEST_OFF % MEMORY_ALIGN == 0);
    assert!(QUEUE_SIZE.is_power_of_two() && QUEUE_SIZE >= 2);
};

/// Bytes of one queue's block for `segments` segments per request; blocks are
/// cache-line multiples so that queues never share a line.
const fn block_size(segments: usize) -> usize {
    let segments = if segments == 0 { 1 } else { segments };
    align_up(
        REQUEST_OFF + HEADER_SIZE + SEGMENT_SIZE * segments,
        MEMORY_ALIGN,
    )
}

/// Bytes of [`QueueMemory`](crate::QueueMemory) needed for `queues` queues
/// whose request buffers hold `segments_per_request` segments each (0 counts
/// as 1). A `const fn`, so a kernel can size a static
/// [`QueueArea`](crate::QueueArea) with it.
pub const fn queue_memory_size(queues: usize, segments_per_request: usize) -> usize {
    queues * block_size(segments_per_request)
}

/// What the kernel asks of [`CacheFlushDriver`](crate::CacheFlushDriver) at
/// initialisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    /// Queues to set up (0 counts as 1). The driver sets up the smaller of
    /// this and the device's `num_queues`; ask for one per vCPU so that
    /// vCPUs never contend for a queue.
    pub queues: u16,
    /// Segments each queue's request buffer can hold (0 counts as 1). A
    /// request carries at most the smaller of this and the device's
    /// `max_segments`.
    pub segments_per_request: u32,
}

impl Options {
    /// `queues` queues of [`DEFAULT_SEGMENTS_PER_REQUEST`] segments each.
    pub const fn new(queues: u16) -> Self {
        Self {
            queues,
            segments_per_request: DEFAULT_SEGMENTS_PER_REQUEST,
        }
    }

    /// Bytes of queue memory these options need:
    /// [`queue_memory_size`]`(queues, segments_per_request)`.
    pub const fn memory_size(&self) -> usize {
        let queues = if self.queues == 0 { 1 } else { self.queues };
        queue_memory_size(queues as usize, self.segments_per_request as usize)
    }

    pub(crate) fn segment_capacity(&self) -> usize {
        (self.segments_per_request as usize).max(1)
    }

    pub(crate) fn block_size(&self) -> usize {
        block_size(self.segments_per_request as usize)
    }
}

/// Descriptor flag: the chain continues at `next`.
const VIRTQ_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Available-ring flag: we poll, so the device need not interrupt us.
const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// The value the driver puts in the status byte before submitting: not a
/// valid status, so a device that completes without writing it is noticed.
pub(crate) const STATUS_UNWRITTEN: u8 = 0xff;

/// Per-queue driver state. Cache-line aligned so that vCPUs spinning on
/// different queues' locks do not bounce one line between them.
#[repr(align(64))]
#[derive(Debug)]
pub(crate) struct QueueState {
    locked: AtomicBool,
    /// The available index the next request will publish. Only touched under
    /// the lock; an atomic merely to avoid an `UnsafeCell`.
    next_avail: AtomicU16,
    /// Requests submitted on this queue, for the header tag. Under the lock.
    seq: AtomicU64,
    /// The negotiated queue size (a power of two), fixed at init.
    size: u16,
}

impl QueueState {
    pub(crate) const fn new() -> Self {
        Self {
            locked: AtomicBool::new(false),
            next_avail: AtomicU16::new(0),
            seq: AtomicU64::new(0),
            size: 0,
        }
    }

    pub(crate) fn set_size(&mut self, size: u16) {
        self.size = size;
    }

    pub(crate) fn size(&self) -> u16 {
        self.size
    }

    /// Takes the lock if it is free. Acquire pairs with `unlock`'s Release,
    /// so the next holder sees the ring state the previous one left.
    pub(crate) fn try_lock(&self) -> bool {
        self.locked
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    /// Spins until the lock is ours. Test-and-test-and-set: waiters spin on a
    /// plain load so they do not keep stealing the line from the holder.
    pub(crate) fn lock(&self) {
        while !self.try_lock() {
            while self.locked.load(Ordering::Relaxed) {
                core::hint::spin_loop();
            }
        }
    }

    pub(crate) fn unlock(&self) {
        self.locked.store(false, Ordering::Release);
    }

    /// The next available index and tag sequence number. Caller holds the lock.
    pub(crate) fn next_avail(&self) -> u16 {
        self.next_avail.load(Ordering::Relaxed)
    }

    pub(crate) fn set_next_avail(&self, idx: u16) {
        self.next_avail.store(idx, Ordering::Relaxed);
    }

    pub(crate) fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }
}

/// One queue's block of queue memory: the rings, the status byte and the
/// request buffer.
///
/// All accesses are volatile or atomic: the device reads and writes this
/// memory behind the compiler's back.
pub(crate) struct Ring {
    ptr: NonNull<u8>,
    gpa: u64,
}

impl Ring {
    /// The block at `ptr` (guest-physical `gpa`).
    ///
    /// # Safety
    ///
    /// `ptr` must be [`MEMORY_ALIGN`]-aligned and valid for the block size of
    /// the options in use, backed by guest RAM at `gpa`, and no other CPU may
    /// touch the block while this `Ring` exists (the driver guarantees that
    /// with the queue's lock, or by being in init).
    pub(crate) unsafe fn new(ptr: NonNull<u8>, gpa: u64) -> Self {
        Self { ptr, gpa }
    }

    pub(crate) fn desc_gpa(&self) -> u64 {
        self.gpa + DESC_OFF as u64
    }

    pub(crate) fn avail_gpa(&self) -> u64 {
        self.gpa + AVAIL_OFF as u64
    }

    pub(crate) fn used_gpa(&self) -> u64 {
        self.gpa + USED_OFF as u64
    }

    fn at<T>(&self, offset: usize) -> *mut T {
        debug_assert!(offset % core::mem::align_of::<T>() == 0);
        // SAFETY: every offset the ring uses is inside the block, which
        // `new`'s caller guaranteed to be valid.
        unsafe { self.ptr.as_ptr().add(offset).cast() }
    }

    /// Zeroes the rings and the status byte, for a queue about to be handed
    /// to the device (the donated memory may hold anything).
    pub(crate) fn clear(&self) {
        for offset in 0..RINGS_END {
            // SAFETY: inside the block; no one else uses it during init.
            unsafe { self.at::<u8>(offset).write_volatile(0) };
        }
        // SAFETY: the available ring's flags, u16-aligned, inside the block.
        unsafe {
            self.at::<u16>(AVAIL_OFF)
                .write_volatile(VIRTQ_AVAIL_F_NO_INTERRUPT)
        };
    }

    /// Writes the request header.
    pub(crate) fn write_header(&self, header: RequestHeader) {
        let base = REQUEST_OFF;
        // SAFETY: the header fits at the start of the request buffer, which
        // is cache-line aligned, so each field is naturally aligned.
        unsafe {
            self.at::<u32>(base)
                .write_volatile(header.request_type.to_le());
            self.at::<u32>(base + 4)
                .write_volatile(header.flags.to_le());
            self.at::<u64>(base + 8).write_volatile(header.tag.to_le());
        }
    }

    /// Writes segment `index`. The caller keeps `index` below the request
    /// buffer's capacity.
    pub(crate) fn write_segment(&self, index: usize, segment: Segment) {
        let offset = REQUEST_OFF + HEADER_SIZE + index * SEGMENT_SIZE;
        // SAFETY: inside the request buffer (capacity checked by the
        // caller); 16-byte aligned, as the buffer is and segments are 16 bytes.
        unsafe {
            self.at::<u64>(offset).write_volatile(segment.addr.to_le());
            self.at::<u64>(offset + 8)
                .write_volatile(segment.len.to_le());
        }
    }

    pub(crate) fn write_status(&self, value: u8) {
        // SAFETY: the status byte is inside the block.
        unsafe { self.at::<u8>(STATUS_OFF).write_volatile(value) }
    }

    pub(crate) fn read_status(&self) -> u8 {
        // SAFETY: as in `write_status`.
        unsafe { self.at::<u8>(STATUS_OFF).read_volatile() }
    }

    /// Writes the request's two-descriptor chain at descriptors 0 and 1:
    /// `readable` bytes of header and segments, then the status byte.
    pub(crate) fn write_chain(&self, readable: u32) {
        self.write_desc(
            0,
            self.gpa + REQUEST_OFF as u64,
            readable,
            VIRTQ_DESC_F_NEXT,
            1,
        );
        self.write_desc(1, self.gpa + STATUS_OFF as u64, 1, VIRTQ_DESC_F_WRITE, 0);
    }

    fn write_desc(&self, index: usize, addr: u64, len: u32, flags: u16, next: u16) {
        let offset = DESC_OFF + index * DESC_SIZE;
        // SAFETY: descriptors 0 and 1 are inside the table; the table is
        // 16-byte aligned, so each field is naturally aligned.
        unsafe {
            self.at::<u64>(offset).write_volatile(addr.to_le());
            self.at::<u32>(offset + 8).write_volatile(len.to_le());
            self.at::<u16>(offset + 12).write_volatile(flags.to_le());
            self.at::<u16>(offset + 14).write_volatile(next.to_le());
        }
    }

    /// Puts descriptor head `head` in available-ring slot `slot`.
    pub(crate) fn write_avail_slot(&self, slot: u16, head: u16) {
        // SAFETY: `slot` is below the queue size, hence below QUEUE_SIZE.
        unsafe {
            self.at::<u16>(AVAIL_OFF + 4 + 2 * slot as usize)
                .write_volatile(head.to_le())
        }
    }

    /// The available ring's idx field, which the device reads concurrently.
    pub(crate) fn avail_idx(&self) -> &AtomicU16 {
        // SAFETY: 2-byte aligned and inside the block, which outlives `self`;
        // after `clear` (which happens-before the queue goes live) the driver
        // accesses it only atomically.
        unsafe { AtomicU16::from_ptr(self.at(AVAIL_OFF + 2)) }
    }

    /// The used ring's idx field, which the device writes concurrently.
    pub(crate) fn used_idx(&self) -> &AtomicU16 {
        // SAFETY: as in `avail_idx`.
        unsafe { AtomicU16::from_ptr(self.at(USED_OFF + 2)) }
    }

    /// The (id, len) of used-ring slot `slot`.
    pub(crate) fn read_used_slot(&self, slot: u16) -> (u32, u32) {
        let offset = USED_OFF + 4 + 8 * slot as usize;
        // SAFETY: `slot` is below the queue size; the element is 4-byte aligned.
        unsafe {
            (
                u32::from_le(self.at::<u32>(offset).read_volatile()),
                u32::from_le(self.at::<u32>(offset + 4).read_volatile()),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_size_is_per_queue_blocks() {
        let one = queue_memory_size(1, 4);
        assert_eq!(one % MEMORY_ALIGN, 0);
        assert!(one >= REQUEST_OFF + 16 + 4 * 16);
        assert_eq!(queue_memory_size(3, 4), 3 * one);
        assert_eq!(queue_memory_size(2, 0), queue_memory_size(2, 1));
        assert_eq!(
            Options::new(4).memory_size(),
            queue_memory_size(4, DEFAULT_SEGMENTS_PER_REQUEST as usize)
        );
        assert_eq!(Options::new(0).memory_size(), Options::new(1).memory_size());
    }
}
