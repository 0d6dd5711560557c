//! Tests on real taps: creating one needs CAP_NET_ADMIN and /dev/net/tun,
//! so they are ignored by default; `cargo test -- --ignored` runs them (as
//! root), and the Python suite runs them by name where it can.

use super::*;

#[test]
#[ignore = "needs CAP_NET_ADMIN"]
fn config_space_and_queues() {
    let net = net("mac=12:34:56:78:9a:bc,mtu=1400,num_queues=4,queue_size=128");
    assert_eq!(net.device_type(), TYPE_NET);
    assert_eq!(net.queue_max_sizes(), vec![128; 5], "2 pairs and control");
    assert_ne!(net.features() & (F_MQ | F_MTU | F_CTRL_VQ), 0);
    let mut space = [0xffu8; 16];
    net.read_config(0, &mut space);
    assert_eq!(
        space,
        [0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 1, 0, 2, 0, 0x78, 0x05, 0, 0, 0, 0]
    );
    let mut status = [0u8; 2];
    net.read_config(6, &mut status);
    assert_eq!(u16::from_le_bytes(status), S_LINK_UP);
    let mut past = [0xffu8; 4];
    net.read_config(64, &mut past);
    assert_eq!(past, [0; 4]);
    net.read_config(u64::MAX, &mut past);
    assert_eq!(past, [0; 4]);
    // The host side got the MTU.
    assert_eq!(net.taps[0].mtu().unwrap(), 1400);
    assert_eq!(
        net.counters().keys().copied().collect::<Vec<_>>(),
        ["rx_bytes", "rx_frames", "tx_bytes", "tx_frames"]
    );
}

#[test]
#[ignore = "needs CAP_NET_ADMIN"]
fn a_created_tap_is_configured_and_removed_with_the_device() {
    let net = net("ip=192.168.231.1,mask=255.255.255.0,host_mac=02:aa:bb:cc:dd:ee");
    let name = net.tap_name().to_owned();
    assert!(name.starts_with("vmtap"), "{name}");
    let sys = Path::new("/sys/class/net").join(&name);
    assert!(sys.exists());
    let flags = std::fs::read_to_string(sys.join("flags")).unwrap();
    let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap();
    assert_ne!(flags & 1, 0, "IFF_UP");
    assert_eq!(
        std::fs::read_to_string(sys.join("address")).unwrap().trim(),
        "02:aa:bb:cc:dd:ee"
    );
    let ifindex = std::fs::read_to_string(sys.join("ifindex")).unwrap();
    drop(net);
    // Another test may create a tap of the same name meanwhile: a new one.
    let now = std::fs::read_to_string(sys.join("ifindex")).ok();
    assert_ne!(now, Some(ifindex), "{name} outlived the device");
}

#[test]
#[ignore = "needs CAP_NET_ADMIN"]
fn bad_taps_and_fds_are_refused_by_name() {
    let long = NetConfig::parse("tap=averyveryverylongname").unwrap();
    let e = Net::new(&long, "_net0").err().unwrap();
    assert!(e.message.contains("tap=averyveryverylongname"), "{e}");
    assert!(e.message.contains("at most 15 bytes"), "{e}");
    let lo = NetConfig::parse("tap=lo").unwrap();
    let e = Net::new(&lo, "_net0").err().unwrap();
    assert!(e.message.contains("tap=lo: TUNSETIFF"), "{e}");
    assert!(e.message.contains("not a tap"), "{e}");

    let file = std::fs::File::open("/dev/null").unwrap();
    let fd = file.as_raw_fd();
    let e = Net::new(&NetConfig::parse(&format!("fd=[{fd}]")).unwrap(), "x")
        .err()
        .unwrap();
    assert!(
        e.message.contains(&format!("fd={fd}: not a tap device")),
        "{e}"
    );
    let e = Net::new(&NetConfig::parse("fd=[999999]").unwrap(), "x")
        .err()
        .unwrap();
    assert!(e.message.contains("fd=999999"), "{e}");

    // A tap descriptor opened by the caller is adopted (duplicated).
    let name = tap_name();
    let mine = Tap::open(&name, false).unwrap();
    let config = NetConfig::parse(&format!("fd=[{}]", mine.as_raw_fd())).unwrap();
    let adopted = Net::new(&config, "x").unwrap();
    assert_eq!(adopted.tap_name(), name);
    drop(adopted);
    assert!(
        tap::interface_exists(&name),
        "the caller's descriptor still holds it"
    );
}

