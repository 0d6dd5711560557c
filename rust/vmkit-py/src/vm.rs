//! `vmkit._native.VmHandle`: a running VM owned by Rust. Every blocking call
//! releases the GIL; Rust never calls back into Python from its threads.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyType};
use serde_json::{json, Value};
use std::os::fd::RawFd;
use vmkit_config::VmConfig;
use vmkit_vmm::seccomp::{SeccompMode, ThreadGroups};
use vmkit_vmm::{StopReason, Vm, VmOptions};

static VM_ERROR: OnceLock<Py<PyType>> = OnceLock::new();

/// Gives the extension the Python class for VMM errors.
#[pyfunction]
pub fn register_vm_error(class: Bound<'_, PyType>) {
    let _ = VM_ERROR.set(class.unbind());
}

fn vm_error(py: Python<'_>, error: vmkit_vmm::Error) -> PyErr {
    let Some(class) = VM_ERROR.get() else {
        return PyRuntimeError::new_err(error.message);
    };
    match class
        .bind(py)
        .call1((error.message.clone(), error.kind.name()))
    {
        Ok(value) => PyErr::from_value(value),
        Err(e) => e,
    }
}

fn exit_tuple(reason: StopReason) -> (String, String) {
    (reason.kind().to_owned(), reason.message())
}

fn duration(seconds: Option<f64>) -> PyResult<Option<Duration>> {
    seconds
        .map(|s| {
            Duration::try_from_secs_f64(s)
                .map_err(|_| PyValueError::new_err(format!("invalid timeout {s}")))
        })
        .transpose()
}

/// The VmOptions of `new`'s and `restore`'s arguments. `thread_groups`: the
/// CPU groups' thread files, duplicated here (the caller closes its own).
fn vm_options(
    watchdog_timeout: Option<f64>,
    lock_disks: bool,
    seccomp: &str,
    thread_groups: Option<(RawFd, RawFd)>,
) -> PyResult<VmOptions> {
    let seccomp = seccomp_mode(seccomp)?;
    let thread_groups = match thread_groups {
        Some((vcpu, device)) => {
            let duplicate = |fd| {
                vmkit_vmm::process::duplicate_fd(fd).map_err(|e| {
                    PyValueError::new_err(format!("thread_groups: descriptor {fd}: {e}"))
                })
            };
            ThreadGroups::new(duplicate(vcpu)?, duplicate(device)?)
        }
        None => ThreadGroups::default(),
    };
    Ok(VmOptions {
        watchdog_timeout: duration(watchdog_timeout)?,
        lock_disks,
        seccomp,
        thread_groups,
    })
}

#[pyclass(module = "vmkit._native", frozen)]
pub struct VmHandle {
    vm: Arc<Vm>,
}

#[pymethods]
impl VmHandle {
    /// Reads and validates `config` (a VmConfig object) and opens KVM;
    /// nothing runs yet. Raises ConfigError/ValidationError for a bad config.
    /// `thread_groups`: the vCPU and device CPU groups' thread files, open
    /// for writing (duplicated here; the caller closes its own).
    #[new]
    #[pyo3(signature = (config, watchdog_timeout=None, lock_disks=true, seccomp="true", thread_groups=None))]
    fn new(
        py: Python<'_>,
        config: &Bound<'_, PyAny>,
        watchdog_timeout: Option<f64>,
        lock_disks: bool,
        seccomp: &str,
        thread_groups: Option<(RawFd, RawFd)>,
    ) -> PyResult<Self> {
        let options = vm_options(watchdog_timeout, lock_disks, seccomp, thread_groups)?;
        let config: VmConfig = crate::from_py(py, config)?;
        // Validated here, once, for Python's typed ValidationError.
        let config = config
            .validated()
            .map_err(|e| crate::validation_error(py, e))?;
        let vm = py
            .detach(|| Vm::new(config, options))
            .map_err(|e| vm_error(py, e))?;
        Ok(VmHandle { vm })
    }

    /// A VM from the snapshot directory `path`, Paused; `prefault` reads
    /// guest memory in up front; `disks`: (disk id, image) pairs replacing
    /// the images the snapshot's config names. The other options are `new`'s.
    #[staticmethod]
    #[pyo3(signature = (path, prefault=false, watchdog_timeout=None, lock_disks=true, seccomp="true", disks=Vec::new()))]
    fn restore(
        py: Python<'_>,
        path: std::path::PathBuf,
        prefault: bool,
        watchdog_timeout: Option<f64>,
        lock_disks: bool,
        seccomp: &str,
        disks: Vec<(String, std::path::PathBuf)>,
    ) -> PyResult<Self> {
        let options = vm_options(watchdog_timeout, lock_disks, seccomp, None)?;
        let vm = py
            .detach(|| Vm::restore(&path, options, prefault, &disks))
            .map_err(|e| vm_error(py, e))?;
        Ok(VmHandle { vm })
    }

