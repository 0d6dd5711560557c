//! The payload loaders (ELF with and without a PVH note, bzImage) fed the
//! input as the kernel file, into 32 MiB of guest RAM.

use std::cell::RefCell;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

use vm_memory::GuestAddress;
use vmkit_config::PayloadConfig;
use vmkit_vmm::boot::{load_payload, LoadedPayload};
use vmkit_vmm::memory::GuestMemoryMmap;
use vmkit_vmm::memory::GuestRam;

const RAM_SIZE: u64 = 32 << 20;
/// Where the ACPI tables would start.
const RSDP: u64 = 0xa_0000;

struct Fixture {
    kernel: File,
    ram: GuestRam,
}

thread_local! {
    static FIXTURE: RefCell<Option<Fixture>> = const { RefCell::new(None) };
}

fn fixture() -> Fixture {
    // SAFETY: memfd_create with a NUL-terminated name; checked.
    let fd = unsafe { libc::memfd_create(c"vmkit-fuzz-kernel".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor nobody else owns.
    let kernel = unsafe { File::from_raw_fd(fd) };
    let memory =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM_SIZE as usize)]).expect("guest RAM");
    Fixture {
        kernel,
        ram: GuestRam {
            memory,
            ranges: vec![(0, RAM_SIZE)],
            anonymous: true,
            shared_files: None,
            hotplug: None,
            virtio_mem: Vec::new(),
        },
    }
}

/// Loads `kernel` as the payload, as `Vm::boot` does.
pub fn load(kernel: &[u8]) -> vmkit_vmm::Result<LoadedPayload> {
    FIXTURE.with(|fixture_cell| {
        let mut cell = fixture_cell.borrow_mut();
        let fixture = cell.get_or_insert_with(fixture);
        fixture.kernel.set_len(0).expect("truncate the kernel file");
        fixture
            .kernel
            .write_all_at(kernel, 0)
            .expect("write the kernel file");
        let payload = PayloadConfig {
            firmware: None,
            kernel: Some(format!("/proc/self/fd/{}", fixture.kernel.as_raw_fd())),
            cmdline: Some("console=ttyS0 reboot=k panic=1".into()),
            initramfs: None,
        };
        load_payload(&fixture.ram, &payload, RSDP)
    })
}

pub fn boot_loader(data: &[u8]) {
    // Refused or loaded, never a panic or a hang; a refusal names the file.
    if let Err(e) = load(data) {
        assert!(e.to_string().contains("/proc/self/fd/"), "{e}");
    }
}
