//! The cache-flush virtio device: what it offers (features, queues,
//! configuration space) and the state it shares with its queue worker
//! ([`super::queue_worker::QueueWorker`]).
//!
//! Two threads touch a running device: vCPU threads through the transport
//! (register accesses: activation, reset) and the event-loop thread through
//! the queue worker (popping and completing requests). They meet in one mutex,
//! `Shared::state`, held only for short, non-blocking sections — never
//! while the flush engine pauses the vCPUs (see the queue worker).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use cache_flush_abi::cache_flush::{
    Config, DEVICE_ID, F_FULL, F_RANGE, F_VERSION_1, MAX_QUEUES, QUEUE_SIZE_MAX,
};
use log::info;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::metrics::CacheFlushMetrics;
use super::queue_worker::QueueWorker;
use super::rate_limit::TokenBucket;
use super::request::RequestLimits;
use super::FlushBackend;
use crate::log_throttle::LogThrottle;
use crate::virtio::{ActivateError, VirtioDevice, VirtioInterrupt};

/// The largest `max_segments` a device accepts: the device holds a request's
/// segments in host memory while it waits for the flush, so the guest must not
/// be able to make that arbitrarily large.
pub const MAX_SEGMENTS_LIMIT: u32 = 1 << 16;

/// Default `full_per_sec_limit`: FLUSH_ALL requests per second. Each pauses
/// the whole VM and evicts the caches of the cores it runs on (a few ms for a
/// guest with tens of MiB resident, measured by `vmm bench`), so 100 a second
/// keeps a guest that asks for nothing else below roughly a fifth of its own
/// time paused and bounds what it can do to its neighbours' caches, while no
/// driver that flushes for a reason (a memory hand-off, a DMA buffer) comes
/// near it. 0 turns the limit off.
pub const DEFAULT_FULL_PER_SEC_LIMIT: u64 = 100;

/// Default `range_bytes_per_sec_limit`: 4 GiB of FLUSH_RANGE a second, a
/// fifth of one host core at the ~20 GB/s CLFLUSHOPT rate measured on these
/// hosts, and four times the default `max_bytes`, so every legal request
/// passes when the bucket is full.
pub const DEFAULT_RANGE_BYTES_PER_SEC_LIMIT: u64 = 4 << 30;

/// Size of the configuration space on the wire.
pub const CONFIG_SIZE: usize = core::mem::size_of::<Config>();

/// How the VMM configures the device. Everything but `num_queues` and
/// `full_flush` ends up in the configuration space the driver reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheFlushSettings {
    /// Number of virtqueues (the VMM passes its vCPU count), 1..=MAX_QUEUES.
    pub num_queues: u16,
    /// Offer F_FULL (FLUSH_ALL). The VMM turns it off with `--no-full-flush`
    /// and on hosts that are not x86-64, where no instruction writes back and
    /// invalidates every cache.
    pub full_flush: bool,
    /// Cache-line size in bytes (a power of two).
    pub cache_line_size: u32,
    /// The most segments one request may carry (1..=[`MAX_SEGMENTS_LIMIT`]).
    pub max_segments: u32,
    /// The most bytes one request may cover (at least 1).
    pub max_bytes: u64,
    /// Measured cost of a FLUSH_ALL in nanoseconds (0 = not measured).
    pub full_flush_cost_ns: u64,
    /// Range size above which FLUSH_ALL is expected to be cheaper (0 = not
    /// known).
    pub full_break_even_bytes: u64,
    /// FLUSH_ALL requests per second the device serves (0 = unlimited).
    pub full_per_sec_limit: u64,
    /// FLUSH_RANGE bytes per second the device serves (0 = unlimited).
    pub range_bytes_per_sec_limit: u64,
}

impl Default for CacheFlushSettings {
    fn default() -> Self {
        Self {
            num_queues: 1,
            full_flush: cfg!(target_arch = "x86_64"),
            cache_line_size: 64,
            max_segments: 256,
            max_bytes: 1 << 30,
            full_flush_cost_ns: 0,
            full_break_even_bytes: 0,
            full_per_sec_limit: DEFAULT_FULL_PER_SEC_LIMIT,
            range_bytes_per_sec_limit: DEFAULT_RANGE_BYTES_PER_SEC_LIMIT,
        }
    }
}

