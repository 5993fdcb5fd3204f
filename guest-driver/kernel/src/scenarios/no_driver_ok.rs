//! `no-driver-ok`: a driver that never finishes initialisation. With raw
//! register accesses vCPU 0 resets the device, sets ACKNOWLEDGE and DRIVER,
//! accepts VERSION_1 and FLUSH_RANGE, sets FEATURES_OK, sets up no queue,
//! writes QueueNotify 0 anyway, gives the host a moment, checks that Status
//! still reads ACKNOWLEDGE | DRIVER | FEATURES_OK (the notify was ignored,
//! the device did not give up), and exits 0. The VMM must keep running
//! through it and exit 0.

use super::bad_requests::raw_virtio::{Deadline, RawDevice, INITIALISED, RANGE, VERSION_1};
use super::{Env, Outcome, Scenario};
use crate::status;

pub const SCENARIO: Scenario = Scenario {
    name: "no-driver-ok",
    description: "FEATURES_OK but no queue and no DRIVER_OK, then QueueNotify 0: ignored; exit 0",
    run,
};

/// How long the host gets to react to the notify before the status check.
const SETTLE_MS: u64 = 200;

fn run(env: &Env) -> Outcome {
    if !env.is_first() {
        return Outcome::Park;
    }
    let device = match RawDevice::find(env.boot_info) {
        Ok(device) => device,
        Err(why) => return crate::fail!("no-driver-ok: FAILED: {why}"),
    };
    let accepted = match device.start(VERSION_1 | RANGE) {
        Ok(accepted) => accepted,
        Err(why) => return crate::fail!("no-driver-ok: FAILED: {why}"),
    };
    crate::println!(
        "no-driver-ok: status {:#x} (ACKNOWLEDGE | DRIVER | FEATURES_OK), features {accepted:#x}, no queue set up, no DRIVER_OK; writing QueueNotify 0 anyway",
        device.status()
    );
    device.notify(0);
    let settle = Deadline::after_ms(SETTLE_MS);
    while !settle.passed() {
        core::hint::spin_loop();
    }
    let after = device.status();
    if after != INITIALISED {
        return crate::fail!(
            "no-driver-ok: FAILED: status {after:#x} after the notify, expected {INITIALISED:#x} unchanged"
        );
    }
    crate::println!(
        "no-driver-ok: status still {after:#x}: the notify before DRIVER_OK was ignored"
    );
    Outcome::Exit(status::SUCCESS)
}
