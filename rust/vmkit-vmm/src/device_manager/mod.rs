//! The device manager: the one place that builds and wires the devices of a
//! boot. It owns the port-I/O and MMIO buses, the interrupts (irqfds and
//! KVM's GSI routes), the legacy platform devices, the PCI segments with
//! their slots and BAR windows, the virtio devices, and the device tree.
//!
//! Devices are created in Cloud Hypervisor's order (legacy, then the virtio
//! kinds of `virtio_devices::VIRTIO_KINDS`), so that slots, BAR addresses
//! and ids come out as CH's.

mod tree;
mod virtio_devices;

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryBackend as _;
use vm_superio::{I8042Device, Serial};
use vmkit_config::VmConfig;
use vmm_sys_util::eventfd::EventFd;

use crate::acpi::ACPI_SHUTDOWN_PORT;
use crate::control::Control;
use crate::devices::cpu_hotplug::{CpuHotplug, CpuHotplugRegisters, CPU_HOTPLUG_SIZE};
use crate::devices::ioapic::{Ioapic, IOAPIC_SIZE};
use crate::devices::legacy::{
    AcpiShutdown, DebugPort, DebugPortWrite, Ged, GedRegister, ResetTrigger, I8042,
};
use crate::devices::memory_hotplug::{MemoryHotplug, MemoryHotplugRegisters, MEMORY_HOTPLUG_SIZE};
use crate::devices::pci_hotplug::{PciHotplug, PciHotplugRegisters, PCI_HOTPLUG_SIZE};
use crate::devices::pvpanic::PvPanic;
use crate::devices::serial::{IrqTrigger, SerialBackend, SerialDevice, SerialSink};
use crate::devices::tpm::Crb;
use crate::devices::{Bus, BusDevice};
use crate::error::{Error, ErrorKind, ModuleError, Result};
use crate::interrupts::InterruptRoutes;
use crate::layout::{
    CPU_HOTPLUG_ADDRESS, GED_ADDRESS, GED_IRQ, GED_SIZE, IOAPIC_START, MEMORY_HOTPLUG_ADDRESS,
    PCI_HOTPLUG_ADDRESS, PCI_MMCONFIG_START, SERIAL_IRQ, TPM_SIZE, TPM_START,
};
use crate::memory::GuestRam;
use crate::pci::config::BarKind;
use crate::pci::PciDevice as _;
use crate::pci::{
    self, PciBarWindow, PciConfigIo, PciEcam, PciSegment, SegmentLayout, ECAM_SIZE_PER_SEGMENT,
};
use crate::snapshot::placement::{PciPlace, PciPlacement};
use crate::snapshot::SnapshotError;
use crate::virtio::pci::{DeviceEvents, VirtioPciDevice};
use crate::virtio::TYPE_BLOCK;

pub use tree::{bar_type_name, virtio_pci_node_id, DeviceNode, Resource};
use virtio_devices::VIRTIO_KINDS;
pub use virtio_devices::{hotplug_kind, VirtioSpec};

/// What went wrong while building the devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceManagerError {
    #[error(
        "{count} PCI segments do not fit in the guest's {phys_bits}-bit physical address space"
    )]
    SegmentsDoNotFit { count: u16, phys_bits: u8 },
    #[error("{id}: PCI segment {segment} does not exist")]
    NoSuchSegment { id: String, segment: u16 },
    #[error("{id}: no free slot on PCI segment {segment}")]
    NoFreeSlot { id: String, segment: u16 },
    #[error("{id}: PCI MMIO window full")]
    WindowFull { id: String },
    #[error("{id}: no rate limit group {group}")]
    NoRateLimitGroup { id: String, group: String },
    #[error("Cannot create virtio-blk device {id}")]
    Block {
        id: String,
        #[source]
        source: Error,
    },
    #[error("{id}: vhost-user device")]
    VhostUser {
        id: String,
        #[source]
        source: io::Error,
    },
    #[error("{what}: interrupt eventfd")]
    EventFd {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    /// Two devices claim one range: a bug in this table, never the guest's doing.
    #[error("{what} at {base:#x} overlaps another device")]
    Overlap { what: String, base: u64 },
}

impl ModuleError for DeviceManagerError {
    fn kind(&self) -> ErrorKind {
        match self {
            DeviceManagerError::SegmentsDoNotFit { .. }
            | DeviceManagerError::NoSuchSegment { .. }
            | DeviceManagerError::NoRateLimitGroup { .. } => ErrorKind::Unsupported,
            DeviceManagerError::Block { source, .. } => source.kind,
            DeviceManagerError::NoFreeSlot { .. }
            | DeviceManagerError::WindowFull { .. }
            | DeviceManagerError::EventFd { .. }
            | DeviceManagerError::VhostUser { .. }
            | DeviceManagerError::Overlap { .. } => ErrorKind::Device,
        }
    }
}

/// What the devices of a boot are built from.
pub struct DeviceContext<'a> {
    pub config: &'a VmConfig,
    pub vm_fd: &'a Arc<VmFd>,
    pub ram: &'a GuestRam,
    pub control: &'a Arc<Control>,
    /// KVM_CAP_IRQ_ROUTING: how many GSIs the routing table may hold.
    pub gsi_limit: u32,
    /// The guest's physical address width (the 64-bit BAR windows end there).
    pub phys_bits: u8,
    pub serial: Option<&'a Arc<SerialBackend>>,
    pub console: Option<&'a Arc<SerialBackend>>,
    pub debug_log: &'a Arc<Mutex<Vec<DebugPortWrite>>>,
    pub device_events: &'a DeviceEvents,
    /// Starts device workers confined to their seccomp filters.
    pub spawner: &'a crate::seccomp::Spawner,
    /// The balloon's target when `vm.resize` changed it (it outlives a
    /// reboot, as in Cloud Hypervisor); None: the config's.
    pub balloon_size: Option<u64>,
    /// What `vm.resize`/`vm.resize-zone` asked each virtio-mem zone to plug
    /// (it outlives a reboot, as in Cloud Hypervisor); absent: the config's
    /// `hotplugged_size`.
    pub virtio_mem_sizes: &'a std::collections::BTreeMap<String, u64>,
    /// Tap queues handed over by a migration's sender, by net device id:
    /// those devices adopt them instead of opening their taps.
    pub adopted_taps: &'a std::collections::HashMap<String, Vec<std::fs::File>>,
    /// Connections to vhost-user backends, by device id: kept by the VM
    /// across the resets that rebuild the devices.
    pub vhost_links: &'a VhostLinks,
    /// A restore's record of where each PCI function was: every device
    /// goes back there instead of the first free slot and BAR space.
    pub placement: Option<&'a PciPlacement>,
}

