//! Regression tests from fuzzing (`devices/fuzz`, see its `run.sh`).
//!
//! Each test pins, as a deterministic scenario that runs with
//! `cargo test`, a class of hostile input the fuzz targets explore, and
//! checks the same invariants the fuzz harness does: no panic, every extent
//! handed to the flush engine non-empty and inside one guest memory region,
//! every popped chain answered exactly once, nothing written outside the
//! status byte and the used ring, and a device that keeps serving afterwards.
//! A crash the fuzzers find gets its reproducer here too.

use cache_flush_abi::cache_flush::Status;
use virtio_bindings::virtio_mmio::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::test_utils::*;
use super::{GuestExtent, MetricsSnapshot};
use crate::bus::BusDevice;

const OK: u8 = Status::Ok as u8;
const INVALID: u8 = Status::Invalid as u8;
const OUT_OF_RANGE: u8 = Status::OutOfRange as u8;

/// Size of the second region in the layouts below.
const REGION_LEN: u64 = 0x10_0000;

/// The checks the fuzz harness makes after every event-loop run.
fn assert_fuzz_invariants(h: &TestHelper) {
    for batch in h.flush_calls() {
        assert!(!batch.is_empty(), "the engine got an empty batch");
        for extent in &batch.extents {
            assert!(extent.len > 0, "empty extent {extent:?}");
            let region = h
                .mem
                .find_region(extent.addr)
                .unwrap_or_else(|| panic!("{extent:?} starts outside guest memory"));
            let last = extent.addr.0.checked_add(extent.len - 1).expect("wraps");
            assert!(last <= region.last_addr().0, "{extent:?} leaves its region");
        }
    }
    let m = h.snapshot();
    assert_eq!(
        m.requests_range + m.requests_full + m.requests_other,
        m.completed_ok
            + m.rejected_invalid
            + m.rejected_unsupported
            + m.rejected_out_of_range
            + m.rejected_too_large
            + m.rejected_busy
            + m.completed_host_error
            + m.unanswerable
            + m.dropped_after_reset,
        "every popped chain is answered exactly once: {m:?}"
    );
}

/// Submits `readable` with a 1-byte status on queue 0 and returns the status.
fn status_of(h: &mut TestHelper, readable: Vec<u8>) -> u8 {
    let r = h.add_request(0, readable);
    h.kick(0);
    assert_eq!(h.used_len(&r), Some(1));
    h.status_byte(&r)
}

/// Region 0 as in the other tests, and a region whose last byte is the last
/// one vm-memory allows (`u64::MAX - 1`: a region's exclusive end must fit
/// in 64 bits).
#[test]
fn region_at_the_top_of_the_address_space() {
    let top = u64::MAX - REGION_LEN;
    let last = u64::MAX - 1;
    let mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), REGION0_END as usize),
        (GuestAddress(top), REGION_LEN as usize),
    ])
    .unwrap();
    let mut h = TestHelper::running(&mem, 1);

    // The request right below the region's very last byte, which holds the
    // status: the whole region and its last byte are served.
    let request = range_request(1, &[(top, REGION_LEN), (last, 1)]);
    let header_at = last - request.len() as u64;
    mem.write_slice(&request, GuestAddress(header_at)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(last)).unwrap();
    let r = h.add_chain(
        0,
        &[D::RawR(header_at, request.len() as u32), D::RawW(last, 1)],
    );
    h.kick(0);
    assert_eq!(h.used_len(&r), Some(1));
    assert_eq!(mem.read_obj::<u8>(GuestAddress(last)).unwrap(), OK);
    assert_eq!(
        h.flush_calls()[0].extents,
        vec![
            GuestExtent {
                addr: GuestAddress(top),
                len: REGION_LEN
            },
            GuestExtent {
                addr: GuestAddress(last),
                len: 1
            },
        ]
    );

    // Past the last byte: `addr + len` reaches 2^64 (overflow, INVALID) or
    // starts below the region (OUT_OF_RANGE); never an extent.
    for (segment, expected) in [
        ((last, 2), INVALID),
        ((u64::MAX, 1), INVALID),
        ((top, REGION_LEN + 1), INVALID),
        ((top - 1, 2), OUT_OF_RANGE),
    ] {
        assert_eq!(
            status_of(&mut h, range_request(2, &[segment])),
            expected,
            "{segment:x?}"
        );
    }
    assert_eq!(h.flush_calls().len(), 1);
    assert_fuzz_invariants(&h);
}

