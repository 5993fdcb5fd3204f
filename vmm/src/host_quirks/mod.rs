//! Work-arounds for one kind of host: a KVM that **interprets guest ring 0**
//! (a software KVM such as this project's development machines' `kvm_pvm`,
//! see `shared/HOST-NOTES.md`) instead of running it with VMX or SVM. They
//! exist only so that a stock Linux kernel boots there; the bundled guest
//! needs none of them, and on a VMX/SVM host they are all inert.
//!
//! Each quirk, in one place:
//!
//! | quirk | what | why |
//! | --- | --- | --- |
//! | CPUID masks | hide CX16, XSAVE (leaf 0xD), AVX*, POPCNT, ... in `KVM_SET_CPUID2` | the emulator lacks `lock cmpxchg16b` and XSAVE; what the host does honour of the table keeps Linux off those paths |
//! | `clearcpuid=` | the kernel itself clears SMAP, POPCNT, SSE, ... | the guest sees the host CPU's leaf 1/7 whatever the table says; the emulator lacks CLAC/STAC, POPCNT, SSE arithmetic. 6.1 reads only the first 127 characters of the value, so the list is ordered by need and cut there |
//! | speed parameters | `mitigations=off tsc=reliable no_timer_check lpj=... cryptomgr.notests initcall_blacklist=...` | every ring-0 instruction costs ~0.24-2 µs: skip calibrations, self-tests and two tracing initcalls that held the boot for minutes; `mitigations=off` also keeps page-table isolation off, which the syscall remedy needs |
//! | INT3 | inject #BP with RIP+1 | the emulator cannot execute INT3 outside real mode (Linux's alternatives self-test and text poking use it) |
//! | FWAIT | skip it | the emulator lacks it; with no x87 exception pending it is a no-op |
//! | ring-3 `syscall` | [`syscall_remedy`] | the host runs `syscall` from guest ring 3 to LSTAR but leaves the vCPU in ring 3 |
//!
//! Which hosts: [`QuirkMode::Auto`] (the default) turns them on when the host
//! CPU has neither `vmx` nor `svm` in `/proc/cpuinfo` (KVM then cannot be
//! running guests in hardware), and off otherwise. `--host-quirks off`
//! turns them off, `--host-quirks on` forces them on. They apply to Linux
//! guests only.

pub mod emulation;
pub mod syscall_remedy;

use std::str::FromStr;

use kvm_bindings::CpuId;

/// Whether to use the quirks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum QuirkMode {
    /// On when the host has no hardware virtualization (no `vmx`/`svm`).
    #[default]
    Auto,
    /// Always on.
    On,
    /// Always off.
    Off,
}

impl FromStr for QuirkMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "on" => Ok(Self::On),
            "off" => Ok(Self::Off),
            _ => Err(format!("'{s}' is not one of auto, on, off")),
        }
    }
}

/// The decision for this host, made once per VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostQuirks {
    active: bool,
    why: String,
}

