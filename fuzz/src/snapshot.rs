//! Snapshot files are user input: the decoders of a vCPU's state and of the
//! platform state must refuse anything malformed without panicking, and
//! what they accept must be exactly what the encoder would write.

use vmkit_vmm::snapshot::vcpu::VcpuState;
use vmkit_vmm::snapshot::PlatformState;

/// First byte: which decoder (0: a vCPU state, 1: the platform state);
/// the rest: the file's bytes.
pub fn snapshot_state(data: &[u8]) {
    let Some((&which, file)) = data.split_first() else {
        return;
    };
    match which % 2 {
        0 => {
            if let Ok(state) = VcpuState::decode("vcpu-0", file) {
                assert_eq!(
                    state.encode(),
                    file,
                    "a vCPU state decodes to another encoding"
                );
            }
        }
        _ => {
            if let Ok(state) = PlatformState::decode(file) {
                assert_eq!(
                    state.encode(),
                    file,
                    "a platform state decodes to another encoding"
                );
            }
        }
    }
}
