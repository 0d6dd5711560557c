//! Cloud Hypervisor's per-disk counters (`vm.counters`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Cloud Hypervisor's per-disk counters, readable while the workers run.
/// Only successful reads and writes count; latencies are in microseconds.
#[derive(Debug, Default)]
pub struct BlockCounters {
    read_bytes: AtomicU64,
    write_bytes: AtomicU64,
    read_ops: AtomicU64,
    write_ops: AtomicU64,
    read_latency: Latency,
    write_latency: Latency,
}

#[derive(Debug)]
struct Latency {
    min: AtomicU64,
    max: AtomicU64,
    total: AtomicU64,
}

impl Default for Latency {
    fn default() -> Self {
        Latency {
            min: AtomicU64::new(u64::MAX),
            max: AtomicU64::new(0),
            total: AtomicU64::new(0),
        }
    }
}

impl Latency {
    fn record(&self, micros: u64) {
        self.min.fetch_min(micros, Ordering::Relaxed);
        self.max.fetch_max(micros, Ordering::Relaxed);
        self.total.fetch_add(micros, Ordering::Relaxed);
    }

    /// (min, max, avg) as Cloud Hypervisor reports them: before the first
    /// operation its min and max are u64::MAX and its average, kept scaled
    /// by 10,000 and starting at u64::MAX, reads u64::MAX / 10,000.
    fn report(&self, ops: u64) -> (u64, u64, u64) {
        if ops == 0 {
            return (u64::MAX, u64::MAX, u64::MAX / 10_000);
        }
        let total = self.total.load(Ordering::Relaxed);
        (
            self.min.load(Ordering::Relaxed),
            self.max.load(Ordering::Relaxed),
            total / ops,
        )
    }
}

impl BlockCounters {
    pub(super) fn record(&self, write: bool, bytes: u64, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let (bytes_counter, ops, stats) = if write {
            (&self.write_bytes, &self.write_ops, &self.write_latency)
        } else {
            (&self.read_bytes, &self.read_ops, &self.read_latency)
        };
        bytes_counter.fetch_add(bytes, Ordering::Relaxed);
        ops.fetch_add(1, Ordering::Relaxed);
        stats.record(micros);
    }

    /// The counters under Cloud Hypervisor's names.
    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let read_ops = load(&self.read_ops);
        let write_ops = load(&self.write_ops);
        let (read_min, read_max, read_avg) = self.read_latency.report(read_ops);
        let (write_min, write_max, write_avg) = self.write_latency.report(write_ops);
        BTreeMap::from([
            ("read_bytes", load(&self.read_bytes)),
            ("write_bytes", load(&self.write_bytes)),
            ("read_ops", read_ops),
            ("write_ops", write_ops),
            ("read_latency_min", read_min),
            ("read_latency_max", read_max),
            ("read_latency_avg", read_avg),
            ("write_latency_min", write_min),
            ("write_latency_max", write_max),
            ("write_latency_avg", write_avg),
        ])
    }
}
