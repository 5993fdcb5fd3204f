//! The vCPU control channel: another thread asks a set of vCPUs to leave
//! `KVM_RUN` promptly and park, runs work on the parked vCPU threads, and
//! releases them.
//!
//! How a vCPU is made to leave `KVM_RUN` (the race every VMM has to close):
//! the controller, holding the state lock, marks the vCPU's pause request,
//! sets `immediate_exit` in the vCPU's `kvm_run` page and sends it
//! [`kick_signal`]. The vCPU thread clears `immediate_exit` only under the
//! same lock, right after it has checked that no pause is requested. So either
//! it sees the request before entering `KVM_RUN`, or `KVM_RUN` sees
//! `immediate_exit` and returns `EINTR` at once, or the signal interrupts a
//! guest that is already running. No kick is lost and none is needed twice;
//! kicks are still repeated every [`KICK_INTERVAL`] as a guard against a host
//! that drops a signal.
//!
//! Parked threads block on a condition variable (never spin: on a 2-core
//! host a spinning waiter steals the core a vCPU needs to reach its park).
//! Every wait of the controller has a deadline and a named error.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use flush_engine::{PauseError, PausedVcpus, VcpuPause, WorkFn, Worker};
use smallvec::SmallVec;

/// How often an unanswered pause request is re-sent.
pub const KICK_INTERVAL: Duration = Duration::from_millis(10);

/// The real-time signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Installs the (empty) handler of [`kick_signal`]. The handler does nothing:
/// its only purpose is to make `KVM_RUN` return `EINTR` instead of the
/// default action killing the process. Idempotent.
pub fn install_kick_handler() -> Result<(), ControlError> {
    extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
        .map_err(|e| ControlError::SignalHandler(std::io::Error::from_raw_os_error(e.errno())))
}

/// Errors of the control channel.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// These vCPUs did not park before the deadline; the pause was undone.
    #[error("vCPUs {vcpus:?} did not pause within {timeout:?}")]
    PauseTimeout {
        /// The vCPUs that were still running.
        vcpus: Vec<usize>,
        /// The deadline.
        timeout: Duration,
    },
    /// These vCPUs did not finish their work before the deadline.
    #[error("vCPUs {vcpus:?} did not finish their work within {timeout:?}")]
    WorkTimeout {
        /// The vCPUs that were still working.
        vcpus: Vec<usize>,
        /// The deadline.
        timeout: Duration,
    },
    /// A vCPU index out of range.
    #[error("no vCPU {0}")]
    NoSuchVcpu(usize),
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler")]
    SignalHandler(#[source] std::io::Error),
    /// The controller role was not free before the deadline.
    #[error("another controller kept the vCPUs paused for more than {0:?}")]
    RoleTimeout(Duration),
    /// The VM is finishing: no new pause.
    #[error("the VM is stopping")]
    Finishing,
}

/// Where a vCPU thread is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// Its thread has not registered yet.
    NotStarted,
    /// Running guest code, or about to, or handling an exit.
    Running,
    /// Parked: out of `KVM_RUN`, blocked until released.
    Parked,
    /// Halted for good (HLT with no interrupt that could ever wake it): the
    /// thread is out of `KVM_RUN` and never re-enters, but it stays, blocked,
    /// so that pauses find it parked at once and flush work can still run
    /// on it, until the VM finishes.
    Halted,
    /// Its thread has left its run loop for good.
    Exited,
}

impl RunState {
    /// Out of `KVM_RUN` with its thread blocked on the control channel,
    /// where work posted during a pause reaches it.
    fn takes_work(self) -> bool {
        matches!(self, RunState::Parked | RunState::Halted)
    }
}

/// What a vCPU thread should do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Directive {
    /// Enter `KVM_RUN`.
    Run,
    /// A pause is requested: complete any pending exit, then call
    /// [`VcpuControl::park`].
    Park,
    /// Leave the run loop.
    Finish,
}

/// Work run on parked vCPU threads; it gets the vCPU index.
pub type VcpuWork = Arc<dyn Fn(usize) + Send + Sync>;

/// Pointer to a vCPU's `kvm_run.immediate_exit` byte.
struct ImmediateExit(*mut u8);
// SAFETY: the pointer is only dereferenced under the control lock while the
// owning vCPU thread is registered, i.e. while its `kvm_run` mapping is alive
// (the thread unregisters, under the same lock, before dropping its VcpuFd).
unsafe impl Send for ImmediateExit {}

struct Slot {
    state: RunState,
    pause_requested: bool,
    thread: Option<libc::pthread_t>,
    immediate_exit: Option<ImmediateExit>,
    /// The last work sequence number this vCPU has run (or was excused from).
    work_done: u64,
}

struct State {
    slots: Vec<Slot>,
    finish: bool,
    work: Option<VcpuWork>,
    work_seq: u64,
    /// Who holds the controller role (one pause at a time), if anyone.
    role: Option<RoleHolder>,
}

