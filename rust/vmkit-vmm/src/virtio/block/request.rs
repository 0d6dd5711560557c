//! Request parsing: a descriptor chain becomes a checked [`Request`] (every
//! guest address and length checked against guest memory and the disk), or
//! an error status, or nothing when there is no status byte to answer in.

use std::time::Instant;

use crate::memory::GuestMemoryMmap;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::io::QueueIo;
use super::{
    F_DISCARD, F_WRITE_ZEROES, HEADER_LEN, MAX_CHAIN_DESCRIPTORS, MAX_DISCARD_SECTORS,
    MAX_DISCARD_SEGMENTS, MAX_REQUEST_BYTES, RANGE_LEN, SECTOR_SHIFT, SECTOR_SIZE, STATUS_IOERR,
    STATUS_OK, STATUS_UNSUPP,
};

/// A guest buffer that was checked to lie in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

pub fn total_len(segments: &[Segment]) -> u64 {
    segments.iter().map(|s| u64::from(s.len)).sum()
}

/// The segments of a byte stream less its first `skip` bytes.
pub fn skip_bytes(segments: &[Segment], mut skip: u64) -> Vec<Segment> {
    let mut rest = Vec::with_capacity(segments.len());
    for segment in segments {
        let len = u64::from(segment.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        rest.push(Segment {
            // Inside a checked segment, so no overflow.
            addr: GuestAddress(segment.addr.0 + skip),
            len: (len - skip) as u32,
        });
        skip = 0;
    }
    rest
}

/// Fills `buf` from the start of the byte stream; false if it is too short.
pub fn read_stream(mem: &GuestMemoryMmap, segments: &[Segment], buf: &mut [u8]) -> bool {
    let mut filled = 0;
    for segment in segments {
        if filled == buf.len() {
            break;
        }
        let take = (segment.len as usize).min(buf.len() - filled);
        if mem
            .read_slice(&mut buf[filled..filled + take], segment.addr)
            .is_err()
        {
            return false;
        }
        filled += take;
    }
    filled == buf.len()
}

/// Writes `data` to the start of the byte stream; false if it is too short.
pub fn write_stream(mem: &GuestMemoryMmap, segments: &[Segment], data: &[u8]) -> bool {
    let mut written = 0;
    for segment in segments {
        if written == data.len() {
            break;
        }
        let take = (segment.len as usize).min(data.len() - written);
        if mem
            .write_slice(&data[written..written + take], segment.addr)
            .is_err()
        {
            return false;
        }
        written += take;
    }
    written == data.len()
}

/// A chain split into its device-readable and device-writable bytes.
#[derive(Debug)]
pub struct ChainParts {
    pub readable: Vec<Segment>,
    pub writable: Vec<Segment>,
    pub status: GuestAddress,
}

#[derive(Debug, PartialEq, Eq)]
pub enum BadChain {
    /// No usable status byte: the chain can only be returned unused.
    NoStatus,
    /// Malformed, but the status byte at this address can say so.
    Invalid(GuestAddress),
}

pub fn segment_in_memory(mem: &GuestMemoryMmap, addr: GuestAddress, len: u32) -> bool {
    addr.0.checked_add(u64::from(len)).is_some()
        && GuestMemoryBackend::check_range(mem, addr, len as usize)
}

/// Walks a chain: the status byte is the last byte of the last descriptor,
/// which must be device-writable; device-readable descriptors come first.
pub fn split_chain(
    mem: &GuestMemoryMmap,
    descriptors: impl Iterator<Item = Descriptor>,
) -> Result<ChainParts, BadChain> {
    let mut kept = Vec::new();
    let mut count = 0usize;
    let mut last = None;
    // virtio-queue bounds the walk (queue size, or indirect table size) and
    // stops early on a loop, a bad index or address, or a nested indirect
    // table; then the last descriptor yielded still says NEXT.
    for descriptor in descriptors {
        count += 1;
        if kept.len() < MAX_CHAIN_DESCRIPTORS {
            kept.push(descriptor);
        }
        last = Some(descriptor);
    }
    let last = last.ok_or(BadChain::NoStatus)?;
    if last.has_next() || !last.is_write_only() || last.len() == 0 {
        return Err(BadChain::NoStatus);
    }
    let status = last
        .addr()
        .0
        .checked_add(u64::from(last.len()) - 1)
        .map(GuestAddress)
        .filter(|&addr| GuestMemoryBackend::address_in_range(mem, addr))
        .ok_or(BadChain::NoStatus)?;
    if count > MAX_CHAIN_DESCRIPTORS {
        return Err(BadChain::Invalid(status));
    }

    let mut parts = ChainParts {
        readable: Vec::new(),
        writable: Vec::new(),
        status,
    };
    let last_index = kept.len() - 1;
    let mut seen_writable = false;
    for (index, descriptor) in kept.iter().enumerate() {
        let len = if index == last_index {
            descriptor.len() - 1
        } else {
            descriptor.len()
        };
        if descriptor.is_write_only() {
            seen_writable = true;
            if len > 0 {
                if !segment_in_memory(mem, descriptor.addr(), len) {
                    return Err(BadChain::Invalid(status));
                }
                parts.writable.push(Segment {
                    addr: descriptor.addr(),
                    len,
                });
            }
        } else {
            // Drivers must put every device-readable descriptor first.
            if seen_writable || !segment_in_memory(mem, descriptor.addr(), len) {
                return Err(BadChain::Invalid(status));
            }
            if len > 0 {
                parts.readable.push(Segment {
                    addr: descriptor.addr(),
                    len,
                });
            }
        }
    }
    Ok(parts)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteRange {
    pub offset: u64,
    pub len: u64,
    pub unmap: bool,
}

#[derive(Debug)]
pub enum Op {
    Read {
        offset: u64,
        len: u64,
        data: Vec<Segment>,
    },
    Write {
        offset: u64,
        len: u64,
        data: Vec<Segment>,
    },
    Flush,
    GetId {
        data: Vec<Segment>,
    },
    Discard {
        ranges: Vec<ByteRange>,
    },
    WriteZeroes {
        ranges: Vec<ByteRange>,
    },
}

impl Op {
    /// Bytes moved, for the bandwidth limiter.
    pub fn data_len(&self) -> u64 {
        match self {
            Op::Read { len, .. } | Op::Write { len, .. } => *len,
            _ => 0,
        }
    }
}

/// A well-formed request, from pop to completion.
#[derive(Debug)]
pub struct Request {
    pub head: u16,
    pub status: GuestAddress,
    pub op: Op,
    pub started: Instant,
}

#[derive(Debug)]
pub enum Parsed {
    /// No status byte to report through: return the chain with length 0.
    Drop,
    /// Answered without I/O (an error, or an unsupported type).
    Done {
        status_addr: GuestAddress,
        status: u8,
    },
    Request(Request),
}

/// Bytes written into guest memory by a read, write or flush: data + status.
pub fn used_len(op: &Op, status: u8) -> u32 {
    match op {
        // At most MAX_REQUEST_BYTES.
        Op::Read { len, .. } if status == STATUS_OK => *len as u32 + 1,
        _ => 1,
    }
}

impl QueueIo {
    /// Checks a read or write of `len` bytes at `sector`.
    pub fn data_range_ok(&self, sector: u64, len: u64) -> bool {
        len.is_multiple_of(SECTOR_SIZE)
            && len <= MAX_REQUEST_BYTES
            && sector
                .checked_add(len >> SECTOR_SHIFT)
                .is_some_and(|end| end <= self.disk.capacity)
    }

    pub fn parse(
        &self,
        mem: &GuestMemoryMmap,
        head: u16,
        descriptors: impl Iterator<Item = Descriptor>,
    ) -> Parsed {
        let started = Instant::now();
        let parts = match split_chain(mem, descriptors) {
            Ok(parts) => parts,
            Err(BadChain::NoStatus) => return Parsed::Drop,
            Err(BadChain::Invalid(status_addr)) => {
                return Parsed::Done {
                    status_addr,
                    status: STATUS_IOERR,
                }
            }
        };
        let status_addr = parts.status;
        let done = |status| Parsed::Done {
            status_addr,
            status,
        };
        let mut header = [0u8; HEADER_LEN as usize];
        if !read_stream(mem, &parts.readable, &mut header) {
            return done(STATUS_IOERR);
        }
        let request_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);
        let payload = skip_bytes(&parts.readable, HEADER_LEN);
        let payload_len = total_len(&payload);
        let writable_len = total_len(&parts.writable);

        let op = match request_type {
            VIRTIO_BLK_T_IN => {
                if payload_len != 0 || !self.data_range_ok(sector, writable_len) {
                    return done(STATUS_IOERR);
                }
                Op::Read {
                    offset: sector << SECTOR_SHIFT,
                    len: writable_len,
                    data: parts.writable,
                }
            }
            VIRTIO_BLK_T_OUT => {
                if self.disk.readonly
                    || writable_len != 0
                    || !self.data_range_ok(sector, payload_len)
                {
                    return done(STATUS_IOERR);
                }
                Op::Write {
                    offset: sector << SECTOR_SHIFT,
                    len: payload_len,
                    data: payload,
                }
            }
            VIRTIO_BLK_T_FLUSH => Op::Flush,
            VIRTIO_BLK_T_GET_ID => {
                if writable_len == 0 {
                    return done(STATUS_IOERR);
                }
                Op::GetId {
                    data: parts.writable,
                }
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                let discard = request_type == VIRTIO_BLK_T_DISCARD;
                let feature = if discard { F_DISCARD } else { F_WRITE_ZEROES };
                if self.acked_features & feature == 0 {
                    return done(STATUS_UNSUPP);
                }
                match self.parse_ranges(mem, &payload, discard) {
                    Ok(ranges) if discard => Op::Discard { ranges },
                    Ok(ranges) => Op::WriteZeroes { ranges },
                    Err(status) => return done(status),
                }
            }
            _ => return done(STATUS_UNSUPP),
        };
        Parsed::Request(Request {
            head,
            status: status_addr,
            op,
            started,
        })
    }

    /// Reads and checks the ranges of a discard or write-zeroes request.
    pub fn parse_ranges(
        &self,
        mem: &GuestMemoryMmap,
        payload: &[Segment],
        discard: bool,
    ) -> Result<Vec<ByteRange>, u8> {
        let len = total_len(payload);
        if self.disk.readonly
            || len == 0
            || !len.is_multiple_of(RANGE_LEN)
            || len / RANGE_LEN > u64::from(MAX_DISCARD_SEGMENTS)
        {
            return Err(STATUS_IOERR);
        }
        // At most MAX_DISCARD_SEGMENTS * 16 bytes.
        let mut raw = vec![0u8; len as usize];
        if !read_stream(mem, payload, &mut raw) {
            return Err(STATUS_IOERR);
        }
        let mut ranges = Vec::with_capacity(raw.len() / RANGE_LEN as usize);
        for entry in raw.chunks_exact(RANGE_LEN as usize) {
            let mut sector = [0u8; 8];
            sector.copy_from_slice(&entry[0..8]);
            let sector = u64::from_le_bytes(sector);
            let sectors = u32::from_le_bytes([entry[8], entry[9], entry[10], entry[11]]);
            let flags = u32::from_le_bytes([entry[12], entry[13], entry[14], entry[15]]);
            // Discard takes no flags; write-zeroes only "unmap" (§5.2.6.2).
            let known_flags = if discard {
                0
            } else {
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            };
            if flags & !known_flags != 0 {
                return Err(STATUS_UNSUPP);
            }
            let in_range = sector
                .checked_add(u64::from(sectors))
                .is_some_and(|end| end <= self.disk.capacity);
            if sectors > MAX_DISCARD_SECTORS || !in_range {
                return Err(STATUS_IOERR);
            }
            ranges.push(ByteRange {
                offset: sector << SECTOR_SHIFT,
                len: u64::from(sectors) << SECTOR_SHIFT,
                unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
            });
        }
        Ok(ranges)
    }
}
