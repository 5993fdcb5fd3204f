//! A hostile guest end to end: the `bad-requests` scenario submits every
//! malformed request of `resources/validation-table.md` that a guest can
//! express, on a hand-built queue per vCPU, and checks each documented
//! answer itself (exit 0 only if all match). Here the VMM's side is checked
//! too: every rule the guest exercised is counted by its name in `--metrics`
//! (`device.rejected_by_rule`), and the host's log of them stays bounded
//! (throttled per rule) however many vCPUs send them.

mod common;
mod deadline;

use common::describe;
use deadline::run_vmm;

/// The rules the scenario breaks, as the host names them in its log: every
/// validation rule of the device but the rate limit (which needs a limit
/// set, and has its own tests). Taken from the device, so a new rule that the
/// scenario does not break fails this test.
fn rules() -> impl Iterator<Item = &'static str> {
    devices::cache_flush::RequestError::RULES
        .into_iter()
        .filter(|&rule| rule != "rate-limited")
}

/// Rules whose cases need FLUSH_ALL negotiated (with `--no-full-flush` the
/// same requests are refused earlier, by `feature-not-negotiated`).
const NEEDS_FULL: &[&str] = &["flush-all-with-segments"];

/// The most log lines per rule a run of `elapsed` may write:
/// `LINES_PER_WINDOW` per window of the throttle (`devices::log_throttle`),
/// for every window the run touched.
fn max_lines_per_rule(elapsed: std::time::Duration) -> usize {
    use devices::log_throttle::{LINES_PER_WINDOW, WINDOW};
    let windows = elapsed.as_secs() / WINDOW.as_secs() + 2;
    LINES_PER_WINDOW as usize * windows as usize
}

fn bad_requests(vcpus: u32, extra: &[&str]) {
    let n = vcpus.to_string();
    let metrics = std::env::temp_dir().join(format!(
        "vmm-hostile-{vcpus}-{}-{}.json",
        extra.join("_").replace(['-', '/'], ""),
        std::process::id()
    ));
    let metrics_arg = metrics.to_string_lossy().into_owned();
    let mut args = vec![
        "--vcpus",
        &n,
        "--cmdline",
        "scenario=bad-requests",
        "--metrics",
        &metrics_arg,
    ];
    args.extend_from_slice(extra);
    let what = format!("bad-requests on {vcpus} vCPUs {extra:?}");
    let started = std::time::Instant::now();
    let out = run_vmm(&what, &args);
    let max_lines = max_lines_per_rule(started.elapsed());
    assert_eq!(out.status.code(), Some(0), "{what}\n{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stdout.contains("MISMATCH") && stdout.contains("answers as documented"),
        "{what}\n{}",
        describe(&out)
    );
    // One line per case from vCPU 0 (`A01 ...: ok`), none skipped.
    let cases = stdout
        .lines()
        .filter(|l| l.starts_with("bad-requests: ") && l.ends_with(": ok"))
        .count();
    assert!(
        cases >= 40,
        "{what}: only {cases} case lines\n{}",
        describe(&out)
    );
    assert!(
        !stdout.contains("not expressible"),
        "{what}\n{}",
        describe(&out)
    );
    let text = std::fs::read_to_string(&metrics).expect("--metrics file written at exit");
    let _ = std::fs::remove_file(&metrics);
    let json: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let by_rule = &json["device"]["rejected_by_rule"];
    let full = !extra.contains(&"--no-full-flush");
    for rule in rules() {
        let logged = stderr.matches(&format!("rule={rule} ")).count();
        assert!(
            logged <= max_lines,
            "{what}: the host logged {rule} {logged} times: not throttled\n{}",
            describe(&out)
        );
        if !full && NEEDS_FULL.contains(&rule) {
            continue;
        }
        let counted = by_rule[rule].as_u64().unwrap_or(0);
        assert!(
            counted >= u64::from(vcpus),
            "{what}: the host counted {rule} {counted} times, expected at least once per vCPU: {by_rule}\n{}",
            describe(&out)
        );
        assert!(
            logged >= 1,
            "{what}: {rule} never logged\n{}",
            describe(&out)
        );
    }
    assert!(
        !stderr.contains(" ERROR "),
        "{what}: a guest's mistakes are not host errors\n{}",
        describe(&out)
    );
}

#[test]
fn every_malformed_request_gets_its_documented_answer_on_1_2_4_vcpus() {
    if !common::kvm_or_skip("every_malformed_request_gets_its_documented_answer_on_1_2_4_vcpus") {
        return;
    }
    for vcpus in [1, 2, 4] {
        bad_requests(vcpus, &[]);
    }
}

/// With more than 3 GiB of RAM there are two RAM regions around the MMIO
/// hole, so "a segment across the hole" really spans from one to the other.
#[test]
fn malformed_requests_with_ram_on_both_sides_of_the_mmio_hole() {
    if !common::kvm_or_skip("malformed_requests_with_ram_on_both_sides_of_the_mmio_hole") {
        return;
    }
    bad_requests(2, &["--memory", "4096"]);
}

/// Without FLUSH_ALL offered, every FLUSH_ALL case gets UNSUPPORTED and the
/// range cases are unchanged.
#[test]
fn malformed_requests_without_full_flush_offered() {
    if !common::kvm_or_skip("malformed_requests_without_full_flush_offered") {
        return;
    }
    bad_requests(2, &["--no-full-flush"]);
}

/// Many vCPUs sending every malformed request: each is counted, and the
/// host's log stays as short as with one vCPU (before the throttle, 16
/// vCPUs made about 560 lines here).
#[test]
fn sixteen_vcpus_of_malformed_requests_are_counted_in_full_and_logged_in_bounded_volume() {
    if !common::kvm_or_skip(
        "sixteen_vcpus_of_malformed_requests_are_counted_in_full_and_logged_in_bounded_volume",
    ) {
        return;
    }
    bad_requests(16, &[]);
}
