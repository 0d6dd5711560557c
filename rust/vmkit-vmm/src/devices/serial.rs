//! The 16550 UART at 0x3f8 and its backends (Cloud Hypervisor's `--serial`
//! modes), plus an in-memory capture of everything the guest prints so that
//! Python can read the console while the VM runs.
//!
//! Output never blocks a vCPU on a slow reader: pty, socket and file writes
//! are non-blocking and drop what does not fit; stdout, which other programs
//! share, is written only while it has room. A vCPU blocked in `write`
//! would hold the device's lock and could not be parked, so pause, reboot
//! and shutdown would wait on whoever reads the other end; the capture
//! below still has everything. What vmkit creates (`file=` outputs,
//! `socket=` sockets) is readable and writable by its owner only, whatever
//! the umask (Cloud Hypervisor gets the same by setting umask 077).

use crate::seccomp::{self, SeccompMode, ThreadGroups, ThreadKind};
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmkit_config::{ConsoleConfig, ConsoleOutputMode};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::BusDevice;
use crate::error::{ErrorKind, ModuleError, Result};

/// Why a serial or console backend could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// `what` says which backend and what failed ("serial: eventfd").
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    /// `file=` names a FIFO that nobody reads: writing would block.
    #[error("Cannot create {what} output file {path} (--{what} file): it is a FIFO that no process has open for reading")]
    FifoWithoutReader { what: String, path: String },
}

impl ModuleError for SerialError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Device
    }
}

/// Everything the guest wrote to the serial port, up to a bound.
pub struct SerialCapture {
    inner: Mutex<CaptureInner>,
    grew: Condvar,
}

struct CaptureInner {
    data: VecDeque<u8>,
    /// Absolute offset of `data[0]` in the output stream.
    start: u64,
}

/// Keep the last 16 MiB; older output is dropped (offsets stay absolute).
const CAPTURE_LIMIT: usize = 16 << 20;
/// How often input from a pty that no one has open is tried again.
const HUP_RETRY: Duration = Duration::from_millis(100);

impl Default for SerialCapture {
    fn default() -> Self {
        Self::new()
    }
}

impl SerialCapture {
    pub fn new() -> Self {
        SerialCapture {
            inner: Mutex::new(CaptureInner {
                data: VecDeque::new(),
                start: 0,
            }),
            grew: Condvar::new(),
        }
    }

