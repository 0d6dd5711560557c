//! JSON in Cloud Hypervisor's shape, with errors that say where the problem is.

use serde::de::DeserializeOwned;

use crate::error::JsonError;

/// serde_json's error as a `JsonError` (message and position apart).
pub(crate) fn json_error(path: String, e: &serde_json::Error) -> JsonError {
    let text = e.to_string();
    let position = format!(" at line {} column {}", e.line(), e.column());
    let message = text.strip_suffix(&position).unwrap_or(&text).to_owned();
    JsonError {
        path,
        message,
        line: e.line(),
        column: e.column(),
    }
}

/// Deserialises `text`; the error names the path of the offending field.
pub fn from_json<T: DeserializeOwned>(text: &str) -> Result<T, JsonError> {
    from_json_bytes(text.as_bytes())
}

/// As `from_json`, for text that may not be UTF-8 (an API request body):
/// invalid UTF-8 in a string is an error at its position, as in v37.
pub fn from_json_bytes<T: DeserializeOwned>(text: &[u8]) -> Result<T, JsonError> {
    let mut deserializer = serde_json::Deserializer::from_slice(text);
    let value = serde_path_to_error::deserialize(&mut deserializer)
        .map_err(|e| json_error(e.path().to_string(), e.inner()))?;
    deserializer
        .end()
        .map_err(|e| json_error(String::new(), &e))?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::VmConfig;

    #[test]
    fn errors_name_the_field_and_position() {
        let err = from_json::<VmConfig>(r#"{"disks": [{"queue_size": "x"}]}"#).unwrap_err();
        assert_eq!(err.path, "disks[0].queue_size");
        assert_eq!(err.message, "invalid type: string \"x\", expected u16");
        assert_eq!(
            err.to_string(),
            "disks[0].queue_size: invalid type: string \"x\", expected u16 at line 1 column 29"
        );
        let err = from_json::<VmConfig>(r#"{"memory": {}}"#).unwrap_err();
        assert_eq!(err.path, "memory");
        assert_eq!(err.message, "missing field `size`");
    }

    #[test]
    fn floats_are_written_as_v37s_serde_wrote_them() {
        // serde 1.0.198 and later would write `1.0` (see the pins in Cargo.toml).
        let err = from_json::<VmConfig>(r#"{"cpus": {"boot_vcpus": 1.0}}"#).unwrap_err();
        assert_eq!(err.message, "invalid type: floating point `1`, expected u8");
        let err = from_json::<VmConfig>(r#"{"cpus": {"boot_vcpus": 1.5}}"#).unwrap_err();
        assert_eq!(
            err.message,
            "invalid type: floating point `1.5`, expected u8"
        );
        let err = from_json::<VmConfig>(r#"{"cpus": {"boot_vcpus": -1e2}}"#).unwrap_err();
        assert_eq!(
            err.message,
            "invalid type: floating point `-100`, expected u8"
        );
    }

    #[test]
    fn invalid_utf8_is_placed_in_its_string() {
        let err =
            from_json_bytes::<VmConfig>(b"{\"payload\": {\"kernel\": \"\xff\"}}").unwrap_err();
        assert_eq!(err.path, "payload.kernel");
        assert_eq!(err.message, "invalid unicode code point");
        assert_eq!((err.line, err.column), (1, 26)); // its closing quote, as v37
    }

    #[test]
    fn trailing_garbage_is_refused() {
        assert!(from_json::<VmConfig>("{} x").is_err());
    }
}
