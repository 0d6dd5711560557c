//! Guest RAM from a `MemoryConfig`: anonymous, shared (memfd), huge pages
//! (hugetlb memfd) or file-backed zones, laid out around the 32-bit MMIO hole.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::MetadataExt;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress};
use vmkit_config::{HotplugMethod, MemoryConfig, MemoryZoneConfig};

use crate::devices::memory_hotplug::HotplugLayout;
use crate::error::{ErrorKind, ModuleError, Result};
use crate::layout::{MEM_32BIT_RESERVED_START, RAM_64BIT_START};

/// Guest memory as every device sees it. Each region keeps a bitmap of the
/// pages the VMM itself wrote through it (KVM's dirty log sees only the
/// guest's writes): a live migration sends both.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<AtomicBitmap>;

/// The page size of the dirty bitmaps and of KVM's dirty log.
pub const PAGE_SIZE: usize = 4096;

/// Records that the VMM wrote `len` bytes at `addr` behind vm-memory's back
/// (the kernel did, through host iovecs: io_uring or readv). Call it after
/// the write completes, so that a migration round that misses the data sees
/// the mark. Ranges outside guest memory are ignored.
pub fn mark_dirty(memory: &GuestMemoryMmap, addr: GuestAddress, len: usize) {
    use vm_memory::bitmap::Bitmap;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let mut done = 0usize;
    while done < len {
        let Some(at) = addr.0.checked_add(done as u64) else {
            return;
        };
        let Some(region) = memory.find_region(GuestAddress(at)) else {
            return;
        };
        let offset = (at - region.start_addr().0) as usize;
        let step = (len - done).min(region.len() as usize - offset);
        region.bitmap().mark_dirty(offset, step);
        done += step;
    }
}

/// How a region of guest RAM holds its pages, for a device that gives
/// pages back to the host (virtio-balloon).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionBacking {
    /// Private memory (anonymous, or a private copy of a file): dropping
    /// a page from the mapping frees it.
    Private,
    /// Shared memory (a memfd or a file) of normal pages: the file holds
    /// the page, so it must be freed there too.
    Shared,
    /// Huge pages of `page_size` bytes, mapped shared from hugetlbfs: only
    /// whole huge pages can be freed.
    HugePages { page_size: u64 },
}

/// How `region` holds its pages. Huge pages take their size from the
/// backing file (hugetlbfs gives it as the block size).
pub fn region_backing(region: &GuestRegionMmap) -> std::io::Result<RegionBacking> {
    if region.is_hugetlbfs() == Some(true) {
        let page_size = match region.file_offset() {
            Some(file) => file.file().metadata()?.blksize(),
            None => 2 << 20,
        };
        return Ok(RegionBacking::HugePages { page_size });
    }
    if region.flags() & libc::MAP_SHARED != 0 {
        return Ok(RegionBacking::Shared);
    }
    Ok(RegionBacking::Private)
}

/// Why guest RAM could not be created.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("Memory hotplug (hotplug_size, hotplugged_size) is not supported yet")]
    Hotplug,
    /// v37's `InvalidMemoryParameters`, with the reason it logs.
    #[error("Invalid memory parameters: {0} (InvalidMemoryParameters)")]
    InvalidParameters(&'static str),
    #[error("Memory zone {zone}: {what} is not supported yet")]
    ZoneUnsupported { zone: String, what: &'static str },
    /// A zone's virtio-mem settings, in Cloud Hypervisor's words.
    #[error("Memory zone {zone}: {detail}")]
    VirtioMem { zone: String, detail: String },
    #[error("The VM has no memory: memory size is 0 and no memory zone is given")]
    NoMemory,
    #[error("{backing}: {what}")]
    Io {
        backing: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{backing}: huge pages requested but the host has none")]
    NoHugePages { backing: String },
    #[error("{backing}: huge pages of {kib} KiB requested but the host has no such huge pages")]
    NoHugePagesOfSize { backing: String, kib: u64 },
    #[error(
        "{backing}: needs {needed} huge pages of {kib} KiB but the host has {free} free \
         (see /proc/sys/vm/nr_hugepages)"
    )]
    TooFewHugePages {
        backing: String,
        needed: u64,
        kib: u64,
        free: u64,
    },
    #[error("{backing}: too large")]
    TooLarge { backing: String },
    #[error("{backing}: cannot map {size} bytes")]
    Map {
        backing: String,
        size: u64,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("{backing}: invalid guest range at {base:#x}")]
    InvalidRange { backing: String, base: u64 },
    #[error("handed-over guest memory: {detail}")]
    SharedFiles { detail: String },
    #[error("guest memory exceeds the address space")]
    AddressSpace,
    #[error("guest memory")]
    Regions {
        #[source]
        source: vm_memory::GuestRegionCollectionError,
    },
}

impl ModuleError for MemoryError {
    fn kind(&self) -> ErrorKind {
        match self {
            MemoryError::Hotplug | MemoryError::ZoneUnsupported { .. } => ErrorKind::Unsupported,
            _ => ErrorKind::Memory,
        }
    }
}

/// How one chunk of guest RAM is backed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Backing {
    name: String,
    /// The memory zone this is, for `--numa memory_zones`.
    zone: String,
    size: u64,
    file: Option<String>,
    shared: bool,
    hugepages: bool,
    hugepage_size: Option<u64>,
    prefault: bool,
    mergeable: bool,
    thp: bool,
    /// Huge pages are taken as the guest touches them, not counted up
    /// front (the hot-plug area: as in Cloud Hypervisor, a DIMM's pages
    /// come from the host pool when the guest uses them).
    on_demand: bool,
}

impl Backing {
    /// Private anonymous memory: no file behind it, nothing shared.
    fn private_anonymous(&self) -> bool {
        self.file.is_none() && !self.shared && !self.hugepages
    }

    /// Private memory of normal pages (a `file=` only gives its first
    /// contents): a restore can map it from the snapshot copy-on-write.
    fn private(&self) -> bool {
        !self.shared && !self.hugepages
    }
}

