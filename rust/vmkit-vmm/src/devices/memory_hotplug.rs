//! Cloud Hypervisor's ACPI memory hot-plug controller (v37
//! `vmm/src/memory_manager.rs`, `impl BusDevice for MemoryManager`): 0x18
//! bytes of MMIO that the DSDT's `\_SB_.MHPC` region (`MHPR`) maps. The
//! guest writes a slot number to the selection register (offset 0, `MSEL`),
//! then reads that slot's base (offsets 0 and 4, `MHBL`/`MHBH`), length
//! (8 and 0xc, `MHLL`/`MHLH`) and status byte (0x14): bit 0 enabled
//! (`MEN_`), bit 1 being inserted (`MINS`), bit 2 being removed (`MRMV`).
//! Writing bit 1 or 2 back acknowledges the insertion or removal; bit 3
//! (`MEJ0`) asks for an eject, which v37 does not support (ignored).
//!
//! Every access here comes from the guest: a selection past the slots reads
//! zeros and its writes are ignored; accesses of any size at any offset get
//! a defined answer (the bytes of the register they start in, zeros past it).
//!
//! The controller also keeps v37's rules for `vm.resize {"desired_ram"}`
//! (`MemoryManager::resize`, `hotplug_ram_region`): RAM only grows, by a
//! multiple of 128 MiB, into the next of 8 slots, inside the hot-plug area.

use std::sync::{Arc, Mutex};

use super::BusDevice;
use crate::snapshot::codec::{Reader, Writer};
use crate::snapshot::SnapshotError;

/// The register block's length (Cloud Hypervisor's `MEMORY_MANAGER_ACPI_SIZE`).
pub const MEMORY_HOTPLUG_SIZE: u64 = 0x18;
/// ACPI memory devices (`M000`..`M007`): Cloud Hypervisor's `HOTPLUG_COUNT`.
pub const HOTPLUG_SLOTS: usize = 8;
/// A hot-added DIMM's size is a multiple of this, and the hot-plug area
/// starts on such a boundary.
pub const HOTPLUG_ALIGNMENT: u64 = 128 << 20;

pub const SELECTION_OFFSET: u64 = 0;
pub const BASE_LOW_OFFSET: u64 = 0;
pub const BASE_HIGH_OFFSET: u64 = 4;
pub const LENGTH_LOW_OFFSET: u64 = 8;
pub const LENGTH_HIGH_OFFSET: u64 = 0xc;
pub const STATUS_OFFSET: u64 = 0x14;

/// Status bits (Cloud Hypervisor's `*_FLAG`s).
pub const STATUS_ENABLED: u8 = 1 << 0;
pub const STATUS_INSERTING: u8 = 1 << 1;
pub const STATUS_REMOVING: u8 = 1 << 2;
pub const STATUS_EJECT: u8 = 1 << 3;

/// One ACPI memory device as the guest sees it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub base: u64,
    pub length: u64,
    pub active: bool,
    pub inserting: bool,
    pub removing: bool,
}

/// Why a resize was refused, in Cloud Hypervisor v37's words (its
/// `memory_manager::Error` variant names, which its API answers with).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ResizeError {
    #[error("NoSlotAvailable")]
    NoSlotAvailable,
    #[error("InvalidSize")]
    InvalidSize,
    #[error("InsufficientHotplugRam")]
    InsufficientHotplugRam,
    /// The VM's RAM is `--memory-zone`s (`--memory size=0`).
    #[error("InvalidResizeWithMemoryZones")]
    InvalidResizeWithMemoryZones,
}

/// RAM to add: `length` bytes at guest address `base`, shown in `slot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dimm {
    pub slot: usize,
    pub base: u64,
    pub length: u64,
}

/// Where hot-added RAM may go, as Cloud Hypervisor lays it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HotplugLayout {
    /// Where the next DIMM would start after boot RAM.
    pub area_start: u64,
    /// The end of the area (exclusive): where the device area starts.
    pub device_area_start: u64,
}