/// A snapshot's placement that does not fit the VM it is restored into.
fn misplaced(detail: String) -> Error {
    SnapshotError::Corrupt {
        what: "the PCI placement".to_owned(),
        detail,
    }
    .into()
}

/// The place `ctx.placement` records for device `id` on `segment`, if the
/// context restores one.
fn recorded_place<'a>(
    ctx: &DeviceContext<'a>,
    id: &str,
    segment: u16,
) -> Result<Option<&'a PciPlace>> {
    let Some(placement) = ctx.placement else {
        return Ok(None);
    };
    let place = placement
        .find(id)
        .ok_or_else(|| misplaced(format!("device {id} of the config has no place")))?;
    if place.segment != segment {
        return Err(misplaced(format!(
            "device {id} on PCI segment {}, the config puts it on {segment}",
            place.segment
        )));
    }
    Ok(Some(place))
}

pub type VhostLinks =
    Mutex<std::collections::HashMap<String, crate::virtio::vhost_user::link::SharedLink>>;

/// What device kinds take before the PCI functions are placed (address
/// ranges from their segment's windows, KVM memory slots past RAM's) and
/// the handles the VMM keeps on a device (the balloon's).
pub struct Reservations<'a> {
    pub segments: &'a [Arc<PciSegment>],
    pub next_slot: u32,
    pub balloon: Option<crate::virtio::balloon::BalloonControl>,
    /// The KVM memory regions pmem devices took, by id.
    pub pmem_regions: BTreeMap<String, kvm_bindings::kvm_userspace_memory_region>,
    /// Each virtio-mem device's handle, by memory zone.
    pub virtio_mem: Vec<(String, crate::virtio::mem::VirtioMemControl)>,
}

/// The devices of one boot, wired.
pub struct DeviceManager {
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    segments: Vec<Arc<PciSegment>>,
    virtio: Vec<Arc<Mutex<VirtioPciDevice>>>,
    /// Cloud Hypervisor's PCI hot-plug controller and what the guest may eject.
    hotplug: Arc<HotplugState>,
    /// MSI-X routes of the virtio devices (hot-added ones get theirs here).
    routes: Arc<InterruptRoutes>,
    /// The next free KVM memory slot (a hot-added pmem region takes one).
    next_memory_slot: u32,
    /// KVM memory slots and regions of pmem devices, by id.
    pmem_regions: BTreeMap<String, kvm_bindings::kvm_userspace_memory_region>,
    /// `--pvpanic`: (its BDF, the device).
    pvpanic: Option<(String, Arc<Mutex<PvPanic>>)>,
    /// Where the pvpanic BAR was allocated.
    pvpanic_bar: u64,
    /// `--balloon`: its target and size, for `vm.resize` and `vm.info`.
    balloon: Option<crate::virtio::balloon::BalloonControl>,
    /// The virtio-mem devices by memory zone, for `vm.resize-zone`.
    virtio_mem: Vec<(String, crate::virtio::mem::VirtioMemControl)>,
    ged: Arc<Ged>,
    /// Which vCPUs the guest sees, for `vm.resize` (Cloud Hypervisor's
    /// CPU hot-plug controller).
    cpu_hotplug: Arc<CpuHotplug>,
    /// Which hot-added DIMMs the guest sees, for `vm.resize` (Cloud
    /// Hypervisor's ACPI memory hot-plug controller).
    memory_hotplug: Arc<MemoryHotplug>,
    ioapic: Arc<Mutex<Ioapic>>,
    serial: Option<Arc<Mutex<SerialDevice>>>,
    /// `--tpm`: the CRB (its worker stops when the last holder drops it).
    _tpm: Option<Arc<Mutex<Crb>>>,
    /// Ports 0xcf8/0xcfc (segment 0), whose address latch a snapshot keeps.
    config_io: Option<Arc<Mutex<PciConfigIo>>>,
    /// Platform devices' nodes (`__ioapic`, `__serial`).
    platform_nodes: Vec<DeviceNode>,
}

/// Puts `device` on `bus`; a range that overlaps another device's is an error.
fn insert(
    bus: &mut Bus,
    what: &str,
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
) -> Result<()> {
    if bus.insert(base, len, device) {
        Ok(())
    } else {
        Err(DeviceManagerError::Overlap {
            what: what.to_owned(),
            base,
        }
        .into())
    }
}

/// Buses and interrupts being wired.
struct Wiring {
    routes: Arc<InterruptRoutes>,
    pio: Bus,
    mmio: Bus,
    nodes: Vec<DeviceNode>,
}

impl Wiring {
    /// An eventfd wired to IOAPIC pin `pin` (routed as the guest programs
    /// it); the device gets a clone, the routes keep the irqfd.
    fn legacy_irq(&mut self, what: &'static str, pin: u32) -> Result<EventFd> {
        let eventfd_error = |source| DeviceManagerError::EventFd { what, source };
        let irq = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(eventfd_error)?;
        let for_device = irq.try_clone().map_err(eventfd_error)?;
        self.routes.add_pin_irqfd(pin, irq)?;
        Ok(for_device)
    }
}

