//! A PCI function's configuration space: 4 KiB (PCIe extended), a write mask
//! per register, BARs that size themselves the standard way, and a
//! capability list.

/// Registers (dwords) in the 4 KiB extended configuration space.
pub const CONFIG_REGISTERS: usize = 1024;
const COMMAND_REG: usize = 1;
const BAR0_REG: usize = 4;
const CAPABILITY_POINTER: usize = 0x34;
const INTERRUPT_LINE_REG: usize = 15;
const FIRST_CAPABILITY: usize = 0x40;
/// Capabilities live in the standard 256-byte space.
const CAPABILITY_END: usize = 0x100;

/// Command register bits.
pub const COMMAND_IO_SPACE: u16 = 1 << 0;
pub const COMMAND_MEMORY_SPACE: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
const COMMAND_WRITABLE: u32 = 0x0007 | 0x0040 | 0x0100 | 0x0400;
const STATUS_CAPABILITIES_LIST: u32 = 1 << 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    Memory32,
    Memory64,
    Io,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bar {
    pub size: u64,
    pub kind: BarKind,
    pub prefetchable: bool,
}

pub struct PciConfiguration {
    registers: [u32; CONFIG_REGISTERS],
    writable: [u32; CONFIG_REGISTERS],
    bars: [Option<Bar>; 6],
    last_capability: Option<usize>,
    next_capability: usize,
}

/// The identity of a function: what lspci shows.
#[derive(Debug, Clone, Copy)]
pub struct PciIdentity {
    pub vendor: u16,
    pub device: u16,
    /// Class, subclass, programming interface.
    pub class: (u8, u8, u8),
    pub revision: u8,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

impl PciConfiguration {
    /// A type-0 (endpoint) header.
    pub fn new(id: PciIdentity) -> Self {
        let mut config = PciConfiguration {
            registers: [0; CONFIG_REGISTERS],
            writable: [0; CONFIG_REGISTERS],
            bars: [None; 6],
            last_capability: None,
            next_capability: FIRST_CAPABILITY,
        };
        config.registers[0] = u32::from(id.device) << 16 | u32::from(id.vendor);
        config.registers[2] = u32::from(id.class.0) << 24
            | u32::from(id.class.1) << 16
            | u32::from(id.class.2) << 8
            | u32::from(id.revision);
        config.registers[11] = u32::from(id.subsystem) << 16 | u32::from(id.subsystem_vendor);
        config.writable[COMMAND_REG] = COMMAND_WRITABLE;
        // Interrupt line is scratch space for the OS; pin 0: no INTx.
        config.writable[INTERRUPT_LINE_REG] = 0xff;
        config
    }

    /// Declares BAR `index` (a 64-bit BAR also takes `index + 1`) at `address`.
    /// Sizes are powers of two (at least 16 bytes for memory, 4 for I/O).
    pub fn add_bar(&mut self, index: usize, address: u64, bar: Bar) {
        assert!(bar.size.is_power_of_two() && index < 6, "VMM bug: bad BAR");
        assert!(
            bar.kind != BarKind::Memory64 || index < 5,
            "VMM bug: bad BAR"
        );
        let mask = !(bar.size - 1);
        let (flags, low_mask) = match bar.kind {
            BarKind::Io => (1, mask as u32 & !0x3),
            BarKind::Memory32 => (u32::from(bar.prefetchable) << 3, mask as u32 & !0xf),
            BarKind::Memory64 => (0b100 | u32::from(bar.prefetchable) << 3, mask as u32 & !0xf),
        };
        self.registers[BAR0_REG + index] = (address as u32 & low_mask) | flags;
        self.writable[BAR0_REG + index] = low_mask;
        if bar.kind == BarKind::Memory64 {
            self.registers[BAR0_REG + index + 1] = (address >> 32) as u32;
            self.writable[BAR0_REG + index + 1] = (mask >> 32) as u32;
        }
        self.bars[index] = Some(bar);
    }

    pub fn bar(&self, index: usize) -> Option<Bar> {
        self.bars.get(index).copied().flatten()
    }

