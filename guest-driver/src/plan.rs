//! Turning a virtual range into FLUSH_RANGE requests, without allocating:
//!
//! 1. translate `[va, va + len)` piece by piece (a piece ends where the
//!    translation's contiguous run ends, e.g. at a page boundary);
//! 2. coalesce physically contiguous consecutive pieces into extents;
//! 3. round each extent out to whole cache lines (the device flushes lines,
//!    and a segment that starts or ends mid-line would be flushed as that
//!    whole line anyway — rounding here lets neighbours merge);
//! 4. merge consecutive rounded extents that now touch or overlap (two
//!    pieces in one line, or two virtual aliases of the same memory);
//! 5. pack the extents into requests of at most `max_segments` segments and
//!    `max_bytes` bytes, splitting an extent where a request fills up.
//!
//! Everything streams: one extent of each stage is held at a time, and the
//! segments go straight into the queue's request buffer through a [`Sink`].

use cache_flush_abi::cache_flush::Segment;

use crate::error::Error;
use crate::translate::Translate;

/// What one request may carry, as negotiated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Cache-line size, a power of two.
    pub(crate) line: u64,
    /// Segments per request, at least 1.
    pub(crate) max_segments: usize,
    /// Bytes per request, a non-zero multiple of `line` (the device's limit
    /// rounded down, so that splitting an extent keeps both halves
    /// line-aligned and no line is sent twice).
    pub(crate) max_bytes: u64,
}

/// Receives the requests as they are packed.
pub(crate) trait Sink {
    /// Segment `index` (below `max_segments`) of the request being built.
    fn segment(&mut self, index: usize, segment: Segment);
    /// Sends the request built so far: `count` (at least 1) segments.
    fn submit(&mut self, count: usize) -> Result<(), Error>;
}

/// A sink that sends nothing: planning into it validates the whole range
/// (mapped, no overflow) before anything reaches the device.
pub(crate) struct Validate;

impl Sink for Validate {
    fn segment(&mut self, _index: usize, _segment: Segment) {}
    fn submit(&mut self, _count: usize) -> Result<(), Error> {
        Ok(())
    }
}

/// A half-open guest-physical range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Extent {
    start: u64,
    end: u64,
}

impl Extent {
    fn round_out(self, line: u64) -> Result<Extent, Error> {
        let mask = line - 1;
        let end = self.end.checked_add(mask).ok_or(Error::AddressOverflow)? & !mask;
        Ok(Extent {
            start: self.start & !mask,
            end,
        })
    }

    /// Overlapping or adjacent, so their union is one range.
    fn touches(self, other: Extent) -> bool {
        other.start <= self.end && self.start <= other.end
    }
}

/// Stage 5: fills requests and hands them to the sink.
struct Packer<'s, S> {
    limits: Limits,
    sink: &'s mut S,
    count: usize,
    bytes: u64,
}

impl<S: Sink> Packer<'_, S> {
    fn add(&mut self, extent: Extent) -> Result<(), Error> {
        let mut start = extent.start;
        while start < extent.end {
            if self.count == self.limits.max_segments || self.bytes == self.limits.max_bytes {
                self.flush()?;
            }
            let take = (extent.end - start).min(self.limits.max_bytes - self.bytes);
            self.sink.segment(
                self.count,
                Segment {
                    addr: start,
                    len: take,
                },
            );
            self.count += 1;
            self.bytes += take;
            start += take;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), Error> {
        if self.count > 0 {
            let count = core::mem::replace(&mut self.count, 0);
            self.bytes = 0;
            self.sink.submit(count)?;
        }
        Ok(())
    }
}

/// Stage 4: merges consecutive rounded extents that touch.
struct Merger<'s, S> {
    pending: Option<Extent>,
    packer: Packer<'s, S>,
}

