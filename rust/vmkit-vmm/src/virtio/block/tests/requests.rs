//! Requests a well-behaved driver sends: what reaches the disk and what the
//! guest gets back, with io_uring and the synchronous engine.

use super::*;

#[test]
fn io_uring_is_used_where_the_kernel_has_it() {
    let h = harness(true);
    match IoUring::new(8) {
        Ok(_) => assert!(h.handler.uring.is_some()),
        Err(e) => eprintln!("io_uring unavailable here ({e}): synchronous fallback only"),
    }
    assert!(harness(false).handler.uring.is_none());
}

#[test]
fn read_write_flush_and_get_id_round_trip() {
    for io_uring in [false, true] {
        let mut h = harness(io_uring);
        let data: Vec<u8> = (0..1024u32).map(|i| (i * 7 % 256) as u8).collect();
        let write = h.request(VIRTIO_BLK_T_OUT, 3, Data::Out(data.clone()));
        h.assert_done(&write, STATUS_OK, 1);
        assert_eq!(&h.image.contents()[3 * 512..5 * 512], &data[..]);

        let read = h.request(VIRTIO_BLK_T_IN, 2, Data::In(1536));
        h.assert_done(&read, STATUS_OK, 1537);
        let mut expected = patterned(1024, 512);
        expected.extend_from_slice(&data);
        assert_eq!(h.driver.read(read.data, 1536), expected);

        let flush = h.request(VIRTIO_BLK_T_FLUSH, 0, Data::None);
        h.assert_done(&flush, STATUS_OK, 1);

        let id = h.request(VIRTIO_BLK_T_GET_ID, 0, Data::In(20));
        h.assert_done(&id, STATUS_OK, 21);
        assert_eq!(h.driver.read(id.data, 20), SERIAL.as_bytes());

        assert!(h.interrupt.count(0) >= 4, "one signal per run at least");
        assert_eq!(h.image.contents().len() as u64, IMAGE_LEN);
    }
}

#[test]
fn contiguous_requests_in_one_batch_are_merged_and_all_complete() {
    for io_uring in [true, false] {
        merged_batch_round_trip(io_uring);
    }
}

fn merged_batch_round_trip(io_uring: bool) {
    let mut h = harness(io_uring);
    // Three contiguous writes and one elsewhere, all in one batch.
    let parts: Vec<Vec<u8>> = (0..4u8).map(|i| vec![0x10 + i; 1024]).collect();
    let sectors = [8u64, 10, 12, 40];
    let submitted: Vec<_> = parts
        .iter()
        .zip(sectors)
        .map(|(data, sector)| {
            h.driver
                .request(VIRTIO_BLK_T_OUT, sector, Data::Out(data.clone()))
        })
        .collect();
    h.run();
    for request in &submitted {
        assert_eq!(h.driver.status_of(request), STATUS_OK);
    }
    let contents = h.image.contents();
    for (data, sector) in parts.iter().zip(sectors) {
        let at = sector as usize * 512;
        assert_eq!(&contents[at..at + 1024], &data[..], "sector {sector}");
    }
    let counters = h.block.counters();
    assert_eq!((counters["write_ops"], counters["write_bytes"]), (4, 4096));

    // The same for reads: each request gets its own bytes back.
    let reads: Vec<_> = sectors
        .iter()
        .map(|&sector| h.driver.request(VIRTIO_BLK_T_IN, sector, Data::In(1024)))
        .collect();
    h.run();
    for ((read, data), sector) in reads.iter().zip(&parts).zip(sectors) {
        h.assert_done_any(read, STATUS_OK);
        assert_eq!(&h.driver.read(read.data, 1024), data, "sector {sector}");
    }
    let counters = h.block.counters();
    assert_eq!((counters["read_ops"], counters["read_bytes"]), (4, 4096));
}

fn write_at(offset: u64, len: u64) -> Request {
    Request {
        head: 0,
        status: GuestAddress(0),
        op: Op::Write {
            offset,
            len,
            data: Vec::new(),
        },
        started: Instant::now(),
    }
}

