//! ACPI tables for Linux guests, built with the rust-vmm `acpi_tables` crate.
//!
//! Why ACPI at all: Debian's kernels have no MP-table parser (SMP needs a
//! MADT) and no `virtio_mmio.device=` parameter
//! (`CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES` is off), so the cache-flush device is
//! described in the DSDT the way QEMU's microvm does it: a device with
//! `_HID "LNRO0005"` and its MMIO window and interrupt in `_CRS`, which
//! Linux's `virtio_mmio` driver binds. The UART is declared too (`PNP0501`).
//!
//! The FADT is a *legacy* one (PM1a event/control blocks, SCI on IRQ 9), not
//! HW-reduced: a HW-reduced platform has no legacy PIC, and Linux then gives
//! the ISA interrupts nothing to route through (seen: no console on ttyS0).
//! It has a reset register, so a guest reboot (or `panic=-1`) reaches the VMM
//! as one port write.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};

/// OEM ID in every table.
pub const OEM_ID: [u8; 6] = *b"PVFLSH";
/// OEM table ID in every table.
pub const OEM_TABLE_ID: [u8; 8] = *b"PVFLUSH ";
/// The local APIC's address (architectural default).
pub const LAPIC_ADDRESS: u32 = 0xfee0_0000;
/// The in-kernel IOAPIC's address (KVM's default).
pub const IOAPIC_ADDRESS: u32 = 0xfec0_0000;
/// ACPI PM1a event block (status + enable, 4 bytes).
pub const PM1A_EVT_PORT: u16 = 0x600;
/// ACPI PM1a control block (2 bytes).
pub const PM1A_CNT_PORT: u16 = 0x604;
/// The FADT's reset register (one byte) and the value Linux writes there.
pub const RESET_PORT: u16 = 0xcf9;
/// See [`RESET_PORT`].
pub const RESET_VALUE: u8 = 0x06;
/// The SCI's interrupt.
pub const SCI_IRQ: u16 = 9;

/// What the tables describe.
#[derive(Clone, Debug)]
pub struct AcpiPlatform {
    /// vCPUs (one local APIC each, APIC ID = index).
    pub vcpus: u32,
    /// The 16550: I/O port and interrupt.
    pub serial: (u16, u32),
    /// virtio-mmio devices: base, size, interrupt.
    pub virtio_mmio: Vec<(u64, u64, u32)>,
}

/// The tables, each with its guest-physical address.
#[derive(Debug)]
pub struct AcpiTables {
    /// Address of the RSDP (for `boot_params.acpi_rsdp_addr`).
    pub rsdp: u64,
    /// (address, bytes) of every table, RSDP included.
    pub tables: Vec<(u64, Vec<u8>)>,
}

fn bytes(table: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    table.to_aml_bytes(&mut v);
    v
}

/// Rounds `a` up to 64 bytes, so each table starts on its own line.
fn align(a: u64) -> u64 {
    a.next_multiple_of(64)
}

/// The DSDT: the UART and every virtio-mmio device.
pub fn dsdt(platform: &AcpiPlatform) -> Vec<u8> {
    let mut body = Vec::new();
    let (port, serial_irq) = platform.serial;
    let serial_ports = aml::IO::new(port, port, 1, 8);
    let serial_interrupt = aml::Interrupt::new(true, true, false, false, serial_irq);
    let serial_crs = aml::ResourceTemplate::new(vec![&serial_ports, &serial_interrupt]);
    aml::Device::new(
        "_SB_.COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &0u8),
            &aml::Name::new("_CRS".into(), &serial_crs),
        ],
    )
    .to_aml_bytes(&mut body);
    for (i, &(base, size, irq)) in platform.virtio_mmio.iter().enumerate() {
        // The window is in the 32-bit MMIO hole; Memory32Fixed says so.
        let window = aml::Memory32Fixed::new(true, base as u32, size as u32);
        let interrupt = aml::Interrupt::new(true, true, false, false, irq);
        let crs = aml::ResourceTemplate::new(vec![&window, &interrupt]);
        let uid = i as u8;
        aml::Device::new(
            format!("_SB_.VR{i:02X}").as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &"LNRO0005"),
                &aml::Name::new("_UID".into(), &uid),
                &aml::Name::new("_CRS".into(), &crs),
            ],
        )
        .to_aml_bytes(&mut body);
    }
    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, 1);
    sdt.append_slice(&body);
    sdt.as_slice().to_vec()
}

