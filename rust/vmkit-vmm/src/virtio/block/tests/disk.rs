//! Opening disks, O_DIRECT and bounce buffers, the config space.

use super::*;

#[test]
fn direct_io_works_aligned_and_through_the_bounce_buffer() {
    for io_uring in [false, true] {
        let image = TempImage::new(IMAGE_LEN);
        let mut config = disk_config(&image);
        config.direct = true;
        config.disable_io_uring = !io_uring;
        let block = match Block::new(&config, None) {
            Ok(block) => block,
            Err(e) if e.message.contains("O_DIRECT") => {
                eprintln!("skipping: {e}");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        drop(block);
        let mut h = Harness::new(IMAGE_LEN, io_uring, |c| c.direct = true);
        let block_size = u64::from(h.block.block_size());
        assert!(block_size == 512 || block_size == 4096);

        // Aligned: straight into guest memory.
        let aligned = h.driver.alloc(8192, 4096);
        h.driver.write(aligned, &[0x11; 4096]);
        let header = h.driver.header(VIRTIO_BLK_T_OUT, 8);
        let status = h.driver.status();
        h.driver
            .add_chain(&[(header, 16, 0), (aligned, 4096, 0), (status, 1, WRITE)]);
        h.run();
        assert_eq!(h.driver.byte(status), STATUS_OK);
        assert_eq!(&h.image.contents()[4096..8192], &[0x11; 4096][..]);

        // A misaligned buffer and a sector that is not block-aligned.
        let odd = aligned + 16;
        h.driver.write(odd, &[0x22; 1024]);
        let header = h.driver.header(VIRTIO_BLK_T_OUT, 1);
        let status = h.driver.status();
        h.driver
            .add_chain(&[(header, 16, 0), (odd, 1024, 0), (status, 1, WRITE)]);
        h.run();
        assert_eq!(h.driver.byte(status), STATUS_OK);
        let contents = h.image.contents();
        assert_eq!(&contents[512..1536], &[0x22; 1024][..]);
        assert_eq!(&contents[..512], &patterned(0, 512)[..]);
        assert_eq!(&contents[1536..4096], &patterned(1536, 2560)[..]);

        // Segments of odd lengths.
        let header = h.driver.header(VIRTIO_BLK_T_IN, 1);
        let status = h.driver.status();
        h.driver.add_chain(&[
            (header, 16, 0),
            (odd, 100, WRITE),
            (aligned + 4096, 924, WRITE),
            (status, 1, WRITE),
        ]);
        h.run();
        assert_eq!(h.driver.byte(status), STATUS_OK);
        assert_eq!(h.driver.read(odd, 100), vec![0x22; 100]);
        assert_eq!(h.driver.read(aligned + 4096, 924), vec![0x22; 924]);
        assert_eq!(h.driver.last_used().1, 1025);
    }
}

#[test]
fn bounce_buffers_read_modify_write_partial_blocks() {
    let image = TempImage::new(16384);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&image.path)
        .unwrap();
    let mem = guest_memory(MEM_SIZE);
    let source = Segment {
        addr: GuestAddress(0x1_0000),
        len: 1024,
    };
    mem.write_slice(&[0xcd; 1024], source.addr).unwrap();
    // Inside one 4 KiB block, then across two.
    let mut expected = patterned(0, 16384);
    for offset in [1536usize, 3584] {
        bounce_write(&file, &mem, 4096, &[source], offset as u64, 1024).unwrap();
        expected[offset..offset + 1024].fill(0xcd);
        assert!(image.contents() == expected, "after writing at {offset}");
    }
    let targets = [
        Segment {
            addr: GuestAddress(0x2_0003),
            len: 300,
        },
        Segment {
            addr: GuestAddress(0x3_0000),
            len: 724,
        },
    ];
    bounce_read(&file, &mem, 4096, &targets, 8192 + 512, 1024).unwrap();
    let mut read = vec![0u8; 1024];
    mem.read_slice(&mut read[..300], targets[0].addr).unwrap();
    mem.read_slice(&mut read[300..], targets[1].addr).unwrap();
    assert_eq!(read, patterned(8192 + 512, 1024));
}

#[test]
fn opening_reports_what_is_wrong_with_the_path() {
    let error = |config: DiskConfig| match Block::new(&config, None) {
        Ok(_) => panic!("{config:?} opened"),
        Err(e) => {
            assert_eq!(e.kind, ErrorKind::Device);
            e.message
        }
    };
    let missing = std::env::temp_dir().join("vmkit-block-test-no-such-image");
    let message = error(DiskConfig {
        path: Some(missing.to_str().unwrap().into()),
        ..DiskConfig::default()
    });
    assert!(
        message.contains("vmkit-block-test-no-such-image"),
        "{message}"
    );
    assert!(message.contains("No such file or directory"), "{message}");
    for path in [std::env::temp_dir().to_str().unwrap(), "/dev/null"] {
        let message = error(DiskConfig {
            path: Some(path.into()),
            ..DiskConfig::default()
        });
        assert!(message.contains(path), "{message}");
        assert!(
            message.contains("not a regular file or block device"),
            "{message}"
        );
    }
    assert!(error(DiskConfig::default()).contains("no path"));

    let image = TempImage::new(4096);
    for (queue_size, num_queues) in [(100, 1), (0, 1), (1, 1), (128, 0), (128, 1000)] {
        let mut config = disk_config(&image);
        config.queue_size = queue_size;
        config.num_queues = num_queues;
        let message = error(config);
        assert!(message.contains(&image.path()), "{message}");
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&image.path, std::fs::Permissions::from_mode(0o400)).unwrap();
        let message = error(disk_config(&image));
        assert!(message.contains("Permission denied"), "{message}");
    }
}

