//! virtio-balloon (virtio 1.2 §5.5), as Cloud Hypervisor offers it: an
//! inflate and a deflate queue of 4 KiB page numbers, and with
//! `free_page_reporting=on` a third queue on which the guest reports ranges
//! of free memory. The host sets the balloon's target (`num_pages`, from
//! `--balloon size=` and `vm.resize {"desired_balloon"}`); the driver says
//! how many pages it holds (`actual`).
//!
//! A page the guest puts in the balloon, or reports free, is given back to
//! the host the way its RAM region holds it: dropped from a private mapping
//! (the next touch faults in a zero page), removed from a shared file too,
//! and for huge pages only once the whole huge page is in the balloon.
//! Everything comes from the guest: page numbers outside RAM, short or
//! misdirected buffers are skipped, never trusted.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::worker::{self, Worker, WorkerHandler};
use super::{
    pop_chain, queue_failed, read_config_bytes, ActivateError, Activation, Interrupt, VirtioDevice,
    F_VERSION_1, TYPE_BALLOON,
};
use crate::error::{ErrorKind, ModuleError, Result};
use crate::memory::{region_backing, GuestMemoryMmap, RegionBacking};
use crate::seccomp::ThreadKind;

/// Cloud Hypervisor's queue sizes: inflate, deflate, then reporting.
const QUEUE_SIZE: u16 = 128;
const REPORTING_QUEUE_SIZE: u16 = 32;

/// Feature bits (virtio 1.2 §5.5.3); Cloud Hypervisor offers no others
/// (no statistics queue, no free page hinting).
pub const F_DEFLATE_ON_OOM: u64 = 1 << 2;
pub const F_PAGE_REPORTING: u64 = 1 << 5;

/// Balloon page numbers are of 4 KiB pages, whatever the guest's page size.
pub const PFN_SHIFT: u32 = 12;
const BALLOON_PAGE: u64 = 1 << PFN_SHIFT;

/// Configuration space: `num_pages` at 0, `actual` at 4 (le32 each).
const CONFIG_SIZE: usize = 8;
const ACTUAL_OFFSET: u64 = 4;

/// Chains taken from one queue before the worker looks at its other
/// events (a kill among them); the rest wait for the wake-up it sends itself.
const CHAINS_PER_ROUND: usize = if cfg!(test) { 64 } else { 1024 };
/// Page numbers read from one chain, over all its buffers: a Linux guest
/// sends 256, a hostile one could describe 4 GiB of them.
const MAX_PFNS_PER_CHAIN: usize = 1 << 12;
/// Page numbers handled before the worker looks at its other events (the
/// kill a shutdown waits for among them): each may cost a system call.
const PFNS_PER_ROUND: usize = 1 << 16;
/// Page numbers read from guest memory at a time.
const PFN_BATCH: usize = 256;

/// The device state's format (`save_device_state`): version, num_pages, actual.
const STATE_VERSION: u8 = 1;
const STATE_SIZE: usize = 9;

#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    #[error("Balloon size {bytes} is too large: at most {max} bytes (2^32 pages of 4 KiB)")]
    TooLarge { bytes: u64, max: u64 },
    #[error("Cannot tell the guest the balloon's new size")]
    SignalConfig(#[source] io::Error),
    #[error("Cannot read how guest RAM region at {start:#x} is backed")]
    Backing {
        start: u64,
        #[source]
        source: io::Error,
    },
}

impl ModuleError for BalloonError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Device
    }
}

/// How each guest RAM region gives a page back to the host; from
/// [`BalloonBacking::of`] on the VM's guest RAM.
#[derive(Debug, Clone, Default)]
pub struct BalloonBacking {
    /// (guest start, length, backing) of each region.
    regions: Vec<(u64, u64, RegionBacking)>,
}

