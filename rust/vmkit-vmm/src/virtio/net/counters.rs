//! virtio-net's counters: Cloud Hypervisor's four, and what was dropped.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// Cloud Hypervisor's counters (`rx_bytes rx_frames tx_bytes tx_frames`,
/// payload bytes without the virtio-net header) plus what was dropped.
#[derive(Debug, Default)]
pub struct NetCounters {
    pub rx_bytes: AtomicU64,
    pub rx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub tx_frames: AtomicU64,
    /// Tap frames not delivered: no buffer could ever hold them, or they
    /// were shorter than a header, or the device was reset while one waited.
    pub rx_dropped: AtomicU64,
    /// Guest chains not sent: malformed, or refused by the tap.
    pub tx_dropped: AtomicU64,
    /// Receive chains returned unused because they were malformed.
    pub rx_bad_chains: AtomicU64,
}

impl NetCounters {
    /// The counters under Cloud Hypervisor's names.
    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        BTreeMap::from([
            ("rx_bytes", self.rx_bytes.load(Ordering::Relaxed)),
            ("rx_frames", self.rx_frames.load(Ordering::Relaxed)),
            ("tx_bytes", self.tx_bytes.load(Ordering::Relaxed)),
            ("tx_frames", self.tx_frames.load(Ordering::Relaxed)),
        ])
    }

    pub(super) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}
