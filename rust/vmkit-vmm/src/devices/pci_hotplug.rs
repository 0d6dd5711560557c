//! Cloud Hypervisor's PCI hot-plug controller (v37 `vmm/src/device_manager.rs`,
//! `impl BusDevice for DeviceManager`): 16 bytes of MMIO that the DSDT's
//! `\_SB_.PHPR` region maps, four 32-bit registers:
//!
//! - `PCIU` (offset 0): the selected segment's slots added since the last
//!   read (a bitmap; reading clears it);
//! - `PCID` (offset 4): its slots to be removed (reading clears it);
//! - `B0EJ` (offset 8): writing a bitmap ejects those slots of the selected
//!   segment (the guest's `_EJ0`); reads zero;
//! - `PSEG` (offset 12): the selected segment; a write past the VM's
//!   segments is ignored.
//!
//! Every byte here comes from the guest. Cloud Hypervisor asserts 4-byte
//! accesses (a VMM panic on anything else); here other sizes read zero and
//! are ignored when written, and so are unknown offsets.

use std::sync::{Arc, Mutex};

use super::BusDevice;

/// The register block's length (Cloud Hypervisor's `DEVICE_MANAGER_ACPI_SIZE`).
pub const PCI_HOTPLUG_SIZE: u64 = 0x10;
pub const PCIU_OFFSET: u64 = 0;
pub const PCID_OFFSET: u64 = 4;
pub const B0EJ_OFFSET: u64 = 8;
pub const PSEG_OFFSET: u64 = 12;

#[derive(Default, Clone, Copy)]
struct SegmentBits {
    up: u32,
    down: u32,
}

/// Called with (segment, slot) for each slot the guest ejects, outside the
/// controller's lock. It decides what may go (it is the guest's request).
pub type EjectHandler = Box<dyn Fn(u16, u8) + Send + Sync>;

/// The controller's state, shared by its register block and the VMM.
pub struct PciHotplug {
    state: Mutex<(u32, Vec<SegmentBits>)>,
    on_eject: Mutex<Option<EjectHandler>>,
}

impl PciHotplug {
    /// A controller for `segments` PCI segments, segment 0 selected.
    pub fn new(segments: u16) -> Self {
        PciHotplug {
            state: Mutex::new((0, vec![SegmentBits::default(); usize::from(segments)])),
            on_eject: Mutex::new(None),
        }
    }

    pub fn set_eject_handler(&self, handler: EjectHandler) {
        *self.on_eject.lock().unwrap_or_else(|p| p.into_inner()) = Some(handler);
    }

    fn state(&self) -> std::sync::MutexGuard<'_, (u32, Vec<SegmentBits>)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A device was added in `slot` of `segment` (Cloud Hypervisor's
    /// `pci_devices_up`).
    pub fn mark_up(&self, segment: u16, slot: u8) {
        if let Some(bits) = self.state().1.get_mut(usize::from(segment)) {
            bits.up |= 1u32.checked_shl(u32::from(slot)).unwrap_or(0);
        }
    }

    /// The device in `slot` of `segment` is to be removed (`pci_devices_down`).
    pub fn mark_down(&self, segment: u16, slot: u8) {
        if let Some(bits) = self.state().1.get_mut(usize::from(segment)) {
            bits.down |= 1u32.checked_shl(u32::from(slot)).unwrap_or(0);
        }
    }

    /// (the selected segment, each segment's (PCIU, PCID) bits the guest
    /// has not read), for a snapshot.
    pub fn save(&self) -> (u32, Vec<(u32, u32)>) {
        let state = self.state();
        (state.0, state.1.iter().map(|b| (b.up, b.down)).collect())
    }

    /// Loads what `save` gave; false (and nothing changed) unless it has
    /// one entry per segment and selects one of them.
    pub fn restore(&self, selected: u32, bits: &[(u32, u32)]) -> bool {
        let mut state = self.state();
        if bits.len() != state.1.len() || selected as usize >= bits.len() {
            return false;
        }
        state.0 = selected;
        for (segment, &(up, down)) in state.1.iter_mut().zip(bits) {
            *segment = SegmentBits { up, down };
        }
        true
    }

    fn read_register(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if data.len() != 4 {
            return;
        }
        let mut state = self.state();
        let (selected, segments) = &mut *state;
        let value = match (offset, segments.get_mut(*selected as usize)) {
            (PCIU_OFFSET, Some(bits)) => std::mem::take(&mut bits.up),
            (PCID_OFFSET, Some(bits)) => std::mem::take(&mut bits.down),
            (PSEG_OFFSET, _) => *selected,
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write_register(&self, offset: u64, data: &[u8]) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let value = u32::from_le_bytes(bytes);
        let ejected = {
            let mut state = self.state();
            match offset {
                PSEG_OFFSET => {
                    if (value as usize) < state.1.len() {
                        state.0 = value;
                    }
                    return;
                }
                B0EJ_OFFSET => (state.0 as u16, value),
                _ => return,
            }
        };
        let (segment, mut slots) = ejected;
        let handler = self.on_eject.lock().unwrap_or_else(|p| p.into_inner());
        while slots != 0 {
            let slot = slots.trailing_zeros();
            slots &= !(1 << slot);
            if let Some(handler) = &*handler {
                handler(segment, slot as u8);
            }
        }
    }
}

/// The guest's side of the controller, on the MMIO bus.
pub struct PciHotplugRegisters(pub Arc<PciHotplug>);

impl BusDevice for PciHotplugRegisters {
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

