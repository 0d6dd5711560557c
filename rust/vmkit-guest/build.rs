//! Builds the vmkit test guest (`guest/` at the repository root) with the host
//! toolchain (gcc, ld, objcopy, objdump) and writes three boot images to OUT_DIR:
//!
//! - `vmkit-guest.elf`: ELF64 with the PVH note (`XEN_ELFNOTE_PHYS32_ENTRY`)
//! - `vmkit-guest-nopvh.elf`: the same image without the note
//! - `vmkit-guest.bzImage`: a Linux setup header followed by the flat image
//!
//! The guest's CPL0 code runs in KVM's instruction emulator on kvm_pvm hosts,
//! where some instructions kill the VM. The compiler flags keep gcc away from
//! them, and the final images are disassembled and rejected if any appear.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Physical load address (PT_LOAD p_paddr, bzImage code32_start / pref_address).
const LOAD_ADDR: u64 = 0x10_0000;
/// The 64-bit entry is at this offset in the image (Linux: startup_64).
const ENTRY64_OFFSET: usize = 0x200;
/// Bytes the guest's command-line buffer holds (CMDLINE_MAX in layout.h).
const CMDLINE_SIZE: u32 = 4095;

/// Emulator-safe code generation: general-purpose registers only, baseline
/// x86-64 (no popcnt/BMI/movbe), no red zone (interrupts use the same stack).
const CFLAGS: &[&str] = &[
    "-O2",
    "-std=gnu11",
    "-ffreestanding",
    "-fno-pic",
    "-fno-pie",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-mno-mmx",
    "-mno-sse",
    "-mno-sse2",
    "-mno-avx",
    "-march=x86-64",
    "-mtune=generic",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    "-fno-builtin",
    // gcc would otherwise turn loops into memset/memcpy calls, inside memset too.
    "-fno-tree-loop-distribute-patterns",
    "-fcf-protection=none",
    "-Wall",
    "-Wextra",
    "-Werror",
];

struct Tools {
    /// $CC may carry arguments (`CC="gcc -m64"`): the program, then those.
    cc: Vec<String>,
    ld: String,
    objcopy: String,
    objdump: String,
}

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let guest = manifest.join("../../guest");
    println!("cargo:rerun-if-changed=../../guest");
    for var in ["CC", "LD", "OBJCOPY", "OBJDUMP"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    // lib.rs exposes where the files are, for running them under QEMU by hand.
    println!("cargo:rustc-env=VMKIT_GUEST_OUT_DIR={}", out.display());

    if let Err(e) = build(&guest, &out) {
        panic!("\n\nvmkit-guest: building the test guest failed:\n{e}\n");
    }
}

fn tool(var: &str, default: &str) -> String {
    env::var(var)
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| default.to_string())
}

fn check_tool(name: &str, what: &str) -> Result<(), String> {
    match Command::new(name).arg("--version").output() {
        Ok(o) if o.status.success() => Ok(()),
        _ => Err(format!(
            "`{name}` ({what}) was not found or does not run. The test guest is built from \
             source with the host C toolchain: install gcc and binutils (Debian/Ubuntu: \
             `apt-get install gcc binutils`), or point the CC/LD/OBJCOPY/OBJDUMP environment \
             variables at them."
        )),
    }
}

fn run(cmd: &mut Command) -> Result<Vec<u8>, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(out.stdout)
}

fn build(guest: &Path, out: &Path) -> Result<(), String> {
    let tools = Tools {
        cc: tool("CC", "gcc")
            .split_whitespace()
            .map(str::to_string)
            .collect(),
        ld: tool("LD", "ld"),
        objcopy: tool("OBJCOPY", "objcopy"),
        objdump: tool("OBJDUMP", "objdump"),
    };
    check_tool(&tools.cc[0], "C compiler")?;
    check_tool(&tools.ld, "linker")?;
    check_tool(&tools.objcopy, "objcopy")?;
    check_tool(&tools.objdump, "objdump")?;

    let src = guest.join("src");
    let script = guest.join("link/guest.ld");
    let mut sources: Vec<PathBuf> = fs::read_dir(&src)
        .map_err(|e| format!("cannot read {}: {e}", src.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("c" | "S")))
        .collect();
    sources.sort();

    let obj_dir = out.join("obj");
    fs::create_dir_all(&obj_dir).map_err(|e| format!("{}: {e}", obj_dir.display()))?;
    let mut objects = Vec::new();
    let mut pvh_note = None;
    for s in &sources {
        let name = s.file_name().unwrap().to_string_lossy().to_string();
        let obj = obj_dir.join(format!("{name}.o"));
        run(Command::new(&tools.cc[0])
            .args(&tools.cc[1..])
            .args(CFLAGS)
            .arg("-I")
            .arg(&src)
            .arg("-c")
            .arg(s)
            .arg("-o")
            .arg(&obj))?;
        if name == "pvhnote.S" {
            pvh_note = Some(obj);
        } else {
            objects.push(obj);
        }
    }
    let pvh_note = pvh_note.ok_or("guest/src/pvhnote.S is missing")?;

    let pvh_elf = out.join("vmkit-guest.elf");
    let nopvh_elf = out.join("vmkit-guest-nopvh.elf");
    link(&tools, &script, &objects, Some(&pvh_note), &pvh_elf)?;
    link(&tools, &script, &objects, None, &nopvh_elf)?;

    for elf in [&pvh_elf, &nopvh_elf] {
        check_instructions(&tools, elf)?;
    }

    let flat = out.join("vmkit-guest.bin");
    run(Command::new(&tools.objcopy)
        .args(["-O", "binary"])
        .arg(&nopvh_elf)
        .arg(&flat))?;
    let flat = fs::read(&flat).map_err(|e| format!("{}: {e}", flat.display()))?;
    check_flat(&flat)?;
    let bz = out.join("vmkit-guest.bzImage");
    fs::write(&bz, bzimage(&flat)?).map_err(|e| format!("{}: {e}", bz.display()))?;
    Ok(())
}

