//! virtio-mem (virtio 1.2 §5.15), as Cloud Hypervisor v37 offers it: one
//! device per memory zone with `hotplug_size`, over a region of guest
//! physical memory past boot RAM that the guest plugs and unplugs in blocks
//! of 2 MiB. The host sets how much it wants plugged (`requested_size`, from
//! `hotplugged_size`, `vm.resize-zone` and `vm.resize {"desired_ram"}`); the
//! driver plugs or unplugs blocks with requests on the device's one queue.
//!
//! Everything in a request comes from the guest: every address, size and
//! block count is checked against the region and the plugged-block bitmap,
//! and each request gets a defined answer (ACK, NACK or ERROR), never a
//! stopped queue. An unplugged block is given back to the host (dropped from
//! a private mapping, removed from a shared file), so it reads as zeros when
//! it is plugged again.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::worker::{self, Worker, WorkerHandler};
use super::{
    drain_queue, read_config_bytes, ActivateError, Activation, Interrupt, OneQueueSignals,
    VirtioDevice, F_VERSION_1,
};
use crate::error::{ErrorKind, ModuleError, Result};
use crate::memory::{GuestMemoryMmap, RegionBacking};
use crate::seccomp::ThreadKind;

pub const TYPE_MEM: u32 = 24;
const QUEUE_SIZE: u16 = 128;

/// The region's alignment and the multiple its size must be (Linux's memory
/// block size, which Cloud Hypervisor requires).
pub const REGION_ALIGNMENT: u64 = 128 << 20;
/// Cloud Hypervisor's block size: 2 MiB, so the host can back blocks with
/// transparent huge pages.
pub const BLOCK_SIZE: u64 = 2 << 20;

/// The config's `node_id` is valid (the zone belongs to a NUMA node).
pub const F_ACPI_PXM: u64 = 1 << 0;

/// Request types (virtio 1.2 §5.15.6).
pub const REQ_PLUG: u16 = 0;
pub const REQ_UNPLUG: u16 = 1;
pub const REQ_UNPLUG_ALL: u16 = 2;
pub const REQ_STATE: u16 = 3;
/// Response types.
pub const RESP_ACK: u16 = 0;
pub const RESP_NACK: u16 = 1;
pub const RESP_BUSY: u16 = 2;
pub const RESP_ERROR: u16 = 3;
/// States in a STATE response.
pub const STATE_PLUGGED: u16 = 0;
pub const STATE_UNPLUGGED: u16 = 1;
pub const STATE_MIXED: u16 = 2;

/// `struct virtio_mem_req`: type, 3 × padding, addr, nb_blocks, 3 × padding.
pub const REQUEST_SIZE: u32 = 24;
/// `struct virtio_mem_resp` as Cloud Hypervisor sizes it: type, 3 ×
/// padding, state.
pub const RESPONSE_SIZE: u32 = 10;

/// Configuration space: block_size, node_id (+6 padding), addr,
/// region_size, usable_region_size, plugged_size, requested_size.
const CONFIG_SIZE: usize = 56;

/// The device state's format (`save_device_state`).
const STATE_VERSION: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum VirtioMemError {
    #[error("Virtio-mem size is not aligned with {REGION_ALIGNMENT}")]
    RegionSize,
    #[error("virtio-mem region at {addr:#x} is not aligned on {REGION_ALIGNMENT:#x}")]
    RegionAddress { addr: u64 },
    /// Cloud Hypervisor's texts for a refused new `requested_size`.
    #[error("new size {size:#x} and requested_size are identical")]
    Identical { size: u64 },
    #[error("new size {size:#x} is bigger than region_size {region:#x}")]
    TooBig { size: u64, region: u64 },
    #[error("new size {size:#x} is not aligned on block_size {BLOCK_SIZE:#x}")]
    Unaligned { size: u64 },
    #[error("Failed to signal the guest about resize: {0}")]
    SignalConfig(#[source] io::Error),
}

impl ModuleError for VirtioMemError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Device
    }
}

/// What the host and the driver change, shared by the device (vCPU
/// threads), its worker and its control handle (API threads).
struct State {
    requested_size: u64,
    plugged_size: u64,
    /// One bit per block: plugged.
    plugged: Vec<u64>,
}

impl State {
    fn is_plugged(&self, block: usize) -> bool {
        self.plugged[block / 64] & (1 << (block % 64)) != 0
    }

    fn set(&mut self, block: usize, plugged: bool) {
        let word = &mut self.plugged[block / 64];
        if plugged {
            *word |= 1 << (block % 64);
        } else {
            *word &= !(1 << (block % 64));
        }
    }

    /// Whether every block of `blocks` is `plugged`.
    fn all(&self, blocks: std::ops::Range<usize>, plugged: bool) -> bool {
        blocks.into_iter().all(|b| self.is_plugged(b) == plugged)
    }
}