#[test]
fn open_errors_keep_their_cause() {
    use std::error::Error as _;
    let missing = std::env::temp_dir().join("vmkit-block-test-missing-cause");
    let path = missing.to_str().unwrap().to_owned();
    let config = DiskConfig {
        path: Some(path.clone()),
        ..DiskConfig::default()
    };
    let Err(error) = Block::new(&config, None) else {
        panic!("a missing image opened");
    };
    assert_eq!(
        error.to_string(),
        format!("Cannot open disk image {path}: No such file or directory (os error 2)")
    );
    let module = error
        .source()
        .unwrap()
        .downcast_ref::<BlockError>()
        .unwrap();
    assert!(
        matches!(module, BlockError::Open { hint: "", .. }),
        "{module:?}"
    );
    let io = module
        .source()
        .unwrap()
        .downcast_ref::<io::Error>()
        .unwrap();
    assert_eq!(io.raw_os_error(), Some(libc::ENOENT));
    // Known remedies are named.
    let erofs = BlockError::open("x.img", io::Error::from_raw_os_error(libc::EROFS), false);
    assert!(erofs.to_string().contains("use readonly=on"), "{erofs}");
    let einval = BlockError::open("x.img", io::Error::from_raw_os_error(libc::EINVAL), true);
    assert!(
        einval.to_string().contains("O_DIRECT (direct=on)"),
        "{einval}"
    );
}

#[test]
fn config_space_and_features_follow_the_spec_layout() {
    let h = harness(false);
    let block = &h.block;
    assert_eq!(block.device_type(), TYPE_BLOCK);
    assert_eq!(block.queue_max_sizes(), vec![128]);
    let features = block.features();
    for bit in [
        F_VERSION_1,
        F_RING_INDIRECT_DESC,
        F_RING_EVENT_IDX,
        F_SEG_MAX,
        F_BLK_SIZE,
        F_FLUSH,
        F_TOPOLOGY,
    ] {
        assert_ne!(features & bit, 0, "{bit:#x}");
    }
    assert_eq!(features & (F_MQ | F_RO), 0);

    let read = |offset: u64, len: usize| {
        let mut data = vec![0xee; len];
        block.read_config(offset, &mut data);
        data
    };
    assert_eq!(read(0, 8), (IMAGE_LEN / 512).to_le_bytes());
    assert_eq!(read(12, 4), 126u32.to_le_bytes());
    assert_eq!(read(20, 4), 512u32.to_le_bytes());
    assert_eq!(read(24, 4), [0, 0, 1, 0]);
    assert_eq!(read(34, 2), 1u16.to_le_bytes());
    assert_eq!(read(36, 4), MAX_DISCARD_SECTORS.to_le_bytes());
    assert_eq!(read(40, 4), MAX_DISCARD_SEGMENTS.to_le_bytes());
    assert_eq!(read(44, 4), 1u32.to_le_bytes());
    assert_eq!(read(48, 4), MAX_DISCARD_SECTORS.to_le_bytes());
    assert_eq!(read(56, 1), [1]);
    // Partly and wholly past the end, or at absurd offsets: zeroes.
    assert_eq!(read(58, 4), [0; 4]);
    assert_eq!(read(4096, 2), [0; 2]);
    assert_eq!(read(u64::MAX, 4), [0; 4]);
    let mut h = h;
    h.block.write_config(0, &[1, 2, 3, 4]);
    assert_eq!(h.block.config_space[..8], (IMAGE_LEN / 512).to_le_bytes());

    let image = TempImage::new(4096);
    let mut config = disk_config(&image);
    config.num_queues = 4;
    config.queue_size = 4096;
    let block = Block::new(&config, None).unwrap();
    assert_ne!(block.features() & F_MQ, 0);
    assert_eq!(block.queue_max_sizes(), vec![4096; 4]);
    let mut seg_max = [0u8; 4];
    block.read_config(12, &mut seg_max);
    assert_eq!(u32::from_le_bytes(seg_max), u32::from(MAX_SEGMENTS));
}

#[test]
fn an_image_is_locked_while_its_device_lives() {
    let image = TempImage::new(4096);
    let writable = disk_config(&image);
    let readonly = DiskConfig {
        readonly: true,
        ..disk_config(&image)
    };
    let refused = |config: &DiskConfig, what: &str| match Block::new(config, None) {
        Ok(_) => panic!("{config:?} opened while the image is locked"),
        Err(e) => {
            assert_eq!(e.kind, ErrorKind::Device);
            assert_eq!(
                e.message,
                format!(
                    "Cannot get the {what} lock on disk image {} (--disk): \
                     is another VM or process using the image?",
                    image.path()
                )
            );
        }
    };

    let first = Block::new(&writable, None).unwrap();
    refused(&writable, "write");
    refused(&readonly, "read");
    // The opt-out opens it anyway.
    let unlocked = Block::with_lock(&writable, None, false).unwrap();
    drop(unlocked);
    // Dropping the device releases the lock.
    drop(first);
    let second = Block::new(&writable, None).unwrap();
    drop(second);

    // Read-only disks share the image, and keep writers out.
    let reader = Block::new(&readonly, None).unwrap();
    let other_reader = Block::new(&readonly, None).unwrap();
    refused(&writable, "write");
    drop(reader);
    drop(other_reader);
    drop(Block::new(&writable, None).unwrap());
}
