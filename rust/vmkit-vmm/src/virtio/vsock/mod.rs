//! virtio-vsock (virtio 1.2 §5.10) with Cloud Hypervisor's "hybrid vsock"
//! backend: the guest's stream sockets reach host programs through unix
//! sockets. A host program connects to the device's socket and writes
//! `CONNECT <port>\n` to reach guest port `port` (answered `OK <local
//! port>\n` once the guest accepts); a guest connecting to host port `P`
//! reaches the program listening on `<socket>_<P>`.
//!
//! One worker thread serves the rx, tx and event queues and, through one
//! epoll fd of the [`muxer::Muxer`], the listener and every host stream.

mod connection;
mod host;
mod muxer;
mod packet;
#[cfg(test)]
mod tests;

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::sync::Arc;

use crate::memory::GuestMemoryMmap;
use crate::seccomp::ThreadKind;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::Bytes;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::net::timer::Timer;
use super::worker::{self, Worker, WorkerHandler};
use super::{
    pop_chain, queue_failed, read_config_bytes, ActivateError, Activation, Interrupt, VirtioDevice,
    F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_VERSION_1, TYPE_VSOCK,
};
use crate::error::{ErrorKind, ModuleError, Result};
pub use muxer::Limits;
use muxer::{Muxer, TICK, TIMER_TOKEN, WAKE_TOKEN};
use packet::{RxBuffers, HEADER_SIZE, MAX_PAYLOAD};

const QUEUE_SIZE: u16 = 256;
const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;
const EVENT_QUEUE: u16 = 2;
/// Chains taken from one queue before the worker looks at its other
/// events: a busy guest cannot starve the host side, nor the kill event.
const CHAINS_PER_ROUND: usize = 256;
/// Muxer events handled per wake-up of the worker.
const EVENTS_PER_ROUND: usize = 64;

/// Why a virtio-vsock device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("Error creating vsock device: cannot bind the unix socket {path}")]
    Bind {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("Error creating vsock device: cannot adopt the unix socket {path} of the migrated VM")]
    Adopt {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("Error creating vsock device: cannot make the unix socket {path} non-blocking")]
    NonBlocking {
        path: String,
        #[source]
        source: io::Error,
    },
}

impl ModuleError for VsockError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Device
    }
}

pub struct Vsock {
    id: String,
    guest_cid: u32,
    socket_path: String,
    /// Bound once, kept across resets: host programs connect while the
    /// driver resets, and wait in the backlog.
    listener: Arc<UnixListener>,
    limits: Limits,
    worker: Option<Worker>,
    /// The next activation tells the driver its connections are gone.
    transport_reset_pending: bool,
    /// The VM moved to another process on this host, which has the socket
    /// (and its file) now.
    keep_socket_file: bool,
}

impl Vsock {
    /// A device for guest CID `cid` whose host programs connect at
    /// `socket_path` (which must not exist: it is bound here, and removed
    /// when the device is dropped).
    pub fn new(id: String, cid: u32, socket_path: &str) -> Result<Vsock> {
        // Only its owner may connect, as with Cloud Hypervisor's socket.
        let listener = crate::devices::serial::bind_private(std::path::Path::new(socket_path))
            .map_err(|source| VsockError::Bind {
                path: socket_path.to_owned(),
                source,
            })?;
        listener.set_nonblocking(true).map_err(|source| {
            let _ = std::fs::remove_file(socket_path);
            VsockError::NonBlocking {
                path: socket_path.to_owned(),
                source,
            }
        })?;
        Ok(Vsock {
            id,
            guest_cid: cid,
            socket_path: socket_path.to_owned(),
            listener: Arc::new(listener),
            limits: Limits::default(),
            worker: None,
            transport_reset_pending: false,
            keep_socket_file: false,
        })
    }

