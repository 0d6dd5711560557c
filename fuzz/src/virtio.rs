//! Queue processing of every virtio device: the real device, activated on
//! rings that a hostile driver lays out from the input, its real queue
//! handlers run inline (see `vmkit_vmm::fuzzing`).

use std::cell::RefCell;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use vm_memory::GuestAddress;
use vmkit_config::{DiskConfig, NetConfig};
use vmkit_vmm::devices::serial::InputSink;
use vmkit_vmm::fuzzing::{inline_worker_count, run_inline_workers, set_inline_workers};
use vmkit_vmm::memory::GuestMemoryMmap;
use vmkit_vmm::virtio::balloon::{Balloon, BalloonBacking};
use vmkit_vmm::virtio::block::Block;
use vmkit_vmm::virtio::console::{Console, ConsoleInput};
use vmkit_vmm::virtio::net::Net;
use vmkit_vmm::virtio::pmem::{self, Pmem};
use vmkit_vmm::virtio::rng::Rng;
use vmkit_vmm::virtio::vsock::Vsock;
use vmkit_vmm::virtio::watchdog::Watchdog;
use vmkit_vmm::virtio::{Activation, Interrupt, VirtioDevice, F_RING_EVENT_IDX, F_VERSION_1};

use crate::input::Input;
use crate::ring::{guest_memory, play, Device, Ring};

/// Rounds of inline worker events per run: enough to drain what a step
/// queued, bounded for devices that re-arm timers.
const ROUNDS: usize = 16;

/// Counts what the device signalled; never fails.
#[derive(Default)]
pub struct Signals {
    queue: AtomicUsize,
    config: AtomicUsize,
    needs_reset: AtomicUsize,
}

impl Interrupt for Signals {
    fn signal_queue(&self, _queue: u16) -> std::io::Result<()> {
        self.queue.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn signal_config(&self) -> std::io::Result<()> {
        self.config.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn signal_needs_reset(&self) -> std::io::Result<()> {
        self.needs_reset.fetch_add(1, Ordering::Relaxed);
        self.signal_config()
    }
}

/// A queue size the driver picks: a power of two up to `max`.
fn ring_size(input: &mut Input<'_>, max: u16) -> u16 {
    (1u16 << (input.u8() % 9)).min(max)
}

/// Activates `device` on `rings` (queue i = ring i) with the features the
/// input accepts, plays the input, resets the device and checks that every
/// worker is gone.
fn exercise(
    device: &mut dyn VirtioDevice,
    rings: &mut [Ring],
    actor: &mut dyn Actor,
    input: &mut Input<'_>,
) {
    exercise_on(guest_memory(), device, rings, actor, input);
}

/// `exercise` on `memory` (the fuzz memory and more).
fn exercise_on(
    memory: GuestMemoryMmap,
    device: &mut dyn VirtioDevice,
    rings: &mut [Ring],
    actor: &mut dyn Actor,
    input: &mut Input<'_>,
) {
    let offered = device.features();
    let acked = (offered & input.u64()) | F_VERSION_1;
    let event_idx = acked & F_RING_EVENT_IDX != 0;
    let queues = rings
        .iter()
        .enumerate()
        .map(|(i, ring)| ring.active(&memory, i as u16, event_idx))
        .collect();
    set_inline_workers(true);
    let activated = device.activate(Activation {
        memory: memory.clone(),
        interrupt: Arc::new(Signals::default()),
        queues,
        acked_features: acked,
        spawner: vmkit_vmm::seccomp::Spawner::unconfined(),
    });
    if activated.is_ok() {
        let mut driven = Driven {
            actor,
            memory: &memory,
        };
        play(&memory, rings, &mut driven, input);
    }
    device.reset();
    set_inline_workers(false);
    assert_eq!(
        inline_worker_count(),
        0,
        "a worker outlived its device's reset"
    );
}

/// Device-specific actions beside the rings.
trait Actor {
    fn action(&mut self, _memory: &GuestMemoryMmap, _input: &mut Input<'_>) {}
    /// After the workers ran (drain what the device sent out).
    fn after_run(&mut self) {}
}

struct Driven<'a> {
    actor: &'a mut dyn Actor,
    memory: &'a GuestMemoryMmap,
}

impl Device for Driven<'_> {
    fn run(&mut self) {
        run_inline_workers(ROUNDS);
        self.actor.after_run();
    }

    fn action(&mut self, input: &mut Input<'_>) {
        self.actor.action(self.memory, input);
    }
}

struct NoActions;
impl Actor for NoActions {}

thread_local! {
    /// The disk image (a memfd), created once per process, emptied per input.
    static IMAGE: RefCell<Option<File>> = const { RefCell::new(None) };
}

const IMAGE_LEN: i64 = 64 * 1024;

pub fn image_path() -> String {
    IMAGE.with(|image| {
        let mut image = image.borrow_mut();
        let file = image.get_or_insert_with(|| {
            // SAFETY: memfd_create with a NUL-terminated name; checked.
            let fd = unsafe { libc::memfd_create(c"vmkit-fuzz-disk".as_ptr(), libc::MFD_CLOEXEC) };
            assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
            // SAFETY: a fresh descriptor nobody else owns.
            unsafe { File::from_raw_fd(fd) }
        });
        // A fresh, zeroed image for every input.
        file.set_len(0).expect("truncate the image");
        file.set_len(IMAGE_LEN as u64).expect("size the image");
        format!("/proc/self/fd/{}", file.as_raw_fd())
    })
}

/// virtio-blk on a 64 KiB image, synchronous engine or io_uring.
pub fn block(data: &[u8]) {
    let mut input = Input::new(data);
    let size = ring_size(&mut input, 256).max(2);
    let options = input.u8();
    let mut text = format!("path={},queue_size={size}", image_path());
    if options & 1 != 0 {
        text.push_str(",readonly=on");
    }
    if options & 2 == 0 {
        // Half the inputs take the synchronous engine, half io_uring.
        text.push_str(",_disable_io_uring=on");
    }
    if options & 4 != 0 {
        text.push_str(",serial=fuzz-serial");
    }
    if options & 8 != 0 {
        // Small buckets: requests get throttled within one input.
        text.push_str(",bw_size=4096,bw_refill_time=10,ops_size=2,ops_refill_time=10");
    }
    let config = DiskConfig::parse(&text).expect("a valid disk option");
    let mut device = Block::with_lock(&config, None, false).expect("the image opens");
    let mut rings = [Ring::new(0, size)];
    exercise(&mut device, &mut rings, &mut NoActions, &mut input);
}

/// The network ends of the device's socketpairs.
struct Network {
    peers: Vec<File>,
    scratch: Vec<u8>,
}

impl Actor for Network {
    /// A frame from the network (virtio-net header first) to pair `n`.
    fn action(&mut self, _memory: &GuestMemoryMmap, input: &mut Input<'_>) {
        let pair = usize::from(input.u8()) % self.peers.len();
        let len = usize::from(input.u16() % 2048);
        let frame = input.bytes(len);
        let _ = self.peers[pair].write(frame);
    }

