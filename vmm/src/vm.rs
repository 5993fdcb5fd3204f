//! A VM: KVM objects, guest RAM, the buses, the vCPU threads and the control
//! loop that waits for the VM to end.
//!
//! [`Vm::new`] does everything that can fail before a vCPU runs (so a bad
//! kernel or flag never leads to a partial start); [`Vm::start`] spawns the
//! vCPU threads; [`RunningVm::wait`] runs the event loop (event-manager) until
//! the guest ends, a vCPU crashes or a signal arrives, then stops every vCPU.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use cache_flush_abi::boot::{
    DeviceEntry, DeviceKind, EXIT_PORT, MAX_VCPUS, MMIO_DEVICES_START, SERIAL_PORT,
};
use cache_flush_abi::cache_flush::{DEVICE_ID as CACHE_FLUSH_DEVICE_ID, MAX_QUEUES};
use devices::bus::Bus;
use devices::cache_flush::device::{CacheFlushDevice, CacheFlushSettings, DeviceError};
use devices::cache_flush::metrics::CacheFlushMetrics;
use devices::cache_flush::queue_worker::QueueWorker;
use devices::legacy::{EventFdTrigger, SerialPort};
use devices::virtio::mmio::{MmioError, MmioTransport, MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET};
use devices::virtio::{NoInterrupt, VirtioInterrupt};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use flush_engine::HookFilter;
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::alias::{AliasError, SharedAlias};
use crate::audit::DirtyAudit;
use crate::boot::{self, BootError};
use crate::flush_engine::FlushEngine;
use crate::host_quirks::syscall_remedy::SyscallRemedy;
use crate::host_quirks::{HostQuirks, QuirkMode, VcpuQuirks};
use crate::linux::console::{ConsoleWatch, GuestLifecycle};
use crate::linux::{self, LinuxError};
use crate::loader::{self, LoadedKernel, LoaderError};
use crate::memory::{GuestRam, MemoryError};
use crate::metrics::{MetricsConfig, MetricsSources, MetricsWriter};
use crate::vcpu::control::{self, ControlError, VcpuControl};
use crate::vcpu::{IoBuses, NotifyRoute, OutcomeSink, Vcpu, VcpuStats, VmOutcome};

/// How long stopping the VM waits for vCPU threads to leave their loops.
pub const FINISH_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a guest's QueueNotify to the cache-flush device is served.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum NotifyPath {
    /// On the notifying vCPU's own thread, during its MMIO exit: it is out
    /// of guest mode already, so it pauses the others, flushes, completes
    /// and returns to the guest with the request done (no wake-up of
    /// another thread, no extra exit of its own).
    #[default]
    Vcpu,
    /// Through a KVM ioeventfd to the control loop's thread: the notify
    /// costs the vCPU a quarter of an exit, but the control loop then has to
    /// wake up and pause every vCPU, the requester included.
    Ioeventfd,
}

/// Everything that configures a VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// The kernel image (an ELF64 x86-64 executable).
    pub kernel: Vec<u8>,
    /// Number of vCPUs (1..=MAX_VCPUS).
    pub vcpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// The kernel command line.
    pub cmdline: String,
    /// Offer FLUSH_ALL (the `--no-full-flush` flag turns it off).
    pub full_flush: bool,
    /// FLUSH_ALL requests served per second; 0 = unlimited.
    pub full_flush_rate: u64,
    /// FLUSH_RANGE bytes served per second; 0 = unlimited.
    pub range_flush_rate: u64,
    /// Write metrics as JSON, periodically and at exit.
    pub metrics: Option<MetricsConfig>,
    /// Turn SIGINT and SIGTERM into an orderly stop (the binary does; tests
    /// embedding the VMM usually don't).
    pub handle_signals: bool,
    /// Where the guest's UART output goes: the VMM's stdout (`None`), or
    /// appended to this buffer (the bench reads the guest's results here).
    pub serial_out: Option<Arc<Mutex<Vec<u8>>>>,
    /// Where the guest's QueueNotify to the cache-flush device is served.
    pub notify: NotifyPath,
    /// The flush engine's deadlines and its inline-flush threshold.
    pub engine: flush_engine::EngineConfig,
    /// Keep the dirty-page audit ([`crate::audit`]): KVM dirty logging on
    /// guest RAM, costing a write-protect fault per first write per page
    /// after each flush. Off by default.
    pub audit: bool,
    /// The initial RAM disk of a Linux guest.
    pub initrd: Option<Vec<u8>>,
    /// Whether a Linux guest gets the work-arounds for hosts that interpret
    /// guest ring 0 ([`crate::host_quirks`]).
    pub host_quirks: QuirkMode,
    /// End the VM (as a crash) if the guest has not ended it by then.
    pub timeout: Option<Duration>,
}

