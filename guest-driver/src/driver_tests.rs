//! The whole driver against the fake device of [`crate::fake`].

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::vec;
use std::vec::Vec;

use cache_flush_abi::boot::{
    BootInfo, DeviceEntry, DeviceKind, RamRegion, BOOT_INFO_MAGIC, BOOT_INFO_VERSION,
};
use cache_flush_abi::cache_flush::{self, RequestType, Segment, Status};

use crate::fake::{
    DeviceHandle, DeviceSetup, FakeDevice, FakeRam, ListTranslator, PageTables, FULL, RANGE, V1,
};
use crate::mmio::status as dev_status;
use crate::{
    find_device, CacheFlushDriver, Error, IdentityMap, Options, PageTableWalker, PhysMem, Translate,
};

/// Where tests put the queue memory in the fake RAM.
const QMEM_GPA: u64 = 0x10_0000;
const RAM_SIZE: usize = 1 << 21;

/// Virtual pages of the default test address space and their physical pages:
/// 0 and 1 physically contiguous, 2 elsewhere, 3 contiguous with 1 physically
/// but not virtually next to it, 4 unmapped, 5 mapped.
const VA: u64 = 0x4000_0000;
fn translator() -> ListTranslator {
    ListTranslator::pages(&[
        (VA, 0x20_0000),
        (VA + 0x1000, 0x20_1000),
        (VA + 0x2000, 0x30_0000),
        (VA + 0x3000, 0x20_2000),
        (VA + 0x5000, 0x40_0000),
    ])
}

type Driver<T = ListTranslator> = CacheFlushDriver<T, FakeDevice>;

fn start_with<T: Translate>(
    ram: &'static FakeRam,
    setup: DeviceSetup,
    translator: T,
    options: Options,
) -> (Result<Driver<T>, Error>, DeviceHandle) {
    let (device, handle) = FakeDevice::start(ram, setup);
    let memory = ram.queue_memory(QMEM_GPA, options.memory_size());
    (
        CacheFlushDriver::new(device, translator, memory, options),
        handle,
    )
}

fn start(setup: DeviceSetup) -> (Driver, DeviceHandle) {
    let (driver, handle) = start_with(
        FakeRam::leak(RAM_SIZE),
        setup,
        translator(),
        Options::new(4),
    );
    (driver.expect("driver init"), handle)
}

fn seg(addr: u64, len: u64) -> Segment {
    Segment { addr, len }
}

fn range_segments(handle: &DeviceHandle) -> Vec<Vec<Segment>> {
    handle
        .requests()
        .into_iter()
        .map(|r| {
            assert_eq!(r.header.request_type, RequestType::FlushRange as u32);
            assert_eq!(r.header.flags, 0);
            r.segments
        })
        .collect()
}

fn finish(driver: Driver<impl Translate>, handle: DeviceHandle) {
    drop(driver);
    handle.finish();
}

#[test]
fn init_negotiates_features_and_sets_up_queues() {
    let setup = DeviceSetup::default();
    let config = setup.config;
    let (driver, handle) = start(setup);
    // The unknown bit 40 is not accepted.
    assert_eq!(driver.features().bits(), V1 | RANGE | FULL);
    assert!(driver.features().range() && driver.features().full());
    assert_eq!(handle.driver_features(), V1 | RANGE | FULL);
    assert_eq!(
        handle.status(),
        dev_status::ACKNOWLEDGE
            | dev_status::DRIVER
            | dev_status::FEATURES_OK
            | dev_status::DRIVER_OK
    );
    assert_eq!(*driver.config(), config);
    assert_eq!(driver.num_queues(), 4);
    assert_eq!(handle.queues(), vec![(1, u32::from(crate::QUEUE_SIZE)); 4]);
    assert_eq!(driver.max_segments_per_request(), 8);
    finish(driver, handle);
}

