//! swtpm as the TPM's backend, as Cloud Hypervisor v37 drives it: the user
//! starts `swtpm socket --tpm2 --ctrl type=unixio,path=<socket> ...`; the
//! VMM connects to that control socket, hands swtpm one end of a socketpair
//! for the TPM commands (`CMD_SET_DATAFD`, the fd by SCM_RIGHTS), checks its
//! capabilities and the tpmEstablished flag, sets the buffer size (the TPM
//! stopped first) and initialises the TPM (`CMD_INIT`). The control
//! protocol is swtpm's (swtpm_ioctls(3)): a big-endian command code and
//! payload, a big-endian result code first in every answer but
//! `CMD_GET_CAPABILITY`'s.
//!
//! Commands then run on a worker thread ([`SwtpmBackend`]): it sends each
//! command on the data socket and collects the response without blocking,
//! bounded by [`COMMAND_TIMEOUT`], while the guest polls `CRB_CTRL_START`.
//! The VMM never sends `CMD_SHUTDOWN` (it would end swtpm, which the user
//! owns and which serves the next boot); closing the sockets is all, as in
//! Cloud Hypervisor.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;
use vmm_sys_util::timerfd::TimerFd;

use super::crb::{header_size, BackendError, TpmBackend, BUFFER_SIZE, HEADER_SIZE};
use crate::error::{ErrorKind, ModuleError};
use crate::seccomp::{Spawner, ThreadKind};
use crate::virtio::worker::{self, Worker, WorkerHandler};

/// How long swtpm may take over a control command. It answers them at once;
/// silence means another client holds its control channel (it serves one at
/// a time), and a boot should fail saying so rather than wait forever.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a TPM command may run: what Linux allows the slowest TPM 2.0
/// commands (TPM2_DURATION_LONG_LONG, key generation), so that no command a
/// guest still waits for fails early. A dead swtpm is noticed at once.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);

/// swtpm's control commands used here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Command {
    GetCapability = 1,
    Init = 2,
    GetTpmEstablished = 4,
    CancelTpmCmd = 9,
    Stop = 14,
    SetDatafd = 16,
    SetBufferSize = 17,
}

impl Command {
    fn name(self) -> &'static str {
        match self {
            Command::GetCapability => "CMD_GET_CAPABILITY",
            Command::Init => "CMD_INIT",
            Command::GetTpmEstablished => "CMD_GET_TPMESTABLISHED",
            Command::CancelTpmCmd => "CMD_CANCEL_TPM_CMD",
            Command::Stop => "CMD_STOP",
            Command::SetDatafd => "CMD_SET_DATAFD",
            Command::SetBufferSize => "CMD_SET_BUFFERSIZE",
        }
    }

    fn request(self, payload: &[u8]) -> Vec<u8> {
        let mut request = (self as u32).to_be_bytes().to_vec();
        request.extend_from_slice(payload);
        request
    }
}

/// The capabilities (PTM_CAP_*) Cloud Hypervisor requires of a TPM 2.0 backend.
const REQUIRED_CAPABILITIES: [(u64, &str); 8] = [
    (1 << 0, "INIT"),
    (1 << 1, "SHUTDOWN"),
    (1 << 2, "GET_TPMESTABLISHED"),
    (1 << 3, "SET_LOCALITY"),
    (1 << 7, "RESET_TPMESTABLISHED"),
    (1 << 10, "STOP"),
    (1 << 12, "SET_DATAFD"),
    (1 << 13, "SET_BUFFERSIZE"),
];
const CAP_CANCEL_TPM_CMD: u64 = 1 << 5;

