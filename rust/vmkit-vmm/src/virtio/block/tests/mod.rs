//! virtio-blk tests, on the shared kit (`crate::virtio::testing`): this
//! file adds temporary disk images, virtio-blk requests on the kit's ring
//! driver and a harness that runs one queue's handler on the test thread.

mod chains;
mod device;
mod disk;
mod fuzz;
mod rate_limit;
mod requests;

use self::super::io::guest_iovecs;
use self::super::io::sync::{bounce_read, bounce_write};
use self::super::merge::{contiguous_runs, MERGE_LIMIT};
use self::super::queue::{QueueWorker, SharedQueue};
use self::super::request::{Op, Request, Segment};
use super::*;
use crate::error::ErrorKind;
use crate::virtio::testing::{
    capture_logs, guest_memory, logged, wait_until, Driver, FakeInterrupt, INDIRECT, NEXT, WRITE,
};
use crate::virtio::ActiveQueue;
use io_uring::IoUring;
use std::fs::OpenOptions;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use vm_memory::{Bytes, GuestAddress};
use vmkit_config::{RateLimiterConfig, TokenBucketConfig};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: u64 = 0x10_0000;
const SERIAL: &str = "vmkit-serial-0123456";
const IMAGE_LEN: u64 = 64 * 1024;
const UNTOUCHED: u8 = 0xff;

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

/// virtio-blk requests on top of the kit's ring driver.
trait BlockRequests {
    fn header(&mut self, request_type: u32, sector: u64) -> u64;
    fn status(&mut self) -> u64;
    fn request(&mut self, request_type: u32, sector: u64, data: Data) -> Submitted;
    fn status_of(&self, request: &Submitted) -> u8;
}

impl BlockRequests for Driver {
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
        let mem = guest_memory(MEM_SIZE);
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

fn activate(
    block: &mut Block,
    mem: &GuestMemoryMmap,
    interrupt: &Arc<FakeInterrupt>,
    queues: Vec<(u16, Queue)>,
) -> Vec<EventFd> {
    let mut kicks = Vec::new();
    let mut active = Vec::new();
    for (index, queue) in queues {
        let kick = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).unwrap();
        kicks.push(kick.try_clone().unwrap());
        active.push(ActiveQueue { index, queue, kick });
    }
    block
        .activate(Activation {
            spawner: crate::seccomp::Spawner::unconfined(),
            memory: mem.clone(),
            interrupt: interrupt.clone(),
            queues: active,
            acked_features: block.features(),
        })
        .unwrap();
    kicks
}
