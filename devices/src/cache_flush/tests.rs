//! End-to-end tests of the cache-flush device: a test driver configures the
//! device through the virtio-mmio registers, puts requests on
//! `MockSplitQueue` rings in guest memory with a hole, and the real queue worker
//! runs on an event manager with a fake flush engine.
//!
//! Test names starting with `rule_` are the rows of
//! `resources/validation-table.md`.

use std::sync::{Arc, Mutex};

use cache_flush_abi::cache_flush::Status;
use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};

use super::queue_worker::MAX_ROUNDS_PER_EVENT;
use super::test_utils::*;
use super::{BatchRequest, CacheFlushSettings, FlushBatch, GuestExtent, MetricsSnapshot};
use crate::bus::BusDevice;

const OK: u8 = Status::Ok as u8;
const INVALID: u8 = Status::Invalid as u8;
const UNSUPPORTED: u8 = Status::Unsupported as u8;
const OUT_OF_RANGE: u8 = Status::OutOfRange as u8;
const TOO_LARGE: u8 = Status::TooLarge as u8;
const BUSY: u8 = Status::Busy as u8;
const HOST_ERROR: u8 = Status::HostError as u8;

fn settings() -> CacheFlushSettings {
    CacheFlushSettings {
        full_flush: true,
        ..Default::default()
    }
}

/// Submits one chain on queue 0, runs the loop, returns (status byte or None
/// if the chain has no writable byte, used length).
fn submit(h: &mut TestHelper, descs: &[D]) -> (Option<u8>, Option<u32>) {
    let r = h.add_chain(0, descs);
    h.kick(0);
    let status = r.status_addr.map(|_| h.status_byte(&r));
    (status, h.used_len(&r))
}

/// Submits `readable` with a 1-byte status; returns the status byte, asserting
/// the used length is 1.
fn status_of(h: &mut TestHelper, readable: Vec<u8>) -> u8 {
    let (status, used) = submit(h, &[D::R(readable), D::W(1)]);
    assert_eq!(used, Some(1), "an answered request has used length 1");
    status.unwrap()
}

fn one_range() -> Vec<u8> {
    range_request(7, &[(0x1000, 64)])
}

/// Asserts what a rejected request did to the metrics, and that nothing was
/// flushed.
fn assert_rejected(h: &TestHelper, before: &MetricsSnapshot, expected: MetricsSnapshot) {
    assert_eq!(h.snapshot().since(before), expected);
    assert!(
        h.flush_calls().is_empty(),
        "a rejected request is never flushed"
    );
}

// ---------------------------------------------------------------- rules --

#[test]
fn rule_no_writable_descriptor() {
    let mem = test_memory();
    let mut h = TestHelper::running(&mem, 1);
    let before = h.snapshot();
    let (status, used) = submit(&mut h, &[D::R(one_range())]);
    assert_eq!((status, used), (None, Some(0)));
    assert_eq!(take_rules(), ["no-status-byte"]);
    assert_rejected(
        &h,
        &before,
        MetricsSnapshot {
            requests_other: 1,
            unanswerable: 1,
            ..Default::default()
        },
    );
}

#[test]
fn rule_writable_part_empty() {
    let mem = test_memory();
    let mut h = TestHelper::running(&mem, 1);
    let (status, used) = submit(&mut h, &[D::R(one_range()), D::W(0)]);
    assert_eq!((status, used), (None, Some(0)));
    assert_eq!(take_rules(), ["no-status-byte"]);
    assert_eq!(h.snapshot().unanswerable, 1);
}

#[test]
fn rule_status_byte_outside_memory() {
    let mem = test_memory();
    let mut h = TestHelper::running(&mem, 1);
    // In the hole between the regions.
    let r = h.add_chain(0, &[D::R(one_range()), D::RawW(REGION0_END + 0x100, 1)]);
    h.kick(0);
    assert_eq!(h.used_len(&r), Some(0));
    assert_eq!(take_rules(), ["status-outside-memory"]);
    assert_eq!(h.snapshot().unanswerable, 1);
    assert!(h.flush_calls().is_empty());
}

#[test]
fn rule_chain_too_short_for_header() {
    let mem = test_memory();
    let mut h = TestHelper::running(&mem, 1);
    let before = h.snapshot();
    assert_eq!(status_of(&mut h, one_range()[..15].to_vec()), INVALID);
    assert_eq!(status_of(&mut h, Vec::new()), INVALID);
    assert_eq!(take_rules(), ["too-short", "too-short"]);
    assert_rejected(
        &h,
        &before,
        MetricsSnapshot {
            requests_other: 2,
            rejected_invalid: 2,
            ..Default::default()
        },
    );
}

#[test]
fn rule_payload_not_whole_segments() {
    let mem = test_memory();
    let mut h = TestHelper::running(&mem, 1);
    let mut request = one_range();
    request.extend_from_slice(&[0; 8]);
    assert_eq!(status_of(&mut h, request), INVALID);
    let mut request = header(1, 0, 1);
    request.push(0);
    assert_eq!(status_of(&mut h, request), INVALID);
    assert_eq!(
        take_rules(),
        ["payload-not-segments", "payload-not-segments"]
    );
    assert_eq!(h.snapshot().requests_range, 2);
}

#[test]
fn rule_writable_before_readable() {
    let mem = test_memory();
    let mut h = TestHelper::running(&mem, 1);
    let (status, used) = submit(&mut h, &[D::W(1), D::R(one_range())]);
    assert_eq!((status, used), (Some(INVALID), Some(1)));
    // Also with readable parts on both sides.
    let (status, _) = submit(
        &mut h,
        &[D::R(header(1, 0, 1)), D::W(1), D::R(segment(0x1000, 64))],
    );
    assert_eq!(status, Some(INVALID));
    assert_eq!(
        take_rules(),
        ["writable-before-readable", "writable-before-readable"]
    );
    assert!(h.flush_calls().is_empty());
}

#[test]
fn rule_looping_chain() {
    let mem = test_memory();
    let mut h = TestHelper::running(&mem, 1);
    let hdr = h.alloc(32);
    mem.write_slice(&one_range(), GuestAddress(hdr)).unwrap();
    let status = h.alloc(1);
    let (next, write) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16);
    // 0 -> 1 -> 0 -> ...: the chain iterator's TTL (the queue size) ends it.
    h.store_descriptor(0, 0, hdr, 32, next, 1);
    h.store_descriptor(0, 1, status, 1, next | write, 0);
    h.publish(0, 0);
    h.kick(0);
    assert_eq!(h.used(0), vec![(0, 1)]);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(status)).unwrap(), INVALID);
    assert_eq!(take_rules(), ["broken-chain"]);
    assert_eq!(h.snapshot().rejected_invalid, 1);
    assert!(h.flush_calls().is_empty());
}

