//! virtio-rng (virtio 1.2 §5.4): one queue of device-writable buffers, filled
//! from the `--rng src=` file (by default /dev/urandom).
//!
//! The source is opened and read without blocking: a FIFO, socket or
//! directory is refused at once (opening a FIFO would wait for a writer with
//! the VMM's lock held), and a character device with nothing to give (a
//! quiet /dev/hwrng, a terminal) leaves the guest's buffer short instead of
//! holding the queue's worker, which a reset or shutdown must join.

use crate::seccomp::ThreadKind;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};

use crate::memory::GuestMemoryMmap;
use virtio_queue::Queue;
use vm_memory::Bytes;

use super::worker::{self, Worker, WorkerHandler};
use super::{
    drain_queue, ActivateError, Activation, OneQueueSignals, VirtioDevice, F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC, F_VERSION_1, TYPE_RNG,
};
use crate::error::{ErrorKind, ModuleError, Result};

const QUEUE_SIZE: u16 = 256;
/// Most bytes one request gets: a guest cannot make us read unbounded data.
const MAX_REQUEST: usize = 64 * 1024;

/// Why a virtio-rng device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    #[error("Error opening entropy source {path}")]
    OpenSource {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "Error opening entropy source {path} (--rng src): not a regular file or character device"
    )]
    NotAFileOrCharDevice { path: String },
}

impl ModuleError for RngError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Device
    }
}

pub struct Rng {
    id: String,
    source: File,
    worker: Option<Worker>,
}

impl Rng {
    pub fn new(id: String, src: &str) -> Result<Rng> {
        let open_error = |source| RngError::OpenSource {
            path: src.to_owned(),
            source,
        };
        let source = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(src)
            .map_err(|e| match std::fs::metadata(src) {
                // A unix socket cannot be opened (ENXIO): say what it is.
                Ok(m) if !m.is_file() && !m.file_type().is_char_device() => {
                    RngError::NotAFileOrCharDevice {
                        path: src.to_owned(),
                    }
                }
                _ => open_error(e),
            })?;
        let file_type = source.metadata().map_err(open_error)?.file_type();
        if !file_type.is_file() && !file_type.is_char_device() {
            return Err(RngError::NotAFileOrCharDevice {
                path: src.to_owned(),
            }
            .into());
        }
        Ok(Rng {
            id,
            source,
            worker: None,
        })
    }
}

struct RngQueue {
    memory: GuestMemoryMmap,
    queue: Queue,
    source: File,
    signals: OneQueueSignals,
    buffer: Vec<u8>,
}

impl RngQueue {
    /// Fills every available chain; returns whether any was used.
    fn process(&mut self) -> std::result::Result<bool, virtio_queue::Error> {
        let RngQueue {
            memory,
            queue,
            source,
            buffer,
            ..
        } = self;
        drain_queue(queue, memory, |chain| {
            let mut written = 0u32;
            for descriptor in chain.writable() {
                let room = MAX_REQUEST - written as usize;
                let len = (descriptor.len() as usize).min(room);
                if len == 0 {
                    break;
                }
                // A source with less to give right now (end of a file,
                // a device that would block) or a buffer outside guest
                // memory ends the chain with what was written so far.
                let got = match source.read(&mut buffer[..len]) {
                    Ok(got) => got,
                    Err(_) => break,
                };
                if got == 0
                    || memory
                        .write_slice(&buffer[..got], descriptor.addr())
                        .is_err()
                {
                    break;
                }
                written += got as u32;
                if got < len {
                    break;
                }
            }
            written
        })
    }
}