impl HostQuirks {
    /// Decides for this host, and logs the decision once.
    pub fn resolve(mode: QuirkMode) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let quirks = Self::decide(mode, &cpuinfo);
        if quirks.active {
            log::info!(
                "host quirks for an emulated guest ring 0 are on: {}",
                quirks.why
            );
        } else {
            log::debug!("host quirks are off: {}", quirks.why);
        }
        quirks
    }

    /// The decision for `mode` on a host whose `/proc/cpuinfo` is `cpuinfo`.
    pub fn decide(mode: QuirkMode, cpuinfo: &str) -> Self {
        let hardware = cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .flat_map(|l| l.split_whitespace())
            .find(|f| *f == "vmx" || *f == "svm");
        let (active, why) = match (mode, hardware) {
            (QuirkMode::Off, _) => (false, "turned off (--host-quirks off)".to_string()),
            (QuirkMode::On, _) => (true, "turned on (--host-quirks on)".to_string()),
            (QuirkMode::Auto, Some(flag)) => (
                false,
                format!("the host CPU has {flag}: KVM runs guests in hardware"),
            ),
            (QuirkMode::Auto, None) => (
                true,
                "the host CPU has neither vmx nor svm: KVM interprets guest ring 0 here"
                    .to_string(),
            ),
        };
        Self { active, why }
    }

    /// A decision with the quirks off (for callers that never boot Linux).
    pub fn inactive() -> Self {
        Self::decide(QuirkMode::Off, "")
    }

    /// Whether the quirks apply.
    pub fn active(&self) -> bool {
        self.active
    }

    /// Hides from the guest's CPUID table what KVM's instruction emulator
    /// cannot execute in ring 0. On this host the guest still reads the host
    /// CPU's leaves 1 and 7 (HOST-NOTES), so `clearcpuid=` does the rest;
    /// what is honoured (CX16 made the difference in the first boots, and
    /// leaf 0xD keeps Linux on FXSAVE) is needed.
    pub fn mask_cpuid(&self, cpuid: &mut CpuId) {
        if !self.active {
            return;
        }
        for e in cpuid.as_mut_slice() {
            match (e.function, e.index) {
                (1, _) => e.ecx &= !LEAF1_ECX_HIDDEN,
                (7, 0) => {
                    e.ebx &= LEAF7_EBX_KEPT;
                    e.ecx = 0;
                    e.edx = 0;
                }
                (7, 1) => e.eax = 0,
                (0xd, _) => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = 0;
                    e.edx = 0;
                }
                (0x8000_0001, _) => e.ecx &= !EXT1_ECX_HIDDEN,
                _ => {}
            }
        }
    }

    /// Kernel parameters the quirks need, to go after the user's own.
    pub fn kernel_parameters(&self) -> Vec<String> {
        if !self.active {
            return Vec::new();
        }
        let mut params: Vec<String> = SPEED_PARAMETERS.iter().map(|s| s.to_string()).collect();
        let (clear, dropped) = clearcpuid_value(CLEARCPUID_BY_NEED);
        if !dropped.is_empty() {
            log::debug!(
                "clearcpuid: {dropped:?} left out: Linux reads only the first {CLEARCPUID_MAX} characters"
            );
        }
        params.push(format!("clearcpuid={clear}"));
        params
    }
}

/// Leaf 1 ECX: PCLMULQDQ, FMA, CX16, PCID, MOVBE, POPCNT, AES, XSAVE, OSXSAVE,
/// AVX, F16C, RDRAND.
const LEAF1_ECX_HIDDEN: u32 = (1 << 1)
    | (1 << 12)
    | (1 << 13)
    | (1 << 17)
    | (1 << 22)
    | (1 << 23)
    | (1 << 25)
    | (1 << 26)
    | (1 << 27)
    | (1 << 28)
    | (1 << 29)
    | (1 << 30);
/// Leaf 7 EBX: only ERMS (fast `rep movsb`, which the emulator does) stays.
const LEAF7_EBX_KEPT: u32 = 1 << 9;
/// Leaf 0x8000_0001 ECX: ABM (LZCNT), PREFETCHW.
const EXT1_ECX_HIDDEN: u32 = (1 << 5) | (1 << 8);

/// Parameters that keep an interpreted ring 0 off slow or unsupported paths.
/// `lpj` skips the delay-loop calibration (its value only scales `udelay`
/// before the TSC takes over). Blacklisted initcalls:
/// `ftrace_check_for_weak_functions` checks every ftrace record (~37,000
/// kallsyms lookups) for weak functions: interpreted, it held CPU 0 for 3
/// minutes (soft-lockup reports), stalling RCU and with it the rest of the
/// boot; only the function tracer needs its result.
/// `trace_eval_init` queues the rewrite of every trace event's format with
/// the kernel's enum names under `event_mutex`: interpreted, it held that
/// mutex for minutes while `init_kprobe_trace` waited (a hung-task report at
/// guest uptime 321 s); without it trace formats show enum values as
/// numbers. `tracer_init_tracefs` creates tracefs' files for every trace
/// event: without it a silent 150 s gap after the clocksource switch went
/// away (tracefs stays empty). `blake2s_mod_init` only runs BLAKE2s'
/// self-test (14 s, found with `initcall_debug`: the Linux test's `/init`
/// then lists every initcall over a second). Not avoidable this way: the
/// first registration of BPF kfuncs makes the kernel parse and check all of
/// vmlinux's BTF (150 s); with `cubictcp_register` blacklisted, the next
/// registration (a late initcall) paid it instead.
const SPEED_PARAMETERS: &[&str] = &[
    "mitigations=off",
    "tsc=reliable",
    "no_timer_check",
    "lpj=2600000",
    "cryptomgr.notests",
    "initcall_blacklist=ftrace_check_for_weak_functions,trace_eval_init,tracer_init_tracefs,\
     blake2s_mod_init",
];