/// Why a control command failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot send it")]
    Send(#[source] io::Error),
    #[error("cannot read the answer")]
    Receive(#[source] io::Error),
    #[error("no answer within {0:?} (does another VMM hold swtpm's control channel?)")]
    Timeout(Duration),
    #[error("swtpm closed the connection after {got} of {expected} bytes")]
    Closed { got: usize, expected: usize },
    #[error("swtpm answered result {0:#x}")]
    Result(u32),
}

/// Why the TPM could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TpmError {
    #[error(
        "Error creating TPM device: --tpm socket={path}: cannot connect to swtpm's control socket"
    )]
    Connect {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "Error creating TPM device: --tpm socket={path}: cannot set up the socket for TPM commands"
    )]
    DataSocket {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("Error creating TPM device: --tpm socket={path}: {command}")]
    Control {
        path: String,
        command: &'static str,
        #[source]
        source: ControlError,
    },
    #[error(
        "Error creating TPM device: --tpm socket={path}: swtpm lacks capabilities a TPM 2.0 \
         needs: {missing}"
    )]
    Capabilities { path: String, missing: String },
    #[error(
        "Error creating TPM device: --tpm socket={path}: CMD_GET_TPMESTABLISHED failed (start \
         swtpm with --flags not-need-init or startup-clear, as Cloud Hypervisor needs)"
    )]
    NotInitialized {
        path: String,
        #[source]
        source: ControlError,
    },
    #[error(
        "Error creating TPM device: --tpm socket={path}: the TPM is not in established state \
         (CMD_GET_TPMESTABLISHED says {flag}), which Cloud Hypervisor refuses too"
    )]
    Established { path: String, flag: u8 },
    #[error("Error creating TPM device: --tpm socket={path}: cannot start its worker thread")]
    Worker {
        path: String,
        #[source]
        source: io::Error,
    },
}

impl ModuleError for TpmError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Device
    }
}

/// swtpm's control channel while the TPM is set up (blocking, bounded).
struct ControlChannel {
    stream: UnixStream,
    timeout: Duration,
}

impl ControlChannel {
    /// Sends `command` (with `fd` attached) and reads its `expected`-byte
    /// answer. Answers with a result code (`has_result`) end early when it is
    /// not 0: swtpm then sends the code alone.
    fn run(
        &mut self,
        command: Command,
        payload: &[u8],
        fd: Option<RawFd>,
        expected: usize,
        has_result: bool,
    ) -> Result<Vec<u8>, ControlError> {
        let request = command.request(payload);
        let fds: Vec<RawFd> = fd.into_iter().collect();
        let sent = self
            .stream
            .send_with_fds(&[&request[..]], &fds)
            .map_err(|e| ControlError::Send(io::Error::from_raw_os_error(e.errno())))?;
        if sent != request.len() {
            return Err(ControlError::Send(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("{sent} of {} bytes sent", request.len()),
            )));
        }
        let mut answer = vec![0u8; expected];
        let mut got = 0;
        while got < expected {
            match self.stream.read(&mut answer[got..]) {
                Ok(0) => return Err(ControlError::Closed { got, expected }),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(ControlError::Timeout(self.timeout))
                }
                Err(e) => return Err(ControlError::Receive(e)),
            }
            if has_result && got >= 4 {
                let result = u32::from_be_bytes([answer[0], answer[1], answer[2], answer[3]]);
                if result != 0 {
                    return Err(ControlError::Result(result));
                }
            }
        }
        Ok(answer)
    }
}

fn be32(bytes: &[u8], at: usize) -> u32 {
    bytes
        .get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_be_bytes)
}

/// What the worker and the vCPUs share: the command handed over, the
/// outcome handed back.
#[derive(Default)]
struct Exchange {
    command: Option<Vec<u8>>,
    cancel: bool,
    done: Option<Result<Vec<u8>, BackendError>>,
    /// The worker stopped (its wait failed): later commands fail at once.
    stopped: Option<String>,
}

fn lock(exchange: &Mutex<Exchange>) -> MutexGuard<'_, Exchange> {
    exchange.lock().unwrap_or_else(|p| p.into_inner())
}

/// swtpm's sockets, set up and initialised, ready for TPM commands.
pub struct Swtpm {
    control: UnixStream,
    data: UnixStream,
    /// The buffer size swtpm agreed to: the largest command it takes.
    pub buffer_size: usize,
    can_cancel: bool,
}

/// Connects to the swtpm control socket at `path` and initialises the TPM,
/// as Cloud Hypervisor v37 does.
pub fn connect(path: &str) -> Result<Swtpm, TpmError> {
    connect_with(path, CONTROL_TIMEOUT)
}

