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
use super::{Phases, Plan, Samples, MIB};

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
    targets: Vec<TargetRow>,
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
    vcpus: u32,
    size: u64,
    device_ns: Spread,
    guest_clflushopt_ns: Spread,
    host_clflushopt_ns: Spread,
    floor_ns_p50: f64,
    device_over_floor: f64,
    device_gb_per_s: f64,
    host_gb_per_s: f64,
    guest_gb_per_s: f64,
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
    vcpus: u32,
    request_bytes: u64,
    requests_per_vcpu: u64,
    requests_per_s: Spread,
    completed_ok: u64,
    batches: u64,
    requests_per_batch: Spread,
    pause_time_share: Spread,
}

#[derive(Serialize)]
struct TargetRow {
    target: String,
    measured: f64,
    limit: f64,
    at_most: bool,
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

/// Writes everything; returns the summary's text.
pub fn write(
    out: &Path,
    plan: &Plan,
    s: &Samples,
    quick: bool,
    elapsed: Duration,
) -> Result<String, Box<dyn std::error::Error>> {
    let machine = host::machine();
    let sizes = plan.sizes();
    let signal = Spread::of(&s.signal);
    let mut targets = Vec::new();

    // ---- range ----------------------------------------------------------
    let mut range_json = Vec::new();
    for vcpus in [1u32, 2] {
        let floor = med(s.floor.get(&vcpus));
        for &size in &sizes {
            let dev = spread(s.range_dev.get(&(vcpus, size)));
            let guest = spread(s.range_guest.get(&(vcpus, size)));
            let hostt = spread(s.range_host.get(&size));
            let (pause, flush, _) = phase_medians(s.range_phases.get(&(vcpus, size)));
            range_json.push(RangeRow {
                vcpus,
                size,
                device_ns: dev,
                guest_clflushopt_ns: guest,
                host_clflushopt_ns: hostt,
                floor_ns_p50: floor,
                device_over_floor: dev.p50 / floor,
                device_gb_per_s: gbps(size, dev.p50),
                host_gb_per_s: gbps(size, hostt.p50),
                guest_gb_per_s: gbps(size, guest.p50),
                engine_pause_ns_p50: pause,
                engine_flush_ns_p50: flush,
            });
            if size <= 4096 {
                targets.push(Target {
                    name: format!("range {} on {vcpus} vCPU(s) ≤ 1.3× MMIO floor", size_name(size)),
                    measured: dev.p50 / floor,
                    limit: 1.3,
                    at_most: true,
                    why: format!(
                        "request {} vs one MMIO exit {}; of the request the engine's pause of all vCPUs is {} ({:.0}%), the flush phase {} (a host thread flushes these bytes in {}: the phase is handing the share to the parked vCPU threads and waiting for them), the rest ({}) is spent outside the engine's pause and flush: the ioeventfd notify, the VMM's event-loop thread getting a host CPU and reading the queue, the completion and the guest's polling for it (with {vcpus} vCPU thread(s) busy in guest ring 3 on a 2-CPU host, the event-loop thread has to wait for a CPU)",
                        us(dev.p50),
                        us(floor),
                        us(pause),
                        100.0 * pause / dev.p50,
                        us(flush),
                        us(hostt.p50),
                        us((dev.p50 - pause - flush).max(0.0))
                    ),
                });
            }
            if size >= MIB {
                let limit = if vcpus == 1 { 0.9 } else { 1.6 };
                let ratio = hostt.p50 / dev.p50;
                targets.push(Target {
                    name: format!(
                        "range {} on {vcpus} vCPU(s) ≥ {limit}× host-core CLFLUSHOPT bandwidth",
                        size_name(size)
                    ),
                    measured: ratio,
                    limit,
                    at_most: false,
                    why: format!(
                        "device {:.1} GB/s ({}) vs host thread {:.1} GB/s ({}); the engine's flush phase alone took {} ({:.2}× the host thread), its pause {}, fixed cost ≈ one request of 64 B ({}){}",
                        gbps(size, dev.p50),
                        us(dev.p50),
                        gbps(size, hostt.p50),
                        us(hostt.p50),
                        us(flush),
                        hostt.p50 / flush.max(1.0),
                        us(pause),
                        us(med(s.range_dev.get(&(vcpus, 64)))),
                        if vcpus == 2 {
                            let one = phase_medians(s.range_phases.get(&(1, size))).1;
                            let two = phase_medians(s.range_phases.get(&(2, size))).1;
                            format!(
                                "; the flush phase split over 2 vCPU threads took {} against {} on 1 vCPU ({:.2}× the speed{})",
                                us(two),
                                us(one),
                                one / two.max(1.0),
                                if one / two.max(1.0) < 1.3 {
                                    ": two host cores do not flush much faster than one here"
                                } else {
                                    ""
                                }
                            )
                        } else {
                            String::new()
                        }
                    ),
                });
            }
        }
    }

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
    if let Some((&largest, v)) = s.full_dev.iter().next_back() {
        let full = Spread::of(v).p50;
        let range = med(s.range_dev.get(&(1, plan.full_touch)));
        let (_, flush, bytes) = phase_medians(s.full_phases.get(&largest));
        let (&smallest, _) = s.full_dev.iter().next().unwrap_or((&largest, v));
        let (_, flush_small, _) = phase_medians(s.full_phases.get(&smallest));
        let slope = if largest > smallest {
            (flush - flush_small) / ((largest - smallest) as f64 / 1024.0)
        } else {
            0.0
        };
        targets.push(Target {
            name: format!(
                "full flush of a {} MiB guest with {} MiB resident ≤ 2× a range flush of {} MiB",
                largest,
                plan.full_touch / MIB,
                plan.full_touch / MIB
            ),
            measured: full / range,
            limit: 2.0,
            at_most: true,
            why: format!(
                "full {} vs range {}; the full flush covered {:.1} MiB of resident pages (the guest touched {} MiB; the rest is the kernel image, page tables and queues) in a flush phase of {}; at the same resident size the flush phase of a {smallest} MiB guest took {}, so it grows by {} per GiB of guest RAM; the residency scan (SEEK_DATA/SEEK_HOLE over the memory file, then mincore over what is allocated; it runs before the pause), timed alone by the host on the same {largest} MiB guest, takes {}",
                us(full),
                us(range),
                bytes / MIB as f64,
                plan.full_touch / MIB,
                us(flush),
                us(flush_small),
                us(slope),
                us(med(s.full_scan.get(&largest)))
            ),
        });
    }

    // ---- pause --------------------------------------------------------------
    let mut pause_json = Vec::new();
    for (&vcpus, v) in &s.pause {
        let p = Spread::of(v);
        pause_json.push(PauseRow {
            vcpus,
            pause_ns: p,
            over_signal_round_trip: p.p50 / signal.p50,
        });
        let cores = machine
            .iter()
            .find(|(k, _)| k == "logical_cpus")
            .and_then(|(_, v)| v.parse::<u32>().ok())
            .unwrap_or(0);
        targets.push(Target {
            name: format!("pause of {vcpus} busy vCPU(s) ≤ 2× one signal round trip"),
            measured: p.p50 / signal.p50,
            limit: 2.0,
            at_most: true,
            why: format!(
                "pause_all {} (p90 {}) vs signal round trip {}; a kick must also take the vCPU out of guest mode (KVM_RUN returns EINTR; one exit from guest mode costs about the MMIO floor, {} here), and each vCPU thread must take the control lock to park and wake the controller{}",
                us(p.p50),
                us(p.p90),
                us(signal.p50),
                us(med(s.floor.get(&1))),
                if vcpus > cores && cores > 0 {
                    format!("; {vcpus} vCPUs on {cores} host CPUs: a kicked vCPU may first have to wait for a core")
                } else {
                    String::new()
                }
            ),
        });
    }

    // ---- throughput ----------------------------------------------------------
    let mut tput_json = Vec::new();
    let mut tput_rows = Vec::new();
    for (&vcpus, runs) in &s.tput {
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
        let ok: u64 = runs.iter().map(|r| r.completed_ok).sum();
        let batches: u64 = runs.iter().map(|r| r.batches).sum();
        let (rps, per_batch, share) = (
            Spread::of(&rps),
            Spread::of(&per_batch),
            Spread::of(&pause_share),
        );
        tput_rows.push((vcpus, rps, per_batch, share, ok, batches));
        tput_json.push(ThroughputRow {
            vcpus,
            request_bytes: plan.tput_size,
            requests_per_vcpu: plan.tput_requests,
            requests_per_s: rps,
            completed_ok: ok,
            batches,
            requests_per_batch: per_batch,
            pause_time_share: share,
        });
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
            .map(|(v, f)| (format!("vcpus_{v}"), Spread::of(f)))
            .collect(),
        range: range_json,
        full_vs_guest_size: full_json,
        full_vs_resident: resident_json,
        pause: PauseJson {
            signal_round_trip_ns: signal,
            by_vcpus: pause_json,
        },
        throughput: tput_json,
        targets: targets
            .iter()
            .map(|t| TargetRow {
                target: t.name.clone(),
                measured: t.measured,
                limit: t.limit,
                at_most: t.at_most,
                met: t.met(),
                why: if t.met() {
                    String::new()
                } else {
                    t.why.clone()
                },
            })
            .collect(),
    };
    let mut text = serde_json::to_string_pretty(&report)?;
    text.push('\n');
    std::fs::write(out.join("report.json"), text)?;

    // ---- charts ----------------------------------------------------------------
    let pts = |f: &dyn Fn(u64) -> f64| -> Vec<(f64, f64)> {
        sizes.iter().map(|&z| (z as f64, f(z) / 1e3)).collect()
    };
    chart::draw(
        &out.join("range_latency.svg"),
        &Chart {
            title: "Range flush latency (median)",
            x_label: "bytes",
            y_label: "µs",
            log: (true, true),
            legend: SeriesLabelPosition::LowerRight,
            series: vec![
                Series {
                    name: "device, 1 vCPU".into(),
                    points: pts(&|z| med(s.range_dev.get(&(1, z)))),
                },
                Series {
                    name: "device, 2 vCPUs".into(),
                    points: pts(&|z| med(s.range_dev.get(&(2, z)))),
                },
                Series {
                    name: "guest ring-3 CLFLUSHOPT".into(),
                    points: pts(&|z| med(s.range_guest.get(&(1, z)))),
                },
                Series {
                    name: "host thread CLFLUSHOPT".into(),
                    points: pts(&|z| med(s.range_host.get(&z))),
                },
                Series {
                    name: "MMIO exit floor (1 vCPU)".into(),
                    points: pts(&|_| med(s.floor.get(&1))),
                },
            ],
        },
    )?;
    let full_points = |m: &std::collections::BTreeMap<u64, Vec<f64>>, kx: f64| -> Vec<(f64, f64)> {
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
                        "target: 2× the range flush of {} MiB",
                        plan.full_touch / MIB
                    ),
                    points: s
                        .full_dev
                        .keys()
                        .map(|&k| {
                            (
                                k as f64,
                                2.0 * med(s.range_dev.get(&(1, plan.full_touch))) / 1e6,
                            )
                        })
                        .collect(),
                },
                Series {
                    name: format!("range flush of {} MiB (device)", plan.full_touch / MIB),
                    points: s
                        .full_dev
                        .keys()
                        .map(|&k| (k as f64, med(s.range_dev.get(&(1, plan.full_touch))) / 1e6))
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
                    name: "one signal round trip".into(),
                    points: s
                        .pause
                        .keys()
                        .map(|&v| (f64::from(v), signal.p50 / 1e3))
                        .collect(),
                },
            ],
        },
    )?;
    chart::draw(
        &out.join("throughput.svg"),
        &Chart {
            title: "Every vCPU requesting at once (4 KiB ranges)",
            x_label: "vCPUs",
            y_label: "requests/s, requests per batch ×1000",
            log: (false, false),
            legend: SeriesLabelPosition::UpperRight,
            series: vec![
                Series {
                    name: "requests/s".into(),
                    points: tput_rows
                        .iter()
                        .map(|r| (f64::from(r.0), r.1.p50))
                        .collect(),
                },
                Series {
                    name: "requests per batch ×1000".into(),
                    points: tput_rows
                        .iter()
                        .map(|r| (f64::from(r.0), r.2.p50 * 1000.0))
                        .collect(),
                },
            ],
        },
    )?;

    // ---- summary.md -----------------------------------------------------------
    let mut md = String::new();
    let w = &mut md;
    writeln!(w, "# Cache-flush service benchmark\n")?;
    writeln!(
        w,
        "`vmm-tools bench{}`: {} round(s), {:.0} s, every comparison in this one run (variants interleaved per round). Medians, with p10–p90 in brackets; guest timings by `rdtsc` in guest ring 3 (TSC {:.3} GHz, measured by the host). Load average when the run started: `{}` (anything else running on the host's CPUs skews these figures). Raw figures: [report.json](report.json).\n",
        if quick { " --quick" } else { "" },
        plan.rounds,
        elapsed.as_secs_f64(),
        s.tsc_per_ns,
        s.load_at_start
    )?;
    writeln!(w, "## Machine\n\n| | |\n| --- | --- |")?;
    for (k, v) in &machine {
        writeln!(w, "| {k} | {v} |")?;
    }
    writeln!(
        w,
        "\n## Targets\n\n| target | measured | limit | verdict |\n| --- | --- | --- | --- |"
    )?;
    for t in &targets {
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
    let missed: Vec<&Target> = targets.iter().filter(|t| !t.met()).collect();
    if !missed.is_empty() {
        writeln!(w, "\n### Why the missed targets are missed\n")?;
        for t in missed {
            writeln!(w, "- **{}**: {}.", t.name, t.why)?;
        }
    }
    let spr = |x: Spread| format!("{} [{}–{}]", us(x.p50), us(x.p10), us(x.p90));
    writeln!(w, "\n## MMIO exit floor\n")?;
    for (v, f) in &s.floor {
        writeln!(w, "- {v} vCPU(s): {}", spr(Spread::of(f)))?;
    }
    writeln!(
        w,
        "\n## Range flush latency\n\n![range latency](range_latency.svg)\n\n| vCPUs | size | device | × floor | device GB/s | guest ring-3 CLFLUSHOPT | host thread CLFLUSHOPT | host GB/s | engine pause | engine flush |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )?;
    for vcpus in [1u32, 2] {
        let floor = med(s.floor.get(&vcpus));
        for &size in &sizes {
            let dev = spread(s.range_dev.get(&(vcpus, size)));
            let hostt = spread(s.range_host.get(&size));
            let (pause, flush, _) = phase_medians(s.range_phases.get(&(vcpus, size)));
            writeln!(
                w,
                "| {vcpus} | {} | {} | {:.2} | {:.2} | {} | {} | {:.2} | {} | {} |",
                size_name(size),
                spr(dev),
                dev.p50 / floor,
                gbps(size, dev.p50),
                spr(spread(s.range_guest.get(&(vcpus, size)))),
                spr(hostt),
                gbps(size, hostt.p50),
                us(pause),
                us(flush)
            )?;
        }
    }
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
        "\n## Pause\n\n![pause](pause.svg)\n\nOne signal round trip (a host thread blocked in `ppoll` gets a signal, acknowledges through a condvar): {}.\n\n| busy vCPUs | pause_all | × signal round trip |\n| --- | --- | --- |",
        spr(signal)
    )?;
    for (&v, p) in &s.pause {
        let p = Spread::of(p);
        writeln!(w, "| {v} | {} | {:.2} |", spr(p), p.p50 / signal.p50)?;
    }
    writeln!(
        w,
        "\n## Throughput: every vCPU requesting at once\n\n![throughput](throughput.svg)\n\n{} requests of {} per vCPU. `batches` is the device's count of flushes (each one pause of the VM); requests per batch above 1 means batching amortises the pauses.\n\n| vCPUs | requests/s | completed_ok | batches | requests per batch | pause share of the burst |\n| --- | --- | --- | --- | --- | --- |",
        plan.tput_requests,
        size_name(plan.tput_size)
    )?;
    for (v, rps, per_batch, share, ok, batches) in &tput_rows {
        writeln!(
            w,
            "| {v} | {:.0} [{:.0}–{:.0}] | {ok} | {batches} | {:.2} | {:.0}% |",
            rps.p50,
            rps.p10,
            rps.p90,
            per_batch.p50,
            share.p50 * 100.0
        )?;
    }
    if let Some(first) = tput_rows.first() {
        writeln!(w)?;
        for (v, rps, per_batch, share, _, _) in &tput_rows[1..] {
            writeln!(
                w,
                "- {v} vCPUs at once: {:.2} requests per batch ({}), {:.0} requests/s against {:.0} on {} vCPU ({:.2}×); the pauses take {:.0}% of the burst, so {}.",
                per_batch.p50,
                if per_batch.p50 > 1.05 {
                    "concurrent requests do share one pause"
                } else {
                    "every request pays its own pause"
                },
                rps.p50,
                first.1.p50,
                first.0,
                rps.p50 / first.1.p50.max(1e-9),
                share.p50 * 100.0,
                if rps.p50 >= first.1.p50 {
                    "batching amortises the pauses"
                } else if share.p50 >= 0.5 {
                    "the pauses dominate: pausing more vCPUs costs more than sharing a pause saves"
                } else {
                    "most of the time lost is not in the pauses (see the range table: the same gap between request latency and engine time)"
                }
            )?;
        }
    }
    std::fs::write(out.join("summary.md"), &md)?;
    Ok(md)
}
