//! A device worker: one thread with an epoll loop over queue-notification
//! eventfds, any extra fds the device needs (a tap, an io_uring, a timer) and
//! a kill eventfd that stops it.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::seccomp::{Spawner, ThreadKind};

/// What a worker thread runs. Called only on the worker thread.
pub trait WorkerHandler: Send + 'static {
    /// Queue `index` (position in the `kicks` given to [`spawn`]) was
    /// notified; its eventfd is already drained.
    fn queue_notified(&mut self, index: usize);
    /// The worker stops because waiting for events failed: the handler
    /// reports it (see [`super::queue_failed`]) so the guest is not left
    /// waiting in silence.
    fn failed(&mut self, cause: &io::Error);
    /// Extra fds to watch for input, beyond the queue kicks.
    fn extra_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }
    /// Extra fd `index` (position in `extra_fds`) is readable.
    fn extra_ready(&mut self, _index: usize) {}
    /// Runs once before the loop: work that may already be pending.
    fn started(&mut self) {}
    /// Looks for work without waiting (new buffers in a ring, finished IO)
    /// and does it; returns whether there was any. Handlers that return true
    /// here get adaptive polling: before the worker sleeps it keeps calling
    /// `poll` for a while, as QEMU's event loop does, because a thread
    /// wake-up costs more than the request it serves.
    fn poll(&mut self) -> bool {
        false
    }
    /// Whether `poll` is worth calling at all.
    fn polls(&self) -> bool {
        false
    }
    /// Polling begins: the driver may stop notifying (its kicks cost it an
    /// exit, and the poller will see the buffers anyway).
    fn poll_start(&mut self) {}
    /// Polling ends before the worker sleeps: notifications back on. Returns
    /// whether work turned up meanwhile (it has been done).
    fn poll_stop(&mut self) -> bool {
        false
    }
    /// The worker is about to stop for a snapshot: finishes the requests in
    /// flight (their used entries written) without taking new ones, so that
    /// every buffer taken from the ring has been given back. Handlers that
    /// finish each request before taking the next have nothing to do.
    fn quiesce(&mut self) {}
}

/// Adaptive polling: the window grows while polling finds work and shrinks
/// while it does not, so an idle device stops spinning.
struct PollWindow {
    current: Duration,
}

const POLL_MAX: Duration = Duration::from_micros(64);
const POLL_START: Duration = Duration::from_micros(4);
/// While polling keeps finding work, the fds (the kill event among them) are
/// still looked at this often.
const LOOK_INTERVAL: Duration = Duration::from_micros(500);

impl PollWindow {
    fn grow(&mut self) {
        self.current = (self.current * 2).clamp(POLL_START, POLL_MAX);
    }

    fn shrink(&mut self) {
        self.current /= 2;
        if self.current < POLL_START {
            self.current = Duration::ZERO;
        }
    }
}

/// A running worker; dropping it stops the thread and waits for it.
pub struct Worker {
    kill: EventFd,
    thread: Option<JoinHandle<()>>,
    /// Run on the caller's thread by the fuzz targets instead.
    #[cfg(feature = "fuzzing")]
    inline: Option<u64>,
}

/// What a kill event's value asks: 1 stop, 2 (or more) quiesce first.
const KILL: u64 = 1;
const QUIESCE_AND_KILL: u64 = 2;

impl Worker {
    /// Stops the worker and joins its thread.
    pub fn stop(&mut self) {
        self.stop_with(KILL);
    }

    /// Stops the worker once its handler has finished the requests in flight
    /// (`WorkerHandler::quiesce`), and joins its thread.
    pub fn stop_quiesced(&mut self) {
        self.stop_with(QUIESCE_AND_KILL);
    }

