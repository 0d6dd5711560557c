//! ACPI tables: RSDP, XSDT, FADT (hardware-reduced, with Cloud Hypervisor's
//! sleep and reset registers), MADT (one entry per possible vCPU) and a DSDT
//! that describes the legacy devices, so a stock kernel finds every vCPU and
//! can power the VM off; with `--numa`, the SRAT and SLIT as well.

use crate::memory::GuestMemoryMmap;
use acpi_tables::aml;
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::{GenericAddress, Sdt};
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress};
use zerocopy::IntoBytes;

use crate::cpu::Topology;
use crate::devices::cpu_hotplug::CPU_HOTPLUG_SIZE;
use crate::devices::legacy::{
    GED_CPU_DEVICES_CHANGED, GED_MEMORY_DEVICES_CHANGED, GED_PCI_DEVICES_CHANGED, GED_POWER_BUTTON,
};
use crate::devices::memory_hotplug::{HOTPLUG_SLOTS, MEMORY_HOTPLUG_SIZE};
use crate::devices::pci_hotplug::PCI_HOTPLUG_SIZE;
use crate::error::{ErrorKind, ModuleError, Result};
use crate::layout::{
    ACPI_TABLES_END, APIC_START, CPU_HOTPLUG_ADDRESS, GED_ADDRESS, GED_IRQ, IOAPIC_START,
    MEMORY_HOTPLUG_ADDRESS, PCI_HOTPLUG_ADDRESS, PCI_MMCONFIG_START, RSDP_POINTER, TPM_SIZE,
    TPM_START,
};
use crate::numa::{segment_node, NumaNode};
use crate::pci::{SegmentLayout, ECAM_SIZE_PER_SEGMENT};

/// Why the ACPI tables could not be written.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error(
        "The ACPI tables do not fit below 1 MiB: the {table} ({len} bytes) would end at {end:#x}, \
         past {limit:#x}"
    )]
    DoNotFit {
        table: String,
        len: usize,
        end: u64,
        limit: u64,
    },
    #[error("Cannot write ACPI tables")]
    Write {
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

impl ModuleError for AcpiError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Memory
    }
}

const OEM_ID: [u8; 6] = *b"VMKIT ";
/// The port of the shutdown device: sleep control, sleep status and reset register.
pub const ACPI_SHUTDOWN_PORT: u16 = 0x3c0;
/// Written to the reset register to reset the VM.
pub const ACPI_RESET_VALUE: u8 = 1;
/// SLP_TYP of S5 (soft off), announced in the DSDT's `_S5_`.
pub const S5_SLEEP_TYPE: u8 = 5;

fn table(signature: &[u8; 4], length: u32, revision: u8) -> Sdt {
    let mut oem_table = [b' '; 8];
    oem_table[..4].copy_from_slice(signature);
    Sdt::new(*signature, length, revision, OEM_ID, oem_table, 1)
}

/// Writes a PCI host bridge device (PNP0A08) for `segment`, in NUMA node
/// `node`, into `sink`.
fn pci_host_bridge(segment: &SegmentLayout, node: u32, sink: &mut Vec<u8>) {
    let hid = aml::EISAName::new("PNP0A08");
    let cid = aml::EISAName::new("PNP0A03");
    let hid_name = aml::Name::new("_HID".into(), &hid);
    let cid_name = aml::Name::new("_CID".into(), &cid);
    let adr = aml::Name::new("_ADR".into(), &aml::ZERO);
    let seg_value = u64::from(segment.id);
    let seg = aml::Name::new("_SEG".into(), &seg_value);
    let uid = aml::Name::new("_UID".into(), &seg_value);
    let bbn = aml::Name::new("_BBN".into(), &aml::ZERO);
    // As v37: every host bridge has a _PXM, 0 unless `--numa pci_segments`
    // puts its segment in another node.
    let pxm_value = aml::Return::new(&node);
    let pxm = aml::Method::new("_PXM".into(), 0, false, vec![&pxm_value]);
    let buses = aml::AddressSpace::new_bus_number(0u16, 0u16);
    let config_io = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    let io_low = aml::AddressSpace::new_io(0u16, 0x0cf7u16, None);
    let io_high = aml::AddressSpace::new_io(0x0d00u16, 0xffffu16, None);
    let mem32 = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        segment.mem32.start as u32,
        (segment.mem32.end() - 1) as u32,
        None,
    );
    let mem64 = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        segment.mem64.start,
        segment.mem64.end() - 1,
        None,
    );
    // Segment 0 also owns the legacy configuration ports and the I/O space.
    let resources: Vec<&dyn Aml> = if segment.id == 0 {
        vec![&buses, &config_io, &io_low, &io_high, &mem32, &mem64]
    } else {
        vec![&buses, &mem32, &mem64]
    };
    let crs = aml::ResourceTemplate::new(resources);
    let crs_name = aml::Name::new("_CRS".into(), &crs);
    let name = format!("PC{:02X}", segment.id);
    let slots = pci_hotplug_slots();
    let device = aml::Device::new(
        name.as_str().into(),
        vec![
            &hid_name, &cid_name, &adr, &seg, &uid, &bbn, &pxm, &crs_name, &slots,
        ],
    );
    device.to_aml_bytes(sink);
}

/// Motherboard resources (PNP0C02): the ECAM window, so that kernels trust
/// the MCFG table.
fn motherboard_resources(segments: &[SegmentLayout], sink: &mut Vec<u8>) {
    let hid = aml::EISAName::new("PNP0C02");
    let hid_name = aml::Name::new("_HID".into(), &hid);
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let ecam = aml::Memory32Fixed::new(
        true,
        PCI_MMCONFIG_START as u32,
        (segments.len() as u64 * ECAM_SIZE_PER_SEGMENT) as u32,
    );
    let crs = aml::ResourceTemplate::new(vec![&ecam]);
    let crs_name = aml::Name::new("_CRS".into(), &crs);
    let device = aml::Device::new("MBRD".into(), vec![&hid_name, &uid, &crs_name]);
    device.to_aml_bytes(sink);
}

/// The Generic Event Device and the power button it notifies: `_EVT` reads
/// the GED register; for the CPU bit it runs `\_SB_.CPUS.CSCN` (vCPUs
/// added or to be removed), for the power-button bit it sends PWRB
/// notification 0x80 (a press), which the kernel turns into an orderly
/// shutdown.
fn ged_and_power_button(sink: &mut Vec<u8>) {
    let ged_hid: &'static str = "ACPI0013";
    let hid = aml::Name::new("_HID".into(), &ged_hid);
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let irq = aml::Interrupt::new(true, true, false, false, GED_IRQ);
    let crs = aml::ResourceTemplate::new(vec![&irq]);
    let crs_name = aml::Name::new("_CRS".into(), &crs);
    let address = GED_ADDRESS as usize;
    let one = 1usize;
    let region = aml::OpRegion::new(
        "GDST".into(),
        aml::OpRegionSpace::SystemMemory,
        &address,
        &one,
    );
    let field = aml::Field::new(
        "GDST".into(),
        aml::FieldAccessType::Byte,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![aml::FieldEntry::Named(*b"GDAT", 8)],
    );
    let gdat: aml::Path = "GDAT".into();
    let local0 = aml::Local(0);
    let read = aml::Store::new(&local0, &gdat);
    // As v37's GED: the CPU bit has the CPU container scan for changes.
    let cpu_bit = GED_CPU_DEVICES_CHANGED;
    let cpu_masked = aml::And::new(&aml::ZERO, &local0, &cpu_bit);
    let cpus_changed = aml::Equal::new(&cpu_masked, &cpu_bit);
    let scan = aml::MethodCall::new("\\_SB_.CPUS.CSCN".into(), vec![]);
    let check_cpus = aml::If::new(&cpus_changed, vec![&scan]);
    // The memory bit has the memory hot-plug controller scan its slots.
    let memory_bit = GED_MEMORY_DEVICES_CHANGED;
    let memory_masked = aml::And::new(&aml::ZERO, &local0, &memory_bit);
    let memory_changed = aml::Equal::new(&memory_masked, &memory_bit);
    let memory_scan = aml::MethodCall::new("\\_SB_.MHPC.MSCN".into(), vec![]);
    let check_memory = aml::If::new(&memory_changed, vec![&memory_scan]);
    let check_pci = GedPciCheck;
    let bit = GED_POWER_BUTTON;
    let masked = aml::And::new(&aml::ZERO, &local0, &bit);
    let pressed = aml::Equal::new(&masked, &bit);
    let pwrb: aml::Path = "\\_SB_.PWRB".into();
    let press = 0x80u8;
    let notify = aml::Notify::new(&pwrb, &press);
    let check = aml::If::new(&pressed, vec![&notify]);
    let evt = aml::Method::new(
        "_EVT".into(),
        1,
        true,
        vec![&read, &check_cpus, &check_memory, &check_pci, &check],
    );
    let ged = aml::Device::new(
        "GED_".into(),
        vec![&hid, &uid, &crs_name, &region, &field, &evt],
    );
    ged.to_aml_bytes(sink);

    let button_hid = aml::EISAName::new("PNP0C0C");
    let button_hid_name = aml::Name::new("_HID".into(), &button_hid);
    let button = aml::Device::new("PWRB".into(), vec![&button_hid_name, &uid]);
    button.to_aml_bytes(sink);
}