impl DeviceManager {
    /// Builds every device of `ctx.config` and puts it on its bus.
    pub fn build(ctx: &DeviceContext<'_>) -> Result<DeviceManager> {
        let routes = Arc::new(InterruptRoutes::new(ctx.vm_fd.clone(), ctx.gsi_limit));
        let mut wiring = Wiring {
            routes: routes.clone(),
            pio: Bus::new(),
            mmio: Bus::new(),
            nodes: Vec::new(),
        };
        let ioapic = add_ioapic(&mut wiring, &routes)?;
        let ged = add_legacy_devices(&mut wiring, ctx)?;
        let cpu_hotplug = Arc::new(CpuHotplug::new(
            ctx.config.cpus.boot_vcpus,
            ctx.config.cpus.max_vcpus,
        ));
        insert(
            &mut wiring.mmio,
            "CPU hot-plug controller",
            CPU_HOTPLUG_ADDRESS,
            CPU_HOTPLUG_SIZE,
            Arc::new(Mutex::new(CpuHotplugRegisters(cpu_hotplug.clone()))),
        )?;
        let memory_hotplug = add_memory_hotplug(&mut wiring, ctx)?;
        let serial = add_serial(&mut wiring, ctx)?;
        let tpm = add_tpm(&mut wiring, ctx)?;

        let segments: Vec<Arc<PciSegment>> = plan_pci(ctx)?.into_iter().map(Arc::new).collect();
        let pci_hotplug = Arc::new(PciHotplug::new(segments.len() as u16));
        insert(
            &mut wiring.mmio,
            "PCI hot-plug controller",
            PCI_HOTPLUG_ADDRESS,
            PCI_HOTPLUG_SIZE,
            Arc::new(Mutex::new(PciHotplugRegisters(pci_hotplug.clone()))),
        )?;
        // Every device first (pmem regions take their address ranges now),
        // then their BARs, as Cloud Hypervisor allocates them.
        let mut reserve = Reservations {
            segments: &segments,
            next_slot: ctx.ram.memory.num_regions() as u32,
            balloon: None,
            pmem_regions: BTreeMap::new(),
            virtio_mem: Vec::new(),
        };
        let mut specs = Vec::new();
        for kind in VIRTIO_KINDS {
            specs.extend(kind(ctx, &mut reserve)?);
        }
        let balloon = reserve.balloon.take();
        let next_memory_slot = reserve.next_slot;
        let pmem_regions = std::mem::take(&mut reserve.pmem_regions);
        let hotplug = Arc::new(HotplugState {
            controller: pci_hotplug,
            removable: Mutex::new(BTreeMap::new()),
            removing: Mutex::new(std::collections::BTreeSet::new()),
            ejected: Mutex::new(Vec::new()),
        });
        let virtio_mem = std::mem::take(&mut reserve.virtio_mem);
        let mut virtio = Vec::new();
        for spec in specs {
            let removable = is_removable(&spec.id);
            let device = add_virtio_pci(ctx, &routes, &segments, spec)?;
            if removable {
                hotplug.track(&device);
            }
            virtio.push(device);
        }
        let (pvpanic, pvpanic_bar) = match ctx.config.pvpanic {
            true => {
                let (bdf, bar, device) = add_pvpanic(ctx, &segments)?;
                (Some((bdf, device)), bar)
            }
            false => (None, 0),
        };
        if let Some(placement) = ctx.placement {
            restore_hotplug_state(placement, &virtio, pvpanic.is_some(), &hotplug, &ged)?;
        }
        {
            // The guest ejects a slot (`B0EJ`): a removable device leaves its
            // slot now (config space shows it gone); the VMM thread tears it
            // down (`reap_ejected`), off the vCPU thread.
            let state = Arc::downgrade(&hotplug);
            let control = ctx.control.clone();
            let segments: Vec<_> = segments.iter().map(Arc::downgrade).collect();
            hotplug
                .controller
                .set_eject_handler(Box::new(move |segment, slot| {
                    let (Some(state), Some(bus)) = (
                        state.upgrade(),
                        segments.get(usize::from(segment)).and_then(|s| s.upgrade()),
                    ) else {
                        return;
                    };
                    let Some(id) = lock(&state.removable).remove(&(segment, slot)) else {
                        return; // empty, the host bridge, or a device CH keeps
                    };
                    bus.remove(slot);
                    lock(&state.removing).remove(&id);
                    lock(&state.ejected).push(id);
                    control.device_ejected();
                }));
        }
        let config_io = add_pci_buses(&mut wiring, &segments)?;

        Ok(DeviceManager {
            pio: Arc::new(wiring.pio),
            mmio: Arc::new(wiring.mmio),
            segments,
            virtio,
            pvpanic,
            pvpanic_bar,
            balloon,
            hotplug,
            routes,
            next_memory_slot,
            pmem_regions,
            virtio_mem,
            ged,
            cpu_hotplug,
            memory_hotplug,
            ioapic,
            serial,
            _tpm: tpm,
            config_io,
            platform_nodes: wiring.nodes,
        })
    }

    pub fn pio_bus(&self) -> &Arc<Bus> {
        &self.pio
    }

    pub fn mmio_bus(&self) -> &Arc<Bus> {
        &self.mmio
    }

    /// Where each PCI segment's ECAM and windows are (for the ACPI tables).
    pub fn segment_layouts(&self) -> Vec<SegmentLayout> {
        self.segments.iter().map(|s| s.layout).collect()
    }

    pub fn balloon(&self) -> Option<&crate::virtio::balloon::BalloonControl> {
        self.balloon.as_ref()
    }

    /// The virtio-mem device of memory zone `zone`.
    /// Every virtio-mem region's unplugged blocks, by guest address.
    pub fn virtio_mem_unplugged(&self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = self
            .virtio_mem
            .iter()
            .flat_map(|(_, control)| control.unplugged())
            .collect();
        runs.sort_unstable();
        runs
    }

    pub fn virtio_mem(&self, zone: &str) -> Option<&crate::virtio::mem::VirtioMemControl> {
        self.virtio_mem
            .iter()
            .find(|(id, _)| id == zone)
            .map(|(_, control)| control)
    }

    pub fn ged(&self) -> &Arc<Ged> {
        &self.ged
    }

    pub fn cpu_hotplug(&self) -> &Arc<CpuHotplug> {
        &self.cpu_hotplug
    }

    pub fn memory_hotplug(&self) -> &Arc<MemoryHotplug> {
        &self.memory_hotplug
    }