    /// BAR `index`'s current guest address.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let bar = self.bar(index)?;
        let low = self.registers[BAR0_REG + index];
        Some(match bar.kind {
            BarKind::Io => u64::from(low & !0x3),
            BarKind::Memory32 => u64::from(low & !0xf),
            BarKind::Memory64 => {
                u64::from(self.registers[BAR0_REG + index + 1]) << 32 | u64::from(low & !0xf)
            }
        })
    }

    pub fn command(&self) -> u16 {
        self.registers[COMMAND_REG] as u16
    }

    /// The memory BAR holding `address`, if memory decoding is on:
    /// (BAR index, offset into it).
    pub fn memory_bar_at(&self, address: u64) -> Option<(usize, u64)> {
        if self.command() & COMMAND_MEMORY_SPACE == 0 {
            return None;
        }
        (0..6).find_map(|index| {
            let bar = self.bar(index).filter(|b| b.kind != BarKind::Io)?;
            let base = self.bar_address(index)?;
            let offset = address.checked_sub(base)?;
            (offset < bar.size).then_some((index, offset))
        })
    }

    /// Appends a capability (`data[0]` = its ID; `data[1]` is set here) and
    /// returns its offset. `writable` gives the write mask of its bytes.
    pub fn add_capability(&mut self, data: &[u8], writable: &[u8]) -> usize {
        let offset = self.next_capability;
        let len = data.len().next_multiple_of(4);
        assert!(
            data.len() >= 2 && offset + len <= CAPABILITY_END,
            "VMM bug: capability does not fit"
        );
        for (i, &byte) in data.iter().enumerate() {
            let value = if i == 1 { 0 } else { byte };
            self.set_byte(offset + i, value);
            let mask = writable.get(i).copied().unwrap_or(0);
            let reg = (offset + i) / 4;
            let shift = ((offset + i) % 4) * 8;
            self.writable[reg] = (self.writable[reg] & !(0xff << shift)) | u32::from(mask) << shift;
        }
        match self.last_capability {
            Some(last) => self.set_byte(last + 1, offset as u8),
            None => {
                self.set_byte(CAPABILITY_POINTER, offset as u8);
                self.registers[COMMAND_REG] |= STATUS_CAPABILITIES_LIST << 16;
            }
        }
        self.last_capability = Some(offset);
        self.next_capability = offset + len;
        offset
    }

    fn set_byte(&mut self, offset: usize, value: u8) {
        let shift = (offset % 4) * 8;
        let reg = &mut self.registers[offset / 4];
        *reg = (*reg & !(0xff << shift)) | u32::from(value) << shift;
    }

