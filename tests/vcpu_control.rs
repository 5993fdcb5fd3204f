//! The vCPU control channel on real KVM: busy vCPUs are paused, parked and
//! released, with a hand-assembled guest whose vCPUs count in ring 3.
//!
//! Each test builds a tiny kernel: at CPL 0 it sets a stack, points `rax` at
//! its own counter (`COUNTERS + 64 * vcpu`, one cache line each), drops to
//! ring 3 with `iretq` through the VMM's boot GDT, and then runs
//! `inc qword [rax]; jmp $-3` forever, natively.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm::vcpu::control::RunState;
use vmm::vcpu::VmOutcome;
use vmm::vm::{RunningVm, Vm, VmConfig};

const COUNTERS: u64 = 0x30_0000;
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a resumed vCPU may take to show progress before the test calls
/// its wake-up lost. Generous: a deadline for a hang, not a timing check.
const PROGRESS_DEADLINE: Duration = Duration::from_secs(10);

/// What one vCPU does before it starts counting.
#[derive(Clone, Copy)]
enum Detour {
    None,
    /// vCPU `k` executes HLT (its thread leaves its loop).
    Halt(u8),
    /// vCPU `k` executes UD2 at CPL 0 with no IDT: a triple fault.
    TripleFault(u8),
}

fn counting_kernel(detour: Detour) -> Vec<u8> {
    let mut code = Vec::new();
    match detour {
        Detour::None => {}
        Detour::Halt(k) => code.extend_from_slice(&[0x83, 0xff, k, 0x75, 0x01, 0xf4]),
        Detour::TripleFault(k) => code.extend_from_slice(&[0x83, 0xff, k, 0x75, 0x02, 0x0f, 0x0b]),
    }
    code.extend_from_slice(&[
        0xbc, 0x00, 0x00, 0x28, 0x00, // mov esp, 0x280000
        0xb8, 0x00, 0x00, 0x30, 0x00, // mov eax, COUNTERS
        0x48, 0xc1, 0xe7, 0x06, // shl rdi, 6
        0x48, 0x01, 0xf8, // add rax, rdi
        0x6a, 0x1b, // push USER_DATA (ss)
        0x6a, 0x00, // push 0 (rsp, unused)
        0x68, 0x02, 0x30, 0x00, 0x00, // push 0x3002 (rflags: IOPL 3)
        0x6a, 0x23, // push USER_CODE (cs)
        0x48, 0x8d, 0x0d, 0x03, 0x00, 0x00, 0x00, // lea rcx, [rip + 3]
        0x51, // push rcx (rip)
        0x48, 0xcf, // iretq
        0x48, 0xff, 0x00, // loop: inc qword [rax]
        0xeb, 0xfb, // jmp loop
    ]);
    common::raw_kernel(&code)
}

fn start(vcpus: u32, detour: Detour) -> RunningVm {
    let config = VmConfig {
        vcpus,
        memory_mib: 16,
        ..VmConfig::new(counting_kernel(detour))
    };
    Vm::new(&config)
        .expect("VM set-up")
        .start()
        .expect("vCPUs start")
}

fn counter(vm: &RunningVm, vcpu: usize) -> u64 {
    vm.memory()
        .read_obj(GuestAddress(COUNTERS + 64 * vcpu as u64))
        .expect("counter is in RAM")
}

fn counters(vm: &RunningVm, vcpus: &[usize]) -> Vec<u64> {
    vcpus.iter().map(|&v| counter(vm, v)).collect()
}

/// Waits until every vCPU of `vcpus` has counted past `since`.
fn wait_for_progress(vm: &RunningVm, vcpus: &[usize], since: &[u64]) {
    let deadline = Instant::now() + PROGRESS_DEADLINE;
    loop {
        let now = counters(vm, vcpus);
        if now.iter().zip(since).all(|(n, s)| n > s) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "vCPUs {vcpus:?} made no progress after resume: {since:?} -> {now:?} (lost wake-up?)"
        );
        std::thread::yield_now();
    }
}

fn pause_resume_cycles(vcpus: u32, cycles: usize) {
    let vm = start(vcpus, Detour::None);
    let all: Vec<usize> = (0..vcpus as usize).collect();
    wait_for_progress(&vm, &all, &vec![0; all.len()]);
    let control = vm.control().clone();
    for cycle in 0..cycles {
        let frozen = {
            let pause = control.pause_all(PAUSE_TIMEOUT).expect("pause");
            assert_eq!(
                control.vcpus_in_kvm_run(),
                0,
                "cycle {cycle}: a vCPU is in KVM_RUN while paused"
            );
            assert_eq!(pause.parked(), all);
            let before = counters(&vm, &all);
            // Give a vCPU that wrongly kept running the chance to show it.
            std::thread::sleep(Duration::from_micros(200));
            let after = counters(&vm, &all);
            assert_eq!(
                before, after,
                "cycle {cycle}: guest counters moved while paused"
            );
            after
        };
        wait_for_progress(&vm, &all, &frozen);
    }
    assert_eq!(vm.outcome(), None, "the guest must still be running");
    assert_eq!(vm.stop(), VmOutcome::Signal(0));
}

#[test]
fn pause_and_resume_one_busy_vcpu_1000_times() {
    if common::kvm_or_skip("pause_and_resume_one_busy_vcpu_1000_times") {
        pause_resume_cycles(1, 1000);
    }
}

#[test]
fn pause_and_resume_four_busy_vcpus_1000_times() {
    if common::kvm_or_skip("pause_and_resume_four_busy_vcpus_1000_times") {
        pause_resume_cycles(4, 1000);
    }
}

