//! virtio devices: the device-side contract between a transport (virtio-pci)
//! and a device model (block, rng, console, net, vsock), and the worker
//! threads that process a device's queues.
//!
//! A transport owns the guest-visible registers. When the driver sets
//! DRIVER_OK it hands the device an [`Activation`]: guest memory, the queues
//! the driver configured (each with the eventfd its notifications arrive on)
//! and an [`Interrupt`] to signal used buffers. The device then processes its
//! queues on its own worker thread(s) until [`VirtioDevice::reset`].

pub mod balloon;
pub mod block;
pub mod console;
pub mod mem;
pub mod net;
pub mod notify;
pub mod pci;
pub mod pmem;
pub mod rng;
#[cfg(test)]
pub mod testing;
pub mod vhost_user;
pub mod vsock;
pub mod watchdog;
pub mod worker;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use crate::memory::GuestMemoryMmap;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;

/// Device types (virtio 1.2 §5).
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_CONSOLE: u32 = 3;
pub const TYPE_RNG: u32 = 4;
pub const TYPE_BALLOON: u32 = 5;
pub const TYPE_VSOCK: u32 = 19;

/// Transport and ring feature bits (virtio 1.2 §6).
pub const F_RING_INDIRECT_DESC: u64 = 1 << 28;
pub const F_RING_EVENT_IDX: u64 = 1 << 29;
pub const F_VERSION_1: u64 = 1 << 32;
pub const F_ACCESS_PLATFORM: u64 = 1 << 33;

/// How a device tells the guest it has used buffers or changed its config.
/// Implementations never block: an interrupt that cannot be delivered is
/// dropped with an error, and the guest sees it as a lost interrupt.
pub trait Interrupt: Send + Sync {
    /// Signals a used-buffer notification for queue `queue`.
    fn signal_queue(&self, queue: u16) -> std::io::Result<()>;
    /// Signals a configuration change.
    fn signal_config(&self) -> std::io::Result<()>;
    /// The device cannot go on until the driver resets it (virtio 1.2
    /// §2.1.2): the transport sets DEVICE_NEEDS_RESET in device_status and,
    /// the driver having set DRIVER_OK, signals a configuration change.
    fn signal_needs_reset(&self) -> std::io::Result<()>;
    /// An eventfd whose writes raise queue `queue`'s interrupt in the
    /// kernel, for a backend process to signal directly (vhost-user), when
    /// the transport has one for the queue's current vector; masking still
    /// holds for it. None: signal through `signal_queue`.
    fn queue_irqfd(&self, _queue: u16) -> Option<EventFd> {
        None
    }
}

/// A queue stopped for good (until the driver resets the device): says
/// which and why in the log and asks the driver for a reset, so a guest is
/// never left waiting on a queue nobody serves. The transport counts these
/// requests per device.
pub fn queue_failed(device: &str, queue: u16, cause: &dyn fmt::Display, interrupt: &dyn Interrupt) {
    log::error!("{device}: queue {queue} stopped: {cause}; the device needs a reset");
    if let Err(e) = interrupt.signal_needs_reset() {
        log::error!("{device}: cannot tell the driver the device needs a reset: {e}");
    }
}

/// Pops the next available chain. An available index the driver set more
/// than a ring ahead is an error here, where `Queue::pop_descriptor_chain`
/// would report an empty ring for ever (and a loop re-checking with
/// `enable_notification` would spin).
pub fn pop_chain<'a>(
    queue: &mut Queue,
    memory: &'a GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'a GuestMemoryMmap>>, virtio_queue::Error> {
    Ok(queue.iter(memory)?.next())
}

/// Copies the device configuration bytes at `offset` into `data`; bytes
/// past the end of `config` read 0 (what every device's `read_config` does).
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = offset
            .checked_add(i as u64)
            .and_then(|at| config.get(usize::try_from(at).ok()?))
            .copied()
            .unwrap_or(0);
    }
}

/// Takes every available chain of `queue` and gives each back with the
/// length `handle` says it wrote, notifications off meanwhile (and checked
/// again after turning them on, so a chain added in between is not missed).
/// Returns whether any chain was used. For devices that finish each
/// request before taking the next.
pub fn drain_queue<F>(
    queue: &mut Queue,
    memory: &GuestMemoryMmap,
    mut handle: F,
) -> Result<bool, virtio_queue::Error>
where
    F: FnMut(DescriptorChain<&GuestMemoryMmap>) -> u32,
{
    let mut used_any = false;
    loop {
        queue.disable_notification(memory)?;
        while let Some(chain) = pop_chain(queue, memory)? {
            let head = chain.head_index();
            let written = handle(chain);
            queue.add_used(memory, head, written)?;
            used_any = true;
        }
        if !queue.enable_notification(memory)? {
            return Ok(used_any);
        }
    }
}

/// The signalling side of a worker that serves one queue (queue 0): the
/// interrupt after used buffers, and the stop (with a reset request to the
/// driver) after a queue error.
pub struct OneQueueSignals {
    pub device: String,
    pub interrupt: Arc<dyn Interrupt>,
    /// Stopped after a queue error, until the device is reset.
    pub broken: bool,
}

impl OneQueueSignals {
    pub fn new(device: String, interrupt: Arc<dyn Interrupt>) -> OneQueueSignals {
        OneQueueSignals {
            device,
            interrupt,
            broken: false,
        }
    }