/// The MADT: one enabled local APIC per vCPU and the IOAPIC, with the
/// PC-AT-compatible flag (the in-kernel irqchip has the dual 8259 too).
pub fn madt(vcpus: u32) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        1,
        LocalInterruptController::Address(LAPIC_ADDRESS),
    );
    for i in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(
            i as u8,
            i as u8,
            EnabledStatus::Enabled,
        ));
    }
    // An IOAPIC ID after the local APICs', as real firmware numbers them.
    madt.add_structure(IoApic::new(vcpus as u8, IOAPIC_ADDRESS, 0));
    let mut table = bytes(&madt);
    // The crate has no setter for the MADT flags (offset 40): set
    // PCAT_COMPAT and fix the checksum.
    const PCAT_COMPAT: u32 = 1;
    table[40..44].copy_from_slice(&PCAT_COMPAT.to_le_bytes());
    fix_checksum(&mut table);
    table
}

/// A legacy FADT pointing at the DSDT.
pub fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, 1)
        .dsdt_64(dsdt_addr)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    f.sci_int = SCI_IRQ.into();
    f.pm1a_evt_blk = u32::from(PM1A_EVT_PORT).into();
    f.pm1_evt_len = 4;
    f.pm1a_cnt_blk = u32::from(PM1A_CNT_PORT).into();
    f.pm1_cnt_len = 2;
    // IAPC_BOOT_ARCH: no VGA; legacy devices and an 8042 are not claimed.
    f.iapc_boot_arch = (1u16 << 2).into();
    f.reset_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(RESET_PORT),
    );
    f.reset_value = RESET_VALUE;
    bytes(&f.finalize())
}

fn fix_checksum(table: &mut [u8]) {
    table[9] = 0;
    let sum = table.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    table[9] = sum.wrapping_neg();
}