impl VmConfig {
    /// A configuration for `kernel` with one vCPU, 256 MiB, an empty command
    /// line, full flushes offered and no signal handling.
    pub fn new(kernel: Vec<u8>) -> Self {
        Self {
            kernel,
            vcpus: 1,
            memory_mib: 256,
            cmdline: String::new(),
            full_flush: true,
            full_flush_rate: 0,
            range_flush_rate: 0,
            metrics: None,
            handle_signals: false,
            serial_out: None,
            notify: NotifyPath::default(),
            engine: flush_engine::EngineConfig::default(),
            audit: false,
            initrd: None,
            host_quirks: QuirkMode::Auto,
            timeout: None,
        }
    }
}

/// Errors of VM set-up and of its control loop.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// Bad vCPU count.
    #[error("--vcpus must be between 1 and {MAX_VCPUS}, not {0}")]
    VcpuCount(u32),
    /// `/dev/kvm` cannot be opened.
    #[error("cannot open /dev/kvm (is KVM available and are you allowed to use it?)")]
    OpenKvm(#[source] vmm_sys_util::errno::Error),
    /// A KVM ioctl failed.
    #[error("KVM {what} failed")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// Cause.
        #[source]
        source: vmm_sys_util::errno::Error,
    },
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The kernel image.
    #[error(transparent)]
    Kernel(#[from] LoaderError),
    /// Boot structures.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// A Linux kernel, its initrd or its boot structures.
    #[error(transparent)]
    Linux(#[from] LinuxError),
    /// The vCPU control channel.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The cache-flush device could not be created.
    #[error("cannot create the cache-flush device")]
    Device(#[from] DeviceError),
    /// The virtio-mmio transport refused the device.
    #[error("cannot create the virtio-mmio transport")]
    Transport(#[from] MmioError),
    /// A device could not be placed on a bus.
    #[error("cannot attach a device")]
    Bus(#[from] devices::bus::BusError),
    /// The event loop failed.
    #[error("event loop failed: {0:?}")]
    EventLoop(event_manager::Error),
    /// An OS resource (thread, eventfd, signalfd) could not be created.
    #[error("cannot create {what}")]
    Os {
        /// What.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// A configured VM whose vCPUs have not started.
pub struct Vm {
    _kvm: Kvm,
    vm_fd: Arc<VmFd>,
    ram: GuestRam,
    kernel: LoadedKernel,
    vcpus: Vec<Vcpu>,
    control: Arc<VcpuControl>,
    outcome: Arc<OutcomeSink>,
    stats: Arc<VcpuStats>,
    handle_signals: bool,
    metrics: Option<MetricsConfig>,
    flush: CacheFlushService,
    audit: Option<Arc<DirtyAudit>>,
    timeout: Option<Duration>,
}

/// The cache-flush device as the VM keeps it: its queue worker (added to the
/// control loop at start), its counters and the engine behind it.
struct CacheFlushService {
    worker: Option<QueueWorker>,
    /// Set when notifies are served on the vCPU threads.
    notify_route: Option<NotifyRoute>,
    metrics: Arc<CacheFlushMetrics>,
    engine: FlushEngine,
}

impl Vm {
    /// Creates the VM: memory, kernel, boot structures, devices and vCPUs.
    pub fn new(config: &VmConfig) -> Result<Self, VmError> {
        if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
            return Err(VmError::VcpuCount(config.vcpus));
        }
        let ram = GuestRam::new(config.memory_mib)?;
        // A Linux kernel is unpacked (bzImage) and checked like any other.
        let format = linux::kernel_format(&config.kernel);
        let linux_kernel = match format.is_linux() {
            true => Some(linux::unpack(&config.kernel, format)?),
            false if config.initrd.is_some() => return Err(LinuxError::InitrdWithoutLinux.into()),
            false => None,
        };
        let image = linux_kernel
            .as_ref()
            .map_or(config.kernel.as_slice(), |k| k.vmlinux.as_slice());
        // Validate the kernel before touching KVM, so a bad file gives its own
        // error even on a host without KVM.
        loader::validate(image, &ram.layout)?;

        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let vm_fd = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
        if linux_kernel.is_some() {
            create_interrupt_controllers(&vm_fd)?;
        }
        let mut audited_slots = Vec::new();
        for (slot, region) in ram.memory.iter().enumerate() {
            let mem_region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                flags: if config.audit {
                    KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                },
            };
            audited_slots.push((slot as u32, region.start_addr().0, region.len()));
            // SAFETY: the region is a live mapping owned by `ram`, which the
            // returned Vm keeps for at least as long as `vm_fd`.
            unsafe { vm_fd.set_user_memory_region(mem_region) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }

        let kernel = loader::load(image, &ram.memory, &ram.layout)?;

        let outcome = OutcomeSink::new().map_err(|source| VmError::Os {
            what: "the outcome eventfd",
            source,
        })?;
        let mut pio = Bus::new();
        let linux_guest = match &linux_kernel {
            Some(_) => Some(LinuxGuest::new(config, &vm_fd, &ram, &outcome, &mut pio)?),
            None => {
                let serial = Arc::new(Mutex::new(SerialPort::new(SerialSink(
                    config.serial_out.clone(),
                ))));
                pio.insert(u64::from(SERIAL_PORT), 8, serial)?;
                None
            }
        };
        let mut mmio = Bus::new();
        let mut device_table = vec![
            DeviceEntry {
                kind: DeviceKind::SerialPort as u32,
                device_id: 0,
                base: u64::from(SERIAL_PORT),
                size: 8,
            },
            DeviceEntry {
                kind: DeviceKind::ExitPort as u32,
                device_id: 0,
                base: u64::from(EXIT_PORT),
                size: 4,
            },
        ];
        let control = VcpuControl::new(config.vcpus as usize);
        let flush_interrupt: Arc<dyn VirtioInterrupt> = match &linux_guest {
            Some(_) => Arc::new(IrqLine::new(&vm_fd, linux::FIRST_VIRTIO_GSI)?),
            None => Arc::new(NoInterrupt),
        };
        let (flush, flush_entry) =
            attach_cache_flush(config, &vm_fd, &ram, &control, &mut mmio, flush_interrupt)?;
        device_table.push(flush_entry);
        let audit = config.audit.then(|| {
            let audit = Arc::new(DirtyAudit::new(
                vm_fd.clone(),
                flush.engine.flush_log().clone(),
                &audited_slots,
            ));
            flush
                .engine
                .add_pause_hook(HookFilter::EveryBatch, audit.clone());
            audit
        });

        match (&linux_kernel, &linux_guest) {
            (Some(linux_kernel), Some(guest)) => {
                guest.write_boot(config, linux_kernel, kernel, &ram, &flush_entry)?
            }
            _ => boot::write_boot_structures(
                &ram.memory,
                &ram.layout,
                config.vcpus,
                &config.cmdline,
                &device_table,
            )?,
        }
        let stats = Arc::new(VcpuStats::default());
        let halted = Arc::new(AtomicU64::new(0));
        let buses = IoBuses {
            pio,
            mmio,
            notify: flush.notify_route.clone(),
        };
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let mut vcpus = Vec::with_capacity(config.vcpus as usize);
        for index in 0..config.vcpus {
            let fd = vm_fd
                .create_vcpu(u64::from(index))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            let mut cpuid = supported_cpuid.clone();
            for entry in cpuid.as_mut_slice() {
                // Leaf 1: the initial APIC ID, so CPUID tells a vCPU its index.
                if entry.function == 1 {
                    entry.ebx = (entry.ebx & 0x00ff_ffff) | (index << 24);
                }
                // Leaves 0xB/0x1F: the x2APIC ID, which Linux reads too.
                if linux_guest.is_some() && matches!(entry.function, 0xb | 0x1f) {
                    entry.edx = index;
                }
            }
            if let Some(guest) = &linux_guest {
                guest.quirks.mask_cpuid(&mut cpuid);
            }
            fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
            // A Linux guest's other vCPUs wait in the in-kernel local APIC
            // for the boot processor's INIT/SIPI.
            let starts_here = linux_guest.is_none() || index == 0;
            if starts_here {
                let sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
                fd.set_sregs(&boot::initial_sregs(sregs))
                    .map_err(kvm_err("KVM_SET_SREGS"))?;
                let regs = match &linux_guest {
                    Some(_) => linux::initial_regs(kernel.entry),
                    None => boot::initial_regs(kernel.entry, index),
                };
                fd.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
            }
            let mut vcpu = Vcpu::new(
                index as usize,
                fd,
                buses.clone(),
                control.clone(),
                outcome.clone(),
                stats.clone(),
                halted.clone(),
            );
            if linux_guest.is_some() {
                vcpu = vcpu.with_in_kernel_irqchip();
            }
            if let Some(quirks) = linux_guest.as_ref().and_then(|g| g.vcpu_quirks.clone()) {
                vcpu = vcpu.with_quirks(quirks);
            }
            vcpus.push(vcpu);
        }

        Ok(Self {
            _kvm: kvm,
            vm_fd,
            ram,
            kernel,
            vcpus,
            control,
            outcome,
            stats,
            handle_signals: config.handle_signals,
            metrics: config.metrics.clone(),
            flush,
            audit,
            timeout: config.timeout,
        })
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.ram.memory
    }

    /// Where the kernel was loaded.
    pub fn kernel(&self) -> LoadedKernel {
        self.kernel
    }

    /// Starts every vCPU thread. All or nothing: if one cannot be started,
    /// the ones already running are stopped and joined before the error is
    /// returned, so a failed start leaves no thread behind.
    pub fn start(self) -> Result<RunningVm, VmError> {
        self.start_with(|name, vcpu| {
            std::thread::Builder::new()
                .name(name)
                .spawn(move || vcpu.run())
        })
    }

    /// [`Self::start`] with the thread spawner given (tests make it fail).
    fn start_with(
        mut self,
        mut spawn: impl FnMut(String, Vcpu) -> std::io::Result<JoinHandle<()>>,
    ) -> Result<RunningVm, VmError> {
        control::install_kick_handler()?;
        let signals = if self.handle_signals {
            Some(SignalWatcher::new(self.outcome.clone())?)
        } else {
            None
        };
        let mut threads = Vec::with_capacity(self.vcpus.len());
        for vcpu in std::mem::take(&mut self.vcpus) {
            let index = threads.len();
            match spawn(format!("vcpu{index}"), vcpu) {
                Ok(handle) => threads.push(handle),
                Err(source) => {
                    // The vCPUs not yet started are dropped with the rest of
                    // `self`; the running ones are told to finish first.
                    let stuck = self.control.finish(FINISH_TIMEOUT);
                    if stuck.is_empty() {
                        for thread in threads {
                            let _ = thread.join();
                        }
                    } else {
                        log::error!("vCPUs {stuck:?} did not stop after a failed start");
                    }
                    return Err(VmError::Os {
                        what: "a vCPU thread",
                        source,
                    });
                }
            }
        }
        Ok(RunningVm {
            metrics: self.metrics,
            flush_worker: self.flush.worker.take(),
            flush_metrics: self.flush.metrics,
            flush_engine: self.flush.engine,
            _vm_fd: self.vm_fd,
            audit: self.audit,
            ram: self.ram,
            control: self.control,
            outcome: self.outcome,
            stats: self.stats,
            threads,
            signals,
            timeout: self.timeout,
        })
    }
}

/// A VM whose vCPUs run.
pub struct RunningVm {
    metrics: Option<MetricsConfig>,
    flush_worker: Option<QueueWorker>,
    flush_metrics: Arc<CacheFlushMetrics>,
    flush_engine: FlushEngine,
    _vm_fd: Arc<VmFd>,
    audit: Option<Arc<DirtyAudit>>,
    ram: GuestRam,
    control: Arc<VcpuControl>,
    outcome: Arc<OutcomeSink>,
    stats: Arc<VcpuStats>,
    threads: Vec<JoinHandle<()>>,
    signals: Option<SignalWatcher>,
    timeout: Option<Duration>,
}

impl RunningVm {
    /// The vCPU control channel.
    pub fn control(&self) -> &Arc<VcpuControl> {
        &self.control
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.ram.memory
    }

    /// Guest RAM with its backing file.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// A second host mapping of `[gpa, gpa + len)` of guest RAM: the
    /// "shared" view of a confidential-VM hand-off (see [`SharedAlias`]).
    pub fn alias(&self, gpa: GuestAddress, len: usize) -> Result<SharedAlias, AliasError> {
        SharedAlias::new(&self.ram, gpa, len)
    }

    /// The flush engine behind the cache-flush device.
    pub fn flush_engine(&self) -> &FlushEngine {
        &self.flush_engine
    }

    /// The dirty-page audit, when the VM was configured with `audit`.
    pub fn audit(&self) -> Option<&Arc<DirtyAudit>> {
        self.audit.as_ref()
    }

    /// The cache-flush device's counters.
    pub fn flush_metrics(&self) -> &Arc<CacheFlushMetrics> {
        &self.flush_metrics
    }

    /// Accesses to addresses no device claimed so far.
    pub fn unclaimed_accesses(&self) -> u64 {
        self.stats.unclaimed_accesses.load(Ordering::Relaxed)
    }

    /// The outcome, if the VM has ended.
    pub fn outcome(&self) -> Option<VmOutcome> {
        self.outcome.outcome()
    }

    /// Runs the control loop until the VM ends, then stops every vCPU.
    pub fn wait(mut self) -> Result<VmOutcome, VmError> {
        let _deadline = self
            .timeout
            .map(|t| Deadline::start(t, self.outcome.clone()));
        let done = Arc::new(AtomicBool::new(false));
        let mut manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
            EventManager::new().map_err(VmError::EventLoop)?;
        manager.add_subscriber(Arc::new(Mutex::new(OutcomeWatcher {
            outcome: self.outcome.clone(),
            done: done.clone(),
        })));
        if let Some(signals) = self.signals.take() {
            manager.add_subscriber(Arc::new(Mutex::new(signals)));
        }
        if let Some(worker) = self.flush_worker.take() {
            manager.add_subscriber(Arc::new(Mutex::new(worker)));
        }
        let metrics = match self.metrics.take() {
            Some(config) => {
                let writer = Arc::new(Mutex::new(
                    MetricsWriter::new(config, self.metrics_sources()).map_err(|source| {
                        VmError::Os {
                            what: "the metrics timer",
                            source,
                        }
                    })?,
                ));
                manager.add_subscriber(writer.clone());
                Some(writer)
            }
            None => None,
        };
        while !done.load(Ordering::SeqCst) {
            manager.run().map_err(VmError::EventLoop)?;
        }
        let outcome = self.stop();
        if let Some(writer) = metrics {
            writer.lock().unwrap_or_else(|p| p.into_inner()).write_now();
        }
        Ok(outcome)
    }

    /// What the metrics are read from.
    pub fn metrics_sources(&self) -> MetricsSources {
        MetricsSources {
            device: self.flush_metrics.clone(),
            engine: self.flush_engine.clone(),
            vcpus: self.stats.clone(),
        }
    }

    /// Stops the VM now (if no outcome was reported, it is `Signal(0)`:
    /// stopped by its owner) and returns its outcome.
    pub fn stop(mut self) -> VmOutcome {
        self.outcome.report(VmOutcome::Signal(0));
        self.finish_threads();
        self.outcome.outcome().unwrap_or(VmOutcome::Signal(0))
    }

    fn finish_threads(&mut self) {
        let stuck = self.control.finish(FINISH_TIMEOUT);
        if !stuck.is_empty() {
            log::error!("vCPUs {stuck:?} did not stop within {FINISH_TIMEOUT:?}; leaving them");
            return;
        }
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                log::error!("a vCPU thread panicked");
            }
        }
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.outcome.report(VmOutcome::Signal(0));
            self.finish_threads();
        }
    }
}

/// Creates the cache-flush device and its engine, puts its virtio-mmio
/// transport on the MMIO bus and routes its queue notifications through
/// ioeventfds, so a guest's notify costs a quarter of a full exit and never
/// blocks the notifying vCPU on the flush (HOST-NOTES: ~4 µs against ~16 µs).
fn attach_cache_flush(
    config: &VmConfig,
    vm_fd: &VmFd,
    ram: &GuestRam,
    control: &Arc<VcpuControl>,
    mmio: &mut Bus,
    interrupt: Arc<dyn VirtioInterrupt>,
) -> Result<(CacheFlushService, DeviceEntry), VmError> {
    let engine =
        FlushEngine::new(control.clone(), Arc::new(ram.memory.clone())).with_config(config.engine);
    let (full_flush_cost_ns, full_break_even_bytes) = engine.measure_full_flush();
    let settings = CacheFlushSettings {
        full_flush_cost_ns,
        full_break_even_bytes,
        num_queues: (config.vcpus as u16).min(MAX_QUEUES),
        // CLFLUSH reaches every line only on x86-64, the only host this VMM
        // builds for; elsewhere FULL would not be offered.
        full_flush: config.full_flush && cfg!(target_arch = "x86_64"),
        cache_line_size: engine.line_size() as u32,
        full_per_sec_limit: config.full_flush_rate,
        range_bytes_per_sec_limit: config.range_flush_rate,
        ..CacheFlushSettings::default()
    };
    let device = CacheFlushDevice::new(settings)?;
    let metrics = device.metrics();
    // The published estimate follows the resident set: every full flush
    // refreshes it (and bumps ConfigGeneration).
    let estimate = device.full_flush_estimate();
    engine.set_full_flush_estimate_sink(Some(Arc::new(move |cost_ns, break_even| {
        estimate.update(cost_ns, break_even)
    })));
    let worker = device.queue_worker(Box::new(engine.clone()));
    let mut transport = MmioTransport::new(device, ram.memory.clone(), interrupt)?;
    let base = MMIO_DEVICES_START;
    let notify_route = match config.notify {
        NotifyPath::Ioeventfd => {
            for (queue, eventfd) in transport.queue_notify_eventfds() {
                vm_fd
                    .register_ioevent(
                        eventfd,
                        &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET),
                        u32::from(queue),
                    )
                    .map_err(kvm_err("KVM_IOEVENTFD"))?;
            }
            None
        }
        // The write reaches the transport through the MMIO bus (which
        // checks it); the vCPU thread then serves it itself, with no lock
        // held. The queue eventfds stay watched by the event loop only for
        // work a round budget left over (`QueueWorker::serve_notify`).
        NotifyPath::Vcpu => {
            transport.set_notify_signals_eventfd(false);
            Some(NotifyRoute {
                addr: base + QUEUE_NOTIFY_OFFSET,
                worker: worker.clone(),
            })
        }
    };
    mmio.insert(base, MMIO_WINDOW_SIZE, Arc::new(Mutex::new(transport)))?;
    let entry = DeviceEntry {
        kind: DeviceKind::VirtioMmio as u32,
        device_id: CACHE_FLUSH_DEVICE_ID,
        base,
        size: MMIO_WINDOW_SIZE,
    };
    Ok((
        CacheFlushService {
            worker: Some(worker),
            metrics,
            engine,
            notify_route,
        },
        entry,
    ))
}

/// The UART's output: stdout, or a caller's buffer ([`VmConfig::serial_out`]).
struct SerialSink(Option<Arc<Mutex<Vec<u8>>>>);

impl std::io::Write for SerialSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &self.0 {
            Some(sink) => {
                sink.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend_from_slice(buf);
                Ok(buf.len())
            }
            None => std::io::stdout().write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match &self.0 {
            Some(_) => Ok(()),
            None => std::io::stdout().flush(),
        }
    }
}

