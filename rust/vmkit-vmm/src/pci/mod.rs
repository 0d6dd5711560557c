//! PCI: one root bus per PCI segment, each behind a host bridge, with
//! configuration space reachable through ECAM (every segment) and through
//! ports 0xcf8/0xcfc (segment 0), and device BARs dispatched from the
//! segment's MMIO windows.

pub mod config;
pub mod msix;

use std::sync::{Arc, Mutex};

use crate::devices::{BusDevice, SharedBusDevice};
use config::{PciConfiguration, PciIdentity};

/// Slots on a bus.
pub const DEVICES_PER_BUS: usize = 32;
/// ECAM space of one segment: bus 0 only (32 devices × 8 functions × 4 KiB).
pub const ECAM_SIZE_PER_SEGMENT: u64 = 1 << 20;

/// A PCI function as the bus sees it. Guest-reachable: never panic or block.
pub trait PciDevice: Send {
    fn config(&self) -> &PciConfiguration;
    /// Reads configuration register `reg` (dword index).
    fn config_read(&mut self, reg: usize) -> u32 {
        self.config().read_register(reg)
    }
    /// Writes `data` at byte `offset` within configuration register `reg`.
    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]);
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
    /// A queue that a write at `offset` of BAR `bar` notifies, to be served
    /// after the function's lock is released (a long request must not hold
    /// up the function's other registers, or its other queues).
    fn notify_target(&self, _bar: usize, _offset: u64) -> Option<Arc<dyn NotifyTarget>> {
        None
    }
}

pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// Something a register write notifies (a virtio queue served on the
/// writing vCPU thread); see `PciDevice::notify_target`.
pub trait NotifyTarget: Send + Sync {
    fn notify(&self);
}

fn lock(device: &SharedPciDevice) -> std::sync::MutexGuard<'_, dyn PciDevice + 'static> {
    device.lock().unwrap_or_else(|p| p.into_inner())
}

/// The host bridge at 00.0 of every segment (Cloud Hypervisor's IDs).
pub struct HostBridge {
    config: PciConfiguration,
}

impl HostBridge {
    pub fn new() -> Self {
        HostBridge {
            config: PciConfiguration::new(PciIdentity {
                vendor: 0x8086,
                device: 0x0d57,
                class: (0x06, 0x00, 0x00),
                revision: 0,
                subsystem_vendor: 0,
                subsystem: 0,
            }),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }
    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        self.config.write_register(reg, offset, data);
    }
    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

/// Where a segment's ECAM and BAR windows are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentLayout {
    pub id: u16,
    pub ecam_base: u64,
    pub mem32: Window,
    pub mem64: Window,
}

/// Splits the device windows between `count` segments as Cloud Hypervisor
/// does: the 32-bit window evenly (1 MiB aligned); the 64-bit space from the
/// end of RAM (at least 4 GiB) to the top of the guest's `phys_bits` address
/// space (less CH's platform area) evenly, in multiples of 4 GiB.
pub fn plan_segments(count: u16, ram_end: u64, phys_bits: u8) -> Option<Vec<SegmentLayout>> {
    use crate::layout::*;
    if count == 0 || u64::from(count) * ECAM_SIZE_PER_SEGMENT > PCI_MMCONFIG_SIZE {
        return None;
    }
    let mem32_share = (MEM_32BIT_DEVICES_SIZE / u64::from(count)) & !((1 << 20) - 1);
    let mem64_start = ram_end.max(RAM_64BIT_START);
    let mem64_end = 1u64
        .checked_shl(u32::from(phys_bits))
        .filter(|_| phys_bits < 64)?
        .checked_sub(PLATFORM_DEVICE_AREA_SIZE)?;
    let mem64_share = (mem64_end.checked_sub(mem64_start)? / u64::from(count))
        & !(MEM_64BIT_DEVICES_ALIGNMENT - 1);
    if mem32_share == 0 || mem64_share == 0 {
        return None;
    }
    Some(
        (0..count)
            .map(|id| SegmentLayout {
                id,
                ecam_base: PCI_MMCONFIG_START + u64::from(id) * ECAM_SIZE_PER_SEGMENT,
                mem32: Window {
                    start: MEM_32BIT_DEVICES_START + u64::from(id) * mem32_share,
                    size: mem32_share,
                },
                mem64: Window {
                    start: mem64_start + u64::from(id) * mem64_share,
                    size: mem64_share,
                },
            })
            .collect(),
    )
}