impl<S: Sink> Merger<'_, S> {
    fn add(&mut self, extent: Extent) -> Result<(), Error> {
        match self.pending {
            Some(p) if p.touches(extent) => {
                self.pending = Some(Extent {
                    start: p.start.min(extent.start),
                    end: p.end.max(extent.end),
                });
            }
            Some(p) => {
                self.packer.add(p)?;
                self.pending = Some(extent);
            }
            None => self.pending = Some(extent),
        }
        Ok(())
    }

    fn finish(mut self) -> Result<(), Error> {
        if let Some(p) = self.pending.take() {
            self.packer.add(p)?;
        }
        self.packer.flush()
    }
}

/// Plans the requests for `[va, va + len)` into `sink`. Stops at the first
/// error, which may come from the translation (nothing of the range after it
/// was planned) or from the sink.
pub(crate) fn plan<T: Translate + ?Sized, S: Sink>(
    translator: &T,
    va: u64,
    len: u64,
    limits: Limits,
    sink: &mut S,
) -> Result<(), Error> {
    if len == 0 {
        return Ok(());
    }
    // The last byte must be addressable; a range ending exactly at 2^64 is
    // fine, which is why this is not `va.checked_add(len)`.
    va.checked_add(len - 1).ok_or(Error::AddressOverflow)?;

    let mut merger = Merger {
        pending: None,
        packer: Packer {
            limits,
            sink,
            count: 0,
            bytes: 0,
        },
    };
    // Stage 2's extent, not yet rounded.
    let mut coalesced: Option<Extent> = None;
    let mut cur = va;
    let mut remaining = len;
    while remaining > 0 {
        let mapping = translator
            .translate(cur)
            .filter(|m| m.len > 0)
            .ok_or(Error::Unmapped { va: cur })?;
        let step = mapping.len.min(remaining);
        let piece = Extent {
            start: mapping.phys,
            end: mapping
                .phys
                .checked_add(step)
                .ok_or(Error::AddressOverflow)?,
        };
        coalesced = match coalesced {
            Some(c) if c.end == piece.start => Some(Extent {
                start: c.start,
                end: piece.end,
            }),
            Some(c) => {
                merger.add(c.round_out(limits.line)?)?;
                Some(piece)
            }
            None => Some(piece),
        };
        remaining -= step;
        // Cannot wrap while bytes remain (checked above); after the last
        // piece `cur` is unused, and may legitimately wrap to 0.
        cur = cur.wrapping_add(step);
    }
    if let Some(c) = coalesced {
        merger.add(c.round_out(limits.line)?)?;
    }
    merger.finish()
}

#[cfg(test)]
mod tests {
    use std::vec;
    use std::vec::Vec;

    use super::*;
    use crate::fake::{ListTranslator, RecordingSink};

    const LIMITS: Limits = Limits {
        line: 64,
        max_segments: 16,
        max_bytes: 1 << 30,
    };

    fn seg(addr: u64, len: u64) -> Segment {
        Segment { addr, len }
    }

    fn run(
        t: &ListTranslator,
        va: u64,
        len: u64,
        limits: Limits,
    ) -> Result<Vec<Vec<Segment>>, Error> {
        let mut sink = RecordingSink::default();
        plan(t, va, len, limits, &mut sink).map(|()| sink.requests)
    }

    #[test]
    fn contiguous_pages_coalesce_into_one_extent() {
        // Three virtually consecutive pages, physically consecutive too.
        let t = ListTranslator::pages(&[
            (0x10_0000, 0x5000),
            (0x10_1000, 0x6000),
            (0x10_2000, 0x7000),
        ]);
        assert_eq!(
            run(&t, 0x10_0000, 0x3000, LIMITS),
            Ok(vec![vec![seg(0x5000, 0x3000)]])
        );
    }

    #[test]
    fn discontiguous_pages_give_separate_extents_in_va_order() {
        let t = ListTranslator::pages(&[
            (0x10_0000, 0x9000),
            (0x10_1000, 0x5000),
            (0x10_2000, 0x6000),
        ]);
        assert_eq!(
            run(&t, 0x10_0000, 0x3000, LIMITS),
            Ok(vec![vec![seg(0x9000, 0x1000), seg(0x5000, 0x2000)]])
        );
    }

