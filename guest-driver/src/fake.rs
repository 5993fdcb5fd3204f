//! Test doubles: a fake guest RAM, a page-table builder, simple translators
//! and sinks, and a fake cache-flush device — an in-memory virtio-mmio
//! register file plus a device thread that consumes the rings in the fake RAM
//! and records every request it receives.

use std::boxed::Box;
use std::format;
use std::string::String;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::vec;
use std::vec::Vec;

use core::ptr::NonNull;

use cache_flush_abi::cache_flush::{
    self, Config, RequestHeader, Segment, HEADER_SIZE, SEGMENT_SIZE,
};

use crate::error::Error;
use crate::mem::{PhysMem, QueueMemory};
use crate::mmio::{reg, status, Registers, MAGIC_VALUE, VERSION};
use crate::plan::Sink;
use crate::translate::{Mapping, Translate};

/// Guest RAM for tests: guest-physical address `gpa` is byte `gpa` of a
/// heap buffer. Accessed only through raw pointers (volatile or atomic), as
/// the driver and the device thread use it concurrently.
pub(crate) struct FakeRam {
    base: *mut u64,
    words: usize,
}

// SAFETY: the buffer is owned by `FakeRam` and only reached through raw
// pointers with volatile/atomic accesses; tests synchronise like the real
// driver and device do (release/acquire on the ring indices).
unsafe impl Send for FakeRam {}
// SAFETY: as for `Send`.
unsafe impl Sync for FakeRam {}

impl Drop for FakeRam {
    fn drop(&mut self) {
        // SAFETY: `base` came from `alloc_zeroed` with this layout in `new`,
        // and nothing uses the buffer after the RAM is dropped.
        unsafe { std::alloc::dealloc(self.base.cast(), Self::layout(self.words)) }
    }
}

impl FakeRam {
    /// Page-aligned, like real RAM: the driver checks the alignment of the
    /// queue memory's virtual address too.
    fn layout(words: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(words * 8, 4096).unwrap()
    }

    /// `bytes` (rounded up to 8) of zeroed RAM at guest-physical 0.
    pub(crate) fn new(bytes: usize) -> Self {
        let words = bytes.div_ceil(8).max(1);
        // SAFETY: the layout has a non-zero size.
        let base = unsafe { std::alloc::alloc_zeroed(Self::layout(words)) }.cast::<u64>();
        assert!(!base.is_null(), "out of memory");
        Self { base, words }
    }

    /// A RAM that lives for the rest of the test process, so it can be
    /// shared with the device thread and satisfy `PhysMem`'s lifetime rule.
    pub(crate) fn leak(bytes: usize) -> &'static Self {
        Box::leak(Box::new(Self::new(bytes)))
    }

    pub(crate) fn size(&self) -> u64 {
        (self.words * 8) as u64
    }

    fn ptr(&self, gpa: u64, len: usize) -> *mut u8 {
        assert!(
            gpa + len as u64 <= self.size(),
            "fake RAM access out of range at {gpa:#x}"
        );
        // SAFETY: in bounds, checked above.
        unsafe { self.base.cast::<u8>().add(gpa as usize) }
    }

    pub(crate) fn read_u8(&self, gpa: u64) -> u8 {
        // SAFETY: in bounds (`ptr` checks).
        unsafe { self.ptr(gpa, 1).read_volatile() }
    }

    pub(crate) fn write_u8(&self, gpa: u64, v: u8) {
        // SAFETY: in bounds (`ptr` checks).
        unsafe { self.ptr(gpa, 1).write_volatile(v) }
    }

    pub(crate) fn read_u16(&self, gpa: u64) -> u16 {
        // SAFETY: in bounds; callers use naturally aligned addresses.
        unsafe { self.ptr(gpa, 2).cast::<u16>().read_volatile() }
    }

    pub(crate) fn read_u32(&self, gpa: u64) -> u32 {
        // SAFETY: in bounds; callers use naturally aligned addresses.
        unsafe { self.ptr(gpa, 4).cast::<u32>().read_volatile() }
    }

    pub(crate) fn write_u32(&self, gpa: u64, v: u32) {
        // SAFETY: in bounds; callers use naturally aligned addresses.
        unsafe { self.ptr(gpa, 4).cast::<u32>().write_volatile(v) }
    }

    pub(crate) fn read_u64(&self, gpa: u64) -> u64 {
        // SAFETY: in bounds; callers use naturally aligned addresses.
        unsafe { self.ptr(gpa, 8).cast::<u64>().read_volatile() }
    }

    pub(crate) fn write_u64(&self, gpa: u64, v: u64) {
        // SAFETY: in bounds; callers use naturally aligned addresses.
        unsafe { self.ptr(gpa, 8).cast::<u64>().write_volatile(v) }
    }

    pub(crate) fn atomic_u16(&self, gpa: u64) -> &AtomicU16 {
        // SAFETY: in bounds and 2-byte aligned (ring index fields); shared
        // ring indices are only accessed atomically once a queue is live.
        unsafe { AtomicU16::from_ptr(self.ptr(gpa, 2).cast()) }
    }

    /// `len` bytes at `gpa` as the driver's queue memory.
    pub(crate) fn queue_memory(&self, gpa: u64, len: usize) -> QueueMemory {
        let ptr = NonNull::new(self.ptr(gpa, len)).unwrap();
        // SAFETY: the fake RAM is "physically contiguous" by construction and
        // tests hand each region to one driver only.
        unsafe { QueueMemory::new(ptr, gpa, len) }
    }
}