/// Guest RAM and the physical ranges it covers (sorted, non-overlapping).
pub struct GuestRam {
    pub memory: GuestMemoryMmap,
    pub ranges: Vec<(u64, u64)>,
    /// Private anonymous memory throughout: a page the guest never touched
    /// is not mapped and reads as zeros (a snapshot skips it).
    pub anonymous: bool,
    /// Each backing's file, when every backing is mapped shared from one
    /// (`shared=on` or huge pages): a local migration hands them over.
    pub shared_files: Option<Vec<File>>,
    /// The ACPI memory hot-plug area (`hotplug_size`): mapped in the VMM
    /// (the last region of `memory`) but not given to the guest (no KVM
    /// slot, not in `ranges`) until `vm.resize` plugs a DIMM of it. Devices
    /// see the whole area from boot (their memory is fixed when they are
    /// built): a guest that points one at RAM not plugged yet only makes the
    /// VMM touch host pages of the area, within `hotplug_size`.
    pub hotplug: Option<HotplugArea>,
    /// The virtio-mem regions past RAM (in `memory`, not in `ranges`).
    pub virtio_mem: Vec<VirtioMemZone>,
}

/// A zone's virtio-mem region: guest memory the guest plugs block by block.
#[derive(Debug, Clone)]
pub struct VirtioMemZone {
    pub zone: String,
    pub addr: u64,
    pub size: u64,
    /// How much is to be plugged at boot (`hotplugged_size`).
    pub hotplugged_size: u64,
    pub backing: RegionBacking,
}

/// Guest-physical range reserved for ACPI memory hot-plug.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HotplugArea {
    pub base: u64,
    pub size: u64,
}

impl GuestRam {
    /// Where the 64-bit device area starts: after RAM and the hot-plug area.
    pub fn hotplug_layout(&self) -> Option<HotplugLayout> {
        match self.hotplug {
            Some(area) => Some(HotplugLayout {
                area_start: area.base,
                device_area_start: area.base.checked_add(area.size)?,
            }),
            None => HotplugLayout::new(self.last_ram_byte(), None),
        }
    }

    /// The last byte of boot RAM.
    pub fn last_ram_byte(&self) -> u64 {
        self.ranges
            .iter()
            .map(|r| r.0 + r.1)
            .max()
            .unwrap_or(0)
            .saturating_sub(1)
    }

    /// Where the 64-bit device area starts: after RAM and whichever
    /// hot-plug memory follows it (the ACPI area or the virtio-mem regions).
    pub fn device_area_start(&self) -> u64 {
        let acpi = self
            .hotplug_layout()
            .map_or(u64::MAX, |layout| layout.device_area_start);
        let virtio_mem = self.virtio_mem.iter().map(|z| z.addr + z.size).max();
        virtio_mem.map_or(acpi, |end| end.max(acpi))
    }

    pub fn total_size(&self) -> u64 {
        self.ranges.iter().map(|r| r.1).sum()
    }

    /// Whether `[addr, addr + len)` lies wholly in guest memory the guest
    /// may have: one RAM range, the hot-plug area (its DIMMs) or one
    /// virtio-mem region.
    pub fn holds(&self, addr: u64, len: u64) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        let area = self.hotplug.map(|area| (area.base, area.size));
        let regions = self.virtio_mem.iter().map(|zone| (zone.addr, zone.size));
        self.ranges
            .iter()
            .copied()
            .chain(area)
            .chain(regions)
            .any(|(base, size)| addr >= base && end <= base + size)
    }

    /// Gives `[addr, addr + len)` (in one region of guest memory) back to
    /// the host, as virtio-mem does with an unplugged block: dropped from a
    /// private mapping, removed from a shared file.
    pub fn discard(&self, addr: u64, len: u64) -> std::io::Result<()> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let outside = || std::io::Error::other(format!("{len:#x} bytes at {addr:#x}: not mapped"));
        let region = self
            .memory
            .find_region(GuestAddress(addr))
            .ok_or_else(outside)?;
        let offset = addr - region.start_addr().0;
        if offset.checked_add(len).is_none_or(|end| end > region.len()) {
            return Err(outside());
        }
        let advice = match region_backing(region)? {
            RegionBacking::Private => libc::MADV_DONTNEED,
            RegionBacking::Shared | RegionBacking::HugePages { .. } => libc::MADV_REMOVE,
        };
        // SAFETY: the range lies in the region's mapping (checked above),
        // which `self` keeps; the guest gave these pages up.
        let done = unsafe {
            libc::madvise(
                region.as_ptr().add(offset as usize).cast(),
                len as usize,
                advice,
            )
        };
        if done != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// End of RAM below the MMIO hole.
    pub fn low_end(&self) -> u64 {
        self.ranges
            .iter()
            .filter(|r| r.0 < MEM_32BIT_RESERVED_START)
            .map(|r| r.0 + r.1)
            .max()
            .unwrap_or(0)
    }
}

/// The ACPI hot-plug area's size (`hotplug_size` with `hotplug_method=acpi`),
/// after v37's checks of the hot-plug options (virtio-mem's are in
/// `virtio_mem_plans`).
fn acpi_hotplug_size(config: &MemoryConfig) -> Result<Option<u64>> {
    if config.hotplug_method == HotplugMethod::VirtioMem {
        return Ok(None);
    }
    // v37's MemoryManager::validate_memory_config, in its order.
    if let Some(hotplugged) = config.hotplugged_size {
        match config.hotplug_size {
            Some(hotplug) if hotplugged > hotplug => {
                return Err(MemoryError::InvalidParameters(
                    "'hotplugged_size' can't be bigger than 'hotplug_size'",
                )
                .into())
            }
            Some(_) => {}
            None => {
                return Err(MemoryError::InvalidParameters(
                    "Invalid to define 'hotplugged_size' when there is no 'hotplug_size'",
                )
                .into())
            }
        }
        return Err(MemoryError::InvalidParameters(
            "Invalid to define 'hotplugged_size' with hotplug method 'acpi'",
        )
        .into());
    }
    Ok(config.hotplug_size.filter(|_| config.size > 0))
}

fn backings(config: &MemoryConfig) -> Result<Vec<Backing>> {
    acpi_hotplug_size(config)?;
    let mut list = Vec::new();
    if config.size > 0 {
        list.push(Backing {
            name: "memory".to_owned(),
            zone: DEFAULT_MEMORY_ZONE.to_owned(),
            size: config.size,
            file: None,
            shared: config.shared,
            hugepages: config.hugepages,
            hugepage_size: config.hugepage_size,
            prefault: config.prefault,
            mergeable: config.mergeable,
            thp: config.thp,
            on_demand: false,
        });
    }
    for zone in config.zones.iter().flatten() {
        list.push(zone_backing(config, zone)?);
    }
    if list.is_empty() {
        return Err(MemoryError::NoMemory.into());
    }
    Ok(list)
}

