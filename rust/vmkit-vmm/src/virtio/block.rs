//! virtio-blk (virtio 1.2 §5.2) over a raw disk image or a host block device.
//!
//! Every enabled queue gets a worker thread with its own file handle. A worker
//! pops requests, checks every descriptor against guest memory (the guest is
//! untrusted), and runs reads, writes and flushes on io_uring, or with
//! preadv/pwritev when io_uring is disabled or unavailable; the other request
//! types run inline. A request a rate limiter refuses stays in the ring until
//! the worker's timer fires.

use std::alloc::Layout;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmkit_config::DiskConfig;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::worker::{self, Worker, WorkerHandler};
use super::{
    ActivateError, Activation, Interrupt, VirtioDevice, F_RING_EVENT_IDX, F_RING_INDIRECT_DESC,
    F_VERSION_1, TYPE_BLOCK,
};
use crate::error::{Error, ErrorKind};
use crate::rate_limiter::SharedRateLimiter;

/// virtio-blk feature bits (virtio 1.2 §5.2.3).
pub const F_SEG_MAX: u64 = 1 << VIRTIO_BLK_F_SEG_MAX;
pub const F_RO: u64 = 1 << VIRTIO_BLK_F_RO;
pub const F_BLK_SIZE: u64 = 1 << VIRTIO_BLK_F_BLK_SIZE;
pub const F_FLUSH: u64 = 1 << VIRTIO_BLK_F_FLUSH;
pub const F_TOPOLOGY: u64 = 1 << VIRTIO_BLK_F_TOPOLOGY;
pub const F_MQ: u64 = 1 << VIRTIO_BLK_F_MQ;
pub const F_DISCARD: u64 = 1 << VIRTIO_BLK_F_DISCARD;
pub const F_WRITE_ZEROES: u64 = 1 << VIRTIO_BLK_F_WRITE_ZEROES;

/// virtio-blk addresses the disk in 512-byte sectors whatever its block size.
const SECTOR_SHIFT: u32 = 9;
const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;

const STATUS_OK: u8 = VIRTIO_BLK_S_OK as u8;
const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const STATUS_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// The device-readable request header: le32 type, le32 reserved, le64 sector.
const HEADER_LEN: u64 = 16;
/// One discard / write-zeroes range: le64 sector, le32 num_sectors, le32 flags.
const RANGE_LEN: u64 = 16;
const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;

/// The most data one read or write may carry; more gets an error status.
/// Bounds bounce buffers. Linux guests send at most 1.25 MiB unless
/// max_sectors_kb is raised.
pub const MAX_REQUEST_BYTES: u64 = 8 << 20;
/// Ceiling for seg_max: a request's data then fits one iovec array
/// (UIO_MAXIOV = 1024) with room to spare.
const MAX_SEGMENTS: u16 = 1022;
/// Descriptors accepted in one chain: the data segments, header and status.
const MAX_CHAIN_DESCRIPTORS: usize = MAX_SEGMENTS as usize + 2;
const MAX_DISCARD_SEGMENTS: u32 = 32;
const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// Each queue is a thread and a file handle.
const MAX_QUEUES: usize = 256;
/// io_uring entries per queue, whatever the queue size.
const MAX_RING_ENTRIES: u32 = 1024;
const UIO_MAXIOV: usize = libc::UIO_MAXIOV as usize;
/// `struct virtio_blk_config` up to and including write_zeroes_may_unmap.
const CONFIG_SPACE_LEN: usize = 60;

vmm_sys_util::ioctl_io_nr!(BLKSSZGET, 0x12, 104);
vmm_sys_util::ioctl_io_nr!(BLKDISCARD, 0x12, 119);
vmm_sys_util::ioctl_io_nr!(BLKPBSZGET, 0x12, 123);
vmm_sys_util::ioctl_io_nr!(BLKZEROOUT, 0x12, 127);

/// Cloud Hypervisor's per-disk counters, readable while the workers run.
/// Only successful reads and writes count; latencies are in microseconds.
#[derive(Debug, Default)]
pub struct BlockCounters {
    read_bytes: AtomicU64,
    write_bytes: AtomicU64,
    read_ops: AtomicU64,
    write_ops: AtomicU64,
    read_latency: Latency,
    write_latency: Latency,
}

#[derive(Debug)]
struct Latency {
    min: AtomicU64,
    max: AtomicU64,
    total: AtomicU64,
}

impl Default for Latency {
    fn default() -> Self {
        Latency {
            // Cloud Hypervisor reports u64::MAX until the first operation.
            min: AtomicU64::new(u64::MAX),
            max: AtomicU64::new(0),
            total: AtomicU64::new(0),
        }
    }
}

impl Latency {
    fn record(&self, micros: u64) {
        self.min.fetch_min(micros, Ordering::Relaxed);
        self.max.fetch_max(micros, Ordering::Relaxed);
        self.total.fetch_add(micros, Ordering::Relaxed);
    }

    fn average(&self, ops: u64) -> u64 {
        self.total
            .load(Ordering::Relaxed)
            .checked_div(ops)
            .unwrap_or(0)
    }
}

impl BlockCounters {
    fn record(&self, write: bool, bytes: u64, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let (bytes_counter, ops, stats) = if write {
            (&self.write_bytes, &self.write_ops, &self.write_latency)
        } else {
            (&self.read_bytes, &self.read_ops, &self.read_latency)
        };
        bytes_counter.fetch_add(bytes, Ordering::Relaxed);
        ops.fetch_add(1, Ordering::Relaxed);
        stats.record(micros);
    }

    /// The counters under Cloud Hypervisor's names.
    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let read_ops = load(&self.read_ops);
        let write_ops = load(&self.write_ops);
        BTreeMap::from([
            ("read_bytes", load(&self.read_bytes)),
            ("write_bytes", load(&self.write_bytes)),
            ("read_ops", read_ops),
            ("write_ops", write_ops),
            ("read_latency_min", load(&self.read_latency.min)),
            ("read_latency_max", load(&self.read_latency.max)),
            ("read_latency_avg", self.read_latency.average(read_ops)),
            ("write_latency_min", load(&self.write_latency.min)),
            ("write_latency_max", load(&self.write_latency.max)),
            ("write_latency_avg", self.write_latency.average(write_ops)),
        ])
    }
}

/// The backing file or block device and what it can do, fixed at open.
#[derive(Debug)]
struct DiskImage {
    file: File,
    readonly: bool,
    direct: bool,
    block_device: bool,
    /// In 512-byte sectors.
    capacity: u64,
    /// Logical block size: reported as blk_size, and the O_DIRECT alignment.
    block_size: u32,
    physical_block_exp: u8,
    discard: bool,
    write_zeroes: bool,
    /// Regular files: FALLOC_FL_ZERO_RANGE works (else holes are punched).
    zero_range: bool,
}

fn open_failure(e: &io::Error, direct: bool) -> String {
    match e.raw_os_error() {
        Some(libc::ENOENT) => "no such file or directory".into(),
        Some(libc::EACCES) | Some(libc::EPERM) => "permission denied".into(),
        Some(libc::EROFS) => "read-only file system (use readonly=on)".into(),
        Some(libc::EINVAL) if direct => {
            "the file system does not support O_DIRECT (direct=on)".into()
        }
        _ => e.to_string(),
    }
}

impl DiskImage {
    fn open(config: &DiskConfig) -> crate::Result<DiskImage> {
        let path = config
            .path
            .as_deref()
            .ok_or_else(|| Error::new(ErrorKind::Device, "disk: no path given"))?;
        let fail = |what: &str| Error::new(ErrorKind::Device, format!("disk image {path}: {what}"));

        // Looked at before opening: opening a FIFO could block.
        let metadata = std::fs::metadata(path).map_err(|e| fail(&open_failure(&e, false)))?;
        let block_device = metadata.file_type().is_block_device();
        if !metadata.is_file() && !block_device {
            return Err(fail("not a regular file or block device"));
        }
        let mut options = OpenOptions::new();
        options.read(true).write(!config.readonly);
        if config.direct {
            options.custom_flags(libc::O_DIRECT);
        }
        let mut file = options
            .open(path)
            .map_err(|e| fail(&open_failure(&e, config.direct)))?;
        // The path may have been replaced in between.
        let opened = file.metadata().map_err(|e| fail(&e.to_string()))?;
        if opened.file_type().is_block_device() != block_device
            || !(opened.is_file() || block_device)
        {
            return Err(fail("not a regular file or block device"));
        }
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|e| fail(&format!("cannot read its size: {e}")))?;

        let (block_size, physical_block_size) = if block_device {
            block_device_sizes(&file).map_err(|e| fail(&format!("block size: {e}")))?
        } else if config.direct {
            let align = direct_io_alignment(&file, size)
                .map_err(|e| fail(&format!("O_DIRECT (direct=on): {e}")))?;
            (align, align)
        } else {
            (SECTOR_SIZE as u32, SECTOR_SIZE as u32)
        };
        let physical_block_exp = (physical_block_size / block_size)
            .checked_ilog2()
            .unwrap_or(0) as u8;
        // Whole blocks only, so aligned I/O never reaches past the end.
        let usable = size - size % u64::from(block_size);

        let mut image = DiskImage {
            file,
            readonly: config.readonly,
            direct: config.direct,
            block_device,
            capacity: usable >> SECTOR_SHIFT,
            block_size,
            physical_block_exp,
            discard: false,
            write_zeroes: false,
            zero_range: false,
        };
        if !config.readonly {
            image.probe_discard(size);
        }
        Ok(image)
    }

    /// Finds out once whether discard and write-zeroes work here.
    fn probe_discard(&mut self, size: u64) {
        let fd = self.file.as_raw_fd();
        if self.block_device {
            // A misaligned range fails with EINVAL only after the kernel has
            // checked for discard support (EOPNOTSUPP): nothing is discarded.
            let range: [u64; 2] = [1, 0];
            // SAFETY: BLKDISCARD reads a [u64; 2] that outlives the call.
            let ret =
                unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&self.file, BLKDISCARD(), &range) };
            self.discard =
                ret < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL);
            // The kernel writes zeroes itself where the device cannot.
            self.write_zeroes = true;
            return;
        }
        // Past the end of the file, so no data is touched; KEEP_SIZE keeps
        // the size, and a probe block zero-range allocated is punched again.
        let Some(probe_at) = size
            .checked_next_multiple_of(4096)
            .and_then(|at| libc::off_t::try_from(at).ok())
        else {
            return;
        };
        let try_mode = |mode: libc::c_int| {
            // SAFETY: fallocate takes no pointers.
            unsafe { libc::fallocate(fd, mode | libc::FALLOC_FL_KEEP_SIZE, probe_at, 4096) == 0 }
        };
        let punch_hole = try_mode(libc::FALLOC_FL_PUNCH_HOLE);
        self.zero_range = try_mode(libc::FALLOC_FL_ZERO_RANGE);
        if self.zero_range && punch_hole {
            try_mode(libc::FALLOC_FL_PUNCH_HOLE);
        }
        self.discard = punch_hole;
        self.write_zeroes = punch_hole || self.zero_range;
    }

    fn discard(&self, file: &File, offset: u64, len: u64) -> io::Result<()> {
        if self.block_device {
            block_range_ioctl(file, BLKDISCARD(), offset, len)
        } else {
            fallocate(file, libc::FALLOC_FL_PUNCH_HOLE, offset, len)
        }
    }

    fn write_zeroes(&self, file: &File, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if self.block_device {
            block_range_ioctl(file, BLKZEROOUT(), offset, len)
        } else if self.zero_range && !(unmap && self.discard) {
            fallocate(file, libc::FALLOC_FL_ZERO_RANGE, offset, len)
        } else {
            // A punched hole reads back as zeroes.
            fallocate(file, libc::FALLOC_FL_PUNCH_HOLE, offset, len)
        }
    }
}

fn block_device_sizes(file: &File) -> io::Result<(u32, u32)> {
    let mut logical: libc::c_int = 0;
    let mut physical: libc::c_uint = 0;
    // SAFETY: both ioctls write one integer of the type given.
    let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(file, BLKSSZGET(), &mut logical) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(file, BLKPBSZGET(), &mut physical) };
    let logical = u32::try_from(logical).unwrap_or(0);
    if !logical.is_power_of_two() || !(512..=65536).contains(&logical) {
        return Err(io::Error::other(format!(
            "unusable logical block size {logical}"
        )));
    }
    let physical = if ret < 0 || physical < logical || !physical.is_power_of_two() {
        logical
    } else {
        physical
    };
    Ok((logical, physical))
}

