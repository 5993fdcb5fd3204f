//! Parsing and validation of one request chain, pmem-style: every check the
//! device makes on guest input is here, each failure a [`RequestError`] that
//! maps to the wire [`Status`] the guest gets back.
//!
//! A request is a descriptor chain whose device-readable part is a
//! [`RequestHeader`] followed by `n` segments
//! ([`Segment`](cache_flush_abi::cache_flush::Segment), read as one byte
//! stream split at any byte boundary across any number of descriptors), and
//! whose device-writable part holds the status byte (its first byte). The rules,
//! in the order they are applied (the first that fails decides the status):
//!
//! | rule | status |
//! |------|--------|
//! | no writable byte for the status, anywhere in the chain | none: used length 0 |
//! | the status byte is outside guest memory | none: used length 0 |
//! | more than [`MAX_CHAIN_DESCRIPTORS`] descriptors | INVALID |
//! | chain loops or links out of its table | INVALID |
//! | a writable descriptor precedes a readable one | INVALID |
//! | a readable descriptor is outside guest memory | INVALID |
//! | readable part shorter than the header | INVALID |
//! | unknown request type | UNSUPPORTED |
//! | type's feature (F_RANGE / F_FULL) not negotiated | UNSUPPORTED |
//! | non-zero header flags | INVALID |
//! | readable part after the header not a multiple of 16 | INVALID |
//! | FLUSH_ALL carrying segments | INVALID |
//! | more segments than `max_segments` | TOO_LARGE |
//! | per segment, in order: length 0 | INVALID |
//! | per segment: `addr + len` overflows 64 bits | INVALID |
//! | per segment: not inside one guest memory region | OUT_OF_RANGE |
//! | per segment: running total above `max_bytes` | TOO_LARGE |
//!
//! (BUSY, the rate limit, is decided later by the queue worker, only for requests
//! that pass all of these.)
//!
//! Each descriptor is read once (the first [`MAX_CHAIN_DESCRIPTORS`] into a
//! local list), so a guest rewriting its descriptors while the device parses
//! them cannot make two checks see two different chains. The device follows
//! chains itself (see `ChainWalk`) rather than through virtio-queue's
//! iterator, whose silent stops at 2^32 bytes would hide the status byte.

use cache_flush_abi::cache_flush::{RequestHeader, RequestType, Status, HEADER_SIZE, SEGMENT_SIZE};
use smallvec::SmallVec;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::guest_bytes;
use super::GuestExtent;

/// The most descriptors one request chain may have. A looping chain ends
/// after as many descriptors as its table holds (rule 4); this bound also
/// caps the memory an indirect table of up to 65535 entries could cost. A
/// legal request needs at most one descriptor per segment plus two.
pub const MAX_CHAIN_DESCRIPTORS: usize = 1024;

/// What the negotiated features and the configuration space allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestLimits {
    /// The most segments one FLUSH_RANGE may carry.
    pub max_segments: u32,
    /// The most bytes (summed over segments) one FLUSH_RANGE may cover.
    pub max_bytes: u64,
    /// F_RANGE was negotiated.
    pub range: bool,
    /// F_FULL was negotiated.
    pub full: bool,
}

/// The extents of one FLUSH_RANGE. Most requests carry one or two segments,
/// which fit inline: parsing a request allocates nothing (every allocation
/// on the request path is paid cold, after an exit).
pub type RangeExtents = SmallVec<[GuestExtent; 2]>;

/// A valid request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Write back and invalidate these extents (non-empty, each inside one
    /// guest memory region).
    FlushRange(RangeExtents),
    /// Write back and invalidate every line of guest memory.
    FlushAll,
}

impl Request {
    /// Bytes covered (0 for FLUSH_ALL, which has no size of its own).
    pub fn bytes(&self) -> u64 {
        match self {
            // Cannot overflow: parsing bounded the sum by `max_bytes`.
            Request::FlushRange(extents) => extents.iter().map(|e| e.len).sum(),
            Request::FlushAll => 0,
        }
    }
}

