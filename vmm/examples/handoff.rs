//! A confidential-VM memory hand-off, host side: the starting point for a
//! hand-off test of your own.
//!
//! ```sh
//! cargo run -p vmm --example handoff            # 2 vCPUs
//! cargo run -p vmm --example handoff -- 4       # 4 vCPUs
//! ```
//!
//! It boots the bundled guest kernel with `scenario=handoff buffer=... len=...`
//! and plays the host half of the protocol through a second host mapping of
//! the buffer (`RunningVm::alias`), the "shared" view of guest memory:
//!
//! | mailbox (u64 at `buffer`) | who writes it | meaning |
//! | --- | --- | --- |
//! | 1 | guest | the data holds the guest pattern and was flushed: handed to the host |
//! | 2 | host | the host checked it and wrote its own pattern |
//! | 3 | guest | the guest invalidated the data and read the host pattern back |
//!
//! The data is `[buffer + 64, buffer + len)`; the `u64` at data offset `o`
//! holds `GUEST_PATTERN ^ o`, then `HOST_PATTERN ^ o`.
//!
//! The host's lines (`host: ...`) go to stderr, the guest's (`handoff: ...`,
//! through its UART) to stdout, so the two never mix within a line. Exits 0
//! when both halves succeed, 1 otherwise.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::GuestAddress;
use vmm::alias::SharedAlias;
use vmm::vcpu::VmOutcome;
use vmm::vm::{Vm, VmConfig};

/// The buffer: guest-physical address and length. Any 64-byte aligned range
/// of guest RAM clear of the kernel image (which lies below 4 MiB) will do.
const BUFFER: u64 = 0x100_0000;
const LEN: usize = 64 * 1024;
/// The mailbox is the buffer's first cache line; the data follows it.
const DATA: usize = 64;

const HANDED_TO_HOST: u64 = 1;
const HOST_DONE: u64 = 2;
const GUEST_VERIFIED: u64 = 3;
const GUEST_PATTERN: u64 = 0x4755_4553_5400_0000; // "GUEST" in the top bytes
const HOST_PATTERN: u64 = 0x484f_5354_0000_0000; // "HOST"

/// How long the host waits for the guest at most.
const PATIENCE: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    let vcpus = match std::env::args().nth(1).map(|a| a.parse::<u32>()) {
        None => 2,
        Some(Ok(n)) => n,
        Some(Err(_)) => {
            eprintln!("usage: handoff [VCPUS]");
            return ExitCode::from(2);
        }
    };

    // 1. Start the VM: the bundled guest kernel, told where the buffer is.
    let config = VmConfig {
        vcpus,
        cmdline: format!("scenario=handoff buffer={BUFFER:#x} len={LEN}"),
        ..VmConfig::new(vmm::BUNDLED_GUEST_KERNEL.to_vec())
    };
    eprintln!("host: starting a {vcpus}-vCPU VM: {}", config.cmdline);
    let vm = match Vm::new(&config).and_then(|vm| vm.start()) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("host: cannot start the VM: {e}");
            return ExitCode::from(1);
        }
    };

    // 2. Map the buffer a second time. The alias does not borrow the VM, so
    //    it can go to another thread while `wait` consumes the VM below.
    let alias = match vm.alias(GuestAddress(BUFFER), LEN) {
        Ok(alias) => alias,
        Err(e) => {
            eprintln!("host: cannot map the buffer: {e}");
            return ExitCode::from(1);
        }
    };
    eprintln!(
        "host: buffer {BUFFER:#x}+{LEN:#x} mapped again at host address {:p}",
        alias.as_ptr()
    );

    // 3. Play the host half on a thread. The cache-flush device is served by
    //    the control loop that `wait` runs, and the guest flushes before it
    //    hands the buffer over: waiting for the mailbox before calling
    //    `wait` would wait forever.
    let vm_ended = Arc::new(AtomicBool::new(false));
    let host = {
        let vm_ended = vm_ended.clone();
        std::thread::spawn(move || host_half(&alias, &vm_ended))
    };

    // 4. Run the VM until the guest gives its verdict.
    let outcome = vm.wait();
    vm_ended.store(true, Ordering::SeqCst);
    let host = host
        .join()
        .unwrap_or_else(|_| Err("the host thread panicked".into()));

    match (&outcome, &host) {
        (Ok(VmOutcome::GuestExit { status: 0, .. }), Ok(())) => {
            eprintln!("host: hand-off complete: the guest read back what the host wrote");
            ExitCode::SUCCESS
        }
        _ => {
            if let Err(e) = &host {
                eprintln!("host: the host half failed: {e}");
            }
            eprintln!("host: the VM ended with {outcome:?}");
            ExitCode::from(1)
        }
    }
}

/// The host's half of the protocol.
fn host_half(alias: &SharedAlias, vm_ended: &AtomicBool) -> Result<(), String> {
    eprintln!("host: waiting for mailbox=1");
    wait_for(alias, HANDED_TO_HOST, vm_ended)?;

    let mut data = vec![0u8; LEN - DATA];
    alias.read(DATA, &mut data).map_err(|e| e.to_string())?;
    for (i, word) in data.chunks_exact(8).enumerate() {
        let offset = 8 * i as u64;
        let value = u64::from_le_bytes(word.try_into().expect("8 bytes"));
        if value != GUEST_PATTERN ^ offset {
            return Err(format!(
                "data word at +{offset:#x} is {value:#018x}, expected the guest's {:#018x}",
                GUEST_PATTERN ^ offset
            ));
        }
    }
    eprintln!(
        "host: mailbox=1: the guest pattern is in all {} bytes",
        data.len()
    );

    for (i, word) in data.chunks_exact_mut(8).enumerate() {
        word.copy_from_slice(&(HOST_PATTERN ^ (8 * i as u64)).to_le_bytes());
    }
    alias.write(DATA, &data).map_err(|e| e.to_string())?;
    // The data before the mailbox: a Release store, paired with the
    // guest's Acquire load of the mailbox.
    alias.store_u64(0, HOST_DONE).map_err(|e| e.to_string())?;
    eprintln!("host: host pattern written; mailbox=2");

    wait_for(alias, GUEST_VERIFIED, vm_ended)?;
    eprintln!("host: mailbox=3: the guest verified the host pattern");
    Ok(())
}

/// Polls the mailbox until it holds `value`.
fn wait_for(alias: &SharedAlias, value: u64, vm_ended: &AtomicBool) -> Result<(), String> {
    let start = Instant::now();
    loop {
        // Read the flag first: if the VM had ended before the mailbox was
        // read, the mailbox is final.
        let ended = vm_ended.load(Ordering::SeqCst);
        // Acquire: the guest's data is visible once its mailbox value is.
        let seen = alias.load_u64(0).map_err(|e| e.to_string())?;
        if seen == value {
            return Ok(());
        }
        if ended {
            return Err(format!(
                "the VM ended with the mailbox at {seen}, not {value}"
            ));
        }
        if start.elapsed() > PATIENCE {
            return Err(format!("mailbox still {seen} after {PATIENCE:?}"));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
