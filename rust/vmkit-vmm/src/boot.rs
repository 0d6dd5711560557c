//! Loading the payload: a PVH ELF (vmlinux), an ELF without a PVH note
//! (64-bit entry with a zero page) or a bzImage (64-bit boot protocol), plus
//! the initramfs and the command line, and the boot structures each protocol
//! hands the guest (hvm_start_info or boot_params).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;

use crate::memory::GuestMemoryMmap;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{BzImage, Elf, KernelLoader, KernelLoaderResult};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};
use vmkit_config::PayloadConfig;

use crate::error::{ErrorKind, ModuleError, Result};
use crate::layout::*;
use crate::memory::GuestRam;

/// Why the payload could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("Booting from --firmware is not supported yet: give a kernel with --kernel")]
    Firmware,
    #[error("No kernel specified")]
    NoKernel,
    #[error("Cannot open kernel {path}")]
    OpenKernel {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("Cannot open kernel {path} (--kernel): not a regular file")]
    KernelNotAFile { path: String },
    #[error("Cannot load kernel {path}: reading it failed")]
    ReadKernel {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("Cannot load kernel {path}")]
    LoadKernel {
        path: String,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("Cannot load kernel {path}: {reason}")]
    BadKernel { path: String, reason: &'static str },
    #[error("The kernel command line is {len} bytes; at most {max} fit")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("The kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("Cannot write the {what} at {addr:#x}")]
    WriteGuest {
        what: &'static str,
        addr: u64,
        #[source]
        source: GuestMemoryError,
    },
    #[error("too many memory map entries")]
    TooManyMapEntries,
    #[error("Cannot open initramfs {path}")]
    OpenInitramfs {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("Cannot open initramfs {path} (--initramfs): not a regular file")]
    InitramfsNotAFile { path: String },
    #[error("Cannot read initramfs {path}")]
    InitramfsSize {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("Cannot read initramfs {path}")]
    ReadInitramfs {
        path: String,
        #[source]
        source: GuestMemoryError,
    },
    #[error(
        "The initramfs {path} ({size} bytes) does not fit in guest memory between the \
         kernel end ({kernel_end:#x}) and {top:#x}"
    )]
    InitramfsDoesNotFit {
        path: String,
        size: u64,
        kernel_end: u64,
        top: u64,
    },
}

impl ModuleError for BootError {
    fn kind(&self) -> ErrorKind {
        use BootError::*;
        match self {
            Firmware => ErrorKind::Unsupported,
            NoKernel
            | OpenKernel { .. }
            | KernelNotAFile { .. }
            | ReadKernel { .. }
            | LoadKernel { .. }
            | BadKernel { .. }
            | CmdlineTooLong { .. }
            | CmdlineNul => ErrorKind::Kernel,
            WriteGuest { .. } | TooManyMapEntries => ErrorKind::Memory,
            OpenInitramfs { .. }
            | InitramfsNotAFile { .. }
            | InitramfsSize { .. }
            | ReadInitramfs { .. }
            | InitramfsDoesNotFit { .. } => ErrorKind::Initramfs,
        }
    }
}

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const XLF_KERNEL_64: u16 = 1;

/// Where and how the boot vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryPoint {
    /// 32-bit protected mode, paging off, EBX = hvm_start_info.
    Pvh { entry: u64 },
    /// 64-bit long mode with identity paging, RSI = boot_params.
    Linux64 { entry: u64 },
}

/// What the payload turned out to be, for logs and `info()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    PvhElf,
    Elf64,
    BzImage,
}

