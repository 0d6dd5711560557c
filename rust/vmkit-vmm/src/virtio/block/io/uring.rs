//! The io_uring engine: reads, writes and flushes in flight on one ring per
//! queue, with the buffers they use kept alive until the kernel is done.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use crate::memory::GuestMemoryMmap;
use io_uring::{opcode, types, IoUring};
use vmm_sys_util::eventfd::EventFd;

use super::IoVecs;
use crate::virtio::block::request::{Op, Request};

pub struct InFlight {
    pub request: Request,
    pub iovecs: IoVecs,
    /// Requests merged behind `request` (contiguous reads sent as one
    /// readv); they share its result.
    pub followers: Vec<Request>,
}

/// An io_uring with the requests it is running.
pub struct Uring {
    pub ring: IoUring,
    /// Signalled by the kernel on each completion.
    pub eventfd: EventFd,
    pub slots: Vec<Option<InFlight>>,
    pub free: Vec<usize>,
    /// Keeps the guest memory mapped while the kernel may still use it.
    pub memory: GuestMemoryMmap,
    /// The completion ring has its flags word (Linux 5.8; told apart by a
    /// feature of 5.9): the eventfd can be muted.
    can_mute: bool,
}

impl Uring {
    pub fn new(entries: u32, memory: GuestMemoryMmap) -> io::Result<Uring> {
        // Created disabled, so that its restrictions are in place before any
        // submission: the worker's seccomp filter cannot see what a ring
        // does, the ring itself allows only read, write and fsync (kernels
        // before 5.10 cannot restrict: they get a plain ring).
        let (ring, restrict) = match IoUring::builder().setup_r_disabled().build(entries) {
            Ok(ring) => (ring, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (IoUring::new(entries)?, false),
            Err(e) => return Err(e),
        };
        let mut probe = io_uring::Probe::new();
        // Kernels before 5.6 cannot probe but have these three operations.
        if ring.submitter().register_probe(&mut probe).is_ok() {
            for code in [
                opcode::Readv::CODE,
                opcode::Writev::CODE,
                opcode::Fsync::CODE,
            ] {
                if !probe.is_supported(code) {
                    return Err(io::ErrorKind::Unsupported.into());
                }
            }
        }
        let eventfd = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        if restrict {
            let mut allowed = [
                io_uring::register::Restriction::sqe_op(opcode::Readv::CODE),
                io_uring::register::Restriction::sqe_op(opcode::Writev::CODE),
                io_uring::register::Restriction::sqe_op(opcode::Fsync::CODE),
            ];
            ring.submitter().register_restrictions(&mut allowed)?;
            ring.submitter().register_enable_rings()?;
        }
        let capacity = ring.params().sq_entries() as usize;
        let can_mute = ring.params().is_feature_poll_32bits();
        Ok(Uring {
            ring,
            eventfd,
            slots: (0..capacity).map(|_| None).collect(),
            free: (0..capacity).rev().collect(),
            memory,
            can_mute,
        })
    }

    pub fn is_full(&self) -> bool {
        self.free.is_empty()
    }

    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Queues a read, write or flush; hands it back if that is not possible.
    #[allow(clippy::result_large_err)]
    pub fn push(
        &mut self,
        fd: RawFd,
        request: Request,
        iovecs: IoVecs,
    ) -> Result<(), (Request, IoVecs)> {
        let Some(slot) = self.free.pop() else {
            return Err((request, iovecs));
        };
        let fd = types::Fd(fd);
        let iovec_count = iovecs.0.len() as u32;
        let entry = match request.op {
            Op::Read { offset, .. } => opcode::Readv::new(fd, iovecs.0.as_ptr(), iovec_count)
                .offset(offset)
                .build(),
            Op::Write { offset, .. } => opcode::Writev::new(fd, iovecs.0.as_ptr(), iovec_count)
                .offset(offset)
                .build(),
            Op::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            _ => {
                self.free.push(slot);
                return Err((request, iovecs));
            }
        }
        .user_data(slot as u64);
        // SAFETY: the iovec array (heap-allocated, never resized) and the
        // guest memory it points into stay alive in `slots[slot]` and
        // `memory` until this operation's completion is reaped; `drain`
        // waits for every operation before the ring goes away.
        if unsafe { self.ring.submission().push(&entry) }.is_err() {
            self.free.push(slot);
            return Err((request, iovecs));
        }
        self.slots[slot] = Some(InFlight {
            request,
            iovecs,
            followers: Vec::new(),
        });
        Ok(())
    }

    /// Queues `reads` (contiguous on the disk, in order) as one readv.
    #[allow(clippy::result_large_err)]
    pub fn push_merged_reads(
        &mut self,
        fd: RawFd,
        reads: Vec<Request>,
        iovecs: IoVecs,
    ) -> Result<(), Vec<Request>> {
        let Some(Op::Read { offset, .. }) = reads.first().map(|r| &r.op) else {
            return Err(reads);
        };
        let offset = *offset;
        let Some(slot) = self.free.pop() else {
            return Err(reads);
        };
        let entry = opcode::Readv::new(types::Fd(fd), iovecs.0.as_ptr(), iovecs.0.len() as u32)
            .offset(offset)
            .build()
            .user_data(slot as u64);
        // SAFETY: as in `push`: the iovecs and the guest memory they point
        // into stay alive in `slots[slot]` until the completion is reaped.
        if unsafe { self.ring.submission().push(&entry) }.is_err() {
            self.free.push(slot);
            return Err(reads);
        }
        let mut reads = reads.into_iter();
        let Some(request) = reads.next() else {
            self.free.push(slot);
            return Ok(());
        };
        self.slots[slot] = Some(InFlight {
            request,
            iovecs,
            followers: reads.collect(),
        });
        Ok(())
    }

    /// Hands queued entries to the kernel. A failure leaves them queued for
    /// the next call (each completion or kick makes one).
    pub fn submit(&mut self) {
        if !self.ring.submission().is_empty() {
            let _ = self.ring.submit();
        }
    }

    /// Stops (or resumes) signalling the eventfd on completions: a vCPU
    /// thread that reaps what its own submission completed need not wake
    /// the worker for it.
    pub fn mute_eventfd(&mut self, mute: bool) {
        if !self.can_mute {
            return;
        }
        if mute {
            self.ring.completion().disable_eventfd();
        } else {
            self.ring.completion().enable_eventfd();
        }
    }

    pub fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    pub fn reap(&mut self) -> Vec<(InFlight, i32)> {
        let mut done = Vec::new();
        for cqe in self.ring.completion() {
            let slot = cqe.user_data() as usize;
            if let Some(in_flight) = self.slots.get_mut(slot).and_then(Option::take) {
                self.free.push(slot);
                done.push((in_flight, cqe.result()));
            }
        }
        done
    }

    /// Waits for every operation to finish; their results are dropped.
    pub fn drain(&mut self) {
        while self.in_flight() > 0 {
            if let Err(e) = self.ring.submit_and_wait(1) {
                if !matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY)) {
                    // No way to know when the kernel is done with the
                    // buffers: keep them, and the guest memory, forever.
                    std::mem::forget(std::mem::take(&mut self.slots));
                    std::mem::forget(self.memory.clone());
                    self.free.clear();
                    return;
                }
            }
            drop(self.reap());
        }
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        self.drain();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    /// The ring takes reads, writes and fsyncs only: a compromised worker
    /// cannot use it to open files or connect sockets behind its filter.
    #[test]
    fn the_ring_refuses_operations_outside_its_restrictions() {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let Ok(mut uring) = Uring::new(8, memory) else {
            return; // no io_uring here: nothing to restrict
        };
        let file = tempfile_in_tmp();
        let path = c"/etc/hostname";
        let open = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), path.as_ptr())
            .build()
            .user_data(1);
        let fsync = opcode::Fsync::new(types::Fd(file.as_raw_fd()))
            .build()
            .user_data(2);
        let mut results = Vec::new();
        for entry in [open, fsync] {
            // SAFETY: the path is a static C string; the file outlives the wait.
            unsafe { uring.ring.submission().push(&entry).unwrap() };
            uring.ring.submit_and_wait(1).unwrap();
            results.extend(uring.ring.completion().map(|c| (c.user_data(), c.result())));
        }
        assert_eq!(results, vec![(1, -libc::EACCES), (2, 0)]);
    }

    fn tempfile_in_tmp() -> std::fs::File {
        let path = std::env::temp_dir().join(format!("vmkit-uring-{}", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }
}