impl BalloonBacking {
    /// The backing of every region of `memory` (private anonymous, shared
    /// memfd or file, huge pages).
    pub fn of(memory: &GuestMemoryMmap) -> Result<BalloonBacking> {
        let regions = memory
            .iter()
            .map(|region| {
                let start = region.start_addr().0;
                let backing = region_backing(region)
                    .map_err(|source| BalloonError::Backing { start, source })?;
                Ok((start, region.len(), backing))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(BalloonBacking { regions })
    }

    fn lookup(&self, start: u64, len: u64) -> Option<RegionBacking> {
        self.regions
            .iter()
            .find(|r| r.0 == start && r.1 == len)
            .map(|r| r.2)
    }
}

/// What the host and the driver set, shared by the device (vCPU threads),
/// its control handle (API threads) and nothing else: the worker never
/// needs it.
struct Shared {
    id: String,
    /// The target, in 4 KiB pages (config `num_pages`).
    num_pages: AtomicU32,
    /// Pages the driver says the balloon holds (config `actual`).
    actual: AtomicU32,
    /// The active device's interrupt: a new target is signalled through it.
    interrupt: Mutex<Option<Arc<dyn Interrupt>>>,
}

/// Sets the balloon's target and reads its size from any thread.
#[derive(Clone)]
pub struct BalloonControl {
    shared: Arc<Shared>,
}

impl BalloonControl {
    /// Asks the guest to hold `bytes` in the balloon (rounded down to 4 KiB
    /// pages). An active driver is told at once (a configuration change);
    /// one not yet started reads it when it starts.
    pub fn set_target(&self, bytes: u64) -> Result<()> {
        let pages = pages_of(bytes)?;
        self.shared.num_pages.store(pages, Ordering::SeqCst);
        let interrupt = self
            .shared
            .interrupt
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(interrupt) = interrupt {
            interrupt
                .signal_config()
                .map_err(BalloonError::SignalConfig)?;
        }
        log::info!("{}: target {} pages of 4 KiB", self.shared.id, pages);
        Ok(())
    }

    /// The target, in bytes.
    pub fn target_bytes(&self) -> u64 {
        u64::from(self.shared.num_pages.load(Ordering::SeqCst)) << PFN_SHIFT
    }

    /// What the driver says the balloon holds, in bytes: RAM minus this is
    /// the guest's actual memory size.
    pub fn actual_bytes(&self) -> u64 {
        u64::from(self.shared.actual.load(Ordering::SeqCst)) << PFN_SHIFT
    }
}

fn pages_of(bytes: u64) -> Result<u32> {
    u32::try_from(bytes >> PFN_SHIFT).map_err(|_| {
        BalloonError::TooLarge {
            bytes,
            max: u64::from(u32::MAX) << PFN_SHIFT,
        }
        .into()
    })
}

/// The virtio-balloon device of one VM (`--balloon`).
pub struct Balloon {
    control: BalloonControl,
    features: u64,
    free_page_reporting: bool,
    backing: BalloonBacking,
    worker: Option<Worker>,
}

impl Balloon {
    /// The device for `config`, its target `config.size`; `backing` says
    /// how the VM's guest RAM gives pages back ([`BalloonBacking::of`]).
    pub fn new(
        id: String,
        config: &vmkit_config::BalloonConfig,
        backing: BalloonBacking,
    ) -> Result<Balloon> {
        let mut features = F_VERSION_1;
        if config.deflate_on_oom {
            features |= F_DEFLATE_ON_OOM;
        }
        if config.free_page_reporting {
            features |= F_PAGE_REPORTING;
        }
        let shared = Shared {
            id,
            num_pages: AtomicU32::new(pages_of(config.size)?),
            actual: AtomicU32::new(0),
            interrupt: Mutex::new(None),
        };
        Ok(Balloon {
            control: BalloonControl {
                shared: Arc::new(shared),
            },
            features,
            free_page_reporting: config.free_page_reporting,
            backing,
            worker: None,
        })
    }

    /// A handle for the VMM's API threads.
    pub fn control(&self) -> BalloonControl {
        self.control.clone()
    }

    /// See [`BalloonControl::set_target`].
    pub fn set_target(&self, bytes: u64) -> Result<()> {
        self.control.set_target(bytes)
    }

    /// See [`BalloonControl::actual_bytes`].
    pub fn actual_bytes(&self) -> u64 {
        self.control.actual_bytes()
    }

    fn id(&self) -> &str {
        &self.control.shared.id
    }

    fn config_bytes(&self) -> [u8; CONFIG_SIZE] {
        let shared = &self.control.shared;
        let mut bytes = [0u8; CONFIG_SIZE];
        bytes[..4].copy_from_slice(&shared.num_pages.load(Ordering::SeqCst).to_le_bytes());
        bytes[4..].copy_from_slice(&shared.actual.load(Ordering::SeqCst).to_le_bytes());
        bytes
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QueueKind {
    Inflate,
    Deflate,
    Reporting,
}

/// One guest RAM region as the worker gives its pages back.
struct Region {
    start: u64,
    len: u64,
    /// The host address of `start` (the mapping lives as long as the
    /// worker's `memory`).
    host: usize,
    /// None: not described by the device's backing (nothing is freed).
    backing: Option<RegionBacking>,
}

impl Region {
    fn end(&self) -> u64 {
        self.start + self.len
    }

    /// `madvise(advice)` on guest range `[gpa, gpa + len)` of this region.
    fn advise(&self, gpa: u64, len: u64, advice: libc::c_int) -> io::Result<()> {
        let host = self.host + (gpa - self.start) as usize;
        // SAFETY: the range lies in this region's mapping (callers check),
        // which the worker's guest memory keeps mapped; these advices only
        // drop or prefetch pages, which the guest gave up or takes back.
        let done = unsafe { libc::madvise(host as *mut libc::c_void, len as usize, advice) };
        if done != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// The 4 KiB pages of each huge page that are in the balloon: a huge page
/// is freed once all of them are (as QEMU and Cloud Hypervisor do for host
/// pages larger than the balloon's). Lost on a device reset, which only
/// means those huge pages stay.
#[derive(Default)]
struct HugePageTracker {
    /// Huge page's guest address → (pages in the balloon, one bit each).
    partial: HashMap<u64, (usize, Vec<u64>)>,
}

impl HugePageTracker {
    /// Page `gpa` entered the balloon; returns whether the huge page of
    /// `page_size` at `huge` is now complete (and forgets it then).
    fn inflate(&mut self, huge: u64, page_size: u64, gpa: u64) -> bool {
        let pages = (page_size / BALLOON_PAGE) as usize;
        let bit = ((gpa - huge) / BALLOON_PAGE) as usize;
        let entry = self
            .partial
            .entry(huge)
            .or_insert_with(|| (0, vec![0u64; pages.div_ceil(64)]));
        let word = &mut entry.1[bit / 64];
        if *word & (1 << (bit % 64)) == 0 {
            *word |= 1 << (bit % 64);
            entry.0 += 1;
        }
        if entry.0 == pages {
            self.partial.remove(&huge);
            return true;
        }
        false
    }

    /// Page `gpa` left the balloon.
    fn deflate(&mut self, huge: u64, gpa: u64) {
        let Some(entry) = self.partial.get_mut(&huge) else {
            return;
        };
        let bit = ((gpa - huge) / BALLOON_PAGE) as usize;
        let word = &mut entry.1[bit / 64];
        if *word & (1 << (bit % 64)) != 0 {
            *word &= !(1 << (bit % 64));
            entry.0 -= 1;
            if entry.0 == 0 {
                self.partial.remove(&huge);
            }
        }
    }
}

/// A run of contiguous balloon pages in one region.
#[derive(Clone, Copy)]
struct Run {
    region: usize,
    start: u64,
    end: u64,
}

/// What went wrong with one chain: each kind is logged once per chain.
#[derive(Default)]
struct ChainFaults {
    outside_ram: usize,
    unreadable: bool,
    writable: bool,
    odd_length: bool,
    too_many: bool,
    advise_failed: Option<io::Error>,
}

struct ActiveQueue {
    kind: QueueKind,
    index: u16,
    queue: Queue,
    /// Stopped after a queue error, until the device is reset.
    broken: bool,
}

struct BalloonWorker {
    device: String,
    memory: GuestMemoryMmap,
    regions: Vec<Region>,
    queues: Vec<ActiveQueue>,
    interrupt: Arc<dyn Interrupt>,
    huge_pages: HugePageTracker,
    /// Written when a round left chains behind: the worker comes back.
    wake: EventFd,
    pfns: Vec<u8>,
}

impl BalloonWorker {
    /// The region holding the whole balloon page at `gpa`.
    fn region_of_page(&self, gpa: u64) -> Option<usize> {
        let index = self.regions.partition_point(|r| r.end() <= gpa);
        let region = self.regions.get(index)?;
        (gpa >= region.start && gpa + BALLOON_PAGE <= region.end()).then_some(index)
    }

    fn process(&mut self, position: usize) {
        let Some(active) = self.queues.get(position) else {
            return;
        };
        if active.broken {
            return;
        }
        let index = active.index;
        match self.drain(position) {
            Ok(true) => {
                let queue = &mut self.queues[position].queue;
                if queue.needs_notification(&self.memory).unwrap_or(true) {
                    if let Err(e) = self.interrupt.signal_queue(index) {
                        log::warn!("{}: queue {index} interrupt lost: {e}", self.device);
                    }
                }
            }
            Ok(false) => {}
            Err(e) => self.fail(position, &e),
        }
    }

    fn fail(&mut self, position: usize, cause: &dyn std::fmt::Display) {
        let active = &mut self.queues[position];
        if !std::mem::replace(&mut active.broken, true) {
            queue_failed(&self.device, active.index, cause, &*self.interrupt);
        }
    }

    /// Handles the queue's chains; returns whether any was used.
    fn drain(&mut self, position: usize) -> std::result::Result<bool, virtio_queue::Error> {
        let kind = self.queues[position].kind;
        let mut used = false;
        let mut budget = CHAINS_PER_ROUND;
        let mut pfn_budget = PFNS_PER_ROUND;
        loop {
            self.queues[position]
                .queue
                .disable_notification(&self.memory)?;
            loop {
                if budget == 0 || pfn_budget == 0 {
                    let _ = self.wake.write(1);
                    return Ok(used);
                }
                // The memory is cloned (an Arc per region) so that the chain
                // does not borrow the worker its handling changes.
                let memory = self.memory.clone();
                let Some(chain) = pop_chain(&mut self.queues[position].queue, &memory)? else {
                    break;
                };
                budget -= 1;
                let head = chain.head_index();
                let mut faults = ChainFaults::default();
                let len = match kind {
                    QueueKind::Inflate | QueueKind::Deflate => {
                        let descriptors: Vec<_> = chain.collect();
                        let mut chain_left = MAX_PFNS_PER_CHAIN;
                        for d in descriptors {
                            if d.is_write_only() {
                                faults.writable = true;
                                continue;
                            }
                            self.page_numbers(
                                kind,
                                d.addr(),
                                d.len(),
                                &mut chain_left,
                                &mut faults,
                            );
                        }
                        pfn_budget = pfn_budget.saturating_sub(MAX_PFNS_PER_CHAIN - chain_left);
                        // Nothing written to the device-readable buffers.
                        0
                    }
                    QueueKind::Reporting => {
                        let mut total = 0u32;
                        for d in chain {
                            self.report_free(d.addr().0, u64::from(d.len()), &mut faults);
                            total = total.saturating_add(d.len());
                        }
                        total
                    }
                };
                self.log_faults(kind, &faults);
                self.queues[position]
                    .queue
                    .add_used(&self.memory, head, len)?;
                used = true;
            }
            if !self.queues[position]
                .queue
                .enable_notification(&self.memory)?
            {
                return Ok(used);
            }
        }
    }

    fn log_faults(&self, kind: QueueKind, faults: &ChainFaults) {
        let queue = match kind {
            QueueKind::Inflate => "inflate",
            QueueKind::Deflate => "deflate",
            QueueKind::Reporting => "reporting",
        };
        let device = &self.device;
        if faults.outside_ram > 0 {
            log::debug!(
                "{device}: {queue}: {} pages outside guest RAM skipped",
                faults.outside_ram
            );
        }
        if faults.unreadable {
            log::debug!("{device}: {queue}: a page number array outside guest memory skipped");
        }
        if faults.writable {
            log::debug!("{device}: {queue}: a device-writable buffer skipped");
        }
        if faults.odd_length {
            log::debug!("{device}: {queue}: a page number array not a multiple of 4 bytes");
        }
        if faults.too_many {
            log::debug!(
                "{device}: {queue}: more than {MAX_PFNS_PER_CHAIN} page numbers; the rest skipped"
            );
        }
        if let Some(e) = &faults.advise_failed {
            log::warn!("{device}: {queue}: pages not given back to the host: {e}");
        }
    }

    /// Reads the le32 page numbers of one buffer and inflates or deflates
    /// them, contiguous pages together.
    fn page_numbers(
        &mut self,
        kind: QueueKind,
        addr: GuestAddress,
        len: u32,
        chain_left: &mut usize,
        faults: &mut ChainFaults,
    ) {
        if !len.is_multiple_of(4) {
            faults.odd_length = true;
        }
        let mut count = (len / 4) as usize;
        if count > *chain_left {
            faults.too_many = true;
            count = *chain_left;
        }
        *chain_left -= count;
        let mut pfns = std::mem::take(&mut self.pfns);
        let mut run: Option<Run> = None;
        let mut done = 0usize;
        while done < count {
            let n = (count - done).min(PFN_BATCH);
            let bytes = &mut pfns[..4 * n];
            let read = addr
                .0
                .checked_add(4 * done as u64)
                .is_some_and(|at| self.memory.read_slice(bytes, GuestAddress(at)).is_ok());
            if !read {
                faults.unreadable = true;
                break;
            }
            for pfn in bytes.chunks_exact(4) {
                let pfn = u32::from_le_bytes([pfn[0], pfn[1], pfn[2], pfn[3]]);
                let gpa = u64::from(pfn) << PFN_SHIFT;
                let Some(region) = self.region_of_page(gpa) else {
                    faults.outside_ram += 1;
                    continue;
                };
                run = match run {
                    Some(r) if r.region == region && r.end == gpa => Some(Run {
                        end: gpa + BALLOON_PAGE,
                        ..r
                    }),
                    previous => {
                        if let Some(r) = previous {
                            self.apply(kind, r, faults);
                        }
                        Some(Run {
                            region,
                            start: gpa,
                            end: gpa + BALLOON_PAGE,
                        })
                    }
                };
            }
            done += n;
        }
        if let Some(r) = run {
            self.apply(kind, r, faults);
        }
        self.pfns = pfns;
    }

    /// Inflates or deflates a run of pages by its region's backing.
    fn apply(&mut self, kind: QueueKind, run: Run, faults: &mut ChainFaults) {
        let region = &self.regions[run.region];
        let len = run.end - run.start;
        let result = match (kind, region.backing) {
            (QueueKind::Inflate, Some(RegionBacking::Private)) => {
                region.advise(run.start, len, libc::MADV_DONTNEED)
            }
            // The file's pages go too (MADV_REMOVE punches a hole).
            (QueueKind::Inflate, Some(RegionBacking::Shared)) => {
                region.advise(run.start, len, libc::MADV_REMOVE)
            }
            // Taken back: shared pages are read ahead, as Cloud Hypervisor
            // does; a private page faults in as zeros on first touch.
            (QueueKind::Deflate, Some(RegionBacking::Shared)) => {
                region.advise(run.start, len, libc::MADV_WILLNEED)
            }
            (_, Some(RegionBacking::HugePages { page_size })) => {
                self.huge_pages_run(kind, run, page_size)
            }
            _ => Ok(()),
        };
        if let Err(e) = result {
            faults.advise_failed = Some(e);
        }
    }

    fn huge_pages_run(&mut self, kind: QueueKind, run: Run, page_size: u64) -> io::Result<()> {
        let region = &self.regions[run.region];
        let mut result = Ok(());
        let mut gpa = run.start;
        while gpa < run.end {
            let huge = region.start + (gpa - region.start) / page_size * page_size;
            match kind {
                QueueKind::Deflate => self.huge_pages.deflate(huge, gpa),
                _ => {
                    let whole = huge + page_size <= region.end();
                    if self.huge_pages.inflate(huge, page_size, gpa) && whole {
                        if let Err(e) = region.advise(huge, page_size, libc::MADV_REMOVE) {
                            result = Err(e);
                        }
                    }
                }
            }
            gpa += BALLOON_PAGE;
        }
        result
    }

    /// Gives back the whole pages of a reported free range, per region.
    /// Huge pages only when wholly reported: the guest reuses reported
    /// pages without telling, so no partial huge page is remembered.
    fn report_free(&mut self, addr: u64, len: u64, faults: &mut ChainFaults) {
        let Some(end) = addr.checked_add(len) else {
            faults.outside_ram += 1;
            return;
        };
        let mut covered = 0u64;
        for region in &self.regions {
            let start = addr.max(region.start);
            let stop = end.min(region.end());
            if start >= stop {
                continue;
            }
            covered += stop - start;
            let (grain, advice) = match region.backing {
                Some(RegionBacking::Private) => (BALLOON_PAGE, libc::MADV_DONTNEED),
                Some(RegionBacking::Shared) => (BALLOON_PAGE, libc::MADV_REMOVE),
                Some(RegionBacking::HugePages { page_size }) => (page_size, libc::MADV_REMOVE),
                None => continue,
            };
            let offset_start = (start - region.start).next_multiple_of(grain);
            let offset_stop = (stop - region.start) / grain * grain;
            if offset_start >= offset_stop {
                continue;
            }
            let gpa = region.start + offset_start;
            if let Err(e) = region.advise(gpa, offset_stop - offset_start, advice) {
                faults.advise_failed = Some(e);
            }
        }
        if covered < len {
            faults.outside_ram += 1;
        }
    }
}

impl WorkerHandler for BalloonWorker {
    fn queue_notified(&mut self, index: usize) {
        self.process(index);
    }

    fn failed(&mut self, cause: &io::Error) {
        for position in 0..self.queues.len() {
            self.fail(position, cause);
        }
    }

    fn extra_fds(&self) -> Vec<RawFd> {
        vec![self.wake.as_raw_fd()]
    }

    fn extra_ready(&mut self, _index: usize) {
        let _ = self.wake.read();
        for position in 0..self.queues.len() {
            self.process(position);
        }
    }

    fn started(&mut self) {
        for position in 0..self.queues.len() {
            self.process(position);
        }
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        TYPE_BALLOON
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        let mut sizes = vec![QUEUE_SIZE, QUEUE_SIZE];
        if self.free_page_reporting {
            sizes.push(REPORTING_QUEUE_SIZE);
        }
        sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data);
    }

    /// Only `actual` is the driver's, written whole (as Cloud Hypervisor
    /// takes it).
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        match <[u8; 4]>::try_from(data) {
            Ok(actual) if offset == ACTUAL_OFFSET => {
                let actual = u32::from_le_bytes(actual);
                self.control.shared.actual.store(actual, Ordering::SeqCst);
                log::debug!("{}: the balloon holds {actual} pages", self.id());
            }
            _ => log::debug!(
                "{}: config write of {} bytes at {offset} ignored (only actual is writable)",
                self.id(),
                data.len()
            ),
        }
    }

    fn activate(&mut self, activation: Activation) -> std::result::Result<(), ActivateError> {
        let reporting = activation.acked_features & F_PAGE_REPORTING != 0;
        let mut kicks = Vec::new();
        let mut queues = Vec::new();
        for active in activation.queues {
            let kind = match active.index {
                0 => QueueKind::Inflate,
                1 => QueueKind::Deflate,
                2 if reporting => QueueKind::Reporting,
                _ => continue,
            };
            kicks.push(active.kick);
            queues.push(ActiveQueue {
                kind,
                index: active.index,
                queue: active.queue,
                broken: false,
            });
        }
        let mut regions: Vec<Region> = activation
            .memory
            .iter()
            .map(|region| {
                let (start, len) = (region.start_addr().0, region.len());
                let backing = self.backing.lookup(start, len);
                if backing.is_none() {
                    log::warn!(
                        "{}: guest RAM at {start:#x} has no known backing: its pages stay",
                        self.id()
                    );
                }
                Region {
                    start,
                    len,
                    host: region.as_ptr() as usize,
                    backing,
                }
            })
            .collect();
        regions.sort_by_key(|r| r.start);
        let wake = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(|e| ActivateError::io("balloon wake-up eventfd", e))?;
        *self
            .control
            .shared
            .interrupt
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(activation.interrupt.clone());
        let handler = BalloonWorker {
            device: self.id().to_owned(),
            memory: activation.memory,
            regions,
            queues,
            interrupt: activation.interrupt,
            huge_pages: HugePageTracker::default(),
            wake,
            pfns: vec![0; 4 * PFN_BATCH],
        };
        let worker = worker::spawn(
            &activation.spawner,
            self.id().to_owned(),
            ThreadKind::Balloon,
            kicks,
            handler,
        )
        .map_err(|e| ActivateError::io("worker thread", e))?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        // Dropping the worker stops and joins its thread.
        self.worker = None;
        *self
            .control
            .shared
            .interrupt
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The target and what the driver said it holds: the transport keeps
    /// neither, and the driver writes `actual` only when it changes.
    fn save_device_state(&self) -> Vec<u8> {
        let mut state = vec![STATE_VERSION];
        state.extend_from_slice(&self.config_bytes());
        state
    }

    fn restore_device_state(&mut self, bytes: &[u8]) -> std::result::Result<(), String> {
        let [version, rest @ ..] = bytes else {
            return Err("balloon state is empty".to_owned());
        };
        if *version != STATE_VERSION {
            return Err(format!(
                "balloon state version {version}, expected {STATE_VERSION}"
            ));
        }
        if bytes.len() != STATE_SIZE {
            return Err(format!(
                "balloon state of {} bytes, expected {STATE_SIZE} (version, num_pages, actual)",
                bytes.len()
            ));
        }
        let word =
            |at: usize| u32::from_le_bytes([rest[at], rest[at + 1], rest[at + 2], rest[at + 3]]);
        let shared = &self.control.shared;
        shared.num_pages.store(word(0), Ordering::SeqCst);
        shared.actual.store(word(4), Ordering::SeqCst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{create_guest_ram, GuestRam};
    use crate::seccomp::{SeccompMode, Spawner, ThreadGroups};
    use crate::virtio::testing::{
        capture_logs, guest_memory, logged, wait_until, Driver, FakeInterrupt, WRITE,
    };
    use vmkit_config::{BalloonConfig, MemoryConfig};

    const MIB: u64 = 1 << 20;
    /// Where the tests put their page number arrays and data pages.
    const PFN_ARRAY: u64 = 0x40000;
    const DATA: u64 = 0x100000;

    fn config(size: u64, deflate_on_oom: bool, free_page_reporting: bool) -> BalloonConfig {
        BalloonConfig {
            size,
            deflate_on_oom,
            free_page_reporting,
        }
    }

    struct Guest {
        balloon: Balloon,
        inflate: Driver,
        deflate: Driver,
        reporting: Driver,
        interrupt: Arc<FakeInterrupt>,
    }

    impl Guest {
        fn set_pfns(&self, at: u64, pfns: &[u32]) {
            let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
            self.inflate.write(at, &bytes);
        }

        fn inflate(&mut self, pfns: &[u32]) -> (u16, u32) {
            send(&mut self.inflate, pfns)
        }

        fn deflate(&mut self, pfns: &[u32]) -> (u16, u32) {
            send(&mut self.deflate, pfns)
        }
    }

    /// Sends `pfns` on `driver`'s queue and waits for the chain back.
    fn send(driver: &mut Driver, pfns: &[u32]) -> (u16, u32) {
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        driver.write(PFN_ARRAY, &bytes);
        driver.add_chain(&[(PFN_ARRAY, 4 * pfns.len() as u32, 0)]);
        driver.next_used()
    }

    fn activate_with(
        id: &str,
        memory: GuestMemoryMmap,
        config: &BalloonConfig,
        spawner: Spawner,
    ) -> Guest {
        let backing = BalloonBacking::of(&memory).unwrap();
        let mut balloon = Balloon::new(id.into(), config, backing).unwrap();
        let mut inflate = Driver::small(&memory, 16, 0x10000);
        let mut deflate = Driver::small(&memory, 16, 0x20000);
        let mut reporting = Driver::small(&memory, 16, 0x30000);
        let mut queues = vec![inflate.activate(0, false), deflate.activate(1, false)];
        if config.free_page_reporting {
            queues.push(reporting.activate(2, false));
        }
        let interrupt = Arc::new(FakeInterrupt::default());
        balloon
            .activate(Activation {
                spawner,
                memory,
                interrupt: interrupt.clone(),
                queues,
                acked_features: balloon.features(),
            })
            .unwrap();
        Guest {
            balloon,
            inflate,
            deflate,
            reporting,
            interrupt,
        }
    }

    fn activate(id: &str, memory: GuestMemoryMmap) -> Guest {
        activate_with(id, memory, &config(0, false, true), Spawner::unconfined())
    }

    fn pfn(gpa: u64) -> u32 {
        (gpa >> PFN_SHIFT) as u32
    }

    fn fill(memory: &GuestMemoryMmap, gpa: u64, len: u64, byte: u8) {
        memory
            .write_slice(&vec![byte; len as usize], GuestAddress(gpa))
            .unwrap();
    }

    fn all_are(memory: &GuestMemoryMmap, gpa: u64, len: u64, byte: u8) -> bool {
        let mut data = vec![0u8; len as usize];
        memory.read_slice(&mut data, GuestAddress(gpa)).unwrap();
        data.iter().all(|&b| b == byte)
    }

    /// Host pages of guest range `[gpa, gpa + len)` in RAM (mincore).
    fn resident_pages(memory: &GuestMemoryMmap, gpa: u64, len: u64) -> usize {
        let host = memory.get_host_address(GuestAddress(gpa)).unwrap();
        let mut vec = vec![0u8; (len / BALLOON_PAGE) as usize];
        // SAFETY: the range lies in guest memory's mapping; `vec` holds one
        // byte per page.
        let done = unsafe { libc::mincore(host.cast(), len as usize, vec.as_mut_ptr()) };
        assert_eq!(done, 0, "{}", io::Error::last_os_error());
        vec.iter().filter(|&&b| b & 1 != 0).count()
    }

    fn shared_ram(size: &str) -> GuestRam {
        let config = MemoryConfig::parse(&format!("size={size},shared=on"), None).unwrap();
        create_guest_ram(&config).unwrap()
    }

    fn allocated_bytes(file: &std::fs::File) -> u64 {
        use std::os::unix::fs::MetadataExt;
        file.metadata().unwrap().blocks() * 512
    }

    #[test]
    fn identity_is_cloud_hypervisors() {
        let plain = Balloon::new(
            "__balloon".into(),
            &config(0, false, false),
            BalloonBacking::default(),
        )
        .unwrap();
        assert_eq!(plain.device_type(), 5);
        assert_eq!(plain.queue_max_sizes(), [128, 128]);
        assert_eq!(plain.features(), F_VERSION_1);
        let full = Balloon::new(
            "__balloon".into(),
            &config(0, true, true),
            BalloonBacking::default(),
        )
        .unwrap();
        assert_eq!(full.queue_max_sizes(), [128, 128, 32]);
        assert_eq!(full.features(), F_VERSION_1 | 1 << 2 | 1 << 5);
        assert!(
            full.counters().is_empty(),
            "Cloud Hypervisor counts nothing"
        );
    }

    #[test]
    fn the_config_holds_the_target_and_what_the_driver_wrote() {
        let mut balloon = Balloon::new(
            "__balloon_config".into(),
            &config(64 * MIB, false, false),
            BalloonBacking::default(),
        )
        .unwrap();
        let read = |balloon: &Balloon, offset: u64, len: usize| {
            let mut data = vec![0xffu8; len];
            balloon.read_config(offset, &mut data);
            data
        };
        assert_eq!(read(&balloon, 0, 8), [0, 0x40, 0, 0, 0, 0, 0, 0]);
        // Before activation a new target waits for the driver to read it.
        balloon.set_target(128 * MIB + 4095).unwrap();
        assert_eq!(read(&balloon, 0, 4), 0x8000u32.to_le_bytes());
        assert_eq!(balloon.control().target_bytes(), 128 * MIB);
        // The driver writes actual, whole; other writes change nothing.
        balloon.write_config(4, &0x1234u32.to_le_bytes());
        assert_eq!(balloon.actual_bytes(), 0x1234 << 12);
        balloon.write_config(0, &7u32.to_le_bytes());
        balloon.write_config(4, &[9]);
        balloon.write_config(5, &[1, 2, 3, 4]);
        assert_eq!(read(&balloon, 0, 8)[..4], 0x8000u32.to_le_bytes());
        assert_eq!(balloon.actual_bytes(), 0x1234 << 12);
        // Partial reads, and nothing past the end.
        assert_eq!(read(&balloon, 4, 2), [0x34, 0x12]);
        assert_eq!(read(&balloon, 6, 4), [0, 0, 0, 0]);
        assert_eq!(read(&balloon, u64::MAX, 2), [0, 0]);
        // Too large for num_pages.
        assert!(balloon.set_target(1 << 44).is_err());
        assert!(Balloon::new(
            "__balloon_config".into(),
            &config(1 << 44, false, false),
            BalloonBacking::default()
        )
        .is_err());
    }

    #[test]
    fn a_new_target_is_signalled_to_an_active_driver_from_any_thread() {
        let mut guest = activate("__balloon_target", guest_memory(16 * MIB));
        let control = guest.balloon.control();
        std::thread::spawn(move || control.set_target(8 * MIB).unwrap())
            .join()
            .unwrap();
        assert_eq!(guest.interrupt.config_count(), 1);
        let mut num_pages = [0u8; 4];
        guest.balloon.read_config(0, &mut num_pages);
        assert_eq!(u32::from_le_bytes(num_pages), 2048);
        guest.balloon.reset();
        // Reset: the next driver reads it, nobody is signalled.
        guest.balloon.set_target(4 * MIB).unwrap();
        assert_eq!(guest.interrupt.config_count(), 1);
    }

    #[test]
    fn inflated_private_pages_go_back_to_the_host() {
        let memory = guest_memory(16 * MIB);
        let mut guest = activate("__balloon_private", memory.clone());
        fill(&memory, DATA, 2 * MIB, 0xaa);
        assert_eq!(resident_pages(&memory, DATA, 2 * MIB), 512);
        // 256 contiguous pages (one madvise) and one apart.
        let mut pfns: Vec<u32> = (0..256).map(|i| pfn(DATA) + i).collect();
        pfns.push(pfn(DATA + MIB + 0x5000));
        assert_eq!(guest.inflate(&pfns), (0, 0));
        assert_eq!(resident_pages(&memory, DATA, MIB), 0);
        assert_eq!(resident_pages(&memory, DATA + MIB, MIB), 255);
        assert!(all_are(&memory, DATA, MIB, 0));
        assert!(all_are(&memory, DATA + MIB + 0x5000, 4096, 0));
        assert!(
            all_are(&memory, DATA + MIB, 0x5000, 0xaa),
            "neighbours kept"
        );
        assert!(all_are(&memory, DATA + MIB + 0x6000, MIB - 0x6000, 0xaa));
        assert_eq!(guest.interrupt.count(0), 1);
        // Deflated: returned, and the pages are the guest's again.
        assert_eq!(guest.deflate(&pfns[..16]), (0, 0));
        assert_eq!(guest.interrupt.count(1), 1);
        fill(&memory, DATA, 16 * 4096, 0x55);
        assert!(all_are(&memory, DATA, 16 * 4096, 0x55));
        assert_eq!(guest.interrupt.needs_reset_count(), 0);
        guest.balloon.reset();
    }

    #[test]
    fn inflated_shared_pages_leave_the_memory_file() {
        let ram = shared_ram("16M");
        let file = &ram.shared_files.as_ref().unwrap()[0];
        let memory = ram.memory.clone();
        let mut guest = activate("__balloon_shared", memory.clone());
        fill(&memory, DATA, 4 * MIB, 0xaa);
        // The rings and the array are touched once before counting.
        assert_eq!(guest.inflate(&[u32::MAX]), (0, 0));
        let before = allocated_bytes(file);
        assert!(before >= 4 * MIB, "{before}");
        let pfns: Vec<u32> = (0..512).map(|i| pfn(DATA) + i).collect();
        assert_eq!(guest.inflate(&pfns), (1, 0));
        let after = allocated_bytes(file);
        assert!(after <= before - 2 * MIB, "{before} -> {after}");
        assert!(all_are(&memory, DATA, 2 * MIB, 0));
        assert!(all_are(&memory, DATA + 2 * MIB, 2 * MIB, 0xaa));
        // Deflating (read ahead) and using the pages again works.
        assert_eq!(guest.deflate(&pfns), (0, 0));
        fill(&memory, DATA, 4096, 1);
        assert!(all_are(&memory, DATA, 4096, 1));
        guest.balloon.reset();
    }

    #[test]
    fn reported_free_ranges_are_given_back() {
        let ram = shared_ram("16M");
        let file = &ram.shared_files.as_ref().unwrap()[0];
        let memory = ram.memory.clone();
        let mut guest = activate("__balloon_report", memory.clone());
        fill(&memory, DATA, 8 * MIB, 0xaa);
        fill(&memory, 15 * MIB, MIB, 0xaa);
        let before = allocated_bytes(file);
        // Linux reports 2 MiB blocks as device-writable buffers; a range
        // starting mid-page keeps that page, and one past RAM is clipped.
        guest.reporting.add_chain(&[
            (DATA, 2 * MIB as u32, WRITE),
            (DATA + 4 * MIB + 100, 8192, WRITE),
            (15 * MIB, 2 * MIB as u32, WRITE),
        ]);
        let (_, len) = guest.reporting.next_used();
        // Counted before reading: a read of a hole in the file fills it.
        let after = allocated_bytes(file);
        assert!(after <= before - 2 * MIB, "{before} -> {after}");
        assert_eq!(len, 4 * MIB as u32 + 8192);
        assert!(all_are(&memory, DATA, 2 * MIB, 0));
        assert!(all_are(&memory, DATA + 4 * MIB, 4096, 0xaa));
        assert!(all_are(&memory, DATA + 4 * MIB + 4096, 4096, 0));
        assert!(all_are(&memory, DATA + 4 * MIB + 8192, 4096, 0xaa));
        assert!(all_are(&memory, 15 * MIB, MIB, 0));
        assert_eq!(guest.interrupt.count(2), 1);
        guest.balloon.reset();
    }

    #[test]
    fn hostile_chains_are_skipped_and_the_device_keeps_working() {
        capture_logs();
        let memory = guest_memory(16 * MIB);
        let mut guest = activate("__balloon_hostile", memory.clone());
        let last = 16 * MIB - 4096;
        fill(&memory, last, 4096, 0xaa);
        fill(&memory, DATA, 4096, 0xaa);
        // Outside RAM: one past the end, the largest page number; the last
        // page is inside.
        assert_eq!(guest.inflate(&[pfn(16 * MIB), u32::MAX, pfn(last)]), (0, 0));
        assert!(all_are(&memory, last, 4096, 0));
        let skipped = logged("__balloon_hostile: inflate: 2 pages outside guest RAM");
        assert_eq!(skipped.len(), 1, "once per chain: {skipped:?}");
        // An array whose length is not a multiple of 4: the whole entries count.
        guest.set_pfns(PFN_ARRAY, &[pfn(DATA)]);
        guest.inflate.add_chain(&[(PFN_ARRAY, 6, 0)]);
        assert_eq!(guest.inflate.next_used().1, 0);
        assert!(all_are(&memory, DATA, 4096, 0));
        // Writable buffers, arrays outside memory, and an array of 4 GiB
        // running off the end of memory.
        fill(&memory, DATA, 4096, 0xaa);
        guest.inflate.add_chain(&[(PFN_ARRAY, 4, WRITE)]);
        guest.inflate.next_used();
        guest
            .inflate
            .add_chain(&[(0xffff_ffff_f000, 64, 0), (u64::MAX - 1, 8, 0)]);
        guest.inflate.next_used();
        guest.inflate.add_chain(&[(16 * MIB - 64, !3, 0)]);
        guest.inflate.next_used();
        assert!(
            all_are(&memory, DATA, 4096, 0xaa),
            "none of those was read as a page"
        );
        assert_eq!(
            logged("__balloon_hostile: inflate: a device-writable").len(),
            1
        );
        assert!(!logged("__balloon_hostile: inflate: a page number array outside").is_empty());
        assert!(!logged("__balloon_hostile: inflate: more than").is_empty());
        // Reports outside memory or wrapping around.
        guest
            .reporting
            .add_chain(&[(u64::MAX - 4095, 8192, WRITE), (64 * MIB, 4096, 0)]);
        guest.reporting.next_used();
        // The queues still work.
        assert_eq!(guest.inflate(&[pfn(DATA)]), (6, 0));
        assert!(all_are(&memory, DATA, 4096, 0));
        assert_eq!(guest.deflate(&[pfn(DATA), u32::MAX]), (0, 0));
        assert_eq!(guest.interrupt.needs_reset_count(), 0);
        guest.balloon.reset();
    }

    #[test]
    fn a_broken_ring_asks_for_a_reset_and_the_other_queues_go_on() {
        capture_logs();
        let memory = guest_memory(16 * MIB);
        let mut guest = activate("__balloon_broken", memory.clone());
        // An available index a whole ring and more ahead of the device.
        memory
            .write_obj(17u16, GuestAddress(guest.inflate.avail + 2))
            .unwrap();
        guest.inflate.kick();
        wait_until("the reset request", || {
            guest.interrupt.needs_reset_count() == 1
        });
        let lines = logged("__balloon_broken: queue 0 stopped");
        assert_eq!(lines.len(), 1, "{lines:?}");
        guest.inflate.kick();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(guest.interrupt.needs_reset_count(), 1, "reported once");
        assert_eq!(guest.deflate(&[pfn(DATA)]), (0, 0));
        guest.balloon.reset();
    }

    #[test]
    fn more_chains_than_a_round_takes_are_all_used() {
        let memory = guest_memory(16 * MIB);
        fill(&memory, DATA, 4096, 0xaa);
        let mut balloon = Balloon::new(
            "__balloon_many".into(),
            &config(0, false, false),
            BalloonBacking::of(&memory).unwrap(),
        )
        .unwrap();
        // 200 chains waiting before the driver starts the device: more
        // than three rounds of the worker.
        let mut inflate = Driver::small(&memory, 256, 0x10000);
        inflate.write(PFN_ARRAY, &pfn(DATA).to_le_bytes());
        for _ in 0..200 {
            inflate.add_chain(&[(PFN_ARRAY, 4, 0)]);
        }
        let mut deflate = Driver::small(&memory, 16, 0x20000);
        balloon
            .activate(Activation {
                spawner: Spawner::unconfined(),
                memory: memory.clone(),
                interrupt: Arc::new(FakeInterrupt::default()),
                queues: vec![inflate.activate(0, false), deflate.activate(1, false)],
                acked_features: F_VERSION_1,
            })
            .unwrap();
        wait_until("every chain used", || inflate.used_idx() == 200);
        assert!(all_are(&memory, DATA, 4096, 0));
        balloon.reset();
    }

    #[test]
    fn the_worker_runs_under_its_seccomp_filter() {
        let spawner = Spawner::start(SeccompMode::Trap, ThreadGroups::default()).unwrap();
        let ram = shared_ram("16M");
        let memory = ram.memory.clone();
        let mut guest = activate_with(
            "__balloon_seccomp",
            memory.clone(),
            &config(0, true, true),
            spawner.clone(),
        );
        fill(&memory, DATA, 4 * MIB, 0xaa);
        assert_eq!(guest.inflate(&[pfn(DATA), pfn(DATA) + 1]), (0, 0));
        assert_eq!(guest.deflate(&[pfn(DATA)]), (0, 0));
        guest
            .reporting
            .add_chain(&[(DATA + 2 * MIB, 2 * MIB as u32, WRITE)]);
        guest.reporting.next_used();
        assert!(all_are(&memory, DATA, 8192, 0));
        assert!(all_are(&memory, DATA + 2 * MIB, 2 * MIB, 0));
        guest.balloon.reset();
        spawner.stop();
    }

    #[test]
    fn huge_pages_are_freed_only_when_whole() {
        let mut tracker = HugePageTracker::default();
        let huge = 2 * MIB;
        let pages = 512u64;
        for i in 0..pages - 1 {
            assert!(!tracker.inflate(huge, 2 * MIB, huge + i * 4096));
        }
        // Again: a page counted twice does not complete it.
        assert!(!tracker.inflate(huge, 2 * MIB, huge));
        // Deflated and inflated again: still one short.
        tracker.deflate(huge, huge + 4096);
        assert!(!tracker.inflate(huge, 2 * MIB, huge + 4096));
        assert!(tracker.inflate(huge, 2 * MIB, huge + (pages - 1) * 4096));
        assert!(tracker.partial.is_empty(), "forgotten once freed");
        // A huge page deflated empty is forgotten.
        tracker.inflate(0, 2 * MIB, 8192);
        tracker.deflate(0, 8192);
        assert!(tracker.partial.is_empty());
    }

    #[test]
    fn the_state_round_trips_and_bad_bytes_are_refused() {
        let mut guest = activate("__balloon_state", guest_memory(16 * MIB));
        guest.balloon.set_target(32 * MIB).unwrap();
        guest.balloon.write_config(4, &100u32.to_le_bytes());
        guest.balloon.reset();
        let state = guest.balloon.save_device_state();
        assert_eq!(state.len(), STATE_SIZE);
        let mut restored = Balloon::new(
            "__balloon_state".into(),
            &config(0, false, false),
            BalloonBacking::default(),
        )
        .unwrap();
        restored.restore_device_state(&state).unwrap();
        assert_eq!(restored.control().target_bytes(), 32 * MIB);
        assert_eq!(restored.actual_bytes(), 100 * 4096);
        for bad in [&[][..], &[2, 0, 0, 0, 0, 0, 0, 0, 0], &state[..8], &[1; 10]] {
            let e = restored.restore_device_state(bad).unwrap_err();
            assert!(e.contains("balloon state"), "{e}");
        }
        assert_eq!(
            restored.actual_bytes(),
            100 * 4096,
            "unchanged by refused bytes"
        );
    }

    #[test]
    fn the_backing_follows_each_regions_mapping() {
        let ram = shared_ram("8M");
        let backing = BalloonBacking::of(&ram.memory).unwrap();
        assert_eq!(backing.lookup(0, 8 * MIB), Some(RegionBacking::Shared));
        let backing = BalloonBacking::of(&guest_memory(8 * MIB)).unwrap();
        assert_eq!(backing.lookup(0, 8 * MIB), Some(RegionBacking::Private));
        assert_eq!(backing.lookup(0, 4 * MIB), None);
    }
}
