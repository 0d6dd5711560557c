//! Rate limiting: per disk, per group, by operations and by bytes.

use super::*;

fn ops_limit(size: u64, refill_ms: u64) -> RateLimiterConfig {
    RateLimiterConfig {
        bandwidth: None,
        ops: Some(TokenBucketConfig {
            size,
            one_time_burst: None,
            refill_time: refill_ms,
        }),
    }
}

#[test]
fn the_rate_limiter_holds_the_configured_rate() {
    let image = TempImage::new(IMAGE_LEN);
    let mut config = disk_config(&image);
    config.queue_size = 1024;
    // 200 requests per second, 10 at once.
    config.rate_limiter_config = Some(ops_limit(10, 50));
    let mut block = Block::new(&config, None).unwrap();
    let mem = guest_memory(MEM_SIZE);
    let mut driver = Driver::new(&mem, 1024, 0);
    let data = driver.alloc(512, 512);
    const REQUESTS: u16 = 200;
    for _ in 0..REQUESTS {
        let header = driver.header(VIRTIO_BLK_T_IN, 0);
        let status = driver.status();
        driver.add_chain(&[(header, 16, 0), (data, 512, WRITE), (status, 1, WRITE)]);
    }
    let interrupt = Arc::new(FakeInterrupt::default());
    let kicks = activate(&mut block, &mem, &interrupt, vec![(0, driver.queue(false))]);
    let start = Instant::now();
    kicks[0].write(1).unwrap();
    wait_until("all requests", || driver.used_idx() == REQUESTS);
    let elapsed = start.elapsed().as_secs_f64();
    // The first 10 go at once, the other 190 at 200/s.
    let expected = f64::from(REQUESTS - 10) / 200.0;
    assert!(
        (elapsed - expected).abs() <= expected * 0.1,
        "{elapsed:.3} s, expected {expected:.3} s"
    );
    assert_eq!(block.counters()["read_ops"], u64::from(REQUESTS));
}

#[test]
fn a_group_limiter_is_shared_between_disks() {
    let group = Arc::new(SharedRateLimiter::new(&ops_limit(3, 3_600_000)));
    let images = [TempImage::new(IMAGE_LEN), TempImage::new(IMAGE_LEN)];
    let mut harnesses: Vec<(Block, Driver, QueueHandler)> = images
        .iter()
        .map(|image| {
            let block = Block::new(&disk_config(image), Some(Arc::clone(&group))).unwrap();
            let mem = guest_memory(MEM_SIZE);
            let driver = Driver::new(&mem, 16, 0);
            let handler = Harness::handler_for(&block, &mem, &driver, &Arc::default());
            (block, driver, handler)
        })
        .collect();
    {
        let (_, driver, handler) = &mut harnesses[0];
        driver.request(VIRTIO_BLK_T_FLUSH, 0, Data::None);
        driver.request(VIRTIO_BLK_T_FLUSH, 0, Data::None);
        handler.run_until_idle();
        assert_eq!(driver.used_idx(), 2);
    }
    let (_, driver, handler) = &mut harnesses[1];
    driver.request(VIRTIO_BLK_T_FLUSH, 0, Data::None);
    let held = driver.request(VIRTIO_BLK_T_FLUSH, 0, Data::None);
    handler.run_until_idle();
    assert_eq!(driver.used_idx(), 1);
    assert!(handler.throttled);
    // Kicks while throttled change nothing; the request stays available.
    handler.run_until_idle();
    assert_eq!(driver.used_idx(), 1);
    assert_eq!(driver.status_of(&held), UNTOUCHED);
    // A token comes back; the timer firing resumes the queue.
    group.give_back(1, 0);
    handler.timer_ready();
    handler.run_until_idle();
    assert_eq!(driver.used_idx(), 2);
    assert_eq!(driver.status_of(&held), STATUS_OK);
}

#[test]
fn a_bandwidth_limit_counts_bytes() {
    let mut h = Harness::new(IMAGE_LEN, false, |c| {
        c.rate_limiter_config = Some(RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig {
                size: 2048,
                one_time_burst: None,
                refill_time: 3_600_000,
            }),
            ops: None,
        })
    });
    h.request(VIRTIO_BLK_T_IN, 0, Data::In(1024));
    h.request(VIRTIO_BLK_T_FLUSH, 0, Data::None);
    assert_eq!(h.driver.used_idx(), 2);
    // 1024 bytes left: a 1536-byte read waits.
    h.request(VIRTIO_BLK_T_IN, 0, Data::In(1536));
    assert_eq!(h.driver.used_idx(), 2);
    assert!(h.handler.throttled);
}

#[test]
fn a_wait_longer_than_a_timespec_still_holds_the_queue() {
    let mut h = Harness::new(IMAGE_LEN, false, |c| {
        c.rate_limiter_config = Some(ops_limit(1, 100))
    });
    // Duration::MAX is a negative time_t: unarmed, the request would run.
    assert!(h.handler.throttle(Duration::MAX), "the timer was armed");
    assert!(h.handler.throttled);
}
