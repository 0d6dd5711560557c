//! `Vm.spawn`'s VM process: forked by the VM forker (a small isolated
//! interpreter that the fork server starts once and that serves requests in
//! Rust) and never running Python, it runs one VM, so it costs about what a
//! Cloud Hypervisor process costs (a forked interpreter writes megabytes of
//! the server's pages as it runs).
//!
//! The program that spawned it keeps the policy (Cloud Hypervisor's VMM
//! rules, the HTTP API on the socket this process listens on, events): it
//! drives this process's VM over the control socket, one JSON request at a
//! time (`vmkit._vmproc`). This process does what it is told, and shuts its
//! VM down and exits when told to, on SIGTERM or SIGINT, or when the control
//! socket closes (the spawning program is gone).
//!
//! Requests are `{"op": ..., ...}` objects; each is answered with
//! `{"ok": value}` or `{"error": {"kind": ..., "message": ...}}`. The answer
//! to `new` carries the VM's exit eventfd (SCM_RIGHTS); `exit` is not
//! answered: the process ends with the given status.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use serde_json::{json, Value};
use vmkit_config::VmConfig;
use vmkit_vmm::process::{Forked, SeqPacket, SignalFd, VmProcessSetup, CONTROL_FD};
use vmkit_vmm::seccomp::{SeccompMode, ThreadGroups, ThreadKind};
use vmkit_vmm::{StopReason, Vm, VmOptions};

/// The largest request or answer (a config with many devices fits).
const MAX_MESSAGE: usize = 1 << 20;

/// What the VM process is set up with, copied before the fork.
struct Setup {
    process: VmProcessSetup,
    api_socket: PathBuf,
    spawn_dir: Option<PathBuf>,
    log_level: log::LevelFilter,
    seccomp: SeccompMode,
}

/// Forks the VM forker (a sibling of this process, as the VM processes it
/// forks will be): a process that serves, in Rust, each request on
/// `socket` (`{"api_socket", "spawn_dir", "affinity", "nice", "verbosity",
/// "seccomp"}` with the control, log and optional working-directory
/// descriptors), forks a VM process and answers `{"pid": n}`. The fork
/// server calls this once, before it imports the VMM's Python: a VM process
/// then shares pages with a small process that writes almost none of them
/// (a forked VM process's copy of a page stays shared until one side
/// writes it; the Python server writes many as it handles each request).
/// The forker exits when `socket` reaches its end.
///
/// With `program` (an interpreter's command line that ends in
/// `vm_forker_main`), the forker runs it instead of going on from this
/// process's memory: a fresh, small interpreter leaves the VM processes less
/// to map and share than a copy of the fork server's.
#[pyfunction]
#[pyo3(signature = (socket, program=None))]
pub fn fork_vm_forker(
    py: Python<'_>,
    socket: RawFd,
    program: Option<Vec<String>>,
) -> PyResult<i32> {
    // The GIL stays held across the fork; the child never uses it again.
    let _ = py;
    let program: Option<Vec<CString>> = program
        .map(|words| words.into_iter().map(CString::new).collect())
        .transpose()
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    // SAFETY: fork_sibling refuses a multi-threaded process (the fork server
    // is single-threaded), so no lock is held by a thread the child lacks;
    // the child runs only Rust and ends with _exit, never returning into the
    // interpreter, whose fork bookkeeping (PyOS_AfterFork_Child) it
    // therefore does not need.
    match unsafe { vmkit_vmm::process::fork_sibling() } {
        Ok(Forked::Caller { child }) => Ok(child),
        Ok(Forked::Child) => {
            if let Some(program) = &program {
                // Only returns if the interpreter cannot start: go on here.
                let _ = vmkit_vmm::process::exec_keeping(program, socket);
            }
            let code = std::panic::catch_unwind(move || forker_main(socket)).unwrap_or(70);
            vmkit_vmm::process::exit_now(code)
        }
        Err(e) => Err(match e.raw_os_error() {
            Some(code) => PyOSError::new_err((code, e.to_string())),
            None => PyRuntimeError::new_err(e.to_string()),
        }),
    }
}

