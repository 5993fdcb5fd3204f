//! The `vmm` binary: boots a guest kernel (by default the bundled one) and
//! exits with the guest's verdict.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use vmm::exit_code;
use vmm::vcpu::VmOutcome;
use vmm::vm::{NotifyPath, Vm, VmConfig};

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
#[command(version, about, after_help = EXIT_CODES)]
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
    #[arg(long, value_name = "N",
          default_value_t = devices::cache_flush::device::DEFAULT_FULL_PER_SEC_LIMIT)]
    full_flush_rate: u64,

    /// Serve at most BYTES of FLUSH_RANGE per second; more get the BUSY
    /// status (0 = unlimited).
    #[arg(long, value_name = "BYTES",
          default_value_t = devices::cache_flush::device::DEFAULT_RANGE_BYTES_PER_SEC_LIMIT)]
    range_flush_rate: u64,

    /// Where a guest's QueueNotify is served: on the notifying vCPU's own
    /// thread (vcpu), or on the control loop through a KVM ioeventfd.
    #[arg(long, value_enum, value_name = "PATH", default_value_t = NotifyPath::Vcpu)]
    notify: NotifyPath,

    /// Keep the dirty-page audit: KVM dirty logging on guest RAM, so a host
    /// program (or --metrics) can see guest writes no flush covered. Costs a
    /// write-protect fault per first write per page after each flush.
    #[arg(long)]
    audit: bool,

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

    match run(cli) {
        Ok(outcome) => {
            report(&outcome);
            ExitCode::from(vmm::exit_code_for(&outcome) as u8)
        }
        Err(e) => {
            eprintln!("error: {}", vmm::error_chain(e.as_ref()));
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
        notify: cli.notify,
        engine: Default::default(),
        audit: cli.audit,
        initrd,
        host_quirks: cli.host_quirks,
        timeout: cli.timeout.map(std::time::Duration::from_secs),
    };
    let vm = Vm::new(&config)?;
    let running = vm.start()?;
    Ok(running.wait()?)
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
        VmOutcome::VcpuPanicked { vcpu, message } => {
            eprintln!("error: vcpu {vcpu}: its VMM thread panicked (a VMM bug): {message}")
        }
        VmOutcome::Signal(signo) => eprintln!("vmm: stopped by signal {signo}"),
    }
}
