//! Architectural vCPU state at boot: CPUID, MSRs, registers, segments, page
//! tables, FPU and LAPIC, following the Linux boot protocols and the CPUID and
//! MSR policy that `kvm_pvm` hosts need (see shared/kvm-here.md).

use crate::memory::GuestMemoryMmap;
use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use vm_memory::{Bytes, GuestAddress};
use vmkit_config::CpusConfig;

use crate::boot::EntryPoint;
use crate::error::{ErrorKind, ModuleError, Result};
use crate::layout::*;

/// Why a vCPU could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("{what}")]
    Kvm {
        what: String,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A table KVM takes as a flexible array could not be built (`what`).
    #[error("{what}: {detail}")]
    Table { what: &'static str, detail: String },
    #[error("KVM refused to set MSR {index:#x} to {data:#x}")]
    MsrRefused { index: u32, data: u64 },
    #[error("boot tables at {addr:#x}")]
    BootTables {
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

impl ModuleError for CpuError {
    fn kind(&self) -> ErrorKind {
        match self {
            CpuError::BootTables { .. } => ErrorKind::Memory,
            _ => ErrorKind::Kvm,
        }
    }
}

fn kvm_error(what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> CpuError {
    let what = what.into();
    move |source| CpuError::Kvm { what, source }
}

/// The guest's CPU topology (threads per core, cores per die, dies per package, packages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    pub threads_per_core: u8,
    pub cores_per_die: u8,
    pub dies_per_package: u8,
    pub packages: u8,
}

impl Topology {
    pub fn from_config(cpus: &CpusConfig) -> Self {
        match &cpus.topology {
            Some(t) => Topology {
                threads_per_core: t.threads_per_core,
                cores_per_die: t.cores_per_die,
                dies_per_package: t.dies_per_package,
                packages: t.packages,
            },
            None => Topology {
                threads_per_core: 1,
                cores_per_die: cpus.max_vcpus.max(1),
                dies_per_package: 1,
                packages: 1,
            },
        }
    }

    fn bits(count: u8) -> u32 {
        u32::from(count.max(1)).next_power_of_two().trailing_zeros()
    }

    fn thread_bits(&self) -> u32 {
        Self::bits(self.threads_per_core)
    }

    fn core_bits(&self) -> u32 {
        Self::bits(self.cores_per_die)
    }

    fn die_bits(&self) -> u32 {
        Self::bits(self.dies_per_package)
    }

    /// The x2APIC id of vCPU `index`: thread, core, die and package fields.
    pub fn apic_id(&self, index: u8) -> u32 {
        let i = u32::from(index);
        let threads = u32::from(self.threads_per_core.max(1));
        let cores = u32::from(self.cores_per_die.max(1));
        let dies = u32::from(self.dies_per_package.max(1));
        let thread = i % threads;
        let core = (i / threads) % cores;
        let die = (i / threads / cores) % dies;
        let package = i / threads / cores / dies;
        thread
            | core << self.thread_bits()
            | die << (self.thread_bits() + self.core_bits())
            | package << (self.thread_bits() + self.core_bits() + self.die_bits())
    }

    fn logical_per_package(&self) -> u32 {
        u32::from(self.threads_per_core.max(1))
            * u32::from(self.cores_per_die.max(1))
            * u32::from(self.dies_per_package.max(1))
    }
}

/// Host facts that shape the CPUID the guest sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostCpu {
    /// `/dev/kvm` is the PVM backend (hypercall-based PV features must go).
    pub pvm: bool,
    /// KVM_CAP_TSC_DEADLINE_TIMER: the in-kernel LAPIC has the TSC-deadline
    /// mode, which KVM_GET_SUPPORTED_CPUID never lists (the VMM must).
    pub tsc_deadline_timer: bool,
    pub tsc_khz: Option<u32>,
}

const LEAF_HYPERVISOR: u32 = 0x4000_0000;
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;
const LEAF_TIMING: u32 = 0x4000_0010;
/// KVM PV features that are hypercall based: they livelock on PVM hosts.
const KVM_FEATURE_PV_UNHALT: u32 = 1 << 7;
const KVM_FEATURE_PV_SEND_IPI: u32 = 1 << 11;
const KVM_FEATURE_PV_SCHED_YIELD: u32 = 1 << 13;

/// The guest's physical address width: the host's, capped by `max_phys_bits`.
pub fn guest_phys_bits(kvm: &Kvm, cpus: &CpusConfig) -> Result<u8> {
    let supported = supported_cpuid(kvm)?;
    let host = supported
        .as_slice()
        .iter()
        .find(|e| e.function == 0x8000_0008)
        .map_or(36, |e| (e.eax & 0xff) as u8);
    Ok(host.min(cpus.max_phys_bits))
}

/// KVM_CREATE_VM, again while a signal interrupts it: registering the VM's
/// MMU notifier gives up with EINTR when one is pending (another VM's vCPU
/// kick, a child's exit), as QEMU also retries.
pub fn create_vm(kvm: &Kvm) -> std::result::Result<kvm_ioctls::VmFd, kvm_ioctls::Error> {
    loop {
        match kvm.create_vm() {
            Err(e) if e.errno() == libc::EINTR => continue,
            result => return result,
        }
    }
}

/// The CPUID a vCPU of this host gets from vmkit, as KVM reads it back
/// (kvm_pvm fills in more than KVM_GET_SUPPORTED_CPUID lists): the bound
/// on the features a restored or received vCPU may use. Found once per
/// process, on a VM of its own: a second KVM_SET_CPUID2 on the vCPU being
/// restored is not something every KVM takes well.
pub fn offered_cpuid(kvm: &Kvm, host: HostCpu) -> Result<Vec<kvm_bindings::kvm_cpuid_entry2>> {
    static OFFERED: std::sync::OnceLock<Vec<kvm_bindings::kvm_cpuid_entry2>> =
        std::sync::OnceLock::new();
    if let Some(offered) = OFFERED.get() {
        return Ok(offered.clone());
    }
    let vm = create_vm(kvm).map_err(kvm_error("KVM_CREATE_VM"))?;
    let vcpu = vm.create_vcpu(0).map_err(kvm_error("KVM_CREATE_VCPU"))?;
    let cpuid = cpuid_for(kvm, &CpusConfig::default(), 0, host)?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(kvm_error("KVM_SET_CPUID2"))?;
    let offered = vcpu
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_error("KVM_GET_CPUID2"))?
        .as_slice()
        .to_vec();
    Ok(OFFERED.get_or_init(|| offered).clone())
}

/// Asks KVM for its supported CPUID now, so that processes forked from this
/// one (the VM forker's) inherit the answer instead of each asking at its
/// first boot. Without KVM this does nothing: boots report the error.
pub fn learn_host_cpuid() {
    if let Ok(kvm) = Kvm::new() {
        let _ = supported_cpuid(&kvm);
    }
}

/// KVM_GET_SUPPORTED_CPUID's answer, asked once per process: it depends on
/// the host and KVM only, and asking costs ~0.7 ms on kvm_pvm, once for every
/// vCPU booted or hot-plugged otherwise.
fn supported_cpuid(kvm: &Kvm) -> Result<CpuId> {
    static SUPPORTED: std::sync::OnceLock<CpuId> = std::sync::OnceLock::new();
    if let Some(supported) = SUPPORTED.get() {
        return Ok(supported.clone());
    }
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_error("KVM_GET_SUPPORTED_CPUID"))?;
    Ok(SUPPORTED.get_or_init(|| supported).clone())
}

