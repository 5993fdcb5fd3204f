//! `fault`: checks the exception path. vCPU 0 reads guest address 0, which the
//! boot page tables leave unmapped; the page fault must be reported on the
//! UART and end the VM with [`status::EXCEPTION`].

use super::{Env, Outcome, Scenario};
use crate::status;

pub const SCENARIO: Scenario = Scenario {
    name: "fault",
    description: "vCPU 0 reads address 0x0: a #PF report, then exit with failure",
    run,
};

fn run(env: &Env) -> Outcome {
    if !env.is_first() {
        return Outcome::Park;
    }
    crate::println!("fault: reading address 0x0");
    let address: usize = 0;
    let value: u64;
    // SAFETY: a load from page 0, which is not mapped: it faults, and the
    // exception path never returns here. Assembly, so that the compiler can
    // neither remove nor reason about the null access.
    unsafe {
        core::arch::asm!("mov {value}, qword ptr [{address}]", address = in(reg) address, value = out(reg) value, options(nostack, readonly, preserves_flags));
    }
    crate::println!("fault: reading address 0x0 did not fault (read {value:#x})");
    Outcome::Exit(status::SCENARIO_FAILED)
}
