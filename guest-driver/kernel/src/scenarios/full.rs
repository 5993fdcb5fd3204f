//! `full`: `invalidate_all_caches()` succeeds. vCPU 0 makes `rounds` full
//! flushes alone (option `rounds=N`, default 3), printing the cycles of each;
//! then every vCPU makes `rounds` at the same time, on its own queue. Fails
//! if the device does not offer FLUSH_ALL (the VMM was started with
//! `--no-full-flush`) or if any call returns an error.

use guest_driver::Error;

use super::{Env, Outcome, Scenario};
use crate::cpu::timed;
use crate::ring0::MAX_CPUS;
use crate::status;
use crate::sync::SpinMutex;

pub const SCENARIO: Scenario = Scenario {
    name: "full",
    description: "full flushes from vCPU 0, then from every vCPU at once (needs FLUSH_ALL)",
    run,
};

/// One vCPU's part of the concurrent round.
#[derive(Clone, Copy)]
struct Report {
    ok: u64,
    cycles: u64,
    error: Option<Error>,
}

static REPORTS: SpinMutex<[Report; MAX_CPUS]> = SpinMutex::new(
    [Report {
        ok: 0,
        cycles: 0,
        error: None,
    }; MAX_CPUS],
);

fn run(env: &Env) -> Outcome {
    let rounds = match env.option_u64("rounds", 3) {
        Ok(0) => return env.bad_option(format_args!("rounds=0: at least one round")),
        Ok(rounds) => rounds,
        Err(outcome) => return outcome,
    };
    let flush = match crate::flush::setup(env) {
        Ok(flush) => flush,
        Err(outcome) => return outcome,
    };
    if !flush.features().full() {
        return if env.is_first() {
            crate::fail!("full: the device does not offer FLUSH_ALL (is the VMM running with --no-full-flush?)")
        } else {
            Outcome::Park
        };
    }

    if env.is_first() {
        for round in 1..=rounds {
            let (result, cycles) = timed(|| flush.all());
            match result {
                Ok(()) => crate::println!("full: vcpu 0 alone, flush {round}: Ok in {cycles} cycles"),
                Err(e) => return crate::fail!("full: FAILED: vcpu 0 alone, flush {round}: {e}"),
            }
        }
    }
    env.barrier();

    let mut report = Report {
        ok: 0,
        cycles: 0,
        error: None,
    };
    for _ in 0..rounds {
        let (result, cycles) = timed(|| flush.all());
        match result {
            Ok(()) => {
                report.ok += 1;
                report.cycles += cycles;
            }
            Err(e) => {
                report.error = Some(e);
                break;
            }
        }
    }
    REPORTS.lock()[env.vcpu as usize] = report;
    env.barrier();
    if !env.is_first() {
        return Outcome::Park;
    }

    let reports = *REPORTS.lock();
    let mut failed = false;
    for (vcpu, report) in reports.iter().enumerate().take(env.vcpu_count as usize) {
        let mean = report.cycles / report.ok.max(1);
        match report.error {
            None => crate::println!(
                "full: vcpu {vcpu}, all at once: {} flushes Ok, mean {mean} cycles",
                report.ok
            ),
            Some(e) => {
                failed = true;
                crate::println!("full: vcpu {vcpu}, all at once: flush {} failed: {e}", report.ok + 1);
            }
        }
    }
    if failed {
        return crate::fail!("full: FAILED: a concurrent full flush returned an error (see above)");
    }
    crate::println!(
        "full: {} full flushes Ok ({rounds} from vcpu 0 alone, {rounds} from each of {} vCPUs at once)",
        rounds * (1 + u64::from(env.vcpu_count)),
        env.vcpu_count
    );
    Outcome::Exit(status::SUCCESS)
}
