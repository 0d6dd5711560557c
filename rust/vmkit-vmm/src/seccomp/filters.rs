//! The seccomp filter of each VMM thread kind: which system calls it may
//! make and why. A kind that creates threads also allows what its children
//! do before they install their own filter and, since filters stack, every
//! call of its children's filters (the union is taken in [`rules`]).

use std::collections::BTreeMap;
use std::fmt;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid2, kvm_debugregs, kvm_dirty_log, kvm_enable_cap, kvm_fpu,
    kvm_ioeventfd, kvm_irq_routing, kvm_irqfd, kvm_lapic_state, kvm_mp_state, kvm_msi,
    kvm_msr_list, kvm_msrs, kvm_regs, kvm_sregs, kvm_userspace_memory_region, kvm_vcpu_events,
    kvm_xcrs, kvm_xsave, KVMIO,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

use super::SeccompMode;
use crate::virtio::block::disk::{BLKDISCARD, BLKPBSZGET, BLKSSZGET, BLKZEROOUT};
use crate::virtio::net::tap::{
    SIOCGIFFLAGS, SIOCGIFHWADDR, SIOCGIFMTU, SIOCSIFADDR, SIOCSIFFLAGS, SIOCSIFHWADDR, SIOCSIFMTU,
    SIOCSIFNETMASK, TUNGETIFF, TUNSETIFF, TUNSETOFFLOAD, TUNSETQUEUE, TUNSETVNETHDRSZ,
};

/// The kinds of VMM thread, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// Runs `KVM_RUN` and the device emulation of its exits.
    Vcpu,
    /// The VM's own thread: watchdog, guest resets (it rebuilds the VM).
    Vmm,
    /// Starts the device workers that vCPU threads ask for.
    Spawner,
    /// virtio-blk queue worker, synchronous engine.
    BlockSync,
    /// virtio-blk queue worker, io_uring engine.
    BlockIoUring,
    /// virtio-net queue-pair worker.
    Net,
    /// virtio-rng worker.
    Rng,
    /// virtio-watchdog worker.
    Watchdog,
    /// virtio-pmem worker (FLUSH requests).
    Pmem,
    /// virtio-balloon worker: gives guest pages back to the host.
    Balloon,
    /// virtio-mem worker: plugs and unplugs blocks of its region.
    VirtioMem,
    /// virtio-console worker.
    Console,
    /// virtio-vsock worker: the queues and the host's unix sockets.
    Vsock,
    /// vhost-user device relay: the backend's signals, its connection.
    VhostUser,
    /// The TPM's worker: the guest's TPM commands to swtpm and back.
    Tpm,
    /// Serial/console input from the terminal or a pty.
    SerialInput,
    /// Serial/console `socket=`: accepts a client and pumps its input.
    SerialSocket,
    /// The `vmkit` command's interpreter threads (API server, control).
    Process,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 18] = [
        ThreadKind::Vcpu,
        ThreadKind::Vmm,
        ThreadKind::Spawner,
        ThreadKind::BlockSync,
        ThreadKind::BlockIoUring,
        ThreadKind::Net,
        ThreadKind::Rng,
        ThreadKind::Watchdog,
        ThreadKind::Pmem,
        ThreadKind::Balloon,
        ThreadKind::VirtioMem,
        ThreadKind::Console,
        ThreadKind::Vsock,
        ThreadKind::VhostUser,
        ThreadKind::Tpm,
        ThreadKind::SerialInput,
        ThreadKind::SerialSocket,
        ThreadKind::Process,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Vmm => "vmm",
            ThreadKind::Spawner => "spawner",
            ThreadKind::BlockSync => "block (sync)",
            ThreadKind::BlockIoUring => "block (io_uring)",
            ThreadKind::Net => "net",
            ThreadKind::Rng => "rng",
            ThreadKind::Watchdog => "watchdog",
            ThreadKind::Pmem => "pmem",
            ThreadKind::Balloon => "balloon",
            ThreadKind::VirtioMem => "virtio-mem",
            ThreadKind::Console => "console",
            ThreadKind::Vsock => "vsock",
            ThreadKind::VhostUser => "vhost-user",
            ThreadKind::Tpm => "tpm",
            ThreadKind::SerialInput => "serial input",
            ThreadKind::SerialSocket => "serial socket",
            ThreadKind::Process => "vmkit process",
        }
    }

    /// The kinds whose threads this kind creates (their filters stack on its).
    pub(super) fn children(self) -> &'static [ThreadKind] {
        use ThreadKind::*;
        match self {
            Vmm => &[Vcpu, Spawner],
            Spawner => &[
                BlockSync,
                BlockIoUring,
                Net,
                Rng,
                Watchdog,
                Pmem,
                Balloon,
                VirtioMem,
                Console,
                Vsock,
                VhostUser,
                Tpm,
            ],
            Process => &[Vmm, Vcpu, Spawner, SerialInput, SerialSocket],
            _ => &[],
        }
    }
}