#[test]
fn runs_join_only_adjacent_requests_up_to_the_merge_limit() {
    let offsets = |runs: &[Vec<Request>]| -> Vec<Vec<u64>> {
        runs.iter()
            .map(|run| {
                run.iter()
                    .map(|r| match r.op {
                        Op::Write { offset, .. } => offset,
                        _ => u64::MAX,
                    })
                    .collect()
            })
            .collect()
    };
    // Out of order, with a gap and an overlap: sorted, never merged across either.
    let requests = [
        (8192, 4096),
        (0, 4096),
        (4096, 4096),
        (20480, 4096),
        (22528, 4096),
    ];
    let runs = contiguous_runs(requests.iter().map(|&(o, l)| write_at(o, l)).collect());
    assert_eq!(
        offsets(&runs),
        [vec![0, 4096, 8192], vec![20480], vec![22528]]
    );

    // A long sequential stream is cut at MERGE_LIMIT bytes.
    let size = 1 << 20;
    let count = 2 * MERGE_LIMIT / size + 1;
    let runs = contiguous_runs((0..count).map(|i| write_at(i * size, size)).collect());
    let lengths: Vec<u64> = runs.iter().map(|run| run.len() as u64).collect();
    assert_eq!(lengths, [MERGE_LIMIT / size, MERGE_LIMIT / size, 1]);
    assert!(contiguous_runs(Vec::new()).is_empty());
}

#[test]
fn a_zero_length_read_succeeds_without_io() {
    for io_uring in [false, true] {
        let mut h = harness(io_uring);
        let read = h.request(VIRTIO_BLK_T_IN, 5, Data::None);
        h.assert_done(&read, STATUS_OK, 1);
        let write = h.request(VIRTIO_BLK_T_OUT, IMAGE_LEN / 512, Data::None);
        h.assert_done(&write, STATUS_OK, 1);
    }
}

#[test]
fn get_id_without_a_serial_is_cloud_hypervisors_device_id() {
    use std::os::unix::fs::MetadataExt;
    let mut h = Harness::new(IMAGE_LEN, false, |c| c.serial = None);
    let meta = std::fs::metadata(&h.image.path).unwrap();
    // What Cloud Hypervisor v37 answers (checked against the real one).
    let expected = format!("{}{}{}", meta.dev(), meta.rdev(), meta.ino());
    let id = h.request(VIRTIO_BLK_T_GET_ID, 0, Data::In(20));
    let got = h.driver.read(id.data, 20);
    let len = expected.len().min(20);
    assert_eq!(&got[..len], &expected.as_bytes()[..len]);
    assert!(got[len..].iter().all(|&b| b == 0), "NUL-padded: {got:?}");
}

#[test]
fn get_id_pads_and_truncates_the_serial() {
    let mut h = Harness::new(IMAGE_LEN, false, |c| c.serial = Some("short".into()));
    let id = h.request(VIRTIO_BLK_T_GET_ID, 0, Data::In(20));
    h.assert_done(&id, STATUS_OK, 21);
    assert_eq!(
        h.driver.read(id.data, 20),
        b"short\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0"
    );
    // A shorter buffer gets what fits.
    let id = h.request(VIRTIO_BLK_T_GET_ID, 0, Data::In(8));
    h.assert_done(&id, STATUS_OK, 9);

    let mut h = Harness::new(IMAGE_LEN, false, |c| {
        c.serial = Some("a-serial-number-longer-than-twenty".into())
    });
    let id = h.request(VIRTIO_BLK_T_GET_ID, 0, Data::In(32));
    h.assert_done(&id, STATUS_OK, 21);
    assert_eq!(h.driver.read(id.data, 21), b"a-serial-number-long\xff");
}

