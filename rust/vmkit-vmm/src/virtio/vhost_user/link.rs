//! The connection to a vhost-user backend (the vhost-user protocol, through
//! rust-vmm's `vhost` frontend): connecting or accepting it, negotiating
//! features, handing the backend guest memory and the rings, stopping them,
//! and connecting again when a backend restarts.
//!
//! A link outlives the devices built on it: a guest reset rebuilds the
//! devices and guest memory but keeps the backend's connection (backends
//! such as Cloud Hypervisor's end when their frontend goes).

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags,
    VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
    VHOST_USER_CONFIG_OFFSET,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::error::{ErrorKind, ModuleError};
use crate::memory::GuestMemoryMmap;

/// How long a first connection (or, in server mode, the backend's) is
/// waited for, and a lost client-mode backend looked for again: Cloud
/// Hypervisor's minute.
pub const CONNECT_WINDOW: Duration = Duration::from_secs(60);
/// Between two connection attempts.
pub const RETRY_INTERVAL: Duration = Duration::from_millis(100);
/// A backend that takes longer than this to answer a request is taken for
/// dead: no VMM thread waits on a backend for ever.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

pub const PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

/// The most of a backend's own state a snapshot takes (virtiofsd's is the
/// path of every inode the guest holds).
pub const MAX_BACKEND_STATE: usize = 16 << 20;
/// How long a backend may take to give or take its state.
const STATE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a vhost-user backend could not be reached or driven.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{option} {id}: cannot connect to the vhost-user backend at {path}: {source}")]
    Connect {
        option: &'static str,
        id: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Client mode: every attempt for [`CONNECT_WINDOW`] failed; the last one's error.
    #[error(
        "{option} {id}: cannot connect to the vhost-user backend at {path} within {}s: {source}",
        CONNECT_WINDOW.as_secs()
    )]
    ConnectTimeout {
        option: &'static str,
        id: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{option} {id}: no vhost-user backend connected to {path} within {}s",
        CONNECT_WINDOW.as_secs()
    )]
    NoBackend {
        option: &'static str,
        id: String,
        path: String,
    },
    #[error("{option} {id}: cannot listen for the vhost-user backend on {path}: {source}")]
    Listen {
        option: &'static str,
        id: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{option} {id}: vhost-user backend at {path}: {what}: {source}")]
    Protocol {
        option: &'static str,
        id: String,
        path: String,
        what: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error(
        "{option} {id}: the vhost-user backend at {path} serves {backend} queues, \
         {wanted} were asked for (num_queues)"
    )]
    TooManyQueues {
        option: &'static str,
        id: String,
        path: String,
        wanted: usize,
        backend: usize,
    },
    /// The driver's ring setup cannot be handed over (not the backend's fault).
    #[error("{option} {id}: {what}")]
    GuestRing {
        option: &'static str,
        id: String,
        what: String,
    },
    #[error("{option} {id}: vhost-user backend at {path}: {what}")]
    Setup {
        option: &'static str,
        id: String,
        path: String,
        what: String,
    },
}

impl ModuleError for LinkError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Device
    }
}

/// Who connects: the VMM to the backend's socket (client, the default) or
/// the backend to the VMM's (server: `vhost_mode=server`).
pub enum Endpoint {
    Client,
    Server(UnixListener),
}

/// What a device asks of its backend.
#[derive(Clone)]
pub struct Wanted {
    /// The option and device id, for errors.
    pub option: &'static str,
    pub id: String,
    pub socket: String,
    /// Virtio features the VMM can offer (the backend's decide the rest).
    pub features: u64,
    pub protocol: VhostUserProtocolFeatures,
    /// Queues the backend must serve.
    pub queues: usize,
    /// Bytes of device configuration to read from the backend (CONFIG).
    pub config_len: usize,
}

/// One queue as the driver configured it, for the backend.
pub struct RingSetup<'a> {
    pub index: usize,
    pub size: u16,
    pub desc: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
    /// Where the backend starts in the available ring.
    pub base: u16,
    pub kick: &'a EventFd,
    pub call: &'a EventFd,
}

