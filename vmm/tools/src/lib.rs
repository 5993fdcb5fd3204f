//! Tools built on the `vmm` library and kept out of it, so that an embedder
//! links the VMM and nothing else:
//!
//! * [`bench`](mod@bench): `vmm-tools bench`, the benchmark of the cache-flush service.
//! * [`reload_probe`]: Flush+Reload from the host through its own mappings
//!   of guest memory (`vmm-tools host-probe`, the host half of the bundled
//!   guest's `host-probe` scenario).
//!
//! Both use only the library's public API (`Vm`, `VmConfig`, `RunningVm`,
//! the flush engine's statistics and observer, `SharedAlias`).
#![deny(missing_docs)]

mod affinity;
pub mod bench;
pub mod reload_probe;
