//! VMM errors: what went wrong, in words a user can act on.

use std::fmt;

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
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
        }
    }

    pub fn kvm(what: &str, e: impl fmt::Display) -> Self {
        Error::new(ErrorKind::Kvm, format!("{what}: {e}"))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;