pub struct Link {
    wanted: Wanted,
    endpoint: Endpoint,
    frontend: Option<Frontend>,
    /// The stream under `frontend`, for polling (hang-up).
    stream_fd: RawFd,
    /// Virtio features both sides have (PROTOCOL_FEATURES included).
    features: u64,
    protocol: VhostUserProtocolFeatures,
    /// Device configuration the backend gave (CONFIG), else empty.
    config: Vec<u8>,
    /// Rings handed to the backend since the last stop.
    started: Vec<usize>,
    /// Client mode: why the last attempt to connect failed (nobody there yet).
    last_refusal: Option<i32>,
}

pub type SharedLink = Arc<Mutex<Link>>;

impl Link {
    /// Connects (client) or waits for the backend to connect (server) and
    /// negotiates, within [`CONNECT_WINDOW`].
    pub fn open(wanted: Wanted, server: bool) -> Result<SharedLink, LinkError> {
        let endpoint = if server {
            Endpoint::Server(listen(&wanted)?)
        } else {
            Endpoint::Client
        };
        let mut link = Link {
            wanted,
            endpoint,
            frontend: None,
            stream_fd: -1,
            features: 0,
            protocol: VhostUserProtocolFeatures::empty(),
            config: Vec::new(),
            started: Vec::new(),
            last_refusal: None,
        };
        let deadline = Instant::now() + CONNECT_WINDOW;
        let stream = loop {
            match link.try_connect() {
                Ok(Some(stream)) => break stream,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(RETRY_INTERVAL),
                Ok(None) => return Err(link.no_backend()),
                Err(e) if Instant::now() < deadline && retryable(&e) => {
                    std::thread::sleep(RETRY_INTERVAL)
                }
                Err(source) => return Err(link.connect_error(source)),
            }
        };
        link.attach(stream)?;
        Ok(Arc::new(Mutex::new(link)))
    }

    pub fn lock(link: &SharedLink) -> MutexGuard<'_, Link> {
        link.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn wanted(&self) -> &Wanted {
        &self.wanted
    }

    /// The virtio features both sides have, PROTOCOL_FEATURES included.
    pub fn features(&self) -> u64 {
        self.features
    }

    pub fn protocol(&self) -> VhostUserProtocolFeatures {
        self.protocol
    }

    pub fn config(&self) -> &[u8] {
        &self.config
    }

    pub fn connected(&self) -> bool {
        self.frontend.is_some()
    }

    /// The connection's socket while connected: readable or hung up when
    /// the backend goes (it sends nothing unasked).
    pub fn stream_fd(&self) -> Option<RawFd> {
        self.frontend.as_ref().map(|_| self.stream_fd)
    }

    /// The listening socket of server mode.
    pub fn listener_fd(&self) -> Option<RawFd> {
        match &self.endpoint {
            Endpoint::Server(listener) => Some(listener.as_raw_fd()),
            Endpoint::Client => None,
        }
    }

    pub fn is_server(&self) -> bool {
        matches!(self.endpoint, Endpoint::Server(_))
    }

    /// Forgets a connection that failed or hung up.
    pub fn disconnect(&mut self) {
        self.frontend = None;
        self.stream_fd = -1;
        self.started.clear();
    }

