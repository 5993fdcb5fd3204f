//! Turns the samples into `report.json`, `summary.md` and the charts.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use plotters::chart::SeriesLabelPosition;
use serde::Serialize;

use super::chart::{self, Chart, Series};
use super::host;
use super::stats::Spread;
use super::{Notify, Phases, Plan, Samples, Split, MIB};

/// `report.json`, field by field (serde writes it; non-finite numbers
/// become `null`).
#[derive(Serialize)]
struct ReportJson {
    machine: BTreeMap<String, String>,
    run: RunJson,
    floor: BTreeMap<String, Spread>,
    range: Vec<RangeRow>,
    full_vs_guest_size: Vec<FullRow>,
    full_vs_resident: Vec<FullRow>,
    pause: PauseJson,
    throughput: Vec<ThroughputRow>,
    crossover: CrossoverJson,
    targets: Vec<TargetRow>,
    notify_paths: NotifyPathsJson,
    audit: Vec<AuditRow>,
    /// Host instructions per 64 B request (callgrind); absent in a quick
    /// run or where valgrind is missing.
    host_instructions: Option<super::instructions::InstructionCount>,
}

/// The dirty-page audit's cost, off and on.
#[derive(Serialize)]
struct AuditRow {
    audit: bool,
    bytes: u64,
    first_write_ns_per_page: Spread,
    range_flush_ns: Spread,
}

/// Range flushes on 2 vCPUs always inline against always split.
#[derive(Serialize)]
struct CrossoverJson {
    vcpus: u32,
    rows: Vec<CrossoverRow>,
    /// The smallest size from which the split runs' median flush phase
    /// (the only part of a request the setting changes) is shorter at that
    /// size and every larger one; `null`: never.
    split_wins_from_bytes: Option<u64>,
    /// The same judged on the guest-timed device latency (which also holds
    /// the host's scheduling noise).
    split_device_wins_from_bytes: Option<u64>,
    /// `EngineConfig::inline_max_bytes` the default-path runs used.
    default_inline_max_bytes: u64,
}

#[derive(Serialize)]
struct CrossoverRow {
    size: u64,
    inline_device_ns: Spread,
    split_device_ns: Spread,
    inline_flush_phase_ns_p50: f64,
    split_flush_phase_ns_p50: f64,
}

/// Where the ioeventfd path beat the default (vcpu) path in this run.
#[derive(Serialize)]
struct NotifyPathsJson {
    /// `"range V vCPU(s) SIZE"` or `"throughput V vCPU(s)"`.
    ioeventfd_wins: Vec<String>,
}

#[derive(Serialize)]
struct RunJson {
    quick: bool,
    rounds: usize,
    seconds: f64,
    tsc_ghz: f64,
    loadavg_at_start: String,
    units: &'static str,
}

#[derive(Serialize)]
struct RangeRow {
    notify: &'static str,
    vcpus: u32,
    size: u64,
    host_threads: usize,
    device_ns: Spread,
    guest_clflushopt_ns: Spread,
    host_clflushopt_ns: Spread,
    floor_ns_p50: f64,
    /// A no-op exit right after the guest dirtied `size` bytes.
    dirty_exit_ns_p50: f64,
    device_over_floor: f64,
    device_gb_per_s: f64,
    host_gb_per_s: f64,
    guest_gb_per_s: f64,
    engine_plan_ns_p50: f64,
    engine_pause_ns_p50: f64,
    engine_flush_ns_p50: f64,
}

/// A full flush against guest size, or (without the scan) resident size.
#[derive(Serialize)]
struct FullRow {
    guest_mib: u64,
    touched_bytes: u64,
    device_ns: Spread,
    flushed_bytes_p50: f64,
    engine_pause_ns_p50: f64,
    engine_flush_ns_p50: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    residency_scan_ns: Option<Spread>,
}

#[derive(Serialize)]
struct PauseJson {
    signal_round_trip_ns: Spread,
    by_vcpus: Vec<PauseRow>,
}

#[derive(Serialize)]
struct PauseRow {
    vcpus: u32,
    pause_ns: Spread,
    over_signal_round_trip: f64,
}

#[derive(Serialize)]
struct ThroughputRow {
    notify: &'static str,
    vcpus: u32,
    request_bytes: u64,
    requests_per_vcpu: u64,
    requests_per_s: Spread,
    completed_ok: u64,
    batches: u64,
    requests_per_batch: Spread,
    pause_time_share: Spread,
    preempted_per_request: Spread,
}

#[derive(Serialize)]
struct TargetRow {
    target: String,
    measured: f64,
    limit: f64,
    at_most: bool,
    /// `false`: reported beside the targets, not judged (N > host CPUs).
    judged: bool,
    met: bool,
    why: String,
}

/// One target and its verdict.
struct Target {
    name: String,
    measured: f64,
    limit: f64,
    /// `true`: the measured ratio must be at most `limit`; else at least.
    at_most: bool,
    /// `false`: reported separately, not judged (more vCPUs than host CPUs).
    judged: bool,
    why: String,
}

impl Target {
    fn met(&self) -> bool {
        if self.at_most {
            self.measured <= self.limit
        } else {
            self.measured >= self.limit
        }
    }
}

fn spread(v: Option<&Vec<f64>>) -> Spread {
    Spread::of(v.map_or(&[][..], |v| v.as_slice()))
}

fn med(v: Option<&Vec<f64>>) -> f64 {
    spread(v).p50
}

fn phase_medians(p: Option<&Vec<Phases>>) -> (f64, f64, f64) {
    let p = p.map_or(&[][..], |v| v.as_slice());
    let pause: Vec<f64> = p.iter().map(|x| x.pause_ns).collect();
    let flush: Vec<f64> = p.iter().map(|x| x.flush_ns).collect();
    let bytes: Vec<f64> = p.iter().map(|x| x.bytes as f64).collect();
    (
        Spread::of(&pause).p50,
        Spread::of(&flush).p50,
        Spread::of(&bytes).p50,
    )
}

fn plan_median(p: Option<&Vec<Phases>>) -> f64 {
    let v: Vec<f64> = p
        .map_or(&[][..], |v| v.as_slice())
        .iter()
        .map(|x| x.plan_ns)
        .collect();
    Spread::of(&v).p50
}

/// The smallest of `sizes` from which `wins(size)` holds at that size and
/// every larger one.
fn wins_from(sizes: &[u64], wins: impl Fn(u64) -> bool) -> Option<u64> {
    let mut from = None;
    for &size in sizes.iter().rev() {
        if !wins(size) {
            break;
        }
        from = Some(size);
    }
    from
}

