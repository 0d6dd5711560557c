//! virtio-watchdog (`--watchdog`), Cloud Hypervisor's own device (type 35):
//! one queue on which the driver "pets" the watchdog by giving the device a
//! device-writable buffer, which the device sets to 1 and returns. From the
//! first pet on, a timer checks every 15 s whether the last pet is more
//! than 20 whole seconds old; if it is, the VM is reset, as Cloud
//! Hypervisor does (a guest that stops petting is reset 30 s later).
//!
//! Time the VM spends paused does not count (the guest cannot pet then),
//! and a restored or resumed VM gets a fresh timeout.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_queue::Queue;
use vm_memory::Bytes;

use super::worker::{self, Worker, WorkerHandler};
use super::{drain_queue, ActivateError, Activation, OneQueueSignals, VirtioDevice, F_VERSION_1};
use crate::control::{Control, StopReason};
use crate::error::{ErrorKind, ModuleError, Result};
use crate::memory::GuestMemoryMmap;
use crate::seccomp::ThreadKind;

pub const TYPE_WATCHDOG: u32 = 35;
const QUEUE_SIZE: u16 = 8;

/// Cloud Hypervisor's timing: the check interval, and the age of the last
/// pet that resets the VM (CH's "more than 20 s" in whole seconds).
pub const CHECK_INTERVAL: Duration = Duration::from_secs(15);
pub const RESET_AFTER: Duration = Duration::from_secs(21);

#[derive(Debug, thiserror::Error)]
#[error("Cannot create the virtio-watchdog timer")]
pub struct WatchdogError(#[source] io::Error);

impl ModuleError for WatchdogError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Device
    }
}

/// When the guest last petted the watchdog (None: never, so it is off).
type LastPet = Arc<Mutex<Option<Instant>>>;

pub struct Watchdog {
    id: String,
    control: Arc<Control>,
    timer: OwnedFd,
    last_pet: LastPet,
    interval: Duration,
    reset_after: Duration,
    worker: Option<Worker>,
}

impl Watchdog {
    /// The device of one boot; `control` is that boot's (a timeout resets it).
    pub fn new(id: String, control: Arc<Control>) -> Result<Watchdog> {
        Self::with_timing(id, control, CHECK_INTERVAL, RESET_AFTER)
    }