#[test]
fn read_only_disks_refuse_writes() {
    let mut h = Harness::new(IMAGE_LEN, false, |c| c.readonly = true);
    let features = h.block.features();
    assert_ne!(features & F_RO, 0);
    assert_eq!(features & (F_DISCARD | F_WRITE_ZEROES), 0);

    let write = h.request(VIRTIO_BLK_T_OUT, 0, Data::Out(vec![0u8; 512]));
    h.assert_done(&write, STATUS_IOERR, 1);
    let discard = h.request(VIRTIO_BLK_T_DISCARD, 0, Data::Out(ranges(&[(0, 8, 0)])));
    h.assert_done(&discard, STATUS_UNSUPP, 1);
    let zeroes = h.request(
        VIRTIO_BLK_T_WRITE_ZEROES,
        0,
        Data::Out(ranges(&[(0, 8, 0)])),
    );
    h.assert_done(&zeroes, STATUS_UNSUPP, 1);
    assert_eq!(h.image.contents(), patterned(0, IMAGE_LEN));

    let read = h.request(VIRTIO_BLK_T_IN, 0, Data::In(512));
    h.assert_done(&read, STATUS_OK, 513);
    let flush = h.request(VIRTIO_BLK_T_FLUSH, 0, Data::None);
    h.assert_done(&flush, STATUS_OK, 1);
}

#[test]
fn sector_ranges_are_checked_against_the_capacity() {
    for io_uring in [false, true] {
        let mut h = harness(io_uring);
        let capacity = IMAGE_LEN / 512;
        assert_eq!(h.block.capacity(), capacity);
        let cases = [
            (capacity, 512),
            (capacity - 1, 1024),
            (u64::MAX, 512),
            (u64::MAX >> 9, 512),
            (1 << 55, 512),
        ];
        for (sector, len) in cases {
            let read = h.request(VIRTIO_BLK_T_IN, sector, Data::In(len));
            h.assert_done(&read, STATUS_IOERR, 1);
            let write = h.request(VIRTIO_BLK_T_OUT, sector, Data::Out(vec![1; len as usize]));
            h.assert_done(&write, STATUS_IOERR, 1);
        }
        // Not a whole number of sectors.
        let read = h.request(VIRTIO_BLK_T_IN, 0, Data::In(100));
        h.assert_done(&read, STATUS_IOERR, 1);
        // The last sector is fine.
        let read = h.request(VIRTIO_BLK_T_IN, capacity - 1, Data::In(512));
        h.assert_done(&read, STATUS_OK, 513);
        assert_eq!(h.image.contents(), patterned(0, IMAGE_LEN));
    }
}

#[test]
fn a_size_that_is_not_whole_sectors_rounds_down() {
    let mut h = Harness::new(1000, false, |_| {});
    assert_eq!(h.block.capacity(), 1);
    let read = h.request(VIRTIO_BLK_T_IN, 0, Data::In(512));
    h.assert_done(&read, STATUS_OK, 513);
    let read = h.request(VIRTIO_BLK_T_IN, 1, Data::In(512));
    h.assert_done(&read, STATUS_IOERR, 1);
}

#[test]
fn requests_over_the_size_cap_are_refused() {
    let mut h = harness(false);
    let header = h.driver.header(VIRTIO_BLK_T_IN, 0);
    let status = h.driver.status();
    let buffer = h.driver.alloc(256 * 1024, 512);
    // 33 x 256 KiB of the same buffer: 8.25 MiB.
    let mut parts = vec![(header, 16, 0)];
    parts.extend(std::iter::repeat_n((buffer, 256 * 1024, WRITE), 33));
    parts.push((status, 1, WRITE));
    let head = h.driver.add_indirect(&parts);
    h.run();
    assert_eq!(h.driver.byte(status), STATUS_IOERR);
    assert_eq!(h.driver.last_used(), (u32::from(head), 1));
}

#[test]
fn unknown_request_types_are_unsupported() {
    let mut h = harness(false);
    for request_type in [2, 3, 99, VIRTIO_BLK_T_WRITE_ZEROES + 1, u32::MAX] {
        let request = h.request(request_type, 0, Data::In(512));
        h.assert_done(&request, STATUS_UNSUPP, 1);
    }
}