    fn read(regs: &mut PciHotplugRegisters, offset: u64) -> u32 {
        let mut data = [0xaa; 4];
        regs.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn recording(controller: &PciHotplug) -> Arc<Mutex<Vec<(u16, u8)>>> {
        let ejected = Arc::new(Mutex::new(Vec::new()));
        let seen = ejected.clone();
        controller.set_eject_handler(Box::new(move |segment, slot| {
            seen.lock().unwrap().push((segment, slot))
        }));
        ejected
    }

    #[test]
    fn slot_bitmaps_read_once_per_segment() {
        let controller = Arc::new(PciHotplug::new(2));
        let mut regs = PciHotplugRegisters(controller.clone());
        controller.mark_up(0, 6);
        controller.mark_up(0, 7);
        controller.mark_down(1, 3);
        assert_eq!(read(&mut regs, PSEG_OFFSET), 0);
        assert_eq!(read(&mut regs, PCIU_OFFSET), (1 << 6) | (1 << 7));
        assert_eq!(read(&mut regs, PCIU_OFFSET), 0, "reading clears PCIU");
        assert_eq!(read(&mut regs, PCID_OFFSET), 0);
        regs.write(PSEG_OFFSET, &1u32.to_le_bytes());
        assert_eq!(read(&mut regs, PSEG_OFFSET), 1);
        assert_eq!(read(&mut regs, PCIU_OFFSET), 0);
        assert_eq!(read(&mut regs, PCID_OFFSET), 1 << 3);
        assert_eq!(read(&mut regs, PCID_OFFSET), 0, "reading clears PCID");
        assert_eq!(read(&mut regs, B0EJ_OFFSET), 0, "B0EJ reads zero");
    }

    #[test]
    fn b0ej_ejects_each_slot_of_the_selected_segment() {
        let controller = Arc::new(PciHotplug::new(2));
        let ejected = recording(&controller);
        let mut regs = PciHotplugRegisters(controller.clone());
        regs.write(B0EJ_OFFSET, &((1u32 << 6) | (1 << 31)).to_le_bytes());
        regs.write(PSEG_OFFSET, &1u32.to_le_bytes());
        regs.write(B0EJ_OFFSET, &(1u32 << 2).to_le_bytes());
        assert_eq!(*ejected.lock().unwrap(), vec![(0, 6), (0, 31), (1, 2)]);
    }

    #[test]
    fn unread_bits_and_the_selected_segment_survive_a_save_and_restore() {
        let controller = Arc::new(PciHotplug::new(2));
        controller.mark_up(1, 4);
        controller.mark_down(0, 2);
        PciHotplugRegisters(controller.clone()).write(PSEG_OFFSET, &1u32.to_le_bytes());
        let (selected, bits) = controller.save();
        assert_eq!(
            (selected, bits.clone()),
            (1, vec![(0, 1 << 2), (1 << 4, 0)])
        );
        let restored = Arc::new(PciHotplug::new(2));
        assert!(restored.restore(selected, &bits));
        let mut regs = PciHotplugRegisters(restored.clone());
        assert_eq!(read(&mut regs, PSEG_OFFSET), 1);
        assert_eq!(read(&mut regs, PCIU_OFFSET), 1 << 4);
        regs.write(PSEG_OFFSET, &0u32.to_le_bytes());
        assert_eq!(read(&mut regs, PCID_OFFSET), 1 << 2);
        // A count or selection that is not this controller's changes nothing.
        assert!(!restored.restore(0, &bits[..1]));
        assert!(!restored.restore(2, &bits));
        assert_eq!(restored.save(), (0, vec![(0, 0), (0, 0)]));
    }

    #[test]
    fn hostile_segments_offsets_and_sizes_are_harmless() {
        let controller = Arc::new(PciHotplug::new(1));
        let ejected = recording(&controller);
        let mut regs = PciHotplugRegisters(controller.clone());
        // A segment past the VM's is ignored, as in Cloud Hypervisor.
        for segment in [1u32, 2, 0xffff, 0x1_0000, u32::MAX] {
            regs.write(PSEG_OFFSET, &segment.to_le_bytes());
            assert_eq!(read(&mut regs, PSEG_OFFSET), 0);
        }
        controller.mark_up(0, 5);
        controller.mark_up(7, 5); // no such segment: nothing
        controller.mark_down(0, 200); // no such slot: nothing
                                      // Accesses of every size at every offset, in and past the block;
                                      // only 4-byte accesses at the four registers mean anything.
        for offset in 0..20u64 {
            for len in [0usize, 1, 2, 3, 8] {
                let mut data = vec![0x55; len];
                regs.read(offset, &mut data);
                assert!(data.iter().all(|&b| b == 0), "{len} bytes at {offset}");
                regs.write(offset, &vec![0xff; len]);
            }
        }
        for offset in [1u64, 2, 3, 5, 9, 13, 16, 17] {
            assert_eq!(read(&mut regs, offset), 0);
            regs.write(offset, &[0xff; 4]);
        }
        assert!(ejected.lock().unwrap().is_empty());
        assert_eq!(read(&mut regs, PCIU_OFFSET), 1 << 5, "odd accesses kept it");
        assert_eq!(read(&mut regs, PCID_OFFSET), 0);
        // Ejecting every slot hands each to the VMM, which decides.
        regs.write(B0EJ_OFFSET, &u32::MAX.to_le_bytes());
        assert_eq!(ejected.lock().unwrap().len(), 32);
        // Without a handler, ejects do nothing.
        let bare = Arc::new(PciHotplug::new(1));
        PciHotplugRegisters(bare).write(B0EJ_OFFSET, &u32::MAX.to_le_bytes());
    }
}
