//! The legacy platform devices a guest reaches through port I/O and MMIO:
//! the 16550 serial port (with host input), the i8042, the ACPI shutdown
//! device, the debug port, the GED, the CPU, memory and PCI hot-plug
//! controllers (with the host's resizes and slot changes interleaved) and the
//! IOAPIC (its routes in a real KVM
//! VM's table), at their addresses on real buses.
//! Accesses of any size at any port; the devices may only stop the VM
//! (power-off, reset), never panic.

use std::sync::{Arc, Mutex};

use vm_superio::{I8042Device, Serial};
use vmkit_vmm::acpi::ACPI_SHUTDOWN_PORT;
use vmkit_vmm::control::Control;
use vmkit_vmm::devices::cpu_hotplug::{CpuHotplug, CpuHotplugRegisters, CPU_HOTPLUG_SIZE};
use vmkit_vmm::devices::ioapic::{Ioapic, IOAPIC_SIZE};
use vmkit_vmm::devices::legacy::{
    AcpiShutdown, DebugPort, Ged, GedRegister, ResetTrigger, GED_POWER_BUTTON, I8042,
};
use vmkit_vmm::devices::memory_hotplug::{
    HotplugLayout, MemoryHotplug, MemoryHotplugRegisters, MEMORY_HOTPLUG_SIZE,
};
use vmkit_vmm::devices::pci_hotplug::{PciHotplug, PciHotplugRegisters, PCI_HOTPLUG_SIZE};
use vmkit_vmm::devices::serial::{InputSink, IrqTrigger, SerialDevice, SerialSink};
use vmkit_vmm::devices::Bus;
use vmkit_vmm::layout::{
    CPU_HOTPLUG_ADDRESS, GED_ADDRESS, GED_SIZE, IOAPIC_START, MEMORY_HOTPLUG_ADDRESS,
    PCI_HOTPLUG_ADDRESS,
};
use vmm_sys_util::eventfd::EventFd;

use crate::input::Input;

/// Ports worth hitting: each device's range and its neighbours.
const PORTS: [u64; 6] = [0x3f8, 0x60, ACPI_SHUTDOWN_PORT as u64, 0x80, 0x3f0, 0];