    fn after_run(&mut self) {
        // What the guest sent: read so the socket never fills.
        for peer in &mut self.peers {
            while peer.read(&mut self.scratch).is_ok_and(|n| n > 0) {}
        }
    }
}

/// virtio-net over socketpairs: rx, tx and control queues, one or two pairs.
pub fn net(data: &[u8]) {
    let mut input = Input::new(data);
    let size = ring_size(&mut input, 256).max(2);
    let options = input.u8();
    let pairs: u16 = if options & 1 != 0 { 2 } else { 1 };
    let mut text = format!(
        "mac=12:34:56:78:9a:bc,num_queues={},queue_size={size}",
        2 * pairs
    );
    if options & 2 != 0 {
        text.push_str(",mtu=1280");
    }
    if options & 4 != 0 {
        text.push_str(",offload_tso=off,offload_ufo=off,offload_csum=off");
    }
    if options & 8 != 0 {
        text.push_str(",bw_size=4096,bw_refill_time=10,ops_size=2,ops_refill_time=10");
    }
    let config = NetConfig::parse(&text).expect("a valid net option");
    let (mut device, peers) = Net::over_socketpairs(&config, "fuzz-net").expect("socketpairs");
    let mut rings: Vec<Ring> = (0..2 * pairs + 1).map(|i| Ring::new(i, size)).collect();
    let mut network = Network {
        peers,
        scratch: vec![0; 65536],
    };
    exercise(&mut device, &mut rings, &mut network, &mut input);
}

/// virtio-rng from /dev/urandom.
pub fn rng(data: &[u8]) {
    let mut input = Input::new(data);
    let size = ring_size(&mut input, 256);
    let mut device = Rng::new("fuzz-rng".into(), "/dev/urandom").expect("/dev/urandom");
    let mut rings = [Ring::new(0, size)];
    exercise(&mut device, &mut rings, &mut NoActions, &mut input);
}

/// virtio-watchdog: pets (and anything else a driver puts on its queue); a
/// reset it asks for goes to a run control of its own.
pub fn watchdog(data: &[u8]) {
    let mut input = Input::new(data);
    let size = ring_size(&mut input, 8);
    let control = Arc::new(vmkit_vmm::control::Control::new());
    let mut device = Watchdog::new("fuzz-watchdog".into(), control).expect("a timerfd");
    let mut rings = [Ring::new(0, size)];
    exercise(&mut device, &mut rings, &mut NoActions, &mut input);
}

/// The host's side of the balloon: new targets from the input.
struct BalloonHost(vmkit_vmm::virtio::balloon::BalloonControl);

impl Actor for BalloonHost {
    fn action(&mut self, _memory: &GuestMemoryMmap, input: &mut Input<'_>) {
        let _ = self.0.set_target(u64::from(input.u32()) << 12);
    }
}

/// virtio-balloon on the fuzz guest memory (private anonymous): page
/// numbers inflated, deflated and reported, anywhere and of any count, and
/// the host's target moving.
pub fn balloon(data: &[u8]) {
    let mut input = Input::new(data);
    let size = ring_size(&mut input, 128);
    let options = input.u8();
    let config = vmkit_config::BalloonConfig {
        size: 0,
        deflate_on_oom: options & 1 != 0,
        free_page_reporting: options & 2 != 0,
    };
    let backing = BalloonBacking::of(&guest_memory()).expect("the fuzz memory's backing");
    let mut device = Balloon::new("fuzz-balloon".into(), &config, backing).expect("a balloon");
    let mut host = BalloonHost(device.control());
    let queues = if config.free_page_reporting { 3 } else { 2 };
    let mut rings: Vec<Ring> = (0..queues).map(|i| Ring::new(i, size)).collect();
    exercise(&mut device, &mut rings, &mut host, &mut input);
}

/// The host's side of virtio-mem: new requested sizes from the input (any
/// size: refused ones too).
struct VirtioMemHost(vmkit_vmm::virtio::mem::VirtioMemControl);

impl Actor for VirtioMemHost {
    fn action(&mut self, _memory: &GuestMemoryMmap, input: &mut Input<'_>) {
        let _ = self.0.resize(u64::from(input.u32()) << 12);
    }
}

/// Where the virtio-mem target's region is: 128 MiB at 128 MiB, past the
/// fuzz memory (private anonymous, never touched unless plugged and written).
pub const VIRTIO_MEM_REGION: u64 = 128 << 20;

/// virtio-mem over a region of its own: PLUG, UNPLUG, UNPLUG_ALL and STATE
/// requests with any address, block count and type, malformed chains, and
/// the host's requested size moving.
pub fn virtio_mem(data: &[u8]) {
    use vmkit_vmm::virtio::mem::{MemRegion, VirtioMem};
    let mut input = Input::new(data);
    let size = ring_size(&mut input, 128);
    let memory = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), crate::ring::MEM_SIZE as usize),
        (GuestAddress(VIRTIO_MEM_REGION), VIRTIO_MEM_REGION as usize),
    ])
    .expect("the fuzz memory and the virtio-mem region");
    let region = MemRegion {
        addr: VIRTIO_MEM_REGION,
        size: VIRTIO_MEM_REGION,
        backing: vmkit_vmm::memory::RegionBacking::Private,
    };
    let requested = u64::from(input.u8()) * vmkit_vmm::virtio::mem::BLOCK_SIZE;
    let mut device = VirtioMem::new(
        "fuzz-mem".into(),
        region,
        None,
        requested.min(VIRTIO_MEM_REGION),
    )
    .expect("a virtio-mem device");
    let mut host = VirtioMemHost(device.control());
    let mut rings = [Ring::new(0, size)];
    exercise_on(memory, &mut device, &mut rings, &mut host, &mut input);
}

