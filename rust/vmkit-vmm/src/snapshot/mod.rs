//! Snapshots: a paused VM's state written to a directory and read back.
//!
//! The pieces so far: each vCPU's KVM state ([`vcpu::VcpuState`]) and guest
//! memory as one sparse file that a restore maps copy-on-write (pages come in
//! on first touch, so a restore does not copy guest RAM). Everything read
//! from a snapshot is checked before use: a snapshot is user input.

pub mod codec;
pub mod placement;
pub mod vcpu;

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::error::{ErrorKind, ModuleError};
use crate::memory::GuestRam;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{what}: {detail}")]
    Corrupt { what: String, detail: String },
    #[error("{what}: format version {found}, but this vmkit reads version {supported}")]
    Version {
        what: String,
        found: u32,
        supported: u32,
    },
    #[error("{what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("{count} {what} do not fit KVM's table")]
    TooMany { what: &'static str, count: usize },
    #[error("KVM_GET_MSRS cannot read MSR {index:#x}")]
    MsrUnreadable { index: u32 },
    #[error("KVM_SET_MSRS refused MSR {index:#x} = {data:#x}")]
    MsrRefused { index: u32, data: u64 },
    #[error(
        "the saved vCPUs use CPU features this host's KVM does not offer ({missing}): restore \
         or migrate only between hosts with the same CPU features"
    )]
    CpuFeatures { missing: String },
    #[error("the VM is not paused")]
    NotParked,
    #[error("the vCPUs did not hand over their state within 10 s")]
    VcpusBusy,
    #[error("Destination is not a directory")]
    NotADirectory,
    /// Creating a snapshot file: Cloud Hypervisor's answer is the OS error
    /// alone ("File exists (os error 17)").
    #[error("{source}")]
    Exists {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{what}: {path}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
}

impl ModuleError for SnapshotError {
    fn kind(&self) -> ErrorKind {
        match self {
            SnapshotError::Kvm { .. }
            | SnapshotError::TooMany { .. }
            | SnapshotError::MsrUnreadable { .. }
            | SnapshotError::MsrRefused { .. } => ErrorKind::Kvm,
            SnapshotError::NotParked | SnapshotError::VcpusBusy => ErrorKind::State,
            SnapshotError::Corrupt { .. }
            | SnapshotError::CpuFeatures { .. }
            | SnapshotError::Version { .. }
            | SnapshotError::NotADirectory
            | SnapshotError::Exists { .. }
            | SnapshotError::Io { .. } => ErrorKind::Snapshot,
        }
    }
}

/// The files of a snapshot directory.
pub const HEADER_FILE: &str = "snapshot.json";
pub const CONFIG_FILE: &str = "config.json";
pub const MEMORY_FILE: &str = "memory";
pub const PLATFORM_FILE: &str = "platform";
/// vCPU `i`'s state is in `vcpu-<i>`.
pub fn vcpu_file(index: usize) -> String {
    format!("vcpu-{index}")
}

/// What `snapshot.json` says; the config is beside it in `config.json`
/// (Cloud Hypervisor's JSON, with the ids the VM was given).
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Header {
    /// Always "vmkit-snapshot".
    pub format: String,
    /// The layout of the directory and its files ([`FORMAT_VERSION`]).
    pub version: u32,
    /// The vmkit that wrote it (informative).
    pub vmkit: String,
    /// Bytes of guest RAM in `memory`.
    pub memory_size: u64,
    pub vcpus: usize,
    /// Each disk image's size in bytes when the snapshot was taken, by disk
    /// id (regular files only): a clone given another image is checked
    /// against it.
    #[serde(default)]
    pub disks: std::collections::BTreeMap<String, u64>,
    /// The boot's kernel format (`pvh-elf`, `elf`, `bzimage`), for `info`.
    pub kernel_format: Option<String>,
}

pub const FORMAT: &str = "vmkit-snapshot";
pub const FORMAT_VERSION: u32 = 5;

/// Everything a snapshot holds but guest memory, which is mapped from its file.
pub struct Snapshot {
    pub header: Header,
    /// `config.json`'s text.
    pub config: String,
    pub memory: File,
    pub state: SavedState,
}

/// A stopped VM's state but its memory: what a snapshot's `vcpu-N` and
/// `platform` files hold, and what a migration sends as one blob.
pub struct SavedState {
    pub vcpus: Vec<vcpu::VcpuState>,
    pub platform: PlatformState,
}

