//! The confidential-VM hand-off end to end, as a host program plays it: the
//! VMM as a library, the bundled guest's `handoff` scenario, and a second
//! host mapping of the buffer (`RunningVm::alias`) through which the host
//! half of the protocol runs (see the README, "Writing your own hand-off
//! test", and `vmm/examples/handoff.rs`).
//!
//! The host half runs on a thread while `RunningVm::wait` runs the control
//! loop on the test's thread: the cache-flush device is served by that loop,
//! and the guest's first flush comes before it hands the buffer over, so
//! polling the mailbox before calling `wait` would never see it change.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{describe, run_vmm};
use vm_memory::GuestAddress;
use vmm::alias::SharedAlias;
use vmm::vcpu::VmOutcome;
use vmm::vm::{Vm, VmConfig};

/// Where the buffer is and how long (the guest's defaults, passed anyway).
const BUFFER: u64 = 0x100_0000;
const LEN: usize = 64 * 1024;
/// The mailbox is the first cache line; the data follows.
const DATA: usize = 64;
const HANDED_TO_HOST: u64 = 1;
const HOST_DONE: u64 = 2;
const GUEST_VERIFIED: u64 = 3;
/// The `u64` at data offset `o` is `GUEST_PATTERN ^ o` after the guest's
/// step and `HOST_PATTERN ^ o` after the host's.
const GUEST_PATTERN: u64 = 0x4755_4553_5400_0000;
const HOST_PATTERN: u64 = 0x484f_5354_0000_0000;
/// How long the host waits for the guest: a hang guard only.
const DEADLINE: Duration = Duration::from_secs(60);

/// The mailbox word (Acquire: pairs with the guest's Release store, so the
/// guest's data is visible once its value is).
fn mailbox(alias: &SharedAlias) -> u64 {
    alias.load_u64(0).expect("mailbox inside the alias")
}

/// Sets the mailbox (Release: the host's data before the value).
fn set_mailbox(alias: &SharedAlias, value: u64) {
    alias.store_u64(0, value).expect("mailbox inside the alias");
}

