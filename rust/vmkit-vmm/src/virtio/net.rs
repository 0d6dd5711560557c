//! virtio-net on a tap device (being written).

use vmkit_config::NetConfig;

use super::{ActivateError, Activation, VirtioDevice, TYPE_NET};
use crate::error::{Error, ErrorKind, Result};

pub struct Net;

impl Net {
    pub fn new(_config: &NetConfig, _id: &str) -> Result<Net> {
        Err(Error::new(
            ErrorKind::Unsupported,
            "--net (virtio-net) is not supported yet",
        ))
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        Vec::new()
    }
    fn features(&self) -> u64 {
        0
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn activate(&mut self, _activation: Activation) -> std::result::Result<(), ActivateError> {
        Err(ActivateError("not supported".into()))
    }
    fn reset(&mut self) {}
}
