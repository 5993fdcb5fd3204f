//! The contract between the host (the `vmm` and `devices` crates) and the guest
//! (the `guest-driver` crate and the bundled guest kernel).
//!
//! It is defined once, here, so that the two sides cannot drift apart. The
//! crate is `no_std`, has no dependencies and contains only plain `#[repr(C)]`
//! data and constants, so a freestanding guest can use it as easily as the host.
//!
//! * [`boot`]: how the VMM hands control to a guest kernel (see
//!   `resources/boot-protocol.md`).
//! * [`cache_flush`]: the paravirtual cache-flush device's wire format (see
//!   `resources/cache-flush-device.md`).
//! * [`host_probe`]: the mailbox protocol of the bundled guest's `host-probe`
//!   scenario (host-side Flush+Reload after a guest request).
//! * [`flush_reload`]: the verdict both Flush+Reload probes (guest and host)
//!   apply to their timings.
//!
//! All multi-byte fields are little-endian (the only byte order of x86-64).
#![no_std]
#![deny(missing_docs)]

pub mod boot;
pub mod cache_flush;
pub mod flush_reload;
pub mod host_probe;