/// The VM forker in an interpreter of its own (`fork_vm_forker`'s
/// `program`): serves `socket` until its end, then exits the process.
#[pyfunction]
pub fn vm_forker_main(socket: RawFd) -> PyResult<()> {
    let code = std::panic::catch_unwind(move || forker_main(socket)).unwrap_or(70);
    vmkit_vmm::process::exit_now(code)
}

/// The largest VM process request (paths and a few numbers).
const MAX_FORK_REQUEST: usize = 1 << 16;

fn forker_main(socket: RawFd) -> i32 {
    // Only the request socket (and stdio) stays: not the fork server's.
    let socket = match vmkit_vmm::process::keep_only(socket) {
        Ok(socket) => SeqPacket(socket),
        Err(e) => {
            eprintln!("vmkit: VM forker: {e}");
            return 1;
        }
    };
    // The default mode's filters, compiled once here: the VM processes
    // forked from this one share them (a `seccomp=log` VM compiles its own).
    vmkit_vmm::seccomp::compile_all(SeccompMode::Trap);
    // So is KVM's supported CPUID (~0.5 ms to ask on kvm_pvm).
    vmkit_vmm::cpu::learn_host_cpuid();
    let mut buffer = vec![0u8; MAX_FORK_REQUEST];
    loop {
        let (length, fds) = match socket.receive_with_fds(&mut buffer) {
            Ok(received) => received,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                let _ = socket.send(br#"{"error": "request too long"}"#, None);
                continue;
            }
            Err(_) => return 1,
        };
        if length == 0 {
            return 0; // the fork server's owner closed its end or exited
        }
        let answer = match fork_from_request(&buffer[..length], &fds) {
            Ok(pid) => json!({ "pid": pid }),
            Err(message) => json!({ "error": message }),
        };
        drop(fds);
        let text = serde_json::to_vec(&answer).unwrap_or_default();
        if socket.send(&text, None).is_err() {
            return 1;
        }
    }
}

/// One VM process from a forker request; its pid.
fn fork_from_request(
    request: &[u8],
    fds: &[std::os::fd::OwnedFd],
) -> std::result::Result<i32, String> {
    let request: Value = serde_json::from_slice(request).map_err(|e| e.to_string())?;
    if !(2..=3).contains(&fds.len()) {
        return Err(format!("expected 2 or 3 descriptors, got {}", fds.len()));
    }
    let seccomp = request["seccomp"]
        .as_str()
        .and_then(SeccompMode::parse)
        .ok_or("bad seccomp mode")?;
    let api_socket = request["api_socket"]
        .as_str()
        .ok_or("no api_socket")?
        .into();
    let affinity = request["affinity"]
        .as_array()
        .map(|cpus| {
            cpus.iter()
                .filter_map(|c| c.as_u64())
                .map(|c| c as usize)
                .collect()
        })
        .unwrap_or_default();
    let setup = Setup {
        process: VmProcessSetup {
            control: fds[0].as_raw_fd(),
            log: fds[1].as_raw_fd(),
            cwd: fds.get(2).map(|fd| fd.as_raw_fd()),
            affinity,
            nice: request["nice"].as_i64().unwrap_or(0) as i32,
        },
        api_socket,
        spawn_dir: request["spawn_dir"].as_str().map(PathBuf::from),
        log_level: log_level(request["verbosity"].as_u64().unwrap_or(0) as u8),
        seccomp,
    };
    // SAFETY: the forker is single-threaded; the child runs only Rust and
    // ends with _exit.
    match unsafe { vmkit_vmm::process::fork_sibling() } {
        Ok(Forked::Caller { child }) => Ok(child),
        Ok(Forked::Child) => {
            let code = std::panic::catch_unwind(move || vm_process_main(setup)).unwrap_or(70);
            vmkit_vmm::process::exit_now(code)
        }
        Err(e) => Err(e.to_string()),
    }
}

fn log_level(verbosity: u8) -> log::LevelFilter {
    match verbosity {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        2 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    }
}

