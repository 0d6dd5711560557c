//! Seeded random rings: the device never panics, hangs or writes outside
//! the buffers it was given.

use super::*;

/// xorshift64: deterministic and dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const FUZZ_HEADERS: u64 = 0x3_0000;
const FUZZ_TABLES: u64 = 0x2_0000;
const FUZZ_DATA: u64 = 0x4_0000;
const FUZZ_STATUS: u64 = 0x9_0000;

fn fuzz_addr(rng: &mut Rng) -> u64 {
    match rng.below(10) {
        0..=3 => FUZZ_HEADERS + 16 * rng.below(16),
        4..=6 => FUZZ_DATA + rng.below(0x4_0000),
        7 => FUZZ_TABLES + 0x200 * rng.below(4) + 16 * rng.below(3),
        8 => MEM_SIZE - rng.below(64),
        _ => match rng.below(3) {
            0 => rng.next(),
            1 => u64::MAX - rng.below(64),
            _ => MEM_SIZE + rng.below(1 << 20),
        },
    }
}

fn fuzz_len(rng: &mut Rng) -> u32 {
    match rng.below(9) {
        0 => 0,
        1 => 1,
        2 => 16,
        3 => 512 * rng.below(5) as u32,
        4 => rng.below(64) as u32,
        5 => 16 * rng.below(40) as u32,
        6 => rng.next() as u32,
        7 => 20,
        _ => u32::MAX - rng.below(16) as u32,
    }
}

fn fuzz_descriptor(rng: &mut Rng, driver: &Driver, table: u64, index: u16, table_len: u64) {
    // Mostly linked to a neighbour, sometimes anywhere (or nowhere).
    let next = if rng.below(4) == 0 {
        rng.below(table_len + 4) as u16
    } else {
        (index + 1) % table_len as u16
    };
    let indirect = if rng.below(4) == 0 { INDIRECT } else { 0 };
    let flags = rng.below(8) as u16 & (NEXT | WRITE | indirect);
    let (addr, len) = if flags & INDIRECT != 0 && rng.below(2) == 0 {
        // Usually one of the tables, whole or in part.
        let len = if rng.below(2) == 0 {
            48
        } else {
            16 * rng.below(34) as u32
        };
        (FUZZ_TABLES + 0x200 * rng.below(4), len)
    } else {
        (fuzz_addr(rng), fuzz_len(rng))
    };
    driver.set_desc(table, index, addr, len, flags, next);
}

/// Header, data and status as a driver would lay them out at `index`,
/// with one field garbled half the time.
fn fuzz_plausible_request(rng: &mut Rng, driver: &Driver, index: u16) {
    let data_flags = if rng.below(2) == 0 { WRITE } else { 0 };
    let mut parts = [
        (FUZZ_HEADERS + 16 * rng.below(16), 16, NEXT),
        (
            FUZZ_DATA + 512 * rng.below(256),
            512 * (1 + rng.below(4)) as u32,
            data_flags | NEXT,
        ),
        (FUZZ_STATUS + rng.below(256), 1, WRITE),
    ];
    let mut nexts = [index + 1, index + 2, 0];
    if rng.below(2) == 0 {
        let victim = rng.below(3) as usize;
        match rng.below(4) {
            0 => parts[victim].0 = fuzz_addr(rng),
            1 => parts[victim].1 = fuzz_len(rng),
            2 => parts[victim].2 = rng.below(8) as u16,
            _ => nexts[victim] = rng.below(20) as u16,
        }
    }
    for (i, ((addr, len, flags), next)) in parts.into_iter().zip(nexts).enumerate() {
        driver.set_desc(driver.desc_table, index + i as u16, addr, len, flags, next);
    }
}