/// Ends the control loop when a vCPU reports how the VM ended.
struct OutcomeWatcher {
    outcome: Arc<OutcomeSink>,
    done: Arc<AtomicBool>,
}

impl MutEventSubscriber for OutcomeWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.outcome.eventfd(), EventSet::IN)) {
            log::error!("cannot watch the VM outcome: {e:?}");
            self.done.store(true, Ordering::SeqCst);
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.outcome.eventfd().read();
        self.done.store(true, Ordering::SeqCst);
    }
}

/// Turns SIGINT and SIGTERM into a [`VmOutcome::Signal`]. The signals are
/// blocked in every thread (the vCPU threads inherit the mask) and read from
/// a signalfd, so they arrive as ordinary events of the control loop.
struct SignalWatcher {
    fd: OwnedFd,
    outcome: Arc<OutcomeSink>,
}

impl SignalWatcher {
    fn new(outcome: Arc<OutcomeSink>) -> Result<Self, VmError> {
        let os_err = |what| {
            move |_| VmError::Os {
                what,
                source: std::io::Error::last_os_error(),
            }
        };
        // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t; the signal numbers are valid.
        let rc = unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(VmError::Os {
                what: "the signal mask",
                source: std::io::Error::from_raw_os_error(rc),
            });
        }
        // SAFETY: `set` is initialised; -1 asks for a new descriptor.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
        if fd < 0 {
            return Err(os_err("the signalfd")(()));
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd, outcome })
    }
}

