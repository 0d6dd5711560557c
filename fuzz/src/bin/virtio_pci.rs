//! AFL++ entry point of the `virtio_pci` target (see `vmkit_fuzz::TARGETS`).

fn main() {
    afl::fuzz!(|data: &[u8]| {
        vmkit_fuzz::pci::virtio_pci(data);
    });
}
