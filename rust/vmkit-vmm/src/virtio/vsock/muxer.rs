//! The host side of the device: the unix listener host programs connect to
//! (`CONNECT <port>\n`), the unix sockets guest connections reach
//! (`<path>_<port>`), and every connection between them. It knows packets,
//! not queues: the tx path hands it guest packets, the rx path asks it for
//! the next packet for the guest, control packets first.
//!
//! Everything it watches sits in one epoll of its own, which the device
//! worker watches as a single fd: connections come and go without the
//! worker knowing.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::connection::{
    rst, ConnKey, Connection, State, SEND_CREDIT_REQUEST, SEND_CREDIT_UPDATE, SEND_REQUEST,
    SEND_RESPONSE, SEND_SHUTDOWN,
};
use super::host::HostStream;
use super::packet::{
    Header, HEADER_SIZE, HOST_CID, MAX_PAYLOAD, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST,
    OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};

/// Epoll tokens of the muxer's own fds; connections and handshakes get
/// tokens from FIRST_TOKEN on.
pub const LISTENER_TOKEN: u64 = 0;
pub const TIMER_TOKEN: u64 = 1;
pub const WAKE_TOKEN: u64 = 2;
const FIRST_TOKEN: u64 = 16;

/// Host-initiated connections get local ports from here up (as Cloud
/// Hypervisor and Firecracker number them).
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// `CONNECT 4294967295\n` is 19 bytes; a longer line is garbage.
const MAX_LINE: usize = 32;
/// Connections accepted per listener event: the rest wait for the next.
const ACCEPTS_PER_EVENT: usize = 16;
/// How often deadlines are looked at while there are any.
pub const TICK: Duration = Duration::from_millis(100);

/// What bounds the host resources a guest (or a host program) can take.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Live connections; beyond them a REQUEST gets RST and a host
    /// program's connection is closed.
    pub max_connections: usize,
    /// Host programs that have not sent their CONNECT line yet.
    pub max_handshakes: usize,
    /// RSTs queued for a guest that gives no rx buffers; at this many the
    /// tx queue is not read until they are delivered.
    pub max_pending_rsts: usize,
    /// For the CONNECT line, and for the guest's answer to our REQUEST.
    pub connect_timeout: Duration,
    /// For a close to finish: data flushed to a host program after the
    /// guest shut down, the guest's RST after the host program closed.
    pub close_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 1024,
            max_handshakes: 64,
            max_pending_rsts: 128,
            // Firecracker's: a guest that does not answer in 2 s is not listening.
            connect_timeout: Duration::from_secs(2),
            close_timeout: Duration::from_secs(2),
        }
    }
}

/// A host program that connected and has not finished its CONNECT line.
struct Handshake {
    stream: HostStream,
    line: Vec<u8>,
    deadline: Instant,
}

enum Target {
    Handshake,
    Connection(ConnKey),
}

pub struct Muxer {
    device: String,
    guest_cid: u64,
    socket_path: String,
    listener: Arc<UnixListener>,
    epoll: Epoll,
    limits: Limits,
    connections: HashMap<ConnKey, Connection>,
    handshakes: HashMap<u64, Handshake>,
    tokens: HashMap<u64, Target>,
    next_token: u64,
    next_local_port: u32,
    /// Connections with a deadline.
    timed: HashSet<ConnKey>,
    /// RSTs owed to the guest, for keys that name no connection (any more).
    rsts: VecDeque<ConnKey>,
    /// Connections owing control packets, and with host data to send.
    control_list: VecDeque<ConnKey>,
    data_list: VecDeque<ConnKey>,
    /// Accepting failed (out of fds): the listener is out of the epoll,
    /// which would report it for ever, until a connection closes or a tick.
    listener_paused: bool,
}

