//! JSON in Cloud Hypervisor's shape, with errors that say where the problem is.

use serde::de::DeserializeOwned;

use crate::error::JsonError;

/// Deserialises `text`; the error names the path of the offending field.
pub fn from_json<T: DeserializeOwned>(text: &str) -> Result<T, JsonError> {
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| JsonError {
        path: e.path().to_string(),
        message: e.inner().to_string(),
    })?;
    deserializer.end().map_err(|e| JsonError {
        path: String::new(),
        message: e.to_string(),
    })?;
    Ok(value)
}