fn zone_backing(config: &MemoryConfig, zone: &MemoryZoneConfig) -> Result<Backing> {
    let acpi = config.hotplug_method == HotplugMethod::Acpi;
    if acpi && (zone.hotplug_size.is_some() || zone.hotplugged_size.is_some()) {
        return Err(MemoryError::ZoneUnsupported {
            zone: zone.id.clone(),
            what: "hotplug",
        }
        .into());
    }
    if zone.host_numa_node.is_some() {
        return Err(MemoryError::ZoneUnsupported {
            zone: zone.id.clone(),
            what: "host_numa_node",
        }
        .into());
    }
    Ok(Backing {
        name: format!("memory zone {}", zone.id),
        zone: zone.id.clone(),
        size: zone.size,
        file: zone.file.clone(),
        shared: zone.shared,
        hugepages: zone.hugepages,
        hugepage_size: zone.hugepage_size,
        prefault: zone.prefault,
        mergeable: config.mergeable,
        thp: config.thp,
        on_demand: false,
    })
}

/// A zone's virtio-mem region to map past RAM.
struct HotplugPlan {
    /// The region's backing (`size` is `hotplug_size`), as the zone's RAM.
    backing: Backing,
    hotplugged_size: u64,
}

/// The virtio-mem regions of `config` (`hotplug_method=virtio-mem`: the
/// default zone's `--memory hotplug_size`, then each zone's), checked as
/// Cloud Hypervisor checks them.
fn virtio_mem_plans(config: &MemoryConfig) -> Result<Vec<HotplugPlan>> {
    if config.hotplug_method != HotplugMethod::VirtioMem {
        return Ok(Vec::new());
    }
    let mut plans = Vec::new();
    let mut zones: Vec<(Backing, Option<u64>, Option<u64>)> = Vec::new();
    let listed = backings(config)?;
    let mut listed = listed.into_iter();
    if config.size > 0 {
        if let Some(default) = listed.next() {
            zones.push((default, config.hotplug_size, config.hotplugged_size));
        }
    }
    for (zone, backing) in config.zones.iter().flatten().zip(listed) {
        zones.push((backing, zone.hotplug_size, zone.hotplugged_size));
    }
    for (backing, hotplug_size, hotplugged_size) in zones {
        let refuse = |detail: String| -> Result<Vec<HotplugPlan>> {
            Err(MemoryError::VirtioMem {
                zone: backing.zone.clone(),
                detail,
            }
            .into())
        };
        let Some(size) = hotplug_size else {
            if hotplugged_size.is_some() {
                return refuse(
                    "Invalid to define 'hotplugged_size' when there is no 'hotplug_size'"
                        .to_owned(),
                );
            }
            continue;
        };
        let hotplugged = hotplugged_size.unwrap_or(0);
        if size == 0 {
            return refuse("'hotplug_size' can't be 0".to_owned());
        }
        if hotplugged > size {
            return refuse(format!(
                "'hotplugged_size' {hotplugged} can't be bigger than 'hotplug_size' {size}"
            ));
        }
        if !size.is_multiple_of(crate::virtio::mem::REGION_ALIGNMENT) {
            return refuse(format!(
                "hotplug_size={size}: Virtio-mem size is not aligned with {}",
                crate::virtio::mem::REGION_ALIGNMENT
            ));
        }
        if !hotplugged.is_multiple_of(crate::virtio::mem::BLOCK_SIZE) {
            return refuse(format!(
                "hotplugged_size={hotplugged}: not a multiple of the virtio-mem block size \
                 ({} bytes)",
                crate::virtio::mem::BLOCK_SIZE
            ));
        }
        plans.push(HotplugPlan {
            backing: Backing {
                name: format!("{} (virtio-mem)", backing.name),
                size,
                // Cloud Hypervisor never maps a zone's file there.
                file: None,
                ..backing
            },
            hotplugged_size: hotplugged,
        });
    }
    Ok(plans)
}

/// Where the virtio-mem regions of `sizes` go after RAM ending at
/// `ram_end`, as Cloud Hypervisor places them: from 4 GiB while RAM ends
/// below the 32-bit hole, else from the 128 MiB boundary past RAM; each
/// region 128 MiB aligned, one after the other.
fn place_virtio_mem(ram_end: u64, sizes: &[u64]) -> Result<Vec<u64>> {
    let align = crate::virtio::mem::REGION_ALIGNMENT;
    let last = ram_end.saturating_sub(1);
    let mut cursor = if last < MEM_32BIT_RESERVED_START {
        RAM_64BIT_START
    } else {
        (last | (align - 1))
            .checked_add(1)
            .ok_or(MemoryError::AddressSpace)?
    };
    let mut starts = Vec::new();
    for &size in sizes {
        let start = cursor
            .checked_next_multiple_of(align)
            .ok_or(MemoryError::AddressSpace)?;
        cursor = start.checked_add(size).ok_or(MemoryError::AddressSpace)?;
        starts.push(start);
    }
    Ok(starts)
}

fn io_error(backing: &Backing, what: &str, source: std::io::Error) -> MemoryError {
    MemoryError::Io {
        backing: backing.name.clone(),
        what: what.to_owned(),
        source,
    }
}

