//! A fork whose child is the caller's sibling: the process a fork server
//! makes for each VMM belongs to the program that asked for it.
//!
//! `clone(CLONE_PARENT)` gives the new process this process's parent as its
//! parent, so that program can wait for it, read its exit status and get
//! SIGCHLD, exactly as for a process it started itself, while the fork
//! server owns nothing of it.

use std::io;

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
}