impl MutEventSubscriber for SignalWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            log::error!("cannot watch SIGINT/SIGTERM: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // SAFETY: signalfd_siginfo is plain data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reading at most `size` bytes into `info`, which is that big.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            )
        };
        if n as usize == size {
            let signo = info.ssi_signo as i32;
            log::warn!("received signal {signo}; stopping the VM");
            self.outcome.report(VmOutcome::Signal(signo));
        }
    }
}

/// Ends the VM as a crash if it is still running after its timeout. The
/// thread leaves as soon as the `Deadline` is dropped.
struct Deadline {
    _stop: std::sync::mpsc::Sender<()>,
}

impl Deadline {
    fn start(timeout: Duration, outcome: Arc<OutcomeSink>) -> Self {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let spawned = std::thread::Builder::new()
            .name("vm-timeout".into())
            .spawn(move || {
                if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(timeout)
                {
                    outcome.report(VmOutcome::Crash {
                        vcpu: None,
                        reason: format!(
                            "no verdict from the guest within --timeout {} s (hung, or still booting)",
                            timeout.as_secs()
                        ),
                    });
                }
            });
        if let Err(e) = spawned {
            log::error!("cannot start the --timeout thread: {e}; the VM runs without a timeout");
        }
        Self { _stop: stop }
    }
}

