//! A fork whose child is the caller's sibling: the process a fork server
//! makes for each VMM belongs to the program that asked for it.
//!
//! `clone(CLONE_PARENT)` gives the new process this process's parent as its
//! parent, so that program can wait for it, read its exit status and get
//! SIGCHLD, exactly as for a process it started itself, while the fork
//! server owns nothing of it.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Which side of `fork_sibling` this is.
#[derive(Debug, PartialEq, Eq)]
pub enum Forked {
    /// The process that called `fork_sibling`; `child` is the new process.
    Caller { child: libc::pid_t },
    /// The new process.
    Child,
}

/// The number of threads in this process (`/proc/self/task`).
pub fn thread_count() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/task")?.count())
}

/// fork(2), except that the child's parent is this process's parent.
///
/// Refuses (EBUSY) when this process has more than one thread: only the
/// calling thread would go on in the child, possibly with locks that the
/// others held.
///
/// # Safety
///
/// As for fork(2): the child starts with a copy of this process in which
/// only the calling thread runs. The raw system call skips glibc's fork
/// handling (pthread_atfork handlers, malloc and stdio lock reset, the thread
/// descriptor's cached TID), which is sound only because the process is
/// single-threaded, and the child must not rely on `pthread_self()`'s TID
/// (glibc's raise() and abort() ask the kernel, so they work). The caller
/// does any runtime's own fork bookkeeping (CPython's `PyOS_*Fork*`).
pub unsafe fn fork_sibling() -> io::Result<Forked> {
    if thread_count()? != 1 {
        return Err(io::Error::new(
            io::ErrorKind::ResourceBusy,
            "cannot fork a process that runs more than one thread",
        ));
    }
    let flags = (libc::CLONE_PARENT | libc::SIGCHLD) as libc::c_ulong;
    // SAFETY: clone without CLONE_VM and without a new stack is fork(2): the
    // child runs on its own copy of this stack; the other arguments (parent
    // and child TID pointers, TLS) are unused without their flags. What the
    // child may then do is the caller's contract (see above).
    let pid = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
    match pid {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        child => Ok(Forked::Caller {
            child: child as libc::pid_t,
        }),
    }
}

// -- the VM process (`Vm.spawn`'s, forked straight into Rust) ---------------------------

/// The control socket's number in a VM process.
pub const CONTROL_FD: RawFd = 3;

/// A VMM's files (its API socket first) are its owner's only, as v37 makes them.
const VM_PROCESS_UMASK: libc::mode_t = 0o077;

/// What a VM process is set up with: the descriptors that become its
/// control socket (3), stdout and stderr, and working directory, and the
/// CPU affinity and niceness of the program that spawned it.
pub struct VmProcessSetup {
    pub control: RawFd,
    pub log: RawFd,
    pub cwd: Option<RawFd>,
    pub affinity: Vec<usize>,
    pub nice: i32,
}

