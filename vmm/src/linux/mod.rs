//! Booting a stock Linux kernel (a bzImage as distributions ship it, or an
//! ELF `vmlinux`) through the 64-bit boot protocol: `boot_params` with its
//! setup header, e820 map, command line and initrd (linux-loader's
//! `boot_params` and configurator), ACPI tables for SMP and device discovery
//! ([`acpi`]), and the console watch that ends the VM when the kernel
//! panics or powers off ([`console`]).
//!
//! The kernel kind is told from the file ([`kernel_format`]): "HdrS" at
//! 0x202 is a bzImage; an ELF with a "Linux" or "Xen" note is a `vmlinux`;
//! any other ELF is a kernel of this project's own boot protocol
//! (`resources/boot-protocol.md`), which stays as it is.
//!
//! Guest-physical layout of a Linux guest (below 1 MiB the VMM's GDT and
//! page tables are those of the bundled protocol):
//!
//! | range | what |
//! | --- | --- |
//! | `0x1000` | `boot_params` (the zero page) |
//! | `0x2000`-`0xfffff` | boot GDT and identity page tables, as for the bundled guest |
//! | `0x20000` | the command line |
//! | `0x9fc00`-`0xfffff` | reserved in e820; the ACPI tables at `0xe0000` |
//! | `0x1000000` | the kernel (its ELF physical addresses) |
//! | top of low RAM - 2 MiB | reserved for the syscall remedy's stub, on hosts that need it |
//! | below that | the initrd |

pub mod acpi;
pub mod bzimage;
pub mod console;
pub mod platform;

use cache_flush_abi::boot::{RamRegion, BOOT_INFO_GPA};
use kvm_bindings::kvm_regs;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use crate::loader::LoadedKernel;

/// Errors of preparing a Linux boot.
#[derive(Debug, thiserror::Error)]
pub enum LinuxError {
    /// The bzImage could not be read or unpacked.
    #[error(transparent)]
    BzImage(#[from] bzimage::BzImageError),
    /// The command line is too long for the kernel.
    #[error("the kernel command line is {len} bytes; this kernel takes at most {max}")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The kernel's limit.
        max: usize,
    },
    /// The initrd does not fit between the kernel and the top of low RAM.
    #[error("the initrd ({len} bytes) does not fit in guest RAM between the kernel (ends at {kernel_end:#x}) and {top:#x}: give the guest more --memory")]
    InitrdTooLarge {
        /// Its size.
        len: u64,
        /// End of the kernel image.
        kernel_end: u64,
        /// Highest address it may reach.
        top: u64,
    },
    /// An initrd was given for a kernel that is not Linux.
    #[error("--initrd needs a Linux kernel (a bzImage or an ELF vmlinux); this kernel uses the bundled guest's boot protocol")]
    InitrdWithoutLinux,
    /// More e820 entries than `boot_params` holds.
    #[error("the memory map needs {0} e820 entries; boot_params holds 128")]
    TooManyE820Entries(usize),
    /// Writing a boot structure into guest memory failed.
    #[error("cannot write {what} into guest memory")]
    Write {
        /// Which structure.
        what: &'static str,
        /// Cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// linux-loader refused the zero page.
    #[error("cannot write boot_params: {0}")]
    BootParams(String),
}

/// What kind of kernel a file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// An ELF of this project's boot protocol (the bundled guest's).
    Protocol,
    /// A Linux ELF `vmlinux`.
    LinuxElf,
    /// A Linux bzImage.
    LinuxBzImage,
}

impl KernelFormat {
    /// Whether this is a Linux kernel.
    pub fn is_linux(self) -> bool {
        self != KernelFormat::Protocol
    }
}

/// Tells the kernel kind from the file's contents.
pub fn kernel_format(image: &[u8]) -> KernelFormat {
    if bzimage::is_bzimage(image) {
        KernelFormat::LinuxBzImage
    } else if elf_has_linux_note(image) {
        KernelFormat::LinuxElf
    } else {
        KernelFormat::Protocol
    }
}