#[test]
#[ignore = "needs CAP_NET_ADMIN"]
fn frames_go_both_ways_through_a_tap() {
    let acked = F_VERSION_1 | F_MAC | F_RING_EVENT_IDX;
    let TapRig {
        mut net,
        socket,
        memory,
        mut rx,
        mut tx,
        signals,
    } = tap_rig("mac=12:34:56:78:9a:bc", acked);

    // Transmit: header and frame in two descriptors.
    let out = frame(GUEST_MAC, b"vmkit-unit tx");
    memory.write_slice(&[0; 12], GuestAddress(0x50000)).unwrap();
    memory.write_slice(&out, GuestAddress(0x51000)).unwrap();
    tx.desc(0, 0x50000, 12, F_DESC_NEXT, 1);
    tx.desc(1, 0x51000, out.len() as u32, 0, 0);
    tx.publish(0);
    assert_eq!(tx.next_used(), (0, 0));
    assert_eq!(socket.expect(b"vmkit-unit tx"), out);
    assert!(signals.count(1) > 0);

    // The same through an indirect table of two descriptors.
    let indirect = frame(GUEST_MAC, b"vmkit-unit indirect");
    memory
        .write_slice(&indirect, GuestAddress(0x52000))
        .unwrap();
    let table = [(0x50000u64, 12u32, F_DESC_NEXT, 1u16), (0x52000, 60, 0, 0)];
    for (i, (addr, len, flags, next)) in table.into_iter().enumerate() {
        let at = 0x53000 + 16 * i as u64;
        memory.write_obj(addr, GuestAddress(at)).unwrap();
        memory.write_obj(len, GuestAddress(at + 8)).unwrap();
        memory.write_obj(flags, GuestAddress(at + 12)).unwrap();
        memory.write_obj(next, GuestAddress(at + 14)).unwrap();
    }
    tx.desc(2, 0x53000, 32, 4, 0);
    tx.publish(2);
    assert_eq!(tx.next_used(), (2, 0));
    assert_eq!(socket.expect(b"vmkit-unit indirect"), indirect);

    // Receive: the frame lands with a header (num_buffers 1).
    post_receive_buffers(&mut rx, 4, 2048);
    let back = frame([2, 0, 0, 0, 0, 1], b"vmkit-unit rx");
    socket.send(&back);
    let (header, got) = receive(&memory, &mut rx, b"vmkit-unit rx");
    assert_eq!(got, back);
    assert_eq!(header[10..12], [1, 0], "num_buffers");
    assert_eq!(header[0], 0, "no flags without GUEST_CSUM");
    assert!(signals.count(0) > 0);

    let counters = net.counters();
    assert_eq!((counters["tx_frames"], counters["tx_bytes"]), (2, 120));
    assert!(counters["rx_frames"] >= 1 && counters["rx_bytes"] >= 60);

    // A reset stops the workers; the device starts again.
    net.reset();
    assert!(net.workers.is_empty());
    let memory = self::memory();
    let (_rx, mut tx, _) = activate(&mut net, &memory, F_VERSION_1 | F_MAC);
    memory.write_slice(&[0; 12], GuestAddress(0x50000)).unwrap();
    let again = frame(GUEST_MAC, b"vmkit-unit again");
    memory.write_slice(&again, GuestAddress(0x5000c)).unwrap();
    tx.desc(3, 0x50000, 12 + again.len() as u32, 0, 0);
    tx.publish(3);
    assert_eq!(tx.next_used(), (3, 0));
    socket.expect(b"vmkit-unit again");
    assert_eq!(net.counters()["tx_frames"], 3);
}

