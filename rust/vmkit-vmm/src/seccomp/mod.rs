//! Seccomp confinement, with Cloud Hypervisor's `--seccomp` semantics: every
//! VMM thread runs under the filter of its kind (the tables are in
//! [`filters`]); `true` traps a system call outside it (the process dies of
//! SIGSYS after printing Cloud Hypervisor's message), `log` lets it through
//! and the kernel logs it (audit type 1326), `false` installs nothing.
//!
//! A thread inherits its creator's filters and adds its own, so a system call
//! must pass both. That is why threads the guest can cause to exist (device
//! workers, started when the driver sets DRIVER_OK on a vCPU thread) are not
//! created by the vCPU thread itself but by a [`Spawner`], whose filter is
//! the union of the workers' filters: the vCPU filter stays small.

pub mod filters;
mod groups;

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, Once, OnceLock};
use std::thread::JoinHandle;

use seccompiler::BpfProgram;

pub use filters::ThreadKind;
pub use groups::ThreadGroups;

/// `--seccomp`: what a system call outside a thread's filter does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SeccompMode {
    /// `false`: no filter is installed.
    Off,
    /// `log`: the call goes through and the kernel logs it.
    Log,
    /// `true`: SIGSYS; the process prints the message and dies.
    #[default]
    Trap,
}

impl SeccompMode {
    /// The `--seccomp` value: `true`, `false` or `log`.
    pub fn parse(value: &str) -> Option<SeccompMode> {
        match value {
            "true" => Some(SeccompMode::Trap),
            "false" => Some(SeccompMode::Off),
            "log" => Some(SeccompMode::Log),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SeccompMode::Trap => "true",
            SeccompMode::Off => "false",
            SeccompMode::Log => "log",
        }
    }
}

/// Cloud Hypervisor's text for a trapped system call (its `main.rs`).
const VIOLATION_MESSAGE: &[u8] = b"\n==== Possible seccomp violation ====\nTry running with `strace -ff` to identify the cause and open an issue: https://github.com/cloud-hypervisor/cloud-hypervisor/issues/new\n";

/// Which kind each confined thread is, for the SIGSYS message: slots of
/// `tid << 8 | kind`, read by the signal handler without locks or TLS (a
/// dlopen-ed library's TLS may be allocated on first use, with malloc).
static THREAD_KINDS: [AtomicU64; 1024] = [const { AtomicU64::new(0) }; 1024];

fn current_tid() -> u64 {
    // SAFETY: gettid(2) has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as u64 }
}

/// Records the calling thread's kind; the returned guard forgets it.
fn record_kind(kind: ThreadKind) -> KindRecord {
    let index = ThreadKind::ALL.iter().position(|&k| k == kind).unwrap_or(0) as u64;
    let entry = current_tid() << 8 | index;
    for (slot, cell) in THREAD_KINDS.iter().enumerate() {
        if cell
            .compare_exchange(0, entry, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            return KindRecord(Some(slot));
        }
    }
    KindRecord(None)
}

struct KindRecord(Option<usize>);

impl Drop for KindRecord {
    fn drop(&mut self) {
        if let Some(slot) = self.0 {
            THREAD_KINDS[slot].store(0, Ordering::Release);
        }
    }
}

/// The calling thread's recorded kind name (signal-safe).
fn recorded_kind() -> &'static str {
    let tid = current_tid();
    for cell in &THREAD_KINDS {
        let entry = cell.load(Ordering::Acquire);
        if entry != 0 && entry >> 8 == tid {
            let index = (entry & 0xff) as usize;
            return ThreadKind::ALL
                .get(index)
                .map_or("vmkit process", |k| k.name());
        }
    }
    "vmkit process"
}

/// `si_code` of a SIGSYS raised by a seccomp filter.
const SYS_SECCOMP: libc::c_int = 1;
/// Offset of `_sigsys._syscall` in `siginfo_t` (x86_64): after signo, errno,
/// code, padding and the 8-byte call address.
const SIGINFO_SYSCALL_OFFSET: usize = 24;

extern "C" fn sigsys_handler(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler.
    let code = unsafe { (*info).si_code };
    if code == SYS_SECCOMP {
        // SAFETY: for SYS_SECCOMP the kernel fills `_sigsys`, whose syscall
        // number is an int at this offset inside the siginfo_t.
        let syscall = unsafe {
            std::ptr::read_unaligned(info.cast::<u8>().add(SIGINFO_SYSCALL_OFFSET).cast::<i32>())
        };
        write_stderr(VIOLATION_MESSAGE);
        let mut line = [0u8; 160];
        let mut len = 0;
        let kind = recorded_kind();
        for part in [
            b"vmkit: system call ".as_slice(),
            &decimal(syscall).0[..decimal(syscall).1],
            b" is outside the seccomp filter of this ".as_slice(),
            kind.as_bytes(),
            b" thread\n".as_slice(),
        ] {
            let n = part.len().min(line.len() - len);
            line[len..len + n].copy_from_slice(&part[..n]);
            len += n;
        }
        write_stderr(&line[..len]);
    }
    // Die of SIGSYS, as the default action would have (exit status and core
    // dump unchanged for whoever waits for the process).
    // SAFETY: async-signal-safe calls with valid arguments.
    unsafe {
        libc::signal(libc::SIGSYS, libc::SIG_DFL);
        let mut unblock: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut unblock);
        libc::sigaddset(&mut unblock, libc::SIGSYS);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &unblock, std::ptr::null_mut());
        libc::raise(libc::SIGSYS);
    }
}