#[test]
fn rule_chain_links_outside_table() {
    let mem = test_memory();
    let mut h = TestHelper::running(&mem, 1);
    let hdr = h.alloc(32);
    mem.write_slice(&one_range(), GuestAddress(hdr)).unwrap();
    let status = h.alloc(1);
    let (next, write) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16);
    h.store_descriptor(0, 0, hdr, 32, next, 1);
    h.store_descriptor(0, 1, status, 1, next | write, 100);
    h.publish(0, 0);
    h.kick(0);
    assert_eq!(h.used(0), vec![(0, 1)]);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(status)).unwrap(), INVALID);
    assert_eq!(take_rules(), ["broken-chain"]);
}

#[test]
fn rule_chain_too_long() {
    let mem = test_memory();
    let mut h = TestHelper::running(&mem, 1);
    let status = h.alloc(1);
    let byte = h.alloc(1);
    // An indirect table may hold up to 65535 descriptors; the device stops
    // reading after MAX_CHAIN_DESCRIPTORS.
    let mut entries = vec![(status, 1, true)];
    entries.extend((0..super::request::MAX_CHAIN_DESCRIPTORS).map(|_| (byte, 1, false)));
    let r = h.add_indirect_chain(0, &entries);
    h.kick(0);
    assert_eq!(h.used_len(&r), Some(1));
    assert_eq!(h.status_byte(&r), INVALID);
    assert_eq!(take_rules(), ["chain-too-long"]);
}

#[test]
fn rule_chain_too_long_wins_over_a_status_byte_in_entry_1025() {
    // Rule 3 must win over rule 1 when the chain does have a writable byte,
    // however far down the chain it is.
    let mem = test_memory();
    let mut h = TestHelper::running(&mem, 1);
    let status = h.alloc(1);
    let byte = h.alloc(1);
    let mut entries: Vec<(u64, u32, bool)> = (0..super::request::MAX_CHAIN_DESCRIPTORS)
        .map(|_| (byte, 1, false))
        .collect();
    entries.push((status, 1, true));
    let before = h.snapshot();
    let r = h.add_indirect_chain(0, &entries);
    h.kick(0);
    assert_eq!(h.used_len(&r), Some(1));
    assert_eq!(h.status_byte(&r), INVALID);
    assert_eq!(take_rules(), ["chain-too-long"]);
    let _ = before;
    assert_eq!(h.metrics.rejected_by_rule()["chain-too-long"], 1);
}

#[test]
fn chain_of_exactly_4_gib_is_served() {
    // virtio allows chains of up to 2^32 bytes in total: a 32-byte request
    // and a status descriptor of 2^32 - 32 bytes is one of them.
    let mem = test_memory();
    let mut h = TestHelper::running(&mem, 1);
    let status = h.alloc(1);
    let (answer, used) = submit(&mut h, &[D::R(one_range()), D::RawW(status, 0xFFFF_FFE0)]);
    assert_eq!((answer, used), (Some(OK), Some(1)));
    assert_eq!(h.flush_calls().len(), 1);
}

#[test]
fn chain_of_two_2_gib_readable_buffers_is_judged_by_the_rules() {
    // 2^32 readable bytes and a status byte: more than virtio allows, but the
    // status byte is there, so the rules answer through it (rule 6: the
    // buffers are not in guest RAM).
    let mem = test_memory();
    let mut h = TestHelper::running(&mem, 1);
    let (answer, used) = submit(
        &mut h,
        &[D::RawR(0x1000, 1 << 31), D::RawR(0x1000, 1 << 31), D::W(1)],
    );
    assert_eq!((answer, used), (Some(INVALID), Some(1)));
    assert_eq!(take_rules(), ["descriptor-outside-memory"]);
}

#[test]
fn chain_of_two_2_gib_writable_buffers_is_too_short_not_broken() {
    let mem = test_memory();
    let mut h = TestHelper::running(&mem, 1);
    let status = h.alloc(1);
    let (answer, used) = submit(
        &mut h,
        &[D::RawW(status, 1 << 31), D::RawW(0x1000, 1 << 31)],
    );
    assert_eq!((answer, used), (Some(INVALID), Some(1)));
    assert_eq!(take_rules(), ["too-short"]);
}

#[test]
fn indirect_chain_within_bounds_is_served() {
    let mem = test_memory();
    let mut h = TestHelper::running(&mem, 1);
    let request = h.alloc(32);
    mem.write_slice(&one_range(), GuestAddress(request))
        .unwrap();
    let status = h.alloc(1);
    let r = h.add_indirect_chain(
        0,
        &[
            (request, 16, false),
            (request + 16, 16, false),
            (status, 1, true),
        ],
    );
    h.kick(0);
    assert_eq!(h.status_byte(&r), OK);
    assert_eq!(h.flush_calls().len(), 1);
}

#[test]
fn rule_readable_descriptor_outside_memory() {
    let mem = test_memory();
    let mut h = TestHelper::running(&mem, 1);
    // Segment bytes "in" the hole.
    let (status, used) = submit(
        &mut h,
        &[
            D::R(header(1, 0, 1)),
            D::RawR(REGION0_END + 0x40, 16),
            D::W(1),
        ],
    );
    assert_eq!((status, used), (Some(INVALID), Some(1)));
    // A buffer running off the end of region 0 into the hole.
    let (status, _) = submit(
        &mut h,
        &[D::R(header(1, 0, 1)), D::RawR(REGION0_END - 8, 16), D::W(1)],
    );
    assert_eq!(status, Some(INVALID));
    // Far outside, near the top of the address space.
    let (status, _) = submit(&mut h, &[D::RawR(u64::MAX - 8, 16), D::W(1)]);
    assert_eq!(status, Some(INVALID));
    assert_eq!(take_rules(), ["descriptor-outside-memory"; 3]);
    assert!(h.flush_calls().is_empty());
}

#[test]
fn rule_nonzero_flags() {
    let mem = test_memory();
    let mut h = TestHelper::running(&mem, 1);
    let mut request = header(1, 0x8000_0000, 1);
    request.extend(segment(0x1000, 64));
    assert_eq!(status_of(&mut h, request), INVALID);
    assert_eq!(status_of(&mut h, header(2, 1, 1)), INVALID);
    assert_eq!(take_rules(), ["nonzero-flags"; 2]);
}