struct Shared {
    id: String,
    addr: u64,
    region_size: u64,
    node_id: Option<u16>,
    state: Mutex<State>,
    /// The active device's interrupt: a new requested size is signalled
    /// through it.
    interrupt: Mutex<Option<Arc<dyn Interrupt>>>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn blocks(&self) -> usize {
        (self.region_size / BLOCK_SIZE) as usize
    }
}

/// Sets how much the host wants plugged, and reads what is, from any thread.
#[derive(Clone)]
pub struct VirtioMemControl {
    shared: Arc<Shared>,
}

impl VirtioMemControl {
    /// Asks the guest to plug `size` bytes of the region (Cloud Hypervisor's
    /// `resize`): refused when it is what is requested already, larger than
    /// the region or not a whole number of blocks. An active driver is told
    /// at once (a configuration change).
    pub fn resize(&self, size: u64) -> std::result::Result<(), VirtioMemError> {
        {
            let mut state = self.shared.state();
            check_size(size, state.requested_size, self.shared.region_size)?;
            state.requested_size = size;
        }
        let interrupt = self
            .shared
            .interrupt
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(interrupt) = interrupt {
            interrupt
                .signal_config()
                .map_err(VirtioMemError::SignalConfig)?;
        }
        log::info!("{}: requested size {size:#x}", self.shared.id);
        Ok(())
    }

    pub fn requested_size(&self) -> u64 {
        self.shared.state().requested_size
    }

    pub fn plugged_size(&self) -> u64 {
        self.shared.state().plugged_size
    }

    pub fn region(&self) -> (u64, u64) {
        (self.shared.addr, self.shared.region_size)
    }

    /// The region's blocks the guest has not plugged, as (guest address,
    /// length) runs: a snapshot or migration leaves them out, and a restored
    /// VM gives them back to the host.
    pub fn unplugged(&self) -> Vec<(u64, u64)> {
        let shared = &self.shared;
        let state = shared.state();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for block in (0..shared.blocks()).filter(|&b| !state.is_plugged(b)) {
            let addr = shared.addr + block as u64 * BLOCK_SIZE;
            match runs.last_mut() {
                Some(last) if last.0 + last.1 == addr => last.1 += BLOCK_SIZE,
                _ => runs.push((addr, BLOCK_SIZE)),
            }
        }
        runs
    }
}

fn check_size(size: u64, requested: u64, region: u64) -> std::result::Result<(), VirtioMemError> {
    if size == requested {
        Err(VirtioMemError::Identical { size })
    } else if size > region {
        Err(VirtioMemError::TooBig { size, region })
    } else if !size.is_multiple_of(BLOCK_SIZE) {
        Err(VirtioMemError::Unaligned { size })
    } else {
        Ok(())
    }
}

/// Where the device's region is and how the host holds its pages.
#[derive(Debug, Clone, Copy)]
pub struct MemRegion {
    /// Guest address and size of the region (in guest memory, past RAM).
    pub addr: u64,
    pub size: u64,
    pub backing: RegionBacking,
}

/// The virtio-mem device of one memory zone.
pub struct VirtioMem {
    control: VirtioMemControl,
    backing: RegionBacking,
    worker: Option<Worker>,
}

impl VirtioMem {
    /// The device over `region`, asking for `requested_size` plugged at
    /// start (the zone's `hotplugged_size`); `node_id` is the NUMA node of
    /// its zone.
    pub fn new(
        id: String,
        region: MemRegion,
        node_id: Option<u16>,
        requested_size: u64,
    ) -> Result<VirtioMem> {
        if region.size == 0 || !region.size.is_multiple_of(REGION_ALIGNMENT) {
            return Err(VirtioMemError::RegionSize.into());
        }
        if !region.addr.is_multiple_of(REGION_ALIGNMENT) {
            return Err(VirtioMemError::RegionAddress { addr: region.addr }.into());
        }
        if requested_size != 0 {
            check_size(requested_size, 0, region.size)?;
        }
        let blocks = (region.size / BLOCK_SIZE) as usize;
        let shared = Shared {
            id,
            addr: region.addr,
            region_size: region.size,
            node_id,
            state: Mutex::new(State {
                requested_size,
                plugged_size: 0,
                plugged: vec![0; blocks.div_ceil(64)],
            }),
            interrupt: Mutex::new(None),
        };
        Ok(VirtioMem {
            control: VirtioMemControl {
                shared: Arc::new(shared),
            },
            backing: region.backing,
            worker: None,
        })
    }

    /// A handle for the VMM's API threads.
    pub fn control(&self) -> VirtioMemControl {
        self.control.clone()
    }

    fn id(&self) -> &str {
        &self.control.shared.id
    }

