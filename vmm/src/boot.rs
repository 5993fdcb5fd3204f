//! x86-64 boot set-up: what the VMM writes into guest memory before the first
//! instruction (boot information block, GDT, identity-mapping page tables)
//! and the register state every vCPU starts with. The guest-facing contract
//! is `resources/boot-protocol.md` and `cache_flush_abi::boot`.
//!
//! Every vCPU starts directly in 64-bit long mode at the kernel entry: no
//! real-mode trampoline, because guest ring-0 code is interpreted (slow) on
//! this project's development hosts, and it is simply less code everywhere.

use cache_flush_abi::boot::{
    gdt, BootInfo, DeviceEntry, RamRegion, BOOT_GDT_GPA, BOOT_INFO_GPA, BOOT_INFO_MAGIC,
    BOOT_INFO_VERSION, BOOT_PAGE_TABLES_GPA, BOOT_PML4_GPA, CMDLINE_CAPACITY, HIGH_RAM_START,
    KERNEL_MIN_GPA, LARGE_PAGE_SIZE, MAX_DEVICES, MAX_RAM_REGIONS, MMIO_HOLE_START, PAGE_SIZE,
};
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

/// Errors of boot set-up.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The command line does not fit in the boot information block.
    #[error("command line is {len} bytes; at most {CMDLINE_CAPACITY} fit")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
    },
    /// More devices than the device table holds.
    #[error("{0} devices do not fit in the boot device table")]
    TooManyDevices(usize),
    /// The identity map needs more page tables than fit below the kernel.
    #[error("guest-physical space up to {0:#x} is too large for the boot page tables")]
    AddressSpaceTooLarge(u64),
    /// Writing a boot structure to guest memory failed.
    #[error("cannot write the boot structures to guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// A `BootInfo` as bytes. `BootInfo` is `#[repr(C)]` with only integer fields
/// and arrays of them, laid out without padding (checked below).
#[derive(Clone, Copy)]
#[repr(transparent)]
struct BootInfoBytes(BootInfo);

// SAFETY: `BootInfo` is `repr(C)`, contains only integers and arrays of
// `repr(C)` integer structs, has no padding (size asserted below), and any bit
// pattern is a valid value of it.
unsafe impl ByteValued for BootInfoBytes {}
const _: () = assert!(std::mem::size_of::<BootInfo>() == 1520);

/// One past the last guest-physical address the boot page tables map: all of
/// RAM and, at least, the whole MMIO hole below 4 GiB, in 2 MiB pages.
pub fn identity_map_end(ram: &[RamRegion]) -> u64 {
    let ram_end = ram.iter().map(|r| r.base + r.size).max().unwrap_or(0);
    ram_end
        .max(HIGH_RAM_START)
        .next_multiple_of(LARGE_PAGE_SIZE)
}

/// Writes the boot information block, the GDT and the page tables.
pub fn write_boot_structures(
    memory: &GuestMemoryMmap,
    ram: &[RamRegion],
    vcpu_count: u32,
    cmdline: &str,
    devices: &[DeviceEntry],
) -> Result<(), BootError> {
    if cmdline.len() > CMDLINE_CAPACITY {
        return Err(BootError::CmdlineTooLong { len: cmdline.len() });
    }
    if devices.len() > MAX_DEVICES {
        return Err(BootError::TooManyDevices(devices.len()));
    }
    debug_assert!(ram.len() <= MAX_RAM_REGIONS);
    let map_end = identity_map_end(ram);

    let mut info = BootInfo {
        magic: BOOT_INFO_MAGIC,
        version: BOOT_INFO_VERSION,
        vcpu_count,
        memory_size: ram.iter().map(|r| r.size).sum(),
        identity_map_end: map_end,
        ram_count: ram.len() as u32,
        device_count: devices.len() as u32,
        ram: [RamRegion::default(); MAX_RAM_REGIONS],
        devices: [DeviceEntry::default(); MAX_DEVICES],
        cmdline_len: cmdline.len() as u32,
        reserved: 0,
        cmdline: [0; CMDLINE_CAPACITY],
    };
    info.ram[..ram.len()].copy_from_slice(ram);
    info.devices[..devices.len()].copy_from_slice(devices);
    info.cmdline[..cmdline.len()].copy_from_slice(cmdline.as_bytes());
    memory
        .write_obj(BootInfoBytes(info), GuestAddress(BOOT_INFO_GPA))
        .map_err(BootError::Write)?;

    write_gdt(memory)?;
    write_page_tables(memory, map_end)
}

