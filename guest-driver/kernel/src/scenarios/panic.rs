//! `panic`: checks the panic path. vCPU 0 panics; the report
//! (`guest: panic on vcpu 0: ... at file:line`) must reach the UART and the VM
//! must end with [`crate::status::PANIC`].

use super::{Env, Outcome, Scenario};

pub const SCENARIO: Scenario = Scenario {
    name: "panic",
    description: "vCPU 0 panics: a panic report, then exit with failure",
    run,
};

fn run(env: &Env) -> Outcome {
    if !env.is_first() {
        return Outcome::Park;
    }
    panic!("deliberate panic (scenario=panic) with {} vCPUs", env.vcpu_count);
}
