//! The VMM's emulated devices. Nothing here knows about KVM: a device sees
//! guest memory (vm-memory), its queues (virtio-queue), register accesses from
//! a [`bus::Bus`], and the small traits through which the VMM serves it
//! ([`cache_flush::FlushBackend`], [`virtio::VirtioInterrupt`]).
//!
//! The data path of one flush request, in this crate:
//! guest write to QueueNotify → [`virtio::mmio`] transport (or an ioeventfd the
//! VMM registered for the same address) → [`cache_flush::queue_worker`] pops the
//! chain → [`cache_flush::request`] parses and validates it →
//! [`cache_flush::queue_worker`] hands the batch to the [`cache_flush::FlushBackend`]
//! (the VMM's flush engine) and writes the completions while every vCPU is
//! still paused.
#![deny(missing_docs)]

pub mod bus;
pub mod cache_flush;
pub mod legacy;
pub mod log_throttle;
pub mod virtio;
