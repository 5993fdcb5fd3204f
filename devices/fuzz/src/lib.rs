//! The harness shared by the fuzz targets of the `devices` crate.
//!
//! Everything here plays the hostile guest, using only the crate's public
//! interface, the way the VMM does: guest memory (`GuestMemoryMmap`, two small
//! regions), the virtio-mmio register window ([`BusDevice`] reads and writes
//! on an `MmioTransport<CacheFlushDevice>`), the queue eventfds (the ioeventfd
//! path), and the handler on a real `event_manager` loop with a fake flush
//! engine ([`CheckingFlusher`]) that checks the device's promises to the
//! VMM's flush engine.
//!
//! Invariants checked (a panic is a crash for libFuzzer):
//! * every extent handed to the flush engine is non-empty and lies inside one
//!   guest memory region (`GuestExtent`'s contract: the real engine flushes
//!   it through one host mapping, so anything else touches host memory
//!   outside guest RAM);
//! * the engine is never asked to flush an empty batch, nor more extents than
//!   the queues can hold requests times `max_segments`;
//! * the device-state mutex is not held while the engine runs (the flusher
//!   takes it: a held lock deadlocks, which libFuzzer reports as a timeout);
//! * a reset during a flush means no guest-memory write for that batch;
//! * after every event-loop run, every popped chain was answered exactly
//!   once (the metrics' request counters equal their outcome counters), and
//!   every rejection is counted under exactly one rule (`rejected_by_rule`
//!   adds up to the rejections by status);
//! * during an event-loop run (when the harness knows the ring layout and no
//!   flush hook writes memory), the device writes guest memory only in the
//!   used rings of ready queues and at the first byte of non-empty
//!   device-writable descriptors it could have read (as they were before the
//!   run, or as its own writes during the run may have made them: a used
//!   ring may overlap a descriptor table), each such byte a status value, no
//!   more of them than answers given;
//! * the transport's status bits stay in initialisation order, FEATURES_OK
//!   implies an acceptable feature set, and the device runs exactly when
//!   DRIVER_OK is set without DEVICE_NEEDS_RESET;
//! * register reads change nothing and return the fixed values where there
//!   are some (identification, configuration space, zeros for bad shapes);
//!   writes the transport must ignore change nothing.
//!
//! Half the inputs also format every log line (into a sink), so that the
//! guest-controlled values in them are exercised too.

use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use cache_flush_abi::cache_flush::{Config, F_FULL, F_RANGE, F_VERSION_1, QUEUE_SIZE_MAX};
use devices::bus::BusDevice;
use devices::cache_flush::{
    BatchCompletion, CacheFlushDevice, CacheFlushMetrics, CacheFlushSettings, FlushBackend,
    FlushBatch, FlushError, MetricsSnapshot,
};
use devices::virtio::mmio::MmioTransport;
use devices::virtio::{NoInterrupt, VirtioDevice};
use event_manager::{EventManager, SubscriberOps};
use virtio_bindings::virtio_mmio::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Size of each of the two guest memory regions.
pub const REGION_SIZE: u64 = 0x1_0000;
/// In region 0, queue `i`'s default rings live at `i * QUEUE_AREA_STRIDE`.
const QUEUE_AREA_STRIDE: u64 = 0x2000;
/// The most queues the harness creates (4 × 0x2000 fits below the buffers).
pub const MAX_FUZZ_QUEUES: u16 = 4;
/// Request buffers in region 0 start here (above the default rings).
const BUFFERS_REGION0: u64 = MAX_FUZZ_QUEUES as u64 * QUEUE_AREA_STRIDE;
/// Bound on the actions of one input, to keep executions fast.
pub const MAX_ACTIONS: usize = 96;

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT: u16 = 4;

// ------------------------------------------------------------------ memory --

/// Where the two 64 KiB regions are.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `[0, 64K)` and `[128K, 192K)`: a hole between them.
    Hole,
    /// `[0, 64K)` and `[64K, 128K)`: contiguous, but still two regions (a
    /// segment must not straddle them).
    Adjacent,
    /// `[0, 64K)` and a region that ends at `u64::MAX` (exclusive): address
    /// arithmetic at the top of the address space.
    Top,
}

impl Layout {
    /// Guest-physical bases of region 0 and region 1.
    pub fn bases(self) -> [u64; 2] {
        match self {
            Layout::Hole => [0, 2 * REGION_SIZE],
            Layout::Adjacent => [0, REGION_SIZE],
            Layout::Top => [0, u64::MAX - REGION_SIZE],
        }
    }
}

/// Guest memory plus the addresses the harness uses to place things.
#[derive(Clone)]
pub struct Memory {
    /// The guest memory the device is given.
    pub mem: GuestMemoryMmap,
    /// Base of each region.
    pub bases: [u64; 2],
}

impl Memory {
    /// Two zeroed regions laid out as `layout` says.
    pub fn new(layout: Layout) -> Self {
        let bases = layout.bases();
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(bases[0]), REGION_SIZE as usize),
            (GuestAddress(bases[1]), REGION_SIZE as usize),
        ])
        .expect("guest memory");
        Self { mem, bases }
    }

    /// An address inside region `second as usize`.
    pub fn addr(&self, second: bool, offset: u64) -> u64 {
        self.bases[usize::from(second)] + offset % REGION_SIZE
    }

    /// The exclusive end of region `second as usize` (fits: the Top region
    /// ends at `u64::MAX`).
    pub fn end(&self, second: bool) -> u64 {
        self.bases[usize::from(second)] + REGION_SIZE
    }

    /// Best-effort guest write: what falls outside memory is dropped, like a
    /// guest store to unbacked space.
    pub fn write(&self, addr: u64, bytes: &[u8]) {
        for (i, chunk) in bytes.chunks(256).enumerate() {
            let at = addr.wrapping_add(i as u64 * 256);
            if self.mem.write_slice(chunk, GuestAddress(at)).is_err() {
                for (j, b) in chunk.iter().enumerate() {
                    let _ = self
                        .mem
                        .write_obj(*b, GuestAddress(at.wrapping_add(j as u64)));
                }
            }
        }
    }

    /// Best-effort 16-bit guest write.
    pub fn write_u16(&self, addr: u64, value: u16) {
        self.write(addr, &value.to_le_bytes());
    }

    /// Best-effort 16-bit guest read (0 outside memory).
    pub fn read_u16(&self, addr: u64) -> u16 {
        self.mem.read_obj(GuestAddress(addr)).unwrap_or(0)
    }

    /// The bytes of region `region` as they are now. Only for comparisons
    /// while nothing runs: the harness is single-threaded and the device
    /// writes guest memory only inside the event loop or the flusher.
    pub fn region_bytes(&self, region: usize) -> &[u8] {
        let host = self
            .mem
            .get_host_address(GuestAddress(self.bases[region]))
            .expect("region base is mapped");
        // SAFETY: `host` is the start of a live 64 KiB mapping owned by
        // `self.mem` (each region is one `MmapRegion`), which outlives the
        // borrow of `self`; nothing writes guest memory while the caller (on
        // this single thread, outside the event loop) reads it. A plain slice
        // is much faster under ASan than vm-memory's volatile accessors.
        unsafe { std::slice::from_raw_parts(host, REGION_SIZE as usize) }
    }

    /// Both regions' bytes into `out` (reused, to keep large allocations out
    /// of the fuzzing loop).
    pub fn snapshot_into(&self, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(self.region_bytes(0));
        out.extend_from_slice(self.region_bytes(1));
    }

    /// True if memory still holds `snapshot`.
    pub fn unchanged_since(&self, snapshot: &[u8]) -> bool {
        let (a, b) = snapshot.split_at(REGION_SIZE as usize);
        a == self.region_bytes(0) && b == self.region_bytes(1)
    }

    /// Panics unless `[addr, addr + len)` is non-empty and inside one region.
    pub fn assert_extent_in_one_region(&self, addr: u64, len: u64) {
        assert!(
            len > 0,
            "empty extent at {addr:#x} handed to the flush engine"
        );
        let region = self
            .mem
            .find_region(GuestAddress(addr))
            .unwrap_or_else(|| panic!("extent {addr:#x}+{len:#x} starts outside guest memory"));
        let last = addr
            .checked_add(len - 1)
            .unwrap_or_else(|| panic!("extent {addr:#x}+{len:#x} wraps the address space"));
        assert!(
            last <= region.last_addr().0,
            "extent {addr:#x}+{len:#x} leaves its region [{:#x}, {:#x}]",
            region.start_addr().0,
            region.last_addr().0
        );
    }
}

