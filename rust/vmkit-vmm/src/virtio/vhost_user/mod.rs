//! vhost-user devices: virtio-blk (`--disk vhost_user=on`), virtio-net
//! (`--net vhost_user=on`) and virtio-fs (`--fs`) whose queues a backend
//! process serves over shared guest memory, as Cloud Hypervisor builds them.
//!
//! The VMM keeps the transport and the device configuration; the backend
//! gets guest memory, the rings, each queue's kick eventfd (the guest's
//! notifications go straight to it) and, as its call eventfd, the queue's
//! MSI-X irqfd (its used-buffer signals go straight to KVM; masking still
//! holds, see `pci::msix`). Each device has one relay thread: it raises the
//! interrupts of queues that have no vector of their own, serves
//! virtio-net's control queue, forwards configuration writes, and connects
//! the backend again when it goes (server mode: when it connects back;
//! client mode: for a minute, then the device asks for a reset).

pub mod link;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use self::link::{Link, RingSetup, SharedLink, Wanted, CONNECT_WINDOW, RETRY_INTERVAL};
use super::{
    pop_chain, queue_failed, read_config_bytes, ActivateError, Activation, Interrupt, VirtioDevice,
    F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_VERSION_1, TYPE_BLOCK, TYPE_NET,
};
use crate::memory::GuestMemoryMmap;
use crate::seccomp::ThreadKind;

pub const TYPE_FS: u32 = 26;

// virtio-blk feature bits (virtio 1.2 §5.2.3).
const BLK_F_SIZE_MAX: u64 = 1 << 1;
const BLK_F_SEG_MAX: u64 = 1 << 2;
const BLK_F_GEOMETRY: u64 = 1 << 4;
const BLK_F_RO: u64 = 1 << 5;
const BLK_F_BLK_SIZE: u64 = 1 << 6;
const BLK_F_FLUSH: u64 = 1 << 9;
const BLK_F_TOPOLOGY: u64 = 1 << 10;
const BLK_F_CONFIG_WCE: u64 = 1 << 11;
const BLK_F_MQ: u64 = 1 << 12;
const BLK_F_DISCARD: u64 = 1 << 13;
const BLK_F_WRITE_ZEROES: u64 = 1 << 14;
/// struct virtio_blk_config up to write_zeroes_may_unmap and its padding.
const BLK_CONFIG_LEN: usize = 60;
const BLK_WRITEBACK_OFFSET: u64 = 32;
const BLK_NUM_QUEUES_OFFSET: usize = 34;

use super::net::{
    F_CSUM, F_CTRL_VQ, F_GUEST_CSUM, F_GUEST_ECN, F_GUEST_TSO4, F_GUEST_TSO6, F_GUEST_UFO,
    F_HOST_ECN, F_HOST_TSO4, F_HOST_TSO6, F_HOST_UFO, F_MAC, F_MQ, F_MRG_RXBUF, F_MTU,
};
/// mac, status, max_virtqueue_pairs, mtu.
const NET_CONFIG_LEN: usize = 12;

/// virtio-fs: the tag's bytes in the configuration (virtio 1.2 §5.11.4).
pub const FS_TAG_LEN: usize = 36;

/// Ring features every vhost-user device offers, and the protocol bit.
const DEFAULT_FEATURES: u64 =
    F_RING_INDIRECT_DESC | F_RING_EVENT_IDX | F_VERSION_1 | link::PROTOCOL_FEATURES;

/// The offloads `--net` lets the guest and the backend negotiate.
#[derive(Debug, Clone, Copy)]
pub struct NetOffloads {
    pub csum: bool,
    pub tso: bool,
    pub ufo: bool,
}

impl NetOffloads {
    /// As Cloud Hypervisor offers them: no checksum offload means no TSO or
    /// UFO either.
    fn features(self) -> u64 {
        let mut features = 0;
        if self.csum {
            features |= F_CSUM | F_GUEST_CSUM;
            if self.tso {
                features |= F_HOST_TSO4
                    | F_HOST_TSO6
                    | F_HOST_ECN
                    | F_GUEST_TSO4
                    | F_GUEST_TSO6
                    | F_GUEST_ECN;
            }
            if self.ufo {
                features |= F_HOST_UFO | F_GUEST_UFO;
            }
        }
        features
    }
}

/// What the device is, beyond its backend.
#[derive(Debug, Clone)]
pub enum Personality {
    Block {
        num_queues: usize,
    },
    Net {
        pairs: usize,
        mac: [u8; 6],
        mtu: Option<u16>,
        /// `offload_csum`, `offload_tso`, `offload_ufo`.
        offloads: NetOffloads,
    },
    Fs {
        tag: String,
        request_queues: usize,
    },
}

