//! `vmm-tools bench`: boots benchmark guests (the bundled kernel's `bench`
//! scenario and `spin`) through the library, measures the cache-flush service
//! against its peers in the same run, and writes `report.json`,
//! `summary.md` and SVG charts.
//!
//! Every comparison is taken in one run, with the variants interleaved:
//! each round boots every guest once (range on 1 and 2 vCPUs with both notify
//! paths, the inline/split crossover on 2 vCPUs, full flushes on every guest
//! size and resident size, pause on 1..4 vCPUs, throughput with both notify
//! paths) and runs the host-side peers (CLFLUSHOPT on 1 and on min(2, host
//! CPUs) host threads, one signal round trip) between them; figures are
//! medians with p10/p90 over all rounds.

mod chart;
pub mod guest;
pub mod host;
pub mod instructions;
mod report;
pub mod stats;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use vmm::vm::{NotifyPath, Vm, VmConfig};

use guest::Variant;

/// What `vmm-tools bench` was asked for.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Where the report goes (created if missing).
    pub out: PathBuf,
    /// Fewer sizes, repeats and smaller guests: under a minute.
    pub quick: bool,
}

const MIB: u64 = 1 << 20;

/// The notify path of a measurement, as a map key (the targets are judged
/// on [`Notify::Vcpu`], the default; [`Notify::Ioeventfd`] is shown beside it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Notify {
    /// `NotifyPath::Vcpu`: served on the notifying vCPU's thread.
    Vcpu,
    /// `NotifyPath::Ioeventfd`: served by the control loop's thread.
    Ioeventfd,
}

impl Notify {
    /// Both, the default first.
    pub const ALL: [Notify; 2] = [Notify::Vcpu, Notify::Ioeventfd];

    /// The VMM's setting.
    pub fn notify(self) -> NotifyPath {
        match self {
            Notify::Vcpu => NotifyPath::Vcpu,
            Notify::Ioeventfd => NotifyPath::Ioeventfd,
        }
    }

    /// The name the CLI and the report use.
    pub fn name(self) -> &'static str {
        match self {
            Notify::Vcpu => "vcpu",
            Notify::Ioeventfd => "ioeventfd",
        }
    }
}

/// The crossover runs' two engine settings: always inline, always split.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Split {
    /// `inline_max_bytes = u64::MAX`: the controlling thread flushes alone.
    Inline,
    /// `inline_max_bytes = 0`: every batch is split over the paused vCPUs.
    Split,
}

impl Split {
    fn inline_max_bytes(self) -> u64 {
        match self {
            Split::Inline => u64::MAX,
            Split::Split => 0,
        }
    }
}

/// The sizes and counts of one bench run.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Rounds (each boots every guest once).
    pub rounds: usize,
    /// Repeats of each range size within one guest boot.
    pub range_reps: u64,
    /// Largest range size.
    pub range_max: u64,
    /// Full flush: guest sizes (MiB), all with `full_touch` resident.
    pub full_guest_mib: Vec<u64>,
    /// Full flush: bytes the guest touches.
    pub full_touch: u64,
    /// Resident sweep: the guest size (MiB).
    pub resident_guest_mib: u64,
    /// Resident sweep: bytes touched.
    pub resident_touch: Vec<u64>,
    /// Full flushes per guest boot.
    pub full_reps: u64,
    /// Pause: vCPU counts.
    pub pause_vcpus: Vec<u32>,
    /// Pauses per boot.
    pub pause_iters: usize,
    /// Signal round trips per round.
    pub signal_iters: usize,
    /// Throughput: vCPU counts.
    pub tput_vcpus: Vec<u32>,
    /// Throughput: requests per vCPU.
    pub tput_requests: u64,
    /// Throughput: bytes per request.
    pub tput_size: u64,
    /// Audit cost: bytes written (one `u64` per page) and flushed.
    pub audit_size: u64,
    /// Crossover: smallest and largest size (powers of two between).
    pub cross_min: u64,
    /// See `cross_min`.
    pub cross_max: u64,
    /// Crossover: repeats of each size within one guest boot.
    pub cross_reps: u64,
}