    /// A device on the listening socket a migration's sender (on this host)
    /// handed over: bound at `socket_path` by the sender, which leaves the
    /// file to this device.
    pub fn adopt(
        id: String,
        cid: u32,
        socket_path: &str,
        listener: &std::fs::File,
    ) -> Result<Vsock> {
        let adopt_error = |source| VsockError::Adopt {
            path: socket_path.to_owned(),
            source,
        };
        let fd = std::os::fd::OwnedFd::from(listener.try_clone().map_err(adopt_error)?);
        let listener = UnixListener::from(fd);
        listener.set_nonblocking(true).map_err(adopt_error)?;
        Ok(Vsock {
            id,
            guest_cid: cid,
            socket_path: socket_path.to_owned(),
            listener: Arc::new(listener),
            limits: Limits::default(),
            worker: None,
            transport_reset_pending: false,
            keep_socket_file: false,
        })
    }

    /// Replaces the resource bounds (from the next activation on).
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.worker = None;
        if self.keep_socket_file {
            return;
        }
        if let Err(e) = std::fs::remove_file(&self.socket_path) {
            if e.kind() != io::ErrorKind::NotFound {
                log::warn!("{}: cannot remove {}: {e}", self.id, self.socket_path);
            }
        }
    }
}

/// The worker's state: the queues and the host side.
struct VsockQueues {
    id: String,
    guest_cid: u64,
    memory: GuestMemoryMmap,
    interrupt: Arc<dyn Interrupt>,
    rx: Option<Queue>,
    tx: Option<Queue>,
    /// The event queue: only VIRTIO_VSOCK_EVENT_TRANSPORT_RESET is ever
    /// sent on it, once, after a snapshot, restore or migration.
    event: Option<Queue>,
    /// The connections the driver knows were dropped (the device stopped
    /// for a snapshot or was restored): it is told at start.
    announce_reset: bool,
    /// Which kick index is which queue.
    kick_queues: Vec<u16>,
    muxer: Muxer,
    timer: Timer,
    timer_armed: bool,
    /// Written when a round left work behind: the worker comes back to it.
    wake: EventFd,
    /// Tx chains are left in the ring until RSTs drain (`Muxer::tx_blocked`).
    tx_stalled: bool,
    /// The worker polls the rings: the driver's notifications stay off.
    polling: bool,
    payload: Vec<u8>,
    packet: Vec<u8>,
}

impl VsockQueues {
    fn signal(&self, queue: u16) {
        if let Err(e) = self.interrupt.signal_queue(queue) {
            log::warn!("{}: queue {queue} interrupt lost: {e}", self.id);
        }
    }

    fn fail(&mut self, queue: u16, cause: &dyn std::fmt::Display) {
        match queue {
            RX_QUEUE => self.rx = None,
            _ => self.tx = None,
        }
        queue_failed(&self.id, queue, cause, &*self.interrupt);
    }

    fn process_tx(&mut self) {
        match self.drain_tx() {
            Ok(true) => {
                let notify = self
                    .tx
                    .as_mut()
                    .is_none_or(|q| q.needs_notification(&self.memory).unwrap_or(true));
                if notify {
                    self.signal(TX_QUEUE);
                }
            }
            Ok(false) => {}
            Err(e) => self.fail(TX_QUEUE, &e),
        }
    }

    /// Hands the guest's packets to the muxer; returns whether any chain
    /// was used.
    fn drain_tx(&mut self) -> std::result::Result<bool, virtio_queue::Error> {
        let Some(queue) = self.tx.as_mut() else {
            return Ok(false);
        };
        let mut used = false;
        self.tx_stalled = false;
        let mut budget = CHAINS_PER_ROUND;
        queue.disable_notification(&self.memory)?;
        loop {
            if self.muxer.tx_blocked() {
                // Rx progress brings the worker back here.
                self.tx_stalled = true;
                return Ok(used);
            }
            if budget == 0 {
                let _ = self.wake.write(1);
                return Ok(used);
            }
            let Some(chain) = pop_chain(queue, &self.memory)? else {
                // While polling the driver is not asked to kick.
                if !self.polling && queue.enable_notification(&self.memory)? {
                    continue;
                }
                return Ok(used);
            };
            budget -= 1;
            let head = chain.head_index();
            match packet::read_tx(chain, &self.memory, &mut self.payload) {
                Ok(header) if muxer::addressed_to_host(&header, self.guest_cid) => {
                    self.muxer.handle_packet(&header, &self.payload);
                }
                Ok(header) => log::debug!(
                    "{}: tx packet from CID {} to CID {} dropped",
                    self.id,
                    header.src_cid,
                    header.dst_cid
                ),
                Err(e) => log::debug!("{}: tx packet dropped: {e}", self.id),
            }
            queue.add_used(&self.memory, head, 0)?;
            used = true;
        }
    }