/// The thread that holds the controller role, and how many nested pauses
/// it has taken (a vCPU serving a notify holds the role, and the flush
/// engine it calls pauses again: the same role).
struct RoleHolder {
    thread: std::thread::ThreadId,
    depth: u32,
}

thread_local! {
    /// On a vCPU thread: (its control channel's address, its index).
    static CURRENT_VCPU: std::cell::Cell<Option<(usize, usize)>> =
        const { std::cell::Cell::new(None) };
    /// This thread's id, looked up once: `thread::current()` clones (and
    /// drops) a reference-counted handle, two locked operations on every
    /// pause.
    static THREAD_ID: std::thread::ThreadId = std::thread::current().id();
}

/// The calling thread's id.
fn current_thread_id() -> std::thread::ThreadId {
    THREAD_ID.with(|id| *id)
}

/// How long a vCPU waits for the controller role while another controller's
/// batch runs (it is parked meanwhile, so this is only a hang guard; a full
/// flush of the largest guest takes seconds).
pub const ROLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A condition variable of [`VcpuControl`]'s state that skips the wake-up
/// system call when nobody waits: std's futex-based `Condvar` makes one on
/// every notify, and a request served on a lone vCPU's own thread notifies
/// three times with no one to wake (measured: `strace -c`, 3 futex calls
/// per request). Sound because every wait and every state change a waiter
/// looks for happens under the state lock: a waiter counts itself before
/// `wait` releases the lock, so a notifier that changed the state under the
/// lock afterwards sees the count.
#[derive(Default)]
struct Wakeup {
    condvar: Condvar,
    waiters: AtomicUsize,
    /// Bumped by every notify (under the state lock): what a polling waiter
    /// watches.
    notifies: AtomicU64,
}

impl Wakeup {
    /// Waits for a notify, up to `timeout` if one is given: by polling
    /// ([`Self::poll`]) the first time in a wait (`*polled` false, and set
    /// here), blocking after that. Returns the lock and whether a blocking
    /// wait timed out. The caller re-checks what it waits for either way.
    fn wait_or_poll<'a>(
        &self,
        control: &'a VcpuControl,
        st: MutexGuard<'a, State>,
        polled: &mut bool,
        timeout: Option<Duration>,
    ) -> (MutexGuard<'a, State>, bool) {
        if !*polled {
            *polled = true;
            let budget = timeout.map_or(control.poll_budget, |t| t.min(control.poll_budget));
            return (self.poll(control, st, budget), false);
        }
        match timeout {
            Some(timeout) => self.wait_timeout(st, timeout),
            None => (self.wait(st), false),
        }
    }

    /// Releases the lock and polls for a notify for up to `budget`, then
    /// takes the lock again (whether or not one came).
    ///
    /// A blocked thread is woken by a system call and must then be
    /// scheduled again, on a CPU that may have gone idle meanwhile: that
    /// costs tens of µs here, as much as the pause it waits for. The
    /// notifier is another vCPU thread, running on another host CPU, a few
    /// µs from its notify: polling catches it (KVM's halt polling makes the
    /// same trade). Only used when every vCPU thread can have a host CPU of
    /// its own ([`VcpuControl::poll_budget_for`]); otherwise the poller would
    /// take the CPU the notifier needs.
    fn poll<'a>(
        &self,
        control: &'a VcpuControl,
        st: MutexGuard<'a, State>,
        budget: Duration,
    ) -> MutexGuard<'a, State> {
        let seen = self.notifies.load(Ordering::SeqCst);
        drop(st);
        let start = Instant::now();
        while self.notifies.load(Ordering::SeqCst) == seen && start.elapsed() < budget {
            std::hint::spin_loop();
        }
        control.lock()
    }

    fn wait<'a>(&self, st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let st = self.condvar.wait(st).unwrap_or_else(|p| p.into_inner());
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        st
    }

    /// Waits up to `timeout`; returns the lock and whether it timed out.
    fn wait_timeout<'a>(
        &self,
        st: MutexGuard<'a, State>,
        timeout: Duration,
    ) -> (MutexGuard<'a, State>, bool) {
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let (st, result) = self
            .condvar
            .wait_timeout(st, timeout)
            .unwrap_or_else(|p| p.into_inner());
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        (st, result.timed_out())
    }

    fn notify_all(&self) {
        self.notifies.fetch_add(1, Ordering::SeqCst);
        if self.waiters.load(Ordering::SeqCst) > 0 {
            self.condvar.notify_all();
        }
    }
}

/// A wait's deadline, `timeout` from the first time it is looked at: a
/// pause that never waits (nothing to stop, the role free) reads no clock,
/// which every request on one vCPU would otherwise pay for, cold.
struct Deadline {
    timeout: Duration,
    at: Option<Instant>,
}

impl Deadline {
    fn after(timeout: Duration) -> Self {
        Deadline { timeout, at: None }
    }

    /// The time left, `None` once it has passed.
    fn left(&mut self) -> Option<Duration> {
        let now = Instant::now();
        let at = *self.at.get_or_insert(now + self.timeout);
        at.checked_duration_since(now)
            .filter(|left| !left.is_zero())
    }
}

