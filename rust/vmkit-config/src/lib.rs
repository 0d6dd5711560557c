//! Cloud Hypervisor v37 compatible configuration for vmkit: the option-string
//! grammar, config types with their JSON form, and validation. Pure: no KVM,
//! no I/O beyond the OS random source for default MAC addresses.

#![forbid(unsafe_code)]

pub mod api;
pub mod error;
pub mod ids;
pub mod json;
pub mod option_parser;
pub mod parse;
pub mod render;
pub mod types;
pub mod validate;
pub mod values;

pub use error::{Error, JsonError, UnrepresentableError, ValidationError};
pub use parse::VmParams;
pub use render::{to_option_string, OptionString};
pub use types::*;
pub use validate::ValidatedConfig;
