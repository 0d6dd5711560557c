//! `vmkit._native`: thin bindings over the Rust crates. No policy lives here:
//! each function converts arguments, calls the crate, and converts results and
//! errors (into the Python exception classes that `vmkit` registers).

use std::sync::OnceLock;

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple, PyType};
use serde::Serialize;

use vmkit_config::json::from_json as parse_json;
use vmkit_config::values::MacAddr;
use vmkit_config::{
    render, BalloonConfig, ConsoleConfig, CpuAffinity, CpuFeatures, CpuTopology, CpusConfig,
    DeviceConfig, DiskConfig, Error, FsConfig, JsonError, MemoryConfig, MemoryZoneConfig, NetConfig,
    NumaConfig, NumaDistance, OptionString, PayloadConfig, PlatformConfig, PmemConfig,
    RateLimiterConfig, RateLimiterGroupConfig, RestoreConfig, RngConfig, SgxEpcConfig,
    TokenBucketConfig, TpmConfig, UnrepresentableError, UserDeviceConfig, ValidationError,
    VdpaConfig, VmConfig, VmParams, VsockConfig,
};
use vmkit_config::option_parser;

mod to_python;
use to_python::ToPython;

struct Registry {
    classes: Py<PyDict>,
    config_error: Py<PyType>,
    parse_error: Py<PyType>,
    validation_error: Py<PyType>,
    object_new: Py<PyAny>,
}

static REGISTRY: OnceLock<Registry> = OnceLock::new();

fn registry() -> PyResult<&'static Registry> {
    REGISTRY
        .get()
        .ok_or_else(|| PyRuntimeError::new_err("vmkit._native.register() was not called"))
}

/// Gives the extension the Python classes it builds and raises.
#[pyfunction]
fn register(
    py: Python<'_>,
    classes: Bound<'_, PyDict>,
    config_error: Bound<'_, PyType>,
    parse_error: Bound<'_, PyType>,
    validation_error: Bound<'_, PyType>,
) -> PyResult<()> {
    let object_new = py
        .import("builtins")?
        .getattr("object")?
        .getattr("__new__")?
        .unbind();
    // A second import of the package (e.g. importlib.reload) keeps the first registry.
    let _ = REGISTRY.set(Registry {
        classes: classes.unbind(),
        config_error: config_error.unbind(),
        parse_error: parse_error.unbind(),
        validation_error: validation_error.unbind(),
        object_new,
    });
    Ok(())
}

fn raise(
    py: Python<'_>,
    class: &Py<PyType>,
    message: String,
    kind: &str,
    extra: &[(&str, Option<String>)],
) -> PyErr {
    let build = || -> PyResult<PyErr> {
        let kwargs = PyDict::new(py);
        for (name, value) in extra {
            kwargs.set_item(*name, value.clone())?;
        }
        let error = class.bind(py).call((message, kind), Some(&kwargs))?;
        Ok(PyErr::from_value(error))
    };
    build().unwrap_or_else(|e| e)
}

fn config_error(py: Python<'_>, error: Error) -> PyErr {
    let Ok(reg) = registry() else {
        return PyValueError::new_err(error.to_string());
    };
    match &error {
        Error::Validation(v) => raise(py, &reg.validation_error, v.to_string(), v.kind(), &[]),
        _ => {
            let (key, value) = match error.parser_error() {
                Some(option_parser::OptionParserError::Conversion(key, value)) => {
                    (Some(key.clone()), Some(value.clone()))
                }
                Some(option_parser::OptionParserError::UnknownOption(key)) => {
                    (Some(key.clone()), None)
                }
                _ => (None, None),
            };
            raise(
                py,
                &reg.parse_error,
                error.to_string(),
                error.kind(),
                &[
                    ("option", error.option().map(str::to_owned)),
                    ("key", key),
                    ("value", value),
                ],
            )
        }
    }
}

fn validation_error(py: Python<'_>, error: ValidationError) -> PyErr {
    config_error(py, Error::Validation(error))
}

fn json_error(py: Python<'_>, error: JsonError) -> PyErr {
    match registry() {
        Ok(reg) => raise(
            py,
            &reg.config_error,
            error.to_string(),
            "InvalidJson",
            &[("path", Some(error.path.clone()))],
        ),
        Err(_) => PyValueError::new_err(error.to_string()),
    }
}

fn unrepresentable_error(py: Python<'_>, error: UnrepresentableError) -> PyErr {
    match registry() {
        Ok(reg) => raise(
            py,
            &reg.config_error,
            error.to_string(),
            "Unrepresentable",
            &[
                ("option", Some(error.option.to_owned())),
                ("key", Some(error.field.clone())),
            ],
        ),
        Err(_) => PyValueError::new_err(error.to_string()),
    }
}