/// A window of guest-physical address space that BARs are carved from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: u64,
    pub size: u64,
}

impl Window {
    pub fn end(&self) -> u64 {
        self.start + self.size
    }
}

/// Hands out naturally aligned ranges of a window, each from the top of
/// the highest gap it fits in, as Cloud Hypervisor's address allocator does;
/// freed ranges (a hot-unplugged device's BARs) are handed out again.
pub struct WindowAllocator {
    window: Window,
    /// (start, size) of the ranges handed out, by start.
    taken: std::collections::BTreeMap<u64, u64>,
}

impl WindowAllocator {
    pub fn new(window: Window) -> Self {
        WindowAllocator {
            window,
            taken: std::collections::BTreeMap::new(),
        }
    }

    /// A range of `size` (a power of two) aligned to its size, if one fits.
    pub fn allocate(&mut self, size: u64) -> Option<u64> {
        if !size.is_power_of_two() {
            return None;
        }
        self.allocate_aligned(size, size)
    }

    /// A range of `size` bytes (not zero) aligned to `alignment` (a power
    /// of two), if one fits.
    pub fn allocate_aligned(&mut self, size: u64, alignment: u64) -> Option<u64> {
        if size == 0 || !alignment.is_power_of_two() {
            return None;
        }
        // Gaps from the top down: (gap start, gap end).
        let mut end = self.window.end();
        let mut found = None;
        for (&start, &len) in self.taken.iter().rev() {
            if let Some(at) = Self::fit(start + len, end, size, alignment) {
                found = Some(at);
                break;
            }
            end = start;
        }
        let start = found.or_else(|| Self::fit(self.window.start, end, size, alignment))?;
        self.taken.insert(start, size);
        Some(start)
    }

    /// The highest `alignment`-aligned start of `size` bytes in [low, high).
    fn fit(low: u64, high: u64, size: u64, alignment: u64) -> Option<u64> {
        let start = high.checked_sub(size)? & !(alignment - 1);
        (start >= low).then_some(start)
    }

    /// Takes exactly `[start, start + size)` (a restore puts a device's
    /// range back where it was); false if it leaves the window, is empty
    /// or overlaps a range handed out.
    pub fn allocate_at(&mut self, start: u64, size: u64) -> bool {
        let Some(end) = start.checked_add(size) else {
            return false;
        };
        if size == 0 || start < self.window.start || end > self.window.end() {
            return false;
        }
        // The range below `end` that starts last must end by `start`.
        let clear = self
            .taken
            .range(..end)
            .next_back()
            .is_none_or(|(&s, &len)| s + len <= start);
        if clear {
            self.taken.insert(start, size);
        }
        clear
    }

    /// Gives back the range that starts at `start`; false if none does.
    pub fn free(&mut self, start: u64) -> bool {
        self.taken.remove(&start).is_some()
    }
}

/// One PCI segment: its root bus and the address windows of its devices.
/// Slots and windows change while the guest runs (PCI hot-plug), so both
/// are behind locks; a slot's lock is never held while a device's is taken
/// for long (the device is cloned out first).
pub struct PciSegment {
    pub layout: SegmentLayout,
    slots: Mutex<Vec<Option<SharedPciDevice>>>,
    pub mem32_allocator: Mutex<WindowAllocator>,
    pub mem64_allocator: Mutex<WindowAllocator>,
}