    /// One attempt, without waiting: connects (client) or accepts a pending
    /// connection (server). Ok(None): nobody there yet.
    pub fn try_connect(&mut self) -> std::io::Result<Option<UnixStream>> {
        match &self.endpoint {
            Endpoint::Client => match UnixStream::connect(&self.wanted.socket) {
                Ok(stream) => Ok(Some(stream)),
                Err(e) if retryable(&e) => {
                    self.last_refusal = e.raw_os_error();
                    Ok(None)
                }
                Err(e) => Err(e),
            },
            Endpoint::Server(listener) => {
                listener.set_nonblocking(true)?;
                match listener.accept() {
                    Ok((stream, _)) => {
                        stream.set_nonblocking(false)?;
                        Ok(Some(stream))
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Takes `stream` as the backend's connection and negotiates. A backend
    /// that comes back must offer what was agreed the first time (the
    /// driver may have accepted it already).
    pub fn attach(&mut self, stream: UnixStream) -> Result<(), LinkError> {
        let again = self.features != 0;
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(REPLY_TIMEOUT)))
            .map_err(|source| self.connect_error(source))?;
        self.stream_fd = stream.as_raw_fd();
        let mut frontend = Frontend::from_stream(stream, self.wanted.queues as u64);
        let wanted = self.wanted.clone();
        step(&wanted, "SET_OWNER", frontend.set_owner())?;
        let backend_features = step(&wanted, "GET_FEATURES", frontend.get_features())?;
        let features = wanted.features & backend_features;
        let mut protocol = VhostUserProtocolFeatures::empty();
        if features & PROTOCOL_FEATURES != 0 {
            let backend = step(
                &wanted,
                "GET_PROTOCOL_FEATURES",
                frontend.get_protocol_features(),
            )?;
            protocol = wanted.protocol & backend;
            step(
                &wanted,
                "SET_PROTOCOL_FEATURES",
                frontend.set_protocol_features(protocol),
            )?;
        }
        if again && (features != self.features || protocol != self.protocol) {
            return Err(self.setup_error(format!(
                "the backend came back with other features ({features:#x}, protocol \
                 {:#x}; had {:#x}, {:#x})",
                protocol.bits(),
                self.features,
                self.protocol.bits()
            )));
        }
        if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Each request then waits for the backend's acknowledgement.
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let backend_queues = if protocol.contains(VhostUserProtocolFeatures::MQ) {
            step(&wanted, "GET_QUEUE_NUM", frontend.get_queue_num())? as usize
        } else {
            1
        };
        if wanted.queues > backend_queues && protocol.contains(VhostUserProtocolFeatures::MQ) {
            return Err(LinkError::TooManyQueues {
                option: wanted.option,
                id: wanted.id.clone(),
                path: wanted.socket.clone(),
                wanted: wanted.queues,
                backend: backend_queues,
            });
        }
        if wanted.config_len > 0 && !again {
            if !protocol.contains(VhostUserProtocolFeatures::CONFIG) {
                return Err(self.setup_error(
                    "the backend does not give its device configuration (CONFIG)".into(),
                ));
            }
            let buffer = vec![0u8; wanted.config_len];
            let (_, config) = step(
                &wanted,
                "GET_CONFIG",
                frontend.get_config(
                    VHOST_USER_CONFIG_OFFSET,
                    wanted.config_len as u32,
                    VhostUserConfigFlags::WRITABLE,
                    &buffer,
                ),
            )?;
            self.config = config;
        }
        log::debug!(
            "{} {}: vhost-user backend at {}: features {features:#x} of {backend_features:#x}, \
             protocol features {:#x}, {backend_queues} queues",
            wanted.option,
            wanted.id,
            wanted.socket,
            protocol.bits()
        );
        self.features = features;
        self.protocol = protocol;
        self.frontend = Some(frontend);
        self.started.clear();
        Ok(())
    }

    fn frontend(&mut self) -> Result<&mut Frontend, LinkError> {
        let wanted = &self.wanted;
        self.frontend.as_mut().ok_or_else(|| LinkError::Setup {
            option: wanted.option,
            id: wanted.id.clone(),
            path: wanted.socket.clone(),
            what: "not connected".into(),
        })
    }

    fn protocol_error(&self, what: &'static str, source: vhost::Error) -> LinkError {
        LinkError::Protocol {
            option: self.wanted.option,
            id: self.wanted.id.clone(),
            path: self.wanted.socket.clone(),
            what,
            source,
        }
    }

    fn setup_error(&self, what: String) -> LinkError {
        LinkError::Setup {
            option: self.wanted.option,
            id: self.wanted.id.clone(),
            path: self.wanted.socket.clone(),
            what,
        }
    }

    fn connect_error(&self, source: std::io::Error) -> LinkError {
        LinkError::Connect {
            option: self.wanted.option,
            id: self.wanted.id.clone(),
            path: self.wanted.socket.clone(),
            source,
        }
    }

    pub fn no_backend(&self) -> LinkError {
        match &self.endpoint {
            Endpoint::Server(_) => LinkError::NoBackend {
                option: self.wanted.option,
                id: self.wanted.id.clone(),
                path: self.wanted.socket.clone(),
            },
            Endpoint::Client => LinkError::ConnectTimeout {
                option: self.wanted.option,
                id: self.wanted.id.clone(),
                path: self.wanted.socket.clone(),
                source: std::io::Error::from_raw_os_error(
                    self.last_refusal.unwrap_or(libc::ECONNREFUSED),
                ),
            },
        }
    }

    /// Hands the backend guest memory and the rings, then enables them.
    /// `driver_features` are those the driver accepted.
    pub fn start(
        &mut self,
        memory: &GuestMemoryMmap,
        driver_features: u64,
        rings: &[RingSetup<'_>],
    ) -> Result<(), LinkError> {
        let mut regions = Vec::new();
        for region in memory.iter() {
            let Some(file) = region.file_offset() else {
                return Err(self.setup_error(
                    "guest memory is not shared (memory shared=on or hugepages=on)".into(),
                ));
            };
            regions.push(VhostUserMemoryRegionInfo {
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                mmap_offset: file.start(),
                mmap_handle: file.file().as_raw_fd(),
            });
        }
        let mut addresses = Vec::with_capacity(rings.len());
        for ring in rings {
            let size = usize::from(ring.size);
            let host = |what: &str, at: GuestAddress, len: usize| {
                host_range(memory, at, len).ok_or_else(|| {
                    self.setup_error(format!(
                        "queue {}: the {what} at {:#x} is not in guest memory",
                        ring.index, at.0
                    ))
                })
            };
            addresses.push(VringConfigData {
                queue_max_size: ring.size,
                queue_size: ring.size,
                flags: 0,
                desc_table_addr: host("descriptor table", ring.desc, 16 * size)?,
                used_ring_addr: host("used ring", ring.used, 6 + 8 * size)?,
                avail_ring_addr: host("available ring", ring.avail, 6 + 2 * size)?,
                log_addr: None,
            });
        }
        let protocol_features = self.features & PROTOCOL_FEATURES;
        let backend_features = (driver_features & self.features) | protocol_features;
        let frontend = self.frontend()?;
        let outcome = start_rings(
            frontend,
            backend_features,
            &regions,
            rings,
            &addresses,
            protocol_features != 0,
        );
        match outcome {
            Ok(()) => {
                self.started = rings.iter().map(|r| r.index).collect();
                Ok(())
            }
            Err((what, source)) => {
                let e = self.protocol_error(what, source);
                self.disconnect();
                Err(e)
            }
        }
    }

    /// Stops the rings handed out by `start`: the backend stops using
    /// guest memory once it answered (GET_VRING_BASE). A backend that does
    /// not answer is dropped.
    pub fn stop(&mut self) {
        let started = std::mem::take(&mut self.started);
        let enable_messages = self.features & PROTOCOL_FEATURES != 0;
        let Some(frontend) = self.frontend.as_mut() else {
            return;
        };
        let mut failed = None;
        for index in started {
            if enable_messages {
                if let Err(e) = frontend.set_vring_enable(index, false) {
                    failed = Some(e);
                    break;
                }
            }
            if let Err(e) = frontend.get_vring_base(index) {
                failed = Some(e);
                break;
            }
        }
        if let Some(e) = failed {
            log::warn!(
                "{} {}: the vhost-user backend at {} did not stop its rings ({e}); \
                 its connection is dropped",
                self.wanted.option,
                self.wanted.id,
                self.wanted.socket
            );
            self.disconnect();
        }
    }

    /// Whether the backend gives and takes its own state (DEVICE_STATE).
    pub fn transfers_state(&self) -> bool {
        self.protocol
            .contains(VhostUserProtocolFeatures::DEVICE_STATE)
    }

    /// The backend's own state, its rings stopped: SET_DEVICE_STATE_FD
    /// (save) with a pipe read to its end, then CHECK_DEVICE_STATE.
    pub fn save_state(&mut self) -> Result<Vec<u8>, LinkError> {
        let reader = self.state_channel(VhostTransferStateDirection::SAVE)?;
        let state = transfer(reader, Transfer::Read).map_err(|e| self.setup_error(e))?;
        self.check_state()?;
        Ok(state)
    }

    /// Gives the backend, its rings not started, the state `save_state`
    /// took from another (SET_DEVICE_STATE_FD, load).
    pub fn load_state(&mut self, state: &[u8]) -> Result<(), LinkError> {
        let writer = self.state_channel(VhostTransferStateDirection::LOAD)?;
        transfer(writer, Transfer::Write(state)).map_err(|e| self.setup_error(e))?;
        self.check_state()
    }

    /// SET_DEVICE_STATE_FD over a fresh pipe: the backend gets the end it
    /// writes (save) or reads (load); ours comes back, unless the backend
    /// answers with a descriptor of its own to use instead.
    fn state_channel(
        &mut self,
        direction: VhostTransferStateDirection,
    ) -> Result<OwnedFd, LinkError> {
        let (read_end, write_end) = self.pipe()?;
        let (ours, theirs) = match direction {
            VhostTransferStateDirection::SAVE => (read_end, write_end),
            VhostTransferStateDirection::LOAD => (write_end, read_end),
        };
        let given = self.frontend()?.set_device_state_fd(
            direction,
            VhostTransferStatePhase::STOPPED,
            theirs,
        );
        match given {
            Ok(Some(file)) => Ok(OwnedFd::from(file)),
            Ok(None) => Ok(ours),
            Err(e) => Err(self.protocol_error("SET_DEVICE_STATE_FD", e)),
        }
    }

    /// CHECK_DEVICE_STATE: whether the backend took or gave its state whole.
    fn check_state(&mut self) -> Result<(), LinkError> {
        let checked = self.frontend()?.check_device_state();
        checked.map_err(|e| self.protocol_error("CHECK_DEVICE_STATE", e))
    }

    /// A pipe (read end, write end) for a state transfer.
    fn pipe(&self) -> Result<(OwnedFd, OwnedFd), LinkError> {
        let mut fds = [-1; 2];
        // SAFETY: pipe2 fills the two descriptors, which we then own.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(self.setup_error(format!("cannot make a pipe for its state: {e}")));
        }
        // SAFETY: both are open and nothing else owns them.
        Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
    }

    /// Sends a device configuration write (a `WRITABLE` field).
    pub fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<(), LinkError> {
        let frontend = self.frontend()?;
        let result = frontend.set_config(
            VHOST_USER_CONFIG_OFFSET + offset,
            VhostUserConfigFlags::WRITABLE,
            data,
        );
        result.map_err(|e| self.protocol_error("SET_CONFIG", e))
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        if let Endpoint::Server(_) = self.endpoint {
            // The socket file is ours in server mode.
            let _ = std::fs::remove_file(&self.wanted.socket);
        }
    }
}

enum Transfer<'a> {
    Read,
    Write(&'a [u8]),
}

/// Reads a backend's state from `fd` to its end, or writes `state` to it
/// and closes it, within [`STATE_TIMEOUT`] and [`MAX_BACKEND_STATE`]; the
/// error says what went wrong. Our end alone is made non-blocking (the
/// backend's is another open file).
fn transfer(fd: OwnedFd, direction: Transfer<'_>) -> Result<Vec<u8>, String> {
    // SAFETY: F_SETFL on a descriptor we own.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } != 0 {
        return Err(format!("its state: {}", std::io::Error::last_os_error()));
    }
    let deadline = Instant::now() + STATE_TIMEOUT;
    let mut file = std::fs::File::from(fd);
    let mut state = Vec::new();
    let mut written = 0;
    let events = match direction {
        Transfer::Read => libc::POLLIN,
        Transfer::Write(_) => libc::POLLOUT,
    };
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        let step = match direction {
            Transfer::Read => file
                .read(&mut chunk)
                .inspect(|&n| state.extend_from_slice(&chunk[..n])),
            Transfer::Write(bytes) if written == bytes.len() => return Ok(state),
            Transfer::Write(bytes) => file.write(&bytes[written..]).inspect(|&n| written += n),
        };
        match step {
            Ok(0) if matches!(direction, Transfer::Read) => return Ok(state),
            Ok(_) if state.len() > MAX_BACKEND_STATE => {
                return Err(format!(
                    "its state is larger than {} MiB",
                    MAX_BACKEND_STATE >> 20
                ))
            }
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("its state: {e}")),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "its state did not come through within {}s",
                STATE_TIMEOUT.as_secs()
            ));
        }
        let mut poll = libc::pollfd {
            fd: file.as_raw_fd(),
            events,
            revents: 0,
        };
        // SAFETY: one valid pollfd; the wait is bounded by the deadline.
        unsafe { libc::poll(&mut poll, 1, left.as_millis().min(1000) as i32) };
    }
}