#[test]
fn sets_up_min_of_requested_and_offered_queues() {
    let ram = FakeRam::leak(RAM_SIZE);
    let (driver, handle) = start_with(ram, DeviceSetup::default(), translator(), Options::new(2));
    let driver = driver.unwrap();
    assert_eq!(driver.num_queues(), 2);
    assert_eq!(handle.queues(), vec![(1, 8), (1, 8), (0, 0), (0, 0)]);
    finish(driver, handle);

    // More requested than offered: the device's count. 0 counts as 1.
    for (asked, got) in [(32, 4), (0, 1)] {
        let ram = FakeRam::leak(RAM_SIZE);
        let (driver, handle) = start_with(
            ram,
            DeviceSetup::default(),
            translator(),
            Options::new(asked),
        );
        assert_eq!(driver.as_ref().unwrap().num_queues(), got);
        finish(driver.unwrap(), handle);
    }
}

#[test]
fn queue_size_fits_the_device_maximum() {
    let ram = FakeRam::leak(RAM_SIZE);
    let setup = DeviceSetup {
        queue_num_max: 5,
        ..Default::default()
    };
    let (driver, handle) = start_with(ram, setup, translator(), Options::new(1));
    let driver = driver.unwrap();
    assert_eq!(handle.queues()[0], (1, 4));
    // Requests still work with the smaller ring (and wrap around it).
    for _ in 0..10 {
        driver.invalidate_range_all_caches(VA, 64).unwrap();
    }
    assert_eq!(handle.requests().len(), 10);
    finish(driver, handle);

    let ram = FakeRam::leak(RAM_SIZE);
    let setup = DeviceSetup {
        queue_num_max: 1,
        ..Default::default()
    };
    let (driver, handle) = start_with(ram, setup, translator(), Options::new(1));
    assert_eq!(driver.unwrap_err(), Error::QueueUnavailable { queue: 0 });
    assert_ne!(handle.status() & dev_status::FAILED, 0);
    handle.finish();
}

#[test]
fn identity_checks() {
    for (setup, error) in [
        (
            DeviceSetup {
                magic: 0x1234,
                ..Default::default()
            },
            Error::BadMagic(0x1234),
        ),
        (
            DeviceSetup {
                version: 1,
                ..Default::default()
            },
            Error::BadVersion(1),
        ),
        (
            DeviceSetup {
                device_id: 4,
                ..Default::default()
            },
            Error::BadDeviceId(4),
        ),
    ] {
        let (driver, handle) = start_with(
            FakeRam::leak(RAM_SIZE),
            setup,
            translator(),
            Options::new(1),
        );
        assert_eq!(driver.unwrap_err(), error);
        // Refused before touching the device.
        assert_eq!(handle.status(), 0);
        handle.finish();
    }
}

#[test]
fn feature_negotiation_failures() {
    let setup = DeviceSetup {
        refuse_features: true,
        ..Default::default()
    };
    let (driver, handle) = start_with(
        FakeRam::leak(RAM_SIZE),
        setup,
        translator(),
        Options::new(1),
    );
    assert_eq!(
        driver.unwrap_err(),
        Error::FeaturesRefused {
            accepted: V1 | RANGE | FULL
        }
    );
    let status = handle.status();
    assert_eq!(status & dev_status::FEATURES_OK, 0);
    assert_ne!(status & dev_status::FAILED, 0);
    handle.finish();

    let setup = DeviceSetup {
        offered: RANGE | FULL,
        ..Default::default()
    };
    let (driver, handle) = start_with(
        FakeRam::leak(RAM_SIZE),
        setup,
        translator(),
        Options::new(1),
    );
    assert_eq!(
        driver.unwrap_err(),
        Error::NoVersion1 {
            offered: RANGE | FULL
        }
    );
    assert_ne!(handle.status() & dev_status::FAILED, 0);
    handle.finish();
}

#[test]
fn unusable_config_is_refused() {
    let base = DeviceSetup::default();
    for config in [
        cache_flush::Config {
            cache_line_size: 48,
            ..base.config
        },
        cache_flush::Config {
            cache_line_size: 0,
            ..base.config
        },
        cache_flush::Config {
            max_segments: 0,
            ..base.config
        },
        cache_flush::Config {
            max_bytes: 32,
            ..base.config
        },
        cache_flush::Config {
            num_queues: 0,
            ..base.config
        },
    ] {
        let setup = DeviceSetup {
            config,
            ..base.clone()
        };
        let (driver, handle) = start_with(
            FakeRam::leak(RAM_SIZE),
            setup,
            translator(),
            Options::new(1),
        );
        assert_eq!(driver.unwrap_err(), Error::BadConfig, "{config:?}");
        handle.finish();
    }
}

