//! Test helpers shared by the device tests.

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::ActiveQueue;

/// A ready queue `index` of `size` entries with its descriptor table at
/// `base`, available ring at `base + 0x1000`, used ring at `base + 0x2000`;
/// and the eventfd that kicks it.
pub fn ready_queue(
    memory: &GuestMemoryMmap,
    index: u16,
    base: u64,
    size: u16,
) -> (ActiveQueue, EventFd) {
    let mut queue = Queue::new(size).unwrap();
    queue
        .try_set_desc_table_address(GuestAddress(base))
        .unwrap();
    queue
        .try_set_avail_ring_address(GuestAddress(base + 0x1000))
        .unwrap();
    queue
        .try_set_used_ring_address(GuestAddress(base + 0x2000))
        .unwrap();
    queue.set_ready(true);
    assert!(queue.is_valid(memory));
    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let active = ActiveQueue {
        index,
        queue,
        kick: kick.try_clone().unwrap(),
    };
    (active, kick)
}