fn link(
    tools: &Tools,
    script: &Path,
    objects: &[PathBuf],
    extra: Option<&PathBuf>,
    output: &Path,
) -> Result<(), String> {
    let mut cmd = Command::new(&tools.ld);
    cmd.args(["-nostdlib", "-static", "--build-id=none"])
        .args(["-z", "max-page-size=4096", "-z", "noexecstack"])
        .arg("-T")
        .arg(script)
        .arg("-o")
        .arg(output)
        .args(objects);
    if let Some(o) = extra {
        cmd.arg(o);
    }
    // binutils >= 2.39 warns about the RWX segment of a bare-metal image; older ones lack the flag.
    let help = Command::new(&tools.ld).arg("--help").output();
    if help.is_ok_and(|h| String::from_utf8_lossy(&h.stdout).contains("--no-warn-rwx-segments")) {
        cmd.arg("--no-warn-rwx-segments");
    }
    run(&mut cmd).map(|_| ())
}

/// Code sections and the CPU mode to disassemble them in.
const CODE_SECTIONS: &[(&str, &str)] = &[
    (".head32", "i386"),
    (".head64", "x86-64"),
    (".text", "x86-64"),
    (".text16", "i8086"),
];
/// Data that lives inside a code section (the trampoline's GDT pointer and CR3).
const DATA_LABELS: &[&str] = &["tramp_gdt_desc", "tramp_cr3", "tramp_end"];

/// Rejects instructions that KVM's emulator cannot run at CPL0 on kvm_pvm.
fn check_instructions(tools: &Tools, elf: &Path) -> Result<(), String> {
    // Every executable section must be one we know how to disassemble.
    let headers =
        String::from_utf8_lossy(&run(Command::new(&tools.objdump).arg("-h").arg(elf))?).to_string();
    let lines: Vec<&str> = headers.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        let fields: Vec<&str> = l.split_whitespace().collect();
        let flags = lines.get(i + 1).copied().unwrap_or("");
        if fields.len() >= 2 && fields[0].parse::<u32>().is_ok() && flags.contains("CODE") {
            let name = fields[1];
            if !CODE_SECTIONS.iter().any(|(s, _)| *s == name) {
                return Err(format!(
                    "{}: unexpected code section {name}: add it to CODE_SECTIONS in build.rs",
                    elf.display()
                ));
            }
        }
    }

    let mut bad = Vec::new();
    for (section, mode) in CODE_SECTIONS {
        let text = run(Command::new(&tools.objdump)
            .args(["-d", "--no-show-raw-insn", "-M", mode, "-j", section])
            .arg(elf))?;
        let text = String::from_utf8_lossy(&text);
        let mut in_data = false;
        for line in text.lines() {
            if let Some(label) = line.trim_end().strip_suffix(">:") {
                let name = label.rsplit('<').next().unwrap_or("");
                in_data = DATA_LABELS.contains(&name);
                continue;
            }
            let Some((addr, insn)) = line.split_once(":\t") else {
                continue;
            };
            if in_data {
                continue;
            }
            if let Some(why) = forbidden(insn) {
                bad.push(format!("  {}: {} ({why})", addr.trim(), insn.trim()));
            }
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} contains instructions that kill the VM at CPL0 on kvm_pvm \
             (see guest/README.md):\n{}",
            elf.display(),
            bad.join("\n")
        ))
    }
}

