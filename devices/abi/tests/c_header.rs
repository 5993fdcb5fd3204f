//! The C header of the wire format (`guest-driver/linux/include/
//! virtio_cache_flush.h`, used by the Linux driver and its test program)
//! against this crate: a small C program compiled with the system's `cc`
//! prints every size, offset and constant of the header, and each must equal
//! the crate's.

use std::collections::BTreeMap;
use std::mem::{offset_of, size_of, size_of_val};
use std::path::PathBuf;
use std::process::Command;

use cache_flush_abi::boot::EXIT_PORT;
use cache_flush_abi::cache_flush::{
    Config, RequestHeader, RequestType, Segment, Status, CONFIG_OFFSET, DEVICE_ID, F_FULL, F_RANGE,
    F_VERSION_1, MAX_QUEUES, QUEUE_SIZE_MAX,
};

/// Prints `name value` lines. Field offsets and sizes come from the C
/// compiler, so a reordered or resized field shows up here.
const PROGRAM: &str = r#"
#include <stddef.h>
#include <stdio.h>
#include "virtio_cache_flush.h"

#define SHOW(name, value) printf("%s %llu\n", name, (unsigned long long)(value))
#define FIELD(s, f) do { \
        SHOW(#s "." #f ".offset", offsetof(struct s, f)); \
        SHOW(#s "." #f ".size", sizeof(((struct s *)0)->f)); \
} while (0)

int main(void)
{
        SHOW("device_id", VIRTIO_ID_CACHE_FLUSH);
        SHOW("f_range", VIRTIO_CACHE_FLUSH_F_RANGE);
        SHOW("f_full", VIRTIO_CACHE_FLUSH_F_FULL);
        SHOW("f_version_1", VIRTIO_CACHE_FLUSH_F_VERSION_1);
        SHOW("max_queues", VIRTIO_CACHE_FLUSH_MAX_QUEUES);
        SHOW("queue_size_max", VIRTIO_CACHE_FLUSH_QUEUE_SIZE_MAX);
        SHOW("config_offset", VIRTIO_CACHE_FLUSH_CONFIG_OFFSET);
        SHOW("t_range", VIRTIO_CACHE_FLUSH_T_RANGE);
        SHOW("t_all", VIRTIO_CACHE_FLUSH_T_ALL);
        SHOW("s_ok", VIRTIO_CACHE_FLUSH_S_OK);
        SHOW("s_invalid", VIRTIO_CACHE_FLUSH_S_INVALID);
        SHOW("s_unsupported", VIRTIO_CACHE_FLUSH_S_UNSUPPORTED);
        SHOW("s_out_of_range", VIRTIO_CACHE_FLUSH_S_OUT_OF_RANGE);
        SHOW("s_too_large", VIRTIO_CACHE_FLUSH_S_TOO_LARGE);
        SHOW("s_busy", VIRTIO_CACHE_FLUSH_S_BUSY);
        SHOW("s_host_error", VIRTIO_CACHE_FLUSH_S_HOST_ERROR);

        SHOW("virtio_cache_flush_config.size", sizeof(struct virtio_cache_flush_config));
        FIELD(virtio_cache_flush_config, cache_line_size);
        FIELD(virtio_cache_flush_config, num_queues);
        FIELD(virtio_cache_flush_config, max_segments);
        FIELD(virtio_cache_flush_config, reserved0);
        FIELD(virtio_cache_flush_config, max_bytes);
        FIELD(virtio_cache_flush_config, full_flush_cost_ns);
        FIELD(virtio_cache_flush_config, full_break_even_bytes);
        FIELD(virtio_cache_flush_config, full_per_sec_limit);
        FIELD(virtio_cache_flush_config, range_bytes_per_sec_limit);

        SHOW("virtio_cache_flush_req_header.size", sizeof(struct virtio_cache_flush_req_header));
        FIELD(virtio_cache_flush_req_header, type);
        FIELD(virtio_cache_flush_req_header, flags);
        FIELD(virtio_cache_flush_req_header, tag);

        SHOW("virtio_cache_flush_segment.size", sizeof(struct virtio_cache_flush_segment));
        FIELD(virtio_cache_flush_segment, addr);
        FIELD(virtio_cache_flush_segment, len);
        return 0;
}
"#;

/// What the header must say, from the crate.
fn expected() -> BTreeMap<String, u64> {
    macro_rules! field {
        ($map:ident, $c:literal, $ty:ty, $f:ident, $cf:literal) => {{
            let v: $ty = Default::default();
            $map.insert(
                concat!($c, ".", $cf, ".offset").to_string(),
                offset_of!($ty, $f) as u64,
            );
            $map.insert(
                concat!($c, ".", $cf, ".size").to_string(),
                size_of_val(&v.$f) as u64,
            );
        }};
    }
    let mut m = BTreeMap::new();
    let mut put = |k: &str, v: u64| {
        m.insert(k.to_string(), v);
    };
    put("device_id", DEVICE_ID.into());
    put("f_range", F_RANGE.into());
    put("f_full", F_FULL.into());
    put("f_version_1", F_VERSION_1.into());
    put("max_queues", MAX_QUEUES.into());
    put("queue_size_max", QUEUE_SIZE_MAX.into());
    put("config_offset", CONFIG_OFFSET);
    put("t_range", RequestType::FlushRange as u64);
    put("t_all", RequestType::FlushAll as u64);
    put("s_ok", Status::Ok as u64);
    put("s_invalid", Status::Invalid as u64);
    put("s_unsupported", Status::Unsupported as u64);
    put("s_out_of_range", Status::OutOfRange as u64);
    put("s_too_large", Status::TooLarge as u64);
    put("s_busy", Status::Busy as u64);
    put("s_host_error", Status::HostError as u64);
    put("virtio_cache_flush_config.size", size_of::<Config>() as u64);
    put(
        "virtio_cache_flush_req_header.size",
        size_of::<RequestHeader>() as u64,
    );
    put(
        "virtio_cache_flush_segment.size",
        size_of::<Segment>() as u64,
    );
    field!(
        m,
        "virtio_cache_flush_config",
        Config,
        cache_line_size,
        "cache_line_size"
    );
    field!(
        m,
        "virtio_cache_flush_config",
        Config,
        num_queues,
        "num_queues"
    );
    field!(
        m,
        "virtio_cache_flush_config",
        Config,
        max_segments,
        "max_segments"
    );
    field!(
        m,
        "virtio_cache_flush_config",
        Config,
        reserved0,
        "reserved0"
    );
    field!(
        m,
        "virtio_cache_flush_config",
        Config,
        max_bytes,
        "max_bytes"
    );
    field!(
        m,
        "virtio_cache_flush_config",
        Config,
        full_flush_cost_ns,
        "full_flush_cost_ns"
    );
    field!(
        m,
        "virtio_cache_flush_config",
        Config,
        full_break_even_bytes,
        "full_break_even_bytes"
    );
    field!(
        m,
        "virtio_cache_flush_config",
        Config,
        full_per_sec_limit,
        "full_per_sec_limit"
    );
    field!(
        m,
        "virtio_cache_flush_config",
        Config,
        range_bytes_per_sec_limit,
        "range_bytes_per_sec_limit"
    );
    field!(
        m,
        "virtio_cache_flush_req_header",
        RequestHeader,
        request_type,
        "type"
    );
    field!(
        m,
        "virtio_cache_flush_req_header",
        RequestHeader,
        flags,
        "flags"
    );
    field!(
        m,
        "virtio_cache_flush_req_header",
        RequestHeader,
        tag,
        "tag"
    );
    field!(m, "virtio_cache_flush_segment", Segment, addr, "addr");
    field!(m, "virtio_cache_flush_segment", Segment, len, "len");
    m
}

fn include_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../guest-driver/linux/include")
}

