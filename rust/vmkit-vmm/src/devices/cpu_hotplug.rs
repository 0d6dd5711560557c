//! Cloud Hypervisor's CPU hot-plug controller (v37 `vmm/src/cpu.rs`,
//! `impl BusDevice for CpuManager`): 12 bytes of MMIO that the DSDT's
//! `\_SB_.PRES` region maps. The guest writes a vCPU index to the selection
//! register (offset 0, `CSEL`), then reads that vCPU's status byte (offset
//! 4): bit 0 enabled (`CPEN`), bit 1 being inserted (`CINS`), bit 2 being
//! removed (`CRMV`). Writing bit 1 or 2 back acknowledges the insertion or
//! removal; writing bit 3 (`CEJ0`) ejects the vCPU, after which the VMM stops
//! its thread. Offset 8 (`CDAT`) reads zero, as in Cloud Hypervisor.
//!
//! Every byte here comes from the guest: a selection past the possible
//! vCPUs reads status 0 and its writes are ignored.

use std::sync::{Arc, Mutex};

use super::BusDevice;

/// The register block's length (Cloud Hypervisor's `CPU_MANAGER_ACPI_SIZE`).
pub const CPU_HOTPLUG_SIZE: u64 = 0xc;
pub const SELECTION_OFFSET: u64 = 0;
pub const STATUS_OFFSET: u64 = 4;

/// Status bits (Cloud Hypervisor's `CPU_*_FLAG`).
pub const STATUS_ENABLED: u8 = 1 << 0;
pub const STATUS_INSERTING: u8 = 1 << 1;
pub const STATUS_REMOVING: u8 = 1 << 2;
pub const STATUS_EJECT: u8 = 1 << 3;

/// One possible vCPU as the guest sees it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// Its thread runs (Cloud Hypervisor: the vCPU has a thread handle).
    pub enabled: bool,
    /// Added since the guest last scanned: `CSCN` notifies it (1, check).
    pub inserting: bool,
    /// To be removed: `CSCN` notifies it (3, eject request).
    pub removing: bool,
    /// Marked for removal and not yet ejected (the guest's acknowledgement
    /// clears `removing`, not this): further resizes wait for the eject.
    pub pending_removal: bool,
}

/// Why a resize was refused, in Cloud Hypervisor v37's words (its
/// `cpu::Error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ResizeError {
    #[error("Requested vCPUs exceed maximum")]
    ExceedsMax,
    /// A vCPU marked for removal has not been ejected by the guest yet.
    #[error("Still pending removed vcpu")]
    PendingRemoval,
}

/// What a resize asks of the VMM.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResizePlan {
    /// vCPUs to start, each marked as being inserted.
    pub start: Vec<u8>,
    /// vCPUs marked for removal: they stop when the guest ejects them.
    pub marked_for_removal: Vec<u8>,
}

impl ResizePlan {
    /// Whether the guest must be told (Cloud Hypervisor's `resize` returning true).
    pub fn notify(&self) -> bool {
        !self.start.is_empty() || !self.marked_for_removal.is_empty()
    }
}

struct State {
    selected: u32,
    slots: Vec<Slot>,
}

/// The controller's state, shared by its register block and the VMM.
pub struct CpuHotplug {
    state: Mutex<State>,
    /// Called with the index of a vCPU the guest ejected (outside the lock):
    /// the VMM stops its thread.
    on_eject: Mutex<Option<EjectHandler>>,
}

pub type EjectHandler = Box<dyn Fn(u8) + Send + Sync>;

impl CpuHotplug {
    /// `max` possible vCPUs, the first `boot` of them running.
    pub fn new(boot: u8, max: u8) -> Self {
        let slots = (0..max)
            .map(|index| Slot {
                enabled: index < boot,
                ..Slot::default()
            })
            .collect();
        CpuHotplug {
            state: Mutex::new(State { selected: 0, slots }),
            on_eject: Mutex::new(None),
        }
    }