/// What Cloud Hypervisor's hot-plug controller devices (`PRES`, `MHPC`,
/// `PHPR`) start with, in its order: `_HID` PNP0A06, `_STA` (only `PHPR`'s),
/// `_UID` naming the controller, the mutex its methods take, `_CRS` with its
/// register window, and the SystemMemory region its fields map.
struct ControllerHeader {
    uid: &'static str,
    sta: Option<u8>,
    lock: &'static str,
    region: &'static str,
    address: u64,
    size: u64,
}

impl Aml for ControllerHeader {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        let hid = aml::EISAName::new("PNP0A06");
        aml::Name::new("_HID".into(), &hid).to_aml_bytes(sink);
        if let Some(sta) = self.sta {
            aml::Name::new("_STA".into(), &sta).to_aml_bytes(sink);
        }
        aml::Name::new("_UID".into(), &self.uid).to_aml_bytes(sink);
        aml::Mutex::new(self.lock.into(), 0).to_aml_bytes(sink);
        let window = aml::AddressSpace::new_memory(
            aml::AddressSpaceCacheable::NotCacheable,
            true,
            self.address,
            self.address + self.size - 1,
            None,
        );
        let crs = aml::ResourceTemplate::new(vec![&window]);
        aml::Name::new("_CRS".into(), &crs).to_aml_bytes(sink);
        let (address, size) = (self.address as usize, self.size as usize);
        aml::OpRegion::new(
            self.region.into(),
            aml::OpRegionSpace::SystemMemory,
            &address,
            &size,
        )
        .to_aml_bytes(sink);
    }
}

/// Cloud Hypervisor's PCI hot-plug controller (v37 `impl Aml for
/// DeviceManager`): `\_SB_.PHPR` maps its registers (`PCIU`/`PCID` slot
/// up/down bitmaps, `B0EJ` eject, `PSEG` segment select) behind the mutex
/// `BLCK`; `PCEJ (slot, segment)` ejects, `PSCN` has each segment scan.
fn pci_hotplug_controller(segments: &[SegmentLayout], sink: &mut dyn acpi_tables::AmlSink) {
    let header = ControllerHeader {
        uid: "PCI Hotplug Controller",
        sta: Some(0x0b),
        lock: "BLCK",
        region: "PCST",
        address: PCI_HOTPLUG_ADDRESS,
        size: PCI_HOTPLUG_SIZE,
    };
    let fields = aml::Field::new(
        "PCST".into(),
        aml::FieldAccessType::DWord,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![
            aml::FieldEntry::Named(*b"PCIU", 32),
            aml::FieldEntry::Named(*b"PCID", 32),
            aml::FieldEntry::Named(*b"B0EJ", 32),
            aml::FieldEntry::Named(*b"PSEG", 32),
        ],
    );
    let acquire = aml::Acquire::new("BLCK".into(), 0xffff);
    let pseg = aml::Path::new("PSEG");
    let select = aml::Store::new(&pseg, &aml::Arg(1));
    let b0ej = aml::Path::new("B0EJ");
    let eject = aml::ShiftLeft::new(&b0ej, &aml::ONE, &aml::Arg(0));
    let release = aml::Release::new("BLCK".into());
    let done = aml::Return::new(&aml::ZERO);
    let pcej = aml::Method::new(
        "PCEJ".into(),
        2,
        true,
        vec![&acquire, &select, &eject, &release, &done],
    );
    let scans: Vec<aml::MethodCall> = segments
        .iter()
        .map(|s| {
            aml::MethodCall::new(
                format!("\\_SB_.PC{:02X}.PCNT", s.id).as_str().into(),
                vec![],
            )
        })
        .collect();
    let pscn = aml::Method::new(
        "PSCN".into(),
        0,
        true,
        scans.iter().map(|c| c as &dyn Aml).collect(),
    );
    aml::Device::new("PHPR".into(), vec![&header, &fields, &pcej, &pscn]).to_aml_bytes(sink);
}

/// The GED `_EVT` test for PCI changes, as v37's:
/// `If ((Local0 & 4) == 4) { \_SB_.PHPR.PSCN () }`.
struct GedPciCheck;

impl Aml for GedPciCheck {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        let bit = GED_PCI_DEVICES_CHANGED;
        let masked = aml::And::new(&aml::ZERO, &aml::Local(0), &bit);
        let changed = aml::Equal::new(&masked, &bit);
        let scan = aml::MethodCall::new("\\_SB_.PHPR.PSCN".into(), vec![]);
        aml::If::new(&changed, vec![&scan]).to_aml_bytes(sink);
    }
}

/// One hot-plug slot of a segment, as Cloud Hypervisor writes it:
/// `Device (Snnn)` with `_SUN`, `_ADR` and `_EJ0` calling `PCEJ`.
struct PciSlot(u8);

impl Aml for PciSlot {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        let sun = aml::Name::new("_SUN".into(), &self.0);
        let address = u32::from(self.0) << 16;
        let adr = aml::Name::new("_ADR".into(), &address);
        let sun_path = aml::Path::new("_SUN");
        let seg_path = aml::Path::new("_SEG");
        let pcej = aml::MethodCall::new("\\_SB_.PHPR.PCEJ".into(), vec![&sun_path, &seg_path]);
        let ej0 = aml::Method::new("_EJ0".into(), 1, true, vec![&pcej]);
        let name = format!("S{:03}", self.0);
        aml::Device::new(name.as_str().into(), vec![&sun, &adr, &ej0]).to_aml_bytes(sink);
    }
}

/// `Local0 = Arg0 & (1 << slot); If (Local0 == (1 << slot)) { Notify (Snnn, Arg1) }`.
struct PciSlotNotify(u8);

impl Aml for PciSlotNotify {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        let mask = 1u32 << self.0;
        aml::And::new(&aml::Local(0), &aml::Arg(0), &mask).to_aml_bytes(sink);
        let object = aml::Path::new(&format!("S{:03}", self.0));
        let notify = aml::Notify::new(&object, &aml::Arg(1));
        let set = aml::Equal::new(&aml::Local(0), &mask);
        aml::If::new(&set, vec![&notify]).to_aml_bytes(sink);
    }
}

