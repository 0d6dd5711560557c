//! TPM 2.0 (`--tpm socket=<swtpm's control socket>`), as Cloud Hypervisor
//! v37 provides it: the CRB interface ([`crb`]) on the MMIO bus at
//! `TPM_START`, announced by the ACPI TPM2 table and the DSDT's MSFT0101
//! device, its commands run by swtpm ([`swtpm`]).

pub mod crb;
pub mod swtpm;

use crate::layout::TPM_START;
use crate::seccomp::Spawner;

pub use crb::{BackendError, Crb, TpmBackend};
pub use swtpm::TpmError;

/// The TPM of `--tpm socket=<path>`: swtpm there, set up, behind a CRB.
pub fn create(path: &str, spawner: &Spawner) -> Result<Crb, TpmError> {
    let swtpm = swtpm::connect(path)?;
    let command_limit = swtpm.buffer_size;
    let backend = swtpm::SwtpmBackend::start(swtpm, path, spawner, swtpm::COMMAND_TIMEOUT)?;
    Ok(Crb::new(TPM_START, Box::new(backend), command_limit))
}
