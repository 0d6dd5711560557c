//! The device with its worker threads: activation, reset, every queue.

use super::*;

#[test]
fn activation_runs_workers_that_stop_on_reset() {
    for io_uring in [false, true] {
        let image = TempImage::new(IMAGE_LEN);
        let mut config = disk_config(&image);
        config.disable_io_uring = !io_uring;
        let mut block = Block::new(&config, None).unwrap();
        let mem = guest_memory(MEM_SIZE);
        let mut driver = Driver::new(&mem, 16, 0);
        let interrupt = Arc::new(FakeInterrupt::default());
        let kicks = activate(&mut block, &mem, &interrupt, vec![(0, driver.queue(true))]);
        if io_uring && IoUring::new(8).is_ok() {
            assert!(block.io_uring_active());
        }

        let write = driver.request(VIRTIO_BLK_T_OUT, 1, Data::Out(vec![0xab; 512]));
        kicks[0].write(1).unwrap();
        wait_until("the write", || driver.used_idx() == 1);
        wait_until("the interrupt", || interrupt.count(0) == 1);
        assert_eq!(driver.status_of(&write), STATUS_OK);
        assert_eq!(&image.contents()[512..1024], &[0xab; 512][..]);
        assert_eq!(block.counters()["write_ops"], 1);

        // After reset nothing is processed.
        block.reset();
        assert!(!block.io_uring_active());
        let read = driver.request(VIRTIO_BLK_T_IN, 1, Data::In(512));
        kicks[0].write(1).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(driver.used_idx(), 1);
        assert_eq!(driver.status_of(&read), UNTOUCHED);

        // Activated again (on rings the driver set up again, here the
        // same ones where they were), the pending read is served.
        let mut queue = driver.queue(true);
        queue.set_next_avail(1);
        queue.set_next_used(1);
        let kicks = activate(&mut block, &mem, &interrupt, vec![(0, queue)]);
        kicks[0].write(1).unwrap();
        wait_until("the read", || driver.used_idx() == 2);
        assert_eq!(driver.status_of(&read), STATUS_OK);
        assert_eq!(driver.read(read.data, 512), vec![0xab; 512]);
        drop(block);
    }
}

#[test]
fn reset_with_requests_in_flight_returns_cleanly() {
    let image = TempImage::new(1 << 20);
    let mut block = Block::new(&disk_config(&image), None).unwrap();
    let mem = guest_memory(MEM_SIZE);
    let interrupt = Arc::new(FakeInterrupt::default());
    for _ in 0..20 {
        let mut driver = Driver::new(&mem, 16, 0);
        let kicks = activate(&mut block, &mem, &interrupt, vec![(0, driver.queue(false))]);
        for sector in 0..5 {
            driver.request(VIRTIO_BLK_T_IN, sector * 64, Data::In(64 * 1024));
        }
        kicks[0].write(1).unwrap();
        block.reset();
        let used = driver.used_idx();
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(driver.used_idx(), used, "nothing completes after reset");
    }
}

#[test]
fn every_queue_is_processed() {
    let image = TempImage::new(IMAGE_LEN);
    let mut config = disk_config(&image);
    config.num_queues = 2;
    let mut block = Block::new(&config, None).unwrap();
    assert_ne!(block.features() & F_MQ, 0);
    let mem = guest_memory(MEM_SIZE);
    let mut drivers = [Driver::new(&mem, 16, 0), Driver::new(&mem, 16, 0x8_0000)];
    let interrupt = Arc::new(FakeInterrupt::default());
    let queues = vec![(0, drivers[0].queue(false)), (1, drivers[1].queue(false))];
    let kicks = activate(&mut block, &mem, &interrupt, queues);
    let writes: Vec<Submitted> = drivers
        .iter_mut()
        .enumerate()
        .map(|(i, driver)| {
            driver.request(
                VIRTIO_BLK_T_OUT,
                10 + i as u64,
                Data::Out(vec![i as u8 + 1; 512]),
            )
        })
        .collect();
    for kick in &kicks {
        kick.write(1).unwrap();
    }
    for (i, driver) in drivers.iter().enumerate() {
        wait_until("both queues", || driver.used_idx() == 1);
        assert_eq!(driver.status_of(&writes[i]), STATUS_OK);
    }
    wait_until("both interrupts", || {
        interrupt.count(0) == 1 && interrupt.count(1) == 1
    });
    let contents = image.contents();
    assert_eq!(&contents[10 * 512..11 * 512], &[1; 512][..]);
    assert_eq!(&contents[11 * 512..12 * 512], &[2; 512][..]);
    assert_eq!(block.counters()["write_ops"], 2);
}