/// Why a chain is not a valid request. [`RequestError::status`] is what the
/// guest reads back.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    /// The chain has no device-writable byte: nowhere to put the status.
    #[error("no writable byte for the status")]
    NoStatusByte,
    /// The first writable byte is not in guest memory.
    #[error("status byte at {addr:#x} is outside guest memory")]
    StatusOutsideMemory {
        /// Its guest-physical address.
        addr: u64,
    },
    /// More than [`MAX_CHAIN_DESCRIPTORS`] descriptors.
    #[error("chain longer than {MAX_CHAIN_DESCRIPTORS} descriptors")]
    ChainTooLong,
    /// The chain ends on a descriptor that still has NEXT set: it loops
    /// (the iterator's bound ran out), links outside the descriptor table, or
    /// its descriptors cannot be read.
    #[error("chain cannot be followed after {descriptors} descriptors (loop or bad link)")]
    BrokenChain {
        /// Descriptors read before the chain broke.
        descriptors: usize,
    },
    /// A device-readable descriptor follows a device-writable one (virtio
    /// spec §2.7.4.2 forbids it).
    #[error("readable descriptor {index} follows a writable one")]
    WritableBeforeReadable {
        /// Position of the offending readable descriptor in the chain.
        index: usize,
    },
    /// A readable descriptor's buffer is not entirely in guest memory.
    #[error("descriptor buffer {addr:#x}+{len:#x} is outside guest memory")]
    DescriptorOutsideMemory {
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u64,
    },
    /// The readable part is shorter than a request header.
    #[error("readable part is {len} bytes, shorter than the {HEADER_SIZE}-byte header")]
    TooShort {
        /// Readable bytes.
        len: u64,
    },
    /// The header's type is not a known request type.
    #[error("unknown request type {0}")]
    UnknownType(u32),
    /// The type is known but its feature bit was not negotiated.
    #[error("{request_type:?} used without its feature bit")]
    FeatureNotNegotiated {
        /// The request type.
        request_type: RequestType,
    },
    /// The header's flags are not zero.
    #[error("non-zero header flags {0:#x}")]
    NonZeroFlags(u32),
    /// The readable part after the header is not a whole number of segments.
    #[error("{len} bytes after the header are not a whole number of {SEGMENT_SIZE}-byte segments")]
    PayloadNotSegments {
        /// Bytes after the header.
        len: u64,
    },
    /// A FLUSH_ALL carries segments.
    #[error("FLUSH_ALL carries {count} segments")]
    FlushAllWithSegments {
        /// Segments found.
        count: u64,
    },
    /// More segments than the configuration space allows.
    #[error("{count} segments, more than the limit of {max}")]
    TooManySegments {
        /// Segments in the request.
        count: u64,
        /// `max_segments`.
        max: u32,
    },
    /// A segment of length 0.
    #[error("segment {index} has length 0")]
    ZeroLengthSegment {
        /// Segment index.
        index: u64,
    },
    /// `addr + len` of a segment does not fit 64 bits.
    #[error("segment {index}: {addr:#x}+{len:#x} overflows")]
    SegmentOverflow {
        /// Segment index.
        index: u64,
        /// Segment address.
        addr: u64,
        /// Segment length.
        len: u64,
    },
    /// A segment is not entirely inside one guest memory region (it is
    /// outside RAM, or crosses a hole or a region boundary).
    #[error("segment {index}: {addr:#x}+{len:#x} is not inside one guest memory region")]
    SegmentOutOfRange {
        /// Segment index.
        index: u64,
        /// Segment address.
        addr: u64,
        /// Segment length.
        len: u64,
    },
    /// The segments add up to more bytes than the configuration space allows.
    #[error("segments cover more than the limit of {max} bytes (exceeded at segment {index})")]
    TooManyBytes {
        /// Segment at which the limit was exceeded.
        index: u64,
        /// `max_bytes`.
        max: u64,
    },
    /// A rate limit of the configuration space refused the request (decided by
    /// the queue worker, after validation).
    #[error("rate limit for {request_type:?} exceeded")]
    RateLimited {
        /// The limited request type.
        request_type: RequestType,
    },
}

