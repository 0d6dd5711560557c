//! The request bodies of v37's HTTP API actions that are not config types:
//! the small structs of its `vmm/src/api/mod.rs`, with v37's field names,
//! types and defaults. v37 reads them with `serde_json::from_slice` and
//! answers a bad body with 400 and serde_json's text, so they are read the
//! same way here, by the serde and serde_json versions v37 was built with
//! (the workspace pins them): same texts, same positions (bytes).
//!
//! None of them denies unknown fields; serde_json skips those without
//! recursion, however deeply they nest. Like every derived struct, each can
//! also be given as an array of its fields in order.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::JsonError;
use crate::json::json_error;

/// `PUT /api/v1/vm.resize`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct VmResizeData {
    pub desired_vcpus: Option<u8>,
    pub desired_ram: Option<u64>,
    pub desired_balloon: Option<u64>,
}

/// `PUT /api/v1/vm.resize-zone`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct VmResizeZoneData {
    pub id: String,
    pub desired_ram: u64,
}

/// `PUT /api/v1/vm.remove-device`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct VmRemoveDeviceData {
    pub id: String,
}

/// `PUT /api/v1/vm.snapshot`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct VmSnapshotConfig {
    pub destination_url: String,
}

/// `PUT /api/v1/vm.receive-migration`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct VmReceiveMigrationData {
    pub receiver_url: String,
}

/// `PUT /api/v1/vm.send-migration`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct VmSendMigrationData {
    pub destination_url: String,
    #[serde(default)]
    pub local: bool,
}

/// One of the bodies above, as read; it serialises as the struct it holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ApiBody {
    VmResize(VmResizeData),
    VmResizeZone(VmResizeZoneData),
    VmRemoveDevice(VmRemoveDeviceData),
    VmSnapshot(VmSnapshotConfig),
    VmReceiveMigration(VmReceiveMigrationData),
    VmSendMigration(VmSendMigrationData),
}

/// Why a body could not be read.
#[derive(Debug)]
pub enum ApiBodyError {
    /// No body struct has this name (a caller's mistake, not the client's).
    UnknownStruct(String),
    /// The body is not the JSON the struct takes: the text (serde_json's,
    /// with its position) is v37's 400 body.
    Json(JsonError),
}

impl fmt::Display for ApiBodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiBodyError::UnknownStruct(name) => write!(
                f,
                "unknown API body struct {name:?} (known: {})",
                ApiBody::STRUCTS.join(", ")
            ),
            ApiBodyError::Json(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for ApiBodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ApiBodyError::UnknownStruct(_) => None,
            ApiBodyError::Json(e) => Some(e),
        }
    }
}

impl ApiBody {
    /// The struct names `parse` takes (v37's names, as its errors cite them).
    pub const STRUCTS: [&'static str; 6] = [
        "VmResizeData",
        "VmResizeZoneData",
        "VmRemoveDeviceData",
        "VmSnapshotConfig",
        "VmReceiveMigrationData",
        "VmSendMigrationData",
    ];

    /// Reads `body` as v37 reads the struct named `name`.
    pub fn parse(name: &str, body: &[u8]) -> Result<ApiBody, ApiBodyError> {
        fn read<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiBodyError> {
            serde_json::from_slice(body)
                .map_err(|e| ApiBodyError::Json(json_error(String::new(), &e)))
        }
        Ok(match name {
            "VmResizeData" => ApiBody::VmResize(read(body)?),
            "VmResizeZoneData" => ApiBody::VmResizeZone(read(body)?),
            "VmRemoveDeviceData" => ApiBody::VmRemoveDevice(read(body)?),
            "VmSnapshotConfig" => ApiBody::VmSnapshot(read(body)?),
            "VmReceiveMigrationData" => ApiBody::VmReceiveMigration(read(body)?),
            "VmSendMigrationData" => ApiBody::VmSendMigration(read(body)?),
            other => return Err(ApiBodyError::UnknownStruct(other.to_owned())),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(name: &str, body: &[u8]) -> String {
        ApiBody::parse(name, body).unwrap_err().to_string()
    }

    #[test]
    fn every_listed_struct_parses() {
        for name in ApiBody::STRUCTS {
            let err = error(name, b"1");
            assert_eq!(
                err,
                format!("invalid type: integer `1`, expected struct {name} at line 1 column 1")
            );
        }
        assert!(error("VmInfo", b"{}").starts_with("unknown API body struct \"VmInfo\""));
    }

    #[test]
    fn fields_take_v37s_defaults_and_unknown_ones_are_skipped() {
        let body = ApiBody::parse(
            "VmSendMigrationData",
            br#"{"x":[{}],"destination_url":"u"}"#,
        );
        let expected = VmSendMigrationData {
            destination_url: "u".into(),
            local: false,
        };
        assert_eq!(body.unwrap(), ApiBody::VmSendMigration(expected));
        let body = ApiBody::parse("VmResizeData", b"{}").unwrap();
        assert_eq!(body, ApiBody::VmResize(VmResizeData::default()));
        assert_eq!(
            error("VmResizeZoneData", br#"{"id":"z"}"#),
            "missing field `desired_ram` at line 1 column 10"
        );
    }

    #[test]
    fn structs_read_from_arrays_of_their_fields() {
        let body = ApiBody::parse("VmResizeData", b"[2, null, 7]").unwrap();
        let expected = VmResizeData {
            desired_vcpus: Some(2),
            desired_ram: None,
            desired_balloon: Some(7),
        };
        assert_eq!(body, ApiBody::VmResize(expected));
        assert_eq!(
            error("VmResizeData", b"[1]"),
            "invalid length 1, expected struct VmResizeData with 3 elements at line 1 column 3"
        );
    }

    #[test]
    fn numbers_get_serde_jsons_texts() {
        assert_eq!(
            error("VmResizeData", br#"{"desired_vcpus":256}"#),
            "invalid value: integer `256`, expected u8 at line 1 column 20"
        );
        assert_eq!(
            error("VmResizeData", br#"{"desired_ram":1e5}"#),
            "invalid type: floating point `100000`, expected u64 at line 1 column 18"
        );
        assert_eq!(
            error("VmResizeData", br#"{"desired_ram":18446744073709551616}"#),
            "invalid type: floating point `18446744073709552000`, expected u64 at line 1 column 35"
        );
        let mut huge = br#"{"desired_ram":"#.to_vec();
        huge.extend([b'1'; 400]);
        huge.push(b'}');
        assert_eq!(
            error("VmResizeData", &huge),
            "number out of range at line 1 column 415"
        );
    }

    #[test]
    fn deep_nesting_in_an_ignored_field_is_read_without_recursion() {
        let depth = 100_000;
        let mut body = br#"{"x":"#.to_vec();
        body.extend(vec![b'['; depth]);
        body.extend(vec![b']'; depth]);
        body.extend(br#","id":"a"}"#);
        let expected = VmRemoveDeviceData { id: "a".into() };
        assert_eq!(
            ApiBody::parse("VmRemoveDeviceData", &body).unwrap(),
            ApiBody::VmRemoveDevice(expected)
        );
    }

    #[test]
    fn positions_count_bytes() {
        assert_eq!(
            error(
                "VmRemoveDeviceData",
                "{\"id\":\"é\",\n \"id\":\"b\"}".as_bytes()
            ),
            "duplicate field `id` at line 2 column 5"
        );
        assert_eq!(
            error("VmRemoveDeviceData", b"{\"id\":\"a\xff\"}"),
            "invalid unicode code point at line 1 column 10"
        );
    }
}
