//! An address-range bus: the VMM sends every MMIO or port I/O exit here and
//! the bus finds the device whose range holds the address.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device that answers register reads and writes at offsets in its range.
pub trait BusDevice: Send {
    /// Read `data.len()` bytes at `offset` from the start of the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Write `data` at `offset` from the start of the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors of [`Bus`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range is empty or wraps around the address space.
    #[error("invalid bus range: base {base:#x}, length {len:#x}")]
    InvalidRange {
        /// First address.
        base: u64,
        /// Length.
        len: u64,
    },
    /// The range overlaps a device already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps a registered device")]
    Overlap {
        /// First address.
        base: u64,
        /// Length.
        len: u64,
    },
}

/// A shared handle on a device of the bus.
pub type SharedBusDevice = Arc<Mutex<dyn BusDevice>>;

/// Devices by address range. Ranges never overlap.
#[derive(Default, Clone)]
pub struct Bus {
    // Keyed by base; value is (length, device).
    devices: BTreeMap<u64, (u64, SharedBusDevice)>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedBusDevice) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        let overlaps_previous = self
            .devices
            .range(..end)
            .next_back()
            .is_some_and(|(&b, &(l, _))| b + l > base);
        if overlaps_previous {
            return Err(BusError::Overlap { base, len });
        }
        self.devices.insert(base, (len, device));
        Ok(())
    }

    /// The device holding `addr`, with the offset of `addr` in its range.
    fn resolve(&self, addr: u64) -> Option<(u64, &SharedBusDevice)> {
        let (&base, (len, device)) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset < *len).then_some((offset, device))
    }

    /// Reads from the device at `addr`. Returns `false` (and leaves `data`
    /// untouched) when no device claims the address.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, device)) => {
                lock(device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Writes to the device at `addr`. Returns `false` when no device claims
    /// the address.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, device)) => {
                lock(device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering it if a previous holder panicked: a device's
/// registers stay meaningful and the VMM must keep running.
fn lock(device: &SharedBusDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0.wrapping_add(offset as u8));
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    fn echo(v: u8) -> SharedBusDevice {
        Arc::new(Mutex::new(Echo(v)))
    }

    #[test]
    fn dispatches_by_range_and_offset() {
        let mut bus = Bus::new();
        bus.insert(0x1000, 0x100, echo(1)).unwrap();
        bus.insert(0x2000, 0x100, echo(10)).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x1004, &mut b));
        assert_eq!(b[0], 5);
        assert!(bus.read(0x2000, &mut b));
        assert_eq!(b[0], 10);
        assert!(!bus.read(0x1100, &mut b));
        assert!(!bus.read(0xfff, &mut b));
        assert!(bus.write(0x10ff, &[7]));
        assert!(bus.read(0x1000, &mut b));
        assert_eq!(b[0], 7);
    }

    #[test]
    fn rejects_overlap_and_bad_ranges() {
        let mut bus = Bus::new();
        bus.insert(0x1000, 0x100, echo(0)).unwrap();
        assert_eq!(
            bus.insert(0x10ff, 1, echo(0)),
            Err(BusError::Overlap {
                base: 0x10ff,
                len: 1
            })
        );
        assert_eq!(
            bus.insert(0xf00, 0x101, echo(0)),
            Err(BusError::Overlap {
                base: 0xf00,
                len: 0x101
            })
        );
        assert!(bus.insert(0xf00, 0x100, echo(0)).is_ok());
        assert!(matches!(
            bus.insert(5, 0, echo(0)),
            Err(BusError::InvalidRange { .. })
        ));
        assert!(matches!(
            bus.insert(u64::MAX, 2, echo(0)),
            Err(BusError::InvalidRange { .. })
        ));
    }
}
