//! Test scaffolding (no KVM): guest memory with a hole, a driver that speaks
//! the register interface and fills virtio-queue `MockSplitQueue`s, a fake
//! flush engine that records its calls, and an event manager running the
//! real queue worker.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::thread::{self, ThreadId};

use cache_flush_abi::cache_flush::{F_FULL, F_RANGE, F_VERSION_1};
use event_manager::{EventManager, SubscriberOps};
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{BatchCompletion, FlushBackend, FlushBatch, FlushError, MetricsSnapshot};
use super::{CacheFlushDevice, CacheFlushMetrics, CacheFlushSettings, QueueWorker};
use crate::bus::BusDevice;
use crate::virtio::mmio::MmioTransport;
use crate::virtio::{VirtioDevice, VirtioInterrupt};

/// Region 0: [0, 1 MiB). Queues and request buffers live here.
pub const REGION0_END: u64 = 0x10_0000;
/// Region 1: [2 MiB, 3 MiB); [1 MiB, 2 MiB) is a hole.
pub const REGION1: u64 = 0x20_0000;
/// End of region 1 (exclusive).
pub const REGION1_END: u64 = 0x30_0000;
/// Queue size the test driver uses.
pub const QUEUE_SIZE: u16 = 16;
/// Queue `i` lives at `QUEUE_AREA + i * 0x1000`.
const QUEUE_AREA: u64 = 0x1_0000;
/// Request buffers are allocated from here up.
const BUFFERS: u64 = 0x4_0000;

/// Two RAM regions with a hole between them.
pub fn test_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), REGION0_END as usize),
        (GuestAddress(REGION1), (REGION1_END - REGION1) as usize),
    ])
    .unwrap()
}

pub const RANGE: u64 = 1 << F_RANGE;
pub const FULL: u64 = 1 << F_FULL;
pub const V1: u64 = 1 << F_VERSION_1;

/// A request header on the wire.
pub fn header(request_type: u32, flags: u32, tag: u64) -> Vec<u8> {
    let mut v = request_type.to_le_bytes().to_vec();
    v.extend_from_slice(&flags.to_le_bytes());
    v.extend_from_slice(&tag.to_le_bytes());
    v
}

/// A segment on the wire.
pub fn segment(addr: u64, len: u64) -> Vec<u8> {
    let mut v = addr.to_le_bytes().to_vec();
    v.extend_from_slice(&len.to_le_bytes());
    v
}

/// A FLUSH_RANGE request's readable part.
pub fn range_request(tag: u64, segments: &[(u64, u64)]) -> Vec<u8> {
    let mut v = header(1, 0, tag);
    for &(addr, len) in segments {
        v.extend(segment(addr, len));
    }
    v
}

/// A FLUSH_ALL request's readable part.
pub fn full_request(tag: u64) -> Vec<u8> {
    header(2, 0, tag)
}

/// One descriptor of a test chain.
#[derive(Clone, Debug)]
pub enum D {
    /// Device-readable, holding these bytes (allocated by the helper).
    R(Vec<u8>),
    /// Device-writable of this length (allocated by the helper).
    W(u32),
    /// Device-readable at an explicit address.
    RawR(u64, u32),
    /// Device-writable at an explicit address.
    RawW(u64, u32),
}

/// What the fake flush engine does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// Succeed.
    Ok,
    /// Report a failure.
    Fail,
    /// Return without calling `complete` (an engine bug).
    NoComplete,
    /// Answer from another thread after `flush` has returned (an
    /// asynchronous back end).
    Deferred,
}

type Hook = Box<dyn FnMut(&FlushBatch) + Send>;

/// The fake engine's shared record and controls.
pub struct FlushControl {
    /// Every batch it was given, in order.
    pub calls: Vec<FlushBatch>,
    /// What it does next.
    pub behaviour: Behaviour,
    /// Runs inside `flush`, before `complete` ("vCPUs paused, not flushed").
    pub before_complete: Option<Hook>,
    /// Runs inside `flush`, after `complete` ("vCPUs still paused").
    pub after_complete: Option<Hook>,
    /// Threads answering [`Behaviour::Deferred`] batches.
    pub deferred: Vec<std::thread::JoinHandle<()>>,
}

/// A flush engine that records its calls.
pub struct FakeFlusher(pub Arc<Mutex<FlushControl>>);

