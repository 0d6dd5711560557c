//! Running requests: host iovecs over guest buffers, and the per-queue
//! [`QueueIo`] that executes a request with the synchronous engine
//! ([`sync`]) or finishes one io_uring ([`uring`]) ran.

pub mod sync;
pub mod uring;

use std::fs::File;
use std::io;
use std::sync::Arc;

use crate::memory::GuestMemoryMmap;
use vm_memory::GuestMemoryBackend;

use self::sync::{bounce_read, bounce_write, rw_vectored};
use super::disk::DiskImage;
use super::request::{total_len, used_len, write_stream, Op, Request, Segment};
use super::{ID_LEN, STATUS_IOERR, STATUS_OK};

pub(super) const UIO_MAXIOV: usize = libc::UIO_MAXIOV as usize;

/// Host iovecs over guest buffers.
pub struct IoVecs(pub Vec<libc::iovec>);

// SAFETY: the pointers address guest memory mappings, not data owned by a
// thread; the handler that owns the iovecs keeps those mappings alive (it
// holds the `GuestMemoryMmap`) for as long as the iovecs are used.
unsafe impl Send for IoVecs {}

/// Host addresses of `segments`; None if a range is not (wholly) guest memory.
pub fn guest_iovecs(mem: &GuestMemoryMmap, segments: &[Segment]) -> Option<IoVecs> {
    let mut iovecs = Vec::with_capacity(segments.len());
    for segment in segments {
        for slice in GuestMemoryBackend::get_slices(mem, segment.addr, segment.len as usize) {
            let slice = slice.ok()?;
            iovecs.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
    }
    Some(IoVecs(iovecs))
}

/// Drops the first `done` bytes from `iovecs` (after a short transfer).
pub fn advance_iovecs(iovecs: &mut [libc::iovec], mut done: usize) {
    for iov in iovecs {
        if done == 0 {
            break;
        }
        let step = done.min(iov.iov_len);
        iov.iov_base = iov.iov_base.cast::<u8>().wrapping_add(step).cast();
        iov.iov_len -= step;
        done -= step;
    }
}

/// What request parsing and execution need from the device and the driver.
pub struct QueueIo {
    pub disk: Arc<DiskImage>,
    /// This queue's own handle on the disk.
    pub file: File,
    pub serial: [u8; ID_LEN],
    pub acked_features: u64,
}

impl QueueIo {
    /// O_DIRECT needs every buffer, offset and length block-aligned.
    pub fn needs_bounce(&self, offset: u64, iovecs: &IoVecs) -> bool {
        let block = u64::from(self.disk.block_size);
        self.disk.direct
            && (!offset.is_multiple_of(block)
                || iovecs
                    .0
                    .iter()
                    .any(|iov| !(iov.iov_base as u64 | iov.iov_len as u64).is_multiple_of(block)))
    }

    /// Iovecs for running `request` on io_uring, or None if it must run
    /// synchronously (bounce buffer, too many iovecs, not an I/O request).
    pub fn uring_iovecs(&self, mem: &GuestMemoryMmap, request: &Request) -> Option<IoVecs> {
        match &request.op {
            Op::Read { offset, data, .. } | Op::Write { offset, data, .. } => {
                let iovecs = guest_iovecs(mem, data)?;
                (iovecs.0.len() <= UIO_MAXIOV && !self.needs_bounce(*offset, &iovecs))
                    .then_some(iovecs)
            }
            Op::Flush => Some(IoVecs(Vec::new())),
            _ => None,
        }
    }

    pub fn read_write(
        &self,
        mem: &GuestMemoryMmap,
        write: bool,
        offset: u64,
        len: u64,
        data: &[Segment],
    ) -> io::Result<()> {
        let mut iovecs = guest_iovecs(mem, data).ok_or(io::ErrorKind::InvalidInput)?;
        if self.needs_bounce(offset, &iovecs) {
            let block = u64::from(self.disk.block_size);
            return if write {
                bounce_write(&self.file, mem, block, data, offset, len)
            } else {
                bounce_read(&self.file, mem, block, data, offset, len)
            };
        }
        rw_vectored(&self.file, write, &mut iovecs.0, offset)
    }

    /// Runs `request` on this thread: (status, bytes written to the guest).
    pub fn execute(&self, mem: &GuestMemoryMmap, request: &Request) -> (u8, u32) {
        let result = match &request.op {
            Op::Read { offset, len, data } => self.read_write(mem, false, *offset, *len, data),
            Op::Write { offset, len, data } => self.read_write(mem, true, *offset, *len, data),
            Op::Flush => self.file.sync_data(),
            Op::GetId { data } => {
                let len = (total_len(data) as usize).min(ID_LEN);
                return if write_stream(mem, data, &self.serial[..len]) {
                    (STATUS_OK, len as u32 + 1)
                } else {
                    (STATUS_IOERR, 1)
                };
            }
            // Empty ranges are no-ops (fallocate would call them invalid).
            Op::Discard { ranges } => ranges
                .iter()
                .filter(|r| r.len > 0)
                .try_for_each(|r| self.disk.discard(&self.file, r.offset, r.len)),
            Op::WriteZeroes { ranges } => ranges
                .iter()
                .filter(|r| r.len > 0)
                .try_for_each(|r| self.disk.write_zeroes(&self.file, r.offset, r.len, r.unmap)),
        };
        let status = if result.is_ok() {
            STATUS_OK
        } else {
            STATUS_IOERR
        };
        (status, used_len(&request.op, status))
    }

    /// Finishes an io_uring read, write or flush that returned `result`.
    pub fn complete_uring(
        &self,
        request: &Request,
        followers: &[Request],
        iovecs: &mut IoVecs,
        result: i32,
    ) -> u8 {
        let Ok(done) = u64::try_from(result) else {
            return STATUS_IOERR;
        };
        let (write, offset, mut len) = match request.op {
            Op::Read { offset, len, .. } => (false, offset, len),
            Op::Write { offset, len, .. } => (true, offset, len),
            _ => return STATUS_OK,
        };
        len += followers.iter().map(|f| f.op.data_len()).sum::<u64>();
        if done >= len {
            return STATUS_OK;
        }
        // A short transfer: finish it here.
        advance_iovecs(&mut iovecs.0, done as usize);
        match rw_vectored(&self.file, write, &mut iovecs.0, offset + done) {
            Ok(()) => STATUS_OK,
            Err(_) => STATUS_IOERR,
        }
    }
}