// SAFETY: pointers are in bounds; the RAM outlives its users in every test
// (it is leaked, or outlives the borrowing walker).
unsafe impl PhysMem for FakeRam {
    fn map(&self, gpa: u64, len: usize) -> Option<NonNull<u8>> {
        if gpa.checked_add(len as u64)? > self.size() {
            return None;
        }
        NonNull::new(self.ptr(gpa, len))
    }
}

const P: u64 = 1;
const RW: u64 = 2;
const US: u64 = 4;
const PS: u64 = 0x80;
const TABLE_FLAGS: u64 = P | RW | US;

/// Builds x86-64 4-level page tables in a [`FakeRam`], allocating tables
/// upwards from a start address.
pub(crate) struct PageTables<'a> {
    ram: &'a FakeRam,
    root: u64,
    next: u64,
}

impl<'a> PageTables<'a> {
    /// Tables from guest-physical 0x1000 on.
    pub(crate) fn new(ram: &'a FakeRam) -> Self {
        Self::new_at(ram, 0x1000)
    }

    pub(crate) fn new_at(ram: &'a FakeRam, first: u64) -> Self {
        let mut pt = Self {
            ram,
            root: 0,
            next: first,
        };
        pt.root = pt.alloc();
        pt
    }

    pub(crate) fn root(&self) -> u64 {
        self.root
    }

    fn alloc(&mut self) -> u64 {
        let table = self.next;
        self.next += 0x1000;
        for i in 0..512 {
            self.ram.write_u64(table + i * 8, 0);
        }
        table
    }

    /// The table that entry `index` of `table` points to, created if absent.
    fn child(&mut self, table: u64, index: u64) -> u64 {
        let entry = self.ram.read_u64(table + index * 8);
        if entry & P != 0 {
            return entry & 0x000F_FFFF_FFFF_F000;
        }
        let child = self.alloc();
        self.ram.write_u64(table + index * 8, child | TABLE_FLAGS);
        child
    }

    fn index(va: u64, shift: u32) -> u64 {
        (va >> shift) & 0x1ff
    }

    pub(crate) fn map_4k(&mut self, va: u64, pa: u64) {
        let pdpt = self.child(self.root, Self::index(va, 39));
        let pd = self.child(pdpt, Self::index(va, 30));
        let pt = self.child(pd, Self::index(va, 21));
        self.ram
            .write_u64(pt + Self::index(va, 12) * 8, pa | TABLE_FLAGS);
    }