/// Huge page size in bytes: the configured one, or the host's default.
fn huge_page_size(backing: &Backing) -> Result<u64> {
    if let Some(size) = backing.hugepage_size {
        return Ok(size);
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("Hugepagesize:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib << 10)
        .ok_or_else(|| {
            MemoryError::NoHugePages {
                backing: backing.name.clone(),
            }
            .into()
        })
}

/// Refuses huge-page backing the host cannot supply (it would SIGBUS later).
fn check_free_huge_pages(backing: &Backing, page_size: u64) -> Result<()> {
    let path = format!(
        "/sys/kernel/mm/hugepages/hugepages-{}kB/free_hugepages",
        page_size >> 10
    );
    let free = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let needed = backing.size.div_ceil(page_size);
    match free {
        None => Err(MemoryError::NoHugePagesOfSize {
            backing: backing.name.clone(),
            kib: page_size >> 10,
        }
        .into()),
        Some(free) if free < needed => Err(MemoryError::TooFewHugePages {
            backing: backing.name.clone(),
            needed,
            kib: page_size >> 10,
            free,
        }
        .into()),
        Some(_) => Ok(()),
    }
}

fn memfd(backing: &Backing) -> Result<File> {
    let name = c"vmkit-guest-ram";
    let mut flags = libc::MFD_CLOEXEC;
    if backing.hugepages {
        let page_size = huge_page_size(backing)?;
        if !backing.on_demand {
            check_free_huge_pages(backing, page_size)?;
        }
        flags |= libc::MFD_HUGETLB | (page_size.trailing_zeros() << libc::MFD_HUGE_SHIFT);
    }
    // SAFETY: name is a valid NUL-terminated string; the result is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(io_error(backing, "memfd_create", std::io::Error::last_os_error()).into());
    }
    // SAFETY: fd is a new descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(backing.size)
        .map_err(|e| io_error(backing, "sizing the memory file", e))?;
    Ok(file)
}

fn backing_file(backing: &Backing) -> Result<Option<File>> {
    if let Some(path) = &backing.file {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| io_error(backing, &format!("opening {path}"), e))?;
        let len = file
            .metadata()
            .map_err(|e| io_error(backing, &format!("reading {path}"), e))?
            .len();
        if len < backing.size {
            file.set_len(backing.size)
                .map_err(|e| io_error(backing, &format!("extending {path}"), e))?;
        }
        return Ok(Some(file));
    }
    if backing.shared || backing.hugepages {
        return Ok(Some(memfd(backing)?));
    }
    Ok(None)
}

fn map_region(
    backing: &Backing,
    file: Option<&File>,
    file_offset: u64,
    guest_base: u64,
    size: u64,
) -> Result<GuestRegionMmap> {
    let len = usize::try_from(size).map_err(|_| MemoryError::TooLarge {
        backing: backing.name.clone(),
    })?;
    let mut flags = libc::MAP_NORESERVE;
    flags |= if backing.shared || backing.hugepages {
        libc::MAP_SHARED
    } else {
        libc::MAP_PRIVATE
    };
    if backing.prefault {
        flags |= libc::MAP_POPULATE;
    }
    let bitmap = AtomicBitmap::new(
        len,
        const { std::num::NonZeroUsize::new(PAGE_SIZE).unwrap() },
    );
    let mut builder = MmapRegionBuilder::new_with_bitmap(len, bitmap)
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_hugetlbfs(backing.hugepages);
    match file {
        Some(file) => {
            let clone = file
                .try_clone()
                .map_err(|e| io_error(backing, "duplicating the memory file", e))?;
            builder = builder
                .with_mmap_flags(flags)
                .with_file_offset(FileOffset::new(clone, file_offset));
        }
        None => builder = builder.with_mmap_flags(flags | libc::MAP_ANONYMOUS),
    }
    let region = builder.build().map_err(|source| MemoryError::Map {
        backing: backing.name.clone(),
        size,
        source,
    })?;
    let advise = |advice: libc::c_int| {
        // SAFETY: the range is the mapping just created; madvise only hints.
        unsafe { libc::madvise(region.as_ptr().cast(), len, advice) };
    };
    if backing.mergeable {
        advise(libc::MADV_MERGEABLE);
    }
    if backing.thp && backing.private_anonymous() {
        advise(libc::MADV_HUGEPAGE);
    }
    GuestRegionMmap::new(region, GuestAddress(guest_base)).ok_or_else(|| {
        MemoryError::InvalidRange {
            backing: backing.name.clone(),
            base: guest_base,
        }
        .into()
    })
}

/// One piece of a backing in guest physical memory.
struct Piece {
    backing: usize,
    offset: u64,
    base: u64,
    size: u64,
}

/// Places `backings` in turn from guest address 0, skipping the MMIO hole
/// (a backing that reaches it is split around it).
fn place(backings: &[Backing]) -> Result<Vec<Piece>> {
    let mut pieces = Vec::new();
    let mut cursor = 0u64;
    for (index, backing) in backings.iter().enumerate() {
        let mut offset = 0u64;
        while offset < backing.size {
            if (MEM_32BIT_RESERVED_START..RAM_64BIT_START).contains(&cursor) {
                cursor = RAM_64BIT_START;
            }
            let room = if cursor < MEM_32BIT_RESERVED_START {
                MEM_32BIT_RESERVED_START - cursor
            } else {
                u64::MAX - cursor
            };
            let size = (backing.size - offset).min(room);
            pieces.push(Piece {
                backing: index,
                offset,
                base: cursor,
                size,
            });
            offset += size;
            cursor = cursor.checked_add(size).ok_or(MemoryError::AddressSpace)?;
        }
    }
    Ok(pieces)
}

/// Lays `backings` out as `place` does: `map(backing's index, offset in
/// it, guest address, size)` maps each piece.
fn lay_out(
    backings: &[Backing],
    mut map: impl FnMut(usize, u64, u64, u64) -> Result<GuestRegionMmap>,
) -> Result<(GuestMemoryMmap, Vec<(u64, u64)>)> {
    let mut regions = Vec::new();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for piece in place(backings)? {
        regions.push(map(piece.backing, piece.offset, piece.base, piece.size)?);
        match ranges.last_mut() {
            Some(last) if last.0 + last.1 == piece.base => last.1 += piece.size,
            _ => ranges.push((piece.base, piece.size)),
        }
    }
    let memory =
        GuestMemoryMmap::from_regions(regions).map_err(|source| MemoryError::Regions { source })?;
    Ok((memory, ranges))
}

/// Cloud Hypervisor's name for the RAM of `--memory size=`, which
/// `--numa memory_zones` can name like a `--memory-zone`.
pub const DEFAULT_MEMORY_ZONE: &str = "mem0";

/// Guest-physical ranges of one memory zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneRanges {
    pub id: String,
    /// (start, size) pairs: two where the zone is split around the MMIO hole.
    pub ranges: Vec<(u64, u64)>,
}

/// Where `create_guest_ram` puts each zone: the `--memory size=` RAM
/// (`DEFAULT_MEMORY_ZONE`) first, then each `--memory-zone` in turn.
pub fn zone_ranges(config: &MemoryConfig) -> Result<Vec<ZoneRanges>> {
    let backings = backings(config)?;
    let mut zones: Vec<ZoneRanges> = backings
        .iter()
        .map(|b| ZoneRanges {
            id: b.zone.clone(),
            ranges: Vec::new(),
        })
        .collect();
    for piece in place(&backings)? {
        zones[piece.backing].ranges.push((piece.base, piece.size));
    }
    Ok(zones)
}

