//! Config structs back to option strings.
//!
//! Rendering works on the JSON form: each non-null field that differs from the
//! option's default becomes `key=value`. The result is parsed back and compared,
//! so a string is only ever returned when it reproduces the object exactly;
//! otherwise the caller learns which field has no option-string spelling.

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::{Error, UnrepresentableError};
use crate::types::*;

/// One option type: its flag and how its JSON fields map to option keys.
pub trait OptionString: Serialize + DeserializeOwned + PartialEq + Sized {
    const FLAG: &'static str;
    fn parse_option(input: &str) -> Result<Self, Error>;
    /// The option key for a JSON field (`None`: the field has no key).
    fn key_for(field: &str) -> Option<&'static str>;
    /// A rendering of its own, for options whose keys are not field-per-key.
    fn render_whole(&self) -> Option<RenderResult<String>> {
        None
    }
}

macro_rules! option_string {
    ($ty:ty, $flag:literal, { $($field:literal => $key:literal),* $(,)? }) => {
        impl OptionString for $ty {
            const FLAG: &'static str = $flag;
            fn parse_option(input: &str) -> Result<Self, Error> {
                <$ty>::parse(input)
            }
            fn key_for(field: &str) -> Option<&'static str> {
                match field {
                    $($field => Some($key),)*
                    _ => None,
                }
            }
        }
    };
}

option_string!(CpusConfig, "--cpus", {
    "boot_vcpus" => "boot", "max_vcpus" => "max", "topology" => "topology",
    "kvm_hyperv" => "kvm_hyperv", "max_phys_bits" => "max_phys_bits",
    "affinity" => "affinity", "features" => "features",
});
option_string!(PlatformConfig, "--platform", {
    "num_pci_segments" => "num_pci_segments", "iommu_segments" => "iommu_segments",
    "serial_number" => "serial_number", "uuid" => "uuid", "oem_strings" => "oem_strings",
});
option_string!(MemoryZoneConfig, "--memory-zone", {
    "id" => "id", "size" => "size", "file" => "file", "shared" => "shared",
    "hugepages" => "hugepages", "hugepage_size" => "hugepage_size",
    "host_numa_node" => "host_numa_node", "hotplug_size" => "hotplug_size",
    "hotplugged_size" => "hotplugged_size", "prefault" => "prefault",
});
option_string!(RateLimiterGroupConfig, "--rate-limit-group", {
    "id" => "id", "rate_limiter_config" => "",
});
option_string!(DiskConfig, "--disk", {
    "path" => "path", "readonly" => "readonly", "direct" => "direct", "iommu" => "iommu",
    "num_queues" => "num_queues", "queue_size" => "queue_size", "vhost_user" => "vhost_user",
    "vhost_socket" => "socket", "rate_limit_group" => "rate_limit_group",
    "rate_limiter_config" => "", "id" => "id", "disable_io_uring" => "_disable_io_uring",
    "disable_aio" => "_disable_aio", "pci_segment" => "pci_segment", "serial" => "serial",
});
option_string!(NetConfig, "--net", {
    "tap" => "tap", "ip" => "ip", "mask" => "mask", "mac" => "mac", "host_mac" => "host_mac",
    "mtu" => "mtu", "iommu" => "iommu", "num_queues" => "num_queues",
    "queue_size" => "queue_size", "vhost_user" => "vhost_user", "vhost_socket" => "socket",
    "vhost_mode" => "vhost_mode", "id" => "id", "fds" => "fd", "rate_limiter_config" => "",
    "pci_segment" => "pci_segment", "offload_tso" => "offload_tso",
    "offload_ufo" => "offload_ufo", "offload_csum" => "offload_csum",
});
option_string!(RngConfig, "--rng", { "src" => "src", "iommu" => "iommu" });
option_string!(BalloonConfig, "--balloon", {
    "size" => "size", "deflate_on_oom" => "deflate_on_oom",
    "free_page_reporting" => "free_page_reporting",
});
option_string!(FsConfig, "--fs", {
    "tag" => "tag", "socket" => "socket", "num_queues" => "num_queues",
    "queue_size" => "queue_size", "id" => "id", "pci_segment" => "pci_segment",
});
option_string!(PmemConfig, "--pmem", {
    "file" => "file", "size" => "size", "iommu" => "iommu",
    "discard_writes" => "discard_writes", "id" => "id", "pci_segment" => "pci_segment",
});
option_string!(DeviceConfig, "--device", {
    "path" => "path", "iommu" => "iommu", "id" => "id", "pci_segment" => "pci_segment",
});
option_string!(UserDeviceConfig, "--user-device", {
    "socket" => "socket", "id" => "id", "pci_segment" => "pci_segment",
});
option_string!(VdpaConfig, "--vdpa", {
    "path" => "path", "num_queues" => "num_queues", "iommu" => "iommu", "id" => "id",
    "pci_segment" => "pci_segment",
});
option_string!(VsockConfig, "--vsock", {
    "cid" => "cid", "socket" => "socket", "iommu" => "iommu", "id" => "id",
    "pci_segment" => "pci_segment",
});
option_string!(SgxEpcConfig, "--sgx-epc", { "id" => "id", "size" => "size", "prefault" => "prefault" });
option_string!(NumaConfig, "--numa", {
    "guest_numa_id" => "guest_numa_id", "cpus" => "cpus", "distances" => "distances",
    "memory_zones" => "memory_zones", "sgx_epc_sections" => "sgx_epc_sections",
    "pci_segments" => "pci_segments",
});
option_string!(RestoreConfig, "--restore", { "source_url" => "source_url", "prefault" => "prefault" });
option_string!(TpmConfig, "--tpm", { "socket" => "socket" });