/// Invalid [`CacheFlushSettings`], or a host resource that could not be
/// created.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// `num_queues` is 0 or above MAX_QUEUES.
    #[error("{0} queues requested; the device offers 1..={MAX_QUEUES}")]
    QueueCount(u16),
    /// `cache_line_size` is not a power of two.
    #[error("cache line size {0} is not a power of two")]
    CacheLineSize(u32),
    /// `max_segments` is 0 or above [`MAX_SEGMENTS_LIMIT`].
    #[error("max_segments {0} outside 1..={MAX_SEGMENTS_LIMIT}")]
    MaxSegments(u32),
    /// `max_bytes` is 0.
    #[error("max_bytes must be at least 1")]
    MaxBytes,
    /// A queue eventfd could not be created.
    #[error("cannot create a queue eventfd")]
    EventFd(#[source] std::io::Error),
}

/// The state shared by the device (transport side) and its queue worker.
pub(crate) struct Shared {
    /// Everything that changes at activation and reset.
    pub(crate) state: Mutex<DeviceState>,
    /// One eventfd per queue (non-blocking, so the queue worker can drain them).
    pub(crate) queue_events: Vec<EventFd>,
    pub(crate) metrics: Arc<CacheFlushMetrics>,
    pub(crate) settings: CacheFlushSettings,
    /// Budget for the log lines the guest can trigger (rejections, notifies
    /// while idle, resets during a flush).
    pub(crate) log_throttle: LogThrottle,
    /// Set by the queue worker when a queue became unusable (its available index
    /// ran away); shown as DEVICE_NEEDS_RESET until the driver resets.
    pub(crate) needs_reset: AtomicBool,
}

impl Shared {
    /// Locks the state. A panic elsewhere while holding it leaves plain data
    /// behind, and the VMM must keep serving the guest: recover the guard.
    pub(crate) fn lock(&self) -> MutexGuard<'_, DeviceState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The mutable part of the device.
pub(crate) struct DeviceState {
    /// Bumped on every reset; work popped under one generation is only
    /// completed if the generation is unchanged when the flush returns.
    pub(crate) generation: u64,
    /// Present between DRIVER_OK and reset.
    pub(crate) active: Option<Active>,
}

/// A running device.
pub(crate) struct Active {
    pub(crate) memory: GuestMemoryMmap,
    pub(crate) queues: Vec<Queue>,
    pub(crate) interrupt: Arc<dyn VirtioInterrupt>,
    pub(crate) limits: RequestLimits,
    pub(crate) full_limiter: TokenBucket,
    pub(crate) range_limiter: TokenBucket,
}

/// The paravirtual cache-flush device.
pub struct CacheFlushDevice {
    shared: Arc<Shared>,
    avail_features: u64,
    queue_max_sizes: Vec<u16>,
    config: Config,
    full_estimate: Arc<FullFlushEstimate>,
}

impl CacheFlushDevice {
    /// A device configured by `settings`, with `settings.num_queues`
    /// queues of up to QUEUE_SIZE_MAX entries each.
    pub fn new(settings: CacheFlushSettings) -> Result<Self, DeviceError> {
        if settings.num_queues == 0 || settings.num_queues > MAX_QUEUES {
            return Err(DeviceError::QueueCount(settings.num_queues));
        }
        if !settings.cache_line_size.is_power_of_two() {
            return Err(DeviceError::CacheLineSize(settings.cache_line_size));
        }
        if settings.max_segments == 0 || settings.max_segments > MAX_SEGMENTS_LIMIT {
            return Err(DeviceError::MaxSegments(settings.max_segments));
        }
        if settings.max_bytes == 0 {
            return Err(DeviceError::MaxBytes);
        }
        let queue_events = (0..settings.num_queues)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(DeviceError::EventFd)?;

        let mut avail_features = (1u64 << F_RANGE) | (1u64 << F_VERSION_1);
        if settings.full_flush {
            avail_features |= 1u64 << F_FULL;
        }
        let config = Config {
            cache_line_size: settings.cache_line_size,
            num_queues: u32::from(settings.num_queues),
            max_segments: settings.max_segments,
            reserved0: 0,
            max_bytes: settings.max_bytes,
            full_flush_cost_ns: settings.full_flush_cost_ns,
            full_break_even_bytes: settings.full_break_even_bytes,
            full_per_sec_limit: settings.full_per_sec_limit,
            range_bytes_per_sec_limit: settings.range_bytes_per_sec_limit,
        };
        Ok(Self {
            queue_max_sizes: vec![QUEUE_SIZE_MAX; usize::from(settings.num_queues)],
            shared: Arc::new(Shared {
                state: Mutex::new(DeviceState {
                    generation: 0,
                    active: None,
                }),
                queue_events,
                metrics: Arc::new(CacheFlushMetrics::default()),
                settings,
                log_throttle: LogThrottle::default(),
                needs_reset: AtomicBool::new(false),
            }),
            avail_features,
            config,
            full_estimate: Arc::new(FullFlushEstimate {
                figures: Mutex::new((config.full_flush_cost_ns, config.full_break_even_bytes)),
                generation: Default::default(),
            }),
        })
    }