impl WorkerHandler for RngQueue {
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

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        F_VERSION_1 | F_RING_EVENT_IDX | F_RING_INDIRECT_DESC
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(&mut self, activation: Activation) -> std::result::Result<(), ActivateError> {
        let Some(active) = activation.queues.into_iter().find(|q| q.index == 0) else {
            return Ok(());
        };
        let source = self
            .source
            .try_clone()
            .map_err(|e| ActivateError::io("entropy source", e))?;
        let handler = RngQueue {
            memory: activation.memory,
            queue: active.queue,
            source,
            signals: OneQueueSignals::new(self.id.clone(), activation.interrupt),
            buffer: vec![0; MAX_REQUEST],
        };
        let worker = worker::spawn(
            &activation.spawner,
            format!("{}_q0", self.id),
            ThreadKind::Rng,
            vec![active.kick],
            handler,
        )
        .map_err(|e| ActivateError::io("worker thread", e))?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        // Dropping the worker stops and joins its thread.
        self.worker = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::{
        capture_logs, guest_memory, logged, wait_until, Driver, FakeInterrupt, WRITE,
    };
    use std::sync::Arc;
    use vm_memory::GuestAddress;

    fn activate(id: &str) -> (Rng, Driver, Arc<FakeInterrupt>) {
        let memory = guest_memory(0x100000);
        let mut rng = Rng::new(id.into(), "/dev/urandom").unwrap();
        let mut driver = Driver::small(&memory, 16, 0x10000);
        let interrupt = Arc::new(FakeInterrupt::default());
        rng.activate(Activation {
            spawner: crate::seccomp::Spawner::unconfined(),
            memory,
            interrupt: interrupt.clone(),
            queues: vec![driver.activate(0, false)],
            acked_features: F_VERSION_1,
        })
        .unwrap();
        (rng, driver, interrupt)
    }

    #[test]
    fn a_missing_source_is_named_with_its_cause() {
        let Err(e) = Rng::new("__rng_missing".into(), "/nonexistent/entropy") else {
            panic!("a missing source opened");
        };
        assert_eq!(e.kind, ErrorKind::Device);
        assert_eq!(
            e.to_string(),
            "Error opening entropy source /nonexistent/entropy: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn fifos_sockets_and_directories_are_refused_without_blocking() {
        let dir = std::env::temp_dir().join(format!("vmkit-rng-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let fifo_c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo_c.as_ptr(), 0o600) }, 0);
        let socket = dir.join("socket");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        for path in [&fifo, &socket, &dir] {
            let path = path.to_str().unwrap();
            let Err(e) = Rng::new("__rng_refused".into(), path) else {
                panic!("{path} accepted as an entropy source");
            };
            assert_eq!(
                e.to_string(),
                format!(
                    "Error opening entropy source {path} (--rng src): \
                     not a regular file or character device"
                )
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_character_device_with_nothing_to_read_leaves_the_buffer_empty() {
        // A pty's far end with no input: a blocking read would wait forever.
        // SAFETY: standard pty allocation; results are checked below.
        let (master, path) = unsafe {
            let fd = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
            assert!(fd >= 0);
            assert_eq!(libc::grantpt(fd), 0);
            assert_eq!(libc::unlockpt(fd), 0);
            let mut name = [0 as libc::c_char; 128];
            assert_eq!(libc::ptsname_r(fd, name.as_mut_ptr(), name.len()), 0);
            let path = std::ffi::CStr::from_ptr(name.as_ptr())
                .to_str()
                .unwrap()
                .to_owned();
            (
                <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd),
                path,
            )
        };
        let memory = guest_memory(0x100000);
        let mut rng = Rng::new("__rng_quiet".into(), &path).unwrap();
        // Dropped before `rng` if the test fails: a read blocked on the pty
        // then ends (EIO) and the worker can be joined.
        let _master = master;
        let mut driver = Driver::small(&memory, 16, 0x10000);
        rng.activate(Activation {
            spawner: crate::seccomp::Spawner::unconfined(),
            memory,
            interrupt: Arc::new(FakeInterrupt::default()),
            queues: vec![driver.activate(0, false)],
            acked_features: F_VERSION_1,
        })
        .unwrap();
        driver.add_chain(&[(0x40000, 256, WRITE)]);
        assert_eq!(driver.next_used(), (0, 0));
        // The worker is free: a reset joins it at once.
        rng.reset();
    }

    #[test]
    fn buffers_are_filled_and_capped() {
        let (mut rng, mut driver, interrupt) = activate("__rng_fill");
        driver.add_chain(&[(0x40000, 256, WRITE)]);
        assert_eq!(driver.next_used(), (0, 256));
        let bytes = driver.read(0x40000, 256);
        assert!(bytes.iter().any(|&b| b != bytes[0]), "random bytes");
        // More than MAX_REQUEST asked: MAX_REQUEST given.
        driver.add_chain(&[(0x40000, 0x8000, WRITE), (0x50000, 0x10000, WRITE)]);
        assert_eq!(driver.next_used(), (1, MAX_REQUEST as u32));
        assert!(interrupt.count(0) >= 2);
        assert_eq!(interrupt.needs_reset_count(), 0);
        rng.reset();
    }

    #[test]
    fn a_broken_ring_is_reported_and_needs_a_reset() {
        capture_logs();
        let (mut rng, driver, interrupt) = activate("__rng_broken");
        // An available index a whole ring and more ahead of the device.
        driver
            .mem
            .write_obj(17u16, GuestAddress(driver.avail + 2))
            .unwrap();
        driver.kick();
        wait_until("the reset request", || interrupt.needs_reset_count() == 1);
        assert_eq!(interrupt.config_count(), 1, "configuration change");
        let lines = logged("__rng_broken: queue 0 stopped");
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].starts_with("ERROR"), "{lines:?}");
        // Kicks after that are ignored, not reported again.
        driver.kick();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(interrupt.needs_reset_count(), 1);
        // A reset and a new activation bring the device back.
        rng.reset();
        let (mut rng, mut driver, interrupt) = activate("__rng_broken");
        driver.add_chain(&[(0x40000, 64, WRITE)]);
        assert_eq!(driver.next_used(), (0, 64));
        assert_eq!(interrupt.needs_reset_count(), 0);
        rng.reset();
    }
}
