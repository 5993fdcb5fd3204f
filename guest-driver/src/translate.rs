//! Virtual to guest-physical translation: the [`Translate`] trait a kernel
//! may implement itself, and [`PageTableWalker`], a software walk of x86-64
//! 4-level page tables.

use crate::mem::PhysMem;

/// Where a virtual address lives physically, and for how long that stays
/// contiguous.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// Guest-physical address of the translated virtual address.
    pub phys: u64,
    /// Bytes from the translated address on that are mapped physically
    /// contiguously (at least 1). The walker reports the rest of the page.
    pub len: u64,
}

/// Virtual-to-physical translation for the range call.
pub trait Translate {
    /// The mapping of `va`, or `None` if it is not mapped. A mapping whose
    /// `len` is 0 counts as not mapped.
    fn translate(&self, va: u64) -> Option<Mapping>;
}

impl<T: Translate + ?Sized> Translate for &T {
    fn translate(&self, va: u64) -> Option<Mapping> {
        (**self).translate(va)
    }
}

/// A level of the x86-64 4-level page-table hierarchy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Level 4, indexed by va bits 47:39.
    Pml4,
    /// Level 3, indexed by bits 38:30; may map a 1 GiB page.
    Pdpt,
    /// Level 2, indexed by bits 29:21; may map a 2 MiB page.
    Pd,
    /// Level 1, indexed by bits 20:12; maps 4 KiB pages.
    Pt,
}

/// Why [`PageTableWalker::walk`] found no mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkError {
    /// Bits 63:47 of the address are not all equal (4-level paging).
    NonCanonical {
        /// The address.
        va: u64,
    },
    /// The entry for `va` at `level` has its present bit clear.
    NotPresent {
        /// The address.
        va: u64,
        /// The level whose entry is not present.
        level: Level,
    },
    /// The kernel's [`PhysMem`] could not map a page table.
    TableUnreachable {
        /// The address being translated.
        va: u64,
        /// Guest-physical address of the table entry that could not be read.
        entry: u64,
    },
}

impl WalkError {
    /// The virtual address being translated.
    pub fn va(&self) -> u64 {
        match *self {
            WalkError::NonCanonical { va }
            | WalkError::NotPresent { va, .. }
            | WalkError::TableUnreachable { va, .. } => va,
        }
    }
}

const PRESENT: u64 = 1 << 0;
/// Page size: the entry maps a page rather than pointing to a table (PDPT and
/// PD only).
const PAGE_SIZE_BIT: u64 = 1 << 7;
/// Physical-address bits of an entry (MAXPHYADDR is at most 52). Bits above
/// 51 are NX and software-available bits, which must not leak into addresses.
const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;

/// Walks x86-64 4-level page tables in software.
///
/// Guest ring 3, where the bundled kernel runs the driver, cannot read CR3, so
/// the kernel names the root table (the bundled kernel passes
/// `boot::BOOT_PML4_GPA`); the walker reads the tables through [`PhysMem`].
/// It honours only the present and page-size bits: which privilege level may
/// use a mapping does not matter to a cache flush. 5-level paging (LA57) is
/// not supported.
#[derive(Clone, Copy, Debug)]
pub struct PageTableWalker<M> {
    mem: M,
    root: u64,
}

impl<M: PhysMem> PageTableWalker<M> {
    /// A walker of the tables rooted at guest-physical `root` (a CR3 value;
    /// its low 12 flag/PCID bits are ignored).
    pub fn new(mem: M, root: u64) -> Self {
        Self {
            mem,
            root: root & ADDR_MASK,
        }
    }

    /// Translates `va`. The returned [`Mapping::len`] runs to the end of the
    /// page (4 KiB, 2 MiB or 1 GiB) that maps `va`.
    pub fn walk(&self, va: u64) -> Result<Mapping, WalkError> {
        // Sign-extend from bit 47; a canonical address is its own extension.
        if (((va << 16) as i64) >> 16) as u64 != va {
            return Err(WalkError::NonCanonical { va });
        }
        let mut table = self.root;
        for (level, shift) in [
            (Level::Pml4, 39),
            (Level::Pdpt, 30),
            (Level::Pd, 21),
            (Level::Pt, 12),
        ] {
            let entry = self.read_entry(va, table, (va >> shift) & 0x1ff)?;
            if entry & PRESENT == 0 {
                return Err(WalkError::NotPresent { va, level });
            }
            // A set PS bit maps a 1 GiB (PDPT) or 2 MiB (PD) page. In a PT
            // entry the same bit is PAT, and in a PML4 entry it is reserved,
            // so only those two levels look at it.
            let leaf = level == Level::Pt
                || (entry & PAGE_SIZE_BIT != 0 && matches!(level, Level::Pdpt | Level::Pd));
            if leaf {
                let page_size = 1u64 << shift;
                let offset = va & (page_size - 1);
                // For large pages, bit 12 is the PAT bit and bits below the
                // page size are reserved: mask them out of the frame address.
                let frame = entry & ADDR_MASK & !(page_size - 1);
                return Ok(Mapping {
                    phys: frame | offset,
                    len: page_size - offset,
                });
            }
            table = entry & ADDR_MASK;
        }
        unreachable!("the PT level always yields a leaf")
    }