impl Plan {
    /// The plan for `quick` or the full run.
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                rounds: 1,
                range_reps: 3,
                range_max: 16 * MIB,
                full_guest_mib: vec![256, 1024],
                full_touch: 16 * MIB,
                resident_guest_mib: 256,
                resident_touch: vec![4 * MIB, 16 * MIB, 64 * MIB],
                full_reps: 3,
                pause_vcpus: vec![1, 2],
                pause_iters: 20,
                signal_iters: 20,
                tput_vcpus: vec![1, 2],
                tput_requests: 20,
                tput_size: 4096,
                audit_size: 4 * MIB,
                cross_min: 64 * 1024,
                cross_max: 4 * MIB,
                cross_reps: 3,
            }
        } else {
            Self {
                rounds: 5,
                range_reps: 10,
                range_max: 64 * MIB,
                full_guest_mib: vec![256, 1024, 4096, 8192],
                full_touch: 64 * MIB,
                resident_guest_mib: 1024,
                resident_touch: vec![16 * MIB, 64 * MIB, 256 * MIB, 512 * MIB],
                full_reps: 5,
                pause_vcpus: vec![1, 2, 3, 4],
                pause_iters: 50,
                signal_iters: 50,
                tput_vcpus: vec![1, 2, 4],
                tput_requests: 200,
                tput_size: 4096,
                audit_size: 16 * MIB,
                cross_min: 64 * 1024,
                cross_max: 64 * MIB,
                cross_reps: 10,
            }
        }
    }

    /// The range sizes measured.
    pub fn sizes(&self) -> Vec<u64> {
        [64, 4096, 64 * 1024, MIB, 16 * MIB, 64 * MIB]
            .into_iter()
            .filter(|&s| s <= self.range_max)
            .collect()
    }

    /// The crossover sizes: powers of two from `cross_min` to `cross_max`.
    pub fn cross_sizes(&self) -> Vec<u64> {
        std::iter::successors(Some(self.cross_min), |&s| Some(s * 2))
            .take_while(|&s| s <= self.cross_max)
            .collect()
    }

    /// Host threads the N-vCPU bandwidth peer uses: min(N, host CPUs).
    pub fn host_threads(vcpus: u32) -> usize {
        (vcpus as usize).min(host::host_cpus()).max(1)
    }
}

/// One pause/flush breakdown taken from the engine's flush records.
#[derive(Clone, Copy, Debug, Default)]
pub struct Phases {
    /// Bytes the flush covered.
    pub bytes: u64,
    /// Planning time, before the pause.
    pub plan_ns: f64,
    /// Pause time.
    pub pause_ns: f64,
    /// Flush time (all vCPUs paused).
    pub flush_ns: f64,
}

/// Everything measured, in nanoseconds unless named otherwise.
#[derive(Default)]
pub struct Samples {
    /// TSC ticks per ns.
    pub tsc_per_ns: f64,
    /// `/proc/loadavg` when the run started (other load skews every figure).
    pub load_at_start: String,
    /// MMIO floor per (notify path, vCPU count).
    pub floor: BTreeMap<(Notify, u32), Vec<f64>>,
    /// An empty notify (the notify path's exit, no request) per (notify
    /// path, vCPU count).
    pub notify_floor: BTreeMap<(Notify, u32), Vec<f64>>,
    /// Device range latency per (notify path, vCPUs, size).
    pub range_dev: BTreeMap<(Notify, u32, u64), Vec<f64>>,
    /// Guest ring-3 CLFLUSHOPT per (notify path, vCPUs, size).
    pub range_guest: BTreeMap<(Notify, u32, u64), Vec<f64>>,
    /// A no-op exit taken right after the guest dirtied `size` bytes (the
    /// exit a request of that size pays) per (notify path, vCPUs, size).
    pub range_dirty_exit: BTreeMap<(Notify, u32, u64), Vec<f64>>,
    /// Host CLFLUSHOPT per (host threads, size).
    pub range_host: BTreeMap<(usize, u64), Vec<f64>>,
    /// Engine phases of range flushes per (notify path, vCPUs, size).
    pub range_phases: BTreeMap<(Notify, u32, u64), Vec<Phases>>,
    /// Crossover: device range latency on 2 vCPUs per (setting, size).
    pub cross_dev: BTreeMap<(Split, u64), Vec<f64>>,
    /// Crossover: engine phases per (setting, size).
    pub cross_phases: BTreeMap<(Split, u64), Vec<Phases>>,
    /// Full flush latency per guest MiB (with `full_touch` resident).
    pub full_dev: BTreeMap<u64, Vec<f64>>,
    /// Engine phases of those.
    pub full_phases: BTreeMap<u64, Vec<Phases>>,
    /// The residency scan alone per guest MiB (same guests).
    pub full_scan: BTreeMap<u64, Vec<f64>>,
    /// Full flush latency per touched bytes (resident sweep).
    pub resident_dev: BTreeMap<u64, Vec<f64>>,
    /// Engine phases of those.
    pub resident_phases: BTreeMap<u64, Vec<Phases>>,
    /// pause_all latency per vCPU count.
    pub pause: BTreeMap<u32, Vec<f64>>,
    /// Signal round trips.
    pub signal: Vec<f64>,
    /// Throughput runs per (notify path, vCPU count).
    pub tput: BTreeMap<(Notify, u32), Vec<TputRun>>,
    /// Dirty-page audit off/on: guest ring-3 time per first write of a page
    /// after a flush, ns.
    pub audit_write_per_page: BTreeMap<bool, Vec<f64>>,
    /// Dirty-page audit off/on: the range flush of those pages, ns.
    pub audit_flush: BTreeMap<bool, Vec<f64>>,
    /// The host's instructions per request (callgrind), or why not counted;
    /// `None` in a quick run.
    pub instructions: Option<Result<instructions::InstructionCount, String>>,
}

