//! The `vmm` binary: boots a guest kernel (by default the bundled one) and
//! exits with the guest's verdict.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use vmm::exit_code;
use vmm::vcpu::VmOutcome;
use vmm::vm::{Vm, VmConfig};

const EXIT_CODES: &str = "\
Exit codes:
  0    the guest reported success (status 0 on its exit port)
  1    the guest reported failure (any other status)
  2    bad command-line usage
  3    the VM could not be set up (bad kernel file, bad value, no /dev/kvm, ...)
  4    the VM ended abnormally (triple fault, emulation failure, failed entry,
       every vCPU halted without a verdict)
  130  stopped by SIGINT;  143  stopped by SIGTERM";

/// Boot a guest kernel on KVM with the paravirtual cache-flush device.
#[derive(Parser, Debug)]
#[command(version, about, after_help = EXIT_CODES, args_conflicts_with_subcommands = true)]
struct Cli {
    /// Guest kernel: a static ELF64 x86-64 executable loaded at or above
    /// 1 MiB, or a Linux kernel (a bzImage such as /boot/vmlinuz-*, or an
    /// ELF vmlinux; told from the file). Defaults to the guest bundled in
    /// this binary.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,

    /// Initial RAM disk (cpio) of a Linux guest.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,

    /// Number of vCPUs (1 to 32).
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(cache_flush_abi::boot::MAX_VCPUS)))]
    vcpus: u32,

    /// Guest RAM in MiB (4 to 65536). Memory is allocated only as the guest
    /// touches it.
    #[arg(long, value_name = "MIB", default_value_t = 256,
          value_parser = clap::value_parser!(u64).range(vmm::memory::MIN_MEMORY_MIB..=vmm::memory::MAX_MEMORY_MIB))]
    memory: u64,

    /// Kernel command line; the bundled guest reads `scenario=NAME`
    /// (default `scenario=demo`). For a Linux kernel these parameters come
    /// after the ones the VMM adds (console, host quirks).
    #[arg(long, value_name = "STR")]
    cmdline: Option<String>,

    /// Work-arounds that let a Linux guest boot on a host whose KVM
    /// interprets guest ring 0 (no vmx/svm): auto (on exactly there), on,
    /// off.
    #[arg(long, value_name = "MODE", default_value = "auto")]
    host_quirks: vmm::host_quirks::QuirkMode,

    /// End the VM (exit code 4) if the guest has given no verdict after
    /// SECS seconds.
    #[arg(long, value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(1..))]
    timeout: Option<u64>,

    /// Do not offer FLUSH_ALL: the guest's full-flush call then reports
    /// Unsupported, as on a platform that cannot flush whole caches.
    #[arg(long)]
    no_full_flush: bool,

    /// Serve at most N FLUSH_ALL requests per second; more get the BUSY
    /// status (0 = unlimited).
    #[arg(long, value_name = "N", default_value_t = 0)]
    full_flush_rate: u64,

    /// Serve at most BYTES of FLUSH_RANGE per second; more get the BUSY
    /// status (0 = unlimited).
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    range_flush_rate: u64,

    /// Write the VMM's counters (requests by type and status, bytes, lines,
    /// pause and flush time percentiles, rate-limited requests) as JSON to
    /// PATH, every --metrics-interval seconds and at exit.
    #[arg(long, value_name = "PATH")]
    metrics: Option<PathBuf>,

    /// Seconds between two metrics writes.
    #[arg(long, value_name = "SECS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=86400))]
    metrics_interval: u64,

    /// Log level of the VMM's own messages on stderr: error, warn, info,
    /// debug or trace. RUST_LOG overrides it.
    #[arg(long, value_name = "LEVEL", default_value = "warn")]
    log_level: log::LevelFilter,

    #[command(subcommand)]
    command: Option<Command>,
}