/// Shared between the vCPU threads and their controllers.
pub struct VcpuControl {
    state: Mutex<State>,
    /// Parked vCPUs wait here.
    vcpu_wakeup: Wakeup,
    /// Controllers wait here for acknowledgements.
    controller_wakeup: Wakeup,
    /// One flag per vCPU, set exactly while its thread is inside `KVM_RUN`
    /// (or about to enter it): what the pause invariant is checked against.
    in_kvm_run: Vec<AtomicBool>,
    /// The host CPU each vCPU thread last left `KVM_RUN` on (-1: not yet).
    last_host_cpu: Vec<AtomicI32>,
    /// How long a parked vCPU or a pausing controller polls before it
    /// blocks (see [`Wakeup::poll`]); zero when there are more vCPUs than
    /// host CPUs to run them.
    poll_budget: Duration,
}

/// How long a waiter polls, when it does: longer than a pause or a resume
/// takes when every vCPU has a host CPU (~20-40 µs here), and short enough
/// that a wait which will be long (a flush of many MiB) wastes little.
pub const POLL_BUDGET: Duration = Duration::from_micros(100);

impl VcpuControl {
    /// A channel for `count` vCPUs.
    pub fn new(count: usize) -> Arc<Self> {
        Self::with_poll_budget(count, Self::poll_budget_for(count))
    }

