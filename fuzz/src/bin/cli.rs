//! AFL++ entry point of the `cli` target (see `vmkit_fuzz::TARGETS`).

fn main() {
    afl::fuzz!(|data: &[u8]| {
        vmkit_fuzz::config::cli(data);
    });
}