/// One throughput run.
#[derive(Clone, Copy, Debug, Default)]
pub struct TputRun {
    /// Requests completed OK (device counter).
    pub completed_ok: u64,
    /// Flush batches (device counter): each one pause of the VM.
    pub batches: u64,
    /// Guest-timed burst, seconds.
    pub seconds: f64,
    /// Total pause time of the run's batches.
    pub pause_ns: f64,
    /// Total flush time of the run's batches.
    pub flush_ns: f64,
    /// Involuntary context switches of this process during the run (boot
    /// included): a thread that wanted to run was preempted.
    pub preempted: u64,
}

fn progress(msg: std::fmt::Arguments) {
    eprintln!("bench: {msg}");
}

/// Runs the bench and writes the report; returns the summary's text.
pub fn run(options: &BenchOptions) -> Result<String, Box<dyn std::error::Error>> {
    let plan = Plan::new(options.quick);
    std::fs::create_dir_all(&options.out)
        .map_err(|e| format!("cannot create {}: {e}", options.out.display()))?;
    let started = Instant::now();
    let mut s = Samples {
        load_at_start: std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
            .to_string(),
        tsc_per_ns: host::tsc_per_ns(),
        ..Samples::default()
    };
    progress(format_args!(
        "{} run: {} round(s); TSC {:.3} GHz; report to {}",
        if options.quick { "quick" } else { "full" },
        plan.rounds,
        s.tsc_per_ns,
        options.out.display()
    ));
    let mut host_buf = host::HostBuffer::new(plan.range_max.max(plan.cross_max) as usize);
    let ns = 1.0 / s.tsc_per_ns;
    for round in 0..plan.rounds {
        let tag = format!("[round {}/{}]", round + 1, plan.rounds);
        // Range: 1 and 2 vCPUs on both notify paths, then the host threads
        // over the same sizes.
        for vcpus in [1u32, 2] {
            for path in Notify::ALL {
                progress(format_args!(
                    "{tag} range flushes, {vcpus} vCPU(s), notify={}",
                    path.name()
                ));
                let run = guest::run(
                    vcpus,
                    256,
                    &format!("part=range max={} reps={}", plan.range_max, plan.range_reps),
                    Variant {
                        notify: path.notify(),
                        inline_max_bytes: None,
                        audit: false,
                    },
                )?;
                for l in run.lines.iter().filter(|l| l.kind == "range") {
                    let size = l.get("size");
                    s.floor
                        .entry((path, vcpus))
                        .or_default()
                        .push(l.get("floor") as f64 * ns);
                    s.notify_floor
                        .entry((path, vcpus))
                        .or_default()
                        .push(l.get("notify") as f64 * ns);
                    s.range_dev
                        .entry((path, vcpus, size))
                        .or_default()
                        .push(l.get("dev") as f64 * ns);
                    s.range_guest
                        .entry((path, vcpus, size))
                        .or_default()
                        .push(l.get("guest") as f64 * ns);
                    s.range_dirty_exit
                        .entry((path, vcpus, size))
                        .or_default()
                        .push(l.get("dirty_exit") as f64 * ns);
                }
                for f in run.flushes.iter().filter(|f| !f.full) {
                    s.range_phases
                        .entry((path, vcpus, f.bytes))
                        .or_default()
                        .push(phases(f));
                }
            }
        }
        let mut host_threads = vec![Plan::host_threads(1), Plan::host_threads(2)];
        host_threads.dedup();
        progress(format_args!(
            "{tag} host CLFLUSHOPT on {host_threads:?} thread(s)"
        ));
        for rep in 0..plan.range_reps {
            for size in plan.sizes() {
                for &threads in &host_threads {
                    let t = host_buf.flush_ns_threads(size as usize, rep as u8, threads);
                    s.range_host.entry((threads, size)).or_default().push(t);
                }
            }
        }
        // The inline/split crossover: 2 vCPUs, default notify path, the
        // same ladder of sizes always inline and always split.
        for split in [Split::Inline, Split::Split] {
            progress(format_args!(
                "{tag} crossover, 2 vCPUs, inline_max_bytes={}",
                split.inline_max_bytes()
            ));
            let run = guest::run(
                2,
                256,
                &format!(
                    "part=range min={} max={} reps={} ladder=pow2",
                    plan.cross_min, plan.cross_max, plan.cross_reps
                ),
                Variant {
                    notify: NotifyPath::Vcpu,
                    inline_max_bytes: Some(split.inline_max_bytes()),
                    audit: false,
                },
            )?;
            for l in run.lines.iter().filter(|l| l.kind == "range") {
                s.cross_dev
                    .entry((split, l.get("size")))
                    .or_default()
                    .push(l.get("dev") as f64 * ns);
            }
            for f in run.flushes.iter().filter(|f| !f.full) {
                s.cross_phases
                    .entry((split, f.bytes))
                    .or_default()
                    .push(phases(f));
            }
        }
        // Full flush against guest size, then against resident size.
        for &mib in &plan.full_guest_mib {
            progress(format_args!(
                "{tag} full flush, {mib} MiB guest, {} MiB touched",
                plan.full_touch / MIB
            ));
            let run = guest::run(
                1,
                mib,
                &format!(
                    "part=full touch={} reps={}",
                    plan.full_touch, plan.full_reps
                ),
                Variant::default(),
            )?;
            for l in run.lines.iter().filter(|l| l.kind == "full") {
                s.full_dev
                    .entry(mib)
                    .or_default()
                    .push(l.get("dev") as f64 * ns);
            }
            for f in run.flushes.iter().filter(|f| f.full) {
                s.full_phases.entry(mib).or_default().push(phases(f));
            }
            s.full_scan.entry(mib).or_default().extend(&run.scan_ns);
        }
        for &touch in &plan.resident_touch {
            progress(format_args!(
                "{tag} full flush, {} MiB guest, {} MiB touched",
                plan.resident_guest_mib,
                touch / MIB
            ));
            let run = guest::run(
                1,
                plan.resident_guest_mib,
                &format!("part=full touch={touch} reps={}", plan.full_reps),
                Variant::default(),
            )?;
            for l in run.lines.iter().filter(|l| l.kind == "full") {
                s.resident_dev
                    .entry(touch)
                    .or_default()
                    .push(l.get("dev") as f64 * ns);
            }
            for f in run.flushes.iter().filter(|f| f.full) {
                s.resident_phases.entry(touch).or_default().push(phases(f));
            }
        }
        // Pause against one signal round trip.
        for &vcpus in &plan.pause_vcpus {
            progress(format_args!("{tag} pause_all, {vcpus} busy vCPU(s)"));
            let samples = pause_latencies(vcpus, plan.pause_iters)?;
            s.pause.entry(vcpus).or_default().extend(samples);
            progress(format_args!("{tag} signal round trip"));
            s.signal.extend(host::signal_round_trips(
                plan.signal_iters / plan.pause_vcpus.len().max(1) + 1,
            )?);
        }
        // The dirty-page audit's cost: first writes to pages after a flush
        // (each a write-protect fault with the audit on) and the range
        // flush of those pages (which reads the dirty log), off and on.
        for audit in [false, true] {
            progress(format_args!(
                "{tag} writes and flush, 1 vCPU, --audit {}",
                if audit { "on" } else { "off" }
            ));
            let run = guest::run(
                1,
                256,
                &format!(
                    "part=writes size={} reps={}",
                    plan.audit_size, plan.range_reps
                ),
                Variant {
                    audit,
                    ..Variant::default()
                },
            )?;
            for l in run.lines.iter().filter(|l| l.kind == "writes") {
                let pages = l.get("pages").max(1) as f64;
                s.audit_write_per_page
                    .entry(audit)
                    .or_default()
                    .push(l.get("write") as f64 * ns / pages);
                s.audit_flush
                    .entry(audit)
                    .or_default()
                    .push(l.get("flush") as f64 * ns);
            }
        }
        // Throughput: every vCPU requesting at once.
        for &vcpus in &plan.tput_vcpus {
            for path in Notify::ALL {
                progress(format_args!(
                    "{tag} throughput, {vcpus} vCPU(s) at once, notify={}",
                    path.name()
                ));
                let preempted_before = host::involuntary_switches();
                let run = guest::run(
                    vcpus,
                    256,
                    &format!(
                        "part=tput size={} requests={}",
                        plan.tput_size, plan.tput_requests
                    ),
                    Variant {
                        notify: path.notify(),
                        inline_max_bytes: None,
                        audit: false,
                    },
                )?;
                let cycles = run
                    .lines
                    .iter()
                    .find(|l| l.kind == "tput")
                    .map_or(0, |l| l.get("cycles"));
                s.tput.entry((path, vcpus)).or_default().push(TputRun {
                    completed_ok: run.device.completed_ok,
                    batches: run.device.batches,
                    seconds: cycles as f64 * ns / 1e9,
                    pause_ns: run.flushes.iter().map(|f| f.times.pause_ns as f64).sum(),
                    flush_ns: run.flushes.iter().map(|f| f.times.flush_ns as f64).sum(),
                    preempted: host::involuntary_switches().saturating_sub(preempted_before),
                });
            }
        }
    }
    if !options.quick {
        progress(format_args!(
            "host instructions per request (valgrind's callgrind, two runs)"
        ));
        let counted = instructions::measure(&options.out);
        if let Err(e) = &counted {
            progress(format_args!("instructions not counted: {e}"));
        }
        s.instructions = Some(counted);
    }
    progress(format_args!(
        "measured in {:.1} s; writing the report",
        started.elapsed().as_secs_f64()
    ));
    let summary = report::write(&options.out, &plan, &s, options.quick, started.elapsed())?;
    progress(format_args!(
        "done in {:.1} s: {}/report.json, summary.md, *.svg",
        started.elapsed().as_secs_f64(),
        options.out.display()
    ));
    Ok(summary)
}

