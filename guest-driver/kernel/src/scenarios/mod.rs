//! The scenarios the kernel can run, chosen with `scenario=NAME` on the
//! command line. Every vCPU runs the chosen scenario's function.
//!
//! To add one: write `src/scenarios/NAME.rs` with a
//! `pub const SCENARIO: Scenario`, and add `NAME` to the `registry!` list below.

use core::fmt::Write;

use cache_flush_abi::boot::BootInfo;

use crate::cmdline::Cmdline;
use crate::io::Console;
use crate::sync::SpinBarrier;

/// What a scenario's vCPU sees.
#[allow(dead_code, reason = "for the device scenarios to come")]
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
}

/// How a vCPU leaves a scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// End the VM with this status (see [`crate::status`]).
    Exit(u32),
    /// Spin forever; another vCPU ends the VM.
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

registry!(boot, fault, panic, spin);

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
            "guest:   {:<8} {}",
            scenario.name, scenario.description
        )?;
    }
    Ok(())
}
