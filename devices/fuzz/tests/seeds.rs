//! Replays the committed seed corpus (`seeds/TARGET/*`) through the harness
//! on the stable toolchain, without libFuzzer: a quick regression check of
//! the harness and the device (`cargo test` in this directory).

use std::path::Path;

use arbitrary::{Arbitrary, Unstructured};
use devices_fuzz::{run_mmio_registers, run_request_path, MmioInput, RequestPathInput};

fn replay<T: for<'a> Arbitrary<'a>>(target: &str, run: impl Fn(&T)) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("seeds")
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return 0;
    };
    let mut count = 0;
    for entry in entries {
        let path = entry.expect("seed directory entry").path();
        let data = std::fs::read(&path).expect("readable seed");
        // The same decoding as libfuzzer-sys's `fuzz_target!(|input: T| ...)`.
        if data.len() < T::size_hint(0).0 {
            continue;
        }
        if let Ok(input) = T::arbitrary_take_rest(Unstructured::new(&data)) {
            run(&input);
            count += 1;
        }
    }
    count
}

#[test]
fn request_path_seeds() {
    let n = replay::<RequestPathInput>("request_path", |i| {
        run_request_path(i);
    });
    assert!(
        n > 0,
        "no request_path seed decoded (seeds/request_path/ missing?)"
    );
    println!("{n} request_path seeds replayed");
}

#[test]
fn mmio_registers_seeds() {
    let n = replay::<MmioInput>("mmio_registers", |i| {
        run_mmio_registers(i);
    });
    assert!(
        n > 0,
        "no mmio_registers seed decoded (seeds/mmio_registers/ missing?)"
    );
    println!("{n} mmio_registers seeds replayed");
}