/// True for an ELF64 whose PT_NOTE segments hold a note owned by "Linux" or
/// "Xen" (every x86-64 vmlinux has them; the bundled guest has none).
fn elf_has_linux_note(image: &[u8]) -> bool {
    let u16_at = |o: usize| {
        image
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |o: usize| {
        image
            .get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    };
    let u64_at = |o: usize| {
        image
            .get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    };
    if !image.starts_with(b"\x7fELF") || image.get(4) != Some(&2) {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(32), u16_at(54), u16_at(56)) else {
        return false;
    };
    for i in 0..usize::from(phnum) {
        let ph = phoff as usize + i * usize::from(phentsize);
        if u32_at(ph) != Some(4) {
            continue; // not PT_NOTE
        }
        let (Some(off), Some(size)) = (u64_at(ph + 8), u64_at(ph + 32)) else {
            continue;
        };
        let mut pos = off as usize;
        let end = (off.saturating_add(size) as usize).min(image.len());
        while pos + 12 <= end {
            let (Some(namesz), Some(descsz)) = (u32_at(pos), u32_at(pos + 4)) else {
                break;
            };
            let name = image
                .get(pos + 12..pos + 12 + namesz as usize)
                .unwrap_or_default();
            let name = name.strip_suffix(b"\0").unwrap_or(name);
            if name == b"Linux" || name == b"Xen" {
                return true;
            }
            pos +=
                12 + (namesz as usize).next_multiple_of(4) + (descsz as usize).next_multiple_of(4);
        }
    }
    false
}

/// A Linux kernel ready to load.
#[derive(Debug)]
pub struct LinuxKernel {
    /// The ELF `vmlinux`.
    pub vmlinux: Vec<u8>,
    /// The bzImage's setup header (`boot_params` bytes from 0x1f1), if the
    /// file was a bzImage.
    pub setup_header: Option<Vec<u8>>,
}

/// Unpacks a bzImage (or takes an ELF vmlinux as it is).
pub fn unpack(image: &[u8], format: KernelFormat) -> Result<LinuxKernel, LinuxError> {
    match format {
        KernelFormat::LinuxBzImage => {
            let bz = bzimage::parse(image)?;
            Ok(LinuxKernel {
                vmlinux: bzimage::unpack_payload(bz.payload)?,
                setup_header: Some(bz.setup_header.to_vec()),
            })
        }
        _ => Ok(LinuxKernel {
            vmlinux: image.to_vec(),
            setup_header: None,
        }),
    }
}

/// Interrupt line of the UART (ISA IRQ 4, as on a PC).
pub const SERIAL_GSI: u32 = 4;
/// Interrupt line of the first virtio-mmio device.
pub const FIRST_VIRTIO_GSI: u32 = 5;
/// Where the zero page goes.
pub const ZERO_PAGE_GPA: u64 = BOOT_INFO_GPA;
/// Where the command line goes.
pub const CMDLINE_GPA: u64 = 0x2_0000;
/// Where the ACPI tables go (the BIOS area Linux also scans for the RSDP).
pub const ACPI_GPA: u64 = 0xe_0000;
/// Start of the reserved area below 1 MiB (EBDA, BIOS).
const LOW_RESERVED_START: u64 = 0x9_fc00;
const ONE_MIB: u64 = 0x10_0000;
/// Command-line limit of a vmlinux without a setup header (the x86 default
/// COMMAND_LINE_SIZE).
const DEFAULT_CMDLINE_MAX: usize = 2048;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const LOADED_HIGH: u8 = 0x01;

/// Parameters the VMM itself needs on every Linux guest: the console on the
/// 16550 (from the first line on, through the early console), and no PCI
/// probing (this VM has no PCI bus).
pub const BASE_PARAMETERS: &[&str] = &[
    "console=ttyS0",
    "earlyprintk=serial,ttyS0,115200",
    "pci=off",
];

/// The kernel command line: the VMM's parameters, the host quirks' ones,
/// then the user's (the kernel takes the last of repeated parameters, so the
/// user's win; everything after a `--` goes to init, so the user's part
/// comes last).
pub fn compose_cmdline(user: &str, quirk_parameters: &[String]) -> String {
    let mut parts: Vec<&str> = BASE_PARAMETERS.to_vec();
    parts.extend(quirk_parameters.iter().map(String::as_str));
    let user = user.trim();
    if !user.is_empty() {
        parts.push(user);
    }
    parts.join(" ")
}

/// A 2 MiB-aligned page at the top of low RAM (below 3 GiB) for the syscall
/// remedy's stub.
pub fn remedy_page(ram: &[RamRegion]) -> u64 {
    let low_end = ram.first().map(|r| r.base + r.size).unwrap_or(0);
    (low_end & !((2 << 20) - 1)) - (2 << 20)
}

/// The e820 map: RAM below the BIOS area, then RAM from 1 MiB with the
/// `reserved` range (if any) cut out, then any RAM above 4 GiB.
pub fn e820_map(ram: &[RamRegion], reserved: Option<(u64, u64)>) -> Vec<boot_e820_entry> {
    let entry = |addr, size, r#type| boot_e820_entry { addr, size, r#type };
    let mut map = vec![entry(0, LOW_RESERVED_START, E820_RAM)];
    map.push(entry(
        LOW_RESERVED_START,
        ONE_MIB - LOW_RESERVED_START,
        E820_RESERVED,
    ));
    for r in ram {
        let (start, end) = (r.base.max(ONE_MIB), r.base + r.size);
        if start >= end {
            continue;
        }
        match reserved {
            Some((rs, rl)) if rs >= start && rs + rl <= end => {
                if rs > start {
                    map.push(entry(start, rs - start, E820_RAM));
                }
                map.push(entry(rs, rl, E820_RESERVED));
                if rs + rl < end {
                    map.push(entry(rs + rl, end - rs - rl, E820_RAM));
                }
            }
            _ => map.push(entry(start, end - start, E820_RAM)),
        }
    }
    map
}

/// What [`write_boot`] needs.
pub struct LinuxBootSetup<'a> {
    /// The kernel.
    pub kernel: &'a LinuxKernel,
    /// Where its segments were loaded.
    pub loaded: LoadedKernel,
    /// The initrd, if any.
    pub initrd: Option<&'a [u8]>,
    /// The whole command line.
    pub cmdline: &'a str,
    /// Guest RAM.
    pub ram: &'a [RamRegion],
    /// A RAM range to reserve in e820 (the syscall remedy's page).
    pub reserved: Option<(u64, u64)>,
    /// ACPI tables, if the guest gets them.
    pub acpi: Option<&'a acpi::AcpiTables>,
}