/// A segment's hot-plug objects, inside its host bridge (where `_SEG` is):
/// the 32 slot devices, `DVNT (bitmap, event)` notifying each slot in the
/// bitmap, and `PCNT`, which selects the segment and notifies its added
/// slots (1, check) and those to remove (3, eject request).
fn pci_hotplug_slots() -> RawAml {
    let mut bytes = Vec::new();
    for slot in 0..crate::pci::DEVICES_PER_BUS as u8 {
        PciSlot(slot).to_aml_bytes(&mut bytes);
    }
    let notifies: Vec<PciSlotNotify> = (0..crate::pci::DEVICES_PER_BUS as u8)
        .map(PciSlotNotify)
        .collect();
    aml::Method::new(
        "DVNT".into(),
        2,
        true,
        notifies.iter().map(|n| n as &dyn Aml).collect(),
    )
    .to_aml_bytes(&mut bytes);
    let acquire = aml::Acquire::new("\\_SB_.PHPR.BLCK".into(), 0xffff);
    let pseg = aml::Path::new("\\_SB_.PHPR.PSEG");
    let seg = aml::Path::new("_SEG");
    let select = aml::Store::new(&pseg, &seg);
    let pciu = aml::Path::new("\\_SB_.PHPR.PCIU");
    let added = aml::MethodCall::new("DVNT".into(), vec![&pciu, &aml::ONE]);
    let pcid = aml::Path::new("\\_SB_.PHPR.PCID");
    let eject_request = 3u8;
    let removed = aml::MethodCall::new("DVNT".into(), vec![&pcid, &eject_request]);
    let release = aml::Release::new("\\_SB_.PHPR.BLCK".into());
    aml::Method::new(
        "PCNT".into(),
        0,
        true,
        vec![&acquire, &select, &added, &removed, &release],
    )
    .to_aml_bytes(&mut bytes);
    RawAml(bytes)
}

/// The vCPUs the DSDT describes: every possible one (`max`), with its
/// interrupt controller entry and NUMA node.
pub struct CpuDevices<'a> {
    pub topology: &'a Topology,
    pub max_vcpus: u8,
    pub nodes: &'a [NumaNode],
}

impl CpuDevices<'_> {
    fn node_of(&self, index: u8) -> u32 {
        self.nodes
            .iter()
            .find(|node| node.cpus.contains(&index))
            .map_or(0, |node| node.id)
    }

    /// The vCPU's MADT entry, enabled: Linux reads `_MAT` for a hot-added
    /// processor (Cloud Hypervisor's `Cpu::generate_mat`).
    fn mat(&self, index: u8) -> Vec<u8> {
        madt_entry(self.topology, index, MADT_ENABLED)
    }
}

/// The CPU hot-plug controller's AML, as Cloud Hypervisor v37 writes it
/// (vmm/src/cpu.rs, `impl Aml for CpuManager`): `\_SB_.PRES` maps its
/// registers (`CSEL` selects a vCPU, `CPEN`/`CINS`/`CRMV` read its status,
/// `CEJ0` ejects it) behind the mutex `CPLK`.
fn cpu_hotplug_controller(sink: &mut dyn acpi_tables::AmlSink) {
    let header = ControllerHeader {
        uid: "CPU Hotplug Controller",
        sta: None,
        lock: "CPLK",
        region: "PRST",
        address: CPU_HOTPLUG_ADDRESS,
        size: CPU_HOTPLUG_SIZE,
    };
    let status = aml::Field::new(
        "PRST".into(),
        aml::FieldAccessType::Byte,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![
            aml::FieldEntry::Reserved(32),
            aml::FieldEntry::Named(*b"CPEN", 1),
            aml::FieldEntry::Named(*b"CINS", 1),
            aml::FieldEntry::Named(*b"CRMV", 1),
            aml::FieldEntry::Named(*b"CEJ0", 1),
            aml::FieldEntry::Reserved(4),
            aml::FieldEntry::Named(*b"CCMD", 8),
        ],
    );
    let selection = aml::Field::new(
        "PRST".into(),
        aml::FieldAccessType::DWord,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::Preserve,
        vec![
            aml::FieldEntry::Named(*b"CSEL", 32),
            aml::FieldEntry::Reserved(32),
            aml::FieldEntry::Named(*b"CDAT", 32),
        ],
    );
    aml::Device::new("PRES".into(), vec![&header, &status, &selection]).to_aml_bytes(sink);
}

/// One possible vCPU: `Device (Cxxx)`, processor `_HID` ACPI0007, `_STA`
/// from the controller (`CSTA`), `_PXM`, `_MAT` and `_EJ0` (`CEJ0`).
struct CpuDevice<'a> {
    cpus: &'a CpuDevices<'a>,
    index: u8,
}

impl Aml for CpuDevice<'_> {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        let index = self.index;
        let hid_text: &'static str = "ACPI0007";
        let hid = aml::Name::new("_HID".into(), &hid_text);
        let uid = aml::Name::new("_UID".into(), &index);
        let csta = aml::MethodCall::new("CSTA".into(), vec![&index]);
        let sta_value = aml::Return::new(&csta);
        let sta = aml::Method::new("_STA".into(), 0, false, vec![&sta_value]);
        let node = self.cpus.node_of(index);
        let pxm_value = aml::Return::new(&node);
        let pxm = aml::Method::new("_PXM".into(), 0, false, vec![&pxm_value]);
        let mat_data = aml::BufferData::new(self.cpus.mat(index));
        let mat = aml::Name::new("_MAT".into(), &mat_data);
        let cej0 = aml::MethodCall::new("CEJ0".into(), vec![&index]);
        let ej0 = aml::Method::new("_EJ0".into(), 1, false, vec![&cej0]);
        let name = format!("C{index:03X}");
        aml::Device::new(
            name.as_str().into(),
            vec![&hid, &uid, &sta, &pxm, &mat, &ej0],
        )
        .to_aml_bytes(sink);
    }
}

/// `If (Arg0 == index) { Notify (Cxxx, Arg1) }`, one per vCPU in `CTFY`.
struct CpuNotify(u8);

impl Aml for CpuNotify {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        let object = aml::Path::new(&format!("C{:03X}", self.0));
        let notify = aml::Notify::new(&object, &aml::Arg(1));
        let is_this = aml::Equal::new(&aml::Arg(0), &self.0);
        aml::If::new(&is_this, vec![&notify]).to_aml_bytes(sink);
    }
}

