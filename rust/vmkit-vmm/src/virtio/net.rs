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

use std::collections::BTreeMap;
use std::io;
use std::num::Wrapping;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_config::{NetConfig, RateLimiterConfig};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::tap::{
    self, Tap, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO, VNET_HDR_LEN,
};
use super::worker::{self, Worker, WorkerHandler};
use super::{
    ActivateError, Activation, ActiveQueue, Interrupt, VirtioDevice, F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC, F_VERSION_1, TYPE_NET,
};
use crate::error::{Error, ErrorKind, Result};
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
/// A control command (class, command, data) larger than this is refused.
const MAX_CTRL_COMMAND: usize = 4096;

// Control queue (virtio 1.2 §5.1.6.5).
const CTRL_OK: u8 = 0;
const CTRL_ERR: u8 = 1;
const CTRL_MQ: u8 = 4;
const CTRL_MQ_VQ_PAIRS_SET: u8 = 0;
const CTRL_GUEST_OFFLOADS: u8 = 5;
const CTRL_GUEST_OFFLOADS_SET: u8 = 0;

/// Cloud Hypervisor's counters (`rx_bytes rx_frames tx_bytes tx_frames`,
/// payload bytes without the virtio-net header) plus what was dropped.
#[derive(Debug, Default)]
pub struct NetCounters {
    pub rx_bytes: AtomicU64,
    pub rx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub tx_frames: AtomicU64,
    /// Tap frames not delivered: no buffer could ever hold them, or they
    /// were shorter than a header, or the device was reset while one waited.
    pub rx_dropped: AtomicU64,
    /// Guest chains not sent: malformed, or refused by the tap.
    pub tx_dropped: AtomicU64,
    /// Receive chains returned unused because they were malformed.
    pub rx_bad_chains: AtomicU64,
}

impl NetCounters {
    /// The counters under Cloud Hypervisor's names.
    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        BTreeMap::from([
            ("rx_bytes", self.rx_bytes.load(Ordering::Relaxed)),
            ("rx_frames", self.rx_frames.load(Ordering::Relaxed)),
            ("tx_bytes", self.tx_bytes.load(Ordering::Relaxed)),
            ("tx_frames", self.tx_frames.load(Ordering::Relaxed)),
        ])
    }

    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
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
    workers: Vec<Worker>,
}

impl Net {
    /// Opens (or creates, or adopts from `fds`) the tap and configures its
    /// host side as Cloud Hypervisor does.
    pub fn new(config: &NetConfig, id: &str) -> Result<Net> {
        Net::build(config, id).map_err(|message| {
            Error::new(
                ErrorKind::Device,
                format!("Cannot create virtio-net device {id}: {message}"),
            )
        })
    }

    fn build(config: &NetConfig, id: &str) -> std::result::Result<Net, String> {
        let pairs = u16::try_from((config.num_queues / 2).max(1))
            .ok()
            .filter(|&p| p <= 0x7fff)
            .ok_or_else(|| format!("num_queues={} is too many", config.num_queues))?;
        let taps = open_taps(config, pairs)?;
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
                eprintln!(
                    "vmkit: {id}: cannot detach tap queue of {}: {e}",
                    tap.name()
                );
            }
        }
        Ok(Net {
            id: id.to_owned(),
            taps: taps.into_iter().map(Arc::new).collect(),
            pairs,
            queue_size: config.queue_size,
            features: offered_features(config, pairs),
            config: space,
            rate_limiter: config.rate_limiter_config.clone(),
            counters: Arc::new(NetCounters::default()),
            workers: Vec::new(),
        })
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

/// The taps for `config`: one queue per pair, from `fds` or opened by name.
fn open_taps(config: &NetConfig, pairs: u16) -> std::result::Result<Vec<Tap>, String> {
    if let Some(fds) = config.fds.as_ref().filter(|f| !f.is_empty()) {
        if fds.len() != usize::from(pairs) {
            return Err(format!(
                "fd={fds:?}: {} descriptors for {pairs} queue pairs (num_queues={})",
                fds.len(),
                config.num_queues
            ));
        }
        let taps = fds
            .iter()
            .map(|&fd| Tap::from_fd(fd).map_err(|e| format!("fd={fd}: {e}")))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        if let Some(mtu) = config.mtu {
            taps[0]
                .set_mtu(mtu)
                .map_err(|e| format!("mtu={mtu}: cannot set the MTU of {}: {e}", taps[0].name()))?;
        }
        return Ok(taps);
    }
    let (name, what) = match config.tap.as_deref() {
        Some(name) => (name, format!("tap={name}")),
        None => ("vmtap%d", "a new tap (vmtap%d)".to_owned()),
    };
    // A tap that existed keeps its addresses (Cloud Hypervisor's rule).
    let existed = config.tap.is_some() && tap::interface_exists(name);
    let multi_queue = pairs > 1;
    let first = Tap::open(name, multi_queue).map_err(|e| format!("{what}: {e}"))?;
    let ifname = first.name().to_owned();
    if !existed {
        first
            .set_ip(config.ip)
            .map_err(|e| format!("ip={}: cannot set the address of {ifname}: {e}", config.ip))?;
        first.set_netmask(config.mask).map_err(|e| {
            format!(
                "mask={}: cannot set the netmask of {ifname}: {e}",
                config.mask
            )
        })?;
    }
    if let Some(mac) = config.host_mac {
        first
            .set_mac(mac.0)
            .map_err(|e| format!("host_mac={mac}: cannot set the MAC of {ifname}: {e}"))?;
    }
    if let Some(mtu) = config.mtu {
        first
            .set_mtu(mtu)
            .map_err(|e| format!("mtu={mtu}: cannot set the MTU of {ifname}: {e}"))?;
    }
    first
        .up()
        .map_err(|e| format!("{what}: cannot bring {ifname} up: {e}"))?;
    let mut taps = vec![first];
    for _ in 1..pairs {
        taps.push(
            Tap::open(&ifname, true)
                .map_err(|e| format!("{what}: another queue of {ifname}: {e}"))?,
        );
    }
    Ok(taps)
}

/// A non-blocking CLOCK_MONOTONIC timerfd: wakes a throttled queue.
struct Timer(OwnedFd);

