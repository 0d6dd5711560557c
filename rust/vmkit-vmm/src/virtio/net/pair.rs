//! One queue pair's worker: its receive and transmit queues, its tap queue,
//! its timers and, for the first pair, the control queue.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use crate::memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{Epoll, EpollEvent};

use super::counters::NetCounters;
use super::ctrl::CtrlQueue;
use super::rx::RxQueue;
use super::tap::Tap;
use super::timer::Timer;
use super::tx::TxQueue;
use crate::error::chain_message;
use crate::virtio::worker::WorkerHandler;
use crate::virtio::{queue_failed, Interrupt};
use virtio_queue::QueueT;

/// Why a queue of a pair stopped.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("the driver broke the ring")]
    Ring(#[from] virtio_queue::Error),
    #[error("cannot arm the queue's timer")]
    Timer(#[source] io::Error),
    #[error("cannot take the tap's readiness edge")]
    TapEvents(#[source] io::Error),
}

/// What a queue pair's queues share: guest memory, the interrupt, the tap
/// queue, the timers and the counters.
pub struct PairContext {
    /// The device id, for the log.
    pub device: String,
    pub memory: GuestMemoryMmap,
    pub interrupt: Arc<dyn Interrupt>,
    pub tap: Arc<Tap>,
    pub rx_timer: Timer,
    pub tx_timer: Timer,
    pub counters: Arc<NetCounters>,
}

impl PairContext {
    /// A used-buffer notification; one that cannot be delivered is logged.
    pub fn signal(&self, queue: u16) {
        if let Err(e) = self.interrupt.signal_queue(queue) {
            log::warn!("{}: queue {queue} interrupt lost: {e}", self.device);
        }
    }

    fn queue_failed(&self, queue: u16, cause: &(dyn std::error::Error + 'static)) {
        queue_failed(&self.device, queue, &chain_message(cause), &*self.interrupt);
    }
}

#[derive(Clone, Copy)]
pub enum Role {
    Rx,
    Tx,
    Ctrl,
}

/// One queue pair's worker: its rx and tx queues, its tap queue and, for
/// the first pair, the control queue. A queue that fails is reported and
/// dropped; the others go on until the driver resets the device.
pub struct PairHandler {
    pub ctx: PairContext,
    pub rx: Option<RxQueue>,
    pub tx: Option<TxQueue>,
    pub ctrl: Option<CtrlQueue>,
    /// Which queue each kick (by position) belongs to.
    pub roles: Vec<Role>,
    /// The tap, edge-triggered: readable once per new frame, so a tap with
    /// frames we have no room for does not keep the worker spinning.
    pub tap_events: Epoll,
}

impl PairHandler {
    fn rx(&mut self) {
        let Some(rx) = self.rx.as_mut().filter(|rx| !rx.throttled) else {
            return;
        };
        if let Err(e) = rx.process(&self.ctx) {
            self.ctx.queue_failed(rx.index, &e);
            self.drop_rx();
        }
    }

    fn drop_rx(&mut self) {
        if self.rx.take().is_some_and(|rx| rx.len > 0) {
            NetCounters::add(&self.ctx.counters.rx_dropped, 1);
        }
    }

    fn tx(&mut self) {
        let Some(tx) = self.tx.as_mut() else {
            return;
        };
        if let Err(e) = tx.process(&self.ctx) {
            self.ctx.queue_failed(tx.index, &e);
            if self.tx.take().is_some_and(|tx| tx.pending.is_some()) {
                NetCounters::add(&self.ctx.counters.tx_dropped, 1);
            }
        }
    }

    fn ctrl(&mut self) {
        let Some(ctrl) = self.ctrl.as_mut() else {
            return;
        };
        if let Err(e) = ctrl.process(&self.ctx) {
            self.ctx.queue_failed(ctrl.index, &e);
            self.ctrl = None;
        }
    }
}

impl WorkerHandler for PairHandler {
    /// For a snapshot: a frame waiting for receive buffers, or held back by
    /// the transmit rate limiter, is dropped, and the chains it took go back
    /// to the guest empty, so that every chain taken has been given back.
    fn quiesce(&mut self) {
        let memory = &self.ctx.memory;
        if let Some(rx) = self.rx.as_mut() {
            let held = std::mem::take(&mut rx.held);
            rx.held_bytes = 0;
            if rx.len > 0 {
                rx.len = 0;
                NetCounters::add(&self.ctx.counters.rx_dropped, 1);
            }
            if !held.is_empty() {
                for (head, _) in held {
                    let _ = rx.queue.add_used(memory, head, 0);
                }
                self.ctx.signal(rx.index);
            }
        }
        if let Some(tx) = self.tx.as_mut() {
            if let Some((head, _, _)) = tx.pending.take() {
                NetCounters::add(&self.ctx.counters.tx_dropped, 1);
                let _ = tx.queue.add_used(memory, head, 0);
                self.ctx.signal(tx.index);
            }
        }
    }

    fn queue_notified(&mut self, index: usize) {
        match self.roles.get(index) {
            Some(Role::Rx) => self.rx(),
            // While a frame is held back, the timer resumes the queue.
            Some(Role::Tx) if self.tx.as_ref().is_some_and(|tx| tx.pending.is_none()) => self.tx(),
            Some(Role::Ctrl) => self.ctrl(),
            _ => {}
        }
    }

    fn failed(&mut self, cause: &io::Error) {
        let queues = [
            self.rx.as_ref().map(|q| q.index),
            self.tx.as_ref().map(|q| q.index),
            self.ctrl.as_ref().map(|q| q.index),
        ];
        for queue in queues.into_iter().flatten() {
            self.ctx.queue_failed(queue, cause);
        }
    }

    fn extra_fds(&self) -> Vec<RawFd> {
        vec![
            self.tap_events.as_raw_fd(),
            self.ctx.rx_timer.as_raw_fd(),
            self.ctx.tx_timer.as_raw_fd(),
        ]
    }

    fn extra_ready(&mut self, index: usize) {
        match index {
            0 => {
                // Consumes the edge, so the outer epoll stops reporting it;
                // if that fails it would report it for ever.
                let mut events = [EpollEvent::default(); 4];
                if let Err(e) = self.tap_events.wait(0, &mut events) {
                    if let Some(rx) = &self.rx {
                        self.ctx.queue_failed(rx.index, &QueueError::TapEvents(e));
                    }
                    self.drop_rx();
                    return;
                }
                self.rx();
            }
            1 => {
                self.ctx.rx_timer.clear();
                if let Some(rx) = self.rx.as_mut() {
                    rx.throttled = false;
                }
                self.rx();
            }
            _ => {
                self.ctx.tx_timer.clear();
                self.tx();
            }
        }
    }

    fn started(&mut self) {
        self.ctrl();
        self.tx();
        self.rx();
    }
}

impl Drop for PairHandler {
    fn drop(&mut self) {
        if self.rx.as_ref().is_some_and(|rx| rx.len > 0) {
            NetCounters::add(&self.ctx.counters.rx_dropped, 1);
        }
        if self.tx.as_ref().is_some_and(|tx| tx.pending.is_some()) {
            NetCounters::add(&self.ctx.counters.tx_dropped, 1);
        }
    }
}
