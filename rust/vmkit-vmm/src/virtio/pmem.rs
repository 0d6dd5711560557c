//! virtio-pmem (virtio 1.2 §5.19): a file mapped into the guest's physical
//! address space beside its RAM, which the guest uses as persistent memory
//! (Linux: a /dev/pmem disk, DAX). The device's configuration space says
//! where the region is; its one queue takes FLUSH requests, which make the
//! guest's writes durable in the file.
//!
//! As in Cloud Hypervisor: the region is the whole file (or `size=` bytes of
//! it), a multiple of 2 MiB; a directory with `size=` gets an unnamed
//! temporary file; `discard_writes=on` maps the file privately, so the guest
//! sees its own writes but the file never changes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

use super::worker::{self, Worker, WorkerHandler};
use super::{
    drain_queue, read_config_bytes, ActivateError, Activation, OneQueueSignals, VirtioDevice,
    F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_VERSION_1,
};
use crate::error::{ErrorKind, ModuleError, Result};
use crate::memory::GuestMemoryMmap;
use crate::seccomp::ThreadKind;
use vmkit_config::PmemConfig;

pub const TYPE_PMEM: u32 = 27;
const QUEUE_SIZE: u16 = 256;
/// Regions are whole 2 MiB pages, so a guest can map them with huge pages.
pub const REGION_ALIGNMENT: u64 = 2 << 20;

const REQ_FLUSH: u32 = 0;
const RESP_OK: u32 = 0;
const RESP_EIO: u32 = 1;

/// Why a virtio-pmem device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum PmemError {
    #[error("Error creating pmem device: cannot open {path}")]
    Open {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "Error creating pmem device: {path} is a directory: give size= for a temporary file \
         there (PmemWithDirectorySizeMissing)"
    )]
    DirectoryWithoutSize { path: String },
    #[error("Error creating pmem device: cannot size the temporary file in {path}")]
    SetLen {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "Error creating pmem device: {path}: size {size} is not a multiple of 2 MiB \
         (PmemSizeNotAligned)"
    )]
    NotAligned { path: String, size: u64 },
    #[error(
        "Error creating pmem device: {path}: size {size} is past the end of the file \
         ({file_size} bytes) (MappingPastEof)"
    )]
    PastEof {
        path: String,
        size: u64,
        file_size: u64,
    },
    #[error("Error creating pmem device: cannot map {path}")]
    Map {
        path: String,
        #[source]
        source: io::Error,
    },
}

impl ModuleError for PmemError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Device
    }
}

/// The file mapped into this process: the host side of the guest's region.
pub struct PmemMapping {
    host: *mut libc::c_void,
    size: u64,
}

// SAFETY: the mapping is plain memory owned by this value; the pointer is
// only handed to KVM and unmapped once, on drop.
unsafe impl Send for PmemMapping {}
// SAFETY: as above; this process never reads or writes through it.
unsafe impl Sync for PmemMapping {}

impl PmemMapping {
    pub fn host_address(&self) -> u64 {
        self.host as u64
    }

    pub fn size(&self) -> u64 {
        self.size
    }
}

impl Drop for PmemMapping {
    fn drop(&mut self) {
        // SAFETY: `host` and `size` are the mapping this value made; the VM
        // (whose memory slot points here) is gone before its devices are.
        unsafe { libc::munmap(self.host, self.size as usize) };
    }
}

/// The file of `config`, opened and checked, and the region's size.
pub fn open_backing(config: &PmemConfig) -> Result<(File, u64)> {
    let path = config.file.clone();
    let is_dir = std::fs::metadata(&path).is_ok_and(|m| m.is_dir());
    if is_dir && config.size.is_none() {
        return Err(PmemError::DirectoryWithoutSize { path }.into());
    }
    let mut options = OpenOptions::new();
    options.read(true).write(is_dir || !config.discard_writes);
    if is_dir {
        options.custom_flags(libc::O_TMPFILE);
    }
    let file = options.open(&path).map_err(|source| PmemError::Open {
        path: path.clone(),
        source,
    })?;
    if is_dir {
        if let Some(size) = config.size {
            file.set_len(size).map_err(|source| PmemError::SetLen {
                path: path.clone(),
                source,
            })?;
        }
    }
    let file_size = file
        .metadata()
        .map_err(|source| PmemError::Open {
            path: path.clone(),
            source,
        })?
        .len();
    let size = config.size.unwrap_or(file_size);
    if size == 0 || !size.is_multiple_of(REGION_ALIGNMENT) {
        return Err(PmemError::NotAligned { path, size }.into());
    }
    if size > file_size {
        return Err(PmemError::PastEof {
            path,
            size,
            file_size,
        }
        .into());
    }
    Ok((file, size))
}

