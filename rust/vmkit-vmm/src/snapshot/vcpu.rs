//! One vCPU's complete KVM state: what a restored vCPU needs to go on
//! exactly where it stopped (registers, segments and control registers,
//! FPU and extended state, local APIC, MSRs, pending events, MP state,
//! debug registers, and the CPUID the guest was given).

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::{Kvm, VcpuFd};
use zerocopy::IntoBytes;

use super::codec::{Reader, Writer};
use super::SnapshotError;

/// The tag and version at the head of a vCPU state.
const MAGIC: u32 = 0x5643_4b56; // "VKCV"
const VERSION: u32 = 1;
/// KVM's own limits: KVM_MAX_CPUID_ENTRIES and far more MSRs than any host lists.
const MAX_CPUID_ENTRIES: usize = 256;
const MAX_MSRS: usize = 1024;

#[derive(Debug, Clone, Copy)]
enum Register {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// The CPUID registers that list CPU features (leaf, subleaf, register),
/// and the bits in them that are not the host's to offer.
const FEATURE_REGISTERS: &[(u32, u32, Register, u32)] = &[
    // OSXSAVE (27) follows CR4, hypervisor (31) is vmkit's.
    (0x1, 0, Register::Ecx, 1 << 27 | 1 << 31),
    // APIC (9) follows the APIC base MSR, HTT (28) is vmkit's topology.
    (0x1, 0, Register::Edx, 1 << 9 | 1 << 28),
    (0x7, 0, Register::Ebx, 0),
    // OSPKE (4) follows CR4.
    (0x7, 0, Register::Ecx, 1 << 4),
    (0x7, 0, Register::Edx, 0),
    (0x7, 1, Register::Eax, 0),
    // The XSAVE state components and instructions.
    (0xd, 0, Register::Eax, 0),
    (0xd, 1, Register::Eax, 0),
    (0x8000_0001, 0, Register::Ecx, 0),
    (0x8000_0001, 0, Register::Edx, 0),
];

/// The feature bits of `saved` that `supported` lacks, one text per
/// register (see [`VcpuState::check_cpu_features`]).
fn missing_cpu_features(saved: &[kvm_cpuid_entry2], supported: &[kvm_cpuid_entry2]) -> Vec<String> {
    let mut missing = Vec::new();
    for &(function, index, register, ignored) in FEATURE_REGISTERS {
        let find = |entries: &[kvm_cpuid_entry2]| {
            entries
                .iter()
                .find(|e| e.function == function && e.index == index)
                .map_or(0, |e| match register {
                    Register::Eax => e.eax,
                    Register::Ebx => e.ebx,
                    Register::Ecx => e.ecx,
                    Register::Edx => e.edx,
                })
        };
        let extra = find(saved) & !find(supported) & !ignored;
        if extra != 0 {
            missing.push(format!(
                "CPUID {function:#x}.{index} {register:?} {extra:#010x}"
            ));
        }
    }
    missing
}

pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: kvm_fpu,
    /// None where KVM has no XSAVE support.
    pub xsave: Option<kvm_xsave>,
    pub xcrs: Option<kvm_xcrs>,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("cpuid_entries", &self.cpuid.len())
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}

fn kvm_error(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SnapshotError {
    move |source| SnapshotError::Kvm { what, source }
}

/// The MSRs KVM lists for the VMM to save (KVM_GET_MSR_INDEX_LIST).
pub fn msr_list(kvm: &Kvm) -> Result<Vec<u32>, SnapshotError> {
    Ok(kvm
        .get_msr_index_list()
        .map_err(kvm_error("KVM_GET_MSR_INDEX_LIST"))?
        .as_slice()
        .to_vec())
}

/// The MSRs of `listed` that `vcpu` lets the VMM read (this host lists some
/// it cannot read, e.g. 0x3a).
pub fn saved_msr_indices(vcpu: &VcpuFd, listed: &[u32]) -> Result<Vec<u32>, SnapshotError> {
    let mut readable = Vec::new();
    for &index in listed {
        if read_msrs(vcpu, &[index])?.len() == 1 {
            readable.push(index);
        }
    }
    Ok(readable)
}

/// Reads `indices`; KVM stops at the first it cannot read, so what comes
/// back may be a prefix.
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, SnapshotError> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|_| SnapshotError::TooMany {
        what: "MSRs",
        count: entries.len(),
    })?;
    let read = vcpu
        .get_msrs(&mut msrs)
        .map_err(kvm_error("KVM_GET_MSRS"))?;
    Ok(msrs.as_slice()[..read.min(entries.len())].to_vec())
}