/// Writes the zero page, the command line, the initrd and the ACPI tables.
pub fn write_boot(memory: &GuestMemoryMmap, setup: &LinuxBootSetup<'_>) -> Result<(), LinuxError> {
    let write = |what, gpa: u64, bytes: &[u8]| {
        memory
            .write_slice(bytes, GuestAddress(gpa))
            .map_err(|source| LinuxError::Write { what, source })
    };
    let mut params = boot_params::default();
    match &setup.kernel.setup_header {
        Some(header) => {
            let start = bzimage::SETUP_HEADER_OFFSET;
            let n = header.len().min(std::mem::size_of::<boot_params>() - start);
            params.as_mut_slice()[start..start + n].copy_from_slice(&header[..n]);
        }
        None => {
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.version = 0x020f;
            params.hdr.kernel_alignment = 0x20_0000;
            params.hdr.cmdline_size = DEFAULT_CMDLINE_MAX as u32 - 1;
            params.hdr.initrd_addr_max = 0x7fff_ffff;
        }
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.loadflags |= LOADED_HIGH;

    let max = match params.hdr.cmdline_size {
        0 => DEFAULT_CMDLINE_MAX - 1,
        n => n as usize,
    };
    if setup.cmdline.len() > max {
        return Err(LinuxError::CmdlineTooLong {
            len: setup.cmdline.len(),
            max,
        });
    }
    let mut cmdline = setup.cmdline.as_bytes().to_vec();
    cmdline.push(0);
    write("the command line", CMDLINE_GPA, &cmdline)?;
    params.hdr.cmd_line_ptr = CMDLINE_GPA as u32;

    if let Some(initrd) = setup.initrd {
        let low_end = setup.ram.first().map(|r| r.base + r.size).unwrap_or(0);
        let mut top = low_end.min(u64::from(params.hdr.initrd_addr_max) + 1);
        if let Some((start, _)) = setup.reserved {
            top = top.min(start);
        }
        let kernel_end = setup.loaded.image_end.0;
        let len = initrd.len() as u64;
        let addr = top
            .checked_sub(len)
            .map(|a| a & !0xfff)
            .filter(|&a| a >= kernel_end)
            .ok_or(LinuxError::InitrdTooLarge {
                len,
                kernel_end,
                top,
            })?;
        write("the initrd", addr, initrd)?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = len as u32;
        params.ext_ramdisk_image = (addr >> 32) as u32;
        params.ext_ramdisk_size = (len >> 32) as u32;
    }

    let map = e820_map(setup.ram, setup.reserved);
    if map.len() > params.e820_table.len() {
        return Err(LinuxError::TooManyE820Entries(map.len()));
    }
    params.e820_table[..map.len()].copy_from_slice(&map);
    params.e820_entries = map.len() as u8;

    if let Some(tables) = setup.acpi {
        for (gpa, bytes) in &tables.tables {
            write("the ACPI tables", *gpa, bytes)?;
        }
        params.acpi_rsdp_addr = tables.rsdp;
    }

    let zero_page = BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_GPA));
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&zero_page, memory)
        .map_err(|e| LinuxError::BootParams(e.to_string()))
}