/// v37's `MemoryManager::start_addr`: the address after RAM that ends at
/// `last` (inclusive); with `aligned`, rounded up to 128 MiB. RAM ending
/// below the 32-bit hole continues at 4 GiB.
pub fn start_after(last: u64, aligned: bool) -> Option<u64> {
    use crate::layout::{MEM_32BIT_RESERVED_START, RAM_64BIT_START};
    if last < MEM_32BIT_RESERVED_START {
        return Some(RAM_64BIT_START);
    }
    let end = if aligned {
        last | (HOTPLUG_ALIGNMENT - 1)
    } else {
        last
    };
    end.checked_add(1)
}

impl HotplugLayout {
    /// The layout after boot RAM whose last byte is at `last_ram_byte`, with
    /// `hotplug_size` bytes reserved for hot-plug (None: none): the area
    /// starts after RAM, 128 MiB aligned, and the device area follows it.
    pub fn new(last_ram_byte: u64, hotplug_size: Option<u64>) -> Option<Self> {
        let area_start = start_after(last_ram_byte, hotplug_size.is_some())?;
        let device_area_start = area_start.checked_add(hotplug_size.unwrap_or(0))?;
        Some(HotplugLayout {
            area_start,
            device_area_start,
        })
    }
}

struct State {
    selected: usize,
    slots: [Slot; HOTPLUG_SLOTS],
    next_slot: usize,
    /// RAM the guest has (boot RAM and hot-added DIMMs): what a resize grows from.
    current_ram: u64,
    /// The last byte of guest RAM: the next DIMM goes after it.
    last_ram_byte: u64,
}

/// The controller's state, shared by its register block and the VMM.
pub struct MemoryHotplug {
    state: Mutex<State>,
    layout: HotplugLayout,
    /// RAM from `--memory-zone`s: v37 refuses every resize.
    zones: bool,
}