    pub(crate) fn map_2m_flags(&mut self, va: u64, pa: u64, extra: u64) {
        let pdpt = self.child(self.root, Self::index(va, 39));
        let pd = self.child(pdpt, Self::index(va, 30));
        self.ram
            .write_u64(pd + Self::index(va, 21) * 8, pa | TABLE_FLAGS | PS | extra);
    }

    pub(crate) fn map_1g(&mut self, va: u64, pa: u64) {
        let pdpt = self.child(self.root, Self::index(va, 39));
        self.ram
            .write_u64(pdpt + Self::index(va, 30) * 8, pa | TABLE_FLAGS | PS);
    }

    pub(crate) fn set_raw_pml4_entry(&mut self, index: u64, entry: u64) {
        self.ram.write_u64(self.root + index * 8, entry);
    }
}

/// A translator given as a list of `(va, len, pa)` runs.
#[derive(Clone, Debug)]
pub(crate) struct ListTranslator {
    runs: Vec<(u64, u64, u64)>,
}

impl ListTranslator {
    pub(crate) fn new(runs: &[(u64, u64, u64)]) -> Self {
        Self {
            runs: runs.to_vec(),
        }
    }

    /// 4 KiB pages given as `(va, pa)`.
    pub(crate) fn pages(pages: &[(u64, u64)]) -> Self {
        Self {
            runs: pages.iter().map(|&(va, pa)| (va, 0x1000, pa)).collect(),
        }
    }
}

impl Translate for ListTranslator {
    fn translate(&self, va: u64) -> Option<Mapping> {
        self.runs.iter().find_map(|&(start, len, pa)| {
            let offset = va.wrapping_sub(start);
            // A zero-length run "contains" its start, to test that the
            // driver treats such a mapping as unmapped.
            (va >= start && (offset < len || (len == 0 && offset == 0))).then(|| Mapping {
                phys: pa.wrapping_add(offset),
                len: len - offset,
            })
        })
    }
}

/// A plan sink that records each request's segments, and can fail one.
#[derive(Default, Debug)]
pub(crate) struct RecordingSink {
    pub(crate) requests: Vec<Vec<Segment>>,
    pub(crate) current: Vec<Segment>,
    /// Fail the submission with this index (0-based) with BUSY.
    pub(crate) fail_at: Option<usize>,
}

impl Sink for RecordingSink {
    fn segment(&mut self, index: usize, segment: Segment) {
        assert_eq!(index, self.current.len(), "segments must arrive in order");
        self.current.push(segment);
    }

    fn submit(&mut self, count: usize) -> Result<(), Error> {
        assert_eq!(count, self.current.len());
        assert!(count > 0);
        self.requests.push(core::mem::take(&mut self.current));
        if self.fail_at == Some(self.requests.len() - 1) {
            return Err(Error::Status(cache_flush::Status::Busy));
        }
        Ok(())
    }
}

/// What the fake device presents.
#[derive(Clone, Debug)]
pub(crate) struct DeviceSetup {
    pub(crate) magic: u32,
    pub(crate) version: u32,
    pub(crate) device_id: u32,
    pub(crate) offered: u64,
    pub(crate) config: Config,
    pub(crate) queue_num_max: u32,
    /// Clear FEATURES_OK whatever the driver accepts.
    pub(crate) refuse_features: bool,
}

pub(crate) const V1: u64 = 1 << cache_flush::F_VERSION_1;
pub(crate) const RANGE: u64 = 1 << cache_flush::F_RANGE;
pub(crate) const FULL: u64 = 1 << cache_flush::F_FULL;

impl Default for DeviceSetup {
    fn default() -> Self {
        Self {
            magic: MAGIC_VALUE,
            version: VERSION,
            device_id: cache_flush::DEVICE_ID,
            // Bit 40 is some feature this driver does not know: it must not
            // be accepted.
            offered: V1 | RANGE | FULL | 1 << 40,
            config: Config {
                cache_line_size: 64,
                num_queues: 4,
                max_segments: 8,
                reserved0: 0,
                max_bytes: 1 << 20,
                full_flush_cost_ns: 2_000_000,
                full_break_even_bytes: 8 << 20,
                full_per_sec_limit: 10,
                range_bytes_per_sec_limit: 0,
            },
            queue_num_max: 256,
            refuse_features: false,
        }
    }
}