/// The GDT and the identity page tables alone, for a kernel with its own
/// boot information (a Linux kernel gets `boot_params` instead of
/// `BootInfo`): the same long-mode start as the bundled guest.
pub fn write_gdt_and_page_tables(
    memory: &GuestMemoryMmap,
    ram: &[RamRegion],
) -> Result<(), BootError> {
    write_gdt(memory)?;
    write_page_tables(memory, identity_map_end(ram))
}

/// Flat 64-bit descriptors, in the order of `cache_flush_abi::boot::gdt`.
const GDT_ENTRIES: [u64; 5] = [
    0,                     // null
    0x00af_9a00_0000_ffff, // 0x08: ring-0 code, 64-bit (L=1), present, DPL 0
    0x00cf_9200_0000_ffff, // 0x10: ring-0 data, writable
    0x00cf_f200_0000_ffff, // 0x18: ring-3 data, DPL 3
    0x00af_fa00_0000_ffff, // 0x20: ring-3 code, 64-bit, DPL 3
];
const _: () = assert!(GDT_ENTRIES.len() == gdt::FIRST_FREE_ENTRY);

fn write_gdt(memory: &GuestMemoryMmap) -> Result<(), BootError> {
    for (i, entry) in GDT_ENTRIES.iter().enumerate() {
        memory
            .write_obj(*entry, GuestAddress(BOOT_GDT_GPA + 8 * i as u64))
            .map_err(BootError::Write)?;
    }
    Ok(())
}

const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_WRITE_THROUGH: u64 = 1 << 3;
const PTE_CACHE_DISABLE: u64 = 1 << 4;
const PTE_LARGE: u64 = 1 << 7;
/// Every level: present, writable, user-accessible (the bundled guest runs
/// its Rust code, driver included, in ring 3).
const TABLE_FLAGS: u64 = PTE_PRESENT | PTE_WRITABLE | PTE_USER;

/// Page-table pages below the kernel: the PDPT, the 4 KiB table of the first
/// 2 MiB, then one page directory per GiB.
const PDPT_GPA: u64 = BOOT_PAGE_TABLES_GPA;
const FIRST_PT_GPA: u64 = BOOT_PAGE_TABLES_GPA + PAGE_SIZE;
const FIRST_PD_GPA: u64 = BOOT_PAGE_TABLES_GPA + 2 * PAGE_SIZE;
const GIB: u64 = 1 << 30;

fn write_page_tables(memory: &GuestMemoryMmap, map_end: u64) -> Result<(), BootError> {
    let gibs = map_end.div_ceil(GIB);
    if FIRST_PD_GPA + gibs * PAGE_SIZE > KERNEL_MIN_GPA || gibs > 512 {
        return Err(BootError::AddressSpaceTooLarge(map_end));
    }
    let write = |value: u64, gpa: u64| {
        memory
            .write_obj(value, GuestAddress(gpa))
            .map_err(BootError::Write)
    };
    write(PDPT_GPA | TABLE_FLAGS, BOOT_PML4_GPA)?;
    for gib in 0..gibs {
        let pd = FIRST_PD_GPA + gib * PAGE_SIZE;
        write(pd | TABLE_FLAGS, PDPT_GPA + 8 * gib)?;
        for i in 0..512 {
            let addr = gib * GIB + i * LARGE_PAGE_SIZE;
            if addr >= map_end {
                break;
            }
            let entry = if addr == 0 {
                FIRST_PT_GPA | TABLE_FLAGS
            } else {
                addr | TABLE_FLAGS | PTE_LARGE | caching_flags(addr)
            };
            write(entry, pd + 8 * i)?;
        }
    }
    // The first 2 MiB in 4 KiB pages, page 0 left out so that a null pointer
    // dereference faults instead of reading the real-mode IVT area.
    for i in 1..512 {
        write((i * PAGE_SIZE) | TABLE_FLAGS, FIRST_PT_GPA + 8 * i)?;
    }
    Ok(())
}

