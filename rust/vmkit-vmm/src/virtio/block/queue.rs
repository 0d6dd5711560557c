//! One queue's worker: pops chains, admits them past the rate limiters,
//! starts them on an engine, finishes them and signals the guest.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use crate::memory::GuestMemoryMmap;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::Bytes;
use vmm_sys_util::timerfd::TimerFd;

use super::counters::BlockCounters;
use super::io::sync::rw_vectored;
use super::io::uring::Uring;
use super::io::{guest_iovecs, IoVecs, QueueIo, UIO_MAXIOV};
use super::merge::contiguous_runs;
use super::placement::Placement;
use super::request::{used_len, Op, Parsed, Request};
use super::{STATUS_IOERR, STATUS_OK};
use crate::rate_limiter::SharedRateLimiter;
use crate::virtio::worker::WorkerHandler;
use crate::virtio::{pop_chain, queue_failed, Interrupt};

/// The longest a rate limiter holds a queue before it looks again.
const MAX_THROTTLE_WAIT: Duration = Duration::from_secs(24 * 60 * 60);

/// Why popping stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum Stop {
    Empty,
    /// The ring is broken (reported): nothing more until a reset.
    Broken,
    Throttled,
    RingFull,
}

/// One queue's worker state.
pub struct QueueHandler {
    // First, so it is dropped (and waits for the kernel) before the rest.
    pub uring: Option<Uring>,
    /// The device id, for the log.
    pub device: String,
    pub index: u16,
    pub queue: Queue,
    pub mem: GuestMemoryMmap,
    pub interrupt: Arc<dyn Interrupt>,
    pub io: QueueIo,
    pub counters: Arc<BlockCounters>,
    pub limiters: Vec<Arc<SharedRateLimiter>>,
    /// Armed while a rate limiter holds the queue.
    pub throttle_timer: Option<TimerFd>,
    pub throttled: bool,
    /// Waiting for io_uring slots to free up.
    pub stalled: bool,
    /// Stopping for a snapshot: requests in flight finish, no new one starts.
    pub quiescing: bool,
    /// The driver broke the ring (e.g. an impossible avail index), or the
    /// worker failed: reported, then ignored until the device is reset.
    pub broken: bool,
    pub needs_signal: bool,
    /// The worker is polling the ring: leave notifications off.
    pub polling: bool,
    /// Buffered writes popped in this batch, not started yet.
    pub buffered_writes: Vec<Request>,
    /// Buffered reads popped in this batch, not started yet.
    pub buffered_reads: Vec<Request>,
    /// Moves the queue between its worker and the vCPU threads (virtio-pci).
    pub placement: Option<Placement>,
}

impl QueueHandler {
    /// Pops and starts requests until the ring is empty, a rate limiter
    /// refuses one, or io_uring is full; then signals the guest if needed.
    pub fn process_queue(&mut self) {
        if self.throttled || self.stalled || self.broken || self.quiescing {
            return;
        }
        let mut fruitless_rounds = 0;
        let mut popped_total = 0;
        loop {
            if let Err(e) = self.queue.disable_notification(&self.mem) {
                self.fail(&e);
                break;
            }
            let (popped, stop) = self.pop_requests();
            popped_total += popped;
            self.run_deferred();
            if let Some(uring) = &mut self.uring {
                uring.submit();
            }
            if stop != Stop::Empty || self.polling {
                // While the worker polls, notifications stay off.
                break;
            }
            // Re-enabling and re-checking closes the race with a driver that
            // added buffers while notifications were off.
            match self.queue.enable_notification(&self.mem) {
                Ok(false) => break,
                Ok(true) if popped == 0 => {
                    // New buffers reported, yet none can be popped.
                    fruitless_rounds += 1;
                    if fruitless_rounds > 1 {
                        self.fail(&"buffers are reported that cannot be popped");
                        break;
                    }
                }
                Ok(true) => fruitless_rounds = 0,
                Err(e) => {
                    self.fail(&e);
                    break;
                }
            }
        }
        self.signal_if_needed();
        if let Some(placement) = &mut self.placement {
            placement.record(popped_total);
        }
    }