/// Raw bytes written into guest memory.
#[derive(Arbitrary, Clone, Debug)]
pub struct Patch {
    /// Region 1 instead of region 0.
    pub second: bool,
    /// Offset in the region (a u16 spans the whole 64 KiB).
    pub offset: u16,
    /// The bytes (may run past the region's end).
    pub bytes: Vec<u8>,
}

impl Patch {
    /// Applies the patch.
    pub fn apply(&self, memory: &Memory) {
        memory.write(
            memory.addr(self.second, u64::from(self.offset)),
            &self.bytes,
        );
    }
}

// ---------------------------------------------------------------- settings --

/// The device's settings (the VMM's choice, not the guest's, but part of the
/// space worth exploring).
#[derive(Arbitrary, Clone, Debug)]
pub struct SettingsSpec {
    /// Number of queues, 1..=MAX_FUZZ_QUEUES.
    pub queues: u8,
    /// Offer F_FULL.
    pub full_flush: bool,
    /// `max_segments`: 1..=255, or the limit (65536) for 255.
    pub max_segments: u8,
    /// `max_bytes`.
    pub max_bytes: MaxBytes,
    /// `full_per_sec_limit` (0..=3).
    pub full_rate: u8,
    /// `range_bytes_per_sec_limit`.
    pub range_rate: RangeRate,
}

/// `max_bytes` choices.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum MaxBytes {
    /// The default, 1 GiB.
    Default,
    /// 1 + the value.
    Small(u16),
    /// `u64::MAX`.
    Max,
}

/// `range_bytes_per_sec_limit` choices.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum RangeRate {
    /// Unlimited.
    Unlimited,
    /// 1 + the value.
    Small(u16),
}

impl SettingsSpec {
    /// Valid device settings.
    pub fn settings(&self) -> CacheFlushSettings {
        CacheFlushSettings {
            num_queues: 1 + u16::from(self.queues) % MAX_FUZZ_QUEUES,
            full_flush: self.full_flush,
            cache_line_size: 64,
            max_segments: match self.max_segments {
                255 => devices::cache_flush::device::MAX_SEGMENTS_LIMIT,
                n => 1 + u32::from(n),
            },
            max_bytes: match self.max_bytes {
                MaxBytes::Default => 1 << 30,
                MaxBytes::Small(n) => 1 + u64::from(n),
                MaxBytes::Max => u64::MAX,
            },
            full_flush_cost_ns: 0,
            full_break_even_bytes: 0,
            full_per_sec_limit: u64::from(self.full_rate % 4),
            range_bytes_per_sec_limit: match self.range_rate {
                RangeRate::Unlimited => 0,
                RangeRate::Small(n) => 1 + u64::from(n),
            },
        }
    }
}

/// A register value: small values (status bit sets, selectors, queue
/// indexes, 0/1) are what most branches compare against, so they get their
/// own variant instead of hoping for three zero bytes in a random word.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum Value {
    /// 0..=255.
    Small(u8),
    /// A power of two (a single bit), `1 << (n % 64)`.
    Bit(u8),
    /// Anything.
    Raw(u64),
}

impl Value {
    /// The 64-bit value.
    pub fn get(self) -> u64 {
        match self {
            Value::Small(v) => u64::from(v),
            Value::Bit(n) => 1 << (n % 64),
            Value::Raw(v) => v,
        }
    }

    /// The low 32 bits.
    pub fn get32(self) -> u32 {
        self.get() as u32
    }
}

// ----------------------------------------------------------------- flusher --

/// What the fake flush engine does with a batch.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// Answers `Ok`.
    Ok,
    /// Answers `Err` (HOST_ERROR).
    Fail,
    /// Drops the completion unanswered (a back-end bug: the completion
    /// answers HOST_ERROR itself).
    NoComplete,
    /// Answers `Ok`. This was "complete twice", which the completion's type
    /// now rules out (answering consumes it); the variant stays so recorded
    /// inputs decode as before.
    DoubleComplete,
}

/// Something that happens while the engine holds a batch, before it
/// completes it: vCPUs not yet parked still run.
#[derive(Arbitrary, Clone, Debug)]
pub enum Hook {
    /// A guest store.
    Patch(Patch),
    /// The driver resets the device (Status = 0).
    Reset,
    /// Any register write.
    Register {
        /// Register offset / 4.
        word: u8,
        /// Value.
        value: Value,
    },
    /// The driver re-publishes the `count` (1..=16) ring slots after the
    /// current available index (whatever heads they hold): requests arriving
    /// during the flush, served by the handler's next round.
    Republish {
        /// Queue (modulo the queue count).
        queue: u8,
        /// How many.
        count: u8,
    },
}

/// The fake engine's controls and record.
pub struct FlushControl {
    /// What the next flushes do.
    pub behaviour: Behaviour,
    /// Run (and consumed) by the next flush, before it completes.
    pub hooks: Vec<Hook>,
    /// Run by every flush, before it completes (a guest that keeps its
    /// queues busy: the handler's round budget).
    pub persistent: Vec<Hook>,
    /// Flushes performed.
    pub calls: usize,
    /// Each queue's available ring address and size, as the driver set it
    /// up (for [`Hook::Republish`]).
    pub avail_rings: Vec<(u64, u16)>,
}

/// A flush engine that checks every batch against guest memory.
pub struct CheckingFlusher {
    memory: Memory,
    control: Arc<Mutex<FlushControl>>,
    transport: Arc<Mutex<MmioTransport<CacheFlushDevice>>>,
    max_extents: u64,
}

impl FlushBackend for CheckingFlusher {
    fn flush(&self, batch: &FlushBatch, done: BatchCompletion) {
        assert!(!batch.is_empty(), "the flush engine got an empty batch");
        for extent in &batch.extents {
            self.memory
                .assert_extent_in_one_region(extent.addr.0, extent.len);
        }
        assert!(
            batch.extents.len() as u64 <= self.max_extents,
            "{} extents in one batch, more than the queues can carry",
            batch.extents.len()
        );
        let (behaviour, hooks) = {
            let mut control = self.control.lock().unwrap();
            control.calls += 1;
            let mut hooks = std::mem::take(&mut control.hooks);
            hooks.extend_from_slice(&control.persistent);
            (control.behaviour, hooks)
        };
        // The device-state lock must be free while the engine runs: this
        // takes it (through the transport, as a vCPU's MMIO exit would).
        let _ = self.transport.lock().unwrap().device().is_active();

        let mut reset = false;
        for hook in &hooks {
            match hook {
                Hook::Patch(patch) => patch.apply(&self.memory),
                Hook::Reset => {
                    write_reg(&self.transport, VIRTIO_MMIO_STATUS, 0);
                    reset = true;
                }
                Hook::Register { word, value } => {
                    write_reg(&self.transport, u32::from(*word) * 4, value.get32());
                }
                Hook::Republish { queue, count } => {
                    let rings = self.control.lock().unwrap().avail_rings.clone();
                    if let Some(&(avail, _)) = rings.get(usize::from(*queue) % rings.len().max(1)) {
                        let idx_addr = avail.wrapping_add(2);
                        let idx = self.memory.read_u16(idx_addr);
                        let bump = 1 + u16::from(*count % 16);
                        self.memory.write_u16(idx_addr, idx.wrapping_add(bump));
                    }
                }
            }
        }
        let before = reset.then(|| {
            let mut snapshot = Vec::new();
            self.memory.snapshot_into(&mut snapshot);
            snapshot
        });
        match behaviour {
            Behaviour::Ok | Behaviour::DoubleComplete => done.complete(Ok(())),
            Behaviour::Fail => done.complete(Err(FlushError {
                reason: "fuzz: told to fail".into(),
            })),
            Behaviour::NoComplete => drop(done),
        }
        if let Some(before) = before {
            assert!(
                self.memory.unchanged_since(&before),
                "guest memory written for a batch completed after a device reset"
            );
        }
    }
}

fn write_reg(transport: &Mutex<MmioTransport<CacheFlushDevice>>, offset: u32, value: u32) {
    transport
        .lock()
        .unwrap()
        .write(u64::from(offset), &value.to_le_bytes());
}

fn read_reg(transport: &Mutex<MmioTransport<CacheFlushDevice>>, offset: u32) -> u32 {
    let mut b = [0u8; 4];
    transport.lock().unwrap().read(u64::from(offset), &mut b);
    u32::from_le_bytes(b)
}