impl MemoryHotplug {
    /// Boot RAM of `boot_ram` bytes whose last byte is at `last_ram_byte`.
    pub fn new(boot_ram: u64, last_ram_byte: u64, layout: HotplugLayout, zones: bool) -> Self {
        MemoryHotplug {
            state: Mutex::new(State {
                selected: 0,
                slots: [Slot::default(); HOTPLUG_SLOTS],
                next_slot: 0,
                current_ram: boot_ram,
                last_ram_byte,
            }),
            layout,
            zones,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn layout(&self) -> HotplugLayout {
        self.layout
    }

    pub fn slots(&self) -> [Slot; HOTPLUG_SLOTS] {
        self.state().slots
    }

    /// RAM the guest has now: boot RAM and every hot-added DIMM.
    pub fn current_ram(&self) -> u64 {
        self.state().current_ram
    }

    /// Cloud Hypervisor's `MemoryManager::resize` for ACPI hot-plug: a size
    /// at or below the current RAM changes nothing (ACPI RAM is never taken
    /// back); a larger one is one new DIMM of the difference, in the next
    /// slot, after the last RAM, 128 MiB aligned, inside the hot-plug area.
    /// None: nothing to add. The DIMM is not in the guest's view until
    /// `insert` (after the VMM mapped it).
    pub fn plan(&self, desired_ram: u64) -> Result<Option<Dimm>, ResizeError> {
        if self.zones {
            return Err(ResizeError::InvalidResizeWithMemoryZones);
        }
        let state = self.state();
        if desired_ram <= state.current_ram {
            return Ok(None);
        }
        let length = desired_ram - state.current_ram;
        if state.next_slot >= HOTPLUG_SLOTS {
            return Err(ResizeError::NoSlotAvailable);
        }
        if !length.is_multiple_of(HOTPLUG_ALIGNMENT) {
            return Err(ResizeError::InvalidSize);
        }
        let base =
            start_after(state.last_ram_byte, true).ok_or(ResizeError::InsufficientHotplugRam)?;
        // v37 compares the DIMM's end with the area's last byte using >=: a
        // DIMM never reaches the very end of the area.
        let end_of_ram_area = self.layout.device_area_start.saturating_sub(1);
        match base.checked_add(length) {
            Some(end) if end < end_of_ram_area => Ok(Some(Dimm {
                slot: state.next_slot,
                base,
                length,
            })),
            _ => Err(ResizeError::InsufficientHotplugRam),
        }
    }

    /// Shows `dimm` (from `plan`, now mapped) to the guest: its slot
    /// enabled and being inserted.
    pub fn insert(&self, dimm: Dimm) {
        let mut state = self.state();
        let Some(slot) = state.slots.get_mut(dimm.slot) else {
            return;
        };
        *slot = Slot {
            base: dimm.base,
            length: dimm.length,
            active: true,
            inserting: true,
            removing: false,
        };
        state.next_slot = dimm.slot + 1;
        state.current_ram += dimm.length;
        state.last_ram_byte = dimm.base + dimm.length - 1;
    }

    /// The DIMMs plugged so far, in slot order.
    pub fn dimms(&self) -> Vec<Dimm> {
        self.state()
            .slots
            .iter()
            .enumerate()
            .filter(|(_, slot)| slot.active)
            .map(|(slot, s)| Dimm {
                slot,
                base: s.base,
                length: s.length,
            })
            .collect()
    }

    /// The controller's registers for a snapshot or migration, with `size`
    /// (the `--memory size` `vm.resize` set, if it did).
    pub fn save(&self, size: Option<u64>) -> SavedHotplug {
        let state = self.state();
        SavedHotplug {
            size,
            selected: u32::try_from(state.selected).unwrap_or(u32::MAX),
            slots: state.slots,
        }
    }

    /// Takes the saved registers back into a controller built for the same
    /// boot RAM: `dimms` are `saved.dimms(self.layout())`, already checked
    /// and mapped for the guest.
    pub fn restore(&self, saved: &SavedHotplug, dimms: &[Dimm]) {
        let mut state = self.state();
        state.selected = saved.selected as usize;
        state.slots = saved.slots;
        state.next_slot = dimms.last().map_or(0, |d| d.slot + 1);
        state.current_ram += dimms.iter().map(|d| d.length).sum::<u64>();
        if let Some(last) = dimms.last() {
            state.last_ram_byte = last.base + last.length - 1;
        }
    }

    fn register(&self, offset: u64) -> Option<(u64, u64)> {
        // (register start, its value): the value's low bytes from its start.
        let state = self.state();
        let slot = state.slots.get(state.selected)?;
        let status = [
            (slot.active, STATUS_ENABLED),
            (slot.inserting, STATUS_INSERTING),
            (slot.removing, STATUS_REMOVING),
        ]
        .iter()
        .filter(|(set, _)| *set)
        .fold(0u8, |acc, (_, bit)| acc | bit);
        let registers = [
            (BASE_LOW_OFFSET, slot.base),
            (LENGTH_LOW_OFFSET, slot.length),
            (STATUS_OFFSET, u64::from(status)),
        ];
        registers.into_iter().find_map(|(start, value)| {
            let width = if start == STATUS_OFFSET { 4 } else { 8 };
            (start..start + width)
                .contains(&offset)
                .then_some((start, value))
        })
    }

    fn read_register(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some((start, value)) = self.register(offset) else {
            return;
        };
        let bytes = value.to_le_bytes();
        let from = (offset - start) as usize;
        for (out, byte) in data.iter_mut().zip(bytes.iter().skip(from)) {
            *out = *byte;
        }
    }

    fn write_register(&self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else {
            return;
        };
        let mut state = self.state();
        match offset {
            // v37 keeps the low byte (`usize::from(data[0])`).
            SELECTION_OFFSET => state.selected = usize::from(value),
            STATUS_OFFSET => {
                let selected = state.selected;
                if let Some(slot) = state.slots.get_mut(selected) {
                    if value & STATUS_INSERTING != 0 {
                        slot.inserting = false;
                    }
                    if value & STATUS_REMOVING != 0 {
                        slot.removing = false;
                    }
                    // STATUS_EJECT: v37 does not eject memory ("Ejection of
                    // memory not currently supported"); nothing changes.
                }
            }
            _ => {}
        }
    }
}

/// The controller's state as a snapshot's `platform` file holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedHotplug {
    /// `--memory size` as `vm.resize` set it (None: never resized): what
    /// `info` shows and the next boot starts with.
    pub size: Option<u64>,
    /// The guest's selection register.
    pub selected: u32,
    pub slots: [Slot; HOTPLUG_SLOTS],
}

const SLOT_ACTIVE: u32 = 1 << 0;
const SLOT_INSERTING: u32 = 1 << 1;
const SLOT_REMOVING: u32 = 1 << 2;
const WHAT: &str = "the memory hot-plug state";

impl SavedHotplug {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u64(self.size.unwrap_or(0));
        w.u32(self.selected);
        w.u32(HOTPLUG_SLOTS as u32);
        for slot in &self.slots {
            w.u64(slot.base);
            w.u64(slot.length);
            let flags = [
                (slot.active, SLOT_ACTIVE),
                (slot.inserting, SLOT_INSERTING),
                (slot.removing, SLOT_REMOVING),
            ];
            w.u32(flags.iter().filter(|f| f.0).fold(0, |acc, f| acc | f.1));
        }
        w.bytes
    }

