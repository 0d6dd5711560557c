//! Errors with v37's variant names and Display texts.

use std::fmt;

use crate::option_parser::OptionParserError;

/// A config parse error (v37's `config::Error`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    ParseCpus(OptionParserError),
    InvalidCpuFeatures(String),
    ParsePlatform(OptionParserError),
    ParseMemory(OptionParserError),
    ParseMemoryZone(OptionParserError),
    ParseMemoryZoneIdMissing,
    ParseRateLimiterGroup(OptionParserError),
    ParseDisk(OptionParserError),
    ParseNetwork(OptionParserError),
    ParseRng(OptionParserError),
    ParseBalloon(OptionParserError),
    ParseFileSystem(OptionParserError),
    ParseFsTagMissing,
    ParseFsSockMissing,
    ParsePersistentMemory(OptionParserError),
    ParsePmemFileMissing,
    ParseConsole(OptionParserError),
    ParseConsoleInvalidModeGiven,
    ParseDevice(OptionParserError),
    ParseDevicePathMissing,
    ParseUserDevice(OptionParserError),
    ParseUserDeviceSocketMissing,
    ParseVdpa(OptionParserError),
    ParseVdpaPathMissing,
    ParseVsock(OptionParserError),
    ParseVsockSockMissing,
    ParseVsockCidMissing,
    ParseSgxEpc(OptionParserError),
    ParseSgxEpcIdMissing,
    ParseNuma(OptionParserError),
    ParseRestore(OptionParserError),
    ParseRestoreSourceUrlMissing,
    ParseTpm(OptionParserError),
    ParseTpmPathMissing,
    Validation(ValidationError),
}

