"""Rust log records reach Python's logging without making VMM threads wait."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from vmkit import VmConfig, _native, logs, testguest
from vmkit.vm import Vm


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def vmkit_logger() -> Iterator[tuple[logging.Logger, Collect]]:
    logger = logging.getLogger("vmkit")
    handler = Collect()
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield logger, handler
    finally:
        logs.flush()
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
        logs.sync_level()


def test_a_rust_warning_reaches_a_python_handler(
    vmkit_logger: tuple[logging.Logger, Collect],
) -> None:
    logger, handler = vmkit_logger
    logger.setLevel(logging.INFO)
    logs.sync_level()
    _native.test_hook_log("warn", "disk is on fire", 1)
    _native.test_hook_log("error", "and the spare too", 1)
    _native.test_hook_log("debug", "below the level", 1)
    assert logs.flush(5)
    got = [(r.name, r.levelno, r.getMessage(), r.threadName) for r in handler.records]
    assert got == [
        ("vmkit.py.test_hook", logging.WARNING, "disk is on fire", "vmkit-test-log"),
        ("vmkit.py.test_hook", logging.ERROR, "and the spare too", "vmkit-test-log"),
    ]
    assert handler.records[0].pathname.endswith("logging.rs")
    assert handler.records[0].lineno > 0


def test_levels_map_and_follow_the_python_level(
    vmkit_logger: tuple[logging.Logger, Collect],
) -> None:
    logger, handler = vmkit_logger
    logger.setLevel(logs.TRACE)
    logs.sync_level()
    for level in ("error", "warn", "info", "debug", "trace"):
        _native.test_hook_log(level, level, 1)
    assert logs.flush(5)
    levels = [r.levelno for r in handler.records]
    assert levels == [logging.ERROR, logging.WARNING, logging.INFO, logging.DEBUG, logs.TRACE]
    assert [r.levelname for r in handler.records][-1] == "TRACE"
    # A child logger that asks for more lowers what Rust passes.
    handler.records.clear()
    logger.setLevel(logging.WARNING)
    child = logging.getLogger("vmkit.py.test_hook")
    child.setLevel(logging.DEBUG)
    try:
        logs.sync_level()
        _native.test_hook_log("debug", "wanted by the child", 1)
        assert logs.flush(5)
        assert [r.getMessage() for r in handler.records] == ["wanted by the child"]
    finally:
        child.setLevel(logging.NOTSET)


@pytest.mark.vmkit_kvm
def test_a_full_queue_drops_records_and_the_vm_still_runs(
    vmkit_logger: tuple[logging.Logger, Collect],
) -> None:
    logger, handler = vmkit_logger
    logger.setLevel(logging.INFO)
    logs.sync_level()
    release = threading.Event()
    entered = threading.Event()

    class Stuck(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            entered.set()
            release.wait(60)

    stuck = Stuck()
    logger.addHandler(stuck)
    try:
        _native.test_hook_log("warn", "first", 1)
        assert entered.wait(10), "the log thread never called the handler"
        # The log thread is stuck in Python: Rust threads must not wait for it.
        started = time.monotonic()
        _native.test_hook_log("warn", "flood", 10_000)
        assert time.monotonic() - started < 5, "logging waited for the stuck handler"
        cfg = VmConfig.from_cli(
            ["--kernel", str(testguest.image_path("pvh")),
             "--cmdline", testguest.cmdline(["hello"]),
             "--memory", "size=128M", "--console", "off"]
        )  # fmt: skip
        with Vm(cfg) as vm:
            vm.boot()
            exit_info = vm.wait(30)
        assert exit_info is not None and exit_info.reason == "poweroff"
    finally:
        release.set()
        assert logs.flush(10)
        logger.removeHandler(stuck)
    floods = [r for r in handler.records if r.getMessage() == "flood"]
    dropped = [r for r in handler.records if "were dropped" in r.getMessage()]
    assert 0 < len(floods) < 10_000
    assert dropped, "no warning said records were dropped"
    reported = sum(int(r.getMessage().split()[0]) for r in dropped)
    assert len(floods) + reported == 10_000


def test_quiet_cli_imports_logging_only_when_rust_logs() -> None:
    # The CLI without -v sets its log handler up on the first Rust record: a
    # quiet boot never pays for importing logging, a warning still reads as v37's.
    code = (
        "import sys\n"
        "from vmkit import cli, logs, _native\n"
        "cli.setup_logging(0, None, lazy=True)\n"
        "logs.sync_level()\n"
        "before = 'logging' in sys.modules\n"
        "_native.test_hook_log('info', 'below the level', 1)\n"
        "_native.test_hook_log('warn', 'disk is on fire', 1)\n"
        "assert logs.flush(5)\n"
        "print(before, 'logging' in sys.modules)\n"
    )
    result = run_python(code)
    assert result.stdout.split() == ["False", "True"]
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("vmkit: ") and "<vmkit-test-log> WARN:" in lines[0]
    assert lines[0].endswith(" -- disk is on fire"), lines[0]


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    # -S: no site-packages hooks, which in some environments import logging themselves.
    python_dir = os.path.dirname(os.path.dirname(os.path.abspath(logs.__file__)))
    return subprocess.run(
        [sys.executable, "-S", "-c", code],
        env={**os.environ, "PYTHONPATH": python_dir},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def test_the_api_path_imports_logging_only_for_a_record_it_emits() -> None:
    # vmkit.api and vmkit.vmm (`vmkit --api-socket`) log each request at INFO:
    # unconfigured, that is below the level, and costs no import of logging.
    # A warning imports it and, with no logging configured, stays off stderr.
    result = run_python(
        "import sys\n"
        "import vmkit.api, vmkit.vmm\n"
        "from vmkit.logs import LazyLogger\n"
        "log = LazyLogger('vmkit.api')\n"
        "log.info('request %s', 'GET')\n"
        "log.debug('detail')\n"
        "before = 'logging' in sys.modules\n"
        "log.warning('disk is on fire')\n"
        "print(before, 'logging' in sys.modules)\n"
    )
    assert result.stdout.split() == ["False", "True"]
    assert result.stderr == ""


def test_a_lazy_loggers_records_name_their_caller(
    vmkit_logger: tuple[logging.Logger, Collect],
) -> None:
    logger, handler = vmkit_logger
    logger.setLevel(logging.DEBUG)
    log = logs.LazyLogger("vmkit.api")
    log.info("request %s %s", "GET", "/api/v1/vmm.ping")
    line = sys._getframe().f_lineno - 1
    try:
        raise OSError("gone")
    except OSError:
        log.exception("connection failed")
    info, failure = handler.records
    assert (info.name, info.levelno, info.getMessage()) == (
        "vmkit.api",
        logging.INFO,
        "request GET /api/v1/vmm.ping",
    )
    assert (info.filename, info.lineno) == ("test_logging.py", line)
    assert failure.levelno == logging.ERROR and failure.exc_info is not None
    assert failure.filename == "test_logging.py"
