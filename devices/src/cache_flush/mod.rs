//! The paravirtual cache-flush device (`resources/cache-flush-device.md`).
//!
//! * [`request`]: parses and validates one descriptor chain.
//! * [`device`]: the virtio device (features, config space, queues).
//! * [`handler`]: the queue-event loop glue: pop, validate, batch, flush,
//!   complete.
//! * [`metrics`]: per-device counters.
//!
//! Wiring, in the VMM: build a [`CacheFlush`] from [`CacheFlushSettings`];
//! take its [`CacheFlush::metrics`] and [`CacheFlush::handler`] (given the
//! flush engine); put the device behind a
//! [`crate::virtio::mmio::MmioTransport`] on the MMIO bus; register each of
//! `transport.queue_notify_eventfds()` as an ioeventfd on
//! `base + QUEUE_NOTIFY_OFFSET` (4 bytes, datamatch = queue index); add the
//! handler to the event manager.
//!
//! The device does not flush anything itself: it hands validated work to a
//! [`CacheFlusher`], which the VMM implements with its pause-all flush engine.

use vm_memory::GuestAddress;

pub mod device;
#[cfg(test)]
mod fuzz_regressions;
pub mod handler;
pub mod metrics;
mod rate_limit;
pub mod request;
#[cfg(test)]
mod test_utils;
#[cfg(test)]
mod tests;

pub use device::{CacheFlush, CacheFlushSettings};
pub use handler::CacheFlushHandler;
pub use metrics::{CacheFlushMetrics, MetricsSnapshot};
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

/// The boundary between the device and the VMM's flush engine.
pub trait CacheFlusher: Send {
    /// Pauses every vCPU, writes back and invalidates every cache line of
    /// `batch` on every vCPU's physical core, then calls `complete` with the
    /// outcome **while every vCPU is still paused**, and only then resumes
    /// them. `complete` is called exactly once, also on failure.
    fn flush(&self, batch: &FlushBatch, complete: &mut dyn FnMut(Result<(), FlushError>));
}
