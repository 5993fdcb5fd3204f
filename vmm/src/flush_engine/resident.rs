//! Which guest pages can hold cache lines at all: the resident ones.
//!
//! A page of the memfd that was never touched has no physical memory behind
//! it, so no cache can hold its lines; flushing it would only fault it in.
//! `mincore(2)` on the shared mapping reports the file's pages that are in
//! memory, whichever mapping (the guest's, the VMM's, an alias) touched them.
//! So a full flush costs in proportion to resident memory, not guest size.

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Errors of the residency scan.
#[derive(Debug, thiserror::Error)]
pub enum ResidentError {
    /// `mincore` failed on a region.
    #[error("mincore failed on the guest region at {base:#x}")]
    Mincore {
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
/// neighbouring resident pages merged.
pub fn resident_extents(
    memory: &GuestMemoryMmap,
) -> Result<Vec<(GuestAddress, u64)>, ResidentError> {
    let page = page_size();
    let mut extents = Vec::new();
    for region in memory.iter() {
        let len = region.len() as usize;
        let pages = len.div_ceil(page);
        let mut vec = vec![0u8; pages];
        let base = region.start_addr();
        // SAFETY: the region is a live mapping of `len` bytes owned by
        // `memory`; `vec` has one byte per page of it, as mincore requires.
        let rc = unsafe { libc::mincore(region.as_ptr().cast(), len, vec.as_mut_ptr()) };
        if rc != 0 {
            return Err(ResidentError::Mincore {
                base: base.0,
                source: std::io::Error::last_os_error(),
            });
        }
        let mut run_start: Option<usize> = None;
        for (i, v) in vec.iter().chain(std::iter::once(&0)).enumerate() {
            match (v & 1 != 0, run_start) {
                (true, None) => run_start = Some(i),
                (false, Some(start)) => {
                    let bytes = ((i * page).min(len) - start * page) as u64;
                    extents.push((GuestAddress(base.0 + (start * page) as u64), bytes));
                    run_start = None;
                }
                _ => {}
            }
        }
    }
    Ok(extents)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRam;
    use vm_memory::Bytes;

    #[test]
    fn only_touched_pages_are_resident() {
        let ram = GuestRam::new(16).unwrap();
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
}