#[test]
fn queue_memory_must_fit_and_be_aligned() {
    let options = Options::new(2);
    let ram = FakeRam::leak(RAM_SIZE);
    let (device, handle) = FakeDevice::start(ram, DeviceSetup::default());
    let needed = options.memory_size();
    let memory = ram.queue_memory(QMEM_GPA, needed - 1);
    assert_eq!(
        CacheFlushDriver::new(device, translator(), memory, options).unwrap_err(),
        Error::BadQueueMemory {
            needed,
            provided: needed - 1
        }
    );
    handle.finish();

    let (device, handle) = FakeDevice::start(ram, DeviceSetup::default());
    let memory = ram.queue_memory(QMEM_GPA + 8, needed);
    assert!(matches!(
        CacheFlushDriver::new(device, translator(), memory, options),
        Err(Error::BadQueueMemory { .. })
    ));
    handle.finish();
}

#[test]
fn range_requests_carry_exact_segments() {
    let (driver, handle) = start(DeviceSetup::default());
    // Inside one line.
    driver.invalidate_range_all_caches(VA + 0x10, 0x30).unwrap();
    // Across a line boundary.
    driver
        .invalidate_range_all_caches(VA + 0xff0, 0x20)
        .unwrap();
    // Pages 0..4: 0 and 1 coalesce; 3 is contiguous with 1 physically but
    // comes after 2 virtually, so it is its own segment.
    driver.invalidate_range_all_caches(VA, 0x4000).unwrap();
    // Unaligned ends across pages 1 and 2.
    driver
        .invalidate_range_all_caches(VA + 0x1fc1, 0x80)
        .unwrap();
    assert_eq!(
        range_segments(&handle),
        vec![
            vec![seg(0x20_0000, 0x40)],
            vec![seg(0x20_0fc0, 0x80)],
            vec![
                seg(0x20_0000, 0x2000),
                seg(0x30_0000, 0x1000),
                seg(0x20_2000, 0x1000)
            ],
            vec![seg(0x20_1fc0, 0x40), seg(0x30_0000, 0x80)],
        ]
    );
    assert_eq!(handle.notifies(), 4);
    finish(driver, handle);
}

#[test]
fn range_is_split_by_device_limits() {
    let mut setup = DeviceSetup::default();
    setup.config.max_segments = 2;
    setup.config.max_bytes = 0x1800 + 0x10; // rounded down to 0x1800 by the driver
    let (driver, handle) = start(setup);
    assert_eq!(driver.max_segments_per_request(), 2);
    driver.invalidate_range_all_caches(VA, 0x4000).unwrap();
    assert_eq!(
        range_segments(&handle),
        vec![
            vec![seg(0x20_0000, 0x1800)],
            vec![seg(0x20_1800, 0x800), seg(0x30_0000, 0x1000)],
            vec![seg(0x20_2000, 0x1000)],
        ]
    );
    // Each request has its own tag.
    let tags: Vec<u64> = handle.requests().iter().map(|r| r.header.tag).collect();
    assert!(tags.windows(2).all(|w| w[0] != w[1]), "{tags:?}");
    finish(driver, handle);
}

#[test]
fn request_buffer_capacity_caps_segments() {
    // The device allows 8 segments per request; the buffer holds 1.
    let ram = FakeRam::leak(RAM_SIZE);
    let options = Options {
        queues: 1,
        segments_per_request: 1,
    };
    let (driver, handle) = start_with(ram, DeviceSetup::default(), translator(), options);
    let driver = driver.unwrap();
    assert_eq!(driver.max_segments_per_request(), 1);
    driver.invalidate_range_all_caches(VA, 0x4000).unwrap();
    assert_eq!(
        range_segments(&handle),
        vec![
            vec![seg(0x20_0000, 0x2000)],
            vec![seg(0x30_0000, 0x1000)],
            vec![seg(0x20_2000, 0x1000)],
        ]
    );
    finish(driver, handle);
}