// ------------------------------------------------------------------ driver --

/// Features the driver accepts.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum FeatureSpec {
    /// RANGE | FULL | VERSION_1 (FULL refused if not offered).
    All,
    /// RANGE | VERSION_1.
    RangeOnly,
    /// FULL | VERSION_1.
    FullOnly,
    /// Anything.
    Raw(u64),
}

impl FeatureSpec {
    /// The 64 feature bits the driver writes.
    pub fn bits(self) -> u64 {
        let v1 = 1u64 << F_VERSION_1;
        match self {
            FeatureSpec::All => v1 | (1 << F_RANGE) | (1 << F_FULL),
            FeatureSpec::RangeOnly => v1 | (1 << F_RANGE),
            FeatureSpec::FullOnly => v1 | (1 << F_FULL),
            FeatureSpec::Raw(bits) => bits,
        }
    }
}

/// Where a ring goes.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum RingAddr {
    /// The queue's default, valid spot in region 0.
    Auto,
    /// Somewhere in a region (maybe misaligned, maybe overlapping others).
    Region {
        /// Region 1.
        second: bool,
        /// Offset.
        offset: u16,
    },
    /// Anything, in memory or not.
    Raw(u64),
}

/// How the driver sets up one queue.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub struct QueueSpec {
    /// QueueReady = 1 (a queue the driver leaves alone is not ready).
    pub enable: bool,
    /// QueueNum = 1 << (size_log2 % 10): 1..=512 (512 is refused).
    pub size_log2: u8,
    /// Descriptor table.
    pub desc: RingAddr,
    /// Driver area (available ring).
    pub avail: RingAddr,
    /// Device area (used ring).
    pub used: RingAddr,
    /// The available ring's starting `idx` (the device starts at 0).
    pub avail_start: Option<u16>,
}

impl Default for QueueSpec {
    fn default() -> Self {
        Self {
            enable: true,
            size_log2: 4,
            desc: RingAddr::Auto,
            avail: RingAddr::Auto,
            used: RingAddr::Auto,
            avail_start: None,
        }
    }
}

/// The driver's view of one queue.
#[derive(Clone, Copy, Debug, Default)]
pub struct DriverQueue {
    /// The size the transport holds.
    pub size: u16,
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
    /// Next free descriptor index.
    pub next_desc: u16,
    /// Next available ring index.
    pub avail_idx: u16,
    /// The driver set QueueReady.
    pub ready: bool,
}

/// The readable part of a request.
#[derive(Arbitrary, Clone, Debug)]
pub struct RequestSpec {
    /// The header's type.
    pub kind: Kind,
    /// Non-zero flags, if any.
    pub flags: Option<u32>,
    /// Tag.
    pub tag: u64,
    /// Segments.
    pub segments: Vec<SegSpec>,
    /// Bytes after the segments (a partial segment, garbage).
    pub extra: Vec<u8>,
}

/// The header's type field.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum Kind {
    /// FLUSH_RANGE.
    Range,
    /// FLUSH_ALL.
    All,
    /// Anything.
    Raw(u32),
}

/// One segment.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub struct SegSpec {
    /// Address.
    pub addr: SegAddr,
    /// Length.
    pub len: SegLen,
}

/// A segment's address.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum SegAddr {
    /// Inside a region.
    Region {
        /// Region 1.
        second: bool,
        /// Offset.
        offset: u16,
    },
    /// `back` bytes before a region's end.
    FromEnd {
        /// Region 1.
        second: bool,
        /// Distance to the end.
        back: u16,
    },
    /// Anything.
    Raw(u64),
}

/// A segment's length.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum SegLen {
    /// A small length (0 included).
    Small(u16),
    /// Up to the end of the region holding the address, plus `delta`.
    ToEnd(i8),
    /// Anything.
    Raw(u64),
}

/// A corruption of one descriptor of a chain, after it was laid out.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub struct Tweak {
    /// Which descriptor (modulo the chain's length).
    pub index: u8,
    /// What to change.
    pub kind: TweakKind,
}

/// The corrupted field.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum TweakKind {
    /// flags ^= value.
    Flags(u16),
    /// next = value.
    Next(u16),
    /// addr = value.
    Addr(u64),
    /// len = value.
    Len(u32),
}

/// How a chain is published.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum Publish {
    /// Its head goes on the available ring.
    Head,
    /// Not published (descriptors only).
    Hidden,
    /// This index goes on the available ring instead.
    Other(u16),
}

/// One request chain the driver builds.
#[derive(Arbitrary, Clone, Debug)]
pub struct ChainSpec {
    /// Queue (modulo the queue count).
    pub queue: u8,
    /// Readable part.
    pub request: RequestSpec,
    /// Sizes of the readable descriptors the stream is cut into (0 allowed);
    /// the rest goes in one last readable descriptor.
    pub split: Vec<u8>,
    /// Lengths of the writable descriptors (the first non-empty one gets the
    /// status).
    pub writable: Vec<u8>,
    /// No 1-byte status descriptor after `writable` (otherwise one is added,
    /// as a well-behaved driver would).
    pub no_status: bool,
    /// Buffers in region 1.
    pub second_region: bool,
    /// Through an indirect table.
    pub indirect: bool,
    /// Zero-length readable descriptors put before the request: `n % 8`, or
    /// for `n >= 0xf0` about 1024 (the chain-length limit; reachable through
    /// an indirect table).
    pub padding: u8,
    /// Corruptions.
    pub tweaks: Vec<Tweak>,
    /// Publication.
    pub publish: Publish,
}

/// Guest memory, the transport with the device, the handler on an event
/// loop, and the driver's bookkeeping.
pub struct Harness {
    /// Guest memory.
    pub memory: Memory,
    /// The transport (shared with the flusher, which resets through it).
    pub transport: Arc<Mutex<MmioTransport<CacheFlushDevice>>>,
    /// The loop running the handler.
    pub event_manager: EventManager<devices::cache_flush::QueueWorker>,
    /// The fake engine's controls.
    pub control: Arc<Mutex<FlushControl>>,
    /// The device's counters.
    pub metrics: Arc<CacheFlushMetrics>,
    /// The settings the device was built with.
    pub settings: CacheFlushSettings,
    /// Per queue, as the driver set it up.
    pub queues: Vec<DriverQueue>,
    /// Request buffer cursors, per region.
    cursors: [u64; 2],
    /// `queues` is what the transport holds: no register write since the
    /// last [`Harness::init`] could have moved a ring.
    pub layout_known: bool,
    /// Reused snapshot buffer.
    scratch: Vec<u8>,
}

impl Harness {
    /// A device built from `settings` over `layout`, not yet initialised.
    pub fn new(layout: Layout, settings: &SettingsSpec) -> Self {
        let memory = Memory::new(layout);
        let settings = settings.settings();
        let device = CacheFlushDevice::new(settings.clone()).expect("valid settings");
        let metrics = device.metrics();
        let control = Arc::new(Mutex::new(FlushControl {
            behaviour: Behaviour::Ok,
            hooks: Vec::new(),
            persistent: Vec::new(),
            calls: 0,
            avail_rings: Vec::new(),
        }));
        let transport = Arc::new(Mutex::new(
            MmioTransport::new(device, memory.mem.clone(), Arc::new(NoInterrupt))
                .expect("transport"),
        ));
        let flusher = CheckingFlusher {
            memory: memory.clone(),
            control: control.clone(),
            transport: transport.clone(),
            max_extents: u64::from(settings.num_queues)
                * u64::from(QUEUE_SIZE_MAX)
                * u64::from(settings.max_segments),
        };
        let handler = transport
            .lock()
            .unwrap()
            .device()
            .queue_worker(Box::new(flusher));
        let mut event_manager = EventManager::new().expect("epoll");
        event_manager.add_subscriber(handler);
        Self {
            memory,
            transport,
            event_manager,
            control,
            metrics,
            settings,
            queues: Vec::new(),
            cursors: [BUFFERS_REGION0, 0],
            layout_known: false,
            scratch: Vec::new(),
        }
    }

    /// Number of queues the device offers.
    pub fn num_queues(&self) -> u16 {
        self.settings.num_queues
    }

    /// A 32-bit register write.
    pub fn write32(&self, offset: u32, value: u32) {
        write_reg(&self.transport, offset, value);
    }

    /// A 32-bit register read.
    pub fn read32(&self, offset: u32) -> u32 {
        read_reg(&self.transport, offset)
    }

