//! The host side's unix stream sockets, driven without blocking: every
//! receive and send says MSG_DONTWAIT (so no fcntl is needed to make an
//! accepted or connected socket non-blocking) and sends say MSG_NOSIGNAL
//! (a host program that went away is an EPIPE, not a SIGPIPE).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;

/// A connected unix stream socket to a host program.
#[derive(Debug)]
pub struct HostStream(OwnedFd);

fn check(ret: isize) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

impl HostStream {
    /// Accepts a pending connection on `listener` (EAGAIN: none).
    pub fn accept(listener: &UnixListener) -> io::Result<HostStream> {
        // SAFETY: accept4(2) on a listening socket, no address wanted; the
        // result is checked and owned.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nobody else owns.
        Ok(HostStream(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Connects to the unix socket at `path` without waiting: a listener
    /// whose backlog is full refuses (EAGAIN) instead of holding the worker.
    pub fn connect(path: &str) -> io::Result<HostStream> {
        // SAFETY: sockaddr_un is plain data; all zeros is a valid value.
        let mut address: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        address.sun_family = libc::AF_UNIX as libc::sa_family_t;
        let bytes = path.as_bytes();
        // One byte is left for the terminating NUL.
        if bytes.is_empty() || bytes.len() >= address.sun_path.len() || bytes.contains(&0) {
            return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
        }
        for (slot, &byte) in address.sun_path.iter_mut().zip(bytes) {
            *slot = byte as libc::c_char;
        }
        // SAFETY: socket(2); the result is checked and owned.
        let fd = unsafe {
            libc::socket(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nobody else owns.
        let stream = HostStream(unsafe { OwnedFd::from_raw_fd(fd) });
        let length = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
        // SAFETY: connect(2) with a filled sockaddr_un and its used length.
        let ret = unsafe {
            libc::connect(
                stream.as_raw_fd(),
                (&address as *const libc::sockaddr_un).cast(),
                length as libc::socklen_t,
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(stream)
    }

    fn recv_flags(&self, buffer: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
        // SAFETY: recv(2) into a live buffer of the length given.
        check(unsafe {
            libc::recv(
                self.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                flags | libc::MSG_DONTWAIT,
            )
        })
    }

    /// Reads what is there (0: end of stream; EAGAIN: nothing yet).
    pub fn recv(&self, buffer: &mut [u8]) -> io::Result<usize> {
        self.recv_flags(buffer, 0)
    }

    /// Looks at what is there without taking it.
    pub fn peek(&self, buffer: &mut [u8]) -> io::Result<usize> {
        self.recv_flags(buffer, libc::MSG_PEEK)
    }

    /// Writes what fits now (EAGAIN: nothing fits).
    pub fn send(&self, bytes: &[u8]) -> io::Result<usize> {
        // SAFETY: send(2) from a live buffer of the length given.
        check(unsafe {
            libc::send(
                self.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        })
    }

    /// The host program reads end of stream once it has read what was sent.
    pub fn shutdown_write(&self) {
        // SAFETY: shutdown(2) on our socket. A peer already gone is not an
        // error worth reporting: the next event says so.
        let _ = unsafe { libc::shutdown(self.as_raw_fd(), libc::SHUT_WR) };
    }
}

impl AsRawFd for HostStream {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}
