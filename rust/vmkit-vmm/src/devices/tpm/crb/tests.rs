use std::sync::{Arc, Mutex};

use super::*;
use crate::layout::TPM_START;

/// What the fake backend saw, and the outcome it gives next.
#[derive(Default)]
struct Seen {
    started: Vec<Vec<u8>>,
    outcome: Option<Result<Vec<u8>, BackendError>>,
    cancels: usize,
}

struct Fake(Arc<Mutex<Seen>>);

impl TpmBackend for Fake {
    fn start(&mut self, command: &[u8]) {
        self.0.lock().unwrap().started.push(command.to_vec());
    }

    fn completed(&mut self) -> Option<Result<Vec<u8>, BackendError>> {
        self.0.lock().unwrap().outcome.take()
    }

    fn cancel(&mut self) {
        self.0.lock().unwrap().cancels += 1;
    }
}

fn crb_with_limit(limit: usize) -> (Crb, Arc<Mutex<Seen>>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    (
        Crb::new(TPM_START, Box::new(Fake(seen.clone())), limit),
        seen,
    )
}

fn crb() -> (Crb, Arc<Mutex<Seen>>) {
    crb_with_limit(BUFFER_SIZE)
}

fn r32(crb: &mut Crb, offset: u64) -> u32 {
    let mut data = [0u8; 4];
    crb.read(offset, &mut data);
    u32::from_le_bytes(data)
}

fn w32(crb: &mut Crb, offset: u64, value: u32) {
    crb.write(offset, &value.to_le_bytes());
}

fn buffer(crb: &mut Crb, len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    for (i, byte) in bytes.iter_mut().enumerate() {
        let mut one = [0u8];
        crb.read(DATA_BUFFER + i as u64, &mut one);
        *byte = one[0];
    }
    bytes
}

/// TPM2_GetRandom(16): tag, size 12, code 0x17b, bytesRequested.
const GET_RANDOM: [u8; 12] = [0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7b, 0, 16];

/// The guest's side of a command: the locality, the command in the buffer
/// (dword by dword), CRB_CTRL_START.
fn submit(crb: &mut Crb, command: &[u8]) {
    w32(crb, LOC_CTRL, LOC_CTRL_REQUEST_ACCESS);
    w32(crb, CTRL_REQ, CTRL_REQ_CMD_READY);
    for (i, chunk) in command.chunks(4).enumerate() {
        crb.write(DATA_BUFFER + 4 * i as u64, chunk);
    }
    w32(crb, CTRL_START, INVOKE);
}

fn rc(response: &[u8]) -> u32 {
    u32::from_be_bytes(response[6..10].try_into().unwrap())
}

#[test]
fn registers_read_as_cloud_hypervisor_presents_them() {
    // The values the test guest read from Cloud Hypervisor v37's CRB.
    let (mut crb, _) = crb();
    assert_eq!(r32(&mut crb, LOC_STATE), 0x80);
    assert_eq!(r32(&mut crb, LOC_STS), 0);
    assert_eq!(r32(&mut crb, INTF_ID), 0x0002_5811);
    assert_eq!(r32(&mut crb, INTF_ID_HIGH), 0x1014);
    assert_eq!(r32(&mut crb, CTRL_STS), CTRL_STS_IDLE);
    assert_eq!(r32(&mut crb, CTRL_START), 0);
    assert_eq!(r32(&mut crb, CTRL_CMD_SIZE), 0xf80);
    assert_eq!(r32(&mut crb, CTRL_CMD_LADDR), 0xfed4_0080);
    assert_eq!(r32(&mut crb, CTRL_CMD_HADDR), 0);
    assert_eq!(r32(&mut crb, CTRL_RSP_SIZE), 0xf80);
    let mut rsp_addr = [0u8; 8];
    crb.read(CTRL_RSP_ADDR, &mut rsp_addr);
    assert_eq!(u64::from_le_bytes(rsp_addr), 0xfed4_0080, "one 8-byte read");
    let mut intf = [0u8; 8];
    crb.read(INTF_ID, &mut intf);
    assert_eq!(u64::from_le_bytes(intf), 0x1014_0002_5811);
}

