//! AFL++ entry point of the `virtio_balloon` target (see `vmkit_fuzz::TARGETS`).

fn main() {
    afl::fuzz!(|data: &[u8]| {
        vmkit_fuzz::virtio::balloon(data);
    });
}