impl fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

// KVM ioctls, as <linux/kvm.h> defines them.
ioctl_io_nr!(KVM_GET_API_VERSION, KVMIO, 0x00);
ioctl_io_nr!(KVM_CREATE_VM, KVMIO, 0x01);
ioctl_io_nr!(KVM_CHECK_EXTENSION, KVMIO, 0x03);
ioctl_io_nr!(KVM_GET_VCPU_MMAP_SIZE, KVMIO, 0x04);
ioctl_iowr_nr!(KVM_GET_SUPPORTED_CPUID, KVMIO, 0x05, kvm_cpuid2);
ioctl_io_nr!(KVM_CREATE_VCPU, KVMIO, 0x41);
ioctl_iow_nr!(
    KVM_SET_USER_MEMORY_REGION,
    KVMIO,
    0x46,
    kvm_userspace_memory_region
);
ioctl_io_nr!(KVM_SET_TSS_ADDR, KVMIO, 0x47);
ioctl_iow_nr!(KVM_SET_IDENTITY_MAP_ADDR, KVMIO, 0x48, u64);
ioctl_iow_nr!(KVM_SET_GSI_ROUTING, KVMIO, 0x6a, kvm_irq_routing);
ioctl_iow_nr!(KVM_IRQFD, KVMIO, 0x76, kvm_irqfd);
ioctl_iow_nr!(KVM_ENABLE_CAP, KVMIO, 0xa3, kvm_enable_cap);
ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_ioeventfd);
ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
ioctl_iow_nr!(KVM_SET_REGS, KVMIO, 0x82, kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
ioctl_iow_nr!(KVM_SET_SREGS, KVMIO, 0x84, kvm_sregs);
ioctl_iow_nr!(KVM_SET_MSRS, KVMIO, 0x89, kvm_msrs);
ioctl_iow_nr!(KVM_SET_FPU, KVMIO, 0x8d, kvm_fpu);
ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
ioctl_iow_nr!(KVM_SET_LAPIC, KVMIO, 0x8f, kvm_lapic_state);
ioctl_iow_nr!(KVM_SET_CPUID2, KVMIO, 0x90, kvm_cpuid2);
ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
ioctl_iowr_nr!(KVM_GET_MSR_INDEX_LIST, KVMIO, 0x02, kvm_msr_list);
ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
ioctl_iow_nr!(KVM_SET_CLOCK, KVMIO, 0x7b, kvm_clock_data);
ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
ioctl_iow_nr!(KVM_SET_MP_STATE, KVMIO, 0x99, kvm_mp_state);
ioctl_iow_nr!(KVM_SET_XSAVE, KVMIO, 0xa5, kvm_xsave);
ioctl_iow_nr!(KVM_SET_XCRS, KVMIO, 0xa7, kvm_xcrs);
ioctl_iow_nr!(KVM_SET_DEBUGREGS, KVMIO, 0xa2, kvm_debugregs);
ioctl_iow_nr!(KVM_SET_VCPU_EVENTS, KVMIO, 0xa0, kvm_vcpu_events);
ioctl_ior_nr!(KVM_GET_FPU, KVMIO, 0x8c, kvm_fpu);
ioctl_iowr_nr!(KVM_GET_CPUID2, KVMIO, 0x91, kvm_cpuid2);
ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
ioctl_iow_nr!(KVM_SIGNAL_MSI, KVMIO, 0xa5, kvm_msi);

/// Terminal ioctls (<asm-generic/ioctls.h>).
const TCGETS: u64 = 0x5401;
const TCSETS: u64 = 0x5402;
const TIOCGWINSZ: u64 = 0x5413;
const FIONBIO: u64 = 0x5421;
const FIOCLEX: u64 = 0x5451;
const TIOCGPTN: u64 = 0x8004_5430;
const TIOCSPTLCK: u64 = 0x4004_5431;
const TIOCGPTPEER: u64 = 0x5441;

/// A filter table under construction: syscall → the argument rules of which
/// one must match (none: always allowed).
#[derive(Default, Clone)]
pub struct Rules(BTreeMap<i64, Option<Vec<SeccompRule>>>);

impl Rules {
    /// Allows `syscall` with any arguments.
    fn allow(&mut self, syscalls: &[libc::c_long]) -> &mut Self {
        for &syscall in syscalls {
            self.0.insert(syscall, None);
        }
        self
    }

    /// Allows `syscall` when one of `rules` matches its arguments.
    fn allow_if(&mut self, syscall: libc::c_long, rules: Vec<SeccompRule>) -> &mut Self {
        match self.0.get_mut(&syscall) {
            Some(None) => {}
            Some(Some(existing)) => {
                for rule in rules {
                    if !existing.contains(&rule) {
                        existing.push(rule);
                    }
                }
            }
            None => {
                self.0.insert(syscall, Some(rules));
            }
        }
        self
    }

    /// Allows `ioctl` with one of these request numbers.
    fn ioctls(&mut self, requests: &[u64]) -> &mut Self {
        let rules = requests.iter().map(|&r| arg_eq(1, r)).collect();
        self.allow_if(libc::SYS_ioctl, rules)
    }

    /// Adds every call `other` allows.
    fn merge(&mut self, other: &Rules) -> &mut Self {
        for (&syscall, rules) in &other.0 {
            match rules {
                None => {
                    self.0.insert(syscall, None);
                }
                Some(rules) => {
                    self.allow_if(syscall, rules.clone());
                }
            }
        }
        self
    }

    /// The system calls allowed (with or without argument rules).
    pub fn syscalls(&self) -> impl Iterator<Item = libc::c_long> + '_ {
        self.0.keys().copied()
    }

    pub fn allows(&self, syscall: libc::c_long) -> bool {
        self.0.contains_key(&syscall)
    }

    /// Whether `syscall` is allowed only with some arguments.
    pub fn allows_only_some(&self, syscall: libc::c_long) -> bool {
        matches!(self.0.get(&syscall), Some(Some(rules)) if !rules.is_empty())
    }

    fn into_map(self) -> BTreeMap<i64, Vec<SeccompRule>> {
        let mut map: BTreeMap<i64, Vec<SeccompRule>> = self
            .0
            .into_iter()
            .map(|(syscall, rules)| (syscall, rules.unwrap_or_default()))
            .collect();
        // Rules are tried in order: KVM_RUN, made on every exit of every
        // vCPU, goes first in each filter that has it.
        if let Some(ioctls) = map.get_mut(&libc::SYS_ioctl) {
            let run = arg_eq(1, KVM_RUN());
            if let Some(at) = ioctls.iter().position(|rule| *rule == run) {
                let rule = ioctls.remove(at);
                ioctls.insert(0, rule);
            }
        }
        map
    }
}