/// Mnemonics that KVM's emulator does not implement (exact, or with a b/w/l/q suffix).
const FORBIDDEN: &[&str] = &[
    "int", "int1", "int3", "into", "icebp", "xgetbv", "popcnt", "rdtscp", "rdpid", "lar", "lsl",
    "verr", "verw", "stac", "clac", "vmcall", "vmmcall", "clwb", "ldmxcsr", "stmxcsr", "andn",
    "bextr", "blsi", "blsmsk", "blsr", "bzhi", "mulx", "pdep", "pext", "rorx", "sarx", "shlx",
    "shrx",
];
/// Mnemonic families, by prefix.
const FORBIDDEN_PREFIXES: &[&str] = &["xsave", "xrstor", "crc32", "movbe", "cmpxchg16b"];
/// Instruction prefixes objdump prints before the mnemonic.
const PREFIXES: &[&str] = &[
    "lock", "rep", "repz", "repnz", "repe", "repne", "data16", "data32", "addr16", "addr32", "cs",
    "ds", "es", "ss", "fs", "gs", "notrack", "bnd", "xacquire", "xrelease",
];

fn forbidden(insn: &str) -> Option<&'static str> {
    let insn = insn.trim();
    if insn.contains("(bad)") {
        return Some("undecodable bytes in a code section");
    }
    for reg in ["%xmm", "%ymm", "%zmm", "%mm", "%st"] {
        if insn.contains(reg) {
            return Some("SSE/AVX/MMX/x87 register");
        }
    }
    let mnemonic = insn
        .split_whitespace()
        .find(|t| !PREFIXES.contains(t) && !t.starts_with("rex"))?;
    if mnemonic.starts_with('f') {
        return Some("x87 instruction");
    }
    if FORBIDDEN_PREFIXES.iter().any(|p| mnemonic.starts_with(p)) {
        return Some("not emulated at CPL0");
    }
    let base = match mnemonic.strip_suffix(['b', 'w', 'l', 'q']) {
        Some(b) if FORBIDDEN.contains(&b) => b,
        _ => mnemonic,
    };
    if FORBIDDEN.contains(&base) {
        return Some("not emulated at CPL0");
    }
    None
}

/// The flat image must start with the PVH entry and have the 64-bit entry at +0x200.
fn check_flat(flat: &[u8]) -> Result<(), String> {
    // mov $imm8, %al; out %al, $0x80
    let want32 = [0xb0, 0x01, 0xe6, 0x80];
    let want64 = [0xb0, 0x02, 0xe6, 0x80];
    if flat.len() < ENTRY64_OFFSET + 4
        || flat[..4] != want32
        || flat[ENTRY64_OFFSET..ENTRY64_OFFSET + 4] != want64
    {
        return Err(
            "the flat image does not start with the PVH entry and have the \
                    64-bit entry at +0x200 (check guest/link/guest.ld)"
                .into(),
        );
    }
    Ok(())
}

fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// A bzImage: boot sector + one setup sector holding the setup header
/// (Documentation/arch/x86/boot.rst, protocol 2.15), then the flat image.
/// There is no real-mode setup code: loaders must use the 64-bit entry
/// (load address + 0x200); the 16-bit jump at 0x200 leads to `cli; hlt`.
fn bzimage(flat: &[u8]) -> Result<Vec<u8>, String> {
    const SETUP_SECTS: u8 = 1;
    let setup_len = (SETUP_SECTS as usize + 1) * 512;
    let mut b = vec![0u8; setup_len];
    let syssize = u32::try_from(flat.len().div_ceil(16)).map_err(|_| "image too large")?;
    let init_size = u32::try_from(flat.len().next_multiple_of(4096)).map_err(|_| "too large")?;

    b[0x1f1] = SETUP_SECTS; // setup_sects
    put32(&mut b, 0x1f4, syssize); // syssize, 16-byte units
    put16(&mut b, 0x1fe, 0xaa55); // boot_flag
    b[0x200] = 0xeb; // jump: jmp short to the halt stub at 0x280
    b[0x201] = (0x280 - 0x202) as u8;
    b[0x202..0x206].copy_from_slice(b"HdrS"); // header
    put16(&mut b, 0x206, 0x020f); // version 2.15
    put16(&mut b, 0x20c, 0x1000); // start_sys_seg (obsolete)
    put16(&mut b, 0x20e, 0x290 - 0x200); // kernel_version string offset
    b[0x211] = 0x01; // loadflags: LOADED_HIGH
    put32(&mut b, 0x214, LOAD_ADDR as u32); // code32_start
    put32(&mut b, 0x22c, 0x7fff_ffff); // initrd_addr_max
    put32(&mut b, 0x230, LOAD_ADDR as u32); // kernel_alignment
    b[0x234] = 0; // relocatable_kernel: no, load at code32_start
    b[0x235] = 20; // min_alignment: 1 MiB (log2)
    put16(&mut b, 0x236, 0x0001); // xloadflags: XLF_KERNEL_64
    put32(&mut b, 0x238, CMDLINE_SIZE); // cmdline_size
    put64(&mut b, 0x258, LOAD_ADDR); // pref_address
    put32(&mut b, 0x260, init_size); // init_size
    b[0x280..0x284].copy_from_slice(&[0xfa, 0xf4, 0xeb, 0xfd]); // cli; hlt; jmp .-1
    b[0x290..0x29c].copy_from_slice(b"vmkit-guest\0");
    b.extend_from_slice(flat);
    Ok(b)
}
