//! virtio-console (virtio 1.2 §5.3), one port: the transmit queue goes to the
//! `--console` backend (off, null, tty, pty, file, socket), backend input is
//! buffered and handed to the receive queue as the guest posts buffers.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::worker::{self, Worker, WorkerHandler};
use super::{
    ActivateError, Activation, Interrupt, VirtioDevice, F_RING_EVENT_IDX, F_RING_INDIRECT_DESC,
    F_VERSION_1, TYPE_CONSOLE,
};
use crate::devices::serial::{InputSink, SerialBackend};
use crate::error::{Error, ErrorKind, Result};

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
        let _ = self.ready.write(1);
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
        let ready = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| Error::new(ErrorKind::Device, format!("console: eventfd: {e}")))?;
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

struct ConsoleQueues {
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
        let mut used = false;
        loop {
            if queue.disable_notification(&self.memory).is_err() {
                break;
            }
            while let Some(chain) = queue.pop_descriptor_chain(&self.memory) {
                let head = chain.head_index();
                let mut taken = 0;
                for descriptor in chain.readable() {
                    let len = (descriptor.len() as usize).min(MAX_CHAIN - taken);
                    let buffer = &mut self.scratch[..len];
                    if len == 0 || self.memory.read_slice(buffer, descriptor.addr()).is_err() {
                        break;
                    }
                    self.backend.write_out(buffer);
                    taken += len;
                }
                if queue.add_used(&self.memory, head, 0).is_err() {
                    return;
                }
                used = true;
            }
            if !matches!(queue.enable_notification(&self.memory), Ok(true)) {
                break;
            }
        }
        if used && queue.needs_notification(&self.memory).unwrap_or(true) {
            let _ = self.interrupt.signal_queue(TRANSMIT_QUEUE);
        }
    }

    fn receive(&mut self) {
        let Some(queue) = self.receive.as_mut() else {
            return;
        };
        let mut pending = self.input.bytes.lock().unwrap_or_else(|p| p.into_inner());
        let mut used = false;
        while !pending.is_empty() {
            let Some(chain) = queue.pop_descriptor_chain(&self.memory) else {
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
                if self.memory.write_slice(&chunk, descriptor.addr()).is_err() {
                    break;
                }
                pending.drain(..len);
                written += len as u32;
            }
            if queue.add_used(&self.memory, head, written).is_err() {
                return;
            }
            used = true;
        }
        drop(pending);
        if used && queue.needs_notification(&self.memory).unwrap_or(true) {
            let _ = self.interrupt.signal_queue(RECEIVE_QUEUE);
        }
    }
}

impl WorkerHandler for ConsoleQueues {
    fn queue_notified(&mut self, index: usize) {
        match self.kick_queues.get(index) {
            Some(&TRANSMIT_QUEUE) => self.transmit(),
            Some(_) => self.receive(),
            None => {}
        }
    }

    fn extra_fds(&self) -> Vec<RawFd> {
        vec![self.input.ready.as_raw_fd()]
    }

    fn extra_ready(&mut self, _index: usize) {
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
            memory: activation.memory,
            receive,
            transmit,
            kick_queues,
            interrupt: activation.interrupt,
            backend: self.backend.clone(),
            input: self.input.clone(),
            scratch: vec![0; MAX_CHAIN],
        };
        let worker = worker::spawn(self.id.clone(), kicks, handler)
            .map_err(|e| ActivateError(format!("worker thread: {e}")))?;
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
    use crate::virtio::ActiveQueue;
    use std::time::{Duration, Instant};
    use vm_memory::GuestAddress;
    use vmkit_config::{ConsoleConfig, ConsoleOutputMode};

    struct Counting(std::sync::atomic::AtomicU32);

    impl Interrupt for Counting {
        fn signal_queue(&self, _queue: u16) -> std::io::Result<()> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }
        fn signal_config(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn queue(memory: &GuestMemoryMmap, index: u16, base: u64) -> (ActiveQueue, EventFd) {
        crate::virtio::testing::ready_queue(memory, index, base, 16)
    }

    fn post(memory: &GuestMemoryMmap, base: u64, addr: u64, len: u32, flags: u16) {
        memory.write_obj(addr, GuestAddress(base)).unwrap();
        memory.write_obj(len, GuestAddress(base + 8)).unwrap();
        memory.write_obj(flags, GuestAddress(base + 12)).unwrap();
        memory.write_obj(0u16, GuestAddress(base + 0x1004)).unwrap();
        memory.write_obj(1u16, GuestAddress(base + 0x1002)).unwrap();
    }

    fn wait_used(memory: &GuestMemoryMmap, base: u64) -> u32 {
        let start = Instant::now();
        while memory.read_obj::<u16>(GuestAddress(base + 0x2002)).unwrap() != 1 {
            assert!(start.elapsed() < Duration::from_secs(5), "no used buffer");
            std::thread::sleep(Duration::from_millis(1));
        }
        memory.read_obj(GuestAddress(base + 0x2008)).unwrap()
    }

    #[test]
    fn output_reaches_the_backend_and_input_the_guest() {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100000)]).unwrap();
        let backend = SerialBackend::open(
            &ConsoleConfig::with_mode(ConsoleOutputMode::Null),
            "console",
            false,
        )
        .unwrap()
        .unwrap();
        let mut console = Console::new("__console".into(), backend.clone()).unwrap();
        let (rx, _rx_kick) = queue(&memory, RECEIVE_QUEUE, 0x10000);
        let (tx, tx_kick) = queue(&memory, TRANSMIT_QUEUE, 0x20000);
        let interrupt = Arc::new(Counting(Default::default()));
        console
            .activate(Activation {
                memory: memory.clone(),
                interrupt: interrupt.clone(),
                queues: vec![rx, tx],
                acked_features: F_VERSION_1,
            })
            .unwrap();

        memory
            .write_slice(b"hello\n", GuestAddress(0x40000))
            .unwrap();
        post(&memory, 0x20000, 0x40000, 6, 0);
        tx_kick.write(1).unwrap();
        assert_eq!(wait_used(&memory, 0x20000), 0);
        assert_eq!(backend.capture.read_from(0).1, b"hello\n");

        // Input arrives before any receive buffer: it waits, then lands.
        console.input.feed(b"typed");
        post(&memory, 0x10000, 0x50000, 64, 2);
        console.input.feed(b"");
        assert_eq!(wait_used(&memory, 0x10000), 5);
        let mut got = [0u8; 5];
        memory.read_slice(&mut got, GuestAddress(0x50000)).unwrap();
        assert_eq!(&got, b"typed");
        assert!(interrupt.0.load(std::sync::atomic::Ordering::SeqCst) >= 2);
        console.reset();
        backend.close();
    }
}
