//! The cache-maintenance instructions themselves (x86-64 only).
//!
//! CLFLUSH and CLFLUSHOPT write a line back (if dirty) and invalidate it in
//! every cache of the coherence domain, addressed by the linear address of any
//! mapping of the line: caches are physically tagged, so flushing through the
//! VMM's mapping of guest RAM flushes the guest's own mappings (and any other
//! alias) of the same memory. User space may execute both; WBINVD, which
//! would flush whole caches, is privileged and not available to a VMM process.

use std::arch::asm;

/// Which instruction is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushInstruction {
    /// CLFLUSHOPT, weakly ordered: many lines in flight, one SFENCE at the end.
    ClflushOpt,
    /// CLFLUSH, for CPUs without CLFLUSHOPT.
    Clflush,
}

impl FlushInstruction {
    /// The best instruction this CPU has.
    pub fn detect() -> Self {
        // CPUID.(EAX=7,ECX=0):EBX bit 23 = CLFLUSHOPT.
        let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
        if leaf7.ebx & (1 << 23) != 0 {
            Self::ClflushOpt
        } else {
            Self::Clflush
        }
    }

    /// Name, for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::ClflushOpt => "clflushopt",
            Self::Clflush => "clflush",
        }
    }
}

/// The size of the line CLFLUSH acts on (CPUID.1:EBX bits 15-8, × 8), 64 if the
/// CPU does not say.
pub fn cache_line_size() -> usize {
    let leaf1 = std::arch::x86_64::__cpuid(1);
    match ((leaf1.ebx >> 8) & 0xff) as usize * 8 {
        0 => 64,
        size => size,
    }
}

/// Writes back and invalidates every line that overlaps `[start, start + len)`
/// and waits until that is globally visible. Returns the number of lines.
///
/// # Safety
/// The range must be mapped in this process for as long as the call lasts
/// (it is not read or written; an unmapped address would fault).
pub unsafe fn flush_range(
    instruction: FlushInstruction,
    start: *const u8,
    len: usize,
    line: usize,
) -> u64 {
    if len == 0 {
        return 0;
    }
    let first = start as usize & !(line - 1);
    let end = start as usize + len;
    let mut lines = 0u64;
    let mut p = first;
    match instruction {
        FlushInstruction::ClflushOpt => {
            while p < end {
                // SAFETY: `p` lies in a line of the caller's mapped range.
                unsafe { asm!("clflushopt [{0}]", in(reg) p, options(nostack, preserves_flags)) };
                p += line;
                lines += 1;
            }
        }
        FlushInstruction::Clflush => {
            while p < end {
                // SAFETY: as above.
                unsafe { asm!("clflush [{0}]", in(reg) p, options(nostack, preserves_flags)) };
                p += line;
                lines += 1;
            }
        }
    }
    // CLFLUSHOPT is ordered only by fences; MFENCE orders both instructions
    // against everything before the completion is written.
    // SAFETY: a fence has no memory operands.
    unsafe { asm!("mfence", options(nostack, preserves_flags)) };
    lines
}

/// A range of guest RAM as mapped in this process, handed to a
/// [`LineFlush`] by the engine. Only the engine makes one, from a slice of
/// the guest memory it holds for the whole flush, so the range is mapped for
/// as long as the value exists.
#[derive(Clone, Copy, Debug)]
pub struct HostRange {
    ptr: *const u8,
    len: usize,
}

impl HostRange {
    /// # Safety
    /// `[ptr, ptr + len)` must stay mapped for as long as the value is used.
    pub(crate) unsafe fn new(ptr: *const u8, len: usize) -> Self {
        Self { ptr, len }
    }

    /// First byte.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty range.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The operation applied to every planned extent: write back and invalidate
/// its lines, return how many. [`CacheOps`] is the real one; tests put a
/// recorder in front of it to check that exactly the requested lines reach
/// it (a flush that silently skips lines is otherwise invisible without a
/// timing probe).
pub trait LineFlush: Send + Sync {
    /// Flushes the lines of `range`, which maps guest-physical `gpa`; returns
    /// the number of lines flushed.
    fn flush_lines(&self, gpa: vm_memory::GuestAddress, range: HostRange) -> u64;
}

/// CLFLUSHOPT (or CLFLUSH) and a fence: the engine's default [`LineFlush`].
#[derive(Clone, Copy, Debug)]
pub struct CacheOps {
    /// The instruction.
    pub instruction: FlushInstruction,
    /// The line size it acts on.
    pub line: usize,
}

impl CacheOps {
    /// The best instruction of this CPU, at its line size.
    pub fn detect() -> Self {
        Self {
            instruction: FlushInstruction::detect(),
            line: cache_line_size(),
        }
    }
}

impl LineFlush for CacheOps {
    fn flush_lines(&self, _gpa: vm_memory::GuestAddress, range: HostRange) -> u64 {
        // SAFETY: a HostRange is mapped for as long as it exists (its
        // constructor's contract), and flush_range neither reads nor writes.
        unsafe { flush_range(self.instruction, range.ptr, range.len, self.line) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_size_is_a_power_of_two() {
        let l = cache_line_size();
        assert!(l.is_power_of_two() && l >= 32, "{l}");
    }

    #[test]
    fn flushes_count_every_overlapping_line() {
        let buf = vec![7u8; 4096];
        let line = cache_line_size();
        let base = buf.as_ptr();
        let aligned = (base as usize).next_multiple_of(line) as *const u8;
        for instruction in [FlushInstruction::detect(), FlushInstruction::Clflush] {
            // SAFETY: every range lies inside `buf`.
            unsafe {
                assert_eq!(flush_range(instruction, aligned, 0, line), 0);
                assert_eq!(flush_range(instruction, aligned, 1, line), 1);
                assert_eq!(flush_range(instruction, aligned, line, line), 1);
                assert_eq!(flush_range(instruction, aligned.add(line - 1), 2, line), 2);
                assert_eq!(flush_range(instruction, aligned, 10 * line, line), 10);
            }
        }
        // The data is still there: a flush writes back, it does not discard.
        assert!(buf.iter().all(|&b| b == 7));
    }
}
