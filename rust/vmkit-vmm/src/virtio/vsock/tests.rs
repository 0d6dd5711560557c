//! The device against a guest driver (the test kit's `Driver` on the rx and
//! tx rings) and real host programs (unix streams in a temp dir per test).

use std::collections::HashMap;
use std::io::{ErrorKind as IoErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use super::connection::BUF_ALLOC;
use super::packet::*;
use super::*;
use crate::seccomp::{SeccompMode, Spawner, ThreadGroups};
use crate::virtio::testing::{guest_memory, wait_until, Driver, FakeInterrupt, WRITE};
use vm_memory::GuestAddress;

const GUEST_CID: u32 = 3;
const MEMORY: u64 = 0x40_0000;
/// Tx packets go to slots here (each holds a header and MAX_PAYLOAD).
const TX_AREA: u64 = 0x10_0000;
const TX_SLOT: u64 = 0x1_1000;
const TX_SLOTS: u64 = 16;
/// Small tx packets, a ring's worth, so that a full ring of them may wait.
const TX_SMALL_AREA: u64 = 0x21_0000;
const TX_SMALL_SLOT: u64 = 0x100;
/// Rx buffers: one page each.
const RX_AREA: u64 = 0x30_0000;
const RX_BUFFER: u32 = 0x1000;

/// A temp dir unique to the test, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("vmkit-vsock-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self, name: &str) -> String {
        self.0.join(name).to_str().unwrap().to_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Guest {
    memory: GuestMemoryMmap,
    rx: Driver,
    tx: Driver,
    interrupt: Arc<FakeInterrupt>,
    /// Rx chains given so far, and where each head's buffer is.
    rx_given: u64,
    rx_buffers: HashMap<u16, u64>,
    tx_sent: u64,
}

impl Guest {
    fn new() -> Guest {
        let memory = guest_memory(MEMORY);
        Guest {
            rx: Driver::small(&memory, 256, 0x1_0000),
            tx: Driver::small(&memory, 256, 0x2_0000),
            memory,
            interrupt: Arc::new(FakeInterrupt::default()),
            rx_given: 0,
            rx_buffers: HashMap::new(),
            tx_sent: 0,
        }
    }

    fn activation(&mut self, spawner: Spawner) -> Activation {
        let mut event = Driver::small(&self.memory, 16, 0x3_0000);
        Activation {
            spawner,
            memory: self.memory.clone(),
            interrupt: self.interrupt.clone(),
            queues: vec![
                self.rx.activate(RX_QUEUE, false),
                self.tx.activate(TX_QUEUE, false),
                event.activate(EVENT_QUEUE, false),
            ],
            acked_features: F_VERSION_1,
        }
    }

    /// Posts `count` rx buffers of a page each.
    fn give_rx(&mut self, count: usize) {
        for _ in 0..count {
            let addr = RX_AREA + (self.rx_given % 256) * u64::from(RX_BUFFER);
            self.rx_given += 1;
            let head = self.rx.add_chain(&[(addr, RX_BUFFER, WRITE)]);
            self.rx_buffers.insert(head, addr);
        }
    }

    /// Puts a packet in the tx ring (without waiting for the device).
    fn post(&mut self, header: &Header, payload: &[u8]) {
        let addr = if HEADER_SIZE + payload.len() <= TX_SMALL_SLOT as usize {
            TX_SMALL_AREA + (self.tx_sent % 256) * TX_SMALL_SLOT
        } else {
            TX_AREA + (self.tx_sent % TX_SLOTS) * TX_SLOT
        };
        self.tx_sent += 1;
        self.tx.write(addr, &header.to_bytes());
        self.tx.write(addr + HEADER_SIZE as u64, payload);
        self.tx
            .add_chain(&[(addr, (HEADER_SIZE + payload.len()) as u32, 0)]);
    }

    /// Sends a packet and waits for the device to take it.
    fn send(&mut self, header: &Header, payload: &[u8]) {
        self.post(header, payload);
        self.tx.next_used();
    }

    /// The next packet the device wrote into an rx buffer.
    fn recv(&mut self) -> (Header, Vec<u8>) {
        let (head, len) = self.rx.next_used();
        let addr = self.rx_buffers[&head];
        assert!(len as usize >= HEADER_SIZE, "rx packet of {len} bytes");
        let bytes = self.rx.read(addr, u64::from(len));
        let mut header = [0u8; HEADER_SIZE];
        header.copy_from_slice(&bytes[..HEADER_SIZE]);
        let header = Header::parse(&header);
        assert_eq!(header.len as usize, bytes.len() - HEADER_SIZE);
        assert_eq!((header.src_cid, header.dst_cid), (HOST_CID, 3));
        (header, bytes[HEADER_SIZE..].to_vec())
    }

    /// The next packet, which must be `op`.
    fn expect(&mut self, op: u16) -> Header {
        let (header, _) = self.recv();
        assert_eq!(header.op, op, "{header:?}");
        header
    }
}

/// A guest header from `src_port` to host port `dst_port`.
fn guest_header(src_port: u32, dst_port: u32, op: u16) -> Header {
    Header {
        src_cid: u64::from(GUEST_CID),
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: 0,
        kind: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 1 << 20,
        fwd_cnt: 0,
    }
}

fn activated(name: &str, limits: Limits, spawner: Spawner) -> (TempDir, String, Vsock, Guest) {
    let dir = TempDir::new(name);
    let socket = dir.path("vsock.sock");
    let mut vsock = Vsock::new(format!("__vsock_{name}"), GUEST_CID, &socket).unwrap();
    vsock.set_limits(limits);
    let mut guest = Guest::new();
    vsock.activate(guest.activation(spawner)).unwrap();
    (dir, socket, vsock, guest)
}

fn start(name: &str) -> (TempDir, String, Vsock, Guest) {
    activated(name, Limits::default(), Spawner::unconfined())
}

fn short_timeouts() -> Limits {
    Limits {
        connect_timeout: Duration::from_millis(200),
        close_timeout: Duration::from_millis(200),
        ..Limits::default()
    }
}

/// Reads exactly `len` bytes (with a deadline).
fn read_exact(stream: &mut UnixStream, len: usize) -> Vec<u8> {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut bytes = vec![0u8; len];
    stream.read_exact(&mut bytes).unwrap();
    bytes
}

/// Whether the host stream reads end of stream (or a reset) within 5 s.
fn reads_eof(stream: &mut UnixStream) -> bool {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => true,
        Err(e) => e.kind() == IoErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

/// A host program connects to guest port `port` and the guest accepts:
/// the host stream (past its `OK` line) and the connection's host port.
fn host_connection(socket: &str, guest: &mut Guest, port: u32) -> (UnixStream, u32) {
    let mut host = UnixStream::connect(socket).unwrap();
    host.write_all(format!("CONNECT {port}\n").as_bytes())
        .unwrap();
    let request = guest.expect(OP_REQUEST);
    assert_eq!(request.dst_port, port);
    assert!(request.src_port >= 1 << 30, "{request:?}");
    assert_eq!(request.buf_alloc, BUF_ALLOC);
    guest.send(&guest_header(port, request.src_port, OP_RESPONSE), &[]);
    let ok = format!("OK {}\n", request.src_port);
    assert_eq!(read_exact(&mut host, ok.len()), ok.as_bytes());
    (host, request.src_port)
}

/// Data from the guest, `chunk` bytes a packet.
fn guest_writes(guest: &mut Guest, src: u32, dst: u32, data: &[u8], chunk: usize) {
    for part in data.chunks(chunk) {
        let mut header = guest_header(src, dst, OP_RW);
        header.len = part.len() as u32;
        guest.send(&header, part);
    }
}

/// Reads `len` bytes of data packets for (src, dst) from the guest side,
/// skipping credit updates; the guest acknowledges as it goes.
fn guest_reads(guest: &mut Guest, port: u32, local: u32, len: usize) -> Vec<u8> {
    let mut data = Vec::new();
    while data.len() < len {
        if guest.rx.seen() == guest.rx.used_idx() && guest.rx_given - u64::from(guest.rx.seen()) < 4
        {
            guest.give_rx(16);
        }
        let (header, payload) = guest.recv();
        assert_eq!((header.src_port, header.dst_port), (local, port));
        match header.op {
            OP_RW => data.extend_from_slice(&payload),
            OP_CREDIT_UPDATE => {}
            op => panic!("op {op} while reading data"),
        }
        // The guest's reader keeps up: it says so now and then.
        if data.len() % (16 * 1024) < payload.len() {
            let mut update = guest_header(port, local, OP_CREDIT_UPDATE);
            update.fwd_cnt = data.len() as u32;
            guest.send(&update, &[]);
        }
    }
    data
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn relay_both_ways(spawner: Spawner, name: &str) {
    let (_dir, socket, mut vsock, mut guest) = activated(name, Limits::default(), spawner);
    guest.give_rx(16);
    let (mut host, local) = host_connection(&socket, &mut guest, 1234);
    // Host to guest, far beyond one packet and one rx buffer.
    let outgoing = pattern(300 * 1024, 1);
    let writer = {
        let mut host = host.try_clone().unwrap();
        let outgoing = outgoing.clone();
        std::thread::spawn(move || host.write_all(&outgoing).unwrap())
    };
    assert_eq!(
        guest_reads(&mut guest, 1234, local, outgoing.len()),
        outgoing
    );
    writer.join().unwrap();
    // Guest to host, in packets of up to 64 KiB; the host reads as it goes.
    let incoming = pattern(200 * 1024, 7);
    let reader = {
        let mut host = host.try_clone().unwrap();
        let len = incoming.len();
        std::thread::spawn(move || read_exact(&mut host, len))
    };
    guest_writes(&mut guest, 1234, local, &incoming, MAX_PAYLOAD);
    assert_eq!(reader.join().unwrap(), incoming);
    assert_eq!(guest.interrupt.needs_reset_count(), 0);
    vsock.reset();
    assert!(reads_eof(&mut host), "reset closes host streams");
}

#[test]
fn a_host_connection_relays_both_ways() {
    relay_both_ways(Spawner::unconfined(), "relay");
}

/// The same with the worker under its real seccomp filter: a call outside
/// it kills the test binary.
#[test]
fn the_worker_runs_under_its_seccomp_filter() {
    let spawner = Spawner::start(SeccompMode::Trap, ThreadGroups::default()).unwrap();
    relay_both_ways(spawner.clone(), "seccomp");
    // Guest-initiated: socket and connect under the filter.
    let (dir, socket, mut vsock, mut guest) =
        activated("seccomp2", Limits::default(), spawner.clone());
    let listener = UnixListener::bind(format!("{socket}_99")).unwrap();
    guest.give_rx(4);
    guest.send(&guest_header(5000, 99, OP_REQUEST), &[]);
    guest.expect(OP_RESPONSE);
    let (mut host, _) = listener.accept().unwrap();
    let mut rw = guest_header(5000, 99, OP_RW);
    rw.len = 3;
    guest.send(&rw, b"abc");
    assert_eq!(read_exact(&mut host, 3), b"abc");
    vsock.reset();
    drop(dir);
    spawner.stop();
}

#[test]
fn a_guest_connection_reaches_the_listener_at_socket_port() {
    let (_dir, socket, mut vsock, mut guest) = start("guest");
    let listener = UnixListener::bind(format!("{socket}_5555")).unwrap();
    guest.give_rx(16);
    guest.send(&guest_header(40000, 5555, OP_REQUEST), &[]);
    let response = guest.expect(OP_RESPONSE);
    assert_eq!((response.src_port, response.dst_port), (5555, 40000));
    assert_eq!(response.buf_alloc, BUF_ALLOC);
    let (mut host, _) = listener.accept().unwrap();
    let incoming = pattern(100 * 1024, 3);
    guest_writes(&mut guest, 40000, 5555, &incoming, 4000);
    assert_eq!(read_exact(&mut host, incoming.len()), incoming);
    let outgoing = pattern(50 * 1024, 9);
    host.write_all(&outgoing).unwrap();
    assert_eq!(
        guest_reads(&mut guest, 40000, 5555, outgoing.len()),
        outgoing
    );
    vsock.reset();
}

#[test]
fn several_connections_at_once_keep_their_data_apart() {
    let (_dir, socket, mut vsock, mut guest) = start("several");
    guest.give_rx(64);
    let mut connections: Vec<(UnixStream, u32, u32)> = (0..4)
        .map(|i| {
            let port = 100 + i;
            let (host, local) = host_connection(&socket, &mut guest, port);
            (host, local, port)
        })
        .collect();
    let locals: Vec<u32> = connections.iter().map(|c| c.1).collect();
    let mut sorted = locals.clone();
    sorted.dedup();
    assert_eq!(sorted.len(), locals.len(), "local ports unique: {locals:?}");
    for (i, (host, _, _)) in connections.iter_mut().enumerate() {
        host.write_all(format!("from host {i}").as_bytes()).unwrap();
    }
    let mut got: HashMap<u32, Vec<u8>> = HashMap::new();
    while got.values().map(Vec::len).sum::<usize>() < 4 * 11 {
        let (header, payload) = guest.recv();
        assert_eq!(header.op, OP_RW);
        got.entry(header.dst_port).or_default().extend(payload);
    }
    for (i, (host, local, port)) in connections.iter_mut().enumerate() {
        assert_eq!(got[port], format!("from host {i}").as_bytes());
        let message = format!("to host {i}");
        guest_writes(&mut guest, *port, *local, message.as_bytes(), 64);
        assert_eq!(read_exact(host, message.len()), message.as_bytes());
    }
    vsock.reset();
}

#[test]
fn packets_that_break_the_rules_are_dropped_or_reset() {
    let (_dir, _socket, mut vsock, mut guest) = start("malformed");
    guest.give_rx(32);
    // A chain shorter than a header.
    guest.tx.write(TX_AREA, &[0u8; 20]);
    guest.tx.add_chain(&[(TX_AREA, 20, 0)]);
    guest.tx.next_used();
    // A len past the end of its chain, and one past the cap.
    let mut long = guest_header(1, 2, OP_RW);
    long.len = 100;
    guest.send(&long, &[0u8; 10]);
    long.len = (MAX_PAYLOAD + 1) as u32;
    guest.tx.write(TX_AREA, &long.to_bytes());
    guest.tx.add_chain(&[
        (TX_AREA, HEADER_SIZE as u32, 0),
        (0x20_0000, 0x8000, 0),
        (0x20_8000, 0x8001, 0),
    ]);
    guest.tx.next_used();
    // Another guest's CID, another destination.
    let mut foreign = guest_header(1, 2, OP_REQUEST);
    foreign.src_cid = 4;
    guest.send(&foreign, &[]);
    foreign = guest_header(1, 2, OP_REQUEST);
    foreign.dst_cid = 7;
    guest.send(&foreign, &[]);
    // A header outside guest memory, and one that ends there.
    guest
        .tx
        .add_chain(&[(MEMORY + 0x1000, HEADER_SIZE as u32, 0)]);
    guest.tx.next_used();
    guest.tx.write(
        MEMORY - 20,
        &guest_header(1, 2, OP_REQUEST).to_bytes()[..20],
    );
    guest.tx.add_chain(&[(MEMORY - 20, HEADER_SIZE as u32, 0)]);
    guest.tx.next_used();
    // None of these got an answer: the next one is for the RW to an
    // unknown connection.
    guest.send(&guest_header(11, 12, OP_RW), &[]);
    let reset = guest.expect(OP_RST);
    assert_eq!((reset.src_port, reset.dst_port), (12, 11));
    // Unknown type; unknown op.
    let mut datagram = guest_header(21, 22, OP_REQUEST);
    datagram.kind = 2;
    guest.send(&datagram, &[]);
    assert_eq!(guest.expect(OP_RST).dst_port, 21);
    guest.send(&guest_header(31, 32, 99), &[]);
    assert_eq!(guest.expect(OP_RST).dst_port, 31);
    // A RST to nothing gets no answer.
    guest.send(&guest_header(41, 42, OP_RST), &[]);
    guest.rx.assert_idle(Duration::from_millis(50));
    assert_eq!(guest.interrupt.needs_reset_count(), 0);
    vsock.reset();
}

#[test]
fn a_header_and_payload_may_span_descriptors() {
    let (_dir, socket, mut vsock, mut guest) = start("split");
    let listener = UnixListener::bind(format!("{socket}_7")).unwrap();
    guest.give_rx(4);
    guest.send(&guest_header(70, 7, OP_REQUEST), &[]);
    guest.expect(OP_RESPONSE);
    let (mut host, _) = listener.accept().unwrap();
    let mut header = guest_header(70, 7, OP_RW);
    header.len = 10;
    let bytes = header.to_bytes();
    guest.tx.write(0x20_0000, &bytes[..30]);
    guest.tx.write(0x20_1000, &bytes[30..]);
    guest.tx.write(0x20_1000 + 14, b"0123");
    guest.tx.write(0x20_2000, b"456789");
    guest.tx.add_chain(&[
        (0x20_0000, 30, 0),
        (0x20_1000, 14 + 4, 0),
        (0x20_2000, 6, 0),
    ]);
    guest.tx.next_used();
    assert_eq!(read_exact(&mut host, 10), b"0123456789");
    vsock.reset();
}

#[test]
fn a_flood_of_requests_to_nothing_is_bounded() {
    let limits = Limits {
        max_pending_rsts: 8,
        ..Limits::default()
    };
    let (_dir, _socket, mut vsock, mut guest) = activated("flood", limits, Spawner::unconfined());
    // No rx buffers: the RSTs queue up to the cap, then tx waits.
    for port in 0..40 {
        guest.post(&guest_header(1000 + port, 9999, OP_REQUEST), &[]);
    }
    wait_until("the cap", || guest.tx.used_idx() == 8);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(guest.tx.used_idx(), 8, "tx waits for the RSTs to drain");
    // Buffers: every REQUEST gets its RST, in order.
    guest.give_rx(40);
    for port in 0..40 {
        let reset = guest.expect(OP_RST);
        assert_eq!((reset.src_port, reset.dst_port), (9999, 1000 + port));
    }
    wait_until("every tx chain", || guest.tx.used_idx() == 40);
    vsock.reset();
}

#[test]
fn connections_beyond_the_cap_are_reset() {
    let limits = Limits {
        max_connections: 3,
        ..Limits::default()
    };
    let (_dir, socket, mut vsock, mut guest) = activated("cap", limits, Spawner::unconfined());
    let listener = UnixListener::bind(format!("{socket}_80")).unwrap();
    listener.set_nonblocking(true).unwrap();
    guest.give_rx(8);
    for port in 0..5 {
        guest.send(&guest_header(2000 + port, 80, OP_REQUEST), &[]);
    }
    let ops: Vec<u16> = (0..5).map(|_| guest.recv().0.op).collect();
    assert_eq!(ops, [2, 2, 2, 3, 3], "3 RESPONSEs, then RSTs");
    let accepted: Vec<_> = std::iter::from_fn(|| listener.accept().ok()).collect();
    assert_eq!(accepted.len(), 3);
    // A host program beyond the cap is closed at once.
    let mut host = UnixStream::connect(&socket).unwrap();
    assert!(reads_eof(&mut host));
    // One closes: there is room again.
    guest.send(&guest_header(2000, 80, OP_RST), &[]);
    guest.send(&guest_header(3000, 80, OP_REQUEST), &[]);
    guest.expect(OP_RESPONSE);
    vsock.reset();
}

#[test]
fn a_guest_that_returns_no_credit_stalls_the_host_writer() {
    let (_dir, socket, mut vsock, mut guest) = start("credit");
    guest.give_rx(64);
    let mut host = UnixStream::connect(&socket).unwrap();
    host.write_all(b"CONNECT 22\n").unwrap();
    let request = guest.expect(OP_REQUEST);
    let local = request.src_port;
    // The guest has 4 KiB of buffer and never says it read anything.
    let mut response = guest_header(22, local, OP_RESPONSE);
    response.buf_alloc = 4096;
    guest.send(&response, &[]);
    let ok = format!("OK {local}\n");
    assert_eq!(read_exact(&mut host, ok.len()), ok.as_bytes());
    host.set_nonblocking(true).unwrap();
    let chunk = vec![0x5a; 64 * 1024];
    let mut written = 0;
    let mut stalled = 0;
    // Write until the socket stays full.
    while stalled < 20 {
        match host.write(&chunk) {
            Ok(n) => {
                written += n;
                stalled = 0;
            }
            Err(e) if e.kind() == IoErrorKind::WouldBlock => {
                stalled += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("{e}"),
        }
        assert!(written < 64 << 20, "the host writer never stalls");
    }
    let mut data = 0;
    let mut credit_requests = 0;
    while guest.rx.used_idx() != guest.rx.seen() {
        let (header, payload) = guest.recv();
        match header.op {
            OP_RW => data += payload.len(),
            OP_CREDIT_REQUEST => credit_requests += 1,
            op => panic!("op {op}"),
        }
    }
    assert_eq!(data, 4096, "exactly the credit given");
    assert_eq!(credit_requests, 1);
    guest.rx.assert_idle(Duration::from_millis(50));
    // Credit comes back: data flows again.
    let mut update = guest_header(22, local, OP_CREDIT_UPDATE);
    update.buf_alloc = 4096;
    update.fwd_cnt = 4096;
    guest.send(&update, &[]);
    let (header, payload) = guest.recv();
    let page = RX_BUFFER as usize - HEADER_SIZE;
    assert_eq!((header.op, payload.len()), (OP_RW, page));
    vsock.reset();
}

#[test]
fn data_beyond_the_credit_resets_the_connection() {
    let (_dir, socket, mut vsock, mut guest) = start("overrun");
    // One for the REQUEST: none is left for a credit update.
    guest.give_rx(1);
    let (mut host, local) = host_connection(&socket, &mut guest, 33);
    // BUF_ALLOC fits (no rx buffers left: no credit update comes).
    let data = vec![1u8; MAX_PAYLOAD];
    for _ in 0..BUF_ALLOC as usize / MAX_PAYLOAD {
        guest_writes(&mut guest, 33, local, &data, MAX_PAYLOAD);
    }
    guest_writes(&mut guest, 33, local, &[2u8; 1], 1);
    guest.give_rx(2);
    let reset = guest.expect(OP_RST);
    assert_eq!((reset.src_port, reset.dst_port), (local, 33));
    // The host gets what fit, then the end of the stream.
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut received = Vec::new();
    let _ = host.read_to_end(&mut received);
    assert!(received.len() <= BUF_ALLOC as usize);
    assert!(received.iter().all(|&b| b == 1));
    vsock.reset();
}

#[test]
fn shutdown_from_the_host_side() {
    let (_dir, socket, mut vsock, mut guest) = start("host-shutdown");
    guest.give_rx(8);
    let (host, local) = host_connection(&socket, &mut guest, 44);
    host.shutdown(std::net::Shutdown::Write).unwrap();
    let shutdown = guest.expect(OP_SHUTDOWN);
    assert_eq!(shutdown.flags, SHUTDOWN_SEND);
    // Half closed: the guest still writes to the host.
    guest_writes(&mut guest, 44, local, b"late", 64);
    let mut host = host;
    assert_eq!(read_exact(&mut host, 4), b"late");
    drop(host);
    let shutdown = guest.expect(OP_SHUTDOWN);
    assert_eq!(shutdown.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
    // The guest closes its side: the connection is gone (RST to a RST:
    // nothing).
    guest.send(&guest_header(44, local, OP_RST), &[]);
    guest.send(&guest_header(44, local, OP_RW), &[]);
    assert_eq!(guest.expect(OP_RST).dst_port, 44, "unknown now");
    vsock.reset();
}

#[test]
fn a_host_program_that_closes_gets_the_guest_reset_after_the_timeout() {
    let (_dir, socket, mut vsock, mut guest) =
        activated("close-timeout", short_timeouts(), Spawner::unconfined());
    guest.give_rx(8);
    let (host, local) = host_connection(&socket, &mut guest, 45);
    drop(host);
    let shutdown = guest.expect(OP_SHUTDOWN);
    assert_eq!(shutdown.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
    // The guest never answers: RST.
    let reset = guest.expect(OP_RST);
    assert_eq!((reset.src_port, reset.dst_port), (local, 45));
    vsock.reset();
}

#[test]
fn shutdown_from_the_guest_side() {
    let (_dir, socket, mut vsock, mut guest) = start("guest-shutdown");
    guest.give_rx(8);
    let (mut host, local) = host_connection(&socket, &mut guest, 55);
    // SEND only: the host reads the data, then end of stream, and can
    // still write.
    guest_writes(&mut guest, 55, local, b"bye", 64);
    let mut shutdown = guest_header(55, local, OP_SHUTDOWN);
    shutdown.flags = SHUTDOWN_SEND;
    guest.send(&shutdown, &[]);
    assert_eq!(read_exact(&mut host, 3), b"bye");
    assert!(reads_eof(&mut host));
    host.write_all(b"still").unwrap();
    let (header, payload) = guest.recv();
    assert_eq!((header.op, payload.as_slice()), (OP_RW, &b"still"[..]));
    // Both: the host stream closes and the guest gets RST.
    shutdown.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    guest.send(&shutdown, &[]);
    assert_eq!(guest.expect(OP_RST).dst_port, 55);
    assert!(host.write_all(&[0u8; 4096]).is_err() || reads_eof(&mut host));
    vsock.reset();
}

#[test]
fn a_guest_reset_closes_the_host_stream() {
    let (_dir, socket, mut vsock, mut guest) = start("guest-rst");
    guest.give_rx(8);
    let (mut host, local) = host_connection(&socket, &mut guest, 66);
    guest.send(&guest_header(66, local, OP_RST), &[]);
    assert!(reads_eof(&mut host));
    guest.rx.assert_idle(Duration::from_millis(50));
    vsock.reset();
}

#[test]
fn a_guest_that_does_not_answer_a_request_gets_rst() {
    let (_dir, socket, mut vsock, mut guest) =
        activated("no-answer", short_timeouts(), Spawner::unconfined());
    guest.give_rx(8);
    let mut host = UnixStream::connect(&socket).unwrap();
    host.write_all(b"CONNECT 77\n").unwrap();
    let request = guest.expect(OP_REQUEST);
    let reset = guest.expect(OP_RST);
    assert_eq!((reset.src_port, reset.dst_port), (request.src_port, 77));
    assert!(reads_eof(&mut host));
    // A RST from the guest instead also closes the host stream.
    let mut host = UnixStream::connect(&socket).unwrap();
    host.write_all(b"CONNECT 78\n").unwrap();
    let request = guest.expect(OP_REQUEST);
    guest.send(&guest_header(78, request.src_port, OP_RST), &[]);
    assert!(reads_eof(&mut host));
    vsock.reset();
}

#[test]
fn bad_connect_lines_close_the_host_stream() {
    let (_dir, socket, mut vsock, mut guest) =
        activated("lines", short_timeouts(), Spawner::unconfined());
    guest.give_rx(8);
    for line in [
        &b"CONNECT x\n"[..],
        b"HELLO 1\n",
        b"CONNECT 99999999999\n",
        &[b'1'; 40],
        b"CONNECT 5", // never finished
    ] {
        let mut host = UnixStream::connect(&socket).unwrap();
        host.write_all(line).unwrap();
        assert!(reads_eof(&mut host), "{line:?}");
    }
    // The line may arrive in pieces; data after it is the connection's.
    let mut host = UnixStream::connect(&socket).unwrap();
    host.write_all(b"CONN").unwrap();
    std::thread::sleep(Duration::from_millis(20));
    host.write_all(b"ECT 88\nearly").unwrap();
    let request = guest.expect(OP_REQUEST);
    assert_eq!(request.dst_port, 88);
    guest.send(&guest_header(88, request.src_port, OP_RESPONSE), &[]);
    let (header, payload) = guest.recv();
    assert_eq!((header.op, payload.as_slice()), (OP_RW, &b"early"[..]));
    guest.rx.assert_idle(Duration::from_millis(50));
    vsock.reset();
}

#[test]
fn a_reset_keeps_the_socket_and_a_new_activation_serves_it() {
    let (_dir, socket, mut vsock, mut guest) = start("reactivate");
    guest.give_rx(8);
    let (mut host, _) = host_connection(&socket, &mut guest, 90);
    vsock.reset();
    assert!(reads_eof(&mut host));
    assert!(std::path::Path::new(&socket).exists());
    let mut guest = Guest::new();
    vsock
        .activate(guest.activation(Spawner::unconfined()))
        .unwrap();
    guest.give_rx(8);
    let (mut host, local) = host_connection(&socket, &mut guest, 91);
    guest_writes(&mut guest, 91, local, b"again", 64);
    assert_eq!(read_exact(&mut host, 5), b"again");
    vsock.reset();
    drop(vsock);
    assert!(!std::path::Path::new(&socket).exists(), "removed on drop");
}

#[test]
fn a_socket_path_in_use_is_refused_and_named() {
    let dir = TempDir::new("in-use");
    let socket = dir.path("vsock.sock");
    let first = Vsock::new("__vsock_in_use".into(), GUEST_CID, &socket).unwrap();
    let Err(e) = Vsock::new("__vsock_in_use2".into(), GUEST_CID, &socket) else {
        panic!("bound twice");
    };
    assert_eq!(e.kind, ErrorKind::Device);
    assert!(
        e.to_string().starts_with(&format!(
            "Error creating vsock device: cannot bind the unix socket {socket}: "
        )),
        "{e}"
    );
    // The failed device did not remove the first one's socket, which only
    // its owner may connect to.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "mode {mode:o}");
    drop(first);
}

#[test]
fn config_space_holds_the_guest_cid() {
    let dir = TempDir::new("config");
    let vsock = Vsock::new("__vsock_config".into(), 0x1234_5678, &dir.path("s")).unwrap();
    let mut data = [0xffu8; 12];
    vsock.read_config(0, &mut data);
    assert_eq!(data, [0x78, 0x56, 0x34, 0x12, 0, 0, 0, 0, 0, 0, 0, 0]);
    let mut data = [0xffu8; 4];
    vsock.read_config(2, &mut data);
    assert_eq!(data, [0x34, 0x12, 0, 0]);
    vsock.read_config(u64::MAX, &mut data);
    assert_eq!(data, [0; 4]);
    assert_eq!(vsock.device_type(), 19);
    assert_eq!(vsock.queue_max_sizes(), [256, 256, 256]);
    assert_eq!(
        vsock.features(),
        F_VERSION_1 | F_RING_EVENT_IDX | F_RING_INDIRECT_DESC
    );
}

#[test]
fn rx_buffers_outside_guest_memory_or_too_short_are_skipped() {
    let (_dir, _socket, mut vsock, mut guest) = start("rx-bad");
    let outside = guest.rx.add_chain(&[(MEMORY + 0x1000, RX_BUFFER, WRITE)]);
    let short = guest
        .rx
        .add_chain(&[(RX_AREA, HEADER_SIZE as u32 - 1, WRITE)]);
    guest.give_rx(1);
    guest.send(&guest_header(11, 12, OP_RW), &[]);
    assert_eq!(guest.rx.next_used(), (outside, 0));
    assert_eq!(guest.rx.next_used(), (short, 0));
    assert_eq!(guest.expect(OP_RST).dst_port, 11);
    assert_eq!(guest.interrupt.needs_reset_count(), 0);
    vsock.reset();
}

/// Activates `vsock` for `guest` with an event buffer at `EVENT_BUFFER`
/// already given; returns the event queue's driver.
fn activate_with_event_buffer(vsock: &mut Vsock, guest: &mut Guest) -> Driver {
    const EVENT_BUFFER: u64 = 0x3_8000;
    let mut event = Driver::small(&guest.memory, 16, 0x3_0000);
    guest
        .memory
        .write_obj(0xffff_ffffu32, GuestAddress(EVENT_BUFFER))
        .unwrap();
    let queues = vec![
        guest.rx.activate(RX_QUEUE, false),
        guest.tx.activate(TX_QUEUE, false),
        event.activate(EVENT_QUEUE, false),
    ];
    event.add_chain(&[(EVENT_BUFFER, 8, WRITE)]);
    vsock
        .activate(Activation {
            spawner: Spawner::unconfined(),
            memory: guest.memory.clone(),
            interrupt: guest.interrupt.clone(),
            queues,
            acked_features: F_VERSION_1,
        })
        .unwrap();
    event
}

#[test]
fn after_a_snapshot_stop_the_driver_hears_its_connections_are_gone() {
    let (_dir, socket, mut vsock, mut guest) = start("transport-reset");
    guest.give_rx(8);
    let (mut host, _) = host_connection(&socket, &mut guest, 92);
    // Stopped for a snapshot: the host program's connection ends.
    vsock.stop_quiesced();
    assert!(reads_eof(&mut host));
    let mut guest = Guest::new();
    let mut event = activate_with_event_buffer(&mut vsock, &mut guest);
    // VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (0), once.
    assert_eq!(event.next_used(), (0, 4));
    assert_eq!(event.read(0x3_8000, 4), [0, 0, 0, 0]);
    vsock.reset();
    // A driver's own reset closes nothing it does not know of: no event.
    let mut guest = Guest::new();
    let event = activate_with_event_buffer(&mut vsock, &mut guest);
    guest.give_rx(8);
    let (_host, _) = host_connection(&socket, &mut guest, 93);
    event.assert_idle(Duration::from_millis(50));
    vsock.reset();
    // A restored device says so too, and refuses state it never writes.
    assert!(vsock.restore_device_state(&[1]).is_err());
    vsock.restore_device_state(&[]).unwrap();
    let mut guest = Guest::new();
    let mut event = activate_with_event_buffer(&mut vsock, &mut guest);
    assert_eq!(event.next_used(), (0, 4));
    vsock.reset();
}