/// An interrupt line of the in-kernel irqchip, raised through a KVM irqfd:
/// how a Linux guest hears from the cache-flush device.
struct IrqLine(EventFd);

impl IrqLine {
    fn new(vm_fd: &VmFd, gsi: u32) -> Result<Self, VmError> {
        let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VmError::Os {
            what: "an irqfd",
            source,
        })?;
        vm_fd
            .register_irqfd(&fd, gsi)
            .map_err(kvm_err("KVM_IRQFD"))?;
        Ok(Self(fd))
    }
}

impl VirtioInterrupt for IrqLine {
    fn signal_used_queue(&self, _queue_index: u16) {
        if let Err(e) = self.0.write(1) {
            log::warn!("cannot raise the device interrupt: {e}");
        }
    }
    fn signal_config_change(&self) {
        self.signal_used_queue(0);
    }
}

/// KVM's in-kernel PIC, IOAPIC, local APICs and PIT, which a Linux guest
/// needs (timer interrupts, SMP bring-up, device interrupts). The bundled
/// guest polls and runs without them.
fn create_interrupt_controllers(vm_fd: &VmFd) -> Result<(), VmError> {
    // VMX needs three pages for the real-mode TSS; in the MMIO hole, below
    // the IOAPIC, where no device lives.
    vm_fd
        .set_tss_address(0xfffb_d000)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm_fd
        .create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    // The dummy speaker port (0x61) keeps Linux's PIT calibration in the kernel.
    vm_fd
        .create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(kvm_err("KVM_CREATE_PIT2"))
}