    /// The device with other timing (tests).
    pub fn with_timing(
        id: String,
        control: Arc<Control>,
        interval: Duration,
        reset_after: Duration,
    ) -> Result<Watchdog> {
        // SAFETY: plain syscall; the result is checked before use.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(WatchdogError(io::Error::last_os_error()).into());
        }
        // SAFETY: `fd` was just created and nothing else owns it.
        let timer = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Watchdog {
            id,
            control,
            timer,
            last_pet: Arc::new(Mutex::new(None)),
            interval,
            reset_after,
            worker: None,
        })
    }

    fn last_pet(&self) -> Option<Instant> {
        *self.last_pet.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Arms `timer` to fire every `interval` (zero: disarms it).
fn arm(timer: RawFd, interval: Duration) -> io::Result<()> {
    let spec = libc::timespec {
        tv_sec: interval.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(interval.subsec_nanos() as i32),
    };
    let value = libc::itimerspec {
        it_interval: spec,
        it_value: spec,
    };
    // SAFETY: `timer` is a timerfd this device owns; `value` outlives the call.
    if unsafe { libc::timerfd_settime(timer, 0, &value, std::ptr::null_mut()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

struct WatchdogQueue {
    memory: GuestMemoryMmap,
    queue: Queue,
    signals: OneQueueSignals,
    control: Arc<Control>,
    timer: OwnedFd,
    last_pet: LastPet,
    interval: Duration,
    reset_after: Duration,
    armed: bool,
}

impl WatchdogQueue {
    /// Takes every pet on the ring; returns whether any buffer was used.
    fn process(&mut self) -> std::result::Result<bool, virtio_queue::Error> {
        let mut pets = 0;
        let device = &self.signals.device;
        let memory = &self.memory;
        let used = drain_queue(&mut self.queue, memory, |mut chain| {
            // A pet is one device-writable buffer; anything else is returned
            // untouched and does not count (CH stops its queue on such a
            // chain: a guest cannot do that to this one).
            match chain.next() {
                Some(d)
                    if d.is_write_only()
                        && d.len() > 0
                        && memory.write_obj(1u8, d.addr()).is_ok() =>
                {
                    pets += 1;
                    d.len()
                }
                _ => {
                    log::warn!("{device}: a pet without a writable buffer, ignored");
                    0
                }
            }
        })?;
        if pets > 0 {
            self.pet();
        }
        Ok(used)
    }

    fn pet(&mut self) {
        *self.last_pet.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        if !self.armed {
            match arm(self.timer.as_raw_fd(), self.interval) {
                Ok(()) => {
                    log::info!(
                        "{}: first pet; checking every {} s",
                        self.signals.device,
                        self.interval.as_secs_f64()
                    );
                    self.armed = true;
                }
                Err(e) => log::error!("{}: cannot start the timer: {e}", self.signals.device),
            }
        }
    }

    /// The timer fired: resets the VM when the guest stopped petting.
    fn check(&mut self) {
        let mut expirations = [0u8; 8];
        // SAFETY: reads 8 bytes from the timerfd into a buffer of 8.
        let _ = unsafe { libc::read(self.timer.as_raw_fd(), expirations.as_mut_ptr().cast(), 8) };
        let mut last_pet = self.last_pet.lock().unwrap_or_else(|p| p.into_inner());
        let Some(last) = *last_pet else {
            return;
        };
        if self.control.parked_by_request() {
            // Paused: the guest cannot pet, so the time does not count.
            *last_pet = Some(Instant::now());
            return;
        }
        let gap = last.elapsed();
        if gap >= self.reset_after {
            log::error!(
                "{}: no pet for {} s: resetting the VM",
                self.signals.device,
                gap.as_secs()
            );
            *last_pet = None;
            drop(last_pet);
            self.control.request_stop(StopReason::Reset);
        }
    }
}

impl WorkerHandler for WatchdogQueue {
    fn queue_notified(&mut self, _index: usize) {
        if self.signals.broken {
            return;
        }
        let result = self.process();
        self.signals
            .processed(result, &mut self.queue, &self.memory);
    }

    fn failed(&mut self, cause: &io::Error) {
        self.signals.fail(cause);
    }

    fn extra_fds(&self) -> Vec<RawFd> {
        vec![self.timer.as_raw_fd()]
    }

    fn extra_ready(&mut self, _index: usize) {
        self.check();
    }

    fn started(&mut self) {
        // Watching already (a resume, a restore, a driver that reset the
        // device and started it again): a fresh timeout from now.
        let watching = {
            let mut last_pet = self.last_pet.lock().unwrap_or_else(|p| p.into_inner());
            if last_pet.is_some() {
                *last_pet = Some(Instant::now());
            }
            last_pet.is_some()
        };
        if watching {
            match arm(self.timer.as_raw_fd(), self.interval) {
                Ok(()) => self.armed = true,
                Err(e) => log::error!("{}: cannot start the timer: {e}", self.signals.device),
            }
        }
        self.queue_notified(0);
    }
}

impl VirtioDevice for Watchdog {
    fn device_type(&self) -> u32 {
        TYPE_WATCHDOG
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        F_VERSION_1
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(&mut self, activation: Activation) -> std::result::Result<(), ActivateError> {
        let Some(active) = activation.queues.into_iter().find(|q| q.index == 0) else {
            return Ok(());
        };
        let timer = self
            .timer
            .try_clone()
            .map_err(|e| ActivateError::io("watchdog timer", e))?;
        let handler = WatchdogQueue {
            memory: activation.memory,
            queue: active.queue,
            signals: OneQueueSignals::new(self.id.clone(), activation.interrupt),
            control: self.control.clone(),
            timer,
            last_pet: self.last_pet.clone(),
            interval: self.interval,
            reset_after: self.reset_after,
            armed: false,
        };
        let worker = worker::spawn(
            &activation.spawner,
            format!("{}_q0", self.id),
            ThreadKind::Watchdog,
            vec![active.kick],
            handler,
        )
        .map_err(|e| ActivateError::io("worker thread", e))?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        // Dropping the worker stops and joins its thread; with nobody to
        // read it, the timer's expirations do nothing until it is re-armed.
        self.worker = None;
        if let Err(e) = arm(self.timer.as_raw_fd(), Duration::ZERO) {
            log::warn!("{}: cannot stop the timer: {e}", self.id);
        }
    }

    /// Whether the guest had started the watchdog: a restored VM keeps
    /// watching (with a fresh timeout), as Cloud Hypervisor's does.
    fn save_device_state(&self) -> Vec<u8> {
        vec![u8::from(self.last_pet().is_some())]
    }

    fn restore_device_state(&mut self, bytes: &[u8]) -> std::result::Result<(), String> {
        let enabled = match bytes {
            [0] => false,
            [1] => true,
            _ => {
                return Err(format!(
                    "watchdog state {bytes:?}: expected one byte, 0 or 1"
                ))
            }
        };
        *self.last_pet.lock().unwrap_or_else(|p| p.into_inner()) = enabled.then(Instant::now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::{guest_memory, wait_until, Driver, FakeInterrupt, WRITE};
    use vm_memory::GuestAddress;

    const MS: Duration = Duration::from_millis(1);

    fn activate(
        interval: Duration,
        reset_after: Duration,
    ) -> (Watchdog, Driver, Arc<FakeInterrupt>, Arc<Control>) {
        let memory = guest_memory(0x100000);
        let control = Arc::new(Control::new());
        let mut device =
            Watchdog::with_timing("__watchdog".into(), control.clone(), interval, reset_after)
                .unwrap();
        let mut driver = Driver::small(&memory, 8, 0x10000);
        let interrupt = Arc::new(FakeInterrupt::default());
        device
            .activate(Activation {
                spawner: crate::seccomp::Spawner::unconfined(),
                memory,
                interrupt: interrupt.clone(),
                queues: vec![driver.activate(0, false)],
                acked_features: F_VERSION_1,
            })
            .unwrap();
        (device, driver, interrupt, control)
    }

    fn pet(driver: &mut Driver) {
        driver.mem.write_obj(0u8, GuestAddress(0x40000)).unwrap();
        driver.add_chain(&[(0x40000, 1, WRITE)]);
        assert_eq!(driver.next_used().1, 1);
        assert_eq!(driver.read(0x40000, 1), [1], "the device wrote 1");
    }

    #[test]
    fn identity_is_cloud_hypervisors() {
        let device = Watchdog::new("__watchdog".into(), Arc::new(Control::new())).unwrap();
        assert_eq!(device.device_type(), 35);
        assert_eq!(device.queue_max_sizes(), [8]);
        assert_eq!(device.features(), F_VERSION_1);
        assert_eq!((CHECK_INTERVAL.as_secs(), RESET_AFTER.as_secs()), (15, 21));
    }

    #[test]
    fn a_watchdog_never_petted_never_fires() {
        let (mut device, _driver, _, control) = activate(10 * MS, 50 * MS);
        std::thread::sleep(100 * MS);
        assert_eq!(control.stop_reason(), None);
        device.reset();
    }

    #[test]
    fn pets_keep_the_vm_and_silence_resets_it() {
        let (mut device, mut driver, _, control) = activate(20 * MS, 300 * MS);
        for _ in 0..10 {
            pet(&mut driver);
            std::thread::sleep(100 * MS);
        }
        assert_eq!(control.stop_reason(), None, "petted every 100 ms");
        let silent = Instant::now();
        wait_until("the reset", || {
            control.stop_reason() == Some(StopReason::Reset)
        });
        let waited = silent.elapsed();
        assert!(waited >= 200 * MS, "{waited:?}");
        assert!(waited < Duration::from_secs(2), "{waited:?}");
        assert_eq!(device.last_pet(), None, "off until the next pet");
        device.reset();
    }

    #[test]
    fn hostile_chains_are_returned_and_do_not_count() {
        let (mut device, mut driver, _, _) = activate(10 * MS, 50 * MS);
        // Read-only, zero-length and out-of-memory buffers.
        driver.add_chain(&[(0x40000, 1, 0)]);
        assert_eq!(driver.next_used(), (0, 0));
        driver.add_chain(&[(0x40000, 0, WRITE)]);
        assert_eq!(driver.next_used(), (1, 0));
        driver.add_chain(&[(0xffff_ffff_0000, 1, WRITE)]);
        assert_eq!(driver.next_used(), (2, 0));
        assert_eq!(device.last_pet(), None, "none of those was a pet");
        // The queue still works.
        pet(&mut driver);
        assert!(device.last_pet().is_some());
        device.reset();
    }

    #[test]
    fn paused_time_does_not_count() {
        let (mut device, mut driver, _, control) = activate(20 * MS, 60 * MS);
        pet(&mut driver);
        control.set_command(crate::control::VcpuCommand::Park);
        std::thread::sleep(200 * MS);
        assert_eq!(control.stop_reason(), None, "paused for 10 timeouts");
        control.set_command(crate::control::VcpuCommand::Run);
        wait_until("the reset", || {
            control.stop_reason() == Some(StopReason::Reset)
        });
        device.reset();
    }

    #[test]
    fn the_state_says_whether_the_guest_started_it() {
        let (mut device, mut driver, _, _) = activate(CHECK_INTERVAL, RESET_AFTER);
        assert_eq!(device.save_device_state(), [0]);
        pet(&mut driver);
        device.reset();
        assert_eq!(device.save_device_state(), [1]);
        let mut restored = Watchdog::new("__watchdog".into(), Arc::new(Control::new())).unwrap();
        restored.restore_device_state(&[1]).unwrap();
        assert!(restored.last_pet().is_some());
        assert!(restored.restore_device_state(&[2]).is_err());
        assert!(restored.restore_device_state(&[]).is_err());
    }
}
