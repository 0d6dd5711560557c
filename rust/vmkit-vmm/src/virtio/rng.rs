//! virtio-rng (virtio 1.2 §5.4): one queue of device-writable buffers, filled
//! from the `--rng src=` file (by default /dev/urandom).

use crate::seccomp::ThreadKind;
use std::fs::File;
use std::io::{self, Read};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::worker::{self, Worker, WorkerHandler};
use super::{
    pop_chain, queue_failed, ActivateError, Activation, Interrupt, VirtioDevice, F_RING_EVENT_IDX,
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
        let source = File::open(src).map_err(|source| RngError::OpenSource {
            path: src.to_owned(),
            source,
        })?;
        Ok(Rng {
            id,
            source,
            worker: None,
        })
    }
}

struct RngQueue {
    device: String,
    memory: GuestMemoryMmap,
    queue: Queue,
    source: File,
    interrupt: Arc<dyn Interrupt>,
    buffer: Vec<u8>,
    /// Stopped after a queue error, until the device is reset.
    broken: bool,
}

impl RngQueue {
    /// Fills every available chain; returns whether any was used.
    fn process(&mut self) -> std::result::Result<bool, virtio_queue::Error> {
        let mut used_any = false;
        loop {
            // Notifications off while draining; re-check after turning them on
            // so a buffer added in between is not missed.
            self.queue.disable_notification(&self.memory)?;
            while let Some(chain) = pop_chain(&mut self.queue, &self.memory)? {
                let head = chain.head_index();
                let mut written = 0u32;
                for descriptor in chain.writable() {
                    let room = MAX_REQUEST - written as usize;
                    let len = (descriptor.len() as usize).min(room);
                    if len == 0 {
                        break;
                    }
                    let buffer = &mut self.buffer[..len];
                    // A short source or a buffer outside guest memory ends
                    // the chain with what was written so far.
                    if self.source.read_exact(buffer).is_err()
                        || self.memory.write_slice(buffer, descriptor.addr()).is_err()
                    {
                        break;
                    }
                    written += len as u32;
                }
                self.queue.add_used(&self.memory, head, written)?;
                used_any = true;
            }
            if !self.queue.enable_notification(&self.memory)? {
                return Ok(used_any);
            }
        }
    }

    fn fail(&mut self, cause: &dyn std::fmt::Display) {
        if !std::mem::replace(&mut self.broken, true) {
            queue_failed(&self.device, 0, cause, &*self.interrupt);
        }
    }
}

impl WorkerHandler for RngQueue {
    fn queue_notified(&mut self, _index: usize) {
        if self.broken {
            return;
        }
        match self.process() {
            Ok(true) if self.queue.needs_notification(&self.memory).unwrap_or(true) => {
                if let Err(e) = self.interrupt.signal_queue(0) {
                    log::warn!("{}: queue 0 interrupt lost: {e}", self.device);
                }
            }
            Ok(_) => {}
            Err(e) => self.fail(&e),
        }
    }

    fn failed(&mut self, cause: &io::Error) {
        self.fail(cause);
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
            device: self.id.clone(),
            memory: activation.memory,
            queue: active.queue,
            source,
            interrupt: activation.interrupt,
            buffer: vec![0; MAX_REQUEST],
            broken: false,
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
