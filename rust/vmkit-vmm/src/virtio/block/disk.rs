//! The disk behind a virtio-blk device: opening the image or block device,
//! what it supports (O_DIRECT alignment, discard, write-zeroes) and the
//! aligned buffers O_DIRECT bounce I/O needs.

use std::alloc::Layout;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::ptr::NonNull;

use vmkit_config::DiskConfig;

use super::error::BlockError;
use super::{SECTOR_SHIFT, SECTOR_SIZE};

vmm_sys_util::ioctl_io_nr!(BLKSSZGET, 0x12, 104);
vmm_sys_util::ioctl_io_nr!(BLKDISCARD, 0x12, 119);
vmm_sys_util::ioctl_io_nr!(BLKPBSZGET, 0x12, 123);
vmm_sys_util::ioctl_io_nr!(BLKZEROOUT, 0x12, 127);

/// Opens the image `config` names (a regular file or block device); returns
/// its path, the file and whether it is a block device.
fn open_image(config: &DiskConfig) -> Result<(&str, File, bool), BlockError> {
    let path = config.path.as_deref().ok_or(BlockError::NoPath)?;
    let not_a_file = || BlockError::NotAFile {
        path: path.to_owned(),
    };

    // Looked at before opening: opening a FIFO could block.
    let metadata = std::fs::metadata(path).map_err(|e| BlockError::open(path, e, false))?;
    let block_device = metadata.file_type().is_block_device();
    if !metadata.is_file() && !block_device {
        return Err(not_a_file());
    }
    let mut options = OpenOptions::new();
    options.read(true).write(!config.readonly);
    // O_NONBLOCK: the path may have been replaced by a FIFO since.
    let direct = if config.direct { libc::O_DIRECT } else { 0 };
    options.custom_flags(direct | libc::O_NONBLOCK);
    let file = options
        .open(path)
        .map_err(|e| BlockError::open(path, e, config.direct))?;
    let opened = file
        .metadata()
        .map_err(|e| BlockError::open(path, e, config.direct))?;
    if opened.file_type().is_block_device() != block_device || !(opened.is_file() || block_device) {
        return Err(not_a_file());
    }
    // io_uring would answer EAGAIN instead of waiting for an O_NONBLOCK file.
    clear_nonblocking(&file).map_err(|e| BlockError::open(path, e, config.direct))?;
    Ok((path, file, block_device))
}

fn clear_nonblocking(file: &File) -> std::io::Result<()> {
    // SAFETY: fcntl on an open descriptor, with checked results.
    unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The advisory lock on one disk image, held by an open file of its own for
/// as long as this lives (a VM keeps it across the resets that rebuild its
/// devices).
#[derive(Debug)]
pub struct ImageLock {
    _file: File,
}

impl ImageLock {
    pub fn take(config: &DiskConfig) -> Result<ImageLock, BlockError> {
        let (path, file, _) = open_image(config)?;
        lock_image(&file, path, config.readonly)?;
        Ok(ImageLock { _file: file })
    }
}

/// Takes an open file description (OFD) lock on the whole image: shared
/// for a read-only disk, exclusive for a writable one, so two VMs never
/// write one image at once. It lives as long as `file`'s description, i.e.
/// the device, and is not inherited by a fork.
fn lock_image(file: &File, path: &str, readonly: bool) -> Result<(), BlockError> {
    let (kind, what) = if readonly {
        (libc::F_RDLCK, "read")
    } else {
        (libc::F_WRLCK, "write")
    };
    // SAFETY: flock is plain data; all zeroes is a valid value.
    let mut request: libc::flock = unsafe { std::mem::zeroed() };
    request.l_type = kind as libc::c_short;
    request.l_whence = libc::SEEK_SET as libc::c_short;
    // l_start 0 and l_len 0: the whole file, however it grows; l_pid must be 0.
    // SAFETY: the fd is open for the call and `request` outlives it.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &request) };
    if ret == 0 {
        return Ok(());
    }
    let source = io::Error::last_os_error();
    match source.raw_os_error() {
        Some(libc::EAGAIN | libc::EACCES) => Err(BlockError::Locked {
            path: path.to_owned(),
            what,
        }),
        _ => Err(BlockError::Lock {
            path: path.to_owned(),
            source,
        }),
    }
}

/// The backing file or block device and what it can do, fixed at open.
#[derive(Debug)]
pub struct DiskImage {
    pub file: File,
    pub readonly: bool,
    pub direct: bool,
    pub block_device: bool,
    /// In 512-byte sectors.
    pub capacity: u64,
    /// Logical block size: reported as blk_size, and the O_DIRECT alignment.
    pub block_size: u32,
    pub physical_block_exp: u8,
    pub discard: bool,
    pub write_zeroes: bool,
    /// Regular files: FALLOC_FL_ZERO_RANGE works (else holes are punched).
    pub zero_range: bool,
}

impl DiskImage {
    /// Opens the image; with `lock`, takes its advisory lock (see `lock_image`).
    pub fn open(config: &DiskConfig, lock: bool) -> Result<DiskImage, BlockError> {
        let (path, mut file, block_device) = open_image(config)?;
        if lock {
            lock_image(&file, path, config.readonly)?;
        }
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| BlockError::Size {
                path: path.to_owned(),
                source,
            })?;

        let (block_size, physical_block_size) = if block_device {
            block_device_sizes(&file).map_err(|source| BlockError::BlockSize {
                path: path.to_owned(),
                source,
            })?
        } else if config.direct {
            let align =
                direct_io_alignment(&file, size).map_err(|source| BlockError::DirectAlignment {
                    path: path.to_owned(),
                    source,
                })?;
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
    pub fn probe_discard(&mut self, size: u64) {
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

    pub fn discard(&self, file: &File, offset: u64, len: u64) -> io::Result<()> {
        if self.block_device {
            block_range_ioctl(file, BLKDISCARD(), offset, len)
        } else {
            fallocate(file, libc::FALLOC_FL_PUNCH_HOLE, offset, len)
        }
    }

    pub fn write_zeroes(&self, file: &File, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
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

pub fn block_device_sizes(file: &File) -> io::Result<(u32, u32)> {
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
pub fn direct_io_alignment(file: &File, size: u64) -> io::Result<u32> {
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

pub fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
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

pub fn block_range_ioctl(
    file: &File,
    request: libc::c_ulong,
    offset: u64,
    len: u64,
) -> io::Result<()> {
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
pub struct AlignedBuf {
    pub ptr: NonNull<u8>,
    pub layout: Layout,
}

impl AlignedBuf {
    pub fn new(len: usize, align: usize) -> io::Result<AlignedBuf> {
        let layout = Layout::from_size_align(len.max(1), align)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: the layout's size is not zero.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).ok_or(io::ErrorKind::OutOfMemory)?;
        Ok(AlignedBuf { ptr, layout })
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` owns `layout.size()` initialized (zeroed) bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
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