#[test]
fn discard_and_write_zeroes_reach_the_file() {
    for io_uring in [false, true] {
        let mut h = harness(io_uring);
        let features = h.block.features();
        assert_ne!(features & F_DISCARD, 0, "ext4/tmpfs punch holes");
        assert_ne!(features & F_WRITE_ZEROES, 0);
        let zeroed = |h: &Harness, sector: u64, sectors: u64| {
            let contents = h.image.contents();
            let range = (sector * 512) as usize..((sector + sectors) * 512) as usize;
            assert!(contents[range].iter().all(|&b| b == 0));
            assert_eq!(contents.len() as u64, IMAGE_LEN);
        };

        let discard = h.request(VIRTIO_BLK_T_DISCARD, 0, Data::Out(ranges(&[(8, 8, 0)])));
        h.assert_done(&discard, STATUS_OK, 1);
        zeroed(&h, 8, 8);
        let zeroes = h.request(
            VIRTIO_BLK_T_WRITE_ZEROES,
            0,
            Data::Out(ranges(&[(20, 2, 0), (30, 1, 1)])),
        );
        h.assert_done(&zeroes, STATUS_OK, 1);
        zeroed(&h, 20, 2);
        zeroed(&h, 30, 1);
        let contents = h.image.contents();
        assert_eq!(
            &contents[22 * 512..30 * 512],
            &patterned(22 * 512, 8 * 512)[..]
        );
        assert_eq!(&contents[..8 * 512], &patterned(0, 8 * 512)[..]);
        // An empty range is a no-op.
        let empty = h.request(VIRTIO_BLK_T_DISCARD, 0, Data::Out(ranges(&[(3, 0, 0)])));
        h.assert_done(&empty, STATUS_OK, 1);

        let refused: [(u32, Vec<u8>, u8); 7] = [
            // Discard takes no flags; write-zeroes only "unmap".
            (VIRTIO_BLK_T_DISCARD, ranges(&[(0, 1, 1)]), STATUS_UNSUPP),
            (
                VIRTIO_BLK_T_WRITE_ZEROES,
                ranges(&[(0, 1, 2)]),
                STATUS_UNSUPP,
            ),
            (VIRTIO_BLK_T_DISCARD, ranges(&[(127, 2, 0)]), STATUS_IOERR),
            (
                VIRTIO_BLK_T_WRITE_ZEROES,
                ranges(&[(u64::MAX, 2, 0)]),
                STATUS_IOERR,
            ),
            (VIRTIO_BLK_T_DISCARD, vec![0; 15], STATUS_IOERR),
            (VIRTIO_BLK_T_DISCARD, Vec::new(), STATUS_IOERR),
            (VIRTIO_BLK_T_DISCARD, ranges(&[(0, 1, 0); 33]), STATUS_IOERR),
        ];
        let before = h.image.contents();
        for (request_type, payload, status) in refused {
            let data = if payload.is_empty() {
                Data::None
            } else {
                Data::Out(payload)
            };
            let request = h.request(request_type, 0, data);
            h.assert_done(&request, status, 1);
        }
        assert_eq!(h.image.contents(), before);

        // Not negotiated: unsupported.
        h.handler.io.acked_features &= !(F_DISCARD | F_WRITE_ZEROES);
        let discard = h.request(VIRTIO_BLK_T_DISCARD, 0, Data::Out(ranges(&[(0, 1, 0)])));
        h.assert_done(&discard, STATUS_UNSUPP, 1);
        let zeroes = h.request(
            VIRTIO_BLK_T_WRITE_ZEROES,
            0,
            Data::Out(ranges(&[(0, 1, 0)])),
        );
        h.assert_done(&zeroes, STATUS_UNSUPP, 1);
        assert_eq!(h.image.contents(), before);
    }
}