/// Argument `index` equals `value` (compared as 64 bits).
fn arg_eq(index: u8, value: u64) -> SeccompRule {
    condition(index, SeccompCmpOp::Eq, value)
}

fn condition(index: u8, op: SeccompCmpOp, value: u64) -> SeccompRule {
    let condition = SeccompCondition::new(index, SeccompCmpArgLen::Qword, op, value);
    // Only an argument index above 5 is refused, and ours are constants.
    #[allow(clippy::expect_used)]
    let condition = condition.expect("valid seccomp condition");
    #[allow(clippy::expect_used)]
    SeccompRule::new(vec![condition]).expect("a rule with one condition")
}

/// What every thread does: allocate, lock, sleep, log, end, and die of
/// SIGSYS through the handler.
fn every_thread() -> Rules {
    let mut r = Rules::default();
    r.allow(&[
        // Memory allocation (malloc arenas, large buffers).
        libc::SYS_brk,
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_mprotect,
        libc::SYS_madvise,
        // Mutexes, condition variables, channels, joins.
        libc::SYS_futex,
        libc::SYS_sched_yield,
        // Time and sleeping where the vDSO does not serve the clock.
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        // Per-thread hash keys of std collections.
        libc::SYS_getrandom,
        // Log lines and the SIGSYS message on stderr; eventfd signals;
        // the byte Python's signal handler writes to the `vmkit` command's
        // wake-up pipe, in whichever thread the kernel delivers a signal to.
        libc::SYS_write,
        // Dropping fds and the owned objects that hold them.
        libc::SYS_close,
        // Signal masks around locks and handlers; back from the kick handler.
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_restart_syscall,
        // The SIGSYS handler: reset to the default action and re-raise.
        libc::SYS_rt_sigaction,
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_tgkill,
        // Thread exit: Rust's stack-overflow guard and glibc's stack release.
        libc::SYS_sigaltstack,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ]);
    r
}