impl OptionString for MemoryConfig {
    const FLAG: &'static str = "--memory";
    fn parse_option(input: &str) -> Result<Self, Error> {
        MemoryConfig::parse(input, None)
    }
    fn key_for(field: &str) -> Option<&'static str> {
        Some(match field {
            "size" => "size",
            "mergeable" => "mergeable",
            "hotplug_method" => "hotplug_method",
            "hotplug_size" => "hotplug_size",
            "hotplugged_size" => "hotplugged_size",
            "shared" => "shared",
            "hugepages" => "hugepages",
            "hugepage_size" => "hugepage_size",
            "prefault" => "prefault",
            "thp" => "thp",
            _ => return None,
        })
    }
}

impl OptionString for ConsoleConfig {
    const FLAG: &'static str = "--console";
    fn parse_option(input: &str) -> Result<Self, Error> {
        ConsoleConfig::parse(input)
    }
    fn key_for(_field: &str) -> Option<&'static str> {
        None
    }
    fn render_whole(&self) -> Option<RenderResult<String>> {
        Some(render_console(self))
    }
}

type RenderResult<T> = Result<T, UnrepresentableError>;

struct Renderer {
    option: &'static str,
    items: Vec<String>,
}

impl Renderer {
    fn fail<T>(&self, field: &str, reason: &str) -> RenderResult<T> {
        Err(UnrepresentableError {
            option: self.option,
            field: field.to_owned(),
            reason: reason.to_owned(),
        })
    }

    /// A free-text value: it must survive quote removal, bracket counting and trimming.
    fn text(&self, field: &str, value: &str) -> RenderResult<String> {
        if value.is_empty() {
            return self.fail(field, "is empty (an empty value reads as absent)");
        }
        if value.contains('"') {
            return self.fail(field, "contains '\"' (option strings have no escapes)");
        }
        if value.trim() != value {
            return self.fail(field, "has leading or trailing whitespace");
        }
        let mut depth = 0i64;
        for c in value.chars() {
            match c {
                '[' => depth += 1,
                ']' => depth -= 1,
                _ => {}
            }
            if depth < 0 {
                break;
            }
        }
        if depth != 0 {
            return self.fail(field, "has unbalanced brackets");
        }
        Ok(if value.contains(',') {
            format!("\"{value}\"")
        } else {
            value.to_owned()
        })
    }

    fn push(&mut self, key: &str, value: String) {
        self.items.push(format!("{key}={value}"));
    }

