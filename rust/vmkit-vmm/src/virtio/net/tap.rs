//! Linux tap devices for virtio-net: opening or creating one through
//! /dev/net/tun (TUNSETIFF with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, plus
//! IFF_MULTI_QUEUE for several queue pairs), adopting descriptors the caller
//! opened, and the host-side settings Cloud Hypervisor makes (address,
//! netmask, MAC, MTU, link up) through ioctls on an AF_INET socket.
//!
//! Every descriptor is close-on-exec and non-blocking. A tap nobody made
//! persistent (`ip tuntap add` does) disappears when its last descriptor
//! closes, so a tap vmkit created goes away with the [`Tap`]s.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::mem::size_of;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// Bytes of an interface name, NUL included (IFNAMSIZ).
pub const IFNAMSIZ: usize = 16;
/// The virtio-net header every frame carries (virtio 1.x, with num_buffers).
pub const VNET_HDR_LEN: usize = 12;

const TUN_PATH: &str = "/dev/net/tun";

// <linux/if_tun.h>
const IFF_TAP: u16 = 0x0002;
const IFF_NO_PI: u16 = 0x1000;
const IFF_VNET_HDR: u16 = 0x4000;
const IFF_MULTI_QUEUE: u16 = 0x0100;
const IFF_ATTACH_QUEUE: u16 = 0x0200;
const IFF_DETACH_QUEUE: u16 = 0x0400;
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_TSO_ECN: u32 = 0x08;
pub const TUN_F_UFO: u32 = 0x10;

const fn iow(nr: u64) -> u64 {
    // _IOW('T', nr, int): direction write (1) << 30, size 4 << 16.
    (1 << 30) | (4 << 16) | ((b'T' as u64) << 8) | nr
}
const fn ior(nr: u64) -> u64 {
    (2 << 30) | (4 << 16) | ((b'T' as u64) << 8) | nr
}
pub(crate) const TUNSETIFF: u64 = iow(202);
pub(crate) const TUNSETOFFLOAD: u64 = iow(208);
pub(crate) const TUNGETIFF: u64 = ior(210);
pub(crate) const TUNSETVNETHDRSZ: u64 = iow(216);
pub(crate) const TUNSETQUEUE: u64 = iow(217);

// <linux/sockios.h>
pub(crate) const SIOCGIFFLAGS: u64 = 0x8913;
pub(crate) const SIOCSIFFLAGS: u64 = 0x8914;
pub(crate) const SIOCSIFADDR: u64 = 0x8916;
pub(crate) const SIOCSIFNETMASK: u64 = 0x891c;
pub(crate) const SIOCGIFMTU: u64 = 0x8921;
pub(crate) const SIOCSIFMTU: u64 = 0x8922;
pub(crate) const SIOCSIFHWADDR: u64 = 0x8924;
pub(crate) const SIOCGIFHWADDR: u64 = 0x8927;
const IFF_UP: u16 = 0x1;
const ARPHRD_ETHER: u16 = 1;

/// `struct ifreq`: a name and a 24-byte union.
#[repr(C)]
#[derive(Clone, Copy)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> IfReq {
        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            data: [0; 24],
        };
        let bytes = name.as_bytes();
        let n = bytes.len().min(IFNAMSIZ - 1);
        req.name[..n].copy_from_slice(&bytes[..n]);
        req
    }

    fn name(&self) -> String {
        CStr::from_bytes_until_nul(&self.name)
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_else(|_| String::from_utf8_lossy(&self.name).into_owned())
    }

    fn short(&self) -> u16 {
        u16::from_ne_bytes([self.data[0], self.data[1]])
    }

    fn set_short(&mut self, value: u16) {
        self.data[..2].copy_from_slice(&value.to_ne_bytes());
    }

    fn int(&self) -> i32 {
        i32::from_ne_bytes([self.data[0], self.data[1], self.data[2], self.data[3]])
    }

    fn set_int(&mut self, value: i32) {
        self.data[..4].copy_from_slice(&value.to_ne_bytes());
    }

    /// A `struct sockaddr_in` with `addr` (port 0).
    fn set_inet(&mut self, addr: Ipv4Addr) {
        self.data = [0; 24];
        self.data[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        self.data[4..8].copy_from_slice(&addr.octets());
    }

    /// A `struct sockaddr` of family ARPHRD_ETHER with `mac`.
    fn set_hwaddr(&mut self, mac: [u8; 6]) {
        self.data = [0; 24];
        self.data[..2].copy_from_slice(&ARPHRD_ETHER.to_ne_bytes());
        self.data[2..8].copy_from_slice(&mac);
    }

    fn hwaddr(&self) -> [u8; 6] {
        let mut mac = [0; 6];
        mac.copy_from_slice(&self.data[2..8]);
        mac
    }
}

