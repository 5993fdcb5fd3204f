//! Flush+Reload from inside the guest: the device's range and full flushes
//! evict the guest's lines (flushed median >= 2x the control's, over 4096
//! lines in random order, retried a bounded number of times by the guest).
//!
//! A test binary of its own, so no other test's VM competes for the two host
//! cores while the guest times its cache lines. 1 and 2 vCPUs only: with 4
//! vCPUs on a 2-core host a vCPU often comes back on another core after the
//! pause, where even its control lines reload from memory, and the guest
//! reports the measurement as inconclusive (exit status 10).

mod common;

use common::{describe, run_vmm};

#[test]
fn probe_shows_the_flush_evicted_the_guests_lines() {
    if !common::kvm_or_skip("probe_shows_the_flush_evicted_the_guests_lines") {
        return;
    }
    for vcpus in ["1", "2"] {
        let out = run_vmm(&["--vcpus", vcpus, "--cmdline", "scenario=probe attempts=30"]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "probe on {vcpus} vCPUs\n{}",
            describe(&out)
        );
    }
}