    /// After processing: signals used buffers where the driver wants it, or
    /// stops the queue on an error.
    pub fn processed(
        &mut self,
        result: Result<bool, virtio_queue::Error>,
        queue: &mut Queue,
        memory: &GuestMemoryMmap,
    ) {
        match result {
            Ok(true) if queue.needs_notification(memory).unwrap_or(true) => {
                if let Err(e) = self.interrupt.signal_queue(0) {
                    log::warn!("{}: queue 0 interrupt lost: {e}", self.device);
                }
            }
            Ok(_) => {}
            Err(e) => self.fail(&e),
        }
    }

    pub fn fail(&mut self, cause: &dyn fmt::Display) {
        if !std::mem::replace(&mut self.broken, true) {
            queue_failed(&self.device, 0, cause, &*self.interrupt);
        }
    }
}

/// One queue the driver enabled, ready for processing.
pub struct ActiveQueue {
    /// The queue's index on the device (0 = first queue).
    pub index: u16,
    /// Ring addresses, size and the negotiated ring features are already set;
    /// `is_valid` held at activation.
    pub queue: Queue,
    /// Written (by KVM, through an ioeventfd) when the driver notifies the queue.
    pub kick: EventFd,
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct Activation {
    pub memory: GuestMemoryMmap,
    pub interrupt: Arc<dyn Interrupt>,
    /// Only the queues the driver enabled, in index order.
    pub queues: Vec<ActiveQueue>,
    /// The features the driver accepted (a subset of `features()`).
    pub acked_features: u64,
    /// Starts the device's worker threads (not the vCPU thread activating it).
    pub spawner: crate::seccomp::Spawner,
}

/// Why a device could not start: what failed, and the cause if there is one.
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub struct ActivateError {
    pub what: String,
    #[source]
    pub source: Option<std::io::Error>,
}

impl ActivateError {
    pub fn new(what: impl Into<String>) -> ActivateError {
        ActivateError {
            what: what.into(),
            source: None,
        }
    }

    /// `what` failed because of `source`.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> ActivateError {
        ActivateError {
            what: what.into(),
            source: Some(source),
        }
    }
}

/// A virtio device model. Everything here is reachable by the guest (through
/// the transport's registers), so no method may panic or block for long.
pub trait VirtioDevice: Send {
    /// The virtio device type (`TYPE_*`).
    fn device_type(&self) -> u32;
    /// The largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// The feature bits offered, including `F_VERSION_1` and ring features.
    fn features(&self) -> u64;
    /// Reads device configuration space at `offset`; bytes past its end read 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space; read-only fields ignore writes.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts processing the queues (worker threads).
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// The transport's notifiers, for a device that may move a queue's
    /// notifications onto the vCPU threads (virtio-pci only).
    fn attach_notifiers(&mut self, _notifiers: &Arc<notify::Notifiers>) {}
    /// What serves `queue` when the driver notifies it through an MMIO exit
    /// (its ioeventfd removed), on the writing vCPU thread; None: the
    /// transport kicks the queue's worker.
    fn queue_notify_target(&self, _queue: usize) -> Option<Arc<dyn crate::pci::NotifyTarget>> {
        None
    }
    /// Stops processing (driver reset or VM teardown) and returns once the
    /// workers are gone. The device can be activated again afterwards.
    fn reset(&mut self);
    /// Stops processing for a snapshot: as `reset`, once every request in
    /// flight is finished, so that each buffer taken from a ring has been
    /// given back (the queues' positions are then the used rings' indices).
    /// Devices that finish each request before taking the next can reset.
    fn stop_quiesced(&mut self) {
        self.reset();
    }
    /// After `stop_quiesced`: why the device's state could not be saved
    /// whole (a vhost-user backend that kept its own), if so.
    fn snapshot_refusal(&self) -> Option<String> {
        None
    }
    /// Cloud Hypervisor's counters for this device (empty: none).
    fn counters(&self) -> BTreeMap<&'static str, u64> {
        BTreeMap::new()
    }
    /// Host descriptors a VMM process that takes the VM over on this host
    /// carries on with, because it could not open them itself while this
    /// process holds them (a net device's tap queues). Empty: none.
    fn handover_fds(&self) -> Vec<std::os::fd::RawFd> {
        Vec::new()
    }
    /// Guest-physical memory the device maps beside RAM (virtio-pmem's
    /// region): (start, size), shown in the device tree. None: none.
    fn mmio_range(&self) -> Option<(u64, u64)> {
        None
    }
    /// The VM moved to another VMM process on this host, which carries on
    /// with `handover_fds`: what they stand for (a socket file) is now the
    /// other process's, and stays when this device goes.
    fn handed_over(&mut self) {}
    /// The device's own state beyond its transport's (what the driver set
    /// that it will not set again), for a snapshot of the stopped device.
    /// Empty: none.
    fn save_device_state(&self) -> Vec<u8> {
        Vec::new()
    }
    /// Loads what `save_device_state` wrote into the new, stopped device.
    /// A snapshot is user input: the bytes are checked, and an error says
    /// what is wrong with them.
    fn restore_device_state(&mut self, bytes: &[u8]) -> Result<(), String> {
        if bytes.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} bytes of device state, none expected",
                bytes.len()
            ))
        }
    }
}
