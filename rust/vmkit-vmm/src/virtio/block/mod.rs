//! virtio-blk (virtio 1.2 §5.2) over a raw disk image or a host block device.
//!
//! Every enabled queue gets a worker thread with its own file handle. A worker
//! pops requests, checks every descriptor against guest memory (the guest is
//! untrusted), and runs reads, writes and flushes on io_uring, or with
//! preadv/pwritev when io_uring is disabled or unavailable; the other request
//! types run inline. A request a rate limiter refuses stays in the ring until
//! the worker's timer fires.
//!
//! Here: the device (features, config space, activation). `request`:
//! descriptor chains parsed into requests. `disk`: the image, O_DIRECT
//! and aligned buffers. `merge`: contiguous requests joined. `io`: running
//! requests, with `io/sync` (preadv/pwritev, bounce buffers) and
//! `io/uring`. `queue`: a queue's worker. `counters`, `error`.

mod counters;
pub(crate) mod disk;
mod error;
mod io;
mod merge;
pub mod placement;
mod queue;
mod request;
#[cfg(test)]
mod tests;

use crate::seccomp::ThreadKind;
use std::collections::BTreeMap;
use std::io as stdio;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use crate::memory::GuestMemoryMmap;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
};
use virtio_queue::{Queue, QueueT};
use vmkit_config::DiskConfig;

pub use self::counters::BlockCounters;
use self::disk::DiskImage;
pub use self::disk::ImageLock;
pub use self::error::BlockError;
use self::io::uring::Uring;
use self::io::QueueIo;
use self::placement::Placement;
use self::queue::{QueueHandler, QueueWorker, SharedQueue};
use super::notify::{Notifiers, QueueRoute};
use super::worker::{self, Worker};
use super::{
    ActivateError, Activation, Interrupt, VirtioDevice, F_RING_EVENT_IDX, F_RING_INDIRECT_DESC,
    F_VERSION_1, TYPE_BLOCK,
};
use crate::rate_limiter::SharedRateLimiter;
use crate::virtio::worker::nonblocking_timer;
use std::sync::atomic::AtomicBool;

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
/// `struct virtio_blk_config` up to and including write_zeroes_may_unmap.
const CONFIG_SPACE_LEN: usize = 60;

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
    /// The transport's notifiers (virtio-pci): lets a queue be served on
    /// the vCPU threads while the CPUs are contended.
    notifiers: Option<Arc<Notifiers>>,
    /// The running queues' handlers, shared with their workers.
    queues: Vec<Arc<SharedQueue>>,
}

impl Block {
    /// Opens `config.path` and prepares the device. `group` is the shared
    /// limiter of the disk's `rate_limit_group`, if it has one; a
    /// `rate_limiter_config` of its own is built here.
    pub fn new(config: &DiskConfig, group: Option<Arc<SharedRateLimiter>>) -> crate::Result<Block> {
        Block::with_lock(config, group, true)
    }

    /// As `new`; `lock_disks` false skips the image's advisory lock.
    pub fn with_lock(
        config: &DiskConfig,
        group: Option<Arc<SharedRateLimiter>>,
        lock_disks: bool,
    ) -> crate::Result<Block> {
        let path = || config.path.as_deref().unwrap_or("<no path>").to_owned();
        if config.num_queues == 0 || config.num_queues > MAX_QUEUES {
            return Err(BlockError::NumQueues {
                path: path(),
                value: config.num_queues,
            }
            .into());
        }
        if config.queue_size < 2 || !config.queue_size.is_power_of_two() {
            return Err(BlockError::QueueSize {
                path: path(),
                value: config.queue_size,
            }
            .into());
        }
        let disk = DiskImage::open(config, lock_disks)?;

        let mut limiters = Vec::new();
        if let Some(own) = &config.rate_limiter_config {
            let own = SharedRateLimiter::new(own);
            if !own.is_unlimited() {
                limiters.push(Arc::new(own));
            }
        }
        limiters.extend(group);

        let serial = match &config.serial {
            Some(text) => id_bytes(text),
            None => id_bytes(&default_serial(&disk.file)),
        };

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
            notifiers: None,
            queues: Vec::new(),
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
    ) -> stdio::Result<QueueHandler> {
        let io = QueueIo {
            disk: Arc::clone(&self.disk),
            file: self.disk.file.try_clone()?,
            serial: self.serial,
            acked_features,
        };
        // No io_uring is not an error: the synchronous path takes over.
        let uring = if self.use_io_uring {
            let entries = u32::from(queue.size()).clamp(8, MAX_RING_ENTRIES);
            Uring::new(entries, memory.clone())
                .inspect_err(|e| {
                    log::info!(
                        "{} queue {index}: no io_uring ({e}), preadv/pwritev",
                        self.id
                    )
                })
                .ok()
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
            device: self.id.clone(),
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
            quiescing: false,
            broken: false,
            needs_signal: false,
            buffered_writes: Vec::new(),
            buffered_reads: Vec::new(),
            polling: false,
            placement: None,
        })
    }
}