impl FlushBackend for FakeFlusher {
    fn flush(&self, batch: &FlushBatch, done: BatchCompletion) {
        // Take the hooks out so they may lock the control themselves.
        let (behaviour, mut before, mut after) = {
            let mut control = self.0.lock().unwrap();
            control.calls.push(batch.clone());
            (
                control.behaviour,
                control.before_complete.take(),
                control.after_complete.take(),
            )
        };
        if let Some(hook) = before.as_mut() {
            hook(batch);
        }
        match behaviour {
            Behaviour::Ok => done.complete(Ok(())),
            Behaviour::Fail => done.complete(Err(FlushError {
                reason: "told to fail".into(),
            })),
            Behaviour::NoComplete => drop(done),
            Behaviour::Deferred => {
                let answered = std::thread::spawn(move || done.complete(Ok(())));
                self.0.lock().unwrap().deferred.push(answered);
            }
        }
        if let Some(hook) = after.as_mut() {
            hook(batch);
        }
        let mut control = self.0.lock().unwrap();
        control.before_complete = control.before_complete.take().or(before);
        control.after_complete = control.after_complete.take().or(after);
    }
}

/// An interrupt that counts what it is asked to deliver.
#[derive(Default)]
pub struct RecordingInterrupt {
    /// Queue indexes signalled, in order.
    pub used: Mutex<Vec<u16>>,
    /// Configuration-change signals.
    pub config: AtomicUsize,
}

impl VirtioInterrupt for RecordingInterrupt {
    fn signal_used_queue(&self, queue_index: u16) {
        self.used.lock().unwrap().push(queue_index);
    }
    fn signal_config_change(&self) {
        self.config.fetch_add(1, Ordering::SeqCst);
    }
}

/// The driver side of one queue.
pub struct DriverQueue<'a> {
    mock: MockSplitQueue<'a, GuestMemoryMmap>,
    next_desc: u16,
}

/// A request the test driver put on a queue.
#[derive(Clone, Copy, Debug)]
pub struct Submitted {
    /// Queue index.
    pub queue: u16,
    /// Head descriptor index.
    pub head: u16,
    /// First writable byte, if the chain has one (0xff until answered).
    pub status_addr: Option<u64>,
}

/// Memory + transport + device + queue worker + event loop, driven like a guest
/// driver would.
pub struct TestHelper<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub transport: Arc<Mutex<MmioTransport<CacheFlushDevice>>>,
    pub metrics: Arc<CacheFlushMetrics>,
    pub flush: Arc<Mutex<FlushControl>>,
    pub interrupt: Arc<RecordingInterrupt>,
    pub event_manager: EventManager<Arc<Mutex<QueueWorker>>>,
    /// The queue worker the event loop drives, for serving a notify the way
    /// a vCPU thread does.
    pub worker: Arc<Mutex<QueueWorker>>,
    pub queues: Vec<DriverQueue<'a>>,
    next_buffer: u64,
}

impl<'a> TestHelper<'a> {
    /// A device built from `settings`, not yet initialised by the driver.
    pub fn new(mem: &'a GuestMemoryMmap, settings: CacheFlushSettings) -> Self {
        capture_logs();
        let device = CacheFlushDevice::new(settings).unwrap();
        let metrics = device.metrics();
        let flush = Arc::new(Mutex::new(FlushControl {
            calls: Vec::new(),
            behaviour: Behaviour::Ok,
            before_complete: None,
            after_complete: None,
            deferred: Vec::new(),
        }));
        let handler = Arc::new(Mutex::new(
            device.queue_worker(Box::new(FakeFlusher(flush.clone()))),
        ));
        // The event manager keeps the queue worker alive.
        let interrupt = Arc::new(RecordingInterrupt::default());
        let transport = MmioTransport::new(device, mem.clone(), interrupt.clone()).unwrap();
        let mut event_manager = EventManager::new().unwrap();
        event_manager.add_subscriber(handler.clone());
        Self {
            mem,
            transport: Arc::new(Mutex::new(transport)),
            metrics,
            flush,
            interrupt,
            event_manager,
            worker: handler,
            queues: Vec::new(),
            next_buffer: BUFFERS,
        }
    }

