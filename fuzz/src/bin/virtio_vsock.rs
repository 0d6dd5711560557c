//! AFL++ entry point of the `virtio_vsock` target (see `vmkit_fuzz::TARGETS`).

fn main() {
    afl::fuzz!(|data: &[u8]| {
        vmkit_fuzz::virtio::vsock(data);
    });
}