/// What a thread that creates threads needs, for itself and for the child
/// until the child installs its filter.
fn creates_threads() -> Rules {
    let mut r = Rules::default();
    // clone3 is refused with ENOSYS by a second filter (see `compile`), so
    // glibc falls back to clone, whose flags a filter can see: threads only.
    r.allow(&[libc::SYS_clone3]);
    r.allow_if(
        libc::SYS_clone,
        vec![condition(
            0,
            SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
            libc::CLONE_THREAD as u64,
        )],
    );
    // The child's start-up: robust futex list, rseq, its name; std finds
    // its stack guard with pthread_getattr_np, which reads the affinity.
    r.allow(&[
        libc::SYS_set_robust_list,
        libc::SYS_rseq,
        libc::SYS_sched_getaffinity,
    ]);
    // ... and its own filter, installed by the child under ours.
    r.allow_if(
        libc::SYS_prctl,
        vec![
            arg_eq(0, libc::PR_SET_NAME as u64),
            arg_eq(0, libc::PR_SET_NO_NEW_PRIVS as u64),
        ],
    );
    r.allow_if(
        libc::SYS_seccomp,
        vec![arg_eq(0, libc::SECCOMP_SET_MODE_FILTER as u64)],
    );
    r
}

/// An epoll-driven device worker: waits, drains eventfds, signals irqfds.
fn worker() -> Rules {
    let mut r = every_thread();
    r.allow(&[
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        // Queue kicks, the kill event, timers; interrupts are eventfd writes.
        libc::SYS_read,
    ]);
    // Workers close their eventfds when they stop: std's debug builds check
    // that an fd is open before they close it.
    r.allow_if(libc::SYS_fcntl, vec![arg_eq(1, libc::F_GETFD as u64)]);
    r
}

/// Running a virtio-blk queue's requests, on its worker or a vCPU thread.
fn serves_block_queue(io_uring: bool) -> Rules {
    let mut r = Rules::default();
    r.allow(&[
        // The requests: vectored and plain reads and writes at offsets (and
        // the CPU pressure read at offset 0, for `block::placement`).
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        // FLUSH.
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        // DISCARD and WRITE_ZEROES on image files.
        libc::SYS_fallocate,
        // The rate limiter's timer.
        libc::SYS_timerfd_settime,
        libc::SYS_timerfd_gettime,
    ]);
    // DISCARD and WRITE_ZEROES on block devices.
    r.ioctls(&[BLKDISCARD(), BLKZEROOUT()]);
    // Whether a vCPU thread serving the queue slept (block::placement):
    // its own context switch counts.
    r.allow_if(
        libc::SYS_getrusage,
        vec![arg_eq(0, libc::RUSAGE_THREAD as u64)],
    );
    if io_uring {
        // Submitting and reaping; the ring only takes read, write and
        // fsync operations (its restrictions are registered).
        r.allow(&[libc::SYS_io_uring_enter]);
    }
    r
}