#[test]
fn rule_unknown_type() {
    let mem = test_memory();
    let mut h = TestHelper::running(&mem, 1);
    let before = h.snapshot();
    assert_eq!(status_of(&mut h, header(0, 0, 1)), UNSUPPORTED);
    assert_eq!(status_of(&mut h, header(3, 0, 1)), UNSUPPORTED);
    assert_eq!(take_rules(), ["unknown-type"; 2]);
    assert_rejected(
        &h,
        &before,
        MetricsSnapshot {
            requests_other: 2,
            rejected_unsupported: 2,
            ..Default::default()
        },
    );
}

#[test]
fn rule_flush_all_without_f_full() {
    // Not offered (the host cannot flush everything)...
    let mem = test_memory();
    let mut h = TestHelper::new(
        &mem,
        CacheFlushSettings {
            full_flush: false,
            ..settings()
        },
    );
    h.activate(RANGE | V1);
    assert_eq!(status_of(&mut h, full_request(1)), UNSUPPORTED);
    // ...or offered but not accepted by the driver.
    let mut h = TestHelper::new(&mem, settings());
    h.activate(RANGE | V1);
    assert_eq!(status_of(&mut h, full_request(1)), UNSUPPORTED);
    assert_eq!(status_of(&mut h, one_range()), OK);
    assert_eq!(take_rules(), ["feature-not-negotiated"; 2]);
}

#[test]
fn rule_flush_range_without_f_range() {
    let mem = test_memory();
    let mut h = TestHelper::new(&mem, settings());
    h.activate(FULL | V1);
    assert_eq!(status_of(&mut h, one_range()), UNSUPPORTED);
    assert_eq!(status_of(&mut h, full_request(1)), OK);
    assert_eq!(take_rules(), ["feature-not-negotiated"]);
}

#[test]
fn rule_flush_all_with_segments() {
    let mem = test_memory();
    let mut h = TestHelper::running(&mem, 1);
    let mut request = full_request(1);
    request.extend(segment(0x1000, 64));
    let before = h.snapshot();
    assert_eq!(status_of(&mut h, request), INVALID);
    assert_eq!(take_rules(), ["flush-all-with-segments"]);
    assert_rejected(
        &h,
        &before,
        MetricsSnapshot {
            requests_full: 1,
            rejected_invalid: 1,
            ..Default::default()
        },
    );
}

#[test]
fn rule_zero_length_segment() {
    let mem = test_memory();
    let mut h = TestHelper::running(&mem, 1);
    let request = range_request(1, &[(0x1000, 64), (0x2000, 0)]);
    assert_eq!(status_of(&mut h, request), INVALID);
    assert_eq!(take_rules(), ["zero-length-segment"]);
}

#[test]
fn rule_segment_overflow() {
    let mem = test_memory();
    let mut h = TestHelper::running(&mem, 1);
    assert_eq!(
        status_of(&mut h, range_request(1, &[(u64::MAX - 10, 64)])),
        INVALID
    );
    assert_eq!(
        status_of(&mut h, range_request(1, &[(1, u64::MAX)])),
        INVALID
    );
    assert_eq!(take_rules(), ["segment-overflow"; 2]);
}

#[test]
fn rule_segment_outside_ram() {
    let mem = test_memory();
    let mut h = TestHelper::running(&mem, 1);
    let before = h.snapshot();
    for seg in [
        (REGION0_END + 0x800, 64), // in the hole
        (REGION1_END, 64),         // just after the last region
        (REGION1_END - 32, 64),    // running off the last region
        (u64::MAX - 100, 50),      // far away, no overflow
    ] {
        assert_eq!(
            status_of(&mut h, range_request(1, &[seg])),
            OUT_OF_RANGE,
            "{seg:x?}"
        );
    }
    assert_eq!(take_rules(), ["segment-out-of-range"; 4]);
    assert_rejected(
        &h,
        &before,
        MetricsSnapshot {
            requests_range: 4,
            rejected_out_of_range: 4,
            ..Default::default()
        },
    );
}

#[test]
fn rule_segment_across_hole() {
    let mem = test_memory();
    let mut h = TestHelper::running(&mem, 1);
    // Starts in region 0, ends in region 1: both ends are RAM, the middle is not.
    let across = (REGION0_END - 32, REGION1 - REGION0_END + 64);
    assert_eq!(status_of(&mut h, range_request(1, &[across])), OUT_OF_RANGE);
    assert_eq!(
        status_of(&mut h, range_request(1, &[(REGION0_END - 32, 64)])),
        OUT_OF_RANGE
    );
    assert_eq!(take_rules(), ["segment-out-of-range"; 2]);
}

#[test]
fn segments_inside_either_region_are_served() {
    let mem = test_memory();
    let mut h = TestHelper::running(&mem, 1);
    let request = range_request(1, &[(0, REGION0_END), (REGION1_END - 64, 64)]);
    assert_eq!(status_of(&mut h, request), OK);
    assert_eq!(
        h.flush_calls()[0].extents,
        vec![
            GuestExtent {
                addr: GuestAddress(0),
                len: REGION0_END
            },
            GuestExtent {
                addr: GuestAddress(REGION1_END - 64),
                len: 64
            },
        ]
    );
}

#[test]
fn rule_too_many_segments() {
    let mem = test_memory();
    let mut h = TestHelper::new(
        &mem,
        CacheFlushSettings {
            max_segments: 4,
            ..settings()
        },
    );
    h.activate(RANGE | FULL | V1);
    let segs: Vec<(u64, u64)> = (0..5).map(|i| (0x1000 * (i + 1), 64)).collect();
    assert_eq!(status_of(&mut h, range_request(1, &segs)), TOO_LARGE);
    assert_eq!(status_of(&mut h, range_request(1, &segs[..4])), OK);
    assert_eq!(take_rules(), ["too-many-segments"]);
    assert_eq!(h.snapshot().rejected_too_large, 1);
}

#[test]
fn rule_too_many_bytes() {
    let mem = test_memory();
    let mut h = TestHelper::new(
        &mem,
        CacheFlushSettings {
            max_bytes: 4096,
            ..settings()
        },
    );
    h.activate(RANGE | FULL | V1);
    assert_eq!(status_of(&mut h, range_request(1, &[(0x1000, 4096)])), OK);
    let request = range_request(1, &[(0x1000, 4096), (0x3000, 1)]);
    assert_eq!(status_of(&mut h, request), TOO_LARGE);
    assert_eq!(
        status_of(&mut h, range_request(1, &[(0x1000, 4097)])),
        TOO_LARGE
    );
    assert_eq!(take_rules(), ["too-many-bytes"; 2]);
    assert_eq!(h.snapshot().bytes_requested, 4096);
}

