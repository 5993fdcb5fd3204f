//! Hand-off tests that catch a missing flush: the dirty-page audit names the
//! exact pages the guest wrote after their last covering flush, and a pause
//! hook checks the handed-over buffer while no vCPU can touch it.
//!
//! The guest's `handoff` scenario plants the bug with `variant=`: the data is
//! right in every variant (a coherent host hides a missing flush), so only
//! the audit can tell them apart. The mailbox shares the buffer's first page
//! with the start of the data and is written after the flush by design, so
//! the audit is asked about the data pages after the first.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::audit::UnflushedPage;
use vmm::flush_engine::{BatchOutcome, HookFilter, PauseHook, PausedBatch};
use vmm::vcpu::VmOutcome;
use vmm::vm::{RunningVm, Vm, VmConfig};

const BUFFER: u64 = 0x100_0000;
const LEN: u64 = 64 * 1024;
const DATA: u64 = BUFFER + 64;
const PAGE: u64 = 4096;
const LATE_WRITE_OFFSET: u64 = 0x2008;
const HANDED_TO_HOST: u64 = 1;
const HOST_DONE: u64 = 2;
const GUEST_PATTERN: u64 = 0x4755_4553_5400_0000;
const HOST_PATTERN: u64 = 0x484f_5354_0000_0000;
const DEADLINE: Duration = Duration::from_secs(60);

fn start(vcpus: u32, variant: &str, audit: bool) -> RunningVm {
    let config = VmConfig {
        vcpus,
        audit,
        cmdline: format!("scenario=handoff buffer={BUFFER:#x} len={LEN} variant={variant}"),
        serial_out: Some(Arc::new(Mutex::new(Vec::new()))),
        ..VmConfig::new(vmm::BUNDLED_GUEST_KERNEL.to_vec())
    };
    Vm::new(&config).expect("VM set-up").start().expect("start")
}