    pub fn set_eject_handler(&self, handler: EjectHandler) {
        *self.on_eject.lock().unwrap_or_else(|p| p.into_inner()) = Some(handler);
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn slots(&self) -> Vec<Slot> {
        self.state().slots.clone()
    }

    /// vCPUs with a running thread (Cloud Hypervisor's `present_vcpus`).
    pub fn present(&self) -> u8 {
        self.state().slots.iter().filter(|s| s.enabled).count() as u8
    }

    /// Cloud Hypervisor's `CpuManager::resize`: the same count changes
    /// nothing; while a removal is pending nothing else is done; it grows by
    /// starting the next vCPUs (marked as being inserted) and shrinks by
    /// marking the highest ones for removal.
    pub fn resize(&self, desired: u8) -> Result<ResizePlan, ResizeError> {
        let mut state = self.state();
        let present = state.slots.iter().filter(|s| s.enabled).count();
        let desired = usize::from(desired);
        let mut plan = ResizePlan::default();
        if desired == present {
            return Ok(plan);
        }
        if state.slots.iter().any(|s| s.enabled && s.pending_removal) {
            return Err(ResizeError::PendingRemoval);
        }
        if desired > state.slots.len() {
            return Err(ResizeError::ExceedsMax);
        }
        if desired > present {
            for index in present..desired {
                let slot = &mut state.slots[index];
                slot.enabled = true;
                slot.inserting = true;
                plan.start.push(index as u8);
            }
        } else {
            for index in desired..present {
                state.slots[index].removing = true;
                state.slots[index].pending_removal = true;
                plan.marked_for_removal.push(index as u8);
            }
        }
        Ok(plan)
    }

    /// Takes back a start that failed: the vCPU is not there after all.
    pub fn start_failed(&self, index: u8) {
        if let Some(slot) = self.state().slots.get_mut(usize::from(index)) {
            *slot = Slot::default();
        }
    }

    fn read_register(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let state = self.state();
        let Some(first) = data.first_mut() else {
            return;
        };
        match offset {
            SELECTION_OFFSET => *first = state.selected as u8,
            STATUS_OFFSET => {
                if let Some(slot) = state.slots.get(state.selected as usize) {
                    let bits = [
                        (slot.enabled, STATUS_ENABLED),
                        (slot.inserting, STATUS_INSERTING),
                        (slot.removing, STATUS_REMOVING),
                    ];
                    *first = bits
                        .iter()
                        .filter(|(set, _)| *set)
                        .fold(0, |acc, (_, bit)| acc | bit);
                }
            }
            _ => {}
        }
    }

    fn write_register(&self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else {
            return;
        };
        let ejected = {
            let mut state = self.state();
            match offset {
                // Cloud Hypervisor keeps the low byte (its `selected_cpu` is a u8).
                SELECTION_OFFSET => {
                    state.selected = u32::from(value);
                    None
                }
                STATUS_OFFSET => {
                    let selected = state.selected;
                    match state.slots.get_mut(selected as usize) {
                        Some(slot) => {
                            if value & STATUS_INSERTING != 0 {
                                slot.inserting = false;
                            }
                            if value & STATUS_REMOVING != 0 {
                                slot.removing = false;
                            }
                            if value & STATUS_EJECT != 0 && slot.enabled {
                                *slot = Slot::default();
                                Some(selected as u8)
                            } else {
                                None
                            }
                        }
                        None => None,
                    }
                }
                _ => None,
            }
        };
        if let Some(index) = ejected {
            if let Some(handler) = &*self.on_eject.lock().unwrap_or_else(|p| p.into_inner()) {
                handler(index);
            }
        }
    }
}

/// The guest's side of the controller, on the MMIO bus.
pub struct CpuHotplugRegisters(pub Arc<CpuHotplug>);

impl BusDevice for CpuHotplugRegisters {
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

    fn status(regs: &mut CpuHotplugRegisters, index: u8) -> u8 {
        regs.write(SELECTION_OFFSET, &[index, 0, 0, 0]);
        let mut data = [0xaa; 4];
        regs.read(STATUS_OFFSET, &mut data);
        assert_eq!(&data[1..], &[0, 0, 0], "only the low byte carries bits");
        data[0]
    }

    #[test]
    fn boot_vcpus_read_enabled_the_others_absent() {
        let controller = Arc::new(CpuHotplug::new(2, 4));
        let mut regs = CpuHotplugRegisters(controller.clone());
        assert_eq!(status(&mut regs, 0), STATUS_ENABLED);
        assert_eq!(status(&mut regs, 1), STATUS_ENABLED);
        assert_eq!(status(&mut regs, 2), 0);
        assert_eq!(status(&mut regs, 3), 0);
        let mut selected = [0u8; 4];
        regs.read(SELECTION_OFFSET, &mut selected);
        assert_eq!(selected, [3, 0, 0, 0]);
        assert_eq!(controller.present(), 2);
    }

    #[test]
    fn growing_marks_new_vcpus_inserting_until_the_guest_acknowledges() {
        let controller = Arc::new(CpuHotplug::new(1, 4));
        let mut regs = CpuHotplugRegisters(controller.clone());
        let plan = controller.resize(3).unwrap();
        assert_eq!(plan.start, vec![1, 2]);
        assert!(plan.marked_for_removal.is_empty() && plan.notify());
        assert_eq!(status(&mut regs, 1), STATUS_ENABLED | STATUS_INSERTING);
        assert_eq!(status(&mut regs, 2), STATUS_ENABLED | STATUS_INSERTING);
        assert_eq!(status(&mut regs, 3), 0);
        // CSCN writes CINS back (a 1 in bit 1) once it notified the vCPU.
        regs.write(SELECTION_OFFSET, &[1]);
        regs.write(STATUS_OFFSET, &[STATUS_INSERTING]);
        assert_eq!(status(&mut regs, 1), STATUS_ENABLED);
        assert_eq!(status(&mut regs, 2), STATUS_ENABLED | STATUS_INSERTING);
        assert_eq!(controller.present(), 3);
        assert_eq!(controller.resize(3).unwrap(), ResizePlan::default());
    }

