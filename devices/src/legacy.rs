//! Legacy port-I/O devices: the 16550 UART the guest prints through.

use std::io::Write;

use vm_superio::{Serial, Trigger};

use crate::bus::BusDevice;

/// An interrupt line that goes nowhere: the VMs this VMM runs have no
/// interrupt controller, and the bundled guest polls the UART's line status.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoTrigger;

impl Trigger for NoTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        Ok(())
    }
}

/// An interrupt line that is an eventfd: the VMM registers it as a KVM
/// irqfd, so raising it injects the UART's IRQ without leaving the kernel
/// (Linux's 8250 driver transmits from its THRE interrupt).
#[derive(Debug)]
pub struct EventFdTrigger(pub vmm_sys_util::eventfd::EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

/// A 16550 UART (vm-superio) whose output goes to `W` and whose interrupt
/// is `T` (none by default: the bundled guest polls).
pub struct SerialPort<W: Write + Send, T: Trigger = NoTrigger> {
    serial: Serial<T, vm_superio::serial::NoEvents, W>,
}

impl<W: Write + Send> SerialPort<W> {
    /// A UART writing to `out`, with no interrupt.
    pub fn new(out: W) -> Self {
        Self {
            serial: Serial::new(NoTrigger, out),
        }
    }
}

impl<W: Write + Send, T: Trigger> SerialPort<W, T> {
    /// A UART writing to `out` that raises `interrupt`.
    pub fn with_interrupt(out: W, interrupt: T) -> Self {
        Self {
            serial: Serial::new(interrupt, out),
        }
    }

    /// The output sink.
    pub fn writer(&self) -> &W {
        self.serial.writer()
    }
}

impl<W: Write + Send, T: Trigger + Send> BusDevice for SerialPort<W, T> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data.len()) {
            (Ok(offset), 1) => data[0] = self.serial.read(offset),
            _ => {
                log::debug!(
                    "serial: ignored {}-byte read at offset {offset}",
                    data.len()
                );
                data.fill(0xff);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(offset), [value]) = (u8::try_from(offset), data) else {
            log::debug!(
                "serial: ignored {}-byte write at offset {offset}",
                data.len()
            );
            return;
        };
        if let Err(e) = self.serial.write(offset, *value) {
            // Output that cannot be written (a closed stdout) must not stop
            // the guest.
            log::warn!("serial: output failed: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_written_to_thr_reach_the_sink() {
        let mut port = SerialPort::new(Vec::new());
        for b in b"hi\n" {
            port.write(0, &[*b]);
        }
        assert_eq!(port.writer().as_slice(), b"hi\n");
        // Line status: transmitter empty, so a polling guest never waits.
        let mut lsr = [0u8];
        port.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
    }
}