fn write_stderr(bytes: &[u8]) {
    // SAFETY: write(2) from a valid buffer; async-signal-safe.
    let _ = unsafe { libc::write(libc::STDERR_FILENO, bytes.as_ptr().cast(), bytes.len()) };
}

/// `value` in decimal, without allocating (for the signal handler).
fn decimal(value: i32) -> ([u8; 12], usize) {
    let mut digits = [0u8; 12];
    let mut n = value.unsigned_abs();
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if value < 0 {
        i -= 1;
        digits[i] = b'-';
    }
    let len = digits.len() - i;
    digits.copy_within(i.., 0);
    (digits, len)
}

static SIGSYS_HANDLER: Once = Once::new();

/// Installs the SIGSYS handler that prints the violation (once per process).
fn install_sigsys_handler() -> io::Result<()> {
    let mut result = Ok(());
    SIGSYS_HANDLER.call_once(|| {
        // SAFETY: a zeroed sigaction is valid; the handler is an
        // async-signal-safe extern "C" fn with the SA_SIGINFO signature.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = sigsys_handler as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
                result = Err(io::Error::last_os_error());
            }
        }
    });
    result
}

/// The compiled filters of one (kind, mode): the kind's table, then the one
/// that makes `clone3` fail with ENOSYS where threads are created.
type Programs = Arc<Vec<BpfProgram>>;

/// glibc's malloc counts the CPUs (reading /sys) the first time it needs
/// more than 8 arenas, which a confined thread may not do: set the limit to
/// the value glibc would compute, before any filter is installed. A limit
/// the user set (MALLOC_ARENA_MAX, GLIBC_TUNABLES) is left alone.
fn settle_malloc_arenas() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("MALLOC_ARENA_MAX").is_some()
            || std::env::var_os("GLIBC_TUNABLES").is_some()
        {
            return;
        }
        // SAFETY: get_nprocs and mallopt have no memory-safety preconditions.
        unsafe {
            let cpus = libc::sysconf(libc::_SC_NPROCESSORS_ONLN).clamp(1, 1 << 16) as libc::c_int;
            libc::mallopt(libc::M_ARENA_MAX, cpus.saturating_mul(8));
        }
    });
}

type ProgramCache = Mutex<HashMap<(ThreadKind, SeccompMode), Programs>>;

fn program_cache() -> &'static ProgramCache {
    static CACHE: OnceLock<ProgramCache> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// Compiles every thread kind's filter for `mode` into this process's
/// cache. A process that forks VM processes does it once: they then share
/// its pages instead of each compiling, and writing, its own (~50 KiB of
/// heap per VM process). A kind that fails to compile is left out: its
/// threads report the error when they start.
pub fn compile_all(mode: SeccompMode) {
    if mode == SeccompMode::Off {
        return;
    }
    for kind in ThreadKind::ALL {
        let _ = programs(kind, mode);
    }
}

fn programs(kind: ThreadKind, mode: SeccompMode) -> io::Result<Programs> {
    settle_malloc_arenas();
    let mut cache = program_cache().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(programs) = cache.get(&(kind, mode)) {
        return Ok(programs.clone());
    }
    let compiled = Arc::new(filters::compile(kind, mode).map_err(|e| {
        io::Error::other(format!(
            "cannot build the seccomp filter of {kind} threads: {e}"
        ))
    })?);
    cache.insert((kind, mode), compiled.clone());
    Ok(compiled)
}

/// Confines the calling thread to `kind`'s filter (nothing with `Off`).
pub fn confine_thread(kind: ThreadKind, mode: SeccompMode) -> io::Result<()> {
    install(kind, mode, seccompiler::apply_filter)
}

/// Confines every thread of the process to `kind`'s filter (TSYNC): the
/// `vmkit` command's interpreter threads, once its start-up is done.
pub fn confine_process(kind: ThreadKind, mode: SeccompMode) -> io::Result<()> {
    install(kind, mode, seccompiler::apply_filter_all_threads)
}