#[test]
#[ignore = "needs CAP_NET_ADMIN"]
fn mergeable_buffers_spread_a_frame() {
    let TapRig {
        net: _net,
        socket,
        memory,
        mut rx,
        ..
    } = tap_rig("", F_VERSION_1 | F_MRG_RXBUF);
    // 1000-byte frame, 400-byte buffers: 1012 bytes in 3 buffers.
    let big = frame([2, 0, 0, 0, 0, 2], &[b'm'; 986]);
    assert_eq!(big.len(), 1000);
    post_receive_buffers(&mut rx, QSIZE, 400);
    socket.send(&big);
    let start = Instant::now();
    loop {
        assert!(start.elapsed() < Duration::from_secs(5), "frame not seen");
        let (id, len) = rx.next_used();
        let data = read(&memory, 0x100000 + u64::from(id) * 0x10000, len);
        let num_buffers = u16::from_le_bytes([data[10], data[11]]);
        let mut whole = data[VNET_HDR_LEN..].to_vec();
        // The other buffers of the frame are already published.
        for _ in 1..num_buffers {
            assert_ne!(rx.used_idx(), rx.seen(), "buffers published late");
            let (id, len) = rx.next_used();
            whole.extend(read(&memory, 0x100000 + u64::from(id) * 0x10000, len));
        }
        if whole == big {
            assert_eq!(num_buffers, 3);
            break;
        }
    }
}

#[test]
#[ignore = "needs CAP_NET_ADMIN"]
fn malformed_chains_are_returned_empty() {
    let TapRig {
        net,
        socket,
        memory,
        mut rx,
        mut tx,
        ..
    } = tap_rig("", F_VERSION_1);

    // Transmit: outside guest memory, a header cut short, a descriptor
    // loop, a next index past the ring, an address that wraps.
    tx.desc(0, MEM_SIZE - 8, 64, 0, 0);
    tx.publish(0);
    assert_eq!(tx.next_used(), (0, 0));
    tx.desc(1, 0x50000, 5, 0, 0);
    tx.publish(1);
    assert_eq!(tx.next_used(), (1, 0));
    tx.desc(2, 0x50000, 100, F_DESC_NEXT, 3);
    tx.desc(3, 0x50000, 100, F_DESC_NEXT, 2);
    tx.publish(2);
    assert_eq!(tx.next_used(), (2, 0));
    tx.desc(4, 0x50000, 100, F_DESC_NEXT, 999);
    tx.publish(4);
    assert_eq!(tx.next_used(), (4, 0));
    tx.desc(5, u64::MAX - 4, 100, 0, 0);
    tx.publish(5);
    assert_eq!(tx.next_used(), (5, 0));
    assert_eq!(net.counters()["tx_frames"], 0);
    assert_eq!(net.counters_handle().tx_dropped.load(Ordering::SeqCst), 5);

    // Receive: a buffer outside memory and a looping one come back
    // empty; the frame lands in the good one after them.
    rx.desc(0, MEM_SIZE - 16, 2048, F_DESC_WRITE, 0);
    rx.desc(1, 0x100000, 100, F_DESC_WRITE | F_DESC_NEXT, 2);
    rx.desc(2, 0x100000, 100, F_DESC_WRITE | F_DESC_NEXT, 1);
    rx.desc(3, 0x130000, 2048, F_DESC_WRITE, 0);
    for head in [0, 1, 3] {
        rx.publish(head);
    }
    let ping = frame([2, 0, 0, 0, 0, 3], b"vmkit-unit after bad");
    // The host may send its own traffic first: keep sending ours.
    let mut seen_bad = 0;
    let mut delivered = false;
    let start = Instant::now();
    socket.send(&ping);
    while !delivered {
        assert!(start.elapsed() < Duration::from_secs(5));
        let (id, len) = rx.next_used();
        match id {
            0 | 1 => {
                assert_eq!(len, 0);
                seen_bad += 1;
            }
            3 => {
                let data = read(&memory, 0x130000, len);
                if data[VNET_HDR_LEN..].starts_with(&ping) {
                    delivered = true;
                } else {
                    rx.publish(3);
                }
            }
            other => panic!("unexpected id {other}"),
        }
    }
    assert_eq!(seen_bad, 2);

    // A frame larger than every buffer (no MRG_RXBUF) is dropped, and
    // the buffer serves the next frame.
    rx.desc(4, 0x140000, 200, F_DESC_WRITE, 0);
    rx.publish(4);
    socket.send(&frame([2, 0, 0, 0, 0, 3], &[b'x'; 400]));
    let small = frame([2, 0, 0, 0, 0, 3], b"vmkit-unit small");
    socket.send(&small);
    loop {
        let (id, len) = rx.next_used();
        assert_eq!(id, 4);
        let data = read(&memory, 0x140000, len);
        if data[VNET_HDR_LEN..].starts_with(&small) {
            break;
        }
        rx.publish(4);
    }
    assert!(net.counters_handle().rx_dropped.load(Ordering::SeqCst) >= 1);
    // The device is still working: nothing pending, nothing spinning.
    rx.assert_idle(Duration::from_millis(50));
}