impl VcpuState {
    /// Takes the state of a vCPU that is not running (its thread parked).
    pub fn capture(vcpu: &VcpuFd, msr_indices: &[u32], xsave: bool) -> Result<Self, SnapshotError> {
        let cpuid = vcpu
            .get_cpuid2(MAX_CPUID_ENTRIES)
            .map_err(kvm_error("KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec();
        let msrs = read_msrs(vcpu, msr_indices)?;
        if msrs.len() != msr_indices.len() {
            return Err(SnapshotError::MsrUnreadable {
                index: msr_indices[msrs.len()],
            });
        }
        Ok(VcpuState {
            cpuid,
            mp_state: vcpu.get_mp_state().map_err(kvm_error("KVM_GET_MP_STATE"))?,
            regs: vcpu.get_regs().map_err(kvm_error("KVM_GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(kvm_error("KVM_GET_SREGS"))?,
            fpu: vcpu.get_fpu().map_err(kvm_error("KVM_GET_FPU"))?,
            xsave: if xsave {
                Some(vcpu.get_xsave().map_err(kvm_error("KVM_GET_XSAVE"))?)
            } else {
                None
            },
            xcrs: if xsave {
                Some(vcpu.get_xcrs().map_err(kvm_error("KVM_GET_XCRS"))?)
            } else {
                None
            },
            debug_regs: vcpu
                .get_debug_regs()
                .map_err(kvm_error("KVM_GET_DEBUGREGS"))?,
            lapic: vcpu.get_lapic().map_err(kvm_error("KVM_GET_LAPIC"))?,
            msrs,
            events: vcpu
                .get_vcpu_events()
                .map_err(kvm_error("KVM_GET_VCPU_EVENTS"))?,
        })
    }

    /// Refuses a vCPU whose CPUID offers the guest features `offered` (the
    /// CPUID a vCPU of this host gets: vmkit's table as KVM_GET_CPUID2 reads
    /// it back, which on kvm_pvm holds more than KVM_GET_SUPPORTED_CPUID)
    /// lacks: a guest that found them at boot would fault on its first use
    /// of one here. Bits KVM or vmkit set themselves (OSXSAVE, OSPKE, APIC,
    /// hypervisor, HTT) are not features of the host.
    pub fn check_cpu_features(&self, offered: &[kvm_cpuid_entry2]) -> Result<(), SnapshotError> {
        let missing = missing_cpu_features(&self.cpuid, offered);
        if missing.is_empty() {
            Ok(())
        } else {
            Err(SnapshotError::CpuFeatures {
                missing: missing.join(", "),
            })
        }
    }

    /// Loads the state into a new vCPU, in the order KVM needs: CPUID before
    /// anything that depends on it, the local APIC before the MSRs that
    /// program its timer, pending events last.
    pub fn apply(&self, vcpu: &VcpuFd) -> Result<(), SnapshotError> {
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|_| SnapshotError::TooMany {
            what: "CPUID entries",
            count: self.cpuid.len(),
        })?;
        vcpu.set_cpuid2(&cpuid)
            .map_err(kvm_error("KVM_SET_CPUID2"))?;
        vcpu.set_mp_state(self.mp_state)
            .map_err(kvm_error("KVM_SET_MP_STATE"))?;
        vcpu.set_regs(&self.regs)
            .map_err(kvm_error("KVM_SET_REGS"))?;
        vcpu.set_sregs(&self.sregs)
            .map_err(kvm_error("KVM_SET_SREGS"))?;
        vcpu.set_fpu(&self.fpu).map_err(kvm_error("KVM_SET_FPU"))?;
        if let Some(xsave) = &self.xsave {
            // SAFETY: a kvm_xsave is the 4 KiB legacy area, which KVM_SET_XSAVE
            // reads whole; the state was taken with KVM_GET_XSAVE.
            unsafe { vcpu.set_xsave(xsave) }.map_err(kvm_error("KVM_SET_XSAVE"))?;
        }
        if let Some(xcrs) = &self.xcrs {
            vcpu.set_xcrs(xcrs).map_err(kvm_error("KVM_SET_XCRS"))?;
        }
        vcpu.set_debug_regs(&self.debug_regs)
            .map_err(kvm_error("KVM_SET_DEBUGREGS"))?;
        vcpu.set_lapic(&self.lapic)
            .map_err(kvm_error("KVM_SET_LAPIC"))?;
        self.apply_msrs(vcpu)?;
        vcpu.set_vcpu_events(&self.events)
            .map_err(kvm_error("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }

    /// KVM stops at the first MSR it refuses; the error names it.
    fn apply_msrs(&self, vcpu: &VcpuFd) -> Result<(), SnapshotError> {
        if self.msrs.is_empty() {
            return Ok(());
        }
        let msrs = Msrs::from_entries(&self.msrs).map_err(|_| SnapshotError::TooMany {
            what: "MSRs",
            count: self.msrs.len(),
        })?;
        let set = vcpu.set_msrs(&msrs).map_err(kvm_error("KVM_SET_MSRS"))?;
        match self.msrs.get(set) {
            None => Ok(()),
            Some(refused) => Err(SnapshotError::MsrRefused {
                index: refused.index,
                data: refused.data,
            }),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u32(MAGIC);
        w.u32(VERSION);
        w.u32(self.cpuid.len() as u32);
        for entry in &self.cpuid {
            w.blob(entry.as_bytes());
        }
        w.blob(self.mp_state.as_bytes());
        w.blob(self.regs.as_bytes());
        w.blob(self.sregs.as_bytes());
        w.blob(&encode_fpu(&self.fpu));
        w.blob(self.xsave.as_ref().map_or(&[][..], |x| x.as_bytes()));
        w.blob(self.xcrs.as_ref().map_or(&[][..], |x| x.as_bytes()));
        w.blob(self.debug_regs.as_bytes());
        w.blob(self.lapic.as_bytes());
        w.u32(self.msrs.len() as u32);
        for msr in &self.msrs {
            w.u32(msr.index);
            w.u64(msr.data);
        }
        w.blob(self.events.as_bytes());
        w.bytes
    }

    /// Reads a state `encode` wrote; `what` names the file in errors.
    pub fn decode(what: &str, bytes: &[u8]) -> Result<Self, SnapshotError> {
        let mut r = Reader::new(what, bytes);
        if r.u32()? != MAGIC {
            return Err(r.corrupt("not a vmkit vCPU state".to_owned()));
        }
        let version = r.u32()?;
        if version != VERSION {
            return Err(SnapshotError::Version {
                what: what.to_owned(),
                found: version,
                supported: VERSION,
            });
        }
        let count = r.u32()? as usize;
        if count > MAX_CPUID_ENTRIES {
            return Err(r.corrupt(format!(
                "{count} CPUID entries (at most {MAX_CPUID_ENTRIES})"
            )));
        }
        let cpuid = (0..count)
            .map(|_| r.value::<kvm_cpuid_entry2>("a CPUID entry"))
            .collect::<Result<Vec<_>, _>>()?;
        let mp_state = r.value("the MP state")?;
        let regs = r.value("the registers")?;
        let sregs = r.value("the system registers")?;
        let fpu = decode_fpu(&mut r)?;
        let xsave = optional(&mut r, "the XSAVE area")?;
        let xcrs = optional(&mut r, "the XCRs")?;
        let debug_regs = r.value("the debug registers")?;
        let lapic = r.value("the local APIC")?;
        let count = r.u32()? as usize;
        if count > MAX_MSRS {
            return Err(r.corrupt(format!("{count} MSRs (at most {MAX_MSRS})")));
        }
        let msrs = (0..count)
            .map(|_| {
                Ok(kvm_msr_entry {
                    index: r.u32()?,
                    data: r.u64()?,
                    ..Default::default()
                })
            })
            .collect::<Result<Vec<_>, SnapshotError>>()?;
        let events = r.value("the pending events")?;
        r.finish()?;
        Ok(VcpuState {
            cpuid,
            mp_state,
            regs,
            sregs,
            fpu,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            msrs,
            events,
        })
    }
}

/// kvm_fpu has no zerocopy derives in kvm-bindings: its fields one by one,
/// the 24 registers of 16 bytes first.
fn encode_fpu(fpu: &kvm_fpu) -> Vec<u8> {
    let mut w = Writer::default();
    for register in fpu.fpr.iter().chain(fpu.xmm.iter()) {
        w.bytes.extend_from_slice(register);
    }
    w.u16(fpu.fcw);
    w.u16(fpu.fsw);
    w.bytes.push(fpu.ftwx);
    w.u16(fpu.last_opcode);
    w.u64(fpu.last_ip);
    w.u64(fpu.last_dp);
    w.u32(fpu.mxcsr);
    w.bytes
}

const FPU_BYTES: usize = 24 * 16 + 2 + 2 + 1 + 2 + 8 + 8 + 4;

fn decode_fpu(r: &mut Reader<'_>) -> Result<kvm_fpu, SnapshotError> {
    let data = r.blob(FPU_BYTES)?;
    if data.len() != FPU_BYTES {
        return Err(r.corrupt(format!(
            "the FPU state is {} bytes, not {FPU_BYTES}",
            data.len()
        )));
    }
    let (registers, rest) = data.split_at(24 * 16);
    let mut fpu = kvm_fpu::default();
    for (register, bytes) in fpu
        .fpr
        .iter_mut()
        .chain(fpu.xmm.iter_mut())
        .zip(registers.chunks_exact(16))
    {
        register.copy_from_slice(bytes);
    }
    let mut f = Reader::new("the FPU state", rest);
    fpu.fcw = f.u16()?;
    fpu.fsw = f.u16()?;
    fpu.ftwx = f.byte()?;
    fpu.last_opcode = f.u16()?;
    fpu.last_ip = f.u64()?;
    fpu.last_dp = f.u64()?;
    fpu.mxcsr = f.u32()?;
    f.finish()?;
    Ok(fpu)
}

/// A value that may be absent (an empty blob).
fn optional<T: zerocopy::FromBytes>(
    r: &mut Reader<'_>,
    field: &str,
) -> Result<Option<T>, SnapshotError> {
    let size = std::mem::size_of::<T>();
    let data = r.blob(size)?;
    if data.is_empty() {
        return Ok(None);
    }
    T::read_from_bytes(data)
        .map(Some)
        .map_err(|_| r.corrupt(format!("{field} is {} bytes, not {size}", data.len())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_the_host_lacks_are_named_and_kvm_s_own_bits_are_not() {
        let entry = |function, index, ebx, ecx| kvm_cpuid_entry2 {
            function,
            index,
            ebx,
            ecx,
            ..Default::default()
        };
        let supported = [entry(0x1, 0, 0, 1), entry(0x7, 0, 1 << 5, 0)];
        // OSXSAVE and the hypervisor bit are set by KVM and vmkit.
        let saved = [
            entry(0x1, 0, 0, 1 | 1 << 27 | 1 << 31),
            entry(0x7, 0, 1 << 5, 0),
        ];
        assert!(missing_cpu_features(&saved, &supported).is_empty());
        let saved = [entry(0x1, 0, 0, 1), entry(0x7, 0, 1 << 5 | 1 << 16, 0)];
        assert_eq!(
            missing_cpu_features(&saved, &supported),
            ["CPUID 0x7.0 Ebx 0x00010000"]
        );
        // A leaf the host does not have at all offers nothing.
        let saved = [entry(0x8000_0001, 0, 0, 1 << 6)];
        assert_eq!(
            missing_cpu_features(&saved, &supported),
            ["CPUID 0x80000001.0 Ecx 0x00000040"]
        );
    }

    fn sample() -> VcpuState {
        let mut regs = kvm_regs {
            rip: 0x10_0000,
            rax: 42,
            ..Default::default()
        };
        regs.rflags = 2;
        VcpuState {
            cpuid: vec![kvm_cpuid_entry2 {
                function: 1,
                eax: 0xa10f11,
                ..Default::default()
            }],
            mp_state: kvm_mp_state { mp_state: 0 },
            regs,
            sregs: kvm_sregs::default(),
            fpu: kvm_fpu::default(),
            xsave: Some(kvm_xsave::default()),
            xcrs: None,
            debug_regs: kvm_debugregs::default(),
            lapic: kvm_lapic_state::default(),
            msrs: vec![kvm_msr_entry {
                index: 0x10,
                data: 12345,
                ..Default::default()
            }],
            events: kvm_vcpu_events::default(),
        }
    }

    #[test]
    fn a_state_round_trips() {
        let state = sample();
        let back = VcpuState::decode("vcpu-0", &state.encode()).unwrap();
        assert_eq!(back.encode(), state.encode());
        assert_eq!(back.regs.rip, 0x10_0000);
        assert_eq!(back.msrs[0].data, 12345);
        assert!(back.xsave.is_some() && back.xcrs.is_none());
    }

    #[test]
    fn every_truncation_and_a_bad_header_are_refused() {
        let bytes = sample().encode();
        for len in 0..bytes.len() {
            assert!(
                VcpuState::decode("vcpu-0", &bytes[..len]).is_err(),
                "{len} bytes accepted"
            );
        }
        let mut wrong = bytes.clone();
        wrong[4] = 9; // version 9
        let err = VcpuState::decode("vcpu-0", &wrong).unwrap_err().to_string();
        assert!(err.contains("version 9"), "{err}");
        let mut wrong = bytes;
        wrong[8..12].copy_from_slice(&100_000u32.to_le_bytes()); // CPUID count
        let err = VcpuState::decode("vcpu-0", &wrong).unwrap_err().to_string();
        assert!(err.contains("100000 CPUID entries"), "{err}");
    }

    mod needs_kvm {
        use kvm_ioctls::{Cap, Kvm};

        use super::super::*;

        #[test]
        #[ignore = "needs /dev/kvm"]
        fn a_vcpus_state_moves_to_a_new_vcpu() {
            let kvm = Kvm::new().unwrap();
            let xsave = kvm.check_extension(Cap::Xsave);
            let vm = kvm.create_vm().unwrap();
            crate::interrupts::enable_split_irqchip(&vm).unwrap();
            let vcpu = vm.create_vcpu(0).unwrap();
            let cpuid = kvm
                .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                .unwrap();
            vcpu.set_cpuid2(&cpuid).unwrap();
            let mut regs = vcpu.get_regs().unwrap();
            regs.rip = 0x1234;
            regs.rbx = 0xfeed;
            vcpu.set_regs(&regs).unwrap();
            let indices = saved_msr_indices(&vcpu, &msr_list(&kvm).unwrap()).unwrap();
            assert!(indices.contains(&0x10), "IA32_TSC is not saved");
            let state = VcpuState::capture(&vcpu, &indices, xsave).unwrap();
            let state = VcpuState::decode("vcpu-0", &state.encode()).unwrap();
            // What this host gives a vCPU covers what a vCPU of this host saved.
            state
                .check_cpu_features(vcpu.get_cpuid2(256).unwrap().as_slice())
                .unwrap();

            let vm2 = kvm.create_vm().unwrap();
            crate::interrupts::enable_split_irqchip(&vm2).unwrap();
            let vcpu2 = vm2.create_vcpu(0).unwrap();
            state.apply(&vcpu2).unwrap();
            let regs2 = vcpu2.get_regs().unwrap();
            assert_eq!((regs2.rip, regs2.rbx), (0x1234, 0xfeed));
            let again = VcpuState::capture(&vcpu2, &indices, xsave).unwrap();
            assert_eq!(again.cpuid.len(), state.cpuid.len());
            assert_eq!(again.lapic.as_bytes(), state.lapic.as_bytes());
            assert_eq!(again.sregs.as_bytes(), state.sregs.as_bytes());
        }
    }
}
