//! The `vmm-tools` binary: the benchmark and the host-side Flush+Reload
//! probe of the cache-flush service, each booting bundled guests through the
//! `vmm` library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use vmm::exit_code;
use vmm::vcpu::VmOutcome;
use vmm::vm::VmConfig;

/// Benchmark and probe the paravirtual cache-flush service.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Log level of the VMM's own messages on stderr: error, warn, info,
    /// debug or trace. RUST_LOG overrides it.
    #[arg(long, value_name = "LEVEL", default_value = "warn", global = true)]
    log_level: log::LevelFilter,

    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Benchmark the cache-flush service; write the report to DIR.
    ///
    /// Boots benchmark guests, compares against their peers in the same run,
    /// writes DIR/report.json, DIR/summary.md and SVG charts (progress on
    /// stderr). Exit code 0 when the report is written, 1 when a measurement
    /// failed.
    Bench {
        /// Directory for the report (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Fewer sizes and repeats, smaller guests: under a minute.
        #[arg(long)]
        quick: bool,
    },
    /// Show from the host that the guest's flush requests evict the lines of
    /// every host mapping of its memory (Flush+Reload).
    ///
    /// Boots the bundled guest's `host-probe` scenario and times, from a
    /// pinned host thread, the first touch of one line per page of a buffer
    /// through a second mapping of guest memory and through the VMM's own,
    /// after the guest asked for a range flush and a full flush, against
    /// buffers that were paused alike but not flushed. Prints every attempt.
    /// Exit code 0 when every flush evicted every sampled line, 1 when one
    /// did not (or only partly), the run was inconclusive (the host too busy
    /// to tell) or failed, 3 when the VM could not be set up.
    HostProbe {
        /// Number of vCPUs (1 to 32).
        #[arg(long, value_name = "N", default_value_t = 1,
              value_parser = clap::value_parser!(u32).range(1..=i64::from(cache_flush_abi::boot::MAX_VCPUS)))]
        vcpus: u32,
        /// Attempts per measurement at most: a partial or no eviction fails
        /// at once, a pass needs 3 evicted attempts, void ones (the
        /// comparison evicted too) are repeated.
        #[arg(long, value_name = "N", default_value_t = 10,
              value_parser = clap::value_parser!(u32).range(1..=1000))]
        attempts: u32,
        /// Do not offer FLUSH_ALL (its measurement is then skipped).
        #[arg(long)]
        no_full_flush: bool,
        /// Negative control: ask for a one-line flush elsewhere instead of
        /// each flush measured; a sound probe then fails (exit code 1).
        #[arg(long)]
        sham: bool,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                exit_code::USAGE as u8
            } else {
                0
            });
        }
    };
    env_logger::Builder::new()
        .filter_level(cli.log_level)
        .parse_default_env()
        .format_timestamp_millis()
        .init();

    match cli.command {
        Command::Bench { out, quick } => {
            match vmm_tools::bench::run(&vmm_tools::bench::BenchOptions { out, quick }) {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: bench: {}", vmm::error_chain(e.as_ref()));
                    ExitCode::from(1)
                }
            }
        }
        Command::HostProbe {
            vcpus,
            attempts,
            no_full_flush,
            sham,
        } => host_probe(vcpus, attempts, !no_full_flush, sham),
    }
}

/// `vmm-tools host-probe`: the report on stdout, problems on stderr.
fn host_probe(vcpus: u32, attempts: u32, full_flush: bool, sham: bool) -> ExitCode {
    use vmm_tools::reload_probe::host_probe::{run_vm, HostProbeOptions};
    let config = VmConfig {
        vcpus,
        full_flush,
        cmdline: "scenario=host-probe".into(),
        handle_signals: true,
        ..VmConfig::new(vmm::BUNDLED_GUEST_KERNEL.to_vec())
    };
    let options = HostProbeOptions {
        attempts,
        sham,
        ..HostProbeOptions::default()
    };
    let run = match run_vm(&config, &options) {
        Ok(run) => run,
        Err(e) => {
            eprintln!("error: {}", vmm::error_chain(&e));
            return ExitCode::from(exit_code::SETUP_ERROR as u8);
        }
    };
    let passed = match &run.report {
        Ok(report) => {
            println!("{report}");
            if !report.passed() {
                eprintln!("error: host-probe: a flush was not shown to evict every sampled line of the host's mappings (see above)");
            }
            report.passed()
        }
        Err(e) => {
            eprintln!("error: host-probe: {}", vmm::error_chain(e));
            false
        }
    };
    let guest_ok = matches!(run.outcome, VmOutcome::GuestExit { status: 0, .. });
    if !guest_ok {
        eprintln!("error: the guest's verdict: {:?}", run.outcome);
    }
    ExitCode::from(if passed && guest_ok { 0 } else { 1 })
}
