//! `spin`: every vCPU counts forever, for the VMM's pause tests. The counters
//! are one `u64` per vCPU at `counters + 8 * vcpu` (guest-physical = virtual:
//! the boot page tables are an identity map); vCPU 0 prints where they are.
//! A paused vCPU's counter must stand still.

use core::cell::UnsafeCell;

use super::{Env, Outcome, Scenario};
use crate::ring0::MAX_CPUS;

pub const SCENARIO: Scenario = Scenario {
    name: "spin",
    description: "every vCPU increments its own u64 counter forever (never exits)",
    run,
};

/// The counters, read by the VMM behind the guest's back.
#[repr(C, align(64))]
struct Counters(UnsafeCell<[u64; MAX_CPUS]>);
// SAFETY: each vCPU writes only its own element, through a raw pointer.
unsafe impl Sync for Counters {}

static COUNTERS: Counters = Counters(UnsafeCell::new([0; MAX_CPUS]));

fn run(env: &Env) -> Outcome {
    let counters = COUNTERS.0.get().cast::<u64>();
    if env.is_first() {
        crate::println!("spin: counters at {:#x}", counters as usize);
    }
    // SAFETY: `vcpu < vcpu_count <= MAX_CPUS` (checked in `main`), so the
    // element is in the array, and only this vCPU accesses it.
    let counter = unsafe { counters.add(env.vcpu as usize) };
    loop {
        // SAFETY: see above. Volatile: every increment must reach memory,
        // where the VMM reads it.
        unsafe { counter.write_volatile(counter.read_volatile().wrapping_add(1)) };
    }
}