/// `\_SB_.CPUS`, the processor container (ACPI0010), with Cloud
/// Hypervisor's methods: `CSTA` (a vCPU's `_STA`: 0xf when enabled), `CTFY`
/// (notify vCPU Arg0 with Arg1), `CEJ0` (eject), `CSCN` (for each vCPU
/// being inserted notify 1, "check", for each being removed notify 3,
/// "eject request", acknowledging each), then a device per possible vCPU.
fn cpu_container(cpus: &CpuDevices<'_>, sink: &mut dyn acpi_tables::AmlSink) {
    let hid_text: &'static str = "ACPI0010";
    let hid = aml::Name::new("_HID".into(), &hid_text);
    let cid = aml::EISAName::new("PNP0A05");
    let cid_name = aml::Name::new("_CID".into(), &cid);
    let lock = "\\_SB_.PRES.CPLK";
    let csel = aml::Path::new("\\_SB_.PRES.CSEL");
    let cpen = aml::Path::new("\\_SB_.PRES.CPEN");
    let cins = aml::Path::new("\\_SB_.PRES.CINS");
    let crmv = aml::Path::new("\\_SB_.PRES.CRMV");
    let cej0_field = aml::Path::new("\\_SB_.PRES.CEJ0");
    let acquire = aml::Acquire::new(lock.into(), 0xffff);
    let release = aml::Release::new(lock.into());
    let local0 = aml::Local(0);
    let present = 0xfu8;

    let select_arg = aml::Store::new(&csel, &aml::Arg(0));
    let clear = aml::Store::new(&local0, &aml::ZERO);
    let enabled = aml::Equal::new(&cpen, &aml::ONE);
    let set_present = aml::Store::new(&local0, &present);
    let if_enabled = aml::If::new(&enabled, vec![&set_present]);
    let return_status = aml::Return::new(&local0);
    let csta = aml::Method::new(
        "CSTA".into(),
        1,
        true,
        vec![
            &acquire,
            &select_arg,
            &clear,
            &if_enabled,
            &release,
            &return_status,
        ],
    );

    let notifies: Vec<CpuNotify> = (0..cpus.max_vcpus).map(CpuNotify).collect();
    let notify_refs: Vec<&dyn Aml> = notifies.iter().map(|n| n as &dyn Aml).collect();
    let ctfy = aml::Method::new("CTFY".into(), 2, true, notify_refs);

    let eject = aml::Store::new(&cej0_field, &aml::ONE);
    let cej0 = aml::Method::new(
        "CEJ0".into(),
        1,
        true,
        vec![&acquire, &select_arg, &eject, &release],
    );

    let select_local = aml::Store::new(&csel, &local0);
    let inserting = aml::Equal::new(&cins, &aml::ONE);
    let check = 1u8;
    let notify_check = aml::MethodCall::new("CTFY".into(), vec![&local0, &check]);
    let ack_insert = aml::Store::new(&cins, &aml::ONE);
    let if_inserting = aml::If::new(&inserting, vec![&notify_check, &ack_insert]);
    let removing = aml::Equal::new(&crmv, &aml::ONE);
    let eject_request = 3u8;
    let notify_eject = aml::MethodCall::new("CTFY".into(), vec![&local0, &eject_request]);
    let ack_remove = aml::Store::new(&crmv, &aml::ONE);
    let if_removing = aml::If::new(&removing, vec![&notify_eject, &ack_remove]);
    let next = aml::Add::new(&local0, &local0, &aml::ONE);
    let max = cpus.max_vcpus;
    let more = aml::LessThan::new(&local0, &max);
    let each = aml::While::new(
        &more,
        vec![&select_local, &if_inserting, &if_removing, &next],
    );
    let cscn = aml::Method::new(
        "CSCN".into(),
        0,
        true,
        vec![&acquire, &clear, &each, &release],
    );

    let devices: Vec<CpuDevice> = (0..cpus.max_vcpus)
        .map(|index| CpuDevice { cpus, index })
        .collect();
    let mut children: Vec<&dyn Aml> = vec![&hid, &cid_name, &csta, &ctfy, &cej0, &cscn];
    children.extend(devices.iter().map(|d| d as &dyn Aml));
    aml::Device::new("CPUS".into(), children).to_aml_bytes(sink);
}

/// One hot-pluggable DIMM slot: `Device (Mxxx)`, `_HID` PNP0C80 (ACPI
/// memory device), `_STA` (`MSTA`) and `_CRS` (`MCRS`) from the controller.
struct MemorySlot(usize);

impl Aml for MemorySlot {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        let index = self.0;
        let hid = aml::EISAName::new("PNP0C80");
        let hid_name = aml::Name::new("_HID".into(), &hid);
        let uid = aml::Name::new("_UID".into(), &index);
        let msta = aml::MethodCall::new("MSTA".into(), vec![&index]);
        let sta_value = aml::Return::new(&msta);
        let sta = aml::Method::new("_STA".into(), 0, false, vec![&sta_value]);
        let mcrs = aml::MethodCall::new("MCRS".into(), vec![&index]);
        let crs_value = aml::Return::new(&mcrs);
        let crs = aml::Method::new("_CRS".into(), 0, false, vec![&crs_value]);
        let name = format!("M{index:03}");
        aml::Device::new(name.as_str().into(), vec![&hid_name, &uid, &sta, &crs])
            .to_aml_bytes(sink);
    }
}

/// `If (Arg0 == index) { Notify (Mxxx, Arg1) }`, one per slot in `MTFY`.
struct MemoryNotify(usize);

impl Aml for MemoryNotify {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        let object = aml::Path::new(&format!("M{:03}", self.0));
        let notify = aml::Notify::new(&object, &aml::Arg(1));
        let is_this = aml::Equal::new(&aml::Arg(0), &self.0);
        aml::If::new(&is_this, vec![&notify]).to_aml_bytes(sink);
    }
}

