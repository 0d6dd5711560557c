//! The TPM's Command Response Buffer interface (TCG PC Client Platform TPM
//! Profile for TPM 2.0, "CRB Interface"), locality 0 only, laid out as
//! Cloud Hypervisor v37 lays it out: registers in the first 0x80 bytes of
//! the page, the control area from 0x40, and one buffer at 0x80 that holds
//! the command and then the response.
//!
//! A command runs in a [`TpmBackend`] while the guest polls
//! `CRB_CTRL_START`: a vCPU never waits for the TPM. Every guest offset,
//! access size and size field is checked here; a backend failure becomes a
//! `TPM_RC_FAILURE` response with `CRB_CTRL_STS.tpmSts` set.

use crate::devices::BusDevice;

/// Register offsets within the locality-0 page.
const LOC_STATE: u64 = 0x00;
const LOC_CTRL: u64 = 0x08;
const LOC_STS: u64 = 0x0c;
const INTF_ID: u64 = 0x30;
const INTF_ID_HIGH: u64 = 0x34;
const CTRL_REQ: u64 = 0x40;
const CTRL_STS: u64 = 0x44;
const CTRL_CANCEL: u64 = 0x48;
const CTRL_START: u64 = 0x4c;
const CTRL_CMD_SIZE: u64 = 0x58;
const CTRL_CMD_LADDR: u64 = 0x5c;
const CTRL_CMD_HADDR: u64 = 0x60;
const CTRL_RSP_SIZE: u64 = 0x64;
const CTRL_RSP_ADDR: u64 = 0x68;
const CTRL_RSP_ADDR_HIGH: u64 = 0x6c;
/// The command/response buffer: the rest of the page.
pub const DATA_BUFFER: u64 = 0x80;
pub const PAGE_SIZE: u64 = 0x1000;
pub const BUFFER_SIZE: usize = (PAGE_SIZE - DATA_BUFFER) as usize;

/// TPM_LOC_STATE_0: the registers are valid; locality 0 is assigned (the
/// active-locality field stays 0). tpmEstablished (bit 0) reads 0, as in
/// Cloud Hypervisor, which only starts with a TPM whose flag reads so.
const LOC_STATE_REG_VALID: u32 = 1 << 7;
const LOC_STATE_ASSIGNED: u32 = 1 << 1;
/// TPM_LOC_CTRL_0 requests (whole values, as Cloud Hypervisor takes them).
const LOC_CTRL_REQUEST_ACCESS: u32 = 1 << 0;
const LOC_CTRL_RELINQUISH: u32 = 1 << 1;
const LOC_CTRL_RESET_ESTABLISHMENT: u32 = 1 << 3;
/// TPM_LOC_STS_0: granted (never seized: there is one locality).
const LOC_STS_GRANTED: u32 = 1 << 0;
/// TPM_CRB_INTF_ID_0: CRB active (type 1), version 1, locality 0 only, no
/// idle bypass, 64-byte transfers, CRB supported and selected; the high half
/// is the vendor id Cloud Hypervisor gives (IBM's, 0x1014).
const INTF_ID_VALUE: u32 = 0x1 | 0x1 << 4 | 0x3 << 11 | 0x1 << 14 | 0x1 << 17;
const INTF_ID_HIGH_VALUE: u32 = 0x1014;
/// TPM_CRB_CTRL_REQ_0 requests; both complete at once (reads give 0).
const CTRL_REQ_CMD_READY: u32 = 1 << 0;
const CTRL_REQ_GO_IDLE: u32 = 1 << 1;
/// TPM_CRB_CTRL_STS_0: tpmSts (a fatal error) and tpmIdle.
const CTRL_STS_ERROR: u32 = 1 << 0;
const CTRL_STS_IDLE: u32 = 1 << 1;
const INVOKE: u32 = 1 << 0;

/// A TPM command's or response's header: tag (2), size (4), code (4).
pub const HEADER_SIZE: usize = 10;
const TPM_ST_NO_SESSIONS: u16 = 0x8001;
/// The TPM could not run the command (its backend failed).
pub const TPM_RC_FAILURE: u32 = 0x101;
/// The command's size field does not fit (too small, or past the buffer).
pub const TPM_RC_COMMAND_SIZE: u32 = 0x142;