impl KernelFormat {
    pub fn name(self) -> &'static str {
        match self {
            KernelFormat::PvhElf => "pvh-elf",
            KernelFormat::Elf64 => "elf",
            KernelFormat::BzImage => "bzimage",
        }
    }

    /// The format `name` names (as a snapshot records it).
    pub fn from_name(name: &str) -> Option<KernelFormat> {
        [
            KernelFormat::PvhElf,
            KernelFormat::Elf64,
            KernelFormat::BzImage,
        ]
        .into_iter()
        .find(|f| f.name() == name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedPayload {
    pub entry: EntryPoint,
    pub format: KernelFormat,
    pub kernel_end: u64,
    /// Guest address and size of the initramfs, if any.
    pub initramfs: Option<(u64, u64)>,
}

/// A memory map entry shared by both protocols.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryMapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The map the guest is given, as Cloud Hypervisor's: RAM below 640 KiB, RAM
/// from 1 MiB, RAM above the hole. [640 KiB, 1 MiB), where the ACPI tables
/// are, is not listed at all (kernels never use it as RAM).
pub fn memory_map(ram: &GuestRam) -> Vec<MemoryMapEntry> {
    let mut map = Vec::new();
    for &(start, size) in &ram.ranges {
        let end = start + size;
        if start == 0 {
            map.push(MemoryMapEntry {
                addr: 0,
                size: EBDA_START.min(end),
                kind: E820_RAM,
            });
            if end > HIGH_RAM_START {
                map.push(MemoryMapEntry {
                    addr: HIGH_RAM_START,
                    size: end - HIGH_RAM_START,
                    kind: E820_RAM,
                });
            }
        } else {
            map.push(MemoryMapEntry {
                addr: start,
                size,
                kind: E820_RAM,
            });
        }
    }
    // ECAM is reserved, as kernels check before trusting the MCFG table.
    // Last, after all RAM, in Cloud Hypervisor's order.
    map.push(MemoryMapEntry {
        addr: PCI_MMCONFIG_START,
        size: PCI_MMCONFIG_SIZE,
        kind: E820_RESERVED,
    });
    map
}

fn bad_kernel(path: &str, reason: &'static str) -> BootError {
    BootError::BadKernel {
        path: path.to_owned(),
        reason,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ImageKind {
    Elf,
    BzImage,
}

fn detect(file: &mut File, path: &str) -> Result<ImageKind> {
    let mut head = [0u8; 0x206];
    let read_error = |source| BootError::ReadKernel {
        path: path.to_owned(),
        source,
    };
    let read = file.read(&mut head).map_err(read_error)?;
    file.seek(SeekFrom::Start(0)).map_err(read_error)?;
    if read >= 4 && head[..4] == *b"\x7fELF" {
        return Ok(ImageKind::Elf);
    }
    if read >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        return Ok(ImageKind::BzImage);
    }
    Err(bad_kernel(path, "it is neither an ELF vmlinux nor a bzImage").into())
}

fn write<T: vm_memory::ByteValued>(
    mem: &GuestMemoryMmap,
    value: T,
    addr: u64,
    what: &'static str,
) -> Result<()> {
    mem.write_obj(value, GuestAddress(addr))
        .map_err(|source| BootError::WriteGuest { what, addr, source })?;
    Ok(())
}

/// Opens `path` for reading if it is a regular file (None if it is not).
/// O_NONBLOCK keeps a FIFO from blocking the open, and the check on the
/// opened file keeps one from blocking the reads.
fn open_regular(path: &str) -> io::Result<Option<File>> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Ok(None);
    }
    Ok(Some(file))
}

/// Loads the payload and writes its boot structures. `rsdp` is where the
/// ACPI tables start (0 without ACPI).
pub fn load_payload(ram: &GuestRam, payload: &PayloadConfig, rsdp: u64) -> Result<LoadedPayload> {
    if payload.firmware.is_some() {
        return Err(BootError::Firmware.into());
    }
    let path = payload.kernel.as_deref().ok_or(BootError::NoKernel)?;
    let mut file = match open_regular(path) {
        Ok(Some(file)) => file,
        Ok(None) => {
            return Err(BootError::KernelNotAFile {
                path: path.to_owned(),
            }
            .into())
        }
        Err(source) => {
            return Err(BootError::OpenKernel {
                path: path.to_owned(),
                source,
            }
            .into())
        }
    };
    let mem = &ram.memory;
    let kind = detect(&mut file, path)?;
    let result: KernelLoaderResult = match kind {
        ImageKind::Elf => Elf::load(mem, None, &mut file, Some(GuestAddress(HIGH_RAM_START)))
            .map_err(|source| BootError::LoadKernel {
                path: path.to_owned(),
                source,
            })?,
        ImageKind::BzImage => {
            BzImage::load(mem, None, &mut file, Some(GuestAddress(HIGH_RAM_START))).map_err(
                |source| BootError::LoadKernel {
                    path: path.to_owned(),
                    source,
                },
            )?
        }
    };

    let cmdline = payload.cmdline.as_deref().unwrap_or("");
    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max: CMDLINE_MAX_SIZE - 1,
        }
        .into());
    }
    if cmdline.contains('\0') {
        return Err(BootError::CmdlineNul.into());
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(|source| BootError::WriteGuest {
            what: "command line",
            addr: CMDLINE_START,
            source,
        })?;

    let setup = result.setup_header;
    let initrd_max = setup
        .filter(|h| h.initrd_addr_max != 0)
        .map_or(u64::MAX, |h| u64::from(h.initrd_addr_max) + 1);
    let initramfs = match payload.initramfs.as_deref() {
        Some(initramfs_path) => Some(load_initramfs(
            ram,
            initramfs_path,
            result.kernel_end,
            initrd_max,
        )?),
        None => None,
    };

    let map = memory_map(ram);
    let (entry, format) = match (kind, result.pvh_boot_cap) {
        (ImageKind::Elf, PvhBootCapability::PvhEntryPresent(entry)) => {
            write_start_info(mem, &map, initramfs, rsdp)?;
            (EntryPoint::Pvh { entry: entry.0 }, KernelFormat::PvhElf)
        }
        (ImageKind::Elf, _) => {
            let mut hdr = setup_header {
                boot_flag: KERNEL_BOOT_FLAG_MAGIC,
                header: KERNEL_HDR_MAGIC,
                kernel_alignment: KERNEL_MIN_ALIGNMENT,
                ..Default::default()
            };
            hdr.type_of_loader = KERNEL_LOADER_OTHER;
            write_zero_page(mem, hdr, &map, cmdline.len(), initramfs, rsdp)?;
            (
                EntryPoint::Linux64 {
                    entry: result.kernel_load.0,
                },
                KernelFormat::Elf64,
            )
        }
        (ImageKind::BzImage, _) => {
            let hdr = setup.ok_or_else(|| bad_kernel(path, "no setup header"))?;
            if hdr.version < 0x0206 || hdr.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(bad_kernel(
                    path,
                    "the bzImage has no 64-bit entry point (boot protocol 2.06+ with XLF_KERNEL_64 needed)",
                )
                .into());
            }
            write_zero_page(mem, hdr, &map, cmdline.len(), initramfs, rsdp)?;
            (
                EntryPoint::Linux64 {
                    entry: result.kernel_load.0 + 0x200,
                },
                KernelFormat::BzImage,
            )
        }
    };
    Ok(LoadedPayload {
        entry,
        format,
        kernel_end: result.kernel_end,
        initramfs,
    })
}