    fn config_bytes(&self) -> [u8; CONFIG_SIZE] {
        let shared = &self.control.shared;
        let state = shared.state();
        let mut bytes = [0u8; CONFIG_SIZE];
        let mut put =
            |at: usize, value: u64| bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
        put(0, BLOCK_SIZE);
        put(16, shared.addr);
        put(24, shared.region_size);
        // Cloud Hypervisor never shrinks the usable region.
        put(32, shared.region_size);
        put(40, state.plugged_size);
        put(48, state.requested_size);
        bytes[8..10].copy_from_slice(&shared.node_id.unwrap_or(0).to_le_bytes());
        bytes
    }
}

/// One request as read from a chain.
struct Request {
    kind: u16,
    addr: u64,
    blocks: u16,
}

/// Why a chain carries no request the device can answer.
#[derive(Debug, PartialEq, Eq)]
enum Malformed {
    /// No device-readable request descriptor of exactly 24 bytes first.
    Request,
    /// The request could not be read from guest memory.
    Unreadable,
}

struct MemWorker {
    requests: Requests,
    memory: GuestMemoryMmap,
    queue: Queue,
    signals: OneQueueSignals,
}

impl MemWorker {
    fn process(&mut self) {
        if self.signals.broken {
            return;
        }
        let requests = &mut self.requests;
        let memory = &self.memory;
        let result = drain_queue(&mut self.queue, memory, |chain| {
            requests.handle(memory, chain)
        });
        self.signals
            .processed(result, &mut self.queue, &self.memory);
    }
}

/// Answers the driver's requests.
struct Requests {
    shared: Arc<Shared>,
    /// The host address of the region's start (the mapping lives as long as
    /// the worker's `memory`).
    host: usize,
    backing: RegionBacking,
}

impl Requests {
    /// Answers one chain; returns the bytes written to it.
    fn handle(
        &mut self,
        memory: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> u32 {
        let descriptors: Vec<_> = chain.collect();
        // The response goes to the first device-writable descriptor after
        // the request large enough for it; without one the guest gets
        // nothing back.
        let status = descriptors
            .iter()
            .skip(1)
            .find(|d| d.is_write_only() && d.len() >= RESPONSE_SIZE)
            .map(|d| d.addr());
        // A request the guest cannot hear the answer to is not carried out.
        let status = status.filter(|&at| {
            memory
                .write_slice(&[0u8; RESPONSE_SIZE as usize], at)
                .is_ok()
        });
        let Some(status) = status else {
            log::debug!(
                "{}: a request without a writable response buffer of {RESPONSE_SIZE} bytes \
                 in guest memory: ignored",
                self.shared.id
            );
            return 0;
        };
        let (response, state) = match self.parse(memory, &descriptors) {
            Ok(request) => self.answer(&request),
            Err(why) => {
                log::debug!("{}: malformed request ({why:?}): ERROR", self.shared.id);
                (RESP_ERROR, 0)
            }
        };
        let mut bytes = [0u8; RESPONSE_SIZE as usize];
        bytes[..2].copy_from_slice(&response.to_le_bytes());
        bytes[8..10].copy_from_slice(&state.to_le_bytes());
        match memory.write_slice(&bytes, status) {
            Ok(()) => RESPONSE_SIZE,
            Err(_) => 0,
        }
    }

    fn parse(
        &self,
        memory: &GuestMemoryMmap,
        descriptors: &[virtio_queue::desc::split::Descriptor],
    ) -> std::result::Result<Request, Malformed> {
        let first = descriptors.first().ok_or(Malformed::Request)?;
        if first.is_write_only() || first.len() != REQUEST_SIZE {
            return Err(Malformed::Request);
        }
        let mut bytes = [0u8; REQUEST_SIZE as usize];
        memory
            .read_slice(&mut bytes, first.addr())
            .map_err(|_| Malformed::Unreadable)?;
        let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or([0; 8]));
        Ok(Request {
            kind: u16::from_le_bytes([bytes[0], bytes[1]]),
            addr: word(8),
            blocks: u16::from_le_bytes([bytes[16], bytes[17]]),
        })
    }

    /// The blocks of `[addr, addr + blocks × BLOCK_SIZE)` when it is a
    /// non-empty, block-aligned range inside the (usable) region. The
    /// region's last block is in it, as the virtio spec says (v37's check is
    /// off by one and answers ERROR for it).
    fn range(&self, addr: u64, blocks: u16) -> Option<std::ops::Range<usize>> {
        let size = u64::from(blocks) * BLOCK_SIZE;
        let end = addr.checked_add(size)?;
        let region_end = self.shared.addr + self.shared.region_size;
        if blocks == 0
            || !addr.is_multiple_of(BLOCK_SIZE)
            || addr < self.shared.addr
            || end > region_end
        {
            return None;
        }
        let first = ((addr - self.shared.addr) / BLOCK_SIZE) as usize;
        Some(first..first + usize::from(blocks))
    }