/// The rules of `kind` alone, before its children's are added.
fn own_rules(kind: ThreadKind) -> Rules {
    match kind {
        ThreadKind::Vcpu => {
            let mut r = every_thread();
            r.ioctls(&[
                // The run loop, and the register reads of the watchdog and
                // of error reports.
                KVM_RUN(),
                KVM_GET_REGS(),
                KVM_GET_SREGS(),
                KVM_GET_MP_STATE(),
                // A snapshot: a parked vCPU thread takes its own state.
                KVM_GET_CPUID2(),
                KVM_GET_FPU(),
                KVM_GET_XSAVE(),
                KVM_GET_XCRS(),
                KVM_GET_DEBUGREGS(),
                KVM_GET_LAPIC(),
                KVM_GET_MSRS(),
                KVM_GET_VCPU_EVENTS(),
                // The driver programs a device: queue notify addresses,
                // MSI-X vectors and routes, an IOAPIC pin's first route
                // (its irqfd).
                KVM_IOEVENTFD(),
                KVM_IRQFD(),
                KVM_SET_GSI_ROUTING(),
                KVM_SIGNAL_MSI(),
                // virtio-net activation and reset: offloads, header size,
                // multi-queue attach/detach.
                TUNSETOFFLOAD,
                TUNSETVNETHDRSZ,
                TUNSETQUEUE,
            ]);
            r.allow(&[
                // Device activation builds eventfds, an epoll and (virtio-blk)
                // an io_uring before the worker starts.
                libc::SYS_eventfd2,
                libc::SYS_epoll_create1,
                libc::SYS_epoll_ctl,
                libc::SYS_fcntl,
                libc::SYS_io_uring_setup,
                libc::SYS_io_uring_register,
                libc::SYS_timerfd_create,
                libc::SYS_timerfd_settime,
                // Draining eventfds on reset, and a legacy pin's irqfd
                // before KVM gets it.
                libc::SYS_read,
                // Serial output to a `socket=` client (std sends with send(2)).
                libc::SYS_sendto,
                // Serial output to stdout: written only while it has room.
                libc::SYS_poll,
                libc::SYS_ppoll,
            ]);
            // `--cpus affinity=`: the thread pins itself (pid 0), no other.
            r.allow_if(libc::SYS_sched_setaffinity, vec![arg_eq(0, 0)]);
            // A virtio-blk queue served on the vCPU thread that notified it
            // while the CPUs are contended (`block::placement`).
            r.merge(&serves_block_queue(true));
            r
        }
        ThreadKind::BlockSync | ThreadKind::BlockIoUring => {
            let mut r = worker();
            r.merge(&serves_block_queue(kind == ThreadKind::BlockIoUring));
            // Moves its queue's notifications onto the vCPU threads (its
            // ioeventfd removed) while the CPUs are contended.
            r.ioctls(&[KVM_IOEVENTFD()]);
            r
        }
        ThreadKind::Net => {
            let mut r = worker();
            r.allow(&[
                // Frames to and from the tap.
                libc::SYS_readv,
                libc::SYS_writev,
                // The rate limiter's timer.
                libc::SYS_timerfd_settime,
                libc::SYS_timerfd_gettime,
            ]);
            r
        }
        ThreadKind::Rng => worker(),
        ThreadKind::Pmem => {
            let mut r = worker();
            // FLUSH: the region's file to disk.
            r.allow(&[libc::SYS_fdatasync]);
            r
        }
        ThreadKind::Watchdog => {
            let mut r = worker();
            // Starts its check timer at the first pet, stops it on a reset.
            r.allow(&[libc::SYS_timerfd_settime]);
            r
        }
        ThreadKind::Balloon | ThreadKind::VirtioMem => {
            // Pages go back to the host with madvise, which every thread
            // may make (allocators do).
            worker()
        }
        ThreadKind::Console => {
            let mut r = worker();
            // Non-blocking input from the terminal or pty.
            r.allow(&[libc::SYS_fcntl]);
            r.ioctls(&[TCGETS, TIOCGWINSZ]);
            r
        }
        ThreadKind::Vsock => {
            let mut r = worker();
            r.allow(&[
                // Host streams come and go in the device's own epoll.
                libc::SYS_epoll_ctl,
                // Host programs connecting to the device's socket.
                libc::SYS_accept4,
                // Relaying: recv(MSG_DONTWAIT|MSG_PEEK) and
                // send(MSG_DONTWAIT|MSG_NOSIGNAL) on host streams.
                libc::SYS_recvfrom,
                libc::SYS_sendto,
                // A guest SHUTDOWN(SEND) ends the host program's input.
                libc::SYS_shutdown,
                // Guest-initiated connections to `<socket>_<port>`.
                libc::SYS_connect,
                // Connection and CONNECT-line timeouts.
                libc::SYS_timerfd_settime,
            ]);
            // Guest-initiated connections: unix sockets only.
            r.allow_if(libc::SYS_socket, vec![arg_eq(0, libc::AF_UNIX as u64)]);
            r
        }
        ThreadKind::VhostUser => {
            let mut r = worker();
            r.allow(&[
                // Requests to the backend and its replies (with the memory
                // and eventfd descriptors they carry).
                libc::SYS_sendmsg,
                libc::SYS_recvmsg,
                // Its socket and (server mode) listener join the epoll.
                libc::SYS_epoll_ctl,
                // A backend that went: connecting again (client mode) or
                // accepting it (server mode), and the reply timeouts.
                libc::SYS_connect,
                libc::SYS_accept4,
                libc::SYS_setsockopt,
                libc::SYS_fcntl,
            ]);
            // std's set_nonblocking on the listener.
            r.ioctls(&[FIONBIO]);
            r.allow_if(libc::SYS_socket, vec![arg_eq(0, libc::AF_UNIX as u64)]);
            r
        }
        ThreadKind::Tpm => {
            let mut r = worker();
            r.allow(&[
                // Commands on the data socket, CMD_CANCEL_TPM_CMD on the
                // control socket: sendmsg with MSG_NOSIGNAL, so that a dead
                // swtpm is an error (EPIPE) rather than a SIGPIPE.
                libc::SYS_sendmsg,
                // Responses and control answers (std reads sockets with recv).
                libc::SYS_recvfrom,
                // The timeout of the command in flight.
                libc::SYS_timerfd_settime,
            ]);
            // Its sockets close here when swtpm hangs up: std's debug builds
            // check that an fd is open before they close it.
            r.allow_if(libc::SYS_fcntl, vec![arg_eq(1, libc::F_GETFD as u64)]);
            r
        }
        ThreadKind::SerialInput => {
            let mut r = every_thread();
            // Waits for input and for the stop event, then reads it.
            r.allow(&[
                libc::SYS_poll,
                libc::SYS_ppoll,
                libc::SYS_read,
                libc::SYS_fcntl,
            ]);
            r
        }
        ThreadKind::SerialSocket => {
            let mut r = every_thread();
            r.allow(&[
                // One client at a time; its input, and the stop event.
                libc::SYS_accept4,
                libc::SYS_poll,
                libc::SYS_ppoll,
                libc::SYS_read,
                libc::SYS_recvfrom,
                libc::SYS_sendto,
                libc::SYS_shutdown,
                libc::SYS_fcntl,
            ]);
            r
        }
        ThreadKind::Spawner => {
            let mut r = every_thread();
            r.merge(&creates_threads());
            r
        }
        ThreadKind::Vmm => {
            let mut r = every_thread();
            r.merge(&creates_threads()).merge(&builds_vm());
            // Kicks vCPU threads out of KVM_RUN.
            r.allow(&[libc::SYS_tgkill]);
            r
        }
        ThreadKind::Process => {
            let mut r = every_thread();
            r.merge(&creates_threads())
                .merge(&builds_vm())
                .merge(&interpreter())
                .merge(&snapshots())
                .merge(&migration());
            r
        }
    }
}