impl PciSegment {
    /// A segment with its host bridge in slot 0.
    pub fn new(layout: SegmentLayout) -> Self {
        let mut slots = vec![None; DEVICES_PER_BUS];
        slots[0] = Some(Arc::new(Mutex::new(HostBridge::new())) as SharedPciDevice);
        PciSegment {
            layout,
            slots: Mutex::new(slots),
            mem32_allocator: Mutex::new(WindowAllocator::new(layout.mem32)),
            mem64_allocator: Mutex::new(WindowAllocator::new(layout.mem64)),
        }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Vec<Option<SharedPciDevice>>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The allocator of 32-bit (`wide` false) or 64-bit BAR space.
    pub fn allocator(&self, wide: bool) -> std::sync::MutexGuard<'_, WindowAllocator> {
        let allocator = if wide {
            &self.mem64_allocator
        } else {
            &self.mem32_allocator
        };
        allocator.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The first free slot, if any.
    pub fn free_slot(&self) -> Option<u8> {
        self.slots()
            .iter()
            .position(Option::is_none)
            .map(|s| s as u8)
    }

    /// Whether `slot` exists and holds no function.
    pub fn slot_is_free(&self, slot: u8) -> bool {
        self.slots()
            .get(usize::from(slot))
            .is_some_and(Option::is_none)
    }

    pub fn insert(&self, slot: u8, device: SharedPciDevice) {
        if let Some(entry) = self.slots().get_mut(usize::from(slot)) {
            *entry = Some(device);
        }
    }

    /// Takes the function out of `slot` (not the host bridge's slot 0).
    pub fn remove(&self, slot: u8) -> Option<SharedPciDevice> {
        if slot == 0 {
            return None;
        }
        self.slots().get_mut(usize::from(slot))?.take()
    }

    fn device(&self, slot: usize, function: usize) -> Option<SharedPciDevice> {
        if function != 0 {
            return None;
        }
        self.slots().get(slot)?.clone()
    }

    /// Reads `data` from function (slot, function)'s config space at byte `offset`.
    pub fn config_read(&self, slot: usize, function: usize, offset: usize, data: &mut [u8]) {
        let Some(device) = self.device(slot, function) else {
            data.fill(0xff);
            return;
        };
        if !matches!(data.len(), 1 | 2 | 4) || !offset.is_multiple_of(data.len()) {
            data.fill(0xff);
            return;
        }
        let value = lock(&device).config_read(offset / 4);
        let bytes = value.to_le_bytes();
        let lane = offset % 4;
        data.copy_from_slice(&bytes[lane..lane + data.len()]);
    }

    pub fn config_write(&self, slot: usize, function: usize, offset: usize, data: &[u8]) {
        let Some(device) = self.device(slot, function) else {
            return;
        };
        if !matches!(data.len(), 1 | 2 | 4) || !offset.is_multiple_of(data.len()) {
            return;
        }
        lock(&device).config_write(offset / 4, offset % 4, data);
    }

    /// The host bridge's configuration registers, for a snapshot.
    pub fn host_bridge_registers(&self) -> Vec<u32> {
        self.device(0, 0)
            .map(|bridge| lock(&bridge).config().registers().to_vec())
            .unwrap_or_default()
    }

    /// Writes saved host bridge registers back as a guest would (read-only
    /// bits stay); false for a count that is not the bridge's.
    pub fn restore_host_bridge(&self, saved: &[u32]) -> bool {
        let Some(bridge) = self.device(0, 0) else {
            return saved.is_empty();
        };
        let mut bridge = lock(&bridge);
        if saved.len() != bridge.config().registers().len() {
            return false;
        }
        for (reg, value) in saved.iter().enumerate() {
            bridge.config_write(reg, 0, &value.to_le_bytes());
        }
        true
    }

    fn bar_at(&self, address: u64) -> Option<(SharedPciDevice, usize, u64)> {
        // Slot lock, then each device's: no path takes them the other way.
        self.slots().iter().flatten().find_map(|device| {
            let (bar, offset) = lock(device).config().memory_bar_at(address)?;
            Some((device.clone(), bar, offset))
        })
    }
}

/// ECAM: the configuration space of every segment, memory-mapped.
pub struct PciEcam {
    pub segments: Vec<Arc<PciSegment>>,
}

impl PciEcam {
    fn locate(&self, offset: u64) -> Option<(&PciSegment, usize, usize, usize)> {
        let segment = self
            .segments
            .get(usize::try_from(offset / ECAM_SIZE_PER_SEGMENT).ok()?)?;
        let within = offset % ECAM_SIZE_PER_SEGMENT;
        let slot = ((within >> 15) & 0x1f) as usize;
        let function = ((within >> 12) & 0x7) as usize;
        Some((segment, slot, function, (within & 0xfff) as usize))
    }
}

impl BusDevice for PciEcam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.locate(offset) {
            Some((segment, slot, function, reg)) => segment.config_read(slot, function, reg, data),
            None => data.fill(0xff),
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((segment, slot, function, reg)) = self.locate(offset) {
            segment.config_write(slot, function, reg, data);
        }
    }
}

