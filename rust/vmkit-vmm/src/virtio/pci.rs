//! The virtio 1.x PCI transport (virtio 1.2 §4.1): a modern-only PCI
//! function whose BAR 0 holds the common, ISR, device and notify structures
//! and the MSI-X table. Queue notifications are ioeventfds (a guest kick never
//! reaches user space); interrupts are MSI-X vectors through irqfds.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::memory::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::notify::Notifiers;
use super::{Activation, ActiveQueue, Interrupt, VirtioDevice, F_VERSION_1};
use crate::error::{ErrorKind, ModuleError, Result};

/// Why a virtio-pci function could not be built or placed.
#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    #[error("{id}: too many queues")]
    TooManyQueues { id: String },
    #[error("{id}: eventfd")]
    EventFd {
        id: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{id}: KVM_IOEVENTFD at {address:#x}")]
    IoEventFd {
        id: String,
        address: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
}

impl ModuleError for VirtioPciError {
    fn kind(&self) -> ErrorKind {
        match self {
            VirtioPciError::IoEventFd { .. } => ErrorKind::Kvm,
            _ => ErrorKind::Device,
        }
    }
}
use crate::interrupts::InterruptRoutes;
use crate::pci::config::{Bar, BarKind, PciConfiguration, PciIdentity};
use crate::pci::msix::{self, Msix};
use crate::pci::PciDevice;

pub const VENDOR_ID: u16 = 0x1af4;
/// Modern device IDs are 0x1040 + device type.
const DEVICE_ID_BASE: u16 = 0x1040;

/// BAR 0 layout (Cloud Hypervisor's).
pub const BAR_SIZE: u64 = 0x80000;
/// The most bytes of a device's own state a snapshot may hold: small, but
/// for a vhost-user backend's (a tag byte and its state).
const MAX_DEVICE_STATE: usize = 1 + crate::virtio::vhost_user::link::MAX_BACKEND_STATE;
const COMMON_OFFSET: u64 = 0x0000;
const COMMON_SIZE: u64 = 0x3c;
const ISR_OFFSET: u64 = 0x2000;
const ISR_SIZE: u64 = 1;
const DEVICE_CONFIG_OFFSET: u64 = 0x4000;
const DEVICE_CONFIG_SIZE: u64 = 0x1000;
pub(super) const NOTIFY_OFFSET: u64 = 0x6000;
const NOTIFY_SIZE: u64 = 0x1000;
pub(super) const NOTIFY_OFF_MULTIPLIER: u32 = 4;
const MSIX_TABLE_OFFSET: u64 = 0x8000;
const MSIX_PBA_OFFSET: u64 = 0x48000;
/// Configuration registers (dwords) of BAR 0 and, for a 64-bit BAR, its high half.
const BAR0_REG: usize = 4;
const BAR0_HIGH_REG: usize = 5;

/// Capability types (virtio_pci_cap.cfg_type).
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const CAP_PCI_CFG: u8 = 5;
const CAP_VENDOR: u8 = 0x09;

/// Device status bits.
const STATUS_DRIVER: u8 = 2;
const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FEATURES_OK: u8 = 8;
const STATUS_NEEDS_RESET: u8 = 0x40;

pub const NO_VECTOR: u16 = 0xffff;
const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

/// The interrupt side, shared with the device's worker threads.
struct PciInterrupt {
    msix: Arc<Mutex<Msix>>,
    isr: AtomicU8,
    config_vector: AtomicU16,
    queue_vectors: Vec<AtomicU16>,
    /// DEVICE_NEEDS_RESET, set by a failing device until the driver resets it.
    needs_reset: AtomicBool,
    /// How often the device asked for a reset (failed queues or activations).
    reset_requests: AtomicU64,
}

impl PciInterrupt {
    fn trigger(&self, vector: u16) {
        if vector != NO_VECTOR {
            self.msix
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .trigger(vector);
        }
    }
}

impl Interrupt for PciInterrupt {
    fn signal_queue(&self, queue: u16) -> std::io::Result<()> {
        self.isr.fetch_or(ISR_QUEUE, Ordering::SeqCst);
        if let Some(vector) = self.queue_vectors.get(usize::from(queue)) {
            self.trigger(vector.load(Ordering::Acquire));
        }
        Ok(())
    }

    fn signal_config(&self) -> std::io::Result<()> {
        self.isr.fetch_or(ISR_CONFIG, Ordering::SeqCst);
        self.trigger(self.config_vector.load(Ordering::Acquire));
        Ok(())
    }

    fn queue_irqfd(&self, queue: u16) -> Option<EventFd> {
        let vector = self
            .queue_vectors
            .get(usize::from(queue))?
            .load(Ordering::Acquire);
        if vector == NO_VECTOR {
            return None;
        }
        let msix = self.msix.lock().unwrap_or_else(|p| p.into_inner());
        msix.irqfd(vector)?.try_clone().ok()
    }

    fn signal_needs_reset(&self) -> std::io::Result<()> {
        self.reset_requests.fetch_add(1, Ordering::Relaxed);
        // Devices only run after DRIVER_OK, so the driver is told (§2.1.2).
        if !self.needs_reset.swap(true, Ordering::SeqCst) {
            self.signal_config()?;
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Default)]
struct QueueRegisters {
    max_size: u16,
    size: u16,
    enabled: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

/// One event-monitor event a device raised: (source, event, properties),
/// as Cloud Hypervisor's `event!` macro gives them (`virtio-device`
/// `activated` with `id`, `guest` `panic` with `event`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceEvent {
    pub source: &'static str,
    pub event: &'static str,
    pub properties: Vec<(&'static str, String)>,
}

/// The events devices raise, in order. Each one also signals an eventfd,
/// so that whoever reports them waits on it instead of polling. Bounded:
/// a guest that raises events without end (pvpanic writes in a loop)
/// cannot grow the VMM's memory; the oldest are then dropped.
pub struct DeviceEventLog {
    events: Mutex<EventRing>,
    signal: EventFd,
}

struct EventRing {
    /// Index of `kept[0]` among every event ever pushed.
    first: usize,
    kept: std::collections::VecDeque<DeviceEvent>,
}

/// Events kept for readers that fall behind.
pub(crate) const EVENTS_KEPT: usize = 4096;

pub type DeviceEvents = Arc<DeviceEventLog>;

impl DeviceEventLog {
    pub fn new() -> std::io::Result<DeviceEventLog> {
        Ok(DeviceEventLog {
            events: Mutex::new(EventRing {
                first: 0,
                kept: std::collections::VecDeque::new(),
            }),
            signal: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
        })
    }

    pub fn push(
        &self,
        source: &'static str,
        event: &'static str,
        properties: Vec<(&'static str, String)>,
    ) {
        {
            let mut ring = self.events.lock().unwrap_or_else(|p| p.into_inner());
            if ring.kept.len() == EVENTS_KEPT {
                ring.kept.pop_front();
                ring.first += 1;
            }
            ring.kept.push_back(DeviceEvent {
                source,
                event,
                properties,
            });
        }
        // Only fails when the counter is near overflow: still readable then.
        let _ = self.signal.write(1);
    }

    /// A virtio device's lifecycle event (`activated`, `reset`).
    pub fn push_virtio(&self, event: &'static str, device: String) {
        self.push("virtio-device", event, vec![("id", device)]);
    }

    /// The events from index `since` on (those still kept), and the index
    /// after the last one: the next call's `since`.
    pub fn since(&self, since: usize) -> (Vec<DeviceEvent>, usize) {
        let ring = self.events.lock().unwrap_or_else(|p| p.into_inner());
        let skip = since.saturating_sub(ring.first);
        let events = ring.kept.iter().skip(skip).cloned().collect();
        (events, ring.first + ring.kept.len())
    }

    /// Readable once an event was pushed since the last read of it.
    pub fn signal_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.signal.as_raw_fd()
    }
}

pub struct VirtioPciDevice {
    id: String,
    events: Option<DeviceEvents>,
    /// Starts the device's workers on activation.
    spawner: crate::seccomp::Spawner,
    config: PciConfiguration,
    device: Box<dyn VirtioDevice>,
    memory: GuestMemoryMmap,
    msix: Arc<Mutex<Msix>>,
    msix_cap: usize,
    pci_cfg_cap: usize,
    interrupt: Arc<PciInterrupt>,
    device_features: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_generation: u8,
    queue_select: u16,
    queues: Vec<QueueRegisters>,
    /// The queues' kicks, and where their ioeventfds are registered.
    notifiers: Arc<Notifiers>,
    active: bool,
    /// Stopped for a snapshot (or restored started): started again from the
    /// used rings' positions.
    stopped_for_snapshot: bool,
    /// (segment, slot), for the device tree.
    location: (u16, u8),
    /// Where BAR 0 was allocated from its segment's window (the guest may
    /// have moved it since): what a hot-unplug gives back and a restore takes.
    allocated_bar: u64,
}

fn le_value(data: &[u8]) -> u64 {
    let mut bytes = [0u8; 8];
    let n = data.len().min(8);
    bytes[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(bytes)
}

fn put_le(data: &mut [u8], value: u64) {
    let bytes = value.to_le_bytes();
    let n = data.len().min(8);
    data[..n].copy_from_slice(&bytes[..n]);
}

impl VirtioPciDevice {
    /// Wraps `device` as a PCI function whose BAR 0 (of `bar_kind`, 32- or
    /// 64-bit memory) is at `bar_address`.
    pub fn new(
        id: String,
        device: Box<dyn VirtioDevice>,
        memory: GuestMemoryMmap,
        routes: Arc<InterruptRoutes>,
        bar_address: u64,
        bar_kind: BarKind,
    ) -> Result<VirtioPciDevice> {
        let max_sizes = device.queue_max_sizes();
        let queue_count = max_sizes.len();
        let vectors = u16::try_from(queue_count + 1)
            .ok()
            .filter(|&v| u64::from(v) * msix::ENTRY_SIZE <= MSIX_PBA_OFFSET - MSIX_TABLE_OFFSET)
            .ok_or_else(|| VirtioPciError::TooManyQueues { id: id.clone() })?;
        let msix = Arc::new(Mutex::new(Msix::new(&id, vectors, routes.clone())?));
        let device_type = device.device_type();
        let mut config = PciConfiguration::new(PciIdentity {
            vendor: VENDOR_ID,
            device: DEVICE_ID_BASE + device_type as u16,
            class: pci_class(device_type),
            revision: 1,
            subsystem_vendor: VENDOR_ID,
            subsystem: 0x40,
        });
        config.add_bar(
            0,
            bar_address,
            Bar {
                size: BAR_SIZE,
                kind: bar_kind,
                prefetchable: false,
            },
        );
        let msix_cap = config.add_capability(
            &msix_capability(vectors),
            // Message control: only MSI-X Enable and Function Mask are writable.
            &[0, 0, 0, 0xc0],
        );
        config.add_capability(
            &virtio_cap(CAP_COMMON, COMMON_OFFSET, COMMON_SIZE, None),
            &[],
        );
        config.add_capability(&virtio_cap(CAP_ISR, ISR_OFFSET, ISR_SIZE, None), &[]);
        config.add_capability(
            &virtio_cap(CAP_DEVICE, DEVICE_CONFIG_OFFSET, DEVICE_CONFIG_SIZE, None),
            &[],
        );
        config.add_capability(
            &virtio_cap(
                CAP_NOTIFY,
                NOTIFY_OFFSET,
                NOTIFY_SIZE,
                Some(NOTIFY_OFF_MULTIPLIER),
            ),
            &[],
        );
        // The PCI configuration access capability: bar, offset, length and
        // the data window are the driver's to write.
        let pci_cfg_cap = config.add_capability(
            &virtio_cap(CAP_PCI_CFG, 0, 0, Some(0)),
            &[
                0, 0, 0, 0, 0xff, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            ],
        );

        let notifiers = Notifiers::new(routes.clone(), queue_count).map_err(|source| {
            VirtioPciError::EventFd {
                id: id.clone(),
                source,
            }
        })?;
        let notifiers = Arc::new(notifiers);
        let mut device = device;
        device.attach_notifiers(&notifiers);
        let interrupt = Arc::new(PciInterrupt {
            msix: msix.clone(),
            isr: AtomicU8::new(0),
            config_vector: AtomicU16::new(NO_VECTOR),
            queue_vectors: (0..queue_count)
                .map(|_| AtomicU16::new(NO_VECTOR))
                .collect(),
            needs_reset: AtomicBool::new(false),
            reset_requests: AtomicU64::new(0),
        });
        let mut pci = VirtioPciDevice {
            id,
            config,
            device_features: device.features() | F_VERSION_1,
            device,
            memory,
            msix,
            msix_cap,
            pci_cfg_cap,
            interrupt,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            queues: max_sizes
                .iter()
                .map(|&max_size| QueueRegisters {
                    max_size,
                    size: max_size,
                    ..Default::default()
                })
                .collect(),
            notifiers,
            active: false,
            stopped_for_snapshot: false,
            location: (0, 0),
            allocated_bar: bar_address,
            events: None,
            spawner: crate::seccomp::Spawner::unconfined(),
        };
        pci.register_notifiers(bar_address)?;
        Ok(pci)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The transport's state for a snapshot (of a device not running:
    /// never started, reset, or `stop_for_snapshot`): configuration space,
    /// feature and queue registers, status, MSI-X and the interrupt vectors.
    /// A started device's queues go on from its used rings' indices.
    pub fn save_state(&self) -> Vec<u8> {
        let mut w = crate::snapshot::codec::Writer::default();
        w.u32_list(self.config.registers());
        w.u32(self.device_feature_select);
        w.u32(self.driver_feature_select);
        w.u64(self.driver_features);
        w.u32(u32::from(self.status) | u32::from(self.config_generation) << 8);
        w.u32(u32::from(self.queue_select));
        w.u32(self.queues.len() as u32);
        for (index, queue) in self.queues.iter().enumerate() {
            w.u32(u32::from(queue.size) | u32::from(queue.enabled) << 16);
            w.u64(queue.desc);
            w.u64(queue.driver);
            w.u64(queue.device);
            let vector = self.interrupt.queue_vectors.get(index);
            w.u32(u32::from(
                vector.map_or(NO_VECTOR, |v| v.load(Ordering::Relaxed)),
            ));
        }
        w.u32(u32::from(
            self.interrupt.config_vector.load(Ordering::Relaxed),
        ));
        w.u32(u32::from(self.interrupt.isr.load(Ordering::Relaxed)));
        self.msix().save_state(&mut w);
        w.blob(&self.device.save_device_state());
        w.bytes
    }

    /// Loads what `save_state` wrote into this (new, not started) device; a
    /// device saved started is started by `resume_after_snapshot`. Values
    /// are kept to what a driver could have set: sizes within the queue's
    /// maximum, vectors within the table. The ioeventfds follow BAR 0 if the
    /// guest had moved it.
    pub fn restore_state(
        &mut self,
        bytes: &[u8],
    ) -> std::result::Result<(), crate::snapshot::SnapshotError> {
        let what = format!("the state of virtio device {}", self.id);
        let mut r = crate::snapshot::codec::Reader::new(&what, bytes);
        let registers = r.u32_list(self.config.registers().len())?;
        if registers.len() != self.config.registers().len() {
            return Err(r.corrupt(format!("{} configuration registers", registers.len())));
        }
        let device_feature_select = r.u32()?;
        let driver_feature_select = r.u32()?;
        let driver_features = r.u64()?;
        let status = r.u32()?;
        let queue_select = r.u32()? as u16;
        let queues = r.count(self.queues.len(), "queues", "the device")?;
        let mut saved = Vec::with_capacity(queues);
        for _ in 0..queues {
            let size_enabled = r.u32()?;
            let (desc, driver, device) = (r.u64()?, r.u64()?, r.u64()?);
            let vector = r.u32()? as u16;
            saved.push((size_enabled, desc, driver, device, vector));
        }
        let config_vector = r.u32()? as u16;
        let isr = r.u32()? as u8;
        self.msix().restore_state(&mut r)?;
        let device_state = r.blob(MAX_DEVICE_STATE)?;
        r.finish()?;
        self.device
            .restore_device_state(device_state)
            .map_err(|detail| r.corrupt(detail))?;
        let bar_before = self.config.bar_address(0);
        self.config.restore_registers(&registers);
        self.device_feature_select = device_feature_select;
        self.driver_feature_select = driver_feature_select;
        self.driver_features = driver_features & self.device_features;
        self.status = status as u8;
        self.config_generation = (status >> 8) as u8;
        self.queue_select = queue_select;
        for (index, (size_enabled, desc, driver, device, vector)) in saved.into_iter().enumerate() {
            let queue = &mut self.queues[index];
            let size = (size_enabled & 0xffff) as u16;
            queue.size = if size == 0 || size > queue.max_size {
                queue.max_size
            } else {
                size
            };
            queue.enabled = size_enabled >> 16 & 1 != 0;
            (queue.desc, queue.driver, queue.device) = (desc, driver, device);
            let vector = self.valid_vector(vector);
            if let Some(slot) = self.interrupt.queue_vectors.get(index) {
                slot.store(vector, Ordering::Relaxed);
            }
        }
        let config_vector = self.valid_vector(config_vector);
        self.interrupt
            .config_vector
            .store(config_vector, Ordering::Relaxed);
        self.interrupt.isr.store(isr & 3, Ordering::Relaxed);
        // A started device starts again (resume_after_snapshot) from its rings.
        self.stopped_for_snapshot = self.status & STATUS_DRIVER_OK != 0;
        self.follow_bar0(bar_before);
        Ok(())
    }

    /// Moves the ioeventfds to BAR 0's new place if it moved from
    /// `bar_before` to an aligned address. Kicks still arrive through MMIO
    /// without them.
    fn follow_bar0(&mut self, bar_before: Option<u64>) {
        let bar_after = self.config.bar_address(0);
        if bar_after == bar_before {
            return;
        }
        if let Some(base) =
            bar_after.filter(|b| b.checked_add(BAR_SIZE).is_some() && b % BAR_SIZE == 0)
        {
            // Sizing then restoring the BAR puts it back where the notifiers
            // are: moving them would cost two KVM_IOEVENTFD calls a queue
            // (each an SRCU grace period) for nothing.
            if self.notifiers.base() == Some(base) {
                return;
            }
            if let Err(e) = self.register_notifiers(base) {
                log::warn!("{e}");
            }
        }
    }

    /// How often the device asked the driver for a reset (a queue it had to
    /// stop, an activation that failed); each is also logged.
    pub fn reset_requests(&self) -> u64 {
        self.interrupt.reset_requests.load(Ordering::Relaxed)
    }

    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        &mut *self.device
    }

    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    pub fn config_space(&self) -> &PciConfiguration {
        &self.config
    }

    /// Where the device sits: `ssss:bb:dd.f`.
    pub fn bdf(&self) -> String {
        let (segment, slot) = self.location;
        format!("{segment:04x}:00:{slot:02x}.0")
    }

    /// Where BAR 0 was allocated (see `allocated_bar`).
    pub fn allocated_bar(&self) -> u64 {
        self.allocated_bar
    }

    /// (segment, slot).
    pub fn location(&self) -> (u16, u8) {
        self.location
    }

    pub fn set_location(&mut self, segment: u16, slot: u8) {
        self.location = (segment, slot);
    }

    /// Where to record activations and driver resets.
    pub fn set_events(&mut self, events: DeviceEvents) {
        self.events = Some(events);
    }

    /// Who starts the device's worker threads (and confines them).
    pub fn set_spawner(&mut self, spawner: crate::seccomp::Spawner) {
        self.spawner = spawner;
    }

    fn record(&self, event: &'static str) {
        if let Some(events) = &self.events {
            events.push_virtio(event, self.id.clone());
        }
    }

    fn register_notifiers(&mut self, base: u64) -> Result<()> {
        self.notifiers
            .place(base)
            .map_err(|e| VirtioPciError::IoEventFd {
                id: self.id.clone(),
                address: e.address,
                source: e.source,
            })?;
        Ok(())
    }

    fn msix(&self) -> MutexGuard<'_, Msix> {
        self.msix.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn selected_queue(&self) -> Option<&QueueRegisters> {
        self.queues.get(usize::from(self.queue_select))
    }

    fn valid_vector(&self, vector: u16) -> u16 {
        if vector < self.msix().vector_count() {
            vector
        } else {
            NO_VECTOR
        }
    }

    /// Driver-initiated or VM reset: workers stop, registers clear.
    fn reset(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
            self.record("reset");
        }
        self.status = 0;
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        for queue in &mut self.queues {
            *queue = QueueRegisters {
                max_size: queue.max_size,
                size: queue.max_size,
                ..Default::default()
            };
        }
        self.interrupt.isr.store(0, Ordering::SeqCst);
        self.interrupt.needs_reset.store(false, Ordering::SeqCst);
        self.interrupt
            .config_vector
            .store(NO_VECTOR, Ordering::SeqCst);
        for vector in &self.interrupt.queue_vectors {
            vector.store(NO_VECTOR, Ordering::SeqCst);
        }
        self.notifiers.reset();
        for kick in self.notifiers.kicks() {
            let _ = kick.read();
        }
    }

    /// An MSI-X vector could not be routed (already logged by `Msix`): the
    /// device cannot interrupt the driver as it asked, so it needs a reset.
    fn interrupts_lost(&mut self) {
        if self.status & STATUS_DRIVER != 0 {
            self.status |= STATUS_NEEDS_RESET;
            let _ = self.interrupt.signal_config();
        }
    }

    fn set_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut status = value;
        let newly = value & !self.status;
        if newly & STATUS_FEATURES_OK != 0 {
            let acceptable = self.driver_features & !self.device_features == 0
                && self.driver_features & F_VERSION_1 != 0
                && self.status & STATUS_DRIVER != 0;
            if !acceptable {
                status &= !STATUS_FEATURES_OK;
            }
        }
        if newly & STATUS_DRIVER_OK != 0 && status & STATUS_FEATURES_OK != 0 && !self.active {
            if let Err(message) = self.activate() {
                log::error!("{}: cannot start the device: {message}", self.id);
                self.status = status;
                if let Err(e) = self.interrupt.signal_needs_reset() {
                    log::error!("{}: cannot signal the driver: {e}", self.id);
                }
                return;
            }
        }
        self.status = status;
    }

    fn activate(&mut self) -> std::result::Result<(), String> {
        self.start(false)?;
        self.record("activated");
        Ok(())
    }

    /// Starts the device's queues; `from_used_ring`: each goes on from its
    /// used ring's index, for a device stopped for a snapshot once it had
    /// finished every request it took.
    fn start(&mut self, from_used_ring: bool) -> std::result::Result<(), String> {
        let event_idx = self.driver_features & super::F_RING_EVENT_IDX != 0;
        let mut queues = Vec::new();
        for (index, regs) in self.queues.iter().enumerate() {
            if !regs.enabled {
                continue;
            }
            let mut queue = Queue::new(regs.max_size).map_err(|e| format!("queue {index}: {e}"))?;
            queue
                .try_set_size(regs.size)
                .map_err(|e| format!("queue {index} size {}: {e}", regs.size))?;
            queue
                .try_set_desc_table_address(GuestAddress(regs.desc))
                .map_err(|e| format!("queue {index} descriptor table: {e}"))?;
            queue
                .try_set_avail_ring_address(GuestAddress(regs.driver))
                .map_err(|e| format!("queue {index} available ring: {e}"))?;
            queue
                .try_set_used_ring_address(GuestAddress(regs.device))
                .map_err(|e| format!("queue {index} used ring: {e}"))?;
            queue.set_event_idx(event_idx);
            queue.set_ready(true);
            if !queue.is_valid(&self.memory) {
                return Err(format!("queue {index} lies outside guest memory"));
            }
            if from_used_ring {
                let position = queue
                    .used_idx(&self.memory, Ordering::Acquire)
                    .map_err(|e| format!("queue {index} used ring: {e}"))?
                    .0;
                queue.set_next_avail(position);
                queue.set_next_used(position);
            }
            let kick = self.notifiers.kicks()[index]
                .try_clone()
                .map_err(|e| format!("eventfd: {e}"))?;
            queues.push(ActiveQueue {
                index: index as u16,
                queue,
                kick,
            });
        }
        self.device
            .activate(Activation {
                memory: self.memory.clone(),
                interrupt: self.interrupt.clone(),
                queues,
                acked_features: self.driver_features,
                spawner: self.spawner.clone(),
            })
            .map_err(|e| crate::error::chain_message(&e))?;
        self.active = true;
        Ok(())
    }

    /// Stops a started device for a snapshot once every request in flight is
    /// finished (`VirtioDevice::stop_quiesced`); `resume_after_snapshot`
    /// starts it again where it was. Its status still says DRIVER_OK.
    pub fn stop_for_snapshot(&mut self) {
        if self.active {
            self.device.stop_quiesced();
            self.active = false;
            self.stopped_for_snapshot = true;
        }
    }

    /// Starts a device `stop_for_snapshot` stopped, or one restored started,
    /// from the used rings' positions. A device that cannot start asks the
    /// driver for a reset, as a failed activation does.
    pub fn resume_after_snapshot(&mut self) {
        if !std::mem::take(&mut self.stopped_for_snapshot) {
            return;
        }
        if let Err(message) = self.start(true) {
            log::error!("{}: cannot start the device again: {message}", self.id);
            if let Err(e) = self.interrupt.signal_needs_reset() {
                log::error!("{}: cannot signal the driver: {e}", self.id);
            }
        }
    }

    fn needs_reset_bit(&self) -> u8 {
        if self.interrupt.needs_reset.load(Ordering::SeqCst) {
            STATUS_NEEDS_RESET
        } else {
            0
        }
    }

    fn configurable(&self) -> bool {
        self.status & STATUS_DRIVER_OK == 0
    }

    fn common_read(&self, offset: u64, data: &mut [u8]) {
        let queue = self.selected_queue().copied().unwrap_or_default();
        let queue_vector = self
            .interrupt
            .queue_vectors
            .get(usize::from(self.queue_select))
            .map_or(NO_VECTOR, |v| v.load(Ordering::Acquire));
        let half = |value: u64, high: bool| {
            if high {
                value >> 32
            } else {
                value & 0xffff_ffff
            }
        };
        let value = match (offset, data.len()) {
            (0x00, 4) => u64::from(self.device_feature_select),
            (0x04, 4) => match self.device_feature_select {
                0 => self.device_features & 0xffff_ffff,
                1 => self.device_features >> 32,
                _ => 0,
            },
            (0x08, 4) => u64::from(self.driver_feature_select),
            (0x0c, 4) => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            (0x10, 2) => u64::from(self.interrupt.config_vector.load(Ordering::Acquire)),
            (0x12, 2) => self.queues.len() as u64,
            (0x14, 1) => u64::from(self.status | self.needs_reset_bit()),
            (0x15, 1) => u64::from(self.config_generation),
            (0x16, 2) => u64::from(self.queue_select),
            (0x18, 2) => u64::from(queue.size),
            (0x1a, 2) => u64::from(queue_vector),
            (0x1c, 2) => u64::from(queue.enabled),
            // Queue i notifies at NOTIFY_OFFSET + i * multiplier.
            (0x1e, 2) | (0x38, 2) if self.selected_queue().is_some() => {
                u64::from(self.queue_select)
            }
            (0x20, 8) => queue.desc,
            (0x28, 8) => queue.driver,
            (0x30, 8) => queue.device,
            (0x20 | 0x24, 4) => half(queue.desc, offset == 0x24),
            (0x28 | 0x2c, 4) => half(queue.driver, offset == 0x2c),
            (0x30 | 0x34, 4) => half(queue.device, offset == 0x34),
            _ => 0,
        };
        put_le(data, value);
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let value = le_value(data);
        let configurable = self.configurable();
        let select = usize::from(self.queue_select);
        let set_half = |field: &mut u64, high: bool| {
            *field = if high {
                (*field & 0xffff_ffff) | value << 32
            } else {
                (*field & !0xffff_ffff) | (value & 0xffff_ffff)
            };
        };
        match (offset, data.len()) {
            (0x00, 4) => self.device_feature_select = value as u32,
            (0x08, 4) => self.driver_feature_select = value as u32,
            (0x0c, 4) if self.status & STATUS_FEATURES_OK == 0 => {
                match self.driver_feature_select {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | value,
                    1 => self.driver_features = (self.driver_features & 0xffff_ffff) | value << 32,
                    _ => {}
                }
            }
            (0x10, 2) => {
                let vector = self.valid_vector(value as u16);
                self.interrupt
                    .config_vector
                    .store(vector, Ordering::Release);
            }
            (0x14, 1) => self.set_status(value as u8),
            (0x16, 2) => self.queue_select = value as u16,
            (0x1a, 2) => {
                let vector = self.valid_vector(value as u16);
                if let Some(v) = self.interrupt.queue_vectors.get(select) {
                    v.store(vector, Ordering::Release);
                }
            }
            _ if !configurable => {}
            (0x18, 2) => {
                if let Some(queue) = self.queues.get_mut(select) {
                    queue.size = value as u16;
                }
            }
            (0x1c, 2) => {
                if let Some(queue) = self.queues.get_mut(select) {
                    queue.enabled = value == 1;
                }
            }
            (0x20 | 0x28 | 0x30, 8) | (0x20..=0x37, 4) => {
                if let Some(queue) = self.queues.get_mut(select) {
                    let field = match offset & !0x7 {
                        0x20 => &mut queue.desc,
                        0x28 => &mut queue.driver,
                        _ => &mut queue.device,
                    };
                    if data.len() == 8 {
                        *field = value;
                    } else if offset.is_multiple_of(4) {
                        set_half(field, offset % 8 == 4);
                    }
                }
            }
            _ => {}
        }
    }

    fn read_bar0(&mut self, offset: u64, data: &mut [u8]) {
        let len = data.len() as u64;
        let inside = |start: u64, size: u64| offset >= start && offset + len <= start + size;
        if inside(COMMON_OFFSET, COMMON_SIZE) {
            self.common_read(offset - COMMON_OFFSET, data);
        } else if inside(ISR_OFFSET, ISR_SIZE) {
            // Reading the ISR acknowledges it.
            data[0] = self.interrupt.isr.swap(0, Ordering::SeqCst);
        } else if inside(DEVICE_CONFIG_OFFSET, DEVICE_CONFIG_SIZE) {
            self.device.read_config(offset - DEVICE_CONFIG_OFFSET, data);
        } else {
            let msix = self.msix();
            if inside(MSIX_TABLE_OFFSET, msix.table_size()) {
                msix.table_read(offset - MSIX_TABLE_OFFSET, data);
            } else if inside(MSIX_PBA_OFFSET, msix.pba_size()) {
                msix.pba_read(offset - MSIX_PBA_OFFSET, data);
            } else {
                data.fill(0);
            }
        }
    }

    fn write_bar0(&mut self, offset: u64, data: &[u8]) {
        let len = data.len() as u64;
        let inside = |start: u64, size: u64| offset >= start && offset + len <= start + size;
        if inside(COMMON_OFFSET, COMMON_SIZE) {
            self.common_write(offset - COMMON_OFFSET, data);
        } else if inside(DEVICE_CONFIG_OFFSET, DEVICE_CONFIG_SIZE) {
            self.device
                .write_config(offset - DEVICE_CONFIG_OFFSET, data);
        } else if inside(NOTIFY_OFFSET, NOTIFY_SIZE) {
            // Only reached when the ioeventfd is not in place (the queue is
            // served on the vCPU threads, a BAR move is in progress, or a
            // config-window access): serve here if the device can, else
            // kick by hand.
            let Some(queue) = notified_queue(offset) else {
                return;
            };
            match self.device.queue_notify_target(queue) {
                Some(target) => target.notify(),
                None => {
                    if let Some(kick) = self.notifiers.kicks().get(queue) {
                        let _ = kick.write(1);
                    }
                }
            }
        } else {
            let mut msix = self.msix();
            if inside(MSIX_TABLE_OFFSET, msix.table_size()) {
                let routed = msix.table_write(offset - MSIX_TABLE_OFFSET, data);
                drop(msix);
                if routed.is_err() {
                    self.interrupts_lost();
                }
            }
        }
    }

    /// The PCI configuration access capability's window: (bar, offset, length).
    fn pci_cfg_target(&self) -> (u8, u32, u32) {
        let mut bytes = [0u8; 12];
        self.config.read_bytes(self.pci_cfg_cap + 4, &mut bytes);
        (
            bytes[0],
            u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]),
        )
    }
}

impl Drop for VirtioPciDevice {
    fn drop(&mut self) {
        if self.active {
            self.device.reset();
        }
        self.notifiers.remove();
    }
}

/// Cloud Hypervisor's class codes: network and mass storage for net and
/// block, "other" with the non-transitional virtio subclass (0xff) else.
fn pci_class(device_type: u32) -> (u8, u8, u8) {
    match device_type {
        super::TYPE_NET => (0x02, 0x00, 0x00),
        super::TYPE_BLOCK => (0x01, 0x80, 0x00),
        _ => (0xff, 0xff, 0x00),
    }
}

fn msix_capability(vectors: u16) -> Vec<u8> {
    let mut cap = vec![msix::CAPABILITY_ID, 0];
    cap.extend_from_slice(&(vectors - 1).to_le_bytes());
    cap.extend_from_slice(&(MSIX_TABLE_OFFSET as u32).to_le_bytes()); // BIR 0
    cap.extend_from_slice(&(MSIX_PBA_OFFSET as u32).to_le_bytes()); // BIR 0
    cap
}

/// struct virtio_pci_cap (+ notify_off_multiplier or pci_cfg_data).
fn virtio_cap(cfg_type: u8, offset: u64, length: u64, extra: Option<u32>) -> Vec<u8> {
    let cap_len = if extra.is_some() { 20u8 } else { 16 };
    let mut cap = vec![CAP_VENDOR, 0, cap_len, cfg_type, 0, 0, 0, 0];
    cap.extend_from_slice(&(offset as u32).to_le_bytes());
    cap.extend_from_slice(&(length as u32).to_le_bytes());
    if let Some(extra) = extra {
        cap.extend_from_slice(&extra.to_le_bytes());
    }
    cap
}

/// The queue whose notify register is at `offset` of BAR 0, if one is.
fn notified_queue(offset: u64) -> Option<usize> {
    if !(NOTIFY_OFFSET..NOTIFY_OFFSET + NOTIFY_SIZE).contains(&offset) {
        return None;
    }
    usize::try_from((offset - NOTIFY_OFFSET) / u64::from(NOTIFY_OFF_MULTIPLIER)).ok()
}

impl PciDevice for VirtioPciDevice {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }

    fn notify_target(&self, bar: usize, offset: u64) -> Option<Arc<dyn crate::pci::NotifyTarget>> {
        if bar != 0 {
            return None;
        }
        self.device.queue_notify_target(notified_queue(offset)?)
    }

    fn config_read(&mut self, reg: usize) -> u32 {
        if reg == (self.pci_cfg_cap + 16) / 4 {
            let (bar, offset, length) = self.pci_cfg_target();
            if bar == 0 && matches!(length, 1 | 2 | 4) {
                let mut data = [0u8; 4];
                self.read_bar0(u64::from(offset), &mut data[..length as usize]);
                return u32::from_le_bytes(data);
            }
            return 0;
        }
        self.config.read_register(reg)
    }

    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        if reg == (self.pci_cfg_cap + 16) / 4 {
            let (bar, window, length) = self.pci_cfg_target();
            if bar == 0 && offset == 0 && data.len() as u32 >= length && length > 0 {
                self.write_bar0(u64::from(window), &data[..length as usize]);
            }
            return;
        }
        let bar_before = self.config.bar_address(0);
        self.config.write_register(reg, offset, data);
        if reg == self.msix_cap / 4 {
            let mut control = [0u8; 2];
            self.config.read_bytes(self.msix_cap + 2, &mut control);
            let routed = self.msix().set_message_control(u16::from_le_bytes(control));
            if routed.is_err() {
                self.interrupts_lost();
            }
        }
        // Sizing writes all-ones to one half of the BAR; the address it makes
        // for a moment can be another device's, so only follow real placements.
        let sizing = matches!(reg, BAR0_REG | BAR0_HIGH_REG)
            && data.len() == 4
            && data.iter().all(|&b| b == 0xff);
        if !sizing {
            self.follow_bar0(bar_before);
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if bar == 0 && !data.is_empty() && data.len() <= 8 {
            self.read_bar0(offset, data);
        } else {
            data.fill(0xff);
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar == 0 && !data.is_empty() && data.len() <= 8 {
            self.write_bar0(offset, data);
        }
    }
}

#[cfg(test)]
mod tests;
