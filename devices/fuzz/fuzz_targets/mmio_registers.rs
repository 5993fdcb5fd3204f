//! The register window: any sequence of 1/2/4/8-byte reads and writes at any
//! offset of an `MmioTransport<CacheFlushDevice>`, mixed with standard
//! initialisations, requests, notifies and event-loop runs. Nothing may
//! panic, and the transport's state machine invariants must hold after every
//! step. See `devices_fuzz` for the invariants.
#![no_main]

use devices_fuzz::{run_mmio_registers, MmioInput};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: MmioInput| {
    run_mmio_registers(&input);
});