impl RequestError {
    /// The status byte the guest gets. For [`RequestError::NoStatusByte`]
    /// and [`RequestError::StatusOutsideMemory`] it cannot be delivered
    /// (see [`RequestError::answerable`]); INVALID is reported for them in
    /// logs and metrics.
    pub fn status(&self) -> Status {
        match self {
            RequestError::UnknownType(_) | RequestError::FeatureNotNegotiated { .. } => {
                Status::Unsupported
            }
            RequestError::SegmentOutOfRange { .. } => Status::OutOfRange,
            RequestError::TooManySegments { .. } | RequestError::TooManyBytes { .. } => {
                Status::TooLarge
            }
            RequestError::RateLimited { .. } => Status::Busy,
            RequestError::NoStatusByte
            | RequestError::StatusOutsideMemory { .. }
            | RequestError::ChainTooLong
            | RequestError::BrokenChain { .. }
            | RequestError::WritableBeforeReadable { .. }
            | RequestError::DescriptorOutsideMemory { .. }
            | RequestError::TooShort { .. }
            | RequestError::NonZeroFlags(_)
            | RequestError::PayloadNotSegments { .. }
            | RequestError::FlushAllWithSegments { .. }
            | RequestError::ZeroLengthSegment { .. }
            | RequestError::SegmentOverflow { .. } => Status::Invalid,
        }
    }

    /// False when the request has nowhere to receive a status: it is
    /// completed with used length 0.
    pub fn answerable(&self) -> bool {
        !matches!(
            self,
            RequestError::NoStatusByte | RequestError::StatusOutsideMemory { .. }
        )
    }

    /// Every rule name, in the order of the validation rules (rate limit
    /// last): the keys of the per-rule rejection counters in `--metrics`.
    pub const RULES: [&'static str; 18] = [
        "no-status-byte",
        "status-outside-memory",
        "chain-too-long",
        "broken-chain",
        "writable-before-readable",
        "descriptor-outside-memory",
        "too-short",
        "unknown-type",
        "feature-not-negotiated",
        "nonzero-flags",
        "payload-not-segments",
        "flush-all-with-segments",
        "too-many-segments",
        "zero-length-segment",
        "segment-overflow",
        "segment-out-of-range",
        "too-many-bytes",
        "rate-limited",
    ];

    /// The position of [`Self::rule`] in [`Self::RULES`] (its rule number
    /// minus one).
    pub fn rule_index(&self) -> usize {
        let rule = self.rule();
        Self::RULES
            .iter()
            .position(|r| *r == rule)
            .expect("every rule is listed in RULES")
    }

    /// A short, stable name of the rule, for log lines and the validation
    /// table (`resources/validation-table.md`).
    pub fn rule(&self) -> &'static str {
        match self {
            RequestError::NoStatusByte => "no-status-byte",
            RequestError::StatusOutsideMemory { .. } => "status-outside-memory",
            RequestError::ChainTooLong => "chain-too-long",
            RequestError::BrokenChain { .. } => "broken-chain",
            RequestError::WritableBeforeReadable { .. } => "writable-before-readable",
            RequestError::DescriptorOutsideMemory { .. } => "descriptor-outside-memory",
            RequestError::TooShort { .. } => "too-short",
            RequestError::UnknownType(_) => "unknown-type",
            RequestError::FeatureNotNegotiated { .. } => "feature-not-negotiated",
            RequestError::NonZeroFlags(_) => "nonzero-flags",
            RequestError::PayloadNotSegments { .. } => "payload-not-segments",
            RequestError::FlushAllWithSegments { .. } => "flush-all-with-segments",
            RequestError::TooManySegments { .. } => "too-many-segments",
            RequestError::ZeroLengthSegment { .. } => "zero-length-segment",
            RequestError::SegmentOverflow { .. } => "segment-overflow",
            RequestError::SegmentOutOfRange { .. } => "segment-out-of-range",
            RequestError::TooManyBytes { .. } => "too-many-bytes",
            RequestError::RateLimited { .. } => "rate-limited",
        }
    }
}