/// `\_SB_.MHPC`, Cloud Hypervisor v37's memory hot-plug controller (its
/// `impl Aml for MemoryManager`). Without a hot-plug area it is a stub with
/// an empty `MSCN` (the GED calls it); with one, the `MHPR` region over the
/// controller's registers (`MHBL`/`MHBH` base, `MHLL`/`MHLH` length, `MEN_`,
/// `MINS`, `MRMV`, `MEJ0` status, `MSEL` selection) behind the mutex `MLCK`,
/// the methods `MTFY` (notify slot Arg0 with Arg1), `MSCN` (for each slot
/// being inserted notify 1, for each being removed notify 3, acknowledging
/// each), `MSTA` (0xf when enabled) and `MCRS` (the slot's range), and a
/// memory device per slot.
fn memory_hotplug_controller(slots: bool, sink: &mut dyn acpi_tables::AmlSink) {
    let hid = aml::EISAName::new("PNP0A06");
    let hid_name = aml::Name::new("_HID".into(), &hid);
    let uid_text: &'static str = "Memory Hotplug Controller";
    let uid = aml::Name::new("_UID".into(), &uid_text);
    if !slots {
        let mscn = aml::Method::new("MSCN".into(), 0, true, vec![]);
        aml::Device::new("_SB_.MHPC".into(), vec![&hid_name, &uid, &mscn]).to_aml_bytes(sink);
        return;
    }
    let header = ControllerHeader {
        uid: "Memory Hotplug Controller",
        sta: None,
        lock: "MLCK",
        region: "MHPR",
        address: MEMORY_HOTPLUG_ADDRESS,
        size: MEMORY_HOTPLUG_SIZE,
    };
    let dword = |entries| {
        aml::Field::new(
            "MHPR".into(),
            aml::FieldAccessType::DWord,
            aml::FieldLockRule::NoLock,
            aml::FieldUpdateRule::Preserve,
            entries,
        )
    };
    let range_fields = dword(vec![
        aml::FieldEntry::Named(*b"MHBL", 32),
        aml::FieldEntry::Named(*b"MHBH", 32),
        aml::FieldEntry::Named(*b"MHLL", 32),
        aml::FieldEntry::Named(*b"MHLH", 32),
    ]);
    let pxm_field = dword(vec![
        aml::FieldEntry::Reserved(128),
        aml::FieldEntry::Named(*b"MHPX", 32),
    ]);
    let status_field = aml::Field::new(
        "MHPR".into(),
        aml::FieldAccessType::Byte,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![
            aml::FieldEntry::Reserved(160),
            aml::FieldEntry::Named(*b"MEN_", 1),
            aml::FieldEntry::Named(*b"MINS", 1),
            aml::FieldEntry::Named(*b"MRMV", 1),
            aml::FieldEntry::Named(*b"MEJ0", 1),
        ],
    );
    let selection_field = dword(vec![
        aml::FieldEntry::Named(*b"MSEL", 32),
        aml::FieldEntry::Named(*b"MOEV", 32),
        aml::FieldEntry::Named(*b"MOSC", 32),
    ]);

    let count = HOTPLUG_SLOTS;
    let notifies: Vec<MemoryNotify> = (0..count).map(MemoryNotify).collect();
    let notify_refs: Vec<&dyn Aml> = notifies.iter().map(|n| n as &dyn Aml).collect();
    let mtfy = aml::Method::new("MTFY".into(), 2, true, notify_refs);

    let acquire = aml::Acquire::new("MLCK".into(), 0xffff);
    let release = aml::Release::new("MLCK".into());
    let local0 = aml::Local(0);
    let msel = aml::Path::new("\\_SB_.MHPC.MSEL");
    let mins = aml::Path::new("\\_SB_.MHPC.MINS");
    let mrmv = aml::Path::new("\\_SB_.MHPC.MRMV");
    let men = aml::Path::new("\\_SB_.MHPC.MEN_");
    let clear = aml::Store::new(&local0, &aml::ZERO);
    let select_local = aml::Store::new(&msel, &local0);
    let inserting = aml::Equal::new(&mins, &aml::ONE);
    let check = aml::MethodCall::new("MTFY".into(), vec![&local0, &aml::ONE]);
    let ack_insert = aml::Store::new(&mins, &aml::ONE);
    let if_inserting = aml::If::new(&inserting, vec![&check, &ack_insert]);
    let removing = aml::Equal::new(&mrmv, &aml::ONE);
    let eject_request = 3u8;
    let eject = aml::MethodCall::new("MTFY".into(), vec![&local0, &eject_request]);
    let ack_remove = aml::Store::new(&mrmv, &aml::ONE);
    let if_removing = aml::If::new(&removing, vec![&eject, &ack_remove]);
    let next = aml::Add::new(&local0, &local0, &aml::ONE);
    let more = aml::LessThan::new(&local0, &count);
    let each = aml::While::new(
        &more,
        vec![&select_local, &if_inserting, &if_removing, &next],
    );
    let mscn = aml::Method::new(
        "MSCN".into(),
        0,
        true,
        vec![&acquire, &clear, &each, &release],
    );

    let select_arg = aml::Store::new(&msel, &aml::Arg(0));
    let enabled = aml::Equal::new(&men, &aml::ONE);
    let present = 0xfu8;
    let set_present = aml::Store::new(&local0, &present);
    let if_enabled = aml::If::new(&enabled, vec![&set_present]);
    let return_status = aml::Return::new(&local0);
    let msta = aml::Method::new(
        "MSTA".into(),
        1,
        true,
        vec![
            &acquire,
            &select_arg,
            &clear,
            &if_enabled,
            &release,
            &return_status,
        ],
    );

    // MCRS: a QWordMemory template whose min, max and length the slot's
    // registers fill in (each as two dwords, carrying into the high one).
    let any = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::Cacheable,
        true,
        0u64,
        0xFFFF_FFFF_FFFF_FFFEu64,
        None,
    );
    let template = aml::ResourceTemplate::new(vec![&any]);
    let mr64_name = aml::Name::new("MR64".into(), &template);
    let mr64 = aml::Path::new("MR64");
    let (minl, minh) = (aml::Path::new("MINL"), aml::Path::new("MINH"));
    let (maxl, maxh) = (aml::Path::new("MAXL"), aml::Path::new("MAXH"));
    let (lenl, lenh) = (aml::Path::new("LENL"), aml::Path::new("LENH"));
    let (at14, at18, at22, at26, at38, at42) =
        (14usize, 18usize, 22usize, 26usize, 38usize, 42usize);
    let f_minl = aml::CreateQWordField::new(&minl, &mr64, &at14);
    let f_minh = aml::CreateDWordField::new(&minh, &mr64, &at18);
    let f_maxl = aml::CreateQWordField::new(&maxl, &mr64, &at22);
    let f_maxh = aml::CreateDWordField::new(&maxh, &mr64, &at26);
    let f_lenl = aml::CreateQWordField::new(&lenl, &mr64, &at38);
    let f_lenh = aml::CreateDWordField::new(&lenh, &mr64, &at42);
    let mhbl = aml::Path::new("\\_SB_.MHPC.MHBL");
    let mhbh = aml::Path::new("\\_SB_.MHPC.MHBH");
    let mhll = aml::Path::new("\\_SB_.MHPC.MHLL");
    let mhlh = aml::Path::new("\\_SB_.MHPC.MHLH");
    let s_minl = aml::Store::new(&minl, &mhbl);
    let s_minh = aml::Store::new(&minh, &mhbh);
    let s_lenl = aml::Store::new(&lenl, &mhll);
    let s_lenh = aml::Store::new(&lenh, &mhlh);
    let add_low = aml::Add::new(&maxl, &minl, &lenl);
    let add_high = aml::Add::new(&maxh, &minh, &lenh);
    let carried = aml::LessThan::new(&maxl, &minl);
    let carry = aml::Add::new(&maxh, &aml::ONE, &maxh);
    let if_carry = aml::If::new(&carried, vec![&carry]);
    let last = aml::Subtract::new(&maxl, &maxl, &aml::ONE);
    let return_mr64 = aml::Return::new(&mr64);
    let mcrs = aml::Method::new(
        "MCRS".into(),
        1,
        true,
        vec![
            &acquire,
            &select_arg,
            &mr64_name,
            &f_minl,
            &f_minh,
            &f_maxl,
            &f_maxh,
            &f_lenl,
            &f_lenh,
            &s_minl,
            &s_minh,
            &s_lenl,
            &s_lenh,
            &add_low,
            &add_high,
            &if_carry,
            &last,
            &release,
            &return_mr64,
        ],
    );

    let devices: Vec<MemorySlot> = (0..count).map(MemorySlot).collect();
    let mut children: Vec<&dyn Aml> = vec![
        &header,
        &range_fields,
        &pxm_field,
        &status_field,
        &selection_field,
        &mtfy,
        &mscn,
        &msta,
        &mcrs,
    ];
    children.extend(devices.iter().map(|d| d as &dyn Aml));
    aml::Device::new("_SB_.MHPC".into(), children).to_aml_bytes(sink);
}

fn mcfg(segments: &[SegmentLayout]) -> Vec<u8> {
    let mut mcfg = MCFG::new(OEM_ID, *b"MCFG    ", 1);
    for segment in segments {
        mcfg.add_ecam(segment.ecam_base, segment.id, 0, 0);
    }
    let mut bytes = Vec::new();
    mcfg.to_aml_bytes(&mut bytes);
    bytes
}

/// The TPM 2.0 device (`--tpm`), as Cloud Hypervisor writes it: `\TPM2`
/// at the root of the namespace, `_HID` "MSFT0101" (Linux's tpm_crb binds
/// to it), present, and the CRB's page as its one resource.
fn tpm_device(sink: &mut dyn acpi_tables::AmlSink) {
    let hid: &'static str = "MSFT0101";
    let hid_name = aml::Name::new("_HID".into(), &hid);
    let present = 0x0fu8;
    let sta = aml::Name::new("_STA".into(), &present);
    let crb = aml::Memory32Fixed::new(true, TPM_START as u32, TPM_SIZE as u32);
    let crs = aml::ResourceTemplate::new(vec![&crb]);
    let crs_name = aml::Name::new("_CRS".into(), &crs);
    let device = aml::Device::new("TPM2".into(), vec![&hid_name, &sta, &crs_name]);
    device.to_aml_bytes(sink);
}

/// The TPM2 table (TCG ACPI Specification, revision 3 layout, 52 bytes):
/// client platform, start method 7 (CRB without ACPI start), the control
/// area 0x40 into the CRB's page.
fn tpm2() -> Sdt {
    const PLATFORM_CLIENT: u16 = 0;
    const START_METHOD_CRB: u32 = 7;
    let mut tpm2 = table(b"TPM2", 52, 3);
    tpm2.write_u16(36, PLATFORM_CLIENT);
    tpm2.write_u16(38, 0); // reserved
    tpm2.write_u64(40, TPM_START + 0x40);
    tpm2.write_u32(48, START_METHOD_CRB);
    tpm2.update_checksum();
    tpm2
}

