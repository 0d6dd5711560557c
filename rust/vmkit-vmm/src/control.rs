//! Shared run control between the VMM, its vCPU threads and its devices:
//! what the vCPUs should be doing (run, park, stop) and why the VM stops.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use std::time::{Duration, Instant};

use crate::snapshot::vcpu::VcpuState;
use crate::snapshot::SnapshotError;

/// Why a VM (or one boot of it) ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (i8042, ACPI reset register, KVM system event).
    Reset,
    /// The user asked for a shutdown.
    Shutdown,
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault { vcpu: u8 },
    /// KVM could not run the guest's instruction (KVM_EXIT_INTERNAL_ERROR) or
    /// the entry failed; `message` has RIP and the instruction bytes.
    InternalError { vcpu: u8, message: String },
    /// No vCPU made progress for the watchdog's time.
    Hang { message: String },
    /// The VMM itself failed while running the VM.
    VmmError { message: String },
    /// The VM moved to another VMM process (a live migration), which runs it.
    Migrated,
}

impl StopReason {
    /// A short machine-readable name.
    pub fn kind(&self) -> &'static str {
        match self {
            StopReason::PowerOff => "poweroff",
            StopReason::Reset => "reset",
            StopReason::Shutdown => "shutdown",
            StopReason::TripleFault { .. } => "triple-fault",
            StopReason::InternalError { .. } => "internal-error",
            StopReason::Hang { .. } => "hang",
            StopReason::VmmError { .. } => "vmm-error",
            StopReason::Migrated => "migrated",
        }
    }

    pub fn message(&self) -> String {
        match self {
            StopReason::PowerOff => "The guest powered off".to_owned(),
            StopReason::Reset => "The guest reset the VM".to_owned(),
            StopReason::Shutdown => "The VM was shut down".to_owned(),
            StopReason::Migrated => "The VM moved to another VMM process".to_owned(),
            StopReason::TripleFault { vcpu } => {
                format!("vCPU {vcpu} triple-faulted (KVM_EXIT_SHUTDOWN)")
            }
            StopReason::InternalError { message, .. }
            | StopReason::Hang { message }
            | StopReason::VmmError { message } => message.clone(),
        }
    }
}

/// What vCPU threads are asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuCommand {
    Run,
    Park,
    Stop,
}

struct State {
    command: VcpuCommand,
    parked: usize,
    /// The vCPU threads started and not yet out of their run loop.
    running: Vec<u8>,
    /// vCPUs the guest ejected (CPU hot-unplug): their threads leave.
    removed: Vec<u8>,
    stop: Option<StopReason>,
    /// The guest ejected a PCI device: the VMM thread tears it down.
    device_ejected: bool,
    /// A snapshot's request to the parked vCPU threads for their state.
    capture: Option<Capture>,
}

/// What a snapshot asks each parked vCPU thread for, and what came back.
struct Capture {
    /// The MSRs KVM lists (each thread keeps those it can read).
    msr_list: Arc<Vec<u32>>,
    xsave: bool,
    results: BTreeMap<u8, Result<VcpuState, SnapshotError>>,
}

/// How a parked vCPU thread takes its own state: (MSR list, XSAVE?).
pub type CaptureFn<'a> = dyn FnMut(&[u32], bool) -> Result<VcpuState, SnapshotError> + 'a;

/// The meeting point of the VMM thread, vCPU threads and devices of one boot.
pub struct Control {
    state: Mutex<State>,
    changed: Condvar,
    pub created: Instant,
}

impl Default for Control {
    fn default() -> Self {
        Self::new()
    }
}