/// Configuration mechanism #1: address at 0xcf8, data at 0xcfc (segment 0).
pub struct PciConfigIo {
    pub segment: Arc<PciSegment>,
    address: u32,
}

impl PciConfigIo {
    pub const PORT: u64 = 0xcf8;
    pub const LEN: u64 = 8;

    pub fn new(segment: Arc<PciSegment>) -> Self {
        PciConfigIo {
            segment,
            address: 0,
        }
    }

    /// The address register (0xcf8), which a snapshot keeps.
    pub fn address(&self) -> u32 {
        self.address
    }

    pub fn set_address(&mut self, address: u32) {
        self.address = address;
    }

    /// (slot, function, register byte offset) when enabled and on bus 0.
    fn target(&self) -> Option<(usize, usize, usize)> {
        let enabled = self.address & 0x8000_0000 != 0;
        let bus = (self.address >> 16) & 0xff;
        (enabled && bus == 0).then_some((
            ((self.address >> 11) & 0x1f) as usize,
            ((self.address >> 8) & 0x7) as usize,
            (self.address & 0xfc) as usize,
        ))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 => match self.target() {
                Some((slot, function, reg)) => {
                    let at = reg + (offset as usize - 4);
                    self.segment.config_read(slot, function, at, data)
                }
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 if data.len() == 4 => {
                self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            }
            4..=7 => {
                if let Some((slot, function, reg)) = self.target() {
                    let at = reg + (offset as usize - 4);
                    self.segment.config_write(slot, function, at, data);
                }
            }
            _ => {}
        }
    }
}

/// A segment's MMIO window: accesses go to whichever BAR holds the address now.
pub struct PciBarWindow {
    pub segment: Arc<PciSegment>,
    pub base: u64,
}