    /// The standard initialisation (virtio §3.1.1), with the given features
    /// and queue layouts (`queues[i]` for queue `i`, default when missing).
    /// Returns whether the device ended up running.
    pub fn init(&mut self, features: u64, queues: &[QueueSpec]) -> bool {
        self.negotiate(features);
        self.queues.clear();
        for i in 0..self.num_queues() {
            let spec = queues.get(usize::from(i)).copied().unwrap_or_default();
            let queue = self.setup_queue(i, &spec);
            self.queues.push(queue);
        }
        self.write32(VIRTIO_MMIO_STATUS, 1 | 2 | 4 | 8);
        self.control.lock().unwrap().avail_rings =
            self.queues.iter().map(|q| (q.avail, q.size)).collect();
        self.layout_known = true;
        self.check_transport();
        self.transport.lock().unwrap().device().is_active()
    }

    /// Reset, then initialisation up to FEATURES_OK (§3.1.1 steps 1-6).
    pub fn negotiate(&mut self, features: u64) {
        self.write32(VIRTIO_MMIO_STATUS, 0);
        self.write32(VIRTIO_MMIO_STATUS, 1);
        self.write32(VIRTIO_MMIO_STATUS, 1 | 2);
        self.write32(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        let _ = self.read32(VIRTIO_MMIO_DEVICE_FEATURES);
        self.write32(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        self.write32(VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
        self.write32(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        self.write32(VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
        self.write32(VIRTIO_MMIO_STATUS, 1 | 2 | 8);
        self.check_transport();
    }

    fn ring_addr(&self, spec: RingAddr, default: u64) -> u64 {
        match spec {
            RingAddr::Auto => default,
            RingAddr::Region { second, offset } => self.memory.addr(second, u64::from(offset)),
            RingAddr::Raw(addr) => addr,
        }
    }

    fn setup_queue(&mut self, index: u16, spec: &QueueSpec) -> DriverQueue {
        let area = self
            .memory
            .addr(false, u64::from(index) * QUEUE_AREA_STRIDE);
        let desc = self.ring_addr(spec.desc, area);
        let avail = self.ring_addr(spec.avail, area + 0x1000);
        let used = self.ring_addr(spec.used, area + 0x1400);
        let requested = 1u32 << (spec.size_log2 % 10);
        self.write32(VIRTIO_MMIO_QUEUE_SEL, u32::from(index));
        self.write32(VIRTIO_MMIO_QUEUE_NUM, requested);
        // The transport keeps its default (the maximum) for a refused size.
        let size = if requested <= u32::from(QUEUE_SIZE_MAX) {
            requested as u16
        } else {
            QUEUE_SIZE_MAX
        };
        self.write32(VIRTIO_MMIO_QUEUE_DESC_LOW, desc as u32);
        self.write32(VIRTIO_MMIO_QUEUE_DESC_HIGH, (desc >> 32) as u32);
        self.write32(VIRTIO_MMIO_QUEUE_AVAIL_LOW, avail as u32);
        self.write32(VIRTIO_MMIO_QUEUE_AVAIL_HIGH, (avail >> 32) as u32);
        self.write32(VIRTIO_MMIO_QUEUE_USED_LOW, used as u32);
        self.write32(VIRTIO_MMIO_QUEUE_USED_HIGH, (used >> 32) as u32);
        let start = spec.avail_start.unwrap_or(0);
        // flags = 0, idx = start; used flags and idx = 0.
        self.memory.write(avail, &[0, 0]);
        self.memory.write_u16(avail.wrapping_add(2), start);
        self.memory.write(used, &[0, 0, 0, 0]);
        if spec.enable {
            self.write32(VIRTIO_MMIO_QUEUE_READY, 1);
        }
        DriverQueue {
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: start,
            ready: spec.enable,
        }
    }

    /// `len` bytes of request buffer in a region (wrapping around when the
    /// area is used up: later requests may overwrite earlier ones, which a
    /// hostile guest may do anyway).
    fn alloc(&mut self, second: bool, len: u64) -> u64 {
        let r = usize::from(second);
        let start = if second { 0 } else { BUFFERS_REGION0 };
        let room = REGION_SIZE - start;
        let len = len.min(room);
        if self.cursors[r] + len > REGION_SIZE {
            self.cursors[r] = start;
        }
        let offset = self.cursors[r];
        self.cursors[r] += len;
        self.memory.bases[r] + offset
    }

    fn segment_addr(&self, addr: SegAddr) -> u64 {
        match addr {
            SegAddr::Region { second, offset } => self.memory.addr(second, u64::from(offset)),
            SegAddr::FromEnd { second, back } => {
                let back = u64::from(back) % REGION_SIZE;
                self.memory.end(second) - back.max(1)
            }
            SegAddr::Raw(addr) => addr,
        }
    }

    fn segment_len(&self, addr: u64, len: SegLen) -> u64 {
        match len {
            SegLen::Small(n) => u64::from(n),
            SegLen::ToEnd(delta) => {
                let end = self
                    .memory
                    .mem
                    .find_region(GuestAddress(addr))
                    .map_or(addr.wrapping_add(1), |r| r.last_addr().0.wrapping_add(1));
                let to_end = end.wrapping_sub(addr);
                to_end.wrapping_add(delta as i64 as u64)
            }
            SegLen::Raw(n) => n,
        }
    }

    /// The readable bytes of `spec`.
    pub fn request_bytes(&self, spec: &RequestSpec) -> Vec<u8> {
        let kind = match spec.kind {
            Kind::Range => 1,
            Kind::All => 2,
            Kind::Raw(raw) => raw,
        };
        let mut out = Vec::with_capacity(16 + 16 * spec.segments.len() + spec.extra.len());
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(&spec.flags.unwrap_or(0).to_le_bytes());
        out.extend_from_slice(&spec.tag.to_le_bytes());
        for seg in &spec.segments {
            let addr = self.segment_addr(seg.addr);
            let len = self.segment_len(addr, seg.len);
            out.extend_from_slice(&addr.to_le_bytes());
            out.extend_from_slice(&len.to_le_bytes());
        }
        out.extend_from_slice(&spec.extra);
        out
    }

    /// Lays out `spec` in memory and (usually) publishes it. Does nothing if
    /// the device has no queues set up.
    pub fn submit(&mut self, spec: &ChainSpec) {
        if self.queues.is_empty() {
            return;
        }
        let q = usize::from(spec.queue) % self.queues.len();
        let bytes = self.request_bytes(&spec.request);

        // (addr, len, flags) of each descriptor, in chain order.
        let mut descs: Vec<(u64, u32, u16)> = Vec::new();
        let pad_at = self.memory.addr(spec.second_region, 0);
        let padding = match spec.padding {
            n @ 0xf0.. => 1020 + usize::from(n & 0xf),
            n => usize::from(n % 8),
        };
        descs.extend((0..padding).map(|_| (pad_at, 0, 0)));
        let mut rest = &bytes[..];
        for &cut in &spec.split {
            let n = usize::from(cut).min(rest.len());
            let addr = self.alloc(spec.second_region, n as u64);
            self.memory.write(addr, &rest[..n]);
            descs.push((addr, n as u32, 0));
            rest = &rest[n..];
        }
        if !rest.is_empty() || spec.split.is_empty() {
            let addr = self.alloc(spec.second_region, rest.len() as u64);
            self.memory.write(addr, rest);
            descs.push((addr, rest.len() as u32, 0));
        }
        let status = (!spec.no_status).then_some(1u8);
        for &len in spec.writable.iter().chain(status.iter()) {
            let addr = self.alloc(spec.second_region, u64::from(len));
            // 0xff: an unwritten status byte is visible.
            self.memory.write(addr, &vec![0xff; usize::from(len)]);
            descs.push((addr, u32::from(len), WRITE));
        }
        let queue = self.queues[q];
        let size = queue.size.max(1);
        let count = descs.len();

        // Descriptor indexes: consecutive in the queue's table, or 0.. in an
        // indirect table.
        let (table, first, table_len): (u64, u16, u16) = if spec.indirect {
            let table = self.alloc(spec.second_region, 16 * count as u64);
            (table, 0, u16::MAX)
        } else {
            (queue.desc, queue.next_desc % size, size)
        };
        let index = |i: usize| -> u16 {
            if spec.indirect {
                i as u16
            } else {
                ((usize::from(first) + i) % usize::from(table_len)) as u16
            }
        };
        let mut raw: Vec<[u8; 16]> = Vec::with_capacity(count);
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let last = i + 1 == count;
            let flags = if last { flags } else { flags | NEXT };
            let next = if last { 0 } else { index(i + 1) };
            raw.push(descriptor(addr, len, flags, next));
        }
        for tweak in &spec.tweaks {
            if raw.is_empty() {
                break;
            }
            let at = usize::from(tweak.index) % raw.len();
            let d = &mut raw[at];
            match tweak.kind {
                TweakKind::Flags(x) => {
                    let f = u16::from_le_bytes([d[12], d[13]]) ^ x;
                    d[12..14].copy_from_slice(&f.to_le_bytes());
                }
                TweakKind::Next(n) => d[14..16].copy_from_slice(&n.to_le_bytes()),
                TweakKind::Addr(a) => d[0..8].copy_from_slice(&a.to_le_bytes()),
                TweakKind::Len(l) => d[8..12].copy_from_slice(&l.to_le_bytes()),
            }
        }
        for (i, d) in raw.iter().enumerate() {
            let at = table.wrapping_add(16 * u64::from(index(i)));
            self.memory.write(at, d);
        }
        let head = if spec.indirect {
            let head = queue.next_desc % size;
            let d = descriptor(table, 16 * count as u32, INDIRECT, 0);
            self.memory
                .write(queue.desc.wrapping_add(16 * u64::from(head)), &d);
            self.queues[q].next_desc = (head + 1) % size;
            head
        } else {
            self.queues[q].next_desc =
                ((usize::from(first) + count.max(1)) % usize::from(size)) as u16;
            first
        };
        match spec.publish {
            Publish::Head => self.publish(q, head),
            Publish::Hidden => {}
            Publish::Other(other) => self.publish(q, other),
        }
    }

    /// Puts `head` on queue `q`'s available ring.
    pub fn publish(&mut self, q: usize, head: u16) {
        let queue = &mut self.queues[q];
        let size = queue.size.max(1);
        let slot = queue
            .avail
            .wrapping_add(4 + 2 * u64::from(queue.avail_idx % size));
        let idx = queue.avail_idx.wrapping_add(1);
        queue.avail_idx = idx;
        let (avail, memory) = (queue.avail, &self.memory);
        memory.write_u16(slot, head);
        memory.write_u16(avail.wrapping_add(2), idx);
    }

    /// Sets queue `q`'s available index (driver-side too).
    pub fn set_avail_idx(&mut self, q: usize, idx: u16) {
        if let Some(queue) = self.queues.get_mut(q) {
            queue.avail_idx = idx;
            let avail = queue.avail;
            self.memory.write_u16(avail.wrapping_add(2), idx);
        }
    }

    /// QueueNotify through the transport.
    pub fn notify(&self, queue: u8) {
        self.write32(VIRTIO_MMIO_QUEUE_NOTIFY, u32::from(queue));
    }

    /// The ioeventfd path: KVM writes the eventfd whatever the device state.
    pub fn kick(&self, queue: u8) {
        let transport = self.transport.lock().unwrap();
        let fds = transport.queue_notify_eventfds();
        let (_, fd) = fds[usize::from(queue) % fds.len()];
        let _ = fd.write(1);
    }

    /// One pass of the event loop (non-blocking), then the checks that hold
    /// whenever no flush is in progress.
    pub fn run(&mut self) {
        // Guest-memory writes are checked when the harness knows where the
        // used rings are and nothing but the device writes memory meanwhile
        // (no flush hooks pending).
        let watch = self.layout_known && {
            let control = self.control.lock().unwrap();
            control.hooks.is_empty() && control.persistent.is_empty()
        };
        let mut before = std::mem::take(&mut self.scratch);
        let metrics = self.metrics.snapshot();
        if watch {
            self.memory.snapshot_into(&mut before);
        }
        self.event_manager.run_with_timeout(0).expect("event loop");
        if watch {
            self.check_device_writes(&before, &metrics);
        }
        self.scratch = before;
        self.check_metrics();
        self.check_transport();
    }

    /// The device wrote guest memory only in the used rings of ready queues
    /// and in status bytes: outside the rings, each changed byte holds a
    /// status value, and there are no more of them than answers given.
    fn check_device_writes(&self, before: &[u8], metrics_before: &MetricsSnapshot) {
        if self.memory.unchanged_since(before) {
            return;
        }
        let m = self.metrics.snapshot().since(metrics_before);
        let answers = m.completed_ok
            + m.rejected_invalid
            + m.rejected_unsupported
            + m.rejected_out_of_range
            + m.rejected_too_large
            + m.rejected_busy
            + m.completed_host_error;
        let rings: Vec<(u128, u128)> = self
            .queues
            .iter()
            .filter(|q| q.ready)
            .map(|q| {
                let start = u128::from(q.used);
                (start, start + 6 + 8 * u128::from(q.size))
            })
            .collect();
        let (before0, before1) = before.split_at(REGION_SIZE as usize);
        let mut changed = Vec::new();
        changed_bytes(before0, self.memory.region_bytes(0), 0, &mut changed);
        changed_bytes(before1, self.memory.region_bytes(1), 1, &mut changed);
        let outside_rings: Vec<(u64, u8)> = changed
            .into_iter()
            .map(|(region, offset, new)| (self.memory.bases[region] + offset, new))
            .filter(|&(addr, _)| {
                !rings
                    .iter()
                    .any(|&(start, end)| (start..end).contains(&u128::from(addr)))
            })
            .collect();
        if outside_rings.is_empty() {
            return;
        }
        for &(addr, new) in &outside_rings {
            assert!(
                new <= 6,
                "the device wrote {new:#x} at {addr:#x}, outside the used rings: not a status"
            );
        }
        assert!(
            outside_rings.len() as u64 <= answers,
            "{} bytes changed outside the used rings for {answers} answers",
            outside_rings.len()
        );
        // Each status byte is the first byte of a device-writable descriptor
        // the device read. First against the descriptors as they were before
        // the run, which explains every status byte unless the device's own
        // writes changed its descriptors.
        let mut pending: Vec<u64> = outside_rings.iter().map(|&(addr, _)| addr).collect();
        self.status_candidates(before, &Taint::default(), &mut |addr| {
            pending.retain(|&p| p != addr);
            pending.is_empty()
        });
        if pending.is_empty() {
            return;
        }
        // The device pops a chain after it completed others (at once for a
        // refused request, after the flush for the others), so it may read
        // descriptors that its own used-ring entries, used index or status
        // bytes of this very run changed: a driver may lay a used ring over a
        // descriptor table. A descriptor byte the device may have written
        // ("tainted") may have had any value when the device read it; every
        // other byte held its value from before the run. The candidates
        // widen the taint too: a status byte may have been written and then
        // overwritten with its old value by a later status, so it shows in
        // no comparison. (fuzz regression:
        // `cache_flush::fuzz_regressions::used_ring_laid_over_an_indirect_table`.)
        let mut taint = Taint::default();
        for &(start, end) in &rings {
            taint.add(start, end);
        }
        for &(addr, _) in &outside_rings {
            taint.add(u128::from(addr), u128::from(addr) + 1);
        }
        let mut candidates = std::collections::BTreeSet::new();
        let unknown = loop {
            let mut new = Vec::new();
            let unknown = self.status_candidates(before, &taint, &mut |addr| {
                if !candidates.contains(&addr) {
                    new.push(addr);
                }
                false
            });
            if new.is_empty() {
                break unknown;
            }
            for addr in new {
                taint.add(u128::from(addr), u128::from(addr) + 1);
                candidates.insert(addr);
            }
        };
        pending.retain(|p| !candidates.contains(p));
        // `unknown`: a descriptor that may have been device-writable, or an
        // indirect table, was read through an address or length the device
        // itself may have overwritten; then the weaker checks above are all
        // that can be said.
        assert!(
            pending.is_empty() || unknown,
            "the device wrote at {pending:#x?}: not in a used ring, and not the first byte \
             of any device-writable descriptor"
        );
    }

    /// Calls `found` with the buffer address of every descriptor the device
    /// may have read as device-writable and non-empty (so the first byte of
    /// which may hold a status): in the descriptor tables of the ready
    /// queues, and in the indirect tables their descriptors may point at.
    /// Descriptors are taken from `before` (both regions, as
    /// [`Memory::snapshot_into`] made it), except that a byte `taint` covers
    /// may have had any value. Stops early when `found` returns true.
    /// Returns true if some such descriptor's address, or some indirect
    /// table's location or size, depends on a tainted byte (unknown).
    ///
    /// Modelled on virtio-queue's chain iterator: a descriptor with
    /// VIRTQ_DESC_F_INDIRECT is never a buffer (in a queue's table it switches
    /// to the indirect table, if its length is a multiple of 16 and at most
    /// 65535 entries; in an indirect table it ends the chain).
    fn status_candidates(
        &self,
        before: &[u8],
        taint: &Taint,
        found: &mut dyn FnMut(u64) -> bool,
    ) -> bool {
        let mut unknown = false;
        let mut indirect: Vec<(u64, u64)> = Vec::new();
        for q in self.queues.iter().filter(|q| q.ready) {
            for i in 0..u64::from(q.size) {
                let at = q.desc.wrapping_add(16 * i);
                let Some(d) = TaintedDescriptor::read(&self.memory, before, taint, at) else {
                    continue;
                };
                if d.may_set(INDIRECT) {
                    match d.indirect_table() {
                        Some(Some(table)) if !indirect.contains(&table) => indirect.push(table),
                        Some(_) => {}
                        None => unknown = true,
                    }
                }
                match d.buffer() {
                    Some(Some(addr)) if found(addr) => return unknown,
                    Some(_) => {}
                    None => unknown = true,
                }
            }
        }
        for &(table, entries) in &indirect {
            for i in 0..entries {
                let at = table.wrapping_add(16 * i);
                let Some(d) = TaintedDescriptor::read(&self.memory, before, taint, at) else {
                    continue;
                };
                match d.buffer() {
                    Some(Some(addr)) if found(addr) => return unknown,
                    Some(_) => {}
                    None => unknown = true,
                }
            }
        }
        unknown
    }

    /// Every popped chain was answered exactly once.
    pub fn check_metrics(&self) {
        let m = self.metrics.snapshot();
        assert_eq!(
            m.received(),
            m.answered(),
            "requests received vs answered: {m:?}"
        );
        assert!(m.full_batches <= m.batches, "{m:?}");
        assert!(m.flush_failures <= m.batches, "{m:?}");
        // Every rejection is counted under exactly one rule.
        let by_rule = self.metrics.rejected_by_rule();
        let rejected = m.rejected_invalid
            + m.rejected_unsupported
            + m.rejected_out_of_range
            + m.rejected_too_large
            + m.rejected_busy
            + m.unanswerable;
        assert_eq!(
            by_rule.values().sum::<u64>(),
            rejected,
            "rejections by rule vs by status: {by_rule:?} {m:?}"
        );
        assert_eq!(
            by_rule["rate-limited"], m.rejected_busy,
            "{by_rule:?} {m:?}"
        );
    }

    /// The transport's state machine invariants.
    pub fn check_transport(&self) {
        let transport = self.transport.lock().unwrap();
        check_transport(&transport);
    }

    /// Sets what the fake engine does.
    pub fn set_behaviour(&self, behaviour: Behaviour) {
        self.control.lock().unwrap().behaviour = behaviour;
    }

    /// Adds hooks for the next flush, or (`persistent`) replaces those run
    /// by every flush.
    pub fn add_hooks(&self, hooks: &[Hook], persistent: bool) {
        let mut control = self.control.lock().unwrap();
        if persistent {
            control.persistent = hooks.to_vec();
        } else {
            control.hooks.extend_from_slice(hooks);
        }
    }
}

/// The status / features / activity invariants of a transport.
pub fn check_transport(transport: &MmioTransport<CacheFlushDevice>) {
    let status = transport.status();
    let (ack, driver, features_ok, driver_ok) = (
        status & 1 != 0,
        status & 2 != 0,
        status & 8 != 0,
        status & 4 != 0,
    );
    assert!(
        (!driver || ack) && (!features_ok || driver) && (!driver_ok || features_ok),
        "status bits out of order: {status:#x}"
    );
    let needs_reset = status & 0x40 != 0;
    assert!(
        !needs_reset || driver_ok,
        "NEEDS_RESET without DRIVER_OK: {status:#x}"
    );
    if features_ok {
        let acked = transport.acked_features();
        let offered = transport.device().avail_features();
        assert_eq!(acked & !offered, 0, "unoffered features accepted");
        assert_ne!(
            acked & (1 << F_VERSION_1),
            0,
            "FEATURES_OK without VERSION_1"
        );
    }
    assert_eq!(
        transport.device().is_active(),
        driver_ok && !needs_reset,
        "device activity disagrees with status {status:#x}"
    );
}

/// A descriptor as the device may have read it during a run: its value
/// before the run, and which of its fields the device may have changed.
struct TaintedDescriptor {
    addr: u64,
    len: u32,
    flags: u16,
    addr_tainted: bool,
    len_tainted: bool,
    /// The low byte, which holds WRITE and INDIRECT.
    flags_tainted: bool,
}

impl TaintedDescriptor {
    /// The descriptor at `at`, or `None` if it is not entirely in guest
    /// memory (the device cannot read it).
    fn read(memory: &Memory, before: &[u8], taint: &Taint, at: u64) -> Option<Self> {
        let (addr, len, flags) = snapshot_descriptor(memory, before, at)?;
        let at = u128::from(at);
        Some(Self {
            addr,
            len,
            flags,
            addr_tainted: taint.touches(at, 8),
            len_tainted: taint.touches(at + 8, 4),
            flags_tainted: taint.touches(at + 12, 1),
        })
    }

    /// `flag` may have been set when the device read it.
    fn may_set(&self, flag: u16) -> bool {
        self.flags & flag != 0 || self.flags_tainted
    }

    /// `flag` may have been clear when the device read it.
    fn may_clear(&self, flag: u16) -> bool {
        self.flags & flag == 0 || self.flags_tainted
    }

    /// If it may have been a non-empty device-writable buffer: `Some(addr)`,
    /// or `None` when its address is not known. `Some(None)` otherwise.
    fn buffer(&self) -> Option<Option<u64>> {
        let writable =
            self.may_set(WRITE) && self.may_clear(INDIRECT) && (self.len > 0 || self.len_tainted);
        match (writable, self.addr_tainted) {
            (false, _) => Some(None),
            (true, false) => Some(Some(self.addr)),
            (true, true) => None,
        }
    }

    /// For a descriptor of a queue's table with INDIRECT: the indirect table
    /// `(addr, entries)` virtio-queue would switch to (`Some(None)` for none:
    /// a length not a multiple of 16, or more than 65535 entries), or `None`
    /// when its location or size is not known. Only the entries that can be
    /// in guest memory count.
    fn indirect_table(&self) -> Option<Option<(u64, u64)>> {
        if self.addr_tainted || self.len_tainted {
            return None;
        }
        if self.len % 16 != 0 || self.len / 16 > u32::from(u16::MAX) {
            return Some(None);
        }
        let entries = u64::from(self.len / 16).min(2 * REGION_SIZE / 16);
        Some(Some((self.addr, entries)))
    }
}

/// Guest-physical byte ranges (half-open, in `u128` so that a range may end
/// at 2^64) the device may have written during one event-loop run.
#[derive(Default)]
struct Taint {
    /// Sorted, disjoint, non-adjacent.
    ranges: Vec<(u128, u128)>,
}

impl Taint {
    /// Adds `[start, end)`.
    fn add(&mut self, start: u128, end: u128) {
        if start >= end {
            return;
        }
        self.ranges.push((start, end));
        self.ranges.sort_unstable();
        let mut merged: Vec<(u128, u128)> = Vec::with_capacity(self.ranges.len());
        for &(s, e) in &self.ranges {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        self.ranges = merged;
    }

    /// True if some byte of `[start, start + len)` may have been written.
    fn touches(&self, start: u128, len: u128) -> bool {
        // The first range ending after `start` (ends are sorted too).
        let i = self.ranges.partition_point(|&(_, end)| end <= start);
        self.ranges.get(i).is_some_and(|&(s, _)| s < start + len)
    }
}

/// The descriptor at guest address `addr` as `snapshot` (both regions, in
/// order) held it: `(addr, len, flags)`, or `None` if it is not entirely in
/// guest memory.
fn snapshot_descriptor(memory: &Memory, snapshot: &[u8], addr: u64) -> Option<(u64, u32, u16)> {
    let index = |a: u64| -> Option<usize> {
        let region = (0..2).find(|&r| a >= memory.bases[r] && a - memory.bases[r] < REGION_SIZE)?;
        Some(region * REGION_SIZE as usize + (a - memory.bases[region]) as usize)
    };
    let first = index(addr)?;
    let mut d = [0u8; 16];
    match snapshot.get(first..first + 16) {
        // Fast path: inside one region (the snapshot's halves are not
        // necessarily contiguous in guest memory, hence the check).
        Some(bytes) if index(addr.checked_add(15)?) == Some(first + 15) => {
            d.copy_from_slice(bytes);
        }
        _ => {
            for (i, byte) in d.iter_mut().enumerate() {
                *byte = snapshot[index(addr.checked_add(i as u64)?)?];
            }
        }
    }
    Some(decode_descriptor(&d))
}

/// `(addr, len, flags)` of a descriptor in wire format.
fn decode_descriptor(d: &[u8; 16]) -> (u64, u32, u16) {
    let mut addr = [0u8; 8];
    addr.copy_from_slice(&d[0..8]);
    let mut len = [0u8; 4];
    len.copy_from_slice(&d[8..12]);
    (
        u64::from_le_bytes(addr),
        u32::from_le_bytes(len),
        u16::from_le_bytes([d[12], d[13]]),
    )
}

/// Appends `(region, offset, new byte)` for each byte of `new` that
/// differs from `old` (after a cheap whole-block comparison).
fn changed_bytes(old: &[u8], new: &[u8], region: usize, out: &mut Vec<(usize, u64, u8)>) {
    for (k, (o, n)) in old.chunks(4096).zip(new.chunks(4096)).enumerate() {
        if o == n {
            continue;
        }
        for (l, (o, n)) in o.chunks(64).zip(n.chunks(64)).enumerate() {
            if o == n {
                continue;
            }
            for (m, (a, b)) in o.iter().zip(n).enumerate() {
                if a != b {
                    out.push((region, (k * 4096 + l * 64 + m) as u64, *b));
                }
            }
        }
    }
}

/// One descriptor in wire format.
pub fn descriptor(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    d
}

/// The configuration space bytes the driver should read.
pub fn config_bytes(config: &Config) -> [u8; 56] {
    let mut out = [0u8; 56];
    out[0..4].copy_from_slice(&config.cache_line_size.to_le_bytes());
    out[4..8].copy_from_slice(&config.num_queues.to_le_bytes());
    out[8..12].copy_from_slice(&config.max_segments.to_le_bytes());
    out[12..16].copy_from_slice(&config.reserved0.to_le_bytes());
    let words = [
        config.max_bytes,
        config.full_flush_cost_ns,
        config.full_break_even_bytes,
        config.full_per_sec_limit,
        config.range_bytes_per_sec_limit,
    ];
    for (i, w) in words.iter().enumerate() {
        out[16 + 8 * i..24 + 8 * i].copy_from_slice(&w.to_le_bytes());
    }
    out
}

// ------------------------------------------------------------ request_path --

/// What the driver does after its initial requests.
#[derive(Arbitrary, Clone, Debug)]
pub enum Action {
    /// QueueNotify register write.
    Notify(u8),
    /// The queue's eventfd, directly (ioeventfd path).
    Kick(u8),
    /// One event-loop pass.
    Run,
    /// Another request.
    Submit(ChainSpec),
    /// A guest store.
    Patch(Patch),
    /// The available index jumps.
    SetAvailIdx {
        /// Queue.
        queue: u8,
        /// New index.
        idx: u16,
    },
    /// The engine's next behaviour.
    Flusher(Behaviour),
    /// Things happening during the next flush.
    Hooks(Vec<Hook>),
    /// Things happening during every flush from now on (replacing earlier
    /// ones; empty to stop).
    PersistentHooks(Vec<Hook>),
    /// Status = 0.
    Reset,
    /// Reset and initialise again, same layout.
    Reinit,
    /// Any 32-bit register write.
    Register {
        /// Offset / 4.
        word: u8,
        /// Value.
        value: Value,
    },
}

/// The `request_path` input.
#[derive(Arbitrary, Clone, Debug)]
pub struct RequestPathInput {
    /// Format the device's log lines (into a sink).
    pub logging: bool,
    /// Memory layout.
    pub layout: Layout,
    /// Device settings.
    pub settings: SettingsSpec,
    /// Guest memory contents before the driver starts.
    pub initial: Vec<Patch>,
    /// Features the driver accepts.
    pub features: FeatureSpec,
    /// Queue layouts.
    pub queues: Vec<QueueSpec>,
    /// The engine's behaviour at first.
    pub behaviour: Behaviour,
    /// Requests submitted before the first notify.
    pub chains: Vec<ChainSpec>,
    /// Then these (notify and run every queue when empty).
    pub actions: Vec<Action>,
}

/// Formats every log record and throws it away: the device's log lines
/// (with guest-controlled values in them) are part of the code under test.
struct SinkLogger;

impl log::Log for SinkLogger {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        use std::io::Write;
        let _ = write!(std::io::sink(), "{}", record.args());
    }
    fn flush(&self) {}
}

static SINK_LOGGER: SinkLogger = SinkLogger;

/// Installs [`SinkLogger`] (once) and turns logging on or off: formatting
/// every line is slow, so the input decides.
pub fn set_logging(on: bool) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = log::set_logger(&SINK_LOGGER);
    });
    log::set_max_level(if on {
        log::LevelFilter::Trace
    } else {
        log::LevelFilter::Off
    });
}

/// Runs one `request_path` input; returns the device's counters.
pub fn run_request_path(input: &RequestPathInput) -> MetricsSnapshot {
    set_logging(input.logging);
    let mut h = Harness::new(input.layout, &input.settings);
    for patch in &input.initial {
        patch.apply(&h.memory);
    }
    h.set_behaviour(input.behaviour);
    h.init(input.features.bits(), &input.queues);
    for chain in input.chains.iter().take(MAX_ACTIONS) {
        h.submit(chain);
    }
    if input.actions.is_empty() {
        for q in 0..h.num_queues() {
            h.notify(q as u8);
        }
        h.run();
    }
    for action in input.actions.iter().take(MAX_ACTIONS) {
        match action {
            Action::Notify(q) => h.notify(*q),
            Action::Kick(q) => h.kick(*q),
            Action::Run => h.run(),
            Action::Submit(chain) => h.submit(chain),
            Action::Patch(patch) => patch.apply(&h.memory),
            Action::SetAvailIdx { queue, idx } => {
                let q = usize::from(*queue) % usize::from(h.num_queues());
                h.set_avail_idx(q, *idx);
            }
            Action::Flusher(b) => h.set_behaviour(*b),
            Action::Hooks(hooks) => {
                h.layout_known = false;
                h.add_hooks(hooks, false);
            }
            Action::PersistentHooks(hooks) => {
                h.layout_known = false;
                h.add_hooks(hooks, true);
            }
            Action::Reset => h.write32(VIRTIO_MMIO_STATUS, 0),
            Action::Reinit => {
                h.init(input.features.bits(), &input.queues);
            }
            Action::Register { word, value } => {
                h.layout_known = false;
                h.write32(u32::from(*word) * 4, value.get32());
            }
        }
        h.check_transport();
    }
    // Whatever is left pending gets served.
    h.run();
    h.metrics.snapshot()
}

// ---------------------------------------------------------- mmio_registers --

/// Every register offset of the virtio-mmio window (legacy ones included).
pub const REGISTERS: [u32; 32] = [
    VIRTIO_MMIO_MAGIC_VALUE,
    VIRTIO_MMIO_VERSION,
    VIRTIO_MMIO_DEVICE_ID,
    VIRTIO_MMIO_VENDOR_ID,
    VIRTIO_MMIO_DEVICE_FEATURES,
    VIRTIO_MMIO_DEVICE_FEATURES_SEL,
    VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_DRIVER_FEATURES_SEL,
    VIRTIO_MMIO_GUEST_PAGE_SIZE,
    VIRTIO_MMIO_QUEUE_SEL,
    VIRTIO_MMIO_QUEUE_NUM_MAX,
    VIRTIO_MMIO_QUEUE_NUM,
    VIRTIO_MMIO_QUEUE_ALIGN,
    VIRTIO_MMIO_QUEUE_PFN,
    VIRTIO_MMIO_QUEUE_READY,
    VIRTIO_MMIO_QUEUE_NOTIFY,
    VIRTIO_MMIO_INTERRUPT_STATUS,
    VIRTIO_MMIO_INTERRUPT_ACK,
    VIRTIO_MMIO_STATUS,
    VIRTIO_MMIO_QUEUE_DESC_LOW,
    VIRTIO_MMIO_QUEUE_DESC_HIGH,
    VIRTIO_MMIO_QUEUE_AVAIL_LOW,
    VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
    VIRTIO_MMIO_QUEUE_USED_LOW,
    VIRTIO_MMIO_QUEUE_USED_HIGH,
    VIRTIO_MMIO_SHM_SEL,
    VIRTIO_MMIO_SHM_LEN_LOW,
    VIRTIO_MMIO_SHM_LEN_HIGH,
    VIRTIO_MMIO_SHM_BASE_LOW,
    VIRTIO_MMIO_SHM_BASE_HIGH,
    VIRTIO_MMIO_CONFIG_GENERATION,
    VIRTIO_MMIO_CONFIG,
];

/// A register offset.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum RegOffset {
    /// A known register (index into [`REGISTERS`]), plus a small skew.
    Known {
        /// Index.
        index: u8,
        /// Added to the offset (mostly 0; misalignment otherwise).
        skew: u8,
    },
    /// In the configuration space.
    Config(u8),
    /// Anywhere in the 4 KiB window.
    Window(u16),
    /// Anything (the bus never passes these, but the trait allows them).
    Wild(u64),
}