/// The CPUID table for vCPU `index`, derived from KVM's supported set.
pub fn cpuid_for(kvm: &Kvm, cpus: &CpusConfig, index: u8, host: HostCpu) -> Result<CpuId> {
    let supported = supported_cpuid(kvm)?;
    let topology = Topology::from_config(cpus);
    let apic_id = topology.apic_id(index);
    let logical = topology.logical_per_package();
    let mut entries: Vec<kvm_bindings::kvm_cpuid_entry2> = supported.as_slice().to_vec();
    let mut have_timing_leaf = false;
    for entry in entries.iter_mut() {
        match entry.function {
            0x1 => {
                entry.ebx = (entry.ebx & 0x0000_ffff)
                    | (apic_id << 24)
                    | ((logical.min(255)) << 16)
                    | (8 << 8);
                entry.ecx |= 1 << 31; // running under a hypervisor
                if host.tsc_deadline_timer {
                    entry.ecx |= 1 << 24;
                }
                if logical > 1 {
                    entry.edx |= 1 << 28; // HTT: more than one logical CPU per package
                }
            }
            0x4 => {
                let cores_per_package = u32::from(topology.cores_per_die.max(1))
                    * u32::from(topology.dies_per_package.max(1));
                entry.eax = (entry.eax & 0x03ff_ffff) | ((cores_per_package - 1).min(63) << 26);
            }
            0xb | 0x1f => {
                let (shift, count, level) = match entry.index {
                    0 => (
                        topology.thread_bits(),
                        u32::from(topology.threads_per_core),
                        1,
                    ),
                    1 => (
                        topology.thread_bits() + topology.core_bits() + topology.die_bits(),
                        logical,
                        2,
                    ),
                    _ => (0, 0, 0),
                };
                entry.eax = shift;
                entry.ebx = count;
                entry.ecx = entry.index | (level << 8);
                entry.edx = apic_id;
            }
            0x8000_0008 => {
                let host_bits = entry.eax & 0xff;
                let bits = host_bits.min(u32::from(cpus.max_phys_bits));
                entry.eax = (entry.eax & !0xff) | bits;
            }
            LEAF_HYPERVISOR if host.tsc_khz.is_some() => {
                entry.eax = entry.eax.max(LEAF_TIMING);
            }
            LEAF_KVM_FEATURES if host.pvm => {
                entry.eax &=
                    !(KVM_FEATURE_PV_UNHALT | KVM_FEATURE_PV_SEND_IPI | KVM_FEATURE_PV_SCHED_YIELD);
            }
            LEAF_TIMING => {
                have_timing_leaf = true;
                if let Some(khz) = host.tsc_khz {
                    entry.eax = khz;
                    entry.ebx = 1_000_000; // APIC bus: 1 GHz in KVM
                }
            }
            _ => {}
        }
    }
    if let (false, Some(khz)) = (have_timing_leaf, host.tsc_khz) {
        entries.push(kvm_bindings::kvm_cpuid_entry2 {
            function: LEAF_TIMING,
            eax: khz,
            ebx: 1_000_000,
            ..Default::default()
        });
    }
    CpuId::from_entries(&entries).map_err(|e| {
        CpuError::Table {
            what: "building the CPUID table",
            detail: format!("{e:?}"),
        }
        .into()
    })
}

