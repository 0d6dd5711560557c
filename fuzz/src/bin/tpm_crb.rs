//! AFL++ entry point of the `tpm_crb` target (see `vmkit_fuzz::TARGETS`).

fn main() {
    afl::fuzz!(|data: &[u8]| {
        vmkit_fuzz::tpm::tpm_crb(data);
    });
}
