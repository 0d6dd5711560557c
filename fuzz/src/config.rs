//! The user-facing parsers of vmkit-config: option strings, the whole
//! command line, JSON configs and the API's action bodies.

use std::fmt::Debug;

use vmkit_config::api::ApiBody;
use vmkit_config::json::{from_json, from_json_bytes};
use vmkit_config::*;

use crate::input::Input;

/// Parses `text` as option `T`; what parses must render to a string that
/// parses back to the same config (render's promise), or be refused
/// by render with an error.
fn option_round_trip<T: OptionString + Debug>(text: &str) {
    let Ok(config) = T::parse_option(text) else {
        return;
    };
    if let Ok(rendered) = to_option_string(&config) {
        let again = T::parse_option(&rendered)
            .unwrap_or_else(|e| panic!("{} {text:?} renders as {rendered:?}: {e}", T::FLAG));
        assert_eq!(
            again,
            config,
            "{} {text:?} rendered as {rendered:?}",
            T::FLAG
        );
    }
}

/// The option kinds, by the input's first byte.
const OPTIONS: &[fn(&str)] = &[
    option_round_trip::<CpusConfig>,
    option_round_trip::<MemoryConfig>,
    option_round_trip::<MemoryZoneConfig>,
    option_round_trip::<PlatformConfig>,
    option_round_trip::<RateLimiterGroupConfig>,
    option_round_trip::<DiskConfig>,
    option_round_trip::<NetConfig>,
    option_round_trip::<RngConfig>,
    option_round_trip::<BalloonConfig>,
    option_round_trip::<FsConfig>,
    option_round_trip::<PmemConfig>,
    option_round_trip::<ConsoleConfig>,
    option_round_trip::<DeviceConfig>,
    option_round_trip::<UserDeviceConfig>,
    option_round_trip::<VdpaConfig>,
    option_round_trip::<VsockConfig>,
    option_round_trip::<SgxEpcConfig>,
    option_round_trip::<NumaConfig>,
    option_round_trip::<RestoreConfig>,
    option_round_trip::<TpmConfig>,
];

/// One option string: the first byte picks the option, the rest is its value.
pub fn option_string(data: &[u8]) {
    let Some((&kind, text)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    OPTIONS[usize::from(kind) % OPTIONS.len()](text);
}

/// Which field of `VmParams` a command-line flag fills.
fn set_flag(params: &mut VmParams, flag: &str, values: &[String]) {
    let one = || values.first().cloned().unwrap_or_default();
    let list = || Some(values.to_vec());
    match flag {
        "--cpus" => params.cpus = one(),
        "--memory" => params.memory = one(),
        "--memory-zone" => params.memory_zones = list(),
        "--firmware" => params.firmware = Some(one()),
        "--kernel" => params.kernel = Some(one()),
        "--initramfs" => params.initramfs = Some(one()),
        "--cmdline" => params.cmdline = Some(one()),
        "--rate-limit-group" => params.rate_limit_groups = list(),
        "--disk" => params.disks = list(),
        "--net" => params.net = list(),
        "--rng" => params.rng = one(),
        "--balloon" => params.balloon = Some(one()),
        "--fs" => params.fs = list(),
        "--pmem" => params.pmem = list(),
        "--serial" => params.serial = one(),
        "--console" => params.console = one(),
        "--device" => params.devices = list(),
        "--user-device" => params.user_devices = list(),
        "--vdpa" => params.vdpa = list(),
        "--vsock" => params.vsock = Some(one()),
        "--pvpanic" => params.pvpanic = true,
        "--numa" => params.numa = list(),
        "--watchdog" => params.watchdog = true,
        "--platform" => params.platform = Some(one()),
        "--sgx-epc" => params.sgx_epc = list(),
        "--tpm" => params.tpm = Some(one()),
        _ => {}
    }
}

/// Validation must accept its own output again, unchanged, after a trip
/// through JSON (what `Vm.spawn` and the API's `vm.create` do).
fn check_validated(config: &ValidatedConfig) {
    let json = serde_json::to_string(config.config()).expect("a config serialises");
    let again: VmConfig =
        from_json(&json).unwrap_or_else(|e| panic!("re-reading {json}: {}", e.message));
    let revalidated = again
        .clone()
        .validated()
        .unwrap_or_else(|e| panic!("{json} validated once, then not: {e}"));
    assert_eq!(revalidated.config(), config.config(), "{json}");
}

/// A whole command line as the `vmkit` command hands it to Rust: arguments
/// separated by NUL bytes, each `--flag` taking the arguments after it.
pub fn cli(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut params = VmParams::default();
    let mut flag: Option<&str> = None;
    let mut values: Vec<String> = Vec::new();
    for arg in text.split('\0') {
        if arg.starts_with("--") {
            if let Some(flag) = flag {
                set_flag(&mut params, flag, &values);
            }
            flag = Some(arg);
            values.clear();
        } else {
            values.push(arg.to_owned());
        }
    }
    if let Some(flag) = flag {
        set_flag(&mut params, flag, &values);
    }
    let Ok(config) = VmConfig::parse(&params) else {
        return;
    };
    if let Ok(validated) = config.validated() {
        check_validated(&validated);
    }
}

/// A JSON config (`VmConfig.from_json`, the API's `vm.create` body).
pub fn json_config(data: &[u8]) {
    let Ok(config) = from_json_bytes::<VmConfig>(data) else {
        return;
    };
    if let Ok(validated) = config.validated() {
        check_validated(&validated);
    }
}

/// An API action body: the first byte picks the struct, the rest is the body.
pub fn api_body(data: &[u8]) {
    let mut input = Input::new(data);
    let name = ApiBody::STRUCTS[usize::from(input.u8()) % ApiBody::STRUCTS.len()];
    let body = input.rest();
    if let Ok(parsed) = ApiBody::parse(name, body) {
        // What was read serialises and reads back the same.
        let json = serde_json::to_vec(&parsed).expect("a body serialises");
        let again = ApiBody::parse(name, &json)
            .unwrap_or_else(|e| panic!("{name} {:?} re-read: {e}", String::from_utf8_lossy(&json)));
        assert_eq!(again, parsed);
    }
}