#[test]
fn a_broken_ring_is_reported_and_needs_a_reset() {
    capture_logs();
    for io_uring in [false, true] {
        let image = TempImage::new(IMAGE_LEN);
        let mut config = disk_config(&image);
        config.id = Some(format!("__blk_broken_{io_uring}"));
        config.disable_io_uring = !io_uring;
        let mut block = Block::new(&config, None).unwrap();
        let mem = guest_memory(MEM_SIZE);
        let mut driver = Driver::new(&mem, 16, 0);
        let interrupt = Arc::new(FakeInterrupt::default());
        let queues = vec![
            (0, driver.queue(false)),
            (1, Driver::new(&mem, 16, 0x8_0000).queue(false)),
        ];
        let kicks = activate(&mut block, &mem, &interrupt, queues);
        // One good request, then an available index far ahead of the device.
        let write = driver.request(VIRTIO_BLK_T_OUT, 1, Data::Out(vec![0xcd; 512]));
        kicks[0].write(1).unwrap();
        wait_until("the write", || driver.used_idx() == 1);
        assert_eq!(driver.status_of(&write), STATUS_OK);
        mem.write_obj(100u16, GuestAddress(driver.avail + 2))
            .unwrap();
        kicks[0].write(1).unwrap();
        wait_until("the reset request", || interrupt.needs_reset_count() == 1);
        assert_eq!(interrupt.config_count(), 1, "configuration change");
        let lines = logged(&format!("__blk_broken_{io_uring}: queue 0 stopped"));
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].starts_with("ERROR"), "{lines:?}");
        // The broken queue is left alone; more kicks report nothing more.
        kicks[0].write(1).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(interrupt.needs_reset_count(), 1);
        block.reset();
    }
}

#[test]
fn a_queue_error_in_the_handler_is_reported_once() {
    capture_logs();
    let mut h = Harness::new(IMAGE_LEN, false, |c| c.id = Some("__blk_handler".into()));
    h.driver
        .mem
        .write_obj(40u16, GuestAddress(h.driver.avail + 2))
        .unwrap();
    h.run();
    assert!(h.handler.broken);
    assert_eq!(h.interrupt.needs_reset_count(), 1);
    assert_eq!(h.interrupt.config_count(), 1);
    assert_eq!(logged("__blk_handler: queue 0 stopped").len(), 1);
    // Ignored from now on: no second report, nothing used.
    h.run();
    assert_eq!(h.interrupt.needs_reset_count(), 1);
    assert_eq!(h.driver.used_idx(), 0);
}

