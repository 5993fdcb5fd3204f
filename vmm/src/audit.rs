//! The dirty-page audit: which guest pages were written since the last
//! flush that covered the whole page.
//!
//! A missing cache flush in a confidential-VM memory hand-off changes no
//! data on a coherent host, so no data check can see it. This VMM sees both
//! sides: KVM's dirty log (`KVM_MEM_LOG_DIRTY_PAGES`, `KVM_GET_DIRTY_LOG`)
//! says which pages the guest wrote, and the flush engine says which lines
//! it flushed. The audit keeps, per 4 KiB page, the epoch of the last guest
//! write not yet covered by a flush:
//!
//! * inside every batch's pause, before its lines are flushed, it reads the
//!   dirty log (a pause hook), marking each written page with the batch's
//!   sequence number;
//! * after the flush (still paused) it clears every page the batch covered
//!   whole; a FLUSH_ALL clears every page (a written page is resident, and a
//!   full flush covers every resident page). A partly covered page stays
//!   marked: the audit works in pages, not lines;
//! * [`DirtyAudit::unflushed_writes`] reads the dirty log once more (writes
//!   since the last batch get the next sequence number) and lists the marked
//!   pages of a range.
//!
//! What it cannot see: writes by the host (the VMM's own, another process
//! through a shared mapping) and DMA; those never enter KVM's dirty log.
//! Cost: KVM write-protects guest pages to log them, so the first write to
//! each page after every harvest takes a fault; hence opt-in (`--audit`).

use std::fmt;
use std::sync::{Arc, Mutex};

use flush_engine::{FlushLog, PauseHook, PausedBatch};
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// The granularity of KVM's dirty log on x86: one bit per 4 KiB page.
pub const PAGE: u64 = 4096;

/// Errors of the audit.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// `KVM_GET_DIRTY_LOG` failed.
    #[error("KVM_GET_DIRTY_LOG failed for memory slot {slot}: {source}")]
    DirtyLog {
        /// The slot.
        slot: u32,
        /// Cause.
        source: vmm_sys_util::errno::Error,
    },
}

/// One KVM memory slot with dirty logging on.
struct Slot {
    slot: u32,
    base: u64,
    len: u64,
    /// Per page: the epoch of the last write no flush has covered (0: none).
    last_write: Vec<u64>,
}

/// A page the guest wrote after its last covering flush.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnflushedPage {
    /// The page's guest-physical address.
    pub page: GuestAddress,
    /// The flush-log sequence number of the first batch whose pause found
    /// the write (or, for writes since the last batch, the next number).
    pub last_write_epoch: u64,
}

/// What [`DirtyAudit::assert_flushed`] reports: every page, in order.
#[derive(Debug, PartialEq, Eq)]
pub struct UnflushedWrites {
    /// The range that was checked.
    pub range: (GuestAddress, u64),
    /// The pages written since their last covering flush.
    pub pages: Vec<UnflushedPage>,
}

impl fmt::Display for UnflushedWrites {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} page(s) of {:#x}+{:#x} written by the guest after their last covering flush:",
            self.pages.len(),
            self.range.0 .0,
            self.range.1
        )?;
        for p in &self.pages {
            write!(f, " {:#x} (epoch {})", p.page.0, p.last_write_epoch)?;
        }
        Ok(())
    }
}

impl std::error::Error for UnflushedWrites {}

/// The audit of one VM. Register it as a pause hook for every batch.
pub struct DirtyAudit {
    vm_fd: Arc<VmFd>,
    log: Arc<FlushLog>,
    slots: Mutex<Vec<Slot>>,
}

impl DirtyAudit {
    /// An audit of the memory slots `(slot, guest base, length)` of `vm_fd`,
    /// each created with `KVM_MEM_LOG_DIRTY_PAGES`. `log` is the engine's
    /// flush log (for the epoch of writes seen between batches).
    pub fn new(vm_fd: Arc<VmFd>, log: Arc<FlushLog>, slots: &[(u32, u64, u64)]) -> Self {
        let slots = slots
            .iter()
            .map(|&(slot, base, len)| Slot {
                slot,
                base,
                len,
                last_write: vec![0; len.div_ceil(PAGE) as usize],
            })
            .collect();
        Self {
            vm_fd,
            log,
            slots: Mutex::new(slots),
        }
    }

    /// Reads (and so resets) KVM's dirty log, marking each written page
    /// with `epoch`.
    fn harvest(&self, slots: &mut [Slot], epoch: u64) -> Result<(), AuditError> {
        for slot in slots.iter_mut() {
            let bitmap = self
                .vm_fd
                .get_dirty_log(slot.slot, slot.len as usize)
                .map_err(|source| AuditError::DirtyLog {
                    slot: slot.slot,
                    source,
                })?;
            for (word_index, &word) in bitmap.iter().enumerate() {
                let mut bits = word;
                while bits != 0 {
                    let bit = bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    if let Some(page) = slot.last_write.get_mut(word_index * 64 + bit) {
                        *page = epoch;
                    }
                }
            }
        }
        Ok(())
    }