/// virtio-pmem over a 2 MiB memfd: FLUSH requests and whatever else a
/// driver puts on its queue.
pub fn pmem(data: &[u8]) {
    let mut input = Input::new(data);
    let size = ring_size(&mut input, 256);
    // SAFETY: memfd_create with a NUL-terminated name; checked.
    let fd = unsafe { libc::memfd_create(c"vmkit-fuzz-pmem".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor nobody else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(pmem::REGION_ALIGNMENT).expect("size the file");
    let mapping =
        pmem::map_backing(&file, pmem::REGION_ALIGNMENT, false, "memfd").expect("map the file");
    let mut device = Pmem::new("fuzz-pmem".into(), file, 1 << 32, Arc::new(mapping));
    let mut rings = [Ring::new(0, size)];
    exercise(&mut device, &mut rings, &mut NoActions, &mut input);
}

/// Host programs on the vsock device's unix socket, and one listening for
/// the guest's connections to host port 1235.
struct HostStreams {
    path: String,
    listener: std::os::unix::net::UnixListener,
    streams: Vec<std::os::unix::net::UnixStream>,
    scratch: Vec<u8>,
}

impl Actor for HostStreams {
    fn action(&mut self, _memory: &GuestMemoryMmap, input: &mut Input<'_>) {
        let choice = input.u8();
        let pick = usize::from(input.u8());
        match choice % 4 {
            // A host program connects and asks for a guest port (or says
            // something else: the line is the input's).
            0 if self.streams.len() < 8 => {
                if let Ok(mut stream) = std::os::unix::net::UnixStream::connect(&self.path) {
                    let _ = stream.set_nonblocking(true);
                    let line = if choice & 0x80 != 0 {
                        let len = usize::from(input.u8() % 48);
                        input.bytes(len).to_vec()
                    } else {
                        format!("CONNECT {}\n", 1230 + u32::from(input.u8() % 8)).into_bytes()
                    };
                    let _ = stream.write(&line);
                    self.streams.push(stream);
                }
            }
            1 if !self.streams.is_empty() => {
                let len = usize::from(input.u16() % 8192);
                let index = pick % self.streams.len();
                let _ = self.streams[index].write(input.bytes(len));
            }
            2 if !self.streams.is_empty() => {
                let index = pick % self.streams.len();
                let stream = self.streams.swap_remove(index);
                if choice & 0x80 != 0 {
                    let _ = stream.shutdown(std::net::Shutdown::Write);
                    self.streams.push(stream);
                }
            }
            _ => {}
        }
    }

    fn after_run(&mut self) {
        // The guest's connections to the host; what the guest sent is read
        // so that no socket fills.
        while self.streams.len() < 16 {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    let _ = stream.set_nonblocking(true);
                    self.streams.push(stream);
                }
                Err(_) => break,
            }
        }
        for stream in &mut self.streams {
            while stream.read(&mut self.scratch).is_ok_and(|n| n > 0) {}
        }
    }
}