/// What a vhost-user device is built from.
pub struct DeviceSpec {
    pub option: &'static str,
    pub id: String,
    pub socket: String,
    pub server: bool,
    pub queue_size: u16,
    pub personality: Personality,
}

impl DeviceSpec {
    /// What to ask of the backend.
    pub fn wanted(&self) -> Wanted {
        let (features, protocol, queues, config_len) = match &self.personality {
            Personality::Block { num_queues } => {
                let mut features = BLK_F_SIZE_MAX
                    | BLK_F_SEG_MAX
                    | BLK_F_GEOMETRY
                    | BLK_F_RO
                    | BLK_F_BLK_SIZE
                    | BLK_F_FLUSH
                    | BLK_F_TOPOLOGY
                    | BLK_F_CONFIG_WCE
                    | BLK_F_DISCARD
                    | BLK_F_WRITE_ZEROES
                    | DEFAULT_FEATURES;
                if *num_queues > 1 {
                    features |= BLK_F_MQ;
                }
                let protocol = VhostUserProtocolFeatures::CONFIG
                    | VhostUserProtocolFeatures::MQ
                    | VhostUserProtocolFeatures::REPLY_ACK
                    | VhostUserProtocolFeatures::DEVICE_STATE;
                (features, protocol, *num_queues, BLK_CONFIG_LEN)
            }
            Personality::Net {
                pairs,
                mtu,
                offloads,
                ..
            } => {
                let mut features = offloads.features()
                    | F_MRG_RXBUF
                    | F_CTRL_VQ
                    | F_RING_EVENT_IDX
                    | F_VERSION_1
                    | link::PROTOCOL_FEATURES;
                if mtu.is_some() {
                    features |= F_MTU;
                }
                if *pairs > 1 {
                    features |= F_MQ;
                }
                let protocol = VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK;
                (features, protocol, pairs * 2, 0)
            }
            Personality::Fs { request_queues, .. } => {
                let protocol = VhostUserProtocolFeatures::MQ
                    | VhostUserProtocolFeatures::REPLY_ACK
                    | VhostUserProtocolFeatures::DEVICE_STATE;
                (DEFAULT_FEATURES, protocol, 1 + request_queues, 0)
            }
        };
        Wanted {
            option: self.option,
            id: self.id.clone(),
            socket: self.socket.clone(),
            features,
            protocol,
            queues,
            config_len,
        }
    }
}

/// The last configuration write the driver made that the backend has not
/// seen yet (virtio-blk's writeback field).
#[derive(Default)]
struct PendingConfig {
    write: Mutex<Option<(u32, Vec<u8>)>>,
}

pub struct VhostUserDevice {
    id: String,
    device_type: u32,
    link: SharedLink,
    queue_sizes: Vec<u16>,
    /// Offered to the driver.
    features: u64,
    config: Vec<u8>,
    /// virtio-net's control queue, served here (its index).
    ctrl_queue: Option<u16>,
    pending_config: Arc<PendingConfig>,
    config_signal: Arc<EventFd>,
    relay: Option<RelayHandle>,
    /// The backend's own state, taken when the device stopped for a
    /// snapshot (backends with DEVICE_STATE).
    backend_state: Option<Vec<u8>>,
    /// Why that stop left no state a restore could go on from.
    state_refusal: Option<String>,
}

/// `save_device_state`'s first byte when the backend's state follows.
const WITH_BACKEND_STATE: u8 = 1;

struct RelayHandle {
    kill: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            if let Err(e) = self.kill.write(1) {
                log::error!("vhost-user relay: cannot stop the thread: {e}; it is left running");
                return;
            }
            if thread.join().is_err() {
                log::error!("vhost-user relay: the thread panicked");
            }
        }
    }
}