/// Two contiguous regions: a readable buffer may cross their boundary (it
/// is a byte stream), a segment may not (the engine maps one region per
/// extent).
#[test]
fn adjacent_regions() {
    let mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), REGION0_END as usize),
        (GuestAddress(REGION0_END), REGION_LEN as usize),
    ])
    .unwrap();
    let mut h = TestHelper::running(&mem, 1);

    let request = range_request(1, &[(REGION0_END - 64, 64), (REGION0_END, 64)]);
    let header_at = REGION0_END - 8;
    mem.write_slice(&request, GuestAddress(header_at)).unwrap();
    let r = h.add_chain(0, &[D::RawR(header_at, request.len() as u32), D::W(1)]);
    h.kick(0);
    assert_eq!(h.status_byte(&r), OK);
    assert_eq!(h.flush_calls()[0].extents.len(), 2);

    let before = h.snapshot();
    let across = range_request(1, &[(REGION0_END - 32, 64)]);
    assert_eq!(status_of(&mut h, across), OUT_OF_RANGE);
    assert_eq!(h.snapshot().since(&before).rejected_out_of_range, 1);
    assert_eq!(h.flush_calls().len(), 1);
    assert_fuzz_invariants(&h);
}

/// The driver corrupts its available ring: an index more than a ring ahead,
/// then a head outside the descriptor table. Nothing panics, nothing is
/// flushed or written, and the queue works again once the ring is sane.
#[test]
fn hostile_available_ring() {
    let mem = test_memory();
    let mut h = TestHelper::running(&mem, 1);
    let idx_addr = GuestAddress(h.avail_addr(0).0 + 2);
    let used_idx = h.used_idx_addr(0);

    mem.write_obj(QUEUE_SIZE + 1, idx_addr).unwrap();
    let before = h.snapshot();
    h.kick(0);
    assert_eq!(h.snapshot().since(&before), MetricsSnapshot::default());
    assert_eq!(mem.read_obj::<u16>(used_idx).unwrap(), 0);

    // Head 200 of a 16-entry table: popped, but no descriptor can be read
    // and no used entry can name it (used length 0 is impossible too).
    mem.write_obj(0u16, idx_addr).unwrap();
    h.publish(0, 200);
    h.kick(0);
    assert_eq!(
        h.snapshot().since(&before),
        MetricsSnapshot {
            requests_other: 1,
            unanswerable: 1,
            ..Default::default()
        }
    );
    assert_eq!(mem.read_obj::<u16>(used_idx).unwrap(), 0);

    assert_eq!(status_of(&mut h, range_request(3, &[(0x1000, 64)])), OK);
    assert_eq!(h.flush_calls().len(), 1);
    assert_fuzz_invariants(&h);
}

/// The `mmio_registers` target's rule, as a sweep: an access the transport
/// ignores (wrong width, misaligned, config space) changes nothing, whatever
/// its offset, and reads never change anything.
#[test]
fn ignored_register_accesses_change_nothing() {
    let mem = test_memory();
    let mut h = TestHelper::running(&mem, 2);
    let transport = h.transport.clone();
    let state = || {
        let t = transport.lock().unwrap();
        (t.status(), t.acked_features(), t.device().is_active())
    };
    let running = state();
    assert_eq!(running, (0xf, RANGE | FULL | V1, true));
    for offset in 0..0x200u64 {
        for width in [1usize, 2, 4, 8] {
            let mut data = [0xa5u8; 8];
            transport.lock().unwrap().read(offset, &mut data[..width]);
            let ignored = offset >= 0x100 || width != 4 || offset % 4 != 0;
            if !ignored {
                continue;
            }
            if offset < 0x100 {
                assert_eq!(
                    data[..width],
                    [0; 8][..width],
                    "{width}-byte read at {offset:#x}"
                );
            }
            transport.lock().unwrap().write(offset, &[0xff; 8][..width]);
            assert_eq!(state(), running, "{width}-byte write at {offset:#x}");
        }
    }
    // Reads of every register, including write-only ones, leave it running.
    for offset in (0..0x100u32).step_by(4) {
        let _ = h.read(offset);
    }
    assert_eq!(state(), running);
    assert_eq!(h.read(VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
    assert_eq!(status_of(&mut h, range_request(4, &[(0x1000, 64)])), OK);
    assert_fuzz_invariants(&h);
}
