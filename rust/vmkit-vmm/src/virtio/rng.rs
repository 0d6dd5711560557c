//! virtio-rng (virtio 1.2 §5.4): one queue of device-writable buffers, filled
//! from the `--rng src=` file (by default /dev/urandom).

use std::fs::File;
use std::io::Read;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::worker::{self, Worker, WorkerHandler};
use super::{
    ActivateError, Activation, Interrupt, VirtioDevice, F_RING_EVENT_IDX, F_RING_INDIRECT_DESC,
    F_VERSION_1, TYPE_RNG,
};
use crate::error::{Error, ErrorKind, Result};

const QUEUE_SIZE: u16 = 256;
/// Most bytes one request gets: a guest cannot make us read unbounded data.
const MAX_REQUEST: usize = 64 * 1024;

pub struct Rng {
    id: String,
    source: File,
    worker: Option<Worker>,
}

impl Rng {
    pub fn new(id: String, src: &str) -> Result<Rng> {
        let source = File::open(src).map_err(|e| {
            Error::new(
                ErrorKind::Device,
                format!("Error opening entropy source {src}: {e}"),
            )
        })?;
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
    interrupt: Arc<dyn Interrupt>,
    buffer: Vec<u8>,
}

impl RngQueue {
    /// Fills every available chain; returns whether the guest must be told.
    fn process(&mut self) -> bool {
        let mut used_any = false;
        loop {
            // Notifications off while draining; re-check after turning them on
            // so a buffer added in between is not missed.
            if self.queue.disable_notification(&self.memory).is_err() {
                return used_any;
            }
            while let Some(chain) = self.queue.pop_descriptor_chain(&self.memory) {
                let head = chain.head_index();
                let mut written = 0u32;
                for descriptor in chain.writable() {
                    let room = MAX_REQUEST - written as usize;
                    let len = (descriptor.len() as usize).min(room);
                    if len == 0 {
                        break;
                    }
                    let buffer = &mut self.buffer[..len];
                    if self.source.read_exact(buffer).is_err()
                        || self.memory.write_slice(buffer, descriptor.addr()).is_err()
                    {
                        break;
                    }
                    written += len as u32;
                }
                if self.queue.add_used(&self.memory, head, written).is_err() {
                    return used_any;
                }
                used_any = true;
            }
            match self.queue.enable_notification(&self.memory) {
                Ok(true) => continue,
                _ => break,
            }
        }
        used_any
    }
}

impl WorkerHandler for RngQueue {
    fn queue_notified(&mut self, _index: usize) {
        if self.process() && self.queue.needs_notification(&self.memory).unwrap_or(true) {
            let _ = self.interrupt.signal_queue(0);
        }
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
            .map_err(|e| ActivateError(format!("entropy source: {e}")))?;
        let handler = RngQueue {
            memory: activation.memory,
            queue: active.queue,
            source,
            interrupt: activation.interrupt,
            buffer: vec![0; MAX_REQUEST],
        };
        let worker = worker::spawn(format!("{}_q0", self.id), vec![active.kick], handler)
            .map_err(|e| ActivateError(format!("worker thread: {e}")))?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        // Dropping the worker stops and joins its thread.
        self.worker = None;
    }
}
