//! A virtio-mmio transport, version 2 (virtio 1.x "modern" register layout,
//! virtio spec §4.2).
//!
//! [`MmioTransport`] owns everything the driver configures through registers
//! (status, feature negotiation, queue layout) and hands the result to a
//! [`VirtioDevice`] at DRIVER_OK. It is guest-facing: every register access
//! comes straight from a vCPU, so nothing here panics or trusts the value
//! written. An access the spec does not allow (wrong width, unknown offset,
//! write to a read-only register, a state-machine violation) is logged with
//! `log::warn!` and ignored; reads of unknown offsets return 0.
//!
//! Notifications: each queue has an eventfd (owned by the device). The VMM
//! registers it with KVM as an ioeventfd on `base + QUEUE_NOTIFY_OFFSET` with
//! the queue index as datamatch, so a QueueNotify normally never reaches this
//! code; if one does (no ioeventfd, or a width KVM did not match), the
//! transport writes the same eventfd, so both paths behave alike.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use log::{error, info};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{VirtioDevice, VirtioInterrupt};
use crate::bus::BusDevice;
use crate::log_throttle::{guest_warn, LogThrottle};

/// "virt" in little-endian: the MagicValue register.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// The transport version this implementation speaks (non-legacy).
pub const MMIO_VERSION: u32 = 2;
/// VendorID register. Nothing vendor-specific hangs off it; 0 is what most
/// rust-vmm based VMMs report.
pub const MMIO_VENDOR_ID: u32 = 0;
/// Size of the register window of one device. A whole page, so that each
/// device can be placed (and trapped) on its own page.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of the QueueNotify register: the address (relative to the device's
/// base) for the queue ioeventfds, with the queue index as datamatch and a
/// 4-byte length.
pub const QUEUE_NOTIFY_OFFSET: u64 = VIRTIO_MMIO_QUEUE_NOTIFY as u64;
/// Offset of the device configuration space.
pub const CONFIG_SPACE_OFFSET: u64 = VIRTIO_MMIO_CONFIG as u64;

/// The status bits the driver sets, in the only order the spec allows
/// (§3.1.1). FAILED may be set at any time and is handled apart.
const INIT_SEQUENCE: [u32; 4] = [
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_DRIVER_OK,
];
const INIT_BITS: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE
    | VIRTIO_CONFIG_S_DRIVER
    | VIRTIO_CONFIG_S_FEATURES_OK
    | VIRTIO_CONFIG_S_DRIVER_OK;

/// Errors of [`MmioTransport::new`]: the device is inconsistent. These are
/// VMM bugs, never guest input.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MmioError {
    /// The device has no queues.
    #[error("the device offers no queue")]
    NoQueues,
    /// More queues than a 16-bit queue index can name.
    #[error("the device offers {0} queues; at most 65536 can be addressed")]
    TooManyQueues(usize),
    /// The device offers a different number of queue eventfds than queues.
    #[error("device has {queues} queues but {events} queue eventfds")]
    QueueEventCount {
        /// Number of queues.
        queues: usize,
        /// Number of eventfds.
        events: usize,
    },
    /// A queue maximum size is 0, not a power of two, or above 32768.
    #[error("queue {queue} has an invalid maximum size {size}")]
    InvalidQueueMaxSize {
        /// Queue index.
        queue: usize,
        /// The size.
        size: u16,
    },
    /// The device does not offer VIRTIO_F_VERSION_1, which this (non-legacy)
    /// transport requires.
    #[error("the device does not offer VIRTIO_F_VERSION_1")]
    NoVersion1,
}

/// The per-queue registers, as the driver wrote them. They become a
/// [`Queue`] only at DRIVER_OK, so that alignment and size are checked once,
/// against the final values.
#[derive(Clone, Copy, Debug, Default)]
struct QueueRegs {
    max_size: u16,
    /// QueueNum as the driver wrote it (validated at DRIVER_OK).
    size: u32,
    ready: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

impl QueueRegs {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            // The spec leaves QueueNum's reset value open; starting at the
            // maximum lets a driver that never writes it still work.
            size: u32::from(max_size),
            ..Default::default()
        }
    }

    /// The validated queue, or why it cannot be used. Everything is
    /// checked here before virtio-queue sees it: its setters and `is_valid`
    /// log at ERROR level on bad values, and a guest must not be able to
    /// write ERROR lines into the host's log at will.
    fn build(&self, memory: &GuestMemoryMmap) -> Result<Queue, String> {
        let mut queue = Queue::new(self.max_size).map_err(|e| format!("max size: {e}"))?;
        if !self.ready {
            return Ok(queue);
        }
        if !queue_size_valid(self.size, self.max_size) {
            return Err(format!(
                "size {} is not a power of two in 1..={}",
                self.size, self.max_size
            ));
        }
        // Checked just above: size <= max_size, a u16.
        let size = self.size as u16;
        if self.avail == 0 {
            // virtio-queue takes a driver area at 0 for "never configured"
            // and would refuse to pop from it forever: fail loudly now.
            return Err("driver area at guest address 0 is not supported".into());
        }
        // Alignment (virtio 1.2 §2.7) and extent of the three areas.
        let entries = u64::from(size);
        let areas = [
            ("descriptor table", self.desc, 16, 16 * entries),
            ("driver area", self.avail, 2, 6 + 2 * entries),
            ("device area", self.used, 4, 6 + 8 * entries),
        ];
        for (name, addr, align, len) in areas {
            if addr % align != 0 {
                return Err(format!("{name} {addr:#x} is not {align}-byte aligned"));
            }
            // len <= 6 + 8 * 32768: fits usize.
            if !GuestMemoryBackend::check_range(memory, GuestAddress(addr), len as usize) {
                return Err(format!(
                    "{name} {addr:#x}+{len:#x} is not inside guest memory (queue size {size})"
                ));
            }
        }
        queue
            .try_set_size(size)
            .map_err(|e| format!("size {size}: {e}"))?;
        queue
            .try_set_desc_table_address(GuestAddress(self.desc))
            .map_err(|e| format!("descriptor table {:#x}: {e}", self.desc))?;
        queue
            .try_set_avail_ring_address(GuestAddress(self.avail))
            .map_err(|e| format!("driver area {:#x}: {e}", self.avail))?;
        queue
            .try_set_used_ring_address(GuestAddress(self.used))
            .map_err(|e| format!("device area {:#x}: {e}", self.used))?;
        queue.set_ready(true);
        Ok(queue)
    }
}

