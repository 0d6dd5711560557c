//! The synchronous engine: preadv/pwritev over guest memory, and O_DIRECT
//! bounce buffers for requests that are not block-aligned.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use crate::memory::GuestMemoryMmap;

use super::{advance_iovecs, UIO_MAXIOV};
use crate::virtio::block::disk::AlignedBuf;
use crate::virtio::block::request::{read_stream, write_stream, Segment};

/// preadv/pwritev until all of `iovecs` is transferred.
pub fn rw_vectored(
    file: &File,
    write: bool,
    iovecs: &mut [libc::iovec],
    mut offset: u64,
) -> io::Result<()> {
    let mut start = 0;
    loop {
        while start < iovecs.len() && iovecs[start].iov_len == 0 {
            start += 1;
        }
        if start == iovecs.len() {
            return Ok(());
        }
        let batch = &iovecs[start..iovecs.len().min(start + UIO_MAXIOV)];
        let file_offset = libc::off_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: every iovec lies in guest memory (checked when the request
        // was parsed) that the caller keeps mapped; the kernel validates the
        // ranges again and reports EFAULT rather than touching anything else.
        let done = unsafe {
            if write {
                libc::pwritev(
                    file.as_raw_fd(),
                    batch.as_ptr(),
                    batch.len() as libc::c_int,
                    file_offset,
                )
            } else {
                libc::preadv(
                    file.as_raw_fd(),
                    batch.as_ptr(),
                    batch.len() as libc::c_int,
                    file_offset,
                )
            }
        };
        if done < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if done == 0 {
            return Err(if write {
                io::ErrorKind::WriteZero
            } else {
                io::ErrorKind::UnexpectedEof
            }
            .into());
        }
        offset += done as u64;
        advance_iovecs(&mut iovecs[start..], done as usize);
    }
}

/// The block-aligned file range covering [offset, offset + len).
pub fn aligned_range(offset: u64, len: u64, block: u64) -> (u64, u64) {
    let start = offset - offset % block;
    let end = (offset + len).next_multiple_of(block);
    (start, end)
}

/// O_DIRECT read of an unaligned request through an aligned buffer.
pub fn bounce_read(
    file: &File,
    mem: &GuestMemoryMmap,
    block: u64,
    segments: &[Segment],
    offset: u64,
    len: u64,
) -> io::Result<()> {
    let (start, end) = aligned_range(offset, len, block);
    let mut buf = AlignedBuf::new((end - start) as usize, block as usize)?;
    file.read_exact_at(buf.as_mut_slice(), start)?;
    let skip = (offset - start) as usize;
    if write_stream(mem, segments, &buf.as_slice()[skip..skip + len as usize]) {
        Ok(())
    } else {
        Err(io::ErrorKind::InvalidInput.into())
    }
}

/// O_DIRECT write of an unaligned request: read-modify-write of the partial
/// blocks at either end.
pub fn bounce_write(
    file: &File,
    mem: &GuestMemoryMmap,
    block: u64,
    segments: &[Segment],
    offset: u64,
    len: u64,
) -> io::Result<()> {
    let (start, end) = aligned_range(offset, len, block);
    let mut buf = AlignedBuf::new((end - start) as usize, block as usize)?;
    let block_len = block as usize;
    let total = buf.as_slice().len();
    if start < offset {
        file.read_exact_at(&mut buf.as_mut_slice()[..block_len], start)?;
    }
    if end > offset + len {
        file.read_exact_at(&mut buf.as_mut_slice()[total - block_len..], end - block)?;
    }
    let skip = (offset - start) as usize;
    if !read_stream(
        mem,
        segments,
        &mut buf.as_mut_slice()[skip..skip + len as usize],
    ) {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    file.write_all_at(buf.as_slice(), start)
}
