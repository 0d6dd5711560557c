use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Instant;

use super::*;
use crate::virtio::testing::wait_until;

/// A directory of its own for each test's socket.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vmkit-swtpm-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn socket(&self) -> String {
        self.0.join("ctrl.sock").to_string_lossy().into_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How the fake swtpm behaves.
#[derive(Clone, Copy)]
struct Script {
    capabilities: u64,
    /// CMD_GET_TPMESTABLISHED's answer: Err(result code) or the flag.
    established: Result<u8, u32>,
    /// Answer each control command, or go silent after CMD_SET_DATAFD.
    answer_control: bool,
}

const ALL_CAPABILITIES: u64 = 0xffff;

impl Default for Script {
    fn default() -> Script {
        Script {
            capabilities: ALL_CAPABILITIES,
            established: Ok(0),
            answer_control: true,
        }
    }
}

/// What the fake swtpm got: the control commands (code, payload) and the
/// data socket passed with CMD_SET_DATAFD; it then holds the control
/// channel until the test is done with it.
struct Served {
    commands: Vec<(u32, Vec<u8>)>,
    data: Option<UnixStream>,
    control: UnixStream,
}

/// A fake swtpm on a control socket in `dir`: serves one client by `script`.
fn fake_swtpm(dir: &TempDir, script: Script) -> JoinHandle<Served> {
    let listener = UnixListener::bind(dir.socket()).unwrap();
    std::thread::spawn(move || {
        let (mut control, _) = listener.accept().unwrap();
        let mut commands = Vec::new();
        let mut data = None;
        loop {
            let mut buf = [0u8; 64];
            let mut fds = [-1; 1];
            let mut iov = [libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            }];
            // SAFETY: the iovec points at `buf`, which outlives the call.
            let (n, nfds) = match unsafe { control.recv_with_fds(&mut iov, &mut fds) } {
                Ok((0, _)) | Err(_) => break,
                Ok(got) => got,
            };
            if nfds == 1 {
                // SAFETY: the descriptor just arrived by SCM_RIGHTS and is ours.
                data = Some(unsafe { <UnixStream as std::os::fd::FromRawFd>::from_raw_fd(fds[0]) });
            }
            let code = u32::from_be_bytes(buf[..4].try_into().unwrap());
            commands.push((code, buf[4..n].to_vec()));
            if !script.answer_control && code != Command::SetDatafd as u32 {
                break;
            }
            let answer: Vec<u8> = match code {
                1 => script.capabilities.to_be_bytes().to_vec(),
                4 => match script.established {
                    Ok(flag) => vec![0, 0, 0, 0, flag, 0, 0, 0],
                    Err(code) => code.to_be_bytes().to_vec(),
                },
                17 => {
                    let asked = u32::from_be_bytes(buf[4..8].try_into().unwrap());
                    let size: u32 = if asked == 0 { 4096 } else { asked };
                    [0, size, 0xaf8, 4096]
                        .iter()
                        .flat_map(|v: &u32| v.to_be_bytes())
                        .collect()
                }
                _ => vec![0; 4],
            };
            control.write_all(&answer).unwrap();
            if code == Command::Init as u32 {
                break;
            }
        }
        Served {
            commands,
            data,
            control,
        }
    })
}

const GET_RANDOM: [u8; 12] = [0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7b, 0, 16];

fn response_of(len: usize) -> Vec<u8> {
    let mut response = vec![0u8; len];
    response[..2].copy_from_slice(&[0x80, 0x01]);
    response[2..6].copy_from_slice(&(len as u32).to_be_bytes());
    response
}

/// swtpm set up by the fake, and a backend over it with `timeout`.
fn backend(dir: &TempDir, timeout: Duration) -> (SwtpmBackend, UnixStream, UnixStream) {
    let served = fake_swtpm(dir, Script::default());
    let swtpm = connect(&dir.socket()).unwrap();
    let served = served.join().unwrap();
    let backend =
        SwtpmBackend::start(swtpm, &dir.socket(), &Spawner::unconfined(), timeout).unwrap();
    (backend, served.data.unwrap(), served.control)
}

fn outcome(backend: &mut SwtpmBackend) -> Result<Vec<u8>, BackendError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(outcome) = backend.completed() {
            return outcome;
        }
        assert!(Instant::now() < deadline, "no outcome");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn set_up_follows_cloud_hypervisors_sequence() {
    let dir = TempDir::new();
    let served = fake_swtpm(&dir, Script::default());
    let swtpm = connect(&dir.socket()).unwrap();
    let served = served.join().unwrap();
    let be = |v: u32| v.to_be_bytes().to_vec();
    // What Cloud Hypervisor v37 sent the real swtpm (its control log).
    assert_eq!(
        served.commands,
        vec![
            (16, vec![]),
            (1, vec![]),
            (4, vec![]),
            (14, vec![]),
            (17, be(0)),
            (14, vec![]),
            (17, be(0xf80)),
            (2, be(0)),
        ]
    );
    assert!(
        served.data.is_some(),
        "the data socket came with CMD_SET_DATAFD"
    );
    assert_eq!(swtpm.buffer_size, 0xf80);
    assert!(swtpm.can_cancel);
}

