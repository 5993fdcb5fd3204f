//! The cache-flush service end to end on real KVM: every guest scenario on
//! 1, 2 and 4 vCPUs through the CLI, and the pause invariant seen from the
//! host over more than a thousand requests.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use common::{describe, run_vmm};
use vm_memory::{Bytes, GuestAddress};
use vmm::flush_engine::FlushPhase;
use vmm::vcpu::VmOutcome;
use vmm::vm::{NotifyPath, Vm, VmConfig};

fn scenario_passes(scenario: &str, vcpus: u32, extra: &[&str]) {
    let n = vcpus.to_string();
    let cmdline = format!("scenario={scenario}");
    let mut args = vec!["--vcpus", &n, "--cmdline", &cmdline];
    args.extend_from_slice(extra);
    let out = run_vmm(&args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{scenario} on {vcpus} vCPUs\n{}",
        describe(&out)
    );
}

macro_rules! scenario_tests {
    ($($name:ident: $scenario:literal $(, $flag:literal)*;)*) => {$(
        #[test]
        fn $name() {
            if common::kvm_or_skip(stringify!($name)) {
                for vcpus in [1, 2, 4] {
                    scenario_passes($scenario, vcpus, &[$($flag),*]);
                }
            }
        }
    )*};
}

scenario_tests! {
    range_scenario_on_1_2_4_vcpus: "range";
    full_scenario_on_1_2_4_vcpus: "full";
    alias_scenario_on_1_2_4_vcpus: "alias";
    concurrent_scenario_on_1_2_4_vcpus: "concurrent";
    unsupported_scenario_on_1_2_4_vcpus: "unsupported", "--no-full-flush";
    demo_scenario_on_1_2_4_vcpus: "demo";
    full_flush_advice_follows_the_resident_set_on_1_2_4_vcpus: "full-advice";
}

#[test]
fn the_default_run_is_the_demo_and_succeeds() {
    if !common::kvm_or_skip("the_default_run_is_the_demo_and_succeeds") {
        return;
    }
    let out = run_vmm(&[]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("demo"), "{}", describe(&out));
}