fn dsdt(
    segments: &[SegmentLayout],
    nodes: &[NumaNode],
    cpus: &CpuDevices<'_>,
    tpm: bool,
    memory_hotplug: bool,
) -> Sdt {
    let mut dsdt = table(b"DSDT", 36, 6);
    // The AML builders borrow their children, so every node is a local.
    let com1_io = aml::IO::new(0x3f8, 0x3f8, 0, 8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, 4);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_hid = aml::EISAName::new("PNP0501");
    let com1_hid_name = aml::Name::new("_HID".into(), &com1_hid);
    let com1_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let com1_crs_name = aml::Name::new("_CRS".into(), &com1_crs);
    let com1 = aml::Device::new(
        "COM1".into(),
        vec![&com1_hid_name, &com1_uid, &com1_crs_name],
    );
    let kbd_data = aml::IO::new(0x60, 0x60, 0, 1);
    let kbd_cmd = aml::IO::new(0x64, 0x64, 0, 1);
    let kbd_irq = aml::Interrupt::new(true, true, false, false, 1);
    let ps2_crs = aml::ResourceTemplate::new(vec![&kbd_data, &kbd_cmd, &kbd_irq]);
    let ps2_hid = aml::EISAName::new("PNP0303");
    let ps2_hid_name = aml::Name::new("_HID".into(), &ps2_hid);
    let ps2_crs_name = aml::Name::new("_CRS".into(), &ps2_crs);
    let ps2 = aml::Device::new("PS2K".into(), vec![&ps2_hid_name, &ps2_crs_name]);
    let mut pci = Vec::new();
    for segment in segments {
        pci_host_bridge(segment, segment_node(nodes, segment.id), &mut pci);
    }
    if !segments.is_empty() {
        motherboard_resources(segments, &mut pci);
    }
    ged_and_power_button(&mut pci);
    cpu_hotplug_controller(&mut pci);
    cpu_container(cpus, &mut pci);
    pci_hotplug_controller(segments, &mut pci);
    let pci = RawAml(pci);
    let sb = aml::Scope::new("_SB_".into(), vec![&com1, &ps2, &pci]);
    let s5_package = aml::Package::new(vec![&S5_SLEEP_TYPE]);
    let s5 = aml::Name::new("_S5_".into(), &s5_package);
    sb.to_aml_bytes(&mut dsdt);
    s5.to_aml_bytes(&mut dsdt);
    if tpm {
        tpm_device(&mut dsdt);
    }
    memory_hotplug_controller(memory_hotplug, &mut dsdt);
    dsdt.update_checksum();
    dsdt
}

/// Already-encoded AML, spliced into a scope.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

fn fadt(dsdt_addr: u64) -> Sdt {
    let mut fadt = table(b"FACP", 276, 6);
    const HW_REDUCED_ACPI: u32 = 1 << 20;
    const RESET_REG_SUP: u32 = 1 << 10;
    const TMR_VAL_EXT: u32 = 1 << 8;
    const SLP_BUTTON: u32 = 1 << 5;
    const PWR_BUTTON: u32 = 1 << 4;
    fadt.write_u32(40, dsdt_addr as u32);
    // IAPC_BOOT_ARCH: an 8042 keyboard controller is present.
    fadt.write_u16(109, 1 << 1);
    fadt.write_u32(
        112,
        HW_REDUCED_ACPI | RESET_REG_SUP | TMR_VAL_EXT | SLP_BUTTON | PWR_BUTTON,
    );
    fadt.write(
        116,
        GenericAddress::io_port_address::<u8>(ACPI_SHUTDOWN_PORT),
    );
    fadt.write_u8(128, ACPI_RESET_VALUE);
    fadt.write_u8(131, 3); // FADT minor version
    fadt.write_u64(140, dsdt_addr); // X_DSDT
    fadt.write(
        244,
        GenericAddress::io_port_address::<u8>(ACPI_SHUTDOWN_PORT),
    );
    fadt.write(
        256,
        GenericAddress::io_port_address::<u8>(ACPI_SHUTDOWN_PORT + 1),
    );
    fadt.write_bytes(268, b"VMKITVMM");
    fadt.update_checksum();
    fadt
}

const MADT_ENABLED: u32 = 1;
const MADT_ONLINE_CAPABLE: u32 = 1 << 1;

/// vCPU `index`'s MADT entry with `flags`: a Processor Local APIC (type,
/// length, UID, APIC id, flags) or, for APIC ids from 255 on, a Processor
/// Local x2APIC (type, length, reserved, x2APIC id, flags, UID).
fn madt_entry(topology: &Topology, index: u8, flags: u32) -> Vec<u8> {
    let apic_id = topology.apic_id(index);
    let mut entry = Vec::with_capacity(16);
    if apic_id < 255 {
        entry.extend_from_slice(&[0, 8, index, apic_id as u8]);
        entry.extend_from_slice(&flags.to_le_bytes());
    } else {
        entry.extend_from_slice(&[9, 16, 0, 0]);
        entry.extend_from_slice(&apic_id.to_le_bytes());
        entry.extend_from_slice(&flags.to_le_bytes());
        entry.extend_from_slice(&u32::from(index).to_le_bytes());
    }
    entry
}

fn madt(topology: &Topology, boot_vcpus: u8, max_vcpus: u8) -> Sdt {
    let mut madt = table(b"APIC", 44, 5);
    madt.write_u32(36, APIC_START as u32);
    madt.write_u32(40, 0); // no dual 8259 set-up to honour
    for index in 0..max_vcpus {
        // vCPUs not running at boot can be hot-plugged later.
        let flags = if index < boot_vcpus {
            MADT_ENABLED
        } else {
            MADT_ONLINE_CAPABLE
        };
        madt.append_slice(&madt_entry(topology, index, flags));
    }
    // I/O APIC: type, length, id, reserved, address, GSI base.
    madt.append_slice(&[1, 12, 0, 0]);
    madt.append_slice(&(IOAPIC_START as u32).to_le_bytes());
    madt.append_slice(&0u32.to_le_bytes());
    // Local APIC NMI on LINT1 for every processor.
    madt.append_slice(&[4, 6, 0xff, 0, 0, 1]);
    madt.update_checksum();
    madt
}

/// The SRAT as v37 writes it: revision 3, 12 reserved bytes of zeros, then
/// for each node by id a Memory Affinity structure per range of its zones
/// (then one per virtio-mem region, hot-pluggable) and a Processor Local
/// x2APIC Affinity structure per listed vCPU (x2APIC ids from the topology,
/// as the MADT's), all enabled.
fn srat(nodes: &[NumaNode], topology: &Topology) -> Sdt {
    const ENABLED: u32 = 1;
    const HOTPLUGGABLE: u32 = 2;
    let mut srat = table(b"SRAT", 36, 3);
    // Built whole first: Sdt re-sums the table on every append.
    let mut body = vec![0u8; 12];
    for node in nodes {
        let memory = node.memory.iter().map(|&r| (r, ENABLED));
        let hotplug = node.hotplug.iter().map(|&r| (r, ENABLED | HOTPLUGGABLE));
        for ((base, size), flags) in memory.chain(hotplug) {
            // Type 1, length 40: proximity domain, reserved, base, length,
            // reserved, flags, reserved.
            body.extend_from_slice(&[1, 40]);
            body.extend_from_slice(&node.id.to_le_bytes());
            body.extend_from_slice(&[0, 0]);
            body.extend_from_slice(&base.to_le_bytes());
            body.extend_from_slice(&size.to_le_bytes());
            body.extend_from_slice(&[0; 4]);
            body.extend_from_slice(&flags.to_le_bytes());
            body.extend_from_slice(&[0; 8]);
        }
        for &cpu in &node.cpus {
            // Type 2, length 24: reserved, proximity domain, x2APIC id,
            // flags, clock domain, reserved.
            body.extend_from_slice(&[2, 24, 0, 0]);
            body.extend_from_slice(&node.id.to_le_bytes());
            body.extend_from_slice(&topology.apic_id(cpu).to_le_bytes());
            body.extend_from_slice(&ENABLED.to_le_bytes());
            body.extend_from_slice(&[0; 8]);
        }
    }
    srat.append_slice(&body);
    srat
}

