//! CPU scheduling groups for a VM's threads: the orchestrator (vmkit's
//! Python side) makes the cgroups and hands over their thread files opened
//! (cgroup v1 `tasks`, v2 `cgroup.threads`); each VM thread writes `0` to its
//! group's file, which moves the writing thread, before it installs its
//! filter. vCPU threads go to one group, every other VM thread to the other.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::sync::Arc;

use super::ThreadKind;

/// Where each kind of VM thread moves itself; empty: threads stay where
/// their creator is.
#[derive(Clone, Debug, Default)]
pub struct ThreadGroups {
    vcpu: Option<Arc<File>>,
    device: Option<Arc<File>>,
}

impl ThreadGroups {
    /// vCPU threads join `vcpu`, all others `device` (opened for writing).
    pub fn new(vcpu: OwnedFd, device: OwnedFd) -> ThreadGroups {
        ThreadGroups {
            vcpu: Some(Arc::new(File::from(vcpu))),
            device: Some(Arc::new(File::from(device))),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.vcpu.is_none() && self.device.is_none()
    }

    fn file(&self, kind: ThreadKind) -> Option<&File> {
        match kind {
            ThreadKind::Vcpu => self.vcpu.as_deref(),
            _ => self.device.as_deref(),
        }
    }

    /// Whether a thread of `kind` has a group to join.
    pub fn places(&self, kind: ThreadKind) -> bool {
        self.file(kind).is_some()
    }

    /// Moves the calling thread into `kind`'s group (nothing without one).
    pub fn join(&self, kind: ThreadKind) -> io::Result<()> {
        let Some(mut file) = self.file(kind) else {
            return Ok(());
        };
        file.write_all(b"0").map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot move a {kind} thread into its CPU group: {e}"),
            )
        })
    }
}
