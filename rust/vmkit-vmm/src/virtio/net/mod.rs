//! virtio-net (virtio 1.2 §5.1) on a Linux tap device, as Cloud
//! Hypervisor's `--net` builds it: receive/transmit queue pairs (one tap
//! queue and one worker thread each), a control queue, MAC, link status,
//! MTU, mergeable receive buffers, checksum/TSO/UFO offloads and a rate
//! limiter per direction.
//!
//! Queues: rx0, tx0, rx1, tx1, ..., then the control queue (index 2 × the
//! pairs in use: all of them with VIRTIO_NET_F_MQ, else one).
//!
//! Receive: a frame is read from the tap only when the previous one has
//! been placed, and is kept until the guest posts room for it; a frame that
//! can never fit (no MRG_RXBUF and a smaller buffer) is dropped and counted.
//! Transmit: each chain's device-readable part (virtio-net header first) is
//! one frame, written to the tap in one call. A malformed chain (memory
//! outside the guest, too short for a header, a descriptor loop) is returned
//! with length 0 and counted; nothing the guest writes makes a worker panic
//! or spin.
//!
//! Here: the device (features, config space, activation). `chain`: walking
//! descriptor chains. `rx`, `tx`, `ctrl`: the three kinds of queue. `pair`:
//! a queue pair's worker. `tap`: the tap device; `host`: opening and
//! configuring the taps for a `--net`. `timer`, `counters`.

mod chain;
mod counters;
mod ctrl;
mod host;
mod pair;
mod rx;
pub mod tap;
#[cfg(test)]
mod tests;
pub(crate) mod timer;
mod tx;

use crate::seccomp::ThreadKind;
use std::collections::BTreeMap;
use std::io;
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

use vmkit_config::{NetConfig, RateLimiterConfig};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

pub use self::counters::NetCounters;
use self::ctrl::{CtrlQueue, CtrlState};
use self::host::{adopt_taps, open_taps, HostError};
use self::pair::{PairContext, PairHandler, Role};
use self::rx::RxQueue;
use self::tap::{Tap, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO};
use self::timer::Timer;
use self::tx::TxQueue;
use super::worker::{self, Worker};
use super::{
    ActivateError, Activation, ActiveQueue, VirtioDevice, F_RING_EVENT_IDX, F_RING_INDIRECT_DESC,
    F_VERSION_1, TYPE_NET,
};
use crate::error::{ErrorKind, ModuleError, Result};
use crate::rate_limiter::RateLimiter;

/// Feature bits (virtio 1.2 §5.1.3).
pub const F_CSUM: u64 = 1 << 0;
pub const F_GUEST_CSUM: u64 = 1 << 1;
pub const F_CTRL_GUEST_OFFLOADS: u64 = 1 << 2;
pub const F_MTU: u64 = 1 << 3;
pub const F_MAC: u64 = 1 << 5;
pub const F_GUEST_TSO4: u64 = 1 << 7;
pub const F_GUEST_TSO6: u64 = 1 << 8;
pub const F_GUEST_ECN: u64 = 1 << 9;
pub const F_GUEST_UFO: u64 = 1 << 10;
pub const F_HOST_TSO4: u64 = 1 << 11;
pub const F_HOST_TSO6: u64 = 1 << 12;
pub const F_HOST_ECN: u64 = 1 << 13;
pub const F_HOST_UFO: u64 = 1 << 14;
pub const F_MRG_RXBUF: u64 = 1 << 15;
pub const F_STATUS: u64 = 1 << 16;
pub const F_CTRL_VQ: u64 = 1 << 17;
pub const F_MQ: u64 = 1 << 22;

/// The offloads the guest receives (what TUNSETOFFLOAD and the control
/// command VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET toggle).
pub const GUEST_OFFLOADS: u64 =
    F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6 | F_GUEST_ECN | F_GUEST_UFO;

/// `status` in the config space: the link is up.
const S_LINK_UP: u16 = 1;
/// Bytes of config space we fill: mac, status, max_virtqueue_pairs, mtu.
const CONFIG_LEN: usize = 12;