/// The longest `clearcpuid=` value Linux 6.1 reads (`char arg[128]`).
pub const CLEARCPUID_MAX: usize = 127;

/// Features to clear, most needed first: the ones a boot was seen to stop on
/// (SMAP's CLAC, POPCNT, XSAVE, SSE inside `kernel_fpu_begin`) come before
/// those that only avoid a risk.
pub const CLEARCPUID_BY_NEED: &[&str] = &[
    "smap",
    "smep",
    "pcid",
    "invpcid",
    "xsaves",
    "xsavec",
    "xsaveopt",
    "xsave",
    "popcnt",
    "sse",
    "rdseed",
    "rdrand",
    "avx",
    "avx2",
    "avx512f",
    "fsgsbase",
    "la57",
    "abm",
    "bmi1",
    "bmi2",
    "movbe",
    "sse3",
    "ssse3",
    "sse4_1",
    "sse4_2",
    "aes",
    "pclmulqdq",
    "sha_ni",
    "gfni",
    "vaes",
];

/// The comma-separated list of `features`, in order, cut to
/// [`CLEARCPUID_MAX`] characters at a whole name; returns the names left out.
/// A name cut in the middle would clear a different feature (`sse3` cut to
/// `sse`) or none, so nothing is ever cut.
pub fn clearcpuid_value<'a>(features: &[&'a str]) -> (String, Vec<&'a str>) {
    let mut value = String::new();
    let mut dropped = Vec::new();
    for &f in features {
        let extra = if value.is_empty() {
            f.len()
        } else {
            f.len() + 1
        };
        if dropped.is_empty() && value.len() + extra <= CLEARCPUID_MAX {
            if !value.is_empty() {
                value.push(',');
            }
            value.push_str(f);
        } else {
            dropped.push(f);
        }
    }
    (value, dropped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn auto_follows_the_host_cpu() {
        let soft = "flags\t\t: fpu vme de pse hypervisor\n";
        let vmx = "flags\t\t: fpu vme vmx hypervisor\n";
        let svm = "flags\t\t: fpu svm\n";
        assert!(HostQuirks::decide(QuirkMode::Auto, soft).active());
        assert!(!HostQuirks::decide(QuirkMode::Auto, vmx).active());
        assert!(!HostQuirks::decide(QuirkMode::Auto, svm).active());
        assert!(HostQuirks::decide(QuirkMode::On, vmx).active());
        assert!(!HostQuirks::decide(QuirkMode::Off, soft).active());
        // "vmx" inside another word does not count.
        let flag_prefix = "flags\t\t: fpu vmx_ept\n";
        assert!(HostQuirks::decide(QuirkMode::Auto, flag_prefix).active());
    }

    #[test]
    fn inert_when_off() {
        let q = HostQuirks::inactive();
        assert!(q.kernel_parameters().is_empty());
        let mut cpuid = CpuId::from_entries(&[kvm_cpuid_entry2 {
            function: 1,
            ecx: u32::MAX,
            ..Default::default()
        }])
        .unwrap();
        q.mask_cpuid(&mut cpuid);
        assert_eq!(cpuid.as_slice()[0].ecx, u32::MAX);
    }

    #[test]
    fn masks_cx16_xsave_and_leaf_7() {
        let q = HostQuirks::decide(QuirkMode::On, "");
        let mut cpuid = CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 1,
                ecx: u32::MAX,
                edx: u32::MAX,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 7,
                ebx: u32::MAX,
                ecx: u32::MAX,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xd,
                index: 1,
                eax: u32::MAX,
                ..Default::default()
            },
        ])
        .unwrap();
        q.mask_cpuid(&mut cpuid);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ecx & (1 << 13), 0, "CX16 hidden");
        assert_eq!(e[0].ecx & (1 << 26), 0, "XSAVE hidden");
        assert_ne!(e[0].ecx & 1, 0, "SSE3 bit untouched");
        assert_eq!(e[0].edx, u32::MAX, "leaf 1 EDX untouched");
        assert_eq!(e[1].ebx, 1 << 9, "only ERMS left in leaf 7 EBX");
        assert_eq!(e[1].ecx, 0);
        assert_eq!(e[2].eax, 0);
    }

    #[test]
    fn clearcpuid_keeps_whole_names_within_127_characters() {
        let (value, dropped) = clearcpuid_value(CLEARCPUID_BY_NEED);
        assert!(value.len() <= CLEARCPUID_MAX, "{} characters", value.len());
        // Every name is whole and in order; the first dropped one did not fit.
        let kept: Vec<&str> = value.split(',').collect();
        assert_eq!(kept, CLEARCPUID_BY_NEED[..kept.len()]);
        assert_eq!(dropped, CLEARCPUID_BY_NEED[kept.len()..]);
        assert!(!dropped.is_empty());
        assert!(value.len() + 1 + dropped[0].len() > CLEARCPUID_MAX);
        // The features boots were seen to stop on are inside the limit.
        for needed in ["smap", "popcnt", "sse", "xsave"] {
            assert!(kept.contains(&needed), "{needed} must be cleared");
        }
        // Exactly 127 fits; 128 does not.
        let a = "a".repeat(63);
        let b = "b".repeat(63);
        assert_eq!(clearcpuid_value(&[&a, &b]).0.len(), 127);
        let b = "b".repeat(64);
        assert_eq!(clearcpuid_value(&[&a, &b]).1, vec![b.as_str()]);
        // Once a name is left out, shorter later ones are too: order is need.
        let long = "c".repeat(70);
        let (v, d) = clearcpuid_value(&[&a, &long, "x"]);
        assert_eq!(v, a);
        assert_eq!(d.len(), 2);
    }

    #[test]
    fn parameters_carry_the_clearcpuid_list() {
        let params = HostQuirks::decide(QuirkMode::On, "").kernel_parameters();
        let clear = params
            .iter()
            .find_map(|p| p.strip_prefix("clearcpuid="))
            .unwrap();
        assert!(clear.len() <= CLEARCPUID_MAX);
        assert!(params.contains(&"mitigations=off".to_string()));
    }
}

