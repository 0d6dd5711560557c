//! MSI-X: the vector table and pending-bit array a driver programs through a
//! BAR, each vector backed by a KVM GSI with an MSI route and an irqfd, so a
//! device thread raises an interrupt with one eventfd write.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::error::{Error, ErrorKind, Result};
use crate::interrupts::InterruptRoutes;

pub const CAPABILITY_ID: u8 = 0x11;
/// Bytes per table entry: address low/high, data, vector control.
pub const ENTRY_SIZE: u64 = 16;
const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_MASKED: u32 = 1;

#[derive(Clone, Copy, Default)]
struct Entry {
    address: u64,
    data: u32,
    control: u32,
}

impl Entry {
    fn masked(&self) -> bool {
        self.control & VECTOR_MASKED != 0
    }
}

pub struct Msix {
    entries: Vec<Entry>,
    pending: Vec<bool>,
    enabled: bool,
    function_masked: bool,
    gsi_base: u32,
    irqfds: Vec<EventFd>,
    routes: Arc<InterruptRoutes>,
}

impl Msix {
    /// `count` vectors (1..=2048), all masked, as after reset.
    pub fn new(count: u16, routes: Arc<InterruptRoutes>) -> Result<Msix> {
        let gsi_base = routes.allocate(u32::from(count))?;
        let mut irqfds = Vec::with_capacity(usize::from(count));
        for i in 0..u32::from(count) {
            let fd = EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|e| Error::new(ErrorKind::Device, format!("MSI-X eventfd: {e}")))?;
            routes
                .vm_fd()
                .register_irqfd(&fd, gsi_base + i)
                .map_err(|e| Error::kvm("KVM_IRQFD (MSI-X)", e))?;
            irqfds.push(fd);
        }
        Ok(Msix {
            entries: vec![
                Entry {
                    control: VECTOR_MASKED,
                    ..Default::default()
                };
                usize::from(count)
            ],
            pending: vec![false; usize::from(count)],
            enabled: false,
            function_masked: false,
            gsi_base,
            irqfds,
            routes,
        })
    }

    pub fn vector_count(&self) -> u16 {
        self.entries.len() as u16
    }

    /// The capability's message control word.
    pub fn message_control(&self) -> u16 {
        let mut control = self.vector_count() - 1;
        if self.enabled {
            control |= CONTROL_ENABLE;
        }
        if self.function_masked {
            control |= CONTROL_FUNCTION_MASK;
        }
        control
    }

    /// The driver wrote the message control word.
    pub fn set_message_control(&mut self, control: u16) {
        self.enabled = control & CONTROL_ENABLE != 0;
        self.function_masked = control & CONTROL_FUNCTION_MASK != 0;
        for vector in 0..self.entries.len() {
            self.update_route(vector);
        }
        self.deliver_pending();
    }

    fn live(&self) -> bool {
        self.enabled && !self.function_masked
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    fn update_route(&self, vector: usize) {
        let entry = self.entries[vector];
        let message = (self.enabled && !entry.masked()).then_some((entry.address, entry.data));
        // A failed route update leaves the vector undeliverable; the guest sees
        // a lost interrupt, which is all a bad route could give it anyway.
        let _ = self.routes.set_msi(self.gsi_base + vector as u32, message);
    }

    fn deliver_pending(&mut self) {
        if !self.live() {
            return;
        }
        for vector in 0..self.entries.len() {
            if self.pending[vector] && !self.entries[vector].masked() {
                self.pending[vector] = false;
                let _ = self.irqfds[vector].write(1);
            }
        }
    }

    /// Raises `vector`, or marks it pending while it is masked.
    pub fn trigger(&mut self, vector: u16) {
        let vector = usize::from(vector);
        let Some(entry) = self.entries.get(vector) else {
            return;
        };
        if self.live() && !entry.masked() {
            let _ = self.irqfds[vector].write(1);
        } else {
            self.pending[vector] = true;
        }
    }

    pub fn table_size(&self) -> u64 {
        self.entries.len() as u64 * ENTRY_SIZE
    }

    pub fn pba_size(&self) -> u64 {
        (self.entries.len() as u64).div_ceil(64) * 8
    }

    /// Reads the table at `offset` (4- or 8-byte accesses; others read ones).
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let Some(entry) = self.entries.get((offset / ENTRY_SIZE) as usize) else {
            return;
        };
        let words = [
            entry.address as u32,
            (entry.address >> 32) as u32,
            entry.data,
            entry.control,
        ];
        let field = ((offset % ENTRY_SIZE) / 4) as usize;
        match (data.len(), offset % 4) {
            (4, 0) => data.copy_from_slice(&words[field].to_le_bytes()),
            (8, 0) if field.is_multiple_of(2) => {
                let value = u64::from(words[field]) | u64::from(words[field + 1]) << 32;
                data.copy_from_slice(&value.to_le_bytes());
            }
            _ => {}
        }
    }

    pub fn table_write(&mut self, offset: u64, data: &[u8]) {
        let vector = (offset / ENTRY_SIZE) as usize;
        let Some(entry) = self.entries.get_mut(vector) else {
            return;
        };
        let field = ((offset % ENTRY_SIZE) / 4) as usize;
        let mut set = |field: usize, value: u32| match field {
            0 => entry.address = (entry.address & !0xffff_ffff) | u64::from(value),
            1 => entry.address = (entry.address & 0xffff_ffff) | u64::from(value) << 32,
            2 => entry.data = value,
            _ => entry.control = value & VECTOR_MASKED,
        };
        match (data.len(), offset % 4) {
            (4, 0) => set(
                field,
                u32::from_le_bytes([data[0], data[1], data[2], data[3]]),
            ),
            (8, 0) if field.is_multiple_of(2) => {
                let mut bytes = [0u8; 8];
                bytes.copy_from_slice(data);
                let value = u64::from_le_bytes(bytes);
                set(field, value as u32);
                set(field + 1, (value >> 32) as u32);
            }
            _ => return,
        }
        self.update_route(vector);
        self.deliver_pending();
    }

    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let first = (offset + i as u64) * 8;
            *byte = (0..8u64)
                .filter(|bit| {
                    usize::try_from(first + bit)
                        .ok()
                        .and_then(|v| self.pending.get(v))
                        .copied()
                        .unwrap_or(false)
                })
                .fold(0u8, |acc, bit| acc | 1 << bit);
        }
    }

    /// Back to the reset state: disabled, every vector masked, nothing pending.
    pub fn reset(&mut self) {
        self.enabled = false;
        self.function_masked = false;
        for entry in &mut self.entries {
            *entry = Entry {
                control: VECTOR_MASKED,
                ..Default::default()
            };
        }
        self.pending.fill(false);
        for vector in 0..self.entries.len() {
            self.update_route(vector);
        }
    }
}

impl Drop for Msix {
    fn drop(&mut self) {
        for (i, fd) in self.irqfds.iter().enumerate() {
            let _ = self
                .routes
                .vm_fd()
                .unregister_irqfd(fd, self.gsi_base + i as u32);
            let _ = self.routes.set_msi(self.gsi_base + i as u32, None);
        }
    }
}