/// The requests of `Link::start`; an error names the one that failed.
fn start_rings(
    frontend: &mut Frontend,
    features: u64,
    regions: &[VhostUserMemoryRegionInfo],
    rings: &[RingSetup<'_>],
    addresses: &[VringConfigData],
    enable_messages: bool,
) -> Result<(), (&'static str, vhost::Error)> {
    let run = |what, r: vhost::Result<()>| r.map_err(|e| (what, e));
    run("SET_FEATURES", frontend.set_features(features))?;
    run("SET_MEM_TABLE", frontend.set_mem_table(regions).map(|_| ()))?;
    for (ring, config) in rings.iter().zip(addresses) {
        run(
            "SET_VRING_NUM",
            frontend.set_vring_num(ring.index, ring.size),
        )?;
        run(
            "SET_VRING_ADDR",
            frontend.set_vring_addr(ring.index, config),
        )?;
        run(
            "SET_VRING_BASE",
            frontend.set_vring_base(ring.index, ring.base),
        )?;
        run(
            "SET_VRING_CALL",
            frontend.set_vring_call(ring.index, ring.call),
        )?;
        run(
            "SET_VRING_KICK",
            frontend.set_vring_kick(ring.index, ring.kick),
        )?;
    }
    if enable_messages {
        for ring in rings {
            run(
                "SET_VRING_ENABLE",
                frontend.set_vring_enable(ring.index, true),
            )?;
        }
    }
    // A request with a reply: once it is answered, the backend has acted on
    // everything before it (without REPLY_ACK nothing else says so). A kick
    // it reads before its ring is enabled is dropped, so callers kick after.
    frontend
        .get_features()
        .map(|_| ())
        .map_err(|e| ("GET_FEATURES", e))
}

/// The host address of `len` bytes of guest memory at `at`, all in one
/// region (the backend maps each region on its own).
fn host_range(memory: &GuestMemoryMmap, at: GuestAddress, len: usize) -> Option<u64> {
    let region = memory.find_region(at)?;
    let offset = region.to_region_addr(at)?;
    if offset.0.checked_add(len as u64)? > region.len() {
        return None;
    }
    region.get_host_address(offset).ok().map(|p| p as u64)
}

/// One negotiation request's result, its failure named.
fn step<T>(wanted: &Wanted, what: &'static str, result: vhost::Result<T>) -> Result<T, LinkError> {
    result.map_err(|source| LinkError::Protocol {
        option: wanted.option,
        id: wanted.id.clone(),
        path: wanted.socket.clone(),
        what,
        source,
    })
}

fn retryable(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
    )
}

