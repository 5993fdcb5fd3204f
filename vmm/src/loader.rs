//! Loading the guest kernel: a static ELF64 x86-64 executable.
//!
//! The image is checked completely before a byte of it is written to guest
//! memory, so a bad kernel never leads to a partial start: every loadable
//! segment must lie inside one RAM region and above the VMM's boot structures,
//! and the entry point must be inside a loaded, executable segment.
//! linux-loader then copies the segments.

use std::io::Cursor;

use cache_flush_abi::boot::{RamRegion, KERNEL_MIN_GPA};
use linux_loader::loader::{Elf, KernelLoader};
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Errors of kernel loading. Each says what is wrong with the file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LoaderError {
    /// Shorter than an ELF header, or a header points past the end.
    #[error("kernel is not an ELF file: {0}")]
    NotElf(&'static str),
    /// Not a 64-bit, little-endian ELF.
    #[error("kernel is not a 64-bit little-endian ELF (class {class}, data {data})")]
    WrongClass {
        /// EI_CLASS.
        class: u8,
        /// EI_DATA.
        data: u8,
    },
    /// Not built for x86-64.
    #[error("kernel is built for ELF machine {0}, not x86-64 (62)")]
    WrongMachine(u16),
    /// Not an executable (ET_EXEC).
    #[error("kernel ELF type {0} is not a static executable (ET_EXEC = 2)")]
    NotExecutable(u16),
    /// Malformed program headers.
    #[error("kernel has malformed program headers: {0}")]
    BadProgramHeaders(&'static str),
    /// No PT_LOAD segment at all.
    #[error("kernel has no loadable segment")]
    NoLoadableSegment,
    /// A segment reaches outside guest RAM (or across the MMIO hole).
    #[error("kernel segment {start:#x}..{end:#x} lies outside guest RAM")]
    SegmentOutsideRam {
        /// First byte.
        start: u64,
        /// One past the last byte.
        end: u64,
    },
    /// A segment overlaps the VMM's boot structures below `KERNEL_MIN_GPA`.
    #[error("kernel segment {start:#x}..{end:#x} overlaps the VMM's boot structures below {KERNEL_MIN_GPA:#x}")]
    SegmentOverBootStructures {
        /// First byte.
        start: u64,
        /// One past the last byte.
        end: u64,
    },
    /// A segment's file range runs past the end of the file.
    #[error(
        "kernel segment data at file offset {offset:#x} (+{len:#x}) runs past the end of the file"
    )]
    SegmentPastEndOfFile {
        /// File offset.
        offset: u64,
        /// Bytes in the file.
        len: u64,
    },
    /// The entry point is not inside a loaded executable segment.
    #[error("kernel entry point {0:#x} is not inside a loaded executable segment")]
    EntryOutsideSegments(u64),
    /// linux-loader refused the image after our checks passed.
    #[error("cannot load the kernel: {0}")]
    Load(String),
}

/// Where a loaded kernel starts, and where its image ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadedKernel {
    /// Entry point (guest-physical = guest-virtual under the identity map).
    pub entry: GuestAddress,
    /// One past the highest byte of any loaded segment.
    pub image_end: GuestAddress,
}

const PT_LOAD: u32 = 1;
const PF_X: u32 = 1;
const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

struct Segment {
    start: u64,
    end: u64,
    executable: bool,
}

/// Checks `image` against the RAM layout; returns the entry point and the end
/// of the image without touching guest memory.
pub fn validate(image: &[u8], ram: &[RamRegion]) -> Result<LoadedKernel, LoaderError> {
    if image.len() < EHDR_SIZE {
        return Err(LoaderError::NotElf("shorter than an ELF header"));
    }
    if &image[..4] != b"\x7fELF" {
        return Err(LoaderError::NotElf("no ELF magic"));
    }
    let (class, data) = (image[4], image[5]);
    if class != 2 || data != 1 {
        return Err(LoaderError::WrongClass { class, data });
    }
    let e_type = u16_at(image, 16);
    let machine = u16_at(image, 18);
    if machine != 62 {
        return Err(LoaderError::WrongMachine(machine));
    }
    if e_type != 2 {
        return Err(LoaderError::NotExecutable(e_type));
    }
    let entry = u64_at(image, 24);
    let phoff = u64_at(image, 32);
    let phentsize = u16_at(image, 54) as usize;
    let phnum = u16_at(image, 56) as usize;
    if phentsize != PHDR_SIZE {
        return Err(LoaderError::BadProgramHeaders("entry size is not 56 bytes"));
    }
    let table_end = usize::try_from(phoff)
        .ok()
        .and_then(|off| off.checked_add(phnum * PHDR_SIZE))
        .filter(|&end| end <= image.len())
        .ok_or(LoaderError::BadProgramHeaders(
            "table runs past the end of the file",
        ))?;
    let table = &image[phoff as usize..table_end];

    let mut segments = Vec::new();
    for ph in table.chunks_exact(PHDR_SIZE) {
        if u32_at(ph, 0) != PT_LOAD {
            continue;
        }
        let flags = u32_at(ph, 4);
        let offset = u64_at(ph, 8);
        let paddr = u64_at(ph, 24);
        let filesz = u64_at(ph, 32);
        let memsz = u64_at(ph, 40);
        if filesz > memsz {
            return Err(LoaderError::BadProgramHeaders(
                "a segment's file size exceeds its memory size",
            ));
        }
        if offset
            .checked_add(filesz)
            .is_none_or(|end| end > image.len() as u64)
        {
            return Err(LoaderError::SegmentPastEndOfFile {
                offset,
                len: filesz,
            });
        }
        if memsz == 0 {
            continue;
        }
        let end = paddr
            .checked_add(memsz)
            .ok_or(LoaderError::SegmentOutsideRam {
                start: paddr,
                end: u64::MAX,
            })?;
        if paddr < KERNEL_MIN_GPA {
            return Err(LoaderError::SegmentOverBootStructures { start: paddr, end });
        }
        let inside_one_region = ram
            .iter()
            .any(|r| paddr >= r.base && end <= r.base + r.size);
        if !inside_one_region {
            return Err(LoaderError::SegmentOutsideRam { start: paddr, end });
        }
        segments.push(Segment {
            start: paddr,
            end,
            executable: flags & PF_X != 0,
        });
    }
    if segments.is_empty() {
        return Err(LoaderError::NoLoadableSegment);
    }
    if !segments
        .iter()
        .any(|s| s.executable && (s.start..s.end).contains(&entry))
    {
        return Err(LoaderError::EntryOutsideSegments(entry));
    }
    let image_end = segments
        .iter()
        .map(|s| s.end)
        .max()
        .unwrap_or(KERNEL_MIN_GPA);
    Ok(LoadedKernel {
        entry: GuestAddress(entry),
        image_end: GuestAddress(image_end),
    })
}

