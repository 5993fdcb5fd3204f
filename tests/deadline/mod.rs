//! Running the `vmm` binary under a deadline, for tests of cases that could
//! hang: a run still going at the deadline is killed and the test fails with
//! what it printed so far. The deadline is generous (a hang guard, not a
//! timing assertion).
#![allow(dead_code)] // Each test binary uses a different subset.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a run may take before it counts as hung.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// A child process whose stdout and stderr are being collected.
pub struct Running {
    child: Child,
    stdout: Option<JoinHandle<Vec<u8>>>,
    stderr: Option<JoinHandle<Vec<u8>>>,
    started: Instant,
    deadline: Duration,
}

fn collect(mut pipe: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        bytes
    })
}

impl Running {
    /// Starts `command` with stdout and stderr piped, under [`DEADLINE`].
    pub fn spawn(command: &mut Command) -> Self {
        Self::spawn_with_deadline(command, DEADLINE)
    }

    /// Starts `command` with stdout and stderr piped, under `deadline`
    /// (for runs that take minutes, such as a Linux guest's boot).
    pub fn spawn_with_deadline(command: &mut Command, deadline: Duration) -> Self {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the vmm binary starts");
        let stdout = child.stdout.take().map(collect);
        let stderr = child.stderr.take().map(collect);
        Self {
            child,
            stdout,
            stderr,
            started: Instant::now(),
            deadline,
        }
    }

    /// The child's process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the child is still running (false once it has exited).
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Time left before the deadline (counted from the start).
    pub fn time_left(&self) -> Duration {
        self.deadline.saturating_sub(self.started.elapsed())
    }

    /// Waits for the child to exit, or kills it at the deadline. Returns
    /// its output and whether it had to be killed (it hung).
    pub fn wait(mut self, what: &str) -> (Output, bool) {
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if self.time_left().is_zero() => break None,
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => panic!("{what}: cannot wait for the vmm: {e}"),
            }
        };
        match status {
            Some(status) => (self.output(status), false),
            None => {
                let _ = self.child.kill();
                let status = self.child.wait().expect("wait after kill");
                (self.output(status), true)
            }
        }
    }

    /// Waits for the child to exit. If it is still running at the deadline,
    /// kills it and panics with its output: `what` hung.
    pub fn finish(self, what: &str) -> Output {
        let deadline = self.deadline;
        let (out, hung) = self.wait(what);
        assert!(
            !hung,
            "{what}: the vmm was still running {deadline:?} after its start (hung?); killed it\n{}",
            crate::common::describe(&out)
        );
        out
    }

    fn output(&mut self, status: ExitStatus) -> Output {
        let join = |h: Option<JoinHandle<Vec<u8>>>| h.map(|h| h.join().unwrap_or_default());
        Output {
            status,
            stdout: join(self.stdout.take()).unwrap_or_default(),
            stderr: join(self.stderr.take()).unwrap_or_default(),
        }
    }
}

/// Runs the `vmm` binary with `args` under [`DEADLINE`]; `what` names the
/// run in a failure message.
pub fn run_vmm(what: &str, args: &[&str]) -> Output {
    let mut command = crate::common::vmm();
    command.args(args);
    Running::spawn(&mut command).finish(what)
}