/// Where `create_guest_ram` puts each zone's virtio-mem region: (zone,
/// start, size).
pub fn virtio_mem_ranges(config: &MemoryConfig) -> Result<Vec<(String, u64, u64)>> {
    let plans = virtio_mem_plans(config)?;
    let ram_end = place(&backings(config)?)?
        .iter()
        .map(|p| p.base + p.size)
        .max()
        .unwrap_or(0);
    let sizes: Vec<u64> = plans.iter().map(|p| p.backing.size).collect();
    let starts = place_virtio_mem(ram_end, &sizes)?;
    Ok(plans
        .into_iter()
        .zip(starts)
        .map(|(plan, start)| (plan.backing.zone, start, plan.backing.size))
        .collect())
}

/// Whether `config` asks for private anonymous memory only (no shared,
/// huge-page or file-backed memory).
/// The first backing that is a file mapped shared (`file=` with
/// `shared=on` or huge pages): its name and path.
pub fn shared_file_backing(config: &MemoryConfig) -> Option<(String, String)> {
    backings(config)
        .ok()?
        .into_iter()
        .find_map(|b| match b.file {
            Some(path) if !b.private() => Some((b.name, path)),
            _ => None,
        })
}

/// Bytes of boot RAM `config` lays out: its backings, without the
/// hot-pluggable memory past them.
pub fn boot_ram_size(config: &MemoryConfig) -> Result<u64> {
    Ok(backings(config)?.iter().map(|b| b.size).sum())
}

/// Bytes of boot RAM and of every virtio-mem region: what a memory file
/// holds besides hot-added DIMMs.
pub fn saved_memory_size(config: &MemoryConfig) -> Result<u64> {
    let regions: u64 = virtio_mem_plans(config)?
        .iter()
        .map(|plan| plan.backing.size)
        .sum();
    Ok(boot_ram_size(config)? + regions)
}

/// Whether all of guest RAM is private memory of normal pages, which a
/// restore maps from the snapshot's memory file copy-on-write.
pub fn restores_copy_on_write(config: &MemoryConfig) -> bool {
    backings(config).is_ok_and(|list| list.iter().all(Backing::private))
}

/// Creates guest RAM: each backing in turn from address 0, skipping the MMIO hole.
pub fn create_guest_ram(config: &MemoryConfig) -> Result<GuestRam> {
    let backings = backings(config)?;
    let plans = virtio_mem_plans(config)?;
    let files = backings
        .iter()
        .map(backing_file)
        .collect::<Result<Vec<_>>>()?;
    let area = hotplug_area_backing(config, &backings)?;
    let mut ram = lay_out_guest_ram(backings, files)?;
    add_hot_pluggable(&mut ram, area, plans, backing_file)?;
    Ok(ram)
}

/// Maps the ACPI hot-plug area (`area`) and the virtio-mem regions
/// (`plans`) past boot RAM, each on the file `file_for` gives its backing.
fn add_hot_pluggable(
    ram: &mut GuestRam,
    area: Option<Backing>,
    plans: Vec<HotplugPlan>,
    mut file_for: impl FnMut(&Backing) -> Result<Option<File>>,
) -> Result<()> {
    if let Some(backing) = area {
        let file = file_for(&backing)?;
        add_hotplug_area(ram, &backing, file)?;
    }
    add_virtio_mem_regions(ram, plans, file_for)
}

/// Maps each virtio-mem region past RAM, into guest memory.
fn add_virtio_mem_regions(
    ram: &mut GuestRam,
    plans: Vec<HotplugPlan>,
    mut file_for: impl FnMut(&Backing) -> Result<Option<File>>,
) -> Result<()> {
    let sizes: Vec<u64> = plans.iter().map(|p| p.backing.size).collect();
    let ram_end = ram.ranges.iter().map(|r| r.0 + r.1).max().unwrap_or(0);
    let starts = place_virtio_mem(ram_end, &sizes)?;
    for (plan, addr) in plans.into_iter().zip(starts) {
        let file = file_for(&plan.backing)?;
        let region = map_region(&plan.backing, file.as_ref(), 0, addr, plan.backing.size)?;
        let backing =
            region_backing(&region).map_err(|e| io_error(&plan.backing, "its backing", e))?;
        ram.memory = ram
            .memory
            .insert_region(std::sync::Arc::new(region))
            .map_err(|source| MemoryError::Regions { source })?;
        keep_shared_file(ram, &plan.backing, file)?;
        ram.virtio_mem.push(VirtioMemZone {
            zone: plan.backing.zone,
            addr,
            size: plan.backing.size,
            hotplugged_size: plan.hotplugged_size,
            backing,
        });
    }
    Ok(())
}

/// Adds the file of hot-pluggable memory (`backing`'s) to those a local
/// migration hands over; memory that is not shared rules that out.
fn keep_shared_file(ram: &mut GuestRam, backing: &Backing, file: Option<File>) -> Result<()> {
    match (ram.shared_files.as_mut(), file) {
        (Some(files), Some(file)) if !backing.private() => files.push(file),
        _ => ram.shared_files = None,
    }
    Ok(())
}

/// How the ACPI hot-plug area is backed: as `--memory size=`'s RAM, never
/// prefaulted (None without `hotplug_size`).
fn hotplug_area_backing(config: &MemoryConfig, backings: &[Backing]) -> Result<Option<Backing>> {
    let Some(size) = acpi_hotplug_size(config)? else {
        return Ok(None);
    };
    Ok(backings
        .iter()
        .find(|b| b.zone == DEFAULT_MEMORY_ZONE)
        .map(|memory| Backing {
            name: "memory hot-plug area".to_owned(),
            size,
            prefault: false,
            on_demand: true,
            ..memory.clone()
        }))
}

