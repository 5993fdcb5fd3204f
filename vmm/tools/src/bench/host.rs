//! Host-side measurements and facts: the TSC rate, a host thread's own
//! CLFLUSHOPT over a dirty buffer, one signal round trip, the machine.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vmm::flush_engine::cache_ops::{self, FlushInstruction};

use crate::affinity;

/// TSC ticks per nanosecond, measured against the monotonic clock.
pub fn tsc_per_ns() -> f64 {
    // SAFETY: rdtsc has no memory effects.
    let tsc = || unsafe { std::arch::x86_64::_rdtsc() };
    let (t0, c0) = (Instant::now(), tsc());
    std::thread::sleep(Duration::from_millis(200));
    let (c1, t1) = (tsc(), Instant::now());
    (c1 - c0) as f64 / (t1 - t0).as_nanos() as f64
}

/// A host buffer the "host thread" peer flushes.
pub struct HostBuffer {
    buf: Vec<u8>,
    line: usize,
    instruction: FlushInstruction,
}

impl HostBuffer {
    /// A buffer of `len` bytes, touched once.
    pub fn new(len: usize) -> Self {
        Self {
            buf: vec![1; len],
            line: cache_ops::cache_line_size(),
            instruction: FlushInstruction::detect(),
        }
    }

    /// The instruction the engine (and this peer) uses.
    pub fn instruction(&self) -> FlushInstruction {
        self.instruction
    }

    /// Dirties the first `len` bytes, then times one
    /// [`cache_ops::flush_range`] over them; nanoseconds.
    pub fn flush_ns(&mut self, len: usize, pass: u8) -> f64 {
        let len = len.min(self.buf.len());
        self.buf[..len].fill(pass);
        let start = Instant::now();
        // SAFETY: the range lies inside `self.buf`, mapped for the call.
        unsafe { cache_ops::flush_range(self.instruction, self.buf.as_ptr(), len, self.line) };
        start.elapsed().as_nanos() as f64
    }

    /// Dirties the first `len` bytes, then flushes them split over
    /// `threads` host threads, one contiguous share each (what the engine
    /// does over parked vCPU threads); nanoseconds from the first share's
    /// start to the last share's end. The threads are started, each pinned
    /// to its own CPU (left to the scheduler, both sometimes woke from the
    /// barrier on one core: the 64 MiB peer took 1.8 ms or 3.3 ms, bimodal),
    /// and lined up on a barrier before the clock starts, so thread creation
    /// is not counted: the peer is the bandwidth of `threads` cores, nothing
    /// else.
    pub fn flush_ns_threads(&mut self, len: usize, pass: u8, threads: usize) -> f64 {
        if threads <= 1 {
            return self.flush_ns(len, pass);
        }
        let len = len.min(self.buf.len());
        self.buf[..len].fill(pass);
        let share = len.div_ceil(threads).next_multiple_of(self.line);
        let base = self.buf.as_ptr() as usize;
        let (instruction, line) = (self.instruction, self.line);
        let cpus = allowed_cpus();
        let barrier = std::sync::Barrier::new(threads);
        let spans: Vec<(Instant, Instant)> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|i| {
                    let barrier = &barrier;
                    let offset = (i * share).min(len);
                    let end = ((i + 1) * share).min(len);
                    let cpu = cpus.get(i % cpus.len().max(1)).copied();
                    scope.spawn(move || {
                        if let Some(cpu) = cpu {
                            pin_to(cpu);
                        }
                        barrier.wait();
                        let start = Instant::now();
                        // SAFETY: `[base + offset, base + end)` lies inside
                        // `self.buf`; `self` is borrowed for this whole call
                        // and the scope joins every thread before it ends, so
                        // the buffer stays mapped while any share is flushed.
                        unsafe {
                            cache_ops::flush_range(
                                instruction,
                                (base + offset) as *const u8,
                                end - offset,
                                line,
                            )
                        };
                        (start, Instant::now())
                    })
                })
                .collect();
            handles.into_iter().filter_map(|h| h.join().ok()).collect()
        });
        let first = spans.iter().map(|s| s.0).min();
        let last = spans.iter().map(|s| s.1).max();
        match (first, last) {
            (Some(first), Some(last)) => last.duration_since(first).as_nanos() as f64,
            _ => f64::NAN,
        }
    }
}

/// The CPUs the calling thread may run on, in order (empty if unknown).
fn allowed_cpus() -> Vec<usize> {
    affinity::current()
        .map(|set| affinity::members(&set))
        .unwrap_or_default()
}

/// Pins the calling thread to `cpu`, one of [`allowed_cpus`] (a peer
/// thread, which ends soon after, so the previous set is not restored).
/// Best effort: unpinned, the figure is only noisier.
fn pin_to(cpu: usize) {
    if let Err(e) = affinity::set(&affinity::only(cpu)) {
        log::debug!("could not pin a peer thread to CPU {cpu}: {e}");
    }
}