const STATE_MAGIC: u32 = 0x534d_4b56; // "VKMS"
/// A vCPU's state is a few KiB.
const VCPU_STATE_LIMIT: usize = 1 << 20;

impl SavedState {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = codec::Writer::default();
        w.u32(STATE_MAGIC);
        w.u32(self.vcpus.len() as u32);
        for vcpu in &self.vcpus {
            w.blob(&vcpu.encode());
        }
        w.blob(&self.platform.encode());
        w.bytes
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, SnapshotError> {
        let mut r = codec::Reader::new("migration state", bytes);
        if r.u32()? != STATE_MAGIC {
            return Err(r.corrupt("not a vmkit VM state".to_owned()));
        }
        let count = r.u32()? as usize;
        if count == 0 || count > MAX_VCPUS {
            return Err(r.corrupt(format!("{count} vCPUs")));
        }
        let mut vcpus = Vec::with_capacity(count);
        for index in 0..count {
            let blob = r.blob(VCPU_STATE_LIMIT)?;
            vcpus.push(vcpu::VcpuState::decode(&format!("vCPU {index}"), blob)?);
        }
        let platform = PlatformState::decode(r.blob(MAX_PLATFORM_FILE as usize)?)?;
        r.finish()?;
        Ok(SavedState { vcpus, platform })
    }
}

/// The KVM VM's clock, the user-space platform devices' registers, the
/// PCI devices' configuration and transport registers, where each PCI
/// function sits, and the ACPI memory hot-plug controller's slots (the
/// DIMMs `vm.resize` added).
pub struct PlatformState {
    pub clock: u64,
    pub ioapic: Vec<u8>,
    pub serial: Option<Vec<u8>>,
    pub pci: Vec<u8>,
    pub placement: placement::PciPlacement,
    pub memory_hotplug: Vec<u8>,
}

const PLATFORM_MAGIC: u32 = 0x4c50_4b56; // "VKPL"
/// The largest platform device state vmkit writes is the IOAPIC's (200 bytes).
const PLATFORM_BLOB_LIMIT: usize = 4096;
/// PCI: 4 KiB of configuration space per device, and its registers; and
/// the vhost-user backends' own states (virtiofsd's: the paths it holds).
const PCI_BLOB_LIMIT: usize = 64 << 20;
/// The platform file holds the PCI state, and a little more.
const MAX_PLATFORM_FILE: u64 = PCI_BLOB_LIMIT as u64 + (1 << 20);

impl PlatformState {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = codec::Writer::default();
        w.u32(PLATFORM_MAGIC);
        w.u64(self.clock);
        w.blob(&self.ioapic);
        match &self.serial {
            Some(serial) => {
                w.u32(1);
                w.blob(serial);
            }
            None => w.u32(0),
        }
        w.blob(&self.pci);
        self.placement.encode(&mut w);
        w.blob(&self.memory_hotplug);
        w.bytes
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, SnapshotError> {
        let mut r = codec::Reader::new(PLATFORM_FILE, bytes);
        if r.u32()? != PLATFORM_MAGIC {
            return Err(r.corrupt("not a vmkit platform state".to_owned()));
        }
        let clock = r.u64()?;
        let ioapic = r.blob(PLATFORM_BLOB_LIMIT)?.to_vec();
        let serial = match r.u32()? {
            0 => None,
            1 => Some(r.blob(PLATFORM_BLOB_LIMIT)?.to_vec()),
            other => return Err(r.corrupt(format!("serial port marker {other}"))),
        };
        let pci = r.blob(PCI_BLOB_LIMIT)?.to_vec();
        let placement = placement::PciPlacement::decode(&mut r)?;
        let memory_hotplug = r.blob(PLATFORM_BLOB_LIMIT)?.to_vec();
        r.finish()?;
        Ok(PlatformState {
            clock,
            ioapic,
            serial,
            pci,
            placement,
            memory_hotplug,
        })
    }
}

/// What a snapshot writes, gathered from the paused VM.
pub struct SnapshotParts<'a> {
    pub config: &'a vmkit_config::VmConfig,
    pub kernel_format: Option<&'a str>,
    pub ram: &'a GuestRam,
    /// Where guest memory goes in the memory file.
    pub layout: &'a MemoryLayout,
    pub state: &'a SavedState,
}

