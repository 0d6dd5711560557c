//! The control queue (virtio 1.2 §5.1.6.5): queue pairs in use and guest
//! offloads.

use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::Bytes;

use super::chain::gather;
use super::pair::PairContext;
use super::tap::Tap;
use super::{tun_offload_flags, F_CTRL_GUEST_OFFLOADS, F_MQ, GUEST_OFFLOADS};
use crate::virtio::pop_chain;

/// A control command (class, command, data) larger than this is refused.
pub const MAX_CTRL_COMMAND: usize = 4096;

// Control queue (virtio 1.2 §5.1.6.5).
pub const CTRL_OK: u8 = 0;
pub const CTRL_ERR: u8 = 1;
pub const CTRL_MQ: u8 = 4;
pub const CTRL_MQ_VQ_PAIRS_SET: u8 = 0;
pub const CTRL_GUEST_OFFLOADS: u8 = 5;
pub const CTRL_GUEST_OFFLOADS_SET: u8 = 0;

/// What the driver set through the control queue. It outlives a stop for a
/// snapshot (and goes into it: the driver will not say it again) but not a
/// driver reset.
#[derive(Debug, Default)]
pub struct CtrlState {
    /// Queue pairs in use (`VQ_PAIRS_SET`); 0: never set, so one.
    pairs: AtomicU16,
    /// Guest offloads (`GUEST_OFFLOADS_SET`) with [`OFFLOADS_SET`] added;
    /// 0: never set, so the negotiated ones.
    offloads: AtomicU64,
}

/// Marks `CtrlState::offloads` as set (bit 63 is no guest offload).
const OFFLOADS_SET: u64 = 1 << 63;

impl CtrlState {
    /// Queue pairs in use, of the `available` ones.
    pub fn pairs(&self, available: u16) -> u16 {
        self.pairs
            .load(Ordering::Acquire)
            .clamp(1, available.max(1))
    }

    /// The offloads the tap should do for the guest, given the `acked`
    /// features.
    pub fn offloads(&self, acked: u64) -> u64 {
        match self.offloads.load(Ordering::Acquire) {
            0 => acked,
            set => set & !OFFLOADS_SET & acked,
        }
    }

    pub fn clear(&self) {
        self.pairs.store(0, Ordering::Release);
        self.offloads.store(0, Ordering::Release);
    }

    /// 10 bytes: pairs (u16), offloads (u64), little-endian.
    pub fn save(&self) -> Vec<u8> {
        let mut bytes = self.pairs.load(Ordering::Acquire).to_le_bytes().to_vec();
        bytes.extend_from_slice(&self.offloads.load(Ordering::Acquire).to_le_bytes());
        bytes
    }

    /// Loads what `save` wrote; values beyond what a driver could set
    /// (more pairs than the device has, unknown offload bits) are refused.
    pub fn load(&self, bytes: &[u8], available: u16, offered: u64) -> Result<(), String> {
        let Some((pairs, offloads)) = bytes.split_first_chunk::<2>() else {
            return Err(format!("{} bytes of control state", bytes.len()));
        };
        let Ok(offloads) = <[u8; 8]>::try_from(offloads) else {
            return Err(format!("{} bytes of control state", bytes.len()));
        };
        let pairs = u16::from_le_bytes(*pairs);
        let offloads = u64::from_le_bytes(offloads);
        if pairs > available {
            return Err(format!("{pairs} queue pairs in use of {available}"));
        }
        if offloads & !(OFFLOADS_SET | (offered & GUEST_OFFLOADS)) != 0 {
            return Err(format!("guest offloads {offloads:#x}"));
        }
        self.pairs.store(pairs, Ordering::Release);
        self.offloads.store(offloads, Ordering::Release);
        Ok(())
    }
}

/// The control queue (on the first pair's worker).
pub struct CtrlQueue {
    pub index: u16,
    pub queue: Queue,
    pub taps: Vec<Arc<Tap>>,
    pub acked: u64,
    pub state: Arc<CtrlState>,
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
                self.state.pairs.store(pairs as u16, Ordering::Release);
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
                    Ok(()) => {
                        let set = offloads | OFFLOADS_SET;
                        self.state.offloads.store(set, Ordering::Release);
                        CTRL_OK
                    }
                    Err(_) => CTRL_ERR,
                }
            }
            _ => CTRL_ERR,
        }
    }

    pub fn process(&mut self, ctx: &PairContext) -> Result<(), virtio_queue::Error> {
        let memory = &ctx.memory;
        let mut used = false;
        loop {
            self.queue.disable_notification(memory)?;
            while let Some(chain) = pop_chain(&mut self.queue, memory)? {
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
