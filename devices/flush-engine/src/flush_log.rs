//! The flush log: one record per batch the engine handled, with a sequence
//! number, in a bounded ring. A hand-off test reads it to see which flushes
//! happened, when, for which requests (queue and tag), and how they ended.

use std::collections::VecDeque;
use std::sync::Mutex;

use devices::cache_flush::BatchRequest;
use smallvec::SmallVec;
use vm_memory::GuestAddress;

/// How many records the log keeps by default; older ones are dropped (and
/// counted).
pub const DEFAULT_CAPACITY: usize = 4096;

/// At most this many extents are kept per record (a full flush of a large
/// guest has one per run of resident pages); `extents_truncated` says when
/// more were flushed.
pub const MAX_EXTENTS_PER_RECORD: usize = 1024;

/// How a batch ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BatchOutcome {
    /// Every line was flushed while no vCPU ran; the requests got OK.
    Ok,
    /// The requests got HOST_ERROR, for this reason.
    HostError(String),
}

/// A record's lists. A batch of a request or two, flushed in one or a few
/// shares, fits inline: a record is then one block of memory. Every batch
/// overwrites the oldest record, last touched a ring's worth of batches
/// ago and cold by then; each separate buffer would be one more cache miss
/// on every request's path (measured: the inline record halves the cost of
/// logging a 64 B request).
pub type RecordList<T, const N: usize> = SmallVec<[T; N]>;

/// One batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlushLogRecord {
    /// 1, 2, 3, ... in the order batches were handled. Also the epoch of the
    /// dirty-page audit: a write first seen while batch `seq` held the VM
    /// paused happened before that batch's flush.
    pub seq: u64,
    /// When the batch was answered, in ns since the engine was created.
    pub answered_at_ns: u64,
    /// FLUSH_ALL (every resident line) rather than ranges.
    pub full: bool,
    /// The extents flushed, whole lines (the first
    /// [`MAX_EXTENTS_PER_RECORD`]); empty when the plan failed.
    pub extents: RecordList<(GuestAddress, u64), 2>,
    /// True when more extents were flushed than kept.
    pub extents_truncated: bool,
    /// The host CPU of each share.
    pub share_host_cpus: RecordList<i32, 4>,
    /// The requests answered by this batch.
    pub requests: RecordList<BatchRequest, 2>,
    /// The answer.
    pub outcome: BatchOutcome,
    /// Bytes flushed (whole lines; all of them, even when `extents` was
    /// truncated); 0 when the batch failed.
    pub bytes: u64,
    /// How long each phase took; 0 for a phase the batch did not reach.
    pub times: PhaseTimes,
}

/// The engine's timed phases of one batch, in ns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PhaseTimes {
    /// Planning the extents (for a full flush: the residency scan), before
    /// the pause.
    pub plan_ns: u64,
    /// Stopping every vCPU.
    pub pause_ns: u64,
    /// The hooks and the flush, while paused.
    pub flush_ns: u64,
}

#[derive(Default)]
struct Ring {
    records: VecDeque<FlushLogRecord>,
    capacity: usize,
    dropped: u64,
}

/// The bounded log. Cheap to append (one lock, no allocation beyond the
/// record's own), safe to read from any thread.
pub struct FlushLog {
    ring: Mutex<Ring>,
}

impl Default for FlushLog {
    fn default() -> Self {
        Self::with_capacity(DEFAULT_CAPACITY)
    }
}

impl FlushLog {
    /// A log that keeps the last `capacity` records (at least 1).
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            ring: Mutex::new(Ring {
                records: VecDeque::new(),
                capacity: capacity.max(1),
                dropped: 0,
            }),
        }
    }

    #[cfg(test)]
    pub(crate) fn push(&self, record: FlushLogRecord) {
        self.push_with(|slot| *slot = record);
    }

    /// Appends a record that `fill` writes. Once the ring is full, `fill`
    /// gets the oldest record to overwrite, its lists' memory included, so
    /// that logging a batch allocates nothing on every request's path.
    pub(crate) fn push_with(&self, fill: impl FnOnce(&mut FlushLogRecord)) {
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        if ring.records.len() >= ring.capacity {
            // The oldest record becomes the newest, overwritten where it
            // lies: no record is moved out of the ring and back.
            ring.dropped += 1;
            ring.records.rotate_left(1);
            if let Some(record) = ring.records.back_mut() {
                fill(record);
                return;
            }
        }
        let mut record = FlushLogRecord {
            seq: 0,
            answered_at_ns: 0,
            full: false,
            extents: RecordList::new(),
            extents_truncated: false,
            share_host_cpus: RecordList::new(),
            requests: RecordList::new(),
            outcome: BatchOutcome::Ok,
            bytes: 0,
            times: PhaseTimes::default(),
        };
        fill(&mut record);
        ring.records.push_back(record);
    }

    /// The records with `seq > after`, oldest first (`after = 0`: all that
    /// are kept). Records dropped from the ring are gone: compare the first
    /// record's `seq` with `after + 1`, or read [`Self::dropped`].
    pub fn since(&self, after: u64) -> Vec<FlushLogRecord> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        ring.records
            .iter()
            .filter(|r| r.seq > after)
            .cloned()
            .collect()
    }

    /// Records kept now.
    pub fn len(&self) -> usize {
        self.ring
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .records
            .len()
    }

    /// True when no record is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many records the ring holds at most.
    pub fn capacity(&self) -> usize {
        self.ring.lock().unwrap_or_else(|p| p.into_inner()).capacity
    }

    /// Records dropped because the ring was full.
    pub fn dropped(&self) -> u64 {
        self.ring.lock().unwrap_or_else(|p| p.into_inner()).dropped
    }

    /// The sequence number of the newest record (0: none yet).
    pub fn last_seq(&self) -> u64 {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        ring.records.back().map_or(0, |r| r.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64) -> FlushLogRecord {
        FlushLogRecord {
            seq,
            answered_at_ns: seq * 10,
            full: false,
            extents: smallvec::smallvec![(GuestAddress(seq * 64), 64)],
            extents_truncated: false,
            share_host_cpus: smallvec::smallvec![0],
            requests: smallvec::smallvec![BatchRequest { queue: 0, tag: seq }],
            outcome: BatchOutcome::Ok,
            bytes: 64,
            times: PhaseTimes::default(),
        }
    }

    #[test]
    fn keeps_the_newest_and_counts_what_it_dropped() {
        let log = FlushLog::with_capacity(3);
        assert!(log.is_empty());
        for seq in 1..=5 {
            log.push(record(seq));
        }
        assert_eq!(log.len(), 3);
        assert_eq!(log.dropped(), 2);
        assert_eq!(log.last_seq(), 5);
        let seqs: Vec<u64> = log.since(0).iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [3, 4, 5]);
        let seqs: Vec<u64> = log.since(4).iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [5]);
    }
}