/// Building (and rebuilding, on a guest reset) a VM: KVM, guest memory, the
/// payload, every device's host side.
fn builds_vm() -> Rules {
    let mut r = Rules::default();
    r.allow(&[
        // /dev/kvm, the kernel and initramfs, disk images, /dev/net/tun,
        // /dev/ptmx, the rng source, memory files.
        libc::SYS_openat,
        libc::SYS_read,
        libc::SYS_pread64,
        libc::SYS_lseek,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_readlink,
        libc::SYS_fcntl,
        libc::SYS_dup,
        // Disk image locks (OFD, through fcntl) and their probes; emptying
        // a shared memory file a restore fills (punching a hole, or where the
        // file system cannot, writing zeros).
        libc::SYS_fallocate,
        libc::SYS_pwrite64,
        // Guest memory backed by a memfd or a file.
        libc::SYS_memfd_create,
        libc::SYS_ftruncate,
        // Device plumbing.
        libc::SYS_eventfd2,
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_timerfd_create,
        libc::SYS_timerfd_settime,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_register,
        // Serial/console `socket=`.
        libc::SYS_bind,
        libc::SYS_listen,
        libc::SYS_unlink,
        // std::thread::available_parallelism (queue sizing).
        libc::SYS_sched_getaffinity,
        // --tpm: swtpm's control socket; its control commands, and the end
        // of the socketpair for TPM commands handed over by SCM_RIGHTS
        // (sendmsg with MSG_NOSIGNAL), and their answers (std's recv).
        libc::SYS_connect,
        libc::SYS_sendmsg,
        libc::SYS_recvfrom,
    ]);
    // --tpm: the socketpair for TPM commands (unix sockets only), and the
    // control channel's timeouts (SO_RCVTIMEO, SO_SNDTIMEO).
    r.allow_if(libc::SYS_socketpair, vec![arg_eq(0, libc::AF_UNIX as u64)]);
    r.allow_if(
        libc::SYS_setsockopt,
        vec![arg_eq(1, libc::SOL_SOCKET as u64)],
    );
    // Sockets: AF_UNIX for serial/console sockets, AF_INET (datagram) for
    // the SIOC ioctls that configure a tap.
    r.allow_if(
        libc::SYS_socket,
        vec![
            arg_eq(0, libc::AF_UNIX as u64),
            arg_eq(0, libc::AF_INET as u64),
        ],
    );
    r.ioctls(&[
        KVM_GET_API_VERSION(),
        KVM_CREATE_VM(),
        KVM_CHECK_EXTENSION(),
        KVM_GET_VCPU_MMAP_SIZE(),
        KVM_GET_SUPPORTED_CPUID(),
        KVM_CREATE_VCPU(),
        KVM_SET_USER_MEMORY_REGION(),
        KVM_SET_TSS_ADDR(),
        KVM_SET_IDENTITY_MAP_ADDR(),
        // KVM_CAP_SPLIT_IRQCHIP (interrupts::enable_split_irqchip).
        KVM_ENABLE_CAP(),
        KVM_IRQFD(),
        // Also the VMM thread's placeholder after each boot (vm::settle_kvm_srcu).
        KVM_IOEVENTFD(),
        KVM_SET_GSI_ROUTING(),
        KVM_SET_REGS(),
        KVM_GET_REGS(),
        KVM_SET_SREGS(),
        KVM_GET_SREGS(),
        KVM_SET_MSRS(),
        KVM_SET_FPU(),
        KVM_GET_LAPIC(),
        KVM_SET_LAPIC(),
        KVM_SET_CPUID2(),
        // A restore reads back the CPUID this host gives a vCPU, to check
        // the saved vCPUs' features against it.
        KVM_GET_CPUID2(),
        KVM_GET_TSC_KHZ(),
        KVM_GET_MP_STATE(),
        // Taps: create or attach, configure.
        TUNSETIFF,
        TUNGETIFF,
        TUNSETOFFLOAD,
        TUNSETVNETHDRSZ,
        TUNSETQUEUE,
        SIOCGIFFLAGS,
        SIOCSIFFLAGS,
        SIOCSIFADDR,
        SIOCSIFNETMASK,
        SIOCGIFMTU,
        SIOCSIFMTU,
        SIOCSIFHWADDR,
        SIOCGIFHWADDR,
        // Block devices as disks: size and sector sizes.
        BLKSSZGET(),
        BLKPBSZGET(),
        // Terminals and ptys.
        TCGETS,
        TCSETS,
        TIOCGWINSZ,
        TIOCGPTN,
        TIOCSPTLCK,
        TIOCGPTPEER,
        FIONBIO,
        FIOCLEX,
    ]);
    r
}