/// The parts of a VM that only a Linux guest has: the host quirks, the
/// console watch, the UART's interrupt and the legacy platform ports.
struct LinuxGuest {
    quirks: HostQuirks,
    vcpu_quirks: Option<Arc<VcpuQuirks>>,
    syscall_remedy: Option<Arc<SyscallRemedy>>,
}

impl LinuxGuest {
    fn new(
        config: &VmConfig,
        vm_fd: &VmFd,
        ram: &GuestRam,
        outcome: &Arc<OutcomeSink>,
        pio: &mut Bus,
    ) -> Result<Self, VmError> {
        let quirks = HostQuirks::resolve(config.host_quirks);
        let syscall_remedy = quirks.active().then(|| {
            Arc::new(SyscallRemedy::new(
                ram.memory.clone(),
                linux::remedy_page(&ram.layout),
            ))
        });
        let vcpu_quirks = quirks.active().then(|| {
            Arc::new(VcpuQuirks {
                gaps: Default::default(),
                syscall_remedy: syscall_remedy.clone(),
            })
        });
        let lifecycle = Arc::new(GuestLifecycle::new(outcome.clone(), syscall_remedy.clone()));

        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VmError::Os {
            what: "the UART's irqfd",
            source,
        })?;
        vm_fd
            .register_irqfd(&irq, linux::SERIAL_GSI)
            .map_err(kvm_err("KVM_IRQFD"))?;
        let console = ConsoleWatch::new(SerialSink(config.serial_out.clone()), lifecycle.clone());
        let serial = SerialPort::with_interrupt(console, EventFdTrigger(irq));
        pio.insert(u64::from(SERIAL_PORT), 8, Arc::new(Mutex::new(serial)))?;