#[test]
fn pausing_a_subset_leaves_the_others_running() {
    if !common::kvm_or_skip("pausing_a_subset_leaves_the_others_running") {
        return;
    }
    let vm = start(2, Detour::None);
    wait_for_progress(&vm, &[0, 1], &[0, 0]);
    let control = vm.control().clone();
    let pause = control.pause(&[0], PAUSE_TIMEOUT).expect("pause vCPU 0");
    let frozen = counter(&vm, 0);
    let other = counter(&vm, 1);
    wait_for_progress(&vm, &[1], &[other]);
    assert_eq!(counter(&vm, 0), frozen, "paused vCPU 0 kept counting");
    assert_eq!(control.run_state(0), RunState::Parked);
    assert_eq!(control.run_state(1), RunState::Running);
    drop(pause);
    wait_for_progress(&vm, &[0], &[frozen]);
    vm.stop();
}

#[test]
fn work_runs_once_on_each_parked_vcpu_thread() {
    if !common::kvm_or_skip("work_runs_once_on_each_parked_vcpu_thread") {
        return;
    }
    let vm = start(3, Detour::None);
    wait_for_progress(&vm, &[0, 1, 2], &[0, 0, 0]);
    let control = vm.control().clone();
    let pause = control.pause_all(PAUSE_TIMEOUT).expect("pause");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let ran = pause
        .run_on_parked(
            Arc::new(move |vcpu| {
                let thread = std::thread::current().name().unwrap_or("").to_string();
                record.lock().unwrap().push((vcpu, thread));
            }),
            PAUSE_TIMEOUT,
        )
        .expect("work completes");
    assert_eq!(ran, vec![0, 1, 2]);
    let mut seen = seen.lock().unwrap().clone();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            (0, "vcpu0".into()),
            (1, "vcpu1".into()),
            (2, "vcpu2".into())
        ]
    );
    drop(pause);
    vm.stop();
}

#[test]
fn a_halted_vcpu_is_paused_at_once_and_still_takes_work() {
    if !common::kvm_or_skip("a_halted_vcpu_is_paused_at_once_and_still_takes_work") {
        return;
    }
    let vm = start(2, Detour::Halt(1));
    wait_for_progress(&vm, &[0], &[0]);
    let control = vm.control().clone();
    let deadline = Instant::now() + PROGRESS_DEADLINE;
    while control.run_state(1) != RunState::Halted {
        assert!(Instant::now() < deadline, "vCPU 1 never halted");
        std::thread::yield_now();
    }
    for _ in 0..100 {
        let pause = control
            .pause_all(PAUSE_TIMEOUT)
            .expect("pause with a halted vCPU");
        // The halted vCPU's thread is still there and takes work.
        assert_eq!(pause.parked(), vec![0, 1]);
        let ran = Arc::new(Mutex::new(Vec::new()));
        let record = ran.clone();
        let on = pause
            .run_on_parked(
                Arc::new(move |vcpu| record.lock().unwrap().push(vcpu)),
                PAUSE_TIMEOUT,
            )
            .expect("work on the parked and the halted vCPU");
        assert_eq!(on, vec![0, 1]);
        let mut ran = ran.lock().unwrap().clone();
        ran.sort_unstable();
        assert_eq!(ran, vec![0, 1]);
        drop(pause);
        assert_eq!(control.run_state(1), RunState::Halted, "stays halted");
    }
    assert_eq!(
        vm.outcome(),
        None,
        "one halted vCPU of two does not end the VM"
    );
    vm.stop();
}

#[test]
fn a_triple_faulting_vcpu_ends_the_vm_and_pauses_still_work() {
    if !common::kvm_or_skip("a_triple_faulting_vcpu_ends_the_vm_and_pauses_still_work") {
        return;
    }
    let vm = start(2, Detour::TripleFault(1));
    wait_for_progress(&vm, &[0], &[0]);
    let control = vm.control().clone();
    let deadline = Instant::now() + PROGRESS_DEADLINE;
    while vm.outcome().is_none() {
        assert!(
            Instant::now() < deadline,
            "the triple fault was never reported"
        );
        std::thread::yield_now();
    }
    match vm.outcome() {
        Some(VmOutcome::Crash {
            vcpu: Some(1),
            reason,
        }) => {
            assert!(reason.contains("triple fault"), "{reason}")
        }
        other => panic!("unexpected outcome {other:?}"),
    }
    let pause = control
        .pause_all(PAUSE_TIMEOUT)
        .expect("pause after a crash");
    assert_eq!(pause.parked(), vec![0]);
    drop(pause);
    vm.stop();
}

#[test]
fn finishing_during_a_pause_waits_for_it_then_ends_every_thread() {
    if !common::kvm_or_skip("finishing_during_a_pause_waits_for_it_then_ends_every_thread") {
        return;
    }
    let vm = start(2, Detour::None);
    wait_for_progress(&vm, &[0, 1], &[0, 0]);
    let control = vm.control().clone();
    let pause = control.pause_all(PAUSE_TIMEOUT).expect("pause");
    let finisher = {
        let control = control.clone();
        std::thread::spawn(move || control.finish(Duration::from_secs(30)))
    };
    // A pause's work must not lose its workers to a concurrent stop.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(control.run_state(0), RunState::Parked);
    assert_eq!(control.run_state(1), RunState::Parked);
    drop(pause);
    assert!(finisher.join().unwrap().is_empty(), "threads stuck");
    assert_eq!(control.run_state(0), RunState::Exited);
    assert_eq!(control.run_state(1), RunState::Exited);
    vm.stop();
}