#[test]
fn zero_length_unmapped_and_overflow_touch_nothing() {
    let (driver, handle) = start(DeviceSetup::default());
    assert_eq!(driver.invalidate_range_all_caches(VA, 0), Ok(()));
    assert_eq!(driver.invalidate_range_all_caches(0xdead_0000, 0), Ok(()));
    // Page 4 is unmapped: nothing of pages 0..4 may be sent either.
    assert_eq!(
        driver.invalidate_range_all_caches(VA + 0x100, 0x5000),
        Err(Error::Unmapped { va: VA + 0x4000 })
    );
    assert_eq!(
        driver
            .for_vcpu(1)
            .invalidate_range_all_caches(VA + 0x4010, 1),
        Err(Error::Unmapped { va: VA + 0x4010 })
    );
    assert_eq!(
        driver.invalidate_range_all_caches(u64::MAX - 0xf, 0x20),
        Err(Error::AddressOverflow)
    );
    assert_eq!(handle.notifies(), 0);
    assert!(handle.requests().is_empty());
    finish(driver, handle);
}

#[test]
fn full_flush_is_one_request_without_segments() {
    let (driver, handle) = start(DeviceSetup::default());
    driver.invalidate_all_caches().unwrap();
    driver.for_vcpu(6).invalidate_all_caches().unwrap();
    let requests = handle.requests();
    assert_eq!(requests.len(), 2);
    for r in &requests {
        assert_eq!(r.header.request_type, RequestType::FlushAll as u32);
        assert_eq!(r.header.flags, 0);
        assert!(r.segments.is_empty());
    }
    assert_eq!(requests[1].queue, 6 % 4);
    finish(driver, handle);
}

#[test]
fn full_flush_unsupported_when_not_offered() {
    let setup = DeviceSetup {
        offered: V1 | RANGE,
        ..Default::default()
    };
    let (driver, handle) = start(setup);
    assert!(!driver.features().full());
    assert_eq!(driver.invalidate_all_caches(), Err(Error::Unsupported));
    assert_eq!(
        driver.for_vcpu(0).invalidate_all_caches(),
        Err(Error::Unsupported)
    );
    assert!(!driver.full_flush_recommended(u64::MAX));
    // Ranges still work.
    driver.invalidate_range_all_caches(VA, 1).unwrap();
    assert_eq!(handle.notifies(), 1);
    finish(driver, handle);
}

#[test]
fn range_unsupported_when_not_offered() {
    let setup = DeviceSetup {
        offered: V1 | FULL,
        ..Default::default()
    };
    let (driver, handle) = start(setup);
    assert_eq!(
        driver.invalidate_range_all_caches(VA, 1),
        Err(Error::Unsupported)
    );
    assert_eq!(driver.invalidate_range_all_caches(VA, 0), Ok(()));
    assert_eq!(driver.max_segments_per_request(), 0);
    driver.invalidate_all_caches().unwrap();
    assert_eq!(handle.notifies(), 1);
    finish(driver, handle);
}

#[test]
fn full_flush_recommendation_follows_break_even() {
    let (driver, handle) = start(DeviceSetup::default());
    let even = driver.config().full_break_even_bytes;
    assert!(!driver.full_flush_recommended(even - 1));
    assert!(driver.full_flush_recommended(even));
    finish(driver, handle);
}

#[test]
fn the_full_flush_advice_follows_the_devices_refreshed_figures() {
    let (driver, handle) = start(DeviceSetup::default());
    let even = driver.config().full_break_even_bytes;
    assert!(driver.full_flush_recommended(even));
    // The host's resident set grew: a full flush now costs more, so the
    // break-even moved up; the driver sees it after its next full flush.
    handle.set_full_estimate(9_000_000, 4 * even);
    assert!(
        driver.full_flush_recommended(even),
        "not re-read before a full flush"
    );
    driver.invalidate_all_caches().unwrap();
    assert_eq!(driver.full_flush_estimate(), (9_000_000, 4 * even));
    assert!(!driver.full_flush_recommended(even));
    assert!(driver.full_flush_recommended(4 * even));
    finish(driver, handle);
}