/// The GET_ID answer: `text`'s first 20 bytes, NUL-padded.
fn id_bytes(text: &str) -> [u8; ID_LEN] {
    let mut id = [0u8; ID_LEN];
    let len = text.len().min(ID_LEN);
    id[..len].copy_from_slice(&text.as_bytes()[..len]);
    id
}

/// Cloud Hypervisor's serial for a disk without `serial=` (kvmtool's
/// scheme): the image's st_dev, st_rdev and st_ino in decimal, run
/// together; empty (all NULs) if they cannot be read, as there.
fn default_serial(file: &std::fs::File) -> String {
    match file.metadata() {
        Ok(m) => format!("{}{}{}", m.dev(), m.rdev(), m.ino()),
        Err(e) => {
            log::warn!("disk serial: cannot read the image's metadata: {e}");
            String::new()
        }
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
            return Err(ActivateError::new(format!(
                "virtio-blk {}: no queue enabled",
                self.id
            )));
        }
        let mut workers = Vec::with_capacity(activation.queues.len());
        let mut queues = Vec::with_capacity(activation.queues.len());
        let mut all_uring = true;
        for active in activation.queues {
            let failed = |e: stdio::Error| {
                ActivateError::io(format!("virtio-blk {} queue {}", self.id, active.index), e)
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
            let mut handler = handler;
            let on_vcpu = Arc::new(AtomicBool::new(false));
            if let Some(notifiers) = &self.notifiers {
                let route = QueueRoute {
                    notifiers: Arc::clone(notifiers),
                    queue: usize::from(active.index),
                };
                handler.placement = Some(Placement::new(route, Arc::clone(&on_vcpu)));
            }
            let kind = if handler.uring.is_some() {
                ThreadKind::BlockIoUring
            } else {
                ThreadKind::BlockSync
            };
            all_uring &= handler.uring.is_some();
            let name = format!("{}-q{}", self.id, active.index);
            let kick = active.kick.try_clone().map_err(failed)?;
            let shared = Arc::new(SharedQueue::new(handler, on_vcpu, Some(kick)));
            let handler = QueueWorker(Arc::clone(&shared));
            // On failure `workers` is dropped, which stops those started.
            let worker = worker::spawn(&activation.spawner, name, kind, vec![active.kick], handler);
            workers.push(worker.map_err(failed)?);
            queues.push(shared);
        }
        self.workers = workers;
        self.queues = queues;
        self.io_uring_active = all_uring;
        Ok(())
    }

    fn attach_notifiers(&mut self, notifiers: &Arc<Notifiers>) {
        self.notifiers = Some(Arc::clone(notifiers));
    }

    fn queue_notify_target(&self, queue: usize) -> Option<Arc<dyn crate::pci::NotifyTarget>> {
        let shared = self
            .queues
            .iter()
            .find(|shared| usize::from(shared.index) == queue)?;
        Some(Arc::clone(shared) as Arc<dyn crate::pci::NotifyTarget>)
    }

    fn reset(&mut self) {
        // Dropping a worker stops and joins its thread; its handler is
        // dropped there first (the device's share goes before), which waits
        // for its io_uring operations.
        self.queues.clear();
        self.workers.clear();
        self.io_uring_active = false;
    }

    fn stop_quiesced(&mut self) {
        for worker in &mut self.workers {
            worker.stop_quiesced();
        }
        self.reset();
    }

    fn counters(&self) -> BTreeMap<&'static str, u64> {
        self.counters.snapshot()
    }
}