    /// Receives a VM from another VMM's `send_migration` on the unix socket
    /// `path` (created here, removed once the sender connects); returns it
    /// Running. The other options are `new`'s.
    #[staticmethod]
    #[pyo3(signature = (path, watchdog_timeout=None, lock_disks=true, seccomp="true"))]
    fn receive_migration(
        py: Python<'_>,
        path: std::path::PathBuf,
        watchdog_timeout: Option<f64>,
        lock_disks: bool,
        seccomp: &str,
    ) -> PyResult<Self> {
        let options = vm_options(watchdog_timeout, lock_disks, seccomp, None)?;
        let vm = py
            .detach(|| Vm::receive_migration(&path, options))
            .map_err(|e| vm_error(py, e))?;
        Ok(VmHandle { vm })
    }

    /// Moves the VM to the VMM receiving on the unix socket `path`; with
    /// `local`, hands shared guest memory over instead of copying it.
    /// Returns (total s, downtime s, memory passes, bytes sent).
    fn send_migration(
        &self,
        py: Python<'_>,
        path: std::path::PathBuf,
        local: bool,
    ) -> PyResult<(f64, f64, u32, u64)> {
        let report = py
            .detach(|| self.vm.send_migration(&path, local))
            .map_err(|e| vm_error(py, e))?;
        Ok((
            report.total.as_secs_f64(),
            report.downtime.as_secs_f64(),
            report.rounds,
            report.bytes,
        ))
    }

    /// Writes the paused VM's snapshot into the directory `path`.
    fn snapshot(&self, py: Python<'_>, path: std::path::PathBuf) -> PyResult<()> {
        py.detach(|| self.vm.snapshot(&path))
            .map_err(|e| vm_error(py, e))
    }