/// One request as the fake device received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Received {
    pub(crate) queue: u16,
    pub(crate) header: RequestHeader,
    pub(crate) segments: Vec<Segment>,
}

#[derive(Clone, Copy, Debug, Default)]
struct FakeQueue {
    num: u32,
    ready: u32,
    desc: u64,
    driver: u64,
    device: u64,
    last_avail: u16,
    used_idx: u16,
}

#[derive(Debug)]
struct RegState {
    setup: DeviceSetup,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<FakeQueue>,
    config_generation: u32,
}

/// Decides each request's status byte; `None` drops the request and sets
/// DEVICE_NEEDS_RESET.
type Responder = Box<dyn FnMut(&Received) -> Option<u8> + Send>;

impl core::fmt::Debug for Shared {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

struct Shared {
    ram: &'static FakeRam,
    regs: Mutex<RegState>,
    log: Mutex<Vec<Received>>,
    violations: Mutex<Vec<String>>,
    responder: Mutex<Responder>,
    /// When the responder drops a request: reset the device (Status 0, as
    /// if another agent reset it under the request) instead of setting
    /// DEVICE_NEEDS_RESET.
    reset_on_drop: AtomicBool,
    notifies: AtomicUsize,
}

/// The register side of the fake device, which the driver owns.
#[derive(Debug)]
pub(crate) struct FakeDevice {
    shared: Arc<Shared>,
    notify: Sender<u16>,
}

/// The test's view of the fake device; the device thread stops once the
/// driver (and so the [`FakeDevice`]) is dropped.
pub(crate) struct DeviceHandle {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl FakeDevice {
    /// Starts a device over `ram` whose requests all succeed.
    pub(crate) fn start(ram: &'static FakeRam, setup: DeviceSetup) -> (FakeDevice, DeviceHandle) {
        let queues = vec![FakeQueue::default(); setup.config.num_queues as usize];
        let shared = Arc::new(Shared {
            ram,
            regs: Mutex::new(RegState {
                setup,
                status: 0,
                device_features_sel: 0,
                driver_features_sel: 0,
                driver_features: 0,
                queue_sel: 0,
                queues,
                config_generation: 0,
            }),
            log: Mutex::new(Vec::new()),
            violations: Mutex::new(Vec::new()),
            responder: Mutex::new(Box::new(|_| Some(0))),
            reset_on_drop: AtomicBool::new(false),
            notifies: AtomicUsize::new(0),
        });
        let (tx, rx) = channel::<u16>();
        let device_shared = Arc::clone(&shared);
        let thread = thread::spawn(move || {
            while let Ok(queue) = rx.recv() {
                device_shared.process(queue);
            }
        });
        (
            FakeDevice {
                shared: Arc::clone(&shared),
                notify: tx,
            },
            DeviceHandle {
                shared,
                thread: Some(thread),
            },
        )
    }
}

impl DeviceHandle {
    /// Publishes new full-flush figures, as the host does after a full
    /// flush, and bumps ConfigGeneration.
    pub(crate) fn set_full_estimate(&self, cost_ns: u64, break_even: u64) {
        let mut r = self.shared.regs.lock().unwrap();
        r.setup.config.full_flush_cost_ns = cost_ns;
        r.setup.config.full_break_even_bytes = break_even;
        r.config_generation += 1;
    }

    pub(crate) fn set_responder(&self, f: impl FnMut(&Received) -> Option<u8> + Send + 'static) {
        *self.shared.responder.lock().unwrap() = Box::new(f);
    }

    /// A request the responder drops resets the device instead of setting
    /// DEVICE_NEEDS_RESET.
    pub(crate) fn reset_on_dropped_request(&self) {
        self.shared.reset_on_drop.store(true, Ordering::SeqCst);
    }

