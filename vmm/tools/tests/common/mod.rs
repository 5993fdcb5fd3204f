//! Helpers shared by the `vmm-tools` tests (the `vmm` package's tests have
//! their own, around its binary).
#![allow(dead_code)] // Each test binary uses a different subset.

use std::io::Write;
use std::process::{Command, Output};

/// Returns `true` if `/dev/kvm` can be opened. Otherwise prints a loud
/// SKIPPED line for `test` straight to stderr, so a machine without KVM
/// never passes these tests silently.
pub fn kvm_or_skip(test: &str) -> bool {
    let Some(reason) = vmm::vm::kvm_unavailable() else {
        return true;
    };
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: needs KVM: {reason}");
    false
}

/// Runs the `vmm-tools` binary built for this test run with `args`.
pub fn run_tools(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmm-tools"))
        .args(args)
        .output()
        .expect("the vmm-tools binary runs")
}

/// Stdout and stderr of `out`, for assertion messages.
pub fn describe(out: &Output) -> String {
    format!(
        "exit status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
