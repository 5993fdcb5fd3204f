//! Flush+Reload proof from the host (`vmm-tools host-probe`, the bundled
//! guest's `scenario=host-probe` driven by
//! `vmm_tools::reload_probe::host_probe`): lines the host cached through its
//! own mappings (a second mapping of the memfd that the flush engine never
//! uses, and the VMM's mapping) are evicted by the flushes the guest asks
//! for, "every mapping of the same memory". The host times the first touch
//! of one line per page and judges by `cache_flush_abi::flush_reload`
//! (every sampled line slow; a partial attempt fails at once, a pass needs
//! three evicted attempts);
//! the sham run, with no flush of the target, must fail.
//!
//! The tests take turns ([`ONE_AT_A_TIME`]): cache timing needs the cores.
//! An attempt whose comparison (a buffer paused alike, not flushed) was
//! evicted too is void and repeated; a run where every attempt was void is
//! inconclusive and repeated on a fresh VM up to [`RUNS`] times.

mod common;

use std::sync::{Arc, Mutex};

use cache_flush_abi::flush_reload::Outcome;
use common::{describe, run_tools};
use vmm::vcpu::VmOutcome;
use vmm::vm::VmConfig;
use vmm_tools::reload_probe::host_probe::{self, HostProbeOptions};

/// Cache timing needs the cores to itself: one probe at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Attempts per measurement before a run is inconclusive: a bound on
/// retrying noise only (a partial or no eviction fails at once).
const ATTEMPTS: u32 = 30;

/// VM runs per case when a run ends inconclusive (every attempt void). The
/// voids come in streaks tied to where the host placed the threads of one
/// run, so a fresh VM is the useful retry. Only inconclusive runs are
/// retried: a run whose deciding attempt saw a partial or no eviction
/// fails at once. Five, because with the 2 CPUs shared by other builds
/// (load average 13) `host-probe` on 2 vCPUs was inconclusive in 6 of 8
/// runs of 10 attempts; retrying noise never loosens the verdict.
const RUNS: u32 = 5;

/// Runs `case` until it is not inconclusive, at most [`RUNS`] times;
/// returns the last result. Each inconclusive run is reported on stderr.
fn retry_inconclusive<T>(what: &str, mut case: impl FnMut() -> (T, bool)) -> T {
    let mut run = 1;
    loop {
        let (result, inconclusive) = case();
        if !inconclusive || run == RUNS {
            return result;
        }
        eprintln!("{what}: run {run} of {RUNS} was inconclusive; booting a fresh VM");
        run += 1;
    }
}

/// Runs `host-probe` on `vcpus` vCPUs (on fresh VMs while inconclusive, see
/// [`retry_inconclusive`]), asserts that every flush offered evicted the
/// host's lines and that the guest exited 0, and returns the report.
fn host_probe_passes(vcpus: u32, full_flush: bool) -> host_probe::HostProbeReport {
    let what = format!("host-probe on {vcpus} vCPUs, FLUSH_ALL offered: {full_flush}");
    let (outcome, report, console) = retry_inconclusive(&what, || {
        let run = host_probe_once(vcpus, full_flush, false);
        let inconclusive = run.1.as_ref().is_ok_and(|r| r.inconclusive());
        (run, inconclusive)
    });
    let report = report
        .unwrap_or_else(|e| panic!("{what}: host half failed: {e}\nguest: {outcome:?}\n{console}"));
    // Printed so a run shows its figures (`cargo test -- --nocapture`).
    println!("{what}: {report}");
    assert!(
        report.passed(),
        "{what}: a flush did not evict the host's lines\n{report}\n{console}"
    );
    assert!(
        matches!(outcome, VmOutcome::GuestExit { status: 0, .. }),
        "{what}: guest verdict {outcome:?}\n{console}"
    );
    report
}

/// One VM of [`host_probe_passes`]; the host half runs on a thread of its
/// own.
fn host_probe_once(
    vcpus: u32,
    full_flush: bool,
    sham: bool,
) -> (
    VmOutcome,
    Result<host_probe::HostProbeReport, host_probe::HostProbeError>,
    String,
) {
    let console = Arc::new(Mutex::new(Vec::new()));
    let config = VmConfig {
        vcpus,
        full_flush,
        cmdline: "scenario=host-probe".into(),
        serial_out: Some(console.clone()),
        ..VmConfig::new(vmm::BUNDLED_GUEST_KERNEL.to_vec())
    };
    let options = HostProbeOptions {
        attempts: ATTEMPTS,
        sham,
        ..HostProbeOptions::default()
    };
    let run = host_probe::run_vm(&config, &options).expect("VM set-up and control loop");
    let console = String::from_utf8_lossy(&console.lock().unwrap()).into_owned();
    (run.outcome, run.report, console)
}

