//! Live migration: the wire between two VMM processes, and guest memory's
//! dirty pages.
//!
//! vmkit's own protocol (version [`VERSION`]) over a unix stream socket,
//! in frames of `kind: u32, length: u64, payload` (little-endian):
//!
//! | frame | from | payload |
//! |---|---|---|
//! | `HELLO` | sender | [`MAGIC`], version: u32, local: u32 |
//! | `CONFIG` | sender | JSON [`ConfigMessage`]: the config with its ids |
//! | `TAP_FDS` | sender | JSON [`TapHandover`] list; the net devices' tap queues ride along (SCM_RIGHTS) |
//! | `MEMORY_FDS` | sender, local only | count: u32; the memory files ride along (SCM_RIGHTS) |
//! | `PAGES` | sender | guest address: u64, then the bytes there |
//! | `STATE` | sender | the vCPUs' and devices' state (as a snapshot's files hold it) |
//! | `COMPLETE` | sender | nothing: run the VM |
//! | `ACK` | receiver, after `CONFIG`, `STATE`, `COMPLETE` | 0, or 1 and the error's text |
//!
//! Taps go over in every migration: within one host the receiver adopts
//! the sender's tap queues (it cannot attach a tap the sender holds); where
//! the descriptors do not arrive (a relay to another host drops them), it
//! opens the taps by name as the config says.
//!
//! The receiver trusts nothing in a frame: each kind has a size limit, pages
//! must lie in guest RAM, the state is decoded with every length checked.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::devices::memory_hotplug::Dimm;
use crate::error::{ErrorKind, ModuleError};
use crate::memory::{GuestRam, GuestRegionMmap, PAGE_SIZE};

pub const MAGIC: &[u8; 16] = b"vmkit-migration\0";
pub const VERSION: u32 = 4;
/// The receiver's answer to `COMPLETE`: it runs the VM with the descriptors
/// `TAP_FDS` carried (it is on this host), so what they stand for (the vsock
/// socket file) is its now.
pub const ACK_ADOPTED_FDS: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Hello = 1,
    Config = 2,
    MemoryFds = 3,
    Pages = 4,
    State = 5,
    Complete = 6,
    Ack = 7,
    TapFds = 8,
}

impl Kind {
    fn from_u32(value: u32) -> Option<Kind> {
        Some(match value {
            1 => Kind::Hello,
            2 => Kind::Config,
            3 => Kind::MemoryFds,
            4 => Kind::Pages,
            5 => Kind::State,
            6 => Kind::Complete,
            7 => Kind::Ack,
            8 => Kind::TapFds,
            _ => return None,
        })
    }

    /// The largest payload the receiving side accepts for this kind.
    fn limit(self) -> u64 {
        match self {
            Kind::Hello => 64,
            Kind::Config => 1 << 20,
            Kind::MemoryFds => 4,
            Kind::Pages => 8 + PAGES_CHUNK as u64,
            // 16 MiB of PCI state and a few KiB per vCPU.
            Kind::State => 64 << 20,
            Kind::Complete => 0,
            Kind::Ack => 64 << 10,
            Kind::TapFds => 64 << 10,
        }
    }
}

