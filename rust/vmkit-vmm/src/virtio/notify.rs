//! Where a virtio-pci queue's notifications go. By default to a KVM
//! ioeventfd, which wakes the queue's worker without an exit to user space.
//! A device may move one queue's notifications onto the vCPU threads
//! instead: the ioeventfd is removed, the driver's write exits to the VMM,
//! and the vCPU thread that wrote serves the queue itself (see
//! `block::placement` for when that pays).

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_ioctls::{IoEventAddress, NoDatamatch};
use vmm_sys_util::eventfd::EventFd;

use super::pci::{NOTIFY_OFFSET, NOTIFY_OFF_MULTIPLIER};
use crate::interrupts::InterruptRoutes;

pub struct Notifiers {
    routes: Arc<InterruptRoutes>,
    /// One per queue, written by KVM when its ioeventfd is registered.
    kicks: Vec<EventFd>,
    state: Mutex<State>,
}

struct State {
    /// BAR 0's address while the ioeventfds follow it.
    base: Option<u64>,
    /// Queues whose ioeventfd is registered at `base`.
    registered: Vec<bool>,
    /// Queues the vCPU threads serve: no ioeventfd while this holds.
    on_vcpu: Vec<bool>,
}

/// A KVM_IOEVENTFD call that failed, at `address`.
#[derive(Debug)]
pub struct RegisterError {
    pub address: u64,
    pub source: kvm_ioctls::Error,
}

impl Notifiers {
    /// `routes` is the VM's (its KVM VM, and whether that is closing).
    pub fn new(routes: Arc<InterruptRoutes>, queue_count: usize) -> io::Result<Notifiers> {
        let kicks = (0..queue_count)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Notifiers {
            routes,
            kicks,
            state: Mutex::new(State {
                base: None,
                registered: vec![false; queue_count],
                on_vcpu: vec![false; queue_count],
            }),
        })
    }

    pub fn kicks(&self) -> &[EventFd] {
        &self.kicks
    }

    /// Where the ioeventfds follow BAR 0 now.
    pub fn base(&self) -> Option<u64> {
        self.state().base
    }

    /// Moves the ioeventfds to `base` (those of queues served on the vCPU
    /// threads stay off). On failure the queues not registered are
    /// notified through MMIO exits, which still reach them.
    pub fn place(&self, base: u64) -> Result<(), RegisterError> {
        let mut state = self.state();
        self.unregister_all(&mut state);
        state.base = Some(base);
        for queue in 0..self.kicks.len() {
            if !state.on_vcpu[queue] {
                self.register(&mut state, queue)?;
            }
        }
        Ok(())
    }

    /// Removes every ioeventfd (the device goes away).
    pub fn remove(&self) {
        let mut state = self.state();
        self.unregister_all(&mut state);
        state.base = None;
    }

    /// Sends `queue`'s notifications to the vCPU threads (`on_vcpu`) or back
    /// to its ioeventfd. False if the ioeventfd could not be registered
    /// again: the vCPU threads keep the queue.
    pub fn serve_on_vcpu(&self, queue: usize, on_vcpu: bool) -> bool {
        let mut state = self.state();
        let Some(current) = state.on_vcpu.get(queue).copied() else {
            return false;
        };
        if current == on_vcpu {
            return true;
        }
        if on_vcpu {
            self.unregister(&mut state, queue);
            state.on_vcpu[queue] = true;
            return true;
        }
        match self.register(&mut state, queue) {
            Ok(()) => {
                state.on_vcpu[queue] = false;
                true
            }
            Err(e) => {
                log::warn!(
                    "KVM_IOEVENTFD at {:#x}: {}; the queue stays on the vCPU threads",
                    e.address,
                    e.source
                );
                false
            }
        }
    }

    /// Whether `queue`'s notifications go to the vCPU threads.
    pub fn on_vcpu(&self, queue: usize) -> bool {
        self.state().on_vcpu.get(queue).copied().unwrap_or(false)
    }

    /// Every queue back on its ioeventfd (the device was reset).
    pub fn reset(&self) {
        for queue in 0..self.kicks.len() {
            self.serve_on_vcpu(queue, false);
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn address(base: u64, queue: usize) -> u64 {
        base + NOTIFY_OFFSET + queue as u64 * u64::from(NOTIFY_OFF_MULTIPLIER)
    }

    fn register(&self, state: &mut State, queue: usize) -> Result<(), RegisterError> {
        let Some(base) = state.base else {
            return Ok(());
        };
        if state.registered[queue] {
            return Ok(());
        }
        let address = Self::address(base, queue);
        self.routes
            .vm_fd()
            .register_ioevent(
                &self.kicks[queue],
                &IoEventAddress::Mmio(address),
                NoDatamatch,
            )
            .map_err(|source| RegisterError { address, source })?;
        state.registered[queue] = true;
        Ok(())
    }

    fn unregister(&self, state: &mut State, queue: usize) {
        let Some(base) = state.base else {
            return;
        };
        // A closing VM's ioeventfds go with it (each removal waits for
        // an SRCU grace period).
        if std::mem::take(&mut state.registered[queue]) && !self.routes.vm_closing() {
            let address = Self::address(base, queue);
            let _ = self.routes.vm_fd().unregister_ioevent(
                &self.kicks[queue],
                &IoEventAddress::Mmio(address),
                NoDatamatch,
            );
        }
    }

    fn unregister_all(&self, state: &mut State) {
        for queue in 0..self.kicks.len() {
            self.unregister(state, queue);
        }
    }
}

impl Drop for Notifiers {
    fn drop(&mut self) {
        self.remove();
    }
}

/// One queue's handle on its device's notifiers.
#[derive(Clone)]
pub struct QueueRoute {
    pub notifiers: Arc<Notifiers>,
    pub queue: usize,
}

impl QueueRoute {
    pub fn serve_on_vcpu(&self, on_vcpu: bool) -> bool {
        self.notifiers.serve_on_vcpu(self.queue, on_vcpu)
    }
}

/// Whether KVM holds an ioeventfd at MMIO `address` (with `datamatch`, or
/// matching any write): KVM refuses a second one there.
#[cfg(test)]
pub(crate) fn kvm_has_ioeventfd(
    vm_fd: &kvm_ioctls::VmFd,
    address: u64,
    datamatch: Option<u64>,
) -> bool {
    let probe = EventFd::new(libc::EFD_CLOEXEC).unwrap();
    let address = IoEventAddress::Mmio(address);
    let registered = match datamatch {
        Some(value) => vm_fd.register_ioevent(&probe, &address, value),
        None => vm_fd.register_ioevent(&probe, &address, NoDatamatch),
    };
    match registered {
        Ok(()) => {
            match datamatch {
                Some(value) => vm_fd.unregister_ioevent(&probe, &address, value),
                None => vm_fd.unregister_ioevent(&probe, &address, NoDatamatch),
            }
            .unwrap();
            false
        }
        Err(e) if e.errno() == libc::EEXIST => true,
        Err(e) => panic!("KVM_IOEVENTFD: {e}"),
    }
}