/// Validates `image`, then copies its segments into `memory`.
pub fn load(
    image: &[u8],
    memory: &GuestMemoryMmap,
    ram: &[RamRegion],
) -> Result<LoadedKernel, LoaderError> {
    let kernel = validate(image, ram)?;
    let mut cursor = Cursor::new(image);
    Elf::load(
        memory,
        None,
        &mut cursor,
        Some(GuestAddress(KERNEL_MIN_GPA)),
    )
    .map_err(|e| LoaderError::Load(e.to_string()))?;
    Ok(kernel)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const RAM: [RamRegion; 1] = [RamRegion {
        base: 0,
        size: 64 << 20,
    }];

    /// A minimal ELF64 x86-64 executable with one PT_LOAD segment.
    pub(crate) fn elf(entry: u64, paddr: u64, memsz: u64, flags: u32) -> Vec<u8> {
        let code = [0xf4u8; 16];
        let mut b = vec![0u8; EHDR_SIZE + PHDR_SIZE];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[6] = 1;
        b[16..18].copy_from_slice(&2u16.to_le_bytes());
        b[18..20].copy_from_slice(&62u16.to_le_bytes());
        b[20..24].copy_from_slice(&1u32.to_le_bytes());
        b[24..32].copy_from_slice(&entry.to_le_bytes());
        b[32..40].copy_from_slice(&(EHDR_SIZE as u64).to_le_bytes());
        b[52..54].copy_from_slice(&(EHDR_SIZE as u16).to_le_bytes());
        b[54..56].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
        b[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = EHDR_SIZE;
        let data_off = (EHDR_SIZE + PHDR_SIZE) as u64;
        b[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
        b[ph + 4..ph + 8].copy_from_slice(&flags.to_le_bytes());
        b[ph + 8..ph + 16].copy_from_slice(&data_off.to_le_bytes());
        b[ph + 16..ph + 24].copy_from_slice(&paddr.to_le_bytes());
        b[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
        b[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
        b[ph + 40..ph + 48].copy_from_slice(&memsz.to_le_bytes());
        b[ph + 48..ph + 56].copy_from_slice(&0x1000u64.to_le_bytes());
        b.extend_from_slice(&code);
        b
    }

    #[test]
    fn accepts_a_good_kernel() {
        let k = validate(&elf(0x20_0000, 0x20_0000, 0x1000, 5), &RAM).unwrap();
        assert_eq!(k.entry, GuestAddress(0x20_0000));
        assert_eq!(k.image_end, GuestAddress(0x20_1000));
    }

    #[test]
    fn rejects_each_kind_of_bad_kernel() {
        assert_eq!(
            validate(b"hello", &RAM),
            Err(LoaderError::NotElf("shorter than an ELF header"))
        );
        assert_eq!(
            validate(&[0u8; 100], &RAM),
            Err(LoaderError::NotElf("no ELF magic"))
        );
        let mut e = elf(0x20_0000, 0x20_0000, 0x1000, 5);
        e[4] = 1;
        assert!(matches!(
            validate(&e, &RAM),
            Err(LoaderError::WrongClass { class: 1, .. })
        ));
        let mut e = elf(0x20_0000, 0x20_0000, 0x1000, 5);
        e[18] = 183; // aarch64
        assert_eq!(validate(&e, &RAM), Err(LoaderError::WrongMachine(183)));
        assert!(matches!(
            validate(&elf(0x20_0000, 0x8000, 0x1000, 5), &RAM),
            Err(LoaderError::SegmentOverBootStructures { .. })
        ));
        assert!(matches!(
            validate(&elf(0x20_0000, 0x20_0000, 128 << 20, 5), &RAM),
            Err(LoaderError::SegmentOutsideRam { .. })
        ));
        assert!(matches!(
            validate(&elf(0x20_0000, u64::MAX - 4, 16, 5), &RAM),
            Err(LoaderError::SegmentOutsideRam { .. })
        ));
        assert_eq!(
            validate(&elf(0x30_0000, 0x20_0000, 0x1000, 5), &RAM),
            Err(LoaderError::EntryOutsideSegments(0x30_0000))
        );
        // Entry inside a segment that is not executable.
        assert_eq!(
            validate(&elf(0x20_0000, 0x20_0000, 0x1000, 6), &RAM),
            Err(LoaderError::EntryOutsideSegments(0x20_0000))
        );
        let mut e = elf(0x20_0000, 0x20_0000, 0x1000, 5);
        e.truncate(EHDR_SIZE + 10);
        assert!(matches!(
            validate(&e, &RAM),
            Err(LoaderError::BadProgramHeaders(_))
        ));
    }
}