/// Subcommands; without one, `vmm` boots the guest as the flags say.
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
    /// pinned host thread, reloads of a buffer through a second mapping of
    /// guest memory and through the VMM's own, after the guest asked for a
    /// range flush and a full flush, against buffers that were paused alike
    /// but not flushed. Prints the medians. Exit code 0 when every flush
    /// evicted, 1 when one did not, the run was inconclusive (the host too
    /// busy to tell) or failed, 3 when the VM could not be set up.
    HostProbe {
        /// Number of vCPUs (1 to 32).
        #[arg(long, value_name = "N", default_value_t = 1,
              value_parser = clap::value_parser!(u32).range(1..=i64::from(cache_flush_abi::boot::MAX_VCPUS)))]
        vcpus: u32,
        /// Attempts per measurement before it counts as not evicted.
        #[arg(long, value_name = "N", default_value_t = 10,
              value_parser = clap::value_parser!(u32).range(1..=1000))]
        attempts: u32,
        /// Do not offer FLUSH_ALL (its measurement is then skipped).
        #[arg(long)]
        no_full_flush: bool,
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
        Some(Command::Bench { out, quick }) => {
            return match vmm::bench::run(&vmm::bench::BenchOptions { out, quick }) {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: bench: {}", error_chain(e.as_ref()));
                    ExitCode::from(1)
                }
            };
        }
        Some(Command::HostProbe {
            vcpus,
            attempts,
            no_full_flush,
        }) => return host_probe(vcpus, attempts, !no_full_flush),
        None => {}
    }
    match run(cli) {
        Ok(outcome) => {
            report(&outcome);
            ExitCode::from(vmm::exit_code_for(&outcome) as u8)
        }
        Err(e) => {
            eprintln!("error: {}", error_chain(e.as_ref()));
            ExitCode::from(exit_code::SETUP_ERROR as u8)
        }
    }
}

fn run(cli: Cli) -> Result<VmOutcome, Box<dyn std::error::Error>> {
    let kernel = match &cli.kernel {
        Some(path) => std::fs::read(path)
            .map_err(|e| format!("cannot read kernel {}: {e}", path.display()))?,
        None => vmm::BUNDLED_GUEST_KERNEL.to_vec(),
    };
    let initrd = match &cli.initrd {
        Some(path) => Some(
            std::fs::read(path)
                .map_err(|e| format!("cannot read initrd {}: {e}", path.display()))?,
        ),
        None => None,
    };
    let linux = vmm::linux::kernel_format(&kernel).is_linux();
    let cmdline = cli.cmdline.unwrap_or_else(|| match linux {
        true => String::new(),
        false => "scenario=demo".into(),
    });
    let config = VmConfig {
        kernel,
        vcpus: cli.vcpus,
        memory_mib: cli.memory,
        cmdline,
        full_flush: !cli.no_full_flush,
        full_flush_rate: cli.full_flush_rate,
        range_flush_rate: cli.range_flush_rate,
        metrics: cli.metrics.map(|path| vmm::metrics::MetricsConfig {
            path,
            interval: std::time::Duration::from_secs(cli.metrics_interval),
        }),
        handle_signals: true,
        serial_out: None,
        initrd,
        host_quirks: cli.host_quirks,
        timeout: cli.timeout.map(std::time::Duration::from_secs),
    };
    let vm = Vm::new(&config)?;
    let running = vm.start()?;
    Ok(running.wait()?)
}

/// `vmm host-probe`: the report on stdout, problems on stderr.
fn host_probe(vcpus: u32, attempts: u32, full_flush: bool) -> ExitCode {
    use vmm::reload_probe::host_probe::{run_vm, HostProbeOptions};
    let config = VmConfig {
        vcpus,
        full_flush,
        cmdline: "scenario=host-probe".into(),
        handle_signals: true,
        ..VmConfig::new(vmm::BUNDLED_GUEST_KERNEL.to_vec())
    };
    let options = HostProbeOptions {
        attempts,
        ..HostProbeOptions::default()
    };
    let run = match run_vm(&config, &options) {
        Ok(run) => run,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            return ExitCode::from(exit_code::SETUP_ERROR as u8);
        }
    };
    let passed = match &run.report {
        Ok(report) => {
            println!("{report}");
            if !report.passed() {
                eprintln!("error: host-probe: a flush was not shown to evict the host's lines (see above)");
            }
            report.passed()
        }
        Err(e) => {
            eprintln!("error: host-probe: {}", error_chain(e));
            false
        }
    };
    report(&run.outcome);
    let guest_ok = matches!(run.outcome, VmOutcome::GuestExit { status: 0, .. });
    ExitCode::from(if passed && guest_ok { 0 } else { 1 })
}

/// One line on stderr for every way the VM can end but success.
fn report(outcome: &VmOutcome) {
    match outcome {
        VmOutcome::GuestExit { status: 0, .. } => {}
        VmOutcome::GuestExit { status, vcpu } => {
            eprintln!("error: the guest reported failure: status {status} (vcpu {vcpu})")
        }
        VmOutcome::Crash {
            vcpu: Some(v),
            reason,
        } => eprintln!("error: vcpu {v}: {reason}"),
        VmOutcome::Crash { vcpu: None, reason } => eprintln!("error: {reason}"),
        VmOutcome::Signal(signo) => eprintln!("vmm: stopped by signal {signo}"),
    }
}

/// "outer: inner: innermost" on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}