/// The SLIT as v37 writes it: the number of nodes, then a row per node by
/// id: 10 to itself, the distance given to each other node, 20 where none
/// is given.
fn slit(nodes: &[NumaNode]) -> Sdt {
    let mut slit = table(b"SLIT", 36, 1);
    let mut body = (nodes.len() as u64).to_le_bytes().to_vec();
    for from in nodes {
        for to in nodes {
            body.push(if from.id == to.id {
                10
            } else {
                from.distances.get(&to.id).copied().unwrap_or(20)
            });
        }
    }
    slit.append_slice(&body);
    slit
}

fn xsdt(tables: &[u64]) -> Sdt {
    let mut xsdt = table(b"XSDT", 36, 1);
    for &addr in tables {
        xsdt.append(addr);
    }
    xsdt.update_checksum();
    xsdt
}

/// Writes the tables from `RSDP_POINTER` on; returns the RSDP address. The
/// SRAT and SLIT are written only for `--numa` (non-empty `nodes`), as in v37;
/// the memory hot-plug slots only with a hot-plug area (`memory_hotplug`).
#[allow(clippy::too_many_arguments)]
pub fn write_tables(
    mem: &GuestMemoryMmap,
    topology: &Topology,
    boot_vcpus: u8,
    max_vcpus: u8,
    pci_segments: &[SegmentLayout],
    nodes: &[NumaNode],
    tpm: bool,
    memory_hotplug: bool,
) -> Result<u64> {
    // Nothing is written past ACPI_TABLES_END: a table that would reach it
    // fails the boot before any of its bytes land (the RSDP, written last,
    // then points nowhere).
    let write = |bytes: &[u8], addr: u64| -> Result<u64> {
        let end = addr + bytes.len() as u64;
        if end > ACPI_TABLES_END {
            let table = match bytes.get(..4) {
                Some(b"RSD ") => "RSDP".to_owned(),
                Some(sig) => String::from_utf8_lossy(sig).into_owned(),
                None => "table".to_owned(),
            };
            return Err(AcpiError::DoNotFit {
                table,
                len: bytes.len(),
                end,
                limit: ACPI_TABLES_END,
            }
            .into());
        }
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|source| AcpiError::Write { source })?;
        Ok((end + 7) & !7)
    };
    let mut next = RSDP_POINTER + Rsdp::len() as u64;
    next = (next + 7) & !7;
    let dsdt_addr = next;
    let cpus = CpuDevices {
        topology,
        max_vcpus,
        nodes,
    };
    next = write(
        dsdt(pci_segments, nodes, &cpus, tpm, memory_hotplug).as_slice(),
        dsdt_addr,
    )?;
    let fadt_addr = next;
    next = write(fadt(dsdt_addr).as_slice(), fadt_addr)?;
    let madt_addr = next;
    next = write(madt(topology, boot_vcpus, max_vcpus).as_slice(), madt_addr)?;
    let mut tables = vec![fadt_addr, madt_addr];
    if !pci_segments.is_empty() {
        let mcfg_addr = next;
        next = write(&mcfg(pci_segments), mcfg_addr)?;
        tables.push(mcfg_addr);
    }
    if !nodes.is_empty() {
        let srat_addr = next;
        next = write(srat(nodes, topology).as_slice(), srat_addr)?;
        tables.push(srat_addr);
        let slit_addr = next;
        next = write(slit(nodes).as_slice(), slit_addr)?;
        tables.push(slit_addr);
    }
    if tpm {
        let tpm2_addr = next;
        next = write(tpm2().as_slice(), tpm2_addr)?;
        tables.push(tpm2_addr);
    }
    let xsdt_addr = next;
    write(xsdt(&tables).as_slice(), xsdt_addr)?;
    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);
    write(rsdp.as_bytes(), RSDP_POINTER)?;
    Ok(RSDP_POINTER)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    fn read_table(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let len: u32 = mem.read_obj(GuestAddress(addr + 4)).unwrap();
        let mut bytes = vec![0u8; len as usize];
        mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
        bytes
    }

    #[test]
    fn tables_are_linked_and_checksummed() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let topology = Topology {
            threads_per_core: 1,
            cores_per_die: 4,
            dies_per_package: 1,
            packages: 1,
        };
        let segments = crate::pci::plan_segments(2, 2 << 20, 40).unwrap();
        let rsdp_addr = write_tables(&mem, &topology, 2, 4, &segments, &[], false, false).unwrap();
        let mut rsdp = [0u8; 36];
        mem.read_slice(&mut rsdp, GuestAddress(rsdp_addr)).unwrap();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp[..20]) && checksum_ok(&rsdp));
        let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let xsdt = read_table(&mem, xsdt_addr);
        assert!(checksum_ok(&xsdt));
        let entries: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let mut signatures = Vec::new();
        for addr in entries {
            let t = read_table(&mem, addr);
            assert!(checksum_ok(&t), "{:?}", &t[..4]);
            signatures.push(String::from_utf8_lossy(&t[..4]).into_owned());
            if &t[..4] == b"FACP" {
                let dsdt = read_table(&mem, u64::from_le_bytes(t[140..148].try_into().unwrap()));
                assert_eq!(&dsdt[..4], b"DSDT");
                assert!(checksum_ok(&dsdt));
                assert!(dsdt.windows(4).any(|w| w == b"_S5_"));
                assert!(dsdt.windows(4).any(|w| w == b"PC00"));
                assert!(dsdt.windows(4).any(|w| w == b"PC01"));
                assert!(dsdt.windows(8).any(|w| w == b"ACPI0013"));
                assert!(dsdt.windows(4).any(|w| w == b"_EVT"));
                assert!(dsdt.windows(4).any(|w| w == b"PWRB"));
            }
            if &t[..4] == b"MCFG" {
                // Header, 8 reserved bytes, then one 16-byte entry per segment.
                assert_eq!(t.len(), 44 + 2 * 16);
                let base = u64::from_le_bytes(t[44 + 16..52 + 16].try_into().unwrap());
                assert_eq!(base, 0xe810_0000);
                assert_eq!(u16::from_le_bytes([t[52 + 16], t[53 + 16]]), 1);
            }
            if &t[..4] == b"APIC" {
                let (mut enabled, mut listed) = (0, 0);
                let mut i = 44;
                while i < t.len() {
                    if t[i] == 0 {
                        listed += 1;
                        enabled += (t[i + 4] & 1) as usize;
                    }
                    i += t[i + 1] as usize;
                }
                assert_eq!((enabled, listed), (2, 4));
            }
        }
        assert_eq!(signatures, vec!["FACP", "APIC", "MCFG"]);
    }

    fn xsdt_entries(mem: &GuestMemoryMmap, rsdp_addr: u64) -> Vec<Vec<u8>> {
        let xsdt_addr: u64 = mem.read_obj(GuestAddress(rsdp_addr + 24)).unwrap();
        let xsdt = read_table(mem, xsdt_addr);
        xsdt[36..]
            .chunks(8)
            .map(|c| read_table(mem, u64::from_le_bytes(c.try_into().unwrap())))
            .collect()
    }

    fn two_nodes() -> Vec<NumaNode> {
        vec![
            NumaNode {
                id: 0,
                cpus: vec![0, 1],
                memory: vec![(0, 64 << 20)],
                hotplug: Vec::new(),
                distances: [(1, 15)].into(),
                pci_segments: vec![0],
            },
            NumaNode {
                id: 1,
                cpus: vec![3],
                memory: vec![(0xa000_0000, 0x2000_0000), (1 << 32, 0x2000_0000)],
                hotplug: Vec::new(),
                distances: Default::default(),
                pci_segments: vec![1],
            },
        ]
    }

    fn u32_at(t: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(t[at..at + 4].try_into().unwrap())
    }

    fn u64_at(t: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(t[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn numa_nodes_give_an_srat_and_a_slit() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        // 3 cores need 2 bits, so the second package's first vCPU (3) is x2APIC id 4.
        let topology = Topology {
            threads_per_core: 1,
            cores_per_die: 3,
            dies_per_package: 1,
            packages: 2,
        };
        let segments = crate::pci::plan_segments(2, 2 << 20, 40).unwrap();
        let rsdp =
            write_tables(&mem, &topology, 6, 6, &segments, &two_nodes(), false, false).unwrap();
        let tables = xsdt_entries(&mem, rsdp);
        let sigs: Vec<&[u8]> = tables.iter().map(|t| &t[..4]).collect();
        assert_eq!(sigs, [b"FACP", b"APIC", b"MCFG", b"SRAT", b"SLIT"]);
        let (srat, slit) = (&tables[3], &tables[4]);
        assert!(checksum_ok(srat) && checksum_ok(slit));
        // Header, 12 reserved bytes, 3 memory ranges of 40, 3 vCPUs of 24.
        assert_eq!(srat.len(), 48 + 3 * 40 + 3 * 24);
        assert_eq!(u32_at(srat, 4) as usize, srat.len());
        assert_eq!(srat[8], 3, "revision");
        assert!(srat[36..48].iter().all(|&b| b == 0));
        let mut mems = Vec::new();
        let mut cpus = Vec::new();
        let mut at = 48;
        while at < srat.len() {
            match (srat[at], srat[at + 1]) {
                (1, 40) => mems.push((
                    u32_at(srat, at + 2),
                    u64_at(srat, at + 8),
                    u64_at(srat, at + 16),
                    u32_at(srat, at + 28),
                )),
                (2, 24) => cpus.push((
                    u32_at(srat, at + 4),
                    u32_at(srat, at + 8),
                    u32_at(srat, at + 12),
                )),
                other => panic!("unexpected SRAT entry {other:?}"),
            }
            at += srat[at + 1] as usize;
        }
        assert_eq!(
            mems,
            vec![
                (0, 0, 64 << 20, 1),
                (1, 0xa000_0000, 0x2000_0000, 1),
                (1, 1 << 32, 0x2000_0000, 1)
            ]
        );
        assert_eq!(cpus, vec![(0, 0, 1), (0, 1, 1), (1, 4, 1)]);
        // Localities, then rows: 10 on the diagonal, 20 where none is given.
        assert_eq!(slit.len(), 44 + 4);
        assert_eq!(u64_at(slit, 36), 2);
        assert_eq!(&slit[44..], &[10, 15, 20, 10]);
        // Each host bridge names its node: PC01 is in node 1.
        let fadt = &tables[0];
        let dsdt = read_table(&mem, u64_at(fadt, 140));
        assert!(checksum_ok(&dsdt));
        let pxm = |device: &[u8]| {
            let at = dsdt.windows(4).position(|w| w == device).unwrap();
            let m = at + dsdt[at..].windows(4).position(|w| w == b"_PXM").unwrap();
            // Method: name, flags, then ReturnOp and the value.
            (dsdt[m + 5], dsdt[m + 6])
        };
        assert_eq!(pxm(b"PC00"), (0xa4, 0x00));
        assert_eq!(pxm(b"PC01"), (0xa4, 0x01));
    }

    #[test]
    fn tables_too_large_for_the_acpi_area_are_refused_unwritten() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let topology = Topology {
            threads_per_core: 1,
            cores_per_die: 1,
            dies_per_package: 1,
            packages: 1,
        };
        // 80 nodes of 255 vCPUs each: an SRAT of ~490 KB, more than the 384 KiB there.
        let nodes: Vec<NumaNode> = (0..80)
            .map(|id| NumaNode {
                id,
                cpus: (0..255).collect(),
                ..NumaNode::default()
            })
            .collect();
        let err = write_tables(&mem, &topology, 1, 1, &[], &nodes, false, false).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Memory);
        assert!(
            err.message
                .starts_with("The ACPI tables do not fit below 1 MiB: the SRAT (489648 bytes)"),
            "{}",
            err.message
        );
        let mut rsdp = [0u8; 8];
        mem.read_slice(&mut rsdp, GuestAddress(RSDP_POINTER))
            .unwrap();
        assert_eq!(rsdp, [0; 8], "no RSDP points at a partial set");
    }

    fn hex(text: &str) -> Vec<u8> {
        let digits: Vec<u8> = text.bytes().filter(u8::is_ascii_hexdigit).collect();
        digits
            .chunks(2)
            .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
            .collect()
    }

    #[test]
    fn the_tpm_device_is_the_aml_cloud_hypervisor_writes() {
        // The bytes the test guest read from Cloud Hypervisor v37's DSDT:
        // Device (TPM2) { Name (_HID, "MSFT0101"), Name (_STA, 0x0F),
        // Name (_CRS, ResourceTemplate () { Memory32Fixed (ReadWrite,
        // 0xFED40000, 0x1000) }) }.
        let expected = hex("5b82 32 54504d32 \
             085f484944 0d 4d534654303130 31 00 \
             085f535441 0a0f \
             085f435253 11 11 0a0e 86 0900 01 0000d4fe 00100000 7900");
        let mut bytes = Vec::new();
        tpm_device(&mut bytes);
        assert_eq!(bytes, expected);
    }

    #[test]
    fn a_tpm_adds_the_tpm2_table_after_the_others_and_its_device() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let topology = Topology {
            threads_per_core: 1,
            cores_per_die: 1,
            dies_per_package: 1,
            packages: 1,
        };
        let segments = crate::pci::plan_segments(1, 2 << 20, 40).unwrap();
        let rsdp_addr = write_tables(&mem, &topology, 1, 1, &segments, &[], true, false).unwrap();
        let tables = xsdt_entries(&mem, rsdp_addr);
        let signatures: Vec<&[u8]> = tables.iter().map(|t| &t[..4]).collect();
        assert_eq!(signatures, [b"FACP", b"APIC", b"MCFG", b"TPM2"]);
        let tpm2 = &tables[3];
        assert!(checksum_ok(tpm2));
        assert_eq!((tpm2.len(), tpm2[8]), (52, 3), "length and revision");
        assert_eq!(
            u16::from_le_bytes([tpm2[36], tpm2[37]]),
            0,
            "client platform"
        );
        assert_eq!(
            u64::from_le_bytes(tpm2[40..48].try_into().unwrap()),
            0xfed4_0040
        );
        assert_eq!(
            u32::from_le_bytes(tpm2[48..52].try_into().unwrap()),
            7,
            "CRB"
        );
        let fadt = &tables[0];
        let dsdt = read_table(&mem, u64::from_le_bytes(fadt[140..148].try_into().unwrap()));
        assert!(checksum_ok(&dsdt));
        assert!(dsdt.windows(8).any(|w| w == b"MSFT0101"));
    }
}
