//! Which thread serves a queue: its worker, or the vCPU thread that
//! notified it.
//!
//! By default the driver's notification is an ioeventfd that wakes the
//! queue's worker: no exit to user space, and on idle CPUs the worker runs
//! beside the vCPU. When the host's CPUs are oversubscribed (many VMs, busy
//! CPUs), the worker is one more runnable thread: it gets a fair share of a
//! CPU while the guest's vCPU, waiting for its IO, uses its own share to
//! spin. Then the vCPU thread serves the queue itself, as QEMU does with
//! `ioeventfd=off`: the driver's write exits to the VMM, and the time the
//! vCPU would have spent waiting goes to the IO, with no thread to wake.
//!
//! The exit costs more than an ioeventfd, and every notification pays it,
//! so the queue moves to the vCPU threads only while the CPUs are contended
//! and each wake-up finds several requests; it moves back when either
//! stops. Contended means CPU pressure: that of the VMM's own cgroup on
//! cgroup v2 (the waits of its own tasks: a container's, a service's), else
//! the host's (`/proc/pressure/cpu`), where on a large host any two tasks
//! sharing a CPU count. Without pressure figures (a kernel without PSI)
//! queues stay on their workers.
//!
//! A vCPU thread that sleeps for milliseconds while it serves the queue
//! (the page cache throttling writers, a slow image, a read that misses the
//! page cache on the synchronous engine) stalls its guest meanwhile: the
//! queue then goes back to its worker at once and stays there for a second,
//! so a guest stalls that way at most once a second.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::cgroup::{cgroup_dir, Hierarchy};
use crate::virtio::notify::QueueRoute;

/// How long the figures are gathered before each decision.
const WINDOW: Duration = Duration::from_millis(100);
/// Share of the window in which some runnable task waited for a CPU.
const CONTENDED: f64 = 0.5;
const UNCONTENDED: f64 = 0.2;
/// Requests per wake-up (a notification, or a worker pass that found work).
const BATCHED: f64 = 4.0;
const UNBATCHED: f64 = 2.0;

/// A serve on a vCPU thread that took this long and slept in it blocked
/// its guest (rather than was preempted)...
const BLOCKED_ON_VCPU: Duration = Duration::from_millis(2);
/// ...and keeps the queue on its worker for this many windows.
const HOLD_WINDOWS: u32 = 10;

/// Whether a serve on a vCPU thread that took `wall` blocked the guest:
/// `slept` says the thread gave up its CPU in it (voluntary context
/// switches), which a preemption under contention does not count as.
pub fn blocked_on_vcpu(wall: Duration, slept: bool) -> bool {
    slept && wall >= BLOCKED_ON_VCPU
}

/// Where the queue should be served, given the window's figures.
pub fn on_vcpu_next(on_vcpu: bool, pressure: f64, batch: f64) -> bool {
    if on_vcpu {
        pressure >= UNCONTENDED && batch >= UNBATCHED
    } else {
        pressure >= CONTENDED && batch >= BATCHED
    }
}

static CPU_PRESSURE: OnceLock<Option<File>> = OnceLock::new();

/// Opens the CPU pressure file (the process's cgroup v2's, else the
/// host's), once per process, while the thread may still open files (a
/// VM's build); the queues read it later.
pub fn open_cpu_pressure() {
    CPU_PRESSURE.get_or_init(|| {
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .ok()
            .zip(std::fs::read_to_string("/proc/self/mountinfo").ok())
            .and_then(|(cgroup, mountinfo)| cgroup_dir(&cgroup, &mountinfo, Hierarchy::Unified))
            .map(|dir| dir.join("cpu.pressure"));
        let found = own
            .into_iter()
            .chain([PathBuf::from("/proc/pressure/cpu")])
            .filter_map(|path| Some((File::open(&path).ok()?, path)))
            .find(|(file, _)| stalled_us(file).is_some());
        match &found {
            Some((_, path)) => {
                log::debug!("disk queues watch the CPU pressure in {}", path.display())
            }
            None => log::debug!("no CPU pressure figures: disk queues stay on their workers"),
        }
        found.map(|(file, _)| file)
    });
}

