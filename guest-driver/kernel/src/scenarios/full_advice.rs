//! `full-advice`: the device's full-flush figures follow the guest's
//! resident memory. vCPU 0 makes a full flush and reads the break-even the
//! driver now holds, touches `touch=MIB` MiB more of scratch RAM (default
//! 64), makes another full flush and reads again. The host refreshes the
//! figures from every real full flush (and bumps ConfigGeneration); the
//! driver re-reads them on the first query after each of its full flushes.
//! Passes when the break-even grew, and prints how the driver's advice for
//! a range of the old break-even's size changed.

use super::{Env, Outcome, Scenario};
use crate::status;

pub const SCENARIO: Scenario = Scenario {
    name: "full-advice",
    description: "the FLUSH_ALL break-even follows the resident set (touch=MIB, default 64)",
    run,
};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

fn run(env: &Env) -> Outcome {
    let touch = match env.option_u64("touch", 64) {
        Ok(n) => n,
        Err(outcome) => return outcome,
    };
    let flush = match crate::flush::setup(env) {
        Ok(flush) => flush,
        Err(outcome) => return outcome,
    };
    if !env.is_first() {
        return Outcome::Park;
    }
    if !flush.features().full() {
        return crate::fail!("full-advice: FAILED: the device does not offer FLUSH_ALL");
    }
    let base = match crate::scratch::Scratch::new(env.boot_info).take(touch * MIB, PAGE) {
        Ok(base) => base,
        Err(e) => return crate::fail!("full-advice: {e}"),
    };
    let driver = flush.driver();
    if let Err(e) = flush.all() {
        return crate::fail!("full-advice: FAILED: first full flush: {e}");
    }
    let (cost_before, even_before) = driver.full_flush_estimate();
    let advice_before = driver.full_flush_recommended(even_before);
    for page in 0..touch * MIB / PAGE {
        // SAFETY: inside the scratch slice taken above (identity-mapped RAM
        // no one else uses).
        unsafe { ((base + page * PAGE) as *mut u64).write_volatile(page) };
    }
    if let Err(e) = flush.all() {
        return crate::fail!("full-advice: FAILED: second full flush: {e}");
    }
    let (cost_after, even_after) = driver.full_flush_estimate();
    let advice_after = driver.full_flush_recommended(even_before);
    crate::println!(
        "full-advice: before touching {touch} MiB: full flush {cost_before} ns, break-even {even_before} bytes (FLUSH_ALL advised for that size: {advice_before})"
    );
    crate::println!(
        "full-advice: after: full flush {cost_after} ns, break-even {even_after} bytes (FLUSH_ALL advised for {even_before} bytes: {advice_after})"
    );
    if even_after <= even_before {
        return crate::fail!(
            "full-advice: FAILED: the break-even did not grow with {touch} MiB more resident memory"
        );
    }
    Outcome::Exit(status::SUCCESS)
}