impl Muxer {
    pub fn new(
        device: String,
        guest_cid: u64,
        socket_path: String,
        listener: Arc<UnixListener>,
        epoll: Epoll,
        limits: Limits,
    ) -> io::Result<Muxer> {
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
        )?;
        Ok(Muxer {
            device,
            guest_cid,
            socket_path,
            listener,
            epoll,
            limits,
            connections: HashMap::new(),
            handshakes: HashMap::new(),
            tokens: HashMap::new(),
            next_token: FIRST_TOKEN,
            next_local_port: FIRST_LOCAL_PORT,
            timed: HashSet::new(),
            rsts: VecDeque::new(),
            control_list: VecDeque::new(),
            data_list: VecDeque::new(),
            listener_paused: false,
        })
    }

    pub fn epoll(&self) -> &Epoll {
        &self.epoll
    }

    /// Too many RSTs wait for rx buffers: guest packets, which may each
    /// call for one, are left in the tx queue until the guest takes them.
    pub fn tx_blocked(&self) -> bool {
        self.rsts.len() >= self.limits.max_pending_rsts
    }

    /// Whether there may be a packet for the guest.
    pub fn has_rx_work(&self) -> bool {
        !self.rsts.is_empty() || !self.control_list.is_empty() || !self.data_list.is_empty()
    }

    /// Whether a deadline is pending (the timer must tick).
    pub fn has_deadlines(&self) -> bool {
        !self.timed.is_empty() || !self.handshakes.is_empty() || self.listener_paused
    }

    fn pause_listener(&mut self) {
        if !self.listener_paused {
            self.listener_paused = true;
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                self.listener.as_raw_fd(),
                EpollEvent::default(),
            );
        }
    }

    fn resume_listener(&mut self) {
        if self.listener_paused {
            let event = EpollEvent::new(EventSet::IN, LISTENER_TOKEN);
            if self
                .epoll
                .ctl(ControlOperation::Add, self.listener.as_raw_fd(), event)
                .is_ok()
            {
                self.listener_paused = false;
            }
        }
    }

    fn take_token(&mut self) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        token
    }

    fn queue_rst(&mut self, key: ConnKey) {
        if self.rsts.len() < self.limits.max_pending_rsts {
            self.rsts.push_back(key);
        } else {
            log::debug!(
                "{}: RST for port {} dropped: the guest takes no rx buffers",
                self.device,
                key.peer_port
            );
        }
    }

    /// Drops a connection (its host stream closes); `reset` also tells the
    /// guest.
    fn close(&mut self, key: ConnKey, reset: bool) {
        if let Some(connection) = self.connections.remove(&key) {
            self.tokens.remove(&connection.token);
            self.timed.remove(&key);
            self.resume_listener();
        }
        if reset {
            self.queue_rst(key);
        }
    }

    fn set_deadline(&mut self, key: ConnKey, after: Option<Duration>) {
        let Some(connection) = self.connections.get_mut(&key) else {
            return;
        };
        connection.deadline = after.map(|after| Instant::now() + after);
        if after.is_some() {
            self.timed.insert(key);
        } else {
            self.timed.remove(&key);
        }
    }

    /// Brings a connection's epoll interest and list entries up to date
    /// after anything about it changed.
    fn refresh(&mut self, key: ConnKey) {
        let Some(connection) = self.connections.get_mut(&key) else {
            return;
        };
        if !connection.host_hup {
            let wanted = connection.wanted_events();
            if connection.interest != Some(wanted) {
                let operation = if connection.interest.is_some() {
                    ControlOperation::Modify
                } else {
                    ControlOperation::Add
                };
                let event = EpollEvent::new(EventSet::from_bits_truncate(wanted), connection.token);
                if let Err(e) = self
                    .epoll
                    .ctl(operation, connection.stream.as_raw_fd(), event)
                {
                    log::warn!("{}: cannot watch a host stream: {e}", self.device);
                    return self.close(key, true);
                }
                connection.interest = Some(wanted);
            }
        }
        if connection.pending != 0 && !connection.in_control_list {
            connection.in_control_list = true;
            self.control_list.push_back(key);
        }
        if connection.host_readable
            && connection.may_read_host()
            && !connection.in_data_list
            && (connection.peer_credit() > 0 || !connection.credit_requested)
        {
            connection.in_data_list = true;
            self.data_list.push_back(key);
        }
    }

    /// One packet from the guest (already checked to come from the
    /// guest's CID to the host's).
    pub fn handle_packet(&mut self, header: &Header, payload: &[u8]) {
        let key = ConnKey {
            local_port: header.dst_port,
            peer_port: header.src_port,
        };
        if header.kind != TYPE_STREAM {
            if header.op != OP_RST {
                self.queue_rst(key);
            }
            return;
        }
        if !self.connections.contains_key(&key) {
            match header.op {
                OP_REQUEST => self.guest_connect(key, header),
                OP_RST => {}
                _ => self.queue_rst(key),
            }
            return;
        }
        let Some(connection) = self.connections.get_mut(&key) else {
            return;
        };
        if connection.update_peer_credit(header) {
            // Host data held back for want of credit may go now.
            self.refresh(key);
        }
        let Some(connection) = self.connections.get_mut(&key) else {
            return;
        };
        match (header.op, connection.state) {
            (OP_RST, _) => self.close(key, false),
            (OP_RESPONSE, State::Connecting) => self.established(key),
            (OP_RW, State::Established) => self.forward(key, payload),
            (OP_SHUTDOWN, State::Established) => {
                connection.peer_shutdown |= header.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                if connection.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND {
                    connection.close_when_flushed = true;
                    let timeout = self.limits.close_timeout;
                    self.set_deadline(key, Some(timeout));
                }
                self.flush(key);
            }
            (OP_CREDIT_UPDATE, State::Established) => {}
            (OP_CREDIT_REQUEST, State::Established) => {
                connection.pending |= SEND_CREDIT_UPDATE;
                self.refresh(key);
            }
            // A second REQUEST, a RESPONSE out of turn, an unknown op: the
            // guest's view of the connection is not ours.
            _ => self.close(key, true),
        }
    }

    /// The guest connects to host port `key.local_port`: to the unix
    /// socket `<path>_<port>`.
    fn guest_connect(&mut self, key: ConnKey, header: &Header) {
        if self.connections.len() >= self.limits.max_connections {
            log::debug!(
                "{}: connection to port {} refused: {} connections already",
                self.device,
                key.local_port,
                self.connections.len()
            );
            return self.queue_rst(key);
        }
        let path = format!("{}_{}", self.socket_path, key.local_port);
        let stream = match HostStream::connect(&path) {
            Ok(stream) => stream,
            Err(e) => {
                log::debug!("{}: cannot connect to {path}: {e}", self.device);
                return self.queue_rst(key);
            }
        };
        let token = self.take_token();
        let mut connection = Connection::new(stream, token, State::Established);
        connection.update_peer_credit(header);
        connection.pending = SEND_RESPONSE;
        self.tokens.insert(token, Target::Connection(key));
        self.connections.insert(key, connection);
        self.refresh(key);
    }

    /// The guest accepted a host-initiated connection.
    fn established(&mut self, key: ConnKey) {
        let Some(connection) = self.connections.get_mut(&key) else {
            return;
        };
        let reply = format!("OK {}\n", key.local_port);
        // A fresh socket has room for a few bytes: a short write means the
        // host program is gone or broken.
        match connection.stream.send(reply.as_bytes()) {
            Ok(n) if n == reply.len() => {}
            _ => return self.close(key, true),
        }
        connection.state = State::Established;
        self.set_deadline(key, None);
        self.refresh(key);
    }

    /// Guest data for the host program: written now as far as the socket
    /// takes it, the rest kept (within the credit the guest was given).
    fn forward(&mut self, key: ConnKey, payload: &[u8]) {
        let Some(connection) = self.connections.get_mut(&key) else {
            return;
        };
        if connection.peer_shutdown & SHUTDOWN_SEND != 0 {
            return self.close(key, true);
        }
        if !connection.fits_credit(payload.len() as u32) {
            log::debug!(
                "{}: the guest sent port {} more than its credit; connection reset",
                self.device,
                key.local_port
            );
            return self.close(key, true);
        }
        connection.rx_cnt = connection.rx_cnt.wrapping_add(payload.len() as u32);
        let mut rest = payload;
        if connection.to_host.is_empty() {
            match connection.stream.send(payload) {
                Ok(n) => {
                    connection.fwd_cnt = connection.fwd_cnt.wrapping_add(n as u32);
                    rest = &payload[n..];
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return self.close(key, true),
            }
        }
        connection.to_host.extend(rest);
        if connection.owes_credit_update() {
            connection.pending |= SEND_CREDIT_UPDATE;
        }
        self.refresh(key);
    }

    /// Writes kept guest data to the host program; once it is all written
    /// carries out what the guest's SHUTDOWN asked.
    fn flush(&mut self, key: ConnKey) {
        let Some(connection) = self.connections.get_mut(&key) else {
            return;
        };
        while !connection.to_host.is_empty() {
            let (front, _) = connection.to_host.as_slices();
            match connection.stream.send(front) {
                Ok(n) => {
                    connection.to_host.drain(..n);
                    connection.fwd_cnt = connection.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => return self.close(key, true),
            }
        }
        if connection.to_host.is_empty() {
            if connection.close_when_flushed {
                return self.close(key, true);
            }
            if connection.peer_shutdown & SHUTDOWN_SEND != 0 && !connection.host_write_shut {
                connection.host_write_shut = true;
                connection.stream.shutdown_write();
            }
        }
        if connection.owes_credit_update() && !connection.close_when_flushed {
            connection.pending |= SEND_CREDIT_UPDATE;
        }
        self.refresh(key);
    }

    /// The host stream ended (read 0): the guest is told no more comes;
    /// when the socket is closed both ways, that the connection is done,
    /// and it has `close_timeout` to answer with RST.
    fn host_ended(&mut self, key: ConnKey) {
        let Some(connection) = self.connections.get_mut(&key) else {
            return;
        };
        connection.host_eof = true;
        connection.host_readable = false;
        let flags = if connection.host_hup {
            SHUTDOWN_RCV | SHUTDOWN_SEND
        } else {
            SHUTDOWN_SEND
        };
        if connection.shutdown_flags != flags {
            connection.shutdown_flags = flags;
            connection.pending |= SEND_SHUTDOWN;
        }
        if flags == SHUTDOWN_RCV | SHUTDOWN_SEND {
            let timeout = self.limits.close_timeout;
            self.set_deadline(key, Some(timeout));
        }
        self.refresh(key);
    }

    /// An event on one of the muxer's fds other than the timer and wake.
    pub fn handle_event(&mut self, token: u64, events: u32) {
        if token == LISTENER_TOKEN {
            return self.accept();
        }
        match self.tokens.get(&token) {
            Some(Target::Handshake) => self.read_connect_line(token),
            Some(&Target::Connection(key)) => self.connection_event(key, events),
            None => {}
        }
    }

    fn connection_event(&mut self, key: ConnKey, events: u32) {
        let Some(connection) = self.connections.get_mut(&key) else {
            return;
        };
        if events & libc::EPOLLERR as u32 != 0 {
            return self.close(key, true);
        }
        if connection.state == State::Connecting {
            // The host program went away before the guest answered.
            if events & libc::EPOLLHUP as u32 != 0 {
                return self.close(key, true);
            }
            return;
        }
        if events & libc::EPOLLHUP as u32 != 0 && !connection.host_hup {
            // Always reported, whatever the interest: out of the epoll, or it
            // would fire until the connection is gone. What the socket
            // still holds is read without it.
            connection.host_hup = true;
            connection.interest = None;
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                connection.stream.as_raw_fd(),
                EpollEvent::default(),
            );
            if !connection.to_host.is_empty() {
                // Nobody will read it.
                return self.close(key, true);
            }
            if connection.host_eof || !connection.may_read_host() {
                return self.host_ended(key);
            }
            connection.host_readable = true;
        }
        if events & libc::EPOLLIN as u32 != 0 {
            connection.host_readable = true;
        }
        if events & libc::EPOLLOUT as u32 != 0 {
            return self.flush(key);
        }
        self.refresh(key);
    }

    fn accept(&mut self) {
        for _ in 0..ACCEPTS_PER_EVENT {
            let stream = match HostStream::accept(&self.listener) {
                Ok(stream) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("{}: accepting a host connection failed: {e}", self.device);
                    return self.pause_listener();
                }
            };
            let live = self.handshakes.len() + self.connections.len();
            if self.handshakes.len() >= self.limits.max_handshakes
                || live >= self.limits.max_connections
            {
                log::warn!(
                    "{}: host connection closed: {} connections and {} waiting already",
                    self.device,
                    self.connections.len(),
                    self.handshakes.len()
                );
                continue;
            }
            let token = self.take_token();
            if let Err(e) = self.epoll.ctl(
                ControlOperation::Add,
                stream.as_raw_fd(),
                EpollEvent::new(EventSet::IN, token),
            ) {
                log::warn!("{}: cannot watch a host connection: {e}", self.device);
                continue;
            }
            self.tokens.insert(token, Target::Handshake);
            let deadline = Instant::now() + self.limits.connect_timeout;
            self.handshakes.insert(
                token,
                Handshake {
                    stream,
                    line: Vec::new(),
                    deadline,
                },
            );
        }
    }

    fn drop_handshake(&mut self, token: u64, why: &str) {
        log::debug!("{}: host connection closed: {why}", self.device);
        self.handshakes.remove(&token);
        self.tokens.remove(&token);
        self.resume_listener();
    }

    /// Reads what there is of a host program's `CONNECT <port>\n`, never
    /// past its newline: what follows is the connection's data.
    fn read_connect_line(&mut self, token: u64) {
        let Some(handshake) = self.handshakes.get_mut(&token) else {
            return;
        };
        let mut bytes = [0u8; MAX_LINE];
        let room = MAX_LINE - handshake.line.len();
        let seen = match handshake.stream.peek(&mut bytes[..room]) {
            Ok(0) => return self.drop_handshake(token, "end of stream before CONNECT"),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(_) => return self.drop_handshake(token, "read error"),
        };
        let take = match bytes[..seen].iter().position(|&b| b == b'\n') {
            Some(at) => at + 1,
            None => seen,
        };
        let got = match handshake.stream.recv(&mut bytes[..take]) {
            Ok(n) => n,
            Err(_) => return self.drop_handshake(token, "read error"),
        };
        handshake.line.extend_from_slice(&bytes[..got]);
        if handshake.line.last() != Some(&b'\n') {
            if handshake.line.len() >= MAX_LINE {
                self.drop_handshake(token, "CONNECT line too long");
            }
            return;
        }
        let Some(port) = parse_connect(&handshake.line) else {
            return self.drop_handshake(token, "not a CONNECT line");
        };
        let Some(handshake) = self.handshakes.remove(&token) else {
            return;
        };
        self.host_connect(token, handshake.stream, port);
    }

    /// A host program asked for guest port `port`: REQUEST to the guest
    /// from a fresh local port.
    fn host_connect(&mut self, token: u64, stream: HostStream, port: u32) {
        let Some(local_port) = self.allocate_local_port(port) else {
            self.tokens.remove(&token);
            log::warn!("{}: no local port free for a host connection", self.device);
            return;
        };
        let key = ConnKey {
            local_port,
            peer_port: port,
        };
        let mut connection = Connection::new(stream, token, State::Connecting);
        // Still registered from the handshake, for input.
        connection.interest = Some(libc::EPOLLIN as u32);
        connection.pending = SEND_REQUEST;
        self.tokens.insert(token, Target::Connection(key));
        self.connections.insert(key, connection);
        let timeout = self.limits.connect_timeout;
        self.set_deadline(key, Some(timeout));
        self.refresh(key);
    }

    fn allocate_local_port(&mut self, peer_port: u32) -> Option<u32> {
        // At most max_connections ports are taken: a free one is near.
        for _ in 0..=self.limits.max_connections {
            let port = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            let taken = self.connections.keys().any(|key| key.local_port == port);
            if !taken
                && !self.connections.contains_key(&ConnKey {
                    local_port: port,
                    peer_port,
                })
            {
                return Some(port);
            }
        }
        None
    }

    /// Gives up on what is past its deadline.
    pub fn tick(&mut self) {
        self.resume_listener();
        let now = Instant::now();
        let expired: Vec<u64> = self
            .handshakes
            .iter()
            .filter(|(_, h)| h.deadline <= now)
            .map(|(&token, _)| token)
            .collect();
        for token in expired {
            self.drop_handshake(token, "no CONNECT line in time");
        }
        let expired: Vec<ConnKey> = self
            .timed
            .iter()
            .filter(|key| {
                self.connections
                    .get(key)
                    .and_then(|c| c.deadline)
                    .is_none_or(|deadline| deadline <= now)
            })
            .copied()
            .collect();
        for key in expired {
            log::debug!("{}: port {} timed out", self.device, key.local_port);
            self.close(key, true);
        }
    }

    /// The next packet for the guest, written to `packet` (header, then
    /// payload), for an rx chain of `capacity` bytes (at least a header).
    /// False: nothing to send now.
    pub fn next_rx(&mut self, capacity: usize, packet: &mut Vec<u8>) -> bool {
        // Each pass sends or gives up on one list entry: bounded.
        loop {
            if let Some(key) = self.rsts.pop_front() {
                put_header(packet, &rst(key, self.guest_cid));
                return true;
            }
            if let Some(key) = self.control_list.pop_front() {
                let Some(connection) = self.connections.get_mut(&key) else {
                    continue;
                };
                connection.in_control_list = false;
                let Some(header) = connection.next_control(key, self.guest_cid) else {
                    continue;
                };
                put_header(packet, &header);
                self.refresh(key);
                return true;
            }
            let Some(key) = self.data_list.pop_front() else {
                return false;
            };
            let Some(connection) = self.connections.get_mut(&key) else {
                continue;
            };
            connection.in_data_list = false;
            if !connection.may_read_host() || !connection.host_readable {
                self.refresh(key);
                continue;
            }
            let credit = connection.peer_credit() as usize;
            if credit == 0 {
                if !connection.credit_requested {
                    connection.credit_requested = true;
                    connection.pending |= SEND_CREDIT_REQUEST;
                }
                self.refresh(key);
                continue;
            }
            let room = (capacity - HEADER_SIZE).min(credit).min(MAX_PAYLOAD);
            packet.clear();
            packet.resize(HEADER_SIZE + room, 0);
            match connection.stream.recv(&mut packet[HEADER_SIZE..]) {
                Ok(0) => self.host_ended(key),
                Ok(n) => {
                    connection.tx_cnt = connection.tx_cnt.wrapping_add(n as u32);
                    let mut header = connection.header(key, self.guest_cid, OP_RW);
                    header.len = n as u32;
                    packet.truncate(HEADER_SIZE + n);
                    packet[..HEADER_SIZE].copy_from_slice(&header.to_bytes());
                    self.refresh(key);
                    return true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    connection.host_readable = false;
                    self.refresh(key);
                }
                Err(_) => self.close(key, true),
            }
        }
    }
}

fn put_header(packet: &mut Vec<u8>, header: &Header) {
    packet.clear();
    packet.extend_from_slice(&header.to_bytes());
}

/// The port of `CONNECT <port>\n` (decimal, no sign, no spaces around).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let digits = line.strip_prefix(b"CONNECT ")?.strip_suffix(b"\n")?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Checks where a guest packet comes from and goes: anything but the
/// guest's own CID to the host's is dropped.
pub fn addressed_to_host(header: &Header, guest_cid: u64) -> bool {
    header.src_cid == guest_cid && header.dst_cid == HOST_CID
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines_are_parsed_strictly() {
        assert_eq!(parse_connect(b"CONNECT 1234\n"), Some(1234));
        assert_eq!(parse_connect(b"CONNECT 4294967295\n"), Some(u32::MAX));
        for garbage in [
            &b"CONNECT 4294967296\n"[..],
            b"CONNECT -1\n",
            b"CONNECT +1\n",
            b"CONNECT \n",
            b"CONNECT 12 \n",
            b"connect 12\n",
            b"CONNECT 12",
            b"CONNECT  12\n",
        ] {
            assert_eq!(parse_connect(garbage), None, "{garbage:?}");
        }
    }
}