/// Every table, laid out from `base` (RSDP first).
pub fn build(base: u64, platform: &AcpiPlatform) -> AcpiTables {
    let rsdp_addr = base;
    let xsdt_addr = align(rsdp_addr + Rsdp::len() as u64);
    // The XSDT lists two tables: 36-byte header + 2 * 8.
    let fadt_addr = align(xsdt_addr + 36 + 16);
    let fadt_len = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, 1).finalize();
    let madt_addr = align(fadt_addr + bytes(&fadt_len).len() as u64);
    let madt = madt(platform.vcpus);
    let dsdt_addr = align(madt_addr + madt.len() as u64);
    let dsdt = dsdt(platform);
    let fadt = fadt(dsdt_addr);

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, 1);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = bytes(&xsdt);
    debug_assert_eq!(xsdt.len(), 36 + 16);
    let rsdp = bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    AcpiTables {
        rsdp: rsdp_addr,
        tables: vec![
            (rsdp_addr, rsdp),
            (xsdt_addr, xsdt),
            (fadt_addr, fadt),
            (madt_addr, madt),
            (dsdt_addr, dsdt),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn platform() -> AcpiPlatform {
        AcpiPlatform {
            vcpus: 2,
            serial: (0x3f8, 4),
            virtio_mmio: vec![(0xd000_0000, 0x1000, 5)],
        }
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn find<'a>(t: &'a AcpiTables, sig: &[u8]) -> (u64, &'a [u8]) {
        t.tables
            .iter()
            .find(|(_, b)| b.starts_with(sig))
            .map(|(a, b)| (*a, b.as_slice()))
            .unwrap()
    }

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    #[test]
    fn every_table_sums_to_zero_and_has_its_length() {
        let t = build(0xe_0000, &platform());
        let (_, rsdp) = find(&t, b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP v1 checksum");
        assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
        for sig in [&b"XSDT"[..], b"FACP", b"APIC", b"DSDT"] {
            let (_, table) = find(&t, sig);
            assert_eq!(sum(table), 0, "{} checksum", String::from_utf8_lossy(sig));
            assert_eq!(u32_at(table, 4) as usize, table.len());
        }
        // No two tables overlap, and all stay below 1 MiB.
        let mut spans: Vec<(u64, u64)> = t
            .tables
            .iter()
            .map(|(a, b)| (*a, a + b.len() as u64))
            .collect();
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].1 <= w[1].0);
        }
        assert!(spans.last().unwrap().1 <= 0x10_0000);
    }

    #[test]
    fn pointers_chain_rsdp_to_dsdt() {
        let t = build(0xe_0000, &platform());
        let (_, rsdp) = find(&t, b"RSD PTR ");
        let (xsdt_addr, xsdt) = find(&t, b"XSDT");
        assert_eq!(u64_at(rsdp, 24), xsdt_addr);
        let (fadt_addr, fadt) = find(&t, b"FACP");
        let (madt_addr, madt) = find(&t, b"APIC");
        assert_eq!(u64_at(xsdt, 36), fadt_addr);
        assert_eq!(u64_at(xsdt, 44), madt_addr);
        let (dsdt_addr, _) = find(&t, b"DSDT");
        assert_eq!(u64_at(fadt, 140), dsdt_addr, "X_DSDT");
        // Legacy FADT: not HW-reduced, PM1 blocks and the SCI set, reset register.
        let flags = u32_at(fadt, 112);
        assert_eq!(flags & (1 << 20), 0);
        assert_ne!(flags & (1 << 10), 0);
        assert_eq!(u32_at(fadt, 56), u32::from(PM1A_EVT_PORT));
        assert_eq!(u32_at(fadt, 64), u32::from(PM1A_CNT_PORT));
        assert_eq!(fadt[116], 1, "reset register in system I/O space");
        assert_eq!(u64_at(fadt, 120), u64::from(RESET_PORT));
        assert_eq!(fadt[128], RESET_VALUE);
        // MADT: two local APICs (type 0) with IDs 0 and 1, one IOAPIC, PCAT_COMPAT.
        assert_eq!(u32_at(madt, 36), LAPIC_ADDRESS);
        assert_eq!(u32_at(madt, 40), 1);
        let mut entries = Vec::new();
        let mut o = 44;
        while o < madt.len() {
            entries.push((madt[o], madt[o + 3]));
            o += usize::from(madt[o + 1]);
        }
        assert_eq!(entries, vec![(0, 0), (0, 1), (1, 0)]);
        assert_eq!(u32_at(madt, 44 + 16 + 4), IOAPIC_ADDRESS);
    }

    #[test]
    fn dsdt_describes_the_virtio_device_and_the_uart() {
        let d = dsdt(&platform());
        let has = |needle: &[u8]| d.windows(needle.len()).any(|w| w == needle);
        // _HID "LNRO0005" as an AML string.
        assert!(has(b"_HID\x0dLNRO0005\x00"));
        // Memory32Fixed (0x86), length 9, read-write, base 0xd0000000, size 0x1000.
        let mut mem = vec![0x86, 9, 0, 1];
        mem.extend_from_slice(&0xd000_0000u32.to_le_bytes());
        mem.extend_from_slice(&0x1000u32.to_le_bytes());
        assert!(has(&mem));
        // Extended interrupt descriptors: consumer, edge, active high; 5 and 4.
        assert!(has(&[0x89, 6, 0, 0x03, 1, 5, 0, 0, 0]));
        assert!(has(&[0x89, 6, 0, 0x03, 1, 4, 0, 0, 0]));
        // The UART: EISA ID PNP0501 and its eight ports at 0x3f8.
        assert!(has(b"COM1"));
        assert!(has(&[0x47, 1, 0xf8, 0x03, 0xf8, 0x03, 1, 8]));
        // No device, no LNRO0005.
        let bare = dsdt(&AcpiPlatform {
            virtio_mmio: vec![],
            ..platform()
        });
        assert!(!bare.windows(8).any(|w| w == b"LNRO0005"));
        assert_eq!(sum(&bare), 0);
    }
}
