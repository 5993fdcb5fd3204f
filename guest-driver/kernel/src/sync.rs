//! Synchronisation between vCPUs, in ring 3: atomics and spinning only (there
//! are no interrupts, no scheduler, nothing to sleep on).

use core::sync::atomic::{AtomicU32, Ordering};

/// A reusable barrier over a fixed number of participants.
pub struct SpinBarrier {
    /// Participants arrived in the current round.
    arrived: AtomicU32,
    /// Completed rounds; waiters spin until it moves.
    generation: AtomicU32,
}

impl SpinBarrier {
    /// A barrier nobody has reached yet.
    pub const fn new() -> Self {
        Self {
            arrived: AtomicU32::new(0),
            generation: AtomicU32::new(0),
        }
    }

    /// Returns once `participants` callers have called `wait` in this round.
    /// Every participant must pass the same number.
    pub fn wait(&self, participants: u32) {
        // Read the round before arriving, so its end cannot be missed.
        let generation = self.generation.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == participants {
            // Last one in: reset for the next round, then release the others.
            self.arrived.store(0, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::Release);
        } else {
            while self.generation.load(Ordering::Acquire) == generation {
                core::hint::spin_loop();
            }
        }
    }
}