/// Maps the hot-plug area after boot RAM, where Cloud Hypervisor puts it
/// (`HotplugLayout`), on `file` (None: anonymous memory).
fn add_hotplug_area(ram: &mut GuestRam, backing: &Backing, file: Option<File>) -> Result<()> {
    let layout = HotplugLayout::new(ram.last_ram_byte(), Some(backing.size))
        .ok_or(MemoryError::AddressSpace)?;
    let region = map_region(backing, file.as_ref(), 0, layout.area_start, backing.size)?;
    let memory = ram
        .memory
        .insert_region(std::sync::Arc::new(region))
        .map_err(|source| MemoryError::Regions { source })?;
    ram.memory = memory;
    ram.hotplug = Some(HotplugArea {
        base: layout.area_start,
        size: backing.size,
    });
    keep_shared_file(ram, backing, file)
}

/// Guest RAM that a snapshot or a migration then fills: as
/// `create_guest_ram`, but it reads zeros wherever they bring no data (they
/// leave out pages of zeros). A shared `file=` backing is emptied first: the
/// file is the guest's memory, which is to hold what was saved. A private
/// one is anonymous memory instead: its file's contents are not what the
/// guest saw, and the guest's writes never reach it.
pub fn create_guest_ram_to_fill(config: &MemoryConfig) -> Result<GuestRam> {
    let plans = virtio_mem_plans(config)?;
    let backings: Vec<Backing> = backings(config)?
        .into_iter()
        .map(|backing| match backing.file {
            Some(_) if backing.private() => Backing {
                file: None,
                ..backing
            },
            _ => backing,
        })
        .collect();
    let files = backings
        .iter()
        .map(backing_file)
        .collect::<Result<Vec<_>>>()?;
    for (backing, file) in backings.iter().zip(&files) {
        if let (Some(path), Some(file)) = (&backing.file, file) {
            empty_file(backing, path, file)?;
        }
    }
    // The hot-plug area and the virtio-mem regions come empty: the DIMMs'
    // and plugged blocks' contents come from the snapshot or migration.
    let area = hotplug_area_backing(config, &backings)?;
    let mut ram = lay_out_guest_ram(backings, files)?;
    add_hot_pluggable(&mut ram, area, plans, backing_file)?;
    Ok(ram)
}

/// Makes the first `backing.size` bytes of `file` zeros: holes where the
/// file system can punch them, else written zeros.
fn empty_file(backing: &Backing, path: &str, file: &File) -> Result<()> {
    let len = i64::try_from(backing.size).map_err(|_| MemoryError::TooLarge {
        backing: backing.name.clone(),
    })?;
    // SAFETY: fallocate on a descriptor we own; the result is checked.
    let punched = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            len,
        )
    };
    if punched == 0 {
        return Ok(());
    }
    let zeros = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < backing.size {
        let n = (backing.size - at).min(zeros.len() as u64) as usize;
        std::os::unix::fs::FileExt::write_all_at(file, &zeros[..n], at)
            .map_err(|e| io_error(backing, &format!("emptying {path}"), e))?;
        at += n as u64;
    }
    Ok(())
}

fn lay_out_guest_ram(backings: Vec<Backing>, files: Vec<Option<File>>) -> Result<GuestRam> {
    let (memory, ranges) = lay_out(&backings, |index, offset, base, size| {
        map_region(&backings[index], files[index].as_ref(), offset, base, size)
    })?;
    let anonymous = backings.iter().all(Backing::private_anonymous);
    let shared_files = if backings.iter().all(|b| b.shared || b.hugepages) {
        files.into_iter().collect::<Option<Vec<_>>>()
    } else {
        None
    };
    Ok(GuestRam {
        memory,
        ranges,
        anonymous,
        shared_files,
        hotplug: None,
        virtio_mem: Vec::new(),
    })
}

/// Guest RAM for `config` on the files another VMM process handed over (a
/// local migration): one per backing, then the hot-plug area's and each
/// virtio-mem region's, mapped shared as that process mapped them, so both
/// see the same pages and nothing is copied. Refused unless every backing
/// is shared and each file holds its backing.
pub fn map_guest_ram_from_shared_files(
    config: &MemoryConfig,
    files: Vec<File>,
) -> Result<GuestRam> {
    let backings = backings(config)?;
    let area = hotplug_area_backing(config, &backings)?;
    let plans = virtio_mem_plans(config)?;
    let expected = backings.len() + usize::from(area.is_some()) + plans.len();
    if files.len() != expected {
        return Err(MemoryError::SharedFiles {
            detail: format!("{} memory files for {expected} backings", files.len(),),
        }
        .into());
    }
    let check = |backing: &Backing, file: &File| -> Result<()> {
        if backing.private() {
            return Err(MemoryError::SharedFiles {
                detail: format!("{} is not shared memory", backing.name),
            }
            .into());
        }
        let len = file
            .metadata()
            .map_err(|e| io_error(backing, "reading the handed-over memory file", e))?
            .len();
        if len < backing.size {
            return Err(MemoryError::SharedFiles {
                detail: format!(
                    "{}: {len} bytes handed over, {} needed",
                    backing.name, backing.size
                ),
            }
            .into());
        }
        Ok(())
    };
    let mut files = files.into_iter();
    let boot: Vec<File> = files.by_ref().take(backings.len()).collect();
    for (backing, file) in backings.iter().zip(&boot) {
        check(backing, file)?;
    }
    let (memory, ranges) = lay_out(&backings, |index, offset, base, size| {
        map_region(&backings[index], Some(&boot[index]), offset, base, size)
    })?;
    let mut ram = GuestRam {
        memory,
        ranges,
        anonymous: false,
        shared_files: Some(boot),
        hotplug: None,
        virtio_mem: Vec::new(),
    };
    add_hot_pluggable(&mut ram, area, plans, |backing| {
        let file = files.next().ok_or(MemoryError::AddressSpace)?;
        check(backing, &file)?;
        Ok(Some(file))
    })?;
    Ok(ram)
}

