//! KVM's GSI routing table, owned in one place: one MSI route per unmasked
//! IOAPIC pin (GSIs 0..24, kept by the user-space IOAPIC) and per allocated
//! GSI above them (one per MSI-X vector). `KVM_SET_GSI_ROUTING` replaces the
//! whole table, so every change rewrites it from here.
//!
//! The legacy pins' irqfds (COM1, the GED) are registered with KVM when the
//! guest first routes their pin, as Cloud Hypervisor enables its IOAPIC
//! irqfds: until then an edge goes nowhere anyway, and a VM whose guest
//! never routes them is torn down without irqfds to shut down (KVM waits for
//! a workqueue every VM on the host shares for those).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_enable_cap, kvm_irq_routing_entry, KvmIrqRouting, KVM_CAP_SPLIT_IRQCHIP,
    KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

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
    #[error("KVM_IRQFD for IOAPIC pin {pin}")]
    PinIrqfd {
        pin: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
}

impl ModuleError for InterruptError {
    fn kind(&self) -> ErrorKind {
        match self {
            InterruptError::OutOfRoutes { .. } => ErrorKind::Device,
            InterruptError::Table { .. }
            | InterruptError::SetRouting { .. }
            | InterruptError::PinIrqfd { .. } => ErrorKind::Kvm,
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
    /// The KVM VM goes away with everything registered on it: devices then
    /// leave their routes, irqfds and ioeventfds to it rather than remove
    /// each (a grace period or a workqueue flush per call).
    vm_closing: AtomicBool,
    inner: Mutex<Routes>,
}

struct Routes {
    next_gsi: u32,
    limit: u32,
    /// GSI ranges given back (a hot-unplugged device's): start → count.
    free: BTreeMap<u32, u32>,
    msi: BTreeMap<u32, (u64, u32)>,
    /// IOAPIC pin → its device's irqfd, and whether KVM has it yet.
    pin_irqfds: BTreeMap<u32, (EventFd, bool)>,
}

impl InterruptRoutes {
    /// `limit` is KVM_CAP_IRQ_ROUTING: the most GSIs the table may hold.
    pub fn new(vm_fd: Arc<VmFd>, limit: u32) -> Self {
        InterruptRoutes {
            vm_fd,
            vm_closing: AtomicBool::new(false),
            inner: Mutex::new(Routes {
                next_gsi: IOAPIC_PINS,
                limit,
                free: BTreeMap::new(),
                msi: BTreeMap::new(),
                pin_irqfds: BTreeMap::new(),
            }),
        }
    }

    pub fn vm_fd(&self) -> &Arc<VmFd> {
        &self.vm_fd
    }

    /// Says that the KVM VM is being torn down as a whole (no device is
    /// hot-unplugged from it any more).
    pub fn mark_vm_closing(&self) {
        self.vm_closing.store(true, Ordering::Release);
    }

    /// Whether removing a KVM registration is left to the VM's end.
    pub fn vm_closing(&self) -> bool {
        self.vm_closing.load(Ordering::Acquire)
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
        if message.is_some() {
            self.register_pin_irqfd(&mut routes, gsi)?;
        }
        Ok(())
    }

    /// Gives IOAPIC pin `pin` the irqfd its device signals; KVM gets it
    /// once the pin is routed.
    pub fn add_pin_irqfd(&self, pin: u32, irqfd: EventFd) -> Result<()> {
        let mut routes = self.lock();
        routes.pin_irqfds.insert(pin, (irqfd, false));
        if routes.msi.contains_key(&pin) {
            self.register_pin_irqfd(&mut routes, pin)?;
        }
        Ok(())
    }

    fn register_pin_irqfd(&self, routes: &mut Routes, pin: u32) -> Result<()> {
        let Some((irqfd, registered)) = routes.pin_irqfds.get_mut(&pin) else {
            return Ok(());
        };
        if *registered {
            return Ok(());
        }
        // Edges of the masked pin are dropped, as before it had a route.
        let _ = irqfd.read();
        self.vm_fd
            .register_irqfd(irqfd, pin)
            .map_err(|source| InterruptError::PinIrqfd { pin, source })?;
        *registered = true;
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

        /// Whether KVM has `irqfd` on `gsi`: it refuses the same one twice.
        fn kvm_has_irqfd(vm_fd: &VmFd, irqfd: &EventFd, gsi: u32) -> bool {
            match vm_fd.register_irqfd(irqfd, gsi) {
                Ok(()) => {
                    vm_fd.unregister_irqfd(irqfd, gsi).unwrap();
                    false
                }
                Err(e) if e.errno() == libc::EBUSY => true,
                Err(e) => panic!("KVM_IRQFD: {e}"),
            }
        }

        /// A legacy pin's irqfd reaches KVM with the pin's first route, not
        /// before (a VM whose guest never routes it has none to tear down).
        #[test]
        #[ignore = "needs /dev/kvm"]
        fn a_pins_irqfd_is_registered_when_the_guest_first_routes_the_pin() {
            let vm_fd = Arc::new(Kvm::new().unwrap().create_vm().unwrap());
            enable_split_irqchip(&vm_fd).unwrap();
            let routes = InterruptRoutes::new(vm_fd.clone(), 1024);
            let irqfd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            let device_side = irqfd.try_clone().unwrap();
            routes.add_pin_irqfd(4, irqfd).unwrap();
            assert!(!kvm_has_irqfd(&vm_fd, &device_side, 4));

            routes.set_msi(4, Some((0xfee0_0000, 0x31))).unwrap();
            assert!(kvm_has_irqfd(&vm_fd, &device_side, 4));

            routes.set_msi(4, None).unwrap();
            routes.set_msi(4, Some((0xfee0_0000, 0x32))).unwrap();
            assert!(kvm_has_irqfd(&vm_fd, &device_side, 4), "registered once");

            // A pin routed before its device is wired (a restore).
            let late = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            let late_side = late.try_clone().unwrap();
            routes.set_msi(9, Some((0xfee0_0000, 0x39))).unwrap();
            routes.add_pin_irqfd(9, late).unwrap();
            assert!(kvm_has_irqfd(&vm_fd, &late_side, 9));
        }

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