    pub(crate) fn requests(&self) -> Vec<Received> {
        self.shared.log.lock().unwrap().clone()
    }

    pub(crate) fn violations(&self) -> Vec<String> {
        self.shared.violations.lock().unwrap().clone()
    }

    pub(crate) fn notifies(&self) -> usize {
        self.shared.notifies.load(Ordering::SeqCst)
    }

    pub(crate) fn status(&self) -> u32 {
        self.shared.regs.lock().unwrap().status
    }

    pub(crate) fn driver_features(&self) -> u64 {
        self.shared.regs.lock().unwrap().driver_features
    }

    /// (ready, size) of each queue.
    pub(crate) fn queues(&self) -> Vec<(u32, u32)> {
        self.shared
            .regs
            .lock()
            .unwrap()
            .queues
            .iter()
            .map(|q| (q.ready, q.num))
            .collect()
    }

    /// Waits for the device thread to finish (the driver must be gone) and
    /// panics if the device saw protocol violations.
    pub(crate) fn finish(mut self) {
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        let violations = self.violations();
        assert!(
            violations.is_empty(),
            "device saw violations: {violations:?}"
        );
    }
}

impl Shared {
    fn violation(&self, what: String) {
        self.violations.lock().unwrap().push(what);
    }

    /// Consumes every new available entry of `queue`, as a virtio device
    /// does on a notify.
    fn process(&self, queue: u16) {
        let mut regs = self.regs.lock().unwrap();
        if regs.status & status::DRIVER_OK == 0 {
            self.violation(format!("notify of queue {queue} before DRIVER_OK"));
            return;
        }
        let config = regs.setup.config;
        let Some(mut q) = regs.queues.get(usize::from(queue)).copied() else {
            self.violation(format!("notify of missing queue {queue}"));
            return;
        };
        if q.ready == 0 {
            self.violation(format!("notify of queue {queue} that is not ready"));
            return;
        }
        let ram = self.ram;
        let num = q.num as u16;
        let avail_idx = ram.atomic_u16(q.driver + 2).load(Ordering::Acquire);
        while q.last_avail != avail_idx {
            let head = ram.read_u16(q.driver + 4 + 2 * u64::from(q.last_avail % num));
            let Some((readable, status_addr)) = self.read_chain(&q, head) else {
                break;
            };
            let received = self.parse(queue, &readable, &config);
            let response = (self.responder.lock().unwrap())(&received);
            self.log.lock().unwrap().push(received);
            q.last_avail = q.last_avail.wrapping_add(1);
            let Some(status_byte) = response else {
                if self.reset_on_drop.load(Ordering::SeqCst) {
                    // Reset under the request: no completion, Status 0.
                    regs.status = 0;
                    for queue in regs.queues.iter_mut() {
                        queue.ready = 0;
                    }
                    return;
                }
                // A device that gave up: no completion, NEEDS_RESET.
                regs.status |= status::DEVICE_NEEDS_RESET;
                break;
            };
            ram.write_u8(status_addr, status_byte);
            let slot = q.device + 4 + 8 * u64::from(q.used_idx % num);
            ram.write_u32(slot, u32::from(head));
            ram.write_u32(slot + 4, 1);
            q.used_idx = q.used_idx.wrapping_add(1);
            // Release: the status and the used element before the index.
            ram.atomic_u16(q.device + 2)
                .store(q.used_idx, Ordering::Release);
        }
        regs.queues[usize::from(queue)] = q;
    }

