//! AFL++ entry point of the `json_config` target (see `vmkit_fuzz::TARGETS`).

fn main() {
    afl::fuzz!(|data: &[u8]| {
        vmkit_fuzz::config::json_config(data);
    });
}