/// Everything the device learns from one chain: where the answer goes, the
/// header fields worth logging, and the request or why it is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedChain {
    /// The chain's head descriptor index (the used-ring id).
    pub head_index: u16,
    /// Where the status byte goes; `None` when the request cannot be
    /// answered (completed with used length 0).
    pub status_addr: Option<GuestAddress>,
    /// The raw request type, if the header could be read.
    pub request_type: Option<u32>,
    /// The header's tag, if the header could be read (for log lines).
    pub tag: Option<u64>,
    /// The valid request, or the first rule it breaks.
    pub request: Result<Request, RequestError>,
}

impl ParsedChain {
    /// Walks the chain that starts at `start` once and validates it against
    /// `memory` and `limits`.
    pub fn parse(start: ChainStart, memory: &GuestMemoryMmap, limits: &RequestLimits) -> Self {
        let walk = ChainWalk::walk(&start, memory);
        let mut parsed = ParsedChain {
            head_index: start.head_index,
            status_addr: None,
            request_type: None,
            tag: None,
            request: Err(RequestError::NoStatusByte),
        };
        parsed.request = parsed.validate(&walk, memory, limits);
        parsed
    }

    /// The used-ring length for this request: the status byte, if any.
    pub fn used_len(&self) -> u32 {
        u32::from(self.status_addr.is_some())
    }

    fn validate(
        &mut self,
        walk: &ChainWalk,
        memory: &GuestMemoryMmap,
        limits: &RequestLimits,
    ) -> Result<Request, RequestError> {
        // The status location comes first: without it nothing else can be
        // reported to the guest.
        let status = walk.status.ok_or(RequestError::NoStatusByte)?;
        if !memory.address_in_range(status) {
            return Err(RequestError::StatusOutsideMemory {
                addr: status.raw_value(),
            });
        }
        self.status_addr = Some(status);

        if walk.too_long {
            return Err(RequestError::ChainTooLong);
        }
        if walk.broken {
            return Err(RequestError::BrokenChain {
                descriptors: walk.descriptors.len(),
            });
        }
        let descriptors = &walk.descriptors[..];
        if let Some(first_writable) = descriptors.iter().position(|d| d.is_write_only()) {
            if let Some(offset) = descriptors[first_writable..]
                .iter()
                .position(|d| !d.is_write_only())
            {
                return Err(RequestError::WritableBeforeReadable {
                    index: first_writable + offset,
                });
            }
        }

        // Pushed, not collected: SmallVec's generic `extend` costs several
        // times as many instructions for a chain's two or three descriptors.
        let mut readable: SmallVec<[(GuestAddress, u32); INLINE_DESCRIPTORS]> = SmallVec::new();
        for d in descriptors {
            if !d.is_write_only() && d.len() > 0 {
                readable.push((d.addr(), d.len()));
            }
        }
        for &(addr, len) in &readable {
            // The whole buffer must be backed by memory (contiguous regions
            // are fine: a buffer is a byte stream, unlike a segment).
            if !guest_bytes::in_memory(memory, addr, len as usize) {
                return Err(RequestError::DescriptorOutsideMemory {
                    addr: addr.raw_value(),
                    len: u64::from(len),
                });
            }
        }
        // At most MAX_CHAIN_DESCRIPTORS × u32::MAX: no overflow.
        let readable_len: u64 = readable.iter().map(|&(_, len)| u64::from(len)).sum();
        if readable_len < HEADER_SIZE as u64 {
            return Err(RequestError::TooShort { len: readable_len });
        }

        let mut stream = ReadStream::new(memory, &readable);
        let header = stream.header()?;
        self.request_type = Some(header.request_type);
        self.tag = Some(header.tag);

        let request_type = RequestType::from_raw(header.request_type)
            .ok_or(RequestError::UnknownType(header.request_type))?;
        let negotiated = match request_type {
            RequestType::FlushRange => limits.range,
            RequestType::FlushAll => limits.full,
        };
        if !negotiated {
            return Err(RequestError::FeatureNotNegotiated { request_type });
        }
        if header.flags != 0 {
            return Err(RequestError::NonZeroFlags(header.flags));
        }
        let payload = readable_len - HEADER_SIZE as u64;
        if payload % SEGMENT_SIZE as u64 != 0 {
            return Err(RequestError::PayloadNotSegments { len: payload });
        }
        let count = payload / SEGMENT_SIZE as u64;
        if request_type == RequestType::FlushAll {
            if count != 0 {
                return Err(RequestError::FlushAllWithSegments { count });
            }
            return Ok(Request::FlushAll);
        }
        if count > u64::from(limits.max_segments) {
            return Err(RequestError::TooManySegments {
                count,
                max: limits.max_segments,
            });
        }

        // `count` is bounded by max_segments (checked above), so this loop
        // and the vector are bounded by the configuration, not by the guest.
        let mut extents = RangeExtents::new();
        let mut total: u64 = 0;
        for index in 0..count {
            let (addr, len) = stream.segment()?;
            if len == 0 {
                return Err(RequestError::ZeroLengthSegment { index });
            }
            let Some(end) = addr.checked_add(len) else {
                return Err(RequestError::SegmentOverflow { index, addr, len });
            };
            if !inside_one_region(memory, addr, end) {
                return Err(RequestError::SegmentOutOfRange { index, addr, len });
            }
            total = total.saturating_add(len);
            if total > limits.max_bytes {
                return Err(RequestError::TooManyBytes {
                    index,
                    max: limits.max_bytes,
                });
            }
            extents.push(GuestExtent {
                addr: GuestAddress(addr),
                len,
            });
        }
        // The header-only FLUSH_RANGE (no segments) is valid and flushes
        // nothing; the queue worker completes it without a flush.
        Ok(Request::FlushRange(extents))
    }
}