#[test]
fn host_probe_shows_guest_flushes_evict_every_host_mapping() {
    if !common::kvm_or_skip("host_probe_shows_guest_flushes_evict_every_host_mapping") {
        return;
    }
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    for vcpus in [1, 2, 4] {
        let report = host_probe_passes(vcpus, true);
        assert!(
            report
                .full_alias
                .as_ref()
                .is_some_and(|v| v.outcome == Outcome::Evicted),
            "{vcpus} vCPUs: FLUSH_ALL is offered, so it must be measured\n{report}"
        );
    }
}

/// The host side's negative control: with `sham` the host asks for a
/// one-line flush elsewhere where it measures a flush of the target, and
/// every measurement must come out not evicted (or partial, should the
/// pause alone have evicted more of the target than of the comparison):
/// never a pass.
#[test]
fn host_probe_fails_when_the_flush_does_not_evict() {
    if !common::kvm_or_skip("host_probe_fails_when_the_flush_does_not_evict") {
        return;
    }
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let (outcome, report, console) = retry_inconclusive("sham host-probe", || {
        let run = host_probe_once(1, true, true);
        let inconclusive = run.1.as_ref().is_ok_and(|r| r.inconclusive());
        (run, inconclusive)
    });
    let report = report.unwrap_or_else(|e| panic!("host half failed: {e}\n{outcome:?}\n{console}"));
    println!("sham host-probe: {report}");
    assert!(!report.passed(), "{report}");
    for verdict in [
        Some(&report.range_alias),
        Some(&report.range_vmm),
        report.full_alias.as_ref(),
    ] {
        let verdict = verdict.expect("FLUSH_ALL offered, so measured");
        assert!(
            matches!(verdict.outcome, Outcome::NotEvicted | Outcome::Partial),
            "{report}"
        );
    }
}

/// Without FLUSH_ALL the guest answers UNSUPPORTED and the host skips that
/// measurement; the range measurements still have to pass.
#[test]
fn host_probe_without_full_flush_skips_only_that_measurement() {
    if !common::kvm_or_skip("host_probe_without_full_flush_skips_only_that_measurement") {
        return;
    }
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let report = host_probe_passes(1, false);
    assert!(report.full_alias.is_none(), "{report}");
}

/// `vmm-tools host-probe`, the same from the command line: the report on stdout,
/// exit code 0.
#[test]
fn vmm_tools_host_probe_prints_the_report_and_exits_0() {
    if !common::kvm_or_skip("vmm_tools_host_probe_prints_the_report_and_exits_0") {
        return;
    }
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let attempts = ATTEMPTS.to_string();
    let out = retry_inconclusive("vmm-tools host-probe", || {
        let out = run_tools(&["host-probe", "--vcpus", "2", "--attempts", &attempts]);
        let inconclusive = String::from_utf8_lossy(&out.stdout).contains("INCONCLUSIVE");
        (out, inconclusive)
    });
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for line in [
        "range flush, seen through a second host mapping (alias): evicted",
        "range flush, seen through the VMM's own mapping: evicted",
        "full flush, seen through a second host mapping (alias): evicted",
        "host-probe: FINISH after",
    ] {
        assert!(stdout.contains(line), "no `{line}` in\n{}", describe(&out));
    }
}

/// `vmm-tools host-probe --sham` (no flush of the target, the same pauses)
/// must fail with exit code 1 and never print "evicted".
#[test]
fn vmm_tools_host_probe_sham_fails() {
    if !common::kvm_or_skip("vmm_tools_host_probe_sham_fails") {
        return;
    }
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let attempts = ATTEMPTS.to_string();
    let out = retry_inconclusive("vmm-tools host-probe --sham", || {
        let out = run_tools(&["host-probe", "--sham", "--attempts", &attempts]);
        let inconclusive = String::from_utf8_lossy(&out.stdout).contains("INCONCLUSIVE");
        (out, inconclusive)
    });
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("NOT evicted"), "{}", describe(&out));
    assert!(!stdout.contains(": evicted"), "{}", describe(&out));
}
