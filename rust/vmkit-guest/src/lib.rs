//! The vmkit test guest: a small freestanding x86-64 program (C and assembly in
//! `guest/` at the repository root) that a VMM boots to test itself from the
//! inside, in the spirit of kvm-unit-tests. `build.rs` compiles it with the host
//! toolchain; this crate embeds the resulting boot images.
//!
//! The guest reads its command line (`steps=hello,memmap,acpi,smp,timer,cpl3,pio
//! exit=poweroff ...`), reports one line per step on the 16550 UART at I/O port
//! 0x3f8 and leaves through the requested exit path. `guest/README.md` describes
//! the boot protocols, the command line and the output format.
//!
//! Facts a VMM must match:
//! - All images load at physical [`LOAD_ADDR`] (1 MiB) and are not relocatable.
//! - The PVH entry is [`PVH_ENTRY`]; the 64-bit Linux-boot-protocol entry is
//!   [`ENTRY_64`] (ELF `e_entry`; for the bzImage, the load address + 0x200).
//! - The guest writes [`DEBUG_PORT_PVH_ENTRY`] or [`DEBUG_PORT_LINUX64_ENTRY`] to
//!   port [`DEBUG_PORT`] as its first instruction, and [`DEBUG_PORT_READY`] right
//!   before printing its `ready` line.

/// The PVH image: ELF64 x86-64, one image at [`LOAD_ADDR`], with an ELF note
/// `XEN_ELFNOTE_PHYS32_ENTRY` (name "Xen", type 0x12) whose descriptor is the
/// 32-bit physical PVH entry [`PVH_ENTRY`] (stored as 8 bytes, like Linux).
/// `e_entry` is the 64-bit entry [`ENTRY_64`] for loaders that ignore the note.
pub static PVH_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/vmkit-guest.elf"));

/// The same image as [`PVH_ELF`] without the PVH note, so that ELF loaders
/// start it through the 64-bit entry `e_entry` = [`ENTRY_64`] with a Linux
/// `boot_params` in RSI.
pub static ELF_NO_PVH: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/vmkit-guest-nopvh.elf"));

/// A Linux bzImage (boot protocol 2.15): boot sector and setup header
/// (`setup_sects` = 1, `LOADED_HIGH`, `XLF_KERNEL_64`, not relocatable,
/// `code32_start` = `pref_address` = [`LOAD_ADDR`]), followed at offset
/// `(setup_sects + 1) * 512` by the flat image, whose byte 0x200 is the 64-bit
/// entry. There is no real-mode setup code: boot it through the 64-bit entry.
pub static BZIMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/vmkit-guest.bzImage"));