        use linux::acpi::{PM1A_EVT_PORT, RESET_PORT, RESET_VALUE};
        use linux::platform::{
            AbsentHardware, Pm1Blocks, ResetPort, ABSENT_PORT_RANGES, I8042_RESET_COMMAND,
        };
        pio.insert(
            u64::from(PM1A_EVT_PORT),
            8,
            Arc::new(Mutex::new(Pm1Blocks::default())),
        )?;
        let reset = ResetPort::new(lifecycle.clone(), RESET_VALUE);
        pio.insert(u64::from(RESET_PORT), 1, Arc::new(Mutex::new(reset)))?;
        let i8042 = ResetPort::new(lifecycle, I8042_RESET_COMMAND);
        pio.insert(0x64, 1, Arc::new(Mutex::new(i8042)))?;
        for &(base, len) in ABSENT_PORT_RANGES {
            pio.insert(
                u64::from(base),
                u64::from(len),
                Arc::new(Mutex::new(AbsentHardware)),
            )?;
        }
        Ok(Self {
            quirks,
            vcpu_quirks,
            syscall_remedy,
        })
    }

    /// The command line, `boot_params`, the initrd and the ACPI tables.
    fn write_boot(
        &self,
        config: &VmConfig,
        kernel: &linux::LinuxKernel,
        loaded: LoadedKernel,
        ram: &GuestRam,
        flush_entry: &DeviceEntry,
    ) -> Result<(), VmError> {
        boot::write_gdt_and_page_tables(&ram.memory, &ram.layout)?;
        let cmdline = linux::compose_cmdline(&config.cmdline, &self.quirks.kernel_parameters());
        log::info!("linux: command line: {cmdline}");
        let tables = linux::acpi::build(
            linux::ACPI_GPA,
            &linux::acpi::AcpiPlatform {
                vcpus: config.vcpus,
                serial: (SERIAL_PORT, linux::SERIAL_GSI),
                virtio_mmio: vec![(flush_entry.base, flush_entry.size, linux::FIRST_VIRTIO_GSI)],
            },
        );
        linux::write_boot(
            &ram.memory,
            &linux::LinuxBootSetup {
                kernel,
                loaded,
                initrd: config.initrd.as_deref(),
                cmdline: &cmdline,
                ram: &ram.layout,
                reserved: self.syscall_remedy.as_ref().map(|r| r.reserved()),
                acpi: Some(&tables),
            },
        )?;
        Ok(())
    }
}

