//! AFL++ entry point of the `boot_loader` target (see `vmkit_fuzz::TARGETS`).

fn main() {
    afl::fuzz!(|data: &[u8]| {
        vmkit_fuzz::boot::boot_loader(data);
    });
}