/// Largest frame accepted or delivered, virtio-net header included: 64 KiB
/// of (GSO) payload behind an Ethernet header and the 12-byte header.
pub const MAX_FRAME: usize = 65562;
const ETH_HLEN: usize = 14;
/// Frames one queue moves before the worker looks at its other events.
const BATCH: u32 = 256;

/// Why a virtio-net device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("Cannot create virtio-net device {id}: num_queues={num_queues} is too many")]
    TooManyQueues { id: String, num_queues: usize },
    #[error("Cannot create virtio-net device {id}")]
    Host {
        id: String,
        #[source]
        source: HostError,
    },
}

impl ModuleError for NetError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Device
    }
}

/// The features offered for `config` with `pairs` queue pairs, as Cloud
/// Hypervisor computes them: no checksum offload means no TSO or UFO either.
pub fn offered_features(config: &NetConfig, pairs: u16) -> u64 {
    let mut features = F_VERSION_1
        | F_RING_EVENT_IDX
        | F_RING_INDIRECT_DESC
        | F_MAC
        | F_STATUS
        | F_MRG_RXBUF
        | F_CTRL_VQ;
    if config.offload_csum {
        features |= F_CSUM | F_GUEST_CSUM | F_CTRL_GUEST_OFFLOADS;
        if config.offload_tso {
            features |=
                F_HOST_TSO4 | F_HOST_TSO6 | F_HOST_ECN | F_GUEST_TSO4 | F_GUEST_TSO6 | F_GUEST_ECN;
        }
        if config.offload_ufo {
            features |= F_HOST_UFO | F_GUEST_UFO;
        }
    }
    if config.mtu.is_some() {
        features |= F_MTU;
    }
    if pairs > 1 {
        features |= F_MQ;
    }
    features
}

/// TUNSETOFFLOAD flags for the guest offloads in `features`.
pub fn tun_offload_flags(features: u64) -> u32 {
    let mut flags = 0;
    if features & F_GUEST_CSUM != 0 {
        flags |= TUN_F_CSUM;
        if features & F_GUEST_TSO4 != 0 {
            flags |= TUN_F_TSO4;
        }
        if features & F_GUEST_TSO6 != 0 {
            flags |= TUN_F_TSO6;
        }
        if features & F_GUEST_ECN != 0 {
            flags |= TUN_F_TSO_ECN;
        }
        if features & F_GUEST_UFO != 0 {
            flags |= TUN_F_UFO;
        }
    }
    flags
}

/// Queue pairs for `num_queues` (one for 0 or 1).
fn queue_pairs(config: &NetConfig, id: &str) -> Result<u16> {
    Ok(u16::try_from((config.num_queues / 2).max(1))
        .ok()
        .filter(|&p| p <= 0x7fff)
        .ok_or_else(|| NetError::TooManyQueues {
            id: id.to_owned(),
            num_queues: config.num_queues,
        })?)
}

pub struct Net {
    id: String,
    /// One tap queue per queue pair.
    taps: Vec<Arc<Tap>>,
    pairs: u16,
    queue_size: u16,
    features: u64,
    config: [u8; CONFIG_LEN],
    rate_limiter: Option<RateLimiterConfig>,
    counters: Arc<NetCounters>,
    ctrl_state: Arc<CtrlState>,
    workers: Vec<Worker>,
}

impl Net {
    /// Opens (or creates, or adopts from `fds`) the tap and configures its
    /// host side as Cloud Hypervisor does.
    pub fn new(config: &NetConfig, id: &str) -> Result<Net> {
        let pairs = queue_pairs(config, id)?;
        let taps = open_taps(config, pairs).map_err(|source| NetError::Host {
            id: id.to_owned(),
            source,
        })?;
        Ok(Net::with_taps(config, id, pairs, taps))
    }