    #[test]
    fn ends_are_rounded_out_to_cache_lines() {
        let t = ListTranslator::pages(&[(0x10_0000, 0x5000)]);
        // [0x5010, 0x5051) touches lines 0x5000 and 0x5040.
        assert_eq!(
            run(&t, 0x10_0010, 0x41, LIMITS),
            Ok(vec![vec![seg(0x5000, 0x80)]])
        );
        // A single byte is a whole line.
        assert_eq!(
            run(&t, 0x10_0fff, 1, LIMITS),
            Ok(vec![vec![seg(0x5fc0, 0x40)]])
        );
        // With 128-byte lines.
        let wide = Limits {
            line: 128,
            ..LIMITS
        };
        assert_eq!(
            run(&t, 0x10_0010, 0x41, wide),
            Ok(vec![vec![seg(0x5000, 0x80)]])
        );
    }

    #[test]
    fn pieces_in_one_line_merge_after_rounding() {
        // A kernel translator with sub-page runs: two 16-byte pieces, not
        // contiguous physically, but in the same cache line.
        let t = ListTranslator::new(&[(0x1000, 0x10, 0x8010), (0x1010, 0x10, 0x8030)]);
        assert_eq!(
            run(&t, 0x1000, 0x20, LIMITS),
            Ok(vec![vec![seg(0x8000, 0x40)]])
        );
        // Adjacent after rounding: [0x8010,0x8020) → line 0x8000, and
        // [0x8050,0x8060) → line 0x8040; the two lines touch.
        let t = ListTranslator::new(&[(0x1000, 0x10, 0x8010), (0x1010, 0x10, 0x8050)]);
        assert_eq!(
            run(&t, 0x1000, 0x20, LIMITS),
            Ok(vec![vec![seg(0x8000, 0x80)]])
        );
    }

    #[test]
    fn aliases_of_one_page_merge() {
        // Two virtual pages mapping the same physical page: the tail of the
        // first and the head of the second overlap after rounding.
        let t = ListTranslator::pages(&[(0x10_0000, 0x5000), (0x10_1000, 0x5000)]);
        assert_eq!(
            run(&t, 0x10_0010, 0x1020, LIMITS),
            Ok(vec![vec![seg(0x5000, 0x1000)]])
        );
        // Extents that are lower physically than the pending one also merge.
        let t = ListTranslator::pages(&[(0x10_0000, 0x6000), (0x10_1000, 0x5000)]);
        assert_eq!(
            run(&t, 0x10_0000, 0x2000, LIMITS),
            Ok(vec![vec![seg(0x5000, 0x2000)]])
        );
    }

    #[test]
    fn split_by_max_segments() {
        // Five separate pages, two segments per request.
        let pages: Vec<(u64, u64)> = (0..5)
            .map(|i| (0x10_0000 + i * 0x1000, 0x20_0000 + i * 0x2000))
            .collect();
        let t = ListTranslator::pages(&pages);
        let limits = Limits {
            max_segments: 2,
            ..LIMITS
        };
        assert_eq!(
            run(&t, 0x10_0000, 0x5000, limits),
            Ok(vec![
                vec![seg(0x20_0000, 0x1000), seg(0x20_2000, 0x1000)],
                vec![seg(0x20_4000, 0x1000), seg(0x20_6000, 0x1000)],
                vec![seg(0x20_8000, 0x1000)],
            ])
        );
    }

    #[test]
    fn split_by_max_bytes() {
        // One 10-line extent, 4 lines per request.
        let t = ListTranslator::pages(&[(0x10_0000, 0x5000)]);
        let limits = Limits {
            max_bytes: 4 * 64,
            ..LIMITS
        };
        assert_eq!(
            run(&t, 0x10_0000, 10 * 64, limits),
            Ok(vec![
                vec![seg(0x5000, 0x100)],
                vec![seg(0x5100, 0x100)],
                vec![seg(0x5200, 0x80)],
            ])
        );
    }