    /// [`Self::new`], polling for `poll_budget` (see [`Wakeup::poll`]).
    fn with_poll_budget(count: usize, poll_budget: Duration) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                slots: (0..count)
                    .map(|_| Slot {
                        state: RunState::NotStarted,
                        pause_requested: false,
                        thread: None,
                        immediate_exit: None,
                        work_done: 0,
                    })
                    .collect(),
                finish: false,
                work: None,
                work_seq: 0,
                role: None,
            }),
            vcpu_wakeup: Wakeup::default(),
            controller_wakeup: Wakeup::default(),
            in_kvm_run: (0..count).map(|_| AtomicBool::new(false)).collect(),
            last_host_cpu: (0..count).map(|_| AtomicI32::new(-1)).collect(),
            poll_budget,
        })
    }

    /// [`POLL_BUDGET`] if each of `vcpus` threads can have a host CPU of its
    /// own (the CPUs this process may run on), else zero: with fewer CPUs
    /// than vCPUs, a polling thread would hold the CPU that the thread it
    /// waits for needs.
    fn poll_budget_for(vcpus: usize) -> Duration {
        if vcpus <= flush_engine::host_cpus() {
            POLL_BUDGET
        } else {
            Duration::ZERO
        }
    }

    /// Number of vCPUs.
    pub fn count(&self) -> usize {
        self.in_kvm_run.len()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking vCPU thread must not take the whole VMM with it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The state of vCPU `index`.
    pub fn run_state(&self, index: usize) -> RunState {
        self.lock().slots[index].state
    }

    /// How many vCPU threads are inside `KVM_RUN` right now.
    pub fn vcpus_in_kvm_run(&self) -> usize {
        self.in_kvm_run
            .iter()
            .filter(|f| f.load(Ordering::SeqCst))
            .count()
    }

    // ---- vCPU-thread side -------------------------------------------------

    /// Called by vCPU thread `index` before its first `KVM_RUN`, with its
    /// `kvm_run.immediate_exit` byte.
    ///
    /// # Safety
    /// `immediate_exit` must stay valid until [`VcpuControl::exited`] is
    /// called by the same thread.
    pub unsafe fn register(&self, index: usize, immediate_exit: *mut u8) {
        let mut st = self.lock();
        let slot = &mut st.slots[index];
        slot.state = RunState::Running;
        // SAFETY: pthread_self never fails.
        slot.thread = Some(unsafe { libc::pthread_self() });
        slot.immediate_exit = Some(ImmediateExit(immediate_exit));
        self.controller_wakeup.notify_all();
        CURRENT_VCPU.set(Some((self.id(), index)));
    }

    /// This channel's identity, for [`CURRENT_VCPU`].
    fn id(&self) -> usize {
        self as *const Self as usize
    }

    /// The vCPU of this channel whose thread is calling, if any.
    fn calling_vcpu(&self) -> Option<usize> {
        CURRENT_VCPU
            .get()
            .and_then(|(id, index)| (id == self.id()).then_some(index))
    }

    /// Called by vCPU thread `index` at the top of its loop.
    pub fn before_run(&self, index: usize) -> Directive {
        let st = self.lock();
        if st.finish {
            return Directive::Finish;
        }
        let slot = &st.slots[index];
        if slot.pause_requested {
            return Directive::Park;
        }
        if let Some(ie) = &slot.immediate_exit {
            // SAFETY: see `ImmediateExit`; we hold the lock and are the owner.
            unsafe { ie.0.write_volatile(0) };
        }
        self.in_kvm_run[index].store(true, Ordering::SeqCst);
        Directive::Run
    }

    /// Called by vCPU thread `index` right after `KVM_RUN` returned.
    pub fn after_run(&self, index: usize) {
        self.in_kvm_run[index].store(false, Ordering::SeqCst);
        // SAFETY: sched_getcpu has no memory effects.
        let cpu = unsafe { libc::sched_getcpu() };
        self.last_host_cpu[index].store(cpu, Ordering::Relaxed);
    }

    /// The host CPU vCPU `index` last ran guest code on (-1: not yet).
    pub fn last_host_cpu(&self, index: usize) -> i32 {
        self.last_host_cpu[index].load(Ordering::Relaxed)
    }

    /// Parks vCPU thread `index` until its pause is lifted, running any work
    /// posted for it meanwhile. Returns [`Directive::Run`] or
    /// [`Directive::Finish`].
    pub fn park(&self, index: usize) -> Directive {
        self.wait_parked(index, RunState::Parked)
    }

    /// Called by vCPU thread `index` after the guest halted it for good:
    /// blocks until the VM finishes, running any work posted for it by a
    /// pause meanwhile. Returns [`Directive::Finish`].
    pub fn halted(&self, index: usize) -> Directive {
        self.wait_parked(index, RunState::Halted)
    }

    /// The body of [`Self::park`] and [`Self::halted`]: only a parked vCPU
    /// goes back to running when its pause is lifted.
    fn wait_parked(&self, index: usize, state: RunState) -> Directive {
        let mut st = self.lock();
        st.slots[index].state = state;
        self.controller_wakeup.notify_all();
        let mut polled = self.poll_budget.is_zero();
        loop {
            // Work first, even when finishing: a controller is waiting for it.
            let (guard, ran) = self.run_posted_work(st, index);
            st = guard;
            if ran {
                continue;
            }
            if st.finish {
                return Directive::Finish;
            }
            if state == RunState::Parked && !st.slots[index].pause_requested {
                st.slots[index].state = RunState::Running;
                return Directive::Run;
            }
            st = self.vcpu_wakeup.wait_or_poll(self, st, &mut polled, None).0;
        }
    }

    /// Runs the work posted for parked vCPU `index`, if any is pending;
    /// returns the re-taken lock and whether it ran something.
    fn run_posted_work<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        index: usize,
    ) -> (MutexGuard<'a, State>, bool) {
        if !(st.slots[index].pause_requested && st.slots[index].work_done < st.work_seq) {
            return (st, false);
        }
        let seq = st.work_seq;
        if let Some(work) = st.work.clone() {
            drop(st);
            // A panic in the work must not end this vCPU's thread (nor leave
            // its slot parked for good): it is contained here; the
            // controller learns of it because the work did not report
            // success (the flush engine counts its lines).
            if catch_unwind(AssertUnwindSafe(|| work(index))).is_err() {
                log::error!("vcpu {index}: work run during a pause panicked");
            }
            st = self.lock();
        }
        st.slots[index].work_done = seq;
        self.controller_wakeup.notify_all();
        (st, true)
    }

    /// Takes the controller role for the calling thread (nested if it holds
    /// it already). A vCPU thread waiting for it counts as parked: it is out
    /// of `KVM_RUN`, so another controller's pause does not wait for it, and
    /// it takes a share of that controller's work meanwhile. Returns the
    /// lock, held.
    fn acquire_role<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        deadline: &mut Deadline,
    ) -> Result<MutexGuard<'a, State>, ControlError> {
        let me = current_thread_id();
        let vcpu = self.calling_vcpu();
        if let Some(holder) = st.role.as_mut().filter(|h| h.thread == me) {
            holder.depth += 1;
            return Ok(st);
        }
        let free =
            |st: &State| st.role.is_none() && vcpu.is_none_or(|k| !st.slots[k].pause_requested);
        if let Some(k) = vcpu {
            let before = st.slots[k].state;
            st.slots[k].state = RunState::Parked;
            self.controller_wakeup.notify_all();
            // Waits like a parked vCPU (it is one, to the holder).
            let mut polled = self.poll_budget.is_zero();
            let result = loop {
                let (guard, ran) = self.run_posted_work(st, k);
                st = guard;
                if ran {
                    continue;
                }
                if st.finish {
                    break Err(ControlError::Finishing);
                }
                if free(&st) {
                    break Ok(());
                }
                let Some(left) = deadline.left() else {
                    break Err(ControlError::RoleTimeout(deadline.timeout));
                };
                st = self
                    .vcpu_wakeup
                    .wait_or_poll(self, st, &mut polled, Some(left))
                    .0;
            };
            st.slots[k].state = before;
            result?;
        } else {
            while !free(&st) {
                let Some(left) = deadline.left() else {
                    return Err(ControlError::RoleTimeout(deadline.timeout));
                };
                st = self.controller_wakeup.wait_timeout(st, left).0;
            }
        }
        st.role = Some(RoleHolder {
            thread: me,
            depth: 1,
        });
        Ok(st)
    }

    /// Gives the role back one level (see [`Self::acquire_role`]).
    fn release_role(&self, st: &mut State) {
        if let Some(holder) = st.role.as_mut() {
            holder.depth -= 1;
            if holder.depth == 0 {
                st.role = None;
            }
        }
        self.vcpu_wakeup.notify_all();
        self.controller_wakeup.notify_all();
    }

    /// Called by vCPU thread `index` when it leaves its run loop for good,
    /// before its `kvm_run` mapping goes away.
    pub fn exited(&self, index: usize) {
        let mut st = self.lock();
        let slot = &mut st.slots[index];
        slot.state = RunState::Exited;
        slot.thread = None;
        slot.immediate_exit = None;
        self.in_kvm_run[index].store(false, Ordering::SeqCst);
        self.controller_wakeup.notify_all();
        if self.calling_vcpu() == Some(index) {
            CURRENT_VCPU.set(None);
        }
    }

    // ---- controller side --------------------------------------------------

    fn kick_locked(slot: &Slot) {
        if slot.state != RunState::Running {
            return;
        }
        if let Some(ie) = &slot.immediate_exit {
            // SAFETY: see `ImmediateExit`: the thread is registered, so its
            // kvm_run page is mapped; we hold the lock it unregisters under.
            unsafe { ie.0.write_volatile(1) };
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        if let Some(thread) = slot.thread {
            // SAFETY: the thread is registered and has not called `exited`
            // (which needs the lock we hold), so it is alive and its id valid.
            unsafe { libc::pthread_kill(thread, kick_signal()) };
        }
    }

    /// Pauses `vcpus` and waits until each is parked or gone. On timeout the
    /// pause is undone and the vCPUs still running are named.
    ///
    /// Called from a vCPU thread (a vCPU serving its own notify), that vCPU
    /// is not waited for: it is out of `KVM_RUN`, handling the exit; it
    /// counts as paused and takes its share of the work inline. Waiting for
    /// the controller role (another thread's pause in progress), it counts
    /// as parked: another controller's pause does not wait for it, and it
    /// takes a share of that controller's work meanwhile.
    pub fn pause(
        &self,
        vcpus: &[usize],
        timeout: Duration,
    ) -> Result<PauseGuard<'_>, ControlError> {
        self.pause_vcpus(VcpuList::from_slice(vcpus), timeout)
    }

    /// [`Self::pause`], keeping `vcpus` in the guard (no allocation on a
    /// request's path).
    fn pause_vcpus(
        &self,
        vcpus: VcpuList,
        timeout: Duration,
    ) -> Result<PauseGuard<'_>, ControlError> {
        if let Some(&bad) = vcpus.iter().find(|&&i| i >= self.count()) {
            return Err(ControlError::NoSuchVcpu(bad));
        }
        let st = self.lock();
        let mut st = self.acquire_role(st, &mut Deadline::after(ROLE_TIMEOUT.max(timeout)))?;
        // A pause taken under a pause of the same thread: the outer one owns
        // the vCPUs' pause requests; this one only adds the ones it names.
        let nested = st.role.as_ref().is_some_and(|h| h.depth > 1);
        let me = self.calling_vcpu();
        let mut deadline = Deadline::after(timeout);
        for &i in &vcpus {
            if Some(i) == me {
                continue;
            }
            st.slots[i].pause_requested = true;
            Self::kick_locked(&st.slots[i]);
        }
        let mut polled = self.poll_budget.is_zero();
        // The vCPUs of `vcpus` still on their way out of guest mode.
        let still_running = |st: &State| -> VcpuList {
            let mut running = VcpuList::new();
            for &i in &vcpus {
                if Some(i) != me
                    && matches!(st.slots[i].state, RunState::Running | RunState::NotStarted)
                {
                    running.push(i);
                }
            }
            running
        };
        loop {
            let running = still_running(&st);
            if running.is_empty() {
                break;
            }
            let Some(left) = deadline.left() else {
                if !nested {
                    for &i in &vcpus {
                        if Some(i) != me {
                            st.slots[i].pause_requested = false;
                        }
                    }
                }
                self.release_role(&mut st);
                return Err(ControlError::PauseTimeout {
                    vcpus: running.to_vec(),
                    timeout,
                });
            };
            // The vCPUs were just kicked: each is on its way out of guest
            // mode, on a host CPU of its own if the controller polls.
            let wait = KICK_INTERVAL.min(left);
            let (guard, timed_out) =
                self.controller_wakeup
                    .wait_or_poll(self, st, &mut polled, Some(wait));
            st = guard;
            if timed_out {
                for &i in &running {
                    Self::kick_locked(&st.slots[i]);
                }
            }
        }
        drop(st);
        Ok(PauseGuard {
            control: self,
            controller_vcpu: me.filter(|k| vcpus.contains(k)),
            vcpus,
            nested,
        })
    }

    /// Pauses every vCPU.
    pub fn pause_all(&self, timeout: Duration) -> Result<PauseGuard<'_>, ControlError> {
        // Pushed, not collected: SmallVec's generic `extend` costs several
        // times as many instructions on every request's path.
        let mut all = VcpuList::new();
        for i in 0..self.count() {
            all.push(i);
        }
        self.pause_vcpus(all, timeout)
    }

    /// Asks every vCPU thread to leave its run loop, and waits (up to
    /// `timeout`) until all have. Returns the ones that did not.
    ///
    /// Serialised with pauses: a pause in progress (its work on the parked
    /// threads included) ends first, so a flush never loses a worker to a
    /// concurrent stop. Pauses are bounded by their own deadlines, so this
    /// wait is too.
    pub fn finish(&self, timeout: Duration) -> Vec<usize> {
        let deadline = Instant::now() + timeout;
        let mut role_deadline = Deadline {
            timeout,
            at: Some(deadline),
        };
        let st = self.lock();
        // A caller that holds a pause itself would nest: it gets every live
        // vCPU back as "stuck" instead (finishing under one's own pause
        // would take the workers the pause is using).
        let me = current_thread_id();
        if st.role.as_ref().is_some_and(|h| h.thread == me) {
            return (0..st.slots.len())
                .filter(|&i| st.slots[i].state != RunState::Exited)
                .collect();
        }
        let mut st = match self.acquire_role(st, &mut role_deadline) {
            Ok(st) => st,
            Err(_) => {
                let st = self.lock();
                return (0..st.slots.len())
                    .filter(|&i| st.slots[i].state != RunState::Exited)
                    .collect();
            }
        };
        st.finish = true;
        self.vcpu_wakeup.notify_all();
        loop {
            let alive: Vec<usize> = (0..st.slots.len())
                .filter(|&i| st.slots[i].state != RunState::Exited)
                .collect();
            // A thread that never registered will see `finish` first thing.
            let stuck: Vec<usize> = alive
                .iter()
                .copied()
                .filter(|&i| st.slots[i].state != RunState::NotStarted)
                .collect();
            if stuck.is_empty() {
                self.release_role(&mut st);
                return Vec::new();
            }
            let now = Instant::now();
            if now >= deadline {
                self.release_role(&mut st);
                return stuck;
            }
            for &i in &stuck {
                Self::kick_locked(&st.slots[i]);
            }
            let wait = KICK_INTERVAL.min(deadline - now);
            st = self.controller_wakeup.wait_timeout(st, wait).0;
        }
    }
}