/// `vm.snapshot` and `vm.restore`, served by the process's API or control
/// thread: the snapshot's files, the VM's clock and MSR list, and a
/// restored vCPU's state.
fn snapshots() -> Rules {
    let mut r = Rules::default();
    r.allow(&[
        // The memory file: pages written where they are not zero, then synced.
        libc::SYS_pwrite64,
        libc::SYS_fsync,
        // A failed snapshot removes the files it wrote.
        libc::SYS_unlink,
        libc::SYS_unlinkat,
        // A vhost-user backend's own state (virtiofsd's), saved and loaded
        // through a pipe whose end here is non-blocking, within a deadline.
        libc::SYS_pipe2,
        libc::SYS_fcntl,
        libc::SYS_poll,
        libc::SYS_ppoll,
    ]);
    r.ioctls(&[
        KVM_GET_MSR_INDEX_LIST(),
        KVM_GET_CLOCK(),
        KVM_SET_CLOCK(),
        KVM_SET_MP_STATE(),
        KVM_SET_XSAVE(),
        KVM_SET_XCRS(),
        KVM_SET_DEBUGREGS(),
        KVM_SET_VCPU_EVENTS(),
    ]);
    r
}

/// `vm.send-migration` and `vm.receive-migration`, served by the process's
/// API or control thread: the unix socket to the other VMM (the receiver's
/// listener is `builds_vm`'s bind/listen and the interpreter's accept4;
/// memory files travel by sendmsg/recvmsg), and KVM's dirty-page log.
fn migration() -> Rules {
    let mut r = Rules::default();
    r.allow(&[libc::SYS_connect, libc::SYS_sendmsg, libc::SYS_recvmsg]);
    r.ioctls(&[KVM_GET_DIRTY_LOG()]);
    r
}

