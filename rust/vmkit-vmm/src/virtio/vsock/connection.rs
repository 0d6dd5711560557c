//! One stream connection between a guest port and a host unix socket: its
//! state, the credit both ways (virtio 1.2 §5.10.6.3) and the guest data
//! the host socket has not taken yet.

use std::collections::VecDeque;
use std::time::Instant;

use super::host::HostStream;
use super::packet::{
    Header, HOST_CID, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST,
    OP_SHUTDOWN, SHUTDOWN_RCV, TYPE_STREAM,
};

/// Our receive buffer for one connection's guest→host data: the credit the
/// guest gets, and the most kept for a host socket that does not read.
pub const BUF_ALLOC: u32 = 256 * 1024;
/// Forwarded bytes the guest has not been told of that call for a
/// CREDIT_UPDATE: the guest never runs dry while the host keeps reading.
pub const CREDIT_UPDATE_THRESHOLD: u32 = BUF_ALLOC / 4;

/// (host port, guest port): a connection's name on both sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: the guest has not answered our REQUEST yet.
    Connecting,
    Established,
}

/// Control packets a connection owes the guest (bits).
pub const SEND_REQUEST: u8 = 1;
pub const SEND_RESPONSE: u8 = 2;
pub const SEND_SHUTDOWN: u8 = 4;
pub const SEND_CREDIT_UPDATE: u8 = 8;
pub const SEND_CREDIT_REQUEST: u8 = 16;

pub struct Connection {
    pub stream: HostStream,
    /// Its token in the muxer's epoll.
    pub token: u64,
    pub state: State,
    /// When the connection is given up (RST): an unanswered REQUEST, a
    /// flush or a close the guest does not finish.
    pub deadline: Option<Instant>,
    /// SEND_* bits.
    pub pending: u8,
    /// The SHUTDOWN flags owed (with SEND_SHUTDOWN).
    pub shutdown_flags: u32,
    /// The guest's SHUTDOWN flags so far.
    pub peer_shutdown: u32,
    /// The host stream reached its end (it shut down or closed).
    pub host_eof: bool,
    /// The host socket hung up (closed both ways): out of the epoll.
    pub host_hup: bool,
    /// The host stream may have data (the epoll said so): not watched for
    /// input until a read finds it empty.
    pub host_readable: bool,
    /// The guest shut down both ways: close once `to_host` is written.
    pub close_when_flushed: bool,
    /// We shut down the host stream's writing side.
    pub host_write_shut: bool,
    /// Guest data the host socket has not taken yet (at most BUF_ALLOC).
    pub to_host: VecDeque<u8>,
    /// Guest data received, written to the host, and reported to the
    /// guest as written (in our last header).
    pub rx_cnt: u32,
    pub fwd_cnt: u32,
    pub reported_fwd_cnt: u32,
    /// Data sent to the guest, and the guest's buffer as it last said.
    pub tx_cnt: u32,
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: u32,
    /// A CREDIT_REQUEST went out and no credit came since.
    pub credit_requested: bool,
    /// The epoll events registered now (None: not registered).
    pub interest: Option<u32>,
    /// Queued in the muxer's control and data lists.
    pub in_control_list: bool,
    pub in_data_list: bool,
}

impl Connection {
    pub fn new(stream: HostStream, token: u64, state: State) -> Connection {
        Connection {
            stream,
            token,
            state,
            deadline: None,
            pending: 0,
            shutdown_flags: 0,
            peer_shutdown: 0,
            host_eof: false,
            host_hup: false,
            host_readable: false,
            close_when_flushed: false,
            host_write_shut: false,
            to_host: VecDeque::new(),
            rx_cnt: 0,
            fwd_cnt: 0,
            reported_fwd_cnt: 0,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            credit_requested: false,
            interest: None,
            in_control_list: false,
            in_data_list: false,
        }
    }

    /// Bytes the guest can take now: its buffer less what is in flight
    /// (0 when its counters make no sense).
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Takes the credit fields of a guest header; returns whether the
    /// guest now has room it did not have.
    pub fn update_peer_credit(&mut self, header: &Header) -> bool {
        let before = self.peer_credit();
        self.peer_buf_alloc = header.buf_alloc;
        self.peer_fwd_cnt = header.fwd_cnt;
        let after = self.peer_credit();
        if after > 0 {
            self.credit_requested = false;
        }
        before == 0 && after > 0
    }

    /// Guest data that fits the credit the guest was given (it cannot know
    /// of bytes forwarded since our last header).
    pub fn fits_credit(&self, len: u32) -> bool {
        let unacknowledged = self.rx_cnt.wrapping_sub(self.reported_fwd_cnt);
        u64::from(unacknowledged) + u64::from(len) <= u64::from(BUF_ALLOC)
    }

    /// Whether host data may go to the guest at all.
    pub fn may_read_host(&self) -> bool {
        self.state == State::Established && !self.host_eof && self.peer_shutdown & SHUTDOWN_RCV == 0
    }

    /// The epoll events wanted now: input while host data can go to the
    /// guest and none is known to wait, output while guest data waits.
    pub fn wanted_events(&self) -> u32 {
        let mut events = 0;
        if self.may_read_host() && !self.host_readable {
            events |= libc::EPOLLIN as u32;
        }
        if !self.to_host.is_empty() {
            events |= libc::EPOLLOUT as u32;
        }
        events
    }

    /// Forwarded bytes worth a CREDIT_UPDATE.
    pub fn owes_credit_update(&self) -> bool {
        self.fwd_cnt.wrapping_sub(self.reported_fwd_cnt) >= CREDIT_UPDATE_THRESHOLD
    }

    /// A header from this connection to the guest: it reports our credit,
    /// so the guest now knows `fwd_cnt`.
    pub fn header(&mut self, key: ConnKey, guest_cid: u64, op: u16) -> Header {
        self.reported_fwd_cnt = self.fwd_cnt;
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            len: 0,
            kind: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// The next control packet owed, most urgent first.
    pub fn next_control(&mut self, key: ConnKey, guest_cid: u64) -> Option<Header> {
        let (bit, op) = [
            (SEND_REQUEST, OP_REQUEST),
            (SEND_RESPONSE, OP_RESPONSE),
            (SEND_SHUTDOWN, OP_SHUTDOWN),
            (SEND_CREDIT_UPDATE, OP_CREDIT_UPDATE),
            (SEND_CREDIT_REQUEST, OP_CREDIT_REQUEST),
        ]
        .into_iter()
        .find(|&(bit, _)| self.pending & bit != 0)?;
        self.pending &= !bit;
        let mut header = self.header(key, guest_cid, op);
        if op == OP_SHUTDOWN {
            header.flags = self.shutdown_flags;
        }
        if op == OP_CREDIT_UPDATE || op == OP_RESPONSE || op == OP_REQUEST {
            // Any header tells the guest our credit: one update is enough.
            self.pending &= !SEND_CREDIT_UPDATE;
        }
        Some(header)
    }
}

/// A RST to the guest for `key` (which may name no connection).
pub fn rst(key: ConnKey, guest_cid: u64) -> Header {
    Header {
        src_cid: HOST_CID,
        dst_cid: guest_cid,
        src_port: key.local_port,
        dst_port: key.peer_port,
        len: 0,
        kind: TYPE_STREAM,
        op: OP_RST,
        flags: 0,
        buf_alloc: 0,
        fwd_cnt: 0,
    }
}
