//! The TPM's CRB interface (`--tpm`) as a guest reaches it: MMIO accesses of
//! any size at any offset of (and past) its page on a real bus, with a
//! backend whose answers come from the input (responses of any size and
//! content, failures, or nothing yet). The device must never panic; what it
//! hands the backend must be one whole command that fits its limit; and once
//! the backend has answered, CRB_CTRL_START must read clear.

use std::sync::{Arc, Mutex};

use vmkit_vmm::devices::tpm::crb::{header_size, BUFFER_SIZE};
use vmkit_vmm::devices::tpm::{BackendError, Crb, TpmBackend};
use vmkit_vmm::devices::Bus;
use vmkit_vmm::layout::{TPM_SIZE, TPM_START};

use crate::input::Input;

#[derive(Default)]
struct Backend {
    /// A command started and not answered yet.
    running: bool,
    outcome: Option<Result<Vec<u8>, BackendError>>,
    limit: usize,
}

struct Shared(Arc<Mutex<Backend>>);

impl TpmBackend for Shared {
    fn start(&mut self, command: &[u8]) {
        let mut backend = self.0.lock().expect("the backend's lock");
        assert!(!backend.running, "a command while another runs");
        assert!(command.len() >= 10 && command.len() <= backend.limit);
        assert_eq!(header_size(command), Some(command.len()));
        backend.running = true;
    }

    fn completed(&mut self) -> Option<Result<Vec<u8>, BackendError>> {
        let mut backend = self.0.lock().expect("the backend's lock");
        let outcome = backend.outcome.take();
        if outcome.is_some() {
            backend.running = false;
        }
        outcome
    }

    fn cancel(&mut self) {}
}

const CTRL_START: u64 = 0x4c;

pub fn tpm_crb(data: &[u8]) {
    let mut input = Input::new(data);
    let limit = usize::from(input.u16()) % (BUFFER_SIZE + 16);
    let backend = Arc::new(Mutex::new(Backend {
        limit: limit.min(BUFFER_SIZE),
        ..Backend::default()
    }));
    let crb = Crb::new(TPM_START, Box::new(Shared(backend.clone())), limit);
    let mut mmio = Bus::new();
    assert!(mmio.insert(TPM_START, TPM_SIZE, Arc::new(Mutex::new(crb))));
    let mut buffer = [0u8; 8];
    let mut steps = 0;
    while !input.is_empty() && steps < 4096 {
        steps += 1;
        let op = input.u8();
        let len = [1usize, 2, 4, 8, 4, 4, 3, 0][usize::from(op >> 5)];
        // Mostly the registers, then the buffer, its end and past it.
        let offset = match input.u8() % 4 {
            0 | 1 => u64::from(input.u8() % 0x80),
            2 => 0x80 + u64::from(input.u16()) % (TPM_SIZE - 0x80),
            _ => TPM_SIZE - 8 + u64::from(input.u8() % 16),
        };
        match op % 5 {
            0 => {
                mmio.read(TPM_START + offset, &mut buffer[..len]);
            }
            1 | 2 => {
                mmio.write(TPM_START + offset, input.bytes(len));
            }
            3 => {
                // The guest's usual sequence: locality, a command, START.
                let size = input.u16();
                mmio.write(TPM_START + 0x08, &1u32.to_le_bytes());
                mmio.write(TPM_START + 0x82, &size.to_be_bytes());
                mmio.write(TPM_START + CTRL_START, &1u32.to_le_bytes());
            }
            _ => {
                let mut state = backend.lock().expect("the backend's lock");
                if !state.running || state.outcome.is_some() {
                    continue;
                }
                let how = input.u8();
                state.outcome = Some(if how & 1 == 0 {
                    let size = usize::from(input.u16()) % (BUFFER_SIZE + 64);
                    let mut response = input.bytes(size).to_vec();
                    response.resize(size, 0);
                    // Mostly an honest header; sometimes whatever came.
                    if how & 2 == 0 && size >= 6 {
                        response[2..6].copy_from_slice(&(size as u32).to_be_bytes());
                    }
                    Ok(response)
                } else {
                    Err(BackendError::Disconnected)
                });
                drop(state);
                mmio.read(TPM_START + CTRL_START, &mut buffer[..4]);
                assert_eq!(buffer[0] & 1, 0, "START still set after the answer");
            }
        }
    }
}
