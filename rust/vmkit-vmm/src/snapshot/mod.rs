//! Snapshots: a paused VM's state written to a directory and read back.
//!
//! The pieces so far: each vCPU's KVM state ([`vcpu::VcpuState`]) and guest
//! memory as one sparse file that a restore maps copy-on-write (pages come in
//! on first touch, so a restore does not copy guest RAM). Everything read
//! from a snapshot is checked before use: a snapshot is user input.

pub mod codec;
pub mod vcpu;

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use vm_memory::{Bytes, GuestAddress};

use crate::error::{ErrorKind, ModuleError};
use crate::memory::GuestRam;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{what}: {detail}")]
    Corrupt { what: String, detail: String },
    #[error("{what}: format version {found}, but this vmkit reads version {supported}")]
    Version {
        what: String,
        found: u32,
        supported: u32,
    },
    #[error("{what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("{count} {what} do not fit KVM's table")]
    TooMany { what: &'static str, count: usize },
    #[error("KVM_GET_MSRS cannot read MSR {index:#x}")]
    MsrUnreadable { index: u32 },
    #[error("KVM_SET_MSRS refused MSR {index:#x} = {data:#x}")]
    MsrRefused { index: u32, data: u64 },
    #[error("{what}: {path}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
}

impl ModuleError for SnapshotError {
    fn kind(&self) -> ErrorKind {
        match self {
            SnapshotError::Kvm { .. }
            | SnapshotError::TooMany { .. }
            | SnapshotError::MsrUnreadable { .. }
            | SnapshotError::MsrRefused { .. } => ErrorKind::Kvm,
            SnapshotError::Corrupt { .. }
            | SnapshotError::Version { .. }
            | SnapshotError::Io { .. } => ErrorKind::Snapshot,
        }
    }
}

/// Pages compared against zero (and left as holes) when memory is written.
const PAGE: usize = 4096;
/// Guest memory goes through a buffer of this size.
const CHUNK: usize = 1 << 20;

/// Writes guest RAM to `file` (named `path` in errors), each range after the
/// previous one, leaving pages of zeros as holes: a snapshot of a guest that
/// touched little memory is small on disk. Returns the bytes written.
pub fn write_memory(ram: &GuestRam, file: &File, path: &str) -> Result<u64, SnapshotError> {
    let io_error = |what, source| SnapshotError::Io {
        what,
        path: path.to_owned(),
        source,
    };
    let mut buffer = vec![0u8; CHUNK];
    let mut offset = 0u64;
    let mut written = 0u64;
    for &(base, size) in &ram.ranges {
        let mut done = 0u64;
        while done < size {
            let len = (size - done).min(CHUNK as u64) as usize;
            let chunk = &mut buffer[..len];
            ram.memory
                .read_slice(chunk, GuestAddress(base + done))
                .map_err(|e| io_error("reading guest memory", io::Error::other(e)))?;
            for (index, page) in chunk.chunks(PAGE).enumerate() {
                if page.iter().any(|&b| b != 0) {
                    let at = offset + done + (index * PAGE) as u64;
                    file.write_all_at(page, at)
                        .map_err(|e| io_error("writing the memory file", e))?;
                    written += page.len() as u64;
                }
            }
            done += len as u64;
        }
        offset += size;
    }
    // The holes at the end count too: the file is as long as guest RAM.
    file.set_len(offset)
        .map_err(|e| io_error("sizing the memory file", e))?;
    file.sync_all()
        .map_err(|e| io_error("syncing the memory file", e))?;
    Ok(written)
}

/// Checks that a memory file holds `expected` bytes of guest RAM: a
/// truncated file would fault the guest (SIGBUS) when it touches the end.
pub fn check_memory_file(file: &File, path: &str, expected: u64) -> Result<(), SnapshotError> {
    let len = file
        .metadata()
        .map_err(|source| SnapshotError::Io {
            what: "reading the memory file",
            path: path.to_owned(),
            source,
        })?
        .len();
    if len != expected {
        return Err(SnapshotError::Corrupt {
            what: path.to_owned(),
            detail: format!("{len} bytes of guest memory, the snapshot's VM has {expected}"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use vmkit_config::MemoryConfig;

    use super::*;
    use crate::memory::{create_guest_ram, map_guest_ram_from_file};

    #[test]
    fn memory_round_trips_through_a_sparse_file_mapped_copy_on_write() {
        let config = MemoryConfig::parse("size=64M", None).unwrap();
        let ram = create_guest_ram(&config).unwrap();
        ram.memory
            .write_obj(0x1122_3344_u32, GuestAddress(0x1000))
            .unwrap();
        ram.memory
            .write_obj(0xabu8, GuestAddress((64 << 20) - 1))
            .unwrap();
        let dir = std::env::temp_dir().join(format!("vmkit-snap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("memory");
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let written = write_memory(&ram, &file, "memory").unwrap();
        assert_eq!(written, 2 * PAGE as u64, "only the two touched pages");
        let meta = file.metadata().unwrap();
        assert_eq!(meta.len(), 64 << 20);
        assert!(meta.blocks() * 512 < 1 << 20, "the file is sparse");

        check_memory_file(&file, "memory", 64 << 20).unwrap();
        let err = check_memory_file(&file, "memory", 128 << 20).unwrap_err();
        assert!(err.to_string().contains("the snapshot's VM has"), "{err}");

        let restored = map_guest_ram_from_file(&config, &file, false).unwrap();
        assert_eq!(restored.ranges, ram.ranges);
        assert_eq!(
            restored
                .memory
                .read_obj::<u32>(GuestAddress(0x1000))
                .unwrap(),
            0x1122_3344
        );
        // Writes stay in the restored VM: the snapshot does not change.
        restored
            .memory
            .write_obj(7u32, GuestAddress(0x1000))
            .unwrap();
        let mut on_disk = [0u8; 4];
        file.read_exact_at(&mut on_disk, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(on_disk), 0x1122_3344);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
