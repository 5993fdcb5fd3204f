//! Replays fuzz inputs without libFuzzer (stable toolchain, no sanitizer) and
//! sums what they made the device do:
//!
//! ```text
//! cargo run --release --example replay -- [--each] TARGET FILE_OR_DIR...
//! ```
//!
//! A crash reproduces as a panic with its message (and a debugger works);
//! the totals show how deep a corpus reaches (requests completed OK,
//! flushes, rejections by kind). `--each` also prints every input's counters
//! as one JSON line.

use std::path::Path;

use arbitrary::{Arbitrary, Unstructured};
use devices::cache_flush::MetricsSnapshot;
use devices_fuzz::{run_mmio_registers, run_request_path, MmioInput, RequestPathInput};

fn run(target: &str, data: &[u8]) -> Option<MetricsSnapshot> {
    // The same decoding as libfuzzer-sys's `fuzz_target!(|input: T| ...)`.
    let u = Unstructured::new(data);
    match target {
        "request_path" => {
            if data.len() < RequestPathInput::size_hint(0).0 {
                return None;
            }
            RequestPathInput::arbitrary_take_rest(u)
                .ok()
                .map(|i| run_request_path(&i))
        }
        "mmio_registers" => {
            if data.len() < MmioInput::size_hint(0).0 {
                return None;
            }
            MmioInput::arbitrary_take_rest(u)
                .ok()
                .map(|i| run_mmio_registers(&i))
        }
        _ => panic!("unknown target {target}: request_path or mmio_registers"),
    }
}

fn files(path: &Path, out: &mut Vec<std::path::PathBuf>) {
    if path.is_dir() {
        for entry in std::fs::read_dir(path).expect("readable directory") {
            files(&entry.expect("entry").path(), out);
        }
    } else {
        out.push(path.to_path_buf());
    }
}

fn main() {
    let mut args = std::env::args().skip(1).peekable();
    let each = args.next_if(|a| a == "--each").is_some();
    let target = args
        .next()
        .expect("usage: replay [--each] TARGET FILE_OR_DIR...");
    let mut paths = Vec::new();
    for arg in args {
        files(Path::new(&arg), &mut paths);
    }
    let mut total = MetricsSnapshot::default();
    let (mut inputs, mut decoded) = (0, 0);
    for path in &paths {
        let data = std::fs::read(path).expect("readable input");
        inputs += 1;
        if let Some(m) = run(&target, &data) {
            if each {
                println!("{}\t{m:?}", path.display());
            }
            decoded += 1;
            total = add(&total, &m);
        }
    }
    println!("{inputs} inputs, {decoded} decoded");
    println!("{total:#?}");
}

fn add(a: &MetricsSnapshot, b: &MetricsSnapshot) -> MetricsSnapshot {
    let mut out = *a;
    out.requests_range += b.requests_range;
    out.requests_full += b.requests_full;
    out.requests_other += b.requests_other;
    out.completed_ok += b.completed_ok;
    out.rejected_invalid += b.rejected_invalid;
    out.rejected_unsupported += b.rejected_unsupported;
    out.rejected_out_of_range += b.rejected_out_of_range;
    out.rejected_too_large += b.rejected_too_large;
    out.rejected_busy += b.rejected_busy;
    out.completed_host_error += b.completed_host_error;
    out.unanswerable += b.unanswerable;
    out.dropped_after_reset += b.dropped_after_reset;
    out.bytes_requested += b.bytes_requested;
    out.batches += b.batches;
    out.full_batches += b.full_batches;
    out.flush_failures += b.flush_failures;
    out
}