    /// The validated config (with the device ids given at creation).
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        crate::to_py(py, self.vm.config())
    }

    fn boot(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.vm.boot()).map_err(|e| vm_error(py, e))
    }

    fn pause(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.vm.pause()).map_err(|e| vm_error(py, e))
    }

    fn resume(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.vm.resume()).map_err(|e| vm_error(py, e))
    }

    fn shutdown(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.vm.shutdown())
            .map_err(|e| vm_error(py, e))
    }

    fn reboot(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.vm.reboot()).map_err(|e| vm_error(py, e))
    }

    /// Device events from index `since` on and the next `since`:
    /// ([(source, event, [(key, value)])], next).
    #[allow(clippy::type_complexity)]
    fn device_events(
        &self,
        since: usize,
    ) -> (
        Vec<(&'static str, &'static str, Vec<(&'static str, String)>)>,
        usize,
    ) {
        let (events, next) = self.vm.device_events(since);
        let events = events
            .into_iter()
            .map(|e| (e.source, e.event, e.properties))
            .collect();
        (events, next)
    }

    /// `vm.resize {"desired_vcpus": n}` on a running VM (CPU hot-plug).
    fn resize_vcpus(&self, py: Python<'_>, vcpus: u8) -> PyResult<()> {
        py.detach(|| self.vm.resize_vcpus(vcpus))
            .map_err(|e| vm_error(py, e))
    }

    /// `vm.resize {"desired_ram": bytes}` on a running VM (an ACPI DIMM or virtio-mem).
    fn resize_memory(&self, py: Python<'_>, bytes: u64) -> PyResult<()> {
        py.detach(|| self.vm.resize_memory(bytes))
            .map_err(|e| vm_error(py, e))
    }

    /// `vm.add-*` on a running VM (PCI hot-plug): `config` is the live
    /// config with the new device last in list `field`; returns (id, BDF).
    fn add_device(
        &self,
        py: Python<'_>,
        config: &Bound<'_, PyAny>,
        field: &str,
    ) -> PyResult<(String, String)> {
        let config: VmConfig = crate::from_py(py, config)?;
        let field = field.to_owned();
        py.detach(|| self.vm.add_device(config, &field))
            .map_err(|e| vm_error(py, e))
    }

    /// `vm.remove-device` on a running VM: the guest ejects it.
    fn remove_device(&self, py: Python<'_>, id: &str) -> PyResult<()> {
        let id = id.to_owned();
        py.detach(|| self.vm.remove_device(&id))
            .map_err(|e| vm_error(py, e))
    }

    /// `vm.resize {"desired_balloon": bytes}`.
    fn resize_balloon(&self, py: Python<'_>, bytes: u64) -> PyResult<()> {
        py.detach(|| self.vm.resize_balloon(bytes))
            .map_err(|e| vm_error(py, e))
    }

    /// `vm.resize-zone {"id": zone, "desired_ram": bytes}`.
    fn resize_zone(&self, py: Python<'_>, zone: String, bytes: u64) -> PyResult<()> {
        py.detach(|| self.vm.resize_zone(&zone, bytes))
            .map_err(|e| vm_error(py, e))
    }

    fn power_button(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.vm.power_button())
            .map_err(|e| vm_error(py, e))
    }

    /// Shuts down and releases the backends (pty, socket); final.
    fn close(&self, py: Python<'_>) {
        py.detach(|| self.vm.close());
    }

    /// Waits until a stopped VM's KVM VM and guest memory are released.
    fn release(&self, py: Python<'_>) {
        py.detach(|| self.vm.release());
    }

    /// A descriptor that is readable while the VM is stopped (to poll; never
    /// read or close it). Valid while this handle lives.
    #[getter]
    fn exit_fd(&self) -> i32 {
        self.vm.exit_fd()
    }

    /// A descriptor that is readable after a device event until read (8
    /// bytes): to wait for `device_events` instead of polling. Valid while
    /// this handle lives.
    #[getter]
    fn device_events_fd(&self) -> i32 {
        self.vm.device_events_fd()
    }

    /// Waits for the VM to stop: (reason, message), or None on timeout.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<(String, String)>> {
        let timeout = duration(timeout)?;
        Ok(py.detach(|| self.vm.wait(timeout)).map(exit_tuple))
    }

    /// The state as last changed: answers at once, during a migration too.
    #[getter]
    fn state(&self) -> String {
        self.vm.state().to_string()
    }

    /// (offset of the first byte, bytes) of serial output from `offset` on.
    fn serial_read<'py>(&self, py: Python<'py>, offset: u64) -> (u64, Bound<'py, PyBytes>) {
        let (start, bytes) = self
            .vm
            .serial()
            .map_or((offset, Vec::new()), |s| s.capture.read_from(offset));
        (start, PyBytes::new(py, &bytes))
    }

    /// Waits until serial output goes past `offset`; False on timeout.
    fn serial_wait(&self, py: Python<'_>, offset: u64, timeout: f64) -> PyResult<bool> {
        let timeout = duration(Some(timeout))?.unwrap_or_default();
        let Some(serial) = self.vm.serial().cloned() else {
            return Ok(false);
        };
        Ok(py.detach(move || serial.capture.wait_past(offset, timeout)))
    }

    /// (value, seconds since VM creation, CLOCK_MONOTONIC seconds) of each
    /// debug-port (0x80) write.
    fn debug_port_writes(&self) -> Vec<(u8, f64, f64)> {
        self.vm
            .debug_port_writes()
            .iter()
            .map(|w| {
                (
                    w.value,
                    w.since_creation.as_secs_f64(),
                    w.monotonic_ns as f64 / 1e9,
                )
            })
            .collect()
    }

    /// Runtime facts: state, boots, kernel format, serial pty path.
    fn runtime_info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        // Waits out a reboot in progress: without the GIL.
        let info = py.detach(|| runtime_info(&self.vm));
        crate::to_py(py, &info)
    }

    /// The config of the booted VM (with the ids given at boot), or None
    /// before the first boot: only then does Cloud Hypervisor give the ids.
    fn live_config<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        if py.detach(|| self.vm.info()).boots == 0 {
            return Ok(None);
        }
        crate::to_py(py, &self.vm.live_config()).map(Some)
    }

    /// The top-level `iommu` of the validated config (v37 derives it).
    #[getter]
    fn iommu(&self) -> bool {
        self.vm.config().iommu
    }

    /// Cloud Hypervisor's counters: {device id: {counter: value}}.
    fn counters<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let counters = py
            .detach(|| self.vm.counters())
            .map_err(|e| vm_error(py, e))?;
        let dict = PyDict::new(py);
        for (id, values) in counters {
            let inner = PyDict::new(py);
            for (name, value) in values {
                inner.set_item(name, value)?;
            }
            dict.set_item(id, inner)?;
        }
        Ok(dict)
    }
}

/// One node of the device tree in Cloud Hypervisor's JSON shape.
/// What `VmHandle.runtime_info` answers, as JSON (a VM process sends it as
/// is): state, boots, kernel format, PTYs, memory size and Cloud
/// Hypervisor's device tree ({id: node}; null when no boot runs).
pub(crate) fn runtime_info(vm: &Vm) -> Value {
    let info = vm.info();
    let tree = if info.device_tree.is_empty() {
        Value::Null
    } else {
        let nodes: serde_json::Map<String, Value> = info
            .device_tree
            .into_iter()
            .map(|node| (node.id.clone(), device_node(node)))
            .collect();
        Value::Object(nodes)
    };
    json!({
        "state": info.state.to_string(),
        "boots": info.boots,
        "kernel_format": info.kernel_format,
        "serial_pty": info.serial_pty.map(|p| p.to_string_lossy().into_owned()),
        "console_pty": info.console_pty.map(|p| p.to_string_lossy().into_owned()),
        "memory_size": info.memory_size,
        "device_tree": tree,
    })
}