fn phases(f: &vmm::flush_engine::FlushLogRecord) -> Phases {
    Phases {
        bytes: f.bytes,
        plan_ns: f.times.plan_ns as f64,
        pause_ns: f.times.pause_ns as f64,
        flush_ns: f.times.flush_ns as f64,
    }
}

/// Boots `scenario=spin` (every vCPU counting in ring 3) and times
/// `pause_all` `iters` times, letting the vCPUs run between two pauses.
fn pause_latencies(vcpus: u32, iters: usize) -> Result<Vec<f64>, Box<dyn std::error::Error>> {
    let config = VmConfig {
        vcpus,
        memory_mib: 16,
        cmdline: "scenario=spin".into(),
        serial_out: Some(Default::default()),
        ..VmConfig::new(vmm::BUNDLED_GUEST_KERNEL.to_vec())
    };
    let running = Vm::new(&config)?.start()?;
    // Let every vCPU reach its ring-3 loop.
    std::thread::sleep(Duration::from_millis(300));
    let mut samples = Vec::with_capacity(iters);
    for _ in 0..iters {
        let start = Instant::now();
        let guard = running
            .control()
            .pause_all(vmm::flush_engine::PAUSE_TIMEOUT)?;
        samples.push(start.elapsed().as_nanos() as f64);
        drop(guard);
        std::thread::sleep(Duration::from_millis(3));
    }
    if let Some(outcome) = running.outcome() {
        return Err(format!("the spin guest ended early: {outcome:?}").into());
    }
    running.stop();
    Ok(samples)
}
