//! `vmkit._native`: thin bindings over the Rust crates. No policy lives here:
//! each function converts arguments, calls the crate, and converts results and
//! errors (into the Python exception classes that `vmkit` registers).

use std::sync::OnceLock;

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple, PyType};
use serde::de::DeserializeOwned;
use serde::Serialize;

use vmkit_config::api::{ApiBody, ApiBodyError};
use vmkit_config::json::from_json_bytes as parse_json;
use vmkit_config::option_parser;
use vmkit_config::values::MacAddr;
use vmkit_config::{
    render, BalloonConfig, ConsoleConfig, CpuAffinity, CpuFeatures, CpuTopology, CpusConfig,
    DeviceConfig, DiskConfig, Error, FsConfig, JsonError, MemoryConfig, MemoryZoneConfig,
    NetConfig, NumaConfig, NumaDistance, OptionString, PayloadConfig, PlatformConfig, PmemConfig,
    RateLimiterConfig, RateLimiterGroupConfig, RestoreConfig, RngConfig, SgxEpcConfig,
    TokenBucketConfig, TpmConfig, UnrepresentableError, UserDeviceConfig, ValidationError,
    VdpaConfig, VmConfig, VmParams, VsockConfig,
};

mod child;
mod from_python;
mod logging;
mod to_python;
mod vm;
use from_python::FromPython;
use to_python::ToPython;

pub(crate) struct Registry {
    pub(crate) classes: Py<PyDict>,
    /// The base class of the config classes (their instances read as structs).
    config_base: Py<PyType>,
    config_error: Py<PyType>,
    parse_error: Py<PyType>,
    validation_error: Py<PyType>,
}

static REGISTRY: OnceLock<Registry> = OnceLock::new();

pub(crate) fn registry() -> PyResult<&'static Registry> {
    REGISTRY
        .get()
        .ok_or_else(|| PyRuntimeError::new_err("vmkit._native.register() was not called"))
}

