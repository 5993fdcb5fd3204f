//! Turning a batch into per-vCPU shares of whole cache lines.

use vm_memory::GuestAddress;

/// A guest-physical extent, in whole lines after [`normalise`].
pub type Extent = (GuestAddress, u64);

/// Rounds every extent out to whole lines, sorts them, and merges the ones
/// that overlap or touch, so a line requested twice in a batch is flushed
/// once. Rounding never leaves a page, so never leaves the RAM region the
/// device validated the extent against.
pub fn normalise(extents: &[Extent], line: u64) -> Vec<Extent> {
    let mut rounded: Vec<(u64, u64)> = extents
        .iter()
        .filter(|(_, len)| *len > 0)
        .map(|&(addr, len)| {
            let start = addr.0 & !(line - 1);
            let end = (addr.0 + len).next_multiple_of(line);
            (start, end)
        })
        .collect();
    rounded.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(rounded.len());
    for (start, end) in rounded {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    merged
        .into_iter()
        .map(|(start, end)| (GuestAddress(start), end - start))
        .collect()
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
        assert_eq!(normalise(&[g(65, 1)], 64), vec![g(64, 64)]);
        assert_eq!(normalise(&[g(60, 8)], 64), vec![g(0, 128)]);
        assert_eq!(
            normalise(&[g(256, 64), g(0, 64), g(64, 1)], 64),
            vec![g(0, 128), g(256, 64)]
        );
        assert_eq!(normalise(&[g(0, 100), g(50, 10)], 64), vec![g(0, 128)]);
        assert_eq!(normalise(&[g(0, 0)], 64), vec![]);
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