/// Where a chain starts: the queue's descriptor table as the driver set it
/// up, and the head index taken off its available ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainStart {
    /// Guest-physical address of the queue's descriptor table.
    pub desc_table: GuestAddress,
    /// Entries in that table (the queue size).
    pub queue_size: u16,
    /// The chain's head descriptor index.
    pub head_index: u16,
}

/// One walk over a chain, as the device read it.
///
/// The device walks chains itself rather than through virtio-queue's
/// `DescriptorChain` iterator, because that iterator ends a chain silently
/// where its lengths reach 2^32 bytes and after as many descriptors as we ask
/// for, and both hide the status byte from the rules that must answer
/// through it (a 32-byte header plus a 0xFFFFFFE0-byte status descriptor is a
/// legal chain of exactly 2^32 bytes; a status byte in entry 1025 of an
/// indirect table must get rule 3's INVALID, not rule 1's silence).
#[derive(Debug, Default)]
struct ChainWalk {
    /// The first [`MAX_CHAIN_DESCRIPTORS`] descriptors, in chain order
    /// (indirect descriptors replaced by their tables' entries).
    descriptors: SmallVec<[Descriptor; INLINE_DESCRIPTORS]>,
    /// The first byte of the first non-empty writable descriptor.
    status: Option<GuestAddress>,
    /// The chain has more than [`MAX_CHAIN_DESCRIPTORS`] descriptors.
    too_long: bool,
    /// The chain could not be followed to a descriptor without NEXT.
    broken: bool,
}

