//! The pause-all cache-flush engine: the back end of the cache-flush device
//! (`devices::cache_flush`), for this project's VMM or any other.
//!
//! A VMM embeds it by implementing two small traits ([`pause`]): how to stop
//! every vCPU ([`VcpuPause`]) and the guard of a stopped VM
//! ([`PausedVcpus`], whose work runner has a default). The engine then
//! implements the device's [`devices::cache_flush::FlushBackend`]:
//!
//! * [`engine`]: plan → pause → flush the shares → count → answer → resume;
//! * [`plan`]: whole lines, merged, cut at region edges, split into shares;
//! * [`resident`]: which pages a full flush must cover;
//! * [`cache_ops`]: CLFLUSHOPT/CLFLUSH, and the [`LineFlush`] seam tests use;
//! * [`flush_log`]: one numbered record per batch, in a bounded ring;
//! * [`hooks`]: host code run inside a batch's pause (hand-off tests, the
//!   dirty-page audit).
//!
//! No KVM dependency: how a VMM kicks its vCPUs stays behind [`VcpuPause`].
#![deny(missing_docs)]

pub mod cache_ops;
pub mod engine;
pub mod flush_log;
pub mod hooks;
pub mod pause;
pub mod plan;
pub mod resident;
#[cfg(test)]
mod test_support;

pub use cache_ops::{CacheOps, FlushInstruction, HostRange, LineFlush};
pub use engine::{
    current_cpu, full_flush_estimate, EngineConfig, EngineError, EngineStats, EstimateSink,
    FlushEngine, FlushObserver, FlushPhase, FlushRecord, Percentiles, ShareRecord, Shares,
    DEFAULT_INLINE_MAX_BYTES, LATENCY_WINDOW, PAUSE_TIMEOUT,
};
pub use flush_log::{BatchOutcome, FlushLog, FlushLogRecord, PhaseTimes};
pub use hooks::{HookFilter, HookId, PauseHook, PausedBatch};
pub use pause::{host_cpus, PauseError, PausedVcpus, VcpuPause, WorkFn, Worker};
