//! Wire format of the paravirtual cache-flush device. The normative text is
//! `resources/cache-flush-device.md`; this module is its machine-readable half.
//!
//! A request is one descriptor chain:
//!
//! ```text
//! driver-readable:  RequestHeader (16 bytes)
//!                   Segment × n    (16 bytes each; n = 0 for FLUSH_ALL)
//! device-writable:  status (1 byte, a Status value)
//! ```
//!
//! The readable part may be split over any number of descriptors, at any byte
//! boundary; the device reads it as one byte stream.

/// Virtio device ID. Assigned IDs end in the 40s; this is the highest ID whose
/// virtio-pci modern device ID (0x1040 + ID) still fits in 16 bits, so the
/// device could move to PCI unchanged and is as far as possible from IDs OASIS
/// will hand out next.
pub const DEVICE_ID: u32 = 0xEFBF;

/// Feature bit: the device serves [`RequestType::FlushRange`].
pub const F_RANGE: u32 = 0;
/// Feature bit: the device serves [`RequestType::FlushAll`]. Left out where the
/// host cannot flush everything reliably (a host that is not x86-64, or the
/// VMM started with `--no-full-flush`).
pub const F_FULL: u32 = 1;
/// VIRTIO_F_VERSION_1: required; a driver that does not accept it is refused
/// at FEATURES_OK.
pub const F_VERSION_1: u32 = 32;

/// The most virtqueues the device offers (one per vCPU is the intended use, so
/// vCPUs never contend for a queue).
pub const MAX_QUEUES: u16 = 32;
/// The largest queue size the device accepts.
pub const QUEUE_SIZE_MAX: u16 = 256;

/// Device configuration space (read-only for the driver), at offset 0x100 of
/// the virtio-mmio window.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Cache-line size in bytes; range flushes work in whole lines.
    pub cache_line_size: u32,
    /// Number of virtqueues the device offers.
    pub num_queues: u32,
    /// The most segments one request may carry.
    pub max_segments: u32,
    /// Reserved, zero.
    pub reserved0: u32,
    /// The most bytes (summed over segments) one request may cover.
    pub max_bytes: u64,
    /// The host's measured cost of a FLUSH_ALL, in nanoseconds, at the guest's
    /// current size (0 = not measured).
    pub full_flush_cost_ns: u64,
    /// Range size in bytes above which a FLUSH_ALL is expected to be cheaper
    /// than a FLUSH_RANGE (0 = not known).
    pub full_break_even_bytes: u64,
    /// Rate limit on FLUSH_ALL requests per second (0 = unlimited).
    pub full_per_sec_limit: u64,
    /// Rate limit on FLUSH_RANGE bytes per second (0 = unlimited).
    pub range_bytes_per_sec_limit: u64,
}

/// Offset of [`Config`] in the virtio-mmio window.
pub const CONFIG_OFFSET: u64 = 0x100;

/// Request types, the first field of [`RequestHeader`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    /// Write back and invalidate the lines of the segments.
    FlushRange = 1,
    /// Write back and invalidate every line of guest memory that can be in a
    /// cache. Carries no segments.
    FlushAll = 2,
}

impl RequestType {
    /// The type a raw header value stands for, if any.
    pub fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            1 => Some(Self::FlushRange),
            2 => Some(Self::FlushAll),
            _ => None,
        }
    }
}

/// First bytes of every request.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestHeader {
    /// A [`RequestType`] value.
    pub request_type: u32,
    /// Must be zero.
    pub flags: u32,
    /// Opaque to the device; echoed in host logs to tie a rejection to a
    /// guest request.
    pub tag: u64,
}

/// One guest-physical extent of a FLUSH_RANGE request.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    /// First guest-physical byte.
    pub addr: u64,
    /// Length in bytes, at least 1.
    pub len: u64,
}

/// Size of [`RequestHeader`] on the wire.
pub const HEADER_SIZE: usize = core::mem::size_of::<RequestHeader>();
/// Size of [`Segment`] on the wire.
pub const SEGMENT_SIZE: usize = core::mem::size_of::<Segment>();

/// The status byte the device writes into the request's writable part.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Every line of the request was written back and invalidated.
    Ok = 0,
    /// The request is malformed: too short, segments not a whole number of
    /// [`Segment`]s, non-zero flags, a segment of length 0, an address + length
    /// that overflows, FLUSH_ALL carrying segments.
    Invalid = 1,
    /// The request type is unknown or its feature was not negotiated.
    Unsupported = 2,
    /// A segment is not entirely inside guest RAM (outside it, or across a
    /// hole).
    OutOfRange = 3,
    /// More segments or more bytes than the configuration space allows.
    TooLarge = 4,
    /// Refused by a rate limit; nothing was flushed. Try again later.
    Busy = 5,
    /// The host failed to perform the flush (its log says why); the lines may
    /// or may not have been flushed.
    HostError = 6,
}

impl Status {
    /// The status a raw byte stands for, if any.
    pub fn from_raw(raw: u8) -> Option<Self> {
        match raw {
            0 => Some(Self::Ok),
            1 => Some(Self::Invalid),
            2 => Some(Self::Unsupported),
            3 => Some(Self::OutOfRange),
            4 => Some(Self::TooLarge),
            5 => Some(Self::Busy),
            6 => Some(Self::HostError),
            _ => None,
        }
    }
}

const _: () = assert!(HEADER_SIZE == 16);
const _: () = assert!(SEGMENT_SIZE == 16);
const _: () = assert!(core::mem::size_of::<Config>() == 56);
