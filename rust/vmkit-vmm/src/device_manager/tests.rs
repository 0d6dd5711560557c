//! The device manager's wiring, built for real (a KVM VM for the irqfds).

mod needs_kvm {
    use std::sync::{Arc, Mutex};

    use crate::virtio::pci::DeviceEventLog;

    use kvm_ioctls::Kvm;
    use vmkit_config::{VmConfig, VmParams};

    use super::super::*;
    use crate::devices::serial::SerialBackend;
    use crate::memory::create_guest_ram;

    #[test]
    #[ignore = "needs /dev/kvm"]
    fn wires_cloud_hypervisors_platform_and_reports_its_tree() {
        let mut config = VmConfig::parse(&VmParams {
            kernel: Some("/dev/null".into()),
            memory: "size=64M".into(),
            serial: "null".into(),
            console: "off".into(),
            ..VmParams::default()
        })
        .unwrap();
        config.assign_device_ids();
        let vm_fd = Arc::new(Kvm::new().unwrap().create_vm().unwrap());
        crate::interrupts::enable_split_irqchip(&vm_fd).unwrap();
        let ram = create_guest_ram(&config.memory).unwrap();
        let serial = SerialBackend::open_unconfined(&config.serial, "serial", false)
            .unwrap()
            .unwrap();
        let control = Arc::new(Control::new());
        let mut devices = DeviceManager::build(&DeviceContext {
            spawner: &crate::seccomp::Spawner::unconfined(),
            config: &config,
            vm_fd: &vm_fd,
            ram: &ram,
            control: &control,
            gsi_limit: 1024,
            phys_bits: 46,
            serial: Some(&serial),
            console: None,
            debug_log: &Arc::new(Mutex::new(Vec::new())),
            device_events: &Arc::new(DeviceEventLog::new().unwrap()),
            adopted_taps: &Default::default(),
            vhost_links: &Default::default(),
            balloon_size: None,
            virtio_mem_sizes: &Default::default(),
        })
        .unwrap();

        let ids: Vec<String> = devices.device_tree().into_iter().map(|n| n.id).collect();
        assert_eq!(ids, ["__ioapic", "__serial", "_virtio-pci-__rng", "__rng"]);
        let rng = &devices.device_tree()[2];
        assert_eq!(rng.pci_bdf.as_deref(), Some("0000:00:01.0"));
        // The top of the only segment's 64-bit window (as CH, at 46 bits).
        assert_eq!(
            rng.resources,
            [Resource::PciBar {
                index: 0,
                base: 0x3ffe_fff8_0000,
                size: 0x8_0000,
                kind: BarKind::Memory64,
                prefetchable: false,
            }]
        );

        let mut data = [0u8; 4];
        // Every legacy port is claimed, and nothing else.
        for port in [
            0x3f8,
            0x60,
            0x64,
            u64::from(ACPI_SHUTDOWN_PORT),
            0x80,
            0xcf8,
            0xcfc,
        ] {
            assert!(devices.pio_bus().read(port, &mut data[..1]), "{port:#x}");
        }
        assert!(!devices.pio_bus().read(0x2f8, &mut data[..1]));
        // ECAM answers with the host bridge; the GED register is mapped.
        assert!(devices.mmio_bus().read(PCI_MMCONFIG_START, &mut data));
        assert_eq!(u32::from_le_bytes(data), 0x0d57_8086);
        assert!(devices.mmio_bus().read(GED_ADDRESS, &mut data[..1]));
        assert_eq!(devices.segment_layouts().len(), 1);

        // Stopping drops every device for real: nothing (the config-I/O
        // ports included) keeps a segment, and with it its devices, alive.
        let segment = Arc::downgrade(&devices.segments[0]);
        devices.stop_devices();
        assert!(devices.virtio_devices().is_empty());
        assert!(
            segment.upgrade().is_none(),
            "a stopped segment is still held"
        );
        assert!(!devices.mmio_bus().read(PCI_MMCONFIG_START, &mut data));
        serial.close();
    }
}
