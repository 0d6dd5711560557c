//! Merging: buffered reads or writes of one batch that continue one another
//! on the disk run as one readv or pwritev.

use super::request::{Op, Request};

/// Most bytes of contiguous requests merged into one readv or writev.
pub const MERGE_LIMIT: u64 = 32 << 20;

/// `requests` (reads or writes) sorted by offset and cut into runs that
/// continue one another on the disk, each at most `MERGE_LIMIT` bytes (or one
/// request).
pub fn contiguous_runs(mut requests: Vec<Request>) -> Vec<Vec<Request>> {
    let span = |op: &Op| match op {
        Op::Read { offset, len, .. } | Op::Write { offset, len, .. } => (*offset, *len),
        _ => (u64::MAX, 0),
    };
    requests.sort_by_key(|r| span(&r.op).0);
    let mut runs: Vec<Vec<Request>> = Vec::new();
    let mut run_bytes = 0;
    for request in requests {
        let (offset, len) = span(&request.op);
        let joins = runs.last().and_then(|run| run.last()).is_some_and(|last| {
            let (start, last_len) = span(&last.op);
            start.checked_add(last_len) == Some(offset) && run_bytes + len <= MERGE_LIMIT
        });
        match runs.last_mut() {
            Some(run) if joins => run.push(request),
            _ => {
                runs.push(vec![request]);
                run_bytes = 0;
            }
        }
        run_bytes += len;
    }
    runs
}