    /// A running device with `queues` queues, every offered feature accepted.
    pub fn running(mem: &'a GuestMemoryMmap, queues: u16) -> Self {
        let mut helper = Self::new(
            mem,
            CacheFlushSettings {
                num_queues: queues,
                full_flush: true,
                ..Default::default()
            },
        );
        helper.activate(RANGE | FULL | V1);
        helper
    }

    pub fn read(&self, offset: u32) -> u32 {
        let mut b = [0u8; 4];
        self.transport
            .lock()
            .unwrap()
            .read(u64::from(offset), &mut b);
        u32::from_le_bytes(b)
    }

    pub fn write(&self, offset: u32, value: u32) {
        self.transport
            .lock()
            .unwrap()
            .write(u64::from(offset), &value.to_le_bytes());
    }

    pub fn status(&self) -> u32 {
        self.read(VIRTIO_MMIO_STATUS)
    }

    pub fn device_features(&self) -> u64 {
        self.write(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        let low = self.read(VIRTIO_MMIO_DEVICE_FEATURES);
        self.write(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        let high = self.read(VIRTIO_MMIO_DEVICE_FEATURES);
        u64::from(low) | (u64::from(high) << 32)
    }

    /// Driver initialisation up to FEATURES_OK (§3.1.1 steps 1-6). Returns
    /// whether the device kept FEATURES_OK.
    pub fn negotiate(&mut self, features: u64) -> bool {
        assert_eq!(self.read(VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(self.read(VIRTIO_MMIO_VERSION), 2);
        assert_eq!(self.read(VIRTIO_MMIO_DEVICE_ID), 0xEFBF);
        self.write(VIRTIO_MMIO_STATUS, 0);
        self.write(VIRTIO_MMIO_STATUS, 1);
        self.write(VIRTIO_MMIO_STATUS, 1 | 2);
        let _ = self.device_features();
        self.write(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        self.write(VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
        self.write(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        self.write(VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
        self.write(VIRTIO_MMIO_STATUS, 1 | 2 | 8);
        self.status() & 8 != 0
    }

    /// Sets up every queue the device offers (fresh rings).
    pub fn setup_queues(&mut self) {
        let count = self
            .transport
            .lock()
            .unwrap()
            .device()
            .queue_max_sizes()
            .len();
        self.queues.clear();
        for i in 0..count {
            self.write(VIRTIO_MMIO_QUEUE_SEL, i as u32);
            assert_eq!(self.read(VIRTIO_MMIO_QUEUE_READY), 0);
            assert_eq!(self.read(VIRTIO_MMIO_QUEUE_NUM_MAX), 256);
            let base = GuestAddress(QUEUE_AREA + i as u64 * 0x1000);
            let mock = MockSplitQueue::create(self.mem, base, QUEUE_SIZE);
            let (desc, avail, used) = (
                mock.desc_table_addr().0,
                mock.avail_addr().0,
                mock.used_addr().0,
            );
            self.write(VIRTIO_MMIO_QUEUE_NUM, u32::from(QUEUE_SIZE));
            self.write(VIRTIO_MMIO_QUEUE_DESC_LOW, desc as u32);
            self.write(VIRTIO_MMIO_QUEUE_DESC_HIGH, (desc >> 32) as u32);
            self.write(VIRTIO_MMIO_QUEUE_AVAIL_LOW, avail as u32);
            self.write(VIRTIO_MMIO_QUEUE_AVAIL_HIGH, (avail >> 32) as u32);
            self.write(VIRTIO_MMIO_QUEUE_USED_LOW, used as u32);
            self.write(VIRTIO_MMIO_QUEUE_USED_HIGH, (used >> 32) as u32);
            self.write(VIRTIO_MMIO_QUEUE_READY, 1);
            self.queues.push(DriverQueue { mock, next_desc: 0 });
        }
    }

    pub fn driver_ok(&mut self) {
        self.write(VIRTIO_MMIO_STATUS, 1 | 2 | 8 | 4);
    }

    /// Full initialisation; asserts the device runs.
    pub fn activate(&mut self, features: u64) {
        assert!(self.negotiate(features), "FEATURES_OK refused");
        self.setup_queues();
        self.driver_ok();
        assert_eq!(self.status(), 0xf);
        assert!(self.transport.lock().unwrap().device().is_active());
    }

    /// A buffer of `len` bytes in region 0, filled with 0xff so that an
    /// unwritten status byte is visible.
    pub fn alloc(&mut self, len: usize) -> u64 {
        let addr = self.next_buffer;
        self.next_buffer = (addr + len as u64 + 15) & !15;
        assert!(self.next_buffer < REGION0_END, "test buffers exhausted");
        self.mem
            .write_slice(&vec![0xff; len], GuestAddress(addr))
            .unwrap();
        addr
    }

    /// Writes raw descriptors at explicit indexes of `queue`'s table.
    pub fn store_descriptor(
        &self,
        queue: u16,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let desc = RawDescriptor::from(Descriptor::new(addr, len, flags, next));
        self.queues[usize::from(queue)]
            .mock
            .desc_table()
            .store(index, desc)
            .unwrap();
    }

    /// Makes `head` available on `queue` (without notifying).
    pub fn publish(&self, queue: u16, head: u16) {
        publish_raw(self.mem, self.avail_addr(queue), head);
    }

    /// The `idx` field of `queue`'s used ring.
    pub fn used_idx_addr(&self, queue: u16) -> GuestAddress {
        GuestAddress(self.queues[usize::from(queue)].mock.used_addr().0 + 2)
    }

    /// The driver area (available ring) of `queue`.
    pub fn avail_addr(&self, queue: u16) -> GuestAddress {
        self.queues[usize::from(queue)].mock.avail_addr()
    }

    /// Builds a chain from `descs` on consecutive descriptor indexes and
    /// publishes it.
    pub fn add_chain(&mut self, queue: u16, descs: &[D]) -> Submitted {
        let request = self.build_chain(queue, descs);
        self.publish(queue, request.head);
        request
    }

    /// Builds a chain without publishing it.
    pub fn build_chain(&mut self, queue: u16, descs: &[D]) -> Submitted {
        let mut placed = Vec::new();
        let mut status_addr = None;
        for d in descs {
            let (addr, len, writable) = match d {
                D::R(bytes) => {
                    let addr = self.alloc(bytes.len());
                    self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
                    (addr, bytes.len() as u32, false)
                }
                D::W(len) => (self.alloc(*len as usize), *len, true),
                D::RawR(addr, len) => (*addr, *len, false),
                D::RawW(addr, len) => (*addr, *len, true),
            };
            if writable && len > 0 && status_addr.is_none() {
                status_addr = Some(addr);
            }
            placed.push((addr, len, writable));
        }
        let q = &mut self.queues[usize::from(queue)];
        let head = q.next_desc;
        let indexes: Vec<u16> = (0..placed.len() as u16)
            .map(|i| (head + i) % QUEUE_SIZE)
            .collect();
        q.next_desc = (head + placed.len() as u16) % QUEUE_SIZE;
        for (i, &(addr, len, writable)) in placed.iter().enumerate() {
            let mut flags = if writable {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            let next = indexes.get(i + 1).copied().unwrap_or(0);
            if i + 1 < placed.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            self.store_descriptor(queue, indexes[i], addr, len, flags, next);
        }
        Submitted {
            queue,
            head,
            status_addr,
        }
    }

    /// A request with `readable` as its readable part and a 1-byte status.
    pub fn add_request(&mut self, queue: u16, readable: Vec<u8>) -> Submitted {
        self.add_chain(queue, &[D::R(readable), D::W(1)])
    }

    /// An indirect chain: one descriptor in the ring pointing at a table of
    /// `entries` built here.
    pub fn add_indirect_chain(&mut self, queue: u16, entries: &[(u64, u32, bool)]) -> Submitted {
        let table = self.alloc(entries.len() * 16);
        for (i, &(addr, len, writable)) in entries.iter().enumerate() {
            let mut flags = if writable {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            if i + 1 < entries.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let desc = RawDescriptor::from(Descriptor::new(addr, len, flags, (i + 1) as u16));
            self.mem
                .write_obj(desc, GuestAddress(table + i as u64 * 16))
                .unwrap();
        }
        let q = &mut self.queues[usize::from(queue)];
        let head = q.next_desc;
        q.next_desc = (head + 1) % QUEUE_SIZE;
        self.store_descriptor(
            queue,
            head,
            table,
            (entries.len() * 16) as u32,
            VRING_DESC_F_INDIRECT as u16,
            0,
        );
        self.publish(queue, head);
        Submitted {
            queue,
            head,
            status_addr: entries.iter().find(|e| e.2 && e.1 > 0).map(|e| e.0),
        }
    }

    /// QueueNotify through the transport (the path without ioeventfd).
    pub fn notify(&self, queue: u16) {
        self.write(VIRTIO_MMIO_QUEUE_NOTIFY, u32::from(queue));
    }

    /// Runs the event loop once; returns the number of events handled.
    pub fn run(&mut self) -> usize {
        self.event_manager.run_with_timeout(50).unwrap()
    }

    /// Notify `queue` and run the loop.
    pub fn kick(&mut self, queue: u16) -> usize {
        self.notify(queue);
        self.run()
    }

    /// The used ring of `queue` as (id, len) pairs.
    pub fn used(&self, queue: u16) -> Vec<(u32, u32)> {
        let used = self.queues[usize::from(queue)].mock.used();
        let n = used.idx().load();
        (0..n)
            .map(|i| {
                let e = used
                    .ring()
                    .ref_at(usize::from(i % QUEUE_SIZE))
                    .unwrap()
                    .load();
                (e.id(), e.len())
            })
            .collect()
    }

    /// The byte at the request's status address (0xff = never written).
    pub fn status_byte(&self, request: &Submitted) -> u8 {
        self.mem
            .read_obj(GuestAddress(request.status_addr.expect("no status byte")))
            .unwrap()
    }

    /// Its used entry (len) if completed.
    pub fn used_len(&self, request: &Submitted) -> Option<u32> {
        self.used(request.queue)
            .iter()
            .rev()
            .find(|(id, _)| *id == u32::from(request.head))
            .map(|&(_, len)| len)
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        self.metrics.snapshot()
    }

    pub fn flush_calls(&self) -> Vec<FlushBatch> {
        self.flush.lock().unwrap().calls.clone()
    }
}

/// Publishes `head` on the available ring at `avail` — usable from a flush
/// hook, which cannot borrow the helper.
pub fn publish_raw(mem: &GuestMemoryMmap, avail: GuestAddress, head: u16) {
    let idx_addr = GuestAddress(avail.0 + 2);
    let idx: u16 = mem.read_obj(idx_addr).unwrap();
    let slot = GuestAddress(avail.0 + 4 + 2 * u64::from(idx % QUEUE_SIZE));
    mem.write_obj(head, slot).unwrap();
    mem.write_obj(idx.wrapping_add(1), idx_addr).unwrap();
}

/// Warnings logged so far, per thread: each test runs on its own thread and
/// the queue worker runs on the test's thread (inside `run`), so a test sees
/// exactly its own lines.
static RECORDS: Mutex<Vec<(ThreadId, log::Level, String)>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::Level::Warn
    }
    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            let line = record.args().to_string();
            RECORDS.lock().unwrap_or_else(|p| p.into_inner()).push((
                thread::current().id(),
                record.level(),
                line,
            ));
        }
    }
    fn flush(&self) {}
}

static CAPTURE: Capture = Capture;

/// Installs the capturing logger (once per test binary).
pub fn capture_logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Another logger may already be installed by another test harness;
        // then lines are simply not captured and rule assertions fail loudly.
        let _ = log::set_logger(&CAPTURE);
        log::set_max_level(log::LevelFilter::Warn);
    });
}

/// Takes this thread's captured warning and error lines, with their level.
pub fn take_leveled_logs() -> Vec<(log::Level, String)> {
    capture_logs();
    let me = thread::current().id();
    let mut all = RECORDS.lock().unwrap_or_else(|p| p.into_inner());
    let (mine, others): (Vec<_>, Vec<_>) = all.drain(..).partition(|(id, _, _)| *id == me);
    *all = others;
    mine.into_iter()
        .map(|(_, level, line)| (level, line))
        .collect()
}

/// Takes this thread's captured warning and error lines.
pub fn take_logs() -> Vec<String> {
    take_leveled_logs()
        .into_iter()
        .map(|(_, line)| line)
        .collect()
}

/// The `rule=` of every rejection logged by this thread since the last call.
pub fn take_rules() -> Vec<String> {
    take_logs()
        .iter()
        .filter_map(|line| line.split("rule=").nth(1))
        .filter_map(|rest| rest.split(' ').next())
        .map(str::to_string)
        .collect()
}
