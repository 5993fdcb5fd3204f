//! Watching a Linux guest's console: the lines that say the kernel has
//! finished booting, panicked, or powered off, and what the VMM does then.
//!
//! Linux has no exit port of its own. A guest that panics loops forever (or,
//! with `panic=N`, reboots); one that powers off with `acpi=off` halts
//! forever. The console is where the kernel says so, so the VMM ends the VM
//! there with a clear line instead of waiting for nothing.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::host_quirks::syscall_remedy::SyscallRemedy;
use crate::vcpu::{OutcomeSink, VmOutcome};

/// A console line the VMM acts on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsoleEvent {
    /// "Run /init as init process": the kernel has booted.
    InitStarting,
    /// "Kernel panic - not syncing: MSG".
    Panic(String),
    /// "---[ end Kernel panic ...": the panic report is complete.
    PanicEnd,
    /// "reboot: Power down", "reboot: System halted" or "reboot: Restarting
    /// system": the kernel is leaving for good.
    Stopped(&'static str),
}

/// What a console line means to the VMM, if anything.
pub fn classify(line: &str) -> Option<ConsoleEvent> {
    if line.contains("Run /init as init process") {
        Some(ConsoleEvent::InitStarting)
    } else if let Some((_, msg)) = line.split_once("Kernel panic - not syncing: ") {
        Some(ConsoleEvent::Panic(msg.trim_end().to_string()))
    } else if line.contains("---[ end Kernel panic") {
        Some(ConsoleEvent::PanicEnd)
    } else if line.contains("reboot: Power down") {
        Some(ConsoleEvent::Stopped("powered off"))
    } else if line.contains("reboot: System halted") {
        Some(ConsoleEvent::Stopped("halted"))
    } else if line.contains("reboot: Restarting system") {
        Some(ConsoleEvent::Stopped("rebooted"))
    } else {
        None
    }
}

/// The Linux guest's life as the VMM sees it; shared by the console watcher
/// and the reset register.
pub struct GuestLifecycle {
    outcome: Arc<OutcomeSink>,
    syscall_remedy: Option<Arc<SyscallRemedy>>,
    panic: Mutex<Option<String>>,
    started: Instant,
}

impl GuestLifecycle {
    /// A lifecycle reporting to `outcome`; `syscall_remedy` is armed when
    /// the kernel has booted.
    pub fn new(outcome: Arc<OutcomeSink>, syscall_remedy: Option<Arc<SyscallRemedy>>) -> Self {
        Self {
            outcome,
            syscall_remedy,
            panic: Mutex::new(None),
            started: Instant::now(),
        }
    }

