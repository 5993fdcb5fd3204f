//! Per-device counters. The device and its queue worker update them with relaxed
//! atomic adds (no lock, nothing on the vCPUs' path); the VMM holds the same
//! `Arc` and reads a [`MetricsSnapshot`] whenever it wants to print or export
//! them.
//!
//! Every popped chain is counted once by type (`requests_*`) and once by
//! outcome (`completed_ok`, `rejected_*`, `completed_host_error`,
//! `unanswerable`, `dropped_after_reset`), so the two sums agree once the
//! device is idle.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use cache_flush_abi::cache_flush::Status;
use serde::Serialize;

use super::request::RequestError;

/// Declares the counters once, for both the atomic struct and its snapshot.
macro_rules! counters {
    ($($(#[doc = $doc:literal])* $name:ident,)*) => {
        /// The live counters of one cache-flush device.
        #[derive(Debug, Default)]
        pub struct CacheFlushMetrics {
            $($(#[doc = $doc])* pub $name: AtomicU64,)*
            /// Rejected requests by the validation rule they broke, indexed
            /// as [`RequestError::RULES`] (read them with
            /// [`CacheFlushMetrics::rejected_by_rule`]).
            pub rules: [AtomicU64; RequestError::RULES.len()],
        }

        /// The counters at one moment, as plain numbers.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
        pub struct MetricsSnapshot {
            $($(#[doc = $doc])* pub $name: u64,)*
        }

        impl CacheFlushMetrics {
            /// Reads every counter. Counters are read one by one, so a
            /// snapshot taken while the device works may be off by the
            /// requests in flight.
            pub fn snapshot(&self) -> MetricsSnapshot {
                MetricsSnapshot {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                }
            }
        }

        impl MetricsSnapshot {
            /// What happened since `earlier` (per-counter difference), for
            /// delta assertions in tests and rates in exporters.
            pub fn since(&self, earlier: &MetricsSnapshot) -> MetricsSnapshot {
                MetricsSnapshot {
                    $($name: self.$name.saturating_sub(earlier.$name),)*
                }
            }
        }
    };
}

counters! {
    /// FLUSH_RANGE requests received (valid or not).
    requests_range,
    /// FLUSH_ALL requests received (valid or not).
    requests_full,
    /// Chains of an unknown type, or whose header could not be read.
    requests_other,
    /// Requests completed with OK.
    completed_ok,
    /// Requests rejected with INVALID.
    rejected_invalid,
    /// Requests rejected with UNSUPPORTED.
    rejected_unsupported,
    /// Requests rejected with OUT_OF_RANGE.
    rejected_out_of_range,
    /// Requests rejected with TOO_LARGE.
    rejected_too_large,
    /// Requests refused with BUSY by a rate limit.
    rejected_busy,
    /// Requests completed with HOST_ERROR (their flush failed).
    completed_host_error,
    /// Chains completed with used length 0: no writable status byte.
    unanswerable,
    /// Accepted requests whose completion was dropped because the driver
    /// reset the device during their flush.
    dropped_after_reset,
    /// Bytes covered by accepted FLUSH_RANGE requests.
    bytes_requested,
    /// Flushes performed (each a pause of the VM).
    batches,
    /// Flushes that included a FLUSH_ALL.
    full_batches,
    /// Flushes the flush engine reported as failed.
    flush_failures,
    /// Queue notifies that arrived while the device was not running (before
    /// DRIVER_OK or after a reset); ignored.
    notifies_while_idle,
    /// Queues stopped because their available index ran more than a ring's
    /// worth ahead of the device (the device then sets DEVICE_NEEDS_RESET).
    avail_index_jumps,
    /// Chains whose head index (read from the available ring) is outside
    /// the descriptor table: no used entry can name them; skipped.
    head_index_out_of_range,
}

impl MetricsSnapshot {
    /// Chains taken off the queues, counted by type.
    pub fn received(&self) -> u64 {
        self.requests_range + self.requests_full + self.requests_other
    }

    /// Chains given an outcome: equal to [`Self::received`] once the device
    /// is idle (every popped chain is answered exactly once).
    pub fn answered(&self) -> u64 {
        self.completed_ok
            + self.rejected_invalid
            + self.rejected_unsupported
            + self.rejected_out_of_range
            + self.rejected_too_large
            + self.rejected_busy
            + self.completed_host_error
            + self.unanswerable
            + self.dropped_after_reset
    }
}

impl CacheFlushMetrics {
    /// Rejections by rule name (every rule of [`RequestError::RULES`], zeros
    /// included, so the JSON has a stable shape).
    pub fn rejected_by_rule(&self) -> BTreeMap<&'static str, u64> {
        RequestError::RULES
            .iter()
            .zip(&self.rules)
            .map(|(name, counter)| (*name, counter.load(Ordering::Relaxed)))
            .collect()
    }

    /// Counts one rejection under its rule.
    pub(crate) fn count_rule(&self, error: &RequestError) {
        Self::add(&self.rules[error.rule_index()], 1);
    }

    /// Adds `n` to `counter`.
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts one completion with `status`.
    pub(crate) fn count_status(&self, status: Status) {
        let counter = match status {
            Status::Ok => &self.completed_ok,
            Status::Invalid => &self.rejected_invalid,
            Status::Unsupported => &self.rejected_unsupported,
            Status::OutOfRange => &self.rejected_out_of_range,
            Status::TooLarge => &self.rejected_too_large,
            Status::Busy => &self.rejected_busy,
            Status::HostError => &self.completed_host_error,
        };
        Self::add(counter, 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_json_and_delta() {
        let metrics = CacheFlushMetrics::default();
        let before = metrics.snapshot();
        CacheFlushMetrics::add(&metrics.requests_range, 2);
        metrics.count_status(Status::Ok);
        metrics.count_status(Status::Busy);
        CacheFlushMetrics::add(&metrics.bytes_requested, 4096);
        let delta = metrics.snapshot().since(&before);
        assert_eq!(
            delta,
            MetricsSnapshot {
                requests_range: 2,
                completed_ok: 1,
                rejected_busy: 1,
                bytes_requested: 4096,
                ..Default::default()
            }
        );
        let json = serde_json::to_string(&delta).unwrap();
        assert!(json.starts_with("{\"requests_range\":2,\"requests_full\":0,"));
        assert!(json.contains("\"bytes_requested\":4096"));
        assert!(json.ends_with("\"head_index_out_of_range\":0}"));
        assert_eq!((delta.received(), delta.answered()), (2, 2));
        // Bytes and batches are neither requests nor outcomes.
        let other = MetricsSnapshot {
            requests_other: 1,
            dropped_after_reset: 3,
            batches: 5,
            ..Default::default()
        };
        assert_eq!((other.received(), other.answered()), (1, 3));
    }

    #[test]
    fn rejections_are_counted_by_rule_name() {
        let metrics = CacheFlushMetrics::default();
        metrics.count_rule(&RequestError::ChainTooLong);
        metrics.count_rule(&RequestError::ChainTooLong);
        metrics.count_rule(&RequestError::NoStatusByte);
        let by_rule = metrics.rejected_by_rule();
        assert_eq!(by_rule.len(), RequestError::RULES.len());
        assert_eq!(by_rule["chain-too-long"], 2);
        assert_eq!(by_rule["no-status-byte"], 1);
        assert_eq!(by_rule.values().sum::<u64>(), 3);
    }
}
