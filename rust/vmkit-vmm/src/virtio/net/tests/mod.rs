//! virtio-net tests.

mod needs_net_admin;

use super::ctrl::{
    CTRL_ERR, CTRL_GUEST_OFFLOADS, CTRL_GUEST_OFFLOADS_SET, CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, CTRL_OK,
};
use super::tap::VNET_HDR_LEN;
use super::*;
use crate::memory::GuestMemoryMmap;
use crate::virtio::testing::{
    capture_logs, guest_memory, logged, wait_until, Driver, FakeInterrupt, NEXT, WRITE,
};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use vm_memory::{Bytes, GuestAddress};

const QSIZE: u16 = 16;
const MEM_SIZE: u64 = 0x40_0000;
const F_DESC_NEXT: u16 = NEXT;
const F_DESC_WRITE: u16 = WRITE;

/// Publishes `count` device-writable buffers of `len` bytes (64 KiB apart
/// from 1 MiB) in descriptors 0..count.
fn post_receive_buffers(rx: &mut Driver, count: u16, len: u32) {
    for i in 0..count {
        rx.desc(i, 0x100000 + u64::from(i) * 0x10000, len, F_DESC_WRITE, 0);
        rx.publish(i);
    }
}

/// Queue `index` with its rings in three pages from `base`.
fn ring(memory: &GuestMemoryMmap, index: u16, base: u64) -> (Driver, ActiveQueue) {
    let mut driver = Driver::small(memory, QSIZE, base);
    let active = driver.activate(index, false);
    (driver, active)
}

fn memory() -> GuestMemoryMmap {
    guest_memory(MEM_SIZE)
}

static TAP_SEQ: AtomicU32 = AtomicU32::new(0);

/// A tap name unique to this process and test.
fn tap_name() -> String {
    let n = TAP_SEQ.fetch_add(1, Ordering::SeqCst);
    format!("vmkt{}x{n}", std::process::id() % 100_000)
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
        let n = unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(n, frame.len() as isize, "{}", io::Error::last_os_error());
    }

    /// The next frame with ethertype 0x88b5 and this payload prefix.
    fn expect(&self, prefix: &[u8]) -> Vec<u8> {
        let start = Instant::now();
        let mut buf = vec![0u8; 65536];
        while start.elapsed() < Duration::from_secs(5) {
            // SAFETY: recv(2) into a live buffer.
            let n =
                unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
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

/// A device on a fresh tap (`tap=<name>` plus `options`) with a packet
/// socket on the host side and its first queue pair (rx0 at 0x10000, tx0
/// at 0x20000) activated with `acked`.
struct TapRig {
    net: Net,
    socket: PacketSocket,
    memory: GuestMemoryMmap,
    rx: Driver,
    tx: Driver,
    signals: Arc<FakeInterrupt>,
}

fn tap_rig(options: &str, acked: u64) -> TapRig {
    let name = tap_name();
    let separator = if options.is_empty() { "" } else { "," };
    let mut net = net(&format!("tap={name}{separator}{options}"));
    let socket = PacketSocket::open(&name);
    let memory = memory();
    let (rx, tx, signals) = activate(&mut net, &memory, acked);
    TapRig {
        net,
        socket,
        memory,
        rx,
        tx,
        signals,
    }
}

fn activate(
    net: &mut Net,
    memory: &GuestMemoryMmap,
    acked: u64,
) -> (Driver, Driver, Arc<FakeInterrupt>) {
    let (rx, rx_active) = ring(memory, 0, 0x10000);
    let (tx, tx_active) = ring(memory, 1, 0x20000);
    let signals = Arc::new(FakeInterrupt::default());
    net.activate(Activation {
        spawner: crate::seccomp::Spawner::unconfined(),
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
fn receive(memory: &GuestMemoryMmap, rx: &mut Driver, prefix: &[u8]) -> (Vec<u8>, Vec<u8>) {
    loop {
        let (id, len) = rx.next_used();
        let addr = 0x100000 + u64::from(id) * 0x10000;
        let data = read(memory, addr, len);
        if data.len() > VNET_HDR_LEN + ETH_HLEN
            && data[VNET_HDR_LEN + 12..VNET_HDR_LEN + 14] == [0x88, 0xb5]
            && data[VNET_HDR_LEN + ETH_HLEN..].starts_with(prefix)
        {
            return (data[..VNET_HDR_LEN].to_vec(), data[VNET_HDR_LEN..].to_vec());
        }
        // Not ours: give the buffer back.
        rx.publish(id);
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
