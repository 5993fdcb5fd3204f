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
use std::sync::atomic::Ordering;

use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::test_utils::*;
use super::{CacheFlushSettings, GuestExtent, MetricsSnapshot};
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
        m.received(),
        m.answered(),
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

/// The driver corrupts its available ring: a head outside the descriptor
/// table, then an index more than a ring ahead. Nothing panics, nothing is
/// flushed or written; the bad head is skipped and counted, the runaway
/// index sets DEVICE_NEEDS_RESET (the device serves nothing more), and the
/// device works again after a reset.
#[test]
fn hostile_available_ring() {
    let mem = test_memory();
    let mut h = TestHelper::running(&mem, 1);
    let idx_addr = GuestAddress(h.avail_addr(0).0 + 2);
    let used_idx = h.used_idx_addr(0);
    let before = h.snapshot();

    // Head 200 of a 16-entry table: popped, but no descriptor can be read
    // and no used entry can name it (used length 0 is impossible too).
    h.publish(0, 200);
    h.kick(0);
    assert_eq!(
        h.snapshot().since(&before),
        MetricsSnapshot {
            head_index_out_of_range: 1,
            ..Default::default()
        }
    );
    assert_eq!(mem.read_obj::<u16>(used_idx).unwrap(), 0);
    assert_eq!(status_of(&mut h, range_request(3, &[(0x1000, 64)])), OK);

    let before = h.snapshot();
    mem.write_obj(QUEUE_SIZE * 3, idx_addr).unwrap();
    h.kick(0);
    assert_eq!(
        h.snapshot().since(&before),
        MetricsSnapshot {
            avail_index_jumps: 1,
            ..Default::default()
        }
    );
    // Only the good request got a used entry.
    assert_eq!(mem.read_obj::<u16>(used_idx).unwrap(), 1);
    assert_ne!(h.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    assert_eq!(h.interrupt.config.load(Ordering::SeqCst), 1);
    // Served nothing more, even with a sane index, until the reset.
    mem.write_obj(2u16, idx_addr).unwrap();
    let r = h.add_request(0, range_request(4, &[(0x1000, 64)]));
    h.kick(0);
    assert_eq!(h.used_len(&r), None);

    h.activate(RANGE | FULL | V1);
    assert_eq!(h.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    assert_eq!(status_of(&mut h, range_request(5, &[(0x1000, 64)])), OK);
    assert_eq!(h.flush_calls().len(), 2);
    assert_fuzz_invariants(&h);
}

/// The driver lays queue 0's used ring over an indirect table, so that the
/// used ring's `idx` is the `flags` of the table's second descriptor, and
/// makes the same chain available three times. The device reads each chain
/// when it pops it, after answering the ones before, so its own used-ring
/// writes change what it reads: its second answer sets `idx` to 2, which is
/// VIRTQ_DESC_F_WRITE, and the third chain's status goes to the first byte of
/// a buffer the driver published as device-readable. That is the rule (the
/// first byte of the first non-empty writable descriptor of the chain the
/// device read); the fuzz harness used to judge status bytes against the
/// descriptors as they were before the event-loop run only, and reported
/// this as a write outside any used ring or status byte (`request_path`,
/// an indirect chain over queue 0's used ring in region 1, with more chains
/// available than published).
#[test]
fn used_ring_laid_over_an_indirect_table() {
    let mem = test_memory();
    let mut h = TestHelper::new(
        &mem,
        CacheFlushSettings {
            num_queues: 1,
            ..Default::default()
        },
    );
    assert!(h.negotiate(RANGE | V1));
    h.setup_queues();

    // Indirect table: [0] the header (a FLUSH_RANGE without segments),
    // [1] a 16-byte readable buffer, the end of the chain: no status byte.
    // The used ring starts 26 bytes in, so that its `idx` (offset 2) is
    // entry 1's `flags` (offset 16 + 12) and its first entry's `id` starts
    // at entry 1's `next`; the rest of the used ring lies after the table.
    let table = 0x8_0002;
    let used = table + 26;
    let header = h.alloc(16);
    mem.write_slice(&range_request(7, &[]), GuestAddress(header))
        .unwrap();
    let buffer = h.alloc(16);
    mem.write_slice(&[0xaa; 16], GuestAddress(buffer)).unwrap();
    for (i, desc) in [
        Descriptor::new(header, 16, VRING_DESC_F_NEXT as u16, 1),
        Descriptor::new(buffer, 16, 0, 0),
    ]
    .into_iter()
    .enumerate()
    {
        mem.write_obj(
            RawDescriptor::from(desc),
            GuestAddress(table + 16 * i as u64),
        )
        .unwrap();
    }
    h.write(VIRTIO_MMIO_QUEUE_SEL, 0);
    h.write(VIRTIO_MMIO_QUEUE_READY, 0);
    h.write(VIRTIO_MMIO_QUEUE_USED_LOW, used as u32);
    h.write(VIRTIO_MMIO_QUEUE_USED_HIGH, (used >> 32) as u32);
    h.write(VIRTIO_MMIO_QUEUE_READY, 1);
    h.driver_ok();
    assert_eq!(h.status(), 0xf, "the layout is valid");

    h.store_descriptor(0, 0, table, 32, VRING_DESC_F_INDIRECT as u16, 0);
    for _ in 0..3 {
        h.publish(0, 0);
    }
    let region0 = |mem: &GuestMemoryMmap| {
        let mut bytes = vec![0u8; REGION0_END as usize];
        mem.read_slice(&mut bytes, GuestAddress(0)).unwrap();
        bytes
    };
    let before_bytes = region0(&mem);
    let before = h.snapshot();
    h.kick(0);

    // 1: header + buffer, no writable byte: used length 0, and `idx` = 1
    //    makes entry 1 NEXT, its `next` the used entry's id (0).
    // 2: entries 0, 1, 0, 1: no writable byte either (and a loop); `idx` = 2
    //    makes entry 1 a writable buffer that ends the chain.
    // 3: the header, then the 16-byte writable buffer: a valid request
    //    without segments, OK (no pause), its status in the buffer's first
    //    byte.
    assert_eq!(
        h.snapshot().since(&before),
        MetricsSnapshot {
            requests_range: 1,
            requests_other: 2,
            unanswerable: 2,
            completed_ok: 1,
            ..Default::default()
        }
    );
    assert!(h.flush_calls().is_empty());
    let used_entry = |i: u64| -> (u32, u32) {
        let at = used + 4 + 8 * i;
        (
            mem.read_obj(GuestAddress(at)).unwrap(),
            mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    };
    assert_eq!(mem.read_obj::<u16>(GuestAddress(used + 2)).unwrap(), 3);
    assert_eq!(
        [used_entry(0), used_entry(1), used_entry(2)],
        [(0, 0), (0, 0), (0, 1)]
    );
    let mut status = [0u8; 16];
    mem.read_slice(&mut status, GuestAddress(buffer)).unwrap();
    assert_eq!(status[0], OK);
    assert_eq!(status[1..], [0xaa; 15]);
    // Nothing else was written: the used ring and that one byte.
    let used_end = used + 6 + 8 * u64::from(QUEUE_SIZE);
    for (addr, (old, new)) in before_bytes.iter().zip(region0(&mem)).enumerate() {
        let addr = addr as u64;
        if *old != new {
            assert!(
                (used..used_end).contains(&addr) || addr == buffer,
                "{addr:#x} written: {old:#x} -> {new:#x}"
            );
        }
    }
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