impl RegOffset {
    /// The offset in the window.
    pub fn offset(self) -> u64 {
        match self {
            RegOffset::Known { index, skew } => {
                let base = REGISTERS[usize::from(index) % REGISTERS.len()];
                u64::from(base) + u64::from(if skew < 0xf0 { 0 } else { skew & 0xf })
            }
            RegOffset::Config(off) => 0x100 + u64::from(off),
            RegOffset::Window(off) => u64::from(off) % 0x1000,
            RegOffset::Wild(off) => off,
        }
    }
}

/// An access width.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum Width {
    /// 1 byte.
    One,
    /// 2 bytes.
    Two,
    /// 4 bytes.
    Four,
    /// 8 bytes.
    Eight,
}

impl Width {
    /// Bytes.
    pub fn bytes(self) -> usize {
        match self {
            Width::One => 1,
            Width::Two => 2,
            Width::Four => 4,
            Width::Eight => 8,
        }
    }
}

/// One step of `mmio_registers`.
#[derive(Arbitrary, Clone, Debug)]
pub enum MmioOp {
    /// A well-formed access (4 bytes, aligned) to a register of
    /// [`REGISTERS`]: what a driver does, so made more likely than the odd
    /// accesses below.
    Access32 {
        /// Index into [`REGISTERS`].
        register: u8,
        /// A write of this value, or a read.
        write: Option<Value>,
    },
    /// A register read.
    Read {
        /// Where.
        offset: RegOffset,
        /// How wide.
        width: Width,
    },
    /// A register write.
    Write {
        /// Where.
        offset: RegOffset,
        /// How wide.
        width: Width,
        /// What (the low `width` bytes).
        value: Value,
    },
    /// The standard initialisation up to FEATURES_OK: queue registers
    /// may be written next.
    Negotiate(FeatureSpec),
    /// The standard initialisation sequence.
    Init {
        /// Features accepted.
        features: FeatureSpec,
        /// Queue layouts.
        queues: Vec<QueueSpec>,
    },
    /// A well-formed request on a queue the harness set up.
    Submit(ChainSpec),
    /// QueueNotify with a 32-bit value.
    Notify(Value),
    /// The eventfd of a queue, directly.
    Kick(u8),
    /// One event-loop pass.
    Run,
    /// A guest store.
    Patch(Patch),
    /// The engine's behaviour.
    Flusher(Behaviour),
    /// Things happening during the next flush.
    Hooks(Vec<Hook>),
}

