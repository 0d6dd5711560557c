//! Transmit: each chain's device-readable bytes are one frame, written to
//! the tap in one call, behind the rate limiter.

use std::io;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueOwnedT, QueueT};

use super::chain::gather;
use super::counters::NetCounters;
use super::pair::{PairContext, QueueError};
use super::tap::VNET_HDR_LEN;
use super::{BATCH, ETH_HLEN};
use crate::rate_limiter::RateLimiter;
use crate::virtio::pop_chain;

/// Transmit side of a queue pair.
pub struct TxQueue {
    pub index: u16,
    pub queue: Queue,
    pub frame: Vec<u8>,
    /// A chain popped and gathered but not yet sent: (head, bytes, admitted).
    pub pending: Option<(u16, usize, bool)>,
    pub limiter: Option<RateLimiter>,
}

pub enum TxOutcome {
    Sent,
    /// Rate limited or the tap is full: retried when the timer fires.
    Later,
    Failed,
}

impl TxQueue {
    /// Sends the gathered frame of `len` bytes, unless rate limited or the
    /// tap is full (then the timer is armed).
    fn send(
        &mut self,
        ctx: &PairContext,
        len: usize,
        admitted: &mut bool,
    ) -> Result<TxOutcome, QueueError> {
        if !*admitted {
            if let Some(limiter) = self.limiter.as_mut() {
                let bytes = (len - VNET_HDR_LEN) as u64;
                if let Err(wait) = limiter.try_consume(1, bytes, Instant::now()) {
                    ctx.tx_timer.arm(wait).map_err(QueueError::Timer)?;
                    return Ok(TxOutcome::Later);
                }
            }
            *admitted = true;
        }
        loop {
            match ctx.tap.write(&self.frame[..len]) {
                Ok(_) => {
                    NetCounters::add(&ctx.counters.tx_frames, 1);
                    NetCounters::add(&ctx.counters.tx_bytes, (len - VNET_HDR_LEN) as u64);
                    return Ok(TxOutcome::Sent);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ctx.tx_timer
                        .arm(Duration::from_millis(1))
                        .map_err(QueueError::Timer)?;
                    return Ok(TxOutcome::Later);
                }
                Err(_) => {
                    NetCounters::add(&ctx.counters.tx_dropped, 1);
                    return Ok(TxOutcome::Failed);
                }
            }
        }
    }

    /// Sends every chain the guest made available, the held-back one first.
    pub fn process(&mut self, ctx: &PairContext) -> Result<(), QueueError> {
        let memory = &ctx.memory;
        let mut used = false;
        if let Some((head, len, mut admitted)) = self.pending.take() {
            if let TxOutcome::Later = self.send(ctx, len, &mut admitted)? {
                self.pending = Some((head, len, admitted));
                return Ok(());
            }
            used |= self.queue.add_used(memory, head, 0).is_ok();
        }
        let mut budget = BATCH;
        'drain: loop {
            self.queue.disable_notification(memory)?;
            while let Some(chain) = pop_chain(&mut self.queue, memory)? {
                if budget == 0 {
                    // Back after the other queues had a turn.
                    self.queue.go_to_previous_position();
                    ctx.tx_timer
                        .arm(Duration::from_micros(1))
                        .map_err(QueueError::Timer)?;
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
                if let TxOutcome::Later = self.send(ctx, len, &mut admitted)? {
                    self.pending = Some((head, len, admitted));
                    break 'drain;
                }
                used |= self.queue.add_used(memory, head, 0).is_ok();
            }
            if !self.queue.enable_notification(memory)? {
                break;
            }
        }
        if used && self.queue.needs_notification(memory).unwrap_or(true) {
            ctx.signal(self.index);
        }
        Ok(())
    }
}