/// Total µs in which some runnable task waited for a CPU (the "some" line).
fn stalled_us(file: &File) -> Option<u64> {
    let mut buf = [0u8; 256];
    let len = file.read_at(&mut buf, 0).ok()?;
    let text = std::str::from_utf8(&buf[..len]).ok()?;
    let some = text.lines().next()?.strip_prefix("some ")?;
    some.split_whitespace()
        .find_map(|field| field.strip_prefix("total="))?
        .parse()
        .ok()
}

pub(crate) fn cpu_stalled_us() -> Option<u64> {
    stalled_us(CPU_PRESSURE.get()?.as_ref()?)
}

/// One queue's placement, kept by its handler: figures of the current
/// window, and the route it moves.
pub struct Placement {
    route: QueueRoute,
    /// Read by the worker's polling without the handler's lock.
    on_vcpu: Arc<AtomicBool>,
    start: Instant,
    stalled_at_start: Option<u64>,
    wakeups: u32,
    requests: u32,
    /// Windows left in which the queue stays on its worker (a vCPU thread
    /// blocked serving it).
    hold: u32,
}

impl Placement {
    pub fn new(route: QueueRoute, on_vcpu: Arc<AtomicBool>) -> Placement {
        // A device stopped for a snapshot and started again keeps its route.
        on_vcpu.store(route.notifiers.on_vcpu(route.queue), Ordering::Relaxed);
        Placement {
            route,
            on_vcpu,
            start: Instant::now(),
            stalled_at_start: cpu_stalled_us(),
            wakeups: 0,
            requests: 0,
            hold: 0,
        }
    }

    /// Where the queue goes after a window with these figures: as
    /// `on_vcpu_next` says, but on its worker while held there.
    fn next_route(&mut self, on_vcpu: bool, pressure: f64, batch: f64) -> bool {
        if self.hold > 0 {
            self.hold -= 1;
            return false;
        }
        on_vcpu_next(on_vcpu, pressure, batch)
    }

    /// A vCPU thread served the queue in `wall`, sleeping in it if `slept`:
    /// if that blocked its guest, the queue goes back to its worker now.
    pub fn served_on_vcpu(&mut self, wall: Duration, slept: bool) {
        if !blocked_on_vcpu(wall, slept) {
            return;
        }
        self.hold = HOLD_WINDOWS;
        if self.on_vcpu.load(Ordering::Relaxed) && self.route.serve_on_vcpu(false) {
            self.on_vcpu.store(false, Ordering::Relaxed);
            log::debug!(
                "queue {}: back on its worker: a vCPU thread blocked {:.1} ms serving it",
                self.route.queue,
                wall.as_secs_f64() * 1000.0
            );
        }
    }

