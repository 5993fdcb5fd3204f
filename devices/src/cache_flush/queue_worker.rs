//! The queue worker: an event-manager subscriber on the queue eventfds that
//! pops, validates, batches, flushes and completes.
//!
//! One event runs (up to [`MAX_ROUNDS_PER_EVENT`] times):
//!
//! 1. drain every queue eventfd (before popping, so that a notify for a chain
//!    added after the pop below stays pending for the next event);
//! 2. lock the device state; pop every available chain of every queue;
//!    parse and validate each; complete the invalid ones at once with their
//!    status; gather the valid ones into one [`FlushBatch`]; unlock;
//! 3. hand the batch to the [`FlushBackend`] with a [`BatchCompletion`]. The
//!    back end pauses every vCPU, flushes, and answers (vCPUs still paused),
//!    which writes each request's status byte and used entry — under the
//!    lock again, and only if the device was not reset meanwhile;
//! 4. re-check the queues: requests that arrived during the flush (whose
//!    notify may have been drained in step 1 of this very event) are served
//!    by the next round.
//!
//! The device-state mutex is never held while the flush engine runs: the
//! engine waits for every vCPU to park, and a vCPU in the middle of an MMIO
//! exit that needs the mutex (a register read, a reset) could otherwise never
//! finish its exit, never park, and the VM would deadlock.

use std::num::Wrapping;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cache_flush_abi::cache_flush::{RequestType, Status};
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{error, warn};
use smallvec::SmallVec;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::device::{Active, Shared};
use super::metrics::CacheFlushMetrics;
use super::request::{ChainStart, ParsedChain, Request, RequestError};
use super::{BatchCompletion, BatchRequest, FlushBackend, FlushBatch, FlushError};
use crate::log_throttle::LogThrottle;
use crate::virtio::VirtioInterrupt;

/// How many pop-flush-complete rounds one event may run. A guest that keeps
/// its queues full would otherwise keep the event loop (and the other devices
/// on it) waiting; after this many rounds the queue worker signals itself and
/// returns to the loop.
pub const MAX_ROUNDS_PER_EVENT: usize = 4;

/// The cache-flush device's queue worker. Add it to the VMM's event manager;
/// it registers the queue eventfds itself in `init`.
///
/// Clones share one worker: a VMM that handles QueueNotify on the notifying
/// vCPU's own thread keeps a clone there and calls
/// [`QueueWorker::serve_notify`] after the exit (with no device or bus
/// lock held), while the event loop keeps serving ioeventfd notifies and
/// any work a vCPU's round budget left. Every method takes `&self`: the
/// device state has its own lock, never held across a flush, and the back
/// end serialises its pauses.
#[derive(Clone)]
pub struct QueueWorker {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    flusher: Box<dyn FlushBackend>,
    /// Notifies that arrived while the device was not running (before
    /// DRIVER_OK, or after a reset): through an ioeventfd they never reach
    /// the transport, so this is where they are noticed.
    idle_notifies: AtomicU64,
    /// Batches whose buffers the next rounds reuse: a request's path then
    /// allocates nothing (each allocation is paid cold, after an exit).
    /// One per round in flight at once; see [`SPARE_BATCHES`].
    spare_batches: Mutex<Vec<FlushBatch>>,
}

/// At most this many spare batches are kept (rounds served at once, by
/// several vCPU threads and the event loop, each take one).
const SPARE_BATCHES: usize = 4;

/// A spare batch keeps its buffers only up to this many extents: a guest
/// that once filled every queue with the most segments must not pin that
/// much host memory for good.
const SPARE_MAX_EXTENTS: usize = 1024;

/// A valid request waiting for its flush.
struct Pending {
    queue: u16,
    head: u16,
    status_addr: GuestAddress,
}

/// The requests of one batch. Most batches hold one request, or one per
/// vCPU of a small VM: those fit inline, in the answer itself (which is
/// moved a few times on its way to the back end and back: kept small).
type PendingList = SmallVec<[Pending; 4]>;

/// Why a pass over the queues served nothing.
enum NotServing {
    /// The device is not running (no DRIVER_OK yet, or reset).
    NotRunning,
    /// The device waits for a reset (DEVICE_NEEDS_RESET).
    NeedsReset,
}

/// What one pass over the queues collected.
struct Round {
    generation: u64,
    popped: usize,
    batch: FlushBatch,
    pending: PendingList,
}

/// The device's answer to one batch (see [`BatchCompletion`]): writes the
/// status byte and used entry of every request, unless the device was reset
/// since the batch was popped.
pub(crate) struct DeviceAnswer {
    shared: Arc<Shared>,
    generation: u64,
    pending: PendingList,
}

