//! Which guest pages can hold cache lines at all: the resident ones.
//!
//! A page of the memfd that was never touched has no physical memory behind
//! it, so no cache can hold its lines; flushing it would only fault it in.
//! So a full flush costs in proportion to resident memory, not guest size,
//! and so should the scan that finds it:
//!
//! 1. `lseek(SEEK_DATA / SEEK_HOLE)` on the memfd lists the file's allocated
//!    extents, skipping holes in the page cache's own index, so its cost
//!    follows allocated memory (measured on an 8 GiB guest: `mincore` over all
//!    of guest RAM took 111.6 ms, almost all of it on never-touched pages);
//! 2. `mincore(2)` over each allocated extent keeps the pages that are in
//!    memory (an allocated page may be swapped out, and has no lines then).
//!
//! Both see the file's pages whichever mapping (the guest's, the VMM's, an
//! alias) touched them. A region without a backing file falls back to
//! `mincore` over the whole region.

use std::os::fd::AsRawFd;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

/// Errors of the residency scan.
#[derive(Debug, thiserror::Error)]
pub enum ResidentError {
    /// A region has no mapping in this process.
    #[error("the guest region at {base:#x} is not mapped in the VMM")]
    NotMapped {
        /// Guest-physical base of the region.
        base: u64,
    },
    /// `mincore` failed on a region.
    #[error("mincore failed on the guest region at {base:#x}")]
    Mincore {
        /// Guest-physical base of the region.
        base: u64,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// `lseek(SEEK_DATA/SEEK_HOLE)` failed on the guest memory file.
    #[error(
        "lseek(SEEK_DATA/SEEK_HOLE) on the guest memory file failed for the region at {base:#x}"
    )]
    Seek {
        /// Guest-physical base of the region.
        base: u64,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// The host page size.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no memory effects.
    match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as usize,
        _ => 4096,
    }
}

/// The resident extents of guest memory, as (guest address, length), with
/// neighbouring resident pages of one region merged. Extents never cross a
/// region edge, even where two regions are adjacent: each region is its own
/// host mapping. A region this process has no mapping of is an error (its
/// lines could not be flushed).
pub fn resident_extents<M: GuestMemoryBackend>(
    memory: &M,
) -> Result<Vec<(GuestAddress, u64)>, ResidentError> {
    let page = page_size();
    let mut extents: Vec<(GuestAddress, u64)> = Vec::new();
    for region in memory.iter() {
        let len = region.len() as usize;
        let base = region.start_addr().0;
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|_| ResidentError::NotMapped { base })?;
        let region_first = extents.len();
        let whole = || vec![(0, len as u64)];
        let allocated = match region.file_offset() {
            Some(file) => {
                match allocated_extents(file.file().as_raw_fd(), file.start(), len as u64) {
                    Ok(extents) => extents,
                    // A file system without SEEK_DATA/SEEK_HOLE: mincore alone
                    // is still right, only slower.
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => whole(),
                    Err(source) => return Err(ResidentError::Seek { base, source }),
                }
            }
            None => whole(),
        };
        for (offset, bytes) in allocated {
            // SAFETY: `offset + bytes` lies inside the region (clamped by
            // `allocated_extents`), a live mapping owned by `memory`.
            let ptr = unsafe { host.add(offset as usize) };
            in_memory_runs(ptr, bytes as usize, page, |run_offset, run_bytes| {
                let start = offset + run_offset as u64;
                let in_this_region = extents.len() > region_first;
                match extents.last_mut() {
                    Some((last, last_len))
                        if in_this_region && last.0 + *last_len == base + start =>
                    {
                        *last_len += run_bytes as u64
                    }
                    _ => extents.push((GuestAddress(base + start), run_bytes as u64)),
                }
            })
            .map_err(|source| ResidentError::Mincore { base, source })?;
        }
    }
    Ok(extents)
}

/// The allocated extents of `[start, start + len)` of the file `fd`, as
/// (offset from `start`, length), in order; page-aligned because the page
/// cache allocates whole pages.
fn allocated_extents(fd: i32, start: u64, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let end = start + len;
    let mut extents = Vec::new();
    let mut pos = start;
    while pos < end {
        // SAFETY: lseek on a valid descriptor has no memory effects; only the
        // returned offsets are used (the file position itself is not relied
        // on by anything, so concurrent scans cannot disturb each other).
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let err = std::io::Error::last_os_error();
            // ENXIO: no data at or after `pos`.
            if err.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(err);
        }
        let data = data as u64;
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let hole = (hole as u64).min(end);
        extents.push((data - start, hole - data));
        pos = hole;
    }
    Ok(extents)
}