fn to_py<'py, T: Serialize>(py: Python<'py>, value: &T) -> PyResult<Bound<'py, PyAny>> {
    let reg = registry()?;
    let classes = reg.classes.bind(py);
    let object_new = reg.object_new.bind(py);
    ToPython::new(py, classes, object_new)
        .convert(value)
        .map_err(|e| PyRuntimeError::new_err(e.0))
}

/// Runs `$body` with `$T` bound to the config type named `$kind` (option types only).
macro_rules! with_option_type {
    ($kind:expr, $T:ident => $body:expr) => {
        match $kind {
            "CpusConfig" => { type $T = CpusConfig; $body }
            "PlatformConfig" => { type $T = PlatformConfig; $body }
            "MemoryConfig" => { type $T = MemoryConfig; $body }
            "MemoryZoneConfig" => { type $T = MemoryZoneConfig; $body }
            "RateLimiterGroupConfig" => { type $T = RateLimiterGroupConfig; $body }
            "DiskConfig" => { type $T = DiskConfig; $body }
            "NetConfig" => { type $T = NetConfig; $body }
            "RngConfig" => { type $T = RngConfig; $body }
            "BalloonConfig" => { type $T = BalloonConfig; $body }
            "FsConfig" => { type $T = FsConfig; $body }
            "PmemConfig" => { type $T = PmemConfig; $body }
            "ConsoleConfig" => { type $T = ConsoleConfig; $body }
            "DeviceConfig" => { type $T = DeviceConfig; $body }
            "UserDeviceConfig" => { type $T = UserDeviceConfig; $body }
            "VdpaConfig" => { type $T = VdpaConfig; $body }
            "VsockConfig" => { type $T = VsockConfig; $body }
            "SgxEpcConfig" => { type $T = SgxEpcConfig; $body }
            "NumaConfig" => { type $T = NumaConfig; $body }
            "RestoreConfig" => { type $T = RestoreConfig; $body }
            "TpmConfig" => { type $T = TpmConfig; $body }
            other => Err(PyValueError::new_err(format!("{other} has no option string"))),
        }
    };
}

/// As `with_option_type!`, for every config type.
macro_rules! with_any_type {
    ($kind:expr, $T:ident => $body:expr) => {
        match $kind {
            "VmConfig" => { type $T = VmConfig; $body }
            "CpuTopology" => { type $T = CpuTopology; $body }
            "CpuAffinity" => { type $T = CpuAffinity; $body }
            "CpuFeatures" => { type $T = CpuFeatures; $body }
            "RateLimiterConfig" => { type $T = RateLimiterConfig; $body }
            "TokenBucketConfig" => { type $T = TokenBucketConfig; $body }
            "NumaDistance" => { type $T = NumaDistance; $body }
            "PayloadConfig" => { type $T = PayloadConfig; $body }
            other => with_option_type!(other, $T => $body),
        }
    };
}

/// Parses one option string into its config object.
#[pyfunction]
#[pyo3(signature = (kind, text, zones=None))]
fn parse_option<'py>(
    py: Python<'py>,
    kind: &str,
    text: &str,
    zones: Option<Vec<String>>,
) -> PyResult<Bound<'py, PyAny>> {
    if kind == "MemoryConfig" {
        let config = MemoryConfig::parse(text, zones.as_deref()).map_err(|e| config_error(py, e))?;
        return to_py(py, &config);
    }
    with_option_type!(kind, T => {
        let config = <T as OptionString>::parse_option(text).map_err(|e| config_error(py, e))?;
        to_py(py, &config)
    })
}

/// Reads a JSON document as the config type named `kind`.
#[pyfunction]
fn from_json<'py>(py: Python<'py>, kind: &str, text: &str) -> PyResult<Bound<'py, PyAny>> {
    with_any_type!(kind, T => {
        let config: T = parse_json(text).map_err(|e| json_error(py, e))?;
        to_py(py, &config)
    })
}

/// Renders the JSON document of an option type as an option string.
#[pyfunction]
fn to_option_string(py: Python<'_>, kind: &str, text: &str) -> PyResult<String> {
    with_option_type!(kind, T => {
        let config: T = parse_json(text).map_err(|e| json_error(py, e))?;
        render::to_option_string(&config).map_err(|e| unrepresentable_error(py, e))
    })
}

fn ids_list<'py>(
    py: Python<'py>,
    ids: std::collections::BTreeSet<String>,
) -> PyResult<Bound<'py, PyList>> {
    PyList::new(py, ids)
}