/// The boot processor's registers at `startup_64`: RSI = the zero page.
/// The kernel sets its own stack before it pushes anything.
pub fn initial_regs(entry: GuestAddress) -> kvm_regs {
    kvm_regs {
        rip: entry.0,
        rsi: ZERO_PAGE_GPA,
        rflags: 0x2,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRam;

    #[test]
    fn tells_kernel_kinds_apart() {
        let bz = bzimage::tests::fake_bzimage(b"\x7fELF");
        assert_eq!(kernel_format(&bz), KernelFormat::LinuxBzImage);
        assert_eq!(
            kernel_format(crate::BUNDLED_GUEST_KERNEL),
            KernelFormat::Protocol
        );
        assert_eq!(kernel_format(b"junk"), KernelFormat::Protocol);
        // An ELF with a "Linux" note in a PT_NOTE segment.
        let mut elf = crate::loader::tests::elf(0x20_0000, 0x20_0000, 0x1000, 5);
        let note_off = elf.len() as u64;
        let mut note = Vec::new();
        note.extend_from_slice(&6u32.to_le_bytes());
        note.extend_from_slice(&4u32.to_le_bytes());
        note.extend_from_slice(&0x100u32.to_le_bytes());
        note.extend_from_slice(b"Linux\0\0\0");
        note.extend_from_slice(&[0; 4]);
        elf.extend_from_slice(&note);
        // Turn the only program header into a second one: append a PT_NOTE.
        let mut ph = vec![0u8; 56];
        ph[0..4].copy_from_slice(&4u32.to_le_bytes());
        ph[8..16].copy_from_slice(&note_off.to_le_bytes());
        ph[32..40].copy_from_slice(&(note.len() as u64).to_le_bytes());
        let phoff = elf.len() as u64;
        let first_ph = elf[64..120].to_vec();
        elf.extend_from_slice(&first_ph);
        elf.extend_from_slice(&ph);
        elf[32..40].copy_from_slice(&phoff.to_le_bytes());
        elf[56..58].copy_from_slice(&2u16.to_le_bytes());
        assert_eq!(kernel_format(&elf), KernelFormat::LinuxElf);
    }

    #[test]
    fn cmdline_puts_the_users_parameters_last() {
        let quirks = vec!["mitigations=off".to_string()];
        let c = compose_cmdline("  quiet -- init-arg ", &quirks);
        assert!(c.starts_with("console=ttyS0 "));
        assert!(c.contains(" mitigations=off "));
        assert!(c.ends_with(" quiet -- init-arg"));
        assert_eq!(compose_cmdline("", &[]), BASE_PARAMETERS.join(" "));
    }

    #[test]
    fn e820_reserves_the_bios_area_and_the_remedy_page() {
        let ram = crate::memory::ram_layout(256 << 20);
        let page = remedy_page(&ram);
        assert_eq!(page, (256 << 20) - (2 << 20));
        let map = e820_map(&ram, Some((page, 2 << 20)));
        let spans: Vec<(u64, u64, u32)> = map.iter().map(|e| (e.addr, e.size, e.r#type)).collect();
        assert_eq!(
            spans,
            vec![
                (0, 0x9fc00, E820_RAM),
                (0x9fc00, 0x100000 - 0x9fc00, E820_RESERVED),
                (0x100000, page - 0x100000, E820_RAM),
                (page, 2 << 20, E820_RESERVED),
            ]
        );
    }

    #[test]
    fn zero_page_carries_cmdline_initrd_e820_and_rsdp() {
        let ram = GuestRam::new(64).unwrap();
        let kernel = LinuxKernel {
            vmlinux: Vec::new(),
            setup_header: Some(
                bzimage::parse(&bzimage::tests::fake_bzimage(b"x"))
                    .unwrap()
                    .setup_header
                    .to_vec(),
            ),
        };
        let initrd = vec![0x5au8; 10_000];
        let tables = acpi::build(
            ACPI_GPA,
            &acpi::AcpiPlatform {
                vcpus: 1,
                serial: (0x3f8, SERIAL_GSI),
                virtio_mmio: vec![],
            },
        );
        let reserved = Some((remedy_page(&ram.layout), 2 << 20));
        write_boot(
            &ram.memory,
            &LinuxBootSetup {
                kernel: &kernel,
                loaded: LoadedKernel {
                    entry: GuestAddress(0x100_0000),
                    image_end: GuestAddress(0x200_0000),
                },
                initrd: Some(&initrd),
                cmdline: "console=ttyS0",
                ram: &ram.layout,
                reserved,
                acpi: Some(&tables),
            },
        )
        .unwrap();
        let p: boot_params = ram.memory.read_obj(GuestAddress(ZERO_PAGE_GPA)).unwrap();
        let hdr = p.hdr;
        assert_eq!({ hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ hdr.type_of_loader }, KERNEL_LOADER_OTHER);
        assert_eq!({ hdr.cmd_line_ptr } as u64, CMDLINE_GPA);
        let mut line = [0u8; 14];
        ram.memory
            .read_slice(&mut line, GuestAddress(CMDLINE_GPA))
            .unwrap();
        assert_eq!(&line, b"console=ttyS0\0");
        let (image, size) = ({ hdr.ramdisk_image } as u64, { hdr.ramdisk_size } as u64);
        assert_eq!(size, 10_000);
        assert_eq!(image % 4096, 0);
        assert!(image + size <= reserved.unwrap().0, "below the remedy page");
        assert!(image >= 0x200_0000, "above the kernel");
        assert_eq!({ p.acpi_rsdp_addr }, ACPI_GPA);
        assert_eq!(p.e820_entries, 4);
        let mut sig = [0u8; 8];
        ram.memory
            .read_slice(&mut sig, GuestAddress(ACPI_GPA))
            .unwrap();
        assert_eq!(&sig, b"RSD PTR ");
    }

    #[test]
    fn rejects_what_does_not_fit() {
        let ram = GuestRam::new(64).unwrap();
        let kernel = LinuxKernel {
            vmlinux: Vec::new(),
            setup_header: None,
        };
        let setup = |initrd, cmdline| LinuxBootSetup {
            kernel: &kernel,
            loaded: LoadedKernel {
                entry: GuestAddress(0x100_0000),
                image_end: GuestAddress(0x300_0000),
            },
            initrd,
            cmdline,
            ram: &ram.layout,
            reserved: None,
            acpi: None,
        };
        let big = vec![0u8; 40 << 20];
        assert!(matches!(
            write_boot(&ram.memory, &setup(Some(&big), "x")),
            Err(LinuxError::InitrdTooLarge { .. })
        ));
        let long = "x".repeat(DEFAULT_CMDLINE_MAX);
        assert!(matches!(
            write_boot(&ram.memory, &setup(None, &long)),
            Err(LinuxError::CmdlineTooLong { .. })
        ));
    }
}