    /// The configuration space the driver reads.
    pub fn config(&self) -> Config {
        self.config
    }

    /// The device's counters (shared; keep the `Arc` to read them later).
    pub fn metrics(&self) -> Arc<CacheFlushMetrics> {
        self.shared.metrics.clone()
    }

    /// True while the device serves requests: between a successful
    /// DRIVER_OK and the next reset, unless it has set DEVICE_NEEDS_RESET.
    pub fn is_active(&self) -> bool {
        self.shared.lock().active.is_some() && !self.needs_reset()
    }

    /// The published full-flush estimate, for the VMM to refresh.
    pub fn full_flush_estimate(&self) -> Arc<FullFlushEstimate> {
        self.full_estimate.clone()
    }

    /// The queue worker to add to the VMM's event manager (create one per
    /// device). `flusher` is the flush engine; it is called on the thread
    /// that serves a notify (the event loop's, or the notifying vCPU's if
    /// the VMM uses [`QueueWorker::serve_notify`]), never with a
    /// device lock held.
    pub fn queue_worker(&self, flusher: Box<dyn FlushBackend>) -> QueueWorker {
        QueueWorker::new(self.shared.clone(), flusher)
    }

    #[cfg(test)]
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

/// The device's published estimate of a full flush (`full_flush_cost_ns`,
/// `full_break_even_bytes`), which goes stale as the guest touches memory:
/// the flush engine refreshes it from real full flushes, and every change
/// bumps ConfigGeneration, so a driver that re-reads the configuration (the
/// bundled driver does after each full flush) follows it.
#[derive(Debug, Default)]
pub struct FullFlushEstimate {
    figures: Mutex<(u64, u64)>,
    generation: std::sync::atomic::AtomicU32,
}

impl FullFlushEstimate {
    /// Publishes new figures (ns, bytes); a change bumps the generation.
    pub fn update(&self, cost_ns: u64, break_even_bytes: u64) {
        let mut figures = self.figures.lock().unwrap_or_else(|p| p.into_inner());
        if *figures != (cost_ns, break_even_bytes) {
            *figures = (cost_ns, break_even_bytes);
            self.generation
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// The current figures: (cost in ns, break-even in bytes).
    pub fn get(&self) -> (u64, u64) {
        *self.figures.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many times the figures changed.
    pub fn generation(&self) -> u32 {
        self.generation.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// The configuration space in wire order (little-endian `#[repr(C)]`
/// layout of [`Config`]).
fn config_bytes(config: &Config) -> [u8; CONFIG_SIZE] {
    let mut out = [0u8; CONFIG_SIZE];
    let words32 = [
        config.cache_line_size,
        config.num_queues,
        config.max_segments,
        config.reserved0,
    ];
    let words64 = [
        config.max_bytes,
        config.full_flush_cost_ns,
        config.full_break_even_bytes,
        config.full_per_sec_limit,
        config.range_bytes_per_sec_limit,
    ];
    let (head, tail) = out.split_at_mut(16);
    for (chunk, word) in head.chunks_exact_mut(4).zip(words32) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    for (chunk, word) in tail.chunks_exact_mut(8).zip(words64) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    out
}

impl VirtioDevice for CacheFlushDevice {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.shared.queue_events
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn config_generation(&self) -> u32 {
        self.full_estimate.generation()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) -> bool {
        let (full_flush_cost_ns, full_break_even_bytes) = self.full_estimate.get();
        let bytes = config_bytes(&Config {
            full_flush_cost_ns,
            full_break_even_bytes,
            ..self.config
        });
        let src = usize::try_from(offset)
            .ok()
            .and_then(|start| Some(start..start.checked_add(data.len())?))
            .and_then(|range| bytes.get(range));
        match src {
            Some(src) => {
                data.copy_from_slice(src);
                true
            }
            None => false,
        }
    }

    fn activate(
        &mut self,
        memory: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        acked_features: u64,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        if queues.len() != self.queue_max_sizes.len() {
            return Err(ActivateError::QueueCount {
                expected: self.queue_max_sizes.len(),
                got: queues.len(),
            });
        }
        let settings = &self.shared.settings;
        let limits = RequestLimits {
            max_segments: settings.max_segments,
            max_bytes: settings.max_bytes,
            range: acked_features & (1 << F_RANGE) != 0,
            full: acked_features & (1 << F_FULL) != 0,
        };
        let now = Instant::now();
        let active = Active {
            memory,
            queues,
            interrupt,
            limits,
            full_limiter: TokenBucket::new(settings.full_per_sec_limit, now),
            range_limiter: TokenBucket::new(settings.range_bytes_per_sec_limit, now),
        };
        let mut state = self.shared.lock();
        if state.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        state.active = Some(active);
        info!(
            "cache-flush: active with {} queues, range {}, full {}",
            self.queue_max_sizes.len(),
            limits.range,
            limits.full
        );
        Ok(())
    }

    fn reset(&mut self) {
        let mut state = self.shared.lock();
        // Requests popped before the reset may still be in the flush engine;
        // the new generation makes their completion a no-op, so no guest
        // memory is written for them after this returns.
        state.generation = state.generation.wrapping_add(1);
        state.active = None;
        self.shared.needs_reset.store(false, Ordering::SeqCst);
    }

    fn needs_reset(&self) -> bool {
        self.shared.needs_reset.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_layout_matches_the_abi() {
        let config = Config {
            cache_line_size: 0x11,
            num_queues: 0x22,
            max_segments: 0x33,
            reserved0: 0,
            max_bytes: 0x4444,
            full_flush_cost_ns: 0x5555,
            full_break_even_bytes: 0x6666,
            full_per_sec_limit: 0x7777,
            range_bytes_per_sec_limit: 0x8888,
        };
        let bytes = config_bytes(&config);
        let u32_at = |off: usize| u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap());
        let u64_at = |off: usize| u64::from_le_bytes(bytes[off..off + 8].try_into().unwrap());
        assert_eq!(u32_at(core::mem::offset_of!(Config, cache_line_size)), 0x11);
        assert_eq!(u32_at(core::mem::offset_of!(Config, num_queues)), 0x22);
        assert_eq!(u32_at(core::mem::offset_of!(Config, max_segments)), 0x33);
        assert_eq!(u64_at(core::mem::offset_of!(Config, max_bytes)), 0x4444);
        assert_eq!(
            u64_at(core::mem::offset_of!(Config, full_flush_cost_ns)),
            0x5555
        );
        assert_eq!(
            u64_at(core::mem::offset_of!(Config, full_break_even_bytes)),
            0x6666
        );
        assert_eq!(
            u64_at(core::mem::offset_of!(Config, full_per_sec_limit)),
            0x7777
        );
        assert_eq!(
            u64_at(core::mem::offset_of!(Config, range_bytes_per_sec_limit)),
            0x8888
        );
    }

    #[test]
    fn a_refreshed_full_flush_estimate_is_read_back_under_a_new_generation() {
        let device = CacheFlushDevice::new(CacheFlushSettings {
            full_flush_cost_ns: 10,
            full_break_even_bytes: 20,
            ..Default::default()
        })
        .unwrap();
        let read_u64 = |offset: usize| {
            let mut bytes = [0u8; 8];
            assert!(device.read_config(offset as u64, &mut bytes));
            u64::from_le_bytes(bytes)
        };
        let cost = core::mem::offset_of!(Config, full_flush_cost_ns);
        let even = core::mem::offset_of!(Config, full_break_even_bytes);
        assert_eq!((read_u64(cost), read_u64(even)), (10, 20));
        assert_eq!(device.config_generation(), 0);
        let estimate = device.full_flush_estimate();
        estimate.update(10, 20);
        assert_eq!(
            device.config_generation(),
            0,
            "no change, no new generation"
        );
        estimate.update(3000, 9 << 20);
        assert_eq!((read_u64(cost), read_u64(even)), (3000, 9 << 20));
        assert_eq!(device.config_generation(), 1);
    }

    #[test]
    fn features_and_queues_follow_settings() {
        let device = CacheFlushDevice::new(CacheFlushSettings {
            num_queues: 4,
            full_flush: true,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(device.device_type(), 0xEFBF);
        assert_eq!(device.avail_features(), 1 | 2 | (1 << 32));
        assert_eq!(device.queue_max_sizes(), &[256; 4]);
        assert_eq!(device.queue_events().len(), 4);
        assert_eq!(device.config().num_queues, 4);

        let device = CacheFlushDevice::new(CacheFlushSettings {
            full_flush: false,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(device.avail_features(), 1 | (1 << 32));
    }

    #[test]
    fn settings_are_validated() {
        let bad = |s: CacheFlushSettings| CacheFlushDevice::new(s).err().map(|e| e.to_string());
        let d = CacheFlushSettings::default();
        assert!(bad(CacheFlushSettings {
            num_queues: 0,
            ..d.clone()
        })
        .is_some());
        assert!(bad(CacheFlushSettings {
            num_queues: 33,
            ..d.clone()
        })
        .is_some());
        assert!(bad(CacheFlushSettings {
            num_queues: 32,
            ..d.clone()
        })
        .is_none());
        assert!(bad(CacheFlushSettings {
            cache_line_size: 48,
            ..d.clone()
        })
        .is_some());
        assert!(bad(CacheFlushSettings {
            max_segments: 0,
            ..d.clone()
        })
        .is_some());
        assert!(bad(CacheFlushSettings {
            max_segments: (1 << 16) + 1,
            ..d.clone()
        })
        .is_some());
        assert!(bad(CacheFlushSettings {
            max_bytes: 0,
            ..d.clone()
        })
        .is_some());
    }

    #[test]
    fn default_settings() {
        let d = CacheFlushSettings::default();
        assert_eq!(d.cache_line_size, 64);
        assert_eq!(d.max_segments, 256);
        assert_eq!(d.max_bytes, 1 << 30);
        assert_eq!(d.full_flush, cfg!(target_arch = "x86_64"));
        // Rate limits are on by default, and every legal request fits the
        // range bucket.
        assert_eq!(d.full_per_sec_limit, 100);
        assert_eq!(d.range_bytes_per_sec_limit, 4 << 30);
        assert!(d.range_bytes_per_sec_limit >= d.max_bytes);
    }

    #[test]
    fn config_reads_are_bounds_checked() {
        let device = CacheFlushDevice::new(CacheFlushSettings::default()).unwrap();
        let mut b = [0u8; 4];
        assert!(device.read_config(0, &mut b));
        assert_eq!(u32::from_le_bytes(b), 64);
        assert!(device.read_config(52, &mut b));
        assert!(!device.read_config(53, &mut b));
        assert!(!device.read_config(u64::MAX, &mut b));
        let mut b8 = [0u8; 8];
        assert!(device.read_config(16, &mut b8));
        assert_eq!(u64::from_le_bytes(b8), 1 << 30);
    }
}