/// Validates a VmConfig JSON document: (normalised config, ids).
#[pyfunction]
fn validate_json<'py>(py: Python<'py>, text: &str) -> PyResult<Bound<'py, PyTuple>> {
    let mut config: VmConfig = parse_json(text).map_err(|e| json_error(py, e))?;
    let ids = config.validate().map_err(|e| validation_error(py, e))?;
    PyTuple::new(py, [to_py(py, &config)?, ids_list(py, ids)?.into_any()])
}

fn take_string(params: &Bound<'_, PyDict>, key: &str) -> PyResult<Option<String>> {
    match params.get_item(key)? {
        Some(value) if !value.is_none() => Ok(Some(value.extract()?)),
        _ => Ok(None),
    }
}

fn take_list(params: &Bound<'_, PyDict>, key: &str) -> PyResult<Option<Vec<String>>> {
    match params.get_item(key)? {
        Some(value) if !value.is_none() => Ok(Some(value.extract()?)),
        _ => Ok(None),
    }
}

fn take_flag(params: &Bound<'_, PyDict>, key: &str) -> PyResult<bool> {
    match params.get_item(key)? {
        Some(value) if !value.is_none() => value.extract(),
        _ => Ok(false),
    }
}

fn vm_params(params: &Bound<'_, PyDict>) -> PyResult<VmParams> {
    let known = [
        "cpus", "memory", "memory_zones", "firmware", "kernel", "initramfs", "cmdline",
        "rate_limit_groups", "disks", "net", "rng", "balloon", "fs", "pmem", "serial", "console",
        "devices", "user_devices", "vdpa", "vsock", "pvpanic", "numa", "watchdog", "platform",
        "sgx_epc", "tpm",
    ];
    for key in params.keys() {
        let key: String = key.extract()?;
        if !known.contains(&key.as_str()) {
            return Err(PyValueError::new_err(format!("unknown VM parameter {key:?}")));
        }
    }
    let defaults = VmParams::default();
    Ok(VmParams {
        cpus: take_string(params, "cpus")?.unwrap_or(defaults.cpus),
        memory: take_string(params, "memory")?.unwrap_or(defaults.memory),
        memory_zones: take_list(params, "memory_zones")?,
        firmware: take_string(params, "firmware")?,
        kernel: take_string(params, "kernel")?,
        initramfs: take_string(params, "initramfs")?,
        cmdline: take_string(params, "cmdline")?,
        rate_limit_groups: take_list(params, "rate_limit_groups")?,
        disks: take_list(params, "disks")?,
        net: take_list(params, "net")?,
        rng: take_string(params, "rng")?.unwrap_or(defaults.rng),
        balloon: take_string(params, "balloon")?,
        fs: take_list(params, "fs")?,
        pmem: take_list(params, "pmem")?,
        serial: take_string(params, "serial")?.unwrap_or(defaults.serial),
        console: take_string(params, "console")?.unwrap_or(defaults.console),
        devices: take_list(params, "devices")?,
        user_devices: take_list(params, "user_devices")?,
        vdpa: take_list(params, "vdpa")?,
        vsock: take_string(params, "vsock")?,
        pvpanic: take_flag(params, "pvpanic")?,
        numa: take_list(params, "numa")?,
        watchdog: take_flag(params, "watchdog")?,
        platform: take_string(params, "platform")?,
        sgx_epc: take_list(params, "sgx_epc")?,
        tpm: take_string(params, "tpm")?,
    })
}

/// Parses a command line's option strings in v37's order and, when asked,
/// validates: (config, ids or None).
#[pyfunction]
#[pyo3(signature = (params, validate=true))]
fn parse_vm<'py>(
    py: Python<'py>,
    params: Bound<'py, PyDict>,
    validate: bool,
) -> PyResult<Bound<'py, PyTuple>> {
    let params = vm_params(&params)?;
    let mut config = VmConfig::parse(&params).map_err(|e| config_error(py, e))?;
    let ids = if validate {
        let ids = config.validate().map_err(|e| validation_error(py, e))?;
        ids_list(py, ids)?.into_any()
    } else {
        py.None().into_bound(py)
    };
    PyTuple::new(py, [to_py(py, &config)?, ids])
}

/// A random locally administered MAC address (v37's default for `--net`).
#[pyfunction]
fn random_mac() -> String {
    MacAddr::random().to_string()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(register, m)?)?;
    m.add_function(wrap_pyfunction!(parse_option, m)?)?;
    m.add_function(wrap_pyfunction!(from_json, m)?)?;
    m.add_function(wrap_pyfunction!(to_option_string, m)?)?;
    m.add_function(wrap_pyfunction!(validate_json, m)?)?;
    m.add_function(wrap_pyfunction!(parse_vm, m)?)?;
    m.add_function(wrap_pyfunction!(random_mac, m)?)?;
    Ok(())
}
