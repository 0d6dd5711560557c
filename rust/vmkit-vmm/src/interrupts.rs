//! KVM's GSI routing table, owned in one place: one MSI route per unmasked
//! IOAPIC pin (GSIs 0..24, kept by the user-space IOAPIC) and per allocated
//! GSI above them (one per MSI-X vector). `KVM_SET_GSI_ROUTING` replaces the
//! whole table, so every change rewrites it from here.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_enable_cap, kvm_irq_routing_entry, KvmIrqRouting, KVM_CAP_SPLIT_IRQCHIP,
    KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;

use crate::error::{ErrorKind, ModuleError, Result};

/// Why an interrupt route could not be made.
#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    #[error("out of interrupt routes ({limit} available)")]
    OutOfRoutes { limit: u32 },
    #[error("KVM_SET_GSI_ROUTING: cannot build a table of {entries} routes")]
    Table { entries: usize },
    #[error("KVM_SET_GSI_ROUTING")]
    SetRouting {
        #[source]
        source: kvm_ioctls::Error,
    },
}

impl ModuleError for InterruptError {
    fn kind(&self) -> ErrorKind {
        match self {
            InterruptError::OutOfRoutes { .. } => ErrorKind::Device,
            InterruptError::Table { .. } | InterruptError::SetRouting { .. } => ErrorKind::Kvm,
        }
    }
}

/// GSIs below this belong to the IOAPIC's pins.
pub const IOAPIC_PINS: u32 = 24;

/// KVM's split irqchip: local APICs in the kernel, the IOAPIC in user space
/// (`devices::ioapic`), no PIC or PIT. Must precede the first vCPU.
pub fn enable_split_irqchip(vm_fd: &VmFd) -> std::result::Result<(), kvm_ioctls::Error> {
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_SPLIT_IRQCHIP,
        ..Default::default()
    };
    // The pins whose level-triggered MSI routes KVM reports EOIs for.
    cap.args[0] = u64::from(IOAPIC_PINS);
    vm_fd.enable_cap(&cap)
}

pub struct InterruptRoutes {
    vm_fd: Arc<VmFd>,
    inner: Mutex<Routes>,
}

struct Routes {
    next_gsi: u32,
    limit: u32,
    /// GSI ranges given back (a hot-unplugged device's): start → count.
    free: BTreeMap<u32, u32>,
    msi: BTreeMap<u32, (u64, u32)>,
}

impl InterruptRoutes {
    /// `limit` is KVM_CAP_IRQ_ROUTING: the most GSIs the table may hold.
    pub fn new(vm_fd: Arc<VmFd>, limit: u32) -> Self {
        InterruptRoutes {
            vm_fd,
            inner: Mutex::new(Routes {
                next_gsi: IOAPIC_PINS,
                limit,
                free: BTreeMap::new(),
                msi: BTreeMap::new(),
            }),
        }
    }

    pub fn vm_fd(&self) -> &Arc<VmFd> {
        &self.vm_fd
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Routes> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves `count` consecutive GSIs for MSI routes (none routed yet).
    pub fn allocate(&self, count: u32) -> Result<u32> {
        let mut routes = self.lock();
        // A range given back first (devices come and go with PCI hot-plug).
        let reused = routes
            .free
            .iter()
            .find(|(_, &len)| len >= count)
            .map(|(&start, &len)| (start, len));
        if let Some((start, len)) = reused.filter(|_| count > 0) {
            routes.free.remove(&start);
            if len > count {
                routes.free.insert(start + count, len - count);
            }
            return Ok(start);
        }
        let first = routes.next_gsi;
        let end = first
            .checked_add(count)
            .filter(|&end| end <= routes.limit)
            .ok_or(InterruptError::OutOfRoutes {
                limit: routes.limit,
            })?;
        routes.next_gsi = end;
        Ok(first)
    }

    /// Gives back `count` GSIs from `first` (what `allocate` gave a device
    /// that is gone; their routes were removed).
    pub fn release(&self, first: u32, count: u32) {
        if count > 0 {
            self.lock().free.insert(first, count);
        }
    }

    /// Routes `gsi` to the MSI message (`address`, `data`), or unroutes it.
    pub fn set_msi(&self, gsi: u32, message: Option<(u64, u32)>) -> Result<()> {
        let mut routes = self.lock();
        let changed = match message {
            Some(m) => routes.msi.insert(gsi, m) != Some(m),
            None => routes.msi.remove(&gsi).is_some(),
        };
        if changed {
            self.commit(&routes)?;
        }
        Ok(())
    }

    /// The MSI message `gsi` is routed to now, if any.
    pub fn msi_route(&self, gsi: u32) -> Option<(u64, u32)> {
        self.lock().msi.get(&gsi).copied()
    }

    fn commit(&self, routes: &Routes) -> Result<()> {
        let mut entries = Vec::with_capacity(routes.msi.len());
        for (&gsi, &(address, data)) in &routes.msi {
            let mut entry = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            entry.u.msi.address_lo = address as u32;
            entry.u.msi.address_hi = (address >> 32) as u32;
            entry.u.msi.data = data;
            entries.push(entry);
        }
        let mut table = KvmIrqRouting::new(entries.len()).map_err(|_| InterruptError::Table {
            entries: entries.len(),
        })?;
        table.as_mut_slice().copy_from_slice(&entries);
        self.vm_fd
            .set_gsi_routing(&table)
            .map_err(|source| InterruptError::SetRouting { source })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    mod needs_kvm {
        use std::sync::Arc;

        use kvm_ioctls::Kvm;

        use super::super::*;

        #[test]
        #[ignore = "needs /dev/kvm"]
        fn released_gsis_are_handed_out_again() {
            let vm_fd = Arc::new(Kvm::new().unwrap().create_vm().unwrap());
            let routes = InterruptRoutes::new(vm_fd, IOAPIC_PINS + 6);
            let a = routes.allocate(3).unwrap();
            let b = routes.allocate(3).unwrap();
            assert_eq!((a, b), (IOAPIC_PINS, IOAPIC_PINS + 3));
            assert!(routes.allocate(3).is_err(), "past the limit");
            routes.release(a, 3);
            assert_eq!(
                routes.allocate(2).unwrap(),
                a,
                "a hot-plugged device reuses them"
            );
            assert_eq!(routes.allocate(1).unwrap(), a + 2);
            assert!(routes.allocate(1).is_err());
        }
    }
}
