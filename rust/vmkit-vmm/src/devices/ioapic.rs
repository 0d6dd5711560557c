//! The IOAPIC (an 82093AA as KVM models it: version 0x11, 24 pins), in user
//! space because the VM runs KVM's split irqchip: local APICs in the kernel,
//! no in-kernel IOAPIC, PIC or PIT, as in Cloud Hypervisor. With the
//! in-kernel irqchip, KVM takes ~7 ms to add a 256 MiB memory slot and
//! ~16 ms to tear the VM down; split, both take well under a millisecond.
//!
//! Each pin's redirection entry is kept in KVM's routing table as the MSI
//! route of GSI `pin`, so a device's irqfd on its pin is delivered by KVM
//! without an exit. A masked pin has no route: its edges are dropped, as a
//! masked edge-triggered pin's are. The sources on these pins (COM1, the
//! GED) are edge sources: a pin the guest programs level-triggered delivers
//! each edge and never sets remote IRR, so its EOI (`KVM_EXIT_IOAPIC_EOI`)
//! needs no action.

use std::sync::Arc;

use crate::devices::BusDevice;
use crate::interrupts::{InterruptRoutes, IOAPIC_PINS};

/// The MMIO page the MADT announces.
pub const IOAPIC_SIZE: u64 = 0x1000;

const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;

const REG_ID: u32 = 0x00;
const REG_VERSION: u32 = 0x01;
const REG_ARBITRATION: u32 = 0x02;
const REG_REDIRECTION: u32 = 0x10;

/// Version 0x11 and the highest pin (23), as KVM's in-kernel IOAPIC reports.
const VERSION: u32 = 0x11 | ((IOAPIC_PINS - 1) << 16);

const ENTRY_MASKED: u64 = 1 << 16;
/// Read-only: delivery status (12) and remote IRR (14).
const ENTRY_READ_ONLY: u64 = (1 << 12) | (1 << 14);

const MSI_ADDRESS_BASE: u64 = 0xfee0_0000;

pub struct Ioapic {
    id: u8,
    select: u32,
    entries: [u64; IOAPIC_PINS as usize],
    routes: Arc<InterruptRoutes>,
}

impl Ioapic {
    /// Every pin masked, as after reset.
    pub fn new(routes: Arc<InterruptRoutes>) -> Self {
        Ioapic {
            id: 0,
            select: 0,
            entries: [ENTRY_MASKED; IOAPIC_PINS as usize],
            routes,
        }
    }

    /// The registers a snapshot keeps: id, selector, every redirection entry.
    pub fn save_state(&self) -> Vec<u8> {
        let mut w = crate::snapshot::codec::Writer::default();
        w.u32(u32::from(self.id));
        w.u32(self.select);
        for entry in self.entries {
            w.u64(entry);
        }
        w.bytes
    }

    /// Loads what `save_state` wrote and routes every pin as its entry
    /// says. Values are masked to what the guest could have written.
    pub fn restore_state(&mut self, bytes: &[u8]) -> Result<(), crate::snapshot::SnapshotError> {
        let mut r = crate::snapshot::codec::Reader::new("the IOAPIC state", bytes);
        let id = (r.u32()? & 0xf) as u8;
        let select = r.u32()? & 0xff;
        let mut entries = [0u64; IOAPIC_PINS as usize];
        for entry in &mut entries {
            *entry = r.u64()? & !ENTRY_READ_ONLY;
        }
        r.finish()?;
        self.id = id;
        self.select = select;
        self.entries = entries;
        for pin in 0..self.entries.len() {
            self.update_route(pin);
        }
        Ok(())
    }

    fn read_register(&self) -> u32 {
        match self.select {
            REG_ID | REG_ARBITRATION => u32::from(self.id) << 24,
            REG_VERSION => VERSION,
            index => match self.entry_index(index) {
                Some((pin, high)) => (self.entries[pin] >> if high { 32 } else { 0 }) as u32,
                // As KVM's: any other register reads all ones.
                None => u32::MAX,
            },
        }
    }

    fn write_register(&mut self, value: u32) {
        match self.select {
            REG_ID => self.id = ((value >> 24) & 0xf) as u8,
            REG_VERSION | REG_ARBITRATION => {}
            index => {
                let Some((pin, high)) = self.entry_index(index) else {
                    return;
                };
                let old = self.entries[pin];
                let new = if high {
                    (old & 0xffff_ffff) | (u64::from(value) << 32)
                } else {
                    (old & !0xffff_ffff) | u64::from(value)
                };
                self.entries[pin] = (new & !ENTRY_READ_ONLY) | (old & ENTRY_READ_ONLY);
                if self.entries[pin] != old {
                    self.update_route(pin);
                }
            }
        }
    }

