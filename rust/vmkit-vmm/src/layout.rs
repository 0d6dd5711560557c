//! Guest physical memory layout (x86-64), following Cloud Hypervisor's choices
//! so that guests and tools that know CH find things where they expect.

/// The page size guest RAM is mapped in when no huge page size is given.
pub const PAGE_SIZE: u64 = 4096;
/// Boot GDT and IDT for the VMM-built entry states.
pub const BOOT_GDT_START: u64 = 0x500;
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`, its module list and memory map.
pub const PVH_INFO_START: u64 = 0x6000;
pub const MODLIST_START: u64 = 0x6040;
pub const MEMMAP_START: u64 = 0x7000;
/// The Linux zero page (`boot_params`) for 64-bit boot.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack of the 64-bit entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables of the 64-bit entry (first 1 GiB, 2 MiB pages).
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// RAM below this is usable; [this, 1 MiB) is not RAM (Cloud Hypervisor's
/// map lists nothing there).
pub const EBDA_START: u64 = 0xa0000;
/// The ACPI tables start here, in that hole, as in Cloud Hypervisor.
pub const RSDP_POINTER: u64 = EBDA_START;
pub const ACPI_TABLES_END: u64 = 0x100000;
/// Kernels and everything else go at or above 1 MiB.
pub const HIGH_RAM_START: u64 = 0x100000;
/// The 32-bit MMIO hole: [3 GiB, 4 GiB).
pub const MEM_32BIT_RESERVED_START: u64 = 0xc000_0000;
pub const MEM_32BIT_RESERVED_SIZE: u64 = 0x4000_0000;
/// RAM that does not fit below the hole continues here.
pub const RAM_64BIT_START: u64 = 0x1_0000_0000;
/// PCI devices' 32-bit BARs: the start of the hole, shared by the segments.
pub const MEM_32BIT_DEVICES_START: u64 = MEM_32BIT_RESERVED_START;
pub const MEM_32BIT_DEVICES_SIZE: u64 = 640 << 20;
/// ECAM (PCI MMCONFIG): 1 MiB per segment, reserved in the memory map.
pub const PCI_MMCONFIG_START: u64 = 0xe800_0000;
pub const PCI_MMCONFIG_SIZE: u64 = 256 << 20;
/// The top of the guest's address space that Cloud Hypervisor keeps for
/// platform devices, above the 64-bit PCI windows.
pub const PLATFORM_DEVICE_AREA_SIZE: u64 = 1 << 20;
/// Each segment's share of the 64-bit device space is a multiple of this.
pub const MEM_64BIT_DEVICES_ALIGNMENT: u64 = 4 << 30;
/// The ACPI Generic Event Device's register (one byte), below the IOAPIC.
pub const GED_ADDRESS: u64 = 0xfeb0_0000;
pub const GED_SIZE: u64 = 0x10;
/// Cloud Hypervisor's CPU hot-plug controller (`devices::cpu_hotplug`): the
/// page after the GED's, as Cloud Hypervisor gives each platform device a
/// page of its own (it puts them at the top of the address space; vmkit
/// keeps them in the 32-bit hole, where the GED is).
pub const CPU_HOTPLUG_ADDRESS: u64 = GED_ADDRESS + 0x1000;
/// Cloud Hypervisor's ACPI memory hot-plug controller, the next page.
pub const MEMORY_HOTPLUG_ADDRESS: u64 = GED_ADDRESS + 0x2000;
/// Cloud Hypervisor's ACPI PCI hot-plug controller (PHPR), the next page.
pub const PCI_HOTPLUG_ADDRESS: u64 = GED_ADDRESS + 0x3000;
/// A placeholder ioeventfd's address, registered and removed at once after
/// each boot (`vm::settle_kvm_srcu`): a page of the platform area no device
/// has, where a guest's writes are dropped either way.
pub const SRCU_SETTLE_ADDRESS: u64 = GED_ADDRESS + 0xf000;
/// Its interrupt: an ISA line nothing else uses (COM1 is 4, the i8042 1).
pub const GED_IRQ: u32 = 5;
/// The TPM's CRB interface (`--tpm`): locality 0's 4 KiB page, where Cloud
/// Hypervisor and QEMU put it (the PC Client platform's TPM address).
pub const TPM_START: u64 = 0xfed4_0000;
pub const TPM_SIZE: u64 = 0x1000;
/// COM1's interrupt (ISA IRQ 4, as on a PC and in Cloud Hypervisor).
pub const SERIAL_IRQ: u32 = 4;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM's TSS (needed on VMX hosts): three pages just below the IOAPIC hole top.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;

/// Guest physical ranges of RAM for `size` bytes: below the hole, then above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    let low = size.min(MEM_32BIT_RESERVED_START);
    let mut ranges = vec![(0, low)];
    if size > low {
        ranges.push((RAM_64BIT_START, size - low));
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_splits_around_the_hole() {
        assert_eq!(ram_ranges(64 << 20), vec![(0, 64 << 20)]);
        assert_eq!(ram_ranges(3 << 30), vec![(0, 3 << 30)]);
        assert_eq!(
            ram_ranges(0xe000_0000),
            vec![(0, 0xc000_0000), (0x1_0000_0000, 0x2000_0000)]
        );
    }
}