impl VhostUserDevice {
    /// A device on `link` (already connected and negotiated).
    pub fn new(spec: &DeviceSpec, link: SharedLink) -> std::io::Result<VhostUserDevice> {
        let (features, backend_config) = {
            let link = Link::lock(&link);
            (link.features(), link.config().to_vec())
        };
        let size = spec.queue_size;
        let (device_type, queue_sizes, features, config, ctrl_queue) = match &spec.personality {
            Personality::Block { num_queues } => {
                let mut config = backend_config;
                config.resize(BLK_CONFIG_LEN, 0);
                let queues = u16::try_from(*num_queues).unwrap_or(u16::MAX);
                config[BLK_NUM_QUEUES_OFFSET..BLK_NUM_QUEUES_OFFSET + 2]
                    .copy_from_slice(&queues.to_le_bytes());
                (
                    TYPE_BLOCK,
                    vec![size; *num_queues],
                    features & !link::PROTOCOL_FEATURES,
                    config,
                    None,
                )
            }
            Personality::Net {
                pairs, mac, mtu, ..
            } => {
                let mut config = vec![0u8; NET_CONFIG_LEN];
                config[..6].copy_from_slice(mac);
                let mut features = (features & !link::PROTOCOL_FEATURES) | F_MAC;
                if *pairs > 1 {
                    let pairs = u16::try_from(*pairs).unwrap_or(u16::MAX);
                    config[8..10].copy_from_slice(&pairs.to_le_bytes());
                } else {
                    features &= !F_MQ;
                }
                if let Some(mtu) = mtu {
                    config[10..12].copy_from_slice(&mtu.to_le_bytes());
                }
                let mut sizes = vec![size; pairs * 2];
                // The control queue is the VMM's: the backend only moves frames.
                let ctrl_queue = if features & F_CTRL_VQ != 0 {
                    sizes.push(size);
                    Some((pairs * 2) as u16)
                } else {
                    None
                };
                (TYPE_NET, sizes, features, config, ctrl_queue)
            }
            Personality::Fs {
                tag,
                request_queues,
            } => {
                let mut config = vec![0u8; FS_TAG_LEN + 4];
                let bytes = tag.as_bytes();
                let n = bytes.len().min(FS_TAG_LEN);
                config[..n].copy_from_slice(&bytes[..n]);
                let queues = u32::try_from(*request_queues).unwrap_or(u32::MAX);
                config[FS_TAG_LEN..].copy_from_slice(&queues.to_le_bytes());
                (
                    TYPE_FS,
                    vec![size; 1 + request_queues],
                    features & !link::PROTOCOL_FEATURES,
                    config,
                    None,
                )
            }
        };
        Ok(VhostUserDevice {
            id: spec.id.clone(),
            device_type,
            link,
            queue_sizes,
            features,
            config,
            ctrl_queue,
            pending_config: Arc::new(PendingConfig::default()),
            config_signal: Arc::new(EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?),
            relay: None,
            backend_state: None,
            state_refusal: None,
        })
    }
}

impl VirtioDevice for VhostUserDevice {
    fn device_type(&self) -> u32 {
        self.device_type
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        self.queue_sizes.clone()
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // virtio-blk's writeback byte is the one writable field.
        if self.device_type != TYPE_BLOCK
            || offset != BLK_WRITEBACK_OFFSET
            || data.len() != 1
            || self.features & BLK_F_CONFIG_WCE == 0
        {
            return;
        }
        self.config[BLK_WRITEBACK_OFFSET as usize] = data[0];
        *self
            .pending_config
            .write
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some((offset as u32, data.to_vec()));
        // The relay sends it; without one it goes at the next start.
        let _ = self.config_signal.write(1);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let kill = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(|e| ActivateError::io("eventfd", e))?;
        let mut rings = Vec::new();
        let mut ctrl = None;
        for active in activation.queues {
            if Some(active.index) == self.ctrl_queue {
                ctrl = Some(CtrlQueue {
                    index: active.index,
                    queue: active.queue,
                    kick: active.kick,
                    pairs: (self.ctrl_queue.unwrap_or(0) / 2).max(1),
                    acked: activation.acked_features,
                });
                continue;
            }
            // The vector's irqfd when the transport has one: the backend's
            // signal reaches the guest with no VMM thread in between.
            let (call, relayed) = match activation.interrupt.queue_irqfd(active.index) {
                Some(irqfd) => (irqfd, false),
                None => (
                    EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
                        .map_err(|e| ActivateError::io("eventfd", e))?,
                    true,
                ),
            };
            rings.push(Ring {
                index: active.index,
                size: active.queue.size(),
                desc: GuestAddress(active.queue.desc_table()),
                avail: GuestAddress(active.queue.avail_ring()),
                used: GuestAddress(active.queue.used_ring()),
                base: AtomicU16::new(active.queue.next_avail()),
                kick: active.kick,
                call,
                relayed,
            });
        }
        let relay = Relay {
            id: self.id.clone(),
            link: self.link.clone(),
            memory: activation.memory,
            interrupt: activation.interrupt,
            driver_features: activation.acked_features,
            rings,
            ctrl,
            pending_config: self.pending_config.clone(),
            config_signal: self.config_signal.clone(),
            kill: kill
                .try_clone()
                .map_err(|e| ActivateError::io("eventfd", e))?,
            lost_since: None,
            gave_up: false,
            stream_registered: None,
            server: Link::lock(&self.link).is_server(),
        };
        let epoll = relay
            .epoll()
            .map_err(|e| ActivateError::io("vhost-user relay epoll", e))?;
        let thread = activation
            .spawner
            .spawn(
                format!("{}_vu", self.id),
                ThreadKind::VhostUser,
                move || relay.run(epoll),
            )
            .map_err(|e| ActivateError::io("vhost-user relay thread", e))?;
        self.relay = Some(RelayHandle {
            kill,
            thread: Some(thread),
        });
        Ok(())
    }

