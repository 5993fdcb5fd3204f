//! Statuses the kernel writes to the exit port ([`EXIT_PORT`]). The VMM turns 0
//! into exit code 0 and anything else into 1, and reports the status itself;
//! distinct values tell the failures apart in that report.
//!
//! [`EXIT_PORT`]: cache_flush_abi::boot::EXIT_PORT

/// The scenario passed.
pub const SUCCESS: u32 = 0;
/// The scenario ran and failed.
pub const SCENARIO_FAILED: u32 = 1;
/// A Rust panic (the message is on the UART).
pub const PANIC: u32 = 2;
/// A CPU exception (the report is on the UART).
pub const EXCEPTION: u32 = 3;
/// An exception while the previous one was being reported; written by ring 0.
pub const NESTED_EXCEPTION: u32 = 4;
/// The VMM started a vCPU with an index of `MAX_VCPUS` or more; written by
/// ring 0 before anything else.
pub const BAD_VCPU_INDEX: u32 = 5;
/// The boot information block is missing or has the wrong magic or version.
pub const BAD_BOOT_INFO: u32 = 6;
/// The command line names no scenario or an unknown one.
pub const UNKNOWN_SCENARIO: u32 = 7;
/// The cache-flush device is in the device table but its driver could not
/// initialise it (the message on the UART says why). A missing device is a
/// plain [`SCENARIO_FAILED`].
pub const DEVICE_INIT_FAILED: u32 = 8;
/// A `key=value` option of the command line has a value the scenario cannot
/// use (not a number, or out of range).
pub const BAD_OPTION: u32 = 9;
/// A measurement could not be made: the `probe` scenario's attempts ran out
/// before enough of them could be judged (in the others the comparison was
/// evicted too, as when the pause that serves a request moves the vCPU's
/// lines away), or its calibration could not tell a hit from a miss; the
/// flush could be neither confirmed nor refuted.
pub const INCONCLUSIVE: u32 = 10;
