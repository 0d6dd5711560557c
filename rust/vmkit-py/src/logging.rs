//! Rust `log` records into Python's `logging`, without VMM threads ever
//! waiting for the GIL: `log!` on any thread formats the record and offers it
//! to a bounded queue (dropped and counted when full); one drain thread takes
//! the GIL and hands batches to a Python function (`vmkit.logs._emit`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

/// Records waiting for the drain thread; beyond this they are dropped.
const QUEUE_CAPACITY: usize = 4096;
/// Records handed to Python per GIL acquisition, at most.
const BATCH: usize = 256;

/// (log level as 1 = error … 5 = trace, target, message, file, line, thread name)
type Record = (
    usize,
    String,
    String,
    Option<&'static str>,
    Option<u32>,
    String,
);

struct QueueLogger {
    queue: SyncSender<Record>,
    accepted: AtomicU64,
    /// Delivered to Python or dropped: all of `accepted` once the queue is idle.
    done: AtomicU64,
    dropped_since_report: AtomicU64,
    stopped: AtomicBool,
    /// Set in a VM process (`child`): no Python there, records go to stderr.
    to_stderr: AtomicBool,
}

static LOGGER: OnceLock<&'static QueueLogger> = OnceLock::new();

impl log::Log for QueueLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) || self.stopped.load(Ordering::Relaxed) {
            return;
        }
        if self.to_stderr.load(Ordering::Relaxed) {
            write_stderr(record);
            return;
        }
        let thread = thread::current();
        let entry: Record = (
            record.level() as usize,
            record.target().to_owned(),
            record.args().to_string(),
            record.file_static(),
            record.line(),
            thread.name().unwrap_or("anonymous").to_owned(),
        );
        self.accepted.fetch_add(1, Ordering::Relaxed);
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.queue.try_send(entry)
        {
            self.dropped_since_report.fetch_add(1, Ordering::Relaxed);
            self.done.fetch_add(1, Ordering::Release);
        }
    }

    fn flush(&self) {}
}

fn drain(logger: &'static QueueLogger, records: Receiver<Record>, emit: Py<PyAny>) {
    while let Ok(first) = records.recv() {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match records.try_recv() {
                Ok(record) => batch.push(record),
                Err(_) => break,
            }
        }
        let count = batch.len() as u64;
        let dropped = logger.dropped_since_report.swap(0, Ordering::Relaxed);
        if !logger.stopped.load(Ordering::Relaxed) {
            let delivered = Python::try_attach(|py| {
                if let Err(e) = emit.call1(py, (batch, dropped)) {
                    e.write_unraisable(py, None);
                }
            });
            if delivered.is_none() {
                // The interpreter is finalizing: nothing can take records any more.
                logger.stopped.store(true, Ordering::Relaxed);
            }
        }
        logger.done.fetch_add(count, Ordering::Release);
    }
}

/// Routes the `log` records of every Rust thread to `emit(batch, dropped)`
/// (called on one drain thread with the GIL). Only the first call installs.
#[pyfunction]
pub fn install_logging(emit: Bound<'_, PyAny>) -> PyResult<()> {
    let mut result = Ok(());
    LOGGER.get_or_init(|| {
        let (queue, records) = mpsc::sync_channel(QUEUE_CAPACITY);
        let logger: &'static QueueLogger = Box::leak(Box::new(QueueLogger {
            queue,
            accepted: AtomicU64::new(0),
            done: AtomicU64::new(0),
            dropped_since_report: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
            to_stderr: AtomicBool::new(false),
        }));
        if let Err(e) = log::set_logger(logger) {
            result = Err(PyRuntimeError::new_err(format!(
                "another Rust logger is installed: {e}"
            )));
        }
        let emit = emit.unbind();
        let spawned = thread::Builder::new()
            .name("vmkit-log".to_owned())
            .spawn(move || drain(logger, records, emit));
        if let Err(e) = spawned {
            result = Err(PyRuntimeError::new_err(format!(
                "cannot start the log thread: {e}"
            )));
        }
        logger
    });
    result
}

