//! Port-I/O and MMIO buses and the legacy platform devices on them.

pub mod cpu_hotplug;
pub mod ioapic;
pub mod legacy;
pub mod memory_hotplug;
pub mod pci_hotplug;
pub mod pvpanic;
pub mod serial;
pub mod tpm;

use std::sync::{Arc, Mutex};

/// A device on a bus: `offset` is relative to the range it was inserted at.
/// Guest-reachable, so implementations must never panic or block.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device that serves accesses through `&self`, so the bus takes no lock
/// for it: several vCPU threads may be inside it at once (a PCI segment's
/// window, which locks only the function an access reaches).
pub trait SharedBusDevice: Send + Sync {
    fn read(&self, offset: u64, data: &mut [u8]);
    fn write(&self, offset: u64, data: &[u8]);
}

enum Target {
    Locked(Arc<Mutex<dyn BusDevice>>),
    Shared(Arc<dyn SharedBusDevice>),
}

impl Target {
    fn read(&self, offset: u64, data: &mut [u8]) {
        match self {
            Target::Locked(device) => device
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .read(offset, data),
            Target::Shared(device) => device.read(offset, data),
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        match self {
            Target::Locked(device) => device
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .write(offset, data),
            Target::Shared(device) => device.write(offset, data),
        }
    }
}

struct Range {
    base: u64,
    len: u64,
    device: Target,
}

/// Address ranges mapped to devices; unclaimed reads return all-ones and
/// unclaimed writes are ignored, as on a PC.
#[derive(Default)]
pub struct Bus {
    ranges: Vec<Range>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `device` at [base, base + len); refuses overlaps.
    pub fn insert(&mut self, base: u64, len: u64, device: Arc<Mutex<dyn BusDevice>>) -> bool {
        self.insert_target(base, len, Target::Locked(device))
    }

    /// Adds a device that needs no lock at [base, base + len).
    pub fn insert_shared(&mut self, base: u64, len: u64, device: Arc<dyn SharedBusDevice>) -> bool {
        self.insert_target(base, len, Target::Shared(device))
    }

    fn insert_target(&mut self, base: u64, len: u64, device: Target) -> bool {
        let end = match base.checked_add(len) {
            Some(end) if len > 0 => end,
            _ => return false,
        };
        if self
            .ranges
            .iter()
            .any(|r| base < r.base + r.len && r.base < end)
        {
            return false;
        }
        let at = self.ranges.partition_point(|r| r.base < base);
        self.ranges.insert(at, Range { base, len, device });
        true
    }

    fn find(&self, addr: u64) -> Option<(&Range, u64)> {
        let index = self.ranges.partition_point(|r| r.base <= addr);
        let range = self.ranges.get(index.checked_sub(1)?)?;
        let offset = addr - range.base;
        (offset < range.len).then_some((range, offset))
    }

    /// Returns whether a device claimed the access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((range, offset)) => {
                range.device.read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((range, offset)) => {
                range.device.write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatch_by_range() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Recorder::default()));
        let b = Arc::new(Mutex::new(Recorder::default()));
        assert!(bus.insert(0x3f8, 8, a.clone()));
        assert!(bus.insert(0x60, 5, b.clone()));
        assert!(!bus.insert(0x3fc, 8, b.clone()), "overlap refused");
        assert!(!bus.insert(u64::MAX, 2, b.clone()), "wrap refused");
        let mut data = [0u8; 1];
        assert!(bus.read(0x3fa, &mut data));
        assert_eq!(data, [2]);
        assert!(!bus.read(0x400, &mut data));
        assert_eq!(data, [0xff]);
        assert!(bus.write(0x64, &[0xfe]));
        assert_eq!(b.lock().unwrap().writes, vec![(4, vec![0xfe])]);
        assert!(!bus.write(0x65, &[1]));
    }
}