fn device_node(node: vmkit_vmm::DeviceNode) -> Value {
    let resources: Vec<Value> = node
        .resources
        .into_iter()
        .map(|resource| match resource {
            vmkit_vmm::Resource::PciBar {
                index,
                base,
                size,
                kind,
                prefetchable,
            } => json!({ "PciBar": {
                "index": index,
                "base": base,
                "size": size,
                "type_": vmkit_vmm::device_manager::bar_type_name(kind),
                "prefetchable": prefetchable,
            }}),
            vmkit_vmm::Resource::MmioAddressRange { base, size } => {
                json!({ "MmioAddressRange": { "base": base, "size": size } })
            }
        })
        .collect();
    json!({
        "id": node.id,
        "resources": resources,
        "parent": node.parent,
        "children": node.children,
        "pci_bdf": node.pci_bdf,
    })
}

impl Drop for VmHandle {
    /// A VM whose Python object goes away must not keep running unseen, nor
    /// leave its KVM VM, memory or threads behind. Closing joins the VM's
    /// threads, so other Python threads run meanwhile (no GIL to release
    /// once the interpreter is finalizing).
    fn drop(&mut self) {
        let vm = &self.vm;
        let close = || {
            vm.close();
            vm.release();
        };
        if Python::try_attach(|py| py.detach(close)).is_none() {
            close();
        }
    }
}

/// The built-in test guest in one of its formats: "pvh", "elf" or "bzimage".
#[pyfunction]
pub fn test_guest_image<'py>(py: Python<'py>, format: &str) -> PyResult<Bound<'py, PyBytes>> {
    let bytes = match format {
        "pvh" => vmkit_guest::PVH_ELF,
        "elf" => vmkit_guest::ELF_NO_PVH,
        "bzimage" => vmkit_guest::BZIMAGE,
        other => {
            return Err(PyValueError::new_err(format!(
                "unknown test guest format {other:?} (pvh, elf or bzimage)"
            )))
        }
    };
    Ok(PyBytes::new(py, bytes))
}

fn seccomp_mode(value: &str) -> PyResult<SeccompMode> {
    SeccompMode::parse(value).ok_or_else(|| {
        PyValueError::new_err(format!("seccomp must be true, false or log, not {value:?}"))
    })
}

/// Confines every thread of this process to the `vmkit` command's seccomp
/// filter (`mode`: true, log or false). For the `vmkit` process only, once
/// its start-up is done: a program that hosts a `Vm` must not call it.
#[pyfunction]
pub fn confine_process(mode: &str) -> PyResult<()> {
    let mode = seccomp_mode(mode)?;
    vmkit_vmm::seccomp::confine_process(vmkit_vmm::seccomp::ThreadKind::Process, mode)
        .map_err(|e| PyOSError::new_err(e.to_string()))
}

/// Forks this interpreter into a process whose parent is this process's
/// parent (the fork server's `clone(CLONE_PARENT)`); returns the new
/// process's pid here and 0 in it. Raises RuntimeError when this process
/// runs more than one thread, OSError when clone fails.
#[pyfunction]
pub fn fork_sibling(py: Python<'_>) -> PyResult<i32> {
    let _ = py; // the GIL is held across the fork, as os.fork holds it
                // SAFETY: PyOS_BeforeFork/AfterFork_* are CPython's fork bookkeeping,
                // called with the GIL held around the fork, one AfterFork call on each
                // side, as os.fork does. fork_sibling refuses a multi-threaded process,
                // and the child is a CPython interpreter that PyOS_AfterFork_Child
                // re-initialises for its single thread.
    unsafe {
        pyo3::ffi::PyOS_BeforeFork();
        match vmkit_vmm::process::fork_sibling() {
            Ok(vmkit_vmm::process::Forked::Child) => {
                pyo3::ffi::PyOS_AfterFork_Child();
                Ok(0)
            }
            Ok(vmkit_vmm::process::Forked::Caller { child }) => {
                pyo3::ffi::PyOS_AfterFork_Parent();
                Ok(child)
            }
            Err(e) => {
                pyo3::ffi::PyOS_AfterFork_Parent();
                Err(match e.raw_os_error() {
                    Some(code) => PyOSError::new_err((code, e.to_string())),
                    None => PyRuntimeError::new_err(e.to_string()),
                })
            }
        }
    }
}