impl Timer {
    fn new() -> io::Result<Timer> {
        // SAFETY: timerfd_create(2); the result is checked and owned.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nobody else owns.
        Ok(Timer(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Fires once, `after` from now (at least 1 µs).
    fn arm(&self, after: Duration) {
        let after = after.max(Duration::from_micros(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: after.as_secs() as libc::time_t,
                tv_nsec: after.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: timerfd_settime(2) with a valid itimerspec on our timerfd.
        unsafe { libc::timerfd_settime(self.0.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
    }

    /// Consumes an expiry (non-blocking).
    fn clear(&self) {
        let mut count = [0u8; 8];
        // SAFETY: read(2) of 8 bytes into a local buffer of 8 bytes.
        unsafe { libc::read(self.0.as_raw_fd(), count.as_mut_ptr().cast(), 8) };
    }
}

/// Whether the driver asked for an interrupt for used entries `old..new`
/// (virtio 1.2 §2.7.10: `vring_need_event`), or always without EVENT_IDX.
fn need_event(memory: &GuestMemoryMmap, queue: &Queue, old: Wrapping<u16>) -> bool {
    if !queue.event_idx_enabled() {
        return true;
    }
    fence(Ordering::SeqCst);
    let new = Wrapping(queue.next_used());
    let addr = queue.avail_ring() + 4 + 2 * u64::from(queue.size());
    let Ok(event) = memory.read_obj::<u16>(GuestAddress(addr)) else {
        return true;
    };
    let event = Wrapping(u16::from_le(event));
    (new - event - Wrapping(1)).0 < (new - old).0
}

type Chain<'a> = DescriptorChain<&'a GuestMemoryMmap>;

/// Copies the chain's device-readable bytes into `buf`; None if the chain is
/// malformed: a descriptor outside guest memory, more bytes than `buf`, or a
/// chain that ends on a descriptor that says more follow (a loop cut off
/// after queue-size descriptors, a bad `next` index, a bad indirect table).
fn gather(memory: &GuestMemoryMmap, chain: Chain<'_>, buf: &mut [u8]) -> Option<usize> {
    let mut len = 0usize;
    let mut unfinished = false;
    for descriptor in chain {
        unfinished = descriptor.has_next();
        if descriptor.is_write_only() {
            continue;
        }
        let n = descriptor.len() as usize;
        let end = len.checked_add(n).filter(|&e| e <= buf.len())?;
        memory
            .read_slice(&mut buf[len..end], descriptor.addr())
            .ok()?;
        len = end;
    }
    (!unfinished).then_some(len)
}

/// Device-writable bytes of a chain, or None if it is cut off (see
/// [`gather`]); the walk is bounded by the queue size.
fn writable_capacity(chain: &Chain<'_>) -> Option<u64> {
    let mut capacity = 0u64;
    let mut unfinished = false;
    for descriptor in chain.clone() {
        unfinished = descriptor.has_next();
        if descriptor.is_write_only() {
            capacity += u64::from(descriptor.len());
        }
    }
    (!unfinished).then_some(capacity)
}

/// Where a receive chain's bytes went.
struct Filled {
    len: u32,
    /// Guest addresses of header bytes 10 and 11 (num_buffers), if this
    /// chain holds them.
    num_buffers: [Option<GuestAddress>; 2],
}

/// Writes `frame[start..]` into the chain's writable descriptors, as much as
/// fits; None if a descriptor lies outside guest memory.
fn fill(memory: &GuestMemoryMmap, chain: Chain<'_>, frame: &[u8], start: usize) -> Option<Filled> {
    let mut pos = start;
    let mut num_buffers = [None, None];
    for descriptor in chain.writable() {
        if pos == frame.len() {
            break;
        }
        let take = (descriptor.len() as usize).min(frame.len() - pos);
        memory
            .write_slice(&frame[pos..pos + take], descriptor.addr())
            .ok()?;
        for (k, slot) in num_buffers.iter_mut().enumerate() {
            let byte = 10 + k;
            if (pos..pos + take).contains(&byte) {
                *slot = descriptor
                    .addr()
                    .0
                    .checked_add((byte - pos) as u64)
                    .map(GuestAddress);
            }
        }
        pos += take;
    }
    Some(Filled {
        len: (pos - start) as u32,
        num_buffers,
    })
}

/// Receive side of a queue pair.
struct RxQueue {
    index: u16,
    queue: Queue,
    mrg_rxbuf: bool,
    /// VIRTIO_NET_F_GUEST_CSUM was negotiated: header flags pass through.
    guest_csum: bool,
    /// The frame read from the tap and not yet placed (`len` 0: none).
    frame: Vec<u8>,
    len: usize,
    /// The pending frame passed the rate limiter.
    admitted: bool,
    /// Chains holding the pending frame's first bytes (MRG_RXBUF), not yet
    /// returned: (head, bytes), and how much of the frame they hold.
    held: Vec<(u16, u32)>,
    held_bytes: usize,
    num_buffers_at: [Option<GuestAddress>; 2],
    limiter: Option<RateLimiter>,
    throttled: bool,
    /// `next_used` when the guest was last considered for an interrupt.
    signalled: Wrapping<u16>,
}

/// What became of the pending frame.
enum Placement {
    Delivered,
    /// Waits for the guest to post (more) buffers.
    NoRoom,
    /// Can never be delivered: dropped.
    Dropped,
}

impl RxQueue {
    /// Puts the pending frame in the guest's buffers.
    fn place(&mut self, memory: &GuestMemoryMmap, counters: &NetCounters) -> Placement {
        let len = self.len;
        if !self.guest_csum {
            // Without GUEST_CSUM the flags must be 0 (no DATA_VALID either).
            self.frame[0] = 0;
        }
        if self.mrg_rxbuf {
            return self.place_merged(memory, counters);
        }
        self.frame[10..12].copy_from_slice(&1u16.to_le_bytes());
        loop {
            let Some(chain) = self.queue.pop_descriptor_chain(memory) else {
                return Placement::NoRoom;
            };
            let head = chain.head_index();
            let capacity = match writable_capacity(&chain) {
                Some(capacity) if capacity > 0 => capacity,
                _ => {
                    self.return_bad(memory, head, counters);
                    continue;
                }
            };
            if capacity < len as u64 {
                // A smaller frame may use this buffer; this one never fits.
                self.queue.go_to_previous_position();
                return Placement::Dropped;
            }
            match fill(memory, chain, &self.frame[..len], 0) {
                Some(filled) => {
                    if self.queue.add_used(memory, head, filled.len).is_err() {
                        counters.rx_bad_chains.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    return Placement::Delivered;
                }
                None => self.return_bad(memory, head, counters),
            }
        }
    }

    fn place_merged(&mut self, memory: &GuestMemoryMmap, counters: &NetCounters) -> Placement {
        let len = self.len;
        if self.held.is_empty() {
            self.frame[10..12].copy_from_slice(&0u16.to_le_bytes());
        }
        while self.held_bytes < len {
            if self.held.len() >= usize::from(self.queue.size()) {
                // Every buffer the ring can hold is ours and the frame still
                // does not fit: give them back empty and drop it.
                for (head, _) in std::mem::take(&mut self.held) {
                    let _ = self.queue.add_used(memory, head, 0);
                }
                self.held_bytes = 0;
                return Placement::Dropped;
            }
            let Some(chain) = self.queue.pop_descriptor_chain(memory) else {
                return Placement::NoRoom;
            };
            let head = chain.head_index();
            // Each buffer must hold at least a header (virtio 1.2 §5.1.6.3.1).
            if writable_capacity(&chain).is_none_or(|c| c < VNET_HDR_LEN as u64) {
                self.return_bad(memory, head, counters);
                continue;
            }
            match fill(memory, chain, &self.frame[..len], self.held_bytes) {
                Some(filled) if filled.len > 0 => {
                    if self.held.is_empty() {
                        self.num_buffers_at = filled.num_buffers;
                    }
                    self.held.push((head, filled.len));
                    self.held_bytes += filled.len as usize;
                }
                _ => self.return_bad(memory, head, counters),
            }
        }
        let count = (self.held.len() as u16).to_le_bytes();
        for (addr, byte) in self.num_buffers_at.iter().zip(count) {
            if let Some(addr) = addr {
                let _ = memory.write_obj(byte, *addr);
            }
        }
        self.publish_held(memory);
        Placement::Delivered
    }

    /// Returns the held chains at once: the driver must see all of a
    /// frame's buffers when it sees the first (virtio 1.2 §5.1.6.4.2).
    fn publish_held(&mut self, memory: &GuestMemoryMmap) {
        let held = std::mem::take(&mut self.held);
        self.held_bytes = 0;
        let Some((&(last_head, last_len), rest)) = held.split_last() else {
            return;
        };
        let size = self.queue.size();
        let next = Wrapping(self.queue.next_used());
        for (i, &(head, len)) in rest.iter().enumerate() {
            let slot = (next + Wrapping(i as u16)).0 % size;
            let addr = self.queue.used_ring() + 4 + 8 * u64::from(slot);
            let mut elem = [0u8; 8];
            elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
            elem[4..].copy_from_slice(&len.to_le_bytes());
            let _ = memory.write_slice(&elem, GuestAddress(addr));
        }
        self.queue
            .set_next_used((next + Wrapping(rest.len() as u16)).0);
        // Writes the last element and publishes the index (Release).
        let _ = self.queue.add_used(memory, last_head, last_len);
    }

    fn return_bad(&mut self, memory: &GuestMemoryMmap, head: u16, counters: &NetCounters) {
        counters.rx_bad_chains.fetch_add(1, Ordering::Relaxed);
        let _ = self.queue.add_used(memory, head, 0);
    }
}

/// Transmit side of a queue pair.
struct TxQueue {
    index: u16,
    queue: Queue,
    frame: Vec<u8>,
    /// A chain popped and gathered but not yet sent: (head, bytes, admitted).
    pending: Option<(u16, usize, bool)>,
    limiter: Option<RateLimiter>,
}

enum TxOutcome {
    Sent,
    /// Rate limited or the tap is full: retried when the timer fires.
    Later,
    Failed,
}

/// The control queue (on the first pair's worker).
struct CtrlQueue {
    index: u16,
    queue: Queue,
    taps: Vec<Arc<Tap>>,
    acked: u64,
}

impl CtrlQueue {
    fn execute(&self, command: &[u8]) -> u8 {
        let [class, cmd, data @ ..] = command else {
            return CTRL_ERR;
        };
        match (*class, *cmd) {
            (CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET) if self.acked & F_MQ != 0 => {
                let Some(&[lo, hi]) = data.get(..2) else {
                    return CTRL_ERR;
                };
                let pairs = usize::from(u16::from_le_bytes([lo, hi]));
                if pairs == 0 || pairs > self.taps.len() {
                    return CTRL_ERR;
                }
                let mut status = CTRL_OK;
                for (i, tap) in self.taps.iter().enumerate() {
                    if tap.set_attached(i < pairs).is_err() {
                        status = CTRL_ERR;
                    }
                }
                status
            }
            (CTRL_GUEST_OFFLOADS, CTRL_GUEST_OFFLOADS_SET)
                if self.acked & F_CTRL_GUEST_OFFLOADS != 0 =>
            {
                let Some(bytes) = data.get(..8) else {
                    return CTRL_ERR;
                };
                let mut raw = [0u8; 8];
                raw.copy_from_slice(bytes);
                let offloads = u64::from_le_bytes(raw);
                if offloads & !(self.acked & GUEST_OFFLOADS) != 0 {
                    return CTRL_ERR;
                }
                match self.taps[0].set_offload(tun_offload_flags(offloads)) {
                    Ok(()) => CTRL_OK,
                    Err(_) => CTRL_ERR,
                }
            }
            _ => CTRL_ERR,
        }
    }

    fn process(&mut self, memory: &GuestMemoryMmap, interrupt: &dyn Interrupt) {
        let mut used = false;
        loop {
            if self.queue.disable_notification(memory).is_err() {
                break;
            }
            while let Some(chain) = self.queue.pop_descriptor_chain(memory) {
                let head = chain.head_index();
                let mut command = [0u8; MAX_CTRL_COMMAND];
                let ack = match gather(memory, chain.clone(), &mut command) {
                    Some(n) => self.execute(&command[..n]),
                    None => CTRL_ERR,
                };
                let written = chain
                    .writable()
                    .find(|d| d.len() >= 1)
                    .map_or(0, |d| u32::from(memory.write_obj(ack, d.addr()).is_ok()));
                if self.queue.add_used(memory, head, written).is_ok() {
                    used = true;
                }
            }
            if !matches!(self.queue.enable_notification(memory), Ok(true)) {
                break;
            }
        }
        if used && self.queue.needs_notification(memory).unwrap_or(true) {
            let _ = interrupt.signal_queue(self.index);
        }
    }
}

/// What a queue pair's queues share: guest memory, the interrupt, the tap
/// queue, the timers and the counters.
struct PairContext {
    memory: GuestMemoryMmap,
    interrupt: Arc<dyn Interrupt>,
    tap: Arc<Tap>,
    rx_timer: Timer,
    tx_timer: Timer,
    counters: Arc<NetCounters>,
}

impl RxQueue {
    /// Moves frames from the tap into the guest until the tap is drained,
    /// the guest has no room or the rate limiter says wait.
    fn process(&mut self, ctx: &PairContext) {
        let memory = &ctx.memory;
        let counters = &*ctx.counters;
        let _ = self.queue.disable_notification(memory);
        let mut budget = BATCH;
        loop {
            if self.len == 0 {
                if budget == 0 {
                    // Let the other queues and the kill event in; the timer
                    // brings us back (the tap gives no new edge for frames
                    // already queued).
                    ctx.rx_timer.arm(Duration::from_micros(1));
                    break;
                }
                budget -= 1;
                match ctx.tap.read(&mut self.frame) {
                    Ok(n) if n <= VNET_HDR_LEN => {
                        NetCounters::add(&counters.rx_dropped, 1);
                        continue;
                    }
                    Ok(n) => {
                        self.len = n;
                        self.admitted = false;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    // WouldBlock: drained (the next frame is a new edge);
                    // anything else (a detached queue): nothing to read.
                    Err(_) => break,
                }
            }
            if !self.admitted {
                if let Some(limiter) = self.limiter.as_mut() {
                    let bytes = (self.len - VNET_HDR_LEN) as u64;
                    if let Err(wait) = limiter.try_consume(1, bytes, Instant::now()) {
                        self.throttled = true;
                        ctx.rx_timer.arm(wait);
                        break;
                    }
                }
                self.admitted = true;
            }
            match self.place(memory, counters) {
                Placement::Delivered => {
                    NetCounters::add(&counters.rx_frames, 1);
                    NetCounters::add(&counters.rx_bytes, (self.len - VNET_HDR_LEN) as u64);
                    self.len = 0;
                }
                Placement::Dropped => {
                    NetCounters::add(&counters.rx_dropped, 1);
                    self.len = 0;
                }
                Placement::NoRoom => {
                    // Ask for a kick when buffers come; re-check for ones
                    // posted meanwhile.
                    match self.queue.enable_notification(memory) {
                        Ok(true) => {
                            let _ = self.queue.disable_notification(memory);
                            continue;
                        }
                        _ => break,
                    }
                }
            }
        }
        // Chains returned as malformed count too: the guest must see them.
        let next = Wrapping(self.queue.next_used());
        if next != self.signalled && need_event(memory, &self.queue, self.signalled) {
            let _ = ctx.interrupt.signal_queue(self.index);
        }
        self.signalled = next;
    }
}

impl TxQueue {
    /// Sends the gathered frame of `len` bytes, unless rate limited or the
    /// tap is full (then the timer is armed).
    fn send(&mut self, ctx: &PairContext, len: usize, admitted: &mut bool) -> TxOutcome {
        if !*admitted {
            if let Some(limiter) = self.limiter.as_mut() {
                let bytes = (len - VNET_HDR_LEN) as u64;
                if let Err(wait) = limiter.try_consume(1, bytes, Instant::now()) {
                    ctx.tx_timer.arm(wait);
                    return TxOutcome::Later;
                }
            }
            *admitted = true;
        }
        loop {
            match ctx.tap.write(&self.frame[..len]) {
                Ok(_) => {
                    NetCounters::add(&ctx.counters.tx_frames, 1);
                    NetCounters::add(&ctx.counters.tx_bytes, (len - VNET_HDR_LEN) as u64);
                    return TxOutcome::Sent;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ctx.tx_timer.arm(Duration::from_millis(1));
                    return TxOutcome::Later;
                }
                Err(_) => {
                    NetCounters::add(&ctx.counters.tx_dropped, 1);
                    return TxOutcome::Failed;
                }
            }
        }
    }

    /// Sends every chain the guest made available, the held-back one first.
    fn process(&mut self, ctx: &PairContext) {
        let memory = &ctx.memory;
        let mut used = false;
        if let Some((head, len, mut admitted)) = self.pending.take() {
            if let TxOutcome::Later = self.send(ctx, len, &mut admitted) {
                self.pending = Some((head, len, admitted));
                return;
            }
            used |= self.queue.add_used(memory, head, 0).is_ok();
        }
        let mut budget = BATCH;
        'drain: loop {
            if self.queue.disable_notification(memory).is_err() {
                break;
            }
            while let Some(chain) = self.queue.pop_descriptor_chain(memory) {
                if budget == 0 {
                    // Back after the other queues had a turn.
                    self.queue.go_to_previous_position();
                    ctx.tx_timer.arm(Duration::from_micros(1));
                    break 'drain;
                }
                budget -= 1;
                let head = chain.head_index();
                let len = match gather(memory, chain, &mut self.frame) {
                    Some(len) if len >= VNET_HDR_LEN + ETH_HLEN => len,
                    _ => {
                        NetCounters::add(&ctx.counters.tx_dropped, 1);
                        used |= self.queue.add_used(memory, head, 0).is_ok();
                        continue;
                    }
                };
                let mut admitted = false;
                if let TxOutcome::Later = self.send(ctx, len, &mut admitted) {
                    self.pending = Some((head, len, admitted));
                    break 'drain;
                }
                used |= self.queue.add_used(memory, head, 0).is_ok();
            }
            if !matches!(self.queue.enable_notification(memory), Ok(true)) {
                break;
            }
        }
        if used && self.queue.needs_notification(memory).unwrap_or(true) {
            let _ = ctx.interrupt.signal_queue(self.index);
        }
    }
}

#[derive(Clone, Copy)]
enum Role {
    Rx,
    Tx,
    Ctrl,
}

/// One queue pair's worker: its rx and tx queues, its tap queue and, for
/// the first pair, the control queue.
struct PairHandler {
    ctx: PairContext,
    rx: Option<RxQueue>,
    tx: Option<TxQueue>,
    ctrl: Option<CtrlQueue>,
    /// Which queue each kick (by position) belongs to.
    roles: Vec<Role>,
    /// The tap, edge-triggered: readable once per new frame, so a tap with
    /// frames we have no room for does not keep the worker spinning.
    tap_events: Epoll,
}

impl PairHandler {
    fn rx(&mut self) {
        if let Some(rx) = self.rx.as_mut().filter(|rx| !rx.throttled) {
            rx.process(&self.ctx);
        }
    }

    fn tx(&mut self) {
        if let Some(tx) = self.tx.as_mut() {
            tx.process(&self.ctx);
        }
    }
}

impl WorkerHandler for PairHandler {
    fn queue_notified(&mut self, index: usize) {
        match self.roles.get(index) {
            Some(Role::Rx) => self.rx(),
            // While a frame is held back, the timer resumes the queue.
            Some(Role::Tx) if self.tx.as_ref().is_some_and(|tx| tx.pending.is_none()) => self.tx(),
            Some(Role::Ctrl) => {
                if let Some(ctrl) = self.ctrl.as_mut() {
                    ctrl.process(&self.ctx.memory, &*self.ctx.interrupt);
                }
            }
            _ => {}
        }
    }

    fn extra_fds(&self) -> Vec<RawFd> {
        vec![
            self.tap_events.as_raw_fd(),
            self.ctx.rx_timer.0.as_raw_fd(),
            self.ctx.tx_timer.0.as_raw_fd(),
        ]
    }

    fn extra_ready(&mut self, index: usize) {
        match index {
            0 => {
                // Consumes the edge, so the outer epoll stops reporting it.
                let mut events = [EpollEvent::default(); 4];
                let _ = self.tap_events.wait(0, &mut events);
                self.rx();
            }
            1 => {
                self.ctx.rx_timer.clear();
                if let Some(rx) = self.rx.as_mut() {
                    rx.throttled = false;
                }
                self.rx();
            }
            _ => {
                self.ctx.tx_timer.clear();
                self.tx();
            }
        }
    }

    fn started(&mut self) {
        if let Some(ctrl) = self.ctrl.as_mut() {
            ctrl.process(&self.ctx.memory, &*self.ctx.interrupt);
        }
        self.tx();
        self.rx();
    }
}

impl Drop for PairHandler {
    fn drop(&mut self) {
        if self.rx.as_ref().is_some_and(|rx| rx.len > 0) {
            NetCounters::add(&self.ctx.counters.rx_dropped, 1);
        }
        if self.tx.as_ref().is_some_and(|tx| tx.pending.is_some()) {
            NetCounters::add(&self.ctx.counters.tx_dropped, 1);
        }
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
        self.taps[0]
            .set_offload(tun_offload_flags(acked))
            .map_err(|e| ActivateError(format!("TUNSETOFFLOAD: {e}")))?;
        for (i, tap) in self.taps.iter().enumerate() {
            if let Err(e) = tap.set_attached(i == 0) {
                eprintln!("vmkit: {}: tap queue {i}: {e}", self.id);
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
                worker::spawn(format!("{}_qp{pair}", self.id), kicks, handler)
            };
            match start() {
                Ok(worker) => workers.push(worker),
                Err(e) => {
                    drop(workers);
                    return Err(ActivateError(format!("queue pair {pair} worker: {e}")));
                }
            }
        }
        self.workers = workers;
        Ok(())
    }

    fn reset(&mut self) {
        // Dropping the workers stops and joins their threads.
        self.workers.clear();
    }

    fn counters(&self) -> BTreeMap<&'static str, u64> {
        self.counters.snapshot()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::sync::atomic::AtomicU32;
    use std::sync::Mutex;
    use vmm_sys_util::eventfd::EventFd;

    const QSIZE: u16 = 16;
    const MEM_SIZE: u64 = 0x40_0000;
    const F_DESC_NEXT: u16 = 1;
    const F_DESC_WRITE: u16 = 2;

    #[derive(Default)]
    struct Signals(Mutex<Vec<u16>>, AtomicU32);

    impl Interrupt for Signals {
        fn signal_queue(&self, queue: u16) -> std::io::Result<()> {
            self.0.lock().unwrap().push(queue);
            self.1.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn signal_config(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A split ring at `base` (descriptors), `base + 0x1000` (available),
    /// `base + 0x2000` (used), driven from the test as a driver would.
    struct Ring {
        base: u64,
        kick: EventFd,
        avail: u16,
        seen: u16,
    }

    impl Ring {
        /// Publishes `count` device-writable buffers of `len` bytes (64 KiB apart from 1 MiB).
        fn post_receive_buffers(&mut self, memory: &GuestMemoryMmap, count: u16, len: u32) {
            for i in 0..count {
                self.desc(
                    memory,
                    i,
                    0x100000 + u64::from(i) * 0x10000,
                    len,
                    F_DESC_WRITE,
                    0,
                );
                self.publish(memory, i);
            }
        }

        fn new(memory: &GuestMemoryMmap, index: u16, base: u64) -> (Ring, ActiveQueue) {
            let (active, kick) = crate::virtio::testing::ready_queue(memory, index, base, QSIZE);
            let ring = Ring {
                base,
                kick,
                avail: 0,
                seen: 0,
            };
            (ring, active)
        }

        fn desc(&self, m: &GuestMemoryMmap, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let at = self.base + 16 * u64::from(i);
            m.write_obj(addr, GuestAddress(at)).unwrap();
            m.write_obj(len, GuestAddress(at + 8)).unwrap();
            m.write_obj(flags, GuestAddress(at + 12)).unwrap();
            m.write_obj(next, GuestAddress(at + 14)).unwrap();
        }

        /// Makes chain `head` available and kicks.
        fn publish(&mut self, m: &GuestMemoryMmap, head: u16) {
            let slot = self.base + 0x1004 + 2 * u64::from(self.avail % QSIZE);
            m.write_obj(head, GuestAddress(slot)).unwrap();
            self.avail = self.avail.wrapping_add(1);
            m.write_obj(self.avail, GuestAddress(self.base + 0x1002))
                .unwrap();
            self.kick.write(1).unwrap();
        }

        fn used_idx(&self, m: &GuestMemoryMmap) -> u16 {
            m.read_obj(GuestAddress(self.base + 0x2002)).unwrap()
        }

        /// Waits for the next used element: (id, len).
        fn next_used(&mut self, m: &GuestMemoryMmap) -> (u16, u32) {
            let start = Instant::now();
            while self.used_idx(m) == self.seen {
                assert!(start.elapsed() < Duration::from_secs(5), "no used buffer");
                std::thread::sleep(Duration::from_millis(1));
            }
            let at = self.base + 0x2004 + 8 * u64::from(self.seen % QSIZE);
            let id: u32 = m.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = m.read_obj(GuestAddress(at + 4)).unwrap();
            self.seen = self.seen.wrapping_add(1);
            (id as u16, len)
        }

        /// No used element within `wait`.
        fn assert_idle(&self, m: &GuestMemoryMmap, wait: Duration) {
            std::thread::sleep(wait);
            assert_eq!(self.used_idx(m), self.seen, "unexpected used buffer");
        }
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
    }

    static TAP_SEQ: AtomicU32 = AtomicU32::new(0);

    /// A tap name unique to this process and test.
    fn tap_name() -> String {
        let n = TAP_SEQ.fetch_add(1, Ordering::SeqCst);
        format!("vmkt{}x{n}", std::process::id() % 100_000)
    }

    /// Whether taps can be made here; prints why not.
    fn taps_usable() -> bool {
        match Tap::open("vmtap%d", false) {
            Ok(_) => true,
            Err(e) => {
                println!("skipped: cannot create a tap here ({e})");
                false
            }
        }
    }

    fn net(options: &str) -> Net {
        let config = NetConfig::parse(options).unwrap();
        Net::new(&config, "_net0").unwrap()
    }

    /// A raw AF_PACKET socket on `ifname` (ETH_P_ALL), with a receive timeout.
    struct PacketSocket(OwnedFd);

    impl PacketSocket {
        fn open(ifname: &str) -> PacketSocket {
            let proto = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: socket(2); checked.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
            assert!(fd >= 0, "AF_PACKET: {}", io::Error::last_os_error());
            // SAFETY: fresh descriptor.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let name = std::ffi::CString::new(ifname).unwrap();
            // SAFETY: a NUL-terminated name.
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
            assert!(ifindex > 0, "no interface {ifname}");
            // SAFETY: sockaddr_ll is plain data.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = proto;
            addr.sll_ifindex = ifindex as i32;
            // SAFETY: bind with a sockaddr_ll of the right size.
            let ret = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&addr as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(ret, 0, "bind: {}", io::Error::last_os_error());
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 200_000,
            };
            // SAFETY: setsockopt with a timeval.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                )
            };
            PacketSocket(fd)
        }

        fn send(&self, frame: &[u8]) {
            // SAFETY: send(2) from a live buffer.
            let n =
                unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            assert_eq!(n, frame.len() as isize, "{}", io::Error::last_os_error());
        }

        /// The next frame with ethertype 0x88b5 and this payload prefix.
        fn expect(&self, prefix: &[u8]) -> Vec<u8> {
            let start = Instant::now();
            let mut buf = vec![0u8; 65536];
            while start.elapsed() < Duration::from_secs(5) {
                // SAFETY: recv(2) into a live buffer.
                let n = unsafe {
                    libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
                };
                if n >= ETH_HLEN as isize
                    && buf[12..14] == [0x88, 0xb5]
                    && buf[ETH_HLEN..n as usize].starts_with(prefix)
                {
                    return buf[..n as usize].to_vec();
                }
            }
            panic!("no frame {prefix:?} on the tap");
        }
    }

    const GUEST_MAC: [u8; 6] = [0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc];

    fn frame(src: [u8; 6], payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&src);
        f.extend_from_slice(&[0x88, 0xb5]);
        f.extend_from_slice(payload);
        f.resize(60.max(f.len()), 0);
        f
    }

    /// Activates `net` with rx0 (0x10000) and tx0 (0x20000) and, if asked,
    /// the control queue at index 2 (0x30000).
    /// A device on a fresh tap (`tap=<name>` plus `options`) with a packet
    /// socket on the host side and its first queue pair activated with `acked`;
    /// None where taps cannot be made.
    struct TapRig {
        net: Net,
        socket: PacketSocket,
        memory: GuestMemoryMmap,
        rx: Ring,
        tx: Ring,
        signals: Arc<Signals>,
    }

    fn tap_rig(options: &str, acked: u64) -> Option<TapRig> {
        if !taps_usable() {
            return None;
        }
        let name = tap_name();
        let separator = if options.is_empty() { "" } else { "," };
        let mut net = net(&format!("tap={name}{separator}{options}"));
        let socket = PacketSocket::open(&name);
        let memory = memory();
        let (rx, tx, signals) = activate(&mut net, &memory, acked);
        Some(TapRig {
            net,
            socket,
            memory,
            rx,
            tx,
            signals,
        })
    }

    fn activate(net: &mut Net, memory: &GuestMemoryMmap, acked: u64) -> (Ring, Ring, Arc<Signals>) {
        let (rx, rx_active) = Ring::new(memory, 0, 0x10000);
        let (tx, tx_active) = Ring::new(memory, 1, 0x20000);
        let signals = Arc::new(Signals::default());
        net.activate(Activation {
            memory: memory.clone(),
            interrupt: signals.clone(),
            queues: vec![rx_active, tx_active],
            acked_features: acked,
        })
        .unwrap();
        (rx, tx, signals)
    }

    /// Reads a received frame back from guest buffer `addr`.
    fn read(memory: &GuestMemoryMmap, addr: u64, len: u32) -> Vec<u8> {
        let mut buf = vec![0u8; len as usize];
        memory.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    /// Posts rx buffers of `size` bytes at 0x100000 + i * 0x10000 and waits
    /// for one holding a 0x88b5 frame that starts with `prefix`; returns
    /// the header and frame. Other traffic (IPv6 from the host) is skipped.
    fn receive(memory: &GuestMemoryMmap, rx: &mut Ring, prefix: &[u8]) -> (Vec<u8>, Vec<u8>) {
        loop {
            let (id, len) = rx.next_used(memory);
            let addr = 0x100000 + u64::from(id) * 0x10000;
            let data = read(memory, addr, len);
            if data.len() > VNET_HDR_LEN + ETH_HLEN
                && data[VNET_HDR_LEN + 12..VNET_HDR_LEN + 14] == [0x88, 0xb5]
                && data[VNET_HDR_LEN + ETH_HLEN..].starts_with(prefix)
            {
                return (data[..VNET_HDR_LEN].to_vec(), data[VNET_HDR_LEN..].to_vec());
            }
            // Not ours: give the buffer back.
            rx.publish(memory, id);
        }
    }

    #[test]
    fn features_follow_the_offload_toggles() {
        let offloads = F_CSUM
            | F_GUEST_CSUM
            | F_CTRL_GUEST_OFFLOADS
            | F_HOST_TSO4
            | F_HOST_TSO6
            | F_HOST_ECN
            | F_GUEST_TSO4
            | F_GUEST_TSO6
            | F_GUEST_ECN
            | F_HOST_UFO
            | F_GUEST_UFO;
        let base = F_VERSION_1
            | F_RING_EVENT_IDX
            | F_RING_INDIRECT_DESC
            | F_MAC
            | F_STATUS
            | F_MRG_RXBUF
            | F_CTRL_VQ;
        let features =
            |options: &str, pairs| offered_features(&NetConfig::parse(options).unwrap(), pairs);
        assert_eq!(features("", 1), base | offloads);
        // Checksum off turns every offload off, whatever tso/ufo say.
        assert_eq!(
            features("offload_csum=off,offload_tso=off,offload_ufo=off", 1),
            base
        );
        assert_eq!(
            features("offload_tso=off", 1),
            base | F_CSUM | F_GUEST_CSUM | F_CTRL_GUEST_OFFLOADS | F_HOST_UFO | F_GUEST_UFO
        );
        assert_eq!(
            features("offload_ufo=off", 1),
            base | offloads & !(F_HOST_UFO | F_GUEST_UFO)
        );
        assert_eq!(features("mtu=9000", 1), base | offloads | F_MTU);
        assert_eq!(features("num_queues=4", 2), base | offloads | F_MQ);

        assert_eq!(tun_offload_flags(0), 0);
        assert_eq!(tun_offload_flags(F_GUEST_TSO4), 0, "TSO needs checksums");
        assert_eq!(
            tun_offload_flags(GUEST_OFFLOADS),
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO
        );
        assert_eq!(
            tun_offload_flags(F_GUEST_CSUM | F_GUEST_TSO6),
            TUN_F_CSUM | TUN_F_TSO6
        );
    }

    #[test]
    fn config_space_and_queues() {
        if !taps_usable() {
            return;
        }
        let net = net("mac=12:34:56:78:9a:bc,mtu=1400,num_queues=4,queue_size=128");
        assert_eq!(net.device_type(), TYPE_NET);
        assert_eq!(net.queue_max_sizes(), vec![128; 5], "2 pairs and control");
        assert_ne!(net.features() & (F_MQ | F_MTU | F_CTRL_VQ), 0);
        let mut space = [0xffu8; 16];
        net.read_config(0, &mut space);
        assert_eq!(
            space,
            [0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 1, 0, 2, 0, 0x78, 0x05, 0, 0, 0, 0]
        );
        let mut status = [0u8; 2];
        net.read_config(6, &mut status);
        assert_eq!(u16::from_le_bytes(status), S_LINK_UP);
        let mut past = [0xffu8; 4];
        net.read_config(64, &mut past);
        assert_eq!(past, [0; 4]);
        net.read_config(u64::MAX, &mut past);
        assert_eq!(past, [0; 4]);
        // The host side got the MTU.
        assert_eq!(net.taps[0].mtu().unwrap(), 1400);
        assert_eq!(
            net.counters().keys().copied().collect::<Vec<_>>(),
            ["rx_bytes", "rx_frames", "tx_bytes", "tx_frames"]
        );
    }

    #[test]
    fn a_created_tap_is_configured_and_removed_with_the_device() {
        if !taps_usable() {
            return;
        }
        let net = net("ip=192.168.231.1,mask=255.255.255.0,host_mac=02:aa:bb:cc:dd:ee");
        let name = net.tap_name().to_owned();
        assert!(name.starts_with("vmtap"), "{name}");
        let sys = Path::new("/sys/class/net").join(&name);
        assert!(sys.exists());
        let flags = std::fs::read_to_string(sys.join("flags")).unwrap();
        let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap();
        assert_ne!(flags & 1, 0, "IFF_UP");
        assert_eq!(
            std::fs::read_to_string(sys.join("address")).unwrap().trim(),
            "02:aa:bb:cc:dd:ee"
        );
        drop(net);
        assert!(!sys.exists(), "{name} outlived the device");
    }

    #[test]
    fn bad_taps_and_fds_are_refused_by_name() {
        if !taps_usable() {
            return;
        }
        let long = NetConfig::parse("tap=averyveryverylongname").unwrap();
        let e = Net::new(&long, "_net0").err().unwrap();
        assert!(e.message.contains("tap=averyveryverylongname"), "{e}");
        assert!(e.message.contains("at most 15 bytes"), "{e}");
        let lo = NetConfig::parse("tap=lo").unwrap();
        let e = Net::new(&lo, "_net0").err().unwrap();
        assert!(e.message.contains("tap=lo: TUNSETIFF"), "{e}");
        assert!(e.message.contains("not a tap"), "{e}");

        let file = std::fs::File::open("/dev/null").unwrap();
        let fd = file.as_raw_fd();
        let e = Net::new(&NetConfig::parse(&format!("fd=[{fd}]")).unwrap(), "x")
            .err()
            .unwrap();
        assert!(
            e.message.contains(&format!("fd={fd}: not a tap device")),
            "{e}"
        );
        let e = Net::new(&NetConfig::parse("fd=[999999]").unwrap(), "x")
            .err()
            .unwrap();
        assert!(e.message.contains("fd=999999"), "{e}");

        // A tap descriptor opened by the caller is adopted (duplicated).
        let name = tap_name();
        let mine = Tap::open(&name, false).unwrap();
        let config = NetConfig::parse(&format!("fd=[{}]", mine.as_raw_fd())).unwrap();
        let adopted = Net::new(&config, "x").unwrap();
        assert_eq!(adopted.tap_name(), name);
        drop(adopted);
        assert!(
            tap::interface_exists(&name),
            "the caller's descriptor still holds it"
        );
    }

    #[test]
    fn frames_go_both_ways_through_a_tap() {
        let acked = F_VERSION_1 | F_MAC | F_RING_EVENT_IDX;
        let Some(TapRig {
            mut net,
            socket,
            memory,
            mut rx,
            mut tx,
            signals,
        }) = tap_rig("mac=12:34:56:78:9a:bc", acked)
        else {
            return;
        };

        // Transmit: header and frame in two descriptors.
        let out = frame(GUEST_MAC, b"vmkit-unit tx");
        memory.write_slice(&[0; 12], GuestAddress(0x50000)).unwrap();
        memory.write_slice(&out, GuestAddress(0x51000)).unwrap();
        tx.desc(&memory, 0, 0x50000, 12, F_DESC_NEXT, 1);
        tx.desc(&memory, 1, 0x51000, out.len() as u32, 0, 0);
        tx.publish(&memory, 0);
        assert_eq!(tx.next_used(&memory), (0, 0));
        assert_eq!(socket.expect(b"vmkit-unit tx"), out);
        assert!(signals.0.lock().unwrap().contains(&1));

        // The same through an indirect table of two descriptors.
        let indirect = frame(GUEST_MAC, b"vmkit-unit indirect");
        memory
            .write_slice(&indirect, GuestAddress(0x52000))
            .unwrap();
        let table = [(0x50000u64, 12u32, F_DESC_NEXT, 1u16), (0x52000, 60, 0, 0)];
        for (i, (addr, len, flags, next)) in table.into_iter().enumerate() {
            let at = 0x53000 + 16 * i as u64;
            memory.write_obj(addr, GuestAddress(at)).unwrap();
            memory.write_obj(len, GuestAddress(at + 8)).unwrap();
            memory.write_obj(flags, GuestAddress(at + 12)).unwrap();
            memory.write_obj(next, GuestAddress(at + 14)).unwrap();
        }
        tx.desc(&memory, 2, 0x53000, 32, 4, 0);
        tx.publish(&memory, 2);
        assert_eq!(tx.next_used(&memory), (2, 0));
        assert_eq!(socket.expect(b"vmkit-unit indirect"), indirect);

        // Receive: the frame lands with a header (num_buffers 1).
        rx.post_receive_buffers(&memory, 4, 2048);
        let back = frame([2, 0, 0, 0, 0, 1], b"vmkit-unit rx");
        socket.send(&back);
        let (header, got) = receive(&memory, &mut rx, b"vmkit-unit rx");
        assert_eq!(got, back);
        assert_eq!(header[10..12], [1, 0], "num_buffers");
        assert_eq!(header[0], 0, "no flags without GUEST_CSUM");
        assert!(signals.0.lock().unwrap().contains(&0));

        let counters = net.counters();
        assert_eq!((counters["tx_frames"], counters["tx_bytes"]), (2, 120));
        assert!(counters["rx_frames"] >= 1 && counters["rx_bytes"] >= 60);

        // A reset stops the workers; the device starts again.
        net.reset();
        assert!(net.workers.is_empty());
        let memory = self::memory();
        let (_rx, mut tx, _) = activate(&mut net, &memory, F_VERSION_1 | F_MAC);
        memory.write_slice(&[0; 12], GuestAddress(0x50000)).unwrap();
        let again = frame(GUEST_MAC, b"vmkit-unit again");
        memory.write_slice(&again, GuestAddress(0x5000c)).unwrap();
        tx.desc(&memory, 3, 0x50000, 12 + again.len() as u32, 0, 0);
        tx.publish(&memory, 3);
        assert_eq!(tx.next_used(&memory), (3, 0));
        socket.expect(b"vmkit-unit again");
        assert_eq!(net.counters()["tx_frames"], 3);
    }

    #[test]
    fn mergeable_buffers_spread_a_frame() {
        let Some(TapRig {
            net: _net,
            socket,
            memory,
            mut rx,
            ..
        }) = tap_rig("", F_VERSION_1 | F_MRG_RXBUF)
        else {
            return;
        };
        // 1000-byte frame, 400-byte buffers: 1012 bytes in 3 buffers.
        let big = frame([2, 0, 0, 0, 0, 2], &[b'm'; 986]);
        assert_eq!(big.len(), 1000);
        rx.post_receive_buffers(&memory, QSIZE, 400);
        socket.send(&big);
        let start = Instant::now();
        loop {
            assert!(start.elapsed() < Duration::from_secs(5), "frame not seen");
            let (id, len) = rx.next_used(&memory);
            let data = read(&memory, 0x100000 + u64::from(id) * 0x10000, len);
            let num_buffers = u16::from_le_bytes([data[10], data[11]]);
            let mut whole = data[VNET_HDR_LEN..].to_vec();
            // The other buffers of the frame are already published.
            for _ in 1..num_buffers {
                assert_ne!(rx.used_idx(&memory), rx.seen, "buffers published late");
                let (id, len) = rx.next_used(&memory);
                whole.extend(read(&memory, 0x100000 + u64::from(id) * 0x10000, len));
            }
            if whole == big {
                assert_eq!(num_buffers, 3);
                break;
            }
        }
    }

    #[test]
    fn malformed_chains_are_returned_empty() {
        let Some(TapRig {
            net,
            socket,
            memory,
            mut rx,
            mut tx,
            ..
        }) = tap_rig("", F_VERSION_1)
        else {
            return;
        };

        // Transmit: outside guest memory, a header cut short, a descriptor
        // loop, a next index past the ring, an address that wraps.
        tx.desc(&memory, 0, MEM_SIZE - 8, 64, 0, 0);
        tx.publish(&memory, 0);
        assert_eq!(tx.next_used(&memory), (0, 0));
        tx.desc(&memory, 1, 0x50000, 5, 0, 0);
        tx.publish(&memory, 1);
        assert_eq!(tx.next_used(&memory), (1, 0));
        tx.desc(&memory, 2, 0x50000, 100, F_DESC_NEXT, 3);
        tx.desc(&memory, 3, 0x50000, 100, F_DESC_NEXT, 2);
        tx.publish(&memory, 2);
        assert_eq!(tx.next_used(&memory), (2, 0));
        tx.desc(&memory, 4, 0x50000, 100, F_DESC_NEXT, 999);
        tx.publish(&memory, 4);
        assert_eq!(tx.next_used(&memory), (4, 0));
        tx.desc(&memory, 5, u64::MAX - 4, 100, 0, 0);
        tx.publish(&memory, 5);
        assert_eq!(tx.next_used(&memory), (5, 0));
        assert_eq!(net.counters()["tx_frames"], 0);
        assert_eq!(net.counters_handle().tx_dropped.load(Ordering::SeqCst), 5);

        // Receive: a buffer outside memory and a looping one come back
        // empty; the frame lands in the good one after them.
        rx.desc(&memory, 0, MEM_SIZE - 16, 2048, F_DESC_WRITE, 0);
        rx.desc(&memory, 1, 0x100000, 100, F_DESC_WRITE | F_DESC_NEXT, 2);
        rx.desc(&memory, 2, 0x100000, 100, F_DESC_WRITE | F_DESC_NEXT, 1);
        rx.desc(&memory, 3, 0x130000, 2048, F_DESC_WRITE, 0);
        for head in [0, 1, 3] {
            rx.publish(&memory, head);
        }
        let ping = frame([2, 0, 0, 0, 0, 3], b"vmkit-unit after bad");
        // The host may send its own traffic first: keep sending ours.
        let mut seen_bad = 0;
        let mut delivered = false;
        let start = Instant::now();
        socket.send(&ping);
        while !delivered {
            assert!(start.elapsed() < Duration::from_secs(5));
            let (id, len) = rx.next_used(&memory);
            match id {
                0 | 1 => {
                    assert_eq!(len, 0);
                    seen_bad += 1;
                }
                3 => {
                    let data = read(&memory, 0x130000, len);
                    if data[VNET_HDR_LEN..].starts_with(&ping) {
                        delivered = true;
                    } else {
                        rx.publish(&memory, 3);
                    }
                }
                other => panic!("unexpected id {other}"),
            }
        }
        assert_eq!(seen_bad, 2);

        // A frame larger than every buffer (no MRG_RXBUF) is dropped, and
        // the buffer serves the next frame.
        rx.desc(&memory, 4, 0x140000, 200, F_DESC_WRITE, 0);
        rx.publish(&memory, 4);
        socket.send(&frame([2, 0, 0, 0, 0, 3], &[b'x'; 400]));
        let small = frame([2, 0, 0, 0, 0, 3], b"vmkit-unit small");
        socket.send(&small);
        loop {
            let (id, len) = rx.next_used(&memory);
            assert_eq!(id, 4);
            let data = read(&memory, 0x140000, len);
            if data[VNET_HDR_LEN..].starts_with(&small) {
                break;
            }
            rx.publish(&memory, 4);
        }
        assert!(net.counters_handle().rx_dropped.load(Ordering::SeqCst) >= 1);
        // The device is still working: nothing pending, nothing spinning.
        rx.assert_idle(&memory, Duration::from_millis(50));
    }

    #[test]
    fn control_queue_sets_pairs_and_offloads() {
        if !taps_usable() {
            return;
        }
        let name = tap_name();
        let mut net = net(&format!("tap={name},num_queues=4"));
        assert_eq!(net.taps.len(), 2);
        let memory = memory();
        let acked = F_VERSION_1 | F_MQ | F_CTRL_VQ | F_CTRL_GUEST_OFFLOADS | F_GUEST_CSUM;
        let mut queues = Vec::new();
        let mut rings = Vec::new();
        for index in 0..5u16 {
            let (ring, active) = Ring::new(&memory, index, 0x10000 * (u64::from(index) + 1));
            rings.push(ring);
            queues.push(active);
        }
        net.activate(Activation {
            memory: memory.clone(),
            interrupt: Arc::new(Signals::default()),
            queues,
            acked_features: acked,
        })
        .unwrap();
        assert_eq!(net.workers.len(), 2, "one worker per pair");
        let ctrl = &mut rings[4];
        let command = |ctrl: &mut Ring, bytes: &[u8]| -> u8 {
            memory.write_slice(bytes, GuestAddress(0x80000)).unwrap();
            memory.write_obj(0xeeu8, GuestAddress(0x81000)).unwrap();
            ctrl.desc(&memory, 0, 0x80000, bytes.len() as u32, F_DESC_NEXT, 1);
            ctrl.desc(&memory, 1, 0x81000, 1, F_DESC_WRITE, 0);
            ctrl.publish(&memory, 0);
            assert_eq!(ctrl.next_used(&memory), (0, 1));
            memory.read_obj(GuestAddress(0x81000)).unwrap()
        };
        assert_eq!(
            command(ctrl, &[CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, 2, 0]),
            CTRL_OK
        );
        assert!(net.taps[1].is_attached());
        assert_eq!(
            command(ctrl, &[CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, 1, 0]),
            CTRL_OK
        );
        assert!(!net.taps[1].is_attached());
        assert_eq!(
            command(ctrl, &[CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, 3, 0]),
            CTRL_ERR
        );
        assert_eq!(
            command(ctrl, &[CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, 0, 0]),
            CTRL_ERR
        );
        assert_eq!(command(ctrl, &[CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET]), CTRL_ERR);
        let set = |offloads: u64| {
            let mut c = vec![CTRL_GUEST_OFFLOADS, CTRL_GUEST_OFFLOADS_SET];
            c.extend_from_slice(&offloads.to_le_bytes());
            c
        };
        assert_eq!(command(ctrl, &set(F_GUEST_CSUM)), CTRL_OK);
        assert_eq!(command(ctrl, &set(0)), CTRL_OK);
        assert_eq!(
            command(ctrl, &set(F_GUEST_TSO4)),
            CTRL_ERR,
            "not negotiated"
        );
        assert_eq!(command(ctrl, &[0, 0, 1]), CTRL_ERR, "RX mode: not offered");
        assert_eq!(command(ctrl, &[]), CTRL_ERR);
        net.reset();
    }

    #[test]
    fn transmit_rate_limit_delays_frames() {
        if !taps_usable() {
            return;
        }
        let name = tap_name();
        // One frame per 100 ms after the first.
        let mut net = net(&format!("tap={name},ops_size=1,ops_refill_time=100"));
        let memory = memory();
        let (_rx, mut tx, _) = activate(&mut net, &memory, F_VERSION_1);
        let out = frame(GUEST_MAC, b"vmkit-unit limited");
        let start = Instant::now();
        for i in 0..4u16 {
            let addr = 0x50000 + u64::from(i) * 0x1000;
            memory.write_slice(&[0; 12], GuestAddress(addr)).unwrap();
            memory.write_slice(&out, GuestAddress(addr + 12)).unwrap();
            tx.desc(&memory, i, addr, 72, 0, 0);
            tx.publish(&memory, i);
        }
        for i in 0..4u16 {
            assert_eq!(tx.next_used(&memory), (i, 0));
        }
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(280), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
        assert_eq!(net.counters()["tx_frames"], 4);
    }

    /// CPU ticks (user + system) of this process's thread named `comm`.
    fn thread_ticks(comm: &str) -> u64 {
        for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if name.trim() == comm {
                let stat = std::fs::read_to_string(task.path().join("stat")).unwrap();
                let fields: Vec<&str> = stat
                    .rsplit_once(')')
                    .unwrap()
                    .1
                    .split_whitespace()
                    .collect();
                return fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
            }
        }
        panic!("no thread {comm}");
    }

    #[test]
    fn frames_wait_for_buffers_without_spinning_or_loss() {
        if !taps_usable() {
            return;
        }
        let name = tap_name();
        let config = NetConfig::parse(&format!("tap={name}")).unwrap();
        let mut net = Net::new(&config, "nospin").unwrap();
        let socket = PacketSocket::open(&name);
        let memory = memory();
        let (mut rx, _tx, _) = activate(&mut net, &memory, F_VERSION_1 | F_RING_EVENT_IDX);
        for i in 0..5u8 {
            socket.send(&frame([2, 0, 0, 0, 0, 4], &[b'w', b'0' + i]));
        }
        std::thread::sleep(Duration::from_millis(50));
        let before = thread_ticks("nospin_qp0");
        std::thread::sleep(Duration::from_millis(400));
        let spent = thread_ticks("nospin_qp0") - before;
        assert!(spent <= 5, "the worker used {spent} ticks while waiting");
        // Buffers come: every frame arrives, in order.
        rx.post_receive_buffers(&memory, QSIZE, 2048);
        for i in 0..5u8 {
            let (_, got) = receive(&memory, &mut rx, &[b'w', b'0' + i]);
            assert_eq!(got.len(), 60);
        }
    }

    #[test]
    fn many_frames_wrap_the_rings_intact_and_in_order() {
        let acked = F_VERSION_1 | F_MRG_RXBUF | F_RING_EVENT_IDX;
        let Some(TapRig {
            net,
            socket,
            memory,
            mut rx,
            mut tx,
            ..
        }) = tap_rig("", acked)
        else {
            return;
        };
        rx.post_receive_buffers(&memory, QSIZE, 512);
        let frames: Vec<Vec<u8>> = (0..100u32)
            .map(|n| {
                let mut payload = format!("many {n:03} ").into_bytes();
                payload.resize(46 + (n as usize * 37) % 1400, n as u8);
                frame([2, 0, 0, 0, 0, 5], &payload)
            })
            .collect();
        let mut expected = frames.iter();
        let mut next = expected.next();
        let mut sent = 0;
        while let Some(want) = next {
            // Keep a few frames in flight, not more than the tap queue holds.
            while sent < frames.len() && sent < frames.len().min(40 + rx.seen as usize / 2) {
                socket.send(&frames[sent]);
                sent += 1;
            }
            let (id, len) = rx.next_used(&memory);
            let mut whole = read(&memory, 0x100000 + u64::from(id) * 0x10000, len);
            let num_buffers = u16::from_le_bytes([whole[10], whole[11]]);
            rx.publish(&memory, id);
            whole.drain(..VNET_HDR_LEN);
            for _ in 1..num_buffers {
                let (id, len) = rx.next_used(&memory);
                whole.extend(read(&memory, 0x100000 + u64::from(id) * 0x10000, len));
                rx.publish(&memory, id);
            }
            if whole[12..14] == [0x88, 0xb5] && whole[14..].starts_with(b"many ") {
                assert_eq!(
                    &whole,
                    want,
                    "frame {}",
                    String::from_utf8_lossy(&whole[14..22])
                );
                next = expected.next();
            }
        }

        // And 100 out, through 16 descriptors.
        for n in 0..100u16 {
            let i = n % QSIZE;
            let addr = 0x200000 + u64::from(i) * 0x1000;
            let out = frame(GUEST_MAC, format!("out {n:03}").as_bytes());
            memory.write_slice(&[0; 12], GuestAddress(addr)).unwrap();
            memory.write_slice(&out, GuestAddress(addr + 12)).unwrap();
            tx.desc(&memory, i, addr, 72, 0, 0);
            tx.publish(&memory, i);
            assert_eq!(tx.next_used(&memory), (i, 0));
            socket.expect(format!("out {n:03}").as_bytes());
        }
        assert_eq!(net.counters()["tx_frames"], 100);
        assert!(net.counters()["rx_frames"] >= 100);
    }
}