/// Passes records at `level` (a Python logging level) and above; above
/// CRITICAL nothing is passed.
#[pyfunction]
pub fn set_log_level(level: i64) {
    let filter = match level {
        i64::MIN..=5 => log::LevelFilter::Trace,
        6..=10 => log::LevelFilter::Debug,
        11..=20 => log::LevelFilter::Info,
        21..=30 => log::LevelFilter::Warn,
        31..=50 => log::LevelFilter::Error,
        _ => log::LevelFilter::Off,
    };
    log::set_max_level(filter);
}

/// Waits (without the GIL) until the records logged so far reached Python or
/// were dropped; False on timeout.
#[pyfunction]
pub fn flush_logs(py: Python<'_>, timeout: f64) -> PyResult<bool> {
    let Some(logger) = LOGGER.get() else {
        return Ok(true);
    };
    let timeout = Duration::try_from_secs_f64(timeout)
        .map_err(|_| PyValueError::new_err(format!("invalid timeout {timeout}")))?;
    let target = logger.accepted.load(Ordering::Relaxed);
    let deadline = Instant::now() + timeout;
    Ok(py.detach(|| loop {
        if logger.done.load(Ordering::Acquire) >= target {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(1));
    }))
}

/// Stops handing records to Python (at interpreter exit); later ones are dropped.
#[pyfunction]
pub fn stop_logging() {
    if let Some(logger) = LOGGER.get() {
        logger.stopped.store(true, Ordering::Relaxed);
    }
}

/// Test hook: logs `count` records at `level` ("error" … "trace") from a new
/// Rust thread named `vmkit-test-log`, as a VMM thread would; returns when
/// that thread has logged them all.
#[pyfunction]
pub fn test_hook_log(py: Python<'_>, level: &str, message: &str, count: usize) -> PyResult<()> {
    let level: log::Level = level
        .parse()
        .map_err(|_| PyValueError::new_err(format!("unknown log level {level:?}")))?;
    let message = message.to_owned();
    py.detach(move || {
        thread::Builder::new()
            .name("vmkit-test-log".to_owned())
            .spawn(move || {
                for _ in 0..count {
                    log::log!(target: "vmkit_py::test_hook", level, "{message}");
                }
            })
            .map_err(|e| PyRuntimeError::new_err(e.to_string()))?
            .join()
            .map_err(|_| PyRuntimeError::new_err("the test log thread panicked"))
    })
}

/// When the process's stderr log began (`log_to_stderr`).
static STDERR_START: OnceLock<Instant> = OnceLock::new();

/// Writes `record` to stderr as the `vmkit` command's log handler does:
/// `vmkit: <elapsed>: <<thread>> <LEVEL>:<file>:<line> -- <message>`.
fn write_stderr(record: &log::Record<'_>) {
    use std::io::Write;

    let elapsed = STDERR_START.get_or_init(Instant::now).elapsed();
    let thread = thread::current();
    let name = thread.name().unwrap_or("anonymous");
    let line = match (record.file(), record.line()) {
        (Some(file), Some(line)) => format!(
            "vmkit: {elapsed:.6?}: <{name}> {}:{file}:{line} -- {}\r\n",
            record.level(),
            record.args()
        ),
        _ => format!(
            "vmkit: {elapsed:.6?}: <{name}> {}:{} -- {}\r\n",
            record.level(),
            record.target(),
            record.args()
        ),
    };
    // One write per record, so that lines of different threads do not mix.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            write_stderr(record);
        }
    }

    fn flush(&self) {}
}

/// In a process without Python (a VM process): every record from now on goes
/// to stderr at `level` and above, whether or not the Python bridge was
/// installed before the fork (its drain thread did not survive it).
pub(crate) fn log_to_stderr(level: log::LevelFilter) {
    STDERR_START.get_or_init(Instant::now);
    match LOGGER.get() {
        Some(logger) => logger.to_stderr.store(true, Ordering::Relaxed),
        None => {
            static STDERR_LOGGER: StderrLogger = StderrLogger;
            let _ = log::set_logger(&STDERR_LOGGER);
        }
    }
    log::set_max_level(level);
}