    /// Stops serving the queue and says why (log, DEVICE_NEEDS_RESET).
    pub fn fail(&mut self, cause: &dyn std::fmt::Display) {
        if !std::mem::replace(&mut self.broken, true) {
            queue_failed(&self.device, self.index, cause, &*self.interrupt);
        }
    }

    pub fn pop_requests(&mut self) -> (usize, Stop) {
        let mut popped = 0;
        loop {
            if self.uring.as_ref().is_some_and(Uring::is_full) {
                self.stalled = true;
                return (popped, Stop::RingFull);
            }
            let chain = match pop_chain(&mut self.queue, &self.mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => return (popped, Stop::Empty),
                Err(e) => {
                    self.fail(&e);
                    return (popped, Stop::Broken);
                }
            };
            popped += 1;
            let head = chain.head_index();
            match self.io.parse(&self.mem, head, chain) {
                Parsed::Drop => self.add_used(head, 0),
                Parsed::Done {
                    status_addr,
                    status,
                } => {
                    // In guest memory: split_chain checked it.
                    let _ = self.mem.write_obj(status, status_addr);
                    self.add_used(head, 1);
                }
                Parsed::Request(request) => {
                    if let Err(wait) = self.admit(&request) {
                        if self.throttle(wait) {
                            // Left in the ring for when the timer fires.
                            self.queue.go_to_previous_position();
                            return (popped, Stop::Throttled);
                        }
                    }
                    self.start(request);
                }
            }
        }
    }

    /// Takes the request's tokens from every limiter, or from none.
    pub fn admit(&self, request: &Request) -> Result<(), Duration> {
        let bytes = request.op.data_len();
        for (index, limiter) in self.limiters.iter().enumerate() {
            if let Err(wait) = limiter.try_consume(1, bytes) {
                for earlier in &self.limiters[..index] {
                    earlier.give_back(1, bytes);
                }
                return Err(wait);
            }
        }
        Ok(())
    }

    /// Holds the queue for `wait`; false (run the request anyway) if the
    /// timer cannot be armed, rather than stalling the queue for good.
    pub fn throttle(&mut self, wait: Duration) -> bool {
        let Some(timer) = &mut self.throttle_timer else {
            return false;
        };
        // Capped: a wait past what a timespec holds would fail to arm. A
        // queue woken early is simply held again.
        match timer.reset(wait.min(MAX_THROTTLE_WAIT), None) {
            Ok(()) => self.throttled = true,
            Err(e) => {
                log::warn!(
                    "{}: queue {}: cannot arm the rate-limit timer ({e}); the request runs now",
                    self.device,
                    self.index
                );
                self.throttled = false;
            }
        }
        self.throttled
    }

    pub fn start(&mut self, request: Request) {
        // Buffered writes (either engine) and buffered reads (io_uring) wait
        // for the end of the batch, to be merged: see `run_deferred`.
        if !self.io.disk.direct {
            match request.op {
                Op::Write { .. } => return self.buffered_writes.push(request),
                Op::Read { .. } if self.uring.is_some() => {
                    return self.buffered_reads.push(request)
                }
                _ => {}
            }
        }
        self.run(request);
    }

    /// Starts `request` on io_uring, or runs it here if that is not possible.
    pub fn run(&mut self, request: Request) {
        let mut request = request;
        if let Some(uring) = &mut self.uring {
            if let Some(iovecs) = self.io.uring_iovecs(&self.mem, &request) {
                match uring.push(self.io.file.as_raw_fd(), request, iovecs) {
                    Ok(()) => return,
                    Err((returned, _)) => request = returned,
                }
            }
        }
        self.run_here(request);
    }

    pub fn run_here(&mut self, request: Request) {
        let (status, used) = self.io.execute(&self.mem, &request);
        self.finish(request, status, used);
    }