    /// Clears the pages `batch` covered whole (extents that meet count as
    /// one: the engine cuts extents at region edges).
    fn clear_covered(slots: &mut [Slot], batch: &PausedBatch) {
        let mut merged: Vec<(u64, u64)> = batch
            .extents
            .iter()
            .map(|&(addr, len)| (addr.0, addr.0 + len))
            .collect();
        merged.sort_unstable();
        merged.dedup();
        let merged = merged
            .into_iter()
            .fold(Vec::<(u64, u64)>::new(), |mut out, (s, e)| {
                match out.last_mut() {
                    Some(last) if s <= last.1 => last.1 = last.1.max(e),
                    _ => out.push((s, e)),
                }
                out
            });
        for slot in slots.iter_mut() {
            if batch.full {
                slot.last_write.fill(0);
                continue;
            }
            for &(start, end) in &merged {
                let (start, end) = (start.max(slot.base), end.min(slot.base + slot.len));
                if start >= end {
                    continue;
                }
                // Whole pages only: a page flushed in part keeps its mark.
                let first = (start - slot.base).div_ceil(PAGE);
                let last = (end - slot.base) / PAGE;
                for page in first..last {
                    slot.last_write[page as usize] = 0;
                }
            }
        }
    }

    /// The pages of `[gpa, gpa + len)` the guest wrote after the last flush
    /// that covered them whole, in address order. Reads the dirty log first,
    /// so writes made since the last batch count too.
    pub fn unflushed_writes(
        &self,
        gpa: GuestAddress,
        len: u64,
    ) -> Result<Vec<UnflushedPage>, AuditError> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        self.harvest(&mut slots, self.log.last_seq() + 1)?;
        let (start, end) = (gpa.0, gpa.0.saturating_add(len));
        let mut pages = Vec::new();
        for slot in slots.iter() {
            for (index, &epoch) in slot.last_write.iter().enumerate() {
                let page = slot.base + index as u64 * PAGE;
                if epoch != 0 && page + PAGE > start && page < end {
                    pages.push(UnflushedPage {
                        page: GuestAddress(page),
                        last_write_epoch: epoch,
                    });
                }
            }
        }
        pages.sort_by_key(|p| p.page);
        Ok(pages)
    }

    /// `Ok` when no page of the range was written after its last covering
    /// flush; otherwise the pages, ready to print.
    pub fn assert_flushed(
        &self,
        gpa: GuestAddress,
        len: u64,
    ) -> Result<(), Box<dyn std::error::Error>> {
        let pages = self.unflushed_writes(gpa, len)?;
        if pages.is_empty() {
            Ok(())
        } else {
            Err(Box::new(UnflushedWrites {
                range: (gpa, len),
                pages,
            }))
        }
    }
}

impl PauseHook<GuestMemoryMmap> for DirtyAudit {
    fn before_flush(&self, batch: &PausedBatch, _: &GuestMemoryMmap) -> Result<(), String> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        self.harvest(&mut slots, batch.seq)
            .map_err(|e| e.to_string())
    }

    fn after_flush(&self, batch: &PausedBatch, _: &GuestMemoryMmap) -> Result<(), String> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        Self::clear_covered(&mut slots, batch);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(base: u64, pages: usize, marked: &[usize]) -> Slot {
        let mut last_write = vec![0; pages];
        for &p in marked {
            last_write[p] = 3;
        }
        Slot {
            slot: 0,
            base,
            len: pages as u64 * PAGE,
            last_write,
        }
    }

    fn batch(extents: &[(u64, u64)], full: bool) -> PausedBatch {
        PausedBatch {
            seq: 4,
            full,
            extents: extents.iter().map(|&(a, l)| (GuestAddress(a), l)).collect(),
            requests: Vec::new(),
        }
    }

    fn marked(slot: &Slot) -> Vec<usize> {
        (0..slot.last_write.len())
            .filter(|&i| slot.last_write[i] != 0)
            .collect()
    }

    #[test]
    fn a_flush_clears_only_the_pages_it_covered_whole() {
        let mut slots = vec![slot(0x10_0000, 8, &[0, 1, 2, 3, 4, 5])];
        // Page 1 whole; page 2 from +64 (partial); pages 4-5 whole across
        // two extents that meet at the page edge.
        let b = batch(
            &[
                (0x10_1000, 0x1000),
                (0x10_2040, 0xfc0 - 64),
                (0x10_4000, 0x800),
                (0x10_4800, 0x1800),
            ],
            false,
        );
        DirtyAudit::clear_covered(&mut slots, &b);
        assert_eq!(marked(&slots[0]), [0, 2, 3]);
    }

    #[test]
    fn a_full_flush_clears_every_page() {
        let mut slots = vec![slot(0, 4, &[0, 3]), slot(1 << 32, 2, &[1])];
        DirtyAudit::clear_covered(&mut slots, &batch(&[], true));
        assert!(marked(&slots[0]).is_empty() && marked(&slots[1]).is_empty());
    }

    #[test]
    fn the_report_names_every_page() {
        let report = UnflushedWrites {
            range: (GuestAddress(0x1000), 0x3000),
            pages: vec![
                UnflushedPage {
                    page: GuestAddress(0x2000),
                    last_write_epoch: 5,
                },
                UnflushedPage {
                    page: GuestAddress(0x3000),
                    last_write_epoch: 6,
                },
            ],
        };
        assert_eq!(
            report.to_string(),
            "2 page(s) of 0x1000+0x3000 written by the guest after their last covering flush: 0x2000 (epoch 5) 0x3000 (epoch 6)"
        );
    }
}