impl SignalFd {
    pub fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Descriptors, directory, umask (077), CPU affinity and niceness as a
/// fresh VMM process has them.
pub fn set_up_vm_process(setup: &VmProcessSetup) -> io::Result<()> {
    // Above every number the dup2s below write (0 to 3), so that they
    // overwrite none of these. Not far above: growing the descriptor table
    // of a process with two threads waits for an RCU grace period (~15 ms).
    let high = |fd: RawFd| -> io::Result<RawFd> {
        // SAFETY: F_DUPFD_CLOEXEC on a descriptor the request passed; the
        // new descriptor is this function's to place.
        let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, CONTROL_FD + 1) };
        if new < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(new)
        }
    };
    let control = high(setup.control)?;
    let log = high(setup.log)?;
    if let Some(cwd) = setup.cwd {
        // SAFETY: fchdir on a directory descriptor the request passed.
        if unsafe { libc::fchdir(cwd) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let null = CString::new("/dev/null").map_err(io::Error::other)?;
    // SAFETY: a NUL-terminated path; the descriptor is placed at 0 below.
    let null = unsafe { libc::open(null.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if null < 0 {
        return Err(io::Error::last_os_error());
    }
    for (from, to) in [(null, 0), (log, 1), (log, 2), (control, CONTROL_FD)] {
        // SAFETY: dup2 onto the standard numbers and the control socket's;
        // the descriptors above 3 are closed right after.
        if unsafe { libc::dup2(from, to) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // Nothing else: not the fork server's request socket, not what it or
    // the spawning program held.
    seal_control_fd()?;
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(VM_PROCESS_UMASK) };
    if !setup.affinity.is_empty() {
        // SAFETY: cpu_set_t is plain data; CPU_SET is bounds-checked below.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        for &cpu in &setup.affinity {
            if cpu < libc::CPU_SETSIZE as usize {
                // SAFETY: `cpu` is below CPU_SETSIZE, inside `set`.
                unsafe { libc::CPU_SET(cpu, &mut set) };
            }
        }
        // SAFETY: a valid cpu_set_t of its own size, for this process.
        unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    }
    // SAFETY: getpriority/setpriority on this process.
    unsafe {
        if libc::getpriority(libc::PRIO_PROCESS, 0) != setup.nice {
            libc::setpriority(libc::PRIO_PROCESS, 0, setup.nice);
        }
    }
    Ok(())
}

/// Default dispositions (SIGPIPE ignored, as any Rust or Python program has
/// it), nothing blocked but SIGTERM and SIGINT, which `SignalFd` takes.
pub fn reset_signals() -> io::Result<()> {
    for signal in 1..libc::SIGRTMIN() {
        if matches!(signal, libc::SIGKILL | libc::SIGSTOP) {
            continue;
        }
        let disposition = if signal == libc::SIGPIPE {
            libc::SIG_IGN
        } else {
            libc::SIG_DFL
        };
        // SAFETY: installs a default or ignore disposition, no handler code.
        unsafe { libc::signal(signal, disposition) };
    }
    // SAFETY: sigset_t is plain data, filled by sigemptyset/sigaddset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        if libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// SIGTERM and SIGINT as a readable descriptor (they stay blocked in every
/// thread, which the VM's threads inherit).
pub struct SignalFd(OwnedFd);

impl SignalFd {
    pub fn new() -> io::Result<SignalFd> {
        // SAFETY: sigset_t is plain data; signalfd returns a new descriptor.
        let fd = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK)
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor signalfd just returned, owned from here on.
        Ok(SignalFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }
}

/// A descriptor of our own (close-on-exec) for the open descriptor `fd`
/// that a caller passed by number; the caller keeps theirs.
pub fn duplicate_fd(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{fd} is not an open file descriptor"),
        ));
    }
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a number the caller gave; a bad one
    // fails with EBADF, a good one yields a descriptor nobody else owns.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if dup < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `dup` is the fresh descriptor fcntl returned.
    Ok(unsafe { OwnedFd::from_raw_fd(dup) })
}

/// The SOCK_SEQPACKET control socket: one message per request or answer.
pub struct SeqPacket(pub RawFd);

impl SeqPacket {
    /// The next message into `buffer` (its length; 0 at end of file), with a
    /// descriptor it carried.
    pub fn receive_into(&self, buffer: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
        let (length, mut fds) = self.receive_with_fds(buffer)?;
        Ok((
            length,
            if fds.is_empty() {
                None
            } else {
                Some(fds.remove(0))
            },
        ))
    }

    /// As `receive_into`, with every descriptor the message carried (at most 8).
    pub fn receive_with_fds(&self, buffer: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
        let mut control = [0u8; 128];
        let mut iov = libc::iovec {
            iov_base: buffer.as_mut_ptr().cast(),
            iov_len: buffer.len(),
        };
        // SAFETY: msghdr is plain data; its pointers are set to live buffers.
        let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
        header.msg_iov = &mut iov;
        header.msg_iovlen = 1;
        header.msg_control = control.as_mut_ptr().cast();
        header.msg_controllen = control.len();
        // SAFETY: recvmsg into the buffers `header` points to.
        let n = unsafe { libc::recvmsg(self.0, &mut header, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut received = Vec::new();
        // SAFETY: walking the control messages recvmsg wrote, within its length.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&header);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                        / std::mem::size_of::<RawFd>();
                    let fds = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                    for i in 0..count {
                        received.push(OwnedFd::from_raw_fd(fds.add(i).read_unaligned()));
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&header, cmsg);
            }
        }
        if header.msg_flags & libc::MSG_TRUNC != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a message longer than {} bytes", buffer.len()),
            ));
        }
        Ok((n as usize, received))
    }

    /// Sends `text` as one message, with `fd` attached when given.
    pub fn send(&self, text: &[u8], fd: Option<RawFd>) -> io::Result<()> {
        let mut iov = libc::iovec {
            iov_base: text.as_ptr() as *mut libc::c_void,
            iov_len: text.len(),
        };
        let mut control = [0u8; 64];
        // SAFETY: msghdr is plain data; its pointers are set to live buffers.
        let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
        header.msg_iov = &mut iov;
        header.msg_iovlen = 1;
        if let Some(fd) = fd {
            // SAFETY: one SCM_RIGHTS message with one descriptor, in a buffer
            // larger than CMSG_SPACE of it.
            unsafe {
                let space = libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as usize;
                header.msg_control = control.as_mut_ptr().cast();
                header.msg_controllen = space;
                let cmsg = libc::CMSG_FIRSTHDR(&header);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
                libc::CMSG_DATA(cmsg).cast::<RawFd>().write_unaligned(fd);
            }
        }
        // SAFETY: sendmsg from the buffers `header` points to.
        let n = unsafe { libc::sendmsg(self.0, &header, libc::MSG_NOSIGNAL) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

/// Ends this process at once with `code`, without exit handlers (a forked
/// process's belong to the program it was forked from).
/// Replaces this process's program with `argv` (`argv[0]` the path), with
/// `keep` left open across it; returns only on failure.
pub fn exec_keeping(argv: &[CString], keep: RawFd) -> io::Error {
    if argv.is_empty() {
        return io::Error::from(io::ErrorKind::InvalidInput);
    }
    // SAFETY: F_SETFD on a descriptor this process holds.
    if unsafe { libc::fcntl(keep, libc::F_SETFD, 0) } != 0 {
        return io::Error::last_os_error();
    }
    let mut pointers: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    pointers.push(std::ptr::null());
    // SAFETY: a NULL-terminated array of NUL-terminated strings that outlive
    // the call (execv does not return on success).
    unsafe { libc::execv(pointers[0], pointers.as_ptr()) };
    io::Error::last_os_error()
}

pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit ends the process; nothing runs after it.
    unsafe { libc::_exit(code) }
}

/// Waits until one of `fds` is readable (or hung up); which ones are.
pub fn wait_readable(fds: &[RawFd]) -> io::Result<Vec<bool>> {
    let mut polled: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: poll on `polled`, a live array of its own length.
        let n = unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, -1) };
        if n >= 0 {
            return Ok(polled.iter().map(|p| p.revents != 0).collect());
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// Moves `fd` to 3 and closes every other descriptor above stderr; returns 3.
pub fn keep_only(fd: RawFd) -> io::Result<RawFd> {
    if fd != CONTROL_FD {
        // SAFETY: dup2 onto 3, whatever was there is closed below anyway.
        if unsafe { libc::dup2(fd, CONTROL_FD) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    seal_control_fd()?;
    Ok(CONTROL_FD)
}

/// Makes the control socket (3) close-on-exec, as all but stdio are, and
/// closes every descriptor above it.
fn seal_control_fd() -> io::Result<()> {
    // SAFETY: F_SETFD on the descriptor the caller just placed.
    if unsafe { libc::fcntl(CONTROL_FD, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: close_range closes this process's descriptors from 4 up.
    if unsafe { libc::syscall(libc::SYS_close_range, CONTROL_FD + 1, u32::MAX, 0) } != 0 {
        for fd in (CONTROL_FD + 1)..1024 {
            // SAFETY: closing numbers that this process does not use any more.
            unsafe { libc::close(fd) };
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_count_sees_this_test_thread() {
        // The test harness runs tests on their own threads: never just one here.
        assert!(thread_count().unwrap() >= 1);
    }

    #[test]
    fn a_multithreaded_process_is_refused() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || rx.recv());
        // SAFETY: refused before anything forks, as two threads run.
        let result = unsafe { fork_sibling() };
        tx.send(()).unwrap();
        other.join().unwrap().unwrap();
        let error = result.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::ResourceBusy, "{error}");
    }

    fn seqpacket_pair() -> (SeqPacket, SeqPacket) {
        let mut fds = [0; 2];
        // SAFETY: socketpair fills the two-element array.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0);
        (SeqPacket(fds[0]), SeqPacket(fds[1]))
    }

    #[test]
    fn seqpacket_messages_carry_a_descriptor_and_are_never_cut_silently() {
        let (a, b) = seqpacket_pair();
        let file = std::fs::File::open("/dev/null").unwrap();
        a.send(b"first", Some(file.as_raw_fd())).unwrap();
        a.send(b"second", None).unwrap();
        a.send(&[7u8; 100], None).unwrap();
        let mut buffer = [0u8; 64];
        let (n, fd) = b.receive_into(&mut buffer).unwrap();
        assert_eq!(&buffer[..n], b"first");
        let fd = fd.expect("the descriptor came along");
        assert_eq!(
            std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap(),
            std::path::Path::new("/dev/null")
        );
        let (n, fd) = b.receive_into(&mut buffer).unwrap();
        assert_eq!((&buffer[..n], fd.is_none()), (&b"second"[..], true));
        // Longer than the buffer: an error, not a truncated request.
        let error = b.receive_into(&mut buffer).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
        // SAFETY: closing the pair's descriptors, owned by this test.
        unsafe {
            libc::close(a.0);
        }
        let (n, _) = b.receive_into(&mut buffer).unwrap();
        assert_eq!(n, 0, "end of file once the peer closed");
        // SAFETY: as above.
        unsafe {
            libc::close(b.0);
        }
    }
}