#[test]
fn rule_rate_limit_full() {
    let mem = test_memory();
    let mut h = TestHelper::new(
        &mem,
        CacheFlushSettings {
            full_per_sec_limit: 1,
            ..settings()
        },
    );
    h.activate(RANGE | FULL | V1);
    // Two in one batch share one flush: only the first is charged.
    let a = h.add_request(0, full_request(1));
    let b = h.add_request(0, full_request(2));
    h.kick(0);
    assert_eq!((h.status_byte(&a), h.status_byte(&b)), (OK, OK));
    // The next second's worth is spent.
    let before = h.snapshot();
    assert_eq!(status_of(&mut h, full_request(3)), BUSY);
    assert_eq!(h.snapshot().since(&before).rejected_busy, 1);
    assert_eq!(h.flush_calls().len(), 1);
    // Ranges are not limited by the FLUSH_ALL bucket.
    assert_eq!(status_of(&mut h, one_range()), OK);
    assert_eq!(take_rules(), ["rate-limited"]);
}

#[test]
fn rule_rate_limit_range() {
    let mem = test_memory();
    let mut h = TestHelper::new(
        &mem,
        CacheFlushSettings {
            range_bytes_per_sec_limit: 4096,
            ..settings()
        },
    );
    h.activate(RANGE | FULL | V1);
    assert_eq!(status_of(&mut h, range_request(1, &[(0x1000, 4096)])), OK);
    assert_eq!(status_of(&mut h, range_request(2, &[(0x1000, 64)])), BUSY);
    assert_eq!(status_of(&mut h, full_request(3)), OK);
    assert_eq!(take_rules(), ["rate-limited"]);
    let m = h.snapshot();
    assert_eq!(
        (m.rejected_busy, m.bytes_requested, m.completed_ok),
        (1, 4096, 2)
    );
}

#[test]
fn rule_first_failing_rule_decides() {
    let mem = test_memory();
    let mut h = TestHelper::new(
        &mem,
        CacheFlushSettings {
            max_segments: 1,
            ..settings()
        },
    );
    h.activate(RANGE | V1);
    // Unknown type beats non-zero flags and a ragged payload.
    let mut request = header(9, 1, 1);
    request.push(0);
    assert_eq!(status_of(&mut h, request), UNSUPPORTED);
    // A non-negotiated type beats carrying segments.
    let mut request = full_request(1);
    request.extend(segment(0x1000, 64));
    assert_eq!(status_of(&mut h, request), UNSUPPORTED);
    // The segment count is checked before any segment.
    let request = range_request(1, &[(0x1000, 0), (REGION1_END, 64)]);
    assert_eq!(status_of(&mut h, request), TOO_LARGE);
    // Segments are checked in order.
    let mut h = TestHelper::running(&mem, 1);
    let request = range_request(1, &[(REGION1_END, 64), (0x1000, 0)]);
    assert_eq!(status_of(&mut h, request), OUT_OF_RANGE);
    assert_eq!(
        take_rules(),
        [
            "unknown-type",
            "feature-not-negotiated",
            "too-many-segments",
            "segment-out-of-range"
        ]
    );
}

#[test]
fn empty_flush_range_completes_without_a_flush() {
    let mem = test_memory();
    let mut h = TestHelper::running(&mem, 1);
    assert_eq!(status_of(&mut h, header(1, 0, 1)), OK);
    assert!(h.flush_calls().is_empty());
    assert_eq!(h.snapshot().completed_ok, 1);
}

#[test]
fn header_and_segments_split_anywhere() {
    let mem = test_memory();
    let mut h = TestHelper::running(&mem, 1);
    let bytes = range_request(0x1234, &[(0x5000, 100), (REGION1, 8)]);
    // Split at 5, 19 and 33 bytes; a zero-length readable piece in between;
    // a larger writable part (the status is its first byte).
    let (status, used) = submit(
        &mut h,
        &[
            D::R(bytes[..5].to_vec()),
            D::R(bytes[5..19].to_vec()),
            D::R(Vec::new()),
            D::R(bytes[19..33].to_vec()),
            D::R(bytes[33..].to_vec()),
            D::W(8),
        ],
    );
    assert_eq!((status, used), (Some(OK), Some(1)));
    assert_eq!(
        h.flush_calls()[0].extents,
        vec![
            GuestExtent {
                addr: GuestAddress(0x5000),
                len: 100
            },
            GuestExtent {
                addr: GuestAddress(REGION1),
                len: 8
            },
        ]
    );
}

// ----------------------------------------------------------- transport --

#[test]
fn transport_refuses_features_without_version_1() {
    let mem = test_memory();
    let mut h = TestHelper::new(&mem, settings());
    assert!(!h.negotiate(RANGE | FULL));
    h.setup_queues();
    h.driver_ok();
    assert_eq!(h.status() & 0b1100, 0, "neither FEATURES_OK nor DRIVER_OK");
    assert!(!h.transport.lock().unwrap().device().is_active());
    // After a reset, a proper driver gets in.
    h.activate(RANGE | FULL | V1);
}

#[test]
fn transport_full_not_offered_when_disabled() {
    let mem = test_memory();
    let mut h = TestHelper::new(
        &mem,
        CacheFlushSettings {
            full_flush: false,
            ..settings()
        },
    );
    assert_eq!(h.device_features(), RANGE | V1);
    assert!(!h.negotiate(RANGE | FULL | V1), "FULL is not offered");
    assert!(h.negotiate(RANGE | V1));
    let h = TestHelper::new(&mem, settings());
    assert_eq!(h.device_features(), RANGE | FULL | V1);
}

#[test]
fn transport_config_space_reads() {
    let mem = test_memory();
    let h = TestHelper::new(
        &mem,
        CacheFlushSettings {
            num_queues: 3,
            max_segments: 100,
            full_per_sec_limit: 0x1_0000_0002,
            ..settings()
        },
    );
    let cfg = |off: u32| h.read(VIRTIO_MMIO_CONFIG + off);
    assert_eq!(cfg(0), 64);
    assert_eq!(cfg(4), 3);
    assert_eq!(cfg(8), 100);
    assert_eq!((cfg(16), cfg(20)), (0x4000_0000, 0));
    // 64-bit fields read as two 32-bit halves.
    assert_eq!((cfg(40), cfg(44)), (2, 1));
}