impl Error {
    /// The v37 variant name (for `Validation`, the inner variant's name).
    pub fn kind(&self) -> &'static str {
        use Error::*;
        match self {
            ParseCpus(_) => "ParseCpus",
            InvalidCpuFeatures(_) => "InvalidCpuFeatures",
            ParsePlatform(_) => "ParsePlatform",
            ParseMemory(_) => "ParseMemory",
            ParseMemoryZone(_) => "ParseMemoryZone",
            ParseMemoryZoneIdMissing => "ParseMemoryZoneIdMissing",
            ParseRateLimiterGroup(_) => "ParseRateLimiterGroup",
            ParseDisk(_) => "ParseDisk",
            ParseNetwork(_) => "ParseNetwork",
            ParseRng(_) => "ParseRng",
            ParseBalloon(_) => "ParseBalloon",
            ParseFileSystem(_) => "ParseFileSystem",
            ParseFsTagMissing => "ParseFsTagMissing",
            ParseFsSockMissing => "ParseFsSockMissing",
            ParsePersistentMemory(_) => "ParsePersistentMemory",
            ParsePmemFileMissing => "ParsePmemFileMissing",
            ParseConsole(_) => "ParseConsole",
            ParseConsoleInvalidModeGiven => "ParseConsoleInvalidModeGiven",
            ParseDevice(_) => "ParseDevice",
            ParseDevicePathMissing => "ParseDevicePathMissing",
            ParseUserDevice(_) => "ParseUserDevice",
            ParseUserDeviceSocketMissing => "ParseUserDeviceSocketMissing",
            ParseVdpa(_) => "ParseVdpa",
            ParseVdpaPathMissing => "ParseVdpaPathMissing",
            ParseVsock(_) => "ParseVsock",
            ParseVsockSockMissing => "ParseVsockSockMissing",
            ParseVsockCidMissing => "ParseVsockCidMissing",
            ParseSgxEpc(_) => "ParseSgxEpc",
            ParseSgxEpcIdMissing => "ParseSgxEpcIdMissing",
            ParseNuma(_) => "ParseNuma",
            ParseRestore(_) => "ParseRestore",
            ParseRestoreSourceUrlMissing => "ParseRestoreSourceUrlMissing",
            ParseTpm(_) => "ParseTpm",
            ParseTpmPathMissing => "ParseTpmPathMissing",
            Validation(v) => v.kind(),
        }
    }

    /// The command-line flag the error is about, when there is one.
    pub fn option(&self) -> Option<&'static str> {
        use Error::*;
        Some(match self {
            ParseCpus(_) | InvalidCpuFeatures(_) => "--cpus",
            ParsePlatform(_) => "--platform",
            ParseMemory(_) => "--memory",
            ParseMemoryZone(_) | ParseMemoryZoneIdMissing => "--memory-zone",
            ParseRateLimiterGroup(_) => "--rate-limit-group",
            ParseDisk(_) => "--disk",
            ParseNetwork(_) => "--net",
            ParseRng(_) => "--rng",
            ParseBalloon(_) => "--balloon",
            ParseFileSystem(_) | ParseFsTagMissing | ParseFsSockMissing => "--fs",
            ParsePersistentMemory(_) | ParsePmemFileMissing => "--pmem",
            ParseConsole(_) | ParseConsoleInvalidModeGiven => "--console",
            ParseDevice(_) | ParseDevicePathMissing => "--device",
            ParseUserDevice(_) | ParseUserDeviceSocketMissing => "--user-device",
            ParseVdpa(_) | ParseVdpaPathMissing => "--vdpa",
            ParseVsock(_) | ParseVsockSockMissing | ParseVsockCidMissing => "--vsock",
            ParseSgxEpc(_) | ParseSgxEpcIdMissing => "--sgx-epc",
            ParseNuma(_) => "--numa",
            ParseRestore(_) | ParseRestoreSourceUrlMissing => "--restore",
            ParseTpm(_) | ParseTpmPathMissing => "--tpm",
            Validation(_) => return None,
        })
    }

    /// The inner option-parser error, if any.
    pub fn parser_error(&self) -> Option<&OptionParserError> {
        use Error::*;
        match self {
            ParseCpus(e)
            | ParsePlatform(e)
            | ParseMemory(e)
            | ParseMemoryZone(e)
            | ParseRateLimiterGroup(e)
            | ParseDisk(e)
            | ParseNetwork(e)
            | ParseRng(e)
            | ParseBalloon(e)
            | ParseFileSystem(e)
            | ParsePersistentMemory(e)
            | ParseConsole(e)
            | ParseDevice(e)
            | ParseUserDevice(e)
            | ParseVdpa(e)
            | ParseVsock(e)
            | ParseSgxEpc(e)
            | ParseNuma(e)
            | ParseRestore(e)
            | ParseTpm(e) => Some(e),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use Error::*;
        match self {
            InvalidCpuFeatures(name) => {
                write!(f, "Invalid feature in --cpus features list: {name}")
            }
            ParseMemoryZoneIdMissing => f.write_str("Error parsing --memory-zone: id missing"),
            ParseFsTagMissing => f.write_str("Error parsing --fs: tag missing"),
            ParseFsSockMissing => f.write_str("Error parsing --fs: socket missing"),
            ParsePmemFileMissing => f.write_str("Error parsing --pmem: file missing"),
            ParseConsoleInvalidModeGiven => {
                f.write_str("Error parsing --console: invalid console mode given")
            }
            ParseDevicePathMissing => f.write_str("Error parsing --device: path missing"),
            ParseUserDeviceSocketMissing => {
                f.write_str("Error parsing --user-device: socket missing")
            }
            ParseVdpaPathMissing => f.write_str("Error parsing --vdpa: path missing"),
            ParseVsockSockMissing => f.write_str("Error parsing --vsock: socket missing"),
            ParseVsockCidMissing => f.write_str("Error parsing --vsock: cid missing"),
            ParseSgxEpcIdMissing => f.write_str("Error parsing --sgx-epc: id missing"),
            ParseRestoreSourceUrlMissing => {
                f.write_str("Error parsing --restore: source_url missing")
            }
            ParseTpmPathMissing => f.write_str("Error parsing --tpm: path missing"),
            Validation(v) => write!(f, "Error validating configuration: {v}"),
            other => {
                let option = other.option().unwrap_or_default();
                let inner = other
                    .parser_error()
                    .expect("every other variant wraps a parser error");
                write!(f, "Error parsing {option}: {inner}")
            }
        }
    }
}

impl std::error::Error for Error {}

impl From<ValidationError> for Error {
    fn from(v: ValidationError) -> Self {
        Error::Validation(v)
    }
}

