//! AFL++ entry point of the `legacy_io` target (see `vmkit_fuzz::TARGETS`).

fn main() {
    afl::fuzz!(|data: &[u8]| {
        vmkit_fuzz::legacy::legacy_io(data);
    });
}