    fn string_list(&self, field: &str, items: &[Value]) -> RenderResult<String> {
        let mut out = Vec::new();
        for item in items {
            let Some(s) = item.as_str() else {
                return self.fail(field, "is not a list of strings");
            };
            if s.contains([',', '"', '[', ']']) {
                return self.fail(field, "has an element with ',', '\"', '[' or ']'");
            }
            out.push(s);
        }
        if out.is_empty() {
            return self.fail(field, "is an empty list");
        }
        Ok(format!("[{}]", out.join(",")))
    }

    fn integer_list(&self, field: &str, items: &[Value]) -> RenderResult<String> {
        let mut out = Vec::new();
        for item in items {
            match item.as_u64() {
                Some(n) => out.push(n.to_string()),
                None => return self.fail(field, "has an element that is not a whole number ≥ 0"),
            }
        }
        if out.is_empty() {
            return self.fail(field, "is an empty list");
        }
        Ok(format!("[{}]", out.join(",")))
    }

    fn scalar(&self, field: &str, value: &Value) -> RenderResult<String> {
        match value {
            Value::Bool(b) => Ok(if *b { "on" } else { "off" }.to_owned()),
            Value::Number(n) => Ok(n.to_string()),
            Value::String(s) => self.text(field, s),
            _ => self.fail(field, "has no option-string form"),
        }
    }

    fn rate_limiter(&mut self, field: &str, value: &Value) -> RenderResult<()> {
        for (bucket, prefix) in [("bandwidth", "bw"), ("ops", "ops")] {
            let Some(b) = value.get(bucket).filter(|b| !b.is_null()) else {
                continue;
            };
            let number = |name: &str| b.get(name).and_then(Value::as_u64);
            let (Some(size), Some(burst), Some(refill)) = (
                number("size"),
                number("one_time_burst"),
                number("refill_time"),
            ) else {
                return self.fail(
                    &format!("{field}.{bucket}"),
                    "needs a one_time_burst (the option string always sets one)",
                );
            };
            if size == 0 || refill == 0 {
                return self.fail(
                    &format!("{field}.{bucket}"),
                    "needs a non-zero size and refill_time",
                );
            }
            self.push(&format!("{prefix}_size"), size.to_string());
            self.push(&format!("{prefix}_one_time_burst"), burst.to_string());
            self.push(&format!("{prefix}_refill_time"), refill.to_string());
        }
        Ok(())
    }

    fn field(&mut self, field: &str, key: &str, value: &Value) -> RenderResult<()> {
        match (field, value) {
            ("rate_limiter_config", _) => self.rate_limiter(field, value)?,
            ("topology", Value::Object(t)) => {
                let part = |name: &str| t.get(name).and_then(Value::as_u64).unwrap_or(0);
                let text = format!(
                    "{}:{}:{}:{}",
                    part("threads_per_core"),
                    part("cores_per_die"),
                    part("dies_per_package"),
                    part("packages")
                );
                self.push(key, text);
            }
            ("features", Value::Object(f)) => {
                if f.get("amx").and_then(Value::as_bool) == Some(true) {
                    self.push(key, "[amx]".to_owned());
                }
            }
            ("affinity", Value::Array(list)) => {
                let mut pairs = Vec::new();
                for entry in list {
                    let vcpu = entry.get("vcpu").and_then(Value::as_u64).unwrap_or(0);
                    let cpus = entry
                        .get("host_cpus")
                        .and_then(Value::as_array)
                        .map(Vec::as_slice)
                        .unwrap_or_default();
                    pairs.push(format!("{vcpu}@{}", self.integer_list(field, cpus)?));
                }
                if pairs.is_empty() {
                    return self.fail(field, "is an empty list");
                }
                self.push(key, format!("[{}]", pairs.join(",")));
            }
            ("distances", Value::Array(list)) => {
                let mut pairs = Vec::new();
                for entry in list {
                    let destination = entry.get("destination").and_then(Value::as_u64);
                    let distance = entry.get("distance").and_then(Value::as_u64);
                    pairs.push(format!(
                        "{}@{}",
                        destination.unwrap_or(0),
                        distance.unwrap_or(0)
                    ));
                }
                if pairs.is_empty() {
                    return self.fail(field, "is an empty list");
                }
                self.push(key, format!("[{}]", pairs.join(",")));
            }
            ("hotplug_method", Value::String(m)) => {
                let text = if m == "VirtioMem" {
                    "virtio-mem"
                } else {
                    "acpi"
                };
                self.push(key, text.to_owned());
            }
            ("vhost_mode", Value::String(m)) => self.push(key, m.to_lowercase()),
            (_, Value::Array(items)) => {
                let text = if items.iter().all(Value::is_number) {
                    self.integer_list(field, items)?
                } else {
                    self.string_list(field, items)?
                };
                self.push(key, text);
            }
            _ => {
                let text = self.scalar(field, value)?;
                self.push(key, text);
            }
        }
        Ok(())
    }
}

