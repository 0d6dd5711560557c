use super::*;

#[test]
fn state_transitions_follow_cloud_hypervisor() {
    use VmState::*;
    assert!(Created.check_transition(Running).is_ok());
    assert!(Paused.check_transition(Running).is_ok());
    assert!(Shutdown.check_transition(Running).is_ok());
    let err = Running.check_transition(Running).unwrap_err();
    assert_eq!(
        err.message,
        "invalid VM state transition: Running to Running"
    );
    assert!(Shutdown.check_transition(Paused).is_err());
    assert!(Created.check_transition(Created).is_err());
}

#[test]
fn a_published_state_reads_back_as_itself() {
    for state in VmState::ALL {
        assert_eq!(VmState::ALL[state as usize], state);
    }
}

/// A validated config of `params` over a kernel path (never opened here).
fn validated(edit: impl FnOnce(&mut vmkit_config::VmParams)) -> ValidatedConfig {
    let mut params = vmkit_config::VmParams {
        kernel: Some("/nonexistent/vmlinux".into()),
        serial: "null".into(),
        console: "off".into(),
        ..Default::default()
    };
    edit(&mut params);
    VmConfig::parse(&params).unwrap().validated().unwrap()
}

/// The error `Vm::new` refuses `config` with (before it opens KVM).
fn refusal(config: ValidatedConfig) -> crate::Error {
    match Vm::new(config, VmOptions::default()) {
        Ok(_) => panic!("the config was accepted"),
        Err(e) => e,
    }
}

#[test]
fn a_console_socket_is_refused_with_v37s_variant_named() {
    let err = refusal(validated(|p| {
        p.console = "socket=/tmp/vmkit-absent.sock".into()
    }));
    assert_eq!(err.kind, ErrorKind::Unsupported);
    assert_eq!(
        err.message,
        "The virtio console cannot use a socket (--console socket=...): only --serial can \
         (NoSocketOptionSupportForConsoleDevice)"
    );
    // Only the console: the serial port serves a socket.
    let serial_socket = validated(|p| p.serial = "socket=/tmp/vmkit-absent.sock".into());
    assert!(check_supported(serial_socket.config()).is_ok());
}

#[test]
fn memory_sizes_must_be_whole_pages() {
    let err = refusal(validated(|p| p.memory = "size=1000000".into()));
    assert_eq!(err.kind, ErrorKind::Memory);
    assert_eq!(
        err.message,
        "--memory size 1000000 is not a multiple of the page size 4096 (MisalignedMemorySize)"
    );
    let err = refusal(validated(|p| {
        p.memory = "size=4M,hugepages=on,hugepage_size=2M".into();
        p.memory_zones = Some(vec!["id=z0,size=1M,hugepage_size=2M".into()]);
    }));
    assert_eq!(
        err.message,
        "--memory-zone z0 size 1048576 is not a multiple of the page size 2097152 \
         (MisalignedMemorySize)"
    );
    let err = refusal(validated(|p| {
        p.memory = "size=3M,hugepages=on,hugepage_size=2M".into()
    }));
    assert!(err
        .message
        .starts_with("--memory size 3145728 is not a multiple of the page size 2097152"));
    for memory in ["size=4M,hugepages=on,hugepage_size=2M", "size=12K"] {
        let whole_pages = validated(|p| p.memory = memory.into());
        assert!(check_supported(whole_pages.config()).is_ok(), "{memory}");
    }
}

#[test]
fn smbios_fields_of_platform_are_refused() {
    for platform in ["serial_number=x", "uuid=1-2", "oem_strings=[a]"] {
        let err = refusal(validated(|p| p.platform = Some(platform.into())));
        assert_eq!(err.kind, ErrorKind::Unsupported, "{platform}");
        assert_eq!(
            err.message,
            "--platform serial_number, uuid and oem_strings (SMBIOS tables) are not supported yet"
        );
    }
    let segments = validated(|p| p.platform = Some("num_pci_segments=2".into()));
    assert!(check_supported(segments.config()).is_ok());
}

#[test]
fn numa_is_accepted_but_sgx_sections_and_dangling_references_are_refused() {
    let numa = |nodes: &[&str]| {
        validated(|p| {
            p.cpus = "boot=2".into();
            p.numa = Some(nodes.iter().map(|n| n.to_string()).collect());
        })
    };
    let ok = numa(&[
        "guest_numa_id=0,cpus=[0],memory_zones=[mem0],distances=[1@20]",
        "guest_numa_id=1,cpus=[1]",
    ]);
    check_supported(ok.config()).unwrap();
    let err = refusal(numa(&["guest_numa_id=0,sgx_epc_sections=[epc0]"]));
    assert_eq!(err.kind, ErrorKind::Unsupported);
    assert_eq!(err.message, "--numa sgx_epc_sections is not supported yet");
    let err = refusal(numa(&["memory_zones=[z9]"]));
    assert_eq!(err.kind, ErrorKind::Config);
    assert_eq!(
        err.message,
        "--numa: NUMA node 0: unknown memory zone 'z9' (InvalidNumaConfig)"
    );
}

#[test]
fn the_console_socket_is_named_before_other_refusals() {
    let err = refusal(validated(|p| {
        p.console = "socket=/tmp/vmkit-absent.sock".into();
        p.memory = "size=1000000".into();
        p.pvpanic = true;
    }));
    assert!(
        err.message
            .contains("NoSocketOptionSupportForConsoleDevice"),
        "{}",
        err.message
    );
}