    /// Reads what `encode` wrote. A slot that is not active must be all
    /// zeros, as the controller leaves it.
    pub fn decode(bytes: &[u8]) -> Result<Self, SnapshotError> {
        let mut r = Reader::new(WHAT, bytes);
        let size = Some(r.u64()?).filter(|&size| size != 0);
        let selected = r.u32()?;
        r.count(HOTPLUG_SLOTS, "slots", "the controller")?;
        let mut slots = [Slot::default(); HOTPLUG_SLOTS];
        for (index, slot) in slots.iter_mut().enumerate() {
            let (base, length, flags) = (r.u64()?, r.u64()?, r.u32()?);
            if flags & !(SLOT_ACTIVE | SLOT_INSERTING | SLOT_REMOVING) != 0 {
                return Err(r.corrupt(format!("slot {index}: status bits {flags:#x}")));
            }
            *slot = Slot {
                base,
                length,
                active: flags & SLOT_ACTIVE != 0,
                inserting: flags & SLOT_INSERTING != 0,
                removing: flags & SLOT_REMOVING != 0,
            };
            if !slot.active && *slot != Slot::default() {
                return Err(r.corrupt(format!("slot {index} is not plugged but not empty")));
            }
        }
        r.finish()?;
        Ok(SavedHotplug {
            size,
            selected,
            slots,
        })
    }

    /// The plugged DIMMs, checked against the restoring VM's hot-plug area
    /// (`layout`): each a whole number of 128 MiB inside the area, after the
    /// previous slot's, the plugged slots first (as `vm.resize` fills them).
    /// The resized size is at most the RAM the guest has (`boot_ram` and the
    /// DIMMs): `vm.resize` grows RAM only by adding a DIMM.
    pub fn dimms(&self, layout: HotplugLayout, boot_ram: u64) -> Result<Vec<Dimm>, SnapshotError> {
        let corrupt = |detail: String| SnapshotError::Corrupt {
            what: WHAT.to_owned(),
            detail,
        };
        let mut dimms: Vec<Dimm> = Vec::new();
        for (index, slot) in self.slots.iter().enumerate() {
            if !slot.active {
                continue;
            }
            if dimms.len() != index {
                return Err(corrupt(format!(
                    "slot {index} is plugged after an empty slot"
                )));
            }
            let end = slot.base.checked_add(slot.length);
            if slot.length == 0
                || !slot.length.is_multiple_of(HOTPLUG_ALIGNMENT)
                || !slot.base.is_multiple_of(HOTPLUG_ALIGNMENT)
            {
                return Err(corrupt(format!(
                    "slot {index}: a DIMM of {:#x} bytes at {:#x} (128 MiB multiples expected)",
                    slot.length, slot.base
                )));
            }
            if slot.base < layout.area_start || end.is_none_or(|end| end > layout.device_area_start)
            {
                return Err(corrupt(format!(
                    "slot {index}: the DIMM at {:#x} ({:#x} bytes) lies outside the hot-plug \
                     area [{:#x}, {:#x})",
                    slot.base, slot.length, layout.area_start, layout.device_area_start
                )));
            }
            if let Some(previous) = dimms.last() {
                if slot.base < previous.base + previous.length {
                    return Err(corrupt(format!(
                        "slot {index}: the DIMM at {:#x} overlaps slot {}'s at {:#x}",
                        slot.base, previous.slot, previous.base
                    )));
                }
            }
            dimms.push(Dimm {
                slot: index,
                base: slot.base,
                length: slot.length,
            });
        }
        let ram = dimms
            .iter()
            .fold(boot_ram, |sum, d| sum.saturating_add(d.length));
        if let Some(size) = self.size.filter(|&size| size > ram) {
            return Err(corrupt(format!(
                "a resized size of {size} bytes, more than the {ram} bytes of RAM the VM has"
            )));
        }
        Ok(dimms)
    }
}

