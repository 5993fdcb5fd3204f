//! The few legacy ports a Linux guest touches besides the UART: the ACPI
//! PM1 blocks the FADT names, the FADT's reset register, the 8042's command
//! port (the keyboard-controller reboot of `acpi=off` guests) and ports that
//! stock kernels probe for hardware this VM does not have.

use std::sync::Arc;

use devices::bus::BusDevice;

use super::console::GuestLifecycle;

/// The ACPI PM1a event and control blocks (8 ports: status, enable,
/// control). No event is ever raised, so status reads 0; the enable and
/// control registers keep what the guest writes, because ACPICA reads its
/// enable bits back to check them (the global lock's, at least).
/// Power-off is seen on the console instead (this DSDT has no `\_S5`, so
/// Linux powers off by halting after saying so).
#[derive(Debug, Default)]
pub struct Pm1Blocks {
    registers: [u8; 8],
}

/// Offsets in [`Pm1Blocks`]: 0-1 status (write 1 to clear), 2-3 enable,
/// 4-5 control; 6-7 are not part of a block.
const PM1_STATUS_END: u64 = 2;
const PM1_END: u64 = 6;

impl BusDevice for Pm1Blocks {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let at = offset + i as u64;
            *byte = match at {
                PM1_STATUS_END..PM1_END => self.registers[at as usize],
                _ => 0,
            };
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, byte) in data.iter().enumerate() {
            let at = offset + i as u64;
            if (PM1_STATUS_END..PM1_END).contains(&at) {
                self.registers[at as usize] = *byte;
            }
        }
    }
}

/// The FADT's reset register, and the 8042 command port's "pulse reset
/// line" command: either ends the VM (a reboot, or `panic=N`).
pub struct ResetPort {
    lifecycle: Arc<GuestLifecycle>,
    value: u8,
}

impl ResetPort {
    /// A port that ends the VM when `value` is written.
    pub fn new(lifecycle: Arc<GuestLifecycle>, value: u8) -> Self {
        Self { lifecycle, value }
    }
}

/// The 8042's "pulse the reset line" command.
pub const I8042_RESET_COMMAND: u8 = 0xfe;

impl BusDevice for ResetPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // No controller behind it: all ones, as an absent device reads.
        data.fill(0xff);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.first() == Some(&self.value) {
            self.lifecycle.on_reset();
        }
    }
}

/// Ports where stock kernels look for hardware a PC has and this VM has
/// not (the POST/delay port, CMOS/RTC, the other COM ports, the 8042 data
/// port): they read as all ones, like an empty ISA
/// address, without the VMM logging every probe as an unclaimed access.
pub struct AbsentHardware;

impl BusDevice for AbsentHardware {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

/// (base, length) of the [`AbsentHardware`] ranges.
pub const ABSENT_PORT_RANGES: &[(u16, u16)] = &[
    (0x60, 1),  // 8042 data
    (0x70, 2),  // CMOS/RTC index and data
    (0x80, 1),  // POST code / io_delay
    (0x2e8, 8), // COM4
    (0x2f8, 8), // COM2
    (0x3e8, 8), // COM3
    (0xcf8, 1), // PCI configuration address (0xcf9 is the reset register)
    (0xcfc, 4), // PCI configuration data
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vcpu::{OutcomeSink, VmOutcome};

    #[test]
    fn pm1_enable_bits_read_back_and_status_stays_clear() {
        let mut pm1 = Pm1Blocks::default();
        pm1.write(2, &[0x20, 0x01]);
        pm1.write(0, &[0xff, 0xff]);
        let mut b = [0u8; 4];
        pm1.read(0, &mut b);
        assert_eq!(b, [0, 0, 0x20, 0x01]);
    }

    #[test]
    fn only_the_reset_value_resets() {
        let outcome = OutcomeSink::new().unwrap();
        let life = Arc::new(GuestLifecycle::new(outcome.clone(), None));
        let mut port = ResetPort::new(life, I8042_RESET_COMMAND);
        port.write(0, &[0xaa]);
        assert_eq!(outcome.outcome(), None);
        let mut status = [0u8];
        port.read(0, &mut status);
        assert_eq!(status[0], 0xff);
        port.write(0, &[I8042_RESET_COMMAND]);
        assert!(matches!(
            outcome.outcome(),
            Some(VmOutcome::Crash { reason, .. }) if reason.contains("rebooted")
        ));
    }
}
