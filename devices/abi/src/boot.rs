//! The boot protocol: guest-physical memory layout, the boot information block,
//! the device table and the ports the VMM provides. `resources/boot-protocol.md`
//! is the prose version of this file.
//!
//! Register conventions at the kernel entry point: every vCPU starts there,
//! in 64-bit mode, CPL 0, interrupts disabled, RFLAGS = 0x2, RSP = 0, with
//! `rdi` = vCPU index (0..vcpu_count) and `rsi` = [`BOOT_INFO_GPA`]. The
//! identity map of [`BOOT_PML4_GPA`] is loaded in CR3; the GDT of [`gdt`] is
//! loaded; CR4 has PAE, OSFXSR and OSXMMEXCPT set, so SSE may be used; EFER
//! has LME, LMA, NXE and SCE set.

/// Size of a small page.
pub const PAGE_SIZE: u64 = 0x1000;
/// Size of the large pages of the VMM's identity map.
pub const LARGE_PAGE_SIZE: u64 = 0x20_0000;

/// Guest-physical address of the [`BootInfo`] block (one page).
pub const BOOT_INFO_GPA: u64 = 0x1000;
/// Guest-physical address of the GDT the VMM installs before the first
/// instruction (see [`gdt`]). One page.
pub const BOOT_GDT_GPA: u64 = 0x2000;
/// Guest-physical address of the top-level page table (PML4) loaded in CR3.
pub const BOOT_PML4_GPA: u64 = 0x3000;
/// The VMM places the rest of its page tables from here up to
/// [`KERNEL_MIN_GPA`].
pub const BOOT_PAGE_TABLES_GPA: u64 = 0x4000;
/// No loadable segment of the kernel may start below this address: everything
/// below belongs to the VMM's boot structures.
pub const KERNEL_MIN_GPA: u64 = 0x10_0000;

/// Start of the hole in guest-physical space where devices live. RAM that does
/// not fit below it continues at [`HIGH_RAM_START`].
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
/// First guest-physical address above the MMIO hole.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;
/// Where the VMM places its first MMIO device; devices follow at
/// [`MMIO_DEVICE_STRIDE`] intervals.
pub const MMIO_DEVICES_START: u64 = 0xD000_0000;
/// Distance between two MMIO devices' windows.
pub const MMIO_DEVICE_STRIDE: u64 = 0x1000;

/// Port of the 16550 UART (COM1).
pub const SERIAL_PORT: u16 = 0x3f8;
/// Port of the exit device: a 32-bit `out` of a status ends the VM. Status 0
/// means the guest reports success; the VMM's exit code is 0 then and 1 for
/// any other status.
pub const EXIT_PORT: u16 = 0x500;

/// Selectors of the GDT the VMM installs at [`BOOT_GDT_GPA`]. A kernel may keep
/// using it or load its own; entries 1 to 4 are the flat 64-bit segments a
/// kernel needs to drop to ring 3 with `iretq`. Entries from
/// [`gdt::FIRST_FREE_ENTRY`] on are zero: the kernel may put TSS descriptors
/// there (one per vCPU, 16 bytes each).
pub mod gdt {
    /// Ring-0 64-bit code segment.
    pub const KERNEL_CODE: u16 = 0x08;
    /// Ring-0 data segment.
    pub const KERNEL_DATA: u16 = 0x10;
    /// Ring-3 data segment (RPL 3).
    pub const USER_DATA: u16 = 0x18 | 3;
    /// Ring-3 64-bit code segment (RPL 3).
    pub const USER_CODE: u16 = 0x20 | 3;
    /// Index of the first free 8-byte entry.
    pub const FIRST_FREE_ENTRY: usize = 5;
    /// Number of 8-byte entries in the page.
    pub const ENTRIES: usize = 512;
}

/// "PVFLBOOT", the first eight bytes of a valid [`BootInfo`].
pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"PVFLBOOT");
/// Version of the [`BootInfo`] layout.
pub const BOOT_INFO_VERSION: u32 = 1;
/// Capacity of [`BootInfo::cmdline`] in bytes.
pub const CMDLINE_CAPACITY: usize = 1024;
/// Capacity of [`BootInfo::devices`].
pub const MAX_DEVICES: usize = 16;
/// Capacity of [`BootInfo::ram`].
pub const MAX_RAM_REGIONS: usize = 4;
/// The most vCPUs the VMM starts.
pub const MAX_VCPUS: u32 = 32;

/// A range of guest-physical RAM.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RamRegion {
    /// First guest-physical address.
    pub base: u64,
    /// Length in bytes.
    pub size: u64,
}

/// What a [`DeviceEntry`] describes.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// A virtio-mmio (version 2) device window.
    VirtioMmio = 1,
    /// A 16550 UART at an I/O port.
    SerialPort = 2,
    /// The exit device at an I/O port.
    ExitPort = 3,
}

impl DeviceKind {
    /// The kind a raw [`DeviceEntry::kind`] value stands for, if any.
    pub fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            1 => Some(Self::VirtioMmio),
            2 => Some(Self::SerialPort),
            3 => Some(Self::ExitPort),
            _ => None,
        }
    }
}

/// One device the VMM provides.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceEntry {
    /// A [`DeviceKind`] value.
    pub kind: u32,
    /// For virtio-mmio: the virtio device ID, so the guest can find a device
    /// without touching it. 0 otherwise.
    pub device_id: u32,
    /// Guest-physical MMIO base, or the I/O port number.
    pub base: u64,
    /// Size of the MMIO window or port range in bytes.
    pub size: u64,
}

/// The boot information block, at [`BOOT_INFO_GPA`].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    /// [`BOOT_INFO_MAGIC`].
    pub magic: u64,
    /// [`BOOT_INFO_VERSION`].
    pub version: u32,
    /// Number of vCPUs started; each starts at the entry with its own index.
    pub vcpu_count: u32,
    /// Total bytes of guest RAM (the sum of the [`BootInfo::ram`] regions).
    pub memory_size: u64,
    /// One past the highest guest-physical address the VMM's page tables
    /// identity-map (RAM and the MMIO hole, user-accessible and writable).
    pub identity_map_end: u64,
    /// Number of valid entries in [`BootInfo::ram`].
    pub ram_count: u32,
    /// Number of valid entries in [`BootInfo::devices`].
    pub device_count: u32,
    /// Guest RAM, in ascending order.
    pub ram: [RamRegion; MAX_RAM_REGIONS],
    /// The devices, in ascending order of base within each kind.
    pub devices: [DeviceEntry; MAX_DEVICES],
    /// Number of valid bytes in [`BootInfo::cmdline`].
    pub cmdline_len: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// The kernel command line (UTF-8, not NUL-terminated).
    pub cmdline: [u8; CMDLINE_CAPACITY],
}

impl BootInfo {
    /// The command line, or `None` if it is not UTF-8 or its length is out of
    /// range.
    pub fn cmdline(&self) -> Option<&str> {
        let bytes = self.cmdline.get(..self.cmdline_len as usize)?;
        core::str::from_utf8(bytes).ok()
    }

    /// The valid RAM regions.
    pub fn ram_regions(&self) -> &[RamRegion] {
        &self.ram[..(self.ram_count as usize).min(MAX_RAM_REGIONS)]
    }

    /// The valid device entries.
    pub fn device_entries(&self) -> &[DeviceEntry] {
        &self.devices[..(self.device_count as usize).min(MAX_DEVICES)]
    }
}

// The block must fit in its page.
const _: () = assert!(core::mem::size_of::<BootInfo>() as u64 <= PAGE_SIZE);
