//! Virtio plumbing shared by virtio devices: the device trait the transport
//! drives, and the interrupt trait through which a device tells the driver
//! that a queue has new used entries.
//!
//! The split follows Firecracker's: a [`VirtioDevice`] knows its features,
//! configuration space and queue processing; only the transport
//! ([`mmio::MmioTransport`]) knows about registers, the bus and the device
//! status state machine. The device gets guest memory, its queues and an
//! interrupt at activation, never earlier.

use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

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

/// Why a device refused to start at DRIVER_OK.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The transport handed over a different number of queues than the
    /// device offers.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// Queues the device offers.
        expected: usize,
        /// Queues the transport passed.
        got: usize,
    },
    /// The device is already running; it must be reset first.
    #[error("device already activated")]
    AlreadyActive,
    /// A device-specific reason.
    #[error("device-specific activation failure: {0}")]
    Device(String),
}

/// A virtio device as the transport sees it. The transport calls these
/// methods from the vCPU thread that performs the register access, so none of
/// them may block for long: in particular none may wait for the device's
/// queue worker.
pub trait VirtioDevice: Send {
    /// The virtio device ID (DeviceID register).
    fn device_type(&self) -> u32;

    /// The largest size of each queue; the slice's length is the number of
    /// queues. Each size is a power of two, at most 32768.
    fn queue_max_sizes(&self) -> &[u16];

    /// One eventfd per queue, in queue order. The transport writes it on a
    /// QueueNotify that reaches it; the VMM registers the same eventfd as an
    /// ioeventfd so that notifies normally never leave the kernel.
    fn queue_events(&self) -> &[EventFd];

    /// Feature bits offered to the driver (including VIRTIO_F_VERSION_1).
    fn avail_features(&self) -> u64;

    /// Reads `data.len()` bytes of the configuration space at `offset`
    /// (relative to the start of the configuration space). Returns `false`,
    /// leaving `data` untouched, if the range is outside the space.
    fn read_config(&self, offset: u64, data: &mut [u8]) -> bool;

    /// The ConfigGeneration register: changes whenever the configuration
    /// space does, so a driver can re-read it and detect a torn read.
    fn config_generation(&self) -> u32 {
        0
    }

    /// Starts the device at DRIVER_OK. `queues` holds every queue in order
    /// (those the driver did not enable are not ready and must be left alone);
    /// each enabled queue has been validated against `memory`.
    /// `acked_features` is what the driver accepted at FEATURES_OK.
    fn activate(
        &mut self,
        memory: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        acked_features: u64,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError>;

    /// True when the running device hit an error it cannot recover from
    /// without a reset (for instance a queue whose available index ran
    /// away): the transport then shows DEVICE_NEEDS_RESET in Status and the
    /// device serves nothing until the driver resets it. The device sends
    /// the configuration change notification itself.
    fn needs_reset(&self) -> bool {
        false
    }

    /// Returns the device to its initial state: queues forgotten, no further
    /// guest-memory writes for work accepted before the reset.
    fn reset(&mut self);
}