/// [`connect`], giving swtpm `timeout` for each control command.
fn connect_with(path: &str, timeout: Duration) -> Result<Swtpm, TpmError> {
    let control_error = |command: Command| {
        move |source| TpmError::Control {
            path: path.to_owned(),
            command: command.name(),
            source,
        }
    };
    let stream = UnixStream::connect(path).map_err(|source| TpmError::Connect {
        path: path.to_owned(),
        source,
    })?;
    let data_error = |source| TpmError::DataSocket {
        path: path.to_owned(),
        source,
    };
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(data_error)?;
    let mut control = ControlChannel { stream, timeout };

    let (data, theirs) = UnixStream::pair().map_err(data_error)?;
    control
        .run(Command::SetDatafd, &[], Some(theirs.as_raw_fd()), 4, true)
        .map_err(control_error(Command::SetDatafd))?;
    // swtpm has its own copy now.
    drop(theirs);

    let capabilities = control
        .run(Command::GetCapability, &[], None, 8, false)
        .map_err(control_error(Command::GetCapability))?;
    let capabilities = u64::from_be_bytes(capabilities.try_into().unwrap_or([0; 8]));
    let missing: Vec<&str> = REQUIRED_CAPABILITIES
        .iter()
        .filter(|(bit, _)| capabilities & bit == 0)
        .map(|(_, name)| *name)
        .collect();
    if !missing.is_empty() {
        return Err(TpmError::Capabilities {
            path: path.to_owned(),
            missing: missing.join(", "),
        });
    }

    // A TPM that has not been initialised answers with an error; Cloud
    // Hypervisor refuses it, and one whose flag is set.
    let established = control
        .run(Command::GetTpmEstablished, &[], None, 8, true)
        .map_err(|source| TpmError::NotInitialized {
            path: path.to_owned(),
            source,
        })?;
    let flag = established.get(4).copied().unwrap_or(0);
    if flag != 0 {
        return Err(TpmError::Established {
            path: path.to_owned(),
            flag,
        });
    }

    // swtpm changes its buffer size only with the TPM stopped. First the
    // size it has (0 asks), then the one the CRB holds, at most.
    let current = control
        .run(Command::Stop, &[], None, 4, true)
        .and_then(|_| control.run(Command::SetBufferSize, &0u32.to_be_bytes(), None, 16, true))
        .map_or(BUFFER_SIZE, |answer| be32(&answer, 4) as usize);
    let wanted = current.min(BUFFER_SIZE) as u32;
    control
        .run(Command::Stop, &[], None, 4, true)
        .map_err(control_error(Command::Stop))?;
    let answer = control
        .run(
            Command::SetBufferSize,
            &wanted.to_be_bytes(),
            None,
            16,
            true,
        )
        .map_err(control_error(Command::SetBufferSize))?;
    let buffer_size = (be32(&answer, 4) as usize).clamp(HEADER_SIZE, BUFFER_SIZE);
    log::debug!("TPM: swtpm's buffer is {buffer_size} bytes (asked {wanted})");
    control
        .run(Command::Init, &0u32.to_be_bytes(), None, 4, true)
        .map_err(control_error(Command::Init))?;

    for socket in [&control.stream, &data] {
        socket.set_nonblocking(true).map_err(data_error)?;
    }
    Ok(Swtpm {
        control: control.stream,
        data,
        buffer_size,
        can_cancel: capabilities & CAP_CANCEL_TPM_CMD != 0,
    })
}

/// The guest's TPM commands, run by swtpm through a worker thread.
pub struct SwtpmBackend {
    exchange: Arc<Mutex<Exchange>>,
    wake: EventFd,
    /// Dropped last: stops and joins the thread.
    _worker: Worker,
}