/// The guest's side of the controller, on the MMIO bus.
pub struct MemoryHotplugRegisters(pub Arc<MemoryHotplug>);

impl BusDevice for MemoryHotplugRegisters {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.0.read_register(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.0.write_register(offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    /// 512 MiB of boot RAM with `hotplug` bytes of hot-plug area.
    fn controller(hotplug: Option<u64>) -> Arc<MemoryHotplug> {
        let layout = HotplugLayout::new(512 * MIB - 1, hotplug).unwrap();
        Arc::new(MemoryHotplug::new(512 * MIB, 512 * MIB - 1, layout, false))
    }

    fn read32(regs: &mut MemoryHotplugRegisters, offset: u64) -> u32 {
        let mut data = [0xaa; 4];
        regs.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn select(regs: &mut MemoryHotplugRegisters, slot: u32) {
        regs.write(SELECTION_OFFSET, &slot.to_le_bytes());
    }

    #[test]
    fn the_layout_is_cloud_hypervisor_s() {
        // RAM below the hole: the area starts at 4 GiB.
        let low = HotplugLayout::new(512 * MIB - 1, Some(GIB)).unwrap();
        assert_eq!(low.area_start, 4 * GIB);
        assert_eq!(low.device_area_start, 5 * GIB);
        // Without hot-plug the device area starts where RAM ends (4 GiB at least).
        let none = HotplugLayout::new(512 * MIB - 1, None).unwrap();
        assert_eq!(none.device_area_start, 4 * GIB);
        // RAM above the hole: the next 128 MiB boundary.
        let high = HotplugLayout::new(4 * GIB + 100 * MIB - 1, Some(GIB)).unwrap();
        assert_eq!(high.area_start, 4 * GIB + 128 * MIB);
        assert_eq!(high.device_area_start, 5 * GIB + 128 * MIB);
        let unaligned = HotplugLayout::new(4 * GIB + 100 * MIB - 1, None).unwrap();
        assert_eq!(unaligned.device_area_start, 4 * GIB + 100 * MIB);
        assert_eq!(HotplugLayout::new(u64::MAX, None), None);
    }

    #[test]
    fn resizes_follow_v37_rules() {
        let controller = controller(Some(GIB));
        // The real v37 binary: 512M + hotplug_size=1G.
        assert_eq!(controller.plan(512 * MIB), Ok(None));
        assert_eq!(
            controller.plan(256 * MIB),
            Ok(None),
            "ACPI RAM never shrinks"
        );
        assert_eq!(controller.plan(600 * MIB), Err(ResizeError::InvalidSize));
        // 1536M would fill the area to its last byte: v37 refuses it.
        assert_eq!(
            controller.plan(1536 * MIB),
            Err(ResizeError::InsufficientHotplugRam)
        );
        let dimm = controller.plan(768 * MIB).unwrap().unwrap();
        assert_eq!(
            dimm,
            Dimm {
                slot: 0,
                base: 4 * GIB,
                length: 256 * MIB
            }
        );
        assert_eq!(controller.current_ram(), 512 * MIB, "planned, not inserted");
        controller.insert(dimm);
        assert_eq!(controller.current_ram(), 768 * MIB);
        let next = controller.plan(1408 * MIB).unwrap().unwrap();
        assert_eq!(next.slot, 1);
        assert_eq!(next.base, 4 * GIB + 256 * MIB);
        controller.insert(next);
        assert_eq!(
            controller.plan(1664 * MIB),
            Err(ResizeError::InsufficientHotplugRam)
        );
        assert_eq!(
            ResizeError::InsufficientHotplugRam.to_string(),
            "InsufficientHotplugRam"
        );
    }

    #[test]
    fn eight_slots_then_no_slot_available() {
        let controller = controller(Some(2 * GIB));
        for i in 1..=8u64 {
            let dimm = controller.plan((512 + 128 * i) * MIB).unwrap().unwrap();
            assert_eq!(dimm.slot as u64, i - 1);
            controller.insert(dimm);
        }
        assert_eq!(
            controller.plan(1664 * MIB),
            Err(ResizeError::NoSlotAvailable)
        );
    }

    #[test]
    fn without_a_hotplug_area_or_with_zones_nothing_grows() {
        let controller = controller(None);
        assert_eq!(
            controller.plan(GIB),
            Err(ResizeError::InsufficientHotplugRam)
        );
        assert_eq!(controller.plan(600 * MIB), Err(ResizeError::InvalidSize));
        assert_eq!(controller.plan(0), Ok(None));
        let layout = HotplugLayout::new(512 * MIB - 1, None).unwrap();
        let zones = MemoryHotplug::new(512 * MIB, 512 * MIB - 1, layout, true);
        assert_eq!(
            zones.plan(512 * MIB),
            Err(ResizeError::InvalidResizeWithMemoryZones)
        );
    }

    #[test]
    fn the_guest_reads_a_dimm_and_acknowledges_it() {
        let controller = controller(Some(GIB));
        let mut regs = MemoryHotplugRegisters(controller.clone());
        select(&mut regs, 0);
        assert_eq!(read32(&mut regs, STATUS_OFFSET), 0);
        controller.insert(controller.plan(768 * MIB).unwrap().unwrap());
        select(&mut regs, 0);
        assert_eq!(read32(&mut regs, BASE_LOW_OFFSET), 0);
        assert_eq!(read32(&mut regs, BASE_HIGH_OFFSET), 1);
        assert_eq!(read32(&mut regs, LENGTH_LOW_OFFSET), 256 << 20);
        assert_eq!(read32(&mut regs, LENGTH_HIGH_OFFSET), 0);
        assert_eq!(
            read32(&mut regs, STATUS_OFFSET),
            u32::from(STATUS_ENABLED | STATUS_INSERTING)
        );
        // MSCN writes MINS back; the eject bit changes nothing (v37).
        regs.write(STATUS_OFFSET, &[STATUS_INSERTING | STATUS_EJECT]);
        assert_eq!(read32(&mut regs, STATUS_OFFSET), u32::from(STATUS_ENABLED));
        assert!(controller.slots()[0].active);
        select(&mut regs, 1);
        assert_eq!(read32(&mut regs, STATUS_OFFSET), 0);
        assert_eq!(read32(&mut regs, BASE_HIGH_OFFSET), 0);
    }

    #[test]
    fn the_state_round_trips_and_hostile_states_are_refused() {
        let controller = controller(Some(GIB));
        controller.insert(controller.plan(768 * MIB).unwrap().unwrap());
        controller.insert(controller.plan(1024 * MIB).unwrap().unwrap());
        let mut regs = MemoryHotplugRegisters(controller.clone());
        select(&mut regs, 1);
        let saved = controller.save(Some(GIB));
        let bytes = saved.encode();
        let decoded = SavedHotplug::decode(&bytes).unwrap();
        assert_eq!(decoded, saved);
        // A fresh controller for the same boot RAM takes it back and grows on.
        let restored = self::controller(Some(GIB));
        let dimms = decoded.dimms(restored.layout(), 512 * MIB).unwrap();
        assert_eq!(dimms, controller.dimms());
        restored.restore(&decoded, &dimms);
        assert_eq!(restored.current_ram(), GIB);
        assert_eq!(restored.slots(), controller.slots());
        let mut regs = MemoryHotplugRegisters(restored.clone());
        assert_eq!(
            read32(&mut regs, BASE_LOW_OFFSET),
            256 << 20,
            "slot 1 selected"
        );
        let next = restored.plan(1280 * MIB).unwrap().unwrap();
        assert_eq!((next.slot, next.base), (2, 4 * GIB + 512 * MIB));

        let layout = restored.layout();
        let with = |edit: &dyn Fn(&mut SavedHotplug)| {
            let mut bad = saved.clone();
            edit(&mut bad);
            bad.dimms(layout, 512 * MIB).unwrap_err().to_string()
        };
        let outside = with(&|s| s.slots[1].base = 5 * GIB);
        assert!(outside.contains("outside the hot-plug area"), "{outside}");
        let below = with(&|s| s.slots[0].base = 512 * MIB);
        assert!(below.contains("outside the hot-plug area"), "{below}");
        let overlap = with(&|s| s.slots[1].base = 4 * GIB + 128 * MIB);
        assert!(overlap.contains("overlaps slot 0"), "{overlap}");
        let odd = with(&|s| s.slots[0].length = 100 * MIB);
        assert!(odd.contains("128 MiB multiples"), "{odd}");
        let gap = with(&|s| s.slots[0] = Slot::default());
        assert!(gap.contains("after an empty slot"), "{gap}");
        let wraps = with(&|s| s.slots[1].length = u64::MAX - (u64::MAX % (128 * MIB)));
        assert!(wraps.contains("outside"), "{wraps}");
        let larger = with(&|s| s.size = Some(GIB + 128 * MIB));
        assert!(
            larger.contains("more than the 1073741824 bytes"),
            "{larger}"
        );
        // A VM without a hot-plug area takes no DIMM at all.
        let none = self::controller(None).layout();
        assert!(saved.dimms(none, 512 * MIB).is_err());

        // Bytes that are not a state.
        let mut flags = bytes.clone();
        flags[16 + 16] = 0x80;
        let mut stale = saved.clone();
        stale.slots[5].base = 1;
        for bad in [
            &bytes[..bytes.len() - 1],
            &flags[..],
            &stale.encode()[..],
            &[],
        ] {
            let e = SavedHotplug::decode(bad).unwrap_err();
            assert!(e.to_string().starts_with(WHAT), "{e}");
        }
    }

    #[test]
    fn hostile_selectors_offsets_and_sizes_are_harmless() {
        let controller = controller(Some(GIB));
        controller.insert(controller.plan(768 * MIB).unwrap().unwrap());
        let mut regs = MemoryHotplugRegisters(controller.clone());
        for selector in [8u32, 9, 0x7f, 0xff, 0xffff_ffff] {
            select(&mut regs, selector);
            for offset in [0, 4, 8, 0xc, 0x10, 0x14] {
                assert_eq!(read32(&mut regs, offset), 0, "slot {selector:#x}");
            }
            regs.write(STATUS_OFFSET, &[0xff]);
        }
        // Every size at every offset, in and past the block, unaligned too.
        for offset in 0..0x20u64 {
            for len in [0usize, 1, 2, 3, 4, 8, 16] {
                let mut data = vec![0x55; len];
                regs.read(offset, &mut data);
                regs.write(offset, &vec![0xff; len]);
            }
        }
        // The first 0xff write at offset 0 selected slot 0xff (none): slot 0
        // is as it was.
        select(&mut regs, 0);
        assert_eq!(controller.slots()[0].base, 4 * GIB);
        assert_eq!(
            read32(&mut regs, STATUS_OFFSET),
            u32::from(STATUS_ENABLED | STATUS_INSERTING)
        );
        // An unaligned read gets the register's bytes from that offset.
        let mut data = [0u8; 4];
        regs.read(BASE_HIGH_OFFSET - 1, &mut data);
        assert_eq!(data, [0, 1, 0, 0]);
        let mut wide = [0xaa; 8];
        regs.read(BASE_LOW_OFFSET, &mut wide);
        assert_eq!(u64::from_le_bytes(wide), 4 * GIB);
        // A wide selection write selects by its low byte, as in v37.
        regs.write(SELECTION_OFFSET, &[0, 0xff, 0xff, 0xff]);
        assert_eq!(read32(&mut regs, BASE_HIGH_OFFSET), 1);
        assert_eq!(controller.current_ram(), 768 * MIB);
    }
}
