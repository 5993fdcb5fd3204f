//! The host's instructions per request, counted by valgrind's callgrind: a
//! figure that does not move with the CPU model, the machine's load or the
//! state of its caches, unlike every timing in the report.
//!
//! callgrind runs the `vmm` binary (built beside `vmm-tools`) on the bench
//! guest's 64 B range flushes on 1 vCPU, counting only inside
//! `QueueWorker::serve_notify`: everything the host does for a request
//! between the notify's exit and the return to the guest. Two runs of
//! different lengths are subtracted, so start-up and the flush log filling
//! its ring (a record is allocated until the ring is full) drop out. Each
//! repetition of the guest also makes one empty notify (the exit floor's
//! notify half), which the figure includes: a serve that finds nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Guest repetitions of the shorter and the longer run; both past the flush
/// log's 4096 records.
const REPS: (u64, u64) = (5000, 7000);

/// What callgrind counted.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct InstructionCount {
    /// Instructions inside `serve_notify` per 64 B request (with the empty
    /// notify that follows it).
    pub per_request: f64,
    /// The repetitions of each run.
    pub reps: (u64, u64),
}

/// Counts, or says why it could not: valgrind missing, the `vmm` binary not
/// built, a run that failed.
pub fn measure(out: &Path) -> Result<InstructionCount, String> {
    let vmm = vmm_binary()?;
    let version = Command::new("valgrind")
        .arg("--version")
        .output()
        .map_err(|e| format!("valgrind not found ({e}); install it (Debian: valgrind)"))?;
    if !version.status.success() {
        return Err("`valgrind --version` failed".into());
    }
    let short = totals(&vmm, out, REPS.0)?;
    let long = totals(&vmm, out, REPS.1)?;
    if long <= short {
        return Err(format!(
            "callgrind counted {long} instructions in {} requests and {short} in {}: \
             is QueueWorker::serve_notify still a function of its own?",
            REPS.1, REPS.0
        ));
    }
    Ok(InstructionCount {
        per_request: (long - short) as f64 / (REPS.1 - REPS.0) as f64,
        reps: REPS,
    })
}

/// `vmm`, beside this program (both are built by `cargo build --release`).
fn vmm_binary() -> Result<PathBuf, String> {
    let me = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let vmm = me.with_file_name("vmm");
    if vmm.is_file() {
        Ok(vmm)
    } else {
        Err(format!(
            "{} not found: build it first (cargo build --release -p vmm)",
            vmm.display()
        ))
    }
}

/// Runs the bench guest for `reps` repetitions under callgrind and returns
/// the instructions it counted inside `serve_notify`.
fn totals(vmm: &Path, out: &Path, reps: u64) -> Result<u64, String> {
    let file = out.join(format!("callgrind.{reps}.out"));
    let run = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg("--toggle-collect=*QueueWorker::serve_notify*")
        .arg(format!("--callgrind-out-file={}", file.display()))
        .arg(vmm)
        .arg("--cmdline")
        .arg(format!(
            "scenario=bench part=range min=64 max=64 reps={reps}"
        ))
        .output()
        .map_err(|e| format!("cannot run valgrind: {e}"))?;
    if !run.status.success() {
        return Err(format!(
            "the bench guest under callgrind failed ({}): {}",
            run.status,
            String::from_utf8_lossy(&run.stderr)
                .lines()
                .last()
                .unwrap_or("")
        ));
    }
    let text = std::fs::read_to_string(&file)
        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    // Not kept: one callgrind file is a few hundred KB of symbols.
    let _ = std::fs::remove_file(&file);
    text.lines()
        .find_map(|l| {
            l.strip_prefix("totals:")
                .or_else(|| l.strip_prefix("summary:"))
        })
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("no totals line in {}", file.display()))
}
