//! `vmm-tools bench --quick` end to end: it boots its guests, writes the report
//! files, and report.json parses with every section present. No timing is
//! asserted: the figures depend on the machine.

mod common;

use common::{describe, run_tools};

#[test]
fn quick_bench_writes_a_complete_report() {
    if !common::kvm_or_skip("quick_bench_writes_a_complete_report") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("vmm-bench-quick-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out_arg = dir.to_str().expect("a UTF-8 temp path");
    let out = run_tools(&["bench", "--quick", "--out", out_arg]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bench: "),
        "no progress on stderr\n{}",
        describe(&out)
    );

    for file in [
        "report.json",
        "summary.md",
        "range_latency.svg",
        "full_vs_guest_size.svg",
        "full_vs_resident.svg",
        "pause.svg",
        "throughput.svg",
        "crossover.svg",
    ] {
        let path = dir.join(file);
        let len = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{} missing: {e}", path.display()))
            .len();
        assert!(len > 0, "{} is empty", path.display());
    }

    let text = std::fs::read_to_string(dir.join("report.json")).expect("report.json reads");
    let report: serde_json::Value = serde_json::from_str(&text).expect("report.json parses");
    for section in [
        "machine",
        "run",
        "floor",
        "range",
        "full_vs_guest_size",
        "full_vs_resident",
        "pause",
        "throughput",
        "crossover",
        "targets",
        "notify_paths",
    ] {
        assert!(
            report.get(section).is_some(),
            "report.json has no `{section}`:\n{text}"
        );
    }
    let non_empty = |key: &str| {
        report[key]
            .as_array()
            .unwrap_or_else(|| panic!("`{key}` is not an array"))
            .len()
    };
    for key in [
        "range",
        "full_vs_guest_size",
        "full_vs_resident",
        "throughput",
        "targets",
    ] {
        assert!(non_empty(key) > 0, "`{key}` is empty:\n{text}");
    }
    assert!(report["pause"]["by_vcpus"]
        .as_array()
        .is_some_and(|a| !a.is_empty()));
    assert!(report["pause"]["signal_round_trip_ns"]["p50"].is_number());
    for target in report["targets"].as_array().into_iter().flatten() {
        assert!(target["met"].is_boolean(), "{target}");
        assert!(target["judged"].is_boolean(), "{target}");
    }
    // Both notify paths, in the range rows and in the throughput rows.
    for key in ["range", "throughput"] {
        for notify in ["vcpu", "ioeventfd"] {
            assert!(
                report[key]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|row| row["notify"] == notify),
                "no `{key}` row with notify={notify}:\n{text}"
            );
        }
    }
    // The crossover: a row per size, each with both settings measured.
    let rows = report["crossover"]["rows"]
        .as_array()
        .expect("crossover.rows is an array");
    assert!(rows.len() >= 2, "{text}");
    for row in rows {
        for key in ["inline_device_ns", "split_device_ns"] {
            assert!(
                row[key]["n"].as_u64().is_some_and(|n| n > 0),
                "crossover row without `{key}` samples: {row}"
            );
        }
    }
    assert!(report["crossover"]["default_inline_max_bytes"].is_u64());
    assert!(report["notify_paths"]["ioeventfd_wins"].is_array());
    let summary = std::fs::read_to_string(dir.join("summary.md")).expect("summary.md reads");
    for heading in [
        "## Targets",
        "## Notify paths side by side",
        "## Inline flush or split: the crossover",
    ] {
        assert!(summary.contains(heading), "no `{heading}`:\n{summary}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