/// A validation error (v37's `ValidationError`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValidationError {
    KernelMissing,
    ConsoleFileMissing,
    ConsoleSocketPathMissing,
    CpusMaxLowerThanBoot,
    DiskSocketAndPath,
    VhostUserRequiresSharedMemory,
    VhostUserMissingSocket,
    CpuTopologyZeroPart,
    CpuTopologyCount,
    VnetQueueLowerThan2,
    VnetQueueFdMismatch,
    VnetReservedFd,
    NoHardwareChecksumOffload,
    HugePageSizeWithoutHugePages,
    InvalidHugePageSize(u64),
    TooManyQueues,
    UserDevicesRequireSharedMemory,
    VsockSpecialCid(u32),
    MemoryZoneReused(String, u32, u32),
    InvalidNumPciSegments(u16),
    InvalidPciSegment(u16),
    BalloonLargerThanRam(u64, u64),
    OnIommuSegment(u16),
    IommuNotSupportedOnSegment(u16),
    IdentifierNotUnique(String),
    InvalidIdentifier(String),
    IommuNotSupported,
    DuplicateDevicePath(String),
    InvalidMtu(u16),
    PciSegmentReused(u16, u32, u32),
    DefaultPciSegmentInvalidNode(u32),
    InvalidRateLimiterGroup,
}