    fn panic_message(&self) -> Option<String> {
        self.panic.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn end(&self, reason: String) {
        self.outcome.report(VmOutcome::Crash { vcpu: None, reason });
    }

    /// Acts on one console line.
    pub fn on_line(&self, line: &str) {
        match classify(line) {
            None => {}
            Some(ConsoleEvent::InitStarting) => {
                log::info!(
                    "linux: the kernel starts /init {:.1} s after the VM started",
                    self.started.elapsed().as_secs_f64()
                );
                if let Some(remedy) = &self.syscall_remedy {
                    remedy.arm();
                }
            }
            Some(ConsoleEvent::Panic(msg)) => {
                *self.panic.lock().unwrap_or_else(|p| p.into_inner()) = Some(msg);
            }
            Some(ConsoleEvent::PanicEnd) => self.end(format!(
                "the guest kernel panicked: {}",
                self.panic_message().unwrap_or_default()
            )),
            Some(ConsoleEvent::Stopped(how)) => self.on_stop(how),
        }
    }

    /// The guest wrote the reset register (a reboot, or `panic=N`).
    pub fn on_reset(&self) {
        self.on_stop("rebooted");
    }

    fn on_stop(&self, how: &str) {
        match self.panic_message() {
            Some(msg) => self.end(format!("the guest kernel panicked: {msg}")),
            None => self.end(format!(
                "the guest {how} without a verdict on the exit port (port 0x500)"
            )),
        }
    }
}

/// Longest line kept for matching; the rest of a longer line only passes
/// through.
const MAX_LINE: usize = 512;

/// A `Write` that passes the console through and hands each line to a
/// [`GuestLifecycle`].
pub struct ConsoleWatch<W: Write> {
    inner: W,
    line: Vec<u8>,
    lifecycle: Arc<GuestLifecycle>,
}

impl<W: Write> ConsoleWatch<W> {
    /// Watches what is written to `inner`.
    pub fn new(inner: W, lifecycle: Arc<GuestLifecycle>) -> Self {
        Self {
            inner,
            line: Vec::with_capacity(MAX_LINE),
            lifecycle,
        }
    }
}

impl<W: Write> Write for ConsoleWatch<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        for &b in &buf[..n] {
            if b == b'\n' {
                self.lifecycle.on_line(&String::from_utf8_lossy(&self.line));
                self.line.clear();
            } else if b != b'\r' && self.line.len() < MAX_LINE {
                self.line.push(b);
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_the_lines_that_matter() {
        assert_eq!(
            classify("[  210.1] Run /init as init process"),
            Some(ConsoleEvent::InitStarting)
        );
        assert_eq!(
            classify("[ 9.0] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)"),
            Some(ConsoleEvent::Panic(
                "VFS: Unable to mount root fs on unknown-block(0,0)".into()
            ))
        );
        assert_eq!(
            classify("[ 9.1] ---[ end Kernel panic - not syncing: x ]---"),
            Some(ConsoleEvent::PanicEnd)
        );
        assert_eq!(
            classify("[ 5.0] reboot: Power down"),
            Some(ConsoleEvent::Stopped("powered off"))
        );
        assert_eq!(classify("[ 1.0] Linux version 6.1.0"), None);
    }

    #[test]
    fn a_panic_ends_the_vm_with_its_message() {
        let outcome = OutcomeSink::new().unwrap();
        let life = Arc::new(GuestLifecycle::new(outcome.clone(), None));
        let mut console = ConsoleWatch::new(Vec::new(), life);
        console
            .write_all(b"boot\r\nKernel panic - not syncing: Attempted to kill init!\r\n")
            .unwrap();
        assert_eq!(outcome.outcome(), None, "not before the report is complete");
        console
            .write_all(b"---[ end Kernel panic - not syncing: Attempted to kill init! ]---\n")
            .unwrap();
        assert_eq!(
            outcome.outcome(),
            Some(VmOutcome::Crash {
                vcpu: None,
                reason: "the guest kernel panicked: Attempted to kill init!".into()
            })
        );
        assert!(
            console.inner.starts_with(b"boot\r\n"),
            "the console passes through"
        );
    }

    #[test]
    fn power_off_and_reset_end_the_vm() {
        let outcome = OutcomeSink::new().unwrap();
        let life = GuestLifecycle::new(outcome.clone(), None);
        life.on_line("reboot: Power down");
        assert!(matches!(
            outcome.outcome(),
            Some(VmOutcome::Crash { reason, .. }) if reason.contains("powered off without a verdict")
        ));
        // A reset after a panic names the panic.
        let outcome = OutcomeSink::new().unwrap();
        let life = GuestLifecycle::new(outcome.clone(), None);
        life.on_line("Kernel panic - not syncing: oops");
        life.on_reset();
        assert!(matches!(
            outcome.outcome(),
            Some(VmOutcome::Crash { reason, .. }) if reason == "the guest kernel panicked: oops"
        ));
    }

    #[test]
    fn lines_split_across_writes_are_seen_whole() {
        let outcome = OutcomeSink::new().unwrap();
        let life = Arc::new(GuestLifecycle::new(outcome.clone(), None));
        let mut console = ConsoleWatch::new(Vec::new(), life);
        for b in b"reboot: Sys".iter().chain(b"tem halted\n") {
            console.write_all(&[*b]).unwrap();
        }
        assert!(outcome.outcome().is_some());
    }
}
