//! The `vmm` binary end to end: booting the bundled guest, and refusing bad
//! kernels and bad flags with one clear line and the documented exit code.

mod common;

use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;

use common::{describe, elf_image, run_vmm};

const SETUP_ERROR: i32 = 3;
const USAGE: i32 = 2;
const GUEST_FAILURE: i32 = 1;

fn boots_and_all_report(vcpus: u32) {
    let n = vcpus.to_string();
    let out = run_vmm(&["--vcpus", &n, "--cmdline", "scenario=boot"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    for v in 0..vcpus {
        assert!(
            stdout.contains(&format!("vcpu {v} of {vcpus} reporting")),
            "vCPU {v} did not report in\n{}",
            describe(&out)
        );
    }
    assert!(
        stdout.contains(&format!("boot: all {vcpus} vCPUs reported")),
        "{}",
        describe(&out)
    );
}

#[test]
fn one_vcpu_boots_and_reports_in() {
    if common::kvm_or_skip("one_vcpu_boots_and_reports_in") {
        boots_and_all_report(1);
    }
}

#[test]
fn two_vcpus_boot_and_report_in() {
    if common::kvm_or_skip("two_vcpus_boot_and_report_in") {
        boots_and_all_report(2);
    }
}

#[test]
fn four_vcpus_boot_and_report_in() {
    if common::kvm_or_skip("four_vcpus_boot_and_report_in") {
        boots_and_all_report(4);
    }
}

#[test]
fn an_8_gib_guest_starts_with_a_small_host_rss() {
    if !common::kvm_or_skip("an_8_gib_guest_starts_with_a_small_host_rss") {
        return;
    }
    // Reaped by wait4 below, which also reports the child's peak RSS.
    #[allow(clippy::zombie_processes)]
    let child = common::vmm()
        .args([
            "--memory",
            "8192",
            "--vcpus",
            "2",
            "--cmdline",
            "scenario=boot",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("vmm starts");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data, filled in by wait4.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our own child; status and usage are valid pointers.
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(waited, pid);
    let status = std::process::ExitStatus::from_raw(status);
    assert_eq!(status.code(), Some(0), "8 GiB guest failed: {status:?}");
    let max_rss_mib = usage.ru_maxrss / 1024; // ru_maxrss is in KiB
                                              // 8 GiB of guest RAM must not be allocated up front; the VMM, the guest's
                                              // page tables and the pages it touches fit in a few tens of MiB.
    assert!(
        max_rss_mib < 128,
        "host RSS of an 8 GiB guest reached {max_rss_mib} MiB"
    );
}

#[test]
fn a_guest_page_fault_is_reported_and_fails_the_run() {
    if !common::kvm_or_skip("a_guest_page_fault_is_reported_and_fails_the_run") {
        return;
    }
    let out = run_vmm(&["--cmdline", "scenario=fault"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(GUEST_FAILURE), "{}", describe(&out));
    let report = stdout
        .lines()
        .find(|l| l.contains("exception 14"))
        .unwrap_or_else(|| panic!("no page-fault report\n{}", describe(&out)));
    for field in ["#PF", "error=", "rip=", "cr2=0x0", "vcpu=0"] {
        assert!(report.contains(field), "report lacks {field}: {report}");
    }
}

#[test]
fn an_unknown_scenario_lists_the_scenarios_and_fails() {
    if !common::kvm_or_skip("an_unknown_scenario_lists_the_scenarios_and_fails") {
        return;
    }
    let out = run_vmm(&["--cmdline", "scenario=no-such-thing"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(GUEST_FAILURE), "{}", describe(&out));
    assert!(stdout.contains("no-such-thing"), "{}", describe(&out));
    assert!(
        stdout.contains("boot") && stdout.contains("fault"),
        "{}",
        describe(&out)
    );
}

/// Runs the VMM on `image`; asserts a set-up error with exactly one line on
/// stderr that mentions `expect`.
fn assert_kernel_refused(image: &[u8], expect: &str) {
    let mut file = tempfile();
    file.1.write_all(image).unwrap();
    let out = run_vmm(&["--kernel", file.0.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(SETUP_ERROR), "{}", describe(&out));
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "want one line on stderr\n{}",
        describe(&out)
    );
    assert!(lines[0].starts_with("error: "), "{}", describe(&out));
    assert!(
        lines[0].contains(expect),
        "want {expect:?}\n{}",
        describe(&out)
    );
    assert!(out.stdout.is_empty(), "nothing may run\n{}", describe(&out));
    let _ = std::fs::remove_file(&file.0);
}

fn tempfile() -> (std::path::PathBuf, std::fs::File) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let path = std::env::temp_dir().join(format!(
        "vmm-test-kernel-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let file = std::fs::File::create(&path).unwrap();
    (path, file)
}

const CODE: [u8; 4] = [0xf4; 4];

// The kernel checks run before /dev/kvm is opened, so these tests need no KVM.

#[test]
fn a_file_that_is_not_elf_is_refused() {
    assert_kernel_refused(b"#!/bin/sh\necho I am not a kernel\n", "not an ELF file");
}

#[test]
fn an_empty_file_is_refused() {
    assert_kernel_refused(b"", "not an ELF file");
}

#[test]
fn a_32_bit_elf_is_refused() {
    let mut image = elf_image(0x20_0000, 0x20_0000, 0x1000, 5, 2, 62, &CODE);
    image[4] = 1; // ELFCLASS32
    assert_kernel_refused(&image, "not a 64-bit");
}

#[test]
fn an_elf_for_another_machine_is_refused() {
    let image = elf_image(0x20_0000, 0x20_0000, 0x1000, 5, 2, 183, &CODE); // aarch64
    assert_kernel_refused(&image, "machine 183");
}

#[test]
fn a_relocatable_object_is_refused() {
    let image = elf_image(0x20_0000, 0x20_0000, 0x1000, 5, 1, 62, &CODE);
    assert_kernel_refused(&image, "not a static executable");
}

#[test]
fn a_segment_outside_guest_ram_is_refused() {
    // 256 MiB of RAM by default: put the segment at 1 GiB.
    let image = elf_image(0x4000_0000, 0x4000_0000, 0x1000, 5, 2, 62, &CODE);
    assert_kernel_refused(&image, "outside guest RAM");
}

#[test]
fn a_segment_over_the_boot_structures_is_refused() {
    let image = elf_image(0x2000, 0x2000, 0x1000, 5, 2, 62, &CODE);
    assert_kernel_refused(&image, "boot structures");
}

#[test]
fn an_entry_point_outside_the_segments_is_refused() {
    let image = elf_image(0x80_0000, 0x20_0000, 0x1000, 5, 2, 62, &CODE);
    assert_kernel_refused(&image, "entry point 0x800000");
}

#[test]
fn truncated_program_headers_are_refused() {
    let mut image = elf_image(0x20_0000, 0x20_0000, 0x1000, 5, 2, 62, &CODE);
    image.truncate(80);
    assert_kernel_refused(&image, "program headers");
}

#[test]
fn a_missing_kernel_file_is_refused() {
    let out = run_vmm(&["--kernel", "/nonexistent/kernel.elf"]);
    assert_eq!(out.status.code(), Some(SETUP_ERROR), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{}", describe(&out));
    assert!(
        stderr.contains("/nonexistent/kernel.elf"),
        "{}",
        describe(&out)
    );
}

fn assert_usage_error(args: &[&str], expect: &str) {
    let out = run_vmm(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(USAGE),
        "{args:?}\n{}",
        describe(&out)
    );
    assert!(stderr.starts_with("error: "), "{}", describe(&out));
    assert!(
        stderr.contains(expect),
        "want {expect:?}\n{}",
        describe(&out)
    );
}

#[test]
fn invalid_flags_are_refused_with_usage_errors() {
    assert_usage_error(&["--vcpus", "0"], "--vcpus");
    assert_usage_error(&["--vcpus", "33"], "--vcpus");
    assert_usage_error(&["--vcpus", "two"], "--vcpus");
    assert_usage_error(&["--memory", "0"], "--memory");
    assert_usage_error(&["--memory", "3"], "--memory");
    assert_usage_error(&["--memory", "65537"], "--memory");
    assert_usage_error(&["--memory", "-1"], "'-1'");
    assert_usage_error(&["--log-level", "loud"], "--log-level");
    assert_usage_error(&["--no-such-flag"], "--no-such-flag");
}

#[test]
fn a_command_line_too_long_for_the_boot_block_is_refused() {
    let long = format!("scenario=boot {}", "x".repeat(2000));
    let out = run_vmm(&["--cmdline", &long]);
    assert_eq!(out.status.code(), Some(SETUP_ERROR), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("command line"));
}

#[test]
fn help_documents_every_flag_and_the_exit_codes() {
    let out = run_vmm(&["--help"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--kernel",
        "--vcpus",
        "--memory",
        "--cmdline",
        "--log-level",
        "Exit codes",
        "130",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}\n{help}");
    }
}

/// A kernel whose every vCPU halts: the halted vCPUs' threads stay (they
/// idle, see `resources/boot-protocol.md`), and once the last one has halted
/// the VM ends with exit code 4 and one line saying why, every thread
/// finished.
#[test]
fn a_guest_whose_vcpus_all_halt_ends_with_exit_code_4() {
    if !common::kvm_or_skip("a_guest_whose_vcpus_all_halt_ends_with_exit_code_4") {
        return;
    }
    let (path, mut file) = tempfile();
    file.write_all(&common::raw_kernel(&[0xf4, 0xeb, 0xfd])) // hlt; jmp hlt
        .unwrap();
    drop(file);
    for vcpus in ["1", "3"] {
        let out = run_vmm(&["--kernel", path.to_str().unwrap(), "--vcpus", vcpus]);
        assert_eq!(
            out.status.code(),
            Some(4),
            "{vcpus} vCPUs\n{}",
            describe(&out)
        );
        assert!(
            String::from_utf8_lossy(&out.stderr)
                .contains("error: every vCPU halted without a verdict on the exit port"),
            "{}",
            describe(&out)
        );
    }
    let _ = std::fs::remove_file(&path);
}