#[test]
fn status_values_map_to_errors() {
    let (driver, handle) = start(DeviceSetup::default());
    let status = Arc::new(AtomicU8::new(0));
    let s = Arc::clone(&status);
    handle.set_responder(move |_| Some(s.load(Ordering::SeqCst)));
    let cases = [
        (0, Ok(())),
        (1, Err(Error::Status(Status::Invalid))),
        (2, Err(Error::Status(Status::Unsupported))),
        (3, Err(Error::Status(Status::OutOfRange))),
        (4, Err(Error::Status(Status::TooLarge))),
        (5, Err(Error::Status(Status::Busy))),
        (6, Err(Error::Status(Status::HostError))),
        (7, Err(Error::UnknownStatus(7))),
        (0xff, Err(Error::UnknownStatus(0xff))),
    ];
    for (raw, expected) in cases {
        status.store(raw, Ordering::SeqCst);
        assert_eq!(
            driver.invalidate_range_all_caches(VA, 64),
            expected,
            "range, status {raw}"
        );
        assert_eq!(
            driver.invalidate_all_caches(),
            expected,
            "full, status {raw}"
        );
        assert_eq!(
            driver.for_vcpu(3).invalidate_all_caches(),
            expected,
            "pinned, status {raw}"
        );
    }
    assert!(Error::Status(Status::Busy).is_retryable());
    assert!(!Error::Status(Status::HostError).is_retryable());
    // An error status does not break the driver.
    status.store(0, Ordering::SeqCst);
    driver.invalidate_all_caches().unwrap();
    finish(driver, handle);
}

#[test]
fn failed_request_stops_a_split_range() {
    let mut setup = DeviceSetup::default();
    setup.config.max_segments = 1;
    let (driver, handle) = start(setup);
    let mut n = 0;
    handle.set_responder(move |_| {
        n += 1;
        Some(if n == 2 { Status::Busy as u8 } else { 0 })
    });
    // Three requests needed; the second is refused, the third never sent.
    let result = driver.invalidate_range_all_caches(VA, 0x4000);
    assert_eq!(result, Err(Error::Status(Status::Busy)));
    assert!(result.unwrap_err().is_retryable());
    assert_eq!(handle.requests().len(), 2);
    finish(driver, handle);
}

#[test]
fn device_needing_reset_ends_the_wait() {
    let (driver, handle) = start(DeviceSetup::default());
    handle.set_responder(|_| None);
    assert_eq!(driver.invalidate_all_caches(), Err(Error::DeviceNeedsReset));
    // From now on nothing is submitted.
    let notifies = handle.notifies();
    assert_eq!(
        driver.invalidate_range_all_caches(VA, 64),
        Err(Error::DeviceNeedsReset)
    );
    assert_eq!(
        driver.for_vcpu(2).invalidate_all_caches(),
        Err(Error::DeviceNeedsReset)
    );
    assert_eq!(handle.notifies(), notifies);
    finish(driver, handle);
}

#[test]
fn device_reset_under_a_request_ends_the_wait() {
    let (driver, handle) = start(DeviceSetup::default());
    handle.reset_on_dropped_request();
    handle.set_responder(|_| None);
    assert_eq!(driver.invalidate_all_caches(), Err(Error::DeviceReset));
    // The driver stops using the device: nothing more is submitted.
    let notifies = handle.notifies();
    assert_eq!(
        driver.invalidate_range_all_caches(VA, 64),
        Err(Error::DeviceNeedsReset)
    );
    assert_eq!(handle.notifies(), notifies);
    drop(driver);
    handle.finish();
}

#[test]
fn drop_resets_the_device() {
    let (driver, handle) = start(DeviceSetup::default());
    assert_ne!(handle.status(), 0);
    drop(driver);
    assert_eq!(handle.status(), 0);
    assert!(handle.queues().iter().all(|&(ready, _)| ready == 0));
    handle.finish();
}