/// Calls `run(offset, bytes)` for each run of in-memory pages of the `len`
/// bytes at `ptr` (page-aligned), according to `mincore`.
fn in_memory_runs(
    ptr: *const u8,
    len: usize,
    page: usize,
    mut run: impl FnMut(usize, usize),
) -> std::io::Result<()> {
    let mut vec = vec![0u8; len.div_ceil(page)];
    // SAFETY: the caller passes a live, page-aligned mapping of `len` bytes;
    // `vec` has one byte per page of it, as mincore requires.
    if unsafe { libc::mincore(ptr as *mut libc::c_void, len, vec.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut run_start: Option<usize> = None;
    for (i, v) in vec.iter().chain(std::iter::once(&0)).enumerate() {
        match (v & 1 != 0, run_start) {
            (true, None) => run_start = Some(i),
            (false, Some(start)) => {
                run(start * page, (i * page).min(len) - start * page);
                run_start = None;
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::MemfdRam;
    use std::os::fd::AsRawFd;
    use vm_memory::Bytes;

    const MIB: usize = 1 << 20;

    #[test]
    fn only_touched_pages_are_resident() {
        let ram = MemfdRam::new(&[(0, 16 * MIB)]);
        assert_eq!(resident_extents(&ram.memory).unwrap(), vec![]);
        let page = page_size() as u64;
        ram.memory.write_obj(1u8, GuestAddress(3 * page)).unwrap();
        ram.memory
            .write_obj(1u8, GuestAddress(4 * page + 9))
            .unwrap();
        ram.memory.write_obj(1u8, GuestAddress(10 * page)).unwrap();
        assert_eq!(
            resident_extents(&ram.memory).unwrap(),
            vec![
                (GuestAddress(3 * page), 2 * page),
                (GuestAddress(10 * page), page)
            ]
        );
    }

    #[test]
    fn pages_above_a_hole_are_found_at_their_guest_address() {
        // Two regions with a gap, the second at file offset 1 MiB. Lazily
        // backed, so this costs nothing.
        let high_base = 4u64 << 30;
        let ram = MemfdRam::new(&[(0, MIB), (high_base, MIB)]);
        let page = page_size() as u64;
        let low = GuestAddress(5 * page);
        let high = GuestAddress(high_base + 7 * page);
        ram.memory.write_obj(1u8, low).unwrap();
        ram.memory.write_obj(1u8, high).unwrap();
        ram.memory
            .write_obj(1u8, GuestAddress(high.0 + page))
            .unwrap();
        assert_eq!(
            resident_extents(&ram.memory).unwrap(),
            vec![(low, page), (high, 2 * page)]
        );
    }

    #[test]
    fn extents_never_cross_adjacent_regions() {
        // Two regions back to back in guest-physical space: the last page of
        // the first and the first page of the second are resident. They are
        // contiguous guest addresses but two host mappings, so two extents.
        let ram = MemfdRam::new(&[(0, MIB), (MIB as u64, MIB)]);
        let page = page_size() as u64;
        let edge = MIB as u64;
        ram.memory
            .write_obj(1u8, GuestAddress(edge - page))
            .unwrap();
        ram.memory.write_obj(1u8, GuestAddress(edge)).unwrap();
        assert_eq!(
            resident_extents(&ram.memory).unwrap(),
            vec![
                (GuestAddress(edge - page), page),
                (GuestAddress(edge), page)
            ]
        );
    }

    #[test]
    fn allocated_extents_skip_holes_and_clamp_to_the_range() {
        let ram = MemfdRam::new(&[(0, 16 * MIB)]);
        let page = page_size() as u64;
        for p in [2, 3, 9] {
            ram.memory.write_obj(1u8, GuestAddress(p * page)).unwrap();
        }
        let fd = ram.file.as_raw_fd();
        assert_eq!(
            allocated_extents(fd, 0, 16 * page).unwrap(),
            vec![(2 * page, 2 * page), (9 * page, page)]
        );
        // A window that starts inside an extent and ends inside another.
        assert_eq!(
            allocated_extents(fd, 3 * page, 7 * page).unwrap(),
            vec![(0, page), (6 * page, page)]
        );
        assert_eq!(allocated_extents(fd, 10 * page, 6 * page).unwrap(), vec![]);
    }
}