/// Polls the mailbox until it holds `value`; `Err` with what it saw if the
/// VM ended or the deadline passed first.
fn wait_for(alias: &SharedAlias, value: u64, vm_ended: &AtomicBool) -> Result<(), String> {
    let start = Instant::now();
    loop {
        // Whether the VM had ended before this read: if so, `seen` is final.
        let ended = vm_ended.load(Ordering::SeqCst);
        let seen = mailbox(alias);
        if seen == value {
            return Ok(());
        }
        if ended {
            return Err(format!(
                "the VM ended with the mailbox at {seen}, not {value}"
            ));
        }
        if start.elapsed() > DEADLINE {
            return Err(format!(
                "mailbox still {seen} after {DEADLINE:?}, waiting for {value}"
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// How the host plays its half.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Host {
    /// As the protocol says.
    Honest,
    /// Writes the host pattern with one word wrong.
    OneWrongWord,
}

/// The host half: wait for 1, check the guest pattern, write the host
/// pattern, set 2, wait for 3 (or for the VM to end).
fn host_side(alias: &SharedAlias, vm_ended: &AtomicBool, host: Host) -> Result<(), String> {
    wait_for(alias, HANDED_TO_HOST, vm_ended)?;
    let mut data = vec![0u8; LEN - DATA];
    alias.read(DATA, &mut data).map_err(|e| e.to_string())?;
    for (i, word) in data.chunks_exact(8).enumerate() {
        let offset = 8 * i as u64;
        let value = u64::from_le_bytes(word.try_into().unwrap());
        if value != GUEST_PATTERN ^ offset {
            return Err(format!(
                "guest pattern: word at +{offset:#x} is {value:#x}, expected {:#x}",
                GUEST_PATTERN ^ offset
            ));
        }
    }
    for (i, word) in data.chunks_exact_mut(8).enumerate() {
        word.copy_from_slice(&(HOST_PATTERN ^ (8 * i as u64)).to_le_bytes());
    }
    if host == Host::OneWrongWord {
        data[1000..1008].copy_from_slice(&0xbad_u64.to_le_bytes());
    }
    alias.write(DATA, &data).map_err(|e| e.to_string())?;
    set_mailbox(alias, HOST_DONE);
    if host == Host::Honest {
        wait_for(alias, GUEST_VERIFIED, vm_ended)?;
    }
    Ok(())
}

/// Kills the test process if a run hangs (the guest's own timeout should
/// end every run long before): a hang must fail, not block the suite.
fn watchdog(what: String) -> Arc<AtomicBool> {
    let done = Arc::new(AtomicBool::new(false));
    let flag = done.clone();
    std::thread::spawn(move || {
        let start = Instant::now();
        while !flag.load(Ordering::SeqCst) {
            if start.elapsed() > 2 * DEADLINE {
                eprintln!("{what}: still running after {:?}; aborting", 2 * DEADLINE);
                std::process::exit(101);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    done
}

/// What one run left behind.
struct Run {
    outcome: VmOutcome,
    /// The host half's result.
    host: Result<(), String>,
    mailbox: u64,
    /// The guest's console output (captured, not printed: the negative
    /// case's expected FAILED line must not look like a test failure).
    console: String,
}

/// Runs the guest's `handoff` on `vcpus` vCPUs against `host`.
fn handoff(vcpus: u32, host: Host) -> Run {
    let what = format!("handoff on {vcpus} vCPUs, host {host:?}");
    let watchdog = watchdog(what.clone());
    let console = Arc::new(Mutex::new(Vec::new()));
    let config = VmConfig {
        vcpus,
        cmdline: format!("scenario=handoff buffer={BUFFER:#x} len={LEN}"),
        serial_out: Some(console.clone()),
        ..VmConfig::new(vmm::BUNDLED_GUEST_KERNEL.to_vec())
    };
    let vm = Vm::new(&config).expect("VM set-up").start().expect("start");
    // The alias is independent of the RunningVm: take it before `wait`
    // consumes the VM.
    let alias = vm
        .alias(GuestAddress(BUFFER), LEN)
        .expect("alias of the buffer");
    let vm_ended = Arc::new(AtomicBool::new(false));
    let host_thread = {
        let vm_ended = vm_ended.clone();
        std::thread::spawn(move || {
            let result = host_side(&alias, &vm_ended, host);
            (result, alias)
        })
    };
    let outcome = vm.wait().expect("control loop");
    vm_ended.store(true, Ordering::SeqCst);
    let (result, alias) = host_thread.join().expect("host thread");
    let last = mailbox(&alias);
    watchdog.store(true, Ordering::SeqCst);
    let console = String::from_utf8_lossy(&console.lock().unwrap()).into_owned();
    Run {
        outcome,
        host: result,
        mailbox: last,
        console,
    }
}

#[test]
fn handoff_round_trip_on_1_2_4_vcpus() {
    if !common::kvm_or_skip("handoff_round_trip_on_1_2_4_vcpus") {
        return;
    }
    for vcpus in [1, 2, 4] {
        let run = handoff(vcpus, Host::Honest);
        assert!(
            matches!(run.outcome, VmOutcome::GuestExit { status: 0, .. }),
            "{vcpus} vCPUs: guest verdict {:?}, host side {:?}\n{}",
            run.outcome,
            run.host,
            run.console
        );
        assert_eq!(run.host, Ok(()), "{vcpus} vCPUs: host side");
        assert_eq!(run.mailbox, GUEST_VERIFIED, "{vcpus} vCPUs: final mailbox");
    }
}

/// A host that writes one word wrong: the guest finds it after its
/// invalidation and fails (status 1), leaving the mailbox at 2.
#[test]
fn the_guest_notices_a_wrong_word_from_the_host() {
    if !common::kvm_or_skip("the_guest_notices_a_wrong_word_from_the_host") {
        return;
    }
    let run = handoff(2, Host::OneWrongWord);
    assert_eq!(run.host, Ok(()));
    assert!(
        matches!(run.outcome, VmOutcome::GuestExit { status: 1, .. }),
        "guest verdict {:?}\n{}",
        run.outcome,
        run.console
    );
    assert_eq!(run.mailbox, HOST_DONE);
    // The guest names the word the host wrote wrong (word 125 of the data).
    assert!(
        run.console
            .contains("handoff: FAILED: data word at +0x3e8 (gpa 0x1000428) is 0x0000000000000bad"),
        "{}",
        run.console
    );
}

/// No host at all: the guest gives up after its timeout with one clear
/// line and exit code 1 (CLI, so the line can be checked).
#[test]
fn without_a_host_the_guest_gives_up_with_a_clear_message() {
    if !common::kvm_or_skip("without_a_host_the_guest_gives_up_with_a_clear_message") {
        return;
    }
    let out = run_vmm(&["--cmdline", "scenario=handoff timeout=1"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("handoff: buffer at 0x1000000")
            && stdout.contains("handoff: FAILED: no answer from the host: mailbox still 1"),
        "{}",
        describe(&out)
    );
}

/// A buffer outside guest RAM is refused before anything happens: one
/// line, exit code 1.
#[test]
fn a_buffer_outside_ram_is_refused_with_one_line() {
    if !common::kvm_or_skip("a_buffer_outside_ram_is_refused_with_one_line") {
        return;
    }
    let out = run_vmm(&["--cmdline", "scenario=handoff buffer=0x20000000"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("guest: bad option buffer=0x20000000 len=65536: not inside one RAM region"),
        "{}",
        describe(&out)
    );
}
