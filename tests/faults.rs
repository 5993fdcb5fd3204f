//! Fault cases end to end, through the `vmm` binary: a vCPU faulting while
//! others make flush requests, the guest ending while a vCPU makes requests,
//! SIGTERM in the middle of a flush loop, a driver that never sets
//! DRIVER_OK, and a device reset with a request outstanding. Each run is
//! under a generous deadline (`deadline::DEADLINE`): a hang fails the test
//! instead of blocking it; nothing here asserts on timing.

mod common;
mod deadline;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::describe;
use deadline::{run_vmm, Running};

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A metrics file path of this test process.
fn metrics_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("vmm-faults-{name}-{}.json", std::process::id()))
}

/// The device counters of a `--metrics` file, if it holds valid JSON.
fn device_counters(path: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(path).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(json["device"].clone())
}

/// Every request the device took off a queue got exactly one outcome:
/// `completed_ok + rejected_* + completed_host_error + unanswerable +
/// dropped_after_reset == requests_range + requests_full + requests_other`.
fn assert_no_request_lost(device: &serde_json::Value) {
    let n = |name: &str| {
        device[name]
            .as_u64()
            .unwrap_or_else(|| panic!("no counter {name} in {device}"))
    };
    let outcomes = [
        "completed_ok",
        "rejected_invalid",
        "rejected_unsupported",
        "rejected_out_of_range",
        "rejected_too_large",
        "rejected_busy",
        "completed_host_error",
        "unanswerable",
        "dropped_after_reset",
    ]
    .iter()
    .map(|name| n(name))
    .sum::<u64>();
    let requests = n("requests_range") + n("requests_full") + n("requests_other");
    assert_eq!(
        outcomes, requests,
        "requests taken off the queues and their outcomes disagree: {device}"
    );
}

/// (a) A page fault on one vCPU while the others keep making flush
/// requests: the guest's exception report, and exit code 1.
#[test]
fn a_page_fault_while_other_vcpus_flush_ends_the_vm_with_exit_1_and_the_report() {
    if !common::kvm_or_skip(
        "a_page_fault_while_other_vcpus_flush_ends_the_vm_with_exit_1_and_the_report",
    ) {
        return;
    }
    for vcpus in [1u32, 2, 4] {
        let n = vcpus.to_string();
        let what = format!("fault-during-flush on {vcpus} vCPUs");
        let out = run_vmm(
            &what,
            &["--vcpus", &n, "--cmdline", "scenario=fault-during-flush"],
        );
        assert_eq!(out.status.code(), Some(1), "{what}\n{}", describe(&out));
        let faulter = vcpus - 1;
        let stdout = stdout(&out);
        let reports: Vec<&str> = stdout
            .lines()
            .filter(|l| l.starts_with("guest: exception"))
            .collect();
        assert_eq!(
            reports.len(),
            1,
            "{what}: one exception report\n{}",
            describe(&out)
        );
        let report = reports[0];
        assert!(
            report.contains("exception 14 (#PF)")
                && report.contains("cr2=0x0 ")
                && report.contains(&format!("vcpu={faulter} ")),
            "{what}: the report names the #PF at 0x0 on vcpu {faulter}: {report}\n{}",
            describe(&out)
        );
        assert!(
            stderr(&out).contains(&format!(
                "error: the guest reported failure: status 3 (vcpu {faulter})"
            )),
            "{what}\n{}",
            describe(&out)
        );
    }
}

/// (b) The guest ends (status 0 from vCPU 1) while vCPU 0 is making
/// requests: exit code 0, nothing reported as an error.
#[test]
fn the_guest_ending_while_vcpu_0_makes_requests_exits_0() {
    if !common::kvm_or_skip("the_guest_ending_while_vcpu_0_makes_requests_exits_0") {
        return;
    }
    for vcpus in [2u32, 4] {
        let n = vcpus.to_string();
        let what = format!("exit-during-flush on {vcpus} vCPUs");
        let out = run_vmm(
            &what,
            &["--vcpus", &n, "--cmdline", "scenario=exit-during-flush"],
        );
        assert_eq!(out.status.code(), Some(0), "{what}\n{}", describe(&out));
        assert!(
            stdout(&out).contains("vcpu 1 ends the VM with status 0"),
            "{what}\n{}",
            describe(&out)
        );
        assert!(
            !stderr(&out).contains("error"),
            "{what}: no error on stderr\n{}",
            describe(&out)
        );
    }
}