    fn reset(&mut self) {
        // Dropping the handle stops the relay, which stops the rings.
        self.relay = None;
    }

    /// Stops the rings (the backend answers GET_VRING_BASE once it has
    /// finished what it took), then takes the backend's own state where it
    /// gives it. A virtio-fs backend's is needed: the guest's open files
    /// live there.
    fn stop_quiesced(&mut self) {
        self.reset();
        self.backend_state = None;
        self.state_refusal = None;
        let mut link = Link::lock(&self.link);
        let needed = self.device_type == TYPE_FS;
        if !link.connected() {
            if needed {
                self.state_refusal = Some(format!(
                    "{}: its vhost-user backend is not connected, so its state cannot be saved",
                    self.id
                ));
            }
        } else if link.transfers_state() {
            match link.save_state() {
                Ok(state) => self.backend_state = Some(state),
                Err(e) => self.state_refusal = Some(e.to_string()),
            }
        } else if needed {
            let socket = link.wanted().socket.clone();
            self.state_refusal = Some(format!(
                "{}: the vhost-user backend at {socket} cannot give its state (protocol \
                 feature DEVICE_STATE; virtiofsd has it from version 1.11), which holds the \
                 guest's open files",
                self.id
            ));
        }
    }

    fn snapshot_refusal(&self) -> Option<String> {
        self.state_refusal.clone()
    }

    fn save_device_state(&self) -> Vec<u8> {
        match &self.backend_state {
            Some(state) => {
                let mut bytes = Vec::with_capacity(1 + state.len());
                bytes.push(WITH_BACKEND_STATE);
                bytes.extend_from_slice(state);
                bytes
            }
            None => Vec::new(),
        }
    }

    /// Hands the new backend the state the snapshot holds, before its
    /// rings start.
    fn restore_device_state(&mut self, bytes: &[u8]) -> Result<(), String> {
        let Some((&tag, state)) = bytes.split_first() else {
            return Ok(());
        };
        if tag != WITH_BACKEND_STATE {
            return Err(format!("device state of unknown kind {tag}"));
        }
        let mut link = Link::lock(&self.link);
        if !link.transfers_state() {
            return Err(format!(
                "{}: the vhost-user backend at {} cannot take the state the snapshot holds \
                 (protocol feature DEVICE_STATE)",
                self.id,
                link.wanted().socket
            ));
        }
        link.load_state(state).map_err(|e| e.to_string())
    }
}

struct Ring {
    index: u16,
    size: u16,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    /// Where the backend starts in the available ring (the queue's position
    /// at activation; the used index when a backend comes back).
    base: AtomicU16,
    kick: EventFd,
    /// The backend's used-buffer signal: the vector's irqfd, or (relayed)
    /// an eventfd the relay turns into the interrupt.
    call: EventFd,
    relayed: bool,
}

/// virtio-net's control queue (virtio 1.2 §5.1.6.5), served by the relay:
/// with the frames in the backend there is nothing to change on the host,
/// so valid commands are acknowledged, as Cloud Hypervisor does.
struct CtrlQueue {
    index: u16,
    queue: Queue,
    kick: EventFd,
    pairs: u16,
    acked: u64,
}

const CTRL_OK: u8 = 0;
const CTRL_ERR: u8 = 1;
const CTRL_MQ: u8 = 4;
const CTRL_MQ_VQ_PAIRS_SET: u8 = 0;
const CTRL_GUEST_OFFLOADS: u8 = 5;
const CTRL_GUEST_OFFLOADS_SET: u8 = 0;
const F_CTRL_GUEST_OFFLOADS: u64 = 1 << 2;
/// The longest control command read (class, command and data).
const MAX_CTRL_COMMAND: usize = 64;

impl CtrlQueue {
    fn execute(&self, command: &[u8]) -> u8 {
        match command {
            [CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, lo, hi, ..] if self.acked & F_MQ != 0 => {
                let pairs = u16::from_le_bytes([*lo, *hi]);
                if (1..=self.pairs).contains(&pairs) {
                    CTRL_OK
                } else {
                    CTRL_ERR
                }
            }
            [CTRL_GUEST_OFFLOADS, CTRL_GUEST_OFFLOADS_SET, _, _, _, _, _, _, _, _, ..]
                if self.acked & F_CTRL_GUEST_OFFLOADS != 0 =>
            {
                CTRL_OK
            }
            _ => CTRL_ERR,
        }
    }