#[test]
fn built_in_only_keys_are_refused_on_vhost_user_devices() {
    let shared = |p: &mut vmkit_config::VmParams| {
        p.memory = "size=64M,shared=on".into();
        p.cpus = "boot=2".into();
    };
    let disk = |extra: &'static str| {
        validated(move |p| {
            shared(p);
            p.disks = Some(vec![format!("vhost_user=on,socket=/tmp/vu.sock{extra}")]);
        })
    };
    let refused = [
        (",readonly=on", "--disk readonly=on"),
        (",direct=on", "--disk direct=on"),
        (",serial=abc", "--disk serial"),
        (
            ",bw_size=1000,bw_refill_time=100",
            "--disk bw_*/ops_* (rate limits)",
        ),
        (",_disable_io_uring=on", "--disk _disable_io_uring=on"),
    ];
    for (extra, named) in refused {
        let err = refusal(disk(extra));
        assert_eq!(err.kind, ErrorKind::Unsupported, "{extra}");
        assert!(
            err.message.starts_with(&format!(
                "{named} cannot be used with vhost_user=on: the vhost-user backend"
            )),
            "{extra}: {}",
            err.message
        );
    }
    assert!(check_supported(disk(",num_queues=2,queue_size=64,id=d0").config()).is_ok());
    // The same keys on a built-in disk are its own business.
    let built_in = validated(|p| p.disks = Some(vec!["path=/tmp/x.img,readonly=on".into()]));
    assert!(check_supported(built_in.config()).is_ok());

    let net = |extra: &'static str| {
        validated(move |p| {
            shared(p);
            p.net = Some(vec![format!(
                "vhost_user=on,socket=/tmp/vu.sock,id=n0{extra}"
            )]);
        })
    };
    for (extra, key) in [
        (",tap=vmtap0", "tap"),
        (",ip=10.0.0.1", "ip"),
        (",mask=255.255.0.0", "mask"),
        (",host_mac=12:34:56:78:9a:bc", "host_mac"),
        (
            ",ops_size=10,ops_refill_time=10",
            "bw_*/ops_* (rate limits)",
        ),
    ] {
        let err = refusal(net(extra));
        assert!(
            err.message.starts_with(&format!(
                "--net {key} cannot be used with vhost_user=on (id=n0): "
            )),
            "{extra}: {}",
            err.message
        );
    }
    // What the frontend applies itself (config space, offered features).
    let applied = net(",mac=12:34:56:78:9a:bc,mtu=1400,offload_tso=off,ip=192.168.249.1");
    assert!(check_supported(applied.config()).is_ok());
}

#[test]
fn hot_plug_lists_take_only_the_new_device_and_one_vsock() {
    let mut live = validated(|p| {
        p.disks = Some(vec!["path=/a,id=a".into()]);
        p.vsock = Some("cid=3,socket=/s".into());
    })
    .config()
    .clone();
    live.assign_device_ids();
    let mut lists = DeviceLists::of(&live);
    // A candidate whose other entries differ: only its last disk counts.
    let mut candidate = live.clone();
    candidate.disks = Some(vec![
        vmkit_config::DiskConfig::parse("path=/x,id=x").unwrap(),
        vmkit_config::DiskConfig::parse("path=/b,id=b").unwrap(),
    ]);
    lists.add_last_of(&candidate, "disks").unwrap();
    let mut config = live.clone();
    lists.apply(&mut config);
    assert_eq!(DeviceLists::ids(&config), ["a", "b", "_vsock0"]);
    let error = lists.add_last_of(&candidate, "vsock").unwrap_err();
    assert_eq!(error.message, "Too many virtio-vsock devices");
    let mut only = config.clone();
    DeviceLists::keep_only_last(&mut only, "disks");
    assert_eq!(DeviceLists::ids(&only), ["b"]);
    lists.remove("a");
    lists.remove("_vsock0");
    lists.apply(&mut config);
    assert_eq!(DeviceLists::ids(&config), ["b"]);
    candidate.disks = None;
    assert!(
        lists.add_last_of(&candidate, "disks").is_err(),
        "no device to add"
    );
}

mod needs_kvm {
    use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch};
    use vmm_sys_util::eventfd::EventFd;

    use super::super::*;
    use crate::virtio::notify::kvm_has_ioeventfd;

    /// Settling the VM's SRCU after a boot leaves KVM as it found it: the
    /// devices' ioeventfds stay, and none is left at the placeholder's
    /// address (a guest's write there is dropped, as before).
    #[test]
    #[ignore = "needs /dev/kvm"]
    fn settling_the_srcu_leaves_the_devices_ioeventfds_and_no_placeholder() {
        let vm_fd = Kvm::new().unwrap().create_vm().unwrap();
        let notify = 0xd000_0000;
        let kick = EventFd::new(libc::EFD_CLOEXEC).unwrap();
        vm_fd
            .register_ioevent(&kick, &IoEventAddress::Mmio(notify), NoDatamatch)
            .unwrap();
        settle_kvm_srcu(&vm_fd, &EventFd::new(libc::EFD_CLOEXEC).unwrap());
        let placeholder = crate::layout::SRCU_SETTLE_ADDRESS;
        assert!(!kvm_has_ioeventfd(
            &vm_fd,
            placeholder,
            Some(SRCU_SETTLE_DATAMATCH)
        ));
        assert!(kvm_has_ioeventfd(&vm_fd, notify, None));
    }
}
