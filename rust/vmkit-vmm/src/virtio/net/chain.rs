//! Walking virtio-net descriptor chains: gathering a transmit frame,
//! measuring and filling receive buffers, and the EVENT_IDX test.

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use crate::memory::GuestMemoryMmap;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

/// Whether the driver asked for an interrupt for used entries `old..new`
/// (virtio 1.2 §2.7.10: `vring_need_event`), or always without EVENT_IDX.
pub fn need_event(memory: &GuestMemoryMmap, queue: &Queue, old: Wrapping<u16>) -> bool {
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

pub type Chain<'a> = DescriptorChain<&'a GuestMemoryMmap>;

/// Copies the chain's device-readable bytes into `buf`; None if the chain is
/// malformed: a descriptor outside guest memory, more bytes than `buf`, or a
/// chain that ends on a descriptor that says more follow (a loop cut off
/// after queue-size descriptors, a bad `next` index, a bad indirect table).
pub fn gather(memory: &GuestMemoryMmap, chain: Chain<'_>, buf: &mut [u8]) -> Option<usize> {
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
pub fn writable_capacity(chain: &Chain<'_>) -> Option<u64> {
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
pub struct Filled {
    pub len: u32,
    /// Guest addresses of header bytes 10 and 11 (num_buffers), if this
    /// chain holds them.
    pub num_buffers: [Option<GuestAddress>; 2],
}

/// Writes `frame[start..]` into the chain's writable descriptors, as much as
/// fits; None if a descriptor lies outside guest memory.
pub fn fill(
    memory: &GuestMemoryMmap,
    chain: Chain<'_>,
    frame: &[u8],
    start: usize,
) -> Option<Filled> {
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
