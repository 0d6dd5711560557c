//! The virtio-pci transport's tests; every one opens /dev/kvm (a VM with an
//! irqchip for the MSI-X routes), so they are ignored unless asked for.

mod needs_kvm {
    use super::super::*;
    use crate::virtio::rng::Rng;
    use kvm_ioctls::Kvm;
    use std::time::{Duration, Instant};
    use vm_memory::Bytes;

    const BAR: u64 = 0x10_0000_0000;
    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const BUFFER: u64 = 0x10000;

    /// A VM with KVM's split irqchip, as a boot has.
    fn routes() -> Arc<InterruptRoutes> {
        let vm = Kvm::new().unwrap().create_vm().unwrap();
        crate::interrupts::enable_split_irqchip(&vm).unwrap();
        Arc::new(InterruptRoutes::new(Arc::new(vm), 1024))
    }

    fn rng_device(memory: &GuestMemoryMmap) -> VirtioPciDevice {
        rng_device_on(memory, routes())
    }

    fn rng_device_on(memory: &GuestMemoryMmap, routes: Arc<InterruptRoutes>) -> VirtioPciDevice {
        let rng = Rng::new("__rng".into(), "/dev/urandom").unwrap();
        VirtioPciDevice::new(
            "__rng".into(),
            Box::new(rng),
            memory.clone(),
            routes,
            BAR,
            BarKind::Memory64,
        )
        .unwrap()
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100000)]).unwrap()
    }

    fn write(dev: &mut VirtioPciDevice, offset: u64, value: u64, len: usize) {
        dev.bar_write(0, offset, &value.to_le_bytes()[..len]);
    }

    fn read(dev: &mut VirtioPciDevice, offset: u64, len: usize) -> u64 {
        let mut data = [0u8; 8];
        dev.bar_read(0, offset, &mut data[..len]);
        u64::from_le_bytes(data)
    }

    /// Negotiates `features` and sets up queue 0 at DESC/AVAIL/USED with `size`.
    fn set_up(dev: &mut VirtioPciDevice, features: u64, size: u16) -> u8 {
        write(dev, 0x14, 0, 1);
        write(dev, 0x14, 3, 1); // ACKNOWLEDGE | DRIVER
        write(dev, 0x08, 0, 4);
        write(dev, 0x0c, features & 0xffff_ffff, 4);
        write(dev, 0x08, 1, 4);
        write(dev, 0x0c, features >> 32, 4);
        write(dev, 0x14, 0xb, 1);
        let status = read(dev, 0x14, 1) as u8;
        write(dev, 0x16, 0, 2);
        write(dev, 0x18, u64::from(size), 2);
        write(dev, 0x20, DESC, 8);
        write(dev, 0x28, AVAIL & 0xffff_ffff, 4);
        write(dev, 0x2c, AVAIL >> 32, 4);
        write(dev, 0x30, USED, 8);
        write(dev, 0x1c, 1, 2);
        status
    }

    #[test]
    #[ignore = "needs /dev/kvm"]
    fn pci_identity_and_capabilities() {
        let memory = memory();
        let dev = rng_device(&memory);
        let config = dev.config();
        assert_eq!(config.read_register(0), 0x1044_1af4);
        assert_eq!(config.bar_address(0), Some(BAR));
        let mut types = Vec::new();
        let mut byte = [0u8; 1];
        config.read_bytes(0x34, &mut byte);
        let mut at = usize::from(byte[0]);
        while at != 0 {
            let mut cap = [0u8; 4];
            config.read_bytes(at, &mut cap);
            types.push(if cap[0] == 0x09 { cap[3] } else { cap[0] });
            at = usize::from(cap[1]);
        }
        assert_eq!(types, vec![0x11, 1, 3, 4, 2, 5]);
    }

    #[test]
    #[ignore = "needs /dev/kvm"]
    fn features_ok_needs_version_1_and_offered_bits() {
        let memory = memory();
        let mut dev = rng_device(&memory);
        assert_eq!(set_up(&mut dev, 0, 16) & STATUS_FEATURES_OK, 0);
        assert_eq!(
            set_up(&mut dev, F_VERSION_1 | 1 << 40, 16) & STATUS_FEATURES_OK,
            0
        );
        assert_ne!(set_up(&mut dev, F_VERSION_1, 16) & STATUS_FEATURES_OK, 0);
        // Device features read back through the select window.
        write(&mut dev, 0x00, 1, 4);
        assert_eq!(read(&mut dev, 0x04, 4) & 1, 1);
        assert_eq!(read(&mut dev, 0x12, 2), 1, "one queue");
    }

    #[test]
    #[ignore = "needs /dev/kvm"]
    fn rng_fills_a_buffer_end_to_end() {
        let memory = memory();
        let mut dev = rng_device(&memory);
        let events: DeviceEvents = Arc::new(DeviceEventLog::new().unwrap());
        dev.set_events(events.clone());
        set_up(&mut dev, F_VERSION_1, 16);
        // Descriptor 0: 64 device-writable bytes; avail ring names it.
        memory.write_obj(BUFFER, GuestAddress(DESC)).unwrap();
        memory.write_obj(64u32, GuestAddress(DESC + 8)).unwrap();
        memory.write_obj(2u16, GuestAddress(DESC + 12)).unwrap();
        memory.write_obj(0u16, GuestAddress(AVAIL + 4)).unwrap();
        memory.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
        write(&mut dev, 0x14, 0xf, 1);
        assert_eq!(read(&mut dev, 0x14, 1), 0xf);
        // The notify register kicks the queue even without the ioeventfd path.
        write(&mut dev, NOTIFY_OFFSET, 0, 2);
        let start = Instant::now();
        while memory.read_obj::<u16>(GuestAddress(USED + 2)).unwrap() != 1 {
            assert!(start.elapsed() < Duration::from_secs(5), "no used buffer");
            std::thread::sleep(Duration::from_millis(1));
        }
        let len: u32 = memory.read_obj(GuestAddress(USED + 8)).unwrap();
        assert_eq!(len, 64);
        let mut bytes = [0u8; 64];
        memory.read_slice(&mut bytes, GuestAddress(BUFFER)).unwrap();
        assert!(bytes.iter().any(|&b| b != bytes[0]));
        assert_eq!(
            read(&mut dev, ISR_OFFSET, 1),
            1,
            "queue interrupt in the ISR"
        );
        assert_eq!(read(&mut dev, ISR_OFFSET, 1), 0, "reading acknowledged it");
        // Reset stops the device and clears the registers.
        write(&mut dev, 0x14, 0, 1);
        assert_eq!(read(&mut dev, 0x14, 1), 0);
        assert_eq!(read(&mut dev, 0x1c, 2), 0);
        assert!(!dev.active);
        let names = |since| {
            let (events, next) = events.since(since);
            let names: Vec<_> = events
                .into_iter()
                .map(|e| (e.source, e.event, e.properties))
                .collect();
            (names, next)
        };
        let id = || vec![("id", "__rng".to_owned())];
        assert_eq!(
            names(0),
            (
                vec![
                    ("virtio-device", "activated", id()),
                    ("virtio-device", "reset", id())
                ],
                2
            )
        );
        assert_eq!(names(1), (vec![("virtio-device", "reset", id())], 2));
        assert_eq!(names(3), (vec![], 2));
        // Each event signalled the eventfd a watcher waits on.
        let mut count = 0u64;
        // SAFETY: an 8-byte read of the log's own eventfd into a u64.
        let n = unsafe { libc::read(events.signal_fd(), (&mut count as *mut u64).cast(), 8) };
        assert_eq!((n, count), (8, 2));
    }

    #[test]
    #[ignore = "needs /dev/kvm"]
    fn queues_outside_memory_need_reset() {
        let memory = memory();
        let mut dev = rng_device(&memory);
        set_up(&mut dev, F_VERSION_1, 16);
        write(&mut dev, 0x30, 0xffff_0000, 8);
        write(&mut dev, 0x14, 0xf, 1);
        assert_ne!(read(&mut dev, 0x14, 1) as u8 & STATUS_NEEDS_RESET, 0);
        assert!(!dev.active);
        assert_eq!(dev.reset_requests(), 1);
        // A size that is not a power of two is refused the same way.
        set_up(&mut dev, F_VERSION_1, 12);
        assert_eq!(read(&mut dev, 0x14, 1) as u8 & STATUS_NEEDS_RESET, 0);
        write(&mut dev, 0x14, 0xf, 1);
        assert_ne!(read(&mut dev, 0x14, 1) as u8 & STATUS_NEEDS_RESET, 0);
        assert_eq!(dev.reset_requests(), 2);
    }

    #[test]
    #[ignore = "needs /dev/kvm"]
    fn queue_registers_freeze_after_driver_ok() {
        let memory = memory();
        let mut dev = rng_device(&memory);
        set_up(&mut dev, F_VERSION_1, 16);
        write(&mut dev, 0x14, 0xf, 1);
        write(&mut dev, 0x20, 0x5000, 8);
        write(&mut dev, 0x18, 4, 2);
        assert_eq!(read(&mut dev, 0x20, 8), DESC);
        assert_eq!(read(&mut dev, 0x18, 2), 16);
        // Out-of-range queue selection reads zeros and ignores writes.
        write(&mut dev, 0x16, 7, 2);
        assert_eq!(read(&mut dev, 0x18, 2), 0);
        assert_eq!(read(&mut dev, 0x1e, 2), 0);
    }

    #[test]
    #[ignore = "needs /dev/kvm"]
    fn msix_vectors_and_table() {
        let memory = memory();
        let mut dev = rng_device(&memory);
        // Two vectors (one queue + config): 2 is out of range.
        write(&mut dev, 0x10, 1, 2);
        assert_eq!(read(&mut dev, 0x10, 2), 1);
        write(&mut dev, 0x10, 2, 2);
        assert_eq!(read(&mut dev, 0x10, 2), u64::from(NO_VECTOR));
        write(&mut dev, MSIX_TABLE_OFFSET, 0xfee0_0000, 4);
        write(&mut dev, MSIX_TABLE_OFFSET + 8, 0x41, 4);
        assert_eq!(read(&mut dev, MSIX_TABLE_OFFSET, 4), 0xfee0_0000);
        assert_eq!(
            read(&mut dev, MSIX_TABLE_OFFSET + 12, 4),
            1,
            "masked after reset"
        );
        write(&mut dev, MSIX_TABLE_OFFSET + 12, 0, 4);
        assert_eq!(read(&mut dev, MSIX_TABLE_OFFSET + 12, 4), 0);
        // Past the table: reads ones... or zeros, never panics.
        let _ = read(&mut dev, MSIX_TABLE_OFFSET + 0x1000, 4);
        // Message control: enable through config space.
        let msix_reg = dev.msix_cap / 4;
        dev.config_write(msix_reg, 3, &[0x80]);
        assert!(dev.msix().enabled());
        assert_eq!(dev.config_read(msix_reg) >> 16, 0x8001);
    }

    #[test]
    #[ignore = "needs /dev/kvm"]
    fn bar_moves_follow_the_guest() {
        let memory = memory();
        let mut dev = rng_device(&memory);
        dev.config_write(4, 0, &0xffff_ffffu32.to_le_bytes());
        dev.config_write(5, 0, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(dev.config_read(4), 0xfff8_0004);
        dev.config_write(4, 0, &0xc000_0000u32.to_le_bytes());
        dev.config_write(5, 0, &0u32.to_le_bytes());
        assert_eq!(dev.config().bar_address(0), Some(0xc000_0000));
        assert_eq!(dev.notifiers.base(), Some(0xc000_0000));
    }

    #[test]
    #[ignore = "needs /dev/kvm"]
    fn sizing_a_bar_leaves_the_notifiers_where_they_are() {
        let memory = memory();
        let mut dev = rng_device(&memory);
        // All-ones in the low half makes 0x10_fff8_0000 for a moment: a
        // placement-looking address the notifiers must not follow.
        dev.config_write(4, 0, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(dev.config().bar_address(0), Some(0x10_fff8_0000));
        assert_eq!(dev.notifiers.base(), Some(BAR));
        dev.config_write(4, 0, &(BAR as u32 | 0x4).to_le_bytes());
        assert_eq!(dev.config().bar_address(0), Some(BAR));
        assert_eq!(dev.notifiers.base(), Some(BAR));
    }

    /// Whether KVM has an ioeventfd at queue `queue`'s notify address of a
    /// BAR at `base`: it refuses a second one there.
    fn ioeventfd_at(vm: &kvm_ioctls::VmFd, base: u64, queue: u64) -> bool {
        let address = base + NOTIFY_OFFSET + queue * 4;
        crate::virtio::notify::kvm_has_ioeventfd(vm, address, None)
    }

    /// A hot-unplugged device takes its ioeventfds with it (the next
    /// device placed there needs the address). One that goes with its VM
    /// leaves them to KVM's teardown of the VM, which drops them all at
    /// once instead of waiting for a grace period per removal.
    #[test]
    #[ignore = "needs /dev/kvm"]
    fn ioeventfds_go_with_an_unplugged_device_and_stay_for_a_closing_vm() {
        let memory = memory();
        let routes = routes();
        let vm = routes.vm_fd().clone();
        let unplugged = rng_device_on(&memory, routes.clone());
        assert!(ioeventfd_at(&vm, BAR, 0));
        drop(unplugged);
        assert!(!ioeventfd_at(&vm, BAR, 0));

        let closing = rng_device_on(&memory, routes.clone());
        routes.mark_vm_closing();
        drop(closing);
        assert!(ioeventfd_at(&vm, BAR, 0));
    }

    /// A virtio-blk queue moved onto the vCPU threads loses its ioeventfd
    /// (the driver's writes exit to the VMM and are served there), keeps it
    /// off across a BAR move while the other queue follows, and gets it
    /// back when the driver resets the device.
    #[test]
    #[ignore = "needs /dev/kvm"]
    fn a_queue_served_on_the_vcpu_threads_has_no_ioeventfd_until_reset() {
        let image = std::env::temp_dir().join(format!("vmkit-pci-blk-{}.img", std::process::id()));
        let contents: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(&image, &contents).unwrap();
        let config = vmkit_config::DiskConfig {
            path: Some(image.to_str().unwrap().to_owned()),
            num_queues: 2,
            disable_io_uring: true,
            ..Default::default()
        };
        let block = crate::virtio::block::Block::new(&config, None).unwrap();
        std::fs::remove_file(&image).unwrap();
        let memory = memory();
        let routes = routes();
        let vm = routes.vm_fd().clone();
        let mut dev = VirtioPciDevice::new(
            "__blk".into(),
            Box::new(block),
            memory.clone(),
            routes,
            BAR,
            BarKind::Memory64,
        )
        .unwrap();
        assert!(ioeventfd_at(&vm, BAR, 0) && ioeventfd_at(&vm, BAR, 1));
        set_up(&mut dev, F_VERSION_1, 16);
        write(&mut dev, 0x14, 0xf, 1);
        assert!(dev.active);

        assert!(dev.notifiers.serve_on_vcpu(0, true));
        assert!(!ioeventfd_at(&vm, BAR, 0), "queue 0 exits to the VMM");
        assert!(ioeventfd_at(&vm, BAR, 1), "queue 1 keeps its ioeventfd");
        // A read of sector 1 (header, 512 bytes in, status), notified by
        // MMIO as the guest's write now arrives.
        memory.write_obj(0u32, GuestAddress(BUFFER)).unwrap(); // VIRTIO_BLK_T_IN
        memory.write_obj(1u64, GuestAddress(BUFFER + 8)).unwrap();
        memory
            .write_obj(0xffu8, GuestAddress(BUFFER + 0x1000))
            .unwrap();
        let descriptors = [
            (BUFFER, 16u32, 1u16),
            (BUFFER + 0x200, 512, 1 | 2),
            (BUFFER + 0x1000, 1, 2),
        ];
        for (i, (addr, len, flags)) in descriptors.into_iter().enumerate() {
            let at = DESC + 16 * i as u64;
            memory.write_obj(addr, GuestAddress(at)).unwrap();
            memory.write_obj(len, GuestAddress(at + 8)).unwrap();
            memory.write_obj(flags, GuestAddress(at + 12)).unwrap();
            memory
                .write_obj(i as u16 + 1, GuestAddress(at + 14))
                .unwrap();
        }
        memory.write_obj(0u16, GuestAddress(AVAIL + 4)).unwrap();
        memory.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
        write(&mut dev, NOTIFY_OFFSET, 0, 2);
        let start = Instant::now();
        while memory.read_obj::<u16>(GuestAddress(USED + 2)).unwrap() != 1 {
            assert!(start.elapsed() < Duration::from_secs(5), "no used buffer");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(
            memory
                .read_obj::<u8>(GuestAddress(BUFFER + 0x1000))
                .unwrap(),
            0
        );
        let mut data = [0u8; 512];
        memory
            .read_slice(&mut data, GuestAddress(BUFFER + 0x200))
            .unwrap();
        assert_eq!(&data[..], &contents[512..1024]);

        // The BAR moves: queue 1's ioeventfd follows, queue 0 stays without.
        const MOVED: u64 = 0xc000_0000;
        dev.config_write(4, 0, &(MOVED as u32).to_le_bytes());
        dev.config_write(5, 0, &0u32.to_le_bytes());
        assert_eq!(dev.notifiers.base(), Some(MOVED));
        assert!(!ioeventfd_at(&vm, BAR, 1), "nothing left at the old place");
        assert!(!ioeventfd_at(&vm, MOVED, 0) && ioeventfd_at(&vm, MOVED, 1));

        // A driver reset puts every queue back on its ioeventfd.
        write(&mut dev, 0x14, 0, 1);
        assert!(!dev.notifiers.on_vcpu(0));
        assert!(ioeventfd_at(&vm, MOVED, 0) && ioeventfd_at(&vm, MOVED, 1));
        drop(dev);
        assert!(!ioeventfd_at(&vm, MOVED, 0) && !ioeventfd_at(&vm, MOVED, 1));
    }

    /// The threads that move a queue (its worker onto the vCPU threads, a
    /// vCPU thread back) may, under their seccomp filters in trap mode.
    #[test]
    #[ignore = "needs /dev/kvm"]
    fn a_queue_moves_under_the_movers_filters() {
        use crate::seccomp::{spawn_confined, SeccompMode, ThreadGroups, ThreadKind};
        let memory = memory();
        let dev = rng_device(&memory);
        for (kind, on_vcpu) in [
            (ThreadKind::BlockIoUring, true),
            (ThreadKind::Vcpu, false),
            (ThreadKind::BlockSync, true),
            (ThreadKind::Vcpu, false),
        ] {
            let notifiers = Arc::clone(&dev.notifiers);
            spawn_confined(
                "mover".into(),
                kind,
                SeccompMode::Trap,
                &ThreadGroups::default(),
                move || assert!(notifiers.serve_on_vcpu(0, on_vcpu)),
            )
            .unwrap()
            .join()
            .unwrap();
            assert_eq!(dev.notifiers.on_vcpu(0), on_vcpu, "{kind}");
        }
    }

    /// A guest poking random registers with random values: no panic, no
    /// stuck worker, and reset still brings the device back.
    #[test]
    #[ignore = "needs /dev/kvm"]
    fn random_register_traffic_is_harmless() {
        let memory = memory();
        let mut dev = rng_device(&memory);
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let hot = [
            0x00, 0x04, 0x08, 0x0c, 0x10, 0x12, 0x14, 0x16, 0x18, 0x1a, 0x1c, 0x20, 0x28,
        ];
        for _ in 0..20_000 {
            let r = next();
            let len = [1usize, 2, 4, 8][(r & 3) as usize];
            let value = next();
            let offset = match (r >> 2) % 6 {
                0 => hot[((r >> 8) % hot.len() as u64) as usize],
                1 => MSIX_TABLE_OFFSET + (r >> 8) % 0x40,
                2 => (r >> 8) % BAR_SIZE,
                3 => NOTIFY_OFFSET + (r >> 8) % 8,
                _ => ISR_OFFSET,
            };
            let mut data = [0u8; 8];
            if r & (1 << 40) != 0 {
                dev.bar_write(0, offset, &value.to_le_bytes()[..len]);
            } else {
                dev.bar_read(0, offset, &mut data[..len]);
            }
            if r & (1 << 41) != 0 {
                let reg = ((r >> 44) % 64) as usize;
                dev.config_write(reg, 0, &(value as u32).to_le_bytes());
                let _ = dev.config_read(reg);
            }
        }
        write(&mut dev, 0x14, 0, 1);
        assert_eq!(read(&mut dev, 0x14, 1), 0);
        assert!(!dev.active);
        // Still a working device afterwards (BAR 0 may have moved: put it back).
        dev.config_write(4, 0, &(BAR as u32).to_le_bytes());
        dev.config_write(5, 0, &((BAR >> 32) as u32).to_le_bytes());
        set_up(&mut dev, F_VERSION_1, 16);
        write(&mut dev, 0x14, 0xf, 1);
        assert_eq!(read(&mut dev, 0x14, 1), 0xf);
    }

    #[test]
    #[ignore = "needs /dev/kvm"]
    fn a_failed_queue_sets_needs_reset_until_the_driver_resets() {
        let memory = memory();
        let mut dev = rng_device(&memory);
        set_up(&mut dev, F_VERSION_1, 16);
        write(&mut dev, 0x14, 0xf, 1);
        assert!(dev.active);
        assert_eq!(read(&mut dev, 0x14, 1) as u8 & STATUS_NEEDS_RESET, 0);
        // An available index far ahead of the device breaks the ring.
        memory.write_obj(100u16, GuestAddress(AVAIL + 2)).unwrap();
        write(&mut dev, NOTIFY_OFFSET, 0, 2);
        let start = Instant::now();
        while read(&mut dev, 0x14, 1) as u8 & STATUS_NEEDS_RESET == 0 {
            assert!(start.elapsed() < Duration::from_secs(5), "no NEEDS_RESET");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(read(&mut dev, 0x14, 1) as u8, 0xf | STATUS_NEEDS_RESET);
        assert_eq!(
            read(&mut dev, ISR_OFFSET, 1) as u8 & ISR_CONFIG,
            ISR_CONFIG,
            "configuration change in the ISR"
        );
        assert_eq!(dev.reset_requests(), 1);
        // The driver's reset clears it; the count stays.
        write(&mut dev, 0x14, 0, 1);
        assert_eq!(read(&mut dev, 0x14, 1), 0);
        assert_eq!(dev.reset_requests(), 1);
    }
}

mod event_log {
    use super::super::*;

    #[test]
    fn the_log_keeps_the_newest_events_when_a_guest_floods_it() {
        let log = DeviceEventLog::new().unwrap();
        for i in 0..EVENTS_KEPT + 10 {
            log.push("guest", "panic", vec![("event", i.to_string())]);
        }
        let (events, next) = log.since(0);
        assert_eq!(next, EVENTS_KEPT + 10);
        assert_eq!(events.len(), EVENTS_KEPT);
        assert_eq!(events[0].properties, [("event", "10".to_owned())]);
        let (tail, _) = log.since(EVENTS_KEPT + 8);
        assert_eq!(tail.len(), 2);
        assert_eq!(
            tail[1].properties,
            [("event", (EVENTS_KEPT + 9).to_string())]
        );
    }
}