impl ChainWalk {
    /// Follows the chain. Work is bounded by the tables, not by the guest's
    /// wishes: at most `queue_size` descriptors of the queue's table plus one
    /// indirect table of at most 65535 entries (tables do not nest), each
    /// read once; it stops early once rule 3 is certain and the status byte
    /// is known.
    fn walk(start: &ChainStart, memory: &GuestMemoryMmap) -> Self {
        let mut walk = ChainWalk::default();
        let mut table = start.desc_table;
        let mut table_size = start.queue_size;
        let mut index = start.head_index;
        // Links left to follow in the current table: a chain of N entries
        // follows N - 1 links, so a loop ends after the table's size.
        let mut links_left = table_size;
        let mut in_indirect = false;
        let mut count = 0usize;
        loop {
            if index >= table_size {
                walk.broken = true;
                break;
            }
            // index < table_size <= 65535: no overflow.
            let Some(descriptor) = table
                .checked_add(u64::from(index) * DESCRIPTOR_SIZE)
                .and_then(|at| guest_bytes::read_obj::<Descriptor>(memory, at).ok())
            else {
                walk.broken = true;
                break;
            };
            if descriptor.refers_to_indirect_table() {
                let entries = u64::from(descriptor.len()) / DESCRIPTOR_SIZE;
                // Nested tables and tables that are not whole, empty or
                // larger than 65535 entries are invalid (virtio §2.7.5.3).
                if in_indirect
                    || u64::from(descriptor.len()) % DESCRIPTOR_SIZE != 0
                    || entries == 0
                    || entries > u64::from(u16::MAX)
                {
                    walk.broken = true;
                    break;
                }
                table = descriptor.addr();
                // Checked just above.
                table_size = entries as u16;
                links_left = table_size;
                index = 0;
                in_indirect = true;
                continue;
            }
            count += 1;
            if count <= MAX_CHAIN_DESCRIPTORS {
                walk.descriptors.push(descriptor);
            } else {
                walk.too_long = true;
            }
            if walk.status.is_none() && descriptor.is_write_only() && descriptor.len() > 0 {
                walk.status = Some(descriptor.addr());
            }
            if walk.too_long && walk.status.is_some() {
                // Rule 3 decides; nothing further can change the answer.
                break;
            }
            if !descriptor.has_next() {
                break;
            }
            links_left -= 1;
            if links_left == 0 {
                walk.broken = true;
                break;
            }
            index = descriptor.next();
        }
        walk
    }
}

/// Descriptors a chain may have before its walk allocates: a request with
/// one segment needs three (header, segment, status), or one to three in
/// all if the driver packs them.
const INLINE_DESCRIPTORS: usize = 4;

/// Bytes of one split-ring descriptor.
const DESCRIPTOR_SIZE: u64 = 16;

/// True if `[addr, end)` (non-empty) lies inside a single memory region. A
/// `GuestExtent` promises this to the flush engine, which then needs only one
/// host mapping per extent.
fn inside_one_region(memory: &GuestMemoryMmap, addr: u64, end: u64) -> bool {
    memory
        .find_region(GuestAddress(addr))
        .is_some_and(|region| end - 1 <= region.last_addr().raw_value())
}

/// The readable descriptors as one byte stream.
struct ReadStream<'a> {
    memory: &'a GuestMemoryMmap,
    parts: &'a [(GuestAddress, u32)],
    part: usize,
    offset: u32,
}

impl<'a> ReadStream<'a> {
    fn new(memory: &'a GuestMemoryMmap, parts: &'a [(GuestAddress, u32)]) -> Self {
        Self {
            memory,
            parts,
            part: 0,
            offset: 0,
        }
    }

    /// Fills `buf` from the stream. The caller checked that the stream is
    /// long enough and that every part is in guest memory, so a failure here
    /// can only be the address of the failing part.
    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), RequestError> {
        let mut filled = 0;
        while filled < buf.len() {
            let Some(&(addr, len)) = self.parts.get(self.part) else {
                return Err(RequestError::TooShort { len: filled as u64 });
            };
            let left = len - self.offset;
            if left == 0 {
                self.part += 1;
                self.offset = 0;
                continue;
            }
            let n = (left as usize).min(buf.len() - filled);
            let outside = RequestError::DescriptorOutsideMemory {
                addr: addr.raw_value(),
                len: u64::from(len),
            };
            let at = addr
                .checked_add(u64::from(self.offset))
                .ok_or(outside.clone())?;
            guest_bytes::read(self.memory, &mut buf[filled..filled + n], at)
                .map_err(|_| outside)?;
            filled += n;
            // n <= left, which is a u32.
            self.offset += n as u32;
        }
        Ok(())
    }

    fn header(&mut self) -> Result<RequestHeader, RequestError> {
        let mut raw = [0u8; HEADER_SIZE];
        self.read_exact(&mut raw)?;
        Ok(RequestHeader {
            request_type: u32::from_le_bytes(le_bytes(&raw[0..4])),
            flags: u32::from_le_bytes(le_bytes(&raw[4..8])),
            tag: u64::from_le_bytes(le_bytes(&raw[8..16])),
        })
    }

    fn segment(&mut self) -> Result<(u64, u64), RequestError> {
        let mut raw = [0u8; SEGMENT_SIZE];
        self.read_exact(&mut raw)?;
        Ok((
            u64::from_le_bytes(le_bytes(&raw[0..8])),
            u64::from_le_bytes(le_bytes(&raw[8..16])),
        ))
    }
}

