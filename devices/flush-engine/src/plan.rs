//! Turning a batch into per-vCPU shares of whole cache lines.

use smallvec::SmallVec;
use vm_memory::GuestAddress;

/// A guest-physical extent, in whole lines after [`normalise`].
pub type Extent = (GuestAddress, u64);

/// A batch's extents. A batch of a few requests fits inline: planning it
/// allocates nothing (each allocation on a request's path is paid cold,
/// after an exit).
pub type Extents = SmallVec<[Extent; 4]>;

/// Rounds every extent out to whole lines, sorts them, and merges the ones
/// that overlap or touch, so a line requested twice in a batch is flushed
/// once. Rounding never leaves a page, so never leaves the RAM region the
/// device validated the extent against.
pub fn normalise(extents: impl IntoIterator<Item = Extent>, line: u64) -> Extents {
    // Plain pushes: SmallVec's generic `extend` (what `collect` runs) costs
    // several times as many instructions for the one or two extents of
    // most batches.
    let mut out = Extents::new();
    for (addr, len) in extents {
        if len > 0 {
            let start = addr.0 & !(line - 1);
            let end = (addr.0 + len).next_multiple_of(line);
            out.push((GuestAddress(start), end - start));
        }
    }
    out.sort_unstable();
    // Merged in place.
    let mut kept = 0usize;
    for i in 0..out.len() {
        let (start, len) = out[i];
        if let Some(last) = kept.checked_sub(1).map(|k| &mut out[k]) {
            let last_end = last.0 .0 + last.1;
            if start.0 <= last_end {
                last.1 = last.1.max(start.0 + len - last.0 .0);
                continue;
            }
        }
        out[kept] = (start, len);
        kept += 1;
    }
    out.truncate(kept);
    out
}

/// Why a batch cannot be planned.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// Part of an extent lies in no region of guest memory: those lines
    /// cannot be flushed, so the batch must not be answered OK.
    #[error("guest-physical range {start:#x}..{end:#x} is not in guest RAM")]
    NotInMemory {
        /// First byte outside every region.
        start: u64,
        /// End of the uncovered part.
        end: u64,
    },
}

/// Cuts sorted, merged `extents` at the edges of `regions` (each
/// `(guest base, length)`, sorted by base), so every extent lies inside one
/// region: [`normalise`] merges extents that touch, and two regions may be
/// adjacent (an embedder's layout, hotplugged memory), yet one host mapping
/// covers only one region. Any byte outside every region fails the plan.
pub fn split_at_regions(extents: &[Extent], regions: &[(u64, u64)]) -> Result<Extents, PlanError> {
    let mut out = Extents::with_capacity(extents.len());
    for &(addr, len) in extents {
        let (mut start, end) = (addr.0, addr.0 + len);
        while start < end {
            let region = regions
                .iter()
                .find(|&&(base, size)| start >= base && start - base < size);
            let Some(&(base, size)) = region else {
                // The uncovered part ends at the next region's base (or at
                // the extent's end).
                let next = regions
                    .iter()
                    .map(|&(base, _)| base)
                    .filter(|&base| base > start)
                    .min()
                    .unwrap_or(end)
                    .min(end);
                return Err(PlanError::NotInMemory { start, end: next });
            };
            let stop = end.min(base + size);
            out.push((GuestAddress(start), stop - start));
            start = stop;
        }
    }
    Ok(out)
}

/// Lines in `extents` (each a whole number of lines).
pub fn lines_in(extents: &[Extent], line: u64) -> u64 {
    extents.iter().map(|e| e.1 / line).sum()
}

/// Splits line-aligned `extents` into at most `shares` lists of nearly equal
/// byte counts, cutting only at line boundaries. Empty shares are dropped.
pub fn split(extents: &[Extent], shares: usize, line: u64) -> Vec<Vec<Extent>> {
    let total: u64 = extents.iter().map(|e| e.1).sum();
    if total == 0 || shares == 0 {
        return Vec::new();
    }
    let lines = total / line;
    let per_share = lines.div_ceil(shares as u64) * line;
    let mut out = vec![Vec::new()];
    let mut room = per_share;
    for &(addr, len) in extents {
        let (mut addr, mut len) = (addr.0, len);
        while len > 0 {
            if room == 0 {
                out.push(Vec::new());
                room = per_share;
            }
            let take = len.min(room);
            out.last_mut()
                .expect("never empty")
                .push((GuestAddress(addr), take));
            addr += take;
            len -= take;
            room -= take;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(a: u64, l: u64) -> Extent {
        (GuestAddress(a), l)
    }

    #[test]
    fn rounds_out_to_lines_and_merges() {
        assert_eq!(normalise([g(65, 1)], 64).as_slice(), [g(64, 64)]);
        assert_eq!(normalise([g(60, 8)], 64).as_slice(), [g(0, 128)]);
        assert_eq!(
            normalise([g(256, 64), g(0, 64), g(64, 1)], 64).as_slice(),
            [g(0, 128), g(256, 64)]
        );
        assert_eq!(
            normalise([g(0, 100), g(50, 10)], 64).as_slice(),
            [g(0, 128)]
        );
        assert!(normalise([g(0, 0)], 64).is_empty());
    }

    #[test]
    fn extents_are_cut_at_region_edges() {
        // Two adjacent regions: a merged extent across the edge is cut in two.
        let regions = [(0, 4096), (4096, 4096)];
        assert_eq!(
            split_at_regions(&[g(4032, 128)], &regions)
                .unwrap()
                .as_slice(),
            [g(4032, 64), g(4096, 64)]
        );
        assert_eq!(
            split_at_regions(&[g(0, 8192)], &regions)
                .unwrap()
                .as_slice(),
            [g(0, 4096), g(4096, 4096)]
        );
        // A gap between regions fails the plan, naming the gap.
        let gap = [(0, 4096), (8192, 4096)];
        let err = split_at_regions(&[g(4032, 4224)], &gap).unwrap_err();
        assert!(
            matches!(
                err,
                PlanError::NotInMemory {
                    start: 4096,
                    end: 8192
                }
            ),
            "{err}"
        );
        // Past the last region.
        assert!(split_at_regions(&[g(12288, 64)], &gap).is_err());
        assert_eq!(lines_in(&[g(0, 128), g(4096, 64)], 64), 3);
    }

    #[test]
    fn splits_evenly_at_line_boundaries() {
        let shares = split(&[g(0, 64 * 10)], 2, 64);
        assert_eq!(shares, vec![vec![g(0, 320)], vec![g(320, 320)]]);
        let shares = split(&[g(0, 64 * 3), g(4096, 64 * 4)], 2, 64);
        assert_eq!(
            shares,
            vec![vec![g(0, 192), g(4096, 64)], vec![g(4160, 192)]]
        );
        // Fewer lines than shares: one line each, no empty shares.
        assert_eq!(
            split(&[g(0, 128)], 4, 64),
            vec![vec![g(0, 64)], vec![g(64, 64)]]
        );
        assert!(split(&[], 4, 64).is_empty());
        // Every byte exactly once.
        let ex = [g(0, 64 * 7), g(1 << 20, 64 * 13), g(2 << 20, 64)];
        for n in 1..6 {
            let s = split(&ex, n, 64);
            assert!(s.len() <= n);
            let total: u64 = s.iter().flatten().map(|e| e.1).sum();
            assert_eq!(total, 64 * 21);
            assert!(s
                .iter()
                .flatten()
                .all(|e| e.0 .0 % 64 == 0 && e.1 % 64 == 0));
        }
    }
}