/// The vCPUs one pause stops. Up to 8 (VMs of this size are the common
/// case) are kept inline: a pause then allocates nothing.
type VcpuList = SmallVec<[usize; 8]>;

/// A set of paused vCPUs. Dropping it resumes them.
pub struct PauseGuard<'a> {
    control: &'a VcpuControl,
    vcpus: VcpuList,
    /// The vCPU whose thread took this pause (serving its own notify), if
    /// it is one of `vcpus`: not parked, but out of `KVM_RUN` all the same.
    controller_vcpu: Option<usize>,
    /// Taken under another pause of the same thread, which resumes the
    /// vCPUs when it ends.
    nested: bool,
}

impl PauseGuard<'_> {
    /// The paused vCPUs whose threads are alive (parked or halted), in
    /// index order: the ones that can take a share of work.
    pub fn parked(&self) -> Vec<usize> {
        let st = self.control.lock();
        self.vcpus
            .iter()
            .copied()
            .filter(|&i| st.slots[i].state.takes_work())
            .collect()
    }

    /// The vCPUs whose threads take work: the parked ones, and the vCPU that
    /// took this pause from its own thread, if any.
    pub fn workers(&self) -> Vec<usize> {
        let mut workers = self.parked();
        workers.extend(self.controller_vcpu);
        workers.sort_unstable();
        workers
    }

    /// Runs `work(index)` on the thread of every parked vCPU of this pause, in
    /// parallel, and waits until all have finished. Returns the vCPUs that ran
    /// it. A vCPU whose thread ends meanwhile is excused.
    pub fn run_on_parked(
        &self,
        work: VcpuWork,
        timeout: Duration,
    ) -> Result<Vec<usize>, ControlError> {
        let deadline = Instant::now() + timeout;
        let mut st = self.control.lock();
        st.work_seq += 1;
        let seq = st.work_seq;
        st.work = Some(work.clone());
        let parked: Vec<usize> = self
            .vcpus
            .iter()
            .copied()
            .filter(|&i| Some(i) != self.controller_vcpu && st.slots[i].state.takes_work())
            .collect();
        self.control.vcpu_wakeup.notify_all();
        // The controller's own vCPU (serving its notify) works too, here.
        if let Some(k) = self.controller_vcpu {
            drop(st);
            if catch_unwind(AssertUnwindSafe(|| work(k))).is_err() {
                log::error!("vcpu {k}: work run during its own pause panicked");
            }
            st = self.control.lock();
        }
        let mut ran = parked.clone();
        ran.extend(self.controller_vcpu);
        ran.sort_unstable();
        let result = loop {
            let busy: Vec<usize> = parked
                .iter()
                .copied()
                .filter(|&i| st.slots[i].work_done < seq && st.slots[i].state.takes_work())
                .collect();
            if busy.is_empty() {
                break Ok(ran);
            }
            let now = Instant::now();
            if now >= deadline {
                break Err(ControlError::WorkTimeout {
                    vcpus: busy,
                    timeout,
                });
            }
            st = self
                .control
                .controller_wakeup
                .wait_timeout(st, deadline - now)
                .0;
        };
        // Whoever did not pick the work up is excused from it: a late start
        // must not run a share the controller no longer waits for.
        for i in 0..st.slots.len() {
            st.slots[i].work_done = st.slots[i].work_done.max(seq);
        }
        st.work = None;
        result
    }
}