    fn answer(&mut self, request: &Request) -> (u16, u16) {
        match request.kind {
            REQ_PLUG => (self.change(request.addr, request.blocks, true), 0),
            REQ_UNPLUG => (self.change(request.addr, request.blocks, false), 0),
            REQ_UNPLUG_ALL => (self.unplug_all(), 0),
            REQ_STATE => match self.range(request.addr, request.blocks) {
                Some(blocks) => {
                    let state = self.shared.state();
                    let answer = if state.all(blocks.clone(), true) {
                        STATE_PLUGGED
                    } else if state.all(blocks, false) {
                        STATE_UNPLUGGED
                    } else {
                        STATE_MIXED
                    };
                    (RESP_ACK, answer)
                }
                None => (RESP_ERROR, 0),
            },
            other => {
                log::debug!("{}: unknown request type {other}: ERROR", self.shared.id);
                (RESP_ERROR, 0)
            }
        }
    }

    /// PLUG or UNPLUG, as Cloud Hypervisor judges them: plugging past the
    /// requested size is NACK; a range outside the region, unaligned or not
    /// wholly in the other state is ERROR.
    fn change(&mut self, addr: u64, count: u16, plug: bool) -> u16 {
        let shared = self.shared.clone();
        let mut state = shared.state();
        let size = u64::from(count) * BLOCK_SIZE;
        if plug && state.plugged_size.saturating_add(size) > state.requested_size {
            return RESP_NACK;
        }
        let Some(blocks) = self.range(addr, count) else {
            return RESP_ERROR;
        };
        if !state.all(blocks.clone(), !plug) {
            return RESP_ERROR;
        }
        if !plug {
            if let Err(e) = self.discard(addr - shared.addr, size) {
                log::warn!("{}: unplugged blocks not given back: {e}", shared.id);
                return RESP_ERROR;
            }
        }
        for block in blocks {
            state.set(block, plug);
        }
        if plug {
            state.plugged_size += size;
        } else {
            state.plugged_size -= size;
        }
        RESP_ACK
    }

    fn unplug_all(&mut self) -> u16 {
        let shared = self.shared.clone();
        let mut state = shared.state();
        if let Err(e) = self.discard(0, shared.region_size) {
            log::warn!("{}: unplugged blocks not given back: {e}", shared.id);
            return RESP_ERROR;
        }
        state.plugged.iter_mut().for_each(|w| *w = 0);
        state.plugged_size = 0;
        RESP_ACK
    }

    /// Gives `[offset, offset + len)` of the region back to the host (the
    /// caller checked it lies in the region).
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let advice = match self.backing {
            RegionBacking::Private => libc::MADV_DONTNEED,
            // The file's pages go too (MADV_REMOVE punches a hole).
            RegionBacking::Shared | RegionBacking::HugePages { .. } => libc::MADV_REMOVE,
        };
        // SAFETY: the range lies in the region's mapping, which the worker's
        // guest memory keeps mapped; the guest gave these blocks up.
        let done = unsafe {
            libc::madvise(
                (self.host + offset as usize) as *mut libc::c_void,
                len as usize,
                advice,
            )
        };
        if done != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl WorkerHandler for MemWorker {
    fn queue_notified(&mut self, _index: usize) {
        self.process();
    }

    fn failed(&mut self, cause: &io::Error) {
        self.signals.fail(cause);
    }

    fn started(&mut self) {
        self.process();
    }
}

impl VirtioDevice for VirtioMem {
    fn device_type(&self) -> u32 {
        TYPE_MEM
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        match self.control.shared.node_id {
            Some(_) => F_VERSION_1 | F_ACPI_PXM,
            None => F_VERSION_1,
        }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data);
    }