#[test]
fn transport_queue_registers_ignored_after_driver_ok() {
    let mem = test_memory();
    let mut h = TestHelper::running(&mem, 1);
    take_logs();
    h.write(VIRTIO_MMIO_QUEUE_SEL, 0);
    h.write(VIRTIO_MMIO_QUEUE_READY, 0);
    h.write(VIRTIO_MMIO_QUEUE_NUM, 2);
    h.write(VIRTIO_MMIO_QUEUE_DESC_LOW, 0x8_0000);
    h.write(VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x8_1000);
    h.write(VIRTIO_MMIO_QUEUE_USED_LOW, 0x8_2000);
    assert_eq!(h.read(VIRTIO_MMIO_QUEUE_READY), 1);
    let logs = take_logs();
    assert_eq!(logs.len(), 5);
    assert!(logs
        .iter()
        .all(|l| l.contains("write in status 0xf ignored")));
    // The device still serves the rings set up before DRIVER_OK.
    assert_eq!(status_of(&mut h, one_range()), OK);
    assert_eq!(h.status(), 0xf);
}

#[test]
fn transport_queue_sel_out_of_range() {
    let mem = test_memory();
    let mut h = TestHelper::new(
        &mem,
        CacheFlushSettings {
            num_queues: 2,
            ..settings()
        },
    );
    assert!(h.negotiate(RANGE | FULL | V1));
    h.write(VIRTIO_MMIO_QUEUE_SEL, 2);
    assert_eq!(h.read(VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
    take_logs();
    h.write(VIRTIO_MMIO_QUEUE_NUM, 16);
    h.write(VIRTIO_MMIO_QUEUE_READY, 1);
    assert_eq!(h.read(VIRTIO_MMIO_QUEUE_READY), 0);
    let logs = take_logs();
    assert_eq!(logs.len(), 2);
    assert!(logs
        .iter()
        .all(|l| l.contains("non-existent queue 2 ignored")));
    h.write(VIRTIO_MMIO_QUEUE_SEL, u32::MAX);
    assert_eq!(h.read(VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
    h.setup_queues();
    h.driver_ok();
    assert_eq!(h.status(), 0xf);
    // A notify naming a missing queue is ignored too.
    h.notify(2);
    assert_eq!(h.run(), 0);
}

#[test]
fn transport_notify_before_driver_ok_ignored() {
    let mem = test_memory();
    let mut h = TestHelper::new(&mem, settings());
    assert!(h.negotiate(RANGE | FULL | V1));
    h.setup_queues();
    let r = h.add_request(0, one_range());
    // Through the transport: the eventfd is not even written.
    take_logs();
    h.notify(0);
    assert_eq!(h.run(), 0);
    assert!(take_logs()[0].contains("QueueNotify 0 in status 0xb ignored"));
    // Through the ioeventfd (KVM writes the eventfd itself): the queue worker
    // wakes up, finds the device not running, does nothing.
    h.transport.lock().unwrap().queue_notify_eventfds()[0]
        .1
        .write(1)
        .unwrap();
    assert_eq!(h.run(), 1);
    assert_eq!(h.used_len(&r), None);
    assert_eq!(
        h.snapshot(),
        MetricsSnapshot {
            notifies_while_idle: 1,
            ..Default::default()
        }
    );
    // Once running, the next notify serves it.
    h.driver_ok();
    h.kick(0);
    assert_eq!(h.status_byte(&r), OK);
}

#[test]
fn transport_ioeventfd_path_matches_queue_notify() {
    let mem = test_memory();
    let mut h = TestHelper::running(&mem, 2);
    let r = h.add_request(1, one_range());
    let eventfds: Vec<u16> = {
        let t = h.transport.lock().unwrap();
        let fds = t.queue_notify_eventfds();
        fds[1].1.write(1).unwrap();
        fds.iter().map(|(i, _)| *i).collect()
    };
    assert_eq!(eventfds, vec![0, 1]);
    h.run();
    assert_eq!(h.status_byte(&r), OK);
    assert_eq!(h.used_len(&r), Some(1));
}

#[test]
fn transport_needs_reset_when_queue_invalid() {
    let mem = test_memory();
    let mut h = TestHelper::new(&mem, settings());
    assert!(h.negotiate(RANGE | FULL | V1));
    h.setup_queues();
    // Move queue 0's used ring into the hole.
    h.write(VIRTIO_MMIO_QUEUE_SEL, 0);
    h.write(VIRTIO_MMIO_QUEUE_READY, 0);
    h.write(VIRTIO_MMIO_QUEUE_USED_LOW, (REGION0_END + 0x1000) as u32);
    h.write(VIRTIO_MMIO_QUEUE_READY, 1);
    h.driver_ok();
    assert_eq!(h.status(), 0xf | VIRTIO_CONFIG_S_NEEDS_RESET);
    assert_eq!(h.read(VIRTIO_MMIO_INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
    assert_eq!(
        h.interrupt.config.load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    assert!(!h.transport.lock().unwrap().device().is_active());
    // Requests are not served; a reset and a proper setup recover.
    h.add_request(0, one_range());
    h.kick(0);
    assert!(h.flush_calls().is_empty());
    h.activate(RANGE | FULL | V1);
    assert_eq!(status_of(&mut h, one_range()), OK);
}

#[test]
fn reset_with_request_outstanding() {
    let mem = test_memory();
    let mut h = TestHelper::running(&mem, 1);
    let transport = h.transport.clone();
    // The driver resets the device while the flush engine has the batch (a
    // vCPU's Status write racing with the flush). The hook would deadlock if
    // the queue worker held the device lock across `flush`.
    h.flush.lock().unwrap().before_complete = Some(Box::new(move |_| {
        transport
            .lock()
            .unwrap()
            .write(u64::from(VIRTIO_MMIO_STATUS), &0u32.to_le_bytes());
    }));
    let r = h.add_request(0, one_range());
    let before = h.snapshot();
    h.kick(0);
    assert_eq!(h.flush_calls().len(), 1);
    assert_eq!(h.status(), 0);
    assert!(take_logs()
        .iter()
        .any(|l| l.contains("reset during a flush; dropping 1 completions")));
    // Nothing written into the (possibly reused) rings after the reset.
    assert_eq!(h.used(0), vec![]);
    assert_eq!(h.status_byte(&r), 0xff);
    assert_eq!(
        h.snapshot().since(&before),
        MetricsSnapshot {
            requests_range: 1,
            bytes_requested: 64,
            batches: 1,
            dropped_after_reset: 1,
            ..Default::default()
        }
    );
    // The device starts again and serves new requests.
    h.flush.lock().unwrap().before_complete = None;
    h.activate(RANGE | FULL | V1);
    assert_eq!(status_of(&mut h, one_range()), OK);
}

// ------------------------------------------------------------- handler --

#[test]
fn batching_several_queues_one_flush() {
    let mem = test_memory();
    let mut h = TestHelper::running(&mem, 4);
    let before = h.snapshot();
    let reqs = [
        h.add_request(0, range_request(1, &[(0x1000, 64), (0x2000, 128)])),
        h.add_request(1, full_request(2)),
        h.add_request(2, range_request(3, &[(REGION1, 4096)])),
        h.add_request(3, range_request(4, &[(0x3000, 1)])),
        h.add_request(3, range_request(5, &[(0x4000, 2)])),
    ];
    for q in 0..4 {
        h.notify(q);
    }
    h.run();
    let calls = h.flush_calls();
    assert_eq!(calls.len(), 1, "all pending requests share one pause");
    assert!(calls[0].full);
    let extents: Vec<(u64, u64)> = calls[0].extents.iter().map(|e| (e.addr.0, e.len)).collect();
    assert_eq!(
        extents,
        vec![
            (0x1000, 64),
            (0x2000, 128),
            (REGION1, 4096),
            (0x3000, 1),
            (0x4000, 2)
        ]
    );
    for r in &reqs {
        assert_eq!(h.status_byte(r), OK);
        assert_eq!(h.used_len(r), Some(1));
    }
    assert_eq!(
        h.snapshot().since(&before),
        MetricsSnapshot {
            requests_range: 4,
            requests_full: 1,
            completed_ok: 5,
            bytes_requested: 64 + 128 + 4096 + 1 + 2,
            batches: 1,
            full_batches: 1,
            ..Default::default()
        }
    );
    // Each queue with completions was signalled once.
    let mut signalled = h.interrupt.used.lock().unwrap().clone();
    signalled.sort();
    assert_eq!(signalled, vec![0, 1, 2, 3]);
    assert_eq!(h.read(VIRTIO_MMIO_INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
    h.write(VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
    assert_eq!(h.read(VIRTIO_MMIO_INTERRUPT_STATUS), 0);
}

#[test]
fn completion_is_written_inside_flush() {
    let mem = test_memory();
    let mut h = TestHelper::running(&mem, 1);
    let r = h.add_request(0, one_range());
    let status_addr = GuestAddress(r.status_addr.unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (m1, s1) = (mem.clone(), seen.clone());
    let (m2, s2) = (mem.clone(), seen.clone());
    let used = h.used_idx_addr(0);
    {
        let mut control = h.flush.lock().unwrap();
        control.before_complete = Some(Box::new(move |_| {
            let idx: u16 = m1.read_obj(used).unwrap();
            let status: u8 = m1.read_obj(status_addr).unwrap();
            s1.lock().unwrap().push(("before", idx, status));
        }));
        control.after_complete = Some(Box::new(move |_| {
            let idx: u16 = m2.read_obj(used).unwrap();
            let status: u8 = m2.read_obj(status_addr).unwrap();
            s2.lock().unwrap().push(("after", idx, status));
        }));
    }
    h.kick(0);
    assert_eq!(
        *seen.lock().unwrap(),
        vec![("before", 0, 0xff), ("after", 1, OK)],
        "completion happens inside flush, before it returns (vCPUs resume)"
    );
}

#[test]
fn flush_runs_without_the_device_lock() {
    let mem = test_memory();
    let mut h = TestHelper::running(&mem, 1);
    let shared = h.transport.lock().unwrap().device().shared().clone();
    let transport = h.transport.clone();
    let free = Arc::new(Mutex::new(None));
    let free2 = free.clone();
    h.flush.lock().unwrap().before_complete = Some(Box::new(move |_| {
        // What a vCPU in an MMIO exit would need while the VM is pausing.
        let lock_free = shared.state.try_lock().is_ok();
        let mut b = [0u8; 4];
        transport
            .lock()
            .unwrap()
            .read(u64::from(VIRTIO_MMIO_STATUS), &mut b);
        *free2.lock().unwrap() = Some((lock_free, u32::from_le_bytes(b)));
    }));
    assert_eq!(status_of(&mut h, one_range()), OK);
    assert_eq!(*free.lock().unwrap(), Some((true, 0xf)));
}

#[test]
fn flush_failure_answers_host_error() {
    let mem = test_memory();
    let mut h = TestHelper::running(&mem, 1);
    h.flush.lock().unwrap().behaviour = Behaviour::Fail;
    let before = h.snapshot();
    assert_eq!(status_of(&mut h, one_range()), HOST_ERROR);
    let delta = h.snapshot().since(&before);
    assert_eq!(
        (
            delta.flush_failures,
            delta.completed_host_error,
            delta.completed_ok
        ),
        (1, 1, 0)
    );
}

#[test]
fn engine_that_never_completes_gets_host_error() {
    let mem = test_memory();
    let mut h = TestHelper::running(&mem, 1);
    h.flush.lock().unwrap().behaviour = Behaviour::NoComplete;
    assert_eq!(status_of(&mut h, one_range()), HOST_ERROR);
}

#[test]
fn a_back_end_may_answer_after_flush_returned() {
    let mem = test_memory();
    let mut h = TestHelper::running(&mem, 1);
    h.flush.lock().unwrap().behaviour = Behaviour::Deferred;
    let request = h.add_request(0, one_range());
    h.kick(0);
    let answered: Vec<_> = std::mem::take(&mut h.flush.lock().unwrap().deferred);
    assert_eq!(answered.len(), 1, "the fake deferred its answer");
    for thread in answered {
        thread.join().unwrap();
    }
    assert_eq!(h.status_byte(&request), OK);
    assert_eq!(h.used(0).len(), 1);
    assert_eq!(h.snapshot().completed_ok, 1);
}

#[test]
fn invalid_requests_complete_before_the_flush() {
    let mem = test_memory();
    let mut h = TestHelper::running(&mem, 1);
    let good = h.add_request(0, one_range());
    let bad = h.add_request(0, header(9, 0, 1));
    let used = h.used_idx_addr(0);
    let seen = Arc::new(Mutex::new(None));
    let (m, s) = (mem.clone(), seen.clone());
    h.flush.lock().unwrap().before_complete = Some(Box::new(move |_| {
        *s.lock().unwrap() = Some(m.read_obj::<u16>(used).unwrap());
    }));
    h.kick(0);
    assert_eq!(
        *seen.lock().unwrap(),
        Some(1),
        "the invalid one is already used"
    );
    assert_eq!(
        h.used(0),
        vec![(u32::from(bad.head), 1), (u32::from(good.head), 1)]
    );
    assert_eq!(
        (h.status_byte(&good), h.status_byte(&bad)),
        (OK, UNSUPPORTED)
    );
}

#[test]
fn only_invalid_requests_never_flush() {
    let mem = test_memory();
    let mut h = TestHelper::running(&mem, 2);
    h.add_request(0, header(9, 0, 1));
    h.add_request(1, range_request(1, &[(REGION1_END, 1)]));
    h.notify(0);
    h.notify(1);
    h.run();
    assert!(h.flush_calls().is_empty());
    assert_eq!((h.used(0).len(), h.used(1).len()), (1, 1));
    assert_eq!(h.snapshot().batches, 0);
}

/// Arranges for `late` to be published (by another vCPU) during the next
/// flush, after which `then` runs; once.
fn publish_during_the_next_flush(
    h: &TestHelper<'_>,
    late: &Submitted,
    mut then: impl FnMut() + Send + 'static,
) {
    let (m, avail, head) = (h.mem.clone(), h.avail_addr(0), late.head);
    let mut published = false;
    h.flush.lock().unwrap().before_complete = Some(Box::new(move |_| {
        if !published {
            published = true;
            publish_raw(&m, avail, head);
            then();
        }
    }));
}

#[test]
fn requests_arriving_during_a_flush_are_served() {
    let mem = test_memory();
    let mut h = TestHelper::running(&mem, 1);
    let first = h.add_request(0, one_range());
    let late = h.build_chain(0, &[D::R(full_request(9)), D::W(1)]);
    let transport = h.transport.clone();
    publish_during_the_next_flush(&h, &late, move || {
        // The (not yet paused) vCPU that published it notifies.
        transport
            .lock()
            .unwrap()
            .write(u64::from(VIRTIO_MMIO_QUEUE_NOTIFY), &0u32.to_le_bytes());
    });
    h.kick(0);
    assert_eq!((h.status_byte(&first), h.status_byte(&late)), (OK, OK));
    let calls = h.flush_calls();
    assert_eq!(calls.len(), 2);
    assert!(!calls[0].full && calls[1].full);
    // The notify left the eventfd signalled: the next wake-up finds nothing.
    assert_eq!(h.run(), 1);
    assert_eq!(h.flush_calls().len(), 2);
}

#[test]
fn a_batch_reuses_the_buffers_of_the_last_but_none_of_its_contents() {
    // The queue worker keeps a finished batch's buffers for the next one: a
    // request must not inherit the extents, tags or FLUSH_ALL of the last.
    let mem = test_memory();
    let mut h = TestHelper::running(&mem, 2);
    h.add_request(0, range_request(1, &[(0x1000, 64), (0x3000, 128)]));
    h.add_request(1, full_request(2));
    h.kick(0);
    h.add_request(1, range_request(3, &[(0x2000, 64)]));
    h.kick(1);
    let calls = h.flush_calls();
    assert_eq!(calls.len(), 2);
    assert!(calls[0].full);
    assert_eq!(calls[0].requests.len(), 2);
    assert_eq!(
        calls[1],
        FlushBatch {
            extents: vec![GuestExtent {
                addr: GuestAddress(0x2000),
                len: 64
            }],
            full: false,
            requests: vec![BatchRequest { queue: 1, tag: 3 }],
        }
    );
}

#[test]
fn a_notify_served_on_the_vcpu_thread_looks_once_and_later_requests_bring_their_own() {
    let mem = test_memory();
    let mut h = TestHelper::running(&mem, 1);
    let first = h.add_request(0, one_range());
    let late = h.build_chain(0, &[D::R(full_request(9)), D::W(1)]);
    // Another vCPU publishes a request; its notify comes next.
    publish_during_the_next_flush(&h, &late, || {});
    h.worker.lock().unwrap().serve_notify(0);
    assert_eq!(h.status_byte(&first), OK);
    assert_eq!(h.flush_calls().len(), 1);
    assert_eq!(
        h.used(0).len(),
        1,
        "one pass: the late request waits for its notify"
    );
    // Its own notify, served on its vCPU's thread.
    h.worker.lock().unwrap().serve_notify(0);
    assert_eq!(h.status_byte(&late), OK);
    assert_eq!(h.flush_calls().len(), 2);
}

#[test]
fn round_budget_yields_to_the_event_loop() {
    let mem = test_memory();
    let mut h = TestHelper::running(&mem, 1);
    let first = h.add_request(0, one_range());
    let more: Vec<_> = (0..MAX_ROUNDS_PER_EVENT + 1)
        .map(|i| {
            h.build_chain(
                0,
                &[D::R(range_request(i as u64, &[(0x1000, 64)])), D::W(1)],
            )
        })
        .collect();
    let heads: Vec<u16> = more.iter().map(|r| r.head).collect();
    let avail = h.avail_addr(0);
    let m = mem.clone();
    let mut next = 0;
    // Every flush, the guest adds one more request (without notifying).
    h.flush.lock().unwrap().before_complete = Some(Box::new(move |_| {
        if let Some(&head) = heads.get(next) {
            publish_raw(&m, avail, head);
            next += 1;
        }
    }));
    h.kick(0);
    assert_eq!(h.flush_calls().len(), MAX_ROUNDS_PER_EVENT);
    // The handler re-signalled itself: the loop comes back for the rest.
    assert_eq!(h.run(), 1);
    assert_eq!(h.flush_calls().len(), MAX_ROUNDS_PER_EVENT + 2);
    assert_eq!(h.status_byte(&first), OK);
    for r in &more {
        assert_eq!(h.status_byte(r), OK);
    }
}

#[test]
fn handler_registers_every_queue_eventfd() {
    let mem = test_memory();
    let mut h = TestHelper::running(&mem, 3);
    let r = h.add_request(2, one_range());
    h.kick(2);
    assert_eq!(h.status_byte(&r), OK);
    // Nothing pending: a spurious wake-up does nothing.
    h.notify(1);
    assert_eq!(h.run(), 1);
    assert_eq!(h.flush_calls().len(), 1);
}

#[test]
fn metrics_count_every_request_once_by_type_and_once_by_outcome() {
    let mem = test_memory();
    let mut h = TestHelper::running(&mem, 1);
    let before = h.snapshot();
    h.add_request(0, one_range());
    h.add_request(0, full_request(1));
    h.add_request(0, header(5, 0, 1));
    h.add_request(0, range_request(1, &[(REGION1_END, 1)]));
    h.add_chain(0, &[D::R(one_range())]);
    h.kick(0);
    let d = h.snapshot().since(&before);
    assert_eq!(
        d,
        MetricsSnapshot {
            // The chain without a status byte is refused before its header
            // is read: it counts as "other".
            requests_range: 2,
            requests_full: 1,
            requests_other: 2,
            completed_ok: 2,
            rejected_unsupported: 1,
            rejected_out_of_range: 1,
            unanswerable: 1,
            bytes_requested: 64,
            batches: 1,
            full_batches: 1,
            ..Default::default()
        }
    );
    assert_eq!(d.received(), d.answered());
    assert!(serde_json::to_string(&d)
        .unwrap()
        .contains("\"requests_other\":2"));
}

// -------------------------------------------------------------- wiring --

/// How the VMM puts the device together; also checks the types fit (the
/// transport goes on the bus as a `SharedBusDevice`, the queue worker into an
/// event manager, both `Send`).
#[test]
fn vmm_wiring() {
    use super::{BatchCompletion, CacheFlushDevice, FlushBackend, FlushBatch};
    use crate::bus::{Bus, SharedBusDevice};
    use crate::virtio::mmio::{MmioTransport, MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET};
    use crate::virtio::NoInterrupt;
    use event_manager::{EventManager, SubscriberOps};

    struct Engine;
    impl FlushBackend for Engine {
        fn flush(&self, _: &FlushBatch, done: BatchCompletion) {
            done.complete(Ok(()));
        }
    }
    fn assert_send<T: Send>(_: &T) {}

    let mem = test_memory();
    let device = CacheFlushDevice::new(CacheFlushSettings {
        num_queues: 2,
        ..settings()
    })
    .unwrap();
    let metrics = device.metrics();
    let handler = Arc::new(Mutex::new(device.queue_worker(Box::new(Engine))));
    let transport = Arc::new(Mutex::new(
        MmioTransport::new(device, mem.clone(), Arc::new(NoInterrupt)).unwrap(),
    ));
    // ioeventfds: (base + QUEUE_NOTIFY_OFFSET, 4 bytes, datamatch = index).
    let base = 0xd000_0000u64;
    let ioeventfds: Vec<(u64, u16)> = transport
        .lock()
        .unwrap()
        .queue_notify_eventfds()
        .iter()
        .map(|(index, _fd)| (base + QUEUE_NOTIFY_OFFSET, *index))
        .collect();
    assert_eq!(ioeventfds, vec![(0xd000_0050, 0), (0xd000_0050, 1)]);
    let mut bus = Bus::new();
    let on_bus: SharedBusDevice = transport.clone();
    bus.insert(base, MMIO_WINDOW_SIZE, on_bus).unwrap();
    let mut event_manager = EventManager::<Arc<Mutex<super::QueueWorker>>>::new().unwrap();
    assert_send(&handler);
    event_manager.add_subscriber(handler);

    let mut magic = [0u8; 4];
    assert!(bus.read(base, &mut magic));
    assert_eq!(u32::from_le_bytes(magic), 0x7472_6976);
    let mut id = [0u8; 4];
    assert!(bus.read(base + 8, &mut id));
    assert_eq!(u32::from_le_bytes(id), 0xEFBF);
    assert_eq!(metrics.snapshot(), MetricsSnapshot::default());
    assert_eq!(event_manager.run_with_timeout(0).unwrap(), 0);
}

#[test]
fn a_flood_of_bad_input_is_counted_in_full_and_logged_a_few_times() {
    use crate::log_throttle::LINES_PER_WINDOW;
    let mem = test_memory();
    let mut h = TestHelper::running(&mem, 1);
    let before = h.snapshot();
    take_logs();
    let bad_requests = 80u64;
    for _ in 0..bad_requests {
        assert_eq!(status_of(&mut h, header(3, 0, 1)), UNSUPPORTED);
    }
    assert_eq!(h.metrics.rejected_by_rule()["unknown-type"], bad_requests);
    assert_eq!(
        h.snapshot().since(&before).rejected_unsupported,
        bad_requests
    );
    // Odd register accesses through the transport, as many.
    for _ in 0..bad_requests {
        assert_eq!(h.read(0x0e0), 0);
    }
    let logs = take_logs();
    let rejections = logs
        .iter()
        .filter(|l| l.contains("rule=unknown-type"))
        .count();
    let odd_reads = logs
        .iter()
        .filter(|l| l.contains("unknown register"))
        .count();
    assert_eq!(
        (rejections, odd_reads),
        (LINES_PER_WINDOW as usize, LINES_PER_WINDOW as usize),
        "{logs:#?}"
    );
}

/// Nothing a guest writes into its rings or registers makes the host log at
/// ERROR level (virtio-queue logs ERROR on bad ring layouts, a runaway
/// available index and out-of-table heads; the device checks first).
#[test]
fn guest_mistakes_are_never_logged_as_errors() {
    let mem = test_memory();
    let layouts: [(&str, u32, u32); 5] = [
        (
            "used ring in the hole",
            VIRTIO_MMIO_QUEUE_USED_LOW,
            (REGION0_END + 0x1000) as u32,
        ),
        (
            "descriptor table in the hole",
            VIRTIO_MMIO_QUEUE_DESC_LOW,
            (REGION0_END + 0x1000) as u32,
        ),
        (
            "misaligned descriptor table",
            VIRTIO_MMIO_QUEUE_DESC_LOW,
            0x1008,
        ),
        (
            "misaligned driver area",
            VIRTIO_MMIO_QUEUE_AVAIL_LOW,
            0x1001,
        ),
        ("queue size 12", VIRTIO_MMIO_QUEUE_NUM, 12),
    ];
    for (what, register, value) in layouts {
        let mut h = TestHelper::new(&mem, settings());
        assert!(h.negotiate(RANGE | FULL | V1));
        h.setup_queues();
        h.write(VIRTIO_MMIO_QUEUE_SEL, 0);
        h.write(VIRTIO_MMIO_QUEUE_READY, 0);
        h.write(register, value);
        h.write(VIRTIO_MMIO_QUEUE_READY, 1);
        take_logs();
        h.driver_ok();
        assert_ne!(h.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0, "{what}");
        let errors: Vec<_> = take_leveled_logs()
            .into_iter()
            .filter(|(level, _)| *level == log::Level::Error)
            .collect();
        assert!(errors.is_empty(), "{what}: {errors:?}");
    }

    // A running device: a head outside the table, a runaway index.
    let mut h = TestHelper::running(&mem, 1);
    take_logs();
    h.publish(0, 200);
    h.kick(0);
    let idx_addr = GuestAddress(h.avail_addr(0).0 + 2);
    mem.write_obj(QUEUE_SIZE * 4, idx_addr).unwrap();
    h.kick(0);
    h.kick(0);
    assert_ne!(h.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    let logs = take_leveled_logs();
    assert!(
        logs.iter().all(|(level, _)| *level == log::Level::Warn),
        "{logs:?}"
    );
    for expected in ["head index 200", "available index more than 16"] {
        assert!(
            logs.iter().any(|(_, line)| line.contains(expected)),
            "{expected}: {logs:?}"
        );
    }
}