/// Why a command got no response from the TPM.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    #[error("swtpm closed the connection (has it exited?)")]
    Disconnected,
    #[error("cannot talk to swtpm: {0}")]
    Io(String),
    #[error("swtpm did not answer within {0:?}")]
    Timeout(std::time::Duration),
    #[error("swtpm broke the protocol: {0}")]
    Protocol(String),
    #[error("the connection to swtpm is unusable since an earlier failure ({0})")]
    Unusable(String),
    #[error("the TPM worker thread stopped: {0}")]
    WorkerStopped(String),
}

impl crate::error::ModuleError for BackendError {
    fn kind(&self) -> crate::error::ErrorKind {
        crate::error::ErrorKind::Device
    }
}

/// What runs the guest's TPM commands. Its calls come from a vCPU thread
/// and must not block.
pub trait TpmBackend: Send {
    /// Starts `command`, a whole TPM command (its header's size is its length).
    fn start(&mut self, command: &[u8]);
    /// The outcome of the command started last, once there is one (taken once).
    fn completed(&mut self) -> Option<Result<Vec<u8>, BackendError>>;
    /// The guest asked to cancel the command in flight.
    fn cancel(&mut self);
}

/// A response of `TPM_ST_NO_SESSIONS` and `code` alone.
pub fn error_response(code: u32) -> [u8; HEADER_SIZE] {
    let mut response = [0u8; HEADER_SIZE];
    response[..2].copy_from_slice(&TPM_ST_NO_SESSIONS.to_be_bytes());
    response[2..6].copy_from_slice(&(HEADER_SIZE as u32).to_be_bytes());
    response[6..].copy_from_slice(&code.to_be_bytes());
    response
}

/// The size field of a command or response header, if there is a header.
pub fn header_size(bytes: &[u8]) -> Option<usize> {
    let field: [u8; 4] = bytes.get(2..6)?.try_into().ok()?;
    Some(u32::from_be_bytes(field) as usize)
}

/// The CRB of one TPM, at guest address `base`.
pub struct Crb {
    base: u64,
    backend: Box<dyn TpmBackend>,
    /// The largest command the backend takes (its buffer, at most ours).
    command_limit: usize,
    assigned: bool,
    idle: bool,
    /// tpmSts: a command failed for want of a TPM. It stays set (the TPM is
    /// gone until the VM resets), as in Cloud Hypervisor.
    failed: bool,
    cancel: u32,
    in_flight: bool,
    buffer: Box<[u8; BUFFER_SIZE]>,
    /// A failure was logged and no command succeeded since: one error line
    /// per outage, however many commands the guest retries.
    failure_logged: bool,
}

impl Crb {
    /// A CRB at `base` whose commands `backend` runs; it takes commands of
    /// up to `command_limit` bytes (at most the buffer).
    pub fn new(base: u64, backend: Box<dyn TpmBackend>, command_limit: usize) -> Crb {
        Crb {
            base,
            backend,
            command_limit: command_limit.min(BUFFER_SIZE),
            assigned: false,
            idle: true,
            failed: false,
            cancel: 0,
            in_flight: false,
            buffer: Box::new([0; BUFFER_SIZE]),
            failure_logged: false,
        }
    }

    fn register(&self, offset: u64) -> u32 {
        let buffer = self.base + DATA_BUFFER;
        match offset {
            LOC_STATE => LOC_STATE_REG_VALID | if self.assigned { LOC_STATE_ASSIGNED } else { 0 },
            LOC_STS => u32::from(self.assigned) * LOC_STS_GRANTED,
            INTF_ID => INTF_ID_VALUE,
            INTF_ID_HIGH => INTF_ID_HIGH_VALUE,
            CTRL_STS => {
                (u32::from(self.failed) * CTRL_STS_ERROR) | (u32::from(self.idle) * CTRL_STS_IDLE)
            }
            CTRL_CANCEL => self.cancel,
            CTRL_START => u32::from(self.in_flight) * INVOKE,
            CTRL_CMD_SIZE | CTRL_RSP_SIZE => BUFFER_SIZE as u32,
            CTRL_CMD_LADDR | CTRL_RSP_ADDR => buffer as u32,
            CTRL_CMD_HADDR | CTRL_RSP_ADDR_HIGH => (buffer >> 32) as u32,
            // Write-only requests, interrupts (none), reserved space.
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            LOC_CTRL => match value {
                LOC_CTRL_REQUEST_ACCESS => self.assigned = true,
                LOC_CTRL_RELINQUISH => self.assigned = false,
                // There is no DRTM here: the flag has nothing to reset.
                LOC_CTRL_RESET_ESTABLISHMENT => {}
                _ => log::debug!("TPM: TPM_LOC_CTRL_0 value {value:#x} ignored"),
            },
            CTRL_REQ => match value {
                CTRL_REQ_CMD_READY => self.idle = false,
                CTRL_REQ_GO_IDLE => self.idle = true,
                _ => log::debug!("TPM: TPM_CRB_CTRL_REQ_0 value {value:#x} ignored"),
            },
            CTRL_CANCEL => {
                self.cancel = value;
                if value & INVOKE != 0 && self.in_flight {
                    self.backend.cancel();
                }
            }
            // Only locality 0's owner starts a command, and one at a time.
            CTRL_START if value & INVOKE != 0 && !self.in_flight && self.assigned => self.start(),
            // The buffers are fixed in the page: their registers read only.
            _ => log::debug!("TPM: write of {value:#x} to register {offset:#x} ignored"),
        }
    }

