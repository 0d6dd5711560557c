//! virtio-console (virtio 1.2 §5.3), one port: the transmit queue goes to the
//! `--console` backend (off, null, tty, pty, file, socket), backend input is
//! buffered and handed to the receive queue as the guest posts buffers.

use crate::seccomp::ThreadKind;
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use crate::memory::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::Bytes;
use vmm_sys_util::eventfd::EventFd;

use super::worker::{self, Worker, WorkerHandler};
use super::{
    pop_chain, queue_failed, ActivateError, Activation, Interrupt, VirtioDevice, F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC, F_VERSION_1, TYPE_CONSOLE,
};
use crate::devices::serial::{InputSink, SerialBackend};
use crate::error::{ErrorKind, ModuleError, Result};

const QUEUE_SIZE: u16 = 256;
const RECEIVE_QUEUE: u16 = 0;
const TRANSMIT_QUEUE: u16 = 1;
/// Input kept while the guest posts no receive buffers; beyond it, dropped.
const INPUT_LIMIT: usize = 64 * 1024;
/// Most bytes taken from one transmit chain.
const MAX_CHAIN: usize = 64 * 1024;

/// Backend input waiting for receive buffers.
pub struct ConsoleInput {
    bytes: Mutex<VecDeque<u8>>,
    ready: EventFd,
}

impl InputSink for ConsoleInput {
    fn feed(&self, bytes: &[u8]) {
        let mut buffer = self.bytes.lock().unwrap_or_else(|p| p.into_inner());
        let room = INPUT_LIMIT.saturating_sub(buffer.len());
        buffer.extend(&bytes[..bytes.len().min(room)]);
        drop(buffer);
        // Fails only when the counter is full, and then a wake-up is pending.
        let _ = self.ready.write(1);
    }
}

/// Why a virtio-console device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("console: cannot create the input eventfd")]
    InputEvent(#[source] std::io::Error),
}

impl ModuleError for ConsoleError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Device
    }
}

pub struct Console {
    id: String,
    backend: Arc<SerialBackend>,
    input: Arc<ConsoleInput>,
    worker: Option<Worker>,
}

impl Console {
    pub fn new(id: String, backend: Arc<SerialBackend>) -> Result<Console> {
        let ready = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(ConsoleError::InputEvent)?;
        let input = Arc::new(ConsoleInput {
            bytes: Mutex::new(VecDeque::new()),
            ready,
        });
        backend.attach(Some(input.clone()));
        Ok(Console {
            id,
            backend,
            input,
            worker: None,
        })
    }
}

#[cfg(feature = "fuzzing")]
impl Console {
    /// Where backend input goes (the fuzz targets feed it directly).
    pub fn input_sink(&self) -> Arc<ConsoleInput> {
        self.input.clone()
    }
}

struct ConsoleQueues {
    /// The device id, for the log.
    id: String,
    memory: GuestMemoryMmap,
    receive: Option<Queue>,
    transmit: Option<Queue>,
    /// Which kick index is which queue.
    kick_queues: Vec<u16>,
    interrupt: Arc<dyn Interrupt>,
    backend: Arc<SerialBackend>,
    input: Arc<ConsoleInput>,
    scratch: Vec<u8>,
}

impl ConsoleQueues {
    fn transmit(&mut self) {
        let Some(queue) = self.transmit.as_mut() else {
            return;
        };
        match transmit(queue, &self.memory, &self.backend, &mut self.scratch) {
            Ok(true) if queue.needs_notification(&self.memory).unwrap_or(true) => {
                signal(&self.id, &*self.interrupt, TRANSMIT_QUEUE);
            }
            Ok(_) => {}
            Err(e) => {
                // Dropped: a broken ring is not looked at again until a reset.
                self.transmit = None;
                queue_failed(&self.id, TRANSMIT_QUEUE, &e, &*self.interrupt);
            }
        }
    }