/// The name of the largest of the parts.
fn largest<'a>(parts: &[(&'a str, f64)]) -> &'a str {
    parts
        .iter()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map_or("", |p| p.0)
}

fn size_name(b: u64) -> String {
    if b >= MIB {
        format!("{} MiB", b / MIB)
    } else if b >= 1024 {
        format!("{} KiB", b / 1024)
    } else {
        format!("{b} B")
    }
}

fn us(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else {
        format!("{:.1} µs", ns / 1e3)
    }
}

fn gbps(bytes: u64, ns: f64) -> f64 {
    if ns > 0.0 {
        bytes as f64 / ns
    } else {
        0.0
    }
}

/// Per (notify path, vCPUs): requests/s, requests per batch, the pauses'
/// share of the burst, requests completed OK, batches.
/// One (notify path, vCPUs) throughput case over every round.
#[derive(Clone, Copy, Default)]
struct TputFigures {
    rps: Spread,
    per_batch: Spread,
    pause_share: Spread,
    /// Times the host preempted a thread of the VMM (it wanted to run and
    /// had to wait for a CPU), per request.
    preempted_per_request: Spread,
    ok: u64,
    batches: u64,
}

/// Writes everything; returns the summary's text.
pub fn write(
    out: &Path,
    plan: &Plan,
    s: &Samples,
    quick: bool,
    elapsed: Duration,
) -> Result<String, Box<dyn std::error::Error>> {
    let machine = host::machine();
    let cores = host::host_cpus() as u32;
    let sizes = plan.sizes();
    let signal = Spread::of(&s.signal);
    let floor = |path: Notify, vcpus: u32| med(s.floor.get(&(path, vcpus)));
    let dev = |path: Notify, vcpus: u32, size: u64| spread(s.range_dev.get(&(path, vcpus, size)));
    let host_peer = |threads: usize, size: u64| spread(s.range_host.get(&(threads, size)));
    let mut targets = Vec::new();

    // ---- range ----------------------------------------------------------
    let mut range_json = Vec::new();
    for vcpus in [1u32, 2] {
        for path in Notify::ALL {
            let threads = Plan::host_threads(vcpus);
            for &size in &sizes {
                let d = dev(path, vcpus, size);
                let guest = spread(s.range_guest.get(&(path, vcpus, size)));
                let hostt = host_peer(threads, size);
                let phases = s.range_phases.get(&(path, vcpus, size));
                let (pause, flush, _) = phase_medians(phases);
                range_json.push(RangeRow {
                    notify: path.name(),
                    vcpus,
                    size,
                    host_threads: threads,
                    device_ns: d,
                    guest_clflushopt_ns: guest,
                    host_clflushopt_ns: hostt,
                    floor_ns_p50: floor(path, vcpus),
                    dirty_exit_ns_p50: med(s.range_dirty_exit.get(&(path, vcpus, size))),
                    device_over_floor: d.p50 / floor(path, vcpus),
                    device_gb_per_s: gbps(size, d.p50),
                    host_gb_per_s: gbps(size, hostt.p50),
                    guest_gb_per_s: gbps(size, guest.p50),
                    engine_plan_ns_p50: plan_median(phases),
                    engine_pause_ns_p50: pause,
                    engine_flush_ns_p50: flush,
                });
            }
        }
    }

    // What a request on `vcpus` vCPUs pays to stop the others: host
    // `pause_all` of that many busy vCPUs, measured in this run.
    let pause_of_others = |vcpus: u32| match vcpus - 1 {
        0 => 0.0,
        others => med(s.pause.get(&others)),
    };

    // Small ranges: one exit (plus, on N vCPUs, the pause of the others).
    for vcpus in [1u32, 2] {
        let path = Notify::Vcpu;
        let exit = floor(path, vcpus);
        let empty_notify = med(s.notify_floor.get(&(path, vcpus)));
        let others = vcpus - 1;
        let peer_pause = pause_of_others(vcpus);
        let budget = exit + peer_pause;
        let limit = if vcpus == 1 { 1.3 } else { 1.2 };
        for &size in sizes.iter().filter(|&&z| z <= 4096) {
            let d = dev(path, vcpus, size).p50;
            let phases = s.range_phases.get(&(path, vcpus, size));
            let (pause, flush, _) = phase_medians(phases);
            let plan_ns = plan_median(phases);
            let beyond = (d - exit).max(0.0);
            let rest = (beyond - pause - flush - plan_ns).max(0.0);
            let main = largest(&[("pause", pause), ("flush", flush), ("rest", rest + plan_ns)]);
            let p10 = dev(path, vcpus, size).p10;
            let limit_text = match main {
                "pause" if others == 0 => format!(
                    "the largest part is the engine's pause although there is no other vCPU to stop (it only takes the controller role under the control lock): {} here, which is waiting for that lock or for a host CPU on a loaded 2-CPU host, not stopping vCPUs; not broken down further",
                    us(pause)
                ),
                "pause" => format!(
                    "the largest part is the pause of the other vCPU: a busy vCPU leaves guest mode only through a signal and its own exit (host pause_all of {others} busy vCPU(s) measured {} in this run, against an exit of {}), so on this software KVM a request on {vcpus} vCPUs costs about two exits back to back",
                    us(peer_pause),
                    us(exit)
                ),
                "flush" => format!(
                    "the largest part is the engine's flush phase, {} for bytes a host thread flushes in {}: fixed costs of the phase (recording the share, the fence, the fail-closed check that no vCPU ran), not cache work",
                    us(flush),
                    us(med(s.range_host.get(&(1, size))))
                ),
                _ => format!(
                    "the largest part is outside the engine's timed phases; the empty notify costs {:.2}× the floor, so the notify's exit adds {} and the rest is the host's own work for the request, which runs cold after every exit: taking it off the ring and validating it, the engine's bookkeeping around its phases (the flush log record, the statistics) and writing the answer (README, Benchmark, splits it once with rdtsc){}{}",
                    empty_notify / exit.max(1.0),
                    us((empty_notify - exit).max(0.0)),
                    match &s.instructions {
                        Some(Ok(c)) => format!(
                            " ({:.0} instructions, counted by callgrind: see \"Host instructions per request\")",
                            c.per_request
                        ),
                        _ => String::new(),
                    },
                    if p10 < 0.5 * d {
                        format!(
                            "; the p10 request took {}, so the median holds waits only some requests see: the requesting vCPU thread waiting for one of {cores} host CPUs (with the other vCPU spinning and the load average above; not measured directly)",
                            us(p10)
                        )
                    } else {
                        String::new()
                    }
                ),
            };
            targets.push(Target {
                name: if vcpus == 1 {
                    format!("range {} on 1 vCPU ≤ 1.3× one MMIO exit", size_name(size))
                } else {
                    format!(
                        "range {} on {vcpus} vCPUs ≤ 1.2× (one MMIO exit + pause of the other {others})",
                        size_name(size)
                    )
                },
                measured: d / budget,
                limit,
                at_most: true,
                judged: true,
                why: format!(
                    "request {} vs one MMIO exit {}{}; an empty notify (the same exit as the request's, finding no work) took {}; beyond the exit the request spends {}: the engine's pause {}, its flush phase {}, planning {}, and {} the engine does not time; {limit_text}",
                    us(d),
                    us(exit),
                    if others > 0 {
                        format!(" + pause of {others} busy vCPU(s) {} = {}", us(peer_pause), us(budget))
                    } else {
                        String::new()
                    },
                    us(empty_notify),
                    us(beyond),
                    us(pause),
                    us(flush),
                    us(plan_ns),
                    us(rest)
                ),
            });
        }
    }

    // Large ranges: the bandwidth of min(N, host CPUs) host threads.
    for vcpus in [1u32, 2] {
        let path = Notify::Vcpu;
        let threads = Plan::host_threads(vcpus);
        for &size in sizes.iter().filter(|&&z| z >= 16 * MIB) {
            let d = dev(path, vcpus, size).p50;
            let hostt = host_peer(threads, size).p50;
            let host1 = host_peer(1, size).p50;
            let (pause, flush, _) = phase_medians(s.range_phases.get(&(path, vcpus, size)));
            let fixed = dev(path, vcpus, 64).p50;
            let phase_ratio = hostt / flush.max(1.0);
            let plan_ns = plan_median(s.range_phases.get(&(path, vcpus, size)));
            let outside = (d - plan_ns - pause - flush).max(0.0);
            let p10 = dev(path, vcpus, size).p10;
            let phase_text = if phase_ratio < 0.9 {
                if threads > 1 {
                    format!(
                        "the flush phase itself is slower than {threads} host threads: its shares run on the controlling vCPU thread and the parked vCPU thread(s), which must first be woken (and on {cores} host CPUs compete with the VMM's other threads), while the peer's threads start together; two host threads flush {:.2}× as fast as one here, so memory bandwidth, not cores, bounds both",
                        host1 / hostt.max(1.0)
                    )
                } else {
                    format!(
                        "the flush phase itself is slower than one host thread over the same number of bytes ({phase_ratio:.2}×): the peer flushes its own heap buffer it has just written, the engine the guest's RAM through the VMM's shared mapping after the guest wrote it under shadow paging; this run does not separate those two differences (the guest's own ring-3 CLFLUSHOPT over the same bytes took {})",
                        us(med(s.range_guest.get(&(path, vcpus, size))))
                    )
                }
            } else {
                format!("the flush phase keeps up with the peer ({phase_ratio:.2}×)")
            };
            // What no implementation can avoid: the exit that carries the
            // request, and the pause of the other vCPUs, which must end
            // before the first line is flushed (an OK promises that no vCPU
            // ran during the flush). Measured in this run.
            // The exit is the one a request of this size pays: taken right
            // after the guest dirtied the bytes, the caches full of dirty
            // lines (measured in this run; the clean floor is less).
            let exit = med(s.range_dirty_exit.get(&(path, vcpus, size)));
            let others = vcpus - 1;
            let others_pause = pause_of_others(vcpus);
            let bound = hostt / (exit + others_pause + hostt).max(1.0);
            let bound_text = format!(
                "at best, with nothing but one exit ({}, taken right after the guest dirtied the {}; a clean one is {}){} before a flush at the peer's speed, the request reaches {bound:.2}× the peer{}",
                us(exit),
                size_name(size),
                us(floor(path, vcpus)),
                if others > 0 {
                    format!(
                        " and the pause of the other {others} busy vCPU(s) ({}, which must end before the first line is flushed: an OK promises no vCPU ran during the flush)",
                        us(others_pause)
                    )
                } else {
                    String::new()
                },
                if bound < 0.9 {
                    ": the target is out of reach at this size on this host"
                } else {
                    ""
                }
            );
            let limit_text = format!(
                "{bound_text}; {phase_text}; planning took {}, and outside the engine's timed phases the request spent {} (its exit, taken with the caches full of dirty lines, is {}; a whole 64 B request {}; after the flush the engine logs the batch, answers and resumes, none of it timed separately){}",
                us(plan_ns),
                us(outside),
                us(exit),
                us(fixed),
                if p10 < 0.5 * d {
                    format!(
                        "; the p10 request took {}, so the median holds waits only some requests see: the requesting vCPU thread waiting for one of {cores} host CPUs (with the other vCPU spinning and the load average above; not measured directly)",
                        us(p10)
                    )
                } else {
                    String::new()
                }
            );
            targets.push(Target {
                name: format!(
                    "range {} on {vcpus} vCPU(s) ≥ 0.9× CLFLUSHOPT bandwidth of {threads} host thread(s)",
                    size_name(size)
                ),
                measured: hostt / d,
                limit: 0.9,
                at_most: false,
                judged: true,
                why: format!(
                    "device {:.1} GB/s ({}) vs {threads} host thread(s) {:.1} GB/s ({}); the engine's flush phase alone took {} ({phase_ratio:.2}× the peer), its pause {}; {limit_text}",
                    gbps(size, d),
                    us(d),
                    gbps(size, hostt),
                    us(hostt),
                    us(flush),
                    us(pause)
                ),
            });
        }
    }

    // ---- crossover --------------------------------------------------------
    let cross_sizes = plan.cross_sizes();
    let cross = |split: Split, size: u64| spread(s.cross_dev.get(&(split, size)));
    let cross_flush = |split: Split, size: u64| phase_medians(s.cross_phases.get(&(split, size))).1;
    let cross_rows: Vec<CrossoverRow> = cross_sizes
        .iter()
        .map(|&size| CrossoverRow {
            size,
            inline_device_ns: cross(Split::Inline, size),
            split_device_ns: cross(Split::Split, size),
            inline_flush_phase_ns_p50: cross_flush(Split::Inline, size),
            split_flush_phase_ns_p50: cross_flush(Split::Split, size),
        })
        .collect();
    let split_wins_from = wins_from(&cross_sizes, |z| {
        cross(Split::Split, z).p50 < cross(Split::Inline, z).p50
    });
    let split_phase_wins_from = wins_from(&cross_sizes, |z| {
        cross_flush(Split::Split, z) < cross_flush(Split::Inline, z)
    });
    let default_inline = vmm::flush_engine::DEFAULT_INLINE_MAX_BYTES;

    // ---- full -------------------------------------------------------------
    let mut full_json = Vec::new();
    for (&mib, v) in &s.full_dev {
        let (pause, flush, bytes) = phase_medians(s.full_phases.get(&mib));
        full_json.push(FullRow {
            guest_mib: mib,
            touched_bytes: plan.full_touch,
            device_ns: Spread::of(v),
            flushed_bytes_p50: bytes,
            engine_pause_ns_p50: pause,
            engine_flush_ns_p50: flush,
            residency_scan_ns: Some(spread(s.full_scan.get(&mib))),
        });
    }
    let mut resident_json = Vec::new();
    for (&touch, v) in &s.resident_dev {
        let (pause, flush, bytes) = phase_medians(s.resident_phases.get(&touch));
        resident_json.push(FullRow {
            guest_mib: plan.resident_guest_mib,
            touched_bytes: touch,
            device_ns: Spread::of(v),
            flushed_bytes_p50: bytes,
            engine_pause_ns_p50: pause,
            engine_flush_ns_p50: flush,
            residency_scan_ns: None,
        });
    }
    let range_of_touch = dev(Notify::Vcpu, 1, plan.full_touch).p50;
    if let Some((&largest_mib, v)) = s.full_dev.iter().next_back() {
        let full = Spread::of(v).p50;
        let (pause, flush, bytes) = phase_medians(s.full_phases.get(&largest_mib));
        let (range_pause, range_flush, _) =
            phase_medians(s.range_phases.get(&(Notify::Vcpu, 1, plan.full_touch)));
        let (&smallest, _) = s.full_dev.iter().next().unwrap_or((&largest_mib, v));
        let (_, flush_small, _) = phase_medians(s.full_phases.get(&smallest));
        let slope = if largest_mib > smallest {
            (flush - flush_small) / ((largest_mib - smallest) as f64 / 1024.0)
        } else {
            0.0
        };
        let scan = med(s.full_scan.get(&largest_mib));
        let full_plan = plan_median(s.full_phases.get(&largest_mib));
        let full_rest = (full - full_plan - pause - flush).max(0.0);
        targets.push(Target {
            name: format!(
                "full flush of a {} MiB guest with {} MiB resident ≤ 1.2× a range flush of {} MiB",
                largest_mib,
                plan.full_touch / MIB,
                plan.full_touch / MIB
            ),
            measured: full / range_of_touch,
            limit: 1.2,
            at_most: true,
            judged: true,
            why: format!(
                "full {} vs range {}; of the full flush the residency scan inside the request took {}, the pause {}, the flush phase {}, and {} was outside the engine's phases; the full flush covered {:.1} MiB of resident pages (the guest touched {} MiB; the rest is the kernel image, page tables and queues: {:.0}% more lines than the range); the range's flush phase took {} and its pause {}; at the same resident size the flush phase of a {smallest} MiB guest took {}, so it grows by {} per GiB of guest RAM; the residency scan (mincore over the allocated pages, SEEK_DATA over the memory file to jump the holes; before the pause, on the requesting vCPU's thread), timed alone by the host on the same guest, takes {}: a cost the range flush does not have, bounded by the kernel's page-table walk, not by the cache",
                us(full),
                us(range_of_touch),
                us(full_plan),
                us(pause),
                us(flush),
                us(full_rest),
                bytes / MIB as f64,
                plan.full_touch / MIB,
                100.0 * (bytes / plan.full_touch as f64 - 1.0),
                us(range_flush),
                us(range_pause),
                us(flush_small),
                us(slope),
                us(scan)
            ),
        });
    }

    // ---- pause --------------------------------------------------------------
    let exit1 = floor(Notify::Vcpu, 1);
    let pause_budget = exit1 + signal.p50;
    let mut pause_json = Vec::new();
    for (&vcpus, v) in &s.pause {
        let p = Spread::of(v);
        pause_json.push(PauseRow {
            vcpus,
            pause_ns: p,
            over_signal_round_trip: p.p50 / signal.p50,
        });
        let over = vcpus > cores;
        targets.push(Target {
            name: if over {
                format!("pause of {vcpus} busy vCPUs ({vcpus} > {cores} host CPUs) vs 1.2× (one MMIO exit + one signal round trip)")
            } else {
                format!("pause of {vcpus} busy vCPU(s) ≤ 1.2× (one MMIO exit + one signal round trip)")
            },
            measured: p.p50 / pause_budget,
            limit: 1.2,
            at_most: true,
            judged: !over,
            why: format!(
                "pause_all {} (p90 {}) vs one MMIO exit {} + one signal round trip {} = {}; the kicks go out together, but each vCPU thread must then leave KVM_RUN (an exit: on this software KVM the same tens of µs as the MMIO floor), take the control lock to park and wake the controller, which checks every vCPU's state{}",
                us(p.p50),
                us(p.p90),
                us(exit1),
                us(signal.p50),
                us(pause_budget),
                if over {
                    format!("; {vcpus} vCPU threads on {cores} host CPUs: a kicked vCPU first waits for a core, so exits run one after another")
                } else if vcpus > 1 {
                    format!("; {vcpus} exits on {cores} host CPUs shared with the controller's own thread overlap only partly")
                } else {
                    String::new()
                }
            ),
        });
    }

    // ---- throughput ----------------------------------------------------------
    let mut tput_json = Vec::new();
    let mut tput_fig: BTreeMap<(Notify, u32), TputFigures> = BTreeMap::new();
    for (&(path, vcpus), runs) in &s.tput {
        let rps: Vec<f64> = runs
            .iter()
            .map(|r| r.completed_ok as f64 / r.seconds.max(1e-9))
            .collect();
        let per_batch: Vec<f64> = runs
            .iter()
            .map(|r| r.completed_ok as f64 / (r.batches.max(1)) as f64)
            .collect();
        let pause_share: Vec<f64> = runs
            .iter()
            .map(|r| r.pause_ns / (r.seconds * 1e9).max(1.0))
            .collect();
        let preempted: Vec<f64> = runs
            .iter()
            .map(|r| r.preempted as f64 / (r.completed_ok.max(1)) as f64)
            .collect();
        let figures = TputFigures {
            rps: Spread::of(&rps),
            per_batch: Spread::of(&per_batch),
            pause_share: Spread::of(&pause_share),
            preempted_per_request: Spread::of(&preempted),
            ok: runs.iter().map(|r| r.completed_ok).sum(),
            batches: runs.iter().map(|r| r.batches).sum(),
        };
        tput_fig.insert((path, vcpus), figures);
        let TputFigures {
            rps,
            per_batch,
            pause_share: share,
            ok,
            batches,
            ..
        } = figures;
        tput_json.push(ThroughputRow {
            notify: path.name(),
            vcpus,
            request_bytes: plan.tput_size,
            requests_per_vcpu: plan.tput_requests,
            requests_per_s: rps,
            completed_ok: ok,
            batches,
            requests_per_batch: per_batch,
            pause_time_share: share,
            preempted_per_request: figures.preempted_per_request,
        });
    }
    if let Some(&single) = tput_fig.get(&(Notify::Vcpu, 1)) {
        let one = single.rps;
        for &vcpus in plan.tput_vcpus.iter().filter(|&&v| v > 1) {
            let Some(&figures) = tput_fig.get(&(Notify::Vcpu, vcpus)) else {
                continue;
            };
            let TputFigures {
                rps,
                per_batch,
                pause_share: share,
                preempted_per_request: preempted,
                ..
            } = figures;
            let eventfd = tput_fig
                .get(&(Notify::Ioeventfd, vcpus))
                .map_or(0.0, |f| f.rps.p50);
            targets.push(Target {
                name: format!("{vcpus} vCPUs requesting at once: requests/s ≥ 1.0× 1 vCPU"),
                measured: rps.p50 / one.p50.max(1e-9),
                limit: 1.0,
                at_most: false,
                judged: true,
                why: format!(
                    "{:.0} requests/s against {:.0} on 1 vCPU, {:.2} requests per batch, the engine's pauses {:.0}% of the burst (ioeventfd path: {:.0} requests/s); on the vcpu path each request is served inside its own vCPU's exit, and a vCPU that finds another controlling parks until that batch is done, so requests share a pause only when they meet in it: {}{}",
                    rps.p50,
                    one.p50,
                    per_batch.p50,
                    share.p50 * 100.0,
                    eventfd,
                    if per_batch.p50 > 1.05 {
                        "they do, but every batch now also pauses the other vCPUs, which 1 vCPU never had to"
                    } else {
                        "they rarely do, so every request pays for pausing the other vCPUs, which 1 vCPU never had to"
                    },
                    if vcpus > cores {
                        format!(
                            "; {vcpus} vCPU threads on {cores} host CPUs: a paused or kicked vCPU must wait for a core (the host preempted the VMM's threads {:.2} times per request, against {:.2} with 1 vCPU: each is a thread that wanted to run and waited for a CPU)",
                            preempted.p50,
                            single.preempted_per_request.p50
                        )
                    } else {
                        String::new()
                    }
                ),
            });
        }
    }

    // ---- where each notify path wins -----------------------------------------
    let mut ioeventfd_wins = Vec::new();
    for vcpus in [1u32, 2] {
        for &size in &sizes {
            if dev(Notify::Ioeventfd, vcpus, size).p50 < dev(Notify::Vcpu, vcpus, size).p50 {
                ioeventfd_wins.push(format!("range {vcpus} vCPU(s) {}", size_name(size)));
            }
        }
    }
    for &vcpus in &plan.tput_vcpus {
        let rps = |p: Notify| tput_fig.get(&(p, vcpus)).map_or(0.0, |f| f.rps.p50);
        if rps(Notify::Ioeventfd) > rps(Notify::Vcpu) {
            ioeventfd_wins.push(format!("throughput {vcpus} vCPU(s)"));
        }
    }

    // ---- JSON -----------------------------------------------------------------
    let report = ReportJson {
        machine: machine.iter().cloned().collect(),
        run: RunJson {
            quick,
            rounds: plan.rounds,
            seconds: elapsed.as_secs_f64(),
            tsc_ghz: s.tsc_per_ns,
            loadavg_at_start: s.load_at_start.clone(),
            units: "nanoseconds; bandwidth in GB/s (1e9 B/s)",
        },
        floor: s
            .floor
            .iter()
            .map(|((p, v), f)| (format!("{}_vcpus_{v}", p.name()), Spread::of(f)))
            .collect(),
        range: range_json,
        full_vs_guest_size: full_json,
        full_vs_resident: resident_json,
        pause: PauseJson {
            signal_round_trip_ns: signal,
            by_vcpus: pause_json,
        },
        throughput: tput_json,
        crossover: CrossoverJson {
            vcpus: 2,
            rows: cross_rows,
            split_wins_from_bytes: split_phase_wins_from,
            split_device_wins_from_bytes: split_wins_from,
            default_inline_max_bytes: default_inline,
        },
        targets: targets
            .iter()
            .map(|t| TargetRow {
                target: t.name.clone(),
                measured: t.measured,
                limit: t.limit,
                at_most: t.at_most,
                judged: t.judged,
                met: t.met(),
                why: if t.met() {
                    String::new()
                } else {
                    t.why.clone()
                },
            })
            .collect(),
        notify_paths: NotifyPathsJson {
            ioeventfd_wins: ioeventfd_wins.clone(),
        },
        audit: [false, true]
            .into_iter()
            .map(|audit| AuditRow {
                audit,
                bytes: plan.audit_size,
                first_write_ns_per_page: spread(s.audit_write_per_page.get(&audit)),
                range_flush_ns: spread(s.audit_flush.get(&audit)),
            })
            .collect(),
        host_instructions: s
            .instructions
            .as_ref()
            .and_then(|c| c.as_ref().ok().copied()),
    };
    let mut text = serde_json::to_string_pretty(&report)?;
    text.push('\n');
    std::fs::write(out.join("report.json"), text)?;

    // ---- charts ----------------------------------------------------------------
    let pts = |f: &dyn Fn(u64) -> f64| -> Vec<(f64, f64)> {
        sizes.iter().map(|&z| (z as f64, f(z) / 1e3)).collect()
    };
    let mut range_series = Vec::new();
    for vcpus in [1u32, 2] {
        for path in Notify::ALL {
            range_series.push(Series {
                name: format!("device, {vcpus} vCPU(s), {}", path.name()),
                points: pts(&|z| dev(path, vcpus, z).p50),
            });
        }
    }
    let mut host_threads: Vec<usize> = s.range_host.keys().map(|k| k.0).collect();
    host_threads.dedup();
    for threads in host_threads {
        range_series.push(Series {
            name: format!("CLFLUSHOPT, {threads} host thread(s)"),
            points: pts(&|z| host_peer(threads, z).p50),
        });
    }
    range_series.push(Series {
        name: "MMIO exit floor (1 vCPU)".into(),
        points: pts(&|_| exit1),
    });
    chart::draw(
        &out.join("range_latency.svg"),
        &Chart {
            title: "Range flush latency (median)",
            x_label: "bytes",
            y_label: "µs",
            log: (true, true),
            legend: SeriesLabelPosition::UpperLeft,
            series: range_series,
        },
    )?;
    chart::draw(
        &out.join("crossover.svg"),
        &Chart {
            title: "Range flush on 2 vCPUs: always inline vs always split (median)",
            x_label: "bytes",
            y_label: "µs",
            log: (true, true),
            legend: SeriesLabelPosition::UpperLeft,
            series: vec![
                Series {
                    name: "device, inline_max_bytes = u64::MAX".into(),
                    points: cross_sizes
                        .iter()
                        .map(|&z| (z as f64, cross(Split::Inline, z).p50 / 1e3))
                        .collect(),
                },
                Series {
                    name: "device, inline_max_bytes = 0".into(),
                    points: cross_sizes
                        .iter()
                        .map(|&z| (z as f64, cross(Split::Split, z).p50 / 1e3))
                        .collect(),
                },
            ],
        },
    )?;
    let full_points = |m: &BTreeMap<u64, Vec<f64>>, kx: f64| -> Vec<(f64, f64)> {
        m.iter()
            .map(|(&k, v)| (k as f64 / kx, Spread::of(v).p50 / 1e6))
            .collect()
    };
    chart::draw(
        &out.join("full_vs_guest_size.svg"),
        &Chart {
            title: &format!(
                "Full flush against guest size ({} MiB resident)",
                plan.full_touch / MIB
            ),
            x_label: "guest MiB",
            y_label: "ms",
            log: (true, false),
            legend: SeriesLabelPosition::UpperLeft,
            series: vec![
                Series {
                    name: "full flush (device)".into(),
                    points: full_points(&s.full_dev, 1.0),
                },
                Series {
                    name: format!(
                        "target: 1.2× the range flush of {} MiB",
                        plan.full_touch / MIB
                    ),
                    points: s
                        .full_dev
                        .keys()
                        .map(|&k| (k as f64, 1.2 * range_of_touch / 1e6))
                        .collect(),
                },
                Series {
                    name: format!("range flush of {} MiB (device)", plan.full_touch / MIB),
                    points: s
                        .full_dev
                        .keys()
                        .map(|&k| (k as f64, range_of_touch / 1e6))
                        .collect(),
                },
            ],
        },
    )?;
    chart::draw(
        &out.join("full_vs_resident.svg"),
        &Chart {
            title: &format!(
                "Full flush against resident size ({} MiB guest)",
                plan.resident_guest_mib
            ),
            x_label: "MiB touched by the guest",
            y_label: "ms",
            log: (false, false),
            legend: SeriesLabelPosition::UpperLeft,
            series: vec![Series {
                name: "full flush (device)".into(),
                points: full_points(&s.resident_dev, MIB as f64),
            }],
        },
    )?;
    chart::draw(
        &out.join("pause.svg"),
        &Chart {
            title: "Pause of all busy vCPUs (median)",
            x_label: "vCPUs",
            y_label: "µs",
            log: (false, false),
            legend: SeriesLabelPosition::UpperLeft,
            series: vec![
                Series {
                    name: "pause_all".into(),
                    points: s
                        .pause
                        .iter()
                        .map(|(&v, p)| (f64::from(v), Spread::of(p).p50 / 1e3))
                        .collect(),
                },
                Series {
                    name: "1.2× (one MMIO exit + one signal round trip)".into(),
                    points: s
                        .pause
                        .keys()
                        .map(|&v| (f64::from(v), 1.2 * pause_budget / 1e3))
                        .collect(),
                },
            ],
        },
    )?;
    let tput_series = |path: Notify, per_batch: bool| Series {
        name: if per_batch {
            format!("requests per batch ×1000, {}", path.name())
        } else {
            format!("requests/s, {}", path.name())
        },
        points: tput_fig
            .iter()
            .filter(|(k, _)| k.0 == path)
            .map(|(k, f)| {
                (
                    f64::from(k.1),
                    if per_batch {
                        f.per_batch.p50 * 1000.0
                    } else {
                        f.rps.p50
                    },
                )
            })
            .collect(),
    };
    chart::draw(
        &out.join("throughput.svg"),
        &Chart {
            title: "Every vCPU requesting at once (4 KiB ranges)",
            x_label: "vCPUs",
            y_label: "requests/s, requests per batch ×1000",
            log: (false, false),
            legend: SeriesLabelPosition::UpperRight,
            series: vec![
                tput_series(Notify::Vcpu, false),
                tput_series(Notify::Ioeventfd, false),
                tput_series(Notify::Vcpu, true),
                tput_series(Notify::Ioeventfd, true),
            ],
        },
    )?;

    // ---- summary.md -----------------------------------------------------------
    let mut md = String::new();
    let w = &mut md;
    writeln!(w, "# Cache-flush service benchmark\n")?;
    writeln!(
        w,
        "`vmm-tools bench{}`: {} round(s), {:.0} s, every comparison in this one run (variants interleaved per round). Medians, with p10–p90 in brackets; guest timings by `rdtsc` in guest ring 3 (TSC {:.3} GHz, measured by the host). Load average when the run started: `{}` (anything else running on the host's CPUs skews these figures). Targets are judged on the default notify path (`vcpu`); the `ioeventfd` path is measured beside it. Raw figures: [report.json](report.json).\n",
        if quick { " --quick" } else { "" },
        plan.rounds,
        elapsed.as_secs_f64(),
        s.tsc_per_ns,
        s.load_at_start
    )?;
    writeln!(w, "## Summary\n")?;
    let judged: Vec<&Target> = targets.iter().filter(|t| t.judged).collect();
    writeln!(
        w,
        "- Targets met: {} of {} (judged on `--notify vcpu`).",
        judged.iter().filter(|t| t.met()).count(),
        judged.len()
    )?;
    writeln!(
        w,
        "- Where the ioeventfd path wins (lower median latency, or more requests/s): {}.",
        if ioeventfd_wins.is_empty() {
            "nowhere in this run".to_string()
        } else {
            ioeventfd_wins.join(", ")
        }
    )?;
    writeln!(
        w,
        "- Inline/split crossover on 2 vCPUs (the engine's flush phase, what the setting changes): {}; on the guest-timed request latency: {}. `DEFAULT_INLINE_MAX_BYTES` is {}.",
        split_phase_wins_from.map_or(
            format!("splitting did not win up to {}", size_name(plan.cross_max)),
            |z| format!("splitting wins from {} up", size_name(z))
        ),
        split_wins_from.map_or("never".to_string(), |z| format!("from {} up", size_name(z))),
        size_name(default_inline)
    )?;
    writeln!(w, "\n## Machine\n\n| | |\n| --- | --- |")?;
    for (k, v) in &machine {
        writeln!(w, "| {k} | {v} |")?;
    }
    writeln!(
        w,
        "\n## Targets\n\n| target | measured | limit | verdict |\n| --- | --- | --- | --- |"
    )?;
    for t in targets.iter().filter(|t| t.judged) {
        writeln!(
            w,
            "| {} | {:.2}× | {} {}× | {} |",
            t.name,
            t.measured,
            if t.at_most { "≤" } else { "≥" },
            t.limit,
            if t.met() { "met" } else { "**not met**" }
        )?;
    }
    let unjudged: Vec<&Target> = targets.iter().filter(|t| !t.judged).collect();
    if !unjudged.is_empty() {
        writeln!(
            w,
            "\nMore vCPUs than host CPUs (reported separately, not judged):\n\n| case | measured | would be |\n| --- | --- | --- |"
        )?;
        for t in &unjudged {
            writeln!(
                w,
                "| {} | {:.2}× | {} |",
                t.name,
                t.measured,
                if t.met() {
                    "within 1.2×"
                } else {
                    "over 1.2×"
                }
            )?;
        }
    }
    let missed: Vec<&Target> = targets.iter().filter(|t| !t.met()).collect();
    if !missed.is_empty() {
        writeln!(w, "\n### Why the missed targets are missed\n")?;
        for t in missed {
            writeln!(w, "- **{}**: {}.", t.name, t.why)?;
        }
    }
    let spr = |x: Spread| format!("{} [{}–{}]", us(x.p50), us(x.p10), us(x.p90));
    writeln!(
        w,
        "\n## MMIO exit floor\n\nA read of MagicValue (the floor every target uses), and a notify of the vCPU's queue with nothing in it (the notify path's own exit: an MMIO write; on the vcpu path the host also looks at the queues and finds nothing; on the ioeventfd path KVM signals the eventfd without leaving the kernel).\n\n| vCPUs | notify path | MagicValue read | empty notify |\n| --- | --- | --- | --- |"
    )?;
    for ((p, v), f) in &s.floor {
        writeln!(
            w,
            "| {v} | {} | {} | {} |",
            p.name(),
            spr(Spread::of(f)),
            spr(Spread::of(
                s.notify_floor.get(&(*p, *v)).map_or(&[][..], |n| &n[..])
            ))
        )?;
    }
    writeln!(
        w,
        "\n## Host instructions per request\n\nCounted by valgrind's callgrind inside `QueueWorker::serve_notify` (everything the host does for a request between the notify's exit and the return to the guest), 64 B range flushes on 1 vCPU, the difference of two runs so that start-up drops out; each request is followed by one empty notify, included. Unlike every timing here, this does not move with the CPU or the state of its caches: the timings above are this work run cold after each exit.\n\n{}",
        match &s.instructions {
            None => "Not counted in a quick run.".to_string(),
            Some(Ok(c)) => format!(
                "**{:.0} instructions per request** (runs of {} and {} requests).",
                c.per_request, c.reps.0, c.reps.1
            ),
            Some(Err(e)) => format!("Not counted: {e}."),
        }
    )?;
    writeln!(
        w,
        "\n## Notify paths side by side\n\nMedian device latency of a range flush (and requests/s below) with `--notify vcpu` (the default: served in the notifying vCPU's own exit) and `--notify ioeventfd` (the control loop's thread pauses every vCPU, the requester included).\n\n| vCPUs | size | vcpu | ioeventfd | ioeventfd ÷ vcpu | faster |\n| --- | --- | --- | --- | --- | --- |"
    )?;
    for vcpus in [1u32, 2] {
        for &size in &sizes {
            let (a, b) = (
                dev(Notify::Vcpu, vcpus, size),
                dev(Notify::Ioeventfd, vcpus, size),
            );
            writeln!(
                w,
                "| {vcpus} | {} | {} | {} | {:.2} | {} |",
                size_name(size),
                spr(a),
                spr(b),
                b.p50 / a.p50,
                if b.p50 < a.p50 { "ioeventfd" } else { "vcpu" }
            )?;
        }
    }
    writeln!(
        w,
        "\n| vCPUs at once | vcpu requests/s | ioeventfd requests/s | vcpu requests per batch | ioeventfd requests per batch | more requests/s |\n| --- | --- | --- | --- | --- | --- |"
    )?;
    for &vcpus in &plan.tput_vcpus {
        let f = |p: Notify| tput_fig.get(&(p, vcpus)).copied().unwrap_or_default();
        let (a, b) = (f(Notify::Vcpu), f(Notify::Ioeventfd));
        writeln!(
            w,
            "| {vcpus} | {:.0} | {:.0} | {:.2} | {:.2} | {} |",
            a.rps.p50,
            b.rps.p50,
            a.per_batch.p50,
            b.per_batch.p50,
            if b.rps.p50 > a.rps.p50 {
                "ioeventfd"
            } else {
                "vcpu"
            }
        )?;
    }
    writeln!(
        w,
        "\n## Inline flush or split: the crossover\n\n![crossover](crossover.svg)\n\nRange flushes on 2 vCPUs (default notify path), `EngineConfig::inline_max_bytes = u64::MAX` (the controlling thread flushes alone) against `0` (every batch split over the controller and the parked vCPU thread). Judged on the engine's flush phase (the only part of a request the setting changes): {}; judged on the guest-timed request latency (which also holds the host's scheduling noise): {}. The default is {}.\n\n| size | always inline | always split | inline flush phase | split flush phase | faster flush phase |\n| --- | --- | --- | --- | --- | --- |",
        split_phase_wins_from.map_or(
            format!("splitting did not win up to {}", size_name(plan.cross_max)),
            |z| format!("splitting wins from **{}** up (the smallest size where its median is lower there and at every larger size)", size_name(z))
        ),
        split_wins_from.map_or("never".to_string(), |z| format!("from {} up", size_name(z))),
        size_name(default_inline)
    )?;
    for &size in &cross_sizes {
        let (a, b) = (cross(Split::Inline, size), cross(Split::Split, size));
        writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} |",
            size_name(size),
            spr(a),
            spr(b),
            us(cross_flush(Split::Inline, size)),
            us(cross_flush(Split::Split, size)),
            if cross_flush(Split::Split, size) < cross_flush(Split::Inline, size) {
                "split"
            } else {
                "inline"
            }
        )?;
    }
    writeln!(
        w,
        "\n## Range flush latency\n\n![range latency](range_latency.svg)\n\nThe host peer runs on min(vCPUs, host CPUs) threads.\n\n| notify | vCPUs | size | device | × floor | device GB/s | guest ring-3 CLFLUSHOPT | host CLFLUSHOPT | host threads | host GB/s | engine pause | engine flush |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )?;
    for vcpus in [1u32, 2] {
        for path in Notify::ALL {
            let threads = Plan::host_threads(vcpus);
            for &size in &sizes {
                let d = dev(path, vcpus, size);
                let hostt = host_peer(threads, size);
                let (pause, flush, _) = phase_medians(s.range_phases.get(&(path, vcpus, size)));
                writeln!(
                    w,
                    "| {} | {vcpus} | {} | {} | {:.2} | {:.2} | {} | {} | {threads} | {:.2} | {} | {} |",
                    path.name(),
                    size_name(size),
                    spr(d),
                    d.p50 / floor(path, vcpus),
                    gbps(size, d.p50),
                    spr(spread(s.range_guest.get(&(path, vcpus, size)))),
                    spr(hostt),
                    gbps(size, hostt.p50),
                    us(pause),
                    us(flush)
                )?;
            }
        }
    }
    let (write_off, write_on) = (
        spread(s.audit_write_per_page.get(&false)),
        spread(s.audit_write_per_page.get(&true)),
    );
    let (flush_off, flush_on) = (
        spread(s.audit_flush.get(&false)),
        spread(s.audit_flush.get(&true)),
    );
    writeln!(
        w,
        "\n## The dirty-page audit's cost\n\nOne vCPU writes one `u64` in every page of {} (first writes since the last flush), then range-flushes them; `--audit` off and on. With the audit, KVM write-protects guest pages to log them, so each first write after a flush takes a fault, and each batch reads the dirty log inside its pause.\n\n| | audit off | audit on | on ÷ off |\n| --- | --- | --- | --- |\n| first write, per page | {} | {} | {:.1}× |\n| range flush of the pages | {} | {} | {:.2}× |",
        size_name(plan.audit_size),
        spr(write_off),
        spr(write_on),
        write_on.p50 / write_off.p50,
        spr(flush_off),
        spr(flush_on),
        flush_on.p50 / flush_off.p50
    )?;
    writeln!(
        w,
        "\n## Full flush\n\n![full vs guest size](full_vs_guest_size.svg) ![full vs resident](full_vs_resident.svg)\n\n| guest | touched | full flush | resident bytes flushed | engine pause | engine flush | residency scan alone |\n| --- | --- | --- | --- | --- | --- | --- |"
    )?;
    for (&mib, v) in &s.full_dev {
        let (pause, flush, bytes) = phase_medians(s.full_phases.get(&mib));
        writeln!(
            w,
            "| {mib} MiB | {} | {} | {:.1} MiB | {} | {} | {} |",
            size_name(plan.full_touch),
            spr(Spread::of(v)),
            bytes / MIB as f64,
            us(pause),
            us(flush),
            us(med(s.full_scan.get(&mib)))
        )?;
    }
    for (&touch, v) in &s.resident_dev {
        let (pause, flush, bytes) = phase_medians(s.resident_phases.get(&touch));
        writeln!(
            w,
            "| {} MiB | {} | {} | {:.1} MiB | {} | {} | |",
            plan.resident_guest_mib,
            size_name(touch),
            spr(Spread::of(v)),
            bytes / MIB as f64,
            us(pause),
            us(flush)
        )?;
    }
    writeln!(
        w,
        "\n## Pause\n\n![pause](pause.svg)\n\n`pause_all` from a host thread on a `scenario=spin` guest (every vCPU busy in ring 3). One signal round trip (a host thread blocked in `ppoll` gets a signal, acknowledges through a condvar): {}; one MMIO exit (1 vCPU): {}.\n\n| busy vCPUs | pause_all | × (exit + signal round trip) | × signal round trip |\n| --- | --- | --- | --- |",
        spr(signal),
        us(exit1)
    )?;
    for (&v, p) in &s.pause {
        let p = Spread::of(p);
        writeln!(
            w,
            "| {v} | {} | {:.2} | {:.2} |",
            spr(p),
            p.p50 / pause_budget,
            p.p50 / signal.p50
        )?;
    }
    writeln!(
        w,
        "\n## Throughput: every vCPU requesting at once\n\n![throughput](throughput.svg)\n\n{} requests of {} per vCPU. `batches` is the device's count of flushes (each one pause of the VM); requests per batch above 1 means concurrent requests shared a pause.\n\n| notify | vCPUs | requests/s | completed_ok | batches | requests per batch | pause share of the burst | preempted per request |\n| --- | --- | --- | --- | --- | --- | --- | --- |",
        plan.tput_requests,
        size_name(plan.tput_size)
    )?;
    for path in Notify::ALL {
        for (&(_, vcpus), f) in tput_fig.iter().filter(|(k, _)| k.0 == path) {
            writeln!(
                w,
                "| {} | {vcpus} | {:.0} [{:.0}–{:.0}] | {} | {} | {:.2} | {:.0}% | {:.2} |",
                path.name(),
                f.rps.p50,
                f.rps.p10,
                f.rps.p90,
                f.ok,
                f.batches,
                f.per_batch.p50,
                f.pause_share.p50 * 100.0,
                f.preempted_per_request.p50
            )?;
        }
    }
    std::fs::write(out.join("summary.md"), &md)?;
    Ok(md)
}