/// What a memory file holds (and a migration sends): `ranges` of guest
/// memory one after the other (boot RAM's, then each hot-added DIMM's, then
/// each virtio-mem region whole), less the `unplugged` virtio-mem blocks,
/// which stay holes: the guest gave them back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryLayout {
    pub ranges: Vec<(u64, u64)>,
    /// Sorted, within `ranges`.
    pub unplugged: Vec<(u64, u64)>,
}

impl MemoryLayout {
    /// Guest RAM's ranges, then `dimms` and the virtio-mem regions
    /// (`unplugged`: their blocks the guest does not use).
    pub fn new(ram: &GuestRam, dimms: &[(u64, u64)], unplugged: Vec<(u64, u64)>) -> Self {
        let mut ranges = ram.ranges.clone();
        ranges.extend_from_slice(dimms);
        ranges.extend(ram.virtio_mem.iter().map(|zone| (zone.addr, zone.size)));
        MemoryLayout { ranges, unplugged }
    }

    /// The memory file's length.
    pub fn size(&self) -> u64 {
        self.ranges.iter().map(|r| r.1).sum()
    }

    /// The parts that may hold data, as (guest address, length, file offset).
    pub fn pieces(&self) -> Vec<(u64, u64, u64)> {
        let mut pieces = Vec::new();
        let mut offset = 0u64;
        for &(base, size) in &self.ranges {
            let end = base + size;
            let mut cursor = base;
            for &(hole, len) in &self.unplugged {
                let hole_end = hole.saturating_add(len);
                if hole_end <= cursor || hole >= end {
                    continue;
                }
                if hole > cursor {
                    pieces.push((cursor, hole - cursor, offset + (cursor - base)));
                }
                cursor = hole_end.min(end);
            }
            if cursor < end {
                pieces.push((cursor, end - cursor, offset + (cursor - base)));
            }
            offset += size;
        }
        pieces
    }

    /// The guest address of byte `offset` of the file, and how much of its
    /// range is left from there.
    fn file_to_guest(&self, mut offset: u64) -> Option<(u64, u64)> {
        for &(base, size) in &self.ranges {
            if offset < size {
                return Some((base + offset, size - offset));
            }
            offset -= size;
        }
        None
    }
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SnapshotError {
    let path = path.display().to_string();
    move |source| SnapshotError::Io { what, path, source }
}

/// Writes a snapshot into the existing directory `dir`, as Cloud Hypervisor
/// does: its files are new (an existing one is an error, not overwritten)
/// and only the owner can read them (they hold guest memory). On failure
/// the files written so far are removed: a half-written snapshot is not left
/// to be restored.
pub fn write_dir(dir: &Path, parts: &SnapshotParts<'_>) -> Result<(), SnapshotError> {
    if !dir.is_dir() {
        return Err(SnapshotError::NotADirectory);
    }
    let mut written = Vec::new();
    let result = write_files(dir, parts, &mut written);
    if result.is_err() {
        for path in written {
            let _ = std::fs::remove_file(path);
        }
    }
    result
}

fn write_files(
    dir: &Path,
    parts: &SnapshotParts<'_>,
    written: &mut Vec<PathBuf>,
) -> Result<(), SnapshotError> {
    // Each file reaches the disk before the header is written, and the
    // header before the call returns: after a host crash the directory holds
    // a whole snapshot or no header.
    fn put(written: &mut Vec<PathBuf>, path: PathBuf, bytes: &[u8]) -> Result<(), SnapshotError> {
        use std::io::Write;
        let mut file = create(written, &path)?;
        file.write_all(bytes).map_err(io_error("writing", &path))?;
        file.sync_all().map_err(io_error("writing", &path))
    }
    let config = serde_json::to_string_pretty(parts.config)
        .map_err(|e| io_error("writing", &dir.join(CONFIG_FILE))(io::Error::other(e)))?;
    put(written, dir.join(CONFIG_FILE), config.as_bytes())?;
    for (index, state) in parts.state.vcpus.iter().enumerate() {
        put(written, dir.join(vcpu_file(index)), &state.encode())?;
    }
    put(
        written,
        dir.join(PLATFORM_FILE),
        &parts.state.platform.encode(),
    )?;
    let memory_path = dir.join(MEMORY_FILE);
    let memory = create(written, &memory_path)?;
    write_memory(
        parts.ram,
        parts.layout,
        &memory,
        &memory_path.display().to_string(),
    )?;
    // The header last: a directory without it is not a snapshot.
    let header = Header {
        format: FORMAT.to_owned(),
        version: FORMAT_VERSION,
        vmkit: env!("CARGO_PKG_VERSION").to_owned(),
        memory_size: parts.layout.size(),
        vcpus: parts.state.vcpus.len(),
        disks: disk_sizes(parts.config),
        kernel_format: parts.kernel_format.map(str::to_owned),
    };
    let header = serde_json::to_string_pretty(&header)
        .map_err(|e| io_error("writing", &dir.join(HEADER_FILE))(io::Error::other(e)))?;
    put(written, dir.join(HEADER_FILE), header.as_bytes())?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("writing", dir))
}