/// The `mmio_registers` input.
#[derive(Arbitrary, Clone, Debug)]
pub struct MmioInput {
    /// Format the device's log lines (into a sink).
    pub logging: bool,
    /// Memory layout.
    pub layout: Layout,
    /// Device settings.
    pub settings: SettingsSpec,
    /// Guest memory contents.
    pub initial: Vec<Patch>,
    /// The accesses.
    pub ops: Vec<MmioOp>,
}

/// What a register read must return, where it is fixed.
fn expected_read(
    transport: &MmioTransport<CacheFlushDevice>,
    offset: u64,
    width: usize,
) -> Option<u64> {
    if offset >= 0x100 {
        let off = offset - 0x100;
        let config = config_bytes(&transport.device().config());
        if off % width as u64 != 0 || off >= 56 || off + width as u64 > 56 {
            return Some(0);
        }
        let mut b = [0u8; 8];
        b[..width].copy_from_slice(&config[off as usize..off as usize + width]);
        return Some(u64::from_le_bytes(b));
    }
    if width != 4 || offset % 4 != 0 {
        return Some(0);
    }
    match offset as u32 {
        VIRTIO_MMIO_MAGIC_VALUE => Some(0x7472_6976),
        VIRTIO_MMIO_VERSION => Some(2),
        VIRTIO_MMIO_DEVICE_ID => Some(u64::from(transport.device().device_type())),
        VIRTIO_MMIO_STATUS => Some(u64::from(transport.status())),
        VIRTIO_MMIO_CONFIG_GENERATION => Some(0),
        _ => None,
    }
}