/// virtio-vsock with its unix socket: the guest's packets on tx, buffers on
/// rx, and host programs connecting, writing and closing.
pub fn vsock(data: &[u8]) {
    let mut input = Input::new(data);
    let size = ring_size(&mut input, 256).max(2);
    let path = format!("/tmp/vmkit-fuzz-vsock-{}.sock", std::process::id());
    let host_port = format!("{path}_1235");
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&host_port);
    let mut device = Vsock::new("fuzz-vsock".into(), 3, &path).expect("the vsock socket binds");
    let listener = std::os::unix::net::UnixListener::bind(&host_port).expect("host port 1235");
    listener
        .set_nonblocking(true)
        .expect("non-blocking listener");
    let mut rings = [Ring::new(0, size), Ring::new(1, size), Ring::new(2, size)];
    let mut host = HostStreams {
        path,
        listener,
        streams: Vec::new(),
        scratch: vec![0; 65536],
    };
    exercise(&mut device, &mut rings, &mut host, &mut input);
    drop(device);
    let _ = std::fs::remove_file(&host_port);
}

struct Typing(Arc<ConsoleInput>);

impl Actor for Typing {
    /// Typed input from the backend.
    fn action(&mut self, _memory: &GuestMemoryMmap, input: &mut Input<'_>) {
        let len = usize::from(input.u8());
        self.0.feed(input.bytes(len));
    }
}

/// virtio-console with a null backend (output captured) and typed input.
pub fn console(data: &[u8]) {
    let mut input = Input::new(data);
    let size = ring_size(&mut input, 256);
    let backend = crate::null_backend("console");
    let mut device = Console::new("fuzz-console".into(), backend.clone()).expect("console");
    let mut rings = [Ring::new(0, size), Ring::new(1, size)];
    let mut actor = Typing(device.input_sink());
    exercise(&mut device, &mut rings, &mut actor, &mut input);
    backend.close();
}