/// The size of each disk image that is a regular file, by disk id.
pub fn disk_sizes(config: &vmkit_config::VmConfig) -> std::collections::BTreeMap<String, u64> {
    config
        .disks
        .iter()
        .flatten()
        .filter_map(|disk| {
            let meta = std::fs::metadata(disk.path.as_ref()?).ok()?;
            let id = disk.id.clone()?;
            meta.is_file().then_some((id, meta.len()))
        })
        .collect()
}

/// Creates `path`, which must not exist, readable by its owner only, and
/// records it in `written` for the cleanup of a failed snapshot.
fn create(written: &mut Vec<PathBuf>, path: &Path) -> Result<File, SnapshotError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| SnapshotError::Exists {
            path: path.display().to_string(),
            source,
        })?;
    written.push(path.to_owned());
    Ok(file)
}

/// Most vCPUs a snapshot may claim (KVM's own limit is far below).
const MAX_VCPUS: usize = 4096;
/// A vCPU state file is a few KiB; anything far larger is not one.
const MAX_STATE_FILE: u64 = 1 << 20;

fn read_small(path: &Path, limit: u64) -> Result<Vec<u8>, SnapshotError> {
    let file = File::open(path).map_err(io_error("opening", path))?;
    let len = file.metadata().map_err(io_error("reading", path))?.len();
    if len > limit {
        return Err(SnapshotError::Corrupt {
            what: path.display().to_string(),
            detail: format!("{len} bytes (at most {limit})"),
        });
    }
    std::fs::read(path).map_err(io_error("reading", path))
}