#[test]
fn random_rings_never_break_the_device() {
    let image = TempImage::new(32 * 1024);
    let blocks: Vec<Block> = [true, false]
        .into_iter()
        .map(|disable_io_uring| {
            let mut config = disk_config(&image);
            config.disable_io_uring = disable_io_uring;
            // Both devices write one image on purpose: no lock.
            Block::with_lock(&config, None, false).unwrap()
        })
        .collect();
    let interrupt = Arc::new(FakeInterrupt::default());
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut rounds = 0;
    let mut completed = 0usize;
    while rounds < 10_000 && Instant::now() < deadline {
        rounds += 1;
        let mem = guest_memory(MEM_SIZE);
        let mut driver = Driver::new(&mem, 16, 0);
        let types = [
            VIRTIO_BLK_T_IN,
            VIRTIO_BLK_T_OUT,
            VIRTIO_BLK_T_FLUSH,
            VIRTIO_BLK_T_GET_ID,
            VIRTIO_BLK_T_DISCARD,
            VIRTIO_BLK_T_WRITE_ZEROES,
            2,
        ];
        for slot in 0..16 {
            let request_type = if rng.below(8) == 0 {
                rng.next() as u32
            } else {
                types[rng.below(types.len() as u64) as usize]
            };
            let sector = match rng.below(4) {
                0 => 0,
                1 => rng.below(64),
                2 => rng.below(1 << 20),
                _ => u64::MAX - rng.below(4),
            };
            let mut header = [0u8; 16];
            header[..4].copy_from_slice(&request_type.to_le_bytes());
            header[8..].copy_from_slice(&sector.to_le_bytes());
            driver.write(FUZZ_HEADERS + 16 * slot, &header);
        }
        // Plausible discard ranges at the start of the data area.
        for entry in 0..64 {
            let range = ranges(&[(rng.below(70), rng.below(10) as u32, rng.below(3) as u32)]);
            driver.write(FUZZ_DATA + 16 * entry, &range);
        }
        let mut heads = Vec::new();
        let mut index = 0;
        while index < 16 {
            heads.push(index);
            if index + 3 <= 16 && rng.below(3) != 0 {
                fuzz_plausible_request(&mut rng, &driver, index);
                index += 3;
            } else {
                fuzz_descriptor(&mut rng, &driver, 0, index, 16);
                index += 1;
            }
        }
        for table in 0..4 {
            let table_addr = FUZZ_TABLES + 0x200 * table;
            let mut first_random = 0;
            if rng.below(2) == 0 {
                fuzz_plausible_request(&mut rng, &driver.with_table(table_addr), 0);
                first_random = 3;
            }
            for index in first_random..32 {
                fuzz_descriptor(&mut rng, &driver, table_addr, index, 32);
            }
        }
        let published = rng.below(17) as u16;
        for _ in 0..published {
            let head = if rng.below(8) == 0 {
                rng.below(20) as u16
            } else {
                heads[rng.below(heads.len() as u64) as usize]
            };
            driver.publish(head);
        }
        if rng.below(16) == 0 {
            // A driver lying about the avail index.
            driver
                .mem
                .write_obj(rng.next() as u16, GuestAddress(driver.avail + 2))
                .unwrap();
        }
        driver.set_used_event(rng.next() as u16);

        let block = &blocks[rounds % 2];
        let mut handler = Harness::handler_for(block, &mem, &driver, &interrupt);
        handler.queue = driver.queue(rng.below(2) == 0);
        handler.run_until_idle();
        // Kicked again with nothing new: must be harmless too.
        handler.run_until_idle();
        drop(handler);

        let used = driver.used_idx();
        assert!(used <= 16, "round {rounds}: {used} used entries");
        for i in 0..used {
            let (head, len) = driver.used_entry(i);
            assert!(head < 16, "round {rounds}: used head {head}");
            assert!(
                u64::from(len) <= MAX_REQUEST_BYTES + 1,
                "round {rounds}: used length {len}"
            );
        }
        completed += usize::from(used);
        assert_eq!(std::fs::metadata(&image.path).unwrap().len(), 32 * 1024);
    }
    // Enough of the chains were good enough to reach the disk.
    let data_ops: u64 = blocks
        .iter()
        .map(|b| b.counters()["read_ops"] + b.counters()["write_ops"])
        .sum();
    eprintln!("fuzz: {rounds} rounds, {completed} used entries, {data_ops} reads and writes");
    assert!(rounds >= 100, "only {rounds} rounds");
    assert!(
        completed > rounds,
        "too few requests got anywhere: {completed}"
    );
    assert!(
        data_ops as usize > rounds / 20,
        "too few reads and writes: {data_ops}"
    );
}