/// MSRs set at boot (never ARCH_CAPABILITIES or FEATURE_CONTROL: not settable on PVM).
const BOOT_MSRS: [(u32, u64); 11] = [
    (0x174, 0),             // IA32_SYSENTER_CS
    (0x175, 0),             // IA32_SYSENTER_ESP
    (0x176, 0),             // IA32_SYSENTER_EIP
    (0xc000_0081, 0),       // STAR
    (0xc000_0083, 0),       // CSTAR
    (0xc000_0102, 0),       // KERNEL_GS_BASE
    (0xc000_0084, 0),       // SYSCALL_MASK
    (0xc000_0082, 0),       // LSTAR
    (0x10, 0),              // IA32_TSC
    (0x1a0, 1),             // IA32_MISC_ENABLE: fast strings
    (0x2ff, (1 << 11) | 6), // MTRRdefType: enabled, write-back
];

/// Sets the boot MSRs one at a time so a failure names its MSR.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<()> {
    let entries: Vec<kvm_msr_entry> = BOOT_MSRS
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|e| CpuError::Table {
        what: "building MSR list",
        detail: format!("{e:?}"),
    })?;
    // One call: KVM sets them in order and stops at the first it refuses.
    let set = vcpu.set_msrs(&msrs).map_err(kvm_error("KVM_SET_MSRS"))?;
    match BOOT_MSRS.get(set) {
        Some(&(index, data)) => Err(CpuError::MsrRefused { index, data }.into()),
        None => Ok(()),
    }
}

pub fn setup_fpu(vcpu: &VcpuFd) -> Result<()> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm_error("KVM_SET_FPU"))?;
    Ok(())
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// LINT0 as ExtINT and LINT1 as NMI, as a PC's firmware leaves them.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<()> {
    let mut lapic = vcpu.get_lapic().map_err(kvm_error("KVM_GET_LAPIC"))?;
    let mut set_mode = |offset: usize, mode: u32| {
        let bytes: Vec<u8> = lapic.regs[offset..offset + 4]
            .iter()
            .map(|&b| b as u8)
            .collect();
        let value = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let value = (value & !0x700) | (mode << 8);
        for (slot, byte) in lapic.regs[offset..offset + 4]
            .iter_mut()
            .zip(value.to_le_bytes())
        {
            *slot = byte as _;
        }
    };
    set_mode(APIC_LVT0, APIC_MODE_EXTINT);
    set_mode(APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(kvm_error("KVM_SET_LAPIC"))?;
    Ok(())
}

fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << (56 - 24))
        | ((u64::from(flags) & 0x0000_f0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << (48 - 16))
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

fn segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let granular = (entry >> 55) & 1 == 1;
    kvm_segment {
        base,
        limit: if granular {
            (limit << 12) | 0xfff
        } else {
            limit
        },
        selector: u16::from(table_index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granular as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

fn write_u64(mem: &GuestMemoryMmap, value: u64, addr: u64) -> Result<()> {
    mem.write_obj(value, GuestAddress(addr))
        .map_err(|source| CpuError::BootTables { addr, source }.into())
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// Registers, segments, boot GDT/IDT and (for 64-bit entry) identity page
/// tables of the boot vCPU.
pub fn setup_boot_vcpu(vcpu: &VcpuFd, mem: &GuestMemoryMmap, entry: EntryPoint) -> Result<()> {
    let long_mode = matches!(entry, EntryPoint::Linux64 { .. });
    let code = if long_mode {
        gdt_entry(0xa09b, 0, 0xfffff)
    } else {
        gdt_entry(0xc09b, 0, 0xfffff)
    };
    let gdt = [
        gdt_entry(0, 0, 0),
        code,
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x008b, 0, 0xfffff),
    ];
    for (i, e) in gdt.iter().enumerate() {
        write_u64(mem, *e, BOOT_GDT_START + (i as u64) * 8)?;
    }
    write_u64(mem, 0, BOOT_IDT_START)?;

    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm_error("KVM_GET_SREGS"))?;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    let data = segment_from_gdt(gdt[2], 2);
    sregs.cs = segment_from_gdt(gdt[1], 1);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(gdt[3], 3);

    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        EntryPoint::Pvh { entry } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = entry;
            regs.rbx = PVH_INFO_START;
        }
        EntryPoint::Linux64 { entry } => {
            // Identity-map the first 1 GiB with 2 MiB pages.
            write_u64(mem, PDPTE_START | 0x03, PML4_START)?;
            write_u64(mem, PDE_START | 0x03, PDPTE_START)?;
            for i in 0..512u64 {
                write_u64(mem, (i << 21) | 0x83, PDE_START + i * 8)?;
            }
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
            regs.rip = entry;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
    }
    vcpu.set_sregs(&sregs).map_err(kvm_error("KVM_SET_SREGS"))?;
    vcpu.set_regs(&regs).map_err(kvm_error("KVM_SET_REGS"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let code64 = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(
            (code64.l, code64.db, code64.g, code64.present),
            (1, 0, 1, 1)
        );
        assert_eq!(
            (code64.base, code64.limit, code64.selector),
            (0, 0xffff_ffff, 8)
        );
        let code32 = segment_from_gdt(gdt_entry(0xc09b, 0, 0xfffff), 1);
        assert_eq!((code32.l, code32.db), (0, 1));
        let data = segment_from_gdt(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!((data.type_, data.s, data.selector), (3, 1, 16));
    }

    #[test]
    fn apic_ids_follow_the_topology() {
        let t = Topology {
            threads_per_core: 2,
            cores_per_die: 3,
            dies_per_package: 1,
            packages: 2,
        };
        // 3 cores need 2 bits, so package 1 starts at id 8.
        let ids: Vec<u32> = (0..12).map(|i| t.apic_id(i)).collect();
        assert_eq!(ids, vec![0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]);
        let flat = Topology {
            threads_per_core: 1,
            cores_per_die: 4,
            dies_per_package: 1,
            packages: 1,
        };
        assert_eq!(
            (0..4).map(|i| flat.apic_id(i)).collect::<Vec<_>>(),
            vec![0, 1, 2, 3]
        );
    }

    mod needs_kvm {
        use super::super::*;

        #[test]
        #[ignore = "needs /dev/kvm"]
        fn the_tsc_deadline_timer_is_offered_when_kvm_has_it() {
            // KVM_GET_SUPPORTED_CPUID leaves the bit out on standard KVM (kvm_pvm
            // lists it): a Linux guest without it finds no TSC-deadline timer.
            let kvm = Kvm::new().unwrap();
            let leaf1_ecx = |tsc_deadline_timer| {
                let host = HostCpu {
                    pvm: false,
                    tsc_deadline_timer,
                    tsc_khz: None,
                };
                let cpuid = cpuid_for(&kvm, &CpusConfig::default(), 0, host).unwrap();
                let leaf1 = cpuid.as_slice().iter().find(|e| e.function == 1).copied();
                leaf1.unwrap().ecx
            };
            assert_ne!(leaf1_ecx(true) & (1 << 24), 0);
            let supported = supported_cpuid(&kvm).unwrap();
            let listed = supported.as_slice().iter().find(|e| e.function == 1);
            assert_eq!(
                leaf1_ecx(false) & (1 << 24),
                listed.unwrap().ecx & (1 << 24)
            );
        }
    }
}