impl SharedBusDevice for PciBarWindow {
    fn read(&self, offset: u64, data: &mut [u8]) {
        match self.segment.bar_at(self.base + offset) {
            Some((device, bar, at)) => lock(&device).bar_read(bar, at, data),
            None => data.fill(0xff),
        }
    }
    fn write(&self, offset: u64, data: &[u8]) {
        if let Some((device, bar, at)) = self.segment.bar_at(self.base + offset) {
            // A notified queue is served once the function's lock is released.
            let target = {
                let mut function = lock(&device);
                let target = function.notify_target(bar, at);
                if target.is_none() {
                    function.bar_write(bar, at, data);
                }
                target
            };
            if let Some(target) = target {
                target.notify();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment() -> PciSegment {
        PciSegment::new(plan_segments(1, 1 << 30, 40).unwrap()[0])
    }

    #[test]
    fn segments_share_the_windows_as_cloud_hypervisor() {
        // Figures from Cloud Hypervisor v37 (max_phys_bits 46).
        let one = plan_segments(1, 512 << 20, 46).unwrap();
        assert_eq!(one[0].ecam_base, 0xe800_0000);
        assert_eq!(
            one[0].mem32,
            Window {
                start: 0xc000_0000,
                size: 640 << 20
            }
        );
        assert_eq!(
            one[0].mem64.start,
            1 << 32,
            "above the hole when RAM is below it"
        );
        assert_eq!(one[0].mem64.end(), 0x3fff_0000_0000);
        let two = plan_segments(2, 0x1_8000_0000, 46).unwrap();
        assert_eq!(two[0].mem32.end(), 0xd400_0000);
        assert_eq!(
            two[1].mem32,
            Window {
                start: 0xd400_0000,
                size: 320 << 20
            }
        );
        assert_eq!(two[0].mem64.start, 0x1_8000_0000, "from the end of RAM");
        assert_eq!(two[0].mem64.end(), 0x2000_8000_0000);
        assert_eq!(two[1].mem64.start, two[0].mem64.end());
        assert_eq!(two[1].mem64.end(), 0x3fff_8000_0000);
        let three = plan_segments(3, 6 << 30, 40).unwrap();
        assert_eq!(three[2].ecam_base, 0xe820_0000);
        assert!(three[2].mem32.end() <= 0xe800_0000);
        // Refused where the address width ends, or with no segment at all.
        assert!(plan_segments(1, 1 << 36, 36).is_none());
        assert!(plan_segments(0, 1 << 30, 40).is_none());
        assert!(plan_segments(257, 1 << 30, 40).is_none());
    }

    #[test]
    fn host_bridge_answers_through_both_mechanisms() {
        let segment = Arc::new(segment());
        let mut ecam = PciEcam {
            segments: vec![segment.clone()],
        };
        let mut data = [0u8; 4];
        ecam.read(0, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0x0d57_8086);
        ecam.read(1 << 15, &mut data);
        assert_eq!(data, [0xff; 4], "empty slot");
        ecam.read(ECAM_SIZE_PER_SEGMENT, &mut data);
        assert_eq!(data, [0xff; 4], "no second segment");

        let mut io = PciConfigIo::new(segment);
        io.write(0, &0x8000_0008u32.to_le_bytes());
        io.read(4, &mut data);
        assert_eq!(data[3], 0x06, "bridge class");
        let mut half = [0u8; 2];
        io.write(0, &0x8000_0000u32.to_le_bytes());
        io.read(6, &mut half);
        assert_eq!(u16::from_le_bytes(half), 0x0d57);
        io.write(0, &0x0000_0000u32.to_le_bytes());
        io.read(4, &mut data);
        assert_eq!(data, [0xff; 4], "disabled address");
        io.write(0, &0x8001_0000u32.to_le_bytes());
        io.read(4, &mut data);
        assert_eq!(data, [0xff; 4], "bus 1 does not exist");
    }

    #[test]
    fn misaligned_config_accesses_are_ignored() {
        let segment = segment();
        let mut data = [0u8; 4];
        segment.config_read(0, 0, 2, &mut data);
        assert_eq!(data, [0xff; 4]);
    }

    #[test]
    fn allocator_hands_out_from_the_top_aligned_and_inside() {
        let mut a = WindowAllocator::new(Window {
            start: 0x1000,
            size: 0x10000,
        });
        assert_eq!(a.allocate(0x100), Some(0x10f00));
        assert_eq!(a.allocate(0x8000), Some(0x8000));
        assert_eq!(a.allocate(0x8000), None);
        assert_eq!(a.allocate(0x1000), Some(0x7000));
        assert_eq!(a.allocate(0x3000), None, "not a power of two");
        assert_eq!(a.allocate(0x4000), None, "would go below the window");
        assert_eq!(a.allocate(0x2000), Some(0x4000));
        // Cloud Hypervisor's pvpanic BAR: 2 bytes, 16-byte aligned, in the
        // highest gap it fits (under the first range).
        assert_eq!(a.allocate_aligned(2, 0x10), Some(0x10ef0));
        assert_eq!(
            a.allocate_aligned(2, 3),
            None,
            "alignment not a power of two"
        );
        // A pmem region: any size, 2 MiB aligned below what is taken.
        let mut b = WindowAllocator::new(Window {
            start: 0,
            size: 64 << 20,
        });
        assert_eq!(b.allocate_aligned(6 << 20, 2 << 20), Some(58 << 20));
        assert_eq!(b.allocate(0x8_0000), Some((58 << 20) - 0x8_0000));
        assert_eq!(b.allocate_aligned(0, 16), None);
        // A freed range is handed out again; freeing twice is refused.
        assert!(b.free(58 << 20));
        assert!(!b.free(58 << 20));
        assert_eq!(b.allocate_aligned(6 << 20, 2 << 20), Some(58 << 20));
    }

    #[test]
    fn a_range_is_taken_back_exactly_where_it_was_or_refused() {
        let mut a = WindowAllocator::new(Window {
            start: 0x1000,
            size: 0x10000,
        });
        assert!(a.allocate_at(0x8000, 0x1000));
        assert!(!a.allocate_at(0x8000, 0x1000), "taken already");
        assert!(!a.allocate_at(0x7800, 0x1000), "overlaps from below");
        assert!(!a.allocate_at(0x8800, 0x100), "inside another");
        assert!(!a.allocate_at(0x7000, 0x4000), "covers another");
        assert!(a.allocate_at(0x7000, 0x1000), "ends where the next starts");
        assert!(a.allocate_at(0x9000, 0x800), "starts where the last ends");
        assert!(!a.allocate_at(0x800, 0x1000), "below the window");
        assert!(!a.allocate_at(0x10800, 0x1000), "past the window");
        assert!(!a.allocate_at(u64::MAX - 0x10, 0x100), "wraps");
        assert!(!a.allocate_at(0x2000, 0), "empty");
        // The allocator hands out around what was put back.
        assert_eq!(a.allocate(0x8000), None);
        assert_eq!(a.allocate(0x4000), Some(0xc000));
    }

    #[test]
    fn random_config_traffic_is_harmless() {
        let segment = Arc::new(segment());
        let mut ecam = PciEcam {
            segments: vec![segment.clone()],
        };
        let mut io = PciConfigIo::new(segment);
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..50_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = [1usize, 2, 3, 4, 8][(state % 5) as usize];
            let mut data = [0u8; 8];
            let value = (state >> 8).to_le_bytes();
            if state & (1 << 20) != 0 {
                let offset = (state >> 24) % (2 * ECAM_SIZE_PER_SEGMENT);
                ecam.write(offset, &value[..len]);
                ecam.read(offset, &mut data[..len]);
            } else {
                let offset = (state >> 24) % PciConfigIo::LEN;
                io.write(offset, &value[..len]);
                io.read(offset, &mut data[..len]);
            }
        }
        // The bridge's identity survived.
        let mut id = [0u8; 4];
        ecam.read(0, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x0d57_8086);
    }

    /// A function whose BAR's first byte notifies a queue: the queue is
    /// served with the function's lock released (another vCPU thread may use
    /// the function meanwhile), and other writes reach `bar_write`.
    #[test]
    fn a_notified_queue_is_served_outside_the_functions_lock() {
        struct Queue {
            function: std::sync::OnceLock<std::sync::Weak<Mutex<Function>>>,
            served_unlocked: std::sync::atomic::AtomicUsize,
        }
        impl NotifyTarget for Queue {
            fn notify(&self) {
                let function = self.function.get().and_then(|f| f.upgrade()).unwrap();
                if function.try_lock().is_ok() {
                    self.served_unlocked
                        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
        }
        struct Function {
            config: PciConfiguration,
            queue: Arc<Queue>,
            writes: Vec<u64>,
        }
        impl PciDevice for Function {
            fn config(&self) -> &PciConfiguration {
                &self.config
            }
            fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) {
                self.config.write_register(reg, offset, data);
            }
            fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
                data.fill(0);
            }
            fn bar_write(&mut self, _bar: usize, offset: u64, _data: &[u8]) {
                self.writes.push(offset);
            }
            fn notify_target(&self, bar: usize, offset: u64) -> Option<Arc<dyn NotifyTarget>> {
                (bar == 0 && offset == 0).then(|| Arc::clone(&self.queue) as Arc<dyn NotifyTarget>)
            }
        }
        let segment = Arc::new(segment());
        let window = segment.layout.mem32;
        let mut config = PciConfiguration::new(PciIdentity {
            vendor: 0x1af4,
            device: 0x1042,
            class: (0x01, 0x80, 0x00),
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        });
        config.add_bar(
            0,
            window.start,
            config::Bar {
                size: 0x1000,
                kind: config::BarKind::Memory32,
                prefetchable: false,
            },
        );
        config.write_register(1, 0, &[0x2]); // memory space on
        let queue = Arc::new(Queue {
            function: std::sync::OnceLock::new(),
            served_unlocked: std::sync::atomic::AtomicUsize::new(0),
        });
        let function = Arc::new(Mutex::new(Function {
            config,
            queue: Arc::clone(&queue),
            writes: Vec::new(),
        }));
        let _ = queue.function.set(Arc::downgrade(&function));
        segment.insert(1, function.clone());
        let bar_window = PciBarWindow {
            segment,
            base: window.start,
        };
        bar_window.write(0, &[0]);
        bar_window.write(8, &[1, 0]);
        assert_eq!(
            queue
                .served_unlocked
                .load(std::sync::atomic::Ordering::SeqCst),
            1
        );
        assert_eq!(function.lock().unwrap().writes, vec![8]);
    }
}
