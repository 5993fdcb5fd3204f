//! A second host mapping of guest RAM: the "shared" view a confidential-VM
//! hand-off test reads and writes, and the proof that a flush by physical
//! address covers every mapping of the same memory.
//!
//! Guest RAM is a memfd (see [`crate::memory`]), so any range of it can be
//! mapped again, `MAP_SHARED`, at a different host address. Both mappings
//! reach the same physical pages; nothing is copied.

use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::mmap::{MmapRegion, MmapRegionError};
use vm_memory::{FileOffset, GuestAddress, VolatileMemory};

use crate::memory::GuestRam;

/// Errors of alias creation and access.
#[derive(Debug, thiserror::Error)]
pub enum AliasError {
    /// The range is empty, overflows, or is not inside one RAM region.
    #[error("guest range {addr:#x}+{len:#x} is not inside one RAM region")]
    NotInRam {
        /// First guest-physical byte.
        addr: u64,
        /// Length.
        len: usize,
    },
    /// An access reaches past the end of the alias.
    #[error("access at offset {offset:#x} (+{len:#x}) is outside the {size:#x}-byte alias")]
    OutOfBounds {
        /// Offset into the alias.
        offset: usize,
        /// Length of the access.
        len: usize,
        /// Size of the alias.
        size: usize,
    },
    /// An atomic access at an offset not aligned to its size.
    #[error("atomic access at offset {offset:#x} is not {align}-byte aligned")]
    Misaligned {
        /// Offset into the alias.
        offset: usize,
        /// Required alignment.
        align: usize,
    },
    /// The memory file's descriptor could not be duplicated for the mapping.
    #[error("cannot duplicate the guest memory file's descriptor")]
    DupFile(#[source] std::io::Error),
    /// `mmap` of the memory file failed.
    #[error("mmap of the guest memory file failed")]
    Map(#[source] MmapRegionError),
}

/// A second host mapping of `[gpa, gpa + len)`; unmapped on drop.
///
/// The mapping is a vm-memory [`MmapRegion`] of the memfd (the same type
/// the VMM's own mapping of guest RAM is made of), so mapping, unmapping and
/// every bounds- and alignment-checked access are vm-memory's code, not
/// ours.
pub struct SharedAlias {
    /// Whole pages of the memory file, `MAP_SHARED`.
    mapping: MmapRegion,
    /// Offset of `gpa` inside the page-aligned mapping.
    lead: usize,
    gpa: GuestAddress,
    len: usize,
}

impl SharedAlias {
    /// Maps `[gpa, gpa + len)` of `ram` again.
    pub fn new(ram: &GuestRam, gpa: GuestAddress, len: usize) -> Result<Self, AliasError> {
        let not_in_ram = || AliasError::NotInRam { addr: gpa.0, len };
        let end = gpa
            .0
            .checked_add(len as u64)
            .filter(|_| len > 0)
            .ok_or_else(not_in_ram)?;
        let (index, region) = ram
            .layout
            .iter()
            .enumerate()
            .find(|(_, r)| gpa.0 >= r.base && end <= r.base + r.size)
            .ok_or_else(not_in_ram)?;
        let page = crate::flush_engine::resident::page_size() as u64;
        let file_offset = ram.file_offsets[index] + (gpa.0 - region.base);
        // mmap takes a page-aligned file offset: map from the page that
        // holds `gpa` and remember where `gpa` is in it.
        let aligned_offset = file_offset & !(page - 1);
        let lead = (file_offset - aligned_offset) as usize;
        let map_len = (lead + len).next_multiple_of(page as usize);
        let file = ram.file.try_clone().map_err(AliasError::DupFile)?;
        let mapping = MmapRegion::build(
            Some(FileOffset::new(file, aligned_offset)),
            map_len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
        .map_err(AliasError::Map)?;
        Ok(Self {
            mapping,
            lead,
            gpa,
            len,
        })
    }

    /// The guest-physical address of byte 0.
    pub fn guest_addr(&self) -> GuestAddress {
        self.gpa
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the alias is empty (never: creation refuses length 0).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Host address of byte 0 of the alias (for cache timing from the host).
    pub fn as_ptr(&self) -> *const u8 {
        self.mapping.as_ptr().wrapping_add(self.lead)
    }

    /// `offset + len` is inside the alias: the offset into the mapping.
    fn check(&self, offset: usize, len: usize) -> Result<usize, AliasError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(self.lead + offset),
            _ => Err(AliasError::OutOfBounds {
                offset,
                len,
                size: self.len,
            }),
        }
    }

    /// Copies `buf.len()` bytes at `offset` out of the alias.
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), AliasError> {
        let at = self.check(offset, buf.len())?;
        let slice = self
            .mapping
            .get_slice(at, buf.len())
            .expect("inside the mapping: checked against the alias");
        slice.copy_to(buf);
        Ok(())
    }

    /// Atomically loads the aligned `u64` at `offset` (Acquire): a mailbox
    /// word the guest writes with an atomic store is never seen torn, and
    /// what the guest wrote before it is visible after it.
    pub fn load_u64(&self, offset: usize) -> Result<u64, AliasError> {
        Ok(self.atomic_u64(offset)?.load(Ordering::Acquire))
    }

    /// Atomically stores `value` into the aligned `u64` at `offset`
    /// (Release): every write made through the alias before it is visible to
    /// a guest that sees the value.
    pub fn store_u64(&self, offset: usize, value: u64) -> Result<(), AliasError> {
        self.atomic_u64(offset)?.store(value, Ordering::Release);
        Ok(())
    }

    /// The word at `offset`. Every access to a word used this way is
    /// atomic: the guest's through its own atomics, the host's through these
    /// methods.
    fn atomic_u64(&self, offset: usize) -> Result<&AtomicU64, AliasError> {
        let at = self.check(offset, 8)?;
        // Bounds are checked above, so the only error left is alignment.
        self.mapping
            .get_atomic_ref::<AtomicU64>(at)
            .map_err(|_| AliasError::Misaligned { offset, align: 8 })
    }

    /// Copies `buf` into the alias at `offset`.
    pub fn write(&self, offset: usize, buf: &[u8]) -> Result<(), AliasError> {
        let at = self.check(offset, buf.len())?;
        let slice = self
            .mapping
            .get_slice(at, buf.len())
            .expect("inside the mapping: checked against the alias");
        slice.copy_from(buf);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn alias_sees_guest_writes_and_guest_sees_alias_writes() {
        let ram = GuestRam::new(8).unwrap();
        let gpa = GuestAddress(0x12_3456);
        let alias = SharedAlias::new(&ram, gpa, 100).unwrap();
        ram.memory.write_slice(b"from the guest", gpa).unwrap();
        let mut buf = [0u8; 14];
        alias.read(0, &mut buf).unwrap();
        assert_eq!(&buf, b"from the guest");
        alias.write(50, b"from the host").unwrap();
        let mut back = [0u8; 13];
        ram.memory
            .read_slice(&mut back, GuestAddress(gpa.0 + 50))
            .unwrap();
        assert_eq!(&back, b"from the host");
        assert_ne!(
            alias.as_ptr(),
            ram.memory.get_host_address(gpa).unwrap() as *const u8
        );
    }

    #[test]
    fn refuses_ranges_outside_ram_and_accesses_outside_the_alias() {
        let ram = GuestRam::new(8).unwrap();
        assert!(SharedAlias::new(&ram, GuestAddress(8 << 20), 1).is_err());
        assert!(SharedAlias::new(&ram, GuestAddress((8 << 20) - 1), 2).is_err());
        assert!(SharedAlias::new(&ram, GuestAddress(0), 0).is_err());
        assert!(SharedAlias::new(&ram, GuestAddress(u64::MAX), 2).is_err());
        let alias = SharedAlias::new(&ram, GuestAddress(0x1000), 16).unwrap();
        assert!(alias.write(10, &[0; 7]).is_err());
        assert!(alias.read(usize::MAX, &mut [0; 2]).is_err());
        assert!(alias.read(15, &mut [0; 1]).is_ok());
    }

    #[test]
    fn atomic_words_are_shared_with_guest_memory_and_must_be_aligned() {
        let ram = GuestRam::new(8).unwrap();
        let alias = SharedAlias::new(&ram, GuestAddress(0x1000), 64).unwrap();
        alias.store_u64(8, 0x1122_3344_5566_7788).unwrap();
        assert_eq!(
            ram.memory.read_obj::<u64>(GuestAddress(0x1008)).unwrap(),
            0x1122_3344_5566_7788
        );
        ram.memory.write_obj(7u64, GuestAddress(0x1010)).unwrap();
        assert_eq!(alias.load_u64(16).unwrap(), 7);
        assert!(matches!(
            alias.load_u64(4),
            Err(AliasError::Misaligned {
                offset: 4,
                align: 8
            })
        ));
        assert!(matches!(
            alias.store_u64(60, 0),
            Err(AliasError::OutOfBounds { .. })
        ));
        assert!(matches!(
            alias.load_u64(64),
            Err(AliasError::OutOfBounds { .. })
        ));
    }
}