    /// CRB_CTRL_START: the command in the buffer goes to the backend.
    fn start(&mut self) {
        let size = header_size(&self.buffer[..]).unwrap_or(0);
        let Some(command) = self
            .buffer
            .get(..size)
            .filter(|_| (HEADER_SIZE..=self.command_limit).contains(&size))
        else {
            // What a TPM answers a command whose size field is wrong; the
            // backend never sees it.
            log::debug!(
                "TPM: command size {size} refused (at most {})",
                self.command_limit
            );
            self.respond(&error_response(TPM_RC_COMMAND_SIZE));
            return;
        };
        self.in_flight = true;
        self.backend.start(command);
    }

    /// Takes the backend's outcome, if the command in flight has one.
    fn settle(&mut self) {
        if !self.in_flight {
            return;
        }
        let Some(outcome) = self.backend.completed() else {
            return;
        };
        self.in_flight = false;
        let checked = outcome.and_then(|response| {
            match header_size(&response) {
                Some(size)
                    if size == response.len() && (HEADER_SIZE..=BUFFER_SIZE).contains(&size) =>
                {
                    Ok(response)
                }
                size => Err(BackendError::Protocol(format!(
                    "a response of {} bytes whose header says {size:?} (the buffer holds {BUFFER_SIZE})",
                    response.len()
                ))),
            }
        });
        match checked {
            Ok(response) => {
                self.failure_logged = false;
                self.respond(&response);
            }
            Err(error) => {
                if self.failure_logged {
                    log::debug!("TPM: {error}");
                } else {
                    log::error!(
                        "TPM: {error}: the guest's command fails (TPM_RC_FAILURE, \
                         CRB_CTRL_STS.tpmSts set)"
                    );
                    self.failure_logged = true;
                }
                self.failed = true;
                self.respond(&error_response(TPM_RC_FAILURE));
            }
        }
    }

    fn respond(&mut self, response: &[u8]) {
        let len = response.len().min(BUFFER_SIZE);
        self.buffer[..len].copy_from_slice(&response[..len]);
    }

    fn byte(&self, offset: u64) -> u8 {
        if offset < DATA_BUFFER {
            (self.register(offset & !3) >> ((offset & 3) * 8)) as u8
        } else {
            usize::try_from(offset - DATA_BUFFER)
                .ok()
                .and_then(|i| self.buffer.get(i).copied())
                .unwrap_or(0xff)
        }
    }
}

impl BusDevice for Crb {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.settle();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset
                .checked_add(i as u64)
                .map_or(0xff, |offset| self.byte(offset));
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.settle();
        let Some(end) = offset.checked_add(data.len() as u64) else {
            return;
        };
        // The buffer's bytes, wherever the access starts.
        for (i, &byte) in data.iter().enumerate() {
            let at = offset + i as u64;
            if at >= DATA_BUFFER {
                if let Some(slot) = usize::try_from(at - DATA_BUFFER)
                    .ok()
                    .and_then(|i| self.buffer.get_mut(i))
                {
                    *slot = byte;
                }
            }
        }
        // Each register the access touches, with the bytes it did not
        // write as 0 (all the request bits live in the low byte).
        let mut register = offset & !3;
        while register < end.min(DATA_BUFFER) {
            let mut value = 0u32;
            for (i, &byte) in data.iter().enumerate() {
                let at = offset + i as u64;
                if (register..register + 4).contains(&at) {
                    value |= u32::from(byte) << ((at - register) * 8);
                }
            }
            self.write_register(register, value);
            register += 4;
        }
    }
}

#[cfg(test)]
mod tests;