#[test]
fn commands_go_to_swtpm_and_responses_come_back() {
    let dir = TempDir::new();
    let (mut backend, mut data, _control) = backend(&dir, COMMAND_TIMEOUT);
    backend.start(&GET_RANDOM);
    let mut command = [0u8; 12];
    data.read_exact(&mut command).unwrap();
    assert_eq!(command, GET_RANDOM);
    assert!(backend.completed().is_none());
    // In two pieces: the worker waits for the whole response.
    let response = response_of(28);
    data.write_all(&response[..7]).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert!(backend.completed().is_none());
    data.write_all(&response[7..]).unwrap();
    assert_eq!(outcome(&mut backend), Ok(response));
    // And again.
    backend.start(&GET_RANDOM);
    data.read_exact(&mut command).unwrap();
    data.write_all(&response_of(10)).unwrap();
    assert_eq!(outcome(&mut backend), Ok(response_of(10)));
}

#[test]
fn swtpm_going_away_fails_the_command_and_every_later_one() {
    let dir = TempDir::new();
    let (mut backend, mut data, control) = backend(&dir, COMMAND_TIMEOUT);
    backend.start(&GET_RANDOM);
    let mut command = [0u8; 12];
    data.read_exact(&mut command).unwrap();
    drop((data, control));
    assert_eq!(outcome(&mut backend), Err(BackendError::Disconnected));
    backend.start(&GET_RANDOM);
    assert!(matches!(
        outcome(&mut backend),
        Err(BackendError::Unusable(_))
    ));
}

#[test]
fn swtpm_gone_between_commands_fails_the_next_one() {
    crate::virtio::testing::capture_logs();
    let dir = TempDir::new();
    let (mut backend, data, control) = backend(&dir, COMMAND_TIMEOUT);
    drop((data, control));
    wait_until("the hang-up logged", || {
        !crate::virtio::testing::logged("the guest's TPM commands fail from now on").is_empty()
    });
    backend.start(&GET_RANDOM);
    assert!(matches!(
        outcome(&mut backend),
        Err(BackendError::Unusable(_))
    ));
}

#[test]
fn a_silent_swtpm_times_out_without_blocking_anyone() {
    let dir = TempDir::new();
    let (mut backend, mut data, _control) = backend(&dir, Duration::from_millis(50));
    let started = Instant::now();
    backend.start(&GET_RANDOM);
    assert!(
        started.elapsed() < Duration::from_millis(50),
        "start returns at once"
    );
    let mut command = [0u8; 12];
    data.read_exact(&mut command).unwrap();
    assert_eq!(
        outcome(&mut backend),
        Err(BackendError::Timeout(Duration::from_millis(50)))
    );
    // The socket is closed: a late response cannot be taken for the next
    // command's.
    assert!(data.write_all(&response_of(10)).is_err());
    backend.start(&GET_RANDOM);
    assert!(matches!(
        outcome(&mut backend),
        Err(BackendError::Unusable(_))
    ));
}

#[test]
fn responses_that_break_the_protocol_fail_the_command() {
    let mut oversized = response_of(10);
    oversized[2..6].copy_from_slice(&(BUFFER_SIZE as u32 + 1).to_be_bytes());
    let mut undersized = response_of(10);
    undersized[2..6].copy_from_slice(&4u32.to_be_bytes());
    let mut too_long = response_of(10);
    too_long.extend([0; 5]);
    for bad in [oversized, undersized, too_long] {
        let dir = TempDir::new();
        let (mut backend, mut data, _control) = backend(&dir, COMMAND_TIMEOUT);
        backend.start(&GET_RANDOM);
        let mut command = [0u8; 12];
        data.read_exact(&mut command).unwrap();
        data.write_all(&bad).unwrap();
        assert!(
            matches!(outcome(&mut backend), Err(BackendError::Protocol(_))),
            "{bad:?}"
        );
    }
    // Bytes nobody asked for.
    let dir = TempDir::new();
    let (mut backend, mut data, _control) = backend(&dir, COMMAND_TIMEOUT);
    data.write_all(&response_of(10)).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    backend.start(&GET_RANDOM);
    assert!(matches!(
        outcome(&mut backend),
        Err(BackendError::Unusable(_))
    ));
}

