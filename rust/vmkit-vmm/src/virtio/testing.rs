//! The device test kit: guest memory, a fake interrupt that records what a
//! device signalled, and a driver that fills split rings the way a guest
//! driver does. Every device's tests use these.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, Once};
use std::time::{Duration, Instant};

use crate::memory::GuestMemoryMmap;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::{ActiveQueue, Interrupt};

pub const NEXT: u16 = VRING_DESC_F_NEXT as u16;
pub const WRITE: u16 = VRING_DESC_F_WRITE as u16;
pub const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

/// `size` bytes of guest RAM from address 0.
pub fn guest_memory(size: u64) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap()
}

/// Polls `done` for up to 10 s.
pub fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// `log` records of this test binary, from every thread once captured.
static LOGS: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct CaptureLogger;

impl log::Log for CaptureLogger {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let line = format!("{} {}", record.level(), record.args());
        LOGS.lock().unwrap_or_else(|p| p.into_inner()).push(line);
    }

    fn flush(&self) {}
}

/// Captures `log` records from now on (for the whole test binary: tests
/// look for lines naming their own device).
pub fn capture_logs() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        log::set_logger(&CaptureLogger).unwrap();
        log::set_max_level(log::LevelFilter::Trace);
    });
}

/// Captured lines ("LEVEL text") that contain `needle`.
pub fn logged(needle: &str) -> Vec<String> {
    let logs = LOGS.lock().unwrap_or_else(|p| p.into_inner());
    logs.iter()
        .filter(|l| l.contains(needle))
        .cloned()
        .collect()
}

/// Records every signal a device sends, and whether it asked for a reset.
#[derive(Default)]
pub struct FakeInterrupt {
    signals: Mutex<Vec<u16>>,
    signalled: Condvar,
    config_signals: AtomicUsize,
    needs_reset: AtomicUsize,
}

impl Interrupt for FakeInterrupt {
    fn signal_queue(&self, queue: u16) -> std::io::Result<()> {
        self.signals.lock().unwrap().push(queue);
        self.signalled.notify_all();
        Ok(())
    }

    fn signal_config(&self) -> std::io::Result<()> {
        self.config_signals.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn signal_needs_reset(&self) -> std::io::Result<()> {
        self.needs_reset.fetch_add(1, Ordering::SeqCst);
        self.signal_config()
    }
}

impl FakeInterrupt {
    /// Used-buffer notifications for `queue`.
    pub fn count(&self, queue: u16) -> usize {
        self.signals
            .lock()
            .unwrap()
            .iter()
            .filter(|&&q| q == queue)
            .count()
    }

    /// Used-buffer notifications for any queue.
    pub fn total(&self) -> usize {
        self.signals.lock().unwrap().len()
    }

    /// Configuration-change notifications.
    pub fn config_count(&self) -> usize {
        self.config_signals.load(Ordering::SeqCst)
    }

    /// How often the device asked for DEVICE_NEEDS_RESET.
    pub fn needs_reset_count(&self) -> usize {
        self.needs_reset.load(Ordering::SeqCst)
    }
}

/// The driver's side of a split queue, writing guest memory directly.
pub struct Driver {
    pub mem: GuestMemoryMmap,
    pub size: u16,
    pub desc_table: u64,
    pub avail: u64,
    pub used: u64,
    pub next_desc: u16,
    avail_idx: u16,
    /// Used entries already looked at by `next_used`.
    seen: u16,
    heap: u64,
    heap_end: u64,
    /// Written on every `publish` once `activate` made it.
    kick: Option<EventFd>,
}

impl Driver {
    /// Rings from `base` (descriptors, available at +0x8000, used at
    /// +0xa000) and a heap for buffers at +0x10000..+0x70000.
    pub fn new(mem: &GuestMemoryMmap, size: u16, base: u64) -> Driver {
        assert!(size <= 1024);
        Driver {
            mem: mem.clone(),
            size,
            desc_table: base,
            avail: base + 0x8000,
            used: base + 0xa000,
            next_desc: 0,
            avail_idx: 0,
            seen: 0,
            heap: base + 0x1_0000,
            heap_end: base + 0x7_0000,
            kick: None,
        }
    }

    /// Rings in three pages from `base` (descriptors, available at +0x1000,
    /// used at +0x2000) and no heap: the test places its buffers.
    pub fn small(mem: &GuestMemoryMmap, size: u16, base: u64) -> Driver {
        assert!(size <= 256);
        Driver {
            avail: base + 0x1000,
            used: base + 0x2000,
            heap: base + 0x3000,
            heap_end: base + 0x3000,
            ..Driver::new(mem, size, base)
        }
    }