    /// A pass over the queue popped `popped` requests; at the end of a
    /// window, moves the queue if its figures say so.
    pub fn record(&mut self, popped: usize) {
        if popped > 0 {
            self.wakeups = self.wakeups.saturating_add(1);
            self.requests = self
                .requests
                .saturating_add(u32::try_from(popped).unwrap_or(u32::MAX));
        }
        let elapsed = self.start.elapsed();
        if elapsed < WINDOW {
            return;
        }
        let stalled = cpu_stalled_us();
        if let (Some(before), Some(now)) = (self.stalled_at_start, stalled) {
            let pressure = now.saturating_sub(before) as f64 / elapsed.as_micros().max(1) as f64;
            let batch = if self.wakeups == 0 {
                0.0
            } else {
                f64::from(self.requests) / f64::from(self.wakeups)
            };
            let current = self.on_vcpu.load(Ordering::Relaxed);
            let next = self.next_route(current, pressure, batch);
            if next != current && self.route.serve_on_vcpu(next) {
                self.on_vcpu.store(next, Ordering::Relaxed);
                log::debug!(
                    "queue {}: served on the {} (CPU pressure {:.0}%, {:.1} requests a wake-up)",
                    self.route.queue,
                    if next { "vCPU threads" } else { "worker" },
                    pressure * 100.0,
                    batch
                );
            }
        }
        self.start = Instant::now();
        self.stalled_at_start = stalled;
        self.wakeups = 0;
        self.requests = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_moves_to_the_vcpu_only_when_contended_and_batched() {
        assert!(on_vcpu_next(false, 0.95, 16.0));
        assert!(!on_vcpu_next(false, 0.02, 32.0), "idle CPUs: the worker");
        assert!(
            !on_vcpu_next(false, 0.95, 1.0),
            "one request a notification"
        );
    }

    #[test]
    fn only_a_vcpu_thread_that_slept_for_milliseconds_blocked_its_guest() {
        assert!(blocked_on_vcpu(Duration::from_millis(5), true));
        assert!(
            !blocked_on_vcpu(Duration::from_millis(5), false),
            "preempted, not blocked"
        );
        assert!(
            !blocked_on_vcpu(Duration::from_micros(300), true),
            "a short wait on a lock"
        );
    }

    #[test]
    fn it_moves_back_when_either_stops_with_hysteresis() {
        assert!(
            on_vcpu_next(true, 0.3, 3.0),
            "between the thresholds: stays"
        );
        assert!(!on_vcpu_next(true, 0.1, 32.0));
        assert!(!on_vcpu_next(true, 0.95, 1.5));
        assert!(!on_vcpu_next(true, 0.95, 0.0), "an idle window");
    }

    mod needs_kvm {
        use kvm_ioctls::Kvm;

        use super::super::*;
        use crate::interrupts::InterruptRoutes;
        use crate::virtio::notify::Notifiers;

        #[test]
        #[ignore = "needs /dev/kvm"]
        fn a_vcpu_thread_that_blocked_sends_the_queue_back_for_a_while() {
            let vm_fd = Arc::new(Kvm::new().unwrap().create_vm().unwrap());
            let routes = Arc::new(InterruptRoutes::new(vm_fd, 1024));
            let notifiers = Arc::new(Notifiers::new(routes, 1).unwrap());
            assert!(notifiers.serve_on_vcpu(0, true));
            let on_vcpu = Arc::new(AtomicBool::new(false));
            let route = QueueRoute {
                notifiers: Arc::clone(&notifiers),
                queue: 0,
            };
            let mut placement = Placement::new(route, Arc::clone(&on_vcpu));
            assert!(
                on_vcpu.load(Ordering::Relaxed),
                "it takes the route as it is"
            );
            placement.served_on_vcpu(Duration::from_micros(500), true);
            placement.served_on_vcpu(Duration::from_millis(20), false);
            assert!(on_vcpu.load(Ordering::Relaxed) && notifiers.on_vcpu(0));
            placement.served_on_vcpu(Duration::from_millis(20), true);
            assert!(!on_vcpu.load(Ordering::Relaxed) && !notifiers.on_vcpu(0));
            // Contended, batched windows leave it on the worker for a second.
            for _ in 0..HOLD_WINDOWS {
                assert!(!placement.next_route(false, 0.95, 32.0));
            }
            assert!(placement.next_route(false, 0.95, 32.0));
        }
    }

    #[test]
    fn the_pressure_file_parses() {
        let Ok(file) = File::open("/proc/pressure/cpu") else {
            return; // a kernel without PSI: queues never move
        };
        let first = stalled_us(&file).expect("a some line with a total");
        std::thread::sleep(Duration::from_millis(5));
        assert!(stalled_us(&file).expect("read again at offset 0") >= first);
    }
}
