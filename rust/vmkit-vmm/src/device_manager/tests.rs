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
            placement: None,
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

    #[test]
    #[ignore = "needs /dev/kvm"]
    fn hot_plugs_a_disk_and_ejects_only_what_the_guest_may() {
        let image = std::env::temp_dir().join(format!("vmkit-pcihp-{}.img", std::process::id()));
        std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
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
        let control = Arc::new(Control::new());
        let spawner = crate::seccomp::Spawner::unconfined();
        let debug_log = Arc::new(Mutex::new(Vec::new()));
        let events = Arc::new(DeviceEventLog::new().unwrap());
        let taps = Default::default();
        let links = Default::default();
        let sizes = Default::default();
        let context = |config| DeviceContext {
            spawner: &spawner,
            config,
            vm_fd: &vm_fd,
            ram: &ram,
            control: &control,
            gsi_limit: 1024,
            phys_bits: 46,
            serial: None,
            console: None,
            debug_log: &debug_log,
            device_events: &events,
            adopted_taps: &taps,
            vhost_links: &links,
            balloon_size: None,
            virtio_mem_sizes: &sizes,
            placement: None,
        };
        let mut devices = DeviceManager::build(&context(&config)).unwrap();
        let mut only = config.clone();
        only.disks = Some(vec![vmkit_config::DiskConfig {
            id: Some("hot".into()),
            path: Some(image.to_string_lossy().into_owned()),
            ..Default::default()
        }]);
        let disks = hotplug_kind("disks").unwrap();
        let (id, bdf) = devices.hotplug_virtio(&context(&only), disks).unwrap();
        assert_eq!((id.as_str(), bdf.as_str()), ("hot", "0000:00:02.0"));
        let bar_of = |devices: &DeviceManager| {
            devices
                .device_tree()
                .into_iter()
                .find(|n| n.id == "_virtio-pci-hot")
                .map(|n| n.resources)
        };
        let bar = bar_of(&devices).unwrap();
        let bus = devices.mmio_bus().clone();
        let read32 = |address: u64| {
            let mut data = [0u8; 4];
            bus.read(address, &mut data);
            u32::from_le_bytes(data)
        };
        let vendor = |slot: u64| read32(PCI_MMCONFIG_START + (slot << 15)) & 0xffff;
        assert_eq!(vendor(2), 0x1af4);
        assert_eq!(read32(PCI_HOTPLUG_ADDRESS), 1 << 2, "PCIU: slot 2 added");
        assert_eq!(read32(PCI_HOTPLUG_ADDRESS), 0);

        // The guest ejects the host bridge, the rng, an empty slot: nothing
        // goes (Cloud Hypervisor would free slot 0 and tear down the rng).
        bus.write(PCI_HOTPLUG_ADDRESS + 8, &0xffff_fff3u32.to_le_bytes());
        assert_eq!(vendor(0), 0x8086);
        assert_eq!(vendor(1), 0x1af4);
        assert!(lock(&devices.hotplug.ejected).is_empty());
        // A segment that does not exist is not selected.
        bus.write(PCI_HOTPLUG_ADDRESS + 12, &1u32.to_le_bytes());
        assert_eq!(read32(PCI_HOTPLUG_ADDRESS + 12), 0);

        // remove-device marks it down; the guest's eject takes it off the bus.
        assert!(matches!(
            devices
                .request_removal("__rng")
                .unwrap_err()
                .to_string()
                .as_str(),
            "Error from device manager: RemovalNotAllowed(Rng)"
        ));
        assert_eq!(
            devices.request_removal("nope").unwrap_err().to_string(),
            "Error from device manager: UnknownDeviceId(\"nope\")"
        );
        devices.request_removal("hot").unwrap();
        assert_eq!(read32(PCI_HOTPLUG_ADDRESS + 4), 1 << 2, "PCID: slot 2");
        bus.write(PCI_HOTPLUG_ADDRESS + 8, &(1u32 << 2).to_le_bytes());
        assert_eq!(vendor(2), 0xffff, "gone from config space at once");
        assert!(bar_of(&devices).is_none(), "gone from the device tree");
        let device = Arc::downgrade(&devices.virtio_devices()[1]);
        assert_eq!(devices.reap_ejected(&vm_fd), ["hot"]);
        assert!(device.upgrade().is_none(), "torn down");
        assert_eq!(devices.virtio_devices().len(), 1);
        // Its slot and BAR are taken again by the next hot-plug.
        let (_, again) = devices.hotplug_virtio(&context(&only), disks).unwrap();
        assert_eq!(again, "0000:00:02.0");
        assert_eq!(bar_of(&devices).unwrap(), bar);
        devices.stop_devices();
        std::fs::remove_file(&image).unwrap();
    }
}