/// Gives the extension the Python classes it builds and raises.
#[pyfunction]
fn register(
    classes: Bound<'_, PyDict>,
    config_base: Bound<'_, PyType>,
    config_error: Bound<'_, PyType>,
    parse_error: Bound<'_, PyType>,
    validation_error: Bound<'_, PyType>,
) -> PyResult<()> {
    // A second import of the package (e.g. importlib.reload) keeps the first registry.
    let _ = REGISTRY.set(Registry {
        classes: classes.unbind(),
        config_base: config_base.unbind(),
        config_error: config_error.unbind(),
        parse_error: parse_error.unbind(),
        validation_error: validation_error.unbind(),
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

pub(crate) fn validation_error(py: Python<'_>, error: ValidationError) -> PyErr {
    config_error(py, Error::Validation(error))
}

fn json_error(py: Python<'_>, error: JsonError, positions: bool) -> PyErr {
    let message = if positions {
        error.to_string()
    } else {
        error.without_position()
    };
    match registry() {
        Ok(reg) => raise(
            py,
            &reg.config_error,
            message,
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

pub(crate) fn to_py<'py, T: Serialize>(py: Python<'py>, value: &T) -> PyResult<Bound<'py, PyAny>> {
    let reg = registry()?;
    let classes = reg.classes.bind(py);
    ToPython::new(py, classes)
        .convert(value)
        .map_err(|e| PyRuntimeError::new_err(e.0))
}

/// Reads a Python value (a config object, or dicts, lists and scalars in the
/// v37 JSON shape) as `T`; errors are serde_json's, with the field path.
pub(crate) fn from_py<T: DeserializeOwned>(
    py: Python<'_>,
    value: &Bound<'_, PyAny>,
) -> PyResult<T> {
    let reg = registry()?;
    let base = reg.config_base.bind(py).as_any();
    serde_path_to_error::deserialize(FromPython::new(value, base)).map_err(|e| {
        let error = JsonError {
            path: e.path().to_string(),
            message: e.into_inner().0,
            line: 0,
            column: 0,
        };
        json_error(py, error, false)
    })
}

/// Runs `$body` with `$T` bound to the config type named `$kind` (option types only).
macro_rules! with_option_type {
    ($kind:expr, $T:ident => $body:expr) => {
        match $kind {
            "CpusConfig" => {
                type $T = CpusConfig;
                $body
            }
            "PlatformConfig" => {
                type $T = PlatformConfig;
                $body
            }
            "MemoryConfig" => {
                type $T = MemoryConfig;
                $body
            }
            "MemoryZoneConfig" => {
                type $T = MemoryZoneConfig;
                $body
            }
            "RateLimiterGroupConfig" => {
                type $T = RateLimiterGroupConfig;
                $body
            }
            "DiskConfig" => {
                type $T = DiskConfig;
                $body
            }
            "NetConfig" => {
                type $T = NetConfig;
                $body
            }
            "RngConfig" => {
                type $T = RngConfig;
                $body
            }
            "BalloonConfig" => {
                type $T = BalloonConfig;
                $body
            }
            "FsConfig" => {
                type $T = FsConfig;
                $body
            }
            "PmemConfig" => {
                type $T = PmemConfig;
                $body
            }
            "ConsoleConfig" => {
                type $T = ConsoleConfig;
                $body
            }
            "DeviceConfig" => {
                type $T = DeviceConfig;
                $body
            }
            "UserDeviceConfig" => {
                type $T = UserDeviceConfig;
                $body
            }
            "VdpaConfig" => {
                type $T = VdpaConfig;
                $body
            }
            "VsockConfig" => {
                type $T = VsockConfig;
                $body
            }
            "SgxEpcConfig" => {
                type $T = SgxEpcConfig;
                $body
            }
            "NumaConfig" => {
                type $T = NumaConfig;
                $body
            }
            "RestoreConfig" => {
                type $T = RestoreConfig;
                $body
            }
            "TpmConfig" => {
                type $T = TpmConfig;
                $body
            }
            other => Err(PyValueError::new_err(format!(
                "{other} has no option string"
            ))),
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
#[pyo3(signature = (cls, text, zones=None))]
fn parse_option<'py>(
    py: Python<'py>,
    cls: &Bound<'py, PyType>,
    text: &str,
    zones: Option<Vec<String>>,
) -> PyResult<Bound<'py, PyAny>> {
    let kind = cls.name()?;
    let kind = kind.to_str()?;
    if kind == "MemoryConfig" {
        let config =
            MemoryConfig::parse(text, zones.as_deref()).map_err(|e| config_error(py, e))?;
        return to_py(py, &config);
    }
    with_option_type!(kind, T => {
        let config = <T as OptionString>::parse_option(text).map_err(|e| config_error(py, e))?;
        to_py(py, &config)
    })
}

/// Reads a JSON document (str, or bytes that may not be UTF-8) as the config
/// class `cls`; `positions`: whether errors cite line and column.
#[pyfunction]
#[pyo3(signature = (cls, text, positions=true))]
fn from_json<'py>(
    py: Python<'py>,
    cls: &Bound<'py, PyType>,
    text: &Bound<'py, PyAny>,
    positions: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let text = match text.cast::<PyBytes>() {
        Ok(bytes) => bytes.as_bytes(),
        Err(_) => text.cast::<PyString>()?.to_str()?.as_bytes(),
    };
    let kind = cls.name()?;
    with_any_type!(kind.to_str()?, T => {
        let config: T = parse_json(text).map_err(|e| json_error(py, e, positions))?;
        to_py(py, &config)
    })
}

/// Reads a Python value (a dict in the JSON shape, or a config object) as the
/// config class `cls`, returning a new config object.
#[pyfunction]
fn from_object<'py>(
    py: Python<'py>,
    cls: &Bound<'py, PyType>,
    value: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    let kind = cls.name()?;
    with_any_type!(kind.to_str()?, T => {
        let config: T = from_py(py, value)?;
        to_py(py, &config)
    })
}

/// Renders a config object of an option type as an option string.
#[pyfunction]
fn to_option_string(py: Python<'_>, config: &Bound<'_, PyAny>) -> PyResult<String> {
    let kind = config.get_type().name()?;
    with_option_type!(kind.to_str()?, T => {
        let config: T = from_py(py, config)?;
        render::to_option_string(&config).map_err(|e| unrepresentable_error(py, e))
    })
}

/// Validates a VmConfig object: (the top-level iommu v37 derives, ids).
#[pyfunction]
fn validate(py: Python<'_>, config: &Bound<'_, PyAny>) -> PyResult<(bool, Vec<String>)> {
    let config: VmConfig = from_py(py, config)?;
    let validated = config.validated().map_err(|e| validation_error(py, e))?;
    Ok((validated.iommu(), validated.ids().iter().cloned().collect()))
}

/// Reads `--flag` values out of the parameter dict, counting what it used.
struct ParamReader<'a, 'py> {
    params: &'a Bound<'py, PyDict>,
    used: usize,
}

impl<'py> ParamReader<'_, 'py> {
    fn get(&mut self, key: &Bound<'py, PyString>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let value = self.params.get_item(key)?;
        if value.is_some() {
            self.used += 1;
        }
        Ok(value.filter(|v| !v.is_none()))
    }

    fn string(&mut self, key: &Bound<'py, PyString>) -> PyResult<Option<String>> {
        self.get(key)?.map(|v| v.extract()).transpose()
    }

    fn list(&mut self, key: &Bound<'py, PyString>) -> PyResult<Option<Vec<String>>> {
        self.get(key)?.map(|v| v.extract()).transpose()
    }

    fn flag(&mut self, key: &Bound<'py, PyString>) -> PyResult<bool> {
        Ok(self
            .get(key)?
            .map(|v| v.extract())
            .transpose()?
            .unwrap_or(false))
    }
}

const VM_PARAM_NAMES: [&str; 26] = [
    "cpus",
    "memory",
    "memory_zones",
    "firmware",
    "kernel",
    "initramfs",
    "cmdline",
    "rate_limit_groups",
    "disks",
    "net",
    "rng",
    "balloon",
    "fs",
    "pmem",
    "serial",
    "console",
    "devices",
    "user_devices",
    "vdpa",
    "vsock",
    "pvpanic",
    "numa",
    "watchdog",
    "platform",
    "sgx_epc",
    "tpm",
];

fn vm_params(py: Python<'_>, params: &Bound<'_, PyDict>) -> PyResult<VmParams> {
    use pyo3::intern;
    let mut r = ParamReader { params, used: 0 };
    let defaults = VmParams::default();
    let result = VmParams {
        cpus: r.string(intern!(py, "cpus"))?.unwrap_or(defaults.cpus),
        memory: r.string(intern!(py, "memory"))?.unwrap_or(defaults.memory),
        memory_zones: r.list(intern!(py, "memory_zones"))?,
        firmware: r.string(intern!(py, "firmware"))?,
        kernel: r.string(intern!(py, "kernel"))?,
        initramfs: r.string(intern!(py, "initramfs"))?,
        cmdline: r.string(intern!(py, "cmdline"))?,
        rate_limit_groups: r.list(intern!(py, "rate_limit_groups"))?,
        disks: r.list(intern!(py, "disks"))?,
        net: r.list(intern!(py, "net"))?,
        rng: r.string(intern!(py, "rng"))?.unwrap_or(defaults.rng),
        balloon: r.string(intern!(py, "balloon"))?,
        fs: r.list(intern!(py, "fs"))?,
        pmem: r.list(intern!(py, "pmem"))?,
        serial: r.string(intern!(py, "serial"))?.unwrap_or(defaults.serial),
        console: r
            .string(intern!(py, "console"))?
            .unwrap_or(defaults.console),
        devices: r.list(intern!(py, "devices"))?,
        user_devices: r.list(intern!(py, "user_devices"))?,
        vdpa: r.list(intern!(py, "vdpa"))?,
        vsock: r.string(intern!(py, "vsock"))?,
        pvpanic: r.flag(intern!(py, "pvpanic"))?,
        numa: r.list(intern!(py, "numa"))?,
        watchdog: r.flag(intern!(py, "watchdog"))?,
        platform: r.string(intern!(py, "platform"))?,
        sgx_epc: r.list(intern!(py, "sgx_epc"))?,
        tpm: r.string(intern!(py, "tpm"))?,
    };
    if r.used != params.len() {
        for key in params.keys() {
            let key: String = key.extract()?;
            if !VM_PARAM_NAMES.contains(&key.as_str()) {
                return Err(PyValueError::new_err(format!(
                    "unknown VM parameter {key:?}"
                )));
            }
        }
    }
    Ok(result)
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
    let params = vm_params(py, &params)?;
    let config = VmConfig::parse(&params).map_err(|e| config_error(py, e))?;
    if !validate {
        return PyTuple::new(py, [to_py(py, &config)?, py.None().into_bound(py)]);
    }
    let validated = config.validated().map_err(|e| validation_error(py, e))?;
    let ids = PyList::new(py, validated.ids())?.into_any();
    PyTuple::new(py, [to_py(py, validated.config())?, ids])
}

/// Reads an API action's request body as v37 reads the struct `name`
/// (`VmResizeData`, ...): a dict of its fields, or ConfigError (kind
/// `InvalidJson`) whose text is serde_json's, with its position.
#[pyfunction]
fn parse_api_body<'py>(py: Python<'py>, name: &str, body: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    // Up to a MiB of JSON: other API connections may run meanwhile.
    let parsed = py.detach(|| ApiBody::parse(name, body));
    let parsed = parsed.map_err(|e| match e {
        ApiBodyError::Json(error) => json_error(py, error, true),
        unknown @ ApiBodyError::UnknownStruct(_) => PyValueError::new_err(unknown.to_string()),
    })?;
    // Plain dicts: no config class stands for these structs.
    ToPython::new(py, &PyDict::new(py))
        .convert(&parsed)
        .map_err(|e| PyRuntimeError::new_err(e.0))
}

/// A random locally administered MAC address (v37's default for `--net`).
#[pyfunction]
fn random_mac() -> String {
    MacAddr::random().to_string()
}

/// (cgroup version, directory) of the cgroup holding the CPU share of the
/// process whose `/proc/<pid>/cgroup` is `cgroups`, in the hierarchies
/// `mountinfo` mounts (the v1 cpu controller's first); None if neither is.
#[pyfunction]
fn cpu_cgroup_dir(cgroups: &str, mountinfo: &str) -> Option<(u8, String)> {
    vmkit_vmm::cgroup::cpu_cgroup_dir(cgroups, mountinfo)
        .map(|(version, dir)| (version, dir.to_string_lossy().into_owned()))
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(register, m)?)?;
    m.add_function(wrap_pyfunction!(parse_option, m)?)?;
    m.add_function(wrap_pyfunction!(from_json, m)?)?;
    m.add_function(wrap_pyfunction!(to_option_string, m)?)?;
    m.add_function(wrap_pyfunction!(validate, m)?)?;
    m.add_function(wrap_pyfunction!(from_object, m)?)?;
    m.add_function(wrap_pyfunction!(parse_vm, m)?)?;
    m.add_function(wrap_pyfunction!(random_mac, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_cgroup_dir, m)?)?;
    m.add_function(wrap_pyfunction!(parse_api_body, m)?)?;
    m.add_function(wrap_pyfunction!(vm::register_vm_error, m)?)?;
    m.add_function(wrap_pyfunction!(vm::test_guest_image, m)?)?;
    m.add_function(wrap_pyfunction!(vm::confine_process, m)?)?;
    m.add_function(wrap_pyfunction!(vm::fork_sibling, m)?)?;
    m.add_function(wrap_pyfunction!(child::fork_vm_forker, m)?)?;
    m.add_function(wrap_pyfunction!(child::vm_forker_main, m)?)?;
    m.add_function(wrap_pyfunction!(logging::install_logging, m)?)?;
    m.add_function(wrap_pyfunction!(logging::set_log_level, m)?)?;
    m.add_function(wrap_pyfunction!(logging::flush_logs, m)?)?;
    m.add_function(wrap_pyfunction!(logging::stop_logging, m)?)?;
    m.add_function(wrap_pyfunction!(logging::test_hook_log, m)?)?;
    m.add_class::<vm::VmHandle>()?;
    Ok(())
}