    fn process_rx(&mut self) {
        match self.fill_rx() {
            Ok(true) => {
                let notify = self
                    .rx
                    .as_mut()
                    .is_none_or(|q| q.needs_notification(&self.memory).unwrap_or(true));
                if notify {
                    self.signal(RX_QUEUE);
                }
            }
            Ok(false) => {}
            Err(e) => self.fail(RX_QUEUE, &e),
        }
        // Delivered RSTs make room for the replies of waiting tx packets.
        if self.tx_stalled && !self.muxer.tx_blocked() {
            self.process_tx();
            if self.muxer.has_rx_work() {
                let _ = self.wake.write(1);
            }
        }
    }

    /// Gives the guest what the muxer has for it; returns whether any chain
    /// was used.
    fn fill_rx(&mut self) -> std::result::Result<bool, virtio_queue::Error> {
        let Some(queue) = self.rx.as_mut() else {
            return Ok(false);
        };
        let mut used = false;
        let mut budget = CHAINS_PER_ROUND;
        while self.muxer.has_rx_work() {
            if budget == 0 {
                let _ = self.wake.write(1);
                break;
            }
            let Some(chain) = pop_chain(queue, &self.memory)? else {
                // Out of buffers: host sockets wait (their data stays in
                // their socket buffers) until the guest adds some and kicks
                // (or, while polling, until the poll finds them).
                if !self.polling && queue.enable_notification(&self.memory)? {
                    continue;
                }
                break;
            };
            budget -= 1;
            let head = chain.head_index();
            let buffers = match RxBuffers::new(chain, &self.memory) {
                Some(buffers) if buffers.capacity >= HEADER_SIZE => buffers,
                _ => {
                    log::debug!("{}: rx chain unusable (short or outside memory)", self.id);
                    queue.add_used(&self.memory, head, 0)?;
                    used = true;
                    continue;
                }
            };
            if !self.muxer.next_rx(buffers.capacity, &mut self.packet) {
                // Nothing after all: the chain waits for the next packet.
                queue.go_to_previous_position();
                break;
            }
            // The buffers were checked to lie in guest memory.
            if let Err(e) = buffers.write(&self.memory, &self.packet) {
                log::warn!("{}: rx packet lost: {e}", self.id);
            }
            queue.add_used(&self.memory, head, self.packet.len() as u32)?;
            used = true;
        }
        Ok(used)
    }

    /// Muxer events: the listener, host streams, the timer, the wake-up.
    fn handle_muxer_events(&mut self) {
        let mut events = [EpollEvent::default(); EVENTS_PER_ROUND];
        // Level-triggered: what is left for now is reported again.
        let count = match self.muxer.epoll().wait(0, &mut events) {
            Ok(count) => count,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return,
            Err(e) => {
                log::error!("{}: waiting for host sockets failed: {e}", self.id);
                return;
            }
        };
        let mut process_tx = false;
        for event in &events[..count] {
            match event.data() {
                TIMER_TOKEN => {
                    self.timer.clear();
                    self.timer_armed = false;
                    self.muxer.tick();
                }
                WAKE_TOKEN => {
                    let _ = self.wake.read();
                    process_tx = true;
                }
                token => self.muxer.handle_event(token, event.events()),
            }
        }
        if process_tx {
            self.process_tx();
        }
        self.process_rx();
        self.arm_timer();
    }

