//! `unsupported`: for a VMM started with `--no-full-flush`. Every vCPU's
//! `invalidate_all_caches()` must return `Unsupported` (the driver knows from
//! feature negotiation, so nothing reaches the device), and the range call
//! must still work. If FLUSH_ALL *is* offered, the scenario fails and says it
//! expects `--no-full-flush`.

use guest_driver::Error;

use super::{Env, Outcome, Scenario};
use crate::ring0::MAX_CPUS;
use crate::status;
use crate::sync::SpinMutex;

pub const SCENARIO: Scenario = Scenario {
    name: "unsupported",
    description: "run with --no-full-flush: the full flush is Unsupported, the range flush works",
    run,
};

/// Each vCPU's (full result, range result).
type Results = (Result<(), Error>, Result<(), Error>);
static RESULTS: SpinMutex<[Option<Results>; MAX_CPUS]> = SpinMutex::new([None; MAX_CPUS]);

/// Flushed by every vCPU: a few lines of the kernel's own data.
static BUFFER: [u8; 256] = [0; 256];

fn run(env: &Env) -> Outcome {
    let flush = match crate::flush::setup(env) {
        Ok(flush) => flush,
        Err(outcome) => return outcome,
    };
    let features = flush.features();
    if features.full() {
        return if env.is_first() {
            crate::fail!(
                "unsupported: FAILED: the device offers FLUSH_ALL; this scenario expects the VMM to run with --no-full-flush"
            )
        } else {
            Outcome::Park
        };
    }
    let full = flush.all();
    let range = flush.range(BUFFER.as_ptr() as u64, BUFFER.len() as u64);
    RESULTS.lock()[env.vcpu as usize] = Some((full, range));
    env.barrier();
    if !env.is_first() {
        return Outcome::Park;
    }

    crate::println!(
        "unsupported: features {:#x}: range {}, full {}",
        features.bits(),
        if features.range() { "offered" } else { "not offered" },
        "not offered"
    );
    let results = *RESULTS.lock();
    for (vcpu, result) in results.iter().enumerate().take(env.vcpu_count as usize) {
        let Some((full, range)) = result else {
            return crate::fail!("unsupported: FAILED: vcpu {vcpu} did not report");
        };
        let show = |r: &Result<(), Error>| match r {
            Ok(()) => "Ok",
            Err(Error::Unsupported) => "Unsupported",
            Err(_) => "another error",
        };
        crate::println!(
            "unsupported: vcpu {vcpu}: invalidate_all_caches() -> {}, invalidate_range_all_caches({} B) -> {}",
            show(full),
            BUFFER.len(),
            show(range)
        );
        if *full != Err(Error::Unsupported) {
            return crate::fail!("unsupported: FAILED: vcpu {vcpu}: the full flush gave {full:?}, expected Err(Unsupported)");
        }
        if let Err(e) = range {
            return crate::fail!("unsupported: FAILED: vcpu {vcpu}: the range flush failed: {e}");
        }
    }
    crate::println!("unsupported: as expected: no full flush without FLUSH_ALL, range flushes still work");
    Outcome::Exit(status::SUCCESS)
}