/// QueueNum must be a power of two, at most QueueNumMax (§4.2.2).
fn queue_size_valid(size: u32, max: u16) -> bool {
    size != 0 && size.is_power_of_two() && size <= u32::from(max)
}

/// Sets the InterruptStatus bits before passing the signal on to the VMM's
/// interrupt, so that a driver that takes the interrupt finds the reason.
struct MmioInterrupt {
    status: Arc<AtomicU32>,
    inner: Arc<dyn VirtioInterrupt>,
}

impl VirtioInterrupt for MmioInterrupt {
    fn signal_used_queue(&self, queue_index: u16) {
        self.status
            .fetch_or(VIRTIO_MMIO_INT_VRING, Ordering::SeqCst);
        self.inner.signal_used_queue(queue_index);
    }

    fn signal_config_change(&self) {
        self.status
            .fetch_or(VIRTIO_MMIO_INT_CONFIG, Ordering::SeqCst);
        self.inner.signal_config_change();
    }
}

/// A virtio-mmio (version 2) register window in front of a [`VirtioDevice`].
/// Put it on the MMIO bus at a base address, with length
/// [`MMIO_WINDOW_SIZE`].
pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    memory: GuestMemoryMmap,
    interrupt: Arc<MmioInterrupt>,
    interrupt_status: Arc<AtomicU32>,
    /// The driver-visible status bits (DEVICE_NEEDS_RESET kept apart).
    status: u32,
    needs_reset: bool,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    /// The driver wrote a non-zero word to a feature page above 1: it claims
    /// features nobody offered, so FEATURES_OK must be refused.
    driver_features_beyond_64: bool,
    queue_sel: u32,
    queues: Vec<QueueRegs>,
    /// Budget for the log lines the driver can trigger (every odd access
    /// is logged, but a guest must not be able to flood the host's log).
    log_throttle: LogThrottle,
    /// Whether a valid QueueNotify signals the queue's eventfd.
    notify_signals_eventfd: bool,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// A transport for `device`, whose queues live in `memory`. `interrupt`
    /// is how the driver is told about used buffers and configuration
    /// changes ([`super::NoInterrupt`] for a polling guest).
    pub fn new(
        device: D,
        memory: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<Self, MmioError> {
        let max_sizes = device.queue_max_sizes();
        if max_sizes.is_empty() {
            return Err(MmioError::NoQueues);
        }
        if max_sizes.len() > usize::from(u16::MAX) + 1 {
            return Err(MmioError::TooManyQueues(max_sizes.len()));
        }
        if device.queue_events().len() != max_sizes.len() {
            return Err(MmioError::QueueEventCount {
                queues: max_sizes.len(),
                events: device.queue_events().len(),
            });
        }
        for (queue, &size) in max_sizes.iter().enumerate() {
            if Queue::new(size).is_err() {
                return Err(MmioError::InvalidQueueMaxSize { queue, size });
            }
        }
        if device.avail_features() & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(MmioError::NoVersion1);
        }
        let queues = max_sizes.iter().map(|&max| QueueRegs::new(max)).collect();
        let interrupt_status = Arc::new(AtomicU32::new(0));
        Ok(Self {
            device,
            memory,
            interrupt: Arc::new(MmioInterrupt {
                status: interrupt_status.clone(),
                inner: interrupt,
            }),
            interrupt_status,
            status: 0,
            needs_reset: false,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            driver_features_beyond_64: false,
            queue_sel: 0,
            queues,
            log_throttle: LogThrottle::default(),
            notify_signals_eventfd: true,
        })
    }

    /// Whether a QueueNotify that reaches the transport (through the bus,
    /// not an ioeventfd) signals the queue's eventfd: yes by default, so
    /// whoever watches the eventfds serves it. A VMM that serves every
    /// notify on the writing vCPU's own thread right after the bus write
    /// (`QueueWorker::serve_notify`) turns it off: the transport still
    /// checks the notify (device running, queue exists), but does not wake
    /// the event loop for work that thread is about to do, which would
    /// race it for the batch and cost a host CPU on every request.
    pub fn set_notify_signals_eventfd(&mut self, signal: bool) {
        self.notify_signals_eventfd = signal;
    }

    /// The device behind the transport.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device behind the transport, mutably.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The Status register as the driver reads it.
    pub fn status(&self) -> u32 {
        self.status
            | if self.needs_reset || self.device.needs_reset() {
                VIRTIO_CONFIG_S_NEEDS_RESET
            } else {
                0
            }
    }

    /// The features the driver accepted (meaningful once FEATURES_OK is set).
    pub fn acked_features(&self) -> u64 {
        self.driver_features
    }

    /// The queue notification eventfds with their queue index: register each
    /// as an ioeventfd on `base + QUEUE_NOTIFY_OFFSET`, 4 bytes, datamatch =
    /// the index.
    pub fn queue_notify_eventfds(&self) -> Vec<(u16, &EventFd)> {
        self.device
            .queue_events()
            .iter()
            .enumerate()
            // `new` checked that every index fits a u16.
            .map(|(i, fd)| (i as u16, fd))
            .collect()
    }

    fn driver_ok(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
    }

    /// Back to the state after construction (virtio spec §2.1.2, §4.2.2.1:
    /// InterruptStatus and every QueueReady cleared).
    fn reset(&mut self) {
        self.device.reset();
        self.status = 0;
        self.needs_reset = false;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.driver_features_beyond_64 = false;
        self.queue_sel = 0;
        for regs in &mut self.queues {
            *regs = QueueRegs::new(regs.max_size);
        }
        self.interrupt_status.store(0, Ordering::SeqCst);
    }

    fn read_register(&self, offset: u32) -> u32 {
        let sel_queue = self.queues.get(self.queue_sel as usize);
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC_VALUE,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => MMIO_VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.avail_features() as u32,
                1 => (self.device.avail_features() >> 32) as u32,
                _ => 0,
            },
            // Spec: 0 when the selected queue does not exist.
            VIRTIO_MMIO_QUEUE_NUM_MAX => sel_queue.map_or(0, |q| u32::from(q.max_size)),
            VIRTIO_MMIO_QUEUE_READY => sel_queue.map_or(0, |q| u32::from(q.ready)),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status.load(Ordering::SeqCst),
            VIRTIO_MMIO_STATUS => self.status(),
            // The configuration space never changes after construction.
            VIRTIO_MMIO_CONFIG_GENERATION => self.device.config_generation(),
            // No shared memory regions: length and base read as -1.
            VIRTIO_MMIO_SHM_LEN_LOW
            | VIRTIO_MMIO_SHM_LEN_HIGH
            | VIRTIO_MMIO_SHM_BASE_LOW
            | VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            VIRTIO_MMIO_DEVICE_FEATURES_SEL
            | VIRTIO_MMIO_DRIVER_FEATURES
            | VIRTIO_MMIO_DRIVER_FEATURES_SEL
            | VIRTIO_MMIO_QUEUE_SEL
            | VIRTIO_MMIO_QUEUE_NUM
            | VIRTIO_MMIO_QUEUE_NOTIFY
            | VIRTIO_MMIO_INTERRUPT_ACK
            | VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH
            | VIRTIO_MMIO_SHM_SEL => {
                guest_warn!(
                    self.log_throttle,
                    "virtio-mmio: read of write-only register {offset:#x} ignored"
                );
                0
            }
            _ => {
                guest_warn!(
                    self.log_throttle,
                    "virtio-mmio: read of unknown register {offset:#x} ignored"
                );
                0
            }
        }
    }

    fn write_register(&mut self, offset: u32, value: u32) {
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES => self.write_driver_features(value),
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            // Range-checked where it is used, as the spec wants reads of a
            // missing queue to return 0 rather than the write to fail.
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = value,
            VIRTIO_MMIO_QUEUE_NUM => self.write_queue_num(value),
            VIRTIO_MMIO_QUEUE_READY => self.write_queue_ready(value),
            VIRTIO_MMIO_QUEUE_DESC_LOW => self.write_queue_addr("QueueDescLow", |q| {
                set_low(&mut q.desc, value);
            }),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => self.write_queue_addr("QueueDescHigh", |q| {
                set_high(&mut q.desc, value);
            }),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => self.write_queue_addr("QueueDriverLow", |q| {
                set_low(&mut q.avail, value);
            }),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => self.write_queue_addr("QueueDriverHigh", |q| {
                set_high(&mut q.avail, value);
            }),
            VIRTIO_MMIO_QUEUE_USED_LOW => self.write_queue_addr("QueueDeviceLow", |q| {
                set_low(&mut q.used, value);
            }),
            VIRTIO_MMIO_QUEUE_USED_HIGH => self.write_queue_addr("QueueDeviceHigh", |q| {
                set_high(&mut q.used, value);
            }),
            VIRTIO_MMIO_QUEUE_NOTIFY => self.queue_notify(value),
            VIRTIO_MMIO_INTERRUPT_ACK => {
                self.interrupt_status.fetch_and(!value, Ordering::SeqCst);
            }
            VIRTIO_MMIO_STATUS => self.write_status(value),
            // There are no shared memory regions; selecting one is harmless.
            VIRTIO_MMIO_SHM_SEL => {}
            VIRTIO_MMIO_MAGIC_VALUE
            | VIRTIO_MMIO_VERSION
            | VIRTIO_MMIO_DEVICE_ID
            | VIRTIO_MMIO_VENDOR_ID
            | VIRTIO_MMIO_DEVICE_FEATURES
            | VIRTIO_MMIO_QUEUE_NUM_MAX
            | VIRTIO_MMIO_INTERRUPT_STATUS
            | VIRTIO_MMIO_CONFIG_GENERATION
            | VIRTIO_MMIO_SHM_LEN_LOW
            | VIRTIO_MMIO_SHM_LEN_HIGH
            | VIRTIO_MMIO_SHM_BASE_LOW
            | VIRTIO_MMIO_SHM_BASE_HIGH => {
                guest_warn!(
                    self.log_throttle,
                    "virtio-mmio: write {value:#x} to read-only register {offset:#x} ignored"
                );
            }
            _ => guest_warn!(
                self.log_throttle,
                "virtio-mmio: write {value:#x} to unknown register {offset:#x} ignored"
            ),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        // Features are negotiated between DRIVER and FEATURES_OK (§3.1.1
        // steps 4-5); a later change would desynchronise driver and device.
        let negotiating = self.status & VIRTIO_CONFIG_S_DRIVER != 0
            && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0;
        if !negotiating {
            guest_warn!(
                self.log_throttle,
                "virtio-mmio: DriverFeatures write {value:#x} in status {:#x} ignored \
                 (only allowed after DRIVER and before FEATURES_OK)",
                self.status()
            );
            return;
        }
        match self.driver_features_sel {
            0 => set_low(&mut self.driver_features, value),
            1 => set_high(&mut self.driver_features, value),
            page => {
                if value != 0 {
                    guest_warn!(
                        self.log_throttle,
                        "virtio-mmio: driver accepts features {value:#x} in page {page}, \
                         none offered there; FEATURES_OK will be refused"
                    );
                    self.driver_features_beyond_64 = true;
                }
            }
        }
    }

    /// The selected queue's registers if the driver may change them now:
    /// after FEATURES_OK, before DRIVER_OK, and (except for QueueReady
    /// itself) while the queue is not ready (§4.2.2.2).
    fn configurable_queue(&mut self, register: &str, ready_write: bool) -> Option<&mut QueueRegs> {
        let status = self.status();
        if status & VIRTIO_CONFIG_S_DRIVER_OK != 0 || status & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            guest_warn!(
                self.log_throttle,
                "virtio-mmio: {register} write in status {status:#x} ignored \
                 (queues are configured after FEATURES_OK and before DRIVER_OK)"
            );
            return None;
        }
        let sel = self.queue_sel;
        let Some(regs) = self.queues.get_mut(sel as usize) else {
            guest_warn!(
                self.log_throttle,
                "virtio-mmio: {register} write for non-existent queue {sel} ignored"
            );
            return None;
        };
        if regs.ready && !ready_write {
            guest_warn!(
                self.log_throttle,
                "virtio-mmio: {register} write for queue {sel} ignored: queue is ready"
            );
            return None;
        }
        Some(regs)
    }

    fn write_queue_num(&mut self, value: u32) {
        let Some(regs) = self.configurable_queue("QueueNum", false) else {
            return;
        };
        // Kept as written and judged at DRIVER_OK (spec §5): a driver
        // cannot read QueueNum back, so silently keeping an older size
        // would leave it with rings of a size it never chose.
        regs.size = value;
        let max = regs.max_size;
        if !queue_size_valid(value, max) {
            guest_warn!(
                self.log_throttle,
                "virtio-mmio: QueueNum {value} is not a power of two in 1..={max}; \
                 DRIVER_OK will set DEVICE_NEEDS_RESET if the queue is ready"
            );
        }
    }

    fn write_queue_ready(&mut self, value: u32) {
        let Some(regs) = self.configurable_queue("QueueReady", true) else {
            return;
        };
        match value {
            0 => regs.ready = false,
            1 => regs.ready = true,
            _ => guest_warn!(
                self.log_throttle,
                "virtio-mmio: QueueReady value {value} ignored (0 or 1)"
            ),
        }
    }

    fn write_queue_addr(&mut self, register: &str, set: impl FnOnce(&mut QueueRegs)) {
        if let Some(regs) = self.configurable_queue(register, false) {
            set(regs);
        }
    }

    fn queue_notify(&mut self, value: u32) {
        if !self.driver_ok() || self.needs_reset || self.device.needs_reset() {
            guest_warn!(
                self.log_throttle,
                "virtio-mmio: QueueNotify {value} in status {:#x} ignored (device not running)",
                self.status()
            );
            return;
        }
        let Some(event) = self.device.queue_events().get(value as usize) else {
            guest_warn!(
                self.log_throttle,
                "virtio-mmio: QueueNotify for non-existent queue {value} ignored"
            );
            return;
        };
        if !self.notify_signals_eventfd {
            return;
        }
        if let Err(e) = event.write(1) {
            error!("virtio-mmio: cannot signal the eventfd of queue {value}: {e}");
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            info!("virtio-mmio: device reset by the driver");
            self.reset();
            return;
        }
        // DEVICE_NEEDS_RESET belongs to the device; a driver writing back
        // what it read (read-modify-write) must not be refused for it.
        let requested = value & !VIRTIO_CONFIG_S_NEEDS_RESET;
        let unknown = requested & !(INIT_BITS | VIRTIO_CONFIG_S_FAILED);
        if unknown != 0 {
            guest_warn!(
                self.log_throttle,
                "virtio-mmio: Status write {value:#x} with unknown bits {unknown:#x} ignored"
            );
            return;
        }
        if self.status & !requested != 0 {
            guest_warn!(
                self.log_throttle,
                "virtio-mmio: Status write {value:#x} would clear bits of {:#x}; ignored \
                 (only a write of 0 resets)",
                self.status
            );
            return;
        }
        let added = requested & !self.status;
        if added & VIRTIO_CONFIG_S_FAILED != 0 {
            guest_warn!(
                self.log_throttle,
                "virtio-mmio: the driver gave up on the device (FAILED)"
            );
            self.status |= VIRTIO_CONFIG_S_FAILED;
        }
        let added = added & INIT_BITS;
        if added == 0 {
            return;
        }
        // The initialisation bits must be set in order: a bit may only be
        // set if every earlier one is (already or in this very write).
        let target = (self.status | added) & INIT_BITS;
        let in_order = INIT_SEQUENCE
            .windows(2)
            .all(|pair| target & pair[1] == 0 || target & pair[0] != 0);
        if !in_order {
            guest_warn!(
                self.log_throttle,
                "virtio-mmio: Status write {value:#x} out of order (current {:#x}); ignored",
                self.status
            );
            return;
        }
        let mut accepted = added;
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 && !self.features_acceptable() {
            // §3.1.1 step 6: the driver re-reads Status and finds
            // FEATURES_OK clear. Any DRIVER_OK in the same write is refused
            // with it.
            accepted &= !(VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK);
        }
        self.status |= accepted;
        if accepted & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.activate();
        }
    }

    /// §2.2.1: the device refuses FEATURES_OK for features it did not offer;
    /// this transport is non-legacy, so VIRTIO_F_VERSION_1 is mandatory.
    fn features_acceptable(&self) -> bool {
        let offered = self.device.avail_features();
        let unoffered = self.driver_features & !offered;
        if unoffered != 0 || self.driver_features_beyond_64 {
            guest_warn!(self.log_throttle,
                "virtio-mmio: FEATURES_OK refused: driver accepted {:#x}, device offers {offered:#x} \
                 (not offered: {unoffered:#x}{})",
                self.driver_features,
                if self.driver_features_beyond_64 { ", and bits above 63" } else { "" }
            );
            return false;
        }
        if self.driver_features & (1 << VIRTIO_F_VERSION_1) == 0 {
            guest_warn!(
                self.log_throttle,
                "virtio-mmio: FEATURES_OK refused: driver features {:#x} lack VIRTIO_F_VERSION_1 \
                 (legacy drivers are not supported)",
                self.driver_features
            );
            return false;
        }
        true
    }

    /// DRIVER_OK: build and validate the queues, start the device. A failure
    /// is the device's to report (§2.1.2): DEVICE_NEEDS_RESET plus a
    /// configuration change notification.
    fn activate(&mut self) {
        let queues: Result<Vec<Queue>, String> = self
            .queues
            .iter()
            .enumerate()
            .map(|(index, regs)| {
                regs.build(&self.memory)
                    .map_err(|e| format!("queue {index}: {e}"))
            })
            .collect();
        let result = queues.and_then(|queues| {
            self.device
                .activate(
                    self.memory.clone(),
                    self.interrupt.clone(),
                    self.driver_features,
                    queues,
                )
                .map_err(|e| e.to_string())
        });
        match result {
            Ok(()) => info!(
                "virtio-mmio: device {:#x} activated, features {:#x}",
                self.device.device_type(),
                self.driver_features
            ),
            Err(reason) => {
                guest_warn!(
                    self.log_throttle,
                    "virtio-mmio: activation failed, setting DEVICE_NEEDS_RESET: {reason}"
                );
                self.needs_reset = true;
                self.interrupt.signal_config_change();
            }
        }
    }
}