    pub fn virtio_devices(&self) -> &[Arc<Mutex<VirtioPciDevice>>] {
        &self.virtio
    }

    /// Stops every started virtio device once the requests it took are
    /// finished: the guest's rings and memory then hold all of its state.
    pub fn stop_virtio_for_snapshot(&self) {
        for device in &self.virtio {
            device
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .stop_for_snapshot();
        }
    }

    /// After `stop_virtio_for_snapshot`: why a device's state could not be
    /// saved whole, if one could not (`VirtioDevice::snapshot_refusal`).
    pub fn virtio_snapshot_refusal(&self) -> Option<String> {
        self.virtio.iter().find_map(|device| {
            device
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .device()
                .snapshot_refusal()
        })
    }

    /// Each virtio device's host descriptors another VMM process on this
    /// host would carry on with (`VirtioDevice::handover_fds`), by id;
    /// devices without any are left out. Valid while this boot lives.
    pub fn handover_fds(&self) -> Vec<(String, Vec<std::os::fd::RawFd>)> {
        self.virtio
            .iter()
            .filter_map(|device| {
                let device = device.lock().unwrap_or_else(|p| p.into_inner());
                let fds = device.device().handover_fds();
                (!fds.is_empty()).then(|| (device.id().to_owned(), fds))
            })
            .collect()
    }

    /// The VM now runs in the process `handover_fds` went to: the devices
    /// leave what those descriptors stand for to it.
    pub fn handed_over(&self) {
        for device in &self.virtio {
            device
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .device_mut()
                .handed_over();
        }
    }

    /// Starts again the devices `stop_virtio_for_snapshot` stopped, or that a
    /// restore loaded started.
    pub fn resume_virtio_after_snapshot(&self) {
        for device in &self.virtio {
            device
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .resume_after_snapshot();
        }
    }

    /// PCI's state for a snapshot: the config-I/O address latch, each
    /// segment's host bridge, and each virtio device's transport (by id).
    pub fn save_pci_state(&self) -> Vec<u8> {
        let mut w = crate::snapshot::codec::Writer::default();
        let latch = self
            .config_io
            .as_ref()
            .map_or(0, |c| c.lock().unwrap_or_else(|p| p.into_inner()).address());
        w.u32(latch);
        w.u32(self.segments.len() as u32);
        for segment in &self.segments {
            w.u32_list(&segment.host_bridge_registers());
        }
        w.u32(self.virtio.len() as u32);
        for device in &self.virtio {
            let device = device.lock().unwrap_or_else(|p| p.into_inner());
            w.blob(device.id().as_bytes());
            w.blob(&device.save_state());
        }
        // The other PCI functions (pvpanic): their configuration registers.
        w.u32(u32::from(self.pvpanic.is_some()));
        if let Some((_, device)) = &self.pvpanic {
            w.blob(PVPANIC_ID.as_bytes());
            w.u32_list(
                &device
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .save_state(),
            );
        }
        w.bytes
    }

    /// Loads what `save_pci_state` wrote; the devices must be the config's.
    pub fn restore_pci_state(&self, bytes: &[u8]) -> std::result::Result<(), SnapshotError> {
        let mut r = crate::snapshot::codec::Reader::new("the PCI state", bytes);
        let latch = r.u32()?;
        r.count(self.segments.len(), "PCI segments", "the VM")?;
        for segment in &self.segments {
            let registers = r.u32_list(crate::pci::config::CONFIG_REGISTERS)?;
            if !segment.restore_host_bridge(&registers) {
                return Err(r.corrupt(format!("{} host bridge registers", registers.len())));
            }
        }
        // By id: hot-plugs leave the devices in another order than the config's.
        r.count(self.virtio.len(), "virtio devices", "the VM")?;
        let mut restored = std::collections::HashSet::new();
        for _ in 0..self.virtio.len() {
            let id = r.blob(256)?;
            // A vhost-user backend's own state rides in its device's.
            let state = r.blob((1 << 20) + crate::virtio::vhost_user::link::MAX_BACKEND_STATE)?;
            let found = self.virtio.iter().find(|d| lock(d).id().as_bytes() == id);
            let Some(device) = found.filter(|_| restored.insert(id)) else {
                return Err(r.corrupt(format!(
                    "virtio device {:?}, which the VM lacks (or the state lists twice)",
                    String::from_utf8_lossy(id)
                )));
            };
            lock(device).restore_state(state)?;
        }
        r.count(
            usize::from(self.pvpanic.is_some()),
            "other PCI devices",
            "the VM",
        )?;
        if let Some((_, device)) = &self.pvpanic {
            let id = r.blob(256)?;
            if id != PVPANIC_ID.as_bytes() {
                return Err(r.corrupt(format!(
                    "PCI device {:?} where the VM has {PVPANIC_ID}",
                    String::from_utf8_lossy(id)
                )));
            }
            let registers = r.u32_list(crate::pci::config::CONFIG_REGISTERS)?;
            let mut device = device.lock().unwrap_or_else(|p| p.into_inner());
            if !device.restore_state(&registers) {
                return Err(r.corrupt(format!("{} pvpanic registers", registers.len())));
            }
        }
        r.finish()?;
        if let Some(config_io) = &self.config_io {
            config_io
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .set_address(latch);
        }
        Ok(())
    }

