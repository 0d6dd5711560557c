//! Receive: frames from the tap into the guest's buffers, one at a time,
//! with mergeable buffers and the rate limiter.

use std::io;
use std::num::Wrapping;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::memory::GuestMemoryMmap;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::chain::{fill, need_event, writable_capacity};
use super::counters::NetCounters;
use super::pair::{PairContext, QueueError};
use super::tap::VNET_HDR_LEN;
use super::BATCH;
use crate::rate_limiter::RateLimiter;
use crate::virtio::pop_chain;

/// Receive side of a queue pair.
pub struct RxQueue {
    pub index: u16,
    pub queue: Queue,
    pub mrg_rxbuf: bool,
    /// VIRTIO_NET_F_GUEST_CSUM was negotiated: header flags pass through.
    pub guest_csum: bool,
    /// The frame read from the tap and not yet placed (`len` 0: none).
    pub frame: Vec<u8>,
    pub len: usize,
    /// The pending frame passed the rate limiter.
    pub admitted: bool,
    /// Chains holding the pending frame's first bytes (MRG_RXBUF), not yet
    /// returned: (head, bytes), and how much of the frame they hold.
    pub held: Vec<(u16, u32)>,
    pub held_bytes: usize,
    pub num_buffers_at: [Option<GuestAddress>; 2],
    pub limiter: Option<RateLimiter>,
    pub throttled: bool,
    /// `next_used` when the guest was last considered for an interrupt.
    pub signalled: Wrapping<u16>,
}

/// What became of the pending frame.
pub enum Placement {
    Delivered,
    /// Waits for the guest to post (more) buffers.
    NoRoom,
    /// Can never be delivered: dropped.
    Dropped,
}

impl RxQueue {
    /// Puts the pending frame in the guest's buffers.
    fn place(
        &mut self,
        memory: &GuestMemoryMmap,
        counters: &NetCounters,
    ) -> Result<Placement, QueueError> {
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
            let Some(chain) = pop_chain(&mut self.queue, memory)? else {
                return Ok(Placement::NoRoom);
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
                return Ok(Placement::Dropped);
            }
            match fill(memory, chain, &self.frame[..len], 0) {
                Some(filled) => {
                    if self.queue.add_used(memory, head, filled.len).is_err() {
                        counters.rx_bad_chains.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    return Ok(Placement::Delivered);
                }
                None => self.return_bad(memory, head, counters),
            }
        }
    }

    fn place_merged(
        &mut self,
        memory: &GuestMemoryMmap,
        counters: &NetCounters,
    ) -> Result<Placement, QueueError> {
        let len = self.len;
        if self.held.is_empty() {
            self.frame[10..12].copy_from_slice(&0u16.to_le_bytes());
        }
        while self.held_bytes < len {
            if self.held.len() >= usize::from(self.queue.size()) {
                // Every buffer the ring can hold is ours and the frame still
                // does not fit: give them back empty and drop it.
                for (head, _) in std::mem::take(&mut self.held) {
                    // Fails only for a head past the ring; popped ones are not.
                    let _ = self.queue.add_used(memory, head, 0);
                }
                self.held_bytes = 0;
                return Ok(Placement::Dropped);
            }
            let Some(chain) = pop_chain(&mut self.queue, memory)? else {
                return Ok(Placement::NoRoom);
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
                // Inside a descriptor `fill` just wrote to.
                let _ = memory.write_obj(byte, *addr);
            }
        }
        self.publish_held(memory);
        Ok(Placement::Delivered)
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
            // The used ring was checked against guest memory at activation.
            let _ = memory.write_slice(&elem, GuestAddress(addr));
        }
        self.queue
            .set_next_used((next + Wrapping(rest.len() as u16)).0);
        // Writes the last element and publishes the index (Release).
        let _ = self.queue.add_used(memory, last_head, last_len);
    }

    fn return_bad(&mut self, memory: &GuestMemoryMmap, head: u16, counters: &NetCounters) {
        counters.rx_bad_chains.fetch_add(1, Ordering::Relaxed);
        // Fails only for a head past the ring; a popped one is not.
        let _ = self.queue.add_used(memory, head, 0);
    }
}

impl RxQueue {
    /// Moves frames from the tap into the guest until the tap is drained,
    /// the guest has no room or the rate limiter says wait.
    pub fn process(&mut self, ctx: &PairContext) -> Result<(), QueueError> {
        let memory = &ctx.memory;
        let counters = &*ctx.counters;
        self.queue.disable_notification(memory)?;
        let mut budget = BATCH;
        loop {
            if self.len == 0 {
                if budget == 0 {
                    // Let the other queues and the kill event in; the timer
                    // brings us back (the tap gives no new edge for frames
                    // already queued).
                    ctx.rx_timer
                        .arm(Duration::from_micros(1))
                        .map_err(QueueError::Timer)?;
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
                        ctx.rx_timer.arm(wait).map_err(QueueError::Timer)?;
                        break;
                    }
                }
                self.admitted = true;
            }
            match self.place(memory, counters)? {
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
                    if self.queue.enable_notification(memory)? {
                        self.queue.disable_notification(memory)?;
                        continue;
                    }
                    break;
                }
            }
        }
        // Chains returned as malformed count too: the guest must see them.
        let next = Wrapping(self.queue.next_used());
        if next != self.signalled && need_event(memory, &self.queue, self.signalled) {
            ctx.signal(self.index);
        }
        self.signalled = next;
        Ok(())
    }
}