impl SwtpmBackend {
    /// Starts the worker thread (confined to the TPM's seccomp filter) over
    /// `swtpm`'s sockets; `path` names it in messages.
    pub fn start(
        swtpm: Swtpm,
        path: &str,
        spawner: &Spawner,
        timeout: Duration,
    ) -> Result<SwtpmBackend, TpmError> {
        let worker_error = |source| TpmError::Worker {
            path: path.to_owned(),
            source,
        };
        let exchange = Arc::new(Mutex::new(Exchange::default()));
        let wake = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(worker_error)?;
        let channel = Channel {
            exchange: exchange.clone(),
            data: Some(swtpm.data),
            control: Some(swtpm.control),
            timer: worker::nonblocking_timer().map_err(worker_error)?,
            timeout,
            can_cancel: swtpm.can_cancel,
            response: None,
            broken: None,
        };
        let kick = wake.try_clone().map_err(worker_error)?;
        let worker = worker::spawn(spawner, "tpm".into(), ThreadKind::Tpm, vec![kick], channel)
            .map_err(worker_error)?;
        Ok(SwtpmBackend {
            exchange,
            wake,
            _worker: worker,
        })
    }

    fn wake_worker(&self) {
        if let Err(e) = self.wake.write(1) {
            let mut exchange = lock(&self.exchange);
            exchange.command = None;
            exchange.done = Some(Err(BackendError::Io(format!(
                "cannot wake the TPM worker: {e}"
            ))));
        }
    }
}

impl TpmBackend for SwtpmBackend {
    fn start(&mut self, command: &[u8]) {
        {
            let mut exchange = lock(&self.exchange);
            if let Some(why) = &exchange.stopped {
                exchange.done = Some(Err(BackendError::WorkerStopped(why.clone())));
                return;
            }
            exchange.command = Some(command.to_vec());
            exchange.done = None;
        }
        self.wake_worker();
    }

    fn completed(&mut self) -> Option<Result<Vec<u8>, BackendError>> {
        lock(&self.exchange).done.take()
    }

    fn cancel(&mut self) {
        lock(&self.exchange).cancel = true;
        self.wake_worker();
    }
}

/// The worker's fds beyond its wake-up eventfd.
const DATA: usize = 0;
const CONTROL: usize = 1;
const TIMER: usize = 2;

/// The worker's side: one command at a time on the data socket.
struct Channel {
    exchange: Arc<Mutex<Exchange>>,
    /// Dropped (so closed, and out of the worker's epoll) once swtpm hangs up.
    data: Option<UnixStream>,
    control: Option<UnixStream>,
    /// Armed while a command runs.
    timer: TimerFd,
    timeout: Duration,
    can_cancel: bool,
    /// The response so far, while a command runs.
    response: Option<Vec<u8>>,
    /// Why the sockets can no longer be trusted: later commands fail at once.
    broken: Option<BackendError>,
}

impl Channel {
    fn finish(&mut self, outcome: Result<Vec<u8>, BackendError>) {
        let _ = self.timer.clear();
        lock(&self.exchange).done = Some(outcome);
    }

    /// The sockets are done with: a command in flight fails with `error`,
    /// and so does every later one.
    fn fail(&mut self, error: BackendError) {
        if self.response.take().is_some() {
            // The CRB logs it when it hands the failure to the guest.
            self.finish(Err(error.clone()));
        } else {
            log::error!("TPM: {error}: the guest's TPM commands fail from now on");
        }
        self.data = None;
        self.control = None;
        self.broken = Some(error);
    }

    fn send(&mut self, command: Vec<u8>) {
        if let Some(error) = &self.broken {
            let error = BackendError::Unusable(error.to_string());
            return self.finish(Err(error));
        }
        let Some(data) = &self.data else {
            return self.finish(Err(BackendError::Disconnected));
        };
        self.response = Some(Vec::with_capacity(BUFFER_SIZE));
        // Non-blocking: a command fits the socket's buffer, which holds
        // nothing else (one command at a time).
        match data.send_with_fds(&[&command[..]], &[]) {
            Ok(n) if n == command.len() => {
                if let Err(e) = self.timer.reset(self.timeout, None) {
                    self.fail(BackendError::Io(format!("cannot arm the timeout: {e}")));
                }
            }
            Ok(n) => self.fail(BackendError::Io(format!(
                "{n} of {} command bytes sent",
                command.len()
            ))),
            Err(e) if e.errno() == libc::EPIPE || e.errno() == libc::ECONNRESET => {
                self.fail(BackendError::Disconnected)
            }
            Err(e) => self.fail(BackendError::Io(
                io::Error::from_raw_os_error(e.errno()).to_string(),
            )),
        }
    }