pub fn legacy_io(data: &[u8]) {
    let mut input = Input::new(data);
    let control = Arc::new(Control::new());
    let backend = crate::null_backend("serial");
    let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let serial = Arc::new(Mutex::new(SerialDevice {
        uart: Serial::new(IrqTrigger(irq), SerialSink(backend.clone())),
    }));
    let ged = Arc::new(Ged::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")));
    let cpus = Arc::new(CpuHotplug::new(1, 1 + input.u8() % 8));
    let ejected = Arc::new(Mutex::new(Vec::new()));
    let log = ejected.clone();
    cpus.set_eject_handler(Box::new(move |index| {
        log.lock().unwrap().push(index);
    }));
    // 64 MiB of boot RAM and a 1 GiB hot-plug area, as `--memory
    // size=64M,hotplug_size=1G` lays them out.
    const MIB: u64 = 1 << 20;
    let layout = HotplugLayout::new(64 * MIB - 1, Some(1024 * MIB)).expect("layout");
    let memory = Arc::new(MemoryHotplug::new(64 * MIB, 64 * MIB - 1, layout, false));
    // Two segments; an eject must name a slot of one of them.
    let pci = Arc::new(PciHotplug::new(2));
    pci.set_eject_handler(Box::new(|segment, slot| {
        assert!(segment < 2 && slot < 32, "eject of {segment}:{slot}");
    }));
    let routes = crate::pci::routes().expect("the target needs /dev/kvm");
    let mut pio = Bus::new();
    let mut mmio = Bus::new();
    let placed = [
        pio.insert(0x3f8, 8, serial.clone()),
        pio.insert(
            0x60,
            5,
            Arc::new(Mutex::new(I8042(I8042Device::new(ResetTrigger(
                control.clone(),
            ))))),
        ),
        pio.insert(
            u64::from(ACPI_SHUTDOWN_PORT),
            8,
            Arc::new(Mutex::new(AcpiShutdown {
                control: control.clone(),
            })),
        ),
        pio.insert(
            0x80,
            1,
            Arc::new(Mutex::new(DebugPort {
                control: control.clone(),
                log: Arc::new(Mutex::new(Vec::new())),
            })),
        ),
        mmio.insert(
            GED_ADDRESS,
            GED_SIZE,
            Arc::new(Mutex::new(GedRegister(ged.clone()))),
        ),
        mmio.insert(
            CPU_HOTPLUG_ADDRESS,
            CPU_HOTPLUG_SIZE,
            Arc::new(Mutex::new(CpuHotplugRegisters(cpus.clone()))),
        ),
        mmio.insert(
            MEMORY_HOTPLUG_ADDRESS,
            MEMORY_HOTPLUG_SIZE,
            Arc::new(Mutex::new(MemoryHotplugRegisters(memory.clone()))),
        ),
        mmio.insert(
            PCI_HOTPLUG_ADDRESS,
            PCI_HOTPLUG_SIZE,
            Arc::new(Mutex::new(PciHotplugRegisters(pci.clone()))),
        ),
        mmio.insert(
            IOAPIC_START,
            IOAPIC_SIZE,
            Arc::new(Mutex::new(Ioapic::new(routes))),
        ),
    ];
    assert!(placed.iter().all(|&p| p), "the devices overlap");
    let mut buffer = [0u8; 8];
    let mut steps = 0;
    while !input.is_empty() && steps < 2048 {
        steps += 1;
        let op = input.u8();
        let len = [1usize, 1, 1, 2, 4, 8, 3, 0][usize::from(op >> 5)];
        let port = PORTS[usize::from(input.u8()) % PORTS.len()] + u64::from(input.u8() % 16);
        match op % 6 {
            0 | 1 => {
                pio.read(port, &mut buffer[..len]);
            }
            2 | 3 => {
                pio.write(port, input.bytes(len));
            }
            4 => {
                // Host input for the serial port, a power-button press or a
                // vCPU resize (the guest's ejects keep the state consistent).
                let count = usize::from(input.u8() % 88);
                if count == 0 {
                    let _ = ged.notify(GED_POWER_BUTTON);
                } else if count >= 80 {
                    // A slot added or marked for removal by the host.
                    let (segment, slot) = (u16::from(input.u8() % 3), input.u8() % 40);
                    if count % 2 == 0 {
                        pci.mark_up(segment, slot);
                    } else {
                        pci.mark_down(segment, slot);
                    }
                } else if count >= 72 {
                    // A RAM resize: 64 MiB plus up to 1 GiB in 128 MiB steps,
                    // or any size.
                    let desired = match input.u8() {
                        0 => input.u64(),
                        steps => 64 * MIB + u64::from(steps % 9) * 128 * MIB,
                    };
                    if let Ok(Some(dimm)) = memory.plan(desired) {
                        let area = memory.layout();
                        assert!(dimm.base >= area.area_start);
                        assert!(
                            dimm.base.checked_add(dimm.length).unwrap() <= area.device_area_start
                        );
                        memory.insert(dimm);
                    }
                } else if count >= 64 {
                    if let Ok(plan) = cpus.resize((count - 63) as u8) {
                        let slots = cpus.slots();
                        assert!(plan.start.iter().all(|&i| slots[usize::from(i)].enabled));
                    }
                    // The guest may eject any vCPU, vCPU 0 included, as in v37.
                    assert!(usize::from(cpus.present()) <= cpus.slots().len());
                } else {
                    serial.feed(input.bytes(count));
                }
            }
            _ => {
                // The GED, the CPU hot-plug controller, or the IOAPIC's
                // selector, window and beyond.
                let how = input.u8();
                let offset = u64::from(input.u8() % 0x20);
                let addr = match how & 6 {
                    0 => GED_ADDRESS + offset % 8,
                    2 => CPU_HOTPLUG_ADDRESS + offset % 0x10,
                    4 => MEMORY_HOTPLUG_ADDRESS + offset,
                    6 if how & 8 == 0 => PCI_HOTPLUG_ADDRESS + offset % 0x18,
                    _ => IOAPIC_START + offset,
                };
                if how & 1 == 0 {
                    mmio.read(addr, &mut buffer[..len]);
                } else {
                    mmio.write(addr, input.bytes(len));
                }
            }
        }
    }
    backend.close();
}