    /// The platform devices' state for a snapshot: (IOAPIC, serial port).
    pub fn save_platform_state(&self) -> (Vec<u8>, Option<Vec<u8>>) {
        let ioapic = self
            .ioapic
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .save_state();
        let serial = self
            .serial
            .as_ref()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).save_state());
        (ioapic, serial)
    }

    /// Loads what `save_platform_state` gave. A serial state for a VM
    /// without a serial port (or none for one with it) means the snapshot
    /// is not this config's.
    pub fn restore_platform_state(
        &self,
        ioapic: &[u8],
        serial: Option<&[u8]>,
    ) -> std::result::Result<(), SnapshotError> {
        self.ioapic
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .restore_state(ioapic)?;
        match (&self.serial, serial) {
            (Some(device), Some(bytes)) => device
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .restore_state(bytes),
            (None, None) => Ok(()),
            _ => Err(SnapshotError::Corrupt {
                what: "the serial port state".to_owned(),
                detail: "does not match the config's serial port".to_owned(),
            }),
        }
    }

    /// Where each PCI function sits and the hot-plug state the guest has not
    /// read, for a snapshot (after ejected devices were reaped).
    pub fn save_placement(&self, device_id_counter: u64) -> PciPlacement {
        let ejected = self.ejected_ids();
        let mut functions = Vec::new();
        for device in &self.virtio {
            let device = lock(device);
            if ejected.iter().any(|id| id == device.id()) {
                continue;
            }
            let (segment, slot) = device.location();
            functions.push(PciPlace {
                id: device.id().to_owned(),
                segment,
                slot,
                bar: device.allocated_bar(),
                region: device.device().mmio_range().map(|(base, _)| base),
            });
        }
        if let Some((bdf, _)) = &self.pvpanic {
            functions.push(PciPlace {
                id: PVPANIC_ID.to_owned(),
                segment: 0,
                slot: pvpanic_slot(bdf),
                bar: self.pvpanic_bar,
                region: None,
            });
        }
        let (selected_segment, hotplug_bits) = self.hotplug.controller.save();
        PciPlacement {
            device_id_counter,
            ged_pending: self.ged.pending(),
            selected_segment,
            hotplug_bits,
            functions,
        }
    }

    /// The devices `vm.remove-device` marked whose slot the guest has not
    /// ejected yet.
    pub fn pending_removals(&self) -> Vec<String> {
        lock(&self.hotplug.removing).iter().cloned().collect()
    }

    /// Cloud Hypervisor's device tree, with the BARs where the guest has them now.
    pub fn device_tree(&self) -> Vec<DeviceNode> {
        let mut nodes = self.platform_nodes.clone();
        // Ejected devices left the guest's bus already, as in Cloud Hypervisor.
        let ejected = self.ejected_ids();
        for device in &self.virtio {
            let device = device.lock().unwrap_or_else(|p| p.into_inner());
            if ejected.iter().any(|id| id == device.id()) {
                continue;
            }
            let bars = bar_resources(device.config_space());
            let own = device
                .device()
                .mmio_range()
                .map(|(base, size)| Resource::MmioAddressRange { base, size })
                .into_iter()
                .collect();
            nodes.extend(tree::virtio_nodes(device.id(), device.bdf(), bars, own));
        }
        if let Some((bdf, device)) = &self.pvpanic {
            let device = device.lock().unwrap_or_else(|p| p.into_inner());
            nodes.push(tree::pci_function_node(
                PVPANIC_ID,
                bdf.clone(),
                bar_resources(device.config()),
            ));
        }
        nodes
    }

    /// Cloud Hypervisor's counters of every device that has some.
    pub fn counters(&self) -> Vec<(String, BTreeMap<&'static str, u64>)> {
        self.virtio
            .iter()
            .filter_map(|d| {
                let d = d.lock().unwrap_or_else(|p| p.into_inner());
                let counters = d.device().counters();
                (!counters.is_empty()).then(|| (d.id().to_owned(), counters))
            })
            .collect()
    }

    /// Drops every device (their workers stop) once the vCPUs are gone:
    /// the buses, segments and config-I/O ports hold them too, so all of
    /// those go. The KVM VM goes after them: what they registered on it is
    /// left to its end.
    pub fn stop_devices(&mut self) {
        self.routes.mark_vm_closing();
        self.virtio.clear();
        self.pvpanic = None;
        self._tpm = None;
        self.segments.clear();
        self.config_io = None;
        self.pio = Arc::new(Bus::new());
        self.mmio = Arc::new(Bus::new());
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether `vm.remove-device` (and the guest's eject) may take the device
/// with `id`: the user's devices, not the ones Cloud Hypervisor names
/// itself (`__rng`, `__console`, `__balloon`, ...).
fn is_removable(id: &str) -> bool {
    !id.starts_with("__")
}

/// The PCI hot-plug controller and the slots the guest may eject.
struct HotplugState {
    controller: Arc<PciHotplug>,
    /// (segment, slot) → id of each removable device.
    removable: Mutex<BTreeMap<(u16, u8), String>>,
    /// Ids `vm.remove-device` marked, not ejected yet.
    removing: Mutex<std::collections::BTreeSet<String>>,
    /// Ids the guest ejected, out of their slots, waiting for teardown.
    ejected: Mutex<Vec<String>>,
}

impl HotplugState {
    fn track(&self, device: &Arc<Mutex<VirtioPciDevice>>) {
        let device = lock(device);
        let (segment, slot) = device.location();
        lock(&self.removable).insert((segment, slot), device.id().to_owned());
    }
}

/// Why a hot-plug or removal was refused, in Cloud Hypervisor v37's words.
#[derive(Debug, thiserror::Error)]
pub enum HotplugError {
    #[error("Error from device manager: UnknownDeviceId({0:?})")]
    UnknownDeviceId(String),
    #[error("Error from device manager: RemovalNotAllowed({0})")]
    RemovalNotAllowed(&'static str),
    /// The VM has its one vsock device already.
    #[error("Too many virtio-vsock devices")]
    TooManyVsock,
    /// Every slot of the device's segment is taken.
    #[error("Error from device manager: NextPciDeviceId(NoPciDeviceSlotAvailable)")]
    NoSlot,
    /// The config given for a hot-plug lists no device of its kind.
    #[error("no device to hot-plug")]
    NothingToAdd,
    /// A hot-plug named a device the guest has not ejected yet.
    #[error("Error from device manager: IdentifierNotUnique({0:?})")]
    IdentifierNotUnique(String),
}

impl ModuleError for HotplugError {
    fn kind(&self) -> ErrorKind {
        match self {
            HotplugError::TooManyVsock => ErrorKind::Config,
            _ => ErrorKind::Device,
        }
    }
}

impl DeviceManager {
    /// Cloud Hypervisor's hot-plug of a virtio device into a running VM:
    /// the first free slot of its segment, BARs from the segment's windows,
    /// MSI-X routes; the slot is marked up for the guest's next scan (the
    /// caller sends the GED interrupt). `build` makes the device from a
    /// context whose config lists only it. Returns its (id, BDF).
    pub fn hotplug_virtio(
        &mut self,
        ctx: &DeviceContext<'_>,
        build: fn(&DeviceContext<'_>, &mut Reservations<'_>) -> Result<Vec<VirtioSpec>>,
    ) -> Result<(String, String)> {
        let mut reserve = Reservations {
            segments: &self.segments,
            next_slot: self.next_memory_slot,
            balloon: None,
            pmem_regions: BTreeMap::new(),
            virtio_mem: Vec::new(),
        };
        let specs = build(ctx, &mut reserve)?;
        self.next_memory_slot = reserve.next_slot;
        let regions = std::mem::take(&mut reserve.pmem_regions);
        self.pmem_regions.extend(regions);
        let mut added = None;
        for spec in specs {
            let id = spec.id.clone();
            let full = self
                .segments
                .get(usize::from(spec.segment))
                .is_some_and(|segment| segment.free_slot().is_none());
            if full {
                // Out of the guest's memory map before its mapping goes.
                self.release_pmem(ctx.vm_fd, &id);
                drop(spec);
                return Err(HotplugError::NoSlot.into());
            }
            let device = match add_virtio_pci(ctx, &self.routes, &self.segments, spec) {
                Ok(device) => device,
                Err(e) => {
                    self.release_pmem(ctx.vm_fd, &id);
                    return Err(e);
                }
            };
            let (segment, slot) = lock(&device).location();
            let bdf = lock(&device).bdf();
            self.hotplug.track(&device);
            self.hotplug.controller.mark_up(segment, slot);
            self.virtio.push(device);
            added = Some((id, bdf));
        }
        added.ok_or_else(|| HotplugError::NothingToAdd.into())
    }

    /// `vm.remove-device`: marks the device's slot down for the guest's next
    /// scan (the caller sends the GED interrupt); it goes when the guest
    /// ejects it.
    pub fn request_removal(&self, id: &str) -> Result<()> {
        let removable = lock(&self.hotplug.removable);
        let slot = removable
            .iter()
            .find(|(_, device)| device.as_str() == id)
            .map(|(&slot, _)| slot);
        drop(removable);
        match slot {
            Some((segment, slot)) => {
                lock(&self.hotplug.removing).insert(id.to_owned());
                self.hotplug.controller.mark_down(segment, slot);
                Ok(())
            }
            None if self.device_tree().iter().any(|n| n.id == id) => {
                Err(HotplugError::RemovalNotAllowed(fixed_device_type(id)).into())
            }
            None => Err(HotplugError::UnknownDeviceId(id.to_owned()).into()),
        }
    }

    /// Tears down the devices the guest ejected: their workers stop, their
    /// fds and taps close, their BARs (and pmem regions) are free for the
    /// next hot-plug. Returns their ids.
    pub fn reap_ejected(&mut self, vm_fd: &VmFd) -> Vec<String> {
        let ids = std::mem::take(&mut *lock(&self.hotplug.ejected));
        for id in &ids {
            let Some(at) = self.virtio.iter().position(|d| lock(d).id() == id) else {
                continue;
            };
            let device = self.virtio.remove(at);
            {
                let device = lock(&device);
                let (segment, _) = device.location();
                if let Some(segment) = self.segments.get(usize::from(segment)) {
                    // Where it was allocated: the guest may have moved it.
                    if let Some(bar) = device.config_space().bar(0) {
                        let wide = bar.kind != BarKind::Memory32;
                        segment.allocator(wide).free(device.allocated_bar());
                    }
                    if let Some((base, _)) = device.device().mmio_range() {
                        segment.allocator(true).free(base);
                    }
                }
            }
            // Out of the guest's memory map before its mapping goes.
            self.release_pmem(vm_fd, id);
            drop(device);
        }
        ids
    }

    /// Takes a pmem device's region out of the guest's memory map.
    fn release_pmem(&mut self, vm_fd: &VmFd, id: &str) {
        if let Some(mut region) = self.pmem_regions.remove(id) {
            let start = region.guest_phys_addr;
            region.memory_size = 0;
            // SAFETY: removing a slot only unmaps it from the guest.
            let _ = unsafe { vm_fd.set_user_memory_region(region) };
            // Its address range, for the next device (whichever segment has it).
            for segment in &self.segments {
                segment.allocator(true).free(start);
            }
        }
    }

    /// Ids the guest ejected and that are not torn down yet.
    fn ejected_ids(&self) -> Vec<String> {
        lock(&self.hotplug.ejected).clone()
    }
}

/// Cloud Hypervisor's name of the device type it never removes.
fn fixed_device_type(id: &str) -> &'static str {
    match id {
        "__rng" => "Rng",
        "__console" => "Console",
        "__balloon" => "Balloon",
        "__watchdog" => "Watchdog",
        _ => "Unknown",
    }
}

/// Cloud Hypervisor's id of the pvpanic device.
const PVPANIC_ID: &str = "__pvpanic";

/// A PCI function's BARs where the guest has them now.
fn bar_resources(config: &crate::pci::config::PciConfiguration) -> Vec<Resource> {
    (0..6)
        .filter_map(|index| {
            let bar = config.bar(index)?;
            Some(Resource::PciBar {
                index,
                base: config.bar_address(index)?,
                size: bar.size,
                kind: bar.kind,
                prefetchable: bar.prefetchable,
            })
        })
        .collect()
}

/// The pvpanic device in the first free slot of segment 0 after the virtio
/// devices, its BAR from the top of the 32-bit window, as Cloud Hypervisor
/// places it.
fn add_pvpanic(
    ctx: &DeviceContext<'_>,
    segments: &[Arc<PciSegment>],
) -> Result<(String, u64, Arc<Mutex<PvPanic>>)> {
    use crate::devices::pvpanic::{BAR_ALIGNMENT, BAR_SIZE};
    let id = PVPANIC_ID.to_owned();
    let segment = segments
        .first()
        .ok_or_else(|| DeviceManagerError::NoSuchSegment {
            id: id.clone(),
            segment: 0,
        })?;
    let (slot, bar) = slot_and_bar(ctx, segment, &id, 0, false, BAR_SIZE, BAR_ALIGNMENT)?;
    let device = Arc::new(Mutex::new(PvPanic::new(ctx.device_events.clone(), bar)));
    segment.insert(slot, device.clone());
    Ok((format!("0000:00:{slot:02x}.0"), bar, device))
}

/// The slot of the pvpanic device's BDF (`0000:00:ss.0`).
fn pvpanic_slot(bdf: &str) -> u8 {
    bdf.get(8..10)
        .and_then(|s| u8::from_str_radix(s, 16).ok())
        .unwrap_or(0)
}

/// Device `id`'s slot on `segment` and the start of its BAR 0 (`size`
/// bytes, `wide`: from the 64-bit window): where a snapshot's placement put
/// it, else the first free slot and the BAR space the window has.
fn slot_and_bar(
    ctx: &DeviceContext<'_>,
    segment: &PciSegment,
    id: &str,
    segment_id: u16,
    wide: bool,
    size: u64,
    alignment: u64,
) -> Result<(u8, u64)> {
    if let Some(place) = recorded_place(ctx, id, segment_id)? {
        take_slot_and_bar(segment, place, wide, size, alignment)?;
        return Ok((place.slot, place.bar));
    }
    let slot = segment
        .free_slot()
        .ok_or_else(|| DeviceManagerError::NoFreeSlot {
            id: id.to_owned(),
            segment: segment_id,
        })?;
    let bar = segment
        .allocator(wide)
        .allocate_aligned(size, alignment)
        .ok_or_else(|| DeviceManagerError::WindowFull { id: id.to_owned() })?;
    Ok((slot, bar))
}

/// Checks that `place`'s slot of `segment` is free and takes its BAR (of
/// `size`, `alignment`-aligned) from the segment's 32-bit (`wide` false)
/// or 64-bit window.
fn take_slot_and_bar(
    segment: &PciSegment,
    place: &PciPlace,
    wide: bool,
    size: u64,
    alignment: u64,
) -> Result<()> {
    let id = &place.id;
    if !segment.slot_is_free(place.slot) {
        return Err(misplaced(format!(
            "device {id} in slot {:04x}:00:{:02x}, which is not free",
            place.segment, place.slot
        )));
    }
    let window = if wide { "64-bit" } else { "32-bit" };
    if !place.bar.is_multiple_of(alignment) || !segment.allocator(wide).allocate_at(place.bar, size)
    {
        return Err(misplaced(format!(
            "device {id}'s BAR at {:#x} is not free in segment {}'s {window} window",
            place.bar, place.segment
        )));
    }
    Ok(())
}

/// A restore's checks that every recorded function was built (an id the
/// config lacks is refused), then the hot-plug controller's and the GED's
/// unread state.
fn restore_hotplug_state(
    placement: &PciPlacement,
    virtio: &[Arc<Mutex<VirtioPciDevice>>],
    pvpanic: bool,
    hotplug: &HotplugState,
    ged: &Ged,
) -> Result<()> {
    for place in &placement.functions {
        let built = if place.id == PVPANIC_ID {
            pvpanic
        } else {
            virtio.iter().any(|d| lock(d).id() == place.id)
        };
        if !built {
            return Err(misplaced(format!(
                "a place for device {}, which the config lacks",
                place.id
            )));
        }
    }
    if !hotplug
        .controller
        .restore(placement.selected_segment, &placement.hotplug_bits)
    {
        return Err(misplaced(format!(
            "hot-plug state for {} PCI segments (segment {} selected), the VM has {}",
            placement.hotplug_bits.len(),
            placement.selected_segment,
            hotplug.controller.save().1.len()
        )));
    }
    ged.set_pending(placement.ged_pending);
    Ok(())
}

/// The IOAPIC the MADT announces; it routes GSIs 0..24 (COM1, the GED).
fn add_ioapic(wiring: &mut Wiring, routes: &Arc<InterruptRoutes>) -> Result<Arc<Mutex<Ioapic>>> {
    let ioapic = Arc::new(Mutex::new(Ioapic::new(routes.clone())));
    insert(
        &mut wiring.mmio,
        "IOAPIC",
        IOAPIC_START,
        IOAPIC_SIZE,
        ioapic.clone(),
    )?;
    wiring.nodes.push(DeviceNode::leaf("__ioapic"));
    Ok(ioapic)
}

/// The ACPI shutdown device, the GED (power button), the i8042 and the
/// debug port, as Cloud Hypervisor has them.
fn add_legacy_devices(wiring: &mut Wiring, ctx: &DeviceContext<'_>) -> Result<Arc<Ged>> {
    insert(
        &mut wiring.pio,
        "ACPI shutdown device",
        u64::from(ACPI_SHUTDOWN_PORT),
        8,
        Arc::new(Mutex::new(AcpiShutdown {
            control: ctx.control.clone(),
        })),
    )?;
    let ged = Arc::new(Ged::new(wiring.legacy_irq("GED", GED_IRQ)?));
    insert(
        &mut wiring.mmio,
        "GED",
        GED_ADDRESS,
        GED_SIZE,
        Arc::new(Mutex::new(GedRegister(ged.clone()))),
    )?;
    insert(
        &mut wiring.pio,
        "i8042",
        0x60,
        5,
        Arc::new(Mutex::new(I8042(I8042Device::new(ResetTrigger(
            ctx.control.clone(),
        ))))),
    )?;
    insert(
        &mut wiring.pio,
        "debug port",
        0x80,
        1,
        Arc::new(Mutex::new(DebugPort {
            control: ctx.control.clone(),
            log: ctx.debug_log.clone(),
        })),
    )?;
    Ok(ged)
}

/// COM1 (0x3f8, IRQ 4) when the serial port is not off.
fn add_serial(
    wiring: &mut Wiring,
    ctx: &DeviceContext<'_>,
) -> Result<Option<Arc<Mutex<SerialDevice>>>> {
    let Some(backend) = ctx.serial else {
        return Ok(None);
    };
    let trigger = IrqTrigger(wiring.legacy_irq("serial", SERIAL_IRQ)?);
    let device = Arc::new(Mutex::new(SerialDevice {
        uart: Serial::new(trigger, SerialSink(backend.clone())),
    }));
    insert(&mut wiring.pio, "serial", 0x3f8, 8, device.clone())?;
    backend.attach(Some(device.clone()));
    wiring.nodes.push(DeviceNode::leaf("__serial"));
    Ok(Some(device))
}

/// `--tpm`: swtpm behind the CRB at Cloud Hypervisor's address. It has no
/// node in the device tree, as in Cloud Hypervisor.
fn add_tpm(wiring: &mut Wiring, ctx: &DeviceContext<'_>) -> Result<Option<Arc<Mutex<Crb>>>> {
    let Some(config) = &ctx.config.tpm else {
        return Ok(None);
    };
    let crb = Arc::new(Mutex::new(crate::devices::tpm::create(
        &config.socket,
        ctx.spawner,
    )?));
    insert(&mut wiring.mmio, "TPM", TPM_START, TPM_SIZE, crb.clone())?;
    Ok(Some(crb))
}

/// The ACPI memory hot-plug controller; its registers are on the bus when
/// the VM has a hot-plug area (`hotplug_size`), as in Cloud Hypervisor.
fn add_memory_hotplug(wiring: &mut Wiring, ctx: &DeviceContext<'_>) -> Result<Arc<MemoryHotplug>> {
    let layout = ctx
        .ram
        .hotplug_layout()
        .ok_or(crate::memory::MemoryError::AddressSpace)?;
    let controller = Arc::new(MemoryHotplug::new(
        ctx.ram.total_size(),
        ctx.ram.last_ram_byte(),
        layout,
        ctx.config.memory.size == 0,
    ));
    if ctx.ram.hotplug.is_some() {
        insert(
            &mut wiring.mmio,
            "memory hot-plug controller",
            MEMORY_HOTPLUG_ADDRESS,
            MEMORY_HOTPLUG_SIZE,
            Arc::new(Mutex::new(MemoryHotplugRegisters(controller.clone()))),
        )?;
    }
    Ok(controller)
}

/// The PCI segments of the config, empty but for their host bridges.
fn plan_pci(ctx: &DeviceContext<'_>) -> Result<Vec<PciSegment>> {
    let count = ctx
        .config
        .platform
        .as_ref()
        .map_or(1, |p| p.num_pci_segments);
    // The 64-bit windows start after RAM and its hot-plug memory.
    let ram_end = ctx.ram.device_area_start();
    let layouts = pci::plan_segments(count, ram_end, ctx.phys_bits).ok_or(
        DeviceManagerError::SegmentsDoNotFit {
            count,
            phys_bits: ctx.phys_bits,
        },
    )?;
    Ok(layouts.into_iter().map(PciSegment::new).collect())
}

/// Puts a virtio device in the first free slot of its segment, with its BAR
/// where Cloud Hypervisor puts it: block devices on segment 0 get a 32-bit
/// BAR (firmware reaches them), every other device a 64-bit one, each taken
/// from the top of the segment's window down.
fn add_virtio_pci(
    ctx: &DeviceContext<'_>,
    routes: &Arc<InterruptRoutes>,
    segments: &[Arc<PciSegment>],
    spec: VirtioSpec,
) -> Result<Arc<Mutex<VirtioPciDevice>>> {
    let VirtioSpec {
        id,
        segment: segment_id,
        device,
    } = spec;
    let segment =
        segments
            .get(usize::from(segment_id))
            .ok_or_else(|| DeviceManagerError::NoSuchSegment {
                id: id.clone(),
                segment: segment_id,
            })?;
    let kind = if device.device_type() == TYPE_BLOCK && segment_id == 0 {
        BarKind::Memory32
    } else {
        BarKind::Memory64
    };
    let wide = kind != BarKind::Memory32;
    let size = crate::virtio::pci::BAR_SIZE;
    let (slot, bar) = slot_and_bar(ctx, segment, &id, segment_id, wide, size, size)?;
    let device = VirtioPciDevice::new(
        id,
        device,
        ctx.ram.memory.clone(),
        routes.clone(),
        bar,
        kind,
    );
    let mut device = match device {
        Ok(device) => device,
        Err(e) => {
            segment.allocator(wide).free(bar);
            return Err(e);
        }
    };
    device.set_location(segment_id, slot);
    device.set_events(ctx.device_events.clone());
    device.set_spawner(ctx.spawner.clone());
    let device = Arc::new(Mutex::new(device));
    segment.insert(slot, device.clone());
    Ok(device)
}

/// Configuration space (ECAM for every segment, 0xcf8 for segment 0) and
/// each segment's BAR windows.
fn add_pci_buses(
    wiring: &mut Wiring,
    segments: &[Arc<PciSegment>],
) -> Result<Option<Arc<Mutex<PciConfigIo>>>> {
    let mut config_io = None;
    if let Some(first) = segments.first() {
        let device = Arc::new(Mutex::new(PciConfigIo::new(first.clone())));
        insert(
            &mut wiring.pio,
            "PCI config I/O",
            PciConfigIo::PORT,
            PciConfigIo::LEN,
            device.clone(),
        )?;
        config_io = Some(device);
    }
    insert(
        &mut wiring.mmio,
        "PCI ECAM",
        PCI_MMCONFIG_START,
        segments.len() as u64 * ECAM_SIZE_PER_SEGMENT,
        Arc::new(Mutex::new(PciEcam {
            segments: segments.to_vec(),
        })),
    )?;
    for segment in segments {
        for window in [segment.layout.mem32, segment.layout.mem64] {
            let placed = wiring.mmio.insert_shared(
                window.start,
                window.size,
                Arc::new(PciBarWindow {
                    segment: segment.clone(),
                    base: window.start,
                }),
            );
            if !placed {
                return Err(DeviceManagerError::Overlap {
                    what: format!("PCI segment {} window", segment.layout.id),
                    base: window.start,
                }
                .into());
            }
        }
    }
    Ok(config_io)
}

#[cfg(test)]
mod tests;
