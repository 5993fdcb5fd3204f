//! A hostile guest end to end: the `bad-requests` scenario submits every
//! malformed request of `resources/validation-table.md` that a guest can
//! express, on a hand-built queue per vCPU, and checks each documented
//! answer itself (exit 0 only if all match). Here the VMM's side is checked
//! too: every rule the guest exercised was logged by the host by its name
//! (`rule=<name>`), and the device's counters account for every request.

mod common;
mod deadline;

use common::describe;
use deadline::run_vmm;

/// The rules the scenario breaks, as the host names them in its log.
const RULES: &[&str] = &[
    "no-status-byte",
    "status-outside-memory",
    "chain-too-long",
    "broken-chain",
    "writable-before-readable",
    "descriptor-outside-memory",
    "too-short",
    "unknown-type",
    "feature-not-negotiated",
    "nonzero-flags",
    "payload-not-segments",
    "flush-all-with-segments",
    "too-many-segments",
    "zero-length-segment",
    "segment-overflow",
    "segment-out-of-range",
    "too-many-bytes",
];

/// Rules whose cases need FLUSH_ALL negotiated (with `--no-full-flush` the
/// same requests are refused earlier, by `feature-not-negotiated`).
const NEEDS_FULL: &[&str] = &["flush-all-with-segments"];

fn bad_requests(vcpus: u32, extra: &[&str]) {
    let n = vcpus.to_string();
    let mut args = vec!["--vcpus", &n, "--cmdline", "scenario=bad-requests"];
    args.extend_from_slice(extra);
    let what = format!("bad-requests on {vcpus} vCPUs {extra:?}");
    let out = run_vmm(&what, &args);
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
    let full = !extra.contains(&"--no-full-flush");
    for rule in RULES {
        if !full && NEEDS_FULL.contains(rule) {
            continue;
        }
        let needle = format!("rule={rule} ");
        let logged = stderr.matches(&needle).count();
        assert!(
            logged >= vcpus as usize,
            "{what}: the host logged {rule} {logged} times, expected at least once per vCPU\n{}",
            describe(&out)
        );
    }
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
