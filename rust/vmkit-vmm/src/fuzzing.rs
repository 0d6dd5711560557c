//! Entry points for the fuzz targets (`fuzz/`), built only with the
//! `fuzzing` feature.
//!
//! Inline workers: a device's queue worker normally runs on its own thread
//! and waits in epoll. A fuzz target needs each input processed completely,
//! deterministically and on its own thread, so while inline workers are on
//! (for this thread) `worker::spawn` hands the handler to a registry here
//! instead, and [`run_inline_workers`] delivers the events a worker thread
//! would have seen (kicks, readable extra fds) on the caller's thread. The
//! handlers are the devices' real ones; only the event loop differs.

use std::cell::{Cell, RefCell};
use std::os::fd::RawFd;
use std::rc::Rc;

use vmm_sys_util::eventfd::EventFd;

use crate::virtio::worker::WorkerHandler;

struct InlineWorker {
    id: u64,
    kicks: Vec<EventFd>,
    extra: Vec<RawFd>,
    handler: Box<dyn WorkerHandler>,
    started: bool,
}

thread_local! {
    static INLINE: Cell<bool> = const { Cell::new(false) };
    static NEXT_ID: Cell<u64> = const { Cell::new(0) };
    static WORKERS: RefCell<Vec<Rc<RefCell<InlineWorker>>>> = const { RefCell::new(Vec::new()) };
}

/// Turns inline workers on or off for workers spawned from this thread.
pub fn set_inline_workers(on: bool) {
    INLINE.with(|inline| inline.set(on));
}

/// Whether `worker::spawn` on this thread registers inline workers.
pub(crate) fn inline_workers() -> bool {
    INLINE.with(Cell::get)
}

pub(crate) fn add_inline_worker(
    kicks: Vec<EventFd>,
    extra: Vec<RawFd>,
    handler: Box<dyn WorkerHandler>,
) -> u64 {
    let id = NEXT_ID.with(|next| {
        let id = next.get();
        next.set(id + 1);
        id
    });
    let worker = InlineWorker {
        id,
        kicks,
        extra,
        handler,
        started: false,
    };
    WORKERS.with(|workers| workers.borrow_mut().push(Rc::new(RefCell::new(worker))));
    id
}

/// Drops worker `id`'s handler, as joining its thread would.
pub(crate) fn remove_inline_worker(id: u64) {
    let removed = WORKERS.with(|workers| {
        let mut workers = workers.borrow_mut();
        let at = workers.iter().position(|w| w.borrow().id == id);
        at.map(|at| workers.remove(at))
    });
    // Dropped outside the registry's borrow: a handler's drop may wait.
    drop(removed);
}

/// Inline workers registered now (started and not stopped).
pub fn inline_worker_count() -> usize {
    WORKERS.with(|workers| workers.borrow().len())
}

fn readable(fd: RawFd) -> bool {
    let mut pollfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll(2) on one pollfd we own, without waiting.
    let ready = unsafe { libc::poll(&mut pollfd, 1, 0) };
    ready > 0 && pollfd.revents & libc::POLLIN != 0
}

fn run_once(worker: &mut InlineWorker) -> usize {
    let mut events = 0;
    if !worker.started {
        worker.started = true;
        worker.handler.started();
        events += 1;
    }
    for index in 0..worker.kicks.len() {
        // Non-blocking: reads only a pending kick, as the epoll loop does.
        if worker.kicks[index].read().is_ok() {
            worker.handler.queue_notified(index);
            events += 1;
        }
    }
    for index in 0..worker.extra.len() {
        if readable(worker.extra[index]) {
            worker.handler.extra_ready(index);
            events += 1;
        }
    }
    if worker.handler.polls() {
        worker.handler.poll_start();
        if worker.handler.poll() {
            events += 1;
        }
        if worker.handler.poll_stop() {
            events += 1;
        }
    }
    events
}

/// Delivers pending events to every inline worker of this thread, round
/// after round, until a round finds none or `max_rounds` have run (a
/// handler that re-arms a timer can make work for ever). Returns the number
/// of events delivered.
pub fn run_inline_workers(max_rounds: usize) -> usize {
    let mut total = 0;
    for _ in 0..max_rounds {
        let workers: Vec<_> = WORKERS.with(|workers| workers.borrow().clone());
        let events: usize = workers.iter().map(|w| run_once(&mut w.borrow_mut())).sum();
        total += events;
        if events == 0 {
            break;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::worker;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    struct Counting {
        started: Arc<AtomicUsize>,
        notified: Arc<AtomicUsize>,
    }

    impl WorkerHandler for Counting {
        fn queue_notified(&mut self, _index: usize) {
            self.notified.fetch_add(1, Ordering::SeqCst);
        }

        fn failed(&mut self, _cause: &std::io::Error) {}

        fn started(&mut self) {
            self.started.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn inline_workers_run_on_the_callers_thread_until_stopped() {
        let started = Arc::new(AtomicUsize::new(0));
        let notified = Arc::new(AtomicUsize::new(0));
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        set_inline_workers(true);
        let handler = Counting {
            started: started.clone(),
            notified: notified.clone(),
        };
        let mut worker = worker::spawn(
            &crate::seccomp::Spawner::unconfined(),
            "inline".into(),
            crate::seccomp::ThreadKind::Rng,
            vec![kick.try_clone().unwrap()],
            handler,
        )
        .unwrap();
        set_inline_workers(false);
        assert_eq!(inline_worker_count(), 1);
        // Nothing runs until asked: no thread.
        kick.write(1).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(10));
        assert_eq!(started.load(Ordering::SeqCst), 0);
        assert_eq!(run_inline_workers(8), 2, "started, then one kick");
        assert_eq!(notified.load(Ordering::SeqCst), 1);
        assert_eq!(run_inline_workers(8), 0, "the kick was consumed");
        worker.stop();
        assert_eq!(inline_worker_count(), 0);
        kick.write(1).unwrap();
        assert_eq!(run_inline_workers(8), 0, "a stopped worker gets nothing");
    }
}