    /// Tells the driver every connection is gone (virtio 1.2 §5.10.6.7): it
    /// resets its sockets instead of waiting on connections the host no
    /// longer has. Without an event buffer the driver finds out by RSTs.
    fn announce_transport_reset(&mut self) {
        const EVENT_TRANSPORT_RESET: u32 = 0;
        let Some(queue) = self.event.as_mut() else {
            return;
        };
        let chain = match pop_chain(queue, &self.memory) {
            Ok(Some(chain)) => chain,
            Ok(None) => return,
            Err(e) => {
                log::debug!("{}: event queue: {e}", self.id);
                return;
            }
        };
        let head = chain.head_index();
        let written = match chain.writable().next() {
            Some(d) if d.len() >= 4 => {
                match self
                    .memory
                    .write_obj(EVENT_TRANSPORT_RESET.to_le(), d.addr())
                {
                    Ok(()) => 4,
                    Err(_) => 0,
                }
            }
            _ => 0,
        };
        if queue.add_used(&self.memory, head, written).is_ok() {
            self.signal(EVENT_QUEUE);
        }
        log::info!("{}: the driver was told its connections are gone", self.id);
    }

    fn arm_timer(&mut self) {
        if self.muxer.has_deadlines() && !self.timer_armed {
            match self.timer.arm(TICK) {
                Ok(()) => self.timer_armed = true,
                Err(e) => log::error!("{}: cannot arm the timeout timer: {e}", self.id),
            }
        }
    }
}

/// Whether the driver made chains available that the device has not taken.
fn has_new_chains(queue: &Queue, memory: &GuestMemoryMmap) -> bool {
    queue
        .avail_idx(memory, std::sync::atomic::Ordering::Acquire)
        .is_ok_and(|idx| idx.0 != queue.next_avail())
}

impl WorkerHandler for VsockQueues {
    fn queue_notified(&mut self, index: usize) {
        match self.kick_queues.get(index) {
            Some(&TX_QUEUE) => {
                self.process_tx();
                self.process_rx();
            }
            Some(&RX_QUEUE) => self.process_rx(),
            _ => {}
        }
        self.arm_timer();
    }

    fn failed(&mut self, cause: &io::Error) {
        for queue in std::mem::take(&mut self.kick_queues) {
            if queue != EVENT_QUEUE {
                queue_failed(&self.id, queue, cause, &*self.interrupt);
            }
        }
        self.rx = None;
        self.tx = None;
    }

    fn extra_fds(&self) -> Vec<RawFd> {
        vec![self.muxer.epoll().as_raw_fd()]
    }

    fn extra_ready(&mut self, _index: usize) {
        self.handle_muxer_events();
    }

    // Adaptive polling (see `worker`): while the guest keeps the queues busy
    // the worker watches the rings instead of waiting for kicks, whose
    // wake-ups cost more than the packets they announce.
    fn polls(&self) -> bool {
        true
    }

    /// While the worker polls, the driver need not kick (each kick is a VM
    /// exit): notifications off on both rings.
    fn poll_start(&mut self) {
        self.polling = true;
        for queue in [self.rx.as_mut(), self.tx.as_mut()].into_iter().flatten() {
            let _ = queue.disable_notification(&self.memory);
        }
    }

    /// Notifications back on before the worker sleeps; a chain made
    /// available meanwhile, which no kick announced, is taken now.
    fn poll_stop(&mut self) -> bool {
        self.polling = false;
        let mut missed = false;
        for queue in [self.rx.as_mut(), self.tx.as_mut()].into_iter().flatten() {
            // Err: a broken ring, which the next processing reports.
            missed |= queue.enable_notification(&self.memory).unwrap_or(true);
        }
        if missed {
            self.process_tx();
            self.process_rx();
        }
        missed
    }

