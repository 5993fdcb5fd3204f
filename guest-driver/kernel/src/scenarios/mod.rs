//! The scenarios the kernel can run, chosen with `scenario=NAME` on the
//! command line. Every vCPU runs the chosen scenario's function.
//!
//! To add one: write `src/scenarios/NAME.rs` with a
//! `pub const SCENARIO: Scenario`, and add `NAME` to the `registry!` list below.
//!
//! Conventions of the cache-flush scenarios: every vCPU calls
//! [`crate::flush::setup`] first (vCPU 0 initialises the driver while the
//! others wait at a barrier; a missing device ends the run with
//! `guest: no cache-flush device in the device table`); options are
//! `key=value` words read with [`Env::option_u64`]; buffers of megabytes come
//! from [`crate::scratch`]; every failure prints one line,
//! `NAME: FAILED: reason` (see [`fail!`](crate::fail)), and vCPU 0 ends the
//! VM.

use core::fmt::{self, Write};

use cache_flush_abi::boot::BootInfo;

use crate::cmdline::{parse_u64, Cmdline};
use crate::io::Console;
use crate::status;
use crate::sync::SpinBarrier;

/// What a scenario's vCPU sees.
pub struct Env {
    /// This vCPU's index, `0..vcpu_count`.
    pub vcpu: u32,
    /// Number of vCPUs the VMM started.
    pub vcpu_count: u32,
    /// The boot information block (RAM, devices, command line).
    pub boot_info: &'static BootInfo,
    /// The command line, for scenario parameters (`key=value` words).
    pub cmdline: Cmdline<'static>,
}

/// The barrier behind [`Env::barrier`].
static BARRIER: SpinBarrier = SpinBarrier::new();

impl Env {
    /// Waits until every vCPU has reached this barrier.
    pub fn barrier(&self) {
        BARRIER.wait(self.vcpu_count);
    }

    /// Whether this is vCPU 0, the one that reports and exits by convention.
    pub fn is_first(&self) -> bool {
        self.vcpu == 0
    }

    /// The number given as `key=N` on the command line (decimal or `0x` hex),
    /// or `default` without one. A value that is not a number ends the
    /// scenario: vCPU 0 says why and exits with [`status::BAD_OPTION`], the
    /// others park.
    pub fn option_u64(&self, key: &str, default: u64) -> Result<u64, Outcome> {
        let Some(text) = self.cmdline.get(key) else {
            return Ok(default);
        };
        parse_u64(text).ok_or_else(|| {
            self.bad_option(format_args!(
                "{key}={text}: expected a number (decimal, or hexadecimal after 0x)"
            ))
        })
    }

    /// Ends the scenario for a bad option: vCPU 0 prints
    /// `guest: bad option <what>` and exits with [`status::BAD_OPTION`].
    pub fn bad_option(&self, what: fmt::Arguments) -> Outcome {
        if self.is_first() {
            crate::println!("guest: bad option {what}");
            Outcome::Exit(status::BAD_OPTION)
        } else {
            Outcome::Park
        }
    }
}

/// Prints one line (the reason) and returns the failure outcome; see
/// [`fail!`](crate::fail).
pub fn fail_with(reason: fmt::Arguments) -> Outcome {
    crate::io::print_line(reason);
    Outcome::Exit(status::SCENARIO_FAILED)
}

/// `return fail!("name: why")`: prints the one-line reason and yields
/// `Outcome::Exit(status::SCENARIO_FAILED)`.
#[macro_export]
macro_rules! fail {
    ($($arg:tt)*) => {
        $crate::scenarios::fail_with(format_args!($($arg)*))
    };
}

/// How a vCPU leaves a scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// End the VM with this status (see [`crate::status`]).
    Exit(u32),
    /// Idle this vCPU for good (it halts, see [`crate::io::park`]); another
    /// vCPU ends the VM.
    Park,
}

/// An entry of the registry.
pub struct Scenario {
    /// The `scenario=` value that selects it.
    pub name: &'static str,
    /// One line for the list of scenarios.
    pub description: &'static str,
    /// Run on every vCPU.
    pub run: fn(&Env) -> Outcome,
}

/// Declares the scenario modules and lists them in [`SCENARIOS`], in order.
macro_rules! registry {
    ($($module:ident),* $(,)?) => {
        $(mod $module;)*
        /// Every scenario, in the order of the list printed for an unknown name.
        pub const SCENARIOS: &[Scenario] = &[$($module::SCENARIO),*];
    };
}

registry!(
    boot,
    fault,
    panic,
    spin,
    demo,
    range,
    full,
    alias,
    concurrent,
    unsupported,
    busy_requests,
    probe,
    bench,
    handoff,
    host_probe,
    fault_during_flush,
    exit_during_flush,
    no_driver_ok,
    reset_outstanding,
    bad_requests,
    full_advice,
);

/// The scenario called `name`.
pub fn find(name: &str) -> Option<&'static Scenario> {
    SCENARIOS.iter().find(|scenario| scenario.name == name)
}

/// Writes the names of the scenarios, comma-separated, then one line each with
/// its description.
pub fn write_list(console: &mut Console) -> core::fmt::Result {
    for (i, scenario) in SCENARIOS.iter().enumerate() {
        let separator = if i == 0 { "" } else { ", " };
        write!(console, "{separator}{}", scenario.name)?;
    }
    writeln!(console)?;
    for scenario in SCENARIOS {
        writeln!(
            console,
            "guest:   {:<13} {}",
            scenario.name, scenario.description
        )?;
    }
    Ok(())
}