#[test]
#[ignore = "needs CAP_NET_ADMIN"]
fn control_queue_sets_pairs_and_offloads() {
    let name = tap_name();
    let mut net = net(&format!("tap={name},num_queues=4"));
    assert_eq!(net.taps.len(), 2);
    let memory = memory();
    let acked = F_VERSION_1 | F_MQ | F_CTRL_VQ | F_CTRL_GUEST_OFFLOADS | F_GUEST_CSUM;
    let mut ctrl_ring = activate_mq(&mut net, &memory, acked);
    assert_eq!(net.workers.len(), 2, "one worker per pair");
    let ctrl = &mut ctrl_ring;
    let command = |ctrl: &mut Driver, bytes: &[u8]| -> u8 {
        memory.write_slice(bytes, GuestAddress(0x80000)).unwrap();
        memory.write_obj(0xeeu8, GuestAddress(0x81000)).unwrap();
        ctrl.desc(0, 0x80000, bytes.len() as u32, F_DESC_NEXT, 1);
        ctrl.desc(1, 0x81000, 1, F_DESC_WRITE, 0);
        ctrl.publish(0);
        assert_eq!(ctrl.next_used(), (0, 1));
        memory.read_obj(GuestAddress(0x81000)).unwrap()
    };
    assert_eq!(
        command(ctrl, &[CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, 2, 0]),
        CTRL_OK
    );
    assert!(net.taps[1].is_attached());
    assert_eq!(
        command(ctrl, &[CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, 1, 0]),
        CTRL_OK
    );
    assert!(!net.taps[1].is_attached());
    assert_eq!(
        command(ctrl, &[CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, 3, 0]),
        CTRL_ERR
    );
    assert_eq!(
        command(ctrl, &[CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, 0, 0]),
        CTRL_ERR
    );
    assert_eq!(command(ctrl, &[CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET]), CTRL_ERR);
    let set = |offloads: u64| {
        let mut c = vec![CTRL_GUEST_OFFLOADS, CTRL_GUEST_OFFLOADS_SET];
        c.extend_from_slice(&offloads.to_le_bytes());
        c
    };
    assert_eq!(command(ctrl, &set(F_GUEST_CSUM)), CTRL_OK);
    assert_eq!(command(ctrl, &set(0)), CTRL_OK);
    assert_eq!(
        command(ctrl, &set(F_GUEST_TSO4)),
        CTRL_ERR,
        "not negotiated"
    );
    assert_eq!(command(ctrl, &[0, 0, 1]), CTRL_ERR, "RX mode: not offered");
    assert_eq!(command(ctrl, &[]), CTRL_ERR);
    net.reset();
}

/// Activates `net` with both pairs' queues and the control queue; returns
/// the control queue's driver side.
fn activate_mq(net: &mut Net, memory: &GuestMemoryMmap, acked: u64) -> Driver {
    let mut queues = Vec::new();
    let mut rings = Vec::new();
    for index in 0..5u16 {
        let (ring, active) = ring(memory, index, 0x10000 * (u64::from(index) + 1));
        rings.push(ring);
        queues.push(active);
    }
    net.activate(Activation {
        spawner: crate::seccomp::Spawner::unconfined(),
        memory: memory.clone(),
        interrupt: Arc::new(FakeInterrupt::default()),
        queues,
        acked_features: acked,
    })
    .unwrap();
    rings.pop().unwrap()
}