/// What the vCPU threads of one Linux VM apply, shared by all of them.
#[derive(Debug, Default)]
pub struct VcpuQuirks {
    /// INT3 and FWAIT.
    pub gaps: emulation::EmulationGaps,
    /// The ring-3 `syscall` remedy, if this host needs it.
    pub syscall_remedy: Option<std::sync::Arc<syscall_remedy::SyscallRemedy>>,
}

impl VcpuQuirks {
    /// After an internal-error exit: `true` if the instruction was completed
    /// and the vCPU can run on.
    pub fn complete_emulation_gap(&self, fd: &mut kvm_ioctls::VcpuFd, vcpu: usize) -> bool {
        match self.gaps.try_complete(fd, vcpu) {
            Ok(found) => found.is_some(),
            Err(e) => {
                log::error!("vcpu {vcpu}: {e}");
                false
            }
        }
    }

    /// After any exit: installs what became due.
    pub fn after_exit(&self, fd: &kvm_ioctls::VcpuFd, vcpu: usize) {
        if let Some(remedy) = &self.syscall_remedy {
            remedy.install_if_armed(fd, vcpu);
        }
    }

    /// One line on what fired, for the log at the end.
    pub fn summary(&self) -> String {
        let (int3, fwait) = self.gaps.counts();
        let remedy = match &self.syscall_remedy {
            Some(r) if r.installed() => "installed",
            Some(_) => "not installed",
            None => "not used",
        };
        format!("INT3 delivered {int3} times, FWAIT skipped {fwait} times, ring-3 syscall remedy {remedy}")
    }
}

impl Drop for VcpuQuirks {
    /// The last vCPU thread is gone: say what fired, once.
    fn drop(&mut self) {
        log::info!("host quirks: {}", self.summary());
    }
}
