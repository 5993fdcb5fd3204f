//! The paravirtual cache-flush device (`resources/cache-flush-device.md`).
//!
//! * [`request`]: parses and validates one descriptor chain.
//! * [`device`]: the virtio device (features, config space, queues).
//! * [`queue_worker`]: the queue-event loop glue: pop, validate, batch, flush,
//!   complete.
//! * [`metrics`]: per-device counters.
//!
//! Wiring, in the VMM: build a [`CacheFlushDevice`] from
//! [`CacheFlushSettings`]; take its [`CacheFlushDevice::metrics`] and its
//! [`CacheFlushDevice::queue_worker`] (given the flush back end); put the
//! device behind a [`crate::virtio::mmio::MmioTransport`] on the MMIO bus;
//! add the worker to the event manager; then either register each of
//! `transport.queue_notify_eventfds()` as an ioeventfd on
//! `base + QUEUE_NOTIFY_OFFSET` (4 bytes, datamatch = queue index), or call
//! [`QueueWorker::serve_notify`] on the vCPU thread after a QueueNotify
//! write (this VMM's default).
//!
//! The device does not flush anything itself: it hands validated work to a
//! [`FlushBackend`], which the VMM implements with its pause-all flush engine.

use vm_memory::GuestAddress;

pub mod device;
#[cfg(test)]
mod fuzz_regressions;
mod guest_bytes;
pub mod metrics;
pub mod queue_worker;
mod rate_limit;
pub mod request;
#[cfg(test)]
mod test_utils;
#[cfg(test)]
mod tests;

pub use device::{CacheFlushDevice, CacheFlushSettings, FullFlushEstimate};
pub use metrics::{CacheFlushMetrics, MetricsSnapshot};
pub use queue_worker::QueueWorker;
pub use request::{Request, RequestError};

/// A validated extent of guest RAM to write back and invalidate. The device
/// guarantees `len > 0` and that the whole extent lies inside one region of
/// the guest memory it was activated with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestExtent {
    /// First guest-physical byte.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u64,
}

/// Everything to flush in one pause of the VM: the union of the requests that
/// were pending at the same moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlushBatch {
    /// Extents of the FLUSH_RANGE requests, in request order.
    pub extents: Vec<GuestExtent>,
    /// True if at least one FLUSH_ALL request is in the batch; then
    /// `extents` may be ignored, every resident line being flushed anyway.
    pub full: bool,
    /// Who asked: one entry per request of the batch, in pop order (for the
    /// flush log and for pause hooks that act on one tag).
    pub requests: Vec<BatchRequest>,
}

/// One request of a batch, as the flush log and pause hooks see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchRequest {
    /// The queue it came on.
    pub queue: u16,
    /// The header's `tag`: opaque to the device, the driver's own label (a
    /// hand-off test tags the flush that hands a buffer over, and a host
    /// hook acts on that tag).
    pub tag: u64,
}

impl FlushBatch {
    /// True when there is nothing to flush.
    pub fn is_empty(&self) -> bool {
        self.extents.is_empty() && !self.full
    }
}

/// Why a flush engine could not perform a batch.
#[derive(Debug, thiserror::Error)]
#[error("cache flush failed: {reason}")]
pub struct FlushError {
    /// Human-readable cause, for the host log.
    pub reason: String,
}

/// The answer to one batch, owed exactly once. A back end calls
/// [`BatchCompletion::complete`] **while every vCPU is still paused** (that
/// is what makes an OK status a promise). It is an owned value, so a back end
/// may answer from any thread, after `flush` has returned: the device does
/// not depend on its caller blocking. Dropped unanswered (a back-end bug, or
/// a panic unwinding through it), it answers HOST_ERROR itself, so a
/// request is never left without an answer.
pub struct BatchCompletion {
    answer: Option<Answer>,
}

/// What answering a batch does.
enum Answer {
    /// The device's own answer: writes the batch's status bytes and used
    /// entries. Held inline, so that a request costs no allocation for it.
    Device(queue_worker::DeviceAnswer),
    /// Any other (a test's, another device model's).
    Other(Box<dyn FnOnce(Result<(), FlushError>) + Send>),
}

impl Answer {
    fn give(self, result: Result<(), FlushError>) {
        match self {
            Answer::Device(answer) => answer.give(result),
            Answer::Other(answer) => answer(result),
        }
    }
}

impl BatchCompletion {
    /// A completion that runs `answer` with the batch's outcome.
    pub fn new(answer: impl FnOnce(Result<(), FlushError>) + Send + 'static) -> Self {
        Self {
            answer: Some(Answer::Other(Box::new(answer))),
        }
    }

    /// The device's own completion of a batch it popped.
    fn for_device(answer: queue_worker::DeviceAnswer) -> Self {
        Self {
            answer: Some(Answer::Device(answer)),
        }
    }

    /// Answers the batch: `Ok` only if every line was written back and
    /// invalidated while no vCPU ran.
    pub fn complete(mut self, result: Result<(), FlushError>) {
        if let Some(answer) = self.answer.take() {
            answer.give(result);
        }
    }
}

impl Drop for BatchCompletion {
    fn drop(&mut self) {
        if let Some(answer) = self.answer.take() {
            log::error!("cache-flush: the flush back end dropped a batch without answering it; answering HOST_ERROR");
            answer.give(Err(FlushError {
                reason: "the flush back end did not answer the batch".into(),
            }));
        }
    }
}

/// The boundary between the device and whatever performs its flushes (this
/// project's `flush-engine` crate; a test double; another VMM's engine).
pub trait FlushBackend: Send + Sync {
    /// Pauses every vCPU, writes back and invalidates every cache line of
    /// `batch` on every vCPU's physical core, answers `done` with the outcome
    /// **while every vCPU is still paused**, and only then resumes them.
    /// May return before answering (an asynchronous back end, which then
    /// keeps a copy of what it needs: `batch` is lent for the call, so that
    /// the device can reuse its buffers for the next one); `done` is
    /// answered exactly once either way.
    fn flush(&self, batch: &FlushBatch, done: BatchCompletion);
}