fn ioctl(fd: RawFd, request: u64, req: &mut IfReq) -> io::Result<()> {
    // SAFETY: every request used here reads or writes at most a struct ifreq,
    // which `req` is, and the kernel checks `fd`.
    let ret = unsafe { libc::ioctl(fd, request as _, req as *mut IfReq) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn ioctl_int(fd: RawFd, request: u64, value: libc::c_ulong) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value, TUNSETVNETHDRSZ a
    // pointer to an int, which the callers pass as the address of one.
    let ret = unsafe { libc::ioctl(fd, request as _, value) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// An AF_INET datagram socket: the handle interface ioctls go through.
fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked and owned.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether an interface with this name exists (as Cloud Hypervisor checks).
pub fn interface_exists(name: &str) -> bool {
    !name.is_empty() && !name.contains('/') && Path::new("/sys/class/net").join(name).exists()
}

/// One queue of a tap device: a non-blocking /dev/net/tun descriptor.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    /// Attached to the device (multi-queue taps detach unused queues).
    attached: AtomicBool,
    /// A socketpair standing in for a tap (fuzz targets): no tap ioctls.
    #[cfg(feature = "fuzzing")]
    socketpair: bool,
}

impl Tap {
    /// Opens (or creates) the tap `name` (`vmtap%d` style templates are
    /// numbered by the kernel) with a virtio-net header and, if asked,
    /// several queues. The name the kernel used is in [`Tap::name`].
    pub fn open(name: &str, multi_queue: bool) -> io::Result<Tap> {
        if name.len() >= IFNAMSIZ {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("interface names are at most {} bytes", IFNAMSIZ - 1),
            ));
        }
        if name.as_bytes().contains(&0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "interface name contains a NUL byte",
            ));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot open {TUN_PATH}: {e}")))?;
        let mut req = IfReq::new(name);
        let mut flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        if multi_queue {
            flags |= IFF_MULTI_QUEUE;
        }
        req.set_short(flags);
        ioctl(file.as_raw_fd(), TUNSETIFF, &mut req).map_err(|e| {
            let hint = match e.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => {
                    " (CAP_NET_ADMIN is needed to create \
                     a tap, or the tap belongs to another user)"
                }
                Some(libc::EBUSY) => " (the tap is in use by another process)",
                Some(libc::EINVAL) => {
                    if multi_queue {
                        " (the name is invalid, names an interface that is not a tap, \
                         or a tap created without multi_queue while num_queues > 2)"
                    } else {
                        " (the name is invalid, names an interface that is not a tap, \
                         or a tap created with multi_queue while num_queues is 2)"
                    }
                }
                _ => "",
            };
            io::Error::new(e.kind(), format!("TUNSETIFF: {e}{hint}"))
        })?;
        Tap::attached(file, req.name())
    }

    /// Adopts a tap descriptor the caller opened: it is duplicated (the
    /// caller keeps its own, and a reboot can adopt it again), made
    /// non-blocking and checked to be a tap with a virtio-net header.
    pub fn from_fd(fd: RawFd) -> io::Result<Tap> {
        if fd < 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not an open file descriptor",
            ));
        }
        // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a number the caller gave; a bad
        // one fails with EBADF, a good one yields a descriptor we own.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
        if dup < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("not an open file descriptor ({e})"),
            ));
        }
        // SAFETY: `dup` is a fresh descriptor nobody else owns.
        let file = unsafe { File::from_raw_fd(dup) };
        let mut req = IfReq::new("");
        ioctl(file.as_raw_fd(), TUNGETIFF, &mut req).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("not a tap device (TUNGETIFF: {e}); open /dev/net/tun and attach it with TUNSETIFF"),
            )
        })?;
        let flags = req.short();
        if flags & IFF_TAP == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is a tun device, not a tap (IFF_TAP)", req.name()),
            ));
        }
        if flags & IFF_VNET_HDR == 0 || flags & IFF_NO_PI == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "tap {} was opened without IFF_VNET_HDR | IFF_NO_PI (flags {flags:#x})",
                    req.name()
                ),
            ));
        }
        // SAFETY: F_GETFL/F_SETFL on a descriptor we own.
        unsafe {
            let fl = libc::fcntl(dup, libc::F_GETFL);
            if fl < 0 || libc::fcntl(dup, libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Tap::attached(file, req.name())
    }

    /// One end of a non-blocking datagram socketpair as a tap queue, and
    /// the other end (the "network"): frames cross it whole, as with a tap,
    /// and the tap ioctls are no-ops. For the fuzz targets, which cannot
    /// create taps.
    #[cfg(feature = "fuzzing")]
    pub fn socketpair() -> io::Result<(Tap, File)> {
        use std::os::fd::FromRawFd;
        let mut fds = [0; 2];
        // SAFETY: socketpair(2) writes two descriptors into `fds`; checked.
        let ret = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors are fresh and owned by nobody else.
        let (ours, theirs) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        let tap = Tap {
            file: ours,
            name: "socketpair".to_owned(),
            attached: AtomicBool::new(true),
            socketpair: true,
        };
        Ok((tap, theirs))
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A tap attached to its queue, told the virtio-net header's size.
    fn attached(file: File, name: String) -> io::Result<Tap> {
        let len: libc::c_int = VNET_HDR_LEN as libc::c_int;
        ioctl_int(
            file.as_raw_fd(),
            TUNSETVNETHDRSZ,
            &len as *const libc::c_int as libc::c_ulong,
        )
        .map_err(|e| io::Error::new(e.kind(), format!("TUNSETVNETHDRSZ: {e}")))?;
        Ok(Tap {
            file,
            name,
            attached: AtomicBool::new(true),
            #[cfg(feature = "fuzzing")]
            socketpair: false,
        })
    }

    /// Which offloads the kernel may hand us (`TUN_F_*`): what the guest
    /// accepts. Kernels without UFO support refuse TUN_F_UFO; it is then
    /// dropped (the kernel segments UDP itself).
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        #[cfg(feature = "fuzzing")]
        if self.socketpair {
            return Ok(());
        }
        let fd = self.file.as_raw_fd();
        match ioctl_int(fd, TUNSETOFFLOAD, flags.into()) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && flags & TUN_F_UFO != 0 => {
                ioctl_int(fd, TUNSETOFFLOAD, (flags & !TUN_F_UFO).into())
            }
            other => other,
        }
    }

    /// Attaches this queue to (or detaches it from) a multi-queue tap: a
    /// detached queue gets no frames. No-op if already so.
    pub fn set_attached(&self, attached: bool) -> io::Result<()> {
        if self.attached.load(Ordering::SeqCst) == attached {
            return Ok(());
        }
        #[cfg(feature = "fuzzing")]
        if self.socketpair {
            self.attached.store(attached, Ordering::SeqCst);
            return Ok(());
        }
        let mut req = IfReq::new("");
        req.set_short(if attached {
            IFF_ATTACH_QUEUE
        } else {
            IFF_DETACH_QUEUE
        });
        ioctl(self.file.as_raw_fd(), TUNSETQUEUE, &mut req)?;
        self.attached.store(attached, Ordering::SeqCst);
        Ok(())
    }

    /// Whether this queue gets frames (see [`Tap::set_attached`]).
    pub fn is_attached(&self) -> bool {
        self.attached.load(Ordering::SeqCst)
    }

    fn if_ioctl(&self, request: u64, req: &mut IfReq) -> io::Result<()> {
        let socket = inet_socket()?;
        ioctl(socket.as_raw_fd(), request, req)
    }

    pub fn set_ip(&self, addr: Ipv4Addr) -> io::Result<()> {
        let mut req = IfReq::new(&self.name);
        req.set_inet(addr);
        self.if_ioctl(SIOCSIFADDR, &mut req)
    }

    pub fn set_netmask(&self, mask: Ipv4Addr) -> io::Result<()> {
        let mut req = IfReq::new(&self.name);
        req.set_inet(mask);
        self.if_ioctl(SIOCSIFNETMASK, &mut req)
    }

    pub fn set_mac(&self, mac: [u8; 6]) -> io::Result<()> {
        let mut req = IfReq::new(&self.name);
        req.set_hwaddr(mac);
        self.if_ioctl(SIOCSIFHWADDR, &mut req)
    }

    pub fn mac(&self) -> io::Result<[u8; 6]> {
        let mut req = IfReq::new(&self.name);
        self.if_ioctl(SIOCGIFHWADDR, &mut req)?;
        Ok(req.hwaddr())
    }

    pub fn set_mtu(&self, mtu: u16) -> io::Result<()> {
        let mut req = IfReq::new(&self.name);
        req.set_int(i32::from(mtu));
        self.if_ioctl(SIOCSIFMTU, &mut req)
    }

    pub fn mtu(&self) -> io::Result<u16> {
        let mut req = IfReq::new(&self.name);
        self.if_ioctl(SIOCGIFMTU, &mut req)?;
        Ok(u16::try_from(req.int()).unwrap_or(u16::MAX))
    }

    /// Brings the link up (IFF_UP, keeping the other flags).
    pub fn up(&self) -> io::Result<()> {
        let socket = inet_socket()?;
        let mut req = IfReq::new(&self.name);
        ioctl(socket.as_raw_fd(), SIOCGIFFLAGS, &mut req)?;
        let flags = req.short();
        if flags & IFF_UP != 0 {
            return Ok(());
        }
        req.set_short(flags | IFF_UP);
        ioctl(socket.as_raw_fd(), SIOCSIFFLAGS, &mut req)
    }

    /// Reads one frame (virtio-net header first); `WouldBlock` when none.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: read(2) into a buffer we hold mutably, at most its length.
        let n = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Writes one frame (virtio-net header first); `WouldBlock` when the tap
    /// cannot take it now.
    pub fn write(&self, frame: &[u8]) -> io::Result<usize> {
        // SAFETY: write(2) from a buffer we hold, at most its length.
        let n = unsafe { libc::write(self.file.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// `size_of` check: the kernel's struct ifreq is 40 bytes on 64-bit Linux.
const _: () = assert!(size_of::<IfReq>() == 40);
