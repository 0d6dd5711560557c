//! KVM's GSI routing table, owned in one place: the in-kernel IOAPIC and PIC
//! routes for the legacy GSIs, plus one MSI route per allocated GSI (one per
//! MSI-X vector). `KVM_SET_GSI_ROUTING` replaces the whole table, so every
//! change rewrites it from here.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
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

pub struct InterruptRoutes {
    vm_fd: Arc<VmFd>,
    inner: Mutex<Routes>,
}

struct Routes {
    next_gsi: u32,
    limit: u32,
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

    fn commit(&self, routes: &Routes) -> Result<()> {
        let mut entries = Vec::new();
        for pin in 0..IOAPIC_PINS {
            entries.push(irqchip_route(pin, KVM_IRQCHIP_IOAPIC, pin));
        }
        // The PIC answers the 16 ISA GSIs too, except GSI 2 (the cascade).
        for pin in (0..16).filter(|&p| p != 2) {
            let chip = if pin < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            entries.push(irqchip_route(pin, chip, pin % 8));
        }
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

fn irqchip_route(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut entry = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    entry.u.irqchip.irqchip = irqchip;
    entry.u.irqchip.pin = pin;
    entry
}
