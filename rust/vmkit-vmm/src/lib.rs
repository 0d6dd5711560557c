//! vmkit's virtual machine monitor: KVM, guest memory, boot protocols, vCPUs
//! and the legacy platform devices.

pub mod acpi;
pub mod boot;
pub mod cgroup;
pub mod control;
pub mod cpu;
pub mod device_manager;
pub mod devices;
pub mod error;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod interrupts;
pub mod layout;
pub mod memory;
pub mod migration;
pub mod numa;
pub mod pci;
pub mod process;
pub mod rate_limiter;
pub mod seccomp;
pub mod snapshot;
pub mod stack;
pub mod vcpu;
pub mod virtio;
pub mod vm;

pub use control::StopReason;
pub use device_manager::{DeviceNode, Resource};
pub use error::{Error, ErrorKind, Result};
pub use vm::{Vm, VmInfo, VmOptions, VmState};
