"""The VMM's Rust log records, in Python's ``logging``.

Records logged in Rust (vCPU and device threads included) reach the logger
named after their Rust module: ``vmkit_vmm::virtio::block`` logs to
``vmkit.vmm.virtio.block``, other crates to ``vmkit.<crate>...``; all are
children of the ``vmkit`` logger, so ``logging.getLogger("vmkit")`` (what
``vmkit -v`` and ``--log-file`` configure) sees them all. Rust levels map to
``ERROR``, ``WARNING``, ``INFO``, ``DEBUG`` and ``TRACE`` (5).

Rust threads never wait for Python: a record goes into a bounded queue that
one thread drains into ``logging``; when the queue is full the record is
dropped and a later warning says how many were. Rust skips records below the
level of the ``vmkit`` loggers as they stood when the last VM was created (or
``sync_level()`` was last called): call it after lowering a level while a VM
runs.
"""

from __future__ import annotations

import sys

from vmkit import _native

TYPE_CHECKING = False
if TYPE_CHECKING:
    import logging
    from collections.abc import Callable

__all__ = ["TRACE", "LazyLogger", "flush", "sync_level"]

#: Rust's ``trace`` level, below ``DEBUG``.
TRACE = 5

# log::Level as a number (1 = error ... 5 = trace) → Python level
# (logging's NOTSET, ERROR, WARNING, INFO, DEBUG, then TRACE).
_LEVELS = (0, 40, 30, 20, 10, TRACE)

#: The level of a ``vmkit`` logger while nobody has imported ``logging``:
#: the root logger's default, WARNING.
_UNCONFIGURED_LEVEL = 30

_installed = False
_on_logging_import: Callable[[], None] | None = None
_loggers: dict[str, logging.Logger] = {}


def when_logging_imported(callback: Callable[[], None] | None) -> None:
    """Runs ``callback`` (which configures logging) once Rust logs its first
    record, or now if ``logging`` is imported already; None cancels it.

    For a program that must not pay for ``logging`` until something is
    logged (the ``vmkit`` CLI without ``-v``); until then ``vmkit`` loggers
    count as unconfigured (WARNING).
    """
    global _on_logging_import
    if callback is not None and "logging" in sys.modules:
        _on_logging_import = None
        callback()
    else:
        _on_logging_import = callback


class LazyLogger:
    """``logging.getLogger(name)`` for the methods vmkit calls, importing
    ``logging`` (~6 ms) only for a record that can be emitted: while nobody
    has imported it, ``vmkit`` loggers are at WARNING, so an INFO or DEBUG
    record is dropped without it. Records name the caller's file and line.
    The import also gives the ``vmkit`` logger a NullHandler: a program that
    configures no logging gets no vmkit warnings on stderr (``lastResort``)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._logger: logging.Logger | None = None

    def _get(self) -> logging.Logger:
        if self._logger is None:
            _import_logging()
            import logging

            vmkit_logger = logging.getLogger("vmkit")
            if not any(isinstance(h, logging.NullHandler) for h in vmkit_logger.handlers):
                vmkit_logger.addHandler(logging.NullHandler())
            self._logger = logging.getLogger(self.name)
        return self._logger

    def _may_emit(self, level: int) -> bool:
        return self._logger is not None or level >= _UNCONFIGURED_LEVEL or "logging" in sys.modules

    def debug(self, message: str, *args: object) -> None:
        if self._may_emit(10):
            self._get().debug(message, *args, stacklevel=2)

    def info(self, message: str, *args: object) -> None:
        if self._may_emit(20):
            self._get().info(message, *args, stacklevel=2)

    def warning(self, message: str, *args: object) -> None:
        self._get().warning(message, *args, stacklevel=2)

    def error(self, message: str, *args: object) -> None:
        self._get().error(message, *args, stacklevel=2)

    def exception(self, message: str, *args: object) -> None:
        """As ``Logger.exception``: call it from an ``except`` block."""
        # error(), not exception(): Python 3.10 counts exception()'s own
        # frame in stacklevel, and would name this file.
        self._get().error(message, *args, exc_info=True, stacklevel=2)


def _import_logging() -> None:
    """Imports ``logging`` on first need (a boot that logs nothing never does)."""
    global _on_logging_import
    import logging

    if logging.getLevelName(TRACE) != "TRACE":
        logging.addLevelName(TRACE, "TRACE")
    callback, _on_logging_import = _on_logging_import, None
    if callback is not None:
        callback()


def _logger_for(target: str) -> logging.Logger:
    """The logger of a Rust log target (``vmkit_vmm::vcpu`` → ``vmkit.vmm.vcpu``)."""
    logger = _loggers.get(target)
    if logger is None:
        import logging

        parts = target.split("::")
        crate = parts[0].removeprefix("vmkit_")
        if crate == "vmkit":
            crate = ""
        name = ".".join(p for p in ["vmkit", crate, *parts[1:]] if p)
        logger = _loggers[target] = logging.getLogger(name)
    return logger


def _emit(batch: list[tuple[int, str, str, str | None, int | None, str]], dropped: int) -> None:
    """Hands a batch of Rust records to their loggers (on the log thread)."""
    _import_logging()
    import logging

    for level_number, target, message, file, line, thread in batch:
        level = _LEVELS[level_number] if 0 < level_number < len(_LEVELS) else logging.ERROR
        logger = _logger_for(target)
        if not logger.isEnabledFor(level):
            continue
        record = logger.makeRecord(logger.name, level, file or "", line or 0, message, (), None)
        record.threadName = thread
        logger.handle(record)
    if dropped:
        logging.getLogger("vmkit").warning(
            "%d log records from the VMM were dropped: Python's logging did not keep up", dropped
        )


def _lowest_level() -> int:
    """The lowest effective level of the ``vmkit`` logger and its descendants."""
    if "logging" not in sys.modules:
        return _UNCONFIGURED_LEVEL  # nothing can have configured a logger yet
    _import_logging()
    import logging

    level = logging.getLogger("vmkit").getEffectiveLevel()
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if name.startswith("vmkit.") and isinstance(logger, logging.Logger):
            level = min(level, logger.getEffectiveLevel())
    if logging.root.manager.disable >= level:
        level = logging.root.manager.disable + 1
    return level


def sync_level() -> None:
    """Lets Rust pass the records that the ``vmkit`` loggers now want (and
    starts routing them to Python on first use)."""
    global _installed
    if not _installed:
        import atexit

        _native.install_logging(_emit)
        atexit.register(_stop)
        _installed = True
    _native.set_log_level(_lowest_level())


def flush(timeout: float = 1.0) -> bool:
    """Waits until the records Rust has logged so far reached their loggers
    (or were dropped); False when ``timeout`` seconds were not enough."""
    return _native.flush_logs(timeout)


def _stop() -> None:
    _native.flush_logs(0.5)
    _native.stop_logging()