    /// The pin and half (high dword?) of a redirection register.
    fn entry_index(&self, index: u32) -> Option<(usize, bool)> {
        let offset = index.checked_sub(REG_REDIRECTION)?;
        let pin = (offset / 2) as usize;
        (pin < self.entries.len()).then_some((pin, offset % 2 == 1))
    }

    fn update_route(&self, pin: usize) {
        let message = msi_message(self.entries[pin]);
        if let Err(error) = self.routes.set_msi(pin as u32, message) {
            log::error!("IOAPIC pin {pin}: {}", crate::error::chain_message(&error));
        }
    }
}

/// The MSI message (address, data) a redirection entry sends, or None when
/// masked: destination (and the extended destination bits Linux uses for
/// APIC ids above 255 where KVM offers them), destination mode, vector,
/// delivery mode and trigger mode, in the places an MSI carries them.
pub fn msi_message(entry: u64) -> Option<(u64, u32)> {
    if entry & ENTRY_MASKED != 0 {
        return None;
    }
    let vector = entry & 0xff;
    let delivery_mode = (entry >> 8) & 0x7;
    let logical = (entry >> 11) & 1;
    let level = (entry >> 15) & 1;
    let extended_destination = (entry >> 49) & 0x7f;
    let destination = (entry >> 56) & 0xff;
    let address =
        MSI_ADDRESS_BASE | (destination << 12) | (extended_destination << 5) | (logical << 2);
    let data = vector | (delivery_mode << 8) | (level << 15);
    Some((address, data as u32))
}

