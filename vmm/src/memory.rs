//! Guest RAM: layout and backing.
//!
//! RAM is one `memfd`, mapped `MAP_SHARED | MAP_NORESERVE`:
//! * nothing is allocated until the guest (or the VMM) touches a page, so an
//!   8 GiB guest starts with a small host RSS;
//! * the same file can be mapped a second time, which is how a test or a user
//!   gets a second host mapping of guest memory (the "shared" alias of a
//!   confidential-VM hand-off) and how a flush through one mapping can be
//!   shown to cover the other;
//! * `mincore(2)` on the mapping tells which guest pages are resident, i.e.
//!   which can hold cache lines at all, which bounds the cost of a full flush.
//!
//! Layout (see `resources/boot-protocol.md`): RAM starts at 0; what does not
//! fit below the MMIO hole at 3 GiB continues at 4 GiB.

use std::fs::File;
use std::os::fd::FromRawFd;

use cache_flush_abi::boot::{RamRegion, HIGH_RAM_START, KERNEL_MIN_GPA, MMIO_HOLE_START};
use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

/// Errors of guest memory set-up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The size is below what the boot structures and a kernel need.
    #[error("guest memory of {mib} MiB is too small: at least {min_mib} MiB are needed")]
    TooSmall {
        /// Requested size.
        mib: u64,
        /// Smallest size accepted.
        min_mib: u64,
    },
    /// The size is above what the VMM supports.
    #[error("guest memory of {mib} MiB is too large: at most {max_mib} MiB are supported")]
    TooLarge {
        /// Requested size.
        mib: u64,
        /// Largest size accepted.
        max_mib: u64,
    },
    /// `memfd_create` failed.
    #[error("cannot create the guest memory file (memfd_create)")]
    CreateFile(#[source] std::io::Error),
    /// `ftruncate` of the memory file failed.
    #[error("cannot size the guest memory file to {bytes} bytes")]
    SizeFile {
        /// Requested size.
        bytes: u64,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// `mmap` failed (for example: the host's address space or overcommit
    /// limit cannot take it).
    #[error("the host cannot map {bytes} bytes of guest memory")]
    Map {
        /// Requested size.
        bytes: u64,
        /// Cause.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// vm-memory refused the region collection.
    #[error("invalid guest memory layout")]
    Layout(#[source] vm_memory::GuestRegionCollectionError),
}

/// Smallest guest accepted: the boot structures plus room for a kernel.
pub const MIN_MEMORY_MIB: u64 = 4;
/// Largest guest accepted: the VMM's page tables (between
/// `BOOT_PAGE_TABLES_GPA` and `KERNEL_MIN_GPA`) identity-map up to 128 GiB of
/// guest-physical space with 2 MiB pages.
pub const MAX_MEMORY_MIB: u64 = 64 * 1024;

const MIB: u64 = 1 << 20;
const _: () = assert!(MIN_MEMORY_MIB * MIB > KERNEL_MIN_GPA);

/// The guest-physical RAM regions for `bytes` of RAM: below the MMIO hole
/// first, the rest above 4 GiB.
pub fn ram_layout(bytes: u64) -> Vec<RamRegion> {
    let low = bytes.min(MMIO_HOLE_START);
    let mut regions = vec![RamRegion { base: 0, size: low }];
    if bytes > low {
        regions.push(RamRegion {
            base: HIGH_RAM_START,
            size: bytes - low,
        });
    }
    regions
}

/// Guest RAM with the file that backs it.
pub struct GuestRam {
    /// The guest's memory, as the devices and the VMM see it.
    pub memory: GuestMemoryMmap,
    /// The regions, in guest-physical order.
    pub layout: Vec<RamRegion>,
    /// The memfd behind every region (region `i` starts at file offset
    /// `file_offsets[i]`): map it again to alias guest memory.
    pub file: File,
    /// File offset of each region of `layout`.
    pub file_offsets: Vec<u64>,
}

impl GuestRam {
    /// Creates `mib` MiB of guest RAM, lazily backed by a memfd.
    pub fn new(mib: u64) -> Result<Self, MemoryError> {
        if mib < MIN_MEMORY_MIB {
            return Err(MemoryError::TooSmall {
                mib,
                min_mib: MIN_MEMORY_MIB,
            });
        }
        if mib > MAX_MEMORY_MIB {
            return Err(MemoryError::TooLarge {
                mib,
                max_mib: MAX_MEMORY_MIB,
            });
        }
        let bytes = mib * MIB;
        let file = create_memfd()?;
        file.set_len(bytes)
            .map_err(|source| MemoryError::SizeFile { bytes, source })?;

        let layout = ram_layout(bytes);
        let mut regions = Vec::with_capacity(layout.len());
        let mut file_offsets = Vec::with_capacity(layout.len());
        let mut offset = 0u64;
        for region in &layout {
            let fd = file.try_clone().map_err(MemoryError::CreateFile)?;
            let mapping = MmapRegion::<()>::build(
                Some(FileOffset::new(fd, offset)),
                region.size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
            )
            .map_err(|source| MemoryError::Map { bytes, source })?;
            // `new` only fails when base + size overflows, which the layout rules out.
            let region_mmap = GuestRegionMmap::new(mapping, GuestAddress(region.base))
                .expect("RAM regions lie far below the end of the address space");
            regions.push(region_mmap);
            file_offsets.push(offset);
            offset += region.size;
        }
        let memory = GuestMemoryMmap::from_regions(regions).map_err(MemoryError::Layout)?;
        Ok(Self {
            memory,
            layout,
            file,
            file_offsets,
        })
    }

    /// Total bytes of RAM.
    pub fn size(&self) -> u64 {
        self.layout.iter().map(|r| r.size).sum()
    }
}

fn create_memfd() -> Result<File, MemoryError> {
    // SAFETY: the name is a valid NUL-terminated string and the flags are
    // plain constants; the kernel returns a new descriptor or -1.
    let fd = unsafe { libc::memfd_create(c"guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::CreateFile(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn small_guest_is_one_low_region() {
        assert_eq!(
            ram_layout(64 * MIB),
            vec![RamRegion {
                base: 0,
                size: 64 * MIB
            }]
        );
    }

    #[test]
    fn large_guest_is_split_around_the_hole() {
        let l = ram_layout(8 * 1024 * MIB);
        assert_eq!(l.len(), 2);
        assert_eq!(
            l[0],
            RamRegion {
                base: 0,
                size: MMIO_HOLE_START
            }
        );
        assert_eq!(l[1].base, HIGH_RAM_START);
        assert_eq!(l[0].size + l[1].size, 8 * 1024 * MIB);
    }

    #[test]
    fn rejects_sizes_out_of_bounds() {
        assert!(matches!(
            GuestRam::new(0),
            Err(MemoryError::TooSmall { .. })
        ));
        assert!(matches!(
            GuestRam::new(MAX_MEMORY_MIB + 1),
            Err(MemoryError::TooLarge { .. })
        ));
    }

    #[test]
    fn memory_is_shared_with_the_file() {
        let ram = GuestRam::new(8).unwrap();
        assert_eq!(ram.memory.num_regions(), 1);
        ram.memory
            .write_obj(0xdead_beef_u32, GuestAddress(0x3000))
            .unwrap();
        let mut buf = [0u8; 4];
        use std::os::unix::fs::FileExt;
        ram.file.read_exact_at(&mut buf, 0x3000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
        assert_eq!(ram.memory.iter().next().unwrap().len(), 8 * MIB);
    }
}