    /// Every field is the device's: writes are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::debug!(
            "{}: config write of {} bytes at {offset} ignored (read-only)",
            self.id(),
            data.len()
        );
    }

    fn activate(&mut self, activation: Activation) -> std::result::Result<(), ActivateError> {
        let Some(active) = activation.queues.into_iter().find(|q| q.index == 0) else {
            return Err(ActivateError::new("virtio-mem needs its queue"));
        };
        let shared = &self.control.shared;
        // The whole region must be one mapping.
        let host = activation
            .memory
            .find_region(GuestAddress(shared.addr))
            .filter(|r| r.start_addr().0 == shared.addr && r.len() == shared.region_size)
            .map(|r| r.as_ptr() as usize)
            .ok_or_else(|| {
                ActivateError::new(format!(
                    "virtio-mem region at {:#x} is not guest memory",
                    shared.addr
                ))
            })?;
        *shared.interrupt.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(activation.interrupt.clone());
        let handler = MemWorker {
            requests: Requests {
                shared: shared.clone(),
                host,
                backing: self.backing,
            },
            memory: activation.memory,
            queue: active.queue,
            signals: OneQueueSignals::new(self.id().to_owned(), activation.interrupt),
        };
        let worker = worker::spawn(
            &activation.spawner,
            self.id().to_owned(),
            ThreadKind::VirtioMem,
            vec![active.kick],
            handler,
        )
        .map_err(|e| ActivateError::io("worker thread", e))?;
        self.worker = Some(worker);
        Ok(())
    }

    /// Plugged blocks stay plugged across a reset (a new driver reads
    /// `plugged_size` and unplugs what it does not know).
    fn reset(&mut self) {
        self.worker = None;
        *self
            .control
            .shared
            .interrupt
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The requested and plugged sizes and the plugged-block bitmap.
    fn save_device_state(&self) -> Vec<u8> {
        let state = self.control.shared.state();
        let mut bytes = vec![STATE_VERSION];
        bytes.extend_from_slice(&state.requested_size.to_le_bytes());
        for word in &state.plugged {
            bytes.extend_from_slice(&word.to_le_bytes());
        }
        bytes
    }

    fn restore_device_state(&mut self, bytes: &[u8]) -> std::result::Result<(), String> {
        let shared = &self.control.shared;
        let words = shared.blocks().div_ceil(64);
        let expected = 1 + 8 + 8 * words;
        let [version, rest @ ..] = bytes else {
            return Err("virtio-mem state is empty".to_owned());
        };
        if *version != STATE_VERSION {
            return Err(format!(
                "virtio-mem state version {version}, expected {STATE_VERSION}"
            ));
        }
        if bytes.len() != expected {
            return Err(format!(
                "virtio-mem state of {} bytes, expected {expected} for a region of {} blocks",
                bytes.len(),
                shared.blocks()
            ));
        }
        let word = |at: usize| u64::from_le_bytes(rest[at..at + 8].try_into().unwrap_or([0; 8]));
        let requested_size = word(0);
        if requested_size > shared.region_size || !requested_size.is_multiple_of(BLOCK_SIZE) {
            return Err(format!(
                "virtio-mem state: requested size {requested_size:#x} does not fit the region"
            ));
        }
        let plugged: Vec<u64> = (0..words).map(|i| word(8 + 8 * i)).collect();
        // No bit past the region's last block.
        let tail = shared.blocks() % 64;
        if tail != 0 && plugged.last().is_some_and(|w| w >> tail != 0) {
            return Err("virtio-mem state: blocks plugged past the region".to_owned());
        }
        let count: u64 = plugged.iter().map(|w| u64::from(w.count_ones())).sum();
        let mut state = shared.state();
        state.requested_size = requested_size;
        state.plugged_size = count * BLOCK_SIZE;
        state.plugged = plugged;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seccomp::{SeccompMode, Spawner, ThreadGroups};
    use crate::virtio::testing::{capture_logs, wait_until, Driver, FakeInterrupt, WRITE};

    const MIB: u64 = 1 << 20;
    /// The test region: 128 MiB at 128 MiB, past 16 MiB of RAM.
    const ADDR: u64 = 128 * MIB;
    const SIZE: u64 = 128 * MIB;
    /// Where the tests put requests and responses.
    const REQUEST: u64 = 0x40000;
    const RESPONSE: u64 = 0x41000;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), (16 * MIB) as usize),
            (GuestAddress(ADDR), SIZE as usize),
        ])
        .unwrap()
    }

    struct Guest {
        device: VirtioMem,
        driver: Driver,
        interrupt: Arc<FakeInterrupt>,
        memory: GuestMemoryMmap,
    }

    impl Guest {
        /// Sends one well-formed request; returns (response type, state, used length).
        fn request(&mut self, kind: u16, addr: u64, blocks: u16) -> (u16, u16, u32) {
            self.driver.write(REQUEST, &request(kind, addr, blocks));
            self.driver.write(RESPONSE, &[0xee; 16]);
            self.driver
                .add_chain(&[(REQUEST, REQUEST_SIZE, 0), (RESPONSE, 16, WRITE)]);
            let (_, len) = self.driver.next_used();
            let (response, state) = self.response();
            (response, state, len)
        }

        fn response(&self) -> (u16, u16) {
            let bytes = self.driver.read(RESPONSE, 10);
            (
                u16::from_le_bytes([bytes[0], bytes[1]]),
                u16::from_le_bytes([bytes[8], bytes[9]]),
            )
        }

        fn config(&self, offset: u64) -> u64 {
            let mut bytes = [0u8; 8];
            self.device.read_config(offset, &mut bytes);
            u64::from_le_bytes(bytes)
        }

        fn fill(&self, gpa: u64, len: u64, byte: u8) {
            self.memory
                .write_slice(&vec![byte; len as usize], GuestAddress(gpa))
                .unwrap();
        }

        fn all_are(&self, gpa: u64, len: u64, byte: u8) -> bool {
            let mut data = vec![0u8; len as usize];
            self.memory
                .read_slice(&mut data, GuestAddress(gpa))
                .unwrap();
            data.iter().all(|&b| b == byte)
        }
    }

    fn request(kind: u16, addr: u64, blocks: u16) -> Vec<u8> {
        let mut bytes = vec![0u8; REQUEST_SIZE as usize];
        bytes[..2].copy_from_slice(&kind.to_le_bytes());
        bytes[8..16].copy_from_slice(&addr.to_le_bytes());
        bytes[16..18].copy_from_slice(&blocks.to_le_bytes());
        bytes
    }

    fn activate_with(id: &str, requested: u64, spawner: Spawner) -> Guest {
        let memory = memory();
        let region = MemRegion {
            addr: ADDR,
            size: SIZE,
            backing: RegionBacking::Private,
        };
        let mut device = VirtioMem::new(id.into(), region, None, requested).unwrap();
        let mut driver = Driver::small(&memory, 16, 0x10000);
        let interrupt = Arc::new(FakeInterrupt::default());
        device
            .activate(Activation {
                spawner,
                memory: memory.clone(),
                interrupt: interrupt.clone(),
                queues: vec![driver.activate(0, false)],
                acked_features: device.features(),
            })
            .unwrap();
        Guest {
            device,
            driver,
            interrupt,
            memory,
        }
    }

    fn activate(id: &str, requested: u64) -> Guest {
        activate_with(id, requested, Spawner::unconfined())
    }

    #[test]
    fn identity_and_config_are_cloud_hypervisors() {
        let region = MemRegion {
            addr: ADDR,
            size: SIZE,
            backing: RegionBacking::Private,
        };
        let device = VirtioMem::new("__mem".into(), region, None, 64 * MIB).unwrap();
        assert_eq!(device.device_type(), 24);
        assert_eq!(device.queue_max_sizes(), [128]);
        assert_eq!(device.features(), F_VERSION_1);
        let with_node = VirtioMem::new("__mem".into(), region, Some(1), 0).unwrap();
        assert_eq!(with_node.features(), F_VERSION_1 | 1);
        let mut config = [0xffu8; 64];
        with_node.read_config(0, &mut config);
        let word = |at: usize| u64::from_le_bytes(config[at..at + 8].try_into().unwrap());
        assert_eq!(word(0), 2 * MIB, "block_size");
        assert_eq!(
            &config[8..16],
            &[1, 0, 0, 0, 0, 0, 0, 0],
            "node_id, padding"
        );
        assert_eq!(word(16), ADDR);
        assert_eq!(word(24), SIZE, "region_size");
        assert_eq!(word(32), SIZE, "usable_region_size");
        assert_eq!(word(40), 0, "plugged_size");
        assert_eq!(word(48), 0, "requested_size");
        assert_eq!(&config[56..], &[0; 8], "nothing past the end");
        // Regions are whole 128 MiB blocks at 128 MiB boundaries.
        for (addr, size) in [(ADDR, 64 * MIB), (ADDR + 2 * MIB, SIZE), (ADDR, 0)] {
            let region = MemRegion {
                addr,
                size,
                ..region
            };
            assert!(VirtioMem::new("__mem".into(), region, None, 0).is_err());
        }
        // The initial requested size follows the resize rules.
        for requested in [SIZE + 2 * MIB, MIB] {
            assert!(VirtioMem::new("__mem".into(), region, None, requested).is_err());
        }
    }

    #[test]
    fn resize_is_checked_and_signalled_as_cloud_hypervisor_does() {
        let mut guest = activate("__mem_resize", 0);
        let control = guest.device.control();
        let e = control.resize(0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "new size 0x0 and requested_size are identical"
        );
        let e = control.resize(SIZE + 2 * MIB).unwrap_err();
        assert_eq!(
            e.to_string(),
            "new size 0x8200000 is bigger than region_size 0x8000000"
        );
        let e = control.resize(MIB).unwrap_err();
        assert_eq!(
            e.to_string(),
            "new size 0x100000 is not aligned on block_size 0x200000"
        );
        assert_eq!(guest.interrupt.config_count(), 0);
        std::thread::spawn(move || control.resize(4 * MIB).unwrap())
            .join()
            .unwrap();
        assert_eq!(guest.interrupt.config_count(), 1);
        assert_eq!(guest.config(48), 4 * MIB);
        guest.device.reset();
        // Reset: the next driver reads it, nobody is signalled.
        guest.device.control().resize(8 * MIB).unwrap();
        assert_eq!(guest.interrupt.config_count(), 1);
    }

    #[test]
    fn the_guest_plugs_uses_and_unplugs_blocks() {
        let mut guest = activate("__mem_plug", 6 * MIB);
        // Plug three blocks, then the range's state.
        assert_eq!(guest.request(REQ_PLUG, ADDR, 2), (RESP_ACK, 0, 10));
        assert_eq!(guest.request(REQ_PLUG, ADDR + 8 * MIB, 1).0, RESP_ACK);
        assert_eq!(guest.config(40), 6 * MIB, "plugged_size");
        assert_eq!(guest.request(REQ_STATE, ADDR, 2).1, STATE_PLUGGED);
        assert_eq!(guest.request(REQ_STATE, ADDR, 3).1, STATE_MIXED);
        assert_eq!(
            guest.request(REQ_STATE, ADDR + 4 * MIB, 2).1,
            STATE_UNPLUGGED
        );
        assert_eq!(guest.request(REQ_STATE, ADDR + 4 * MIB, 2).0, RESP_ACK);
        // More than requested: NACK, nothing changes.
        assert_eq!(guest.request(REQ_PLUG, ADDR + 4 * MIB, 1).0, RESP_NACK);
        assert_eq!(guest.config(40), 6 * MIB);
        // The guest writes its blocks; unplugged, they go back to the host
        // and read as zeros; the neighbour keeps its data.
        guest.fill(ADDR, 4 * MIB, 0xaa);
        guest.fill(ADDR + 8 * MIB, 2 * MIB, 0xbb);
        assert_eq!(guest.request(REQ_UNPLUG, ADDR + 2 * MIB, 1).0, RESP_ACK);
        assert!(guest.all_are(ADDR + 2 * MIB, 2 * MIB, 0));
        assert!(guest.all_are(ADDR, 2 * MIB, 0xaa));
        assert_eq!(guest.config(40), 4 * MIB);
        // Unplugging what is not plugged, plugging what is: ERROR.
        assert_eq!(guest.request(REQ_UNPLUG, ADDR + 2 * MIB, 1).0, RESP_ERROR);
        assert_eq!(guest.request(REQ_PLUG, ADDR, 1).0, RESP_ERROR);
        // UNPLUG_ALL: everything goes.
        assert_eq!(guest.request(REQ_UNPLUG_ALL, 0, 0).0, RESP_ACK);
        assert_eq!(guest.config(40), 0);
        assert!(guest.all_are(ADDR + 8 * MIB, 2 * MIB, 0));
        assert_eq!(guest.request(REQ_STATE, ADDR, 64).1, STATE_UNPLUGGED);
        assert!(guest.interrupt.count(0) >= 1);
        assert_eq!(guest.interrupt.needs_reset_count(), 0);
        guest.device.reset();
    }

    #[test]
    fn hostile_requests_get_defined_answers_and_the_device_keeps_working() {
        capture_logs();
        let mut guest = activate("__mem_hostile", SIZE);
        let end = ADDR + SIZE;
        for (addr, blocks) in [
            (ADDR - 2 * MIB, 1),         // below the region
            (end, 1),                    // past its end
            (end - 2 * MIB, 2),          // running off its end
            (ADDR + 4096, 1),            // not block-aligned
            (ADDR, 0),                   // no blocks
            (u64::MAX - 2 * MIB + 1, 1), // wrapping around
            (ADDR, u16::MAX),            // larger than the region
            (0, 1),                      // RAM, not the region
        ] {
            for kind in [REQ_PLUG, REQ_UNPLUG, REQ_STATE] {
                // As in Cloud Hypervisor, plugging past the requested size
                // is NACK before the range is looked at.
                let expected = match (kind, blocks) {
                    (REQ_PLUG, u16::MAX) => RESP_NACK,
                    _ => RESP_ERROR,
                };
                assert_eq!(
                    guest.request(kind, addr, blocks),
                    (expected, 0, 10),
                    "type {kind} at {addr:#x} x {blocks}"
                );
            }
        }
        // Unknown request types.
        for kind in [4, 0xffff] {
            assert_eq!(guest.request(kind, ADDR, 1).0, RESP_ERROR);
        }
        assert_eq!(guest.config(40), 0);
        // Malformed chains: short or long request descriptors, a writable
        // request, a read-only or short response, buffers outside memory.
        let answer = |guest: &mut Guest, parts: &[(u64, u32, u16)]| {
            guest.driver.write(RESPONSE, &[0xee; 16]);
            guest.driver.add_chain(parts);
            let (_, len) = guest.driver.next_used();
            (len, guest.response().0)
        };
        guest.driver.write(REQUEST, &request(REQ_PLUG, ADDR, 1));
        assert_eq!(
            answer(&mut guest, &[(REQUEST, 16, 0), (RESPONSE, 10, WRITE)]),
            (10, RESP_ERROR)
        );
        assert_eq!(
            answer(&mut guest, &[(REQUEST, 32, 0), (RESPONSE, 10, WRITE)]),
            (10, RESP_ERROR)
        );
        assert_eq!(
            answer(&mut guest, &[(REQUEST, 24, WRITE), (RESPONSE, 10, WRITE)]),
            (10, RESP_ERROR)
        );
        assert_eq!(
            answer(&mut guest, &[(REQUEST, 24, 0), (RESPONSE, 10, 0)]),
            (0, 0xeeee)
        );
        assert_eq!(
            answer(&mut guest, &[(REQUEST, 24, 0), (RESPONSE, 9, WRITE)]),
            (0, 0xeeee)
        );
        assert_eq!(answer(&mut guest, &[(REQUEST, 24, 0)]), (0, 0xeeee));
        assert_eq!(answer(&mut guest, &[(RESPONSE, 10, WRITE)]), (0, 0xeeee));
        assert_eq!(
            answer(&mut guest, &[(u64::MAX - 8, 24, 0), (RESPONSE, 10, WRITE)]),
            (10, RESP_ERROR)
        );
        assert_eq!(
            answer(&mut guest, &[(REQUEST, 24, 0), (u64::MAX - 4, 10, WRITE)]),
            (0, 0xeeee)
        );
        assert_eq!(
            answer(&mut guest, &[(REQUEST, 24, 0), (64 * MIB, 10, WRITE)]),
            (0, 0xeeee),
            "a response buffer between RAM and the region"
        );
        assert_eq!(guest.config(40), 0, "nothing was plugged");
        assert!(!crate::virtio::testing::logged("__mem_hostile: malformed request").is_empty());
        // Still working: the whole region plugs and unplugs.
        assert_eq!(guest.request(REQ_PLUG, ADDR, 64).0, RESP_ACK);
        assert_eq!(guest.config(40), SIZE);
        assert_eq!(guest.request(REQ_UNPLUG, ADDR, 64).0, RESP_ACK);
        assert_eq!(guest.interrupt.needs_reset_count(), 0);
        guest.device.reset();
    }

    #[test]
    fn a_broken_ring_asks_for_a_reset() {
        let mut guest = activate("__mem_broken", SIZE);
        guest
            .memory
            .write_obj(40u16, GuestAddress(guest.driver.avail + 2))
            .unwrap();
        guest.driver.kick();
        wait_until("the reset request", || {
            guest.interrupt.needs_reset_count() == 1
        });
        guest.device.reset();
    }

    #[test]
    fn the_worker_runs_under_its_seccomp_filter() {
        let spawner = Spawner::start(SeccompMode::Trap, ThreadGroups::default()).unwrap();
        let mut guest = activate_with("__mem_seccomp", 4 * MIB, spawner.clone());
        assert_eq!(guest.request(REQ_PLUG, ADDR, 2).0, RESP_ACK);
        guest.fill(ADDR, 4 * MIB, 1);
        assert_eq!(guest.request(REQ_UNPLUG, ADDR, 2).0, RESP_ACK);
        assert!(guest.all_are(ADDR, 4 * MIB, 0));
        assert_eq!(guest.request(REQ_UNPLUG_ALL, 0, 0).0, RESP_ACK);
        guest.device.reset();
        spawner.stop();
    }

    #[test]
    fn the_state_round_trips_and_bad_bytes_are_refused() {
        let mut guest = activate("__mem_state", 8 * MIB);
        assert_eq!(guest.request(REQ_PLUG, ADDR + 126 * MIB, 1).0, RESP_ACK);
        assert_eq!(guest.request(REQ_PLUG, ADDR, 2).0, RESP_ACK);
        guest.device.reset();
        let state = guest.device.save_device_state();
        let region = MemRegion {
            addr: ADDR,
            size: SIZE,
            backing: RegionBacking::Private,
        };
        let mut restored = VirtioMem::new("__mem_state".into(), region, None, 0).unwrap();
        assert_eq!(restored.control().unplugged(), [(ADDR, SIZE)]);
        restored.restore_device_state(&state).unwrap();
        let control = restored.control();
        assert_eq!(control.requested_size(), 8 * MIB);
        assert_eq!(control.plugged_size(), 6 * MIB);
        // Blocks 0, 1 and 63 plugged: those between are one run.
        assert_eq!(control.unplugged(), [(ADDR + 4 * MIB, 122 * MIB)]);
        assert_eq!(restored.save_device_state(), state);
        let mut past_end = state.clone();
        past_end.push(0);
        let mut too_big = state.clone();
        too_big[1..9].copy_from_slice(&(SIZE + 2 * MIB).to_le_bytes());
        for bad in [&[][..], &[2], &state[..9], &past_end, &too_big] {
            let e = restored.restore_device_state(bad).unwrap_err();
            assert!(e.contains("virtio-mem state"), "{e}");
        }
        assert_eq!(
            control.plugged_size(),
            6 * MIB,
            "unchanged by refused bytes"
        );
    }
}