    /// A device over the tap queues a migration's sender handed over
    /// (see [`super::host::adopt_taps`]).
    pub fn adopt(config: &NetConfig, id: &str, fds: &[std::fs::File]) -> Result<Net> {
        let pairs = queue_pairs(config, id)?;
        let taps = adopt_taps(fds, pairs).map_err(|source| NetError::Host {
            id: id.to_owned(),
            source,
        })?;
        Ok(Net::with_taps(config, id, pairs, taps))
    }

    /// A device over a socketpair per queue pair (see `Tap::socketpair`)
    /// and the network ends of them, for the fuzz targets.
    #[cfg(feature = "fuzzing")]
    pub fn over_socketpairs(config: &NetConfig, id: &str) -> Result<(Net, Vec<std::fs::File>)> {
        let pairs = queue_pairs(config, id)?;
        let mut taps = Vec::new();
        let mut peers = Vec::new();
        for _ in 0..pairs {
            let (tap, peer) = Tap::socketpair().map_err(|source| NetError::Host {
                id: id.to_owned(),
                source: HostError::Tap {
                    what: "a socketpair".to_owned(),
                    source,
                },
            })?;
            taps.push(tap);
            peers.push(peer);
        }
        Ok((Net::with_taps(config, id, pairs, taps), peers))
    }

    fn with_taps(config: &NetConfig, id: &str, pairs: u16, taps: Vec<Tap>) -> Net {
        let mtu = match config.mtu {
            Some(mtu) => mtu,
            None => taps[0].mtu().unwrap_or(1500),
        };
        let mut space = [0u8; CONFIG_LEN];
        space[..6].copy_from_slice(&config.mac.0);
        space[6..8].copy_from_slice(&S_LINK_UP.to_le_bytes());
        space[8..10].copy_from_slice(&pairs.to_le_bytes());
        space[10..12].copy_from_slice(&mtu.to_le_bytes());
        // Until the driver asks for more, only the first pair gets frames.
        for tap in taps.iter().skip(1) {
            if let Err(e) = tap.set_attached(false) {
                log::warn!("{id}: cannot detach a tap queue of {}: {e}", tap.name());
            }
        }
        Net {
            id: id.to_owned(),
            taps: taps.into_iter().map(Arc::new).collect(),
            pairs,
            queue_size: config.queue_size,
            features: offered_features(config, pairs),
            config: space,
            rate_limiter: config.rate_limiter_config.clone(),
            counters: Arc::new(NetCounters::default()),
            ctrl_state: Arc::new(CtrlState::default()),
            workers: Vec::new(),
        }
    }

    /// The tap's interface name.
    pub fn tap_name(&self) -> &str {
        self.taps[0].name()
    }

    /// The counters, shared with the workers.
    pub fn counters_handle(&self) -> Arc<NetCounters> {
        Arc::clone(&self.counters)
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        // The pairs, then the control queue.
        vec![self.queue_size; 2 * usize::from(self.pairs) + 1]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Ok(offset) = usize::try_from(offset) else {
            return;
        };
        if offset < CONFIG_LEN {
            let n = data.len().min(CONFIG_LEN - offset);
            data[..n].copy_from_slice(&self.config[offset..offset + n]);
        }
    }