/// A read through the window: it returns what the register must hold (where
/// that is fixed) and changes nothing.
fn checked_read(h: &Harness, offset: u64, width: usize) {
    let mut t = h.transport.lock().unwrap();
    let before = (t.status(), t.acked_features(), t.device().is_active());
    let expected = expected_read(&t, offset, width);
    let mut b = [0xa5u8; 8];
    t.read(offset, &mut b[..width]);
    let mut v = [0u8; 8];
    v[..width].copy_from_slice(&b[..width]);
    let got = u64::from_le_bytes(v);
    if let Some(expected) = expected {
        assert_eq!(got, expected, "{width}-byte read at {offset:#x}");
    }
    let after = (t.status(), t.acked_features(), t.device().is_active());
    assert_eq!(before, after, "a read changed the device");
}

/// A write through the window; one the transport must ignore (wrong width,
/// misaligned, read-only config space) changes nothing.
fn checked_write(h: &mut Harness, offset: u64, width: usize, value: u64) {
    let ignored = offset >= 0x100 || width != 4 || offset % 4 != 0;
    if !ignored {
        // May move a ring: memory writes are no longer checked.
        h.layout_known = false;
    }
    let mut t = h.transport.lock().unwrap();
    let before = (t.status(), t.acked_features(), t.device().is_active());
    t.write(offset, &value.to_le_bytes()[..width]);
    if ignored {
        let after = (t.status(), t.acked_features(), t.device().is_active());
        assert_eq!(before, after, "an ignored write changed the device");
    }
}

