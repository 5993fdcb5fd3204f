//! Pause-point hooks: host code that runs while the VM is paused for a
//! batch, before its lines are flushed and after (before the answer is
//! written and any vCPU runs again). A hand-off test uses them to check,
//! convert or scrub a buffer at the one moment the guest cannot touch it;
//! the dirty-page audit uses them to read the dirty log.
//!
//! A hook that fails (returns an error, panics, or misses its deadline)
//! turns the batch's answer into HOST_ERROR.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use devices::cache_flush::BatchRequest;
use vm_memory::GuestAddress;

/// Which batches a hook runs for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookFilter {
    /// Every batch.
    EveryBatch,
    /// Batches holding at least one request with this tag.
    Tag(u64),
}

impl HookFilter {
    pub(crate) fn matches(&self, requests: &[BatchRequest]) -> bool {
        match self {
            HookFilter::EveryBatch => true,
            HookFilter::Tag(tag) => requests.iter().any(|r| r.tag == *tag),
        }
    }
}

/// The batch a hook is called for (every vCPU paused).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PausedBatch {
    /// The batch's sequence number (its flush-log record's).
    pub seq: u64,
    /// A FLUSH_ALL batch.
    pub full: bool,
    /// The extents the batch flushes (whole lines).
    pub extents: Vec<(GuestAddress, u64)>,
    /// Its requests.
    pub requests: Vec<BatchRequest>,
}

/// Host code run during a batch's pause; `M` is the engine's guest memory
/// type (e.g. `GuestMemoryMmap`).
pub trait PauseHook<M>: Send + Sync {
    /// Runs with every vCPU paused, before any line of the batch is flushed.
    fn before_flush(&self, _batch: &PausedBatch, _memory: &M) -> Result<(), String> {
        Ok(())
    }

    /// Runs with every vCPU paused, after every line was flushed and before
    /// the answer is written. Not called for a batch whose flush failed.
    fn after_flush(&self, _batch: &PausedBatch, _memory: &M) -> Result<(), String> {
        Ok(())
    }
}

/// Identifies a registered hook, to remove it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HookId(pub(crate) u64);

/// Which of the two calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HookPoint {
    BeforeFlush,
    AfterFlush,
}

/// Runs one hook call on a thread of its own and waits at most `timeout`:
/// a hook is host code the engine does not control, and the guest is
/// paused while it runs. A hook still running at the deadline is left to
/// finish on its own (its result is ignored; it owns what it touches).
pub(crate) fn run_bounded<M, T>(
    hook: Arc<dyn PauseHook<M>>,
    point: HookPoint,
    batch: Arc<PausedBatch>,
    memory: T,
    timeout: Duration,
) -> Result<(), String>
where
    M: 'static,
    T: std::ops::Deref<Target = M> + Send + 'static,
{
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("pause-hook".into())
        .spawn(move || {
            let result = match point {
                HookPoint::BeforeFlush => hook.before_flush(&batch, &memory),
                HookPoint::AfterFlush => hook.after_flush(&batch, &memory),
            };
            let _ = tx.send(result);
        })
        .map_err(|e| format!("cannot start the pause hook's thread: {e}"))?;
    match rx.recv_timeout(timeout) {
        Ok(result) => result,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            Err(format!("a pause hook did not return within {timeout:?}"))
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => Err("a pause hook panicked".into()),
    }
}