#[test]
fn the_locality_is_requested_and_relinquished() {
    let (mut crb, _) = crb();
    w32(&mut crb, LOC_CTRL, LOC_CTRL_REQUEST_ACCESS);
    assert_eq!(r32(&mut crb, LOC_STATE), 0x82);
    assert_eq!(r32(&mut crb, LOC_STS), LOC_STS_GRANTED);
    assert_eq!(r32(&mut crb, LOC_CTRL), 0, "write-only");
    for ignored in [LOC_CTRL_RESET_ESTABLISHMENT, 0, 0x3, 0xffff_ffff] {
        w32(&mut crb, LOC_CTRL, ignored);
        assert_eq!(r32(&mut crb, LOC_STATE), 0x82, "{ignored:#x}");
    }
    w32(&mut crb, LOC_CTRL, LOC_CTRL_RELINQUISH);
    assert_eq!(r32(&mut crb, LOC_STATE), 0x80);
    assert_eq!(r32(&mut crb, LOC_STS), 0);
}

#[test]
fn cmd_ready_and_go_idle_complete_at_once() {
    let (mut crb, _) = crb();
    w32(&mut crb, CTRL_REQ, CTRL_REQ_CMD_READY);
    assert_eq!(r32(&mut crb, CTRL_REQ), 0);
    assert_eq!(r32(&mut crb, CTRL_STS), 0);
    w32(&mut crb, CTRL_REQ, 0x7);
    assert_eq!(
        r32(&mut crb, CTRL_STS),
        0,
        "an unknown request changes nothing"
    );
    w32(&mut crb, CTRL_REQ, CTRL_REQ_GO_IDLE);
    assert_eq!(r32(&mut crb, CTRL_STS), CTRL_STS_IDLE);
}

#[test]
fn a_command_runs_while_the_guest_polls_start() {
    let (mut crb, seen) = crb();
    // Bytes past the command's size are not part of it.
    crb.write(DATA_BUFFER + 12, &[0xaa; 8]);
    submit(&mut crb, &GET_RANDOM);
    assert_eq!(seen.lock().unwrap().started, vec![GET_RANDOM.to_vec()]);
    for _ in 0..3 {
        assert_eq!(r32(&mut crb, CTRL_START), INVOKE, "still running");
    }
    let mut response = vec![0x80, 0x01, 0, 0, 0, 28, 0, 0, 0, 0, 0, 16];
    response.extend(1..=16u8);
    seen.lock().unwrap().outcome = Some(Ok(response.clone()));
    assert_eq!(r32(&mut crb, CTRL_START), 0, "done");
    assert_eq!(buffer(&mut crb, 28), response);
    assert_eq!(r32(&mut crb, CTRL_STS) & CTRL_STS_ERROR, 0);
}

#[test]
fn start_needs_the_locality_and_no_command_in_flight() {
    let (mut crb, seen) = crb();
    crb.write(DATA_BUFFER, &GET_RANDOM);
    w32(&mut crb, CTRL_START, INVOKE);
    assert!(
        seen.lock().unwrap().started.is_empty(),
        "locality 0 not requested"
    );
    assert_eq!(r32(&mut crb, CTRL_START), 0);
    submit(&mut crb, &GET_RANDOM);
    w32(&mut crb, CTRL_START, INVOKE);
    w32(&mut crb, CTRL_START, 0);
    assert_eq!(
        seen.lock().unwrap().started.len(),
        1,
        "one command at a time"
    );
    assert_eq!(
        r32(&mut crb, CTRL_START),
        INVOKE,
        "the guest cannot clear START"
    );
}

