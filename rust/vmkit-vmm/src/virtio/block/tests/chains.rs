//! Malformed chains: loops, overlong chains, buffers outside memory or
//! pointing the wrong way, missing status bytes, bad indirect tables.

use super::*;

#[test]
fn descriptor_loops_are_dropped() {
    for io_uring in [false, true] {
        let mut h = harness(io_uring);
        let header = h.driver.header(VIRTIO_BLK_T_IN, 0);
        let data = h.driver.alloc(512, 512);
        // 0 -> 1 -> 0 -> ...
        h.driver.set_desc(0, 0, header, 16, NEXT, 1);
        h.driver.set_desc(0, 1, data, 512, WRITE | NEXT, 0);
        h.driver.publish(0);
        h.run();
        h.assert_dropped(0);

        // A descriptor pointing at itself.
        h.driver.set_desc(0, 5, data, 1, WRITE | NEXT, 5);
        h.driver.publish(5);
        h.run();
        h.assert_dropped(5);

        // The queue still works.
        h.driver.next_desc = 8;
        let read = h.request(VIRTIO_BLK_T_IN, 0, Data::In(512));
        h.assert_done(&read, STATUS_OK, 513);
    }
}

#[test]
fn chains_longer_than_allowed_get_an_error() {
    let mut h = harness(false);
    let header = h.driver.header(VIRTIO_BLK_T_IN, 0);
    let status = h.driver.status();
    let data = h.driver.alloc(512, 512);
    // Longer than the queue (16) and than MAX_CHAIN_DESCRIPTORS.
    let mut parts = vec![(header, 16, 0)];
    parts.extend(std::iter::repeat_n((data, 0, WRITE), MAX_CHAIN_DESCRIPTORS));
    parts.push((status, 1, WRITE));
    let head = h.driver.add_indirect(&parts);
    h.run();
    assert_eq!(h.driver.byte(status), STATUS_IOERR);
    assert_eq!(h.driver.last_used(), (u32::from(head), 1));

    // A direct chain that runs off the end of the table.
    h.driver.set_desc(0, 15, header, 16, NEXT, 16);
    h.driver.publish(15);
    h.run();
    h.assert_dropped(15);
}

#[test]
fn buffers_outside_guest_memory_are_refused() {
    for io_uring in [false, true] {
        let mut h = harness(io_uring);
        let header = h.driver.header(VIRTIO_BLK_T_IN, 0);
        for (addr, len) in [
            (MEM_SIZE - 256, 512),
            (MEM_SIZE, 512),
            (1 << 40, 512),
            (u64::MAX - 100, 512),
            (u64::MAX - 511, 512),
        ] {
            let status = h.driver.status();
            let head =
                h.driver
                    .add_chain(&[(header, 16, 0), (addr, len, WRITE), (status, 1, WRITE)]);
            h.run();
            assert_eq!(h.driver.byte(status), STATUS_IOERR, "data at {addr:#x}");
            assert_eq!(h.driver.last_used(), (u32::from(head), 1));
            let status = h.driver.status();
            let head = h
                .driver
                .add_chain(&[(header, 16, 0), (addr, len, 0), (status, 1, WRITE)]);
            h.run();
            assert_eq!(h.driver.byte(status), STATUS_IOERR);
            assert_eq!(h.driver.last_used(), (u32::from(head), 1));
        }
        // A header that is not in memory.
        let status = h.driver.status();
        let head = h
            .driver
            .add_chain(&[(MEM_SIZE - 8, 16, 0), (status, 1, WRITE)]);
        h.run();
        assert_eq!(h.driver.byte(status), STATUS_IOERR);
        assert_eq!(h.driver.last_used(), (u32::from(head), 1));
        // A status byte that is not in memory, or whose address wraps.
        for (addr, len) in [
            (MEM_SIZE, 1),
            (MEM_SIZE - 1, 2),
            (u64::MAX, 2),
            (u64::MAX - 1, u32::MAX),
        ] {
            let head = h.driver.add_chain(&[(header, 16, 0), (addr, len, WRITE)]);
            h.run();
            h.assert_dropped(head);
        }
        assert_eq!(h.image.contents(), patterned(0, IMAGE_LEN));
    }
}