#[test]
#[ignore = "needs CAP_NET_ADMIN"]
fn control_settings_outlive_a_stop_for_a_snapshot_and_travel_in_it() {
    let name = tap_name();
    let options = format!("tap={name},num_queues=4");
    let mut net = net(&options);
    let memory = memory();
    let acked = F_VERSION_1 | F_MQ | F_CTRL_VQ | F_CTRL_GUEST_OFFLOADS | F_GUEST_CSUM;
    let mut ctrl = activate_mq(&mut net, &memory, acked);
    memory
        .write_slice(
            &[CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, 2, 0],
            GuestAddress(0x80000),
        )
        .unwrap();
    ctrl.desc(0, 0x80000, 4, F_DESC_NEXT, 1);
    ctrl.desc(1, 0x81000, 1, F_DESC_WRITE, 0);
    ctrl.publish(0);
    assert_eq!(ctrl.next_used(), (0, 1));
    assert_eq!(
        memory.read_obj::<u8>(GuestAddress(0x81000)).unwrap(),
        CTRL_OK
    );
    assert!(net.taps[1].is_attached());

    // A stop for a snapshot is no reset: the second pair stays in use.
    net.stop_quiesced();
    activate_mq(&mut net, &memory, acked);
    assert!(
        net.taps[1].is_attached(),
        "the driver's pairs were forgotten"
    );
    net.stop_quiesced();
    let saved = net.save_device_state();

    // Restored into another device (a restore's, a migration receiver's).
    let mut restored = super::net(&options);
    restored.restore_device_state(&saved).unwrap();
    activate_mq(&mut restored, &memory, acked);
    assert!(restored.taps[1].is_attached());
    restored.reset();

    // The bytes are checked: a snapshot is user input.
    for bad in [
        &saved[..3],
        &[3, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        &[1, 0, 0, 0, 0, 0, 1, 0, 0, 0],
    ] {
        assert!(restored.restore_device_state(bad).is_err(), "{bad:?}");
    }
    assert!(net.restore_device_state(&[]).is_err());

    // A driver reset forgets them.
    net.reset();
    assert_eq!(net.save_device_state(), [0; 10]);
}

#[test]
#[ignore = "needs CAP_NET_ADMIN"]
fn transmit_rate_limit_delays_frames() {
    let name = tap_name();
    // One frame per 100 ms after the first.
    let mut net = net(&format!("tap={name},ops_size=1,ops_refill_time=100"));
    let memory = memory();
    let (_rx, mut tx, _) = activate(&mut net, &memory, F_VERSION_1);
    let out = frame(GUEST_MAC, b"vmkit-unit limited");
    let start = Instant::now();
    for i in 0..4u16 {
        let addr = 0x50000 + u64::from(i) * 0x1000;
        memory.write_slice(&[0; 12], GuestAddress(addr)).unwrap();
        memory.write_slice(&out, GuestAddress(addr + 12)).unwrap();
        tx.desc(i, addr, 72, 0, 0);
        tx.publish(i);
    }
    for i in 0..4u16 {
        assert_eq!(tx.next_used(), (i, 0));
    }
    let elapsed = start.elapsed();
    assert!(elapsed >= Duration::from_millis(280), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    assert_eq!(net.counters()["tx_frames"], 4);
}

/// CPU ticks (user + system) of this process's thread named `comm`.
fn thread_ticks(comm: &str) -> u64 {
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if name.trim() == comm {
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap();
            let fields: Vec<&str> = stat
                .rsplit_once(')')
                .unwrap()
                .1
                .split_whitespace()
                .collect();
            return fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        }
    }
    panic!("no thread {comm}");
}

#[test]
#[ignore = "needs CAP_NET_ADMIN"]
fn frames_wait_for_buffers_without_spinning_or_loss() {
    let name = tap_name();
    let config = NetConfig::parse(&format!("tap={name}")).unwrap();
    let mut net = Net::new(&config, "nospin").unwrap();
    let socket = PacketSocket::open(&name);
    let memory = memory();
    let (mut rx, _tx, _) = activate(&mut net, &memory, F_VERSION_1 | F_RING_EVENT_IDX);
    for i in 0..5u8 {
        socket.send(&frame([2, 0, 0, 0, 0, 4], &[b'w', b'0' + i]));
    }
    std::thread::sleep(Duration::from_millis(50));
    let before = thread_ticks("nospin_qp0");
    std::thread::sleep(Duration::from_millis(400));
    let spent = thread_ticks("nospin_qp0") - before;
    assert!(spent <= 5, "the worker used {spent} ticks while waiting");
    // Buffers come: every frame arrives, in order.
    post_receive_buffers(&mut rx, QSIZE, 2048);
    for i in 0..5u8 {
        let (_, got) = receive(&memory, &mut rx, &[b'w', b'0' + i]);
        assert_eq!(got.len(), 60);
    }
}

#[test]
#[ignore = "needs CAP_NET_ADMIN"]
fn many_frames_wrap_the_rings_intact_and_in_order() {
    let acked = F_VERSION_1 | F_MRG_RXBUF | F_RING_EVENT_IDX;
    let TapRig {
        net,
        socket,
        memory,
        mut rx,
        mut tx,
        ..
    } = tap_rig("", acked);
    post_receive_buffers(&mut rx, QSIZE, 512);
    let frames: Vec<Vec<u8>> = (0..100u32)
        .map(|n| {
            let mut payload = format!("many {n:03} ").into_bytes();
            payload.resize(46 + (n as usize * 37) % 1400, n as u8);
            frame([2, 0, 0, 0, 0, 5], &payload)
        })
        .collect();
    let mut expected = frames.iter();
    let mut next = expected.next();
    let mut sent = 0;
    while let Some(want) = next {
        // Keep a few frames in flight, not more than the tap queue holds.
        while sent < frames.len() && sent < frames.len().min(40 + rx.seen() as usize / 2) {
            socket.send(&frames[sent]);
            sent += 1;
        }
        let (id, len) = rx.next_used();
        let mut whole = read(&memory, 0x100000 + u64::from(id) * 0x10000, len);
        let num_buffers = u16::from_le_bytes([whole[10], whole[11]]);
        rx.publish(id);
        whole.drain(..VNET_HDR_LEN);
        for _ in 1..num_buffers {
            let (id, len) = rx.next_used();
            whole.extend(read(&memory, 0x100000 + u64::from(id) * 0x10000, len));
            rx.publish(id);
        }
        if whole[12..14] == [0x88, 0xb5] && whole[14..].starts_with(b"many ") {
            assert_eq!(
                &whole,
                want,
                "frame {}",
                String::from_utf8_lossy(&whole[14..22])
            );
            next = expected.next();
        }
    }

    // And 100 out, through 16 descriptors.
    for n in 0..100u16 {
        let i = n % QSIZE;
        let addr = 0x200000 + u64::from(i) * 0x1000;
        let out = frame(GUEST_MAC, format!("out {n:03}").as_bytes());
        memory.write_slice(&[0; 12], GuestAddress(addr)).unwrap();
        memory.write_slice(&out, GuestAddress(addr + 12)).unwrap();
        tx.desc(i, addr, 72, 0, 0);
        tx.publish(i);
        assert_eq!(tx.next_used(), (i, 0));
        socket.expect(format!("out {n:03}").as_bytes());
    }
    assert_eq!(net.counters()["tx_frames"], 100);
    assert!(net.counters()["rx_frames"] >= 100);
}

#[test]
#[ignore = "needs CAP_NET_ADMIN"]
fn a_broken_ring_is_reported_and_the_other_queue_goes_on() {
    capture_logs();
    let name = tap_name();
    let config = NetConfig::parse(&format!("tap={name}")).unwrap();
    let mut net = Net::new(&config, "__net_broken").unwrap();
    let socket = PacketSocket::open(&name);
    let memory = memory();
    let (mut rx, tx, signals) = activate(&mut net, &memory, F_VERSION_1);
    // The transmit ring's available index far ahead of the device.
    memory
        .write_obj(1000u16, GuestAddress(tx.avail + 2))
        .unwrap();
    tx.kick();
    wait_until("the reset request", || signals.needs_reset_count() == 1);
    assert_eq!(signals.config_count(), 1, "configuration change");
    let lines = logged("__net_broken: queue 1 stopped");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("the driver broke the ring"), "{lines:?}");
    // Receive still works until the driver resets the device.
    post_receive_buffers(&mut rx, 4, 2048);
    let back = frame([2, 0, 0, 0, 0, 6], b"vmkit-unit after broken tx");
    socket.send(&back);
    let (_, got) = receive(&memory, &mut rx, b"vmkit-unit after broken tx");
    assert_eq!(got, back);
    net.reset();
}

#[test]
#[ignore = "needs CAP_NET_ADMIN"]
fn stopping_for_a_snapshot_gives_back_the_buffers_a_waiting_frame_holds() {
    let TapRig {
        mut net,
        socket,
        mut rx,
        ..
    } = tap_rig("", F_VERSION_1 | F_MRG_RXBUF);
    // A 1000-byte frame needs three 400-byte buffers: with two posted, the
    // device takes them and waits for a third.
    post_receive_buffers(&mut rx, 2, 400);
    socket.send(&frame([2, 0, 0, 0, 0, 3], &[b'w'; 986]));
    std::thread::sleep(Duration::from_millis(200));
    net.stop_quiesced();
    // Every buffer it took is back (empty, or holding other host traffic):
    // a restored device goes on from the used ring's index.
    assert_eq!(rx.used_idx(), 2, "the device kept buffers it had taken");
}