/// Device registers must not be cached: the MMIO hole is mapped uncached.
fn caching_flags(addr: u64) -> u64 {
    if (MMIO_HOLE_START..HIGH_RAM_START).contains(&addr) {
        PTE_CACHE_DISABLE | PTE_WRITE_THROUGH
    } else {
        0
    }
}

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_SCE: u64 = 1 << 0;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Long mode, paging on the boot identity map, the boot GDT, ring 0.
pub fn initial_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    sregs.cs = segment(gdt::KERNEL_CODE, 0xb, true);
    let data = segment(gdt::KERNEL_DATA, 0x3, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    // A present, busy 64-bit TSS is required for VM entry on VMX hosts; the
    // kernel loads its own before anything could use it.
    sregs.tr = kvm_segment {
        base: 0,
        limit: 0x67,
        selector: 0,
        type_: 0xb,
        present: 1,
        s: 0,
        ..Default::default()
    };
    sregs.gdt.base = BOOT_GDT_GPA;
    sregs.gdt.limit = (gdt::ENTRIES * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr3 = BOOT_PML4_GPA;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE;
    sregs
}

/// Entry point, vCPU index in `rdi`, the boot information block in `rsi`.
pub fn initial_regs(entry: GuestAddress, vcpu_index: u32) -> kvm_regs {
    kvm_regs {
        rip: entry.0,
        rdi: u64::from(vcpu_index),
        rsi: BOOT_INFO_GPA,
        rflags: 0x2,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRam;

    #[test]
    fn boot_structures_round_trip() {
        let ram = GuestRam::new(8).unwrap();
        let dev = DeviceEntry {
            kind: 1,
            device_id: 7,
            base: 0xd000_0000,
            size: 0x1000,
        };
        write_boot_structures(&ram.memory, &ram.layout, 2, "scenario=boot", &[dev]).unwrap();
        let info: BootInfoBytes = ram.memory.read_obj(GuestAddress(BOOT_INFO_GPA)).unwrap();
        let info = info.0;
        assert_eq!(info.magic, BOOT_INFO_MAGIC);
        assert_eq!(info.vcpu_count, 2);
        assert_eq!(info.cmdline(), Some("scenario=boot"));
        assert_eq!(info.device_entries(), &[dev]);
        assert_eq!(info.ram_regions(), &ram.layout[..]);
        assert_eq!(info.identity_map_end, HIGH_RAM_START);
        // Page 0 unmapped, page 1 identity-mapped, 2 MiB maps to itself.
        let pt0: u64 = ram.memory.read_obj(GuestAddress(FIRST_PT_GPA)).unwrap();
        let pt1: u64 = ram.memory.read_obj(GuestAddress(FIRST_PT_GPA + 8)).unwrap();
        let pd1: u64 = ram.memory.read_obj(GuestAddress(FIRST_PD_GPA + 8)).unwrap();
        assert_eq!(pt0, 0);
        assert_eq!(pt1, PAGE_SIZE | TABLE_FLAGS);
        assert_eq!(pd1, LARGE_PAGE_SIZE | TABLE_FLAGS | PTE_LARGE);
    }

    #[test]
    fn rejects_a_long_command_line() {
        let ram = GuestRam::new(8).unwrap();
        let long = "x".repeat(CMDLINE_CAPACITY + 1);
        assert!(matches!(
            write_boot_structures(&ram.memory, &ram.layout, 1, &long, &[]),
            Err(BootError::CmdlineTooLong { .. })
        ));
    }

    #[test]
    fn map_covers_high_ram_and_the_hole() {
        let l = crate::memory::ram_layout(8 << 30);
        assert_eq!(
            identity_map_end(&l),
            HIGH_RAM_START + (8 << 30) - MMIO_HOLE_START
        );
    }
}