/// Compiles and runs [`PROGRAM`]; its `name value` lines.
fn header_values() -> BTreeMap<String, u64> {
    let dir = std::env::temp_dir().join(format!("cache-flush-abi-c-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let src = dir.join("abi.c");
    let exe = dir.join("abi");
    std::fs::write(&src, PROGRAM).expect("write the C program");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(include_dir())
        .arg("-o")
        .arg(&exe)
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("{cc} runs (a C compiler is needed to link Rust too): {e}"));
    assert!(
        out.status.success(),
        "the header does not compile cleanly:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&exe).output().expect("the C program runs");
    assert!(run.status.success());
    let _ = std::fs::remove_dir_all(&dir);
    String::from_utf8(run.stdout)
        .expect("ASCII output")
        .lines()
        .map(|l| {
            let (k, v) = l.split_once(' ').expect("name value");
            (k.to_string(), v.parse().expect("a number"))
        })
        .collect()
}

#[test]
fn c_header_matches_the_crate() {
    let want = expected();
    let got = header_values();
    let mut wrong = Vec::new();
    for (name, value) in &want {
        match got.get(name) {
            Some(v) if v == value => {}
            Some(v) => wrong.push(format!("{name}: header says {v}, crate says {value}")),
            None => wrong.push(format!("{name}: not printed by the C program")),
        }
    }
    for name in got.keys().filter(|k| !want.contains_key(*k)) {
        wrong.push(format!("{name}: printed but not checked against the crate"));
    }
    assert!(
        wrong.is_empty(),
        "C header and crate disagree:\n{}",
        wrong.join("\n")
    );
}

/// The test program's exit port is the VMM's.
#[test]
fn test_program_uses_the_exit_port() {
    let src = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../guest-driver/linux/test/pvflush_test.c"),
    )
    .expect("the test program's source");
    let want = format!("#define EXIT_PORT\t0x{EXIT_PORT:x}");
    assert!(src.contains(&want), "pvflush_test.c lacks `{want}`");
}