/// The VM process: set up as a fresh process would be, then served until
/// told to exit. Returns the exit status.
///
/// Everything runs on a thread of its own: glibc gives it a fresh malloc
/// arena, where the VM process's allocations do not land in free chunks all
/// over the fork server's heap (the main thread's arena), each copying the
/// page it is on. Signals are set up first, here: the mask is per thread.
fn vm_process_main(setup: Setup) -> i32 {
    if let Err(e) = vmkit_vmm::process::reset_signals() {
        eprintln!("vmkit: cannot set up the VM process's signals: {e}");
        return 1;
    }
    let body = std::thread::Builder::new()
        .name("vmm-control".to_owned())
        .spawn(move || vm_process_body(setup));
    match body {
        Ok(thread) => thread.join().unwrap_or(70),
        Err(e) => {
            eprintln!("vmkit: cannot start the VM process's thread: {e}");
            1
        }
    }
}

fn vm_process_body(setup: Setup) -> i32 {
    vmkit_vmm::stack::note_stack_bounds();
    if let Err(e) = vmkit_vmm::process::set_up_vm_process(&setup.process) {
        eprintln!("vmkit: cannot set up the VM process: {e}");
        return 1;
    }
    crate::logging::log_to_stderr(setup.log_level);
    let control = Control(SeqPacket(CONTROL_FD));
    let signals = match SignalFd::new() {
        Ok(signals) => signals,
        Err(e) => {
            eprintln!("vmkit: signalfd: {e}");
            return 1;
        }
    };
    let listener = match UnixListener::bind(&setup.api_socket) {
        Ok(listener) => listener,
        Err(e) => {
            // As the `vmkit` command words it (see cli._serve).
            let message =
                format!("Failed to start the VMM thread: Error creation API server's socket {e:?}");
            let _ = control.send(&json!({ "error": message }), None);
            eprintln!("{message}");
            return 1;
        }
    };
    let socket_file = SocketFile::new(&setup.api_socket);
    let ready = json!({ "ready": { "pid": std::process::id() } });
    let sent = control.send(&ready, Some(listener.as_raw_fd()));
    // The spawning program accepts on its copy; the socket file is ours.
    drop(listener);
    if sent.is_err() {
        socket_file.remove();
        return 1;
    }
    // Every thread (the main one waits for this one) under the filter.
    if let Err(e) = vmkit_vmm::seccomp::confine_process(ThreadKind::Process, setup.seccomp) {
        eprintln!("vmkit: seccomp: {e}");
        socket_file.remove();
        return 1;
    }
    let mut state = State {
        vm: None,
        net_fds: Default::default(),
    };
    let end = serve(&control, &signals, &mut state);
    if let Some(vm) = state.vm.take() {
        vm.close();
    }
    socket_file.remove();
    if let Some(file) = &end.remove_file {
        let _ = std::fs::remove_file(file);
    }
    if end.remove_spawn_dir {
        if let Some(dir) = &setup.spawn_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    end.code
}

/// How `serve` ended: the exit status, and what to remove before exiting.
struct End {
    code: i32,
    /// The spawning program is gone: nobody else removes the directory.
    remove_spawn_dir: bool,
    /// A file the spawning program named (its registry entry for this VM).
    remove_file: Option<PathBuf>,
}

impl End {
    fn status(code: i32) -> End {
        End {
            code,
            remove_spawn_dir: false,
            remove_file: None,
        }
    }

    fn orphaned() -> End {
        End {
            remove_spawn_dir: true,
            ..End::status(0)
        }
    }
}

/// The API socket's file, removed at the end only if it is still the one
/// this process made (someone may have put another socket in its place).
struct SocketFile {
    path: PathBuf,
    identity: Option<(u64, u64)>,
}

impl SocketFile {
    fn new(path: &std::path::Path) -> SocketFile {
        use std::os::unix::fs::MetadataExt;

        let identity = std::fs::symlink_metadata(path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        SocketFile {
            path: path.to_owned(),
            identity,
        }
    }

    fn remove(&self) {
        use std::os::unix::fs::MetadataExt;

        let now = std::fs::symlink_metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if now.is_some() && now == self.identity {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The control socket, in JSON messages.
struct Control(SeqPacket);

impl Control {
    fn send(&self, value: &Value, fd: Option<RawFd>) -> std::io::Result<()> {
        let text = serde_json::to_vec(value).map_err(std::io::Error::other)?;
        self.0.send(&text, fd)
    }
}

struct State {
    vm: Option<Arc<Vm>>,
    /// Tap descriptors hot-plugged net devices came with, by device id: the
    /// config names them (a reboot opens them again) until the device goes.
    net_fds: std::collections::HashMap<String, Vec<OwnedFd>>,
}

/// Answers requests until told to exit, a signal, or the end of the control
/// socket.
fn serve(control: &Control, signals: &SignalFd, state: &mut State) -> End {
    // One buffer for every request: allocated once (untouched zero pages
    // until a request fills them), never the size of the largest each time.
    let mut buffer = vec![0u8; MAX_MESSAGE];
    loop {
        let Ok(ready) = vmkit_vmm::process::wait_readable(&[CONTROL_FD, signals.as_raw_fd()])
        else {
            return End::status(1);
        };
        if ready[1] {
            // SIGTERM or SIGINT: what `vmm.shutdown` does, then status 0.
            return End::status(0);
        }
        if !ready[0] {
            continue;
        }
        let (message, fds) = match control.0.receive_with_fds(&mut buffer) {
            Ok((length, fds)) => (&buffer[..length], fds),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                let _ = control.send(&error("Unsupported", &format!("request: {e}")), None);
                continue;
            }
            Err(_) => return End::orphaned(),
        };
        if message.is_empty() {
            return End::orphaned(); // the spawning program closed its end or exited
        }
        let request: Value = match serde_json::from_slice(message) {
            Ok(request) => request,
            Err(e) => {
                let _ = control.send(&error("Unsupported", &format!("bad request: {e}")), None);
                continue;
            }
        };
        if request["op"] == "exit" {
            let code = request["code"].as_i64().unwrap_or(0);
            return End {
                code: i32::try_from(code).unwrap_or(1),
                remove_spawn_dir: false,
                remove_file: request["remove_file"].as_str().map(PathBuf::from),
            };
        }
        let (answer, fd) = handle(state, &request, fds);
        if control.send(&answer, fd).is_err() {
            return End::orphaned();
        }
        // Creating and booting a VM runs deep; idle, this thread waits here.
        vmkit_vmm::stack::release_unused_stack();
    }
}

fn error(kind: &str, message: &str) -> Value {
    json!({ "error": { "kind": kind, "message": message } })
}

fn vm_error(e: vmkit_vmm::Error) -> Value {
    error(e.kind.name(), &e.message)
}

fn done(result: vmkit_vmm::Result<()>) -> Value {
    match result {
        Ok(()) => json!({ "ok": null }),
        Err(e) => vm_error(e),
    }
}

fn exit_value(reason: Option<StopReason>) -> Value {
    match reason {
        Some(reason) => json!([reason.kind(), reason.message()]),
        None => Value::Null,
    }
}

/// One request on the VM; the answer and a descriptor to send with it.
/// `fds`: the descriptors the request carried (`new`'s thread groups, a
/// hot-plugged net device's taps).
fn handle(state: &mut State, request: &Value, fds: Vec<OwnedFd>) -> (Value, Option<RawFd>) {
    let op = request["op"].as_str().unwrap_or("");
    if op == "new" {
        return new_vm(state, request, fds);
    }
    if op == "restore" || op == "receive_migration" {
        return restore_vm(state, request);
    }
    let Some(vm) = state.vm.clone() else {
        return (error("State", "no VM in this process"), None);
    };
    if op == "device_events_fd" {
        return (json!({ "ok": null }), Some(vm.device_events_fd()));
    }
    let answer = match op {
        "boot" => done(vm.boot()),
        "pause" => done(vm.pause()),
        "snapshot" => match request["path"].as_str() {
            Some(path) => done(vm.snapshot(std::path::Path::new(path))),
            None => error("Snapshot", "snapshot: no path"),
        },
        "send_migration" => match request["path"].as_str() {
            Some(path) => {
                let local = request["local"].as_bool().unwrap_or(false);
                match vm.send_migration(std::path::Path::new(path), local) {
                    Ok(report) => json!({
                        "ok": [
                            report.total.as_secs_f64(),
                            report.downtime.as_secs_f64(),
                            report.rounds,
                            report.bytes
                        ]
                    }),
                    Err(e) => vm_error(e),
                }
            }
            None => error("Migration", "send_migration: no path"),
        },
        "resume" => done(vm.resume()),
        "shutdown" => done(vm.shutdown()),
        "reboot" => done(vm.reboot()),
        "power_button" => done(vm.power_button()),
        "resize_vcpus" => match request["vcpus"].as_u64().and_then(|n| u8::try_from(n).ok()) {
            Some(vcpus) => done(vm.resize_vcpus(vcpus)),
            None => error("Device", "resize_vcpus: no vCPU count"),
        },
        "resize_memory" => match request["bytes"].as_u64() {
            Some(bytes) => done(vm.resize_memory(bytes)),
            None => error("Device", "resize_memory: no bytes"),
        },
        "add_device" => {
            let config: Result<VmConfig, _> = serde_json::from_value(request["config"].clone());
            match (config, request["field"].as_str()) {
                (Ok(mut config), Some("net")) if !fds.is_empty() => {
                    // The new net device's tap descriptors came with the
                    // request: its `fds` name the caller's numbers, not ours.
                    if let Some(net) = config.net.iter_mut().flatten().last() {
                        net.fds = Some(fds.iter().map(|fd| fd.as_raw_fd()).collect());
                    }
                    match vm.add_device(config, "net") {
                        Ok((id, bdf)) => {
                            state.net_fds.insert(id.clone(), fds);
                            json!({ "ok": [id, bdf] })
                        }
                        Err(e) => vm_error(e),
                    }
                }
                (Ok(config), Some(field)) => match vm.add_device(config, field) {
                    Ok((id, bdf)) => json!({ "ok": [id, bdf] }),
                    Err(e) => vm_error(e),
                },
                (Err(e), _) => error("Unsupported", &format!("config: {e}")),
                (_, None) => error("Device", "add_device: no field"),
            }
        }
        "remove_device" => match request["id"].as_str() {
            Some(id) => {
                let result = vm.remove_device(id);
                if result.is_ok() {
                    // Out of the config: the device holds duplicates until its eject.
                    state.net_fds.remove(id);
                }
                done(result)
            }
            None => error("Device", "remove_device: no id"),
        },
        "resize_balloon" => match request["bytes"].as_u64() {
            Some(bytes) => done(vm.resize_balloon(bytes)),
            None => error("Device", "resize_balloon: no bytes"),
        },
        "resize_zone" => match (request["zone"].as_str(), request["bytes"].as_u64()) {
            (Some(zone), Some(bytes)) => done(vm.resize_zone(zone, bytes)),
            _ => error("Device", "resize_zone: no zone or bytes"),
        },
        "close" => {
            vm.close();
            json!({ "ok": null })
        }
        "release" => {
            vm.release();
            json!({ "ok": null })
        }
        // Never blocks: the spawning program waits on the exit eventfd.
        "wait" => json!({ "ok": exit_value(vm.wait(Some(Duration::ZERO))) }),
        "state" => json!({ "ok": vm.state().to_string() }),
        "device_events" => {
            let since = request["since"].as_u64().unwrap_or(0) as usize;
            let (events, next) = vm.device_events(since);
            let events: Vec<Value> = events
                .into_iter()
                .map(|e| json!([e.source, e.event, e.properties]))
                .collect();
            json!({ "ok": [events, next] })
        }
        "debug_port_writes" => {
            let writes: Vec<Value> = vm
                .debug_port_writes()
                .iter()
                .map(|w| {
                    json!([
                        w.value,
                        w.since_creation.as_secs_f64(),
                        w.monotonic_ns as f64 / 1e9
                    ])
                })
                .collect();
            json!({ "ok": writes })
        }
        "runtime_info" => json!({ "ok": crate::vm::runtime_info(&vm) }),
        "live_config" => {
            if vm.info().boots == 0 {
                json!({ "ok": null })
            } else {
                match serde_json::to_value(vm.live_config()) {
                    Ok(config) => json!({ "ok": config }),
                    Err(e) => error("Device", &e.to_string()),
                }
            }
        }
        "iommu" => json!({ "ok": vm.config().iommu }),
        "counters" => match vm.counters() {
            Ok(counters) => {
                let map: serde_json::Map<String, Value> = counters
                    .into_iter()
                    .map(|(id, values)| (id, json!(values)))
                    .collect();
                json!({ "ok": map })
            }
            Err(e) => vm_error(e),
        },
        other => error("Unsupported", &format!("unknown request {other:?}")),
    };
    (answer, None)
}

/// `new`: the VM of `config` (Cloud Hypervisor's JSON, validated by the
/// spawning program already), replacing a previous one. With
/// `"thread_groups": true` the request carries the vCPU and device CPU
/// groups' thread files.
/// `restore`: a VM from the snapshot directory `path` (Paused);
/// `receive_migration`: the VM another VMM migrates to the unix socket
/// `path` (Running). Either answers its config, with the exit descriptor.
fn restore_vm(state: &mut State, request: &Value) -> (Value, Option<RawFd>) {
    let receive = request["op"] == "receive_migration";
    let Some(path) = request["path"].as_str() else {
        let kind = if receive { "Migration" } else { "Snapshot" };
        return (error(kind, "no path"), None);
    };
    let options = VmOptions {
        watchdog_timeout: request["watchdog_timeout"]
            .as_f64()
            .and_then(|s| Duration::try_from_secs_f64(s).ok()),
        lock_disks: request["lock_disks"].as_bool().unwrap_or(true),
        seccomp: request["seccomp"]
            .as_str()
            .and_then(SeccompMode::parse)
            .unwrap_or_default(),
        thread_groups: ThreadGroups::default(),
    };
    let prefault = request["prefault"].as_bool().unwrap_or(false);
    // The clone's own disk images, by disk id (`Vm::restore`).
    let mut disks = Vec::new();
    if let Some(given) = request["disks"].as_object() {
        for (id, image) in given {
            let Some(image) = image.as_str() else {
                return (
                    error("Snapshot", &format!("disk {id}: no image path")),
                    None,
                );
            };
            disks.push((id.clone(), std::path::PathBuf::from(image)));
        }
    }
    let path = std::path::Path::new(path);
    // A VM received replaces the one here only once it runs (a failed
    // migration leaves that one as it was, as in Cloud Hypervisor); a
    // restore only ever comes to a process without one.
    let vm = if receive {
        Vm::receive_migration(path, options)
    } else {
        Vm::restore(path, options, prefault, &disks)
    };
    match vm {
        Ok(vm) => {
            let config = serde_json::to_value(vm.config()).unwrap_or(Value::Null);
            let fd = vm.exit_fd();
            if let Some(old) = state.vm.replace(vm) {
                old.close();
                old.release();
            }
            (json!({ "ok": config }), Some(fd))
        }
        Err(e) => (vm_error(e), None),
    }
}

fn new_vm(state: &mut State, request: &Value, fds: Vec<OwnedFd>) -> (Value, Option<RawFd>) {
    let config: VmConfig = match serde_json::from_value(request["config"].clone()) {
        Ok(config) => config,
        Err(e) => return (error("Unsupported", &format!("config: {e}")), None),
    };
    let config = match config.validated() {
        Ok(config) => config,
        Err(e) => return (error("Unsupported", &e.to_string()), None),
    };
    let watchdog_timeout = request["watchdog_timeout"]
        .as_f64()
        .and_then(|s| Duration::try_from_secs_f64(s).ok());
    let seccomp = request["seccomp"]
        .as_str()
        .and_then(SeccompMode::parse)
        .unwrap_or_default();
    let thread_groups = if request["thread_groups"].as_bool().unwrap_or(false) {
        let Ok::<[OwnedFd; 2], _>([vcpu, device]) = fds.try_into() else {
            return (
                error("Unsupported", "thread_groups: expected 2 descriptors"),
                None,
            );
        };
        ThreadGroups::new(vcpu, device)
    } else {
        ThreadGroups::default()
    };
    let options = VmOptions {
        watchdog_timeout,
        lock_disks: request["lock_disks"].as_bool().unwrap_or(true),
        seccomp,
        thread_groups,
    };
    if let Some(old) = state.vm.take() {
        old.close();
        old.release();
    }
    state.net_fds.clear();
    match Vm::new(config, options) {
        Ok(vm) => {
            let fd = vm.exit_fd();
            state.vm = Some(vm);
            (json!({ "ok": null }), Some(fd))
        }
        Err(e) => (vm_error(e), None),
    }
}
