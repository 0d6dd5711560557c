//! A hostile driver: lays out split virtqueues (descriptor tables, available
//! and used rings, buffers, indirect tables) in guest memory as the fuzz
//! input says, and checks what the device left in the used rings.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmkit_vmm::memory::GuestMemoryMmap;
use vmkit_vmm::virtio::ActiveQueue;
use vmm_sys_util::eventfd::EventFd;

use crate::input::Input;

/// 1 MiB of guest RAM from address 0: rings low, buffers above.
pub const MEM_SIZE: u64 = 0x10_0000;
/// Queue `q`'s rings: descriptors at +0, available at +0x1000, used at +0x2000.
const RING_BASE: u64 = 0x1000;
const RING_STRIDE: u64 = 0x4000;
/// Indirect descriptor tables (16 of 256 bytes).
const TABLES: u64 = 0x2_0000;
/// Buffers.
const DATA: u64 = 0x3_0000;
const DATA_SIZE: u64 = MEM_SIZE - DATA;

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT: u16 = 4;

pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
        .expect("1 MiB of guest memory")
}

/// One queue as the hostile driver sees it.
pub struct Ring {
    pub size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    avail_idx: u16,
    /// Chains made available in order (no raw index games).
    published: u32,
    /// The driver wrote the available index itself: counts prove nothing.
    raw_index: bool,
    kick: EventFd,
}

impl Ring {
    pub fn new(index: u16, size: u16) -> Ring {
        let base = RING_BASE + RING_STRIDE * u64::from(index);
        Ring {
            size,
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            avail_idx: 0,
            published: 0,
            raw_index: false,
            kick: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        }
    }

    /// The queue as the transport hands it to the device at DRIVER_OK.
    pub fn active(&self, memory: &GuestMemoryMmap, index: u16, event_idx: bool) -> ActiveQueue {
        let mut queue = Queue::new(self.size).expect("queue size");
        queue.set_size(self.size);
        queue
            .try_set_desc_table_address(GuestAddress(self.desc))
            .expect("aligned");
        queue
            .try_set_avail_ring_address(GuestAddress(self.avail))
            .expect("aligned");
        queue
            .try_set_used_ring_address(GuestAddress(self.used))
            .expect("aligned");
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        assert!(queue.is_valid(memory));
        ActiveQueue {
            index,
            queue,
            kick: self.kick.try_clone().expect("eventfd clone"),
        }
    }

    pub fn kick(&self) {
        let _ = self.kick.write(1);
    }

    /// Writes descriptor `index` of the ring's own table.
    fn descriptor(&self, memory: &GuestMemoryMmap, table: u64, index: u16, d: [u64; 4]) {
        let at = table + 16 * u64::from(index);
        let _ = memory.write_obj(d[0], GuestAddress(at));
        let _ = memory.write_obj(d[1] as u32, GuestAddress(at + 8));
        let _ = memory.write_obj(d[2] as u16, GuestAddress(at + 12));
        let _ = memory.write_obj(d[3] as u16, GuestAddress(at + 14));
    }

    fn publish(&mut self, memory: &GuestMemoryMmap, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        let _ = memory.write_obj(head, GuestAddress(slot));
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.published += 1;
        let _ = memory.write_obj(self.avail_idx, GuestAddress(self.avail + 2));
    }

    fn used_idx(&self, memory: &GuestMemoryMmap) -> u16 {
        memory
            .read_obj(GuestAddress(self.used + 2))
            .expect("used ring in memory")
    }

    /// What a device may have done to the used ring: never more used
    /// entries than chains made available, and every entry names a
    /// descriptor of the ring.
    pub fn check(&self, memory: &GuestMemoryMmap) {
        let used = self.used_idx(memory);
        if std::env::var_os("VMKIT_FUZZ_DEBUG").is_some() {
            eprintln!(
                "ring at {:#x}: {} chains made available, {used} used",
                self.desc, self.published
            );
        }
        if !self.raw_index && self.published < 0x8000 {
            assert!(
                u32::from(used) <= self.published,
                "{used} used entries for {} chains",
                self.published
            );
        }
        let entries = if self.raw_index {
            self.size
        } else {
            used.min(self.size)
        };
        for i in 0..entries {
            let at = self.used + 4 + 8 * u64::from(i);
            let id: u32 = memory.read_obj(GuestAddress(at)).expect("used ring");
            if !self.raw_index && i < used {
                assert!(
                    id < u32::from(self.size),
                    "used entry {i} names descriptor {id}"
                );
            }
        }
    }
}

/// Whether a buffer at [addr, addr + len) covers any ring or indirect
/// table: a device then writes there because the driver asked it to, and
/// the rings may hold anything afterwards.
fn covers_rings(addr: u64, len: u32) -> bool {
    addr < TABLES + 16 * 256 && addr.saturating_add(u64::from(len)) > RING_BASE
}