/// Maps `size` bytes of `file`: shared (the guest's writes reach the file)
/// or, with `discard_writes`, private (they stay in this process).
pub fn map_backing(
    file: &File,
    size: u64,
    discard_writes: bool,
    path: &str,
) -> Result<PmemMapping> {
    let sharing = if discard_writes {
        libc::MAP_PRIVATE
    } else {
        libc::MAP_SHARED
    };
    // SAFETY: a new mapping of an open file, checked below; nothing else
    // refers to the returned range.
    let host = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            sharing | libc::MAP_NORESERVE,
            file.as_raw_fd(),
            0,
        )
    };
    if host == libc::MAP_FAILED {
        return Err(PmemError::Map {
            path: path.to_owned(),
            source: io::Error::last_os_error(),
        }
        .into());
    }
    Ok(PmemMapping { host, size })
}

pub struct Pmem {
    id: String,
    file: File,
    /// Where the guest finds the region, and how big it is.
    start: u64,
    mapping: Arc<PmemMapping>,
    worker: Option<Worker>,
}

impl Pmem {
    /// The device for a region at guest address `start`, mapped at
    /// `mapping`, of `file`.
    pub fn new(id: String, file: File, start: u64, mapping: Arc<PmemMapping>) -> Pmem {
        Pmem {
            id,
            file,
            start,
            mapping,
            worker: None,
        }
    }

    /// The guest-physical range of the region: (start, size).
    pub fn region(&self) -> (u64, u64) {
        (self.start, self.mapping.size())
    }

    fn config_bytes(&self) -> [u8; 16] {
        let mut config = [0u8; 16];
        config[..8].copy_from_slice(&self.start.to_le_bytes());
        config[8..].copy_from_slice(&self.mapping.size().to_le_bytes());
        config
    }
}

struct PmemQueue {
    memory: GuestMemoryMmap,
    queue: Queue,
    file: File,
    signals: OneQueueSignals,
}

/// A FLUSH request: a readable u32 type, then a writable u32 status.
/// Anything else is returned with nothing written (as Cloud Hypervisor does).
fn parse_request(
    chain: &mut virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    memory: &GuestMemoryMmap,
) -> std::result::Result<GuestAddress, &'static str> {
    let request = chain.next().ok_or("an empty chain")?;
    if request.is_write_only() || request.len() != 4 {
        return Err("a request that is not a readable u32");
    }
    let kind: u32 = memory
        .read_obj(request.addr())
        .map_err(|_| "a request outside guest memory")?;
    if kind != REQ_FLUSH {
        return Err("a request type other than FLUSH");
    }
    let status = chain.next().ok_or("no status buffer")?;
    if !status.is_write_only() || status.len() < 4 {
        return Err("a status buffer that is not a writable u32");
    }
    Ok(status.addr())
}

impl PmemQueue {
    fn process(&mut self) -> std::result::Result<bool, virtio_queue::Error> {
        let PmemQueue {
            memory,
            queue,
            file,
            signals,
        } = self;
        drain_queue(queue, memory, |mut chain| {
            match parse_request(&mut chain, memory) {
                Ok(status) => {
                    let response = match file.sync_data() {
                        Ok(()) => RESP_OK,
                        Err(e) => {
                            log::error!("{}: flushing the file failed: {e}", signals.device);
                            RESP_EIO
                        }
                    };
                    match memory.write_obj(response, status) {
                        Ok(()) => 4,
                        Err(_) => 0,
                    }
                }
                Err(what) => {
                    log::debug!("{}: {what}, returned unanswered", signals.device);
                    0
                }
            }
        })
    }
}

impl WorkerHandler for PmemQueue {
    fn queue_notified(&mut self, _index: usize) {
        if self.signals.broken {
            return;
        }
        let result = self.process();
        self.signals
            .processed(result, &mut self.queue, &self.memory);
    }