#[test]
fn the_full_scenario_fails_when_full_flush_is_not_offered() {
    if !common::kvm_or_skip("the_full_scenario_fails_when_full_flush_is_not_offered") {
        return;
    }
    let out = run_vmm(&["--no-full-flush", "--cmdline", "scenario=full"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
}

#[test]
fn the_unsupported_scenario_fails_when_full_flush_is_offered() {
    if !common::kvm_or_skip("the_unsupported_scenario_fails_when_full_flush_is_offered") {
        return;
    }
    let out = run_vmm(&["--cmdline", "scenario=unsupported"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
}

/// Where the busy vCPUs of `busy-requests` count (one cache line each).
const COUNTERS: u64 = 0x400_0000;
const REQUESTS: u64 = 1000;

/// Over more than a thousand requests with busy vCPUs: no vCPU was inside
/// KVM_RUN while any line was being flushed, and no busy vCPU's guest
/// counter moved between "all paused" and "answered" of any flush; with
/// notifies served on the requesting vCPU's thread (the default).
#[test]
fn no_vcpu_runs_while_lines_are_flushed() {
    if common::kvm_or_skip("no_vcpu_runs_while_lines_are_flushed") {
        pause_invariant(NotifyPath::Vcpu);
    }
}

/// The same with notifies through an ioeventfd to the control loop.
#[test]
fn no_vcpu_runs_while_lines_are_flushed_through_the_ioeventfd_path() {
    if common::kvm_or_skip("no_vcpu_runs_while_lines_are_flushed_through_the_ioeventfd_path") {
        pause_invariant(NotifyPath::Ioeventfd);
    }
}

/// Every scenario that flushes from several vCPUs at once passes through the
/// ioeventfd path too.
#[test]
fn scenarios_pass_through_the_ioeventfd_path() {
    if !common::kvm_or_skip("scenarios_pass_through_the_ioeventfd_path") {
        return;
    }
    for scenario in ["range", "full", "concurrent"] {
        for vcpus in [1, 2, 4] {
            scenario_passes(scenario, vcpus, &["--notify", "ioeventfd"]);
        }
    }
}

fn pause_invariant(notify: NotifyPath) {
    let vcpus = 3;
    let config = VmConfig {
        vcpus,
        notify,
        cmdline: format!("scenario=busy-requests requests={REQUESTS} counters={COUNTERS:#x}"),
        ..VmConfig::new(vmm::BUNDLED_GUEST_KERNEL.to_vec())
    };
    let vm = Vm::new(&config).expect("VM set-up").start().expect("start");
    let memory = vm.memory().clone();
    let read_counters = move || -> Vec<u64> {
        (1..vcpus as u64)
            .map(|v| memory.read_obj(GuestAddress(COUNTERS + 64 * v)).unwrap())
            .collect()
    };

    let at_pause = Arc::new(Mutex::new(Vec::new()));
    let moved = Arc::new(AtomicU64::new(0));
    let observed = Arc::new(AtomicU64::new(0));
    {
        let (at_pause, moved, observed, read) = (
            at_pause.clone(),
            moved.clone(),
            observed.clone(),
            read_counters.clone(),
        );
        vm.flush_engine()
            .set_observer(Some(Arc::new(move |phase| match phase {
                FlushPhase::Paused => *at_pause.lock().unwrap() = read(),
                FlushPhase::Flushed => {
                    observed.fetch_add(1, Ordering::SeqCst);
                    if *at_pause.lock().unwrap() != read() {
                        moved.fetch_add(1, Ordering::SeqCst);
                    }
                }
                // The answer has been written: still no guest progress.
                FlushPhase::Completed => {
                    if *at_pause.lock().unwrap() != read() {
                        moved.fetch_add(1, Ordering::SeqCst);
                    }
                }
                FlushPhase::Resumed => {}
            })));
    }
    let engine = vm.flush_engine().clone();
    let metrics = vm.flush_metrics().clone();
    let outcome = vm.wait().expect("control loop");
    assert!(
        matches!(outcome, VmOutcome::GuestExit { status: 0, .. }),
        "guest failed: {outcome:?}"
    );

    let stats = engine.stats();
    let batches = stats.batches.load(Ordering::SeqCst);
    let snapshot = metrics.snapshot();
    assert!(
        snapshot.completed_ok >= REQUESTS,
        "only {} requests completed: {snapshot:?}",
        snapshot.completed_ok
    );
    assert_eq!(stats.failures.load(Ordering::SeqCst), 0);
    assert!(batches >= 1);
    assert_eq!(
        observed.load(Ordering::SeqCst),
        batches,
        "every flush was observed"
    );
    assert_eq!(
        stats.vcpus_running_during_flush.load(Ordering::SeqCst),
        0,
        "a vCPU was inside KVM_RUN while lines were being flushed"
    );
    assert_eq!(
        moved.load(Ordering::SeqCst),
        0,
        "a busy vCPU's guest counter advanced during a flush"
    );
    // The busy vCPUs really were busy: the check above is not vacuous.
    assert!(
        read_counters().iter().all(|&c| c > 0),
        "busy vCPUs never ran"
    );
}

/// `--metrics` writes one valid JSON document whose counters match what the
/// guest did, and a rate limit shows up as BUSY rejections in it.
#[test]
fn metrics_json_counts_requests_and_rate_limited_ones() {
    if !common::kvm_or_skip("metrics_json_counts_requests_and_rate_limited_ones") {
        return;
    }
    let path = std::env::temp_dir().join(format!("vmm-metrics-{}.json", std::process::id()));
    let out = run_vmm(&[
        "--cmdline",
        "scenario=range",
        "--metrics",
        path.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let text = std::fs::read_to_string(&path).expect("metrics file written");
    let _ = std::fs::remove_file(&path);
    let json: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let device = &json["device"];
    let engine = &json["engine"];
    assert!(device["completed_ok"].as_u64().unwrap() > 0, "{text}");
    assert!(device["requests_range"].as_u64().unwrap() > 0, "{text}");
    assert!(engine["lines"].as_u64().unwrap() > 0, "{text}");
    assert_eq!(
        engine["vcpus_running_during_flush"].as_u64(),
        Some(0),
        "{text}"
    );
    assert_eq!(engine["failures"].as_u64(), Some(0), "{text}");
    assert_eq!(engine["incomplete"].as_u64(), Some(0), "{text}");
    assert_eq!(
        engine["flush_log"]["last_seq"], engine["batches"],
        "one flush-log record per batch: {text}"
    );
    let pause = &engine["pause_ns"];
    assert_eq!(pause["count"], engine["batches"], "{text}");
    assert!(pause["p50"].as_u64().unwrap() <= pause["max"].as_u64().unwrap());
    let shares = engine["last_flush"]["shares"].as_array().expect("shares");
    assert!(
        shares.iter().all(|s| s["host_cpu"].as_i64().unwrap() >= 0),
        "{text}"
    );
}
