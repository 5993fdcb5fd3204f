//! `boot`: the smallest end-to-end check. Every vCPU reaches ring 3 and
//! reports, all meet at a barrier, vCPU 0 ends the VM with success.

use super::{Env, Outcome, Scenario};
use crate::status;

pub const SCENARIO: Scenario = Scenario {
    name: "boot",
    description: "every vCPU reports, all meet at a barrier, vCPU 0 exits 0",
    run,
};

fn run(env: &Env) -> Outcome {
    crate::println!("vcpu {} of {} reporting", env.vcpu, env.vcpu_count);
    env.barrier();
    if env.is_first() {
        crate::println!("boot: all {} vCPUs reported", env.vcpu_count);
        Outcome::Exit(status::SUCCESS)
    } else {
        Outcome::Park
    }
}