    /// Answers every available command; returns whether any was used.
    fn process(&mut self, memory: &GuestMemoryMmap) -> Result<bool, virtio_queue::Error> {
        let mut used = false;
        loop {
            self.queue.disable_notification(memory)?;
            while let Some(chain) = pop_chain(&mut self.queue, memory)? {
                let head = chain.head_index();
                let mut command = [0u8; MAX_CTRL_COMMAND];
                let mut filled = 0;
                let mut readable_ok = true;
                for descriptor in chain.clone().readable() {
                    let room = MAX_CTRL_COMMAND - filled;
                    let n = (descriptor.len() as usize).min(room);
                    if memory
                        .read_slice(&mut command[filled..filled + n], descriptor.addr())
                        .is_err()
                    {
                        readable_ok = false;
                        break;
                    }
                    filled += n;
                }
                let ack = if readable_ok {
                    self.execute(&command[..filled])
                } else {
                    CTRL_ERR
                };
                let written = chain
                    .writable()
                    .find(|d| d.len() >= 1)
                    .map_or(0, |d| u32::from(memory.write_obj(ack, d.addr()).is_ok()));
                self.queue.add_used(memory, head, written)?;
                used = true;
            }
            if !self.queue.enable_notification(memory)? {
                return Ok(used);
            }
        }
    }
}

/// The relay thread's state.
struct Relay {
    id: String,
    link: SharedLink,
    memory: GuestMemoryMmap,
    interrupt: Arc<dyn Interrupt>,
    driver_features: u64,
    rings: Vec<Ring>,
    ctrl: Option<CtrlQueue>,
    pending_config: Arc<PendingConfig>,
    config_signal: Arc<EventFd>,
    kill: EventFd,
    /// Disconnected since then, looking for the backend.
    lost_since: Option<Instant>,
    /// Client mode: the backend did not come back in time.
    gave_up: bool,
    stream_registered: Option<RawFd>,
    /// Server mode (the link's, fixed for its life).
    server: bool,
}

const TOKEN_KILL: u64 = u64::MAX;
const TOKEN_CTRL: u64 = u64::MAX - 1;
const TOKEN_STREAM: u64 = u64::MAX - 2;
const TOKEN_LISTENER: u64 = u64::MAX - 3;
const TOKEN_CONFIG: u64 = u64::MAX - 4;

