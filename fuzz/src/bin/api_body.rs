//! AFL++ entry point of the `api_body` target (see `vmkit_fuzz::TARGETS`).

fn main() {
    afl::fuzz!(|data: &[u8]| {
        vmkit_fuzz::config::api_body(data);
    });
}