fn to_json<T: Serialize>(value: &T) -> Map<String, Value> {
    match serde_json::to_value(value) {
        Ok(Value::Object(map)) => map,
        _ => Map::new(),
    }
}

/// The default object seeded with `fields`' required values, and the names of
/// those required fields (always written out: their option defaults may differ).
fn defaults_like<T: OptionString>(
    fields: &Map<String, Value>,
) -> (Map<String, Value>, Map<String, Value>) {
    let mut seed = Map::new();
    // Fill in required fields one by one, as serde names them.
    for _ in 0..=fields.len() {
        match serde_json::from_value::<T>(Value::Object(seed.clone())) {
            Ok(default) => return (to_json(&default), seed),
            Err(e) => {
                let message = e.to_string();
                let missing = message
                    .strip_prefix("missing field `")
                    .and_then(|rest| rest.split('`').next());
                match missing.and_then(|name| fields.get_key_value(name)) {
                    Some((name, value)) => {
                        seed.insert(name.clone(), value.clone());
                    }
                    None => break,
                }
            }
        }
    }
    (Map::new(), seed)
}

fn first_difference(a: &Map<String, Value>, b: &Map<String, Value>) -> String {
    a.iter()
        .find(|(k, v)| b.get(k.as_str()) != Some(v))
        .map(|(k, _)| k.clone())
        .unwrap_or_default()
}

fn render_console(config: &ConsoleConfig) -> RenderResult<String> {
    let r = Renderer {
        option: ConsoleConfig::FLAG,
        items: Vec::new(),
    };
    let needs_none = |field: &str, value: &Option<String>| match value {
        Some(_) => r.fail(field, "is only kept in file or socket mode"),
        None => Ok(()),
    };
    let mut text = match config.mode {
        ConsoleOutputMode::Off
        | ConsoleOutputMode::Pty
        | ConsoleOutputMode::Tty
        | ConsoleOutputMode::Null => {
            needs_none("file", &config.file)?;
            needs_none("socket", &config.socket)?;
            format!("{:?}", config.mode).to_lowercase()
        }
        ConsoleOutputMode::File => {
            needs_none("socket", &config.socket)?;
            let file = config.file.as_deref().unwrap_or_default();
            format!("file={}", r.text("file", file)?)
        }
        ConsoleOutputMode::Socket => {
            needs_none("file", &config.file)?;
            let socket = config.socket.as_deref().unwrap_or_default();
            format!("socket={}", r.text("socket", socket)?)
        }
    };
    if config.iommu {
        text.push_str(",iommu=on");
    }
    Ok(text)
}