    /// The batch's deferred buffered reads and writes, in runs that continue
    /// one another on the disk (merged as QEMU merges them): fewer, larger
    /// page-cache copies, which pay on images with large folios.
    ///
    /// A run of reads is one io_uring readv (page-cache hits complete inline).
    /// A run of writes is copied here with one pwritev: io_uring would hand a
    /// buffered write to a kernel worker thread, and that hand-off (a wake-up
    /// each way, ~40 µs on the development machine) cost more than copying
    /// while this thread serves the queue gained. 128 KiB writes at depth 32
    /// went from 0.98 × to about 1.06 × QEMU; see benches/RESULTS.md.
    pub fn run_deferred(&mut self) {
        for run in contiguous_runs(std::mem::take(&mut self.buffered_reads)) {
            self.read_run(run);
        }
        for run in contiguous_runs(std::mem::take(&mut self.buffered_writes)) {
            self.write_run(run);
        }
    }

    /// Contiguous reads: one readv on io_uring, else one by one.
    pub fn read_run(&mut self, run: Vec<Request>) {
        if run.len() > 1 {
            let iovecs = self.run_iovecs(&run).filter(|v| v.0.len() <= UIO_MAXIOV);
            if let (Some(iovecs), Some(uring)) = (iovecs, &mut self.uring) {
                let fd = self.io.file.as_raw_fd();
                match uring.push_merged_reads(fd, run, iovecs) {
                    Ok(()) => return,
                    Err(returned) => return returned.into_iter().for_each(|r| self.run(r)),
                }
            }
        }
        run.into_iter().for_each(|r| self.run(r));
    }

    /// Contiguous writes: one pwritev here, all sharing its status.
    pub fn write_run(&mut self, run: Vec<Request>) {
        let offset = match run.first().map(|r| &r.op) {
            Some(Op::Write { offset, .. }) if run.len() > 1 => *offset,
            _ => return run.into_iter().for_each(|r| self.run_here(r)),
        };
        let Some(mut iovecs) = self.run_iovecs(&run) else {
            return run.into_iter().for_each(|r| self.run_here(r));
        };
        let status = match rw_vectored(&self.io.file, true, &mut iovecs.0, offset) {
            Ok(()) => STATUS_OK,
            Err(_) => STATUS_IOERR,
        };
        for request in run {
            let used = used_len(&request.op, status);
            self.finish(request, status, used);
        }
    }

    /// Host iovecs for a run of merged requests; None if one request's
    /// buffers cannot be used directly (then each runs alone).
    pub fn run_iovecs(&self, run: &[Request]) -> Option<IoVecs> {
        let mut iovecs = Vec::new();
        for request in run {
            let (Op::Read { offset, data, .. } | Op::Write { offset, data, .. }) = &request.op
            else {
                return None;
            };
            let more = guest_iovecs(&self.mem, data)?;
            if self.io.needs_bounce(*offset, &more) {
                return None;
            }
            iovecs.extend(more.0);
        }
        Some(IoVecs(iovecs))
    }

    pub fn finish(&mut self, request: Request, status: u8, used: u32) {
        // The kernel filled the buffers of a read through host iovecs: a
        // migration must see those pages as written (even a failed read may
        // have filled some).
        if let Op::Read { data, .. } = &request.op {
            for segment in data {
                crate::memory::mark_dirty(&self.mem, segment.addr, segment.len as usize);
            }
        }
        // In guest memory: split_chain checked it.
        let _ = self.mem.write_obj(status, request.status);
        if status == STATUS_OK {
            match request.op {
                Op::Read { len, .. } => self.counters.record(false, len, request.started.elapsed()),
                Op::Write { len, .. } => self.counters.record(true, len, request.started.elapsed()),
                _ => {}
            }
        }
        self.add_used(request.head, used);
    }

    pub fn add_used(&mut self, head: u16, len: u32) {
        // Fails only for a head index beyond the queue: nothing to return.
        if self.queue.add_used(&self.mem, head, len).is_ok() {
            self.needs_signal = true;
        }
    }

    pub fn signal_if_needed(&mut self) {
        if !std::mem::take(&mut self.needs_signal) {
            return;
        }
        if self.queue.needs_notification(&self.mem).unwrap_or(true) {
            if let Err(e) = self.interrupt.signal_queue(self.index) {
                log::warn!("{}: queue {} interrupt lost: {e}", self.device, self.index);
            }
        }
    }

    pub fn uring_ready(&mut self) {
        let Some(uring) = &mut self.uring else {
            return;
        };
        // Drained before reaping, so a completion racing with us re-signals.
        let _ = uring.eventfd.read();
        self.reap_completions();
    }