/// Reads and checks a snapshot directory (all but the memory's contents).
pub fn read_dir(dir: &Path) -> Result<Snapshot, SnapshotError> {
    if !dir.is_dir() {
        return Err(SnapshotError::NotADirectory);
    }
    let header_path = dir.join(HEADER_FILE);
    let text = read_small(&header_path, MAX_STATE_FILE)?;
    let header: Header = serde_json::from_slice(&text).map_err(|e| SnapshotError::Corrupt {
        what: header_path.display().to_string(),
        detail: e.to_string(),
    })?;
    if header.format != FORMAT {
        return Err(SnapshotError::Corrupt {
            what: header_path.display().to_string(),
            detail: format!("format {:?}, not {FORMAT:?}", header.format),
        });
    }
    if header.version != FORMAT_VERSION {
        return Err(SnapshotError::Version {
            what: header_path.display().to_string(),
            found: header.version,
            supported: FORMAT_VERSION,
        });
    }
    if header.vcpus == 0 || header.vcpus > MAX_VCPUS {
        return Err(SnapshotError::Corrupt {
            what: header_path.display().to_string(),
            detail: format!("{} vCPUs", header.vcpus),
        });
    }
    let config_path = dir.join(CONFIG_FILE);
    let config = String::from_utf8(read_small(&config_path, MAX_STATE_FILE)?).map_err(|_| {
        SnapshotError::Corrupt {
            what: config_path.display().to_string(),
            detail: "not UTF-8".to_owned(),
        }
    })?;
    let vcpus = (0..header.vcpus)
        .map(|index| {
            let path = dir.join(vcpu_file(index));
            vcpu::VcpuState::decode(
                &path.display().to_string(),
                &read_small(&path, MAX_STATE_FILE)?,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let platform =
        PlatformState::decode(&read_small(&dir.join(PLATFORM_FILE), MAX_PLATFORM_FILE)?)?;
    let memory_path = dir.join(MEMORY_FILE);
    let memory = File::open(&memory_path).map_err(io_error("opening", &memory_path))?;
    check_memory_file(
        &memory,
        &memory_path.display().to_string(),
        header.memory_size,
    )?;
    Ok(Snapshot {
        header,
        config,
        memory,
        state: SavedState { vcpus, platform },
    })
}

/// Pages compared against zero (and left as holes) when memory is written.
const PAGE: usize = 4096;
/// Guest memory goes through a buffer of this size.
const CHUNK: usize = 1 << 20;

/// Writes guest memory to `file` (named `path` in errors) as `layout`
/// says, leaving pages of zeros as holes: a snapshot of a guest that
/// touched little memory is small on disk. Returns the bytes written.
pub fn write_memory(
    ram: &GuestRam,
    layout: &MemoryLayout,
    file: &File,
    path: &str,
) -> Result<u64, SnapshotError> {
    let io_error = |what, source| SnapshotError::Io {
        what,
        path: path.to_owned(),
        source,
    };
    let mut buffer = vec![0u8; CHUNK];
    let mut written = 0u64;
    let probe = ZeroProbe::new(ram);
    for (base, size, offset) in layout.pieces() {
        let mut done = 0u64;
        while done < size {
            let address = GuestAddress(base + done);
            // Within one region, whose host mapping is contiguous.
            let region_left = ram
                .memory
                .find_region(address)
                .map_or(0, |r| r.start_addr().0 + r.len() - address.0);
            let len = (size - done).min(CHUNK as u64).min(region_left.max(1)) as usize;
            if probe.reads_zeros(ram, address.0, len as u64) {
                done += len as u64;
                continue;
            }
            let chunk = &mut buffer[..len];
            ram.memory
                .read_slice(chunk, address)
                .map_err(|e| io_error("reading guest memory", io::Error::other(e)))?;
            for (index, page) in chunk.chunks(PAGE).enumerate() {
                if page.iter().any(|&b| b != 0) {
                    let at = offset + done + (index * PAGE) as u64;
                    file.write_all_at(page, at)
                        .map_err(|e| io_error("writing the memory file", e))?;
                    written += page.len() as u64;
                }
            }
            done += len as u64;
        }
    }
    // The holes at the end count too: the file is as long as the layout.
    file.set_len(layout.size())
        .map_err(|e| io_error("sizing the memory file", e))?;
    file.sync_all()
        .map_err(|e| io_error("syncing the memory file", e))?;
    Ok(written)
}

/// Finds guest RAM that reads as zeros without reading it: private
/// anonymous memory the guest never touched (`/proc/self/pagemap`), or a
/// hole in the file behind a shared mapping (a memfd, a shared zone's file).
pub struct ZeroProbe {
    pagemap: Option<File>,
}

impl ZeroProbe {
    pub fn new(ram: &GuestRam) -> Self {
        let pagemap = if ram.anonymous {
            File::open("/proc/self/pagemap").ok()
        } else {
            None
        };
        ZeroProbe { pagemap }
    }

    /// Whether all of `[addr, addr + len)` is known to read as zeros.
    /// False when unsure.
    pub fn reads_zeros(&self, ram: &GuestRam, addr: u64, len: u64) -> bool {
        use std::os::fd::AsRawFd;
        let mut done = 0u64;
        while done < len {
            let at = GuestAddress(addr + done);
            let Some(region) = ram.memory.find_region(at) else {
                return false;
            };
            let offset = at.0 - region.start_addr().0;
            let step = (len - done).min(region.len() - offset);
            let mapping: &vm_memory::mmap::MmapRegion<_> = region;
            let zeros = match (mapping.file_offset(), &self.pagemap) {
                (Some(file), _) if mapping.flags() & libc::MAP_SHARED != 0 => {
                    let start = file.start() + offset;
                    // SAFETY: lseek on a descriptor the mapping keeps open.
                    let data = unsafe {
                        libc::lseek(file.file().as_raw_fd(), start as i64, libc::SEEK_DATA)
                    };
                    // ENXIO: no data from `start` to the end of the file.
                    (data < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO))
                        || (data >= 0 && data as u64 >= start + step)
                }
                (None, Some(pagemap)) => match ram.memory.get_host_address(at) {
                    Ok(host) => untouched(pagemap, host as usize, step as usize),
                    Err(_) => false,
                },
                _ => false,
            };
            if !zeros {
                return false;
            }
            done += step;
        }
        true
    }
}

/// Copies a snapshot's memory file, laid out as `layout` says, into guest
/// memory from file offset `from` on: all of it into RAM made afresh for
/// its config (shared, huge-page or file-backed memory, which a
/// copy-on-write mapping of the file cannot stand for), or what follows
/// boot RAM (DIMMs, virtio-mem regions) after boot RAM was mapped from the
/// file. Only the file's data is copied: its holes are zeros in new memory
/// already, so unplugged blocks stay unbacked.
pub fn load_memory(
    ram: &GuestRam,
    layout: &MemoryLayout,
    file: &File,
    path: &str,
    from: u64,
) -> Result<(), SnapshotError> {
    use std::os::fd::AsRawFd;
    let io_error = |source| SnapshotError::Io {
        what: "reading the memory file",
        path: path.to_owned(),
        source,
    };
    let total = layout.size();
    let mut buffer = vec![0u8; CHUNK];
    let mut at = from;
    while at < total {
        // SAFETY: lseek on a descriptor `file` owns.
        let data = unsafe { libc::lseek(file.as_raw_fd(), at as i64, libc::SEEK_DATA) };
        if data < 0 {
            let error = io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::ENXIO) {
                return Ok(());
            }
            return Err(io_error(error));
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(file.as_raw_fd(), data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io_error(io::Error::last_os_error()));
        }
        let (mut from, to) = (data as u64, (hole as u64).min(total));
        while from < to {
            let (guest, left) =
                layout
                    .file_to_guest(from)
                    .ok_or_else(|| SnapshotError::Corrupt {
                        what: path.to_owned(),
                        detail: format!("data at offset {from:#x}, past guest memory"),
                    })?;
            let len = (to - from).min(left).min(CHUNK as u64) as usize;
            file.read_exact_at(&mut buffer[..len], from)
                .map_err(io_error)?;
            ram.memory
                .write_slice(&buffer[..len], GuestAddress(guest))
                .map_err(|e| io_error(io::Error::other(e)))?;
            from += len as u64;
        }
        at = to.max(at + 1);
    }
    Ok(())
}

/// Whether no page of the anonymous mapping at `host`..`host + len` has
/// been touched: none present or swapped out (`/proc/self/pagemap` bits 63
/// and 62), so all read as zeros. Reading a 2 GiB guest's untouched RAM to
/// find that out took 0.6 s. False when pagemap cannot say.
fn untouched(pagemap: &File, host: usize, len: usize) -> bool {
    const PRESENT_OR_SWAPPED: u64 = 0b11 << 62;
    let pages = len.div_ceil(PAGE);
    let mut entries = vec![0u8; pages * 8];
    let at = (host / PAGE) as u64 * 8;
    if pagemap.read_exact_at(&mut entries, at).is_err() {
        return false;
    }
    entries.chunks_exact(8).all(|entry| {
        let mut raw = [0u8; 8];
        raw.copy_from_slice(entry);
        u64::from_le_bytes(raw) & PRESENT_OR_SWAPPED == 0
    })
}

/// Checks that a memory file holds `expected` bytes of guest RAM: a
/// truncated file would fault the guest (SIGBUS) when it touches the end.
pub fn check_memory_file(file: &File, path: &str, expected: u64) -> Result<(), SnapshotError> {
    let len = file
        .metadata()
        .map_err(|source| SnapshotError::Io {
            what: "reading the memory file",
            path: path.to_owned(),
            source,
        })?
        .len();
    if len != expected {
        return Err(SnapshotError::Corrupt {
            what: path.to_owned(),
            detail: format!("{len} bytes of guest memory, the snapshot's VM has {expected}"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use vmkit_config::MemoryConfig;

    use super::*;
    use crate::memory::{create_guest_ram, map_guest_ram_from_file};

    /// A new, empty `memory` file in a directory of its own (`tag`-pid).
    fn memory_file(tag: &str) -> (PathBuf, File) {
        let dir = std::env::temp_dir().join(format!("{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join(MEMORY_FILE))
            .unwrap();
        (dir, file)
    }

    #[test]
    fn memory_on_both_sides_of_the_mmio_hole_is_written_where_it_was_touched() {
        // 3.5 GiB: [0, 3 GiB) and [4 GiB, 4.5 GiB), one file after the other.
        let config = MemoryConfig::parse("size=3584M", None).unwrap();
        let ram = create_guest_ram(&config).unwrap();
        assert!(ram.anonymous);
        ram.memory.write_obj(1u8, GuestAddress(0x2000)).unwrap();
        ram.memory
            .write_obj(2u8, GuestAddress(0x1_0000_3000))
            .unwrap();
        let (dir, file) = memory_file("vmkit-snap-hole");
        assert_eq!(
            write_memory(&ram, &MemoryLayout::new(&ram, &[], vec![]), &file, "memory").unwrap(),
            2 * PAGE as u64
        );
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, 0x2000).unwrap();
        assert_eq!(byte, [1]);
        // The high range starts right after the low one in the file.
        file.read_exact_at(&mut byte, 0xc000_0000 + 0x3000).unwrap();
        assert_eq!(byte, [2]);
        let restored = map_guest_ram_from_file(&config, &file, false).unwrap();
        assert!(!restored.anonymous);
        assert_eq!(
            restored
                .memory
                .read_obj::<u8>(GuestAddress(0x1_0000_3000))
                .unwrap(),
            2
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn shared_memory_in_zones_is_written_where_it_holds_data_and_copied_back() {
        let zones = vec!["id=z,size=8M,shared=on".to_owned()];
        let config = MemoryConfig::parse("size=8M,shared=on", Some(&zones)).unwrap();
        let ram = create_guest_ram(&config).unwrap();
        assert!(!ram.anonymous && ram.shared_files.is_some());
        ram.memory.write_obj(0x55u8, GuestAddress(0x3000)).unwrap();
        ram.memory
            .write_obj(0x66u8, GuestAddress((9 << 20) + 5))
            .unwrap();
        let (dir, file) = memory_file("vmkit-snap-shared");
        // The memfds' holes are skipped without reading them: two pages.
        let layout = MemoryLayout::new(&ram, &[], vec![]);
        assert_eq!(
            write_memory(&ram, &layout, &file, "memory").unwrap(),
            2 * PAGE as u64
        );
        let fresh = create_guest_ram(&config).unwrap();
        load_memory(&fresh, &layout, &file, "memory", 0).unwrap();
        assert_eq!(
            fresh.memory.read_obj::<u8>(GuestAddress(0x3000)).unwrap(),
            0x55
        );
        assert_eq!(
            fresh
                .memory
                .read_obj::<u8>(GuestAddress((9 << 20) + 5))
                .unwrap(),
            0x66
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn memory_round_trips_through_a_sparse_file_mapped_copy_on_write() {
        let config = MemoryConfig::parse("size=64M", None).unwrap();
        let ram = create_guest_ram(&config).unwrap();
        ram.memory
            .write_obj(0x1122_3344_u32, GuestAddress(0x1000))
            .unwrap();
        ram.memory
            .write_obj(0xabu8, GuestAddress((64 << 20) - 1))
            .unwrap();
        let (dir, file) = memory_file("vmkit-snap");
        let layout = MemoryLayout::new(&ram, &[], vec![]);
        let written = write_memory(&ram, &layout, &file, "memory").unwrap();
        assert_eq!(written, 2 * PAGE as u64, "only the two touched pages");
        let meta = file.metadata().unwrap();
        assert_eq!(meta.len(), 64 << 20);
        assert!(meta.blocks() * 512 < 1 << 20, "the file is sparse");

        check_memory_file(&file, "memory", 64 << 20).unwrap();
        let err = check_memory_file(&file, "memory", 128 << 20).unwrap_err();
        assert!(err.to_string().contains("the snapshot's VM has"), "{err}");

        let restored = map_guest_ram_from_file(&config, &file, false).unwrap();
        assert_eq!(restored.ranges, ram.ranges);
        assert_eq!(
            restored
                .memory
                .read_obj::<u32>(GuestAddress(0x1000))
                .unwrap(),
            0x1122_3344
        );
        // Writes stay in the restored VM: the snapshot does not change.
        restored
            .memory
            .write_obj(7u32, GuestAddress(0x1000))
            .unwrap();
        let mut on_disk = [0u8; 4];
        file.read_exact_at(&mut on_disk, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(on_disk), 0x1122_3344);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
