//! Virtio plumbing shared by virtio devices: the device trait the transport
//! drives, and the interrupt trait through which a device tells the driver
//! that a queue has new used entries.

pub mod mmio;

/// How a device notifies the driver. The VMM implements it (with an irqfd, or
/// not at all when the guest polls, as the bundled guest does).
pub trait VirtioInterrupt: Send + Sync {
    /// The device added used entries to queue `queue_index`.
    fn signal_used_queue(&self, queue_index: u16);
    /// The device configuration changed.
    fn signal_config_change(&self);
}

/// An interrupt that is never delivered, for drivers that poll.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoInterrupt;

impl VirtioInterrupt for NoInterrupt {
    fn signal_used_queue(&self, _queue_index: u16) {}
    fn signal_config_change(&self) {}
}