impl BusDevice for Ioapic {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The registers are 32-bit; other accesses read zeros.
        let value = match (offset, data.len()) {
            (IOREGSEL, 4) => self.select,
            (IOWIN, 4) => self.read_register(),
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
        data[n..].fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let value = u32::from_le_bytes(bytes);
        match offset {
            IOREGSEL => self.select = value & 0xff,
            IOWIN => self.write_register(value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_become_the_msi_messages_the_pins_send() {
        // Masked: no route.
        assert_eq!(msi_message(ENTRY_MASKED | 0x31), None);
        // Fixed, physical, edge, vector 0x31, to APIC id 3.
        assert_eq!(msi_message(0x31 | (3 << 56)), Some((0xfee0_3000, 0x31)));
        // Lowest priority, logical, level, vector 0x41, to logical id 0x0f.
        let entry = 0x41 | (1 << 8) | (1 << 11) | (1 << 15) | (0x0f << 56);
        assert_eq!(msi_message(entry), Some((0xfee0_f004, 0x8141)));
        // NMI; extended destination bits 49..55 land in address bits 5..11.
        let entry = (4 << 8) | (0x7f << 49) | (0xff << 56);
        assert_eq!(msi_message(entry), Some((0xfeef_ffe0, 0x400)));
        // Polarity, delivery status and remote IRR are not part of the message.
        assert_eq!(
            msi_message(0x31 | (1 << 12) | (1 << 13) | (1 << 14)),
            Some((0xfee0_0000, 0x31))
        );
    }

    mod needs_kvm {
        use kvm_ioctls::Kvm;

        use super::*;
        use crate::interrupts::enable_split_irqchip;

        fn ioapic() -> Ioapic {
            let vm = Kvm::new().unwrap().create_vm().unwrap();
            enable_split_irqchip(&vm).unwrap();
            Ioapic::new(Arc::new(InterruptRoutes::new(Arc::new(vm), 1024)))
        }

        fn select(ioapic: &mut Ioapic, register: u32) {
            ioapic.write(IOREGSEL, &register.to_le_bytes());
        }

        fn read(ioapic: &mut Ioapic, register: u32) -> u32 {
            select(ioapic, register);
            let mut data = [0u8; 4];
            ioapic.read(IOWIN, &mut data);
            u32::from_le_bytes(data)
        }

        fn write(ioapic: &mut Ioapic, register: u32, value: u32) {
            select(ioapic, register);
            ioapic.write(IOWIN, &value.to_le_bytes());
        }

        #[test]
        #[ignore = "needs /dev/kvm"]
        fn registers_read_back_as_kvms_ioapic_and_pins_become_routes() {
            let mut io = ioapic();
            assert_eq!(read(&mut io, REG_VERSION), 0x0017_0011);
            assert_eq!(read(&mut io, REG_ID), 0);
            write(&mut io, REG_ID, 0xffff_ffff);
            assert_eq!(read(&mut io, REG_ID), 0x0f00_0000, "4 ID bits");
            assert_eq!(read(&mut io, REG_ARBITRATION), 0x0f00_0000);
            write(&mut io, REG_VERSION, 0);
            assert_eq!(read(&mut io, REG_VERSION), 0x0017_0011, "read-only");
            // After reset every pin is masked.
            for pin in 0..IOAPIC_PINS {
                assert_eq!(read(&mut io, 0x10 + 2 * pin), 1 << 16);
                assert_eq!(read(&mut io, 0x11 + 2 * pin), 0);
            }
            // Registers past pin 23 and the reserved ones read all ones.
            assert_eq!(read(&mut io, 0x10 + 2 * 24), u32::MAX);
            assert_eq!(read(&mut io, 0x03), u32::MAX);
            write(&mut io, 0x40, 0x1234);

            // Linux's order: destination first, then the low word unmasked.
            write(&mut io, 0x11 + 2 * 4, 1 << 24);
            write(&mut io, 0x10 + 2 * 4, 0x31 | (1 << 12) | (1 << 14));
            assert_eq!(read(&mut io, 0x10 + 2 * 4), 0x31, "status bits read-only");
            assert_eq!(read(&mut io, 0x11 + 2 * 4), 1 << 24);
            assert_eq!(io.routes.msi_route(4), Some((0xfee0_1000, 0x31)));
            write(&mut io, 0x10 + 2 * 4, 0x31 | (1 << 16));
            assert_eq!(io.routes.msi_route(4), None, "masked: no route");
        }

        #[test]
        #[ignore = "needs /dev/kvm"]
        fn a_restored_ioapic_reads_and_routes_as_the_saved_one() {
            let mut io = ioapic();
            write(&mut io, REG_ID, 5 << 24);
            write(&mut io, 0x11 + 2 * 4, 1 << 24);
            write(&mut io, 0x10 + 2 * 4, 0x31);
            let saved = io.save_state();
            let mut back = ioapic();
            back.restore_state(&saved).unwrap();
            assert_eq!(read(&mut back, REG_ID), 5 << 24);
            assert_eq!(read(&mut back, 0x10 + 2 * 4), 0x31);
            assert_eq!(read(&mut back, 0x10 + 2 * 5), 1 << 16);
            assert_eq!(back.routes.msi_route(4), Some((0xfee0_1000, 0x31)));
            assert_eq!(back.routes.msi_route(5), None);
            // A short or long state is refused and changes nothing.
            let mut other = ioapic();
            assert!(other.restore_state(&saved[..saved.len() - 1]).is_err());
            assert!(other
                .restore_state(&[saved.clone(), vec![0]].concat())
                .is_err());
            assert_eq!(read(&mut other, 0x10 + 2 * 4), 1 << 16);
        }

        #[test]
        #[ignore = "needs /dev/kvm"]
        fn odd_accesses_are_ignored_and_read_zero() {
            let mut io = ioapic();
            select(&mut io, 0x10 + 2 * 4);
            // Byte, word and quad accesses, and offsets between the registers.
            io.write(IOWIN, &[0x31]);
            io.write(IOWIN, &[0x31, 0, 0, 0, 0, 0, 0, 0]);
            io.write(0x04, &0x31u32.to_le_bytes());
            io.write(IOAPIC_SIZE - 4, &0x31u32.to_le_bytes());
            assert_eq!(read(&mut io, 0x10 + 2 * 4), 1 << 16);
            let mut wide = [0xaau8; 8];
            io.read(IOWIN, &mut wide);
            assert_eq!(wide, [0; 8]);
            let mut byte = [0xaau8; 1];
            io.read(IOREGSEL, &mut byte);
            assert_eq!(byte, [0]);
            // The selector keeps its low 8 bits.
            select(&mut io, 0xffff_ff01);
            let mut data = [0u8; 4];
            io.read(IOREGSEL, &mut data);
            assert_eq!(u32::from_le_bytes(data), 1);
            assert_eq!(io.routes.msi_route(4), None);
        }
    }
}