    #[test]
    fn split_by_both_limits_packs_requests_full() {
        // Extents of 3, 3 and 2 lines; 4 lines and 2 segments per request.
        let t = ListTranslator::new(&[
            (0x0, 0xc0, 0x1_0000),
            (0xc0, 0xc0, 0x2_0000),
            (0x180, 0x80, 0x3_0000),
        ]);
        let limits = Limits {
            max_segments: 2,
            max_bytes: 4 * 64,
            ..LIMITS
        };
        assert_eq!(
            run(&t, 0, 0x200, limits),
            Ok(vec![
                vec![seg(0x1_0000, 0xc0), seg(0x2_0000, 0x40)],
                vec![seg(0x2_0040, 0x80), seg(0x3_0000, 0x80)],
            ])
        );
    }

    #[test]
    fn zero_length_plans_nothing() {
        let t = ListTranslator::new(&[]);
        // Not even translated: an unmapped address with len 0 is fine.
        assert_eq!(run(&t, 0xdead_0000, 0, LIMITS), Ok(vec![]));
    }

    #[test]
    fn overflow_is_refused() {
        let t = ListTranslator::new(&[]);
        assert_eq!(run(&t, u64::MAX, 2, LIMITS), Err(Error::AddressOverflow));
        assert_eq!(
            run(&t, 0xffff_ffff_ffff_f000, 0x1001, LIMITS),
            Err(Error::AddressOverflow)
        );
        // A physical extent that would pass 2^64.
        let t = ListTranslator::new(&[(0x1000, 0x1000, u64::MAX - 0x10)]);
        assert_eq!(run(&t, 0x1000, 0x20, LIMITS), Err(Error::AddressOverflow));
    }

    #[test]
    fn range_ending_at_top_of_address_space() {
        let t = ListTranslator::new(&[(0xffff_ffff_ffff_f000, 0x1000, 0x7000)]);
        assert_eq!(
            run(&t, 0xffff_ffff_ffff_f000, 0x1000, LIMITS),
            Ok(vec![vec![seg(0x7000, 0x1000)]])
        );
    }

    #[test]
    fn unmapped_names_first_unmapped_address() {
        let t = ListTranslator::pages(&[(0x10_0000, 0x5000), (0x10_2000, 0x7000)]);
        assert_eq!(
            run(&t, 0x10_0800, 0x2000, LIMITS),
            Err(Error::Unmapped { va: 0x10_1000 })
        );
        // Unmapped at the very start: the (unaligned) start itself.
        assert_eq!(
            run(&t, 0x10_1234, 0x10, LIMITS),
            Err(Error::Unmapped { va: 0x10_1234 })
        );
        // A zero-length mapping counts as unmapped (and cannot loop forever).
        let t = ListTranslator::new(&[(0x1000, 0, 0x5000)]);
        assert_eq!(
            run(&t, 0x1000, 1, LIMITS),
            Err(Error::Unmapped { va: 0x1000 })
        );
    }

    #[test]
    fn validate_sends_nothing_and_catches_errors() {
        let t = ListTranslator::pages(&[(0x10_0000, 0x5000)]);
        assert_eq!(plan(&t, 0x10_0000, 0x1000, LIMITS, &mut Validate), Ok(()));
        assert_eq!(
            plan(&t, 0x10_0000, 0x1001, LIMITS, &mut Validate),
            Err(Error::Unmapped { va: 0x10_1000 })
        );
    }

    #[test]
    fn sink_error_stops_planning() {
        let pages: Vec<(u64, u64)> = (0..4)
            .map(|i| (i * 0x1000, 0x10_0000 + i * 0x2000))
            .collect();
        let t = ListTranslator::pages(&pages);
        let mut sink = RecordingSink {
            fail_at: Some(1),
            ..Default::default()
        };
        let limits = Limits {
            max_segments: 1,
            ..LIMITS
        };
        assert_eq!(
            plan(&t, 0, 0x4000, limits, &mut sink),
            Err(Error::Status(cache_flush_abi::cache_flush::Status::Busy))
        );
        assert_eq!(sink.requests.len(), 2);
    }
}
