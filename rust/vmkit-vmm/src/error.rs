//! VMM errors: what went wrong, in words a user can act on, with the cause kept.
//!
//! Each module has its own error enum (thiserror, the cause as `#[source]`)
//! and implements [`ModuleError`] to say which [`ErrorKind`] it is; `?` then
//! turns it into the crate's [`Error`], whose message is the whole chain and
//! whose `source()` is the module error.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;

/// Which part of building or running the VM failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The configuration asks for something this VMM cannot do (here).
    Unsupported,
    /// The kernel image could not be read or loaded.
    Kernel,
    /// The initramfs could not be read or placed.
    Initramfs,
    /// Guest memory could not be created.
    Memory,
    /// A KVM ioctl failed.
    Kvm,
    /// A device or its backend (serial file, pty, socket) could not be set up.
    Device,
    /// The VM is not in a state that allows the request.
    State,
    /// A snapshot could not be written, or read back (a missing, corrupt
    /// or foreign file).
    Snapshot,
    /// A live migration failed: the connection, the other VMM, or what it sent.
    Migration,
    /// The config passed validation, but its parts do not fit together
    /// (a `--numa` node naming a memory zone that does not exist): Cloud
    /// Hypervisor refuses these when it builds the VM.
    Config,
}

impl ErrorKind {
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Unsupported => "Unsupported",
            ErrorKind::Kernel => "Kernel",
            ErrorKind::Initramfs => "Initramfs",
            ErrorKind::Memory => "Memory",
            ErrorKind::Kvm => "Kvm",
            ErrorKind::Device => "Device",
            ErrorKind::State => "State",
            ErrorKind::Snapshot => "Snapshot",
            ErrorKind::Migration => "Migration",
            ErrorKind::Config => "Config",
        }
    }
}

/// A module's error enum: says which kind of failure it is.
pub trait ModuleError: StdError + Send + Sync + 'static {
    fn kind(&self) -> ErrorKind;
}

#[derive(Debug, Clone)]
pub struct Error {
    pub kind: ErrorKind,
    /// The whole chain, outermost first, joined with ": ".
    pub message: String,
    source: Option<Arc<dyn StdError + Send + Sync>>,
}

impl PartialEq for Error {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind && self.message == other.message
    }
}

impl Eq for Error {}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }

    pub fn kvm(what: &str, e: impl fmt::Display) -> Self {
        Error::new(ErrorKind::Kvm, format!("{what}: {e}"))
    }
}

/// "outer: cause: root cause", skipping a cause whose text its parent
/// already ends with (thiserror's `{0}` formats often repeat it). A cause
/// that is a crate [`Error`] already spells its whole chain, so it ends it.
pub fn chain_message(error: &(dyn StdError + 'static)) -> String {
    let mut message = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let text = e.to_string();
        if !message.ends_with(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        if e.is::<Error>() {
            break;
        }
        cause = e.source();
    }
    message
}

impl<E: ModuleError> From<E> for Error {
    fn from(error: E) -> Self {
        Error {
            kind: error.kind(),
            message: chain_message(&error),
            source: Some(Arc::new(error)),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum OpenError {
        #[error("Cannot open disk file {path}")]
        Open {
            path: String,
            #[source]
            source: std::io::Error,
        },
    }

    impl ModuleError for OpenError {
        fn kind(&self) -> ErrorKind {
            ErrorKind::Device
        }
    }

    #[test]
    fn module_errors_keep_their_kind_and_cause() {
        let io = std::io::Error::from_raw_os_error(libc::ENOENT);
        let error: Error = OpenError::Open {
            path: "a.img".into(),
            source: io,
        }
        .into();
        assert_eq!(error.kind, ErrorKind::Device);
        assert_eq!(
            error.to_string(),
            "Cannot open disk file a.img: No such file or directory (os error 2)"
        );
        let source = error.source().expect("the module error is the source");
        assert!(source.source().is_some(), "the io::Error is kept below it");
    }

    #[derive(Debug, thiserror::Error)]
    #[error("Cannot create virtio-blk device {id}")]
    struct WrapError {
        id: String,
        #[source]
        source: Error,
    }

    impl ModuleError for WrapError {
        fn kind(&self) -> ErrorKind {
            self.source.kind
        }
    }

    #[test]
    fn a_wrapped_crate_error_is_spelt_once() {
        let inner: Error = OpenError::Open {
            path: "a.img".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOENT),
        }
        .into();
        let error: Error = WrapError {
            id: "_disk0".into(),
            source: inner,
        }
        .into();
        assert_eq!(error.kind, ErrorKind::Device);
        assert_eq!(
            error.to_string(),
            "Cannot create virtio-blk device _disk0: Cannot open disk file a.img: \
             No such file or directory (os error 2)"
        );
    }
}