/// Runs one `mmio_registers` input; returns the device's counters.
pub fn run_mmio_registers(input: &MmioInput) -> MetricsSnapshot {
    set_logging(input.logging);
    let mut h = Harness::new(input.layout, &input.settings);
    for patch in &input.initial {
        patch.apply(&h.memory);
    }
    for op in input.ops.iter().take(MAX_ACTIONS * 2) {
        match op {
            MmioOp::Access32 { register, write } => {
                let offset = u64::from(REGISTERS[usize::from(*register) % REGISTERS.len()]);
                match write {
                    Some(value) => checked_write(&mut h, offset, 4, value.get()),
                    None => checked_read(&h, offset, 4),
                }
            }
            MmioOp::Read { offset, width } => checked_read(&h, offset.offset(), width.bytes()),
            MmioOp::Write {
                offset,
                width,
                value,
            } => checked_write(&mut h, offset.offset(), width.bytes(), value.get()),
            MmioOp::Init { features, queues } => {
                h.init(features.bits(), queues);
            }
            MmioOp::Submit(chain) => h.submit(chain),
            MmioOp::Notify(value) => h.write32(VIRTIO_MMIO_QUEUE_NOTIFY, value.get32()),
            MmioOp::Kick(q) => h.kick(*q),
            MmioOp::Run => h.run(),
            MmioOp::Patch(patch) => patch.apply(&h.memory),
            MmioOp::Flusher(b) => h.set_behaviour(*b),
            MmioOp::Negotiate(features) => {
                h.layout_known = false;
                h.negotiate(features.bits());
            }
            MmioOp::Hooks(hooks) => {
                h.layout_known = false;
                h.add_hooks(hooks, false);
            }
        }
        h.check_transport();
    }
    h.run();
    h.metrics.snapshot()
}