#[test]
fn data_buffers_must_point_the_right_way() {
    let mut h = harness(false);
    // A read whose data buffer is device-readable.
    let header = h.driver.header(VIRTIO_BLK_T_IN, 0);
    let data = h.driver.alloc(512, 512);
    h.driver.write(data, &[0xaa; 512]);
    let status = h.driver.status();
    let head = h
        .driver
        .add_chain(&[(header, 16, 0), (data, 512, 0), (status, 1, WRITE)]);
    h.run();
    assert_eq!(h.driver.byte(status), STATUS_IOERR);
    assert_eq!(h.driver.last_used(), (u32::from(head), 1));
    assert_eq!(h.driver.read(data, 512), vec![0xaa; 512]);

    // A write whose data buffer is device-writable.
    let header = h.driver.header(VIRTIO_BLK_T_OUT, 0);
    let status = h.driver.status();
    let head = h
        .driver
        .add_chain(&[(header, 16, 0), (data, 512, WRITE), (status, 1, WRITE)]);
    h.run();
    assert_eq!(h.driver.byte(status), STATUS_IOERR);
    assert_eq!(h.driver.last_used(), (u32::from(head), 1));
    assert_eq!(h.driver.read(data, 512), vec![0xaa; 512]);

    // Device-readable after device-writable.
    let header = h.driver.header(VIRTIO_BLK_T_IN, 0);
    let status = h.driver.status();
    let head = h.driver.add_chain(&[
        (header, 16, 0),
        (data, 512, WRITE),
        (data, 512, 0),
        (status, 1, WRITE),
    ]);
    h.run();
    assert_eq!(h.driver.byte(status), STATUS_IOERR);
    assert_eq!(h.driver.last_used(), (u32::from(head), 1));
    // A header split over two descriptors is fine (any layout).
    let header = h.driver.header(VIRTIO_BLK_T_IN, 1);
    let status = h.driver.status();
    h.driver.add_chain(&[
        (header, 5, 0),
        (header + 5, 11, 0),
        (data, 512, WRITE),
        (status, 1, WRITE),
    ]);
    h.run();
    assert_eq!(h.driver.byte(status), STATUS_OK);
    assert_eq!(h.driver.read(data, 512), patterned(512, 512));
    assert_eq!(h.image.contents(), patterned(0, IMAGE_LEN));
}

#[test]
fn chains_without_a_usable_status_byte_are_dropped() {
    let mut h = harness(false);
    let header = h.driver.header(VIRTIO_BLK_T_IN, 0);
    let data = h.driver.alloc(512, 512);
    let status = h.driver.status();
    // Status descriptor read-only.
    let head = h
        .driver
        .add_chain(&[(header, 16, 0), (data, 512, WRITE), (status, 1, 0)]);
    h.run();
    h.assert_dropped(head);
    // Status descriptor of length zero.
    let head = h
        .driver
        .add_chain(&[(header, 16, 0), (data, 512, WRITE), (status, 0, WRITE)]);
    h.run();
    h.assert_dropped(head);
    // No status descriptor at all.
    let head = h.driver.add_chain(&[(header, 16, 0)]);
    h.run();
    h.assert_dropped(head);
    assert_eq!(h.driver.byte(status), UNTOUCHED);
    assert_eq!(h.driver.read(data, 512), vec![0; 512]);
    // A header too short for the type and sector.
    let status = h.driver.status();
    let head = h.driver.add_chain(&[(header, 8, 0), (status, 1, WRITE)]);
    h.run();
    assert_eq!(h.driver.byte(status), STATUS_IOERR);
    assert_eq!(h.driver.last_used(), (u32::from(head), 1));
    // The status byte can share the last data descriptor.
    let status_and_data = h.driver.alloc(513, 512);
    h.driver
        .add_chain(&[(header, 16, 0), (status_and_data, 513, WRITE)]);
    h.run();
    assert_eq!(h.driver.byte(status_and_data + 512), STATUS_OK);
    assert_eq!(h.driver.last_used().1, 513);
    assert_eq!(h.driver.read(status_and_data, 512), patterned(0, 512));
}

#[test]
fn indirect_tables_are_checked() {
    for io_uring in [false, true] {
        let mut h = harness(io_uring);
        let header = h.driver.header(VIRTIO_BLK_T_IN, 4);
        let data = h.driver.alloc(1024, 512);
        let status = h.driver.status();
        let parts = [(header, 16, 0), (data, 1024, WRITE), (status, 1, WRITE)];
        h.driver.add_indirect(&parts);
        h.run();
        assert_eq!(h.driver.byte(status), STATUS_OK);
        assert_eq!(h.driver.last_used().1, 1025);
        assert_eq!(h.driver.read(data, 1024), patterned(4 * 512, 1024));

        let table = h.driver.alloc(16 * 3, 16);
        for (i, &(addr, len, flags)) in parts.iter().enumerate() {
            let flags = if i < 2 { flags | NEXT } else { flags };
            h.driver
                .set_desc(table, i as u16, addr, len, flags, i as u16 + 1);
        }
        // A table length that is not whole descriptors, zero, or beyond memory.
        for (addr, len) in [
            (table, 47),
            (table, 0),
            (MEM_SIZE - 16, 48),
            (u64::MAX - 15, 48),
        ] {
            let head = h.driver.add_chain(&[(addr, len, INDIRECT)]);
            h.run();
            h.assert_dropped(head);
        }
        // An indirect table inside an indirect table.
        let outer = h.driver.alloc(32, 16);
        h.driver.set_desc(outer, 0, header, 16, NEXT, 1);
        h.driver.set_desc(outer, 1, table, 48, INDIRECT, 0);
        let head = h.driver.add_chain(&[(outer, 32, INDIRECT)]);
        h.run();
        h.assert_dropped(head);
        // A loop inside a table.
        h.driver.set_desc(table, 1, data, 1024, WRITE | NEXT, 1);
        let head = h.driver.add_chain(&[(table, 48, INDIRECT)]);
        h.run();
        h.assert_dropped(head);
    }
}
