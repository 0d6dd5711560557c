"""The API server under hostile clients: it can be neither locked out nor made to spin.

Clients that connect and send nothing, or trickle a request head byte by byte,
must not keep the owner from being answered; running out of file descriptors
must not turn the accept loop into a busy loop.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from _http import read_reply
from vmkit import api
from vmkit.api import ApiServer
from vmkit.vmm import Vmm

ROOT = Path(__file__).resolve().parent.parent
PING = b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n"


def connect(path: Path, timeout: float = 10) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # blocking: with a timeout set, a full listen backlog fails at once (EAGAIN)
        sock.connect(os.fspath(path))
    except BaseException:
        sock.close()
        raise
    sock.settimeout(timeout)
    return sock


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def timed_ping(path: Path) -> float:
    """Seconds from connect to a 200 answer to vmm.ping on a new connection."""
    started = time.monotonic()
    with connect(path) as sock:
        sock.sendall(PING)
        assert read_reply(sock).status == 200
    return time.monotonic() - started


def server_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name in ("http-server", "http-client")}


@contextmanager
def running(path: Path, **options: Any) -> Iterator[ApiServer]:
    """An in-process server; on exit it is closed and all its threads have ended."""
    before = server_threads()
    vmm = Vmm()
    server = ApiServer(vmm, path, **options)
    try:
        server.start()
        yield server
    finally:
        server.close()
        vmm.close()
        deadline = time.monotonic() + 10
        while server_threads() - before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not server_threads() - before, "server threads left behind"


def test_silent_and_trickling_clients_do_not_lock_out_the_owner(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    silent: list[socket.socket] = []
    stop = threading.Event()
    trickle_closed = threading.Event()

    def slowloris() -> None:
        with connect(path) as sock:
            for byte in PING:
                if stop.wait(0.5):
                    return
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    trickle_closed.set()
                    return
            if closed_by_server(sock, 5):
                trickle_closed.set()

    trickler = threading.Thread(target=slowloris)
    with running(path, header_timeout=2.0):
        try:
            trickler.start()
            started = time.monotonic()
            for _ in range(300):
                silent.append(connect(path))
            # the owner is answered at once, while all of them are still connected
            assert timed_ping(path) < 1.0
            assert timed_ping(path) < 1.0
            # nobody can hold a connection without sending a request head for long
            assert trickle_closed.wait(5), "the slowloris was not cut off"
            assert closed_by_server(silent[-1], 5), "a silent client was not cut off"
            assert time.monotonic() - started < 6
            assert timed_ping(path) < 1.0
        finally:
            stop.set()
            trickler.join(10)
            for sock in silent:
                sock.close()
    assert not trickler.is_alive()


def test_when_full_the_longest_idle_connection_makes_room(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    with running(path, max_connections=4) as server:
        oldest, *others = [connect(path) for _ in range(4)]
        try:
            deadline = time.monotonic() + 5
            while len(server._connections) < 4 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert timed_ping(path) < 1.0
            assert closed_by_server(oldest, 5)
            for sock in others:  # the younger ones are still served
                sock.sendall(PING)
                assert read_reply(sock).status == 200
        finally:
            oldest.close()
            for sock in others:
                sock.close()


def test_an_idle_keep_alive_connection_is_closed_after_idle_timeout(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    with running(path, idle_timeout=0.5, header_timeout=5.0):
        with connect(path) as sock:
            sock.sendall(PING)
            assert read_reply(sock).status == 200
            time.sleep(0.2)  # idle, but not long: still usable
            sock.sendall(PING)
            assert read_reply(sock).status == 200
            started = time.monotonic()
            assert closed_by_server(sock, 5)
            assert 0.3 < time.monotonic() - started < 3


SERVER_WITH_FEW_FDS = """
import os, resource, sys
from vmkit import api
from vmkit.api import ApiServer
from vmkit.vmm import Vmm
vmm = Vmm()
server = ApiServer(vmm, sys.argv[1], header_timeout=60.0)
server.start()
limit = len(os.listdir("/proc/self/fd")) + 16
_soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
print(limit, flush=True)
sys.stdin.read()
server.close()
vmm.close()
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    # utime and stime are fields 14 and 15 of proc(5); the split starts at field 3
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads CPU time from /proc")
def test_out_of_file_descriptors_the_server_waits_instead_of_spinning(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER_WITH_FEW_FDS, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=ROOT,
        text=True,
    )
    clients: list[socket.socket] = []
    try:
        assert proc.stdout is not None and proc.stdin is not None
        limit = int(proc.stdout.readline())
        # fill the server's fd table; the last clients wait in the listen backlog
        fd_dir = Path(f"/proc/{proc.pid}/fd")
        for _ in range(16 + 8):
            clients.append(connect(path))
        deadline = time.monotonic() + 10
        while len(os.listdir(fd_dir)) < limit and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(os.listdir(fd_dir)) >= limit, "the server's fd table did not fill"
        time.sleep(0.3)
        before = cpu_seconds(proc.pid)
        started = time.monotonic()
        time.sleep(2)
        used = cpu_seconds(proc.pid) - before
        share = used / (time.monotonic() - started)
        assert share < 0.10, f"the server used {share:.0%} of a CPU while out of fds"
        # once fds come free, the server serves again (the backlog first, then this one)
        for sock in clients:
            sock.close()
        clients.clear()
        assert timed_ping(path) < 2.0
        proc.stdin.close()
        assert proc.wait(10) == 0
    finally:
        for sock in clients:
            sock.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


