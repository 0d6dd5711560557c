//! Why a disk could not be set up.

use std::io;

use super::MAX_QUEUES;
use crate::error::{ErrorKind, ModuleError};

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("disk: no path given")]
    NoPath,
    #[error("disk {path}: num_queues={value} is not between 1 and {MAX_QUEUES}")]
    NumQueues { path: String, value: usize },
    #[error("disk {path}: queue_size={value} is not a power of two of at least 2")]
    QueueSize { path: String, value: u16 },
    #[error("Cannot open disk image {path}{hint}")]
    Open {
        path: String,
        /// What the user can do about it, where that is known.
        hint: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("disk image {path}: not a regular file or block device")]
    NotAFile { path: String },
    #[error(
        "Cannot get the {what} lock on disk image {path} (--disk): \
         is another VM or process using the image?"
    )]
    Locked { path: String, what: &'static str },
    #[error("Cannot lock disk image {path} (--disk)")]
    Lock {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("disk image {path}: cannot read its size")]
    Size {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("disk image {path}: cannot read its block size")]
    BlockSize {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("disk image {path}: no usable O_DIRECT alignment (direct=on)")]
    DirectAlignment {
        path: String,
        #[source]
        source: io::Error,
    },
}

impl BlockError {
    /// A failed open or stat of `path`, with a hint where the cause has a
    /// known remedy.
    pub fn open(path: &str, source: io::Error, direct: bool) -> BlockError {
        let hint = match source.raw_os_error() {
            Some(libc::EROFS) => " for writing (use readonly=on)",
            Some(libc::EINVAL) if direct => " with O_DIRECT (direct=on)",
            _ => "",
        };
        BlockError::Open {
            path: path.to_owned(),
            hint,
            source,
        }
    }
}

impl ModuleError for BlockError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Device
    }
}