/// Guest memory goes in frames of at most this many bytes.
pub const PAGES_CHUNK: usize = 4 << 20;
/// Most memory files a local migration hands over (one per backing).
const MAX_MEMORY_FILES: usize = 64;
/// Most descriptors one frame carries (the kernel's SCM_MAX_FD).
pub const MAX_FILES_PER_FRAME: usize = 253;

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("Error connecting to UNIX socket: {0}")]
    Connect(#[source] io::Error),
    #[error("Error binding to UNIX socket: {0}")]
    Bind(#[source] io::Error),
    #[error("Error accepting on UNIX socket: {0}")]
    Accept(#[source] io::Error),
    #[error("Error unlinking UNIX socket: {0}")]
    Unlink(#[source] io::Error),
    #[error("Local migration requires shared memory or hugepages enabled")]
    LocalNeedsSharedMemory,
    #[error("the migration connection failed: {0}")]
    Io(#[source] io::Error),
    #[error("the other VMM closed the migration connection")]
    Closed,
    #[error("the other VMM does not speak vmkit's migration protocol: {0}")]
    Protocol(String),
    #[error("the receiving VMM refused the migration: {0}")]
    Refused(String),
    #[error("{what}: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("the VM stopped during the migration: {0}")]
    VmStopped(String),
    #[error("the receiving VMM did not confirm the VM runs ({0}); the VM stays paused here")]
    Unconfirmed(String),
    #[error(
        "{backing} is the shared file {path}, in which the sending VMM on this host runs the \
         guest: migrate with local=true to hand it over instead of copying it into itself"
    )]
    SharedFileOnThisHost { backing: String, path: String },
}

impl ModuleError for MigrationError {
    fn kind(&self) -> ErrorKind {
        match self {
            MigrationError::Kvm { .. } => ErrorKind::Kvm,
            _ => ErrorKind::Migration,
        }
    }
}

impl From<io::Error> for MigrationError {
    fn from(error: io::Error) -> Self {
        match error.kind() {
            io::ErrorKind::UnexpectedEof | io::ErrorKind::BrokenPipe => MigrationError::Closed,
            _ => MigrationError::Io(error),
        }
    }
}

/// What `CONFIG` carries.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct ConfigMessage {
    /// Cloud Hypervisor's JSON of the VM's config, with its ids.
    pub config: String,
    /// Bytes of guest RAM.
    pub memory_size: u64,
    pub vcpus: usize,
    pub kernel_format: Option<String>,
    /// The sending host's kernel boot id: equal to the receiver's, both
    /// VMMs are on one host (and a `file=` backing's path is one file).
    #[serde(default)]
    pub boot_id: Option<String>,
}

/// This host's kernel boot id (`/proc/sys/kernel/random/boot_id`).
pub fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|id| id.trim().to_owned())
        .filter(|id| !id.is_empty())
}

/// One entry of `TAP_FDS`: a net device and how many tap queues (one per
/// queue pair, in order) it hands over.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TapHandover {
    pub id: String,
    pub count: usize,
}

/// One end of the migration connection.
pub struct Wire {
    pub stream: UnixStream,
}

impl Wire {
    pub fn send(&mut self, kind: Kind, payload: &[u8]) -> Result<(), MigrationError> {
        self.send_parts(kind, &[payload])
    }