def test_closing_the_server_lets_an_answer_in_progress_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The VMM exiting (a guest that powers off right after vm.boot) while a
    request is being answered: the client still gets the whole answer."""
    path = tmp_path / "api.sock"
    with running(path) as server:
        answering = threading.Event()
        dispatch = server.router.dispatch

        def slow_dispatch(request: Any) -> Any:
            answering.set()
            time.sleep(0.3)
            return dispatch(request)

        monkeypatch.setattr(server.router, "dispatch", slow_dispatch)
        with connect(path) as sock, connect(path) as idle:
            sock.sendall(PING)
            assert answering.wait(10)
            server.close()  # while the answer is being made
            assert read_reply(sock).status == 200
            assert closed_by_server(idle, 5), "an idle connection stays open after close"


def test_a_connection_thread_serves_the_next_connections_then_ends_when_idle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ch-remote opens a connection per request: one thread answers them one
    after the other (no thread started per request), several at once get
    threads of their own, and threads left waiting end after WORKER_IDLE."""
    monkeypatch.setattr(api, "WORKER_IDLE", 0.5)
    path = tmp_path / "api.sock"
    with running(path) as server:
        before = {t for t in server_threads() if t.name == "http-client"}
        seen: set[threading.Thread] = set()
        for _ in range(20):
            timed_ping(path)
            seen |= {t for t in server_threads() if t.name == "http-client"} - before
            # The thread sees the client's close, then waits for the next connection.
            deadline = time.monotonic() + 10
            while server._idle_workers != 1:
                assert time.monotonic() < deadline, "the thread never waited for more"
                time.sleep(0.001)
        assert len(seen) == 1, seen
        # Three connections open at once: three threads.
        socks = [connect(path) for _ in range(3)]
        try:
            for sock in socks:
                sock.sendall(PING)
            for sock in socks:
                assert read_reply(sock).status == 200
        finally:
            for sock in socks:
                sock.close()
        assert len({t for t in server_threads() if t.name == "http-client"} - before) == 3
        deadline = time.monotonic() + 10
        while {t for t in server_threads() if t.name == "http-client"} - before:
            assert time.monotonic() < deadline, "idle connection threads never ended"
            time.sleep(0.05)
        assert timed_ping(path) < 10  # and a new connection is served again