/// Server mode's socket: a stale socket file from an earlier run is
/// replaced, anything else at the path is refused.
fn listen(wanted: &Wanted) -> Result<UnixListener, LinkError> {
    use std::os::unix::fs::FileTypeExt;
    let path = PathBuf::from(&wanted.socket);
    let error = |source| LinkError::Listen {
        option: wanted.option,
        id: wanted.id.clone(),
        path: wanted.socket.clone(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(&path) {
        if !meta.file_type().is_socket() {
            return Err(error(std::io::Error::from(
                std::io::ErrorKind::AlreadyExists,
            )));
        }
        if UnixStream::connect(&path).is_ok() {
            return Err(error(std::io::Error::from(std::io::ErrorKind::AddrInUse)));
        }
        std::fs::remove_file(&path).map_err(error)?;
    }
    UnixListener::bind(&path).map_err(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backend_state_goes_through_a_pipe_both_ways() {
        let link = client("/nonexistent");
        let state: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        // Save: the backend writes (more than a pipe holds) and closes.
        let (ours, theirs) = link.pipe().unwrap();
        let sent = state.clone();
        let writer = std::thread::spawn(move || {
            std::fs::File::from(theirs).write_all(&sent).unwrap();
        });
        assert_eq!(transfer(ours, Transfer::Read).unwrap(), state);
        writer.join().unwrap();
        // Load: we write and close; the backend reads to the end.
        let (theirs, ours) = link.pipe().unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            std::fs::File::from(theirs).read_to_end(&mut got).unwrap();
            got
        });
        transfer(ours, Transfer::Write(&state)).unwrap();
        assert_eq!(reader.join().unwrap(), state);
    }

    #[test]
    fn a_backend_that_sends_too_much_state_is_stopped() {
        let link = client("/nonexistent");
        let (ours, theirs) = link.pipe().unwrap();
        let writer = std::thread::spawn(move || {
            let mut pipe = std::fs::File::from(theirs);
            let chunk = vec![7u8; 1 << 20];
            // Until the reader gives up (EPIPE).
            while pipe.write_all(&chunk).is_ok() {}
        });
        let error = transfer(ours, Transfer::Read).unwrap_err();
        assert_eq!(error, "its state is larger than 16 MiB");
        writer.join().unwrap();
    }

    fn client(socket: &str) -> Link {
        Link {
            wanted: Wanted {
                option: "--fs",
                id: "fs0".into(),
                socket: socket.into(),
                features: 0,
                protocol: VhostUserProtocolFeatures::empty(),
                queues: 2,
                config_len: 0,
            },
            endpoint: Endpoint::Client,
            frontend: None,
            stream_fd: -1,
            features: 0,
            protocol: VhostUserProtocolFeatures::empty(),
            config: Vec::new(),
            started: Vec::new(),
            last_refusal: None,
        }
    }

    #[test]
    fn a_backend_not_there_yet_is_retried_and_its_error_named_at_the_end() {
        let mut link = client("/nonexistent-vmkit-dir/fs.sock");
        assert!(matches!(link.try_connect(), Ok(None)));
        assert_eq!(
            link.no_backend().to_string(),
            "--fs fs0: cannot connect to the vhost-user backend at \
             /nonexistent-vmkit-dir/fs.sock within 60s: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn an_error_that_is_not_retried_does_not_speak_of_the_minute() {
        let mut link = client("/dev/null/fs.sock");
        let error = link.try_connect().expect_err("ENOTDIR is not retried");
        assert_eq!(
            link.connect_error(error).to_string(),
            "--fs fs0: cannot connect to the vhost-user backend at /dev/null/fs.sock: \
             Not a directory (os error 20)"
        );
    }
}
