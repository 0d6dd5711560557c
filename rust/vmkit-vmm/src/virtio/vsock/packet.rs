//! vsock packets (virtio 1.2 §5.10.6): the 44-byte little-endian header,
//! reading a packet out of a tx chain and writing one into an rx chain.
//! Every field comes from the guest: lengths are checked against the chain
//! and a cap before anything is copied.

use crate::memory::GuestMemoryMmap;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

/// The host's CID (virtio 1.2 §5.10.4: 2 is the host).
pub const HOST_CID: u64 = 2;

pub const HEADER_SIZE: usize = 44;
/// Most payload bytes one packet carries, either way: a guest cannot make
/// the device copy more per chain.
pub const MAX_PAYLOAD: usize = 64 * 1024;

pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flags: the sender will receive no more, send no more.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// A packet header, fields in host order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub kind: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    pub fn parse(bytes: &[u8; HEADER_SIZE]) -> Header {
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let u32_at = |at: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&bytes[at..at + 4]);
            u32::from_le_bytes(b)
        };
        let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            kind: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    pub fn to_bytes(self) -> [u8; HEADER_SIZE] {
        let mut bytes = [0u8; HEADER_SIZE];
        bytes[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        bytes[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        bytes[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        bytes[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        bytes[24..28].copy_from_slice(&self.len.to_le_bytes());
        bytes[28..30].copy_from_slice(&self.kind.to_le_bytes());
        bytes[30..32].copy_from_slice(&self.op.to_le_bytes());
        bytes[32..36].copy_from_slice(&self.flags.to_le_bytes());
        bytes[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        bytes[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        bytes
    }
}

/// Why a tx chain was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("chain shorter than a packet header")]
    ShortHeader,
    #[error("payload of {0} bytes is more than the {MAX_PAYLOAD}-byte cap")]
    TooLong(u32),
    #[error("payload of {0} bytes is longer than its chain")]
    ShortPayload(u32),
    #[error("buffer outside guest memory")]
    BadAddress,
}

/// Reads the header and payload of a tx chain into `buffer` (which keeps
/// its capacity between calls): the header is returned, the payload is
/// `buffer[..header.len]`. Device-writable descriptors end the packet.
pub fn read_tx(
    chain: DescriptorChain<&GuestMemoryMmap>,
    memory: &GuestMemoryMmap,
    buffer: &mut Vec<u8>,
) -> Result<Header, PacketError> {
    let mut reader = ChainReader {
        descriptors: chain.readable().map(|d| (d.addr(), d.len())),
        current: None,
        memory,
    };
    let mut header = [0u8; HEADER_SIZE];
    reader.fill(&mut header, PacketError::ShortHeader)?;
    let header = Header::parse(&header);
    let len = header.len as usize;
    if len > MAX_PAYLOAD {
        return Err(PacketError::TooLong(header.len));
    }
    buffer.clear();
    buffer.resize(len, 0);
    reader.fill(buffer, PacketError::ShortPayload(header.len))?;
    Ok(header)
}

/// Copies consecutive bytes out of a chain's descriptors.
struct ChainReader<'a, I> {
    descriptors: I,
    /// The descriptor being read: where its unread part starts, how long it is.
    current: Option<(GuestAddress, u32)>,
    memory: &'a GuestMemoryMmap,
}

impl<I: Iterator<Item = (GuestAddress, u32)>> ChainReader<'_, I> {
    /// Fills `out` whole, or fails with `short` when the chain ends first.
    fn fill(&mut self, out: &mut [u8], short: PacketError) -> Result<(), PacketError> {
        let mut done = 0;
        while done < out.len() {
            let (addr, left) = match self.current.take() {
                Some(part) if part.1 > 0 => part,
                _ => self.descriptors.next().ok_or(short)?,
            };
            let take = (left as usize).min(out.len() - done);
            self.memory
                .read_slice(&mut out[done..done + take], addr)
                .map_err(|_| PacketError::BadAddress)?;
            done += take;
            let rest = left - take as u32;
            if rest > 0 {
                let next = addr
                    .checked_add(take as u64)
                    .ok_or(PacketError::BadAddress)?;
                self.current = Some((next, rest));
            }
        }
        Ok(())
    }
}

/// The device-writable buffers of an rx chain, checked to lie in guest
/// memory, and how many bytes they hold (at most a header and
/// `MAX_PAYLOAD`: no packet is longer).
pub struct RxBuffers {
    parts: Vec<(GuestAddress, usize)>,
    pub capacity: usize,
}

impl RxBuffers {
    /// None: some buffer lies outside guest memory.
    pub fn new(chain: DescriptorChain<&GuestMemoryMmap>, memory: &GuestMemoryMmap) -> Option<Self> {
        let mut parts = Vec::new();
        let mut capacity = 0;
        for descriptor in chain.writable() {
            let room = HEADER_SIZE + MAX_PAYLOAD - capacity;
            if room == 0 {
                break;
            }
            let len = (descriptor.len() as usize).min(room);
            if !GuestMemoryBackend::check_range(memory, descriptor.addr(), len) {
                return None;
            }
            parts.push((descriptor.addr(), len));
            capacity += len;
        }
        Some(RxBuffers { parts, capacity })
    }

    /// Writes `bytes` (at most `capacity`) from the first buffer on.
    pub fn write(&self, memory: &GuestMemoryMmap, mut bytes: &[u8]) -> Result<(), PacketError> {
        for &(addr, len) in &self.parts {
            if bytes.is_empty() {
                break;
            }
            let take = len.min(bytes.len());
            memory
                .write_slice(&bytes[..take], addr)
                .map_err(|_| PacketError::BadAddress)?;
            bytes = &bytes[take..];
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_little_endian() {
        let header = Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 0x1234_5678,
            dst_port: 80,
            len: 5,
            kind: TYPE_STREAM,
            op: OP_RW,
            flags: SHUTDOWN_SEND,
            buf_alloc: 0x4_0000,
            fwd_cnt: 7,
        };
        let bytes = header.to_bytes();
        assert_eq!(&bytes[..8], &3u64.to_le_bytes());
        assert_eq!(&bytes[16..20], &[0x78, 0x56, 0x34, 0x12]);
        assert_eq!(&bytes[30..32], &[5, 0]);
        assert_eq!(Header::parse(&bytes), header);
    }
}