fn install(
    kind: ThreadKind,
    mode: SeccompMode,
    apply: fn(&[seccompiler::sock_filter]) -> seccompiler::Result<()>,
) -> io::Result<()> {
    if mode == SeccompMode::Off {
        return Ok(());
    }
    let programs = programs(kind, mode)?;
    if mode == SeccompMode::Trap {
        install_sigsys_handler()?;
    }
    for program in programs.iter() {
        apply(program).map_err(|e| {
            io::Error::other(format!(
                "cannot install the seccomp filter of {kind} threads: {e}"
            ))
        })?;
    }
    Ok(())
}

/// Starts a thread named `name` that joins its CPU group in `groups` and
/// confines itself to `kind`'s filter before it runs `body`; returns once
/// both are done.
pub fn spawn_confined<F>(
    name: String,
    kind: ThreadKind,
    mode: SeccompMode,
    groups: &ThreadGroups,
    body: F,
) -> io::Result<JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    if mode == SeccompMode::Off && !groups.places(kind) {
        return std::thread::Builder::new().name(name).spawn(move || {
            crate::stack::note_stack_bounds();
            body()
        });
    }
    if mode != SeccompMode::Off {
        // Compiled here, so that the new thread only installs it.
        programs(kind, mode)?;
    }
    let groups = groups.clone();
    let (ready, installed) = mpsc::sync_channel(1);
    let handle = std::thread::Builder::new().name(name).spawn(move || {
        let _record = record_kind(kind);
        // Before the filter: it reads the thread's affinity.
        crate::stack::note_stack_bounds();
        let result = groups.join(kind).and_then(|()| confine_thread(kind, mode));
        drop(groups);
        let confined = result.is_ok();
        let _ = ready.send(result);
        // A thread whose filter failed never runs unconfined.
        if confined {
            body();
        }
    })?;
    let result = installed.recv().unwrap_or_else(|_| {
        Err(io::Error::other(
            "the thread ended before its filter was installed",
        ))
    });
    if let Err(e) = result {
        let _ = handle.join();
        return Err(e);
    }
    Ok(handle)
}

type Job = Box<dyn FnOnce() + Send>;

struct SpawnService {
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl SpawnService {
    fn stop(&self) {
        // Closing the channel ends the thread's loop.
        drop(self.jobs.lock().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(thread) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = thread.join();
        }
    }
}

impl Drop for SpawnService {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts the threads that guest-facing threads ask for (device workers
/// activated from a vCPU thread), so that they do not inherit the filter of
/// the thread that asked. Cloning shares the one spawner thread.
#[derive(Clone)]
pub struct Spawner {
    mode: SeccompMode,
    groups: ThreadGroups,
    service: Option<Arc<SpawnService>>,
}

impl Spawner {
    /// A spawner whose threads join their group in `groups` and are confined
    /// with `mode`; with `Off` it starts them directly and has no thread of
    /// its own.
    pub fn start(mode: SeccompMode, groups: ThreadGroups) -> io::Result<Spawner> {
        if mode == SeccompMode::Off {
            return Ok(Spawner {
                mode,
                groups,
                service: None,
            });
        }
        let (jobs, incoming) = mpsc::channel::<Job>();
        let thread = spawn_confined(
            "vmkit-spawner".into(),
            ThreadKind::Spawner,
            mode,
            &groups,
            move || {
                while let Ok(job) = incoming.recv() {
                    job();
                }
            },
        )?;
        Ok(Spawner {
            mode,
            groups,
            service: Some(Arc::new(SpawnService {
                jobs: Mutex::new(Some(jobs)),
                thread: Mutex::new(Some(thread)),
            })),
        })
    }

    /// Starts threads directly, without filters (`--seccomp false`, tests).
    pub fn unconfined() -> Spawner {
        Spawner {
            mode: SeccompMode::Off,
            groups: ThreadGroups::default(),
            service: None,
        }
    }

    pub fn mode(&self) -> SeccompMode {
        self.mode
    }

    /// Ends the spawner thread (for every clone); later spawns fail.
    pub fn stop(&self) {
        if let Some(service) = &self.service {
            service.stop();
        }
    }

    /// Starts `body` on a new thread confined to `kind`'s filter.
    pub fn spawn<F>(&self, name: String, kind: ThreadKind, body: F) -> io::Result<JoinHandle<()>>
    where
        F: FnOnce() + Send + 'static,
    {
        let Some(service) = &self.service else {
            return spawn_confined(name, kind, self.mode, &self.groups, body);
        };
        let (reply, started) = mpsc::sync_channel(1);
        let mode = self.mode;
        let groups = self.groups.clone();
        let job: Job = Box::new(move || {
            let _ = reply.send(spawn_confined(name, kind, mode, &groups, body));
        });
        let sent = match service
            .jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            Some(jobs) => jobs.send(job).is_ok(),
            None => false,
        };
        if !sent {
            return Err(io::Error::other("the spawner thread has stopped"));
        }
        started
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("the spawner thread has stopped")))
    }
}

#[cfg(test)]
mod tests;
