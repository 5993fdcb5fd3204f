//! The request path: guest memory with a hole (or adjacent regions, or a
//! region at the top of the address space) filled from the input, the device
//! initialised through its registers with rings wherever the input puts
//! them, request chains of every shape, then notifies, event-loop runs,
//! resets and stores, with a flush engine that checks every extent it gets.
//! See `devices_fuzz` for the invariants.
#![no_main]

use devices_fuzz::{run_request_path, RequestPathInput};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: RequestPathInput| {
    run_request_path(&input);
});