impl DeviceAnswer {
    pub(crate) fn give(self, result: Result<(), FlushError>) {
        complete_batch(&self.shared, self.generation, self.pending, result);
    }
}

impl QueueWorker {
    pub(crate) fn new(shared: Arc<Shared>, flusher: Box<dyn FlushBackend>) -> Self {
        Self {
            inner: Arc::new(Inner {
                shared,
                flusher,
                idle_notifies: AtomicU64::new(0),
                spare_batches: Mutex::new(Vec::new()),
            }),
        }
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<CacheFlushMetrics> {
        self.inner.shared.metrics.clone()
    }

    /// Serves a notify now, on the calling thread: pops, flushes and
    /// completes everything available on every queue when it looks, as one
    /// batch. A request made available after the look is served by its own
    /// notify. For a VMM that handles QueueNotify on the notifying
    /// vCPU's thread: call it after the MMIO exit is dispatched, with no
    /// device or bus lock held, so that the requester finds its request
    /// completed when its notify returns (and tell the transport not to
    /// signal the eventfd as well: `MmioTransport::set_notify_signals_eventfd`).
    /// The queue eventfds are left as they are: reading them would cost a
    /// system call per queue on every request, and a stale signal only
    /// makes the event loop find nothing to do. `queue` is for the log only.
    pub fn serve_notify(&self, queue: u32) {
        self.serve_if_running(queue, true);
    }

    /// Serves the queues (see [`Inner::serve`]); a notify that finds the
    /// device not running is counted and logged.
    fn serve_if_running(&self, queue: u32, trust_notifies: bool) {
        if let Served::NotRunning = self.inner.serve(trust_notifies) {
            let n = self.inner.idle_notifies.fetch_add(1, Ordering::Relaxed) + 1;
            CacheFlushMetrics::add(&self.inner.shared.metrics.notifies_while_idle, 1);
            self.inner.shared.log_throttle.warn("notify-while-idle", || {
                format!(
                    "cache-flush: queue {queue} notified while the device is not running (no DRIVER_OK yet, or reset); ignored ({n} so far)"
                )
            });
        }
    }
}

/// How a serve began.
enum Served {
    /// The device was not running when it first looked.
    NotRunning,
    /// It looked (and served whatever it found).
    Looked,
}

impl Inner {
    /// Empties every queue eventfd. They are non-blocking: an empty one
    /// reports `WouldBlock`, which is not an error.
    fn drain_notifications(&self) {
        for (index, event) in self.shared.queue_events.iter().enumerate() {
            if let Err(e) = event.read() {
                if e.kind() != std::io::ErrorKind::WouldBlock {
                    warn!("cache-flush: cannot read the eventfd of queue {index}: {e}");
                }
            }
        }
    }

    /// Serves the queues until they are empty or the round budget is spent.
    ///
    /// With `trust_notifies`, one round ends it: a round takes everything
    /// available when it looks, and a request made after that comes with a
    /// notify of its own (the device never suppresses notifications), which
    /// starts another serve, so looking again would only cost every request
    /// a second pass over the queues. The notifying vCPU's own thread serves
    /// that way; the event loop, whose latency matters less, also picks up
    /// requests a driver published without notifying.
    fn serve(&self, trust_notifies: bool) -> Served {
        for round_index in 0..MAX_ROUNDS_PER_EVENT {
            let round = match self.collect() {
                Ok(round) => round,
                Err(NotServing::NotRunning) if round_index == 0 => return Served::NotRunning,
                // Reset during an earlier round: its requests were answered
                // (or dropped with the rings); nothing else is owed.
                Err(NotServing::NotRunning | NotServing::NeedsReset) => return Served::Looked,
            };
            if round.popped == 0 {
                self.recycle(round.batch);
                return Served::Looked;
            }
            self.flush_and_complete(round);
            if trust_notifies {
                return Served::Looked;
            }
        }
        // Work may remain: come back after the loop's other subscribers.
        if let Some(event) = self.shared.queue_events.first() {
            if let Err(e) = event.write(1) {
                error!("cache-flush: cannot re-signal queue 0: {e}");
            }
        }
        Served::Looked
    }

    /// An empty batch with whatever buffers a finished round left.
    fn spare_batch(&self) -> FlushBatch {
        let spare = self
            .spare_batches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop();
        spare.unwrap_or_default()
    }