/// A fixed-size array from a slice of exactly that size (the callers slice
/// constant ranges of constant-size arrays).
fn le_bytes<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(bytes);
    out
}

#[cfg(test)]
mod tests {
    //! The rules are exercised end to end in `cache_flush::tests`; these
    //! check the error-to-status table itself.

    use super::*;

    fn all_errors() -> Vec<RequestError> {
        use RequestError::*;
        vec![
            NoStatusByte,
            StatusOutsideMemory { addr: 0 },
            ChainTooLong,
            BrokenChain { descriptors: 0 },
            WritableBeforeReadable { index: 0 },
            DescriptorOutsideMemory { addr: 0, len: 0 },
            TooShort { len: 0 },
            UnknownType(0),
            FeatureNotNegotiated {
                request_type: RequestType::FlushAll,
            },
            NonZeroFlags(1),
            PayloadNotSegments { len: 1 },
            FlushAllWithSegments { count: 1 },
            TooManySegments { count: 2, max: 1 },
            ZeroLengthSegment { index: 0 },
            SegmentOverflow {
                index: 0,
                addr: 0,
                len: 0,
            },
            SegmentOutOfRange {
                index: 0,
                addr: 0,
                len: 0,
            },
            TooManyBytes { index: 0, max: 0 },
            RateLimited {
                request_type: RequestType::FlushRange,
            },
        ]
    }

    #[test]
    fn status_table() {
        let table: Vec<(&str, Status, bool)> = all_errors()
            .iter()
            .map(|e| (e.rule(), e.status(), e.answerable()))
            .collect();
        use Status::*;
        assert_eq!(
            table,
            vec![
                ("no-status-byte", Invalid, false),
                ("status-outside-memory", Invalid, false),
                ("chain-too-long", Invalid, true),
                ("broken-chain", Invalid, true),
                ("writable-before-readable", Invalid, true),
                ("descriptor-outside-memory", Invalid, true),
                ("too-short", Invalid, true),
                ("unknown-type", Unsupported, true),
                ("feature-not-negotiated", Unsupported, true),
                ("nonzero-flags", Invalid, true),
                ("payload-not-segments", Invalid, true),
                ("flush-all-with-segments", Invalid, true),
                ("too-many-segments", TooLarge, true),
                ("zero-length-segment", Invalid, true),
                ("segment-overflow", Invalid, true),
                ("segment-out-of-range", OutOfRange, true),
                ("too-many-bytes", TooLarge, true),
                ("rate-limited", Busy, true),
            ]
        );
    }

    #[test]
    fn rules_are_listed_in_rule_order() {
        let names: Vec<&str> = all_errors().iter().map(RequestError::rule).collect();
        assert_eq!(names, RequestError::RULES);
        for (index, error) in all_errors().iter().enumerate() {
            assert_eq!(error.rule_index(), index);
        }
    }

    #[test]
    fn bytes_of_a_request() {
        let extent = |addr, len| GuestExtent {
            addr: GuestAddress(addr),
            len,
        };
        let request = Request::FlushRange(smallvec::smallvec![extent(0, 10), extent(100, 5)]);
        assert_eq!(request.bytes(), 15);
        assert_eq!(Request::FlushAll.bytes(), 0);
    }
}
