//! AFL++ entry point of the `virtio_mem` target (see `vmkit_fuzz::TARGETS`).

fn main() {
    afl::fuzz!(|data: &[u8]| {
        vmkit_fuzz::virtio::virtio_mem(data);
    });
}