impl Drop for PauseGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.control.lock();
        if !self.nested {
            for &i in &self.vcpus {
                if Some(i) != self.controller_vcpu {
                    st.slots[i].pause_requested = false;
                }
            }
        }
        self.control.release_role(&mut st);
    }
}

// ---- the flush engine's seam ------------------------------------------------

impl From<ControlError> for PauseError {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::PauseTimeout { vcpus, timeout } => {
                PauseError::PauseTimeout { vcpus, timeout }
            }
            ControlError::WorkTimeout { vcpus, timeout } => PauseError::WorkTimeout {
                workers: vcpus,
                timeout,
            },
            other => PauseError::Other(other.to_string()),
        }
    }
}

/// The flush engine pauses this VMM's vCPUs through the control channel.
impl VcpuPause for VcpuControl {
    type Paused<'a> = PauseGuard<'a>;

    fn pause_all(&self, timeout: Duration) -> Result<PauseGuard<'_>, PauseError> {
        VcpuControl::pause_all(self, timeout).map_err(PauseError::from)
    }

    fn last_host_cpu(&self, vcpu: usize) -> Option<i32> {
        let cpu = VcpuControl::last_host_cpu(self, vcpu);
        (cpu >= 0).then_some(cpu)
    }

    fn vcpus_in_guest(&self) -> Option<usize> {
        Some(self.vcpus_in_kvm_run())
    }
}