/// Involuntary context switches of this process so far, every thread
/// (ended ones included): each one a thread preempted while it wanted to
/// run.
pub fn involuntary_switches() -> u64 {
    // SAFETY: rusage is plain data; all zero is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid rusage to fill.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0;
    }
    usage.ru_nivcsw as u64
}

/// Host CPUs this process may run on (the cores a split flush can use).
pub use vmm::flush_engine::host_cpus;

static SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    SIGNALLED.store(true, Ordering::SeqCst);
}

/// The signal of the round-trip measurement (not the vCPU kick signal).
fn rtt_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + 3
}

/// `count` signal round trips, in nanoseconds: a host thread blocked in a
/// syscall (`ppoll`, the signal unblocked only there, so none is lost)
/// gets a signal, its handler runs, the syscall returns `EINTR` and the
/// thread acknowledges through a condition variable; timed from
/// `pthread_kill` to the acknowledgement. This is the path a vCPU kick takes
/// minus KVM: the yardstick of the pause.
pub fn signal_round_trips(count: usize) -> std::io::Result<Vec<f64>> {
    vmm_sys_util::signal::register_signal_handler(rtt_signal(), on_signal)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    // (acknowledged count, stop)
    let state = Arc::new((Mutex::new((0u64, false)), Condvar::new()));
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let worker = {
        let state = state.clone();
        std::thread::spawn(move || {
            // SAFETY: plain sigset manipulation on a local set.
            let mut blocked: libc::sigset_t = unsafe { std::mem::zeroed() };
            let mut open: libc::sigset_t = unsafe { std::mem::zeroed() };
            // SAFETY: valid sets and signal number.
            unsafe {
                libc::sigemptyset(&mut blocked);
                libc::sigaddset(&mut blocked, rtt_signal());
                libc::pthread_sigmask(libc::SIG_BLOCK, &blocked, std::ptr::null_mut());
                libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut open);
                libc::sigdelset(&mut open, rtt_signal());
            }
            // SAFETY: pthread_self never fails.
            let _ = tid_tx.send(unsafe { libc::pthread_self() } as usize);
            loop {
                let timeout = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 50_000_000,
                };
                // SAFETY: no fds; `timeout` and `open` are valid.
                unsafe { libc::ppoll(std::ptr::null_mut(), 0, &timeout, &open) };
                let (lock, cv) = &*state;
                let mut st = lock.lock().unwrap_or_else(|p| p.into_inner());
                if SIGNALLED.swap(false, Ordering::SeqCst) {
                    st.0 += 1;
                    cv.notify_all();
                }
                if st.1 {
                    return;
                }
            }
        })
    };
    let thread = tid_rx
        .recv()
        .map_err(|_| std::io::Error::other("signal thread did not start"))?
        as libc::pthread_t;
    let mut samples = Vec::with_capacity(count);
    let (lock, cv) = &*state;
    for _ in 0..count {
        // Let the thread get back into its syscall.
        std::thread::sleep(Duration::from_micros(500));
        let mut st = lock.lock().unwrap_or_else(|p| p.into_inner());
        let before = st.0;
        let start = Instant::now();
        // SAFETY: the thread is alive until `stop` is set below.
        unsafe { libc::pthread_kill(thread, rtt_signal()) };
        while st.0 == before {
            st = cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        samples.push(start.elapsed().as_nanos() as f64);
    }
    lock.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
    let _ = worker.join();
    Ok(samples)
}

/// CPU model, cores, memory and kernel, from `/proc`.
pub fn machine() -> Vec<(String, String)> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        cpuinfo
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    let processors = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem = meminfo.lines().next().unwrap_or("").trim().to_string();
    let kernel = std::fs::read_to_string("/proc/version").unwrap_or_default();
    // Built-in modules are not in /proc/modules; /sys/module lists both.
    let mut kvm: Vec<String> = std::fs::read_dir("/sys/module")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|m| m.starts_with("kvm"))
                .collect()
        })
        .unwrap_or_default();
    kvm.sort();
    let kvm_module = kvm.join(", ");
    vec![
        ("cpu_model".into(), field("model name")),
        ("logical_cpus".into(), processors.to_string()),
        ("cpu_cores".into(), field("cpu cores")),
        ("cache_size".into(), field("cache size")),
        ("memory".into(), mem),
        ("kernel".into(), kernel.trim().to_string()),
        ("kvm_modules".into(), kvm_module),
        (
            "loadavg_at_report".into(),
            std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .trim()
                .to_string(),
        ),
        (
            "flush_instruction".into(),
            FlushInstruction::detect().name().into(),
        ),
    ]
}
