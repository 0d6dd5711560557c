//! MSI-X: the vector table and pending-bit array a driver programs through a
//! BAR, each vector backed by a KVM GSI with an MSI route and an irqfd, so a
//! device thread raises an interrupt with one eventfd write.

use std::io;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::error::{Error, ErrorKind, ModuleError};
use crate::interrupts::InterruptRoutes;

#[derive(Debug, thiserror::Error)]
pub enum MsixError {
    #[error("{device}: MSI-X eventfd")]
    EventFd {
        device: String,
        #[source]
        source: io::Error,
    },
    #[error("{device}: KVM_IRQFD (MSI-X)")]
    Irqfd {
        device: String,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("{device}: MSI-X vectors")]
    Allocate {
        device: String,
        #[source]
        source: Error,
    },
    /// The vector cannot interrupt the guest until a later update succeeds.
    #[error("{device}: cannot route MSI-X vector {vector}")]
    Route {
        device: String,
        vector: usize,
        #[source]
        source: Error,
    },
}

impl ModuleError for MsixError {
    fn kind(&self) -> ErrorKind {
        match self {
            MsixError::EventFd { .. } => ErrorKind::Device,
            MsixError::Irqfd { .. } => ErrorKind::Kvm,
            MsixError::Allocate { source, .. } | MsixError::Route { source, .. } => source.kind,
        }
    }
}

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
    /// The device's id, for errors.
    owner: String,
    entries: Vec<Entry>,
    pending: Vec<bool>,
    enabled: bool,
    function_masked: bool,
    gsi_base: u32,
    irqfds: Vec<EventFd>,
    /// Whether each irqfd is attached to its GSI in KVM: only while the
    /// vector can be delivered, so that a write by a backend process
    /// (vhost-user) to a masked vector's irqfd stays in the eventfd until
    /// the vector is unmasked (KVM delivers it then).
    attached: Vec<bool>,
    routes: Arc<InterruptRoutes>,
}