/// A queue placed on the vCPU threads: the notifying thread serves it, and
/// a request of the synchronous engine is done (data in the buffer, status
/// and used entry written, the driver signalled) when the call returns.
#[test]
fn a_notification_served_on_the_vcpu_thread_is_done_when_it_returns() {
    let h = harness(false);
    let mut driver = h.driver;
    let handler = Harness::handler_for(&h.block, &h.mem, &driver, &h.interrupt);
    let shared = SharedQueue::new(handler, Arc::new(AtomicBool::new(true)), None);
    let read = driver.request(VIRTIO_BLK_T_IN, 3, Data::In(1024));
    let write = driver.request(VIRTIO_BLK_T_OUT, 8, Data::Out(vec![0x5a; 512]));
    assert!(shared.serve_here());
    assert_eq!(driver.used_idx(), 2);
    assert_eq!(driver.status_of(&read), STATUS_OK);
    assert_eq!(driver.read(read.data, 1024), patterned(3 * 512, 1024));
    assert_eq!(driver.status_of(&write), STATUS_OK);
    assert_eq!(&h.image.contents()[8 * 512..9 * 512], &[0x5a; 512][..]);
    assert_eq!(h.interrupt.count(0), 1);
    // Notifications were left on: the driver notifies the next request.
    let used_flags: u16 = h.mem.read_obj(GuestAddress(driver.used)).unwrap();
    assert_eq!(used_flags & 1, 0, "VRING_USED_F_NO_NOTIFY");
    let again = driver.request(VIRTIO_BLK_T_IN, 0, Data::In(512));
    assert!(shared.serve_here());
    assert_eq!(driver.status_of(&again), STATUS_OK);
}

/// The vCPU thread never waits for the worker: while the worker holds the
/// queue, the notification is left to it (the transport kicks it).
#[test]
fn a_vcpu_thread_never_waits_for_a_busy_worker() {
    let h = harness(false);
    let handler = Harness::handler_for(&h.block, &h.mem, &h.driver, &h.interrupt);
    let shared = Arc::new(SharedQueue::new(
        handler,
        Arc::new(AtomicBool::new(true)),
        None,
    ));
    let (held, release) = (std::sync::Barrier::new(2), std::sync::Barrier::new(2));
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let worker = QueueWorker(Arc::clone(&shared));
            let _guard = worker.0.lock_for_test();
            held.wait();
            release.wait();
        });
        held.wait();
        let start = Instant::now();
        assert!(!shared.serve_here());
        assert!(start.elapsed() < Duration::from_secs(1));
        release.wait();
    });
    assert!(shared.serve_here());
}

/// A vCPU thread under its own seccomp filter (trap mode: a call outside
/// it kills the process) serves reads, writes and a flush on either engine,
/// and reads the CPU pressure its queue's placement needs.
#[test]
fn a_vcpu_thread_under_its_filter_serves_the_queue() {
    use crate::seccomp::{spawn_confined, SeccompMode, ThreadGroups, ThreadKind};
    super::super::placement::open_cpu_pressure();
    for io_uring in [false, true] {
        let h = harness(io_uring);
        let mut driver = h.driver;
        let handler = Harness::handler_for(&h.block, &h.mem, &driver, &h.interrupt);
        let shared = Arc::new(SharedQueue::new(
            handler,
            Arc::new(AtomicBool::new(true)),
            None,
        ));
        let read = driver.request(VIRTIO_BLK_T_IN, 2, Data::In(2048));
        let write = driver.request(VIRTIO_BLK_T_OUT, 20, Data::Out(vec![0xc3; 1024]));
        let flush = driver.request(VIRTIO_BLK_T_FLUSH, 0, Data::None);
        let psi = std::path::Path::new("/proc/pressure/cpu").exists();
        let on_vcpu = Arc::clone(&shared);
        let vcpu = spawn_confined(
            "vcpu-test".into(),
            ThreadKind::Vcpu,
            SeccompMode::Trap,
            &ThreadGroups::default(),
            move || {
                assert!(on_vcpu.serve_here());
                let pressure = super::super::placement::cpu_stalled_us();
                assert_eq!(pressure.is_some(), psi);
            },
        )
        .unwrap();
        vcpu.join().expect("the vCPU thread served the queue");
        // io_uring completions the submission did not see are reaped here.
        wait_until("every request", || {
            shared.serve_here();
            driver.used_idx() == 3
        });
        for request in [&read, &write, &flush] {
            assert_eq!(driver.status_of(request), STATUS_OK, "io_uring: {io_uring}");
        }
        assert_eq!(driver.read(read.data, 2048), patterned(1024, 2048));
        assert_eq!(&h.image.contents()[20 * 512..22 * 512], &[0xc3; 1024][..]);
    }
}