    fn read_entry(&self, va: u64, table: u64, index: u64) -> Result<u64, WalkError> {
        let entry = table + index * 8;
        let ptr = self
            .mem
            .map(entry, 8)
            .ok_or(WalkError::TableUnreachable { va, entry })?;
        // SAFETY: `PhysMem` guarantees the pointer is valid for 8 bytes;
        // entries are 8-byte aligned (`table` is page-aligned by the mask).
        // Volatile, because the kernel may edit its tables concurrently and
        // the compiler must not assume otherwise; an aligned 8-byte load is
        // atomic on x86-64, so an entry is never seen half-written.
        Ok(unsafe { ptr.cast::<u64>().as_ptr().read_volatile() })
    }
}

impl<M: PhysMem> Translate for PageTableWalker<M> {
    fn translate(&self, va: u64) -> Option<Mapping> {
        self.walk(va).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{FakeRam, PageTables};

    const GIB: u64 = 1 << 30;
    const MIB2: u64 = 2 << 20;

    fn setup() -> (&'static FakeRam, PageTables<'static>) {
        let ram = FakeRam::leak(64 * 4096);
        (ram, PageTables::new(ram))
    }

    #[test]
    fn maps_4k_page_with_offset() {
        let (ram, mut pt) = setup();
        pt.map_4k(0x40_1000, 0x7_3000);
        let w = PageTableWalker::new(ram, pt.root());
        assert_eq!(
            w.walk(0x40_1234),
            Ok(Mapping {
                phys: 0x7_3234,
                len: 0x1000 - 0x234
            })
        );
        assert_eq!(w.walk(0x40_1000).unwrap().len, 0x1000);
        assert_eq!(
            w.walk(0x40_1fff).unwrap(),
            Mapping {
                phys: 0x7_3fff,
                len: 1
            }
        );
    }

    #[test]
    fn maps_2m_page_ignoring_pat_bit() {
        let (ram, mut pt) = setup();
        // Bit 12 (PAT) set in the entry must not become an address bit.
        pt.map_2m_flags(0x8000_0000, 0x1240_0000, 1 << 12);
        let w = PageTableWalker::new(ram, pt.root());
        assert_eq!(
            w.walk(0x8001_2345),
            Ok(Mapping {
                phys: 0x1241_2345,
                len: MIB2 - 0x1_2345
            })
        );
    }

    #[test]
    fn maps_1g_page() {
        let (ram, mut pt) = setup();
        pt.map_1g(3 * GIB, 5 * GIB);
        let w = PageTableWalker::new(ram, pt.root());
        assert_eq!(
            w.walk(3 * GIB + 0x1234_5678),
            Ok(Mapping {
                phys: 5 * GIB + 0x1234_5678,
                len: GIB - 0x1234_5678
            })
        );
    }

    #[test]
    fn non_identity_high_half_mapping() {
        let (ram, mut pt) = setup();
        let va = 0xFFFF_8000_0010_0000;
        pt.map_4k(va, 0x2_5000);
        pt.map_4k(va + 0x1000, 0x9_1000);
        let w = PageTableWalker::new(ram, pt.root());
        assert_eq!(w.walk(va + 8).unwrap().phys, 0x2_5008);
        assert_eq!(w.walk(va + 0x1008).unwrap().phys, 0x9_1008);
    }

    #[test]
    fn two_aliases_of_one_page() {
        let (ram, mut pt) = setup();
        pt.map_4k(0x10_0000, 0x5_5000);
        pt.map_4k(0x7f00_0000_0000, 0x5_5000);
        let w = PageTableWalker::new(ram, pt.root());
        assert_eq!(w.walk(0x10_0abc).unwrap().phys, 0x5_5abc);
        assert_eq!(w.walk(0x7f00_0000_0abc).unwrap().phys, 0x5_5abc);
    }

    #[test]
    fn not_present_at_each_level() {
        let (ram, mut pt) = setup();
        // One 4 KiB page at 0x40_1000: its PT has other entries empty, its PD
        // other entries empty, and so on up.
        pt.map_4k(0x40_1000, 0x7_3000);
        let w = PageTableWalker::new(ram, pt.root());
        let cases = [
            (0x0000_4000_0000_0000, Level::Pml4),
            (0x0000_0000_4000_0000, Level::Pdpt),
            (0x0000_0000_0060_0000, Level::Pd),
            (0x0000_0000_0040_2000, Level::Pt),
        ];
        for (va, level) in cases {
            assert_eq!(
                w.walk(va + 5),
                Err(WalkError::NotPresent { va: va + 5, level })
            );
            assert_eq!(w.translate(va + 5), None);
        }
    }

    #[test]
    fn non_canonical_is_refused() {
        let (ram, pt) = setup();
        let w = PageTableWalker::new(ram, pt.root());
        let va = 0x0000_8000_0000_0000;
        assert_eq!(w.walk(va), Err(WalkError::NonCanonical { va }));
        assert_eq!(w.walk(va).unwrap_err().va(), va);
    }

    #[test]
    fn unreachable_table_is_reported() {
        let (ram, mut pt) = setup();
        // A PML4 entry pointing outside the fake RAM.
        pt.set_raw_pml4_entry(0, 0x4000_0000 | 0x7);
        let w = PageTableWalker::new(ram, pt.root());
        assert_eq!(
            w.walk(0x1000),
            Err(WalkError::TableUnreachable {
                va: 0x1000,
                entry: 0x4000_0000
            })
        );
    }

    #[test]
    fn root_flag_bits_are_ignored() {
        let (ram, mut pt) = setup();
        pt.map_4k(0x40_1000, 0x7_3000);
        // A CR3 value with PWT/PCD/PCID bits set.
        let w = PageTableWalker::new(ram, pt.root() | 0x18);
        assert_eq!(w.walk(0x40_1000).unwrap().phys, 0x7_3000);
    }
}