    #[test]
    fn shrinking_marks_the_highest_vcpus_and_the_eject_removes_them() {
        let controller = Arc::new(CpuHotplug::new(4, 4));
        let ejected = Arc::new(Mutex::new(Vec::new()));
        let seen = ejected.clone();
        controller.set_eject_handler(Box::new(move |i| seen.lock().unwrap().push(i)));
        let mut regs = CpuHotplugRegisters(controller.clone());
        let plan = controller.resize(2).unwrap();
        assert_eq!(plan.marked_for_removal, vec![2, 3]);
        assert_eq!(status(&mut regs, 3), STATUS_ENABLED | STATUS_REMOVING);
        // Still running until the guest ejects it.
        assert_eq!(controller.present(), 4);
        regs.write(STATUS_OFFSET, &[STATUS_REMOVING]);
        assert_eq!(status(&mut regs, 3), STATUS_ENABLED);
        // Acknowledged but not ejected: v37 refuses other resizes meanwhile
        // (4 is the count present: no change, no error).
        assert_eq!(controller.resize(4), Ok(ResizePlan::default()));
        assert_eq!(controller.resize(3), Err(ResizeError::PendingRemoval));
        assert_eq!(
            controller.resize(1).unwrap_err().to_string(),
            "Still pending removed vcpu"
        );
        regs.write(STATUS_OFFSET, &[STATUS_EJECT]);
        assert_eq!(status(&mut regs, 3), 0);
        assert_eq!(*ejected.lock().unwrap(), vec![3]);
        // Ejecting an absent vCPU again does nothing.
        regs.write(STATUS_OFFSET, &[STATUS_EJECT]);
        assert_eq!(*ejected.lock().unwrap(), vec![3]);
        assert_eq!(controller.present(), 3);
        // The same count is no change, even while a removal is pending.
        assert_eq!(controller.resize(3).unwrap(), ResizePlan::default());
        assert_eq!(controller.resize(4), Err(ResizeError::PendingRemoval));
        regs.write(SELECTION_OFFSET, &[2]);
        regs.write(STATUS_OFFSET, &[STATUS_EJECT]);
        assert_eq!(*ejected.lock().unwrap(), vec![3, 2]);
        assert_eq!(controller.resize(4).unwrap().start, vec![2, 3]);
    }

    #[test]
    fn beyond_max_is_refused_as_cloud_hypervisor_refuses_it() {
        let controller = CpuHotplug::new(2, 4);
        assert_eq!(controller.resize(5), Err(ResizeError::ExceedsMax));
        assert_eq!(
            ResizeError::ExceedsMax.to_string(),
            "Requested vCPUs exceed maximum"
        );
        assert_eq!(controller.present(), 2);
        // Shrinking to 0 marks every vCPU, as v37 does.
        assert_eq!(controller.resize(0).unwrap().marked_for_removal, vec![0, 1]);
    }

    #[test]
    fn hostile_selectors_offsets_and_sizes_are_harmless() {
        let controller = Arc::new(CpuHotplug::new(2, 4));
        let ejected = Arc::new(Mutex::new(Vec::new()));
        let seen = ejected.clone();
        controller.set_eject_handler(Box::new(move |i| seen.lock().unwrap().push(i)));
        let mut regs = CpuHotplugRegisters(controller.clone());
        for selector in [4u8, 5, 0x7f, 0xff] {
            assert_eq!(status(&mut regs, selector), 0);
            regs.write(STATUS_OFFSET, &[0xff]);
            assert_eq!(status(&mut regs, selector), 0);
        }
        // Accesses of every size at every offset, in and past the block.
        for offset in 0..16u64 {
            for len in [0usize, 1, 2, 4, 8] {
                let mut data = vec![0x55; len];
                regs.read(offset, &mut data);
                regs.write(offset, &vec![0xff; len]);
            }
        }
        assert!(
            ejected.lock().unwrap().is_empty(),
            "no selector reached a vCPU"
        );
        assert_eq!(controller.present(), 2);
        // A wide write selects by its low byte, as in Cloud Hypervisor.
        regs.write(SELECTION_OFFSET, &[1, 0xff, 0xff, 0xff]);
        let mut data = [0u8; 4];
        regs.read(STATUS_OFFSET, &mut data);
        assert_eq!(data, [STATUS_ENABLED, 0, 0, 0]);
        regs.read(8, &mut data);
        assert_eq!(data, [0; 4], "CDAT reads zero");
    }
}