#[test]
fn a_command_size_past_the_buffer_is_answered_without_the_backend() {
    for (limit, size) in [
        (BUFFER_SIZE, BUFFER_SIZE as u32 + 1),
        (BUFFER_SIZE, u32::MAX),
        (BUFFER_SIZE, 9),
        (BUFFER_SIZE, 0),
        (100, 101),
    ] {
        let (mut crb, seen) = crb_with_limit(limit);
        let mut command = GET_RANDOM;
        command[2..6].copy_from_slice(&size.to_be_bytes());
        submit(&mut crb, &command);
        assert!(seen.lock().unwrap().started.is_empty(), "size {size}");
        assert_eq!(r32(&mut crb, CTRL_START), 0);
        let response = buffer(&mut crb, 10);
        assert_eq!(response, error_response(TPM_RC_COMMAND_SIZE), "size {size}");
        assert_eq!(rc(&response), 0x142);
        assert_eq!(
            r32(&mut crb, CTRL_STS) & CTRL_STS_ERROR,
            0,
            "the TPM itself is fine"
        );
    }
    // The whole buffer is a valid command size.
    let (mut crb, seen) = crb();
    let mut command = vec![0u8; BUFFER_SIZE];
    command[..10].copy_from_slice(&GET_RANDOM[..10]);
    command[2..6].copy_from_slice(&(BUFFER_SIZE as u32).to_be_bytes());
    submit(&mut crb, &command);
    assert_eq!(seen.lock().unwrap().started[0].len(), BUFFER_SIZE);
}

#[test]
fn a_backend_failure_is_a_failure_response_and_tpm_sts() {
    crate::virtio::testing::capture_logs();
    let (mut crb, seen) = crb();
    submit(&mut crb, &GET_RANDOM);
    seen.lock().unwrap().outcome = Some(Err(BackendError::Disconnected));
    assert_eq!(r32(&mut crb, CTRL_START), 0);
    assert_eq!(r32(&mut crb, CTRL_STS) & CTRL_STS_ERROR, CTRL_STS_ERROR);
    assert_eq!(rc(&buffer(&mut crb, 10)), TPM_RC_FAILURE);
    assert!(!crate::virtio::testing::logged("swtpm closed the connection").is_empty());
    // Later commands go to the backend again; tpmSts stays.
    w32(&mut crb, CTRL_START, INVOKE);
    assert_eq!(seen.lock().unwrap().started.len(), 2);
    seen.lock().unwrap().outcome = Some(Ok(vec![0x80, 0x01, 0, 0, 0, 10, 0, 0, 0, 0]));
    assert_eq!(r32(&mut crb, CTRL_START), 0);
    assert_eq!(rc(&buffer(&mut crb, 10)), 0);
    assert_eq!(r32(&mut crb, CTRL_STS) & CTRL_STS_ERROR, CTRL_STS_ERROR);
}

#[test]
fn a_response_that_does_not_fit_or_lies_about_its_size_fails_the_command() {
    let mut too_big = vec![0u8; BUFFER_SIZE + 1];
    too_big[..2].copy_from_slice(&[0x80, 0x01]);
    too_big[2..6].copy_from_slice(&(BUFFER_SIZE as u32 + 1).to_be_bytes());
    let bad = [
        too_big,
        vec![0x80, 0x01, 0, 0, 0, 20, 0, 0, 0, 0, 0, 0],
        vec![0x80, 0x01, 0, 0, 0, 4, 0, 0],
        vec![0x80, 0x01],
        Vec::new(),
    ];
    for response in bad {
        let (mut crb, seen) = crb();
        submit(&mut crb, &GET_RANDOM);
        let len = response.len();
        seen.lock().unwrap().outcome = Some(Ok(response));
        assert_eq!(r32(&mut crb, CTRL_START), 0);
        assert_eq!(rc(&buffer(&mut crb, 10)), TPM_RC_FAILURE, "{len} bytes");
        assert_eq!(r32(&mut crb, CTRL_STS) & CTRL_STS_ERROR, CTRL_STS_ERROR);
    }
}