/// Guest RAM for `config` from a snapshot's memory file, mapped
/// copy-on-write in the layout `create_guest_ram` gives: the guest's writes
/// stay in this VM, and pages are read on first touch (all of them up front
/// with `prefault`). The caller checks the file's length first.
pub fn map_guest_ram_from_file(
    config: &MemoryConfig,
    file: &File,
    prefault: bool,
) -> Result<GuestRam> {
    let backings = backings(config)?;
    let area = hotplug_area_backing(config, &backings)?;
    let plans = virtio_mem_plans(config)?;
    let snapshot: Vec<Backing> = backings
        .into_iter()
        .map(|backing| Backing {
            name: format!("{} (snapshot)", backing.name),
            file: None,
            shared: false,
            hugepages: false,
            hugepage_size: None,
            prefault,
            ..backing
        })
        .collect();
    // The file holds the backings one after the other.
    let mut file_offset = 0u64;
    let (memory, ranges) = lay_out(&snapshot, |index, _offset, base, size| {
        let region = map_region(&snapshot[index], Some(file), file_offset, base, size)?;
        file_offset += size;
        Ok(region)
    })?;
    let mut ram = GuestRam {
        memory,
        ranges,
        anonymous: false,
        shared_files: None,
        hotplug: None,
        virtio_mem: Vec::new(),
    };
    // The hot-plug area and the virtio-mem regions come empty: the caller
    // copies the DIMMs and plugged blocks in from the file.
    add_hot_pluggable(&mut ram, area, plans, backing_file)?;
    Ok(ram)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    fn memory(text: &str, zones: Option<&[String]>) -> MemoryConfig {
        MemoryConfig::parse(text, zones).unwrap()
    }

    #[test]
    fn memory_to_fill_reads_zeros_and_leaves_private_files_alone() {
        let dir = std::env::temp_dir().join(format!("vmkit-fill-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (shared, private) = (dir.join("shared.mem"), dir.join("private.mem"));
        std::fs::write(&shared, vec![0xffu8; 2 << 20]).unwrap();
        std::fs::write(&private, vec![0xabu8; 2 << 20]).unwrap();
        let zones = [
            format!("id=a,size=2M,file={},shared=on", shared.display()),
            format!("id=b,size=2M,file={}", private.display()),
        ];
        let config = memory("size=0", Some(&zones));
        // A boot sees the files' contents.
        let booted = create_guest_ram(&config).unwrap();
        assert_eq!(booted.memory.read_obj::<u8>(GuestAddress(0)).unwrap(), 0xff);
        assert_eq!(
            booted.memory.read_obj::<u8>(GuestAddress(2 << 20)).unwrap(),
            0xab
        );
        drop(booted);
        let ram = create_guest_ram_to_fill(&config).unwrap();
        let mut bytes = vec![1u8; 4 << 20];
        ram.memory.read_slice(&mut bytes, GuestAddress(0)).unwrap();
        assert!(
            bytes.iter().all(|&b| b == 0),
            "stale file contents show through"
        );
        // The shared file is the guest's memory: emptied. The private one
        // never sees the guest's writes, nor is it cleared.
        ram.memory.write_obj(7u8, GuestAddress(2 << 20)).unwrap();
        assert!(std::fs::read(&shared).unwrap().iter().all(|&b| b == 0));
        assert!(std::fs::read(&private).unwrap().iter().all(|&b| b == 0xab));
        assert!(!restores_copy_on_write(&memory("size=0", Some(&zones))));
        assert!(restores_copy_on_write(&memory("size=0", Some(&zones[1..]))));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_hotplug_area_follows_boot_ram_and_stays_out_of_its_ranges() {
        let ram = create_guest_ram(&memory("size=64M,hotplug_size=1G", None)).unwrap();
        // Cloud Hypervisor's place: 4 GiB for RAM below the hole.
        assert_eq!(
            ram.hotplug,
            Some(HotplugArea {
                base: 4 << 30,
                size: 1 << 30
            })
        );
        assert_eq!(ram.ranges, vec![(0, 64 << 20)]);
        assert_eq!(ram.total_size(), 64 << 20);
        // Mapped in the VMM as one region after boot RAM.
        assert!(ram.memory.address_in_range(GuestAddress((5 << 30) - 1)));
        assert!(!ram.memory.address_in_range(GuestAddress(5 << 30)));
        let layout = ram.hotplug_layout().unwrap();
        assert_eq!(layout.device_area_start, 5 << 30);
        assert!(ram.shared_files.is_none());
        // Without hotplug_size: no area, devices right after RAM (4 GiB at least).
        let plain = create_guest_ram(&memory("size=64M", None)).unwrap();
        assert_eq!(plain.hotplug, None);
        assert_eq!(plain.hotplug_layout().unwrap().device_area_start, 4 << 30);
    }

    #[test]
    fn small_ram_is_one_range() {
        let ram = create_guest_ram(&memory("size=64M", None)).unwrap();
        assert_eq!(ram.ranges, vec![(0, 64 << 20)]);
        assert_eq!(ram.total_size(), 64 << 20);
        ram.memory
            .write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        assert_eq!(
            ram.memory.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
    }

    #[test]
    fn large_ram_spans_the_hole() {
        let ram = create_guest_ram(&memory("size=3584M", None)).unwrap();
        assert_eq!(
            ram.ranges,
            vec![(0, 0xc000_0000), (0x1_0000_0000, 0x2000_0000)]
        );
        assert_eq!(ram.low_end(), 0xc000_0000);
        assert!(ram.memory.address_in_range(GuestAddress(0x1_1000_0000)));
        assert!(!ram.memory.address_in_range(GuestAddress(0xd000_0000)));
    }

    #[test]
    fn shared_memory_and_zones() {
        let zones = vec![
            "id=a,size=16M,shared=on".to_owned(),
            "id=b,size=16M".to_owned(),
        ];
        let ram = create_guest_ram(&memory("size=32M,shared=on", Some(&zones))).unwrap();
        assert_eq!(ram.ranges, vec![(0, 64 << 20)]);
        ram.memory
            .write_obj(7u8, GuestAddress((48 << 20) + 5))
            .unwrap();
    }

    #[test]
    fn zone_ranges_follow_the_layout_and_split_around_the_hole() {
        let zones = vec!["id=a,size=2G".to_owned(), "id=b,size=2G".to_owned()];
        let config = memory("size=0", Some(&zones));
        let ranges = zone_ranges(&config).unwrap();
        let gib = 1u64 << 30;
        assert_eq!(
            ranges,
            vec![
                ZoneRanges {
                    id: "a".into(),
                    ranges: vec![(0, 2 * gib)]
                },
                ZoneRanges {
                    id: "b".into(),
                    ranges: vec![(2 * gib, gib), (4 * gib, gib)]
                },
            ]
        );
        // The plain --memory RAM is Cloud Hypervisor's "mem0".
        let plain = zone_ranges(&memory("size=64M", None)).unwrap();
        assert_eq!(plain[0].id, DEFAULT_MEMORY_ZONE);
        assert_eq!(plain[0].ranges, vec![(0, 64 << 20)]);
        // The same pieces create_guest_ram maps (small zones: no 4 GiB of RAM here).
        let small = vec!["id=a,size=16M".to_owned(), "id=b,size=8M".to_owned()];
        let config = memory("size=0", Some(&small));
        let ram = create_guest_ram(&config).unwrap();
        let zones = zone_ranges(&config).unwrap();
        let starts: Vec<u64> = ram.memory.iter().map(|r| r.start_addr().0).collect();
        assert_eq!(starts, vec![zones[0].ranges[0].0, zones[1].ranges[0].0]);
        assert_eq!(zones[1].ranges, vec![(16 << 20, 8 << 20)]);
    }

    #[test]
    fn virtio_mem_regions_go_where_cloud_hypervisor_puts_them() {
        let mib = 1u64 << 20;
        // RAM below the hole: from 4 GiB; each region 128 MiB aligned.
        let zones = vec![
            "id=a,size=64M,hotplug_size=256M,hotplugged_size=4M".to_owned(),
            "id=b,size=32M,hotplug_size=128M".to_owned(),
            "id=c,size=16M".to_owned(),
        ];
        let config = memory("size=0,hotplug_method=virtio-mem", Some(&zones));
        let ram = create_guest_ram(&config).unwrap();
        assert_eq!(ram.ranges, vec![(0, 112 * mib)], "boot RAM only");
        let placed: Vec<(&str, u64, u64, u64)> = ram
            .virtio_mem
            .iter()
            .map(|z| (z.zone.as_str(), z.addr, z.size, z.hotplugged_size))
            .collect();
        assert_eq!(
            placed,
            [
                ("a", 1 << 32, 256 * mib, 4 * mib),
                ("b", (1 << 32) + 256 * mib, 128 * mib, 0)
            ]
        );
        assert_eq!(ram.device_area_start(), (1 << 32) + 384 * mib);
        // In guest memory (devices reach it), one region each.
        ram.memory
            .write_obj(7u8, GuestAddress((1 << 32) + 300 * mib))
            .unwrap();
        assert_eq!(ram.memory.num_regions(), 5, "three zones, two regions");
        assert_eq!(ram.virtio_mem[0].backing, RegionBacking::Private);
        // The default zone's, shared: after RAM past the hole, from the next
        // 128 MiB boundary.
        assert_eq!(
            place_virtio_mem(0xc000_0000, &[128 * mib]).unwrap(),
            [1 << 32]
        );
        assert_eq!(
            place_virtio_mem((1 << 32) + 0x2000_0000 + 4096, &[128 * mib, 256 * mib]).unwrap(),
            [(1 << 32) + 0x2800_0000, (1 << 32) + 0x3000_0000]
        );
        let ram = create_guest_ram(&memory(
            "size=64M,hotplug_method=virtio-mem,hotplug_size=128M,shared=on",
            None,
        ))
        .unwrap();
        assert_eq!(ram.virtio_mem[0].zone, DEFAULT_MEMORY_ZONE);
        assert_eq!(ram.virtio_mem[0].addr, 1 << 32);
        assert_eq!(ram.virtio_mem[0].backing, RegionBacking::Shared);
        // Restores and migrations make the same regions, empty.
        let fill = create_guest_ram_to_fill(&config).unwrap();
        let regions: Vec<(u64, u64)> = fill.virtio_mem.iter().map(|z| (z.addr, z.size)).collect();
        assert_eq!(
            regions,
            [(1 << 32, 256 * mib), ((1 << 32) + 256 * mib, 128 * mib)]
        );
        assert_eq!(boot_ram_size(&config).unwrap(), 112 * mib);
        assert_eq!(saved_memory_size(&config).unwrap(), 496 * mib);
        assert!(fill.holds((1 << 32) + 300 * mib, 4096));
        assert!(!fill.holds((1 << 32) + 384 * mib, 1), "past the regions");
    }

    #[test]
    fn bad_virtio_mem_settings_are_refused_as_cloud_hypervisor_does() {
        for (text, says) in [
            (
                "size=64M,hotplug_method=virtio-mem,hotplug_size=0",
                "'hotplug_size' can't be 0",
            ),
            (
                "size=64M,hotplug_method=virtio-mem,hotplugged_size=64M",
                "Invalid to define 'hotplugged_size' when there is no 'hotplug_size'",
            ),
            (
                "size=64M,hotplug_method=virtio-mem,hotplug_size=128M,hotplugged_size=256M",
                "'hotplugged_size' 268435456 can't be bigger than 'hotplug_size' 134217728",
            ),
            (
                "size=64M,hotplug_method=virtio-mem,hotplug_size=100M",
                "hotplug_size=104857600: Virtio-mem size is not aligned with 134217728",
            ),
            (
                "size=64M,hotplug_method=virtio-mem,hotplug_size=128M,hotplugged_size=3M",
                "hotplugged_size=3145728: not a multiple of the virtio-mem block size",
            ),
        ] {
            let e = create_guest_ram(&memory(text, None)).err().unwrap();
            assert!(e.message.starts_with("Memory zone mem0: "), "{}", e.message);
            assert!(e.message.contains(says), "{text}: {}", e.message);
        }
    }

    #[test]
    fn unsupported_and_impossible_requests_are_refused() {
        // v37 refuses hotplugged_size with ACPI hot-plug, saying why.
        for (text, why) in [
            (
                "size=64M,hotplug_size=1G,hotplugged_size=256M",
                "with hotplug method 'acpi'",
            ),
            ("size=64M,hotplugged_size=256M", "no 'hotplug_size'"),
            (
                "size=64M,hotplug_size=128M,hotplugged_size=256M",
                "can't be bigger",
            ),
        ] {
            let err = create_guest_ram(&memory(text, None)).err().unwrap();
            assert!(err.message.contains(why), "{text}: {}", err.message);
            assert!(err.message.contains("InvalidMemoryParameters"));
        }
        let err = create_guest_ram(&memory("size=0", None)).err().unwrap();
        assert_eq!(err.kind, ErrorKind::Memory);
        // A huge page size the host does not have is refused up front.
        let err = create_guest_ram(&memory("size=64M,hugepages=on,hugepage_size=1G", None))
            .err()
            .unwrap();
        assert!(err.message.contains("huge pages"), "{}", err.message);
    }
}
