//! Snapshot files and a migration's state are user input: the decoders of
//! a vCPU's state, of the platform state (with its memory hot-plug
//! controller's, whose DIMMs are checked too) and of a whole VM's state (a
//! migration's STATE frame) must refuse anything malformed without
//! panicking, and what they accept must be exactly what the encoder would
//! write.

use vmkit_vmm::devices::memory_hotplug::{HotplugLayout, SavedHotplug};
use vmkit_vmm::snapshot::vcpu::VcpuState;
use vmkit_vmm::snapshot::{PlatformState, SavedState};

/// First byte: which decoder (0: a vCPU state, 1: the platform state, 2: a
/// VM's state); the rest: the file's or frame's bytes.
pub fn snapshot_state(data: &[u8]) {
    let Some((&which, file)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => {
            if let Ok(state) = VcpuState::decode("vcpu-0", file) {
                assert_eq!(
                    state.encode(),
                    file,
                    "a vCPU state decodes to another encoding"
                );
            }
        }
        1 => {
            if let Ok(state) = PlatformState::decode(file) {
                assert_eq!(
                    state.encode(),
                    file,
                    "a platform state decodes to another encoding"
                );
                // Its memory hot-plug blob: decoded and checked as a restore does.
                if let Ok(hotplug) = SavedHotplug::decode(&state.memory_hotplug) {
                    assert_eq!(
                        hotplug.encode(),
                        state.memory_hotplug,
                        "a memory hot-plug state decodes to another encoding"
                    );
                    let area = HotplugLayout::new(64 << 20, Some(1 << 30));
                    if let Some(layout) = area {
                        let _ = hotplug.dimms(layout, 64 << 20);
                    }
                }
            }
        }
        _ => {
            if let Ok(state) = SavedState::decode(file) {
                assert_eq!(
                    state.encode(),
                    file,
                    "a VM state decodes to another encoding"
                );
            }
        }
    }
}