/// Whether descriptor (addr, len, flags) may let the device's own output
/// become descriptors: a buffer over the rings or tables, or an indirect
/// table outside the tables area (in buffers the device may have filled).
fn clobbers(addr: u64, len: u32, flags: u16) -> bool {
    let table_outside = flags & INDIRECT != 0 && !(TABLES..TABLES + 16 * 256).contains(&addr);
    covers_rings(addr, len) || table_outside
}

/// What one fuzz input does to a device's queues.
pub trait Device {
    /// Processes what is pending (runs the inline workers).
    fn run(&mut self);
    /// A device-specific action decoded from `input` (host input, frames).
    fn action(&mut self, input: &mut Input<'_>);
}

/// Plays the input's driver actions on `rings` against `device`, then
/// lets the device finish and checks the used rings.
pub fn play(
    memory: &GuestMemoryMmap,
    rings: &mut [Ring],
    device: &mut dyn Device,
    input: &mut Input<'_>,
) {
    let count = rings.len();
    let mut steps = 0;
    // A buffer over the rings lets the device overwrite them (rng bytes,
    // frames, input), and an indirect table in a buffer lets device output
    // become descriptors: what the used rings hold proves nothing then.
    let mut clobbered = false;
    while !input.is_empty() && steps < 512 {
        steps += 1;
        let op = input.u8();
        let ring = &mut rings[usize::from(op >> 4) % count];
        match op & 0xf {
            // A descriptor in the ring's table, linked to the next by default.
            0..=4 => {
                let index = u16::from(input.u8()) % ring.size;
                let addr = addr(input);
                let len = len(input);
                let flags = flags(input);
                clobbered |= clobbers(addr, len, flags);
                let next = if input.u8() < 192 {
                    (index + 1) % ring.size
                } else {
                    u16::from(input.u8())
                };
                ring.descriptor(
                    memory,
                    ring.desc,
                    index,
                    [addr, len.into(), flags.into(), next.into()],
                );
            }
            5 | 6 => {
                let head = u16::from(input.u8()) % ring.size;
                ring.publish(memory, head);
            }
            7 => {
                ring.kick();
                device.run();
            }
            // Buffer contents (request headers, frames, control commands).
            8 | 9 => {
                let at = DATA + u64::from(input.u16()) * 8 % DATA_SIZE;
                let len = usize::from(input.u8());
                let _ = memory.write_slice(input.bytes(len), GuestAddress(at));
            }
            // A descriptor of an indirect table.
            10 => {
                let table = TABLES + 256 * u64::from(input.u8() % 16);
                let index = u16::from(input.u8() % 16);
                let addr = addr(input);
                let len = len(input);
                let flags = flags(input);
                clobbered |= clobbers(addr, len, flags);
                let next = u16::from(input.u8() % 20);
                ring.descriptor(
                    memory,
                    table,
                    index,
                    [addr, len.into(), flags.into(), next.into()],
                );
            }
            // The driver's own index: anything, even more than a ring ahead.
            11 => {
                ring.avail_idx = input.u16();
                ring.raw_index = true;
                let _ = memory.write_obj(ring.avail_idx, GuestAddress(ring.avail + 2));
            }
            // used_event (EVENT_IDX) and the available ring's flags.
            12 => {
                let at = ring.avail + 4 + 2 * u64::from(ring.size);
                let _ = memory.write_obj(input.u16(), GuestAddress(at));
                let _ = memory.write_obj(input.u16() & 1, GuestAddress(ring.avail));
            }
            _ => device.action(input),
        }
    }
    for ring in rings.iter() {
        ring.kick();
    }
    device.run();
    if !clobbered {
        for ring in rings.iter() {
            ring.check(memory);
        }
    }
}

/// Decodes an address: mostly inside the buffer area, sometimes at the
/// edges of guest memory or far outside it.
pub fn addr(input: &mut Input<'_>) -> u64 {
    match input.u8() % 16 {
        0..=9 => DATA + u64::from(input.u16()) * 8 % DATA_SIZE,
        10 | 11 => TABLES + 16 * u64::from(input.u8()),
        12 => MEM_SIZE - u64::from(input.u8()),
        13 => RING_BASE + u64::from(input.u16()),
        14 => MEM_SIZE + u64::from(input.u16()),
        _ => input.u64(),
    }
}

pub fn len(input: &mut Input<'_>) -> u32 {
    match input.u8() % 8 {
        0 => 0,
        1 => 16,
        2 => 512 * u32::from(input.u8() % 9),
        3 => u32::from(input.u8()),
        4 => u32::from(input.u16()),
        5 => 1,
        6 => u32::MAX - u32::from(input.u8()),
        _ => input.u32(),
    }
}

pub fn flags(input: &mut Input<'_>) -> u16 {
    input.u8() as u16 & (NEXT | WRITE | INDIRECT)
}