    fn receive(&mut self) {
        let Some(queue) = self.receive.as_mut() else {
            return;
        };
        match receive(queue, &self.memory, &self.input) {
            Ok(true) if queue.needs_notification(&self.memory).unwrap_or(true) => {
                signal(&self.id, &*self.interrupt, RECEIVE_QUEUE);
            }
            Ok(_) => {}
            Err(e) => {
                self.receive = None;
                queue_failed(&self.id, RECEIVE_QUEUE, &e, &*self.interrupt);
            }
        }
    }
}

fn signal(device: &str, interrupt: &dyn Interrupt, queue: u16) {
    if let Err(e) = interrupt.signal_queue(queue) {
        log::warn!("{device}: queue {queue} interrupt lost: {e}");
    }
}

/// Sends every available transmit chain to the backend; returns whether
/// any was used.
fn transmit(
    queue: &mut Queue,
    memory: &GuestMemoryMmap,
    backend: &SerialBackend,
    scratch: &mut [u8],
) -> std::result::Result<bool, virtio_queue::Error> {
    let mut used = false;
    loop {
        queue.disable_notification(memory)?;
        while let Some(chain) = pop_chain(queue, memory)? {
            let head = chain.head_index();
            let mut taken = 0;
            for descriptor in chain.readable() {
                let len = (descriptor.len() as usize).min(MAX_CHAIN - taken);
                let buffer = &mut scratch[..len];
                // A buffer outside guest memory ends the chain.
                if len == 0 || memory.read_slice(buffer, descriptor.addr()).is_err() {
                    break;
                }
                backend.write_out(buffer);
                taken += len;
            }
            queue.add_used(memory, head, 0)?;
            used = true;
        }
        if !queue.enable_notification(memory)? {
            return Ok(used);
        }
    }
}

/// Moves pending input into the receive chains the guest posted; returns
/// whether any was used.
fn receive(
    queue: &mut Queue,
    memory: &GuestMemoryMmap,
    input: &ConsoleInput,
) -> std::result::Result<bool, virtio_queue::Error> {
    let mut pending = input.bytes.lock().unwrap_or_else(|p| p.into_inner());
    let mut used = false;
    while !pending.is_empty() {
        let Some(chain) = pop_chain(queue, memory)? else {
            break;
        };
        let head = chain.head_index();
        let mut written = 0u32;
        for descriptor in chain.writable() {
            let len = (descriptor.len() as usize).min(pending.len());
            if len == 0 {
                break;
            }
            let (front, back) = pending.as_slices();
            let chunk: Vec<u8> = front.iter().chain(back).take(len).copied().collect();
            if memory.write_slice(&chunk, descriptor.addr()).is_err() {
                break;
            }
            pending.drain(..len);
            written += len as u32;
        }
        queue.add_used(memory, head, written)?;
        used = true;
    }
    Ok(used)
}

impl WorkerHandler for ConsoleQueues {
    fn queue_notified(&mut self, index: usize) {
        match self.kick_queues.get(index) {
            Some(&TRANSMIT_QUEUE) => self.transmit(),
            Some(_) => self.receive(),
            None => {}
        }
    }

    fn failed(&mut self, cause: &std::io::Error) {
        for queue in std::mem::take(&mut self.kick_queues) {
            queue_failed(&self.id, queue, cause, &*self.interrupt);
        }
        self.transmit = None;
        self.receive = None;
    }

    fn extra_fds(&self) -> Vec<RawFd> {
        vec![self.input.ready.as_raw_fd()]
    }

    fn extra_ready(&mut self, _index: usize) {
        // Non-blocking: a spurious wake-up reads EAGAIN.
        let _ = self.input.ready.read();
        self.receive();
    }

    fn started(&mut self) {
        self.transmit();
        self.receive();
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        TYPE_CONSOLE
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        F_VERSION_1 | F_RING_EVENT_IDX | F_RING_INDIRECT_DESC
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // cols, rows, max_nr_ports, emerg_wr: no feature makes them valid.
        data.fill(0);
    }