#[test]
fn cancel_reaches_the_backend_only_while_a_command_runs() {
    let (mut crb, seen) = crb();
    w32(&mut crb, CTRL_CANCEL, INVOKE);
    assert_eq!(seen.lock().unwrap().cancels, 0);
    assert_eq!(r32(&mut crb, CTRL_CANCEL), INVOKE, "the register keeps it");
    w32(&mut crb, CTRL_CANCEL, 0);
    submit(&mut crb, &GET_RANDOM);
    w32(&mut crb, CTRL_CANCEL, INVOKE);
    assert_eq!(seen.lock().unwrap().cancels, 1);
    // The TPM's answer to a cancelled command is the response, whatever it is.
    seen.lock().unwrap().outcome = Some(Ok(error_response(0x909).to_vec()));
    assert_eq!(r32(&mut crb, CTRL_START), 0);
    assert_eq!(rc(&buffer(&mut crb, 10)), 0x909);
}

#[test]
fn an_eight_byte_write_sets_cancel_then_start() {
    let (mut crb, seen) = crb();
    w32(&mut crb, LOC_CTRL, LOC_CTRL_REQUEST_ACCESS);
    crb.write(DATA_BUFFER, &GET_RANDOM);
    crb.write(CTRL_CANCEL, &[0, 0, 0, 0, 1, 0, 0, 0]);
    assert_eq!(seen.lock().unwrap().started.len(), 1);
    assert_eq!(
        seen.lock().unwrap().cancels,
        0,
        "cancel came first, with nothing running"
    );
}

#[test]
fn odd_sizes_and_offsets_are_byte_exact_and_never_panic() {
    let (mut crb, seen) = crb();
    let mut bytes = [0u8; 4];
    for (i, byte) in bytes.iter_mut().enumerate() {
        let mut one = [0u8];
        crb.read(INTF_ID + i as u64, &mut one);
        *byte = one[0];
    }
    assert_eq!(u32::from_le_bytes(bytes), 0x0002_5811);
    let mut two = [0u8; 2];
    crb.read(INTF_ID + 1, &mut two);
    assert_eq!(two, [0x58, 0x02], "unaligned");
    // A 2-byte request and a 1-byte START work as the whole registers would.
    crb.write(LOC_CTRL, &[1, 0]);
    assert_eq!(r32(&mut crb, LOC_STATE), 0x82);
    crb.write(DATA_BUFFER, &GET_RANDOM);
    crb.write(CTRL_START + 1, &[1]);
    assert!(
        seen.lock().unwrap().started.is_empty(),
        "bit 8 is not START"
    );
    crb.write(CTRL_START, &[1]);
    assert_eq!(seen.lock().unwrap().started.len(), 1);
    // The buffer's last byte, and accesses past the page.
    crb.write(PAGE_SIZE - 1, &[0x5a]);
    let mut last = [0u8];
    crb.read(PAGE_SIZE - 1, &mut last);
    assert_eq!(last, [0x5a]);
    let mut across = [0u8; 8];
    crb.read(PAGE_SIZE - 4, &mut across);
    assert_eq!(&across[4..], &[0xff; 4]);
    crb.write(PAGE_SIZE - 2, &[1; 8]);
    crb.write(u64::MAX - 2, &[1; 8]);
    crb.read(u64::MAX - 2, &mut across);
    assert_eq!(&across[3..], &[0xff; 5]);
    crb.write(0x7e, &[1, 1, 1, 1]);
    crb.read(0x7e, &mut across);
}

#[test]
fn the_buffer_registers_are_read_only() {
    let (mut crb, _) = crb();
    for register in [
        CTRL_CMD_SIZE,
        CTRL_CMD_LADDR,
        CTRL_CMD_HADDR,
        CTRL_RSP_SIZE,
        CTRL_RSP_ADDR,
        LOC_STATE,
        INTF_ID,
        CTRL_STS,
    ] {
        let before = r32(&mut crb, register);
        w32(&mut crb, register, 0x1234_5678);
        assert_eq!(r32(&mut crb, register), before, "{register:#x}");
    }
}