/// (c) SIGTERM while every vCPU flushes in a loop: exit code 143, one line
/// saying so, and the `--metrics` file written at exit shows completed
/// requests and an outcome for every request taken off a queue.
#[test]
fn sigterm_while_the_guest_flushes_exits_143_and_loses_no_request() {
    if !common::kvm_or_skip("sigterm_while_the_guest_flushes_exits_143_and_loses_no_request") {
        return;
    }
    let path = metrics_path("sigterm");
    let _ = std::fs::remove_file(&path);
    let mut command = common::vmm();
    command.args([
        "--vcpus",
        "2",
        "--metrics",
        path.to_str().unwrap(),
        "--metrics-interval",
        "1",
        "--cmdline",
        "scenario=concurrent requests=100000",
    ]);
    let mut vmm = Running::spawn(&mut command);
    // Wait until a periodic metrics write shows completed requests, so the
    // signal lands in the middle of the flush loop (100000 requests per
    // vCPU take minutes).
    loop {
        let done = device_counters(&path)
            .and_then(|d| d["completed_ok"].as_u64())
            .unwrap_or(0);
        if done > 0 || !vmm.running() || vmm.time_left().is_zero() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if !vmm.running() {
        let out = vmm.finish("concurrent requests=100000");
        panic!("the vmm ended before SIGTERM\n{}", describe(&out));
    }
    // SAFETY: kill(2) on our own child's PID; it is still running (or a
    // zombie we have not reaped, which ignores the signal).
    let rc = unsafe { libc::kill(vmm.pid() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    let out = vmm.finish("concurrent requests=100000, then SIGTERM");
    assert_eq!(out.status.code(), Some(143), "{}", describe(&out));
    assert!(
        stderr(&out).contains("vmm: stopped by signal 15"),
        "{}",
        describe(&out)
    );
    let device = device_counters(&path).expect("the metrics file written at exit");
    let _ = std::fs::remove_file(&path);
    assert!(
        device["completed_ok"].as_u64().unwrap() > 0,
        "completed requests: {device}"
    );
    assert_no_request_lost(&device);
}

/// (d) A driver that sets FEATURES_OK, sets up no queue, never sets
/// DRIVER_OK and notifies anyway: the device ignores it, the VMM keeps
/// running, exit code 0.
#[test]
fn a_notify_before_driver_ok_is_ignored_and_the_vmm_keeps_running() {
    if !common::kvm_or_skip("a_notify_before_driver_ok_is_ignored_and_the_vmm_keeps_running") {
        return;
    }
    let out = run_vmm("no-driver-ok", &["--cmdline", "scenario=no-driver-ok"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        stdout(&out).contains("no-driver-ok: status still 0xb"),
        "{}",
        describe(&out)
    );
}

/// (d, continued) ... and says so in a warning on stderr. The notify
/// reaches the device through its ioeventfd, so it is the queue worker
/// (`devices/src/cache_flush/queue_worker.rs`) that notices the device is not
/// running and warns.
#[test]
fn a_notify_before_driver_ok_is_logged_as_a_warning() {
    if !common::kvm_or_skip("a_notify_before_driver_ok_is_logged_as_a_warning") {
        return;
    }
    let out = run_vmm("no-driver-ok", &["--cmdline", "scenario=no-driver-ok"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let stderr = stderr(&out);
    let warned = stderr.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.contains("warn") && l.contains("notif") && l.contains("driver_ok")
    });
    assert!(
        warned,
        "a warning about the notify before DRIVER_OK\n{}",
        describe(&out)
    );
}

/// (e) A device reset right behind the notify of a request, many times:
/// each request completes before the reset or never, nothing is written
/// afterwards, the driver then re-initialises the device and good requests
/// work; exit code 0, and every request taken off a queue has an outcome
/// (`dropped_after_reset` for those whose flush the reset overtook).
#[test]
fn a_reset_with_a_request_outstanding_then_a_normal_restart_works() {
    if !common::kvm_or_skip("a_reset_with_a_request_outstanding_then_a_normal_restart_works") {
        return;
    }
    for vcpus in [1u32, 2] {
        let n = vcpus.to_string();
        let what = format!("reset-outstanding on {vcpus} vCPUs");
        let path = metrics_path(&format!("reset-{vcpus}"));
        let out = run_vmm(
            &what,
            &[
                "--vcpus",
                &n,
                "--metrics",
                path.to_str().unwrap(),
                "--cmdline",
                "scenario=reset-outstanding rounds=40",
            ],
        );
        assert_eq!(out.status.code(), Some(0), "{what}\n{}", describe(&out));
        let stdout = stdout(&out);
        assert!(
            stdout.contains("nothing written after a reset") && stdout.contains("made good range"),
            "{what}\n{}",
            describe(&out)
        );
        let device = device_counters(&path).expect("the metrics file written at exit");
        let _ = std::fs::remove_file(&path);
        assert_no_request_lost(&device);
    }
}