    /// Reads `data.len()` bytes at byte `offset` (bypassing masks).
    pub fn read_bytes(&self, offset: usize, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let at = offset + i;
            *byte = match self.registers.get(at / 4) {
                Some(reg) => (reg >> ((at % 4) * 8)) as u8,
                None => 0xff,
            };
        }
    }

    /// Sets bytes directly (device-side state such as a capability's data).
    pub fn write_bytes_unmasked(&mut self, offset: usize, data: &[u8]) {
        for (i, &byte) in data.iter().enumerate() {
            if offset + i < CONFIG_REGISTERS * 4 {
                self.set_byte(offset + i, byte);
            }
        }
    }

    /// The registers, for a snapshot.
    pub fn registers(&self) -> &[u32] {
        &self.registers
    }

    /// Loads registers a snapshot kept: only the bits a guest could have
    /// written take the saved values (the device's identity, capabilities
    /// and BAR sizes stay this configuration's). False, changing nothing,
    /// for a count that is not this configuration's.
    pub fn restore_registers(&mut self, saved: &[u32]) -> bool {
        if saved.len() != CONFIG_REGISTERS {
            return false;
        }
        for ((register, &mask), &value) in self.registers.iter_mut().zip(&self.writable).zip(saved)
        {
            *register = (*register & !mask) | (value & mask);
        }
        true
    }

    pub fn read_register(&self, reg: usize) -> u32 {
        self.registers.get(reg).copied().unwrap_or(0xffff_ffff)
    }

    /// A guest write of `data` (1, 2 or 4 bytes) at byte `offset` of register
    /// `reg`; read-only bits keep their value.
    pub fn write_register(&mut self, reg: usize, offset: usize, data: &[u8]) {
        let Some(&mask) = self.writable.get(reg) else {
            return;
        };
        if offset + data.len() > 4 {
            return;
        }
        let mut value = 0u32;
        let mut lanes = 0u32;
        for (i, &byte) in data.iter().enumerate() {
            let shift = (offset + i) * 8;
            value |= u32::from(byte) << shift;
            lanes |= 0xff << shift;
        }
        let mask = mask & lanes;
        self.registers[reg] = (self.registers[reg] & !mask) | (value & mask);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> PciConfiguration {
        PciConfiguration::new(PciIdentity {
            vendor: 0x1af4,
            device: 0x1042,
            class: (1, 0, 0),
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        })
    }

    #[test]
    fn identity_registers() {
        let c = config();
        assert_eq!(c.read_register(0), 0x1042_1af4);
        assert_eq!(c.read_register(2), 0x0100_0001);
        assert_eq!(c.read_register(11), 0x0040_1af4);
    }

    #[test]
    fn bars_size_themselves_and_move() {
        let mut c = config();
        let bar = Bar {
            size: 0x80000,
            kind: BarKind::Memory64,
            prefetchable: false,
        };
        c.add_bar(0, 0x1_0000_0000, bar);
        assert_eq!(c.bar_address(0), Some(0x1_0000_0000));
        // Sizing: all ones in, size mask out, flags kept.
        c.write_register(4, 0, &0xffff_ffffu32.to_le_bytes());
        c.write_register(5, 0, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(c.read_register(4), 0xfff8_0004);
        assert_eq!(c.read_register(5), 0xffff_ffff);
        c.write_register(4, 0, &0xc000_0000u32.to_le_bytes());
        c.write_register(5, 0, &2u32.to_le_bytes());
        assert_eq!(c.bar_address(0), Some(0x2_c000_0000));
        // Decoding off: no BAR claims the address.
        assert_eq!(c.memory_bar_at(0x2_c000_0010), None);
        c.write_register(1, 0, &[COMMAND_MEMORY_SPACE as u8]);
        assert_eq!(c.memory_bar_at(0x2_c000_0010), Some((0, 0x10)));
        assert_eq!(c.memory_bar_at(0x2_c008_0000), None);
        // Unused BARs read zero and ignore writes.
        c.write_register(6, 0, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(c.read_register(6), 0);
    }

    #[test]
    fn identity_is_read_only() {
        let mut c = config();
        c.write_register(0, 0, &0u32.to_le_bytes());
        c.write_register(2, 1, &[0xff]);
        assert_eq!(c.read_register(0), 0x1042_1af4);
        assert_eq!(c.read_register(2), 0x0100_0001);
    }

    #[test]
    fn capabilities_chain() {
        let mut c = config();
        let a = c.add_capability(&[0x11, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], &[0, 0, 0, 0xc0]);
        let b = c.add_capability(&[0x09, 0, 16, 1], &[]);
        assert_eq!((a, b), (0x40, 0x4c));
        let mut byte = [0u8];
        c.read_bytes(0x34, &mut byte);
        assert_eq!(byte[0], 0x40);
        c.read_bytes(0x41, &mut byte);
        assert_eq!(byte[0], 0x4c);
        c.read_bytes(0x4d, &mut byte);
        assert_eq!(byte[0], 0);
        assert_ne!(c.read_register(1) & (STATUS_CAPABILITIES_LIST << 16), 0);
        // Only the masked bits of the capability take writes.
        c.write_register(0x40 / 4, 2, &[0xff, 0xff]);
        c.read_bytes(0x42, &mut byte);
        assert_eq!(byte[0], 1);
        c.read_bytes(0x43, &mut byte);
        assert_eq!(byte[0], 0xc2);
    }
}