impl ValidationError {
    pub fn kind(&self) -> &'static str {
        use ValidationError::*;
        match self {
            KernelMissing => "KernelMissing",
            ConsoleFileMissing => "ConsoleFileMissing",
            ConsoleSocketPathMissing => "ConsoleSocketPathMissing",
            CpusMaxLowerThanBoot => "CpusMaxLowerThanBoot",
            DiskSocketAndPath => "DiskSocketAndPath",
            VhostUserRequiresSharedMemory => "VhostUserRequiresSharedMemory",
            VhostUserMissingSocket => "VhostUserMissingSocket",
            CpuTopologyZeroPart => "CpuTopologyZeroPart",
            CpuTopologyCount => "CpuTopologyCount",
            VnetQueueLowerThan2 => "VnetQueueLowerThan2",
            VnetQueueFdMismatch => "VnetQueueFdMismatch",
            VnetReservedFd => "VnetReservedFd",
            NoHardwareChecksumOffload => "NoHardwareChecksumOffload",
            HugePageSizeWithoutHugePages => "HugePageSizeWithoutHugePages",
            InvalidHugePageSize(_) => "InvalidHugePageSize",
            TooManyQueues => "TooManyQueues",
            UserDevicesRequireSharedMemory => "UserDevicesRequireSharedMemory",
            VsockSpecialCid(_) => "VsockSpecialCid",
            MemoryZoneReused(..) => "MemoryZoneReused",
            InvalidNumPciSegments(_) => "InvalidNumPciSegments",
            InvalidPciSegment(_) => "InvalidPciSegment",
            BalloonLargerThanRam(..) => "BalloonLargerThanRam",
            OnIommuSegment(_) => "OnIommuSegment",
            IommuNotSupportedOnSegment(_) => "IommuNotSupportedOnSegment",
            IdentifierNotUnique(_) => "IdentifierNotUnique",
            InvalidIdentifier(_) => "InvalidIdentifier",
            IommuNotSupported => "IommuNotSupported",
            DuplicateDevicePath(_) => "DuplicateDevicePath",
            InvalidMtu(_) => "InvalidMtu",
            PciSegmentReused(..) => "PciSegmentReused",
            DefaultPciSegmentInvalidNode(_) => "DefaultPciSegmentInvalidNode",
            InvalidRateLimiterGroup => "InvalidRateLimiterGroup",
        }
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use ValidationError::*;
        match self {
            KernelMissing => f.write_str("No kernel specified"),
            ConsoleFileMissing => f.write_str("Path missing when using file console mode"),
            ConsoleSocketPathMissing => f.write_str("Path missing when using socket console mode"),
            CpusMaxLowerThanBoot => f.write_str("Max CPUs lower than boot CPUs"),
            DiskSocketAndPath => f.write_str("Disk path and vhost socket both provided"),
            VhostUserRequiresSharedMemory => {
                f.write_str("Using vhost-user requires using shared memory or huge pages")
            }
            VhostUserMissingSocket => f.write_str("No socket provided when using vhost-user"),
            CpuTopologyZeroPart => f.write_str("No part of the CPU topology can be zero"),
            CpuTopologyCount => {
                f.write_str("Product of CPU topology parts does not match maximum vCPUs")
            }
            VnetQueueLowerThan2 => f.write_str("Number of queues to virtio_net less than 2"),
            VnetQueueFdMismatch => f.write_str(
                "Number of queues to virtio_net does not match the number of input FDs",
            ),
            VnetReservedFd => f.write_str("Reserved fd number (<= 2)"),
            NoHardwareChecksumOffload => f.write_str(
                "\"offload_tso\" and \"offload_ufo\" depend on \"offload_csum\"",
            ),
            HugePageSizeWithoutHugePages => {
                f.write_str("Huge page size specified but huge pages not enabled")
            }
            InvalidHugePageSize(size) => write!(f, "Huge page size is not power of 2: {size}"),
            TooManyQueues => f.write_str("Number of vCPUs is insufficient for number of queues"),
            UserDevicesRequireSharedMemory => {
                f.write_str("Using user devices requires using shared memory or huge pages")
            }
            VsockSpecialCid(cid) => write!(f, "{cid} is a special VSOCK CID"),
            MemoryZoneReused(zone, a, b) => write!(
                f,
                "Memory zone: {zone} belongs to multiple NUMA nodes {a} and {b}"
            ),
            InvalidNumPciSegments(n) => {
                write!(f, "Number of PCI segments ({n}) not in range of 1 to 96")
            }
            InvalidPciSegment(s) => write!(f, "Invalid PCI segment id: {s}"),
            BalloonLargerThanRam(b, r) => write!(f, "Balloon size ({b}) greater than RAM ({r})"),
            OnIommuSegment(s) => write!(
                f,
                "Device is on an IOMMU PCI segment ({s}) but not placed behind IOMMU"
            ),
            IommuNotSupportedOnSegment(s) => write!(
                f,
                "Device is on an IOMMU PCI segment ({s}) but does not support being placed behind IOMMU"
            ),
            IdentifierNotUnique(id) => write!(f, "Identifier {id} is not unique"),
            InvalidIdentifier(id) => write!(f, "Identifier {id} is invalid"),
            IommuNotSupported => f.write_str("Device does not support being placed behind IOMMU"),
            DuplicateDevicePath(p) => write!(f, "Duplicated device path: {p}"),
            InvalidMtu(m) => write!(
                f,
                "Provided MTU {m} is lower than 1280 (expected by VIRTIO specification)"
            ),
            PciSegmentReused(s, a, b) => write!(
                f,
                "PCI segment: {s} belongs to multiple NUMA nodes {a} and {b}"
            ),
            DefaultPciSegmentInvalidNode(n) => {
                write!(f, "Default PCI segment assigned to non-zero NUMA node {n}")
            }
            InvalidRateLimiterGroup => f.write_str("Invalid rate-limiter group"),
        }
    }
}

impl std::error::Error for ValidationError {}

/// A JSON document that does not fit the config schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonError {
    /// Where in the document (`disks[0].queue_size`); empty at the top.
    pub path: String,
    /// serde_json's text without its position.
    pub message: String,
    /// Position in the text (1-based; 0 when unknown).
    pub line: usize,
    pub column: usize,
}

impl JsonError {
    /// The message with the field path but no text position (for documents
    /// that were never text, such as Python dicts).
    pub fn without_position(&self) -> String {
        if self.path.is_empty() || self.path == "." {
            self.message.clone()
        } else {
            format!("{}: {}", self.path, self.message)
        }
    }
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.without_position())?;
        if self.line > 0 {
            write!(f, " at line {} column {}", self.line, self.column)?;
        }
        Ok(())
    }
}

impl std::error::Error for JsonError {}

/// A value that no option string can express (so a round trip would lose it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnrepresentableError {
    pub option: &'static str,
    pub field: String,
    pub reason: String,
}

impl fmt::Display for UnrepresentableError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} cannot be written as an option string: {} {}",
            self.option, self.field, self.reason
        )
    }
}

impl std::error::Error for UnrepresentableError {}