    fn activate(&mut self, activation: Activation) -> std::result::Result<(), ActivateError> {
        let acked = activation.acked_features;
        let pairs = if acked & F_MQ != 0 { self.pairs } else { 1 };
        let mut queues: BTreeMap<u16, ActiveQueue> = activation
            .queues
            .into_iter()
            .map(|q| (q.index, q))
            .collect();
        let mut ctrl = if acked & F_CTRL_VQ != 0 {
            queues.remove(&(2 * pairs))
        } else {
            None
        };
        // As the driver last set them (a restore, a resume after a snapshot).
        let in_use = self.ctrl_state.pairs(pairs);
        self.taps[0]
            .set_offload(tun_offload_flags(self.ctrl_state.offloads(acked)))
            .map_err(|e| ActivateError::io("TUNSETOFFLOAD", e))?;
        for (i, tap) in self.taps.iter().enumerate() {
            if let Err(e) = tap.set_attached(i < usize::from(in_use)) {
                log::warn!("{}: tap queue {i}: {e}", self.id);
            }
        }
        let limiter = self
            .rate_limiter
            .as_ref()
            .map(|c| RateLimiter::new(c, Instant::now()))
            .filter(|l| !l.is_unlimited());
        let mut workers = Vec::new();
        for pair in 0..pairs {
            let rx = queues.remove(&(2 * pair));
            let tx = queues.remove(&(2 * pair + 1));
            let ctrl_queue = if pair == 0 { ctrl.take() } else { None };
            if rx.is_none() && tx.is_none() && ctrl_queue.is_none() {
                continue;
            }
            let tap = Arc::clone(&self.taps[usize::from(pair)]);
            let start = || -> io::Result<Worker> {
                let mut kicks = Vec::new();
                let mut roles = Vec::new();
                let rx = rx.map(|q| {
                    kicks.push(q.kick);
                    roles.push(Role::Rx);
                    RxQueue {
                        index: q.index,
                        queue: q.queue,
                        mrg_rxbuf: acked & F_MRG_RXBUF != 0,
                        guest_csum: acked & F_GUEST_CSUM != 0,
                        frame: vec![0; MAX_FRAME],
                        len: 0,
                        admitted: false,
                        held: Vec::new(),
                        held_bytes: 0,
                        num_buffers_at: [None, None],
                        limiter: limiter.clone(),
                        throttled: false,
                        signalled: Wrapping(0),
                    }
                });
                let tx = tx.map(|q| {
                    kicks.push(q.kick);
                    roles.push(Role::Tx);
                    TxQueue {
                        index: q.index,
                        queue: q.queue,
                        frame: vec![0; MAX_FRAME],
                        pending: None,
                        limiter: limiter.clone(),
                    }
                });
                let ctrl = ctrl_queue.map(|q| {
                    kicks.push(q.kick);
                    roles.push(Role::Ctrl);
                    CtrlQueue {
                        index: q.index,
                        queue: q.queue,
                        taps: self.taps.clone(),
                        acked,
                        state: Arc::clone(&self.ctrl_state),
                    }
                });
                let tap_events = Epoll::new()?;
                tap_events.ctl(
                    ControlOperation::Add,
                    tap.as_raw_fd(),
                    EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, 0),
                )?;
                let handler = PairHandler {
                    ctx: PairContext {
                        device: self.id.clone(),
                        memory: activation.memory.clone(),
                        interrupt: Arc::clone(&activation.interrupt),
                        tap,
                        rx_timer: Timer::new()?,
                        tx_timer: Timer::new()?,
                        counters: Arc::clone(&self.counters),
                    },
                    rx,
                    tx,
                    ctrl,
                    roles,
                    tap_events,
                };
                worker::spawn(
                    &activation.spawner,
                    format!("{}_qp{pair}", self.id),
                    ThreadKind::Net,
                    kicks,
                    handler,
                )
            };
            match start() {
                Ok(worker) => workers.push(worker),
                Err(e) => {
                    drop(workers);
                    return Err(ActivateError::io(format!("queue pair {pair} worker"), e));
                }
            }
        }
        self.workers = workers;
        Ok(())
    }

    fn reset(&mut self) {
        // Dropping the workers stops and joins their threads.
        self.workers.clear();
        self.ctrl_state.clear();
    }

    fn stop_quiesced(&mut self) {
        for worker in &mut self.workers {
            worker.stop_quiesced();
        }
        // Not a reset: the driver's control settings stay.
        self.workers.clear();
    }

    fn save_device_state(&self) -> Vec<u8> {
        self.ctrl_state.save()
    }

    fn restore_device_state(&mut self, bytes: &[u8]) -> std::result::Result<(), String> {
        self.ctrl_state.load(bytes, self.pairs, self.features)
    }

    fn counters(&self) -> BTreeMap<&'static str, u64> {
        self.counters.snapshot()
    }

    fn handover_fds(&self) -> Vec<std::os::fd::RawFd> {
        self.taps.iter().map(|tap| tap.as_raw_fd()).collect()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.reset();
    }
}