/// Physical address every image is loaded at.
pub const LOAD_ADDR: u64 = 0x10_0000;
/// 32-bit PVH entry (protected mode, paging off, EBX = `hvm_start_info`).
pub const PVH_ENTRY: u64 = LOAD_ADDR;
/// 64-bit entry (long mode, identity map of at least 1 GiB, RSI = `boot_params`).
pub const ENTRY_64: u64 = LOAD_ADDR + 0x200;
/// I/O port the guest writes its progress markers to.
pub const DEBUG_PORT: u16 = 0x80;
/// First instruction of the PVH entry writes this to [`DEBUG_PORT`].
pub const DEBUG_PORT_PVH_ENTRY: u8 = 0x01;
/// First instruction of the 64-bit entry writes this to [`DEBUG_PORT`].
pub const DEBUG_PORT_LINUX64_ENTRY: u8 = 0x02;
/// Written to [`DEBUG_PORT`] immediately before the `ready` line.
pub const DEBUG_PORT_READY: u8 = 0x7f;
/// The unassigned port the `pio` step writes to (the VMM answers with a plain exit).
pub const PIO_TEST_PORT: u16 = 0x3e8;
/// Where `build.rs` left the image files (for running them under QEMU by hand).
pub const BUILD_DIR: &str = env!("VMKIT_GUEST_OUT_DIR");

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    struct Phdr {
        p_type: u32,
        offset: usize,
        paddr: u64,
        filesz: usize,
        align: u64,
    }

    fn phdrs(elf: &[u8]) -> Vec<Phdr> {
        let phoff = u64_at(elf, 0x20) as usize;
        let phentsize = u16_at(elf, 0x36) as usize;
        let phnum = u16_at(elf, 0x38) as usize;
        assert_eq!(phentsize, 56);
        (0..phnum)
            .map(|i| {
                let p = phoff + i * phentsize;
                Phdr {
                    p_type: u32_at(elf, p),
                    offset: u64_at(elf, p + 8) as usize,
                    paddr: u64_at(elf, p + 24),
                    filesz: u64_at(elf, p + 32) as usize,
                    align: u64_at(elf, p + 48),
                }
            })
            .collect()
    }

    /// (name, type, desc) of every note in the PT_NOTE segments, the way
    /// linux-loader walks them (name and desc padded to p_align).
    fn notes(elf: &[u8]) -> Vec<(Vec<u8>, u32, Vec<u8>)> {
        let mut v = Vec::new();
        for ph in phdrs(elf).iter().filter(|p| p.p_type == 4) {
            let align = ph.align.max(1) as usize;
            let mut off = ph.offset;
            while off + 12 <= ph.offset + ph.filesz {
                let namesz = u32_at(elf, off) as usize;
                let descsz = u32_at(elf, off + 4) as usize;
                let ntype = u32_at(elf, off + 8);
                let name = elf[off + 12..off + 12 + namesz].to_vec();
                let desc_off = off + 12 + namesz.next_multiple_of(align);
                v.push((name, ntype, elf[desc_off..desc_off + descsz].to_vec()));
                off = desc_off + descsz.next_multiple_of(align);
            }
        }
        v
    }

    fn check_elf_common(elf: &[u8]) {
        assert_eq!(&elf[..4], b"\x7fELF");
        assert_eq!(elf[4], 2, "ELFCLASS64");
        assert_eq!(elf[5], 1, "little endian");
        assert_eq!(u16_at(elf, 0x10), 2, "ET_EXEC");
        assert_eq!(u16_at(elf, 0x12), 0x3e, "EM_X86_64");
        assert_eq!(u64_at(elf, 0x18), ENTRY_64, "e_entry is the 64-bit entry");
        let loads: Vec<Phdr> = phdrs(elf).into_iter().filter(|p| p.p_type == 1).collect();
        assert!(!loads.is_empty());
        assert_eq!(loads.iter().map(|p| p.paddr).min(), Some(LOAD_ADDR));
        // The code at both entries: `mov $marker, %al; out %al, $0x80`.
        let first = &loads.iter().find(|p| p.paddr == LOAD_ADDR).unwrap();
        let img = &elf[first.offset..first.offset + first.filesz];
        assert_eq!(
            img[..4],
            [0xb0, DEBUG_PORT_PVH_ENTRY, 0xe6, DEBUG_PORT as u8]
        );
        assert_eq!(
            img[0x200..0x204],
            [0xb0, DEBUG_PORT_LINUX64_ENTRY, 0xe6, 0x80]
        );
    }

    #[test]
    fn pvh_elf_has_the_pvh_note() {
        check_elf_common(PVH_ELF);
        let n = notes(PVH_ELF);
        let pvh: Vec<_> = n.iter().filter(|(_, t, _)| *t == 0x12).collect();
        assert_eq!(pvh.len(), 1, "one XEN_ELFNOTE_PHYS32_ENTRY note");
        let (name, _, desc) = pvh[0];
        assert_eq!(name.as_slice(), b"Xen\0");
        assert!(desc.len() >= 4);
        assert_eq!(u32_at(desc, 0) as u64, PVH_ENTRY);
    }

    #[test]
    fn nopvh_elf_has_no_pvh_note() {
        check_elf_common(ELF_NO_PVH);
        assert!(notes(ELF_NO_PVH).iter().all(|(_, t, _)| *t != 0x12));
    }

    #[test]
    fn bzimage_setup_header() {
        let b = BZIMAGE;
        let setup_sects = b[0x1f1] as usize;
        assert!(setup_sects >= 1);
        assert_eq!(u16_at(b, 0x1fe), 0xaa55, "boot_flag");
        assert_eq!(&b[0x202..0x206], b"HdrS");
        assert_eq!(u16_at(b, 0x206), 0x020f, "version");
        assert_eq!(b[0x211] & 0x01, 0x01, "loadflags LOADED_HIGH");
        assert_eq!(u32_at(b, 0x214) as u64, LOAD_ADDR, "code32_start");
        assert_eq!(b[0x234], 0, "relocatable_kernel");
        assert_eq!(u16_at(b, 0x236) & 1, 1, "xloadflags XLF_KERNEL_64");
        assert!(u32_at(b, 0x230) != 0, "kernel_alignment");
        assert!(u32_at(b, 0x238) >= 255, "cmdline_size");
        assert_eq!(u64_at(b, 0x258), LOAD_ADDR, "pref_address");

        let kernel = &b[(setup_sects + 1) * 512..];
        assert_eq!(
            u32_at(b, 0x1f4) as usize,
            kernel.len().div_ceil(16),
            "syssize"
        );
        assert!(u32_at(b, 0x260) as usize >= kernel.len(), "init_size");
        assert_eq!(
            kernel[0x200..0x204],
            [0xb0, DEBUG_PORT_LINUX64_ENTRY, 0xe6, 0x80]
        );
    }

    #[test]
    fn bzimage_payload_is_the_elf_image() {
        // The flat payload is the loaded image of the ELF, byte for byte.
        let kernel = &BZIMAGE[(BZIMAGE[0x1f1] as usize + 1) * 512..];
        for ph in phdrs(ELF_NO_PVH).iter().filter(|p| p.p_type == 1) {
            let at = (ph.paddr - LOAD_ADDR) as usize;
            assert_eq!(
                &kernel[at..at + ph.filesz],
                &ELF_NO_PVH[ph.offset..ph.offset + ph.filesz]
            );
        }
    }
}