#[test]
fn cancel_sends_cmd_cancel_tpm_cmd_while_a_command_runs() {
    let dir = TempDir::new();
    let (mut backend, mut data, mut control) = backend(&dir, COMMAND_TIMEOUT);
    backend.cancel();
    backend.start(&GET_RANDOM);
    let mut command = [0u8; 12];
    data.read_exact(&mut command).unwrap();
    backend.cancel();
    let mut request = [0u8; 4];
    control.read_exact(&mut request).unwrap();
    assert_eq!(u32::from_be_bytes(request), Command::CancelTpmCmd as u32);
    control.write_all(&[0; 4]).unwrap();
    let mut cancelled = response_of(10);
    cancelled[6..].copy_from_slice(&0x909u32.to_be_bytes());
    data.write_all(&cancelled).unwrap();
    assert_eq!(outcome(&mut backend), Ok(cancelled));
    // Only the one request: the cancel before the command sent nothing.
    control.set_nonblocking(true).unwrap();
    assert!(control.read(&mut request).is_err());
}

#[test]
fn dropping_the_backend_stops_its_thread_and_closes_the_sockets() {
    let dir = TempDir::new();
    let (mut backend, mut data, mut control) = backend(&dir, COMMAND_TIMEOUT);
    backend.start(&GET_RANDOM);
    let mut command = [0u8; 12];
    data.read_exact(&mut command).unwrap();
    let started = Instant::now();
    drop(backend);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "a command in flight does not hold it"
    );
    assert_eq!(data.read(&mut command).unwrap(), 0, "closed");
    assert_eq!(control.read(&mut command).unwrap(), 0, "closed");
}

#[test]
fn nobody_listening_names_the_option_and_the_path() {
    let dir = TempDir::new();
    let path = dir.socket();
    let error = match connect(&path) {
        Err(e) => e,
        Ok(_) => panic!("connected to nothing"),
    };
    assert!(matches!(error, TpmError::Connect { .. }));
    let message = crate::error::chain_message(&error);
    assert_eq!(
        message,
        format!(
            "Error creating TPM device: --tpm socket={path}: cannot connect to swtpm's control \
             socket: No such file or directory (os error 2)"
        )
    );
    // A socket file nobody listens on.
    drop(UnixListener::bind(&path).unwrap());
    let message = crate::error::chain_message(&connect(&path).err().unwrap());
    assert!(
        message.ends_with("Connection refused (os error 111)"),
        "{message}"
    );
}

#[test]
fn swtpm_without_the_capabilities_is_refused_by_name() {
    let dir = TempDir::new();
    let served = fake_swtpm(
        &dir,
        Script {
            capabilities: ALL_CAPABILITIES & !(1 << 12) & !(1 << 10),
            ..Script::default()
        },
    );
    let error = connect(&dir.socket()).err().unwrap();
    drop(served);
    assert!(
        error
            .to_string()
            .ends_with("swtpm lacks capabilities a TPM 2.0 needs: STOP, SET_DATAFD"),
        "{error}"
    );
}

#[test]
fn an_uninitialised_or_established_tpm_is_refused_as_cloud_hypervisor_refuses_it() {
    // swtpm 0.7 without --flags answers CMD_GET_TPMESTABLISHED with 0xa alone.
    let dir = TempDir::new();
    let served = fake_swtpm(
        &dir,
        Script {
            established: Err(0xa),
            ..Script::default()
        },
    );
    let error = connect(&dir.socket()).err().unwrap();
    drop(served);
    let message = crate::error::chain_message(&error);
    assert!(message.contains("swtpm answered result 0xa"), "{message}");
    assert!(
        message.contains("--flags not-need-init or startup-clear"),
        "{message}"
    );

    let dir = TempDir::new();
    let served = fake_swtpm(
        &dir,
        Script {
            established: Ok(1),
            ..Script::default()
        },
    );
    let error = connect(&dir.socket()).err().unwrap();
    drop(served);
    assert!(matches!(error, TpmError::Established { flag: 1, .. }));
}

#[test]
fn a_silent_control_channel_fails_the_set_up_in_bounded_time() {
    let dir = TempDir::new();
    let served = fake_swtpm(
        &dir,
        Script {
            answer_control: false,
            ..Script::default()
        },
    );
    let started = Instant::now();
    let error = connect_with(&dir.socket(), Duration::from_millis(100))
        .err()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    let message = crate::error::chain_message(&error);
    assert!(
        message.contains("CMD_GET_CAPABILITY: no answer within 100ms"),
        "{message}"
    );
    drop(served);
}