    /// Keeps `batch`'s buffers for a later round.
    fn recycle(&self, mut batch: FlushBatch) {
        if batch.extents.capacity() > SPARE_MAX_EXTENTS {
            return;
        }
        batch.extents.clear();
        batch.requests.clear();
        batch.full = false;
        let mut spares = self.spare_batches.lock().unwrap_or_else(|p| p.into_inner());
        if spares.len() < SPARE_BATCHES {
            spares.push(batch);
        }
    }

    /// Step 2: pop and validate everything available (possibly nothing),
    /// under the lock.
    fn collect(&self) -> Result<Round, NotServing> {
        let shared = &*self.shared;
        let metrics = &*shared.metrics;
        let mut state = shared.lock();
        let generation = state.generation;
        let Some(Active {
            memory,
            queues,
            interrupt,
            limits,
            full_limiter,
            range_limiter,
        }) = state.active.as_mut()
        else {
            return Err(NotServing::NotRunning);
        };
        if shared.needs_reset.load(Ordering::SeqCst) {
            // Serves nothing until the driver resets the device.
            return Err(NotServing::NeedsReset);
        }
        let mut round = Round {
            generation,
            popped: 0,
            batch: self.spare_batch(),
            pending: PendingList::new(),
        };
        let now = Instant::now();
        for (index, queue) in queues.iter_mut().enumerate() {
            if !queue.ready() {
                continue;
            }
            // Queues are at most MAX_QUEUES (32): the index fits.
            let index = index as u16;
            let mut used_added = false;
            // Checked here rather than left to virtio-queue, which logs an
            // ERROR line per pop when the index ran away (the guest could
            // write them at will) and would leave the queue stalled without
            // telling the driver.
            let Some(available) = entries_available(queue, memory) else {
                CacheFlushMetrics::add(&metrics.avail_index_jumps, 1);
                shared.log_throttle.warn("avail-index-jump", || {
                    format!(
                        "cache-flush: queue {index}: available index more than {} entries ahead of the device; setting DEVICE_NEEDS_RESET",
                        queue.size()
                    )
                });
                shared.needs_reset.store(true, Ordering::SeqCst);
                interrupt.signal_config_change();
                // Requests already taken from other queues are still
                // flushed and answered.
                break;
            };
            // What was there when the round looked, at most a ring's worth:
            // a guest refilling the ring as fast as we pop cannot keep us
            // here, and no pop is spent finding the ring empty.
            for _ in 0..available {
                let Some(chain) = queue.pop_descriptor_chain(&*memory) else {
                    break;
                };
                let head = chain.head_index();
                if head >= queue.size() {
                    // No used entry can name a descriptor the table does not
                    // have (virtio-queue refuses it, with an ERROR line):
                    // counted and skipped, the driver sees nothing.
                    CacheFlushMetrics::add(&metrics.head_index_out_of_range, 1);
                    shared.log_throttle.warn("head-index-out-of-range", || {
                        format!(
                            "cache-flush: queue {index}: head index {head} outside its {}-entry table; skipped",
                            queue.size()
                        )
                    });
                    continue;
                }
                round.popped += 1;
                let start = ChainStart {
                    desc_table: GuestAddress(queue.desc_table()),
                    queue_size: queue.size(),
                    head_index: chain.head_index(),
                };
                let parsed = ParsedChain::parse(start, memory, limits);
                count_type(metrics, parsed.request_type);
                let admitted = match &parsed.request {
                    Ok(request) => admit(request, &round.batch, full_limiter, range_limiter, now)
                        .map(|()| request),
                    Err(e) => Err(e.clone()),
                };
                match (admitted, parsed.status_addr) {
                    (Ok(request), Some(status_addr)) => {
                        if let Request::FlushRange(extents) = &request {
                            CacheFlushMetrics::add(&metrics.bytes_requested, request.bytes());
                            round.batch.extents.extend_from_slice(extents);
                        } else {
                            round.batch.full = true;
                        }
                        round.batch.requests.push(BatchRequest {
                            queue: index,
                            tag: parsed.tag.unwrap_or(0),
                        });
                        round.pending.push(Pending {
                            queue: index,
                            head: parsed.head_index,
                            status_addr,
                        });
                    }
                    // A valid request always has a status byte (parsing
                    // checks it first); keep the compiler and the guest safe
                    // anyway.
                    (Ok(_), None) => {
                        complete_one(queue, memory, index, &parsed, None, metrics);
                        used_added = true;
                    }
                    (Err(e), _) => {
                        metrics.count_rule(&e);
                        log_rejection(&shared.log_throttle, index, &parsed, &e);
                        let status = e.answerable().then(|| e.status());
                        complete_one(queue, memory, index, &parsed, status, metrics);
                        used_added = true;
                    }
                }
            }
            if used_added {
                notify_driver(queue, memory, interrupt.as_ref(), index);
            }
        }
        Ok(round)
    }