impl Relay {
    fn epoll(&self) -> std::io::Result<Epoll> {
        let epoll = Epoll::new()?;
        let add = |fd: RawFd, token: u64| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
        };
        add(self.kill.as_raw_fd(), TOKEN_KILL)?;
        add(self.config_signal.as_raw_fd(), TOKEN_CONFIG)?;
        for (position, ring) in self.rings.iter().enumerate() {
            if ring.relayed {
                add(ring.call.as_raw_fd(), position as u64)?;
            }
        }
        if let Some(ctrl) = &self.ctrl {
            add(ctrl.kick.as_raw_fd(), TOKEN_CTRL)?;
        }
        if let Some(listener) = Link::lock(&self.link).listener_fd() {
            add(listener, TOKEN_LISTENER)?;
        }
        Ok(epoll)
    }

    fn run(mut self, epoll: Epoll) {
        if Link::lock(&self.link).connected() {
            self.start_rings(&epoll);
        } else {
            self.lost(&epoll, "the backend is not connected");
        }
        if let Some(ctrl) = &mut self.ctrl {
            // Commands the driver queued before its first kick reached us.
            let _ = ctrl.process(&self.memory);
        }
        let mut events = vec![EpollEvent::default(); 16];
        loop {
            let retrying = self.lost_since.is_some() && !self.gave_up && !self.server;
            let timeout = if retrying {
                RETRY_INTERVAL.as_millis() as i32
            } else {
                -1
            };
            let count = match epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    queue_failed(&self.id, 0, &e, &*self.interrupt);
                    return self.stop();
                }
            };
            if count == 0 && retrying {
                self.reconnect(&epoll);
                continue;
            }
            for event in &events[..count] {
                match event.data() {
                    TOKEN_KILL => return self.stop(),
                    TOKEN_CONFIG => {
                        let _ = self.config_signal.read();
                        self.send_config();
                    }
                    TOKEN_CTRL => self.serve_ctrl(),
                    TOKEN_STREAM => {
                        self.lost(&epoll, "the backend disconnected");
                    }
                    TOKEN_LISTENER => self.reconnect(&epoll),
                    position => {
                        if let Some(ring) = self.rings.get(position as usize) {
                            let _ = ring.call.read();
                            if let Err(e) = self.interrupt.signal_queue(ring.index) {
                                log::warn!("{}: queue {} interrupt lost: {e}", self.id, ring.index);
                            }
                        }
                    }
                }
            }
        }
    }

    fn serve_ctrl(&mut self) {
        let Some(ctrl) = &mut self.ctrl else {
            return;
        };
        let _ = ctrl.kick.read();
        match ctrl.process(&self.memory) {
            Ok(true) if ctrl.queue.needs_notification(&self.memory).unwrap_or(true) => {
                if let Err(e) = self.interrupt.signal_queue(ctrl.index) {
                    log::warn!("{}: control queue interrupt lost: {e}", self.id);
                }
            }
            Ok(_) => {}
            Err(e) => queue_failed(&self.id, ctrl.index, &e, &*self.interrupt),
        }
    }

    fn send_config(&self) {
        let pending = self
            .pending_config
            .write
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some((offset, data)) = pending else {
            return;
        };
        let mut link = Link::lock(&self.link);
        if !link.connected() {
            // Sent again once the backend is back.
            *self
                .pending_config
                .write
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some((offset, data));
            return;
        }
        if let Err(e) = link.set_config(offset, &data) {
            log::warn!("{}: configuration write not passed on: {e}", self.id);
        }
    }

    /// Hands the rings to the connected backend; a failure there counts as
    /// a lost backend.
    fn start_rings(&mut self, epoll: &Epoll) {
        let started = {
            let mut link = Link::lock(&self.link);
            let setups: Vec<RingSetup<'_>> = self
                .rings
                .iter()
                .map(|ring| RingSetup {
                    index: usize::from(ring.index),
                    size: ring.size,
                    desc: ring.desc,
                    avail: ring.avail,
                    used: ring.used,
                    base: ring.base.load(Ordering::Relaxed),
                    kick: &ring.kick,
                    call: &ring.call,
                })
                .collect();
            link.start(&self.memory, self.driver_features, &setups)
                .map(|()| link.stream_fd())
        };
        match started {
            Ok(stream) => {
                self.lost_since = None;
                self.gave_up = false;
                if let Some(fd) = stream {
                    self.watch_stream(epoll, fd);
                }
                // Buffers the guest added while no backend looked: the kick
                // may have been consumed by the one that went. Only those
                // rings: a backend may answer an idle kick with a used-buffer
                // signal (Cloud Hypervisor's do), a spurious interrupt.
                for ring in &self.rings {
                    if self.has_waiting_buffers(ring) {
                        let _ = ring.kick.write(1);
                    }
                }
                self.send_config();
            }
            Err(e @ link::LinkError::GuestRing { .. }) => {
                // The backend is fine; this driver's setup is not.
                queue_failed(&self.id, 0, &e, &*self.interrupt);
            }
            Err(e) => {
                log::warn!("{}: {e}", self.id);
                self.lost(epoll, "starting the rings failed");
            }
        }
    }

    fn watch_stream(&mut self, epoll: &Epoll, fd: RawFd) {
        self.unwatch_stream(epoll);
        let events = EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP;
        match epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(events, TOKEN_STREAM),
        ) {
            Ok(()) => self.stream_registered = Some(fd),
            Err(e) => log::warn!("{}: cannot watch the backend's socket: {e}", self.id),
        }
    }

    fn unwatch_stream(&mut self, epoll: &Epoll) {
        if let Some(fd) = self.stream_registered.take() {
            // Already gone from the epoll if the socket was closed.
            let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
    }

    /// The backend went (or never was): forget its connection and look for
    /// it again.
    fn lost(&mut self, epoll: &Epoll, why: &str) {
        self.unwatch_stream(epoll);
        let (socket, server) = {
            let mut link = Link::lock(&self.link);
            link.disconnect();
            (link.wanted().socket.clone(), link.is_server())
        };
        if self.lost_since.is_none() {
            if server {
                log::error!(
                    "{}: vhost-user backend on {socket}: {why}; waiting for it to connect again",
                    self.id
                );
            } else {
                log::error!(
                    "{}: vhost-user backend at {socket}: {why}; connecting again for up to {}s",
                    self.id,
                    CONNECT_WINDOW.as_secs()
                );
            }
            self.lost_since = Some(Instant::now());
        }
    }

    /// One attempt to get the backend back; on success its rings go on from
    /// the used rings' indices (what it had finished).
    fn reconnect(&mut self, epoll: &Epoll) {
        let attempt = {
            let mut link = Link::lock(&self.link);
            if link.connected() {
                // Server mode, a second backend knocking: turned away.
                if let Ok(Some(extra)) = link.try_connect() {
                    drop(extra);
                }
                return;
            }
            match link.try_connect() {
                Ok(Some(stream)) => link.attach(stream).map(|()| true),
                Ok(None) => Ok(false),
                Err(e) => {
                    log::debug!("{}: connecting the backend: {e}", self.id);
                    Ok(false)
                }
            }
        };
        match attempt {
            Ok(true) => {
                let mut bases = Vec::new();
                for ring in &self.rings {
                    let used_index = self.rewind(ring);
                    let avail = self
                        .memory
                        .read_obj::<u16>(ring.avail.unchecked_add(2))
                        .unwrap_or(0);
                    bases.push(format!("{}@{used_index} (available {avail})", ring.index));
                }
                log::info!(
                    "{}: vhost-user backend connected again; queues resume at their used \
                     indices ({})",
                    self.id,
                    bases.join(", ")
                );
                self.start_rings(epoll);
                return;
            }
            Ok(false) => {}
            Err(e) => {
                log::warn!("{}: {e}", self.id);
                Link::lock(&self.link).disconnect();
            }
        }
        let expired = self
            .lost_since
            .is_some_and(|since| since.elapsed() >= CONNECT_WINDOW);
        if expired && !self.server && !self.gave_up {
            self.gave_up = true;
            let socket = Link::lock(&self.link).wanted().socket.clone();
            let cause = format!(
                "the vhost-user backend at {socket} did not come back within {}s",
                CONNECT_WINDOW.as_secs()
            );
            queue_failed(&self.id, 0, &cause, &*self.interrupt);
        }
    }

    /// Whether the guest made buffers available past where the backend
    /// starts (an unreadable index counts as yes: better a spurious interrupt
    /// than a stalled queue).
    fn has_waiting_buffers(&self, ring: &Ring) -> bool {
        match self.memory.read_obj::<u16>(ring.avail.unchecked_add(2)) {
            Ok(avail_index) => avail_index != ring.base.load(Ordering::Relaxed),
            Err(_) => true,
        }
    }

    /// Before a new backend takes `ring` over: it starts at the used index
    /// (what the one that went had finished; requests it held are done
    /// again), and the notification suppression the old one left in the
    /// used ring is lifted, so the driver's next buffer is kicked.
    fn rewind(&self, ring: &Ring) -> u16 {
        let used_index = self
            .memory
            .read_obj::<u16>(ring.used.unchecked_add(2))
            .unwrap_or(0);
        ring.base.store(used_index, Ordering::Relaxed);
        // used.flags: VRING_USED_F_NO_NOTIFY off.
        let _ = self.memory.write_obj::<u16>(0, ring.used);
        if self.driver_features & F_RING_EVENT_IDX != 0 {
            // avail_event after the used elements: kick at the next buffer.
            let avail_index = self
                .memory
                .read_obj::<u16>(ring.avail.unchecked_add(2))
                .unwrap_or(0);
            let avail_event = ring.used.unchecked_add(4 + 8 * u64::from(ring.size));
            let _ = self.memory.write_obj::<u16>(avail_index, avail_event);
        }
        used_index
    }

    fn stop(self) {
        Link::lock(&self.link).stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::{guest_memory, Driver, WRITE};

    fn ctrl(acked: u64, driver: &mut Driver) -> CtrlQueue {
        let active = driver.activate(4, false);
        CtrlQueue {
            index: 4,
            queue: active.queue,
            kick: active.kick,
            pairs: 2,
            acked,
        }
    }

    /// Posts `command` and a status byte; returns (status written, used length).
    fn run(
        queue: &mut CtrlQueue,
        driver: &mut Driver,
        memory: &GuestMemoryMmap,
        command: &[u8],
    ) -> (u8, u32) {
        let data = driver.alloc(command.len() as u64, 8);
        let status = driver.alloc(1, 1);
        driver.write(data, command);
        driver.write(status, &[0xee]);
        driver.add_chain(&[(data, command.len() as u32, 0), (status, 1, WRITE)]);
        assert!(queue.process(memory).unwrap());
        let (_, len) = driver.last_used();
        (driver.byte(status), len)
    }

    #[test]
    fn control_commands_are_answered_within_what_was_negotiated() {
        let memory = guest_memory(1 << 20);
        let mut driver = Driver::new(&memory, 16, 0x1000);
        let mut queue = ctrl(F_MQ | F_CTRL_GUEST_OFFLOADS, &mut driver);
        let set_pairs = |n: u16| {
            let mut c = vec![CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET];
            c.extend_from_slice(&n.to_le_bytes());
            c
        };
        assert_eq!(
            run(&mut queue, &mut driver, &memory, &set_pairs(2)),
            (CTRL_OK, 1)
        );
        assert_eq!(
            run(&mut queue, &mut driver, &memory, &set_pairs(1)),
            (CTRL_OK, 1)
        );
        for bad in [0, 3, u16::MAX] {
            assert_eq!(
                run(&mut queue, &mut driver, &memory, &set_pairs(bad)).0,
                CTRL_ERR
            );
        }
        let offloads = [
            CTRL_GUEST_OFFLOADS,
            CTRL_GUEST_OFFLOADS_SET,
            1,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
        ];
        assert_eq!(run(&mut queue, &mut driver, &memory, &offloads).0, CTRL_OK);
        // Too short, unknown class.
        assert_eq!(
            run(&mut queue, &mut driver, &memory, &[CTRL_MQ, 0, 1]).0,
            CTRL_ERR
        );
        assert_eq!(
            run(&mut queue, &mut driver, &memory, &[9, 9, 9, 9]).0,
            CTRL_ERR
        );

        // Without MQ or GUEST_OFFLOADS negotiated, those commands fail.
        let mut driver = Driver::new(&memory, 16, 0x40000);
        let mut queue = ctrl(0, &mut driver);
        assert_eq!(
            run(&mut queue, &mut driver, &memory, &set_pairs(1)).0,
            CTRL_ERR
        );
        assert_eq!(run(&mut queue, &mut driver, &memory, &offloads).0, CTRL_ERR);
    }

    #[test]
    fn a_command_outside_guest_memory_is_refused_without_panicking() {
        let memory = guest_memory(1 << 20);
        let mut driver = Driver::new(&memory, 16, 0x1000);
        let mut queue = ctrl(F_MQ, &mut driver);
        let status = driver.alloc(1, 1);
        driver.add_chain(&[(0xfff_0000, 64, 0), (status, 1, WRITE)]);
        assert!(queue.process(&memory).unwrap());
        assert_eq!(driver.byte(status), CTRL_ERR);
        // A chain with no room for the status is used with length 0.
        let data = driver.alloc(4, 8);
        driver.add_chain(&[(data, 4, 0)]);
        assert!(queue.process(&memory).unwrap());
        assert_eq!(driver.last_used().1, 0);
    }

    #[test]
    fn what_each_device_asks_of_its_backend() {
        let spec = |personality| DeviceSpec {
            option: "--disk",
            id: "d".into(),
            socket: "/s".into(),
            server: false,
            queue_size: 128,
            personality,
        };
        let one = spec(Personality::Block { num_queues: 1 }).wanted();
        assert_eq!((one.queues, one.config_len), (1, BLK_CONFIG_LEN));
        assert_eq!(one.features & BLK_F_MQ, 0);
        assert!(one.protocol.contains(VhostUserProtocolFeatures::CONFIG));
        let four = spec(Personality::Block { num_queues: 4 }).wanted();
        assert_ne!(four.features & BLK_F_MQ, 0);
        let net = |offloads| {
            spec(Personality::Net {
                pairs: 2,
                mac: [0; 6],
                mtu: Some(1400),
                offloads,
            })
            .wanted()
        };
        let all = net(NetOffloads {
            csum: true,
            tso: true,
            ufo: true,
        });
        assert_eq!((all.queues, all.config_len), (4, 0));
        let expected = F_MQ | F_MTU | F_CTRL_VQ | F_CSUM | F_HOST_TSO4 | F_GUEST_UFO;
        assert_eq!(all.features & expected, expected);
        let no_tso = net(NetOffloads {
            csum: true,
            tso: false,
            ufo: true,
        });
        assert_eq!(
            no_tso.features & (F_HOST_TSO4 | F_GUEST_TSO6 | F_HOST_ECN),
            0
        );
        assert_ne!(no_tso.features & F_GUEST_UFO, 0);
        let no_csum = net(NetOffloads {
            csum: false,
            tso: true,
            ufo: true,
        });
        let offloads =
            F_CSUM | F_GUEST_CSUM | F_HOST_TSO4 | F_GUEST_TSO4 | F_HOST_UFO | F_GUEST_UFO;
        assert_eq!(no_csum.features & offloads, 0);
        let fs = spec(Personality::Fs {
            tag: "t".into(),
            request_queues: 1,
        })
        .wanted();
        assert_eq!(fs.queues, 2);
        for wanted in [one, all, fs] {
            assert_ne!(wanted.features & link::PROTOCOL_FEATURES, 0);
            assert!(wanted
                .protocol
                .contains(VhostUserProtocolFeatures::REPLY_ACK));
        }
    }
}
