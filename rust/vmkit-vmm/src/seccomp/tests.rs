use super::*;

#[test]
fn every_kind_compiles_in_both_modes() {
    for kind in ThreadKind::ALL {
        for mode in [SeccompMode::Trap, SeccompMode::Log] {
            let programs = filters::compile(kind, mode).unwrap();
            assert!(!programs.is_empty() && programs.iter().all(|p| !p.is_empty()));
        }
    }
}

#[test]
fn compile_all_leaves_every_kind_compiled() {
    // Every kind must be there after it, whatever the other tests compiled.
    compile_all(SeccompMode::Log);
    let cache = program_cache().lock().unwrap();
    for kind in ThreadKind::ALL {
        assert!(
            cache.contains_key(&(kind, SeccompMode::Log)),
            "{kind} not compiled"
        );
    }
    drop(cache);
    compile_all(SeccompMode::Off);
    let cache = program_cache().lock().unwrap();
    assert!(!cache.keys().any(|(_, mode)| *mode == SeccompMode::Off));
}

#[test]
fn a_creator_allows_what_its_children_do() {
    // Filters stack: a child's call must pass its creator's filter too.
    for kind in ThreadKind::ALL {
        let rules = filters::rules(kind);
        for &child in kind.children() {
            for syscall in filters::rules(child).syscalls() {
                assert!(rules.allows(syscall), "{kind} lacks {syscall} of {child}");
            }
        }
    }
}

#[test]
fn device_workers_cannot_open_files_or_start_programs() {
    // Every kind but those that build VMs and start threads.
    let guest_facing = ThreadKind::ALL.into_iter().filter(|kind| {
        !matches!(
            kind,
            ThreadKind::Vmm | ThreadKind::Spawner | ThreadKind::Process
        )
    });
    for kind in guest_facing {
        let rules = filters::rules(kind);
        for syscall in [
            libc::SYS_openat,
            libc::SYS_execve,
            libc::SYS_clone,
            libc::SYS_clone3,
        ] {
            assert!(!rules.allows(syscall), "{kind} allows {syscall}");
        }
        // The vsock worker connects guest connections to unix sockets, the
        // vhost-user relay a backend that came back.
        if !matches!(kind, ThreadKind::Vsock | ThreadKind::VhostUser) {
            for syscall in [libc::SYS_socket, libc::SYS_connect] {
                assert!(!rules.allows(syscall), "{kind} allows {syscall}");
            }
        }
    }
    assert!(filters::rules(ThreadKind::Vsock).allows_only_some(libc::SYS_socket));
    assert!(filters::rules(ThreadKind::VhostUser).allows_only_some(libc::SYS_socket));
    for kind in ThreadKind::ALL {
        let rules = filters::rules(kind);
        for syscall in [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_ptrace,
            libc::SYS_fork,
        ] {
            assert!(!rules.allows(syscall), "{kind} allows {syscall}");
        }
    }
}

#[test]
fn decimal_formats_without_allocating() {
    for value in [0, 7, 42, 435, i32::MAX, -1, i32::MIN] {
        let (digits, len) = decimal(value);
        assert_eq!(
            std::str::from_utf8(&digits[..len]).unwrap(),
            value.to_string()
        );
    }
}

#[test]
fn modes_parse_as_the_command_line_spells_them() {
    assert_eq!(SeccompMode::parse("true"), Some(SeccompMode::Trap));
    assert_eq!(SeccompMode::parse("log"), Some(SeccompMode::Log));
    assert_eq!(SeccompMode::parse("false"), Some(SeccompMode::Off));
    assert_eq!(SeccompMode::parse("yes"), None);
    for mode in [SeccompMode::Trap, SeccompMode::Log, SeccompMode::Off] {
        assert_eq!(SeccompMode::parse(mode.as_str()), Some(mode));
    }
}

/// A confined thread makes an allowed call and one outside its filter; in
/// log mode both go through (the kernel logs the second).
#[test]
fn a_thread_confined_in_log_mode_keeps_running() {
    let handle = spawn_confined(
        "log-test".into(),
        ThreadKind::Rng,
        SeccompMode::Log,
        &ThreadGroups::default(),
        || {
            // SAFETY: getppid has no arguments and no effect.
            let parent = unsafe { libc::syscall(libc::SYS_getppid) };
            assert!(parent > 0);
            let status = std::fs::read_to_string("/proc/thread-self/status");
            // openat is outside the rng filter too, and logged, not refused.
            assert!(status.unwrap().contains("Seccomp:\t2"));
        },
    )
    .unwrap();
    handle.join().unwrap();
}

#[test]
fn the_spawner_starts_confined_threads() {
    let spawner = Spawner::start(SeccompMode::Log, ThreadGroups::default()).unwrap();
    let (tx, rx) = mpsc::channel();
    let handle = spawner
        .spawn("spawned".into(), ThreadKind::Rng, move || {
            tx.send(std::fs::read_to_string("/proc/thread-self/status").unwrap())
                .unwrap();
        })
        .unwrap();
    handle.join().unwrap();
    let status = rx.recv().unwrap();
    // The spawner's filters and the worker's own: two on top of none.
    assert!(status.contains("Seccomp:\t2"));
    let filters: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp_filters:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(filters >= 3, "{status}");
    drop(spawner);
}

/// The kernel refuses a classic BPF program over 4096 instructions
/// (BPF_MAXINSNS); the union filters are the ones that could grow past it.
#[test]
fn every_filter_fits_the_kernels_program_limit() {
    for kind in ThreadKind::ALL {
        for program in filters::compile(kind, SeccompMode::Trap).unwrap() {
            assert!(
                program.len() <= 4096,
                "{kind}: {} instructions",
                program.len()
            );
        }
    }
}

/// Each thread writes "0" (itself) to its kind's group file before its body
/// runs: vCPU threads to the vCPU group's, every other kind to the device
/// group's. Plain files stand in for the cgroup files here.
#[test]
fn each_thread_joins_its_kinds_group_before_it_runs() {
    let dir = std::env::temp_dir().join(format!("vmkit-groups-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let open = |name: &str| -> std::os::fd::OwnedFd {
        std::fs::File::create(dir.join(name)).unwrap().into()
    };
    let groups = ThreadGroups::new(open("vcpu"), open("device"));
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
    for (kind, vcpu, device) in [(ThreadKind::Vcpu, "0", ""), (ThreadKind::Net, "0", "0")] {
        let seen = Arc::new(Mutex::new(None));
        let in_body = seen.clone();
        let files = dir.clone();
        spawn_confined(
            "group-test".into(),
            kind,
            SeccompMode::Off,
            &groups,
            move || {
                let read = |name: &str| std::fs::read_to_string(files.join(name)).unwrap();
                *in_body.lock().unwrap() = Some((read("vcpu"), read("device")));
            },
        )
        .unwrap()
        .join()
        .unwrap();
        let expected = (vcpu.to_owned(), device.to_owned());
        assert_eq!(seen.lock().unwrap().take(), Some(expected), "{kind}");
    }
    // The spawner (a device thread) and what it starts join the device group.
    let spawner = Spawner::start(SeccompMode::Log, groups).unwrap();
    spawner
        .spawn("spawned".into(), ThreadKind::Rng, || {})
        .unwrap()
        .join()
        .unwrap();
    assert_eq!((read("vcpu"), read("device")), ("0".into(), "000".into()));
    drop(spawner);
    std::fs::remove_dir_all(&dir).unwrap();
}