/// Each thread flushes its own addresses; the device answers BUSY for some
/// addresses, so every thread can check it got the completion of its own
/// request and not a neighbour's.
fn concurrent_callers(pinned: bool) {
    const THREADS: u64 = 8;
    const ROUNDS: u64 = 150;
    const PA: u64 = 0x8000_0000;
    let translator = ListTranslator::new(&[(VA, 0x1000_0000, PA)]);
    let ram = FakeRam::leak(RAM_SIZE);
    let (driver, handle) = start_with(ram, DeviceSetup::default(), translator, Options::new(4));
    let driver = driver.unwrap();
    let busy = |addr: u64| (addr >> 12) % 5 == 3;
    handle.set_responder(move |r| {
        let addr = r.segments.first().map_or(0, |s| s.addr);
        Some(if busy(addr) { Status::Busy as u8 } else { 0 })
    });
    let offset = |t: u64, i: u64| t * 0x10_0000 + i * 0x1000 + (i % 7) * 64;
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let driver = &driver;
            s.spawn(move || {
                for i in 0..ROUNDS {
                    let len = 64 * (1 + i % 3);
                    let result = if pinned {
                        driver
                            .for_vcpu(t as usize)
                            .invalidate_range_all_caches(VA + offset(t, i), len)
                    } else {
                        driver.invalidate_range_all_caches(VA + offset(t, i), len)
                    };
                    let expected = if busy(PA + offset(t, i)) {
                        Err(Error::Status(Status::Busy))
                    } else {
                        Ok(())
                    };
                    assert_eq!(result, expected, "thread {t} round {i}");
                }
            });
        }
    });
    let mut requests = handle.requests();
    assert_eq!(requests.len() as u64, THREADS * ROUNDS);
    let mut used_queues = [false; 4];
    for r in &requests {
        let addr = r.segments[0].addr - PA;
        let t = addr / 0x10_0000;
        used_queues[usize::from(r.queue)] = true;
        if pinned {
            assert_eq!(u64::from(r.queue), t % 4);
        }
    }
    assert!(
        used_queues.iter().all(|&u| u),
        "every queue served requests"
    );
    let mut expected: Vec<Vec<Segment>> = (0..THREADS)
        .flat_map(|t| (0..ROUNDS).map(move |i| vec![seg(PA + offset(t, i), 64 * (1 + i % 3))]))
        .collect();
    requests.sort_by_key(|r| r.segments[0].addr);
    expected.sort_by_key(|s| s[0].addr);
    assert_eq!(
        requests.into_iter().map(|r| r.segments).collect::<Vec<_>>(),
        expected
    );
    finish(driver, handle);
}

#[test]
fn concurrent_callers_on_any_free_queue() {
    concurrent_callers(false);
}

#[test]
fn concurrent_callers_on_pinned_queues() {
    concurrent_callers(true);
}

#[test]
fn range_through_the_page_table_walker() {
    let ram = FakeRam::leak(RAM_SIZE);
    let mut pt = PageTables::new(ram);
    // A 2 MiB page, then two 4 KiB pages, the second an alias of the first.
    pt.map_2m_flags(0x20_0000, 0x60_0000, 0);
    pt.map_4k(0x40_0000, 0x9_3000);
    pt.map_4k(0x40_1000, 0x9_3000);
    let walker = PageTableWalker::new(ram, pt.root());
    let (driver, handle) = start_with(ram, DeviceSetup::default(), walker, Options::new(1));
    let driver = driver.unwrap();
    // The last line of the large page, both small pages.
    driver
        .invalidate_range_all_caches(0x3f_ffc0, 0x40 + 0x2000)
        .unwrap();
    // The aliases overlap physically, so they merge into one segment.
    assert_eq!(
        range_segments(&handle),
        vec![vec![seg(0x7f_ffc0, 0x40), seg(0x9_3000, 0x1000)]]
    );
    // Not mapped at the PT level.
    assert_eq!(
        driver.invalidate_range_all_caches(0x40_1f00, 0x200),
        Err(Error::Unmapped { va: 0x40_2000 })
    );
    assert_eq!(handle.requests().len(), 1);
    finish(driver, handle);
}

fn boot_info(devices: &[DeviceEntry]) -> BootInfo {
    let mut info = BootInfo {
        magic: BOOT_INFO_MAGIC,
        version: BOOT_INFO_VERSION,
        vcpu_count: 1,
        memory_size: RAM_SIZE as u64,
        identity_map_end: RAM_SIZE as u64,
        ram_count: 1,
        device_count: devices.len() as u32,
        ram: [RamRegion::default(); cache_flush_abi::boot::MAX_RAM_REGIONS],
        devices: [DeviceEntry::default(); cache_flush_abi::boot::MAX_DEVICES],
        cmdline_len: 0,
        reserved: 0,
        cmdline: [0; cache_flush_abi::boot::CMDLINE_CAPACITY],
    };
    info.ram[0] = RamRegion {
        base: 0,
        size: RAM_SIZE as u64,
    };
    info.devices[..devices.len()].copy_from_slice(devices);
    info
}