/// The `vmkit` command's Python interpreter after start-up: the API server,
/// the event monitor, log files, imports done late, signal handling.
fn interpreter() -> Rules {
    let mut r = Rules::default();
    r.allow(&[
        // Files: late imports, the log file, the event monitor.
        libc::SYS_read,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_pwrite64,
        libc::SYS_getdents64,
        libc::SYS_readlinkat,
        libc::SYS_access,
        libc::SYS_faccessat2,
        libc::SYS_getcwd,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_flock,
        libc::SYS_unlinkat,
        libc::SYS_rmdir,
        // cpu_groups: each VM's cgroups, made when the API creates the VM.
        libc::SYS_mkdir,
        libc::SYS_mkdirat,
        libc::SYS_rename,
        libc::SYS_renameat2,
        libc::SYS_fchmod,
        libc::SYS_chmod,
        libc::SYS_dup2,
        libc::SYS_dup3,
        libc::SYS_pipe2,
        // The API socket: clients, requests, answers.
        libc::SYS_accept4,
        libc::SYS_recvfrom,
        libc::SYS_recvmsg,
        libc::SYS_sendto,
        libc::SYS_sendmsg,
        libc::SYS_shutdown,
        libc::SYS_getsockopt,
        libc::SYS_setsockopt,
        libc::SYS_getsockname,
        libc::SYS_getpeername,
        // Waiting: selectors, timeouts, signals.
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_select,
        libc::SYS_pselect6,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_rt_sigsuspend,
        // Process facts the standard library asks for.
        libc::SYS_getuid,
        libc::SYS_geteuid,
        libc::SYS_getgid,
        libc::SYS_getegid,
        libc::SYS_getppid,
        libc::SYS_uname,
        libc::SYS_sysinfo,
        libc::SYS_prlimit64,
        libc::SYS_getrusage,
        libc::SYS_times,
        libc::SYS_clock_getres,
        libc::SYS_gettimeofday,
    ]);
    r
}

/// Every call `kind`'s threads may make: its own, and its children's.
pub fn rules(kind: ThreadKind) -> Rules {
    let mut r = own_rules(kind);
    for &child in kind.children() {
        r.merge(&rules(child));
    }
    r
}

/// Compiles `kind`'s filters for `mode` (not `Off`): the table, and for
/// thread creators the one that turns clone3 into ENOSYS.
pub fn compile(kind: ThreadKind, mode: SeccompMode) -> Result<Vec<BpfProgram>, seccompiler::Error> {
    let mismatch = match mode {
        SeccompMode::Log => SeccompAction::Log,
        SeccompMode::Trap | SeccompMode::Off => SeccompAction::Trap,
    };
    let rules = rules(kind);
    let creates = rules.allows(libc::SYS_clone3);
    let table: BpfProgram = SeccompFilter::new(
        rules.into_map(),
        mismatch,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )?
    .try_into()?;
    let mut programs = vec![table];
    if creates {
        let clone3: BpfProgram = SeccompFilter::new(
            BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
            TargetArch::x86_64,
        )?
        .try_into()?;
        programs.push(clone3);
    }
    Ok(programs)
}