    /// Finishes the requests io_uring has completed.
    pub fn reap_completions(&mut self) {
        let Some(uring) = &mut self.uring else {
            return;
        };
        let completed = uring.reap();
        uring.submit();
        for (mut in_flight, result) in completed {
            let status = self.io.complete_uring(
                &in_flight.request,
                &in_flight.followers,
                &mut in_flight.iovecs,
                result,
            );
            for request in std::iter::once(in_flight.request).chain(in_flight.followers) {
                let used = used_len(&request.op, status);
                self.finish(request, status, used);
            }
        }
        self.signal_if_needed();
        if self.stalled {
            self.stalled = false;
            self.process_queue();
        }
    }

    pub fn timer_ready(&mut self) {
        if let Some(timer) = &mut self.throttle_timer {
            // Non-blocking: a stale wake-up reads EAGAIN and just re-checks.
            let _ = timer.wait();
        }
        self.throttled = false;
        self.process_queue();
    }

    /// Runs the queue and waits for its io_uring requests (tests only).
    #[cfg(test)]
    pub fn run_until_idle(&mut self) {
        self.process_queue();
        while let Some(uring) = &self.uring {
            if uring.in_flight() == 0 {
                break;
            }
            let _ = uring.ring.submit_and_wait(1);
            self.uring_ready();
        }
    }
}

impl QueueHandler {
    /// Finishes every request in flight on io_uring (used entries written,
    /// the driver signalled) and takes no new one.
    fn finish_in_flight(&mut self) {
        self.quiescing = true;
        self.run_deferred();
        while let Some(uring) = &mut self.uring {
            if uring.in_flight() == 0 {
                break;
            }
            if let Err(e) = uring.ring.submit_and_wait(1) {
                if e.kind() != io::ErrorKind::Interrupted {
                    log::error!(
                        "{}: queue {}: waiting for io_uring: {e}",
                        self.device,
                        self.index
                    );
                    break;
                }
            }
            self.uring_ready();
        }
        self.signal_if_needed();
    }
}

impl WorkerHandler for QueueHandler {
    fn quiesce(&mut self) {
        self.finish_in_flight();
    }

    fn queue_notified(&mut self, _index: usize) {
        self.process_queue();
    }

    fn failed(&mut self, cause: &io::Error) {
        self.fail(cause);
    }

    fn extra_fds(&self) -> Vec<RawFd> {
        let mut fds = Vec::new();
        if let Some(timer) = &self.throttle_timer {
            fds.push(timer.as_raw_fd());
        }
        if let Some(uring) = &self.uring {
            fds.push(uring.eventfd.as_raw_fd());
        }
        fds
    }

    fn extra_ready(&mut self, index: usize) {
        if index < usize::from(self.throttle_timer.is_some()) {
            self.timer_ready();
        } else {
            self.uring_ready();
        }
    }

    fn started(&mut self) {
        self.process_queue();
    }

    fn polls(&self) -> bool {
        true
    }

    fn poll_start(&mut self) {
        self.polling = true;
    }

    fn poll_stop(&mut self) -> bool {
        self.polling = false;
        if self.throttled || self.stalled || self.broken {
            return false;
        }
        match self.queue.enable_notification(&self.mem) {
            Ok(true) => {
                self.process_queue();
                true
            }
            Ok(false) => false,
            Err(e) => {
                self.fail(&e);
                false
            }
        }
    }

    fn poll(&mut self) -> bool {
        let mut worked = false;
        if self.uring.as_mut().is_some_and(Uring::has_completions) {
            // The eventfd stays signalled; the worker drains it later.
            self.reap_completions();
            worked = true;
        }
        if !self.throttled && !self.stalled && !self.broken {
            let pending = self
                .queue
                .avail_idx(&self.mem, std::sync::atomic::Ordering::Acquire)
                .is_ok_and(|idx| idx.0 != self.queue.next_avail());
            if pending {
                self.process_queue();
                worked = true;
            }
        }
        worked
    }
}

