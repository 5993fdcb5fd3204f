//! Builds the bundled guest kernel (`guest-driver/kernel`) and tells the `vmm`
//! crate where the ELF is: `env!("BUNDLED_GUEST_KERNEL")` is its absolute path.
//!
//! The guest kernel is a freestanding `no_std` binary with its own profile
//! (`panic = "abort"`) and its own flags (static relocation model, no AVX, a
//! linker script), so it cannot be a member of this workspace. We build it with
//! a nested `cargo build` whose working directory is the kernel's directory, so
//! that the kernel's `.cargo/config.toml` applies, and whose environment is
//! cleaned of everything the outer cargo sets for this build script (flags,
//! wrappers such as clippy's `RUSTC_WORKSPACE_WRAPPER`, the target directory,
//! the jobserver) so that none of it leaks into the guest build.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Name of the guest kernel's binary target.
const KERNEL_BIN: &str = "guest-kernel";

/// Whether an environment variable set by the outer cargo (or by the user for
/// the outer build) must not reach the nested guest build.
fn leaks_into_guest_build(name: &str) -> bool {
    const EXACT: &[&str] = &[
        // Flags meant for the host crates.
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTDOCFLAGS",
        "CARGO_ENCODED_RUSTDOCFLAGS",
        // Wrappers: clippy sets RUSTC_WORKSPACE_WRAPPER, sccache RUSTC_WRAPPER.
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        // The outer target directory is locked by the outer cargo.
        "CARGO_TARGET_DIR",
        // The outer jobserver: its file descriptors are not ours.
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
        // Set for the package being built; meaningless for the guest.
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_MANIFEST_LINKS",
        "CARGO_PKG_NAME",
        "OUT_DIR",
        "TARGET",
        "HOST",
        "NUM_JOBS",
        "OPT_LEVEL",
        "DEBUG",
        "PROFILE",
        "RUSTC_LINKER",
    ];
    const PREFIXES: &[&str] = &[
        // Features and cfgs of the `vmm` package.
        "CARGO_FEATURE_",
        "CARGO_CFG_",
        "CARGO_PKG_",
        // CARGO_BUILD_TARGET, CARGO_BUILD_RUSTFLAGS, CARGO_BUILD_TARGET_DIR,
        // CARGO_BUILD_RUSTC_WRAPPER, ...
        "CARGO_BUILD_",
        // CARGO_TARGET_<triple>_RUSTFLAGS would override the kernel's
        // `build.rustflags`, and CARGO_TARGET_<triple>_RUNNER/LINKER are
        // meant for the host crates too.
        "CARGO_TARGET_",
        // Profile overrides (e.g. CARGO_PROFILE_RELEASE_PANIC) for the outer build.
        "CARGO_PROFILE_",
        // `cargo fix` / internal cargo plumbing.
        "__CARGO",
    ];
    EXACT.contains(&name) || PREFIXES.iter().any(|prefix| name.starts_with(prefix))
}

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let workspace = manifest_dir
        .parent()
        .expect("the vmm crate lives in the workspace root")
        .to_path_buf();
    let kernel_dir = workspace.join("guest-driver").join("kernel");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let target_dir = out_dir.join("guest-target");

    // Rebuild the guest whenever one of its inputs changes. The kernel
    // directory is listed file by file rather than as a whole, so a `target/`
    // left there by a manual build does not trigger rebuilds.
    for input in [
        kernel_dir.join("Cargo.toml"),
        kernel_dir.join("Cargo.lock"),
        kernel_dir.join("build.rs"),
        kernel_dir.join(".cargo").join("config.toml"),
        kernel_dir.join("src"),
        workspace.join("guest-driver").join("Cargo.toml"),
        workspace.join("guest-driver").join("src"),
        workspace.join("devices").join("abi").join("Cargo.toml"),
        workspace.join("devices").join("abi").join("src"),
        workspace.join("resources").join("guest-kernel.ld"),
        // The path crates inherit fields from the workspace manifest.
        workspace.join("Cargo.toml"),
    ] {
        println!("cargo:rerun-if-changed={}", input.display());
    }

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(&cargo);
    command
        .current_dir(&kernel_dir)
        .arg("build")
        .arg("--release")
        // The guest has no registry dependencies: never touch the network.
        .arg("--offline")
        .arg("--manifest-path")
        .arg(kernel_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    for (name, _) in env::vars_os() {
        if let Some(name) = name.to_str() {
            if leaks_into_guest_build(name) {
                command.env_remove(name);
            }
        }
    }

    let output = command.output().unwrap_or_else(|err| {
        panic!(
            "failed to run `{}` to build the guest kernel: {err}",
            Path::new(&cargo).display()
        )
    });
    if !output.status.success() {
        eprintln!("---- nested `cargo build` of {} ----", kernel_dir.display());
        eprintln!("{}", String::from_utf8_lossy(&output.stdout));
        eprintln!("{}", String::from_utf8_lossy(&output.stderr));
        panic!(
            "building the bundled guest kernel in {} failed ({}); its output is above. \
             Reproduce with: cd {} && cargo build --release",
            kernel_dir.display(),
            output.status,
            kernel_dir.display()
        );
    }

    // The guest build's warnings would otherwise vanish with its output.
    let stderr = String::from_utf8_lossy(&output.stderr);
    for line in stderr.lines().filter(|line| line.starts_with("warning")) {
        println!("cargo:warning=guest kernel: {line}");
    }

    let kernel = target_dir.join("release").join(KERNEL_BIN);
    assert!(
        kernel.is_file(),
        "the nested cargo build succeeded but {} does not exist",
        kernel.display()
    );
    println!("cargo:rustc-env=BUNDLED_GUEST_KERNEL={}", kernel.display());
}