/// Places the initramfs at the top of low RAM (page aligned), above the kernel.
fn load_initramfs(ram: &GuestRam, path: &str, kernel_end: u64, max_end: u64) -> Result<(u64, u64)> {
    let mut file = match open_regular(path) {
        Ok(Some(file)) => file,
        Ok(None) => {
            return Err(BootError::InitramfsNotAFile {
                path: path.to_owned(),
            }
            .into())
        }
        Err(source) => {
            return Err(BootError::OpenInitramfs {
                path: path.to_owned(),
                source,
            }
            .into())
        }
    };
    let size = file
        .metadata()
        .map_err(|source| BootError::InitramfsSize {
            path: path.to_owned(),
            source,
        })?
        .len();
    let top = ram.low_end().min(max_end);
    let addr = top
        .checked_sub(size)
        .map(|a| a & !(PAGE_SIZE - 1))
        .filter(|&a| a >= kernel_end.max(HIGH_RAM_START))
        .ok_or_else(|| BootError::InitramfsDoesNotFit {
            path: path.to_owned(),
            size,
            kernel_end,
            top,
        })?;
    // It fits in guest memory, so in the address space.
    let len = size as usize;
    ram.memory
        .read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(|source| BootError::ReadInitramfs {
            path: path.to_owned(),
            source,
        })?;
    Ok((addr, size))
}