    fn send_cancel(&mut self) {
        if !self.can_cancel || self.response.is_none() {
            return;
        }
        let Some(control) = &self.control else {
            return;
        };
        let request = Command::CancelTpmCmd.request(&[]);
        match control.send_with_fds(&[&request[..]], &[]) {
            Ok(n) if n == request.len() => {}
            Ok(_) | Err(_) => log::debug!("TPM: CMD_CANCEL_TPM_CMD could not be sent"),
        }
    }

    fn read_data(&mut self) {
        let mut chunk = [0u8; 4096];
        loop {
            let Some(data) = self.data.as_mut() else {
                return;
            };
            let n = match data.read(&mut chunk) {
                Ok(0) => return self.fail(BackendError::Disconnected),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    return self.fail(BackendError::Disconnected)
                }
                Err(e) => return self.fail(BackendError::Io(e.to_string())),
            };
            let Some(response) = self.response.as_mut() else {
                return self.fail(BackendError::Protocol(format!(
                    "{n} bytes with no command in flight"
                )));
            };
            response.extend_from_slice(&chunk[..n]);
            let got = response.len();
            let Some(size) = header_size(response) else {
                continue;
            };
            if !(HEADER_SIZE..=BUFFER_SIZE).contains(&size) {
                return self.fail(BackendError::Protocol(format!(
                    "a response of {size} bytes (the buffer holds {BUFFER_SIZE})"
                )));
            }
            if got > size {
                return self.fail(BackendError::Protocol(format!(
                    "{got} bytes for a response of {size}"
                )));
            }
            if got == size {
                if let Some(response) = self.response.take() {
                    self.finish(Ok(response));
                }
            }
        }
    }

    /// Answers on the control channel: those of CMD_CANCEL_TPM_CMD, each a
    /// result code (what swtpm did with the cancel changes nothing here).
    fn read_control(&mut self) {
        let mut answers = [0u8; 64];
        loop {
            let Some(control) = self.control.as_mut() else {
                return;
            };
            match control.read(&mut answers) {
                // swtpm hung up its control channel; its data socket tells
                // whether the TPM is gone.
                Ok(0) => {
                    self.control = None;
                    return;
                }
                Ok(n) => {
                    for answer in answers[..n].chunks(4) {
                        log::debug!("TPM: CMD_CANCEL_TPM_CMD answered {:#x}", be32(answer, 0));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.control = None;
                    return;
                }
            }
        }
    }
}

impl WorkerHandler for Channel {
    fn queue_notified(&mut self, _index: usize) {
        let (command, cancel) = {
            let mut exchange = lock(&self.exchange);
            (
                exchange.command.take(),
                std::mem::take(&mut exchange.cancel),
            )
        };
        if cancel {
            self.send_cancel();
        }
        if let Some(command) = command {
            if self.response.is_some() {
                // The CRB starts one command at a time; never reached.
                return self.finish(Err(BackendError::Protocol(
                    "a command while another runs".into(),
                )));
            }
            self.send(command);
        }
    }

    fn failed(&mut self, cause: &io::Error) {
        log::error!("TPM: the worker thread stops: {cause}");
        let mut exchange = lock(&self.exchange);
        exchange.stopped = Some(cause.to_string());
        if self.response.take().is_some() {
            exchange.done = Some(Err(BackendError::WorkerStopped(cause.to_string())));
        }
    }

    fn extra_fds(&self) -> Vec<RawFd> {
        // In DATA, CONTROL, TIMER order; both sockets are there at the start.
        self.data
            .iter()
            .map(AsRawFd::as_raw_fd)
            .chain(self.control.iter().map(AsRawFd::as_raw_fd))
            .chain([self.timer.as_raw_fd()])
            .collect()
    }

    fn extra_ready(&mut self, index: usize) {
        match index {
            DATA => self.read_data(),
            CONTROL => self.read_control(),
            // Disarmed meanwhile (the response came): nothing to read.
            TIMER if self.timer.wait().is_ok() && self.response.is_some() => {
                self.fail(BackendError::Timeout(self.timeout));
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests;