impl Control {
    pub fn new() -> Self {
        Control {
            state: Mutex::new(State {
                command: VcpuCommand::Run,
                parked: 0,
                running: Vec::new(),
                removed: Vec::new(),
                stop: None,
                device_ejected: false,
                capture: None,
            }),
            changed: Condvar::new(),
            created: Instant::now(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records why the VM stops (the first reason wins) and stops the vCPUs.
    pub fn request_stop(&self, reason: StopReason) {
        let mut state = self.lock();
        if state.stop.is_none() {
            state.stop = Some(reason);
        }
        state.command = VcpuCommand::Stop;
        self.notify_unlocked(state);
    }

    /// Wakes the waiters once `state` is unlocked. Woken first, they would
    /// block on the lock at once, and a waiter that preempts the thread
    /// still holding it waits for that thread's next turn on the CPU (seen
    /// in a trace of a guest power-off: the VMM thread 4 ms late).
    fn notify_unlocked(&self, state: MutexGuard<'_, State>) {
        drop(state);
        self.changed.notify_all();
    }

    pub fn stop_reason(&self) -> Option<StopReason> {
        self.lock().stop.clone()
    }

    /// The vCPUs are asked to stay parked (the VM is paused).
    pub fn parked_by_request(&self) -> bool {
        self.lock().command == VcpuCommand::Park
    }

    pub fn set_command(&self, command: VcpuCommand) {
        let mut state = self.lock();
        if state.command != VcpuCommand::Stop {
            state.command = command;
        }
        self.notify_unlocked(state);
    }

    /// vCPU `index`'s thread starts.
    pub fn thread_started(&self, index: u8) {
        self.lock().running.push(index);
    }

    /// vCPU `index`'s thread has left its run loop (or never started).
    pub fn thread_exited(&self, index: u8) {
        let mut state = self.lock();
        if let Some(position) = state.running.iter().position(|&i| i == index) {
            state.running.swap_remove(position);
        }
        self.notify_unlocked(state);
    }

    /// Whether vCPU `index`'s thread is still in its run loop: one that has
    /// left needs no kick (and a kick would contend with its exit).
    pub fn vcpu_running(&self, index: u8) -> bool {
        self.lock().running.contains(&index)
    }

    /// The guest ejected vCPU `index`: its thread leaves its run loop (a
    /// kick ends a KVM_RUN in progress).
    pub fn remove_vcpu(&self, index: u8) {
        let mut state = self.lock();
        if !state.removed.contains(&index) {
            state.removed.push(index);
        }
        self.notify_unlocked(state);
    }

    /// Whether vCPU `index` was ejected (and not added again since).
    pub fn vcpu_removed(&self, index: u8) -> bool {
        self.lock().removed.contains(&index)
    }

    /// vCPU `index` is added again: its new thread may run.
    pub fn vcpu_added(&self, index: u8) {
        self.lock().removed.retain(|&i| i != index);
    }

    /// Called by vCPU thread `index` between runs: parks while asked to
    /// (taking its state with `capture` when a snapshot asks), and says
    /// whether to keep running.
    pub fn vcpu_gate(&self, index: u8, capture: &mut CaptureFn<'_>) -> bool {
        let mut state = self.lock();
        loop {
            if state.removed.contains(&index) {
                return false;
            }
            match state.command {
                VcpuCommand::Run => return true,
                VcpuCommand::Stop => return false,
                VcpuCommand::Park => state = self.park(state, index, capture),
            }
        }
    }

    /// `vcpu_gate` while parked. Out of line: a captured state is tens of
    /// KiB, which would otherwise be in the frame of every gate call,
    /// touched at each pass of the run loop.
    #[cold]
    #[inline(never)]
    fn park<'a>(
        &'a self,
        mut state: MutexGuard<'a, State>,
        index: u8,
        capture: &mut CaptureFn<'_>,
    ) -> MutexGuard<'a, State> {
        state.parked += 1;
        self.notify_unlocked(state);
        state = self.lock();
        while state.command == VcpuCommand::Park && !state.removed.contains(&index) {
            let request = state
                .capture
                .as_ref()
                .filter(|c| !c.results.contains_key(&index))
                .map(|c| (c.msr_list.clone(), c.xsave));
            if let Some((msr_list, xsave)) = request {
                drop(state);
                let result = capture(&msr_list, xsave);
                state = self.lock();
                if let Some(c) = state.capture.as_mut() {
                    c.results.insert(index, result);
                }
                self.notify_unlocked(state);
                state = self.lock();
                continue;
            }
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        state.parked -= 1;
        state
    }

    /// Each parked vCPU's state, taken by its own thread (the VM is
    /// paused: every vCPU thread waits at its gate). `msr_list`: the MSRs
    /// KVM lists.
    pub fn capture_vcpus(
        &self,
        msr_list: Vec<u32>,
        xsave: bool,
        timeout: Duration,
    ) -> Result<Vec<VcpuState>, SnapshotError> {
        let mut state = self.lock();
        if state.command != VcpuCommand::Park {
            return Err(SnapshotError::NotParked);
        }
        state.capture = Some(Capture {
            msr_list: Arc::new(msr_list),
            xsave,
            results: BTreeMap::new(),
        });
        self.notify_unlocked(state);
        let done = self.wait_for(Some(timeout), |s| {
            let capture = s.capture.as_ref()?;
            s.running
                .iter()
                .all(|i| capture.results.contains_key(i))
                .then_some(())
        });
        let capture = self.lock().capture.take();
        if done.is_none() {
            return Err(SnapshotError::VcpusBusy);
        }
        let results = capture.map(|c| c.results).unwrap_or_default();
        results.into_values().collect()
    }

    /// Waits (up to `timeout`, or forever for None) until `ready` returns
    /// a value; None on timeout.
    fn wait_for<T>(
        &self,
        timeout: Option<Duration>,
        mut ready: impl FnMut(&State) -> Option<T>,
    ) -> Option<T> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut state = self.lock();
        loop {
            if let Some(value) = ready(&state) {
                return Some(value);
            }
            state = match deadline {
                None => self.changed.wait(state).unwrap_or_else(|p| p.into_inner()),
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return None;
                    }
                    self.changed
                        .wait_timeout(state, deadline - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
    }

    /// Waits until every running vCPU thread is parked (or gone).
    pub fn wait_parked(&self, timeout: Duration) -> bool {
        self.wait_for(Some(timeout), |s| {
            (s.parked >= s.running.len() || s.command != VcpuCommand::Park).then_some(())
        })
        .is_some()
    }

    /// Waits for a stop request; `None` on timeout.
    pub fn wait_stop(&self, timeout: Option<Duration>) -> Option<StopReason> {
        self.wait_for(timeout, |s| s.stop.clone())
    }

    /// The guest ejected a PCI device (a vCPU thread calls this): wakes the
    /// VMM thread to tear it down.
    pub fn device_ejected(&self) {
        let mut state = self.lock();
        state.device_ejected = true;
        self.notify_unlocked(state);
    }

    /// Waits for a stop (Some(Ok)) or an ejected device (Some(Err(())),
    /// reported once), up to `timeout`.
    pub fn wait_stop_or_eject(
        &self,
        timeout: Option<Duration>,
    ) -> Option<std::result::Result<StopReason, ()>> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut state = self.lock();
        loop {
            if let Some(stop) = state.stop.clone() {
                return Some(Ok(stop));
            }
            if std::mem::take(&mut state.device_ejected) {
                return Some(Err(()));
            }
            state = match deadline {
                None => self.changed.wait(state).unwrap_or_else(|p| p.into_inner()),
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return None;
                    }
                    self.changed
                        .wait_timeout(state, deadline - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
    }

    /// Waits until every vCPU thread has exited.
    pub fn wait_threads_exited(&self, timeout: Duration) -> bool {
        self.wait_for(Some(timeout), |s| s.running.is_empty().then_some(()))
            .is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_capture(_: &[u32], _: bool) -> Result<VcpuState, SnapshotError> {
        Err(SnapshotError::NotParked)
    }

    #[test]
    fn an_ejected_vcpu_leaves_its_gate_running_or_parked_and_can_come_back() {
        let control = Arc::new(Control::new());
        assert!(control.vcpu_gate(1, &mut no_capture));
        control.remove_vcpu(1);
        assert!(control.vcpu_removed(1) && !control.vcpu_removed(0));
        assert!(
            !control.vcpu_gate(1, &mut no_capture),
            "removed while running"
        );
        assert!(control.vcpu_gate(0, &mut no_capture), "the others run on");
        control.vcpu_added(1);
        assert!(control.vcpu_gate(1, &mut no_capture));
        // Parked (the VM paused), an eject still lets the thread go.
        control.set_command(VcpuCommand::Park);
        let parked = {
            let control = control.clone();
            std::thread::spawn(move || control.vcpu_gate(1, &mut no_capture))
        };
        std::thread::sleep(Duration::from_millis(20));
        control.remove_vcpu(1);
        assert!(!parked.join().unwrap());
        assert_eq!(control.lock().parked, 0);
    }
}
