//! AFL++ entry point of the `snapshot_state` target (see `vmkit_fuzz::TARGETS`).

fn main() {
    afl::fuzz!(|data: &[u8]| {
        vmkit_fuzz::snapshot::snapshot_state(data);
    });
}