    fn stop_with(&mut self, value: u64) {
        #[cfg(feature = "fuzzing")]
        if let Some(id) = self.inline.take() {
            crate::fuzzing::remove_inline_worker(id);
        }
        if let Some(thread) = self.thread.take() {
            let name = thread.thread().name().unwrap_or("worker").to_owned();
            // Joining a thread that was never told to stop would hang the VMM.
            if let Err(e) = self.kill.write(value) {
                log::error!("{name}: cannot stop the worker thread: {e}; it is left running");
                return;
            }
            if thread.join().is_err() {
                log::error!("{name}: the worker thread panicked");
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

const KILL_TOKEN: u64 = u64::MAX;
const EXTRA_BASE: u64 = 1 << 32;

/// Starts a worker thread named `name` over the queue `kicks`, confined to
/// `kind`'s seccomp filter; `spawner` creates it.
pub fn spawn<H: WorkerHandler>(
    spawner: &Spawner,
    name: String,
    kind: ThreadKind,
    kicks: Vec<EventFd>,
    handler: H,
) -> io::Result<Worker> {
    let kill = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
    #[cfg(feature = "fuzzing")]
    if crate::fuzzing::inline_workers() {
        let _ = (spawner, kind);
        let extra = handler.extra_fds();
        let id = crate::fuzzing::add_inline_worker(kicks, extra, Box::new(handler));
        return Ok(Worker {
            kill,
            thread: None,
            inline: Some(id),
        });
    }
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        kill.as_raw_fd(),
        EpollEvent::new(EventSet::IN, KILL_TOKEN),
    )?;
    for (index, kick) in kicks.iter().enumerate() {
        epoll.ctl(
            ControlOperation::Add,
            kick.as_raw_fd(),
            EpollEvent::new(EventSet::IN, index as u64),
        )?;
    }
    for (index, fd) in handler.extra_fds().into_iter().enumerate() {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, EXTRA_BASE + index as u64),
        )?;
    }
    let thread_kill = kill.try_clone()?;
    let thread = spawner.spawn(name, kind, move || run(epoll, thread_kill, kicks, handler))?;
    Ok(Worker {
        kill,
        thread: Some(thread),
        #[cfg(feature = "fuzzing")]
        inline: None,
    })
}

/// A timerfd whose reads never block: a worker reads it when epoll said so,
/// and a timer disarmed in between (its count reset) then reads EAGAIN.
pub fn nonblocking_timer() -> io::Result<TimerFd> {
    let timer = TimerFd::new()?;
    let fd = timer.as_raw_fd();
    // SAFETY: F_GETFL / F_SETFL on a descriptor we own.
    let ok = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) >= 0
    };
    if ok {
        Ok(timer)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Waiting for the worker's events: its epoll (a stand-in in tests).
trait WaitEvents {
    fn wait_events(&self, timeout_ms: i32, events: &mut [EpollEvent]) -> io::Result<usize>;
}

impl WaitEvents for Epoll {
    fn wait_events(&self, timeout_ms: i32, events: &mut [EpollEvent]) -> io::Result<usize> {
        self.wait(timeout_ms, events)
    }
}

fn run<W: WaitEvents, H: WorkerHandler>(
    epoll: W,
    kill: EventFd,
    kicks: Vec<EventFd>,
    mut handler: H,
) {
    handler.started();
    let mut events = vec![EpollEvent::default(); 32];
    let mut window = PollWindow {
        current: Duration::ZERO,
    };
    let polls = handler.polls();
    let mut last_look = Instant::now();
    loop {
        let mut found = false;
        if polls && window.current > Duration::ZERO {
            handler.poll_start();
            let start = Instant::now();
            while start.elapsed() < window.current {
                if handler.poll() {
                    found = true;
                    break;
                }
                std::hint::spin_loop();
            }
            if found {
                window.grow();
                // Polling found work: skip the syscall below, but not for long.
                if last_look.elapsed() < LOOK_INTERVAL {
                    continue;
                }
            } else {
                window.shrink();
                found = handler.poll_stop();
            }
        }
        last_look = Instant::now();
        // With polling on, look at the fds without sleeping first: the kill
        // event must be seen even while polling keeps finding work.
        let timeout = if polls { 0 } else { -1 };
        let mut count = match epoll.wait_events(timeout, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return handler.failed(&e),
        };
        if count == 0 && polls && !found {
            let slept = Instant::now();
            count = match epoll.wait_events(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return handler.failed(&e),
            };
            // Work came soon after we gave up: a longer window would have caught it.
            if slept.elapsed() < POLL_MAX {
                window.grow();
            }
        }
        for event in &events[..count] {
            match event.data() {
                KILL_TOKEN => {
                    if kill.read().unwrap_or(KILL) >= QUIESCE_AND_KILL {
                        handler.quiesce();
                    }
                    return;
                }
                token if token >= EXTRA_BASE => handler.extra_ready((token - EXTRA_BASE) as usize),
                token => {
                    let index = token as usize;
                    if let Some(kick) = kicks.get(index) {
                        // Non-blocking: a spurious wake-up reads EAGAIN.
                        let _ = kick.read();
                        handler.queue_notified(index);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    struct Echo(mpsc::Sender<usize>);

    impl WorkerHandler for Echo {
        fn queue_notified(&mut self, index: usize) {
            let _ = self.0.send(index);
        }

        fn failed(&mut self, _cause: &io::Error) {}
    }

    /// Fails every wait with `errors`, in order, then with EBADF.
    struct FailingWait(std::sync::Mutex<Vec<i32>>);

    impl WaitEvents for FailingWait {
        fn wait_events(&self, _: i32, _: &mut [EpollEvent]) -> io::Result<usize> {
            let errno = self.0.lock().unwrap().pop().unwrap_or(libc::EBADF);
            Err(io::Error::from_raw_os_error(errno))
        }
    }

    /// Records the causes it is told the worker failed with.
    struct Failures(mpsc::Sender<Option<i32>>);

    impl WorkerHandler for Failures {
        fn queue_notified(&mut self, _index: usize) {}

        fn failed(&mut self, cause: &io::Error) {
            let _ = self.0.send(cause.raw_os_error());
        }
    }

    #[test]
    fn a_failing_wait_is_reported_to_the_handler_and_ends_the_loop() {
        let (tx, rx) = mpsc::channel();
        let kill = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).unwrap();
        // EINTR is retried; the EBADF after it ends the worker.
        let wait = FailingWait(std::sync::Mutex::new(vec![libc::EINTR]));
        run(wait, kill, Vec::new(), Failures(tx));
        assert_eq!(rx.try_recv(), Ok(Some(libc::EBADF)));
        assert!(
            rx.try_recv().is_err(),
            "reported once, and the handler is gone"
        );
    }

    #[test]
    fn kicks_reach_the_handler_and_stop_joins() {
        let kicks: Vec<EventFd> = (0..3)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).unwrap())
            .collect();
        let kick2 = kicks[2].try_clone().unwrap();
        let (tx, rx) = mpsc::channel();
        let mut worker = spawn(
            &Spawner::unconfined(),
            "test-worker".into(),
            ThreadKind::Rng,
            kicks,
            Echo(tx),
        )
        .unwrap();
        kick2.write(1).unwrap();
        assert_eq!(rx.recv_timeout(std::time::Duration::from_secs(5)), Ok(2));
        worker.stop();
        assert!(rx.recv().is_err(), "handler dropped with the thread");
    }
}