    /// The readable bytes and the status byte's address of the chain at
    /// `head`, checking the shape the driver promises.
    fn read_chain(&self, q: &FakeQueue, head: u16) -> Option<(Vec<u8>, u64)> {
        let ram = self.ram;
        let mut readable = Vec::new();
        let mut writable: Option<u64> = None;
        let mut index = head;
        for _ in 0..q.num {
            if u32::from(index) >= q.num {
                self.violation(format!("descriptor index {index} out of range"));
                return None;
            }
            let d = q.desc + 16 * u64::from(index);
            let (addr, len) = (ram.read_u64(d), ram.read_u32(d + 8));
            let (flags, next) = (ram.read_u16(d + 12), ram.read_u16(d + 14));
            if flags & 2 != 0 {
                if writable.is_some() || len < 1 {
                    self.violation(format!("unexpected writable descriptor {index}"));
                    return None;
                }
                writable = Some(addr);
            } else {
                if writable.is_some() {
                    self.violation("readable descriptor after writable".into());
                    return None;
                }
                readable.extend((0..u64::from(len)).map(|i| ram.read_u8(addr + i)));
            }
            if flags & 1 == 0 {
                let Some(status_addr) = writable else {
                    self.violation("chain without a status descriptor".into());
                    return None;
                };
                return Some((readable, status_addr));
            }
            index = next;
        }
        self.violation("descriptor chain loops".into());
        None
    }