    /// The device's view of the queue: ready, addresses set.
    pub fn queue(&self, event_idx: bool) -> Queue {
        let mut queue = Queue::new(self.size).unwrap();
        queue.set_size(self.size);
        queue
            .try_set_desc_table_address(GuestAddress(self.desc_table))
            .unwrap();
        queue
            .try_set_avail_ring_address(GuestAddress(self.avail))
            .unwrap();
        queue
            .try_set_used_ring_address(GuestAddress(self.used))
            .unwrap();
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        assert!(queue.is_valid(&self.mem));
        queue
    }

    /// The queue as activation hands it over (index `index`); from now on
    /// every `publish` kicks it.
    pub fn activate(&mut self, index: u16, event_idx: bool) -> ActiveQueue {
        let kick = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).unwrap();
        self.kick = Some(kick.try_clone().unwrap());
        ActiveQueue {
            index,
            queue: self.queue(event_idx),
            kick,
        }
    }

    /// Notifies the device (a no-op before `activate`).
    pub fn kick(&self) {
        if let Some(kick) = &self.kick {
            kick.write(1).unwrap();
        }
    }

    pub fn alloc(&mut self, len: u64, align: u64) -> u64 {
        let at = self.heap.next_multiple_of(align);
        self.heap = at + len;
        assert!(self.heap <= self.heap_end, "test heap exhausted");
        at
    }

    pub fn write(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }

    pub fn read(&self, addr: u64, len: u64) -> Vec<u8> {
        let mut data = vec![0u8; len as usize];
        self.mem.read_slice(&mut data, GuestAddress(addr)).unwrap();
        data
    }

    pub fn byte(&self, addr: u64) -> u8 {
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }

    /// The same driver writing descriptors into the table at `table`.
    pub fn with_table(&self, table: u64) -> Driver {
        Driver {
            mem: self.mem.clone(),
            desc_table: table,
            kick: None,
            ..*self
        }
    }

    /// Writes descriptor `index` of the driver's own table.
    pub fn desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.set_desc(self.desc_table, index, addr, len, flags, next);
    }

    pub fn set_desc(&self, table: u64, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let descriptor = Descriptor::new(addr, len, flags, next);
        self.mem
            .write_obj(descriptor, GuestAddress(table + 16 * u64::from(index)))
            .unwrap();
    }

    /// Makes chain `head` available (and kicks, once activated).
    pub fn publish(&mut self, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
        self.kick();
    }

    /// Writes (addr, len, flags) as consecutive linked descriptors and
    /// makes the chain available.
    pub fn add_chain(&mut self, parts: &[(u64, u32, u16)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, flags)) in parts.iter().enumerate() {
            let index = (head + i as u16) % self.size;
            let flags = if i + 1 == parts.len() {
                flags
            } else {
                flags | NEXT
            };
            self.set_desc(
                self.desc_table,
                index,
                addr,
                len,
                flags,
                (index + 1) % self.size,
            );
        }
        self.next_desc = (head + parts.len() as u16) % self.size;
        self.publish(head);
        head
    }

    /// Puts the chain in an indirect table behind one descriptor.
    pub fn add_indirect(&mut self, parts: &[(u64, u32, u16)]) -> u16 {
        let table = self.alloc(16 * parts.len() as u64, 16);
        for (i, &(addr, len, flags)) in parts.iter().enumerate() {
            let flags = if i + 1 == parts.len() {
                flags
            } else {
                flags | NEXT
            };
            self.set_desc(table, i as u16, addr, len, flags, i as u16 + 1);
        }
        self.add_chain(&[(table, 16 * parts.len() as u32, INDIRECT)])
    }

    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// (head, length) of used entry `i`.
    pub fn used_entry(&self, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(i % self.size);
        (
            self.mem.read_obj(GuestAddress(at)).unwrap(),
            self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }

    pub fn last_used(&self) -> (u32, u32) {
        self.used_entry(self.used_idx().wrapping_sub(1))
    }

    /// Waits (up to 5 s) for the next used entry: (head, length).
    pub fn next_used(&mut self) -> (u16, u32) {
        let start = Instant::now();
        while self.used_idx() == self.seen {
            assert!(start.elapsed() < Duration::from_secs(5), "no used buffer");
            std::thread::sleep(Duration::from_millis(1));
        }
        let (head, len) = self.used_entry(self.seen);
        self.seen = self.seen.wrapping_add(1);
        (head as u16, len)
    }

    /// Used entries `next_used` has returned so far.
    pub fn seen(&self) -> u16 {
        self.seen
    }

    /// No new used entry within `wait`.
    pub fn assert_idle(&self, wait: Duration) {
        std::thread::sleep(wait);
        assert_eq!(self.used_idx(), self.seen, "unexpected used buffer");
    }

    pub fn set_used_event(&self, value: u16) {
        let at = self.avail + 4 + 2 * u64::from(self.size);
        self.mem.write_obj(value, GuestAddress(at)).unwrap();
    }

    pub fn avail_event(&self) -> u16 {
        let at = self.used + 4 + 8 * u64::from(self.size);
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }
}
