//! Every seed in `corpus/<target>/` and every saved crash in
//! `regressions/<target>/` through its target, without a fuzzer: a
//! regression shows up in plain `cargo test`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(10);

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

fn replay(folder: &str, name: &str) -> usize {
    let target = vmkit_fuzz::target(name).expect("a target");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(folder)
        .join(name);
    let files = files(&dir);
    for file in &files {
        let data = std::fs::read(file).expect("a readable input");
        eprintln!("{}", file.display());
        let started = Instant::now();
        (target.run)(&data);
        // AFL++ calls an input slower than 2 s a hang; unoptimised builds
        // get more room.
        let elapsed = started.elapsed();
        assert!(elapsed < LIMIT, "{} took {elapsed:?}", file.display());
    }
    files.len()
}

/// Runs `name`'s seeds and regressions; false (after saying why) when
/// the machine lacks what the target needs.
fn replay_target(name: &str) -> bool {
    let target = vmkit_fuzz::target(name).expect("a target");
    if let Some(needs) = target.needs {
        if let Err(why) = needs() {
            eprintln!("SKIPPED {name}: {why}");
            return false;
        }
    }
    let seeds = replay("corpus", name);
    assert!(seeds > 0, "{name} has no seed corpus");
    replay("regressions", name);
    true
}

macro_rules! replay_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                replay_target(stringify!($name));
            }
        )*

        #[test]
        fn every_target_is_replayed() {
            let tested = [$(stringify!($name)),*];
            for target in vmkit_fuzz::TARGETS {
                assert!(tested.contains(&target.name), "{} is not replayed", target.name);
            }
        }
    };
}

replay_tests!(
    option_string,
    cli,
    json_config,
    api_body,
    virtio_block,
    virtio_net,
    virtio_rng,
    virtio_console,
    virtio_balloon,
    virtio_mem,
    virtio_pmem,
    virtio_vsock,
    virtio_watchdog,
    virtio_pci,
    legacy_io,
    tpm_crb,
    boot_loader,
    snapshot_state,
);

/// The boot target reaches the loaders' success paths: the test guest's
/// real images load, each in its format.
#[test]
fn real_kernels_load() {
    use vmkit_vmm::boot::KernelFormat;
    for (image, format) in [
        (vmkit_guest::PVH_ELF, KernelFormat::PvhElf),
        (vmkit_guest::ELF_NO_PVH, KernelFormat::Elf64),
        (vmkit_guest::BZIMAGE, KernelFormat::BzImage),
    ] {
        let loaded = vmkit_fuzz::boot::load(image).expect("the test guest loads");
        assert_eq!(loaded.format, format);
    }
    // The seeds are minimal kernels of each format, and load too.
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/boot_loader");
    for (seed, format) in [
        ("pvh-elf", KernelFormat::PvhElf),
        ("elf64", KernelFormat::Elf64),
        ("bzimage", KernelFormat::BzImage),
    ] {
        let image = std::fs::read(seeds.join(seed)).expect("a seed");
        let loaded = vmkit_fuzz::boot::load(&image).unwrap_or_else(|e| panic!("{seed}: {e}"));
        assert_eq!(loaded.format, format, "{seed}");
    }
}