fn wait_mailbox(memory: &GuestMemoryMmap, value: u64, ended: &AtomicBool) -> Result<(), String> {
    let start = Instant::now();
    loop {
        let was_ended = ended.load(Ordering::SeqCst);
        let seen: u64 = memory
            .load(GuestAddress(BUFFER), Ordering::Acquire)
            .map_err(|e| e.to_string())?;
        if seen == value {
            return Ok(());
        }
        if was_ended || start.elapsed() > DEADLINE {
            return Err(format!("mailbox {seen}, waiting for {value}"));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The host half of the protocol; `inspect` runs once the guest handed the
/// buffer over (mailbox 1), before the host writes its pattern.
fn host_half(
    memory: &GuestMemoryMmap,
    ended: &AtomicBool,
    inspect: impl FnOnce(),
) -> Result<(), String> {
    wait_mailbox(memory, HANDED_TO_HOST, ended)?;
    inspect();
    for o in (0..LEN - 64).step_by(8) {
        memory
            .write_obj(HOST_PATTERN ^ o, GuestAddress(DATA + o))
            .map_err(|e| e.to_string())?;
    }
    memory
        .store(HOST_DONE, GuestAddress(BUFFER), Ordering::Release)
        .map_err(|e| e.to_string())
}

/// Runs the hand-off with the audit on; returns the audit's answer for the
/// data pages after the first, taken when the guest handed the buffer over.
fn audited_handoff(vcpus: u32, variant: &str) -> Vec<UnflushedPage> {
    let vm = start(vcpus, variant, true);
    let audit = vm.audit().expect("audit enabled").clone();
    let memory = vm.memory().clone();
    let ended = Arc::new(AtomicBool::new(false));
    let found = Arc::new(Mutex::new(None));
    let host = {
        let (ended, found) = (ended.clone(), found.clone());
        std::thread::spawn(move || {
            host_half(&memory, &ended, || {
                *found.lock().unwrap() = Some(
                    audit
                        .unflushed_writes(GuestAddress(BUFFER + PAGE), LEN - PAGE)
                        .expect("dirty log"),
                );
            })
        })
    };
    let outcome = vm.wait().expect("control loop");
    ended.store(true, Ordering::SeqCst);
    host.join().unwrap().expect("host half");
    assert!(
        matches!(outcome, VmOutcome::GuestExit { status: 0, .. }),
        "{variant} on {vcpus} vCPUs: {outcome:?}"
    );
    let found = found.lock().unwrap().take();
    found.expect("the audit was read")
}

fn pages(found: &[UnflushedPage]) -> Vec<u64> {
    found.iter().map(|p| p.page.0).collect()
}

#[test]
fn the_audit_finds_nothing_after_a_correct_handoff() {
    if !common::kvm_or_skip("the_audit_finds_nothing_after_a_correct_handoff") {
        return;
    }
    for vcpus in [1, 2, 4] {
        let found = audited_handoff(vcpus, "flush");
        assert!(found.is_empty(), "{vcpus} vCPUs: {found:?}");
    }
}

#[test]
fn the_audit_names_every_page_handed_over_without_a_flush() {
    if !common::kvm_or_skip("the_audit_names_every_page_handed_over_without_a_flush") {
        return;
    }
    let expected: Vec<u64> = (1..LEN / PAGE).map(|p| BUFFER + p * PAGE).collect();
    for vcpus in [1, 2, 4] {
        let found = audited_handoff(vcpus, "no-flush");
        assert_eq!(pages(&found), expected, "{vcpus} vCPUs");
    }
}

#[test]
fn the_audit_names_exactly_the_page_written_after_the_flush() {
    if !common::kvm_or_skip("the_audit_names_exactly_the_page_written_after_the_flush") {
        return;
    }
    let late_page = (BUFFER + LATE_WRITE_OFFSET) & !(PAGE - 1);
    for vcpus in [1, 2, 4] {
        let found = audited_handoff(vcpus, "late-write");
        assert_eq!(pages(&found), [late_page], "{vcpus} vCPUs");
    }
}

/// Checks the guest pattern in a hook, inside the pause of the flush that
/// covers the data (the guest's step 1), and counts what it saw.
struct CheckWhilePaused {
    checked: AtomicU64,
    fail: bool,
}

impl PauseHook<GuestMemoryMmap> for CheckWhilePaused {
    fn after_flush(&self, batch: &PausedBatch, memory: &GuestMemoryMmap) -> Result<(), String> {
        let covers_data = batch
            .extents
            .iter()
            .any(|&(a, l)| a.0 <= DATA && DATA + (LEN - 64) <= a.0 + l);
        if !covers_data {
            return Ok(());
        }
        let mailbox: u64 = memory
            .read_obj(GuestAddress(BUFFER))
            .map_err(|e| e.to_string())?;
        if mailbox >= HOST_DONE {
            // The guest's step 3 flush (after the host's pattern): not ours.
            return Ok(());
        }
        for o in (0..LEN - 64).step_by(8) {
            let word: u64 = memory
                .read_obj(GuestAddress(DATA + o))
                .map_err(|e| e.to_string())?;
            if word != GUEST_PATTERN ^ o {
                return Err(format!("data word +{o:#x} is {word:#x}"));
            }
        }
        self.checked.fetch_add(1, Ordering::SeqCst);
        if self.fail {
            Err("the test's hook rejects this hand-off".into())
        } else {
            Ok(())
        }
    }
}

fn hooked_handoff(vcpus: u32, fail: bool) -> (VmOutcome, u64, usize) {
    let vm = start(vcpus, "flush", false);
    let hook = Arc::new(CheckWhilePaused {
        checked: AtomicU64::new(0),
        fail,
    });
    vm.flush_engine()
        .add_pause_hook(HookFilter::EveryBatch, hook.clone());
    let log = vm.flush_engine().flush_log().clone();
    let memory = vm.memory().clone();
    let ended = Arc::new(AtomicBool::new(false));
    let host = {
        let ended = ended.clone();
        std::thread::spawn(move || host_half(&memory, &ended, || {}))
    };
    let outcome = vm.wait().expect("control loop");
    ended.store(true, Ordering::SeqCst);
    let _ = host.join().unwrap();
    let failed = log
        .since(0)
        .iter()
        .filter(|r| r.outcome != BatchOutcome::Ok)
        .count();
    (outcome, hook.checked.load(Ordering::SeqCst), failed)
}

#[test]
fn a_pause_hook_checks_the_handed_over_buffer_while_the_guest_is_paused() {
    if !common::kvm_or_skip("a_pause_hook_checks_the_handed_over_buffer_while_the_guest_is_paused")
    {
        return;
    }
    for vcpus in [1, 2, 4] {
        let (outcome, checked, failed) = hooked_handoff(vcpus, false);
        assert!(
            matches!(outcome, VmOutcome::GuestExit { status: 0, .. }),
            "{vcpus} vCPUs: {outcome:?}"
        );
        assert_eq!((checked, failed), (1, 0), "{vcpus} vCPUs");
    }
}

#[test]
fn a_failing_pause_hook_fails_the_guests_flush() {
    if !common::kvm_or_skip("a_failing_pause_hook_fails_the_guests_flush") {
        return;
    }
    let (outcome, checked, failed) = hooked_handoff(2, true);
    assert_eq!(checked, 1);
    assert_eq!(failed, 1, "the hooked batch was answered HOST_ERROR");
    assert!(
        matches!(outcome, VmOutcome::GuestExit { status: 1, .. }),
        "the guest saw its flush fail: {outcome:?}"
    );
}
