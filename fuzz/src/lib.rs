//! vmkit's fuzz targets. Each target is a function from the fuzzer's input
//! bytes to nothing: it panics (AFL++ sees an abort) when the code under
//! test panics or an invariant checked here fails. `src/bin/<target>.rs`
//! runs one under AFL++; `tests/replay.rs` runs every corpus and regression
//! file through them with plain `cargo test`.

pub mod boot;
pub mod config;
pub mod input;
pub mod legacy;
pub mod pci;
pub mod ring;
pub mod snapshot;
pub mod tpm;
pub mod virtio;

/// A fuzz target: its name (the corpus folder and binary) and its entry point.
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
    /// What it needs that a machine may lack (`None`: nothing).
    pub needs: Option<fn() -> Result<(), String>>,
}

/// Every target, in the order `fuzz/run` runs them.
pub const TARGETS: &[Target] = &[
    Target {
        name: "option_string",
        run: config::option_string,
        needs: None,
    },
    Target {
        name: "cli",
        run: config::cli,
        needs: None,
    },
    Target {
        name: "json_config",
        run: config::json_config,
        needs: None,
    },
    Target {
        name: "api_body",
        run: config::api_body,
        needs: None,
    },
    Target {
        name: "virtio_block",
        run: virtio::block,
        needs: None,
    },
    Target {
        name: "virtio_net",
        run: virtio::net,
        needs: None,
    },
    Target {
        name: "virtio_rng",
        run: virtio::rng,
        needs: None,
    },
    Target {
        name: "virtio_console",
        run: virtio::console,
        needs: None,
    },
    Target {
        name: "virtio_balloon",
        run: virtio::balloon,
        needs: None,
    },
    Target {
        name: "virtio_mem",
        run: virtio::virtio_mem,
        needs: None,
    },
    Target {
        name: "virtio_pmem",
        run: virtio::pmem,
        needs: None,
    },
    Target {
        name: "virtio_vsock",
        run: virtio::vsock,
        needs: None,
    },
    Target {
        name: "virtio_watchdog",
        run: virtio::watchdog,
        needs: None,
    },
    Target {
        name: "virtio_pci",
        run: pci::virtio_pci,
        needs: Some(pci::kvm_available),
    },
    Target {
        name: "legacy_io",
        run: legacy::legacy_io,
        needs: Some(pci::kvm_available),
    },
    Target {
        name: "tpm_crb",
        run: tpm::tpm_crb,
        needs: None,
    },
    Target {
        name: "boot_loader",
        run: boot::boot_loader,
        needs: None,
    },
    Target {
        name: "snapshot_state",
        run: snapshot::snapshot_state,
        needs: None,
    },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// A serial/console backend in mode null (output captured, no host side).
pub fn null_backend(what: &str) -> std::sync::Arc<vmkit_vmm::devices::serial::SerialBackend> {
    vmkit_vmm::devices::serial::SerialBackend::open_unconfined(
        &vmkit_config::ConsoleConfig::with_mode(vmkit_config::ConsoleOutputMode::Null),
        what,
        false,
    )
    .expect("a null backend")
    .expect("a backend for mode null")
}
