//! The small legacy devices: the i8042 (its reset command resets the VM),
//! the ACPI shutdown device (power-off and reset through FADT registers) and
//! the 0x80 debug port (each write logged with the time since VM creation).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_superio::{I8042Device, Trigger};

use crate::acpi::{ACPI_RESET_VALUE, S5_SLEEP_TYPE};
use crate::control::{Control, StopReason};
use crate::devices::BusDevice;

/// Turns a device's "reset" line into a VM stop request.
pub struct ResetTrigger(pub Arc<Control>);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request_stop(StopReason::Reset);
        Ok(())
    }
}

/// The PS/2 controller at 0x60-0x64; only its CPU-reset command matters.
pub struct I8042(pub I8042Device<ResetTrigger>);

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = u8::try_from(offset).map_or(0xff, |o| self.0.read(o));
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [value]) = (u8::try_from(offset), data) {
            let _ = self.0.write(offset, *value);
        }
    }
}

/// Cloud Hypervisor's shutdown device: the FADT's sleep control register
/// (SLP_TYP=S5 with SLP_EN powers off) and reset register (value 1 resets).
pub struct AcpiShutdown {
    pub control: Arc<Control>,
}

impl BusDevice for AcpiShutdown {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (0, [value]) = (offset, data) else {
            return;
        };
        if *value == ACPI_RESET_VALUE {
            self.control.request_stop(StopReason::Reset);
            return;
        }
        const SLEEP_ENABLE: u8 = 1 << 5;
        let sleep_type = (value >> 2) & 0x7;
        if sleep_type == S5_SLEEP_TYPE && value & SLEEP_ENABLE != 0 {
            self.control.request_stop(StopReason::PowerOff);
        }
    }
}

/// One write to the debug port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DebugPortWrite {
    pub value: u8,
    pub since_creation: Duration,
    /// CLOCK_MONOTONIC at the write, in ns (comparable across processes).
    pub monotonic_ns: u64,
}

/// CLOCK_MONOTONIC now, in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// The most debug-port writes kept (a guest could write forever).
const DEBUG_LOG_LIMIT: usize = 4096;

/// Port 0x80: firmware and boot progress codes.
pub struct DebugPort {
    pub control: Arc<Control>,
    pub log: Arc<Mutex<Vec<DebugPortWrite>>>,
}

impl BusDevice for DebugPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else {
            return;
        };
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        if log.len() < DEBUG_LOG_LIMIT {
            log.push(DebugPortWrite {
                value,
                since_creation: self.control.created.elapsed(),
                monotonic_ns: monotonic_ns(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shutdown_device_decodes_sleep_and_reset() {
        let control = Arc::new(Control::new());
        let mut device = AcpiShutdown {
            control: control.clone(),
        };
        device.write(0, &[5 << 2]); // S5 without SLP_EN: nothing
        device.write(1, &[0x34]); // wrong register: nothing
        assert_eq!(control.stop_reason(), None);
        device.write(0, &[(5 << 2) | (1 << 5)]);
        assert_eq!(control.stop_reason(), Some(StopReason::PowerOff));

        let control = Arc::new(Control::new());
        let mut device = AcpiShutdown {
            control: control.clone(),
        };
        device.write(0, &[1]);
        assert_eq!(control.stop_reason(), Some(StopReason::Reset));
    }

    #[test]
    fn i8042_reset_command() {
        let control = Arc::new(Control::new());
        let mut device = I8042(I8042Device::new(ResetTrigger(control.clone())));
        device.write(4, &[0x01]);
        assert_eq!(control.stop_reason(), None);
        device.write(4, &[0xfe]);
        assert_eq!(control.stop_reason(), Some(StopReason::Reset));
    }

    #[test]
    fn debug_port_log_is_bounded() {
        let control = Arc::new(Control::new());
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut port = DebugPort {
            control,
            log: log.clone(),
        };
        for i in 0..(DEBUG_LOG_LIMIT + 10) {
            port.write(0, &[i as u8]);
        }
        assert_eq!(log.lock().unwrap().len(), DEBUG_LOG_LIMIT);
        assert_eq!(log.lock().unwrap()[3].value, 3);
    }
}

/// The ACPI Generic Event Device (ACPI0013) of a hardware-reduced platform:
/// one byte at `GED_ADDRESS` saying which event happened (reading clears
/// it), signalled on `GED_IRQ`. The DSDT's `_EVT` reads it and notifies the
/// power button (PNP0C0C), which is how `vm.power-button` reaches the guest.
pub struct Ged {
    pending: Mutex<u8>,
    irq: vmm_sys_util::eventfd::EventFd,
}

/// Event bits (Cloud Hypervisor's `AcpiNotificationFlags`, devices/src/lib.rs).
pub const GED_CPU_DEVICES_CHANGED: u8 = 1 << 0;
pub const GED_MEMORY_DEVICES_CHANGED: u8 = 1 << 1;
pub const GED_PCI_DEVICES_CHANGED: u8 = 1 << 2;
pub const GED_POWER_BUTTON: u8 = 1 << 3;

impl Ged {
    pub fn new(irq: vmm_sys_util::eventfd::EventFd) -> Self {
        Ged {
            pending: Mutex::new(0),
            irq,
        }
    }

    /// The events raised and not read yet, for a snapshot.
    pub fn pending(&self) -> u8 {
        *self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Restores `pending` events without a new interrupt: one raised
    /// before the snapshot is in the saved IOAPIC and vCPU state.
    pub fn set_pending(&self, events: u8) {
        *self.pending.lock().unwrap_or_else(|p| p.into_inner()) = events;
    }

    /// Records `event` and interrupts the guest.
    pub fn notify(&self, event: u8) -> std::io::Result<()> {
        *self.pending.lock().unwrap_or_else(|p| p.into_inner()) |= event;
        self.irq.write(1)
    }
}

/// The guest's side of the GED, on the MMIO bus.
pub struct GedRegister(pub Arc<Ged>);

impl BusDevice for GedRegister {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 0 {
            if let Some(first) = data.first_mut() {
                *first =
                    std::mem::take(&mut *self.0.pending.lock().unwrap_or_else(|p| p.into_inner()));
            }
        }
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod ged_tests {
    use super::*;

    #[test]
    fn reading_the_event_clears_it() {
        let irq =
            vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).unwrap();
        let ged = Arc::new(Ged::new(irq.try_clone().unwrap()));
        let mut register = GedRegister(ged.clone());
        ged.notify(GED_POWER_BUTTON).unwrap();
        assert_eq!(irq.read().unwrap(), 1, "the interrupt fired");
        let mut byte = [0u8; 4];
        register.read(0, &mut byte);
        assert_eq!(byte, [GED_POWER_BUTTON, 0, 0, 0]);
        register.read(0, &mut byte);
        assert_eq!(byte[0], 0, "read once");
        register.read(1, &mut byte);
        assert_eq!(byte, [0; 4]);
    }
}