    /// Step 3: flush the batch (lock released) and complete it from the
    /// engine's callback.
    fn flush_and_complete(&self, round: Round) {
        let Round {
            generation,
            batch,
            pending,
            ..
        } = round;
        if pending.is_empty() {
            self.recycle(batch);
            return;
        }
        let metrics = &self.shared.metrics;
        if batch.is_empty() {
            // Only FLUSH_RANGEs without segments: nothing to flush, no reason
            // to pause the VM.
            complete_batch(&self.shared, generation, pending, Ok(()));
            self.recycle(batch);
            return;
        }
        CacheFlushMetrics::add(&metrics.batches, 1);
        if batch.full {
            CacheFlushMetrics::add(&metrics.full_batches, 1);
        }
        // The answer owns what it needs, so the back end may give it from
        // any thread, after `flush` returned; if it is dropped unanswered it
        // answers HOST_ERROR itself.
        let done = BatchCompletion::for_device(DeviceAnswer {
            shared: self.shared.clone(),
            generation,
            pending,
        });
        self.flusher.flush(&batch, done);
        self.recycle(batch);
    }
}

/// How many entries the driver has made available beyond the device's
/// position; `None` when that is more than a ring's worth (the ring cannot
/// hold that many new entries, so the index is corrupt) or the index is
/// unreadable.
fn entries_available(queue: &Queue, memory: &GuestMemoryMmap) -> Option<u16> {
    let avail = queue.avail_idx(memory, Ordering::Acquire).ok()?;
    let available = (avail - Wrapping(queue.next_avail())).0;
    (available <= queue.size()).then_some(available)
}

/// Applies the rate limits to a valid request. A FLUSH_ALL joining a batch
/// that already holds one costs nothing extra and is not charged.
fn admit(
    request: &Request,
    batch: &FlushBatch,
    full_limiter: &mut super::rate_limit::TokenBucket,
    range_limiter: &mut super::rate_limit::TokenBucket,
    now: Instant,
) -> Result<(), RequestError> {
    match request {
        Request::FlushAll => {
            if !batch.full && !full_limiter.try_take(1, now) {
                return Err(RequestError::RateLimited {
                    request_type: RequestType::FlushAll,
                });
            }
        }
        Request::FlushRange(_) => {
            let bytes = request.bytes();
            if bytes > 0 && !range_limiter.try_take(bytes, now) {
                return Err(RequestError::RateLimited {
                    request_type: RequestType::FlushRange,
                });
            }
        }
    }
    Ok(())
}

fn count_type(metrics: &CacheFlushMetrics, request_type: Option<u32>) {
    let counter = match request_type.and_then(RequestType::from_raw) {
        Some(RequestType::FlushRange) => &metrics.requests_range,
        Some(RequestType::FlushAll) => &metrics.requests_full,
        None => &metrics.requests_other,
    };
    CacheFlushMetrics::add(counter, 1);
}

/// The structured log line of a refused request: the rule, the status the
/// guest gets, and where the request came from. Throttled per rule: a guest
/// decides how many bad requests it sends (every one is counted in
/// `rejected_by_rule` all the same).
fn log_rejection(throttle: &LogThrottle, queue: u16, parsed: &ParsedChain, error: &RequestError) {
    throttle.warn(error.rule(), || {
        let tag = parsed
            .tag
            .map_or_else(|| "none".to_string(), |tag| format!("{tag:#x}"));
        let status = if error.answerable() {
            format!("{:?}", error.status())
        } else {
            "none(used_len=0)".to_string()
        };
        format!(
            "cache-flush: request rejected: rule={} status={status} queue={queue} head={} tag={tag}: {error}",
            error.rule(),
            parsed.head_index,
        )
    });
}

/// Writes `status` (if any) and the used entry of one request.
fn complete_one(
    queue: &mut Queue,
    memory: &GuestMemoryMmap,
    index: u16,
    parsed: &ParsedChain,
    status: Option<Status>,
    metrics: &CacheFlushMetrics,
) {
    let used_len = match (status, parsed.status_addr) {
        (Some(status), Some(addr)) => {
            write_status(memory, addr, status, index, parsed.head_index);
            metrics.count_status(status);
            parsed.used_len()
        }
        _ => {
            CacheFlushMetrics::add(&metrics.unanswerable, 1);
            0
        }
    };
    add_used(queue, memory, index, parsed.head_index, used_len);
}

fn write_status(
    memory: &GuestMemoryMmap,
    addr: GuestAddress,
    status: Status,
    queue: u16,
    head: u16,
) {
    if let Err(e) = super::guest_bytes::write(memory, &[status as u8], addr) {
        // Parsing checked the address; only a shrunk memory map gets here.
        warn!("cache-flush: cannot write status of queue {queue} head {head} at {addr:#x?}: {e}");
    }
}

fn add_used(queue: &mut Queue, memory: &GuestMemoryMmap, index: u16, head: u16, len: u32) {
    if let Err(e) = queue.add_used(memory, head, len) {
        // A head index outside the ring: the driver corrupted its own
        // available ring; there is no entry we could complete.
        warn!("cache-flush: cannot complete head {head} on queue {index}: {e}");
    }
}

fn notify_driver(
    queue: &mut Queue,
    memory: &GuestMemoryMmap,
    interrupt: &dyn VirtioInterrupt,
    index: u16,
) {
    // Without VIRTIO_F_EVENT_IDX (not offered) this is always true; asking
    // keeps the device right if it is ever offered.
    if queue.needs_notification(memory).unwrap_or(true) {
        interrupt.signal_used_queue(index);
    }
}

/// The answer to a batch: the back end runs it with every vCPU paused. Writes the
/// status byte and used entry of every request of the batch — unless the
/// driver reset the device since the batch was popped, in which case the
/// rings may already be reused and nothing is written.
fn complete_batch(
    shared: &Shared,
    generation: u64,
    pending: PendingList,
    result: Result<(), FlushError>,
) {
    let metrics = &*shared.metrics;
    let status = match &result {
        Ok(()) => Status::Ok,
        Err(e) => {
            // A host failure, so ERROR; throttled all the same, as a guest
            // may be able to provoke it batch after batch.
            let requests = pending.len();
            shared.log_throttle.log(log::Level::Error, "flush-failed", || {
                format!("cache-flush: flush of {requests} requests failed, answering HOST_ERROR: {e}")
            });
            CacheFlushMetrics::add(&metrics.flush_failures, 1);
            Status::HostError
        }
    };
    let mut state = shared.lock();
    let current = state.generation;
    let active = match state.active.as_mut() {
        Some(active) if current == generation => active,
        _ => {
            let dropped = pending.len();
            shared.log_throttle.warn("reset-during-flush", || {
                format!("cache-flush: device reset during a flush; dropping {dropped} completions")
            });
            CacheFlushMetrics::add(&metrics.dropped_after_reset, pending.len() as u64);
            return;
        }
    };
    let Active {
        memory,
        queues,
        interrupt,
        ..
    } = active;
    // One bit per queue: no allocation on every request's path.
    const _: () = assert!(cache_flush_abi::cache_flush::MAX_QUEUES <= 64);
    let mut used_added: u64 = 0;
    for p in pending {
        let Some(queue) = queues.get_mut(usize::from(p.queue)) else {
            continue;
        };
        write_status(memory, p.status_addr, status, p.queue, p.head);
        metrics.count_status(status);
        add_used(queue, memory, p.queue, p.head, 1);
        used_added |= 1 << p.queue;
    }
    for (index, queue) in queues.iter_mut().enumerate() {
        if used_added & (1 << index) != 0 {
            notify_driver(queue, memory, interrupt.as_ref(), index as u16);
        }
    }
}

impl MutEventSubscriber for QueueWorker {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let set = events.event_set();
        if set.intersects(EventSet::ERROR | EventSet::HANG_UP) {
            // Should not happen to an eventfd; stop watching it rather than
            // spin on it.
            error!(
                "cache-flush: error on the eventfd of queue {} ({set:?}); no longer watched",
                events.data()
            );
            if let Err(e) = ops.remove(events) {
                error!("cache-flush: cannot unregister the eventfd: {e}");
            }
            return;
        }
        if !set.contains(EventSet::IN) {
            return;
        }
        // Emptied first, or the level-triggered epoll would report them
        // again; a notify that arrives meanwhile signals them anew.
        self.inner.drain_notifications();
        self.serve_if_running(events.data(), false);
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (index, event) in self.inner.shared.queue_events.iter().enumerate() {
            // At most MAX_QUEUES queues.
            let registration = Events::with_data(event, index as u32, EventSet::IN);
            if let Err(e) = ops.add(registration) {
                error!("cache-flush: cannot watch the eventfd of queue {index}: {e}");
            }
        }
    }
}