/// The alignment O_DIRECT needs on this file, for memory, offsets and
/// lengths alike: 512 where a 512-byte read works, else 4096.
fn direct_io_alignment(file: &File, size: u64) -> io::Result<u32> {
    if size < SECTOR_SIZE {
        return Ok(SECTOR_SIZE as u32);
    }
    let mut buf = AlignedBuf::new(8192, 4096)?;
    for align in [512usize, 4096] {
        // Aligned to `align` but not to twice it, so a stricter requirement
        // shows up as EINVAL.
        let probe = &mut buf.as_mut_slice()[align..2 * align];
        match file.read_at(probe, 0) {
            Ok(_) => return Ok(align as u32),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other("reads need more than 4096-byte alignment"))
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let offset = libc::off_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
    let len = libc::off_t::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
    loop {
        // SAFETY: fallocate takes no pointers.
        let ret = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                mode | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
        };
        if ret == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn block_range_ioctl(file: &File, request: libc::c_ulong, offset: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [offset, len];
    // SAFETY: BLKDISCARD and BLKZEROOUT read a [u64; 2] that outlives the call.
    let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(file, request, &range) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A zeroed heap buffer with a given alignment, for O_DIRECT bounce I/O.
struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

impl AlignedBuf {
    fn new(len: usize, align: usize) -> io::Result<AlignedBuf> {
        let layout = Layout::from_size_align(len.max(1), align)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: the layout's size is not zero.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).ok_or(io::ErrorKind::OutOfMemory)?;
        Ok(AlignedBuf { ptr, layout })
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` owns `layout.size()` initialized (zeroed) bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// A guest buffer that was checked to lie in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    addr: GuestAddress,
    len: u32,
}

fn total_len(segments: &[Segment]) -> u64 {
    segments.iter().map(|s| u64::from(s.len)).sum()
}

/// The segments of a byte stream less its first `skip` bytes.
fn skip_bytes(segments: &[Segment], mut skip: u64) -> Vec<Segment> {
    let mut rest = Vec::with_capacity(segments.len());
    for segment in segments {
        let len = u64::from(segment.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        rest.push(Segment {
            // Inside a checked segment, so no overflow.
            addr: GuestAddress(segment.addr.0 + skip),
            len: (len - skip) as u32,
        });
        skip = 0;
    }
    rest
}

/// Fills `buf` from the start of the byte stream; false if it is too short.
fn read_stream(mem: &GuestMemoryMmap, segments: &[Segment], buf: &mut [u8]) -> bool {
    let mut filled = 0;
    for segment in segments {
        if filled == buf.len() {
            break;
        }
        let take = (segment.len as usize).min(buf.len() - filled);
        if mem
            .read_slice(&mut buf[filled..filled + take], segment.addr)
            .is_err()
        {
            return false;
        }
        filled += take;
    }
    filled == buf.len()
}

/// Writes `data` to the start of the byte stream; false if it is too short.
fn write_stream(mem: &GuestMemoryMmap, segments: &[Segment], data: &[u8]) -> bool {
    let mut written = 0;
    for segment in segments {
        if written == data.len() {
            break;
        }
        let take = (segment.len as usize).min(data.len() - written);
        if mem
            .write_slice(&data[written..written + take], segment.addr)
            .is_err()
        {
            return false;
        }
        written += take;
    }
    written == data.len()
}

/// Most bytes of contiguous requests merged into one readv or writev.
const MERGE_LIMIT: u64 = 32 << 20;

/// `requests` (reads or writes) sorted by offset and cut into runs that
/// continue one another on the disk, each at most `MERGE_LIMIT` bytes (or one
/// request).
fn contiguous_runs(mut requests: Vec<Request>) -> Vec<Vec<Request>> {
    let span = |op: &Op| match op {
        Op::Read { offset, len, .. } | Op::Write { offset, len, .. } => (*offset, *len),
        _ => (u64::MAX, 0),
    };
    requests.sort_by_key(|r| span(&r.op).0);
    let mut runs: Vec<Vec<Request>> = Vec::new();
    let mut run_bytes = 0;
    for request in requests {
        let (offset, len) = span(&request.op);
        let joins = runs.last().and_then(|run| run.last()).is_some_and(|last| {
            let (start, last_len) = span(&last.op);
            start.checked_add(last_len) == Some(offset) && run_bytes + len <= MERGE_LIMIT
        });
        match runs.last_mut() {
            Some(run) if joins => run.push(request),
            _ => {
                runs.push(vec![request]);
                run_bytes = 0;
            }
        }
        run_bytes += len;
    }
    runs
}

/// Host iovecs over guest buffers.
struct IoVecs(Vec<libc::iovec>);

// SAFETY: the pointers address guest memory mappings, not data owned by a
// thread; the handler that owns the iovecs keeps those mappings alive (it
// holds the `GuestMemoryMmap`) for as long as the iovecs are used.
unsafe impl Send for IoVecs {}

/// Host addresses of `segments`; None if a range is not (wholly) guest memory.
fn guest_iovecs(mem: &GuestMemoryMmap, segments: &[Segment]) -> Option<IoVecs> {
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
fn advance_iovecs(iovecs: &mut [libc::iovec], mut done: usize) {
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

/// preadv/pwritev until all of `iovecs` is transferred.
fn rw_vectored(
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
fn aligned_range(offset: u64, len: u64, block: u64) -> (u64, u64) {
    let start = offset - offset % block;
    let end = (offset + len).next_multiple_of(block);
    (start, end)
}

/// O_DIRECT read of an unaligned request through an aligned buffer.
fn bounce_read(
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
fn bounce_write(
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

/// A chain split into its device-readable and device-writable bytes.
#[derive(Debug)]
struct ChainParts {
    readable: Vec<Segment>,
    writable: Vec<Segment>,
    status: GuestAddress,
}

#[derive(Debug, PartialEq, Eq)]
enum BadChain {
    /// No usable status byte: the chain can only be returned unused.
    NoStatus,
    /// Malformed, but the status byte at this address can say so.
    Invalid(GuestAddress),
}

fn segment_in_memory(mem: &GuestMemoryMmap, addr: GuestAddress, len: u32) -> bool {
    addr.0.checked_add(u64::from(len)).is_some()
        && GuestMemoryBackend::check_range(mem, addr, len as usize)
}

/// Walks a chain: the status byte is the last byte of the last descriptor,
/// which must be device-writable; device-readable descriptors come first.
fn split_chain(
    mem: &GuestMemoryMmap,
    descriptors: impl Iterator<Item = Descriptor>,
) -> Result<ChainParts, BadChain> {
    let mut kept = Vec::new();
    let mut count = 0usize;
    let mut last = None;
    // virtio-queue bounds the walk (queue size, or indirect table size) and
    // stops early on a loop, a bad index or address, or a nested indirect
    // table; then the last descriptor yielded still says NEXT.
    for descriptor in descriptors {
        count += 1;
        if kept.len() < MAX_CHAIN_DESCRIPTORS {
            kept.push(descriptor);
        }
        last = Some(descriptor);
    }
    let last = last.ok_or(BadChain::NoStatus)?;
    if last.has_next() || !last.is_write_only() || last.len() == 0 {
        return Err(BadChain::NoStatus);
    }
    let status = last
        .addr()
        .0
        .checked_add(u64::from(last.len()) - 1)
        .map(GuestAddress)
        .filter(|&addr| GuestMemoryBackend::address_in_range(mem, addr))
        .ok_or(BadChain::NoStatus)?;
    if count > MAX_CHAIN_DESCRIPTORS {
        return Err(BadChain::Invalid(status));
    }

    let mut parts = ChainParts {
        readable: Vec::new(),
        writable: Vec::new(),
        status,
    };
    let last_index = kept.len() - 1;
    let mut seen_writable = false;
    for (index, descriptor) in kept.iter().enumerate() {
        let len = if index == last_index {
            descriptor.len() - 1
        } else {
            descriptor.len()
        };
        if descriptor.is_write_only() {
            seen_writable = true;
            if len > 0 {
                if !segment_in_memory(mem, descriptor.addr(), len) {
                    return Err(BadChain::Invalid(status));
                }
                parts.writable.push(Segment {
                    addr: descriptor.addr(),
                    len,
                });
            }
        } else {
            // Drivers must put every device-readable descriptor first.
            if seen_writable || !segment_in_memory(mem, descriptor.addr(), len) {
                return Err(BadChain::Invalid(status));
            }
            if len > 0 {
                parts.readable.push(Segment {
                    addr: descriptor.addr(),
                    len,
                });
            }
        }
    }
    Ok(parts)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ByteRange {
    offset: u64,
    len: u64,
    unmap: bool,
}

#[derive(Debug)]
enum Op {
    Read {
        offset: u64,
        len: u64,
        data: Vec<Segment>,
    },
    Write {
        offset: u64,
        len: u64,
        data: Vec<Segment>,
    },
    Flush,
    GetId {
        data: Vec<Segment>,
    },
    Discard {
        ranges: Vec<ByteRange>,
    },
    WriteZeroes {
        ranges: Vec<ByteRange>,
    },
}

impl Op {
    /// Bytes moved, for the bandwidth limiter.
    fn data_len(&self) -> u64 {
        match self {
            Op::Read { len, .. } | Op::Write { len, .. } => *len,
            _ => 0,
        }
    }
}

/// A well-formed request, from pop to completion.
#[derive(Debug)]
struct Request {
    head: u16,
    status: GuestAddress,
    op: Op,
    started: Instant,
}

#[derive(Debug)]
enum Parsed {
    /// No status byte to report through: return the chain with length 0.
    Drop,
    /// Answered without I/O (an error, or an unsupported type).
    Done {
        status_addr: GuestAddress,
        status: u8,
    },
    Request(Request),
}

/// What request parsing and execution need from the device and the driver.
struct QueueIo {
    disk: Arc<DiskImage>,
    /// This queue's own handle on the disk.
    file: File,
    serial: [u8; ID_LEN],
    acked_features: u64,
}

impl QueueIo {
    /// Checks a read or write of `len` bytes at `sector`.
    fn data_range_ok(&self, sector: u64, len: u64) -> bool {
        len.is_multiple_of(SECTOR_SIZE)
            && len <= MAX_REQUEST_BYTES
            && sector
                .checked_add(len >> SECTOR_SHIFT)
                .is_some_and(|end| end <= self.disk.capacity)
    }

    fn parse(
        &self,
        mem: &GuestMemoryMmap,
        head: u16,
        descriptors: impl Iterator<Item = Descriptor>,
    ) -> Parsed {
        let started = Instant::now();
        let parts = match split_chain(mem, descriptors) {
            Ok(parts) => parts,
            Err(BadChain::NoStatus) => return Parsed::Drop,
            Err(BadChain::Invalid(status_addr)) => {
                return Parsed::Done {
                    status_addr,
                    status: STATUS_IOERR,
                }
            }
        };
        let status_addr = parts.status;
        let done = |status| Parsed::Done {
            status_addr,
            status,
        };
        let mut header = [0u8; HEADER_LEN as usize];
        if !read_stream(mem, &parts.readable, &mut header) {
            return done(STATUS_IOERR);
        }
        let request_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);
        let payload = skip_bytes(&parts.readable, HEADER_LEN);
        let payload_len = total_len(&payload);
        let writable_len = total_len(&parts.writable);

        let op = match request_type {
            VIRTIO_BLK_T_IN => {
                if payload_len != 0 || !self.data_range_ok(sector, writable_len) {
                    return done(STATUS_IOERR);
                }
                Op::Read {
                    offset: sector << SECTOR_SHIFT,
                    len: writable_len,
                    data: parts.writable,
                }
            }
            VIRTIO_BLK_T_OUT => {
                if self.disk.readonly
                    || writable_len != 0
                    || !self.data_range_ok(sector, payload_len)
                {
                    return done(STATUS_IOERR);
                }
                Op::Write {
                    offset: sector << SECTOR_SHIFT,
                    len: payload_len,
                    data: payload,
                }
            }
            VIRTIO_BLK_T_FLUSH => Op::Flush,
            VIRTIO_BLK_T_GET_ID => {
                if writable_len == 0 {
                    return done(STATUS_IOERR);
                }
                Op::GetId {
                    data: parts.writable,
                }
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                let discard = request_type == VIRTIO_BLK_T_DISCARD;
                let feature = if discard { F_DISCARD } else { F_WRITE_ZEROES };
                if self.acked_features & feature == 0 {
                    return done(STATUS_UNSUPP);
                }
                match self.parse_ranges(mem, &payload, discard) {
                    Ok(ranges) if discard => Op::Discard { ranges },
                    Ok(ranges) => Op::WriteZeroes { ranges },
                    Err(status) => return done(status),
                }
            }
            _ => return done(STATUS_UNSUPP),
        };
        Parsed::Request(Request {
            head,
            status: status_addr,
            op,
            started,
        })
    }

    /// Reads and checks the ranges of a discard or write-zeroes request.
    fn parse_ranges(
        &self,
        mem: &GuestMemoryMmap,
        payload: &[Segment],
        discard: bool,
    ) -> Result<Vec<ByteRange>, u8> {
        let len = total_len(payload);
        if self.disk.readonly
            || len == 0
            || !len.is_multiple_of(RANGE_LEN)
            || len / RANGE_LEN > u64::from(MAX_DISCARD_SEGMENTS)
        {
            return Err(STATUS_IOERR);
        }
        // At most MAX_DISCARD_SEGMENTS * 16 bytes.
        let mut raw = vec![0u8; len as usize];
        if !read_stream(mem, payload, &mut raw) {
            return Err(STATUS_IOERR);
        }
        let mut ranges = Vec::with_capacity(raw.len() / RANGE_LEN as usize);
        for entry in raw.chunks_exact(RANGE_LEN as usize) {
            let mut sector = [0u8; 8];
            sector.copy_from_slice(&entry[0..8]);
            let sector = u64::from_le_bytes(sector);
            let sectors = u32::from_le_bytes([entry[8], entry[9], entry[10], entry[11]]);
            let flags = u32::from_le_bytes([entry[12], entry[13], entry[14], entry[15]]);
            // Discard takes no flags; write-zeroes only "unmap" (§5.2.6.2).
            let known_flags = if discard {
                0
            } else {
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            };
            if flags & !known_flags != 0 {
                return Err(STATUS_UNSUPP);
            }
            let in_range = sector
                .checked_add(u64::from(sectors))
                .is_some_and(|end| end <= self.disk.capacity);
            if sectors > MAX_DISCARD_SECTORS || !in_range {
                return Err(STATUS_IOERR);
            }
            ranges.push(ByteRange {
                offset: sector << SECTOR_SHIFT,
                len: u64::from(sectors) << SECTOR_SHIFT,
                unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
            });
        }
        Ok(ranges)
    }

    /// O_DIRECT needs every buffer, offset and length block-aligned.
    fn needs_bounce(&self, offset: u64, iovecs: &IoVecs) -> bool {
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
    fn uring_iovecs(&self, mem: &GuestMemoryMmap, request: &Request) -> Option<IoVecs> {
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

    fn read_write(
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
    fn execute(&self, mem: &GuestMemoryMmap, request: &Request) -> (u8, u32) {
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
    fn complete_uring(
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

/// Bytes written into guest memory by a read, write or flush: data + status.
fn used_len(op: &Op, status: u8) -> u32 {
    match op {
        // At most MAX_REQUEST_BYTES.
        Op::Read { len, .. } if status == STATUS_OK => *len as u32 + 1,
        _ => 1,
    }
}

struct InFlight {
    request: Request,
    iovecs: IoVecs,
    /// Requests merged behind `request` (contiguous reads sent as one
    /// readv); they share its result.
    followers: Vec<Request>,
}

/// An io_uring with the requests it is running.
struct Uring {
    ring: IoUring,
    /// Signalled by the kernel on each completion.
    eventfd: EventFd,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    /// Keeps the guest memory mapped while the kernel may still use it.
    memory: GuestMemoryMmap,
}

impl Uring {
    fn new(entries: u32, memory: GuestMemoryMmap) -> io::Result<Uring> {
        let ring = IoUring::new(entries)?;
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
        let eventfd = EventFd::new(libc::EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        let capacity = ring.params().sq_entries() as usize;
        Ok(Uring {
            ring,
            eventfd,
            slots: (0..capacity).map(|_| None).collect(),
            free: (0..capacity).rev().collect(),
            memory,
        })
    }

    fn is_full(&self) -> bool {
        self.free.is_empty()
    }

    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Queues a read, write or flush; hands it back if that is not possible.
    #[allow(clippy::result_large_err)]
    fn push(
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
    fn push_merged_reads(
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
    fn submit(&mut self) {
        if !self.ring.submission().is_empty() {
            let _ = self.ring.submit();
        }
    }

    fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    fn reap(&mut self) -> Vec<(InFlight, i32)> {
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
    fn drain(&mut self) {
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

/// Why popping stopped.
#[derive(Debug, PartialEq, Eq)]
enum Stop {
    Empty,
    Throttled,
    RingFull,
}

/// One queue's worker state.
struct QueueHandler {
    // First, so it is dropped (and waits for the kernel) before the rest.
    uring: Option<Uring>,
    index: u16,
    queue: Queue,
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn Interrupt>,
    io: QueueIo,
    counters: Arc<BlockCounters>,
    limiters: Vec<Arc<SharedRateLimiter>>,
    /// Armed while a rate limiter holds the queue.
    throttle_timer: Option<TimerFd>,
    throttled: bool,
    /// Waiting for io_uring slots to free up.
    stalled: bool,
    /// The driver broke the ring (e.g. an impossible avail index): ignored
    /// until the device is reset.
    broken: bool,
    needs_signal: bool,
    /// The worker is polling the ring: leave notifications off.
    polling: bool,
    /// Buffered writes popped in this batch, not started yet.
    buffered_writes: Vec<Request>,
    /// Buffered reads popped in this batch, not started yet.
    buffered_reads: Vec<Request>,
}

impl QueueHandler {
    /// Pops and starts requests until the ring is empty, a rate limiter
    /// refuses one, or io_uring is full; then signals the guest if needed.
    fn process_queue(&mut self) {
        if self.throttled || self.stalled || self.broken {
            return;
        }
        let mut fruitless_rounds = 0;
        loop {
            if self.queue.disable_notification(&self.mem).is_err() {
                self.broken = true;
                break;
            }
            let (popped, stop) = self.pop_requests();
            self.run_deferred();
            if let Some(uring) = &mut self.uring {
                uring.submit();
            }
            if stop != Stop::Empty || self.polling {
                // While the worker polls, notifications stay off.
                break;
            }
            // Re-enabling and re-checking closes the race with a driver that
            // added buffers while notifications were off.
            match self.queue.enable_notification(&self.mem) {
                Ok(false) => break,
                Ok(true) if popped == 0 => {
                    // New buffers reported, yet none can be popped.
                    fruitless_rounds += 1;
                    if fruitless_rounds > 1 {
                        self.broken = true;
                        break;
                    }
                }
                Ok(true) => fruitless_rounds = 0,
                Err(_) => {
                    self.broken = true;
                    break;
                }
            }
        }
        self.signal_if_needed();
    }

    fn pop_requests(&mut self) -> (usize, Stop) {
        let mut popped = 0;
        loop {
            if self.uring.as_ref().is_some_and(Uring::is_full) {
                self.stalled = true;
                return (popped, Stop::RingFull);
            }
            let Some(chain) = self.queue.pop_descriptor_chain(&self.mem) else {
                return (popped, Stop::Empty);
            };
            popped += 1;
            let head = chain.head_index();
            match self.io.parse(&self.mem, head, chain) {
                Parsed::Drop => self.add_used(head, 0),
                Parsed::Done {
                    status_addr,
                    status,
                } => {
                    // In guest memory: split_chain checked it.
                    let _ = self.mem.write_obj(status, status_addr);
                    self.add_used(head, 1);
                }
                Parsed::Request(request) => {
                    if let Err(wait) = self.admit(&request) {
                        if self.throttle(wait) {
                            // Left in the ring for when the timer fires.
                            self.queue.go_to_previous_position();
                            return (popped, Stop::Throttled);
                        }
                    }
                    self.start(request);
                }
            }
        }
    }

    /// Takes the request's tokens from every limiter, or from none.
    fn admit(&self, request: &Request) -> Result<(), Duration> {
        let bytes = request.op.data_len();
        for (index, limiter) in self.limiters.iter().enumerate() {
            if let Err(wait) = limiter.try_consume(1, bytes) {
                for earlier in &self.limiters[..index] {
                    earlier.give_back(1, bytes);
                }
                return Err(wait);
            }
        }
        Ok(())
    }

    /// Holds the queue for `wait`; false (run the request anyway) if the
    /// timer cannot be armed, rather than stalling the queue for good.
    fn throttle(&mut self, wait: Duration) -> bool {
        let Some(timer) = &mut self.throttle_timer else {
            return false;
        };
        self.throttled = timer.reset(wait, None).is_ok();
        self.throttled
    }

    fn start(&mut self, request: Request) {
        // Buffered writes (either engine) and buffered reads (io_uring) wait
        // for the end of the batch, to be merged: see `run_deferred`.
        if !self.io.disk.direct {
            match request.op {
                Op::Write { .. } => return self.buffered_writes.push(request),
                Op::Read { .. } if self.uring.is_some() => {
                    return self.buffered_reads.push(request)
                }
                _ => {}
            }
        }
        self.run(request);
    }

    /// Starts `request` on io_uring, or runs it here if that is not possible.
    fn run(&mut self, request: Request) {
        let mut request = request;
        if let Some(uring) = &mut self.uring {
            if let Some(iovecs) = self.io.uring_iovecs(&self.mem, &request) {
                match uring.push(self.io.file.as_raw_fd(), request, iovecs) {
                    Ok(()) => return,
                    Err((returned, _)) => request = returned,
                }
            }
        }
        self.run_here(request);
    }

    fn run_here(&mut self, request: Request) {
        let (status, used) = self.io.execute(&self.mem, &request);
        self.finish(request, status, used);
    }

    /// The batch's deferred buffered reads and writes, in runs that continue
    /// one another on the disk (merged as QEMU merges them): fewer, larger
    /// page-cache copies, which pay on images with large folios.
    ///
    /// A run of reads is one io_uring readv (page-cache hits complete inline).
    /// A run of writes is copied here with one pwritev: io_uring would hand a
    /// buffered write to a kernel worker thread, and that hand-off (a wake-up
    /// each way, ~40 µs on the development machine) cost more than copying
    /// while this thread serves the queue gained. 128 KiB writes at depth 32
    /// went from 0.98 × to about 1.06 × QEMU; see benches/RESULTS.md.
    fn run_deferred(&mut self) {
        for run in contiguous_runs(std::mem::take(&mut self.buffered_reads)) {
            self.read_run(run);
        }
        for run in contiguous_runs(std::mem::take(&mut self.buffered_writes)) {
            self.write_run(run);
        }
    }

    /// Contiguous reads: one readv on io_uring, else one by one.
    fn read_run(&mut self, run: Vec<Request>) {
        if run.len() > 1 {
            let iovecs = self.run_iovecs(&run).filter(|v| v.0.len() <= UIO_MAXIOV);
            if let (Some(iovecs), Some(uring)) = (iovecs, &mut self.uring) {
                let fd = self.io.file.as_raw_fd();
                match uring.push_merged_reads(fd, run, iovecs) {
                    Ok(()) => return,
                    Err(returned) => return returned.into_iter().for_each(|r| self.run(r)),
                }
            }
        }
        run.into_iter().for_each(|r| self.run(r));
    }

    /// Contiguous writes: one pwritev here, all sharing its status.
    fn write_run(&mut self, run: Vec<Request>) {
        let offset = match run.first().map(|r| &r.op) {
            Some(Op::Write { offset, .. }) if run.len() > 1 => *offset,
            _ => return run.into_iter().for_each(|r| self.run_here(r)),
        };
        let Some(mut iovecs) = self.run_iovecs(&run) else {
            return run.into_iter().for_each(|r| self.run_here(r));
        };
        let status = match rw_vectored(&self.io.file, true, &mut iovecs.0, offset) {
            Ok(()) => STATUS_OK,
            Err(_) => STATUS_IOERR,
        };
        for request in run {
            let used = used_len(&request.op, status);
            self.finish(request, status, used);
        }
    }

    /// Host iovecs for a run of merged requests; None if one request's
    /// buffers cannot be used directly (then each runs alone).
    fn run_iovecs(&self, run: &[Request]) -> Option<IoVecs> {
        let mut iovecs = Vec::new();
        for request in run {
            let (Op::Read { offset, data, .. } | Op::Write { offset, data, .. }) = &request.op
            else {
                return None;
            };
            let more = guest_iovecs(&self.mem, data)?;
            if self.io.needs_bounce(*offset, &more) {
                return None;
            }
            iovecs.extend(more.0);
        }
        Some(IoVecs(iovecs))
    }

    fn finish(&mut self, request: Request, status: u8, used: u32) {
        // In guest memory: split_chain checked it.
        let _ = self.mem.write_obj(status, request.status);
        if status == STATUS_OK {
            match request.op {
                Op::Read { len, .. } => self.counters.record(false, len, request.started.elapsed()),
                Op::Write { len, .. } => self.counters.record(true, len, request.started.elapsed()),
                _ => {}
            }
        }
        self.add_used(request.head, used);
    }

    fn add_used(&mut self, head: u16, len: u32) {
        // Fails only for a head index beyond the queue: nothing to return.
        if self.queue.add_used(&self.mem, head, len).is_ok() {
            self.needs_signal = true;
        }
    }

    fn signal_if_needed(&mut self) {
        if !std::mem::take(&mut self.needs_signal) {
            return;
        }
        if self.queue.needs_notification(&self.mem).unwrap_or(true) {
            let _ = self.interrupt.signal_queue(self.index);
        }
    }

    fn uring_ready(&mut self) {
        let Some(uring) = &mut self.uring else {
            return;
        };
        // Drained before reaping, so a completion racing with us re-signals.
        let _ = uring.eventfd.read();
        self.reap_completions();
    }

    /// Finishes the requests io_uring has completed.
    fn reap_completions(&mut self) {
        let Some(uring) = &mut self.uring else {
            return;
        };
        let completed = uring.reap();
        uring.submit();
        for (mut in_flight, result) in completed {
            let status = self.io.complete_uring(
                &in_flight.request,
                &in_flight.followers,
                &mut in_flight.iovecs,
                result,
            );
            for request in std::iter::once(in_flight.request).chain(in_flight.followers) {
                let used = used_len(&request.op, status);
                self.finish(request, status, used);
            }
        }
        self.signal_if_needed();
        if self.stalled {
            self.stalled = false;
            self.process_queue();
        }
    }

    fn timer_ready(&mut self) {
        if let Some(timer) = &mut self.throttle_timer {
            // Non-blocking: a stale wake-up reads EAGAIN and just re-checks.
            let _ = timer.wait();
        }
        self.throttled = false;
        self.process_queue();
    }

    /// Runs the queue and waits for its io_uring requests (tests only).
    #[cfg(test)]
    fn run_until_idle(&mut self) {
        self.process_queue();
        while let Some(uring) = &self.uring {
            if uring.in_flight() == 0 {
                break;
            }
            let _ = uring.ring.submit_and_wait(1);
            self.uring_ready();
        }
    }
}

impl WorkerHandler for QueueHandler {
    fn queue_notified(&mut self, _index: usize) {
        self.process_queue();
    }

    fn extra_fds(&self) -> Vec<RawFd> {
        let mut fds = Vec::new();
        if let Some(timer) = &self.throttle_timer {
            fds.push(timer.as_raw_fd());
        }
        if let Some(uring) = &self.uring {
            fds.push(uring.eventfd.as_raw_fd());
        }
        fds
    }

    fn extra_ready(&mut self, index: usize) {
        if index < usize::from(self.throttle_timer.is_some()) {
            self.timer_ready();
        } else {
            self.uring_ready();
        }
    }

    fn started(&mut self) {
        self.process_queue();
    }

    fn polls(&self) -> bool {
        true
    }

    fn poll_start(&mut self) {
        self.polling = true;
    }

    fn poll_stop(&mut self) -> bool {
        self.polling = false;
        if self.throttled || self.stalled || self.broken {
            return false;
        }
        match self.queue.enable_notification(&self.mem) {
            Ok(true) => {
                self.process_queue();
                true
            }
            Ok(false) => false,
            Err(_) => {
                self.broken = true;
                false
            }
        }
    }

    fn poll(&mut self) -> bool {
        let mut worked = false;
        if self.uring.as_mut().is_some_and(Uring::has_completions) {
            // The eventfd stays signalled; the worker drains it later.
            self.reap_completions();
            worked = true;
        }
        if !self.throttled && !self.stalled && !self.broken {
            let pending = self
                .queue
                .avail_idx(&self.mem, std::sync::atomic::Ordering::Acquire)
                .is_ok_and(|idx| idx.0 != self.queue.next_avail());
            if pending {
                self.process_queue();
                worked = true;
            }
        }
        worked
    }
}

fn nonblocking_timer() -> io::Result<TimerFd> {
    let timer = TimerFd::new()?;
    let fd = timer.as_raw_fd();
    // SAFETY: F_GETFL / F_SETFL on a descriptor we own.
    let ok = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) >= 0
    };
    if ok {
        Ok(timer)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A virtio-blk device backed by a raw image file or a host block device.
pub struct Block {
    id: String,
    disk: Arc<DiskImage>,
    serial: [u8; ID_LEN],
    queue_size: u16,
    num_queues: u16,
    features: u64,
    config_space: [u8; CONFIG_SPACE_LEN],
    limiters: Vec<Arc<SharedRateLimiter>>,
    counters: Arc<BlockCounters>,
    use_io_uring: bool,
    io_uring_active: bool,
    workers: Vec<Worker>,
}

impl Block {
    /// Opens `config.path` and prepares the device. `group` is the shared
    /// limiter of the disk's `rate_limit_group`, if it has one; a
    /// `rate_limiter_config` of its own is built here.
    pub fn new(config: &DiskConfig, group: Option<Arc<SharedRateLimiter>>) -> crate::Result<Block> {
        let name = config.path.as_deref().unwrap_or("<no path>");
        let invalid = |what: String| Error::new(ErrorKind::Device, format!("disk {name}: {what}"));
        if config.num_queues == 0 || config.num_queues > MAX_QUEUES {
            return Err(invalid(format!(
                "num_queues={} is not between 1 and {MAX_QUEUES}",
                config.num_queues
            )));
        }
        if config.queue_size < 2 || !config.queue_size.is_power_of_two() {
            return Err(invalid(format!(
                "queue_size={} is not a power of two of at least 2",
                config.queue_size
            )));
        }
        let disk = DiskImage::open(config)?;

        let mut limiters = Vec::new();
        if let Some(own) = &config.rate_limiter_config {
            let own = SharedRateLimiter::new(own);
            if !own.is_unlimited() {
                limiters.push(Arc::new(own));
            }
        }
        limiters.extend(group);

        let mut serial = [0u8; ID_LEN];
        if let Some(text) = &config.serial {
            let len = text.len().min(ID_LEN);
            serial[..len].copy_from_slice(&text.as_bytes()[..len]);
        }

        let num_queues = config.num_queues as u16;
        let mut features = F_VERSION_1
            | F_RING_INDIRECT_DESC
            | F_RING_EVENT_IDX
            | F_SEG_MAX
            | F_BLK_SIZE
            | F_FLUSH
            | F_TOPOLOGY;
        if num_queues > 1 {
            features |= F_MQ;
        }
        if disk.readonly {
            features |= F_RO;
        }
        if disk.discard {
            features |= F_DISCARD;
        }
        if disk.write_zeroes {
            features |= F_WRITE_ZEROES;
        }
        let seg_max = (config.queue_size - 2).clamp(1, MAX_SEGMENTS);
        let config_space = config_space(&disk, seg_max, num_queues);
        let id: String = config
            .id
            .as_deref()
            .unwrap_or("blk")
            .chars()
            .filter(|&c| c != '\0')
            .collect();

        Ok(Block {
            id,
            disk: Arc::new(disk),
            serial,
            queue_size: config.queue_size,
            num_queues,
            features,
            config_space,
            limiters,
            counters: Arc::new(BlockCounters::default()),
            use_io_uring: !config.disable_io_uring,
            io_uring_active: false,
            workers: Vec::new(),
        })
    }

    /// The counters, shared with the workers.
    pub fn counters_handle(&self) -> Arc<BlockCounters> {
        Arc::clone(&self.counters)
    }

    /// Disk size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.capacity
    }

    /// The logical block size reported to the guest (blk_size).
    pub fn block_size(&self) -> u32 {
        self.disk.block_size
    }

    /// Whether every queue of the current activation runs on io_uring.
    pub fn io_uring_active(&self) -> bool {
        self.io_uring_active
    }

    fn queue_handler(
        &self,
        memory: &GuestMemoryMmap,
        interrupt: &Arc<dyn Interrupt>,
        acked_features: u64,
        index: u16,
        queue: Queue,
    ) -> io::Result<QueueHandler> {
        let io = QueueIo {
            disk: Arc::clone(&self.disk),
            file: self.disk.file.try_clone()?,
            serial: self.serial,
            acked_features,
        };
        // No io_uring is not an error: the synchronous path takes over.
        let uring = if self.use_io_uring {
            let entries = u32::from(queue.size()).clamp(8, MAX_RING_ENTRIES);
            Uring::new(entries, memory.clone()).ok()
        } else {
            None
        };
        let throttle_timer = if self.limiters.is_empty() {
            None
        } else {
            Some(nonblocking_timer()?)
        };
        Ok(QueueHandler {
            uring,
            index,
            queue,
            mem: memory.clone(),
            interrupt: Arc::clone(interrupt),
            io,
            counters: Arc::clone(&self.counters),
            limiters: self.limiters.clone(),
            throttle_timer,
            throttled: false,
            stalled: false,
            broken: false,
            needs_signal: false,
            buffered_writes: Vec::new(),
            buffered_reads: Vec::new(),
            polling: false,
        })
    }
}

/// `struct virtio_blk_config` (virtio 1.2 §5.2.4), little-endian.
fn config_space(disk: &DiskImage, seg_max: u16, num_queues: u16) -> [u8; CONFIG_SPACE_LEN] {
    let mut c = [0u8; CONFIG_SPACE_LEN];
    let mut put =
        |offset: usize, bytes: &[u8]| c[offset..offset + bytes.len()].copy_from_slice(bytes);
    put(0, &disk.capacity.to_le_bytes());
    // size_max (8) stays 0: VIRTIO_BLK_F_SIZE_MAX is not offered.
    put(12, &u32::from(seg_max).to_le_bytes());
    // geometry (16..20) stays 0: VIRTIO_BLK_F_GEOMETRY is not offered.
    put(20, &disk.block_size.to_le_bytes());
    put(24, &[disk.physical_block_exp, 0]);
    // min_io_size, in logical blocks; opt_io_size (28) unknown.
    put(26, &1u16.to_le_bytes());
    // writeback (32) is only meaningful with VIRTIO_BLK_F_CONFIG_WCE.
    put(34, &num_queues.to_le_bytes());
    let block_sectors = disk.block_size >> SECTOR_SHIFT;
    if disk.discard {
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(40, &MAX_DISCARD_SEGMENTS.to_le_bytes());
        put(44, &block_sectors.to_le_bytes());
    }
    if disk.write_zeroes {
        put(48, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(52, &MAX_DISCARD_SEGMENTS.to_le_bytes());
        // Only regular files punch holes for write-zeroes with "unmap".
        put(56, &[u8::from(disk.discard && !disk.block_device)]);
    }
    c
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.queue_size; usize::from(self.num_queues)]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset
                .checked_add(i as u64)
                .and_then(|at| usize::try_from(at).ok())
                .and_then(|at| self.config_space.get(at).copied())
                .unwrap_or(0);
        }
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.reset();
        if activation.queues.is_empty() {
            return Err(ActivateError(format!(
                "virtio-blk {}: no queue enabled",
                self.id
            )));
        }
        let mut workers = Vec::with_capacity(activation.queues.len());
        let mut all_uring = true;
        for active in activation.queues {
            let failed = |e: io::Error| {
                ActivateError(format!(
                    "virtio-blk {} queue {}: {e}",
                    self.id, active.index
                ))
            };
            let handler = self
                .queue_handler(
                    &activation.memory,
                    &activation.interrupt,
                    activation.acked_features,
                    active.index,
                    active.queue,
                )
                .map_err(failed)?;
            all_uring &= handler.uring.is_some();
            let name = format!("{}-q{}", self.id, active.index);
            // On failure `workers` is dropped, which stops those started.
            workers.push(worker::spawn(name, vec![active.kick], handler).map_err(failed)?);
        }
        self.workers = workers;
        self.io_uring_active = all_uring;
        Ok(())
    }

    fn reset(&mut self) {
        // Dropping a worker stops and joins its thread; its handler is
        // dropped there first, which waits for its io_uring operations.
        self.workers.clear();
        self.io_uring_active = false;
    }

    fn counters(&self) -> BTreeMap<&'static str, u64> {
        self.counters.snapshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::ActiveQueue;
    use std::path::PathBuf;
    use std::sync::atomic::AtomicUsize;
    use std::sync::{Condvar, Mutex};
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use vmkit_config::{RateLimiterConfig, TokenBucketConfig};

    const MEM_SIZE: u64 = 0x10_0000;
    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;
    const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;
    const SERIAL: &str = "vmkit-serial-0123456";
    const IMAGE_LEN: u64 = 64 * 1024;
    const UNTOUCHED: u8 = 0xff;

    fn guest_memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
    }

    /// Byte `offset` of a fresh test image.
    fn pattern(offset: u64) -> u8 {
        (offset % 251) as u8 ^ (offset >> 9) as u8
    }

    fn patterned(offset: u64, len: u64) -> Vec<u8> {
        (offset..offset + len).map(pattern).collect()
    }

    struct TempImage {
        path: PathBuf,
    }

    impl TempImage {
        fn new(len: u64) -> TempImage {
            static NEXT_ID: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "vmkit-block-test-{}-{}.img",
                std::process::id(),
                NEXT_ID.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::write(&path, patterned(0, len)).unwrap();
            TempImage { path }
        }

        fn path(&self) -> String {
            self.path.to_str().unwrap().to_owned()
        }

        fn contents(&self) -> Vec<u8> {
            std::fs::read(&self.path).unwrap()
        }
    }

    impl Drop for TempImage {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    fn disk_config(image: &TempImage) -> DiskConfig {
        DiskConfig {
            path: Some(image.path()),
            serial: Some(SERIAL.into()),
            ..DiskConfig::default()
        }
    }

    #[derive(Default)]
    struct FakeInterrupt {
        signals: Mutex<Vec<u16>>,
        signalled: Condvar,
    }

    impl Interrupt for FakeInterrupt {
        fn signal_queue(&self, queue: u16) -> io::Result<()> {
            self.signals.lock().unwrap().push(queue);
            self.signalled.notify_all();
            Ok(())
        }

        fn signal_config(&self) -> io::Result<()> {
            Ok(())
        }
    }

    impl FakeInterrupt {
        fn count(&self, queue: u16) -> usize {
            self.signals
                .lock()
                .unwrap()
                .iter()
                .filter(|&&q| q == queue)
                .count()
        }
    }

    fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    enum Data {
        None,
        In(u64),
        Out(Vec<u8>),
    }

    struct Submitted {
        head: u16,
        status: u64,
        data: u64,
    }

    /// The driver's side of a split queue: rings from `base`, buffers after.
    struct Driver {
        mem: GuestMemoryMmap,
        size: u16,
        desc_table: u64,
        avail: u64,
        used: u64,
        next_desc: u16,
        avail_idx: u16,
        heap: u64,
        heap_end: u64,
    }

    impl Driver {
        fn new(mem: &GuestMemoryMmap, size: u16, base: u64) -> Driver {
            assert!(size <= 1024);
            Driver {
                mem: mem.clone(),
                size,
                desc_table: base,
                avail: base + 0x8000,
                used: base + 0xa000,
                next_desc: 0,
                avail_idx: 0,
                heap: base + 0x1_0000,
                heap_end: base + 0x7_0000,
            }
        }

        fn queue(&self, event_idx: bool) -> Queue {
            let mut queue = Queue::new(self.size).unwrap();
            queue.set_size(self.size);
            queue
                .try_set_desc_table_address(GuestAddress(self.desc_table))
                .unwrap();
            queue
                .try_set_avail_ring_address(GuestAddress(self.avail))
                .unwrap();
            queue
                .try_set_used_ring_address(GuestAddress(self.used))
                .unwrap();
            queue.set_event_idx(event_idx);
            queue.set_ready(true);
            assert!(queue.is_valid(&self.mem));
            queue
        }

        fn alloc(&mut self, len: u64, align: u64) -> u64 {
            let at = self.heap.next_multiple_of(align);
            self.heap = at + len;
            assert!(self.heap <= self.heap_end, "test heap exhausted");
            at
        }

        fn write(&self, addr: u64, data: &[u8]) {
            self.mem.write_slice(data, GuestAddress(addr)).unwrap();
        }

        fn read(&self, addr: u64, len: u64) -> Vec<u8> {
            let mut data = vec![0u8; len as usize];
            self.mem.read_slice(&mut data, GuestAddress(addr)).unwrap();
            data
        }

        fn byte(&self, addr: u64) -> u8 {
            self.mem.read_obj(GuestAddress(addr)).unwrap()
        }

        /// The same driver writing descriptors into the table at `table`.
        fn with_table(&self, table: u64) -> Driver {
            Driver {
                mem: self.mem.clone(),
                desc_table: table,
                ..*self
            }
        }

        fn set_desc(&self, table: u64, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let descriptor = Descriptor::new(addr, len, flags, next);
            self.mem
                .write_obj(descriptor, GuestAddress(table + 16 * u64::from(index)))
                .unwrap();
        }

        fn publish(&mut self, head: u16) {
            let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
            self.mem.write_obj(head, GuestAddress(slot)).unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            self.mem
                .write_obj(self.avail_idx, GuestAddress(self.avail + 2))
                .unwrap();
        }

        /// Writes (addr, len, flags) as consecutive linked descriptors and
        /// makes the chain available.
        fn add_chain(&mut self, parts: &[(u64, u32, u16)]) -> u16 {
            let head = self.next_desc;
            for (i, &(addr, len, flags)) in parts.iter().enumerate() {
                let index = (head + i as u16) % self.size;
                let flags = if i + 1 == parts.len() {
                    flags
                } else {
                    flags | NEXT
                };
                self.set_desc(
                    self.desc_table,
                    index,
                    addr,
                    len,
                    flags,
                    (index + 1) % self.size,
                );
            }
            self.next_desc = (head + parts.len() as u16) % self.size;
            self.publish(head);
            head
        }

        /// Puts the chain in an indirect table behind one descriptor.
        fn add_indirect(&mut self, parts: &[(u64, u32, u16)]) -> u16 {
            let table = self.alloc(16 * parts.len() as u64, 16);
            for (i, &(addr, len, flags)) in parts.iter().enumerate() {
                let flags = if i + 1 == parts.len() {
                    flags
                } else {
                    flags | NEXT
                };
                self.set_desc(table, i as u16, addr, len, flags, i as u16 + 1);
            }
            self.add_chain(&[(table, 16 * parts.len() as u32, INDIRECT)])
        }

        fn used_idx(&self) -> u16 {
            self.mem.read_obj(GuestAddress(self.used + 2)).unwrap()
        }

        /// (head, length) of used entry `i`.
        fn used_entry(&self, i: u16) -> (u32, u32) {
            let at = self.used + 4 + 8 * u64::from(i % self.size);
            (
                self.mem.read_obj(GuestAddress(at)).unwrap(),
                self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
            )
        }

        fn last_used(&self) -> (u32, u32) {
            self.used_entry(self.used_idx().wrapping_sub(1))
        }

        fn set_used_event(&self, value: u16) {
            let at = self.avail + 4 + 2 * u64::from(self.size);
            self.mem.write_obj(value, GuestAddress(at)).unwrap();
        }

        fn avail_event(&self) -> u16 {
            let at = self.used + 4 + 8 * u64::from(self.size);
            self.mem.read_obj(GuestAddress(at)).unwrap()
        }

        fn header(&mut self, request_type: u32, sector: u64) -> u64 {
            let at = self.alloc(HEADER_LEN, 16);
            let mut header = [0u8; HEADER_LEN as usize];
            header[..4].copy_from_slice(&request_type.to_le_bytes());
            header[8..].copy_from_slice(&sector.to_le_bytes());
            self.write(at, &header);
            at
        }

        fn status(&mut self) -> u64 {
            let at = self.alloc(1, 1);
            self.write(at, &[UNTOUCHED]);
            at
        }

        /// A well-formed request: header, data (if any), status.
        fn request(&mut self, request_type: u32, sector: u64, data: Data) -> Submitted {
            let header = self.header(request_type, sector);
            let status = self.status();
            let mut parts = vec![(header, HEADER_LEN as u32, 0)];
            let data = match data {
                Data::None => 0,
                Data::In(len) => {
                    let at = self.alloc(len, 512);
                    self.write(at, &vec![UNTOUCHED; len as usize]);
                    parts.push((at, len as u32, WRITE));
                    at
                }
                Data::Out(bytes) => {
                    let at = self.alloc(bytes.len() as u64, 512);
                    self.write(at, &bytes);
                    parts.push((at, bytes.len() as u32, 0));
                    at
                }
            };
            parts.push((status, 1, WRITE));
            let head = self.add_chain(&parts);
            Submitted { head, status, data }
        }

        fn status_of(&self, request: &Submitted) -> u8 {
            self.byte(request.status)
        }
    }

    fn ranges(entries: &[(u64, u32, u32)]) -> Vec<u8> {
        let mut raw = Vec::new();
        for &(sector, sectors, flags) in entries {
            raw.extend_from_slice(&sector.to_le_bytes());
            raw.extend_from_slice(&sectors.to_le_bytes());
            raw.extend_from_slice(&flags.to_le_bytes());
        }
        raw
    }

    /// A device and one queue's handler, run by hand on the test thread.
    struct Harness {
        image: TempImage,
        block: Block,
        mem: GuestMemoryMmap,
        driver: Driver,
        interrupt: Arc<FakeInterrupt>,
        handler: QueueHandler,
    }

    impl Harness {
        fn new(image_len: u64, io_uring: bool, configure: impl FnOnce(&mut DiskConfig)) -> Harness {
            let image = TempImage::new(image_len);
            let mut config = disk_config(&image);
            config.disable_io_uring = !io_uring;
            configure(&mut config);
            let block = Block::new(&config, None).unwrap();
            let mem = guest_memory();
            let driver = Driver::new(&mem, 16, 0);
            let interrupt = Arc::new(FakeInterrupt::default());
            let handler = Self::handler_for(&block, &mem, &driver, &interrupt);
            Harness {
                image,
                block,
                mem,
                driver,
                interrupt,
                handler,
            }
        }

        fn handler_for(
            block: &Block,
            mem: &GuestMemoryMmap,
            driver: &Driver,
            interrupt: &Arc<FakeInterrupt>,
        ) -> QueueHandler {
            let interrupt: Arc<dyn Interrupt> = interrupt.clone();
            block
                .queue_handler(mem, &interrupt, block.features(), 0, driver.queue(false))
                .unwrap()
        }

        fn run(&mut self) {
            self.handler.run_until_idle();
        }

        /// Submits, runs, and returns the request.
        fn request(&mut self, request_type: u32, sector: u64, data: Data) -> Submitted {
            let request = self.driver.request(request_type, sector, data);
            self.run();
            request
        }

        fn assert_done(&self, request: &Submitted, status: u8, used_len: u32) {
            assert_eq!(self.driver.status_of(request), status, "status");
            assert_eq!(
                self.driver.last_used(),
                (u32::from(request.head), used_len),
                "used entry"
            );
        }

        /// `request` finished with `status` (in whatever order it was used).
        fn assert_done_any(&self, request: &Submitted, status: u8) {
            assert_eq!(self.driver.status_of(request), status, "status");
        }

        /// The chain was returned unused and nothing was written.
        fn assert_dropped(&self, head: u16) {
            assert_eq!(self.driver.last_used(), (u32::from(head), 0));
        }
    }

    fn harness(io_uring: bool) -> Harness {
        Harness::new(IMAGE_LEN, io_uring, |_| {})
    }

    #[test]
    fn io_uring_is_used_where_the_kernel_has_it() {
        let h = harness(true);
        match IoUring::new(8) {
            Ok(_) => assert!(h.handler.uring.is_some()),
            Err(e) => eprintln!("io_uring unavailable here ({e}): synchronous fallback only"),
        }
        assert!(harness(false).handler.uring.is_none());
    }

    #[test]
    fn read_write_flush_and_get_id_round_trip() {
        for io_uring in [false, true] {
            let mut h = harness(io_uring);
            let data: Vec<u8> = (0..1024u32).map(|i| (i * 7 % 256) as u8).collect();
            let write = h.request(VIRTIO_BLK_T_OUT, 3, Data::Out(data.clone()));
            h.assert_done(&write, STATUS_OK, 1);
            assert_eq!(&h.image.contents()[3 * 512..5 * 512], &data[..]);

            let read = h.request(VIRTIO_BLK_T_IN, 2, Data::In(1536));
            h.assert_done(&read, STATUS_OK, 1537);
            let mut expected = patterned(1024, 512);
            expected.extend_from_slice(&data);
            assert_eq!(h.driver.read(read.data, 1536), expected);

            let flush = h.request(VIRTIO_BLK_T_FLUSH, 0, Data::None);
            h.assert_done(&flush, STATUS_OK, 1);

            let id = h.request(VIRTIO_BLK_T_GET_ID, 0, Data::In(20));
            h.assert_done(&id, STATUS_OK, 21);
            assert_eq!(h.driver.read(id.data, 20), SERIAL.as_bytes());

            assert!(h.interrupt.count(0) >= 4, "one signal per run at least");
            assert_eq!(h.image.contents().len() as u64, IMAGE_LEN);
        }
    }

    #[test]
    fn contiguous_requests_in_one_batch_are_merged_and_all_complete() {
        for io_uring in [true, false] {
            merged_batch_round_trip(io_uring);
        }
    }

    fn merged_batch_round_trip(io_uring: bool) {
        let mut h = harness(io_uring);
        // Three contiguous writes and one elsewhere, all in one batch.
        let parts: Vec<Vec<u8>> = (0..4u8).map(|i| vec![0x10 + i; 1024]).collect();
        let sectors = [8u64, 10, 12, 40];
        let submitted: Vec<_> = parts
            .iter()
            .zip(sectors)
            .map(|(data, sector)| {
                h.driver
                    .request(VIRTIO_BLK_T_OUT, sector, Data::Out(data.clone()))
            })
            .collect();
        h.run();
        for request in &submitted {
            assert_eq!(h.driver.status_of(request), STATUS_OK);
        }
        let contents = h.image.contents();
        for (data, sector) in parts.iter().zip(sectors) {
            let at = sector as usize * 512;
            assert_eq!(&contents[at..at + 1024], &data[..], "sector {sector}");
        }
        let counters = h.block.counters();
        assert_eq!((counters["write_ops"], counters["write_bytes"]), (4, 4096));

        // The same for reads: each request gets its own bytes back.
        let reads: Vec<_> = sectors
            .iter()
            .map(|&sector| h.driver.request(VIRTIO_BLK_T_IN, sector, Data::In(1024)))
            .collect();
        h.run();
        for ((read, data), sector) in reads.iter().zip(&parts).zip(sectors) {
            h.assert_done_any(read, STATUS_OK);
            assert_eq!(&h.driver.read(read.data, 1024), data, "sector {sector}");
        }
        let counters = h.block.counters();
        assert_eq!((counters["read_ops"], counters["read_bytes"]), (4, 4096));
    }

    fn write_at(offset: u64, len: u64) -> Request {
        Request {
            head: 0,
            status: GuestAddress(0),
            op: Op::Write {
                offset,
                len,
                data: Vec::new(),
            },
            started: Instant::now(),
        }
    }

    #[test]
    fn runs_join_only_adjacent_requests_up_to_the_merge_limit() {
        let offsets = |runs: &[Vec<Request>]| -> Vec<Vec<u64>> {
            runs.iter()
                .map(|run| {
                    run.iter()
                        .map(|r| match r.op {
                            Op::Write { offset, .. } => offset,
                            _ => u64::MAX,
                        })
                        .collect()
                })
                .collect()
        };
        // Out of order, with a gap and an overlap: sorted, never merged across either.
        let requests = [
            (8192, 4096),
            (0, 4096),
            (4096, 4096),
            (20480, 4096),
            (22528, 4096),
        ];
        let runs = contiguous_runs(requests.iter().map(|&(o, l)| write_at(o, l)).collect());
        assert_eq!(
            offsets(&runs),
            [vec![0, 4096, 8192], vec![20480], vec![22528]]
        );

        // A long sequential stream is cut at MERGE_LIMIT bytes.
        let size = 1 << 20;
        let count = 2 * MERGE_LIMIT / size + 1;
        let runs = contiguous_runs((0..count).map(|i| write_at(i * size, size)).collect());
        let lengths: Vec<u64> = runs.iter().map(|run| run.len() as u64).collect();
        assert_eq!(lengths, [MERGE_LIMIT / size, MERGE_LIMIT / size, 1]);
        assert!(contiguous_runs(Vec::new()).is_empty());
    }

    #[test]
    fn a_zero_length_read_succeeds_without_io() {
        for io_uring in [false, true] {
            let mut h = harness(io_uring);
            let read = h.request(VIRTIO_BLK_T_IN, 5, Data::None);
            h.assert_done(&read, STATUS_OK, 1);
            let write = h.request(VIRTIO_BLK_T_OUT, IMAGE_LEN / 512, Data::None);
            h.assert_done(&write, STATUS_OK, 1);
        }
    }

    #[test]
    fn get_id_pads_and_truncates_the_serial() {
        let mut h = Harness::new(IMAGE_LEN, false, |c| c.serial = Some("short".into()));
        let id = h.request(VIRTIO_BLK_T_GET_ID, 0, Data::In(20));
        h.assert_done(&id, STATUS_OK, 21);
        assert_eq!(
            h.driver.read(id.data, 20),
            b"short\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0"
        );
        // A shorter buffer gets what fits.
        let id = h.request(VIRTIO_BLK_T_GET_ID, 0, Data::In(8));
        h.assert_done(&id, STATUS_OK, 9);

        let mut h = Harness::new(IMAGE_LEN, false, |c| {
            c.serial = Some("a-serial-number-longer-than-twenty".into())
        });
        let id = h.request(VIRTIO_BLK_T_GET_ID, 0, Data::In(32));
        h.assert_done(&id, STATUS_OK, 21);
        assert_eq!(h.driver.read(id.data, 21), b"a-serial-number-long\xff");
    }

    #[test]
    fn read_only_disks_refuse_writes() {
        let mut h = Harness::new(IMAGE_LEN, false, |c| c.readonly = true);
        let features = h.block.features();
        assert_ne!(features & F_RO, 0);
        assert_eq!(features & (F_DISCARD | F_WRITE_ZEROES), 0);

        let write = h.request(VIRTIO_BLK_T_OUT, 0, Data::Out(vec![0u8; 512]));
        h.assert_done(&write, STATUS_IOERR, 1);
        let discard = h.request(VIRTIO_BLK_T_DISCARD, 0, Data::Out(ranges(&[(0, 8, 0)])));
        h.assert_done(&discard, STATUS_UNSUPP, 1);
        let zeroes = h.request(
            VIRTIO_BLK_T_WRITE_ZEROES,
            0,
            Data::Out(ranges(&[(0, 8, 0)])),
        );
        h.assert_done(&zeroes, STATUS_UNSUPP, 1);
        assert_eq!(h.image.contents(), patterned(0, IMAGE_LEN));

        let read = h.request(VIRTIO_BLK_T_IN, 0, Data::In(512));
        h.assert_done(&read, STATUS_OK, 513);
        let flush = h.request(VIRTIO_BLK_T_FLUSH, 0, Data::None);
        h.assert_done(&flush, STATUS_OK, 1);
    }

    #[test]
    fn sector_ranges_are_checked_against_the_capacity() {
        for io_uring in [false, true] {
            let mut h = harness(io_uring);
            let capacity = IMAGE_LEN / 512;
            assert_eq!(h.block.capacity(), capacity);
            let cases = [
                (capacity, 512),
                (capacity - 1, 1024),
                (u64::MAX, 512),
                (u64::MAX >> 9, 512),
                (1 << 55, 512),
            ];
            for (sector, len) in cases {
                let read = h.request(VIRTIO_BLK_T_IN, sector, Data::In(len));
                h.assert_done(&read, STATUS_IOERR, 1);
                let write = h.request(VIRTIO_BLK_T_OUT, sector, Data::Out(vec![1; len as usize]));
                h.assert_done(&write, STATUS_IOERR, 1);
            }
            // Not a whole number of sectors.
            let read = h.request(VIRTIO_BLK_T_IN, 0, Data::In(100));
            h.assert_done(&read, STATUS_IOERR, 1);
            // The last sector is fine.
            let read = h.request(VIRTIO_BLK_T_IN, capacity - 1, Data::In(512));
            h.assert_done(&read, STATUS_OK, 513);
            assert_eq!(h.image.contents(), patterned(0, IMAGE_LEN));
        }
    }

    #[test]
    fn a_size_that_is_not_whole_sectors_rounds_down() {
        let mut h = Harness::new(1000, false, |_| {});
        assert_eq!(h.block.capacity(), 1);
        let read = h.request(VIRTIO_BLK_T_IN, 0, Data::In(512));
        h.assert_done(&read, STATUS_OK, 513);
        let read = h.request(VIRTIO_BLK_T_IN, 1, Data::In(512));
        h.assert_done(&read, STATUS_IOERR, 1);
    }

    #[test]
    fn requests_over_the_size_cap_are_refused() {
        let mut h = harness(false);
        let header = h.driver.header(VIRTIO_BLK_T_IN, 0);
        let status = h.driver.status();
        let buffer = h.driver.alloc(256 * 1024, 512);
        // 33 x 256 KiB of the same buffer: 8.25 MiB.
        let mut parts = vec![(header, 16, 0)];
        parts.extend(std::iter::repeat_n((buffer, 256 * 1024, WRITE), 33));
        parts.push((status, 1, WRITE));
        let head = h.driver.add_indirect(&parts);
        h.run();
        assert_eq!(h.driver.byte(status), STATUS_IOERR);
        assert_eq!(h.driver.last_used(), (u32::from(head), 1));
    }

    #[test]
    fn descriptor_loops_are_dropped() {
        for io_uring in [false, true] {
            let mut h = harness(io_uring);
            let header = h.driver.header(VIRTIO_BLK_T_IN, 0);
            let data = h.driver.alloc(512, 512);
            // 0 -> 1 -> 0 -> ...
            h.driver.set_desc(0, 0, header, 16, NEXT, 1);
            h.driver.set_desc(0, 1, data, 512, WRITE | NEXT, 0);
            h.driver.publish(0);
            h.run();
            h.assert_dropped(0);

            // A descriptor pointing at itself.
            h.driver.set_desc(0, 5, data, 1, WRITE | NEXT, 5);
            h.driver.publish(5);
            h.run();
            h.assert_dropped(5);

            // The queue still works.
            h.driver.next_desc = 8;
            let read = h.request(VIRTIO_BLK_T_IN, 0, Data::In(512));
            h.assert_done(&read, STATUS_OK, 513);
        }
    }

    #[test]
    fn chains_longer_than_allowed_get_an_error() {
        let mut h = harness(false);
        let header = h.driver.header(VIRTIO_BLK_T_IN, 0);
        let status = h.driver.status();
        let data = h.driver.alloc(512, 512);
        // Longer than the queue (16) and than MAX_CHAIN_DESCRIPTORS.
        let mut parts = vec![(header, 16, 0)];
        parts.extend(std::iter::repeat_n((data, 0, WRITE), MAX_CHAIN_DESCRIPTORS));
        parts.push((status, 1, WRITE));
        let head = h.driver.add_indirect(&parts);
        h.run();
        assert_eq!(h.driver.byte(status), STATUS_IOERR);
        assert_eq!(h.driver.last_used(), (u32::from(head), 1));

        // A direct chain that runs off the end of the table.
        h.driver.set_desc(0, 15, header, 16, NEXT, 16);
        h.driver.publish(15);
        h.run();
        h.assert_dropped(15);
    }

    #[test]
    fn buffers_outside_guest_memory_are_refused() {
        for io_uring in [false, true] {
            let mut h = harness(io_uring);
            let header = h.driver.header(VIRTIO_BLK_T_IN, 0);
            for (addr, len) in [
                (MEM_SIZE - 256, 512),
                (MEM_SIZE, 512),
                (1 << 40, 512),
                (u64::MAX - 100, 512),
                (u64::MAX - 511, 512),
            ] {
                let status = h.driver.status();
                let head =
                    h.driver
                        .add_chain(&[(header, 16, 0), (addr, len, WRITE), (status, 1, WRITE)]);
                h.run();
                assert_eq!(h.driver.byte(status), STATUS_IOERR, "data at {addr:#x}");
                assert_eq!(h.driver.last_used(), (u32::from(head), 1));
                let status = h.driver.status();
                let head =
                    h.driver
                        .add_chain(&[(header, 16, 0), (addr, len, 0), (status, 1, WRITE)]);
                h.run();
                assert_eq!(h.driver.byte(status), STATUS_IOERR);
                assert_eq!(h.driver.last_used(), (u32::from(head), 1));
            }
            // A header that is not in memory.
            let status = h.driver.status();
            let head = h
                .driver
                .add_chain(&[(MEM_SIZE - 8, 16, 0), (status, 1, WRITE)]);
            h.run();
            assert_eq!(h.driver.byte(status), STATUS_IOERR);
            assert_eq!(h.driver.last_used(), (u32::from(head), 1));
            // A status byte that is not in memory, or whose address wraps.
            for (addr, len) in [
                (MEM_SIZE, 1),
                (MEM_SIZE - 1, 2),
                (u64::MAX, 2),
                (u64::MAX - 1, u32::MAX),
            ] {
                let head = h.driver.add_chain(&[(header, 16, 0), (addr, len, WRITE)]);
                h.run();
                h.assert_dropped(head);
            }
            assert_eq!(h.image.contents(), patterned(0, IMAGE_LEN));
        }
    }

    #[test]
    fn data_buffers_must_point_the_right_way() {
        let mut h = harness(false);
        // A read whose data buffer is device-readable.
        let header = h.driver.header(VIRTIO_BLK_T_IN, 0);
        let data = h.driver.alloc(512, 512);
        h.driver.write(data, &[0xaa; 512]);
        let status = h.driver.status();
        let head = h
            .driver
            .add_chain(&[(header, 16, 0), (data, 512, 0), (status, 1, WRITE)]);
        h.run();
        assert_eq!(h.driver.byte(status), STATUS_IOERR);
        assert_eq!(h.driver.last_used(), (u32::from(head), 1));
        assert_eq!(h.driver.read(data, 512), vec![0xaa; 512]);

        // A write whose data buffer is device-writable.
        let header = h.driver.header(VIRTIO_BLK_T_OUT, 0);
        let status = h.driver.status();
        let head = h
            .driver
            .add_chain(&[(header, 16, 0), (data, 512, WRITE), (status, 1, WRITE)]);
        h.run();
        assert_eq!(h.driver.byte(status), STATUS_IOERR);
        assert_eq!(h.driver.last_used(), (u32::from(head), 1));
        assert_eq!(h.driver.read(data, 512), vec![0xaa; 512]);

        // Device-readable after device-writable.
        let header = h.driver.header(VIRTIO_BLK_T_IN, 0);
        let status = h.driver.status();
        let head = h.driver.add_chain(&[
            (header, 16, 0),
            (data, 512, WRITE),
            (data, 512, 0),
            (status, 1, WRITE),
        ]);
        h.run();
        assert_eq!(h.driver.byte(status), STATUS_IOERR);
        assert_eq!(h.driver.last_used(), (u32::from(head), 1));
        // A header split over two descriptors is fine (any layout).
        let header = h.driver.header(VIRTIO_BLK_T_IN, 1);
        let status = h.driver.status();
        h.driver.add_chain(&[
            (header, 5, 0),
            (header + 5, 11, 0),
            (data, 512, WRITE),
            (status, 1, WRITE),
        ]);
        h.run();
        assert_eq!(h.driver.byte(status), STATUS_OK);
        assert_eq!(h.driver.read(data, 512), patterned(512, 512));
        assert_eq!(h.image.contents(), patterned(0, IMAGE_LEN));
    }

    #[test]
    fn chains_without_a_usable_status_byte_are_dropped() {
        let mut h = harness(false);
        let header = h.driver.header(VIRTIO_BLK_T_IN, 0);
        let data = h.driver.alloc(512, 512);
        let status = h.driver.status();
        // Status descriptor read-only.
        let head = h
            .driver
            .add_chain(&[(header, 16, 0), (data, 512, WRITE), (status, 1, 0)]);
        h.run();
        h.assert_dropped(head);
        // Status descriptor of length zero.
        let head = h
            .driver
            .add_chain(&[(header, 16, 0), (data, 512, WRITE), (status, 0, WRITE)]);
        h.run();
        h.assert_dropped(head);
        // No status descriptor at all.
        let head = h.driver.add_chain(&[(header, 16, 0)]);
        h.run();
        h.assert_dropped(head);
        assert_eq!(h.driver.byte(status), UNTOUCHED);
        assert_eq!(h.driver.read(data, 512), vec![0; 512]);
        // A header too short for the type and sector.
        let status = h.driver.status();
        let head = h.driver.add_chain(&[(header, 8, 0), (status, 1, WRITE)]);
        h.run();
        assert_eq!(h.driver.byte(status), STATUS_IOERR);
        assert_eq!(h.driver.last_used(), (u32::from(head), 1));
        // The status byte can share the last data descriptor.
        let status_and_data = h.driver.alloc(513, 512);
        h.driver
            .add_chain(&[(header, 16, 0), (status_and_data, 513, WRITE)]);
        h.run();
        assert_eq!(h.driver.byte(status_and_data + 512), STATUS_OK);
        assert_eq!(h.driver.last_used().1, 513);
        assert_eq!(h.driver.read(status_and_data, 512), patterned(0, 512));
    }

    #[test]
    fn indirect_tables_are_checked() {
        for io_uring in [false, true] {
            let mut h = harness(io_uring);
            let header = h.driver.header(VIRTIO_BLK_T_IN, 4);
            let data = h.driver.alloc(1024, 512);
            let status = h.driver.status();
            let parts = [(header, 16, 0), (data, 1024, WRITE), (status, 1, WRITE)];
            h.driver.add_indirect(&parts);
            h.run();
            assert_eq!(h.driver.byte(status), STATUS_OK);
            assert_eq!(h.driver.last_used().1, 1025);
            assert_eq!(h.driver.read(data, 1024), patterned(4 * 512, 1024));

            let table = h.driver.alloc(16 * 3, 16);
            for (i, &(addr, len, flags)) in parts.iter().enumerate() {
                let flags = if i < 2 { flags | NEXT } else { flags };
                h.driver
                    .set_desc(table, i as u16, addr, len, flags, i as u16 + 1);
            }
            // A table length that is not whole descriptors, zero, or beyond memory.
            for (addr, len) in [
                (table, 47),
                (table, 0),
                (MEM_SIZE - 16, 48),
                (u64::MAX - 15, 48),
            ] {
                let head = h.driver.add_chain(&[(addr, len, INDIRECT)]);
                h.run();
                h.assert_dropped(head);
            }
            // An indirect table inside an indirect table.
            let outer = h.driver.alloc(32, 16);
            h.driver.set_desc(outer, 0, header, 16, NEXT, 1);
            h.driver.set_desc(outer, 1, table, 48, INDIRECT, 0);
            let head = h.driver.add_chain(&[(outer, 32, INDIRECT)]);
            h.run();
            h.assert_dropped(head);
            // A loop inside a table.
            h.driver.set_desc(table, 1, data, 1024, WRITE | NEXT, 1);
            let head = h.driver.add_chain(&[(table, 48, INDIRECT)]);
            h.run();
            h.assert_dropped(head);
        }
    }

    #[test]
    fn unknown_request_types_are_unsupported() {
        let mut h = harness(false);
        for request_type in [2, 3, 99, VIRTIO_BLK_T_WRITE_ZEROES + 1, u32::MAX] {
            let request = h.request(request_type, 0, Data::In(512));
            h.assert_done(&request, STATUS_UNSUPP, 1);
        }
    }

    #[test]
    fn discard_and_write_zeroes_reach_the_file() {
        for io_uring in [false, true] {
            let mut h = harness(io_uring);
            let features = h.block.features();
            assert_ne!(features & F_DISCARD, 0, "ext4/tmpfs punch holes");
            assert_ne!(features & F_WRITE_ZEROES, 0);
            let zeroed = |h: &Harness, sector: u64, sectors: u64| {
                let contents = h.image.contents();
                let range = (sector * 512) as usize..((sector + sectors) * 512) as usize;
                assert!(contents[range].iter().all(|&b| b == 0));
                assert_eq!(contents.len() as u64, IMAGE_LEN);
            };

            let discard = h.request(VIRTIO_BLK_T_DISCARD, 0, Data::Out(ranges(&[(8, 8, 0)])));
            h.assert_done(&discard, STATUS_OK, 1);
            zeroed(&h, 8, 8);
            let zeroes = h.request(
                VIRTIO_BLK_T_WRITE_ZEROES,
                0,
                Data::Out(ranges(&[(20, 2, 0), (30, 1, 1)])),
            );
            h.assert_done(&zeroes, STATUS_OK, 1);
            zeroed(&h, 20, 2);
            zeroed(&h, 30, 1);
            let contents = h.image.contents();
            assert_eq!(
                &contents[22 * 512..30 * 512],
                &patterned(22 * 512, 8 * 512)[..]
            );
            assert_eq!(&contents[..8 * 512], &patterned(0, 8 * 512)[..]);
            // An empty range is a no-op.
            let empty = h.request(VIRTIO_BLK_T_DISCARD, 0, Data::Out(ranges(&[(3, 0, 0)])));
            h.assert_done(&empty, STATUS_OK, 1);

            let refused: [(u32, Vec<u8>, u8); 7] = [
                // Discard takes no flags; write-zeroes only "unmap".
                (VIRTIO_BLK_T_DISCARD, ranges(&[(0, 1, 1)]), STATUS_UNSUPP),
                (
                    VIRTIO_BLK_T_WRITE_ZEROES,
                    ranges(&[(0, 1, 2)]),
                    STATUS_UNSUPP,
                ),
                (VIRTIO_BLK_T_DISCARD, ranges(&[(127, 2, 0)]), STATUS_IOERR),
                (
                    VIRTIO_BLK_T_WRITE_ZEROES,
                    ranges(&[(u64::MAX, 2, 0)]),
                    STATUS_IOERR,
                ),
                (VIRTIO_BLK_T_DISCARD, vec![0; 15], STATUS_IOERR),
                (VIRTIO_BLK_T_DISCARD, Vec::new(), STATUS_IOERR),
                (VIRTIO_BLK_T_DISCARD, ranges(&[(0, 1, 0); 33]), STATUS_IOERR),
            ];
            let before = h.image.contents();
            for (request_type, payload, status) in refused {
                let data = if payload.is_empty() {
                    Data::None
                } else {
                    Data::Out(payload)
                };
                let request = h.request(request_type, 0, data);
                h.assert_done(&request, status, 1);
            }
            assert_eq!(h.image.contents(), before);

            // Not negotiated: unsupported.
            h.handler.io.acked_features &= !(F_DISCARD | F_WRITE_ZEROES);
            let discard = h.request(VIRTIO_BLK_T_DISCARD, 0, Data::Out(ranges(&[(0, 1, 0)])));
            h.assert_done(&discard, STATUS_UNSUPP, 1);
            let zeroes = h.request(
                VIRTIO_BLK_T_WRITE_ZEROES,
                0,
                Data::Out(ranges(&[(0, 1, 0)])),
            );
            h.assert_done(&zeroes, STATUS_UNSUPP, 1);
            assert_eq!(h.image.contents(), before);
        }
    }

    #[test]
    fn counters_add_up() {
        for io_uring in [false, true] {
            let mut h = harness(io_uring);
            let counters = h.block.counters_handle();
            let initial = h.block.counters();
            assert_eq!(initial["read_latency_min"], u64::MAX);
            assert_eq!(initial["write_latency_min"], u64::MAX);
            assert_eq!(initial["read_latency_avg"], 0);
            for sector in 0..3 {
                h.request(VIRTIO_BLK_T_OUT, sector, Data::Out(vec![9; 1024]));
            }
            h.request(VIRTIO_BLK_T_IN, 0, Data::In(512));
            h.request(VIRTIO_BLK_T_IN, 1, Data::In(2048));
            // Failures, flushes and the like do not count.
            h.request(VIRTIO_BLK_T_IN, 1 << 40, Data::In(512));
            h.request(VIRTIO_BLK_T_FLUSH, 0, Data::None);
            h.request(VIRTIO_BLK_T_GET_ID, 0, Data::In(20));
            let c = counters.snapshot();
            assert_eq!(c, h.block.counters());
            assert_eq!(c["write_ops"], 3);
            assert_eq!(c["write_bytes"], 3072);
            assert_eq!(c["read_ops"], 2);
            assert_eq!(c["read_bytes"], 2560);
            for kind in ["read", "write"] {
                let min = c[format!("{kind}_latency_min").as_str()];
                let avg = c[format!("{kind}_latency_avg").as_str()];
                let max = c[format!("{kind}_latency_max").as_str()];
                assert!(
                    min <= avg && avg <= max && max < 10_000_000,
                    "{kind}: {min} {avg} {max}"
                );
            }
        }
    }

    #[test]
    fn event_idx_suppresses_interrupts_the_driver_does_not_want() {
        let mut h = harness(false);
        h.handler.queue = h.driver.queue(true);
        h.driver.set_used_event(0);
        h.request(VIRTIO_BLK_T_FLUSH, 0, Data::None);
        assert_eq!(h.interrupt.count(0), 1);
        // The device asks to be kicked for the next buffer.
        assert_eq!(h.driver.avail_event(), 1);
        // used_event = 0 was passed: no interrupt.
        h.request(VIRTIO_BLK_T_FLUSH, 0, Data::None);
        assert_eq!(h.interrupt.count(0), 1);
        assert_eq!(h.driver.used_idx(), 2);
        h.driver.set_used_event(2);
        h.request(VIRTIO_BLK_T_FLUSH, 0, Data::None);
        assert_eq!(h.interrupt.count(0), 2);
        assert_eq!(h.driver.avail_event(), 3);
    }

    #[test]
    fn a_full_io_uring_stalls_the_queue_until_completions_arrive() {
        let mut h = harness(true);
        if h.handler.uring.is_none() {
            return;
        }
        h.handler.uring = Some(Uring::new(4, h.mem.clone()).unwrap());
        let capacity = h.handler.uring.as_ref().unwrap().slots.len();
        let flush = h.driver.request(VIRTIO_BLK_T_FLUSH, 0, Data::None);
        // The same chain made available again and again: legal enough.
        for _ in 0..11 {
            h.driver.publish(flush.head);
        }
        h.handler.process_queue();
        assert!(h.handler.stalled);
        assert!(h.driver.used_idx() as usize <= capacity);
        h.run();
        assert_eq!(h.driver.used_idx(), 12);
        assert!(!h.handler.stalled);
    }

    #[test]
    fn a_short_io_uring_transfer_is_finished_synchronously() {
        let h = harness(false);
        let data = 0x4_0000;
        let segments = vec![Segment {
            addr: GuestAddress(data),
            len: 1024,
        }];
        let request = Request {
            head: 0,
            status: GuestAddress(0x5_0000),
            op: Op::Read {
                offset: 512,
                len: 1024,
                data: segments.clone(),
            },
            started: Instant::now(),
        };
        let mut iovecs = guest_iovecs(&h.mem, &segments).unwrap();
        assert_eq!(
            h.handler.io.complete_uring(&request, &[], &mut iovecs, 512),
            STATUS_OK
        );
        // Only the part the kernel "did not do" was read.
        assert_eq!(h.driver.read(data, 512), vec![0; 512]);
        assert_eq!(h.driver.read(data + 512, 512), patterned(1024, 512));
        assert_eq!(
            h.handler
                .io
                .complete_uring(&request, &[], &mut iovecs, -libc::EIO),
            STATUS_IOERR
        );
        assert_eq!(
            h.handler
                .io
                .complete_uring(&request, &[], &mut iovecs, 1024),
            STATUS_OK
        );
    }

    #[test]
    fn direct_io_works_aligned_and_through_the_bounce_buffer() {
        for io_uring in [false, true] {
            let image = TempImage::new(IMAGE_LEN);
            let mut config = disk_config(&image);
            config.direct = true;
            config.disable_io_uring = !io_uring;
            let block = match Block::new(&config, None) {
                Ok(block) => block,
                Err(e) if e.message.contains("O_DIRECT") => {
                    eprintln!("skipping: {e}");
                    return;
                }
                Err(e) => panic!("{e}"),
            };
            drop(block);
            let mut h = Harness::new(IMAGE_LEN, io_uring, |c| c.direct = true);
            let block_size = u64::from(h.block.block_size());
            assert!(block_size == 512 || block_size == 4096);

            // Aligned: straight into guest memory.
            let aligned = h.driver.alloc(8192, 4096);
            h.driver.write(aligned, &[0x11; 4096]);
            let header = h.driver.header(VIRTIO_BLK_T_OUT, 8);
            let status = h.driver.status();
            h.driver
                .add_chain(&[(header, 16, 0), (aligned, 4096, 0), (status, 1, WRITE)]);
            h.run();
            assert_eq!(h.driver.byte(status), STATUS_OK);
            assert_eq!(&h.image.contents()[4096..8192], &[0x11; 4096][..]);

            // A misaligned buffer and a sector that is not block-aligned.
            let odd = aligned + 16;
            h.driver.write(odd, &[0x22; 1024]);
            let header = h.driver.header(VIRTIO_BLK_T_OUT, 1);
            let status = h.driver.status();
            h.driver
                .add_chain(&[(header, 16, 0), (odd, 1024, 0), (status, 1, WRITE)]);
            h.run();
            assert_eq!(h.driver.byte(status), STATUS_OK);
            let contents = h.image.contents();
            assert_eq!(&contents[512..1536], &[0x22; 1024][..]);
            assert_eq!(&contents[..512], &patterned(0, 512)[..]);
            assert_eq!(&contents[1536..4096], &patterned(1536, 2560)[..]);

            // Segments of odd lengths.
            let header = h.driver.header(VIRTIO_BLK_T_IN, 1);
            let status = h.driver.status();
            h.driver.add_chain(&[
                (header, 16, 0),
                (odd, 100, WRITE),
                (aligned + 4096, 924, WRITE),
                (status, 1, WRITE),
            ]);
            h.run();
            assert_eq!(h.driver.byte(status), STATUS_OK);
            assert_eq!(h.driver.read(odd, 100), vec![0x22; 100]);
            assert_eq!(h.driver.read(aligned + 4096, 924), vec![0x22; 924]);
            assert_eq!(h.driver.last_used().1, 1025);
        }
    }

    #[test]
    fn bounce_buffers_read_modify_write_partial_blocks() {
        let image = TempImage::new(16384);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&image.path)
            .unwrap();
        let mem = guest_memory();
        let source = Segment {
            addr: GuestAddress(0x1_0000),
            len: 1024,
        };
        mem.write_slice(&[0xcd; 1024], source.addr).unwrap();
        // Inside one 4 KiB block, then across two.
        let mut expected = patterned(0, 16384);
        for offset in [1536usize, 3584] {
            bounce_write(&file, &mem, 4096, &[source], offset as u64, 1024).unwrap();
            expected[offset..offset + 1024].fill(0xcd);
            assert!(image.contents() == expected, "after writing at {offset}");
        }
        let targets = [
            Segment {
                addr: GuestAddress(0x2_0003),
                len: 300,
            },
            Segment {
                addr: GuestAddress(0x3_0000),
                len: 724,
            },
        ];
        bounce_read(&file, &mem, 4096, &targets, 8192 + 512, 1024).unwrap();
        let mut read = vec![0u8; 1024];
        mem.read_slice(&mut read[..300], targets[0].addr).unwrap();
        mem.read_slice(&mut read[300..], targets[1].addr).unwrap();
        assert_eq!(read, patterned(8192 + 512, 1024));
    }

    #[test]
    fn opening_reports_what_is_wrong_with_the_path() {
        let error = |config: DiskConfig| match Block::new(&config, None) {
            Ok(_) => panic!("{config:?} opened"),
            Err(e) => {
                assert_eq!(e.kind, ErrorKind::Device);
                e.message
            }
        };
        let missing = std::env::temp_dir().join("vmkit-block-test-no-such-image");
        let message = error(DiskConfig {
            path: Some(missing.to_str().unwrap().into()),
            ..DiskConfig::default()
        });
        assert!(
            message.contains("vmkit-block-test-no-such-image"),
            "{message}"
        );
        assert!(message.contains("no such file"), "{message}");
        for path in [std::env::temp_dir().to_str().unwrap(), "/dev/null"] {
            let message = error(DiskConfig {
                path: Some(path.into()),
                ..DiskConfig::default()
            });
            assert!(message.contains(path), "{message}");
            assert!(
                message.contains("not a regular file or block device"),
                "{message}"
            );
        }
        assert!(error(DiskConfig::default()).contains("no path"));

        let image = TempImage::new(4096);
        for (queue_size, num_queues) in [(100, 1), (0, 1), (1, 1), (128, 0), (128, 1000)] {
            let mut config = disk_config(&image);
            config.queue_size = queue_size;
            config.num_queues = num_queues;
            let message = error(config);
            assert!(message.contains(&image.path()), "{message}");
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&image.path, std::fs::Permissions::from_mode(0o400)).unwrap();
            let message = error(disk_config(&image));
            assert!(message.contains("permission denied"), "{message}");
        }
    }

    #[test]
    fn config_space_and_features_follow_the_spec_layout() {
        let h = harness(false);
        let block = &h.block;
        assert_eq!(block.device_type(), TYPE_BLOCK);
        assert_eq!(block.queue_max_sizes(), vec![128]);
        let features = block.features();
        for bit in [
            F_VERSION_1,
            F_RING_INDIRECT_DESC,
            F_RING_EVENT_IDX,
            F_SEG_MAX,
            F_BLK_SIZE,
            F_FLUSH,
            F_TOPOLOGY,
        ] {
            assert_ne!(features & bit, 0, "{bit:#x}");
        }
        assert_eq!(features & (F_MQ | F_RO), 0);

        let read = |offset: u64, len: usize| {
            let mut data = vec![0xee; len];
            block.read_config(offset, &mut data);
            data
        };
        assert_eq!(read(0, 8), (IMAGE_LEN / 512).to_le_bytes());
        assert_eq!(read(12, 4), 126u32.to_le_bytes());
        assert_eq!(read(20, 4), 512u32.to_le_bytes());
        assert_eq!(read(24, 4), [0, 0, 1, 0]);
        assert_eq!(read(34, 2), 1u16.to_le_bytes());
        assert_eq!(read(36, 4), MAX_DISCARD_SECTORS.to_le_bytes());
        assert_eq!(read(40, 4), MAX_DISCARD_SEGMENTS.to_le_bytes());
        assert_eq!(read(44, 4), 1u32.to_le_bytes());
        assert_eq!(read(48, 4), MAX_DISCARD_SECTORS.to_le_bytes());
        assert_eq!(read(56, 1), [1]);
        // Partly and wholly past the end, or at absurd offsets: zeroes.
        assert_eq!(read(58, 4), [0; 4]);
        assert_eq!(read(4096, 2), [0; 2]);
        assert_eq!(read(u64::MAX, 4), [0; 4]);
        let mut h = h;
        h.block.write_config(0, &[1, 2, 3, 4]);
        assert_eq!(h.block.config_space[..8], (IMAGE_LEN / 512).to_le_bytes());

        let image = TempImage::new(4096);
        let mut config = disk_config(&image);
        config.num_queues = 4;
        config.queue_size = 4096;
        let block = Block::new(&config, None).unwrap();
        assert_ne!(block.features() & F_MQ, 0);
        assert_eq!(block.queue_max_sizes(), vec![4096; 4]);
        let mut seg_max = [0u8; 4];
        block.read_config(12, &mut seg_max);
        assert_eq!(u32::from_le_bytes(seg_max), u32::from(MAX_SEGMENTS));
    }

    fn activate(
        block: &mut Block,
        mem: &GuestMemoryMmap,
        interrupt: &Arc<FakeInterrupt>,
        queues: Vec<(u16, Queue)>,
    ) -> Vec<EventFd> {
        let mut kicks = Vec::new();
        let mut active = Vec::new();
        for (index, queue) in queues {
            let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            kicks.push(kick.try_clone().unwrap());
            active.push(ActiveQueue { index, queue, kick });
        }
        block
            .activate(Activation {
                memory: mem.clone(),
                interrupt: interrupt.clone(),
                queues: active,
                acked_features: block.features(),
            })
            .unwrap();
        kicks
    }

    #[test]
    fn activation_runs_workers_that_stop_on_reset() {
        for io_uring in [false, true] {
            let image = TempImage::new(IMAGE_LEN);
            let mut config = disk_config(&image);
            config.disable_io_uring = !io_uring;
            let mut block = Block::new(&config, None).unwrap();
            let mem = guest_memory();
            let mut driver = Driver::new(&mem, 16, 0);
            let interrupt = Arc::new(FakeInterrupt::default());
            let kicks = activate(&mut block, &mem, &interrupt, vec![(0, driver.queue(true))]);
            if io_uring && IoUring::new(8).is_ok() {
                assert!(block.io_uring_active());
            }

            let write = driver.request(VIRTIO_BLK_T_OUT, 1, Data::Out(vec![0xab; 512]));
            kicks[0].write(1).unwrap();
            wait_until("the write", || driver.used_idx() == 1);
            wait_until("the interrupt", || interrupt.count(0) == 1);
            assert_eq!(driver.status_of(&write), STATUS_OK);
            assert_eq!(&image.contents()[512..1024], &[0xab; 512][..]);
            assert_eq!(block.counters()["write_ops"], 1);

            // After reset nothing is processed.
            block.reset();
            assert!(!block.io_uring_active());
            let read = driver.request(VIRTIO_BLK_T_IN, 1, Data::In(512));
            kicks[0].write(1).unwrap();
            std::thread::sleep(Duration::from_millis(50));
            assert_eq!(driver.used_idx(), 1);
            assert_eq!(driver.status_of(&read), UNTOUCHED);

            // Activated again (on rings the driver set up again, here the
            // same ones where they were), the pending read is served.
            let mut queue = driver.queue(true);
            queue.set_next_avail(1);
            queue.set_next_used(1);
            let kicks = activate(&mut block, &mem, &interrupt, vec![(0, queue)]);
            kicks[0].write(1).unwrap();
            wait_until("the read", || driver.used_idx() == 2);
            assert_eq!(driver.status_of(&read), STATUS_OK);
            assert_eq!(driver.read(read.data, 512), vec![0xab; 512]);
            drop(block);
        }
    }

    #[test]
    fn reset_with_requests_in_flight_returns_cleanly() {
        let image = TempImage::new(1 << 20);
        let mut block = Block::new(&disk_config(&image), None).unwrap();
        let mem = guest_memory();
        let interrupt = Arc::new(FakeInterrupt::default());
        for _ in 0..20 {
            let mut driver = Driver::new(&mem, 16, 0);
            let kicks = activate(&mut block, &mem, &interrupt, vec![(0, driver.queue(false))]);
            for sector in 0..5 {
                driver.request(VIRTIO_BLK_T_IN, sector * 64, Data::In(64 * 1024));
            }
            kicks[0].write(1).unwrap();
            block.reset();
            let used = driver.used_idx();
            std::thread::sleep(Duration::from_millis(2));
            assert_eq!(driver.used_idx(), used, "nothing completes after reset");
        }
    }

    #[test]
    fn every_queue_is_processed() {
        let image = TempImage::new(IMAGE_LEN);
        let mut config = disk_config(&image);
        config.num_queues = 2;
        let mut block = Block::new(&config, None).unwrap();
        assert_ne!(block.features() & F_MQ, 0);
        let mem = guest_memory();
        let mut drivers = [Driver::new(&mem, 16, 0), Driver::new(&mem, 16, 0x8_0000)];
        let interrupt = Arc::new(FakeInterrupt::default());
        let queues = vec![(0, drivers[0].queue(false)), (1, drivers[1].queue(false))];
        let kicks = activate(&mut block, &mem, &interrupt, queues);
        let writes: Vec<Submitted> = drivers
            .iter_mut()
            .enumerate()
            .map(|(i, driver)| {
                driver.request(
                    VIRTIO_BLK_T_OUT,
                    10 + i as u64,
                    Data::Out(vec![i as u8 + 1; 512]),
                )
            })
            .collect();
        for kick in &kicks {
            kick.write(1).unwrap();
        }
        for (i, driver) in drivers.iter().enumerate() {
            wait_until("both queues", || driver.used_idx() == 1);
            assert_eq!(driver.status_of(&writes[i]), STATUS_OK);
        }
        wait_until("both interrupts", || {
            interrupt.count(0) == 1 && interrupt.count(1) == 1
        });
        let contents = image.contents();
        assert_eq!(&contents[10 * 512..11 * 512], &[1; 512][..]);
        assert_eq!(&contents[11 * 512..12 * 512], &[2; 512][..]);
        assert_eq!(block.counters()["write_ops"], 2);
    }

    fn ops_limit(size: u64, refill_ms: u64) -> RateLimiterConfig {
        RateLimiterConfig {
            bandwidth: None,
            ops: Some(TokenBucketConfig {
                size,
                one_time_burst: None,
                refill_time: refill_ms,
            }),
        }
    }

    #[test]
    fn the_rate_limiter_holds_the_configured_rate() {
        let image = TempImage::new(IMAGE_LEN);
        let mut config = disk_config(&image);
        config.queue_size = 1024;
        // 200 requests per second, 10 at once.
        config.rate_limiter_config = Some(ops_limit(10, 50));
        let mut block = Block::new(&config, None).unwrap();
        let mem = guest_memory();
        let mut driver = Driver::new(&mem, 1024, 0);
        let data = driver.alloc(512, 512);
        const REQUESTS: u16 = 200;
        for _ in 0..REQUESTS {
            let header = driver.header(VIRTIO_BLK_T_IN, 0);
            let status = driver.status();
            driver.add_chain(&[(header, 16, 0), (data, 512, WRITE), (status, 1, WRITE)]);
        }
        let interrupt = Arc::new(FakeInterrupt::default());
        let kicks = activate(&mut block, &mem, &interrupt, vec![(0, driver.queue(false))]);
        let start = Instant::now();
        kicks[0].write(1).unwrap();
        wait_until("all requests", || driver.used_idx() == REQUESTS);
        let elapsed = start.elapsed().as_secs_f64();
        // The first 10 go at once, the other 190 at 200/s.
        let expected = f64::from(REQUESTS - 10) / 200.0;
        assert!(
            (elapsed - expected).abs() <= expected * 0.1,
            "{elapsed:.3} s, expected {expected:.3} s"
        );
        assert_eq!(block.counters()["read_ops"], u64::from(REQUESTS));
    }

    #[test]
    fn a_group_limiter_is_shared_between_disks() {
        let group = Arc::new(SharedRateLimiter::new(&ops_limit(3, 3_600_000)));
        let images = [TempImage::new(IMAGE_LEN), TempImage::new(IMAGE_LEN)];
        let mut harnesses: Vec<(Block, Driver, QueueHandler)> = images
            .iter()
            .map(|image| {
                let block = Block::new(&disk_config(image), Some(Arc::clone(&group))).unwrap();
                let mem = guest_memory();
                let driver = Driver::new(&mem, 16, 0);
                let handler = Harness::handler_for(&block, &mem, &driver, &Arc::default());
                (block, driver, handler)
            })
            .collect();
        {
            let (_, driver, handler) = &mut harnesses[0];
            driver.request(VIRTIO_BLK_T_FLUSH, 0, Data::None);
            driver.request(VIRTIO_BLK_T_FLUSH, 0, Data::None);
            handler.run_until_idle();
            assert_eq!(driver.used_idx(), 2);
        }
        let (_, driver, handler) = &mut harnesses[1];
        driver.request(VIRTIO_BLK_T_FLUSH, 0, Data::None);
        let held = driver.request(VIRTIO_BLK_T_FLUSH, 0, Data::None);
        handler.run_until_idle();
        assert_eq!(driver.used_idx(), 1);
        assert!(handler.throttled);
        // Kicks while throttled change nothing; the request stays available.
        handler.run_until_idle();
        assert_eq!(driver.used_idx(), 1);
        assert_eq!(driver.status_of(&held), UNTOUCHED);
        // A token comes back; the timer firing resumes the queue.
        group.give_back(1, 0);
        handler.timer_ready();
        handler.run_until_idle();
        assert_eq!(driver.used_idx(), 2);
        assert_eq!(driver.status_of(&held), STATUS_OK);
    }

    #[test]
    fn a_bandwidth_limit_counts_bytes() {
        let mut h = Harness::new(IMAGE_LEN, false, |c| {
            c.rate_limiter_config = Some(RateLimiterConfig {
                bandwidth: Some(TokenBucketConfig {
                    size: 2048,
                    one_time_burst: None,
                    refill_time: 3_600_000,
                }),
                ops: None,
            })
        });
        h.request(VIRTIO_BLK_T_IN, 0, Data::In(1024));
        h.request(VIRTIO_BLK_T_FLUSH, 0, Data::None);
        assert_eq!(h.driver.used_idx(), 2);
        // 1024 bytes left: a 1536-byte read waits.
        h.request(VIRTIO_BLK_T_IN, 0, Data::In(1536));
        assert_eq!(h.driver.used_idx(), 2);
        assert!(h.handler.throttled);
    }

    /// xorshift64: deterministic and dependency-free.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    const FUZZ_HEADERS: u64 = 0x3_0000;
    const FUZZ_TABLES: u64 = 0x2_0000;
    const FUZZ_DATA: u64 = 0x4_0000;
    const FUZZ_STATUS: u64 = 0x9_0000;

    fn fuzz_addr(rng: &mut Rng) -> u64 {
        match rng.below(10) {
            0..=3 => FUZZ_HEADERS + 16 * rng.below(16),
            4..=6 => FUZZ_DATA + rng.below(0x4_0000),
            7 => FUZZ_TABLES + 0x200 * rng.below(4) + 16 * rng.below(3),
            8 => MEM_SIZE - rng.below(64),
            _ => match rng.below(3) {
                0 => rng.next(),
                1 => u64::MAX - rng.below(64),
                _ => MEM_SIZE + rng.below(1 << 20),
            },
        }
    }

    fn fuzz_len(rng: &mut Rng) -> u32 {
        match rng.below(9) {
            0 => 0,
            1 => 1,
            2 => 16,
            3 => 512 * rng.below(5) as u32,
            4 => rng.below(64) as u32,
            5 => 16 * rng.below(40) as u32,
            6 => rng.next() as u32,
            7 => 20,
            _ => u32::MAX - rng.below(16) as u32,
        }
    }

    fn fuzz_descriptor(rng: &mut Rng, driver: &Driver, table: u64, index: u16, table_len: u64) {
        // Mostly linked to a neighbour, sometimes anywhere (or nowhere).
        let next = if rng.below(4) == 0 {
            rng.below(table_len + 4) as u16
        } else {
            (index + 1) % table_len as u16
        };
        let indirect = if rng.below(4) == 0 { INDIRECT } else { 0 };
        let flags = rng.below(8) as u16 & (NEXT | WRITE | indirect);
        let (addr, len) = if flags & INDIRECT != 0 && rng.below(2) == 0 {
            // Usually one of the tables, whole or in part.
            let len = if rng.below(2) == 0 {
                48
            } else {
                16 * rng.below(34) as u32
            };
            (FUZZ_TABLES + 0x200 * rng.below(4), len)
        } else {
            (fuzz_addr(rng), fuzz_len(rng))
        };
        driver.set_desc(table, index, addr, len, flags, next);
    }

    /// Header, data and status as a driver would lay them out at `index`,
    /// with one field garbled half the time.
    fn fuzz_plausible_request(rng: &mut Rng, driver: &Driver, index: u16) {
        let data_flags = if rng.below(2) == 0 { WRITE } else { 0 };
        let mut parts = [
            (FUZZ_HEADERS + 16 * rng.below(16), 16, NEXT),
            (
                FUZZ_DATA + 512 * rng.below(256),
                512 * (1 + rng.below(4)) as u32,
                data_flags | NEXT,
            ),
            (FUZZ_STATUS + rng.below(256), 1, WRITE),
        ];
        let mut nexts = [index + 1, index + 2, 0];
        if rng.below(2) == 0 {
            let victim = rng.below(3) as usize;
            match rng.below(4) {
                0 => parts[victim].0 = fuzz_addr(rng),
                1 => parts[victim].1 = fuzz_len(rng),
                2 => parts[victim].2 = rng.below(8) as u16,
                _ => nexts[victim] = rng.below(20) as u16,
            }
        }
        for (i, ((addr, len, flags), next)) in parts.into_iter().zip(nexts).enumerate() {
            driver.set_desc(driver.desc_table, index + i as u16, addr, len, flags, next);
        }
    }

    #[test]
    fn random_rings_never_break_the_device() {
        let image = TempImage::new(32 * 1024);
        let blocks: Vec<Block> = [true, false]
            .into_iter()
            .map(|disable_io_uring| {
                let mut config = disk_config(&image);
                config.disable_io_uring = disable_io_uring;
                Block::new(&config, None).unwrap()
            })
            .collect();
        let interrupt = Arc::new(FakeInterrupt::default());
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut rounds = 0;
        let mut completed = 0usize;
        while rounds < 10_000 && Instant::now() < deadline {
            rounds += 1;
            let mem = guest_memory();
            let mut driver = Driver::new(&mem, 16, 0);
            let types = [
                VIRTIO_BLK_T_IN,
                VIRTIO_BLK_T_OUT,
                VIRTIO_BLK_T_FLUSH,
                VIRTIO_BLK_T_GET_ID,
                VIRTIO_BLK_T_DISCARD,
                VIRTIO_BLK_T_WRITE_ZEROES,
                2,
            ];
            for slot in 0..16 {
                let request_type = if rng.below(8) == 0 {
                    rng.next() as u32
                } else {
                    types[rng.below(types.len() as u64) as usize]
                };
                let sector = match rng.below(4) {
                    0 => 0,
                    1 => rng.below(64),
                    2 => rng.below(1 << 20),
                    _ => u64::MAX - rng.below(4),
                };
                let mut header = [0u8; 16];
                header[..4].copy_from_slice(&request_type.to_le_bytes());
                header[8..].copy_from_slice(&sector.to_le_bytes());
                driver.write(FUZZ_HEADERS + 16 * slot, &header);
            }
            // Plausible discard ranges at the start of the data area.
            for entry in 0..64 {
                let range = ranges(&[(rng.below(70), rng.below(10) as u32, rng.below(3) as u32)]);
                driver.write(FUZZ_DATA + 16 * entry, &range);
            }
            let mut heads = Vec::new();
            let mut index = 0;
            while index < 16 {
                heads.push(index);
                if index + 3 <= 16 && rng.below(3) != 0 {
                    fuzz_plausible_request(&mut rng, &driver, index);
                    index += 3;
                } else {
                    fuzz_descriptor(&mut rng, &driver, 0, index, 16);
                    index += 1;
                }
            }
            for table in 0..4 {
                let table_addr = FUZZ_TABLES + 0x200 * table;
                let mut first_random = 0;
                if rng.below(2) == 0 {
                    fuzz_plausible_request(&mut rng, &driver.with_table(table_addr), 0);
                    first_random = 3;
                }
                for index in first_random..32 {
                    fuzz_descriptor(&mut rng, &driver, table_addr, index, 32);
                }
            }
            let published = rng.below(17) as u16;
            for _ in 0..published {
                let head = if rng.below(8) == 0 {
                    rng.below(20) as u16
                } else {
                    heads[rng.below(heads.len() as u64) as usize]
                };
                driver.publish(head);
            }
            if rng.below(16) == 0 {
                // A driver lying about the avail index.
                driver
                    .mem
                    .write_obj(rng.next() as u16, GuestAddress(driver.avail + 2))
                    .unwrap();
            }
            driver.set_used_event(rng.next() as u16);

            let block = &blocks[rounds % 2];
            let mut handler = Harness::handler_for(block, &mem, &driver, &interrupt);
            handler.queue = driver.queue(rng.below(2) == 0);
            handler.run_until_idle();
            // Kicked again with nothing new: must be harmless too.
            handler.run_until_idle();
            drop(handler);

            let used = driver.used_idx();
            assert!(used <= 16, "round {rounds}: {used} used entries");
            for i in 0..used {
                let (head, len) = driver.used_entry(i);
                assert!(head < 16, "round {rounds}: used head {head}");
                assert!(
                    u64::from(len) <= MAX_REQUEST_BYTES + 1,
                    "round {rounds}: used length {len}"
                );
            }
            completed += usize::from(used);
            assert_eq!(std::fs::metadata(&image.path).unwrap().len(), 32 * 1024);
        }
        // Enough of the chains were good enough to reach the disk.
        let data_ops: u64 = blocks
            .iter()
            .map(|b| b.counters()["read_ops"] + b.counters()["write_ops"])
            .sum();
        eprintln!("fuzz: {rounds} rounds, {completed} used entries, {data_ops} reads and writes");
        assert!(rounds >= 100, "only {rounds} rounds");
        assert!(
            completed > rounds,
            "too few requests got anywhere: {completed}"
        );
        assert!(
            data_ops as usize > rounds / 20,
            "too few reads and writes: {data_ops}"
        );
    }
}