    fn send_parts(&mut self, kind: Kind, parts: &[&[u8]]) -> Result<(), MigrationError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let mut header = [0u8; 12];
        header[..4].copy_from_slice(&(kind as u32).to_le_bytes());
        header[4..].copy_from_slice(&(len as u64).to_le_bytes());
        self.stream.write_all(&header)?;
        for part in parts {
            self.stream.write_all(part)?;
        }
        Ok(())
    }

    /// Reads the next frame's header: its kind and payload length, checked
    /// against the kind's limit.
    fn header(&mut self, header: [u8; 12]) -> Result<(Kind, usize), MigrationError> {
        let mut raw = [0u8; 4];
        raw.copy_from_slice(&header[..4]);
        let kind_value = u32::from_le_bytes(raw);
        let mut raw = [0u8; 8];
        raw.copy_from_slice(&header[4..]);
        let len = u64::from_le_bytes(raw);
        let kind = Kind::from_u32(kind_value)
            .ok_or_else(|| MigrationError::Protocol(format!("unknown frame kind {kind_value}")))?;
        if len > kind.limit() {
            return Err(MigrationError::Protocol(format!(
                "a {kind:?} frame of {len} bytes (at most {})",
                kind.limit()
            )));
        }
        Ok((kind, len as usize))
    }

    /// The next frame, whose payload is read into `buffer`.
    pub fn receive(&mut self, buffer: &mut Vec<u8>) -> Result<Kind, MigrationError> {
        let mut header = [0u8; 12];
        self.stream.read_exact(&mut header)?;
        let (kind, len) = self.header(header)?;
        buffer.resize(len, 0);
        self.stream.read_exact(buffer)?;
        Ok(kind)
    }

    /// The next frame, which must be `expected`.
    pub fn expect(&mut self, expected: Kind, buffer: &mut Vec<u8>) -> Result<(), MigrationError> {
        let kind = self.receive(buffer)?;
        if kind != expected {
            return Err(MigrationError::Protocol(format!(
                "a {kind:?} frame where {expected:?} was due"
            )));
        }
        Ok(())
    }

    /// The last answer, to `COMPLETE`: the VM runs here, with these
    /// `ACK_*` flags.
    pub fn ack_complete(&mut self, flags: u32) -> Result<(), MigrationError> {
        self.send_parts(Kind::Ack, &[&0u32.to_le_bytes(), &flags.to_le_bytes()])
    }

    pub fn ack(&mut self, result: Result<(), &str>) -> Result<(), MigrationError> {
        match result {
            Ok(()) => self.send(Kind::Ack, &0u32.to_le_bytes()),
            Err(message) => {
                let limit = Kind::Ack.limit() as usize - 4;
                let text = &message.as_bytes()[..message.len().min(limit)];
                self.send_parts(Kind::Ack, &[&1u32.to_le_bytes(), text])
            }
        }
    }

    /// Waits for the receiver's answer to the last step.
    pub fn wait_ack(&mut self) -> Result<(), MigrationError> {
        self.wait_ack_flags().map(|_| ())
    }

    /// Waits for the receiver's answer and its flags (none: 0).
    pub fn wait_ack_flags(&mut self) -> Result<u32, MigrationError> {
        let mut buffer = Vec::new();
        self.expect(Kind::Ack, &mut buffer)?;
        match buffer.get(..4) {
            Some([0, 0, 0, 0]) if buffer.len() == 4 => Ok(0),
            Some([0, 0, 0, 0]) if buffer.len() == 8 => Ok(u32::from_le_bytes([
                buffer[4], buffer[5], buffer[6], buffer[7],
            ])),
            Some([1, 0, 0, 0]) => Err(MigrationError::Refused(
                String::from_utf8_lossy(&buffer[4..]).into_owned(),
            )),
            _ => Err(MigrationError::Protocol("a malformed answer".to_owned())),
        }
    }

    /// After the connection broke: the receiver's reason, if it sent one
    /// before closing the connection. (Shutting this side down first would
    /// make a receiver that is fine fail, and send that as its reason.)
    pub fn refusal(&mut self) -> Option<MigrationError> {
        let _ = self
            .stream
            .set_read_timeout(Some(std::time::Duration::from_secs(1)));
        let mut buffer = Vec::new();
        loop {
            match self.receive(&mut buffer) {
                Ok(Kind::Ack) if buffer.get(..4) == Some(&[1, 0, 0, 0]) => {
                    return Some(MigrationError::Refused(
                        String::from_utf8_lossy(&buffer[4..]).into_owned(),
                    ))
                }
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }

    /// Sends the memory files of a local migration.
    pub fn send_files(&mut self, files: &[File]) -> Result<(), MigrationError> {
        let fds: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        self.send_with_fds(Kind::MemoryFds, &(files.len() as u32).to_le_bytes(), &fds)
    }

    /// Receives the memory files of a local migration: exactly as many as
    /// announced.
    pub fn receive_files(&mut self) -> Result<Vec<File>, MigrationError> {
        let (payload, files) = self.receive_with_fds(Kind::MemoryFds, MAX_MEMORY_FILES)?;
        let announced = match <[u8; 4]>::try_from(payload.as_slice()) {
            Ok(raw) => u32::from_le_bytes(raw) as usize,
            Err(_) => {
                return Err(MigrationError::Protocol(
                    "a MEMORY_FDS frame without a count".to_owned(),
                ))
            }
        };
        if announced != files.len() {
            return Err(MigrationError::Protocol(format!(
                "{announced} memory files announced, {} received",
                files.len()
            )));
        }
        Ok(files)
    }

    /// Sends a frame with `fds` attached to its first bytes (SCM_RIGHTS).
    pub fn send_with_fds(
        &mut self,
        kind: Kind,
        payload: &[u8],
        fds: &[RawFd],
    ) -> Result<(), MigrationError> {
        let mut frame = Vec::with_capacity(12 + payload.len());
        frame.extend_from_slice(&(kind as u32).to_le_bytes());
        frame.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        frame.extend_from_slice(payload);
        let sent = if fds.is_empty() {
            0
        } else {
            self.stream
                .send_with_fds(&[&frame[..]], fds)
                .map_err(|e| MigrationError::Io(io::Error::from_raw_os_error(e.errno())))?
        };
        self.stream.write_all(&frame[sent..])?;
        Ok(())
    }

    /// Receives an `expected` frame and the descriptors that came with it
    /// (at most `max`; the kernel closes any beyond). Each is close-on-exec.
    pub fn receive_with_fds(
        &mut self,
        expected: Kind,
        max: usize,
    ) -> Result<(Vec<u8>, Vec<File>), MigrationError> {
        let mut header = [0u8; 12];
        let mut fds = vec![-1 as RawFd; max.min(MAX_FILES_PER_FRAME)];
        let mut iovecs = [libc::iovec {
            iov_base: header.as_mut_ptr().cast(),
            iov_len: header.len(),
        }];
        // SAFETY: the iovec points at `header`, which outlives the call.
        let (read, count) = unsafe { self.stream.recv_with_fds(&mut iovecs, &mut fds) }
            .map_err(|e| MigrationError::Io(io::Error::from_raw_os_error(e.errno())))?;
        let files: Vec<File> = fds[..count]
            .iter()
            .map(|&fd| {
                // SAFETY: recvmsg gave us these descriptors; nothing else owns them.
                let file = unsafe { File::from_raw_fd(fd) };
                // SAFETY: fcntl on a descriptor we own.
                unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
                file
            })
            .collect();
        if read == 0 {
            return Err(MigrationError::Closed);
        }
        self.stream.read_exact(&mut header[read..])?;
        let (kind, len) = self.header(header)?;
        if kind != expected {
            return Err(MigrationError::Protocol(format!(
                "a {kind:?} frame where {expected:?} was due"
            )));
        }
        let mut payload = vec![0u8; len];
        self.stream.read_exact(&mut payload)?;
        Ok((payload, files))
    }

    /// Guest memory `[addr, addr + len)` in frames.
    pub fn send_pages(
        &mut self,
        ram: &GuestRam,
        buffer: &mut [u8],
        addr: u64,
        len: u64,
    ) -> Result<u64, MigrationError> {
        let mut done = 0u64;
        while done < len {
            let step = (len - done).min(buffer.len() as u64) as usize;
            let at = GuestAddress(addr + done);
            ram.memory
                .read_slice(&mut buffer[..step], at)
                .map_err(|e| MigrationError::Io(io::Error::other(e)))?;
            self.send_parts(Kind::Pages, &[&at.0.to_le_bytes(), &buffer[..step]])?;
            done += step as u64;
        }
        Ok(len)
    }
}

/// Writes a `PAGES` frame's payload into guest memory, checked to lie
/// wholly in one RAM range, the hot-plug area or a virtio-mem region.
pub fn store_pages(ram: &GuestRam, payload: &[u8]) -> Result<(), MigrationError> {
    let Some((addr, data)) = payload.split_first_chunk::<8>() else {
        return Err(MigrationError::Protocol(
            "a PAGES frame without an address".to_owned(),
        ));
    };
    let addr = u64::from_le_bytes(*addr);
    if !ram.holds(addr, data.len() as u64) {
        return Err(MigrationError::Protocol(format!(
            "{} bytes at {addr:#x} are not guest RAM",
            data.len()
        )));
    }
    ram.memory
        .write_slice(data, GuestAddress(addr))
        .map_err(|e| MigrationError::Protocol(format!("guest RAM at {addr:#x}: {e}")))
}

/// KVM's view of guest RAM region `slot` (as the VM registers them: in
/// order, from slot 0), logging dirty pages or not.
pub fn memory_slot(
    ram: &GuestRam,
    slot: usize,
    log_dirty: bool,
) -> Option<kvm_userspace_memory_region> {
    let region = ram.memory.iter().nth(slot)?;
    // The hot-plug area has no slot of its own (each plugged DIMM has one).
    if ram
        .hotplug
        .is_some_and(|area| area.base == region.start_addr().0)
    {
        return None;
    }
    let host = ram.memory.get_host_address(region.start_addr()).ok()?;
    Some(kvm_userspace_memory_region {
        slot: slot as u32,
        guest_phys_addr: region.start_addr().0,
        memory_size: region.len(),
        userspace_addr: host as u64,
        flags: if log_dirty {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        },
    })
}

/// KVM memory slots of hot-added DIMMs: this plus the controller's slot
/// number, clear of boot RAM's and pmem's slots.
pub const DIMM_KVM_SLOT_BASE: u32 = 256;

/// KVM's view of hot-added `dimm`, which must lie in one host mapping (the
/// hot-plug area's); None where it does not.
pub fn dimm_slot(
    ram: &GuestRam,
    dimm: &Dimm,
    log_dirty: bool,
) -> Option<kvm_userspace_memory_region> {
    let region = ram.memory.find_region(GuestAddress(dimm.base))?;
    let offset = dimm.base - region.start_addr().0;
    if offset.checked_add(dimm.length)? > region.len() {
        return None;
    }
    let host = region
        .get_host_address(vm_memory::MemoryRegionAddress(offset))
        .ok()?;
    Some(kvm_userspace_memory_region {
        slot: DIMM_KVM_SLOT_BASE + dimm.slot as u32,
        guest_phys_addr: dimm.base,
        memory_size: dimm.length,
        userspace_addr: host as u64,
        flags: if log_dirty {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        },
    })
}

/// Turns KVM's dirty-page logging on or off for every RAM slot and each
/// hot-added DIMM's.
pub fn set_dirty_logging(
    vm_fd: &VmFd,
    ram: &GuestRam,
    dimms: &[Dimm],
    on: bool,
) -> Result<(), MigrationError> {
    let dimm_slots = dimms.iter().filter_map(|dimm| dimm_slot(ram, dimm, on));
    let ram_slots = (0..ram.memory.num_regions()).filter_map(|slot| memory_slot(ram, slot, on));
    for region in ram_slots.chain(dimm_slots) {
        // SAFETY: the same mapping the slot already has; only its flags change.
        unsafe { vm_fd.set_user_memory_region(region) }.map_err(|source| MigrationError::Kvm {
            what: "KVM_SET_USER_MEMORY_REGION (dirty logging)",
            source,
        })?;
    }
    Ok(())
}

/// The pages written since the last call, by the guest (KVM's log of each
/// RAM slot and each DIMM's) or by the VMM (each region's bitmap), as
/// (guest address, length) runs; both logs start afresh.
pub fn take_dirty(
    vm_fd: &VmFd,
    ram: &GuestRam,
    dimms: &[Dimm],
) -> Result<Vec<(u64, u64)>, MigrationError> {
    let dirty_log = |slot: u32, len: u64| {
        vm_fd
            .get_dirty_log(slot, len as usize)
            .map_err(|source| MigrationError::Kvm {
                what: "KVM_GET_DIRTY_LOG",
                source,
            })
    };
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (slot, region) in ram.memory.iter().enumerate() {
        let len = region.len() as usize;
        let base = region.start_addr().0;
        let pages = len.div_ceil(PAGE_SIZE);
        let guest = if memory_slot(ram, slot, false).is_some() {
            dirty_log(slot as u32, region.len())?
        } else {
            // The hot-plug area: its DIMMs' logs, each at its place in it.
            let mut bits = vec![0u64; pages.div_ceil(64)];
            for dimm in dimms {
                let Some(first) = dimm.base.checked_sub(base) else {
                    continue;
                };
                let first = (first / PAGE_SIZE as u64) as usize;
                let log = dirty_log(DIMM_KVM_SLOT_BASE + dimm.slot as u32, dimm.length)?;
                let count = (dimm.length / PAGE_SIZE as u64) as usize;
                for page in
                    (0..count).filter(|p| log.get(p / 64).is_some_and(|w| w & (1 << (p % 64)) != 0))
                {
                    if let Some(word) = bits.get_mut((first + page) / 64) {
                        *word |= 1 << ((first + page) % 64);
                    }
                }
            }
            bits
        };
        let vmm = vmm_bitmap(region).get_and_reset();
        for word in 0..pages.div_ceil(64) {
            let bits = guest.get(word).copied().unwrap_or(0) | vmm.get(word).copied().unwrap_or(0);
            if bits == 0 {
                continue;
            }
            for bit in 0..64 {
                let page = word * 64 + bit;
                if page >= pages || bits & (1 << bit) == 0 {
                    continue;
                }
                let addr = base + (page * PAGE_SIZE) as u64;
                let size = (PAGE_SIZE as u64).min(base + len as u64 - addr);
                match runs.last_mut() {
                    Some(last) if last.0 + last.1 == addr => last.1 += size,
                    _ => runs.push((addr, size)),
                }
            }
        }
    }
    Ok(runs)
}

/// Forgets what the VMM wrote so far (KVM's log starts empty when logging
/// is turned on).
pub fn reset_vmm_dirty(ram: &GuestRam) {
    for region in ram.memory.iter() {
        vmm_bitmap(region).reset();
    }
}

/// The bitmap of the pages the VMM wrote in `region`.
fn vmm_bitmap(region: &GuestRegionMmap) -> &AtomicBitmap {
    let mapping: &MmapRegion<AtomicBitmap> = region;
    mapping.bitmap()
}

#[cfg(test)]
mod tests {
    use vmkit_config::MemoryConfig;

    use super::*;
    use crate::memory::{create_guest_ram, mark_dirty};

    mod needs_kvm {
        use kvm_ioctls::Kvm;

        use super::*;

        #[test]
        #[ignore = "needs /dev/kvm"]
        fn the_dirty_set_holds_what_the_vmm_wrote_and_starts_afresh() {
            let ram = create_guest_ram(&MemoryConfig::parse("size=16M", None).unwrap()).unwrap();
            let kvm = Kvm::new().unwrap();
            let vm = kvm.create_vm().unwrap();
            for slot in 0..ram.memory.num_regions() {
                let region = memory_slot(&ram, slot, false).unwrap();
                // SAFETY: `vm`, declared after `ram`, is dropped before it.
                unsafe { vm.set_user_memory_region(region) }.unwrap();
            }
            set_dirty_logging(&vm, &ram, &[], true).unwrap();
            reset_vmm_dirty(&ram);
            assert!(take_dirty(&vm, &ram, &[]).unwrap().is_empty());
            // Through vm-memory (a used ring, net frames) and behind its back
            // (io_uring reads into guest buffers, marked on completion).
            ram.memory
                .write_obj(7u32, GuestAddress(5 * 4096 + 12))
                .unwrap();
            mark_dirty(&ram.memory, GuestAddress(9 * 4096 - 1), 2);
            assert_eq!(
                take_dirty(&vm, &ram, &[]).unwrap(),
                vec![(5 * 4096, 4096), (8 * 4096, 2 * 4096)]
            );
            assert!(take_dirty(&vm, &ram, &[]).unwrap().is_empty(), "not reset");
        }
    }

    mod dimms {
        use super::*;

        mod needs_kvm {
            use kvm_ioctls::Kvm;

            use super::*;

            #[test]
            #[ignore = "needs /dev/kvm"]
            fn a_dimm_is_logged_in_its_own_slot_and_the_vmm_s_writes_in_it_count() {
                let config = MemoryConfig::parse("size=16M,hotplug_size=512M", None).unwrap();
                let ram = create_guest_ram(&config).unwrap();
                let area = ram.hotplug.unwrap();
                let dimm = Dimm {
                    slot: 1,
                    base: area.base + (128 << 20),
                    length: 128 << 20,
                };
                let kvm = Kvm::new().unwrap();
                let vm = kvm.create_vm().unwrap();
                let slots =
                    (0..ram.memory.num_regions()).filter_map(|s| memory_slot(&ram, s, false));
                for region in slots.chain(dimm_slot(&ram, &dimm, false)) {
                    // SAFETY: `vm`, declared after `ram`, is dropped before it.
                    unsafe { vm.set_user_memory_region(region) }.unwrap();
                }
                let slot = dimm_slot(&ram, &dimm, true).unwrap();
                assert_eq!(slot.slot, DIMM_KVM_SLOT_BASE + 1);
                assert_eq!(slot.flags, KVM_MEM_LOG_DIRTY_PAGES);
                // A DIMM must lie in one mapping: not past the area's end.
                let past = Dimm {
                    base: area.base + area.size - (64 << 20),
                    ..dimm
                };
                assert!(dimm_slot(&ram, &past, false).is_none());
                set_dirty_logging(&vm, &ram, &[dimm], true).unwrap();
                reset_vmm_dirty(&ram);
                assert!(take_dirty(&vm, &ram, &[dimm]).unwrap().is_empty());
                ram.memory
                    .write_obj(7u32, GuestAddress(dimm.base + 3 * 4096))
                    .unwrap();
                assert_eq!(
                    take_dirty(&vm, &ram, &[dimm]).unwrap(),
                    vec![(dimm.base + 3 * 4096, 4096)]
                );
                set_dirty_logging(&vm, &ram, &[dimm], false).unwrap();
            }
        }
    }

    #[test]
    fn the_hotplug_area_has_no_memory_slot() {
        let config = MemoryConfig::parse("size=16M,hotplug_size=256M", None).unwrap();
        let ram = create_guest_ram(&config).unwrap();
        assert_eq!(ram.memory.num_regions(), 2);
        let boot = memory_slot(&ram, 0, true).unwrap();
        assert_eq!((boot.guest_phys_addr, boot.memory_size), (0, 16 << 20));
        // Dirty logging and the dirty log leave it alone: DIMMs have slots of their own.
        assert!(memory_slot(&ram, 1, true).is_none());
    }

    #[test]
    fn pages_outside_guest_ram_are_refused() {
        let ram = create_guest_ram(&MemoryConfig::parse("size=1M", None).unwrap()).unwrap();
        let frame = |addr: u64, len: usize| {
            let mut payload = addr.to_le_bytes().to_vec();
            payload.resize(8 + len, 0xab);
            payload
        };
        store_pages(&ram, &frame(0x1000, 4096)).unwrap();
        assert_eq!(
            ram.memory.read_obj::<u8>(GuestAddress(0x1fff)).unwrap(),
            0xab
        );
        for (addr, len) in [(0xff000, 4097), (1 << 20, 1), (u64::MAX - 3, 8)] {
            let err = store_pages(&ram, &frame(addr, len)).unwrap_err();
            assert!(err.to_string().contains("are not guest RAM"), "{err}");
        }
        assert!(store_pages(&ram, &[1, 2, 3]).is_err());
    }
}