impl Msix {
    /// `count` vectors (1..=2048) of device `owner`, all masked, as after reset.
    pub fn new(owner: &str, count: u16, routes: Arc<InterruptRoutes>) -> Result<Msix, MsixError> {
        let device = || owner.to_owned();
        let gsi_base = routes
            .allocate(u32::from(count))
            .map_err(|source| MsixError::Allocate {
                device: device(),
                source,
            })?;
        // Attached once their vectors are unmasked (all are masked now).
        let mut irqfds = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let fd = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|source| {
                MsixError::EventFd {
                    device: device(),
                    source,
                }
            })?;
            irqfds.push(fd);
        }
        Ok(Msix {
            owner: device(),
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
            attached: vec![false; usize::from(count)],
            routes,
        })
    }

    /// The table, the pending bits and the control bits, for a snapshot.
    pub fn save_state(&self, w: &mut crate::snapshot::codec::Writer) {
        w.u32(u32::from(self.enabled) | u32::from(self.function_masked) << 1);
        w.u32(self.entries.len() as u32);
        for (entry, &pending) in self.entries.iter().zip(&self.pending) {
            w.u64(entry.address);
            w.u32(entry.data);
            w.u32(entry.control | u32::from(pending) << 1);
        }
    }

    /// Loads what `save_state` wrote and routes every vector as it says.
    pub fn restore_state(
        &mut self,
        r: &mut crate::snapshot::codec::Reader<'_>,
    ) -> Result<(), crate::snapshot::SnapshotError> {
        let control = r.u32()?;
        let count = r.count(self.entries.len(), "MSI-X vectors", "the device")?;
        let mut entries = Vec::with_capacity(count);
        let mut pending = Vec::with_capacity(count);
        for _ in 0..count {
            let address = r.u64()?;
            let data = r.u32()?;
            let bits = r.u32()?;
            entries.push(Entry {
                address,
                data,
                control: bits & VECTOR_MASKED,
            });
            pending.push(bits & 2 != 0);
        }
        self.enabled = control & 1 != 0;
        self.function_masked = control & 2 != 0;
        self.entries = entries;
        self.pending = pending;
        // A vector that could not be routed loses its interrupts, as at a
        // guest's write (logged there).
        let _ = self.update_all_routes();
        Ok(())
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

    /// The driver wrote the message control word. Every vector's route is
    /// updated; the first that could not be is returned.
    pub fn set_message_control(&mut self, control: u16) -> Result<(), MsixError> {
        self.enabled = control & CONTROL_ENABLE != 0;
        self.function_masked = control & CONTROL_FUNCTION_MASK != 0;
        let result = self.update_all_routes();
        self.deliver_pending();
        result
    }

    fn update_all_routes(&mut self) -> Result<(), MsixError> {
        let mut result = Ok(());
        for vector in 0..self.entries.len() {
            if let Err(e) = self.update_route(vector) {
                result = result.and(Err(e));
            }
        }
        result
    }

    fn live(&self) -> bool {
        self.enabled && !self.function_masked
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Routes `vector`'s GSI to its message, or unroutes it while it is masked
    /// or MSI-X is off. A failure is logged here (the vector loses its
    /// interrupts) and returned for the device to act on.
    fn update_route(&mut self, vector: usize) -> Result<(), MsixError> {
        let Some(entry) = self.entries.get(vector) else {
            return Ok(());
        };
        let message = (self.enabled && !entry.masked()).then_some((entry.address, entry.data));
        let deliverable = self.live() && !entry.masked();
        if !deliverable {
            // Detached before the route goes: nothing is injected meanwhile.
            self.attach_irqfd(vector, false);
        }
        let routed = self
            .routes
            .set_msi(self.gsi_base + vector as u32, message)
            .map_err(|source| {
                let error = MsixError::Route {
                    device: self.owner.clone(),
                    vector,
                    source,
                };
                log::error!("{}", crate::error::chain_message(&error));
                error
            });
        if deliverable {
            // After the route: KVM delivers what was written while detached.
            self.attach_irqfd(vector, true);
        }
        routed
    }

    /// Attaches (or detaches) `vector`'s irqfd to its GSI in KVM. A failure
    /// is logged: the vector's interrupts are then lost (attach) or may
    /// arrive while masked (detach).
    fn attach_irqfd(&mut self, vector: usize, attach: bool) {
        let (Some(fd), Some(attached)) = (self.irqfds.get(vector), self.attached.get_mut(vector))
        else {
            return;
        };
        if *attached == attach {
            return;
        }
        let gsi = self.gsi_base + vector as u32;
        let vm = self.routes.vm_fd();
        let result = if attach {
            vm.register_irqfd(fd, gsi)
        } else {
            vm.unregister_irqfd(fd, gsi)
        };
        match result {
            Ok(()) => *attached = attach,
            Err(e) => {
                let what = if attach { "assign" } else { "deassign" };
                log::error!(
                    "{}: MSI-X vector {vector}: KVM_IRQFD ({what}): {e}",
                    self.owner
                );
            }
        }
    }

    /// The eventfd that raises `vector` in the kernel: a backend process
    /// may write it directly (vhost-user's call fd). Masking holds for it:
    /// a masked vector's writes wait in the eventfd until it is unmasked.
    pub fn irqfd(&self, vector: u16) -> Option<&EventFd> {
        self.irqfds.get(usize::from(vector))
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

    /// Writes the table at `offset`; the vector's route follows (its failure
    /// is returned).
    pub fn table_write(&mut self, offset: u64, data: &[u8]) -> Result<(), MsixError> {
        let vector = (offset / ENTRY_SIZE) as usize;
        let Some(entry) = self.entries.get_mut(vector) else {
            return Ok(());
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
            _ => return Ok(()),
        }
        let result = self.update_route(vector);
        self.deliver_pending();
        result
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
    pub fn reset(&mut self) -> Result<(), MsixError> {
        self.enabled = false;
        self.function_masked = false;
        for entry in &mut self.entries {
            *entry = Entry {
                control: VECTOR_MASKED,
                ..Default::default()
            };
        }
        self.pending.fill(false);
        self.update_all_routes()
    }
}

impl Drop for Msix {
    fn drop(&mut self) {
        if self.routes.vm_closing() {
            return; // KVM drops the irqfds and routes with the VM
        }
        for (i, fd) in self.irqfds.iter().enumerate() {
            let gsi = self.gsi_base + i as u32;
            // Nothing can act on these any more (the VM is going away with
            // the device); they only say why a route or irqfd stayed.
            if self.attached[i] {
                if let Err(e) = self.routes.vm_fd().unregister_irqfd(fd, gsi) {
                    log::warn!(
                        "{}: MSI-X vector {i}: KVM_IRQFD (deassign): {e}",
                        self.owner
                    );
                }
            }
            if let Err(e) = self.routes.set_msi(gsi, None) {
                log::warn!("{}: MSI-X vector {i}: {e}", self.owner);
            }
        }
        // For the next hot-plugged device.
        self.routes.release(self.gsi_base, self.irqfds.len() as u32);
    }
}

#[cfg(test)]
mod tests {
    mod needs_kvm {
        use std::sync::{Arc, Mutex, OnceLock};

        use kvm_ioctls::Kvm;

        use super::super::*;

        /// Every log record of this test binary, as "LEVEL message".
        fn captured() -> &'static Mutex<Vec<String>> {
            struct Capture(Mutex<Vec<String>>);
            impl log::Log for Capture {
                fn enabled(&self, _: &log::Metadata<'_>) -> bool {
                    true
                }
                fn log(&self, record: &log::Record<'_>) {
                    let line = format!("{} {}", record.level(), record.args());
                    self.0.lock().unwrap().push(line);
                }
                fn flush(&self) {}
            }
            static LOGGER: OnceLock<&'static Capture> = OnceLock::new();
            let logger = LOGGER.get_or_init(|| {
                let logger: &'static Capture = Box::leak(Box::new(Capture(Mutex::new(Vec::new()))));
                if log::set_logger(logger).is_ok() {
                    log::set_max_level(log::LevelFilter::Trace);
                }
                logger
            });
            &logger.0
        }

        #[test]
        #[ignore = "needs /dev/kvm"]
        fn a_route_kvm_refuses_is_logged_and_returned_with_device_and_vector() {
            let log = captured();
            let vm = Kvm::new().unwrap().create_vm().unwrap();
            crate::interrupts::enable_split_irqchip(&vm).unwrap();
            let routes = Arc::new(InterruptRoutes::new(Arc::new(vm), 1 << 20));
            // KVM routes GSIs below KVM_MAX_IRQ_ROUTES (4096) only.
            routes.allocate(5000).unwrap();
            let mut msix = Msix::new("_disk0", 2, routes).unwrap();
            // Vector 1: address, data, unmasked; MSI-X still off, so no route yet.
            msix.table_write(ENTRY_SIZE, &0xfee0_0000u32.to_le_bytes())
                .unwrap();
            msix.table_write(ENTRY_SIZE + 8, &0x41u32.to_le_bytes())
                .unwrap();
            msix.table_write(ENTRY_SIZE + 12, &0u32.to_le_bytes())
                .unwrap();
            let error = msix.set_message_control(CONTROL_ENABLE).unwrap_err();
            let message = crate::error::chain_message(&error);
            assert!(
                message.starts_with("_disk0: cannot route MSI-X vector 1: KVM_SET_GSI_ROUTING: "),
                "{message}"
            );
            assert!(matches!(error, MsixError::Route { vector: 1, .. }));
            let logged = log.lock().unwrap();
            assert!(
                logged.iter().any(|l| l == &format!("ERROR {message}")),
                "{logged:?}"
            );
        }
    }
}