fn set_low(reg: &mut u64, value: u32) {
    *reg = (*reg & !0xffff_ffff) | u64::from(value);
}

fn set_high(reg: &mut u64, value: u32) {
    *reg = (*reg & 0xffff_ffff) | (u64::from(value) << 32);
}

/// The register offset of a control-register access, if its shape is legal:
/// 4 bytes wide and 4-byte aligned (§4.2.2.2).
fn control_register(offset: u64, len: usize) -> Option<u32> {
    if len != 4 || offset % 4 != 0 {
        return None;
    }
    u32::try_from(offset).ok()
}

/// Configuration-space accesses are 1, 2, 4 or 8 bytes, naturally aligned.
fn config_access_ok(offset: u64, len: usize) -> bool {
    matches!(len, 1 | 2 | 4 | 8) && offset % len as u64 == 0
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            let config_offset = offset - CONFIG_SPACE_OFFSET;
            if !config_access_ok(config_offset, data.len()) {
                guest_warn!(
                    self.log_throttle,
                    "virtio-mmio: {}-byte config read at {offset:#x} ignored (bad width/alignment)",
                    data.len()
                );
                data.fill(0);
            } else if !self.device.read_config(config_offset, data) {
                guest_warn!(
                    self.log_throttle,
                    "virtio-mmio: {}-byte config read at {offset:#x} beyond the config space",
                    data.len()
                );
                data.fill(0);
            }
            return;
        }
        let Some(register) = control_register(offset, data.len()) else {
            guest_warn!(
                self.log_throttle,
                "virtio-mmio: {}-byte read at {offset:#x} ignored (registers are 32-bit, aligned)",
                data.len()
            );
            data.fill(0);
            return;
        };
        let value = self.read_register(register);
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            guest_warn!(
                self.log_throttle,
                "virtio-mmio: {}-byte write to the read-only config space at {offset:#x} ignored",
                data.len()
            );
            return;
        }
        let Some(register) = control_register(offset, data.len()) else {
            guest_warn!(
                self.log_throttle,
                "virtio-mmio: {}-byte write at {offset:#x} ignored (registers are 32-bit, aligned)",
                data.len()
            );
            return;
        };
        let mut bytes = [0u8; 4];
        bytes.copy_from_slice(data);
        self.write_register(register, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    //! Transport tests against a minimal device; the cache-flush device's own
    //! tests (`cache_flush::tests`) drive this transport end to end.

    use super::*;
    use crate::virtio::{ActivateError, NoInterrupt};
    use std::sync::Mutex;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[derive(Default)]
    struct Record {
        activations: Vec<(u64, Vec<bool>)>,
        resets: usize,
    }

    struct Dummy {
        max_sizes: Vec<u16>,
        events: Vec<EventFd>,
        features: u64,
        record: Arc<Mutex<Record>>,
        fail_activate: bool,
    }

    impl Dummy {
        fn new(queues: usize, features: u64) -> (Self, Arc<Mutex<Record>>) {
            let record = Arc::new(Mutex::new(Record::default()));
            let dummy = Self {
                max_sizes: vec![16; queues],
                events: (0..queues)
                    .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
                    .collect(),
                features,
                record: record.clone(),
                fail_activate: false,
            };
            (dummy, record)
        }
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            0x1234
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.max_sizes
        }
        fn queue_events(&self) -> &[EventFd] {
            &self.events
        }
        fn avail_features(&self) -> u64 {
            self.features
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) -> bool {
            let config = [0xa0u8, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7];
            let Some(src) = config.get(offset as usize..offset as usize + data.len()) else {
                return false;
            };
            data.copy_from_slice(src);
            true
        }
        fn activate(
            &mut self,
            _memory: GuestMemoryMmap,
            _interrupt: Arc<dyn VirtioInterrupt>,
            acked_features: u64,
            queues: Vec<Queue>,
        ) -> Result<(), ActivateError> {
            if self.fail_activate {
                return Err(ActivateError::Device("told to fail".into()));
            }
            let ready = queues.iter().map(|q| q.ready()).collect();
            self.record
                .lock()
                .unwrap()
                .activations
                .push((acked_features, ready));
            Ok(())
        }
        fn reset(&mut self) {
            self.record.lock().unwrap().resets += 1;
        }
    }

    const V1: u64 = 1 << VIRTIO_F_VERSION_1;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn transport(queues: usize, features: u64) -> (MmioTransport<Dummy>, Arc<Mutex<Record>>) {
        let (dummy, record) = Dummy::new(queues, features);
        let t = MmioTransport::new(dummy, memory(), Arc::new(NoInterrupt)).unwrap();
        (t, record)
    }

    fn rd(t: &mut MmioTransport<Dummy>, offset: u32) -> u32 {
        let mut b = [0u8; 4];
        t.read(u64::from(offset), &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport<Dummy>, offset: u32, value: u32) {
        t.write(u64::from(offset), &value.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport<Dummy>, features: u64) {
        wr(t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        wr(
            t,
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        wr(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        wr(t, VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
        wr(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        wr(t, VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
        wr(t, VIRTIO_MMIO_STATUS, 0b1011);
    }

    fn setup_queue(t: &mut MmioTransport<Dummy>, index: u32, base: u32) {
        wr(t, VIRTIO_MMIO_QUEUE_SEL, index);
        wr(t, VIRTIO_MMIO_QUEUE_NUM, 16);
        wr(t, VIRTIO_MMIO_QUEUE_DESC_LOW, base);
        wr(t, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
        wr(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, base + 0x100);
        wr(t, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0);
        wr(t, VIRTIO_MMIO_QUEUE_USED_LOW, base + 0x200);
        wr(t, VIRTIO_MMIO_QUEUE_USED_HIGH, 0);
        wr(t, VIRTIO_MMIO_QUEUE_READY, 1);
    }

    #[test]
    fn identification_registers() {
        let (mut t, _) = transport(2, V1 | 0b101);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_DEVICE_ID), 0x1234);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_VENDOR_ID), MMIO_VENDOR_ID);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 0b101);
        wr(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 1);
        wr(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 2);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 0);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_CONFIG_GENERATION), 0);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_SHM_LEN_LOW), u32::MAX);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_SHM_BASE_HIGH), u32::MAX);
    }

    #[test]
    fn odd_accesses_are_ignored() {
        let (mut t, _) = transport(1, V1);
        // Wrong widths and misalignment read as zero.
        let mut b2 = [0xffu8; 2];
        t.read(0, &mut b2);
        assert_eq!(b2, [0, 0]);
        let mut b4 = [0xffu8; 4];
        t.read(2, &mut b4);
        assert_eq!(b4, [0; 4]);
        let mut b8 = [0xffu8; 8];
        t.read(0, &mut b8);
        assert_eq!(b8, [0; 8]);
        // Unknown offsets and write-only registers read as zero.
        assert_eq!(rd(&mut t, 0x0e0), 0);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY), 0);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_GUEST_PAGE_SIZE), 0);
        // Writes to read-only registers change nothing.
        wr(&mut t, VIRTIO_MMIO_MAGIC_VALUE, 0);
        wr(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS, 3);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_MAGIC_VALUE), MMIO_MAGIC_VALUE);
        // A 1-byte Status write is ignored.
        t.write(u64::from(VIRTIO_MMIO_STATUS), &[1]);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), 0);
        // Beyond the register window: nothing, no panic.
        t.write(MMIO_WINDOW_SIZE - 4, &[1, 2, 3, 4]);
        t.write(u64::MAX - 3, &[1, 2, 3, 4]);
        let mut b = [0xffu8; 4];
        t.read(u64::MAX - 3, &mut b);
        assert_eq!(b, [0; 4]);
        t.read(0x30, &mut []);
        t.write(0x30, &[]);
    }

    #[test]
    fn config_space_reads() {
        let (mut t, _) = transport(1, V1);
        let mut b4 = [0u8; 4];
        t.read(CONFIG_SPACE_OFFSET + 4, &mut b4);
        assert_eq!(b4, [0xa4, 0xa5, 0xa6, 0xa7]);
        let mut b1 = [0u8; 1];
        t.read(CONFIG_SPACE_OFFSET + 3, &mut b1);
        assert_eq!(b1, [0xa3]);
        // Misaligned, beyond the space, odd width: zeros.
        let mut b = [0xffu8; 4];
        t.read(CONFIG_SPACE_OFFSET + 2, &mut b);
        assert_eq!(b, [0; 4]);
        t.read(CONFIG_SPACE_OFFSET + 8, &mut b);
        assert_eq!(b, [0; 4]);
        let mut b3 = [0xffu8; 3];
        t.read(CONFIG_SPACE_OFFSET, &mut b3);
        assert_eq!(b3, [0; 3]);
        // Read-only.
        t.write(CONFIG_SPACE_OFFSET, &[0; 4]);
        t.read(CONFIG_SPACE_OFFSET, &mut b4);
        assert_eq!(b4, [0xa0, 0xa1, 0xa2, 0xa3]);
    }

    #[test]
    fn status_bits_must_be_set_in_order() {
        let (mut t, _) = transport(1, V1);
        // DRIVER before ACKNOWLEDGE.
        wr(&mut t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_DRIVER);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), 0);
        wr(&mut t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        // FEATURES_OK skipping DRIVER.
        wr(&mut t, VIRTIO_MMIO_STATUS, 0b1001);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), 1);
        // Clearing a bit is not allowed (only a full reset).
        wr(&mut t, VIRTIO_MMIO_STATUS, 0b11);
        wr(&mut t, VIRTIO_MMIO_STATUS, 0b10);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), 0b11);
        // Unknown bits.
        wr(&mut t, VIRTIO_MMIO_STATUS, 0b11 | 0x10);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), 0b11);
        // Several steps in one write are fine when in order.
        let (mut t, record) = transport(1, V1);
        wr(&mut t, VIRTIO_MMIO_STATUS, 0b11);
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        wr(&mut t, VIRTIO_MMIO_STATUS, 0b1111);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), 0b1111);
        assert_eq!(record.lock().unwrap().activations.len(), 1);
        // FAILED can be set at any time and is kept.
        wr(&mut t, VIRTIO_MMIO_STATUS, 0b1111 | VIRTIO_CONFIG_S_FAILED);
        assert_eq!(
            rd(&mut t, VIRTIO_MMIO_STATUS),
            0b1111 | VIRTIO_CONFIG_S_FAILED
        );
    }

    #[test]
    fn features_refused_without_version_1() {
        let (mut t, record) = transport(1, V1 | 1);
        negotiate(&mut t, 1);
        assert_eq!(
            rd(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK,
            0
        );
        // DRIVER_OK cannot follow a refused FEATURES_OK.
        wr(&mut t, VIRTIO_MMIO_STATUS, 0b0111);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), 0b0011);
        assert!(record.lock().unwrap().activations.is_empty());
    }

    #[test]
    fn features_refused_when_not_offered() {
        let (mut t, _) = transport(1, V1 | 1);
        negotiate(&mut t, V1 | 0b10);
        assert_eq!(
            rd(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK,
            0
        );
        // Nonzero bits in a page beyond 64 bits are refused too.
        let (mut t, _) = transport(1, V1);
        wr(&mut t, VIRTIO_MMIO_STATUS, 0b11);
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 2);
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        wr(&mut t, VIRTIO_MMIO_STATUS, 0b1011);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), 0b11);
        // A subset is accepted.
        let (mut t, _) = transport(1, V1 | 0b11);
        negotiate(&mut t, V1 | 0b01);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), 0b1011);
        assert_eq!(t.acked_features(), V1 | 1);
        // Feature writes after FEATURES_OK are ignored.
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 0b11);
        assert_eq!(t.acked_features(), V1 | 1);
    }

    #[test]
    fn queue_registers_follow_the_state_machine() {
        let (mut t, record) = transport(2, V1);
        // Before FEATURES_OK: ignored.
        wr(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        wr(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
        negotiate(&mut t, V1);
        // Sizes are kept as written (judged at DRIVER_OK, see
        // `invalid_queue_num_sets_needs_reset`); the last write counts.
        wr(&mut t, VIRTIO_MMIO_QUEUE_NUM, 12);
        assert_eq!(t.queues[0].size, 12);
        wr(&mut t, VIRTIO_MMIO_QUEUE_NUM, 8);
        assert_eq!(t.queues[0].size, 8);
        setup_queue(&mut t, 0, 0x1000);
        // A ready queue's layout is frozen.
        wr(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x8000);
        assert_eq!(t.queues[0].desc, 0x1000);
        // Out-of-range QueueSel: NumMax 0, writes ignored.
        wr(&mut t, VIRTIO_MMIO_QUEUE_SEL, 7);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
        wr(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        wr(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 16);
        wr(&mut t, VIRTIO_MMIO_STATUS, 0b1111);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), 0b1111);
        assert_eq!(
            record.lock().unwrap().activations,
            vec![(V1, vec![true, false])]
        );
        // After DRIVER_OK: ignored.
        wr(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
        wr(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
        wr(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        wr(&mut t, VIRTIO_MMIO_QUEUE_READY, 0);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_READY), 1);
    }

    #[test]
    fn notify_writes_the_queue_eventfd_only_when_running() {
        let (mut t, _) = transport(2, V1);
        wr(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        assert!(
            t.device().events[1].read().is_err(),
            "notify before DRIVER_OK"
        );
        negotiate(&mut t, V1);
        setup_queue(&mut t, 1, 0x1000);
        wr(&mut t, VIRTIO_MMIO_STATUS, 0b1111);
        wr(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        assert_eq!(t.device().events[1].read().unwrap(), 1);
        assert!(t.device().events[0].read().is_err());
        // Out of range: ignored.
        wr(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 2);
        let fds = t.queue_notify_eventfds();
        assert_eq!(fds.len(), 2);
        assert_eq!(fds[1].0, 1);
        assert_eq!(QUEUE_NOTIFY_OFFSET, 0x50);
    }

    #[test]
    fn a_transport_told_not_to_signal_leaves_the_eventfd_alone() {
        let (mut t, _) = transport(1, V1);
        t.set_notify_signals_eventfd(false);
        negotiate(&mut t, V1);
        setup_queue(&mut t, 0, 0x1000);
        wr(&mut t, VIRTIO_MMIO_STATUS, 0b1111);
        wr(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert!(t.device().events[0].read().is_err());
        t.set_notify_signals_eventfd(true);
        wr(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(t.device().events[0].read().unwrap(), 1);
    }

    #[test]
    fn invalid_queue_num_sets_needs_reset() {
        for bad in [0, 12, 32] {
            let (mut t, record) = transport(1, V1);
            negotiate(&mut t, V1);
            setup_queue(&mut t, 0, 0x1000);
            // Written after a valid size: the driver's last word counts, it
            // is not silently replaced by the earlier one.
            wr(&mut t, VIRTIO_MMIO_QUEUE_READY, 0);
            wr(&mut t, VIRTIO_MMIO_QUEUE_NUM, bad);
            wr(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
            wr(&mut t, VIRTIO_MMIO_STATUS, 0b1111);
            assert_eq!(
                rd(&mut t, VIRTIO_MMIO_STATUS),
                0b1111 | VIRTIO_CONFIG_S_NEEDS_RESET,
                "QueueNum {bad}"
            );
            assert!(record.lock().unwrap().activations.is_empty());
        }
        // An invalid size on a queue the driver does not enable is harmless.
        let (mut t, record) = transport(2, V1);
        negotiate(&mut t, V1);
        setup_queue(&mut t, 0, 0x1000);
        wr(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
        wr(&mut t, VIRTIO_MMIO_QUEUE_NUM, 12);
        wr(&mut t, VIRTIO_MMIO_STATUS, 0b1111);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), 0b1111);
        assert_eq!(record.lock().unwrap().activations.len(), 1);
    }

    #[test]
    fn invalid_queue_sets_needs_reset() {
        let (mut t, record) = transport(1, V1);
        negotiate(&mut t, V1);
        // Rings outside guest memory.
        setup_queue(&mut t, 0, 0xf_0000);
        wr(&mut t, VIRTIO_MMIO_STATUS, 0b1111);
        let status = rd(&mut t, VIRTIO_MMIO_STATUS);
        assert_eq!(status, 0b1111 | VIRTIO_CONFIG_S_NEEDS_RESET);
        assert_eq!(
            rd(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_CONFIG
        );
        assert!(record.lock().unwrap().activations.is_empty());
        // Notifies are ignored while broken.
        wr(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert!(t.device().events[0].read().is_err());
        // Writing back the status with NEEDS_RESET does not clear it.
        wr(&mut t, VIRTIO_MMIO_STATUS, status);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), status);
        wr(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        // Reset clears everything, and the device can start again.
        wr(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), 0);
        assert_eq!(record.lock().unwrap().resets, 1);
        negotiate(&mut t, V1);
        setup_queue(&mut t, 0, 0x1000);
        wr(&mut t, VIRTIO_MMIO_STATUS, 0b1111);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), 0b1111);
        assert_eq!(record.lock().unwrap().activations.len(), 1);
    }

    #[test]
    fn misaligned_ring_sets_needs_reset() {
        let (mut t, _) = transport(1, V1);
        negotiate(&mut t, V1);
        setup_queue(&mut t, 0, 0x1000);
        // Re-do with a misaligned descriptor table (needs 16-byte alignment).
        wr(&mut t, VIRTIO_MMIO_QUEUE_READY, 0);
        wr(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1008);
        wr(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        wr(&mut t, VIRTIO_MMIO_STATUS, 0b1111);
        assert_ne!(
            rd(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
            0
        );
    }

    #[test]
    fn driver_area_at_zero_sets_needs_reset() {
        let (mut t, _) = transport(1, V1);
        negotiate(&mut t, V1);
        setup_queue(&mut t, 0, 0x1000);
        wr(&mut t, VIRTIO_MMIO_QUEUE_READY, 0);
        wr(&mut t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0);
        wr(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        wr(&mut t, VIRTIO_MMIO_STATUS, 0b1111);
        assert_ne!(
            rd(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
            0
        );
    }

    #[test]
    fn failing_device_activation_sets_needs_reset() {
        let (mut dummy, _) = Dummy::new(1, V1);
        dummy.fail_activate = true;
        let mut t = MmioTransport::new(dummy, memory(), Arc::new(NoInterrupt)).unwrap();
        negotiate(&mut t, V1);
        setup_queue(&mut t, 0, 0x1000);
        wr(&mut t, VIRTIO_MMIO_STATUS, 0b1111);
        assert_ne!(
            rd(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
            0
        );
    }

    #[test]
    fn reset_clears_queue_registers_and_interrupts() {
        let (mut t, _) = transport(1, V1);
        negotiate(&mut t, V1);
        setup_queue(&mut t, 0, 0x1000);
        t.interrupt.signal_used_queue(0);
        assert_eq!(
            rd(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_VRING
        );
        wr(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
        assert_eq!(t.queues[0].desc, 0);
        assert_eq!(t.acked_features(), 0);
    }

    #[test]
    fn new_rejects_inconsistent_devices() {
        let (mut dummy, _) = Dummy::new(2, V1);
        dummy.events.pop();
        assert!(matches!(
            MmioTransport::new(dummy, memory(), Arc::new(NoInterrupt)),
            Err(MmioError::QueueEventCount {
                queues: 2,
                events: 1
            })
        ));
        let (mut dummy, _) = Dummy::new(1, V1);
        dummy.max_sizes[0] = 12;
        assert!(matches!(
            MmioTransport::new(dummy, memory(), Arc::new(NoInterrupt)),
            Err(MmioError::InvalidQueueMaxSize { queue: 0, size: 12 })
        ));
        let (dummy, _) = Dummy::new(0, V1);
        assert!(matches!(
            MmioTransport::new(dummy, memory(), Arc::new(NoInterrupt)),
            Err(MmioError::NoQueues)
        ));
        let (dummy, _) = Dummy::new(1, 0);
        assert!(matches!(
            MmioTransport::new(dummy, memory(), Arc::new(NoInterrupt)),
            Err(MmioError::NoVersion1)
        ));
    }
}
