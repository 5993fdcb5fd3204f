//! Guest memory for the crate's own tests: memfd-backed regions, like a
//! VMM's, so the residency scan's SEEK_DATA path is what gets tested.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

/// Guest RAM of `regions` (guest base, length), laid out one after the
/// other in one memfd.
pub struct MemfdRam {
    /// The backing file.
    pub file: File,
    /// The mapped regions.
    pub memory: GuestMemoryMmap,
}

impl MemfdRam {
    /// Creates the file and maps every region (lazily backed: untouched
    /// pages cost nothing and are not resident).
    pub fn new(regions: &[(u64, usize)]) -> Self {
        let total: usize = regions.iter().map(|r| r.1).sum();
        // SAFETY: memfd_create takes a NUL-terminated name and returns a new
        // descriptor (or -1), which we own from here on.
        let fd = unsafe { libc::memfd_create(c"flush-engine-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(total as u64).unwrap();
        let shared = Arc::new(file.try_clone().unwrap());
        let mut offset = 0u64;
        let ranges: Vec<_> = regions
            .iter()
            .map(|&(base, len)| {
                let range = (
                    GuestAddress(base),
                    len,
                    Some(FileOffset::from_arc(shared.clone(), offset)),
                );
                offset += len as u64;
                range
            })
            .collect();
        let memory = GuestMemoryMmap::from_ranges_with_files(ranges).unwrap();
        Self { file, memory }
    }
}