fn mmio_entry(device_id: u32, base: u64) -> DeviceEntry {
    DeviceEntry {
        kind: DeviceKind::VirtioMmio as u32,
        device_id,
        base,
        size: 0x1000,
    }
}

#[test]
fn find_device_picks_the_cache_flush_entry() {
    let serial = DeviceEntry {
        kind: DeviceKind::SerialPort as u32,
        device_id: 0,
        base: 0x3f8,
        size: 8,
    };
    // A port entry that happens to carry the ID is not it, nor is another
    // virtio device, nor a window too small for the config space.
    let decoy = DeviceEntry {
        kind: DeviceKind::ExitPort as u32,
        device_id: cache_flush::DEVICE_ID,
        base: 0x500,
        size: 4,
    };
    let small = DeviceEntry {
        size: 0x100,
        ..mmio_entry(cache_flush::DEVICE_ID, 0xd000_0000)
    };
    let wanted = mmio_entry(cache_flush::DEVICE_ID, 0xd000_2000);
    let info = boot_info(&[serial, decoy, mmio_entry(2, 0xd000_1000), small, wanted]);
    assert_eq!(find_device(&info), Ok(wanted));
    assert_eq!(
        find_device(&boot_info(&[serial])),
        Err(Error::DeviceNotFound)
    );
    // Entries past device_count do not count.
    let mut info = boot_info(&[serial, wanted]);
    info.device_count = 1;
    assert_eq!(find_device(&info), Err(Error::DeviceNotFound));
    let mut info = boot_info(&[wanted]);
    info.magic = 0;
    assert_eq!(find_device(&info), Err(Error::BadBootInfo));
}

#[test]
fn probe_checks_the_real_register_window() {
    // The MMIO window is plain fake RAM here: enough for the identity checks
    // that come before the first register write.
    const WINDOW: u64 = 0x8000;
    let ram = FakeRam::leak(RAM_SIZE);
    let info = boot_info(&[mmio_entry(cache_flush::DEVICE_ID, WINDOW)]);
    let probe = |magic: u32, version: u32, id: u32| {
        ram.write_u32(WINDOW, magic);
        ram.write_u32(WINDOW + 4, version);
        ram.write_u32(WINDOW + 8, id);
        let memory = ram.queue_memory(QMEM_GPA, Options::new(1).memory_size());
        CacheFlushDriver::probe(&info, ram, translator(), memory, Options::new(1)).map(drop)
    };
    assert_eq!(
        probe(0x7472_6976 + 1, 2, cache_flush::DEVICE_ID),
        Err(Error::BadMagic(0x7472_6977))
    );
    assert_eq!(
        probe(0x7472_6976, 1, cache_flush::DEVICE_ID),
        Err(Error::BadVersion(1))
    );
    assert_eq!(probe(0x7472_6976, 2, 1), Err(Error::BadDeviceId(1)));

    let far = boot_info(&[mmio_entry(cache_flush::DEVICE_ID, 0xd000_0000)]);
    let memory = ram.queue_memory(QMEM_GPA, Options::new(1).memory_size());
    assert_eq!(
        CacheFlushDriver::probe(&far, ram, translator(), memory, Options::new(1)).map(drop),
        Err(Error::WindowUnmapped { base: 0xd000_0000 })
    );
}

#[test]
fn identity_map_bounds() {
    // SAFETY: only `map` is called; nothing is dereferenced.
    let map = unsafe { IdentityMap::new(0x1_0000) };
    assert_eq!(map.map(0x8000, 8).map(|p| p.as_ptr() as u64), Some(0x8000));
    assert_eq!(map.map(0xfff8, 8).map(|p| p.as_ptr() as u64), Some(0xfff8));
    assert!(map.map(0xfffc, 8).is_none());
    assert!(map.map(u64::MAX, 8).is_none());
    assert!(map.map(0, 8).is_none());
}