#[test]
fn counters_add_up() {
    for io_uring in [false, true] {
        let mut h = harness(io_uring);
        let counters = h.block.counters_handle();
        let initial = h.block.counters();
        assert_eq!(initial["read_latency_min"], u64::MAX);
        assert_eq!(initial["write_latency_min"], u64::MAX);
        assert_eq!(initial["write_latency_max"], u64::MAX);
        assert_eq!(initial["read_latency_avg"], u64::MAX / 10_000);
        for sector in 0..3 {
            h.request(VIRTIO_BLK_T_OUT, sector, Data::Out(vec![9; 1024]));
        }
        h.request(VIRTIO_BLK_T_IN, 0, Data::In(512));
        h.request(VIRTIO_BLK_T_IN, 1, Data::In(2048));
        // Failures, flushes and the like do not count.
        h.request(VIRTIO_BLK_T_IN, 1 << 40, Data::In(512));
        h.request(VIRTIO_BLK_T_FLUSH, 0, Data::None);
        h.request(VIRTIO_BLK_T_GET_ID, 0, Data::In(20));
        let c = counters.snapshot();
        assert_eq!(c, h.block.counters());
        assert_eq!(c["write_ops"], 3);
        assert_eq!(c["write_bytes"], 3072);
        assert_eq!(c["read_ops"], 2);
        assert_eq!(c["read_bytes"], 2560);
        for kind in ["read", "write"] {
            let min = c[format!("{kind}_latency_min").as_str()];
            let avg = c[format!("{kind}_latency_avg").as_str()];
            let max = c[format!("{kind}_latency_max").as_str()];
            assert!(
                min <= avg && avg <= max && max < 10_000_000,
                "{kind}: {min} {avg} {max}"
            );
        }
    }
}

#[test]
fn event_idx_suppresses_interrupts_the_driver_does_not_want() {
    let mut h = harness(false);
    h.handler.queue = h.driver.queue(true);
    h.driver.set_used_event(0);
    h.request(VIRTIO_BLK_T_FLUSH, 0, Data::None);
    assert_eq!(h.interrupt.count(0), 1);
    // The device asks to be kicked for the next buffer.
    assert_eq!(h.driver.avail_event(), 1);
    // used_event = 0 was passed: no interrupt.
    h.request(VIRTIO_BLK_T_FLUSH, 0, Data::None);
    assert_eq!(h.interrupt.count(0), 1);
    assert_eq!(h.driver.used_idx(), 2);
    h.driver.set_used_event(2);
    h.request(VIRTIO_BLK_T_FLUSH, 0, Data::None);
    assert_eq!(h.interrupt.count(0), 2);
    assert_eq!(h.driver.avail_event(), 3);
}

#[test]
fn a_full_io_uring_stalls_the_queue_until_completions_arrive() {
    let mut h = harness(true);
    if h.handler.uring.is_none() {
        return;
    }
    h.handler.uring = Some(Uring::new(4, h.mem.clone()).unwrap());
    let capacity = h.handler.uring.as_ref().unwrap().slots.len();
    let flush = h.driver.request(VIRTIO_BLK_T_FLUSH, 0, Data::None);
    // The same chain made available again and again: legal enough.
    for _ in 0..11 {
        h.driver.publish(flush.head);
    }
    h.handler.process_queue();
    assert!(h.handler.stalled);
    assert!(h.driver.used_idx() as usize <= capacity);
    h.run();
    assert_eq!(h.driver.used_idx(), 12);
    assert!(!h.handler.stalled);
}

#[test]
fn a_short_io_uring_transfer_is_finished_synchronously() {
    let h = harness(false);
    let data = 0x4_0000;
    let segments = vec![Segment {
        addr: GuestAddress(data),
        len: 1024,
    }];
    let request = Request {
        head: 0,
        status: GuestAddress(0x5_0000),
        op: Op::Read {
            offset: 512,
            len: 1024,
            data: segments.clone(),
        },
        started: Instant::now(),
    };
    let mut iovecs = guest_iovecs(&h.mem, &segments).unwrap();
    assert_eq!(
        h.handler.io.complete_uring(&request, &[], &mut iovecs, 512),
        STATUS_OK
    );
    // Only the part the kernel "did not do" was read.
    assert_eq!(h.driver.read(data, 512), vec![0; 512]);
    assert_eq!(h.driver.read(data + 512, 512), patterned(1024, 512));
    assert_eq!(
        h.handler
            .io
            .complete_uring(&request, &[], &mut iovecs, -libc::EIO),
        STATUS_IOERR
    );
    assert_eq!(
        h.handler
            .io
            .complete_uring(&request, &[], &mut iovecs, 1024),
        STATUS_OK
    );
}