/// The engine's shares run on the parked vCPU threads (so on the host cores
/// the guest occupies), one share per parked or halted thread.
impl PausedVcpus for PauseGuard<'_> {
    fn worker_count(&self) -> usize {
        self.workers().len()
    }

    fn controller_vcpu(&self) -> Option<usize> {
        self.controller_vcpu
    }

    fn run_on_vcpus(&self, work: WorkFn, timeout: Duration) -> Result<(), PauseError> {
        // `finish` waits for this pause, so the parked set cannot shrink
        // between `worker_count` and here; if a thread died anyway (a panic
        // outside the contained work), its share never runs and the
        // engine's line count fails the batch.
        let workers = self.workers();
        self.run_on_parked(
            Arc::new(move |vcpu| {
                if let Some(index) = workers.iter().position(|&v| v == vcpu) {
                    work(Worker {
                        index,
                        vcpu: Some(vcpu),
                    });
                }
            }),
            timeout,
        )
        .map(drop)
        .map_err(PauseError::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread::JoinHandle;

    /// A stand-in vCPU thread: registers, and "runs" by returning from a
    /// pretend KVM_RUN at once, until told to finish.
    fn fake_vcpu(control: &Arc<VcpuControl>, index: usize) -> JoinHandle<()> {
        fake_vcpu_with(control, index, |_| {})
    }

    /// [`fake_vcpu`], calling `between_runs` after each pretend KVM_RUN (as a
    /// vCPU handling an exit would).
    fn fake_vcpu_with(
        control: &Arc<VcpuControl>,
        index: usize,
        mut between_runs: impl FnMut(&VcpuControl) + Send + 'static,
    ) -> JoinHandle<()> {
        install_kick_handler().unwrap();
        let control = control.clone();
        std::thread::spawn(move || {
            let mut immediate_exit = Box::new(0u8);
            // SAFETY: the byte lives until this thread calls `exited`.
            unsafe { control.register(index, &mut *immediate_exit) };
            loop {
                match control.before_run(index) {
                    Directive::Run => {
                        control.after_run(index);
                        between_runs(&control);
                        std::thread::yield_now();
                    }
                    Directive::Park => {
                        if control.park(index) == Directive::Finish {
                            break;
                        }
                    }
                    Directive::Finish => break,
                }
            }
            control.exited(index);
        })
    }

    /// A vCPU thread that serves its own notify: it pauses the others from
    /// its own thread, every few rounds, `pauses` times, and runs work.
    fn self_pausing_vcpu(
        control: &Arc<VcpuControl>,
        index: usize,
        pauses: usize,
        ran: Arc<Mutex<Vec<(usize, usize)>>>,
        done: std::sync::mpsc::Sender<Result<(), String>>,
    ) -> JoinHandle<()> {
        let mut left = pauses;
        let mut rounds = 0u64;
        fake_vcpu_with(control, index, move |control| {
            rounds += 1;
            if left == 0 || rounds % 50 != 0 {
                return;
            }
            left -= 1;
            let result = control
                .pause_all(Duration::from_secs(10))
                .map_err(|e| e.to_string())
                .and_then(|pause| {
                    let ran = ran.clone();
                    let workers = pause.workers();
                    pause
                        .run_on_parked(
                            Arc::new(move |v| ran.lock().unwrap().push((index, v))),
                            Duration::from_secs(10),
                        )
                        .map_err(|e| e.to_string())
                        .map(|on| assert_eq!(on, workers))
                });
            if left == 0 || result.is_err() {
                let _ = done.send(result);
            }
        })
    }

    #[test]
    fn vcpus_pausing_each_other_from_their_own_threads_neither_deadlock_nor_skip_work() {
        vcpus_pause_each_other(VcpuControl::new(3));
    }

    #[test]
    fn waiters_that_poll_end_their_poll_on_a_notify() {
        // Polling that outlasts the test: every wait must end on a notify,
        // as a blocking one does, or the pauses never finish.
        vcpus_pause_each_other(VcpuControl::with_poll_budget(3, Duration::from_secs(3600)));
    }

    #[test]
    fn vcpus_poll_only_when_each_has_a_host_cpu() {
        let cpus = flush_engine::host_cpus();
        assert_eq!(VcpuControl::new(cpus).poll_budget, POLL_BUDGET);
        assert_eq!(VcpuControl::new(cpus + 1).poll_budget, Duration::ZERO);
    }

    /// Three vCPU threads pause each other, 40 times each, and run work on
    /// the parked ones.
    fn vcpus_pause_each_other(control: Arc<VcpuControl>) {
        let ran = Arc::new(Mutex::new(Vec::new()));
        let (done, finished) = std::sync::mpsc::channel();
        let pauses = 40;
        let threads: Vec<_> = (0..3)
            .map(|i| self_pausing_vcpu(&control, i, pauses, ran.clone(), done.clone()))
            .collect();
        for _ in 0..3 {
            let result = finished
                .recv_timeout(Duration::from_secs(60))
                .expect("a vCPU never finished its pauses: deadlock");
            result.expect("pause from a vCPU thread");
        }
        assert!(control.finish(Duration::from_secs(30)).is_empty());
        for t in threads {
            t.join().unwrap();
        }
        // Every pause ran its work on all three vCPUs: its own (inline) and
        // the two others (parked, or waiting for the role).
        let ran = ran.lock().unwrap();
        for controller in 0..3 {
            for worker in 0..3 {
                let n = ran
                    .iter()
                    .filter(|&&(c, w)| c == controller && w == worker)
                    .count();
                assert_eq!(
                    n, pauses,
                    "pauses of vCPU {controller} ran on vCPU {worker} {n} times"
                );
            }
        }
    }

    #[test]
    fn finish_waits_for_a_pause_in_progress() {
        let control = VcpuControl::new(2);
        let threads = [fake_vcpu(&control, 0), fake_vcpu(&control, 1)];
        let pause = control.pause_all(Duration::from_secs(5)).unwrap();
        let finisher = {
            let control = control.clone();
            std::thread::spawn(move || control.finish(Duration::from_secs(30)))
        };
        // While the pause lasts, finish must not end any vCPU: a flush would
        // lose the worker it is running a share on.
        std::thread::sleep(Duration::from_millis(100));
        assert!(!finisher.is_finished(), "finish ran during a pause");
        assert_eq!(control.run_state(0), RunState::Parked);
        assert_eq!(control.run_state(1), RunState::Parked);
        drop(pause);
        assert!(finisher.join().unwrap().is_empty());
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(control.run_state(0), RunState::Exited);
    }

    #[test]
    fn finish_from_the_pausing_thread_answers_at_its_deadline() {
        let control = VcpuControl::new(1);
        let thread = fake_vcpu(&control, 0);
        let pause = control.pause_all(Duration::from_secs(5)).unwrap();
        assert_eq!(control.finish(Duration::from_millis(20)), vec![0]);
        drop(pause);
        assert!(control.finish(Duration::from_secs(30)).is_empty());
        thread.join().unwrap();
    }

    #[test]
    fn work_that_panics_leaves_the_vcpu_thread_parked_and_usable() {
        let control = VcpuControl::new(1);
        let thread = fake_vcpu(&control, 0);
        let pause = control.pause_all(Duration::from_secs(5)).unwrap();
        let ran = pause
            .run_on_parked(
                Arc::new(|_| panic!("work panics (expected in this test)")),
                Duration::from_secs(5),
            )
            .unwrap();
        assert_eq!(ran, vec![0]);
        assert_eq!(
            control.run_state(0),
            RunState::Parked,
            "the thread survived"
        );
        let again = Arc::new(AtomicBool::new(false));
        let a = again.clone();
        pause
            .run_on_parked(
                Arc::new(move |_| a.store(true, Ordering::SeqCst)),
                Duration::from_secs(5),
            )
            .unwrap();
        assert!(again.load(Ordering::SeqCst), "later work still runs there");
        drop(pause);
        assert!(control.finish(Duration::from_secs(30)).is_empty());
        thread.join().unwrap();
    }
}
