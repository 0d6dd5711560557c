//! AFL++ entry point of the `virtio_rng` target (see `vmkit_fuzz::TARGETS`).

fn main() {
    afl::fuzz!(|data: &[u8]| {
        vmkit_fuzz::virtio::rng(data);
    });
}