    fn poll(&mut self) -> bool {
        let mut worked = false;
        if !self.tx_stalled
            && self
                .tx
                .as_ref()
                .is_some_and(|q| has_new_chains(q, &self.memory))
        {
            self.process_tx();
            worked = true;
        }
        if self.muxer.has_rx_work()
            && self
                .rx
                .as_ref()
                .is_some_and(|q| has_new_chains(q, &self.memory))
        {
            self.process_rx();
            worked = true;
        }
        worked
    }

    fn started(&mut self) {
        if std::mem::take(&mut self.announce_reset) {
            self.announce_transport_reset();
        }
        self.process_tx();
        self.process_rx();
        self.arm_timer();
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        F_VERSION_1 | F_RING_EVENT_IDX | F_RING_INDIRECT_DESC
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // guest_cid, le64; past it, zeros.
        read_config_bytes(&u64::from(self.guest_cid).to_le_bytes(), offset, data);
    }

    fn activate(&mut self, activation: Activation) -> std::result::Result<(), ActivateError> {
        let mut rx = None;
        let mut tx = None;
        let mut event = None;
        let mut kicks = Vec::new();
        let mut kick_queues = Vec::new();
        for active in activation.queues {
            match active.index {
                RX_QUEUE => rx = Some(active.queue),
                TX_QUEUE => tx = Some(active.queue),
                EVENT_QUEUE => event = Some(active.queue),
                _ => continue,
            }
            kicks.push(active.kick);
            kick_queues.push(active.index);
        }
        let epoll = Epoll::new().map_err(|e| ActivateError::io("vsock epoll", e))?;
        let timer = Timer::new().map_err(|e| ActivateError::io("vsock timer", e))?;
        let wake = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(|e| ActivateError::io("vsock wake-up eventfd", e))?;
        for (fd, token) in [
            (timer.as_raw_fd(), TIMER_TOKEN),
            (wake.as_raw_fd(), WAKE_TOKEN),
        ] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(|e| ActivateError::io("vsock epoll", e))?;
        }
        let muxer = Muxer::new(
            self.id.clone(),
            u64::from(self.guest_cid),
            self.socket_path.clone(),
            self.listener.clone(),
            epoll,
            self.limits,
        )
        .map_err(|e| ActivateError::io("vsock listener", e))?;
        let handler = VsockQueues {
            id: self.id.clone(),
            guest_cid: u64::from(self.guest_cid),
            memory: activation.memory,
            interrupt: activation.interrupt,
            rx,
            tx,
            event,
            announce_reset: std::mem::take(&mut self.transport_reset_pending),
            kick_queues,
            muxer,
            timer,
            timer_armed: false,
            wake,
            tx_stalled: false,
            polling: false,
            payload: Vec::with_capacity(MAX_PAYLOAD),
            packet: Vec::with_capacity(HEADER_SIZE + MAX_PAYLOAD),
        };
        let worker = worker::spawn(
            &activation.spawner,
            self.id.clone(),
            ThreadKind::Vsock,
            kicks,
            handler,
        )
        .map_err(|e| ActivateError::io("worker thread", e))?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        // Dropping the worker stops and joins its thread; its connections
        // (host streams) close with it. The listener stays.
        self.worker = None;
    }

    /// The listening socket: a VMM process that takes the VM over on this
    /// host cannot bind the path while this one holds it.
    fn handover_fds(&self) -> Vec<RawFd> {
        vec![self.listener.as_raw_fd()]
    }

    fn handed_over(&mut self) {
        self.keep_socket_file = true;
    }

    /// A snapshot stops the device: its connections close, and the driver
    /// hears of it when the device starts again.
    fn stop_quiesced(&mut self) {
        self.reset();
        self.transport_reset_pending = true;
    }

    /// A restored (or migrated) device has no connections: the driver is
    /// told when it starts.
    fn restore_device_state(&mut self, bytes: &[u8]) -> std::result::Result<(), String> {
        if !bytes.is_empty() {
            return Err(format!(
                "{} bytes of vsock state, none expected",
                bytes.len()
            ));
        }
        self.transport_reset_pending = true;
        Ok(())
    }
}