    fn parse(&self, queue: u16, readable: &[u8], config: &Config) -> Received {
        let u32_at = |o: usize| u32::from_le_bytes(readable[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(readable[o..o + 8].try_into().unwrap());
        if readable.len() < HEADER_SIZE || (readable.len() - HEADER_SIZE) % SEGMENT_SIZE != 0 {
            self.violation(format!("request of {} bytes", readable.len()));
            return Received {
                queue,
                header: RequestHeader::default(),
                segments: Vec::new(),
            };
        }
        let header = RequestHeader {
            request_type: u32_at(0),
            flags: u32_at(4),
            tag: u64_at(8),
        };
        let segments: Vec<Segment> = (HEADER_SIZE..readable.len())
            .step_by(SEGMENT_SIZE)
            .map(|o| Segment {
                addr: u64_at(o),
                len: u64_at(o + 8),
            })
            .collect();
        // What the real device would refuse.
        if header.flags != 0 {
            self.violation(format!("flags {:#x}", header.flags));
        }
        let line = u64::from(config.cache_line_size);
        match cache_flush::RequestType::from_raw(header.request_type) {
            Some(cache_flush::RequestType::FlushAll) if !segments.is_empty() => {
                self.violation("FLUSH_ALL with segments".into())
            }
            Some(cache_flush::RequestType::FlushRange) => {
                if segments.is_empty() || segments.len() > config.max_segments as usize {
                    self.violation(format!("{} segments", segments.len()));
                }
                if segments.iter().map(|s| s.len).sum::<u64>() > config.max_bytes {
                    self.violation("more than max_bytes".into());
                }
                if segments
                    .iter()
                    .any(|s| s.len == 0 || s.addr % line != 0 || s.len % line != 0)
                {
                    self.violation(format!("segments not whole lines: {segments:?}"));
                }
            }
            Some(_) => {}
            None => self.violation(format!("request type {}", header.request_type)),
        }
        Received {
            queue,
            header,
            segments,
        }
    }
}

impl Registers for FakeDevice {
    fn read32(&self, offset: u32) -> u32 {
        let r = self.shared.regs.lock().unwrap();
        let sel = r.queue_sel as usize;
        match offset {
            reg::MAGIC_VALUE => r.setup.magic,
            reg::VERSION => r.setup.version,
            reg::DEVICE_ID => r.setup.device_id,
            reg::VENDOR_ID => 0x1234,
            reg::DEVICE_FEATURES => match r.device_features_sel {
                0 => r.setup.offered as u32,
                1 => (r.setup.offered >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => {
                if sel < r.queues.len() {
                    r.setup.queue_num_max
                } else {
                    0
                }
            }
            reg::QUEUE_READY => r.queues.get(sel).map_or(0, |q| q.ready),
            reg::STATUS => r.status,
            reg::CONFIG_GENERATION => r.config_generation,
            o if (reg::CONFIG..reg::CONFIG + 56).contains(&o) => {
                let c = r.setup.config;
                let mut bytes = [0u8; 56];
                bytes[0..4].copy_from_slice(&c.cache_line_size.to_le_bytes());
                bytes[4..8].copy_from_slice(&c.num_queues.to_le_bytes());
                bytes[8..12].copy_from_slice(&c.max_segments.to_le_bytes());
                bytes[12..16].copy_from_slice(&c.reserved0.to_le_bytes());
                bytes[16..24].copy_from_slice(&c.max_bytes.to_le_bytes());
                bytes[24..32].copy_from_slice(&c.full_flush_cost_ns.to_le_bytes());
                bytes[32..40].copy_from_slice(&c.full_break_even_bytes.to_le_bytes());
                bytes[40..48].copy_from_slice(&c.full_per_sec_limit.to_le_bytes());
                bytes[48..56].copy_from_slice(&c.range_bytes_per_sec_limit.to_le_bytes());
                let o = (o - reg::CONFIG) as usize;
                u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap())
            }
            _ => {
                drop(r);
                self.shared
                    .violation(format!("read of register {offset:#x}"));
                0
            }
        }
    }

    fn write32(&self, offset: u32, value: u32) {
        if offset == reg::QUEUE_NOTIFY {
            self.shared.notifies.fetch_add(1, Ordering::SeqCst);
            // The device thread may be gone only if the test is ending.
            let _ = self.notify.send(value as u16);
            return;
        }
        let mut r = self.shared.regs.lock().unwrap();
        let sel = r.queue_sel as usize;
        let high = |old: u64, v: u32| (old & 0xffff_ffff) | u64::from(v) << 32;
        let low = |old: u64, v: u32| (old & !0xffff_ffff) | u64::from(v);
        let live = r.status & status::DRIVER_OK != 0;
        let mut bad = None;
        match offset {
            reg::DEVICE_FEATURES_SEL => r.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => r.driver_features_sel = value,
            reg::DRIVER_FEATURES => match r.driver_features_sel {
                0 => r.driver_features = low(r.driver_features, value),
                1 => r.driver_features = high(r.driver_features, value),
                _ => {}
            },
            reg::QUEUE_SEL => r.queue_sel = value,
            reg::STATUS if value == 0 => {
                r.status = 0;
                r.driver_features = 0;
                let n = r.queues.len();
                r.queues = vec![FakeQueue::default(); n];
            }
            reg::STATUS => {
                let mut value = value;
                if value & status::FEATURES_OK != 0 && r.status & status::FEATURES_OK == 0 {
                    let accepted = r.driver_features;
                    let ok = !r.setup.refuse_features
                        && accepted & !r.setup.offered == 0
                        && accepted & V1 != 0;
                    if !ok {
                        value &= !status::FEATURES_OK;
                    }
                }
                // DEVICE_NEEDS_RESET is the device's own bit.
                r.status = value | (r.status & status::DEVICE_NEEDS_RESET);
            }
            _ if live => bad = Some(format!("write of {offset:#x} after DRIVER_OK")),
            _ if sel >= r.queues.len() => bad = Some(format!("queue register of queue {sel}")),
            reg::QUEUE_NUM => {
                if !value.is_power_of_two() || value > r.setup.queue_num_max {
                    bad = Some(format!("queue size {value}"));
                }
                r.queues[sel].num = value;
            }
            reg::QUEUE_READY => r.queues[sel].ready = value,
            reg::QUEUE_DESC_LOW => r.queues[sel].desc = low(r.queues[sel].desc, value),
            reg::QUEUE_DESC_HIGH => r.queues[sel].desc = high(r.queues[sel].desc, value),
            reg::QUEUE_DRIVER_LOW => r.queues[sel].driver = low(r.queues[sel].driver, value),
            reg::QUEUE_DRIVER_HIGH => r.queues[sel].driver = high(r.queues[sel].driver, value),
            reg::QUEUE_DEVICE_LOW => r.queues[sel].device = low(r.queues[sel].device, value),
            reg::QUEUE_DEVICE_HIGH => r.queues[sel].device = high(r.queues[sel].device, value),
            _ => bad = Some(format!("write of register {offset:#x}")),
        }
        drop(r);
        if let Some(what) = bad {
            self.shared.violation(what);
        }
    }
}