/// Renders `config` as an option string that parses back to an equal object.
pub fn to_option_string<T: OptionString>(config: &T) -> RenderResult<String> {
    if let Some(rendered) = config.render_whole() {
        return rendered;
    }
    let fields = to_json(config);
    let (defaults, required) = defaults_like::<T>(&fields);
    let mut r = Renderer {
        option: T::FLAG,
        items: Vec::new(),
    };
    for (field, value) in &fields {
        let Some(key) = T::key_for(field) else {
            if field == "zones" {
                if value.as_array().is_some_and(Vec::is_empty) {
                    return r.fail(field, "is an empty list (no --memory-zone gives that)");
                }
                continue;
            }
            return r.fail(field, "has no option key");
        };
        let is_default = defaults.get(field) == Some(value) && !required.contains_key(field);
        // The MAC is random by default, so it is always written out.
        if value.is_null() || (is_default && field != "mac") {
            continue;
        }
        r.field(field, key, value)?;
    }
    let text = r.items.join(",");
    match T::parse_option(&text) {
        Ok(parsed) => {
            let mut parsed_fields = to_json(&parsed);
            if let (Some(zones), Some(slot)) = (fields.get("zones"), parsed_fields.get_mut("zones"))
            {
                // Zones travel in separate --memory-zone strings.
                *slot = zones.clone();
            }
            if parsed_fields == fields {
                Ok(text)
            } else {
                r.fail(
                    &first_difference(&fields, &parsed_fields),
                    "does not survive a round trip through the option string",
                )
            }
        }
        Err(e) => r.fail("", &format!("renders as an invalid option string ({e})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T: OptionString + std::fmt::Debug>(input: &str) -> String {
        let parsed = T::parse_option(input).unwrap();
        let text = to_option_string(&parsed).unwrap();
        assert_eq!(T::parse_option(&text).unwrap(), parsed, "{input} -> {text}");
        text
    }

    #[test]
    fn defaults_are_omitted() {
        assert_eq!(round_trip::<DiskConfig>("path=/a.img"), "path=/a.img");
        assert_eq!(round_trip::<CpusConfig>("boot=2"), "boot=2,max=2");
        assert_eq!(round_trip::<MemoryConfig>("size=1G"), "size=1073741824");
        assert_eq!(round_trip::<FsConfig>("tag=t,socket=/s"), "tag=t,socket=/s");
    }

    #[test]
    fn structured_values_round_trip() {
        round_trip::<CpusConfig>(
            "boot=4,topology=1:2:1:2,affinity=[0@[0,2],1@1-3],features=[amx],kvm_hyperv=on",
        );
        round_trip::<DiskConfig>(
            "path=\"/a,b\",bw_size=100,bw_refill_time=10,ops_size=5,ops_one_time_burst=2,ops_refill_time=7",
        );
        round_trip::<NetConfig>(
            "fd=[3,4],num_queues=4,vhost_mode=server,host_mac=12:34:56:78:9a:bc",
        );
        round_trip::<NumaConfig>(
            "guest_numa_id=1,cpus=[2,3],distances=[0@20],memory_zones=[mem0],pci_segments=[0]",
        );
        round_trip::<PlatformConfig>("num_pci_segments=3,iommu_segments=[1,2],oem_strings=[a b,c]");
        round_trip::<MemoryConfig>("size=1G,hotplug_method=virtio-mem,hotplug_size=2G,thp=off");
        round_trip::<ConsoleConfig>("file=/tmp/x,iommu=on");
        round_trip::<ConsoleConfig>("socket=/tmp/s");
        round_trip::<ConsoleConfig>("pty");
    }

    #[test]
    fn unrepresentable_values_are_refused() {
        let mut disk = DiskConfig::parse("path=/a").unwrap();
        disk.path = Some("a\"b".into());
        assert!(to_option_string(&disk).is_err());
        disk.path = Some(" a".into());
        assert!(to_option_string(&disk).is_err());
        disk.path = Some("a]".into());
        assert!(to_option_string(&disk).is_err());
        disk.path = Some(String::new());
        assert!(to_option_string(&disk).is_err());
        disk.path = Some("/x".into());
        disk.rate_limiter_config = Some(RateLimiterConfig::default());
        let err = to_option_string(&disk).unwrap_err();
        assert_eq!(err.field, "rate_limiter_config");

        let mut console = ConsoleConfig::with_mode(ConsoleOutputMode::Tty);
        console.file = Some("/x".into());
        assert_eq!(to_option_string(&console).unwrap_err().field, "file");

        let platform = PlatformConfig {
            oem_strings: Some(vec!["a,b".into()]),
            ..Default::default()
        };
        assert!(to_option_string(&platform).is_err());
    }
}