    fn failed(&mut self, cause: &io::Error) {
        self.signals.fail(cause);
    }

    fn started(&mut self) {
        self.queue_notified(0);
    }
}

impl VirtioDevice for Pmem {
    fn device_type(&self) -> u32 {
        TYPE_PMEM
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        F_VERSION_1 | F_RING_EVENT_IDX | F_RING_INDIRECT_DESC
    }

    /// `start` (le64) and `size` (le64); past them, zeros.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn activate(&mut self, activation: Activation) -> std::result::Result<(), ActivateError> {
        let Some(active) = activation.queues.into_iter().find(|q| q.index == 0) else {
            return Ok(());
        };
        let file = self
            .file
            .try_clone()
            .map_err(|e| ActivateError::io("pmem file", e))?;
        let handler = PmemQueue {
            memory: activation.memory,
            queue: active.queue,
            file,
            signals: OneQueueSignals::new(self.id.clone(), activation.interrupt),
        };
        let worker = worker::spawn(
            &activation.spawner,
            format!("{}_q0", self.id),
            ThreadKind::Pmem,
            vec![active.kick],
            handler,
        )
        .map_err(|e| ActivateError::io("worker thread", e))?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
    }

    fn mmio_range(&self) -> Option<(u64, u64)> {
        Some(self.region())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::{guest_memory, Driver, FakeInterrupt, WRITE};
    use vmkit_config::PmemConfig;

    struct TempDir(std::path::PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir =
                std::env::temp_dir().join(format!("vmkit-pmem-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn file(&self, name: &str, size: u64) -> String {
            let path = self.0.join(name);
            let file = File::create(&path).unwrap();
            file.set_len(size).unwrap();
            path.to_str().unwrap().to_owned()
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn config(file: &str, size: Option<u64>, discard_writes: bool) -> PmemConfig {
        PmemConfig {
            file: file.to_owned(),
            size,
            iommu: false,
            discard_writes,
            id: Some("_pmem0".into()),
            pci_segment: 0,
        }
    }

    fn refusal(config: &PmemConfig) -> String {
        match open_backing(config) {
            Ok(_) => panic!("{config:?} accepted"),
            Err(e) => {
                assert_eq!(e.kind, ErrorKind::Device);
                e.to_string()
            }
        }
    }

    #[test]
    fn files_are_checked_as_cloud_hypervisor_checks_them() {
        let dir = TempDir::new("checks");
        let odd = dir.file("odd", 3 << 20);
        assert!(refusal(&config(&odd, None, false))
            .ends_with("odd: size 3145728 is not a multiple of 2 MiB (PmemSizeNotAligned)"));
        assert!(refusal(&config(&odd, Some(4 << 20), false)).ends_with(
            "odd: size 4194304 is past the end of the file (3145728 bytes) (MappingPastEof)"
        ));
        let missing = dir.0.join("missing");
        let missing = missing.to_str().unwrap();
        assert!(refusal(&config(missing, None, false)).starts_with(&format!(
            "Error creating pmem device: cannot open {missing}"
        )));
        let folder = dir.0.to_str().unwrap();
        assert!(refusal(&config(folder, None, false)).contains("(PmemWithDirectorySizeMissing)"));
        // A part of a bigger file, and an unnamed file of its own in a folder.
        let (_, size) =
            open_backing(&config(&dir.file("big", 8 << 20), Some(2 << 20), false)).unwrap();
        assert_eq!(size, 2 << 20);
        let (file, size) = open_backing(&config(folder, Some(4 << 20), false)).unwrap();
        assert_eq!((size, file.metadata().unwrap().len()), (4 << 20, 4 << 20));
        assert_eq!(
            std::fs::read_dir(&dir.0).unwrap().count(),
            2,
            "the temporary file has no name"
        );
    }

    fn device(path: &str, discard_writes: bool) -> (Pmem, Arc<PmemMapping>) {
        let cfg = config(path, None, discard_writes);
        let (file, size) = open_backing(&cfg).unwrap();
        let mapping = Arc::new(map_backing(&file, size, discard_writes, path).unwrap());
        (
            Pmem::new("_pmem0".into(), file, 0x1_0000_0000, mapping.clone()),
            mapping,
        )
    }

    fn write_through(mapping: &PmemMapping, offset: usize, bytes: &[u8]) {
        // SAFETY: `offset + bytes.len()` lies inside the mapping (callers).
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                (mapping.host_address() as *mut u8).add(offset),
                bytes.len(),
            );
        }
    }

    #[test]
    fn the_config_space_says_where_the_region_is() {
        let dir = TempDir::new("config");
        let (device, _) = device(&dir.file("f", 2 << 20), false);
        let mut data = [0xffu8; 20];
        device.read_config(0, &mut data);
        assert_eq!(&data[..8], &0x1_0000_0000u64.to_le_bytes());
        assert_eq!(&data[8..16], &(2u64 << 20).to_le_bytes());
        assert_eq!(&data[16..], &[0; 4]);
        assert_eq!(device.mmio_range(), Some((0x1_0000_0000, 2 << 20)));
    }

    #[test]
    fn writes_reach_the_file_unless_discarded() {
        let dir = TempDir::new("writes");
        let shared = dir.file("shared", 2 << 20);
        let (_device, mapping) = device(&shared, false);
        write_through(&mapping, 4096, b"guest data");
        assert_eq!(&std::fs::read(&shared).unwrap()[4096..4106], b"guest data");
        let private = dir.file("private", 2 << 20);
        let (_device, mapping) = device(&private, true);
        write_through(&mapping, 4096, b"guest data");
        assert!(std::fs::read(&private).unwrap().iter().all(|&b| b == 0));
    }

    fn activate(device: &mut Pmem) -> Driver {
        let memory = guest_memory(0x100000);
        let mut driver = Driver::small(&memory, 16, 0x10000);
        device
            .activate(Activation {
                spawner: crate::seccomp::Spawner::unconfined(),
                memory,
                interrupt: Arc::new(FakeInterrupt::default()),
                queues: vec![driver.activate(0, false)],
                acked_features: F_VERSION_1,
            })
            .unwrap();
        driver
    }

    #[test]
    fn flush_answers_ok_and_bad_requests_are_returned_unanswered() {
        let dir = TempDir::new("flush");
        let (mut device, _) = device(&dir.file("f", 2 << 20), false);
        let mut driver = activate(&mut device);
        let status =
            |driver: &Driver| u32::from_le_bytes(driver.read(0x40100, 4).try_into().unwrap());
        // FLUSH.
        driver
            .mem
            .write_obj(REQ_FLUSH, GuestAddress(0x40000))
            .unwrap();
        driver
            .mem
            .write_obj(0xffu32, GuestAddress(0x40100))
            .unwrap();
        driver.add_chain(&[(0x40000, 4, 0), (0x40100, 4, WRITE)]);
        assert_eq!(driver.next_used(), (0, 4));
        assert_eq!(status(&driver), RESP_OK);
        // An unknown type, a short request, a read-only status, no status,
        // a status outside guest memory: returned, status untouched.
        driver
            .mem
            .write_obj(0xffu32, GuestAddress(0x40100))
            .unwrap();
        driver.mem.write_obj(7u32, GuestAddress(0x40000)).unwrap();
        driver.add_chain(&[(0x40000, 4, 0), (0x40100, 4, WRITE)]);
        assert_eq!(driver.next_used().1, 0);
        driver
            .mem
            .write_obj(REQ_FLUSH, GuestAddress(0x40000))
            .unwrap();
        for chain in [
            vec![(0x40000, 2, 0), (0x40100, 4, WRITE)],
            vec![(0x40000, 4, 0), (0x40100, 4, 0)],
            vec![(0x40000, 4, 0)],
            vec![(0x40000, 4, WRITE), (0x40100, 4, WRITE)],
            vec![(0x40000, 4, 0), (0x40100, 2, WRITE)],
        ] {
            driver.add_chain(&chain);
            assert_eq!(driver.next_used().1, 0, "{chain:?}");
        }
        assert_eq!(status(&driver), 0xff);
        driver.add_chain(&[(0x40000, 4, 0), (0xffff_0000_0000, 4, WRITE)]);
        assert_eq!(driver.next_used().1, 0);
        // Still working.
        driver.add_chain(&[(0x40000, 4, 0), (0x40100, 4, WRITE)]);
        assert_eq!(driver.next_used().1, 4);
        assert_eq!(status(&driver), RESP_OK);
        device.reset();
    }
}