/// A queue's handler, shared by its worker and the vCPU threads that serve
/// the queue while it is placed on them (see `placement`).
pub struct SharedQueue {
    pub index: u16,
    handler: Mutex<QueueHandler>,
    /// Whether notifications reach the vCPU threads rather than the worker.
    on_vcpu: Arc<AtomicBool>,
    /// The worker's queue eventfd: a notification the vCPU thread leaves.
    kick: Option<vmm_sys_util::eventfd::EventFd>,
}

impl crate::pci::NotifyTarget for SharedQueue {
    fn notify(&self) {
        if !self.serve_here() {
            if let Some(kick) = &self.kick {
                let _ = kick.write(1);
            }
        }
    }
}

impl SharedQueue {
    /// `on_vcpu` is the flag `handler.placement` sets, if it has one;
    /// `kick` wakes the worker.
    pub fn new(
        handler: QueueHandler,
        on_vcpu: Arc<AtomicBool>,
        kick: Option<vmm_sys_util::eventfd::EventFd>,
    ) -> SharedQueue {
        SharedQueue {
            index: handler.index,
            handler: Mutex::new(handler),
            on_vcpu,
            kick,
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueHandler> {
        self.handler.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves a notification on the calling vCPU thread. False, without
    /// waiting, if the worker holds the queue now: then it must be kicked
    /// (it looks at the ring again once it is done).
    pub fn serve_here(&self) -> bool {
        let mut handler = match self.handler.try_lock() {
            Ok(handler) => handler,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return false,
        };
        // Notifications must end up on: the worker may be between polls,
        // and stops polling a queue placed on the vCPU threads.
        handler.polling = false;
        // What the submission completes at once (page-cache reads) is reaped
        // here: no wake-up of the worker for it. Requests still in flight
        // signal it once the eventfd is back on; reaping after that also
        // catches those that finished while it was muted.
        if let Some(uring) = &mut handler.uring {
            uring.mute_eventfd(true);
        }
        // Only a placed queue asks whether serving it here blocked the guest.
        let before = handler
            .placement
            .is_some()
            .then(|| (voluntary_switches(), Instant::now()));
        handler.process_queue();
        let served = before.map(|(slept_before, start)| (slept_before, start.elapsed()));
        if let Some(uring) = &mut handler.uring {
            uring.mute_eventfd(false);
            if uring.has_completions() {
                handler.reap_completions();
            }
        }
        if let (Some((Some(slept_before), wall)), Some(placement)) =
            (served, &mut handler.placement)
        {
            if let Some(slept_after) = voluntary_switches() {
                placement.served_on_vcpu(wall, slept_after > slept_before);
            }
        }
        true
    }

    #[cfg(test)]
    pub fn lock_for_test(&self) -> MutexGuard<'_, QueueHandler> {
        self.lock()
    }
}

/// How many times the calling thread has given up its CPU (blocked or
/// slept) rather than been preempted.
fn voluntary_switches() -> Option<i64> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage fills `usage` for the calling thread.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, usage.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: initialised by the successful call above.
    Some(unsafe { usage.assume_init() }.ru_nvcsw)
}

/// The worker's side of a [`SharedQueue`].
pub struct QueueWorker(pub Arc<SharedQueue>);

impl WorkerHandler for QueueWorker {
    fn quiesce(&mut self) {
        self.0.lock().quiesce();
    }

    fn queue_notified(&mut self, index: usize) {
        self.0.lock().queue_notified(index);
    }

    fn failed(&mut self, cause: &io::Error) {
        self.0.lock().failed(cause);
    }

    fn extra_fds(&self) -> Vec<RawFd> {
        self.0.lock().extra_fds()
    }

    fn extra_ready(&mut self, index: usize) {
        self.0.lock().extra_ready(index);
    }

    fn started(&mut self) {
        self.0.lock().started();
    }

    fn polls(&self) -> bool {
        true
    }

    fn poll_start(&mut self) {
        if !self.0.on_vcpu.load(Ordering::Relaxed) {
            self.0.lock().poll_start();
        }
    }

    fn poll_stop(&mut self) -> bool {
        self.0.lock().poll_stop()
    }

    fn poll(&mut self) -> bool {
        // The vCPU threads serve the ring; completions still wake the worker.
        if self.0.on_vcpu.load(Ordering::Relaxed) {
            return false;
        }
        self.0.lock().poll()
    }
}