/// Why this process cannot run a VM, or `None` if it can: `/dev/kvm` is
/// missing, or cannot be opened for reading and writing. The KVM tests
/// print it in their SKIPPED line; an embedder can ask before building a
/// VM ([`VmError::OpenKvm`] says less).
pub fn kvm_unavailable() -> Option<String> {
    unopenable(std::path::Path::new("/dev/kvm"))
}

/// Why `path` cannot be opened for reading and writing, or `None`.
fn unopenable(path: &std::path::Path) -> Option<String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(_) => None,
        Err(e) if !path.exists() => Some(format!("{} does not exist ({e})", path.display())),
        Err(e) => Some(format!("{} cannot be opened ({e})", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vcpu::control::RunState;

    #[test]
    fn a_missing_or_unopenable_device_says_why() {
        let dir = std::env::temp_dir();
        let missing = dir.join("no-such-kvm-device-here");
        let reason = unopenable(&missing).expect("a missing path cannot be opened");
        assert!(reason.contains("does not exist"), "{reason}");
        // A directory exists but cannot be opened for writing.
        let reason = unopenable(&dir).expect("a directory cannot be opened read-write");
        assert!(reason.contains("cannot be opened"), "{reason}");
    }

    #[test]
    fn a_failed_start_leaves_no_vcpu_thread_running() {
        if let Some(reason) = kvm_unavailable() {
            eprintln!("SKIPPED a_failed_start_leaves_no_vcpu_thread_running: needs KVM: {reason}");
            return;
        }
        let config = VmConfig {
            vcpus: 3,
            memory_mib: 16,
            cmdline: "scenario=spin".into(),
            serial_out: Some(Arc::new(Mutex::new(Vec::new()))),
            ..VmConfig::new(crate::BUNDLED_GUEST_KERNEL.to_vec())
        };
        let vm = Vm::new(&config).expect("VM set-up");
        let control = vm.control.clone();
        let mut started = 0;
        let result = vm.start_with(|name, vcpu| {
            if started == 1 {
                return Err(std::io::Error::other("refused by the test"));
            }
            started += 1;
            std::thread::Builder::new()
                .name(name)
                .spawn(move || vcpu.run())
        });
        assert!(matches!(result, Err(VmError::Os { .. })));
        // vCPU 0 was running; it must have been stopped and joined.
        assert_eq!(control.run_state(0), RunState::Exited);
        assert_eq!(control.run_state(1), RunState::NotStarted);
        assert_eq!(control.run_state(2), RunState::NotStarted);
    }
}