fn write_start_info(
    mem: &GuestMemoryMmap,
    map: &[MemoryMapEntry],
    initramfs: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<()> {
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: rsdp,
        memmap_paddr: MEMMAP_START,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some((addr, size)) = initramfs {
        info.nr_modules = 1;
        info.modlist_paddr = MODLIST_START;
        let module = hvm_modlist_entry {
            paddr: addr,
            size,
            ..Default::default()
        };
        write(mem, module, MODLIST_START, "PVH module list")?;
    }
    for (i, e) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        };
        let at = MEMMAP_START + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        write(mem, entry, at, "PVH memory map")?;
    }
    write(mem, info, PVH_INFO_START, "PVH start info")
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    mut hdr: setup_header,
    map: &[MemoryMapEntry],
    cmdline_len: usize,
    initramfs: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<()> {
    hdr.type_of_loader = KERNEL_LOADER_OTHER;
    hdr.cmd_line_ptr = CMDLINE_START as u32;
    hdr.cmdline_size = cmdline_len as u32 + 1;
    if let Some((addr, size)) = initramfs {
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
    }
    let mut params = boot_params {
        hdr,
        acpi_rsdp_addr: rsdp,
        ..Default::default()
    };
    if map.len() > params.e820_table.len() {
        return Err(BootError::TooManyMapEntries.into());
    }
    for (slot, e) in params.e820_table.iter_mut().zip(map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = map.len() as u8;
    write(mem, params, ZERO_PAGE_START, "zero page")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_ram;
    use vmkit_config::MemoryConfig;

    fn ram(size: &str) -> GuestRam {
        create_guest_ram(&MemoryConfig::parse(size, None).unwrap()).unwrap()
    }

    #[test]
    fn memory_map_is_cloud_hypervisors() {
        let map = memory_map(&ram("size=3584M"));
        let entries: Vec<(u64, u64, u32)> = map.iter().map(|e| (e.addr, e.size, e.kind)).collect();
        // RAM below 640 KiB, from 1 MiB to the hole, above 4 GiB; then ECAM.
        assert_eq!(
            entries,
            vec![
                (0, 0xa_0000, E820_RAM),
                (HIGH_RAM_START, 0xc000_0000 - HIGH_RAM_START, E820_RAM),
                (0x1_0000_0000, 0x2000_0000, E820_RAM),
                (PCI_MMCONFIG_START, PCI_MMCONFIG_SIZE, E820_RESERVED),
            ]
        );
    }

    fn temp_file(name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let path =
            std::env::temp_dir().join(format!("vmkit-boot-test-{}-{name}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn bad_kernels_get_clear_errors() {
        let ram = ram("size=64M");
        let payload = |kernel: &str| PayloadConfig {
            kernel: Some(kernel.to_owned()),
            ..Default::default()
        };
        let err = load_payload(&ram, &payload("/nonexistent/vmlinux"), 0).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Kernel);
        assert_eq!(
            err.message,
            "Cannot open kernel /nonexistent/vmlinux: No such file or directory (os error 2)"
        );
        // The cause is kept, typed: the boot error, then the OS error under it.
        let boot = std::error::Error::source(&err).unwrap();
        assert!(matches!(
            boot.downcast_ref::<BootError>(),
            Some(BootError::OpenKernel { .. })
        ));
        let io = boot.source().unwrap().downcast_ref::<io::Error>().unwrap();
        assert_eq!(io.kind(), io::ErrorKind::NotFound);

        let junk = temp_file("junk", &[0x42; 4096]);
        let err = load_payload(&ram, &payload(junk.to_str().unwrap()), 0).unwrap_err();
        assert!(
            err.message.contains("neither an ELF vmlinux nor a bzImage"),
            "{}",
            err.message
        );

        let mut corrupt = vec![0u8; 4096];
        corrupt[..4].copy_from_slice(b"\x7fELF");
        let corrupt_path = temp_file("corrupt-elf", &corrupt);
        let err = load_payload(&ram, &payload(corrupt_path.to_str().unwrap()), 0).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Kernel);
        std::fs::remove_file(junk).unwrap();
        std::fs::remove_file(corrupt_path).unwrap();

        let firmware = PayloadConfig {
            firmware: Some("/fw".into()),
            ..Default::default()
        };
        assert_eq!(
            load_payload(&ram, &firmware, 0).unwrap_err().kind,
            ErrorKind::Unsupported
        );
    }

    #[test]
    fn a_fifo_payload_is_refused_at_once() {
        let ram = ram("size=64M");
        let fifo =
            std::env::temp_dir().join(format!("vmkit-boot-test-{}-fifo", std::process::id()));
        let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        let fifo_str = fifo.to_str().unwrap().to_owned();
        // Nobody writes to the FIFO: a blocking open or read would hang here.
        let err = load_payload(
            &ram,
            &PayloadConfig {
                kernel: Some(fifo_str.clone()),
                ..Default::default()
            },
            0,
        )
        .unwrap_err();
        assert_eq!(err.kind, ErrorKind::Kernel);
        assert_eq!(
            err.message,
            format!("Cannot open kernel {fifo_str} (--kernel): not a regular file")
        );
        let err = load_initramfs(&ram, &fifo_str, HIGH_RAM_START, u64::MAX).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Initramfs);
        assert_eq!(
            err.message,
            format!("Cannot open initramfs {fifo_str} (--initramfs): not a regular file")
        );
        std::fs::remove_file(fifo).unwrap();
    }
}