    fn activate(&mut self, activation: Activation) -> std::result::Result<(), ActivateError> {
        let mut receive = None;
        let mut transmit = None;
        let mut kicks = Vec::new();
        let mut kick_queues = Vec::new();
        for active in activation.queues {
            match active.index {
                RECEIVE_QUEUE => receive = Some(active.queue),
                TRANSMIT_QUEUE => transmit = Some(active.queue),
                _ => continue,
            }
            kicks.push(active.kick);
            kick_queues.push(active.index);
        }
        let handler = ConsoleQueues {
            id: self.id.clone(),
            memory: activation.memory,
            receive,
            transmit,
            kick_queues,
            interrupt: activation.interrupt,
            backend: self.backend.clone(),
            input: self.input.clone(),
            scratch: vec![0; MAX_CHAIN],
        };
        let worker = worker::spawn(
            &activation.spawner,
            self.id.clone(),
            ThreadKind::Console,
            kicks,
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
    use crate::virtio::testing::{guest_memory, wait_until, Driver, FakeInterrupt, WRITE};
    use vm_memory::GuestAddress;
    use vmkit_config::{ConsoleConfig, ConsoleOutputMode};

    fn console() -> (Console, Arc<SerialBackend>) {
        let backend = SerialBackend::open_unconfined(
            &ConsoleConfig::with_mode(ConsoleOutputMode::Null),
            "console",
            false,
        )
        .unwrap()
        .unwrap();
        let console = Console::new("__console".into(), backend.clone()).unwrap();
        (console, backend)
    }

    #[test]
    fn output_reaches_the_backend_and_input_the_guest() {
        let memory = guest_memory(0x100000);
        let (mut console, backend) = console();
        let mut rx = Driver::small(&memory, 16, 0x10000);
        let mut tx = Driver::small(&memory, 16, 0x20000);
        let interrupt = Arc::new(FakeInterrupt::default());
        console
            .activate(Activation {
                spawner: crate::seccomp::Spawner::unconfined(),
                memory: memory.clone(),
                interrupt: interrupt.clone(),
                queues: vec![
                    rx.activate(RECEIVE_QUEUE, false),
                    tx.activate(TRANSMIT_QUEUE, false),
                ],
                acked_features: F_VERSION_1,
            })
            .unwrap();

        memory
            .write_slice(b"hello\n", GuestAddress(0x40000))
            .unwrap();
        tx.add_chain(&[(0x40000, 6, 0)]);
        assert_eq!(tx.next_used(), (0, 0));
        assert_eq!(backend.capture.read_from(0).1, b"hello\n");

        // Input arrives before any receive buffer: it waits, then lands.
        console.input.feed(b"typed");
        rx.add_chain(&[(0x50000, 64, WRITE)]);
        console.input.feed(b"");
        assert_eq!(rx.next_used(), (0, 5));
        assert_eq!(rx.read(0x50000, 5), b"typed");
        assert!(interrupt.total() >= 2);
        console.reset();
        backend.close();
    }

    #[test]
    fn a_broken_ring_needs_a_reset() {
        let memory = guest_memory(0x100000);
        let (mut console, backend) = console();
        let mut tx = Driver::small(&memory, 16, 0x20000);
        let interrupt = Arc::new(FakeInterrupt::default());
        console
            .activate(Activation {
                spawner: crate::seccomp::Spawner::unconfined(),
                memory: memory.clone(),
                interrupt: interrupt.clone(),
                queues: vec![tx.activate(TRANSMIT_QUEUE, false)],
                acked_features: F_VERSION_1,
            })
            .unwrap();
        // An available index more than a ring ahead of the device.
        memory
            .write_obj(100u16, GuestAddress(tx.avail + 2))
            .unwrap();
        tx.kick();
        wait_until("the reset request", || interrupt.needs_reset_count() == 1);
        assert_eq!(interrupt.config_count(), 1);
        console.reset();
        backend.close();
    }
}