    fn push(&self, bytes: &[u8]) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.data.extend(bytes);
        let excess = inner.data.len().saturating_sub(CAPTURE_LIMIT);
        if excess > 0 {
            inner.data.drain(..excess);
            inner.start += excess as u64;
        }
        self.grew.notify_all();
    }

    /// The absolute offset just past the last byte captured.
    pub fn end(&self) -> u64 {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.start + inner.data.len() as u64
    }

    /// Bytes from `offset` on (or from the oldest kept byte if `offset` was
    /// dropped): (offset of the first byte returned, bytes).
    pub fn read_from(&self, offset: u64) -> (u64, Vec<u8>) {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let from = offset.max(inner.start);
        let skip = usize::try_from(from - inner.start).unwrap_or(usize::MAX);
        let bytes = inner.data.iter().skip(skip).copied().collect();
        (from, bytes)
    }

    /// Waits until output goes past `offset`; false on timeout.
    pub fn wait_past(&self, offset: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if inner.start + inner.data.len() as u64 > offset {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            inner = self
                .grew
                .wait_timeout(inner, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Wakes waiters (used when the VM stops, so they can re-check state).
    pub fn wake(&self) {
        self.grew.notify_all();
    }
}

enum Wait {
    Ready(libc::c_short),
    Retry,
    Stop,
}

/// Writes without blocking; drops what does not fit (EAGAIN).
fn write_nonblocking(fd: RawFd, bytes: &[u8]) {
    let mut rest = bytes;
    while !rest.is_empty() {
        // SAFETY: fd is open for the backend's lifetime; the buffer is valid.
        let n = unsafe { libc::write(fd, rest.as_ptr().cast(), rest.len()) };
        if n <= 0 {
            return;
        }
        rest = &rest[n as usize..];
    }
}

/// Writes to a descriptor shared with other programs (stdout), which must
/// stay blocking for them: a chunk at a time while poll says there is room,
/// dropping the rest otherwise (a stuck pipe, a terminal stopped by ^S). A
/// write that blocks all the same is ended by the vCPU's kick (EINTR, no
/// SA_RESTART), and not retried.
fn write_when_ready(fd: RawFd, bytes: &[u8]) {
    // Small enough that a pipe or terminal reporting room takes it whole.
    const CHUNK: usize = 256;
    for chunk in bytes.chunks(CHUNK) {
        let mut ready = libc::pollfd {
            fd,
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: one valid pollfd; no wait.
        let n = unsafe { libc::poll(&mut ready, 1, 0) };
        if n != 1 || ready.revents & libc::POLLOUT == 0 {
            return;
        }
        // SAFETY: fd is open for the backend's lifetime; the buffer is valid.
        let written = unsafe { libc::write(fd, chunk.as_ptr().cast(), chunk.len()) };
        if written != chunk.len() as isize {
            return;
        }
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own, with checked results.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Terminal settings to restore when the VM is gone.
struct RawTerminal {
    fd: RawFd,
    saved: libc::termios,
}

impl RawTerminal {
    fn enter(fd: RawFd) -> Option<Self> {
        // SAFETY: isatty/tcgetattr/tcsetattr on a valid fd with a valid termios.
        unsafe {
            if libc::isatty(fd) != 1 {
                return None;
            }
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(fd, &mut saved) != 0 {
                return None;
            }
            let mut raw = saved;
            libc::cfmakeraw(&mut raw);
            // Keep output post-processing so host lines stay readable.
            raw.c_oflag = saved.c_oflag;
            if libc::tcsetattr(fd, libc::TCSANOW, &raw) != 0 {
                return None;
            }
            Some(RawTerminal { fd, saved })
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in `enter` on the same fd.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

enum Output {
    Null,
    Stdout,
    File(File),
    Pty(OwnedFd),
    Socket(Arc<Mutex<Option<UnixStream>>>),
}

/// Where serial output goes and input comes from; lives as long as the VM
/// (across reboots, so a pty keeps its path).
pub struct SerialBackend {
    output: Mutex<Output>,
    pub capture: Arc<SerialCapture>,
    /// The device of the current boot that takes input.
    attached: Mutex<Option<Arc<dyn InputSink>>>,
    pty_path: Option<PathBuf>,
    socket_path: Option<PathBuf>,
    stop_input: EventFd,
    input_thread: Mutex<Option<JoinHandle<()>>>,
    _raw_terminal: Option<RawTerminal>,
}

impl SerialBackend {
    /// Opens the backend `config` describes (None for mode Off); `what` names
    /// it in errors. `stdin`: whether tty mode reads the terminal (only one
    /// backend may).
    pub fn open(
        config: &ConsoleConfig,
        what: &str,
        stdin: bool,
        seccomp: SeccompMode,
        groups: &ThreadGroups,
    ) -> Result<Option<Arc<Self>>> {
        let device_error = |what: String| move |source| SerialError::Io { what, source };
        let stop_input = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(device_error(format!("{what}: eventfd")))?;
        let mut pty_path = None;
        let mut socket_path = None;
        let mut raw_terminal = None;
        let mut input_fd: Option<RawFd> = None;
        let output = match config.mode {
            ConsoleOutputMode::Off => return Ok(None),
            ConsoleOutputMode::Null => Output::Null,
            ConsoleOutputMode::Tty => {
                // SAFETY: isatty on stdin is always safe.
                if stdin && unsafe { libc::isatty(libc::STDIN_FILENO) } == 1 {
                    raw_terminal = RawTerminal::enter(libc::STDIN_FILENO);
                    input_fd = Some(libc::STDIN_FILENO);
                }
                Output::Stdout
            }
            ConsoleOutputMode::File => {
                let path = config.file.as_deref().unwrap_or_default();
                Output::File(open_output_file(path, what)?)
            }
            ConsoleOutputMode::Pty => {
                let (master, path) = open_pty().map_err(device_error(format!("{what} pty")))?;
                input_fd = Some(master.as_raw_fd());
                pty_path = Some(path);
                Output::Pty(master)
            }
            ConsoleOutputMode::Socket => {
                let path = PathBuf::from(config.socket.as_deref().unwrap_or_default());
                socket_path = Some(path);
                Output::Socket(Arc::new(Mutex::new(None)))
            }
        };
        let backend = Arc::new(SerialBackend {
            output: Mutex::new(output),
            capture: Arc::new(SerialCapture::new()),
            attached: Mutex::new(None),
            pty_path,
            socket_path: socket_path.clone(),
            stop_input,
            input_thread: Mutex::new(None),
            _raw_terminal: raw_terminal,
        });
        if let Some(path) = socket_path {
            let listener = bind_private(&path).map_err(device_error(format!(
                "Cannot listen on {what} socket {}",
                path.display()
            )))?;
            let b = backend.clone();
            let handle = seccomp::spawn_confined(
                format!("{what}-socket"),
                ThreadKind::SerialSocket,
                seccomp,
                groups,
                move || b.serve_socket(listener),
            )
            .map_err(device_error(what.to_owned()))?;
            *backend
                .input_thread
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(handle);
        } else if let Some(fd) = input_fd {
            let b = backend.clone();
            let handle = seccomp::spawn_confined(
                format!("{what}-input"),
                ThreadKind::SerialInput,
                seccomp,
                groups,
                move || b.pump_input(fd),
            )
            .map_err(device_error(what.to_owned()))?;
            *backend
                .input_thread
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(handle);
        }
        Ok(Some(backend))
    }

    /// The pty's path (pty mode).
    pub fn pty_path(&self) -> Option<&PathBuf> {
        self.pty_path.as_ref()
    }

    pub fn attach(&self, device: Option<Arc<dyn InputSink>>) {
        *self.attached.lock().unwrap_or_else(|p| p.into_inner()) = device;
    }

    /// Sends guest output to the backend (never blocks on pty or socket).
    pub fn write_out(&self, bytes: &[u8]) {
        self.capture.push(bytes);
        let mut output = self.output.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *output {
            Output::Null => {}
            Output::Stdout => {
                let mut stdout = io::stdout().lock();
                let _ = stdout.flush();
                write_when_ready(libc::STDOUT_FILENO, bytes);
            }
            Output::File(file) => write_nonblocking(file.as_raw_fd(), bytes),
            Output::Pty(master) => write_nonblocking(master.as_raw_fd(), bytes),
            Output::Socket(client) => {
                if let Some(stream) = &*client.lock().unwrap_or_else(|p| p.into_inner()) {
                    write_nonblocking(stream.as_raw_fd(), bytes);
                }
            }
        }
    }

    fn feed(&self, bytes: &[u8]) {
        let device = self
            .attached
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(device) = device {
            device.feed(bytes);
        }
    }

    /// Waits until `fd` has input (or hangs up) or the backend is closed.
    fn wait_readable(&self, fd: RawFd) -> Wait {
        let mut fds = [
            libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.stop_input.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: fds is a valid array of two pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            return match io::Error::last_os_error().kind() {
                io::ErrorKind::Interrupted => Wait::Retry,
                _ => Wait::Stop,
            };
        }
        if fds[1].revents != 0 {
            return Wait::Stop;
        }
        Wait::Ready(fds[0].revents)
    }

    /// Waits up to `timeout` for the stop event; whether it came.
    fn stop_requested(&self, timeout: Duration) -> bool {
        let mut fds = [libc::pollfd {
            fd: self.stop_input.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        let millis = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: fds is a valid array of one pollfd.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, millis) };
        n > 0 && fds[0].revents != 0
    }

    /// Polls `fd` and the stop event; forwards input to the UART.
    fn pump_input(&self, fd: RawFd) {
        let mut buf = [0u8; 256];
        loop {
            let revents = match self.wait_readable(fd) {
                Wait::Ready(revents) => revents,
                Wait::Retry => continue,
                Wait::Stop => return,
            };
            if revents & libc::POLLIN != 0 {
                // SAFETY: reading into a valid buffer from an open fd.
                let got = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
                if got > 0 {
                    self.feed(&buf[..got as usize]);
                    continue;
                }
                if got == 0 {
                    return;
                }
            } else if revents & (libc::POLLHUP | libc::POLLERR) != 0 {
                // A pty with no reader attached reports HUP; wait and retry,
                // but stop at once when the backend closes.
                if self.stop_requested(HUP_RETRY) {
                    return;
                }
            }
        }
    }

    fn serve_socket(&self, listener: UnixListener) {
        // Clone the slot out so that the output lock is not held while serving.
        let client_slot = match &*self.output.lock().unwrap_or_else(|p| p.into_inner()) {
            Output::Socket(slot) => slot.clone(),
            _ => return,
        };
        if set_nonblocking(listener.as_raw_fd()).is_err() {
            return;
        }
        loop {
            match self.wait_readable(listener.as_raw_fd()) {
                Wait::Ready(_) => {}
                Wait::Retry => continue,
                Wait::Stop => return,
            }
            let Ok((mut stream, _)) = listener.accept() else {
                continue;
            };
            let Ok(reader) = stream.try_clone() else {
                continue;
            };
            let _ = set_nonblocking(stream.as_raw_fd());
            *client_slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(reader);
            // Input from this client until it goes away or the VM stops.
            let fd = stream.as_raw_fd();
            let mut buf = [0u8; 256];
            loop {
                match self.wait_readable(fd) {
                    Wait::Ready(_) => {}
                    Wait::Retry => continue,
                    Wait::Stop => return,
                }
                match stream.read(&mut buf) {
                    Ok(0) => break,
                    Ok(got) => self.feed(&buf[..got]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => break,
                }
            }
            *client_slot.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }

    /// `open` with its threads unconfined and left in their creator's CPU
    /// group (tests and fuzzing).
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn open_unconfined(
        config: &ConsoleConfig,
        what: &str,
        stdin: bool,
    ) -> Result<Option<Arc<Self>>> {
        Self::open(
            config,
            what,
            stdin,
            SeccompMode::Off,
            &ThreadGroups::default(),
        )
    }

    /// Stops the input thread and removes the socket file.
    pub fn close(&self) {
        let _ = self.stop_input.write(1);
        let handle = self
            .input_thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
        if let Some(path) = &self.socket_path {
            let _ = std::fs::remove_file(path);
        }
        self.attach(None);
        self.capture.wake();
    }
}

/// Opens (creating with mode 0600, or truncating) a `file=` output without
/// blocking: a FIFO with a reader is accepted and written without blocking,
/// one without a reader is refused (opening it would wait for one).
fn open_output_file(path: &str, what: &str) -> Result<File> {
    let opened = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        // O_NOCTTY: a terminal named here must not become ours.
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path);
    match opened {
        Ok(file) => Ok(file),
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) && is_fifo(path) => {
            Err(SerialError::FifoWithoutReader {
                what: what.to_owned(),
                path: path.to_owned(),
            }
            .into())
        }
        Err(source) => Err(SerialError::Io {
            what: format!("Cannot create {what} output file {path}"),
            source,
        }
        .into()),
    }
}

fn is_fifo(path: &str) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo())
}

/// Binds a listening unix socket at `path` that only its owner can connect
/// to, whatever the umask: the mode is set on the socket before `bind`
/// creates the file (Linux gives the file the socket's mode less the umask),
/// so there is no moment at which another user could connect.
pub(crate) fn bind_private(path: &Path) -> io::Result<UnixListener> {
    let path_bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut address: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if path_bytes.len() >= address.sun_path.len() || path_bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "path must be shorter than SUN_LEN and contain no NUL",
        ));
    }
    address.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (slot, byte) in address.sun_path.iter_mut().zip(path_bytes) {
        *slot = *byte as libc::c_char;
    }
    let length = std::mem::size_of::<libc::sa_family_t>() + path_bytes.len() + 1;
    // SAFETY: socket(2) with checked result; the fd is owned at once.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: fchmod, bind and listen on the socket just made, with a valid
    // address of `length` bytes; results are checked.
    unsafe {
        if libc::fchmod(socket.as_raw_fd(), 0o600) != 0
            || libc::bind(
                socket.as_raw_fd(),
                (&address as *const libc::sockaddr_un).cast(),
                length as libc::socklen_t,
            ) != 0
            || libc::listen(socket.as_raw_fd(), 128) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(UnixListener::from(socket))
}

fn open_pty() -> io::Result<(OwnedFd, PathBuf)> {
    // SAFETY: standard pty allocation with checked results; ptsname_r
    // writes at most buf.len() bytes.
    unsafe {
        let fd = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let master = OwnedFd::from_raw_fd(fd);
        if libc::grantpt(fd) != 0 || libc::unlockpt(fd) != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = [0 as libc::c_char; 128];
        if libc::ptsname_r(fd, buf.as_mut_ptr(), buf.len()) != 0 {
            return Err(io::Error::last_os_error());
        }
        let path = std::ffi::CStr::from_ptr(buf.as_ptr())
            .to_string_lossy()
            .into_owned();
        let mut termios: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(fd, &mut termios) == 0 {
            libc::cfmakeraw(&mut termios);
            libc::tcsetattr(fd, libc::TCSANOW, &termios);
        }
        set_nonblocking(fd)?;
        Ok((master, PathBuf::from(path)))
    }
}

/// Raises the UART's interrupt line through an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// The UART's transmit side, into the backend.
pub struct SerialSink(pub Arc<SerialBackend>);

impl Write for SerialSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_out(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The 16550 on the port bus.
/// A device that takes console input. Never blocks: input it has no room
/// for is dropped.
pub trait InputSink: Send + Sync {
    fn feed(&self, bytes: &[u8]);
}

impl InputSink for Mutex<SerialDevice> {
    fn feed(&self, bytes: &[u8]) {
        let mut device = self.lock().unwrap_or_else(|p| p.into_inner());
        // A full FIFO drops input, as a real UART would.
        let _ = device.uart.enqueue_raw_bytes(bytes);
    }
}

pub struct SerialDevice {
    pub uart: Serial<IrqTrigger, NoEvents, SerialSink>,
}

impl SerialDevice {
    /// The UART's registers and unread input, for a snapshot.
    pub fn save_state(&self) -> Vec<u8> {
        let state = self.uart.state();
        let mut w = crate::snapshot::codec::Writer::default();
        w.blob(&[
            state.baud_divisor_low,
            state.baud_divisor_high,
            state.interrupt_enable,
            state.interrupt_identification,
            state.line_control,
            state.line_status,
            state.modem_control,
            state.modem_status,
            state.scratch,
        ]);
        w.blob(&state.in_buffer);
        w.bytes
    }

    /// Loads what `save_state` wrote, keeping this device's interrupt line
    /// and output.
    pub fn restore_state(
        &mut self,
        bytes: &[u8],
    ) -> std::result::Result<(), crate::snapshot::SnapshotError> {
        let mut r = crate::snapshot::codec::Reader::new("the serial port state", bytes);
        let registers = r.blob(9)?;
        let [baud_divisor_low, baud_divisor_high, interrupt_enable, interrupt_identification, line_control, line_status, modem_control, modem_status, scratch] =
            <[u8; 9]>::try_from(registers)
                .map_err(|_| r.corrupt(format!("{} register bytes, not 9", registers.len())))?;
        // At most the 16550's FIFO (from_state checks it again).
        let in_buffer = r.blob(64)?;
        r.finish()?;
        let state = vm_superio::serial::SerialState {
            baud_divisor_low,
            baud_divisor_high,
            interrupt_enable,
            interrupt_identification,
            line_control,
            line_status,
            modem_control,
            modem_status,
            scratch,
            in_buffer: in_buffer.to_vec(),
        };
        let trigger = IrqTrigger(self.uart.interrupt_evt().0.try_clone().map_err(|source| {
            crate::snapshot::SnapshotError::Io {
                what: "sharing the interrupt line of",
                path: "the serial port".to_owned(),
                source,
            }
        })?);
        let out = SerialSink(self.uart.writer().0.clone());
        self.uart = Serial::from_state(&state, trigger, NoEvents, out)
            .map_err(|e| r.corrupt(format!("{e:?}")))?;
        Ok(())
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(offset), [byte]) => *byte = self.uart.read(offset),
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [value]) = (u8::try_from(offset), data) {
            // An interrupt that cannot be raised is the guest's loss, not ours.
            let _ = self.uart.write(offset, *value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn opened(config: &ConsoleConfig) -> Arc<SerialBackend> {
        SerialBackend::open_unconfined(config, "serial", true)
            .unwrap()
            .unwrap()
    }

    #[test]
    fn a_restored_uart_has_the_saved_registers_and_input() {
        let config = ConsoleConfig::with_mode(ConsoleOutputMode::Null);
        let backend = opened(&config);
        let device = |backend: &Arc<SerialBackend>| SerialDevice {
            uart: Serial::new(
                IrqTrigger(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
                SerialSink(backend.clone()),
            ),
        };
        let mut uart = device(&backend);
        uart.write(3, &[0x80]); // DLAB on
        uart.write(0, &[0x0c]); // divisor 12: 9600 baud
        uart.write(3, &[0x03]); // DLAB off, 8N1
        uart.write(7, &[0x5a]); // scratch
        uart.uart.enqueue_raw_bytes(b"hi").unwrap();
        let saved = uart.save_state();

        let mut back = device(&backend);
        back.restore_state(&saved).unwrap();
        let read = |d: &mut SerialDevice, offset: u64| {
            let mut byte = [0u8];
            d.read(offset, &mut byte);
            byte[0]
        };
        assert_eq!(read(&mut back, 3), 0x03);
        assert_eq!(read(&mut back, 7), 0x5a);
        assert_eq!((read(&mut back, 0), read(&mut back, 0)), (b'h', b'i'));
        back.write(3, &[0x80]);
        assert_eq!(read(&mut back, 0), 0x0c, "the divisor");
        // Truncated, or more input than a FIFO holds: refused, nothing changed.
        let mut other = device(&backend);
        assert!(other.restore_state(&saved[..saved.len() - 1]).is_err());
        let mut w = crate::snapshot::codec::Writer::default();
        w.blob(&[0; 9]);
        w.blob(&[b'x'; 65]);
        assert!(other.restore_state(&w.bytes).is_err());
        assert_eq!(read(&mut other, 7), 0);
    }

    #[test]
    fn capture_keeps_absolute_offsets() {
        let capture = SerialCapture::new();
        capture.push(b"hello ");
        capture.push(b"world");
        assert_eq!(capture.end(), 11);
        assert_eq!(capture.read_from(6), (6, b"world".to_vec()));
        assert!(capture.wait_past(10, Duration::from_millis(1)));
        assert!(!capture.wait_past(11, Duration::from_millis(10)));
    }

    #[test]
    fn uart_output_reaches_the_capture() {
        let config = ConsoleConfig::with_mode(ConsoleOutputMode::Null);
        let backend = opened(&config);
        let trigger = IrqTrigger(EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).unwrap());
        let mut device = SerialDevice {
            uart: Serial::new(trigger, SerialSink(backend.clone())),
        };
        for b in b"ok\n" {
            device.write(0, &[*b]);
        }
        assert_eq!(backend.capture.read_from(0).1, b"ok\n");
        // Odd sizes and offsets are ignored, not trusted.
        device.write(0x1_0000, b"x");
        device.write(0, b"xy");
        let mut wide = [0u8; 2];
        device.read(5, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
        backend.close();
    }

    #[test]
    fn pty_mode_has_a_path_and_does_not_block_without_a_reader() {
        let config = ConsoleConfig::with_mode(ConsoleOutputMode::Pty);
        let backend = opened(&config);
        let path = backend.pty_path().unwrap().clone();
        assert!(path.starts_with("/dev/pts"));
        // Far more than a pty buffer holds: must return, not block.
        let chunk = vec![b'x'; 64 << 10];
        for _ in 0..16 {
            backend.write_out(&chunk);
        }
        backend.close();
    }
}

#[cfg(test)]
mod file_tests {
    use super::*;

    fn fifo(name: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("vmkit-{name}-{}.fifo", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        path
    }

    fn file_config(path: &Path) -> ConsoleConfig {
        let mut config = ConsoleConfig::with_mode(ConsoleOutputMode::File);
        config.file = Some(path.to_string_lossy().into_owned());
        config
    }

    #[test]
    fn a_fifo_without_a_reader_is_refused_at_once() {
        let path = fifo("noreader");
        let Err(e) = SerialBackend::open_unconfined(&file_config(&path), "serial", false) else {
            panic!("a FIFO without a reader was accepted");
        };
        assert_eq!(
            e.to_string(),
            format!(
                "Cannot create serial output file {} (--serial file): \
                 it is a FIFO that no process has open for reading",
                path.display()
            )
        );
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_fifo_whose_reader_is_stuck_never_blocks_output() {
        let path = fifo("stuck");
        // A reader that never reads.
        let reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .unwrap();
        let backend = SerialBackend::open_unconfined(&file_config(&path), "console", false)
            .unwrap()
            .unwrap();
        // Far more than a pipe holds: must return, not block.
        let chunk = vec![b'x'; 64 << 10];
        for _ in 0..16 {
            backend.write_out(&chunk);
        }
        assert_eq!(backend.capture.end(), 16 * (64 << 10));
        // What fitted reached the reader.
        let mut got = vec![0u8; 4096];
        assert_eq!((&reader).read(&mut got).unwrap(), 4096);
        backend.close();
        std::fs::remove_file(&path).unwrap();
    }
}

#[cfg(test)]
mod socket_tests {
    use super::*;

    #[test]
    fn socket_mode_serves_a_client_without_blocking_output() {
        let path = std::env::temp_dir().join(format!("vmkit-serial-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let mut config = ConsoleConfig::with_mode(ConsoleOutputMode::Socket);
        config.socket = Some(path.to_string_lossy().into_owned());
        let backend = super::tests::opened(&config);
        let mut client = UnixStream::connect(&path).unwrap();
        client
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        // Give the accept loop a moment to take the client.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut got = Vec::new();
        while !got.ends_with(b"line 9\n") && Instant::now() < deadline {
            for i in 0..10 {
                backend.write_out(format!("line {i}\n").as_bytes());
            }
            let mut buf = [0u8; 4096];
            if let Ok(n) = client.read(&mut buf) {
                got.extend_from_slice(&buf[..n]);
            }
        }
        assert!(
            got.ends_with(b"line 9\n"),
            "{}",
            String::from_utf8_lossy(&got)
        );
        backend.close();
        assert!(!path.exists());
    }
}
