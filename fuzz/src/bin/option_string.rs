//! AFL++ entry point of the `option_string` target (see `vmkit_fuzz::TARGETS`).

fn main() {
    afl::fuzz!(|data: &[u8]| {
        vmkit_fuzz::config::option_string(data);
    });
}
