"""A pre-started VMM interpreter that forks one VMM process per ``Vm.spawn``.

Starting ``python -m vmkit`` for each VM costs a fresh interpreter and a cold
import (~100 ms, ~9 MiB private memory each). The fork server pays that once:
it imports everything the VMM's API path needs, freezes those objects out of
the garbage collector's reach (so that forks keep sharing their pages), and
then, for each spawn, forks a process that becomes ``vmkit --api-socket``
(``fork``). VM processes (``fork_vm``; ``_vmproc``), which never run Python,
come from the VM forker instead: a small isolated interpreter (``python -I
-S``, importing only the extension) that the server starts once, before it
imports the VMM's Python, and that then serves requests in Rust, so that the
few pages VM processes share with it stay shared (the server's Python writes
many of its pages while it handles each request).

The fork is ``clone(CLONE_PARENT)``: the VMM is the *caller's* child, not the
server's. The caller waits for it and reads its exit status as for any child
(``ForkedProcess``); the server holds nothing of it, so the server's death
touches no running VMM. Each VMM starts as a fresh one would: only its log
(stdout and stderr), /dev/null (stdin) and the lifeline pipe open; default
signal dispositions and mask; the caller's environment, working directory,
umask, CPU affinity and niceness as they are at the spawn.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import Any

__all__ = ["ForkServer", "ForkedProcess", "shared_server"]

#: Where the forked VMM finds the lifeline pipe and the ready pipe (after
#: stdin, stdout and stderr).
LIFELINE_FD = 3
READY_FD = 4
_READY = b"ready"
_PER_VMM_VARIABLES = ("VMKIT_SPAWN_DIR", "VMKIT_LIFELINE_FD", "VMKIT_READY_FD")
_MAX_MESSAGE = 1 << 20

#: The server's entry point; as the spawned VMM's, without the current
#: directory on ``sys.path`` (``-c`` puts it first).
_SERVER_MAIN = (
    "import gc, sys\n"
    "gc.disable()\n"  # no collection leaves holes in pages that forks would then fill
    "if not getattr(sys.flags, 'safe_path', False): del sys.path[0]\n"
    "from vmkit._forkserver import serve\n"
    "serve(int(sys.argv[1]), int(sys.argv[2]))\n"
)


#: The VM forker's interpreter: isolated (no site, no PYTHON* variables),
#: it imports this vmkit's extension only.
_FORKER_MAIN = (
    "import sys\n"
    "sys.path[:0] = [sys.argv[2]]\n"
    "from vmkit._native import vm_forker_main\n"
    "vm_forker_main(int(sys.argv[1]))\n"
)


def startup_environment(env: Mapping[str, str]) -> dict[str, str]:
    """The variables Python reads when it starts (``PYTHON*``): a fork of a
    server started with other values would not be what a fresh start gives."""
    return {k: v for k, v in env.items() if k.startswith("PYTHON")}


def _umask() -> int:
    # Reading the umask without setting it (os.umask sets it, racing other threads).
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    raise OSError("no Umask line in /proc/self/status")


class ForkServerError(RuntimeError):
    """The fork server could not start or fork a VMM."""


class ForkServer:
    """The caller's side of one fork server process."""

    def __init__(self, env: Mapping[str, str], timeout: float = 30.0) -> None:
        # Not one VMM's own variables (its directory, descriptors): each request brings those.
        self.env = {k: v for k, v in env.items() if k not in _PER_VMM_VARIABLES}
        self.startup_env = startup_environment(env)
        self.owner = os.getpid()
        self._lock = threading.Lock()
        self._vm_lock = threading.Lock()
        self.forker: ForkedProcess | None = None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        vm_ours, vm_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _SERVER_MAIN, str(theirs.fileno()), str(vm_theirs.fileno())],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                env=self.env,
                close_fds=True,
                pass_fds=(theirs.fileno(), vm_theirs.fileno()),
            )
        except BaseException:
            ours.close()
            vm_ours.close()
            raise
        finally:
            theirs.close()
            vm_theirs.close()
        self._socket = ours
        #: requests for VM processes go to the VM forker (see ``serve``)
        self._vm_socket = vm_ours
        try:
            ours.settimeout(timeout)
            message = ours.recv(_MAX_MESSAGE)
        except OSError as e:
            self.close()
            raise ForkServerError(f"The VMM fork server did not start in {timeout} s: {e}") from e
        ready, _, forker = message.partition(b" ")
        if ready != _READY or not forker.isdigit():
            status = self.process.wait()
            self.close()
            raise ForkServerError(f"The VMM fork server exited at start-up (status {status})")
        # The server forked it as this process's child, as the VMMs will be.
        self.forker = ForkedProcess(int(forker), ["vmkit-vm-forker"])
        ours.settimeout(None)

    @property
    def alive(self) -> bool:
        return (
            self.process.poll() is None
            and self._socket.fileno() >= 0
            and (self.forker is None or self.forker.poll() is None)
        )

    def fork(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        stdout: int,
        lifeline: int,
        ready: int,
    ) -> int:
        """Forks a VMM running ``vmkit <argv>``; returns its pid (a child of this process).

        ``stdout`` becomes its stdout and stderr, ``lifeline`` and ``ready``
        its ``VMKIT_LIFELINE_FD`` and ``VMKIT_READY_FD`` (see ``cli``).
        """
        request = {
            "argv": list(argv),
            "env": dict(env),
            "umask": _umask(),
            "affinity": sorted(os.sched_getaffinity(0)),
            "nice": os.getpriority(os.PRIO_PROCESS, 0),
        }
        return self._request(request, [stdout, lifeline, ready])

    def fork_vm(
        self,
        control: int,
        log: int,
        api_socket: str,
        spawn_dir: str | None,
        verbosity: int,
        seccomp: str,
    ) -> int:
        """Forks a VM process (no Python: ``_vmproc``); returns its pid (a child
        of this process). ``control`` becomes its control socket, ``log`` its
        stdout and stderr; it listens on ``api_socket`` and removes
        ``spawn_dir`` when the control socket closes."""
        request = {
            "api_socket": api_socket,
            "spawn_dir": spawn_dir,
            "verbosity": verbosity,
            "seccomp": seccomp,
            "affinity": sorted(os.sched_getaffinity(0)),
            "nice": os.getpriority(os.PRIO_PROCESS, 0),
        }
        return self._request(request, [control, log], vm=True)

    def _request(self, request: dict[str, Any], fds: list[int], vm: bool = False) -> int:
        cwd: int | None
        try:
            cwd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            cwd = None  # an unreachable working directory: the server's stays
        else:
            fds = [*fds, cwd]
        lock, sock = (self._vm_lock, self._vm_socket) if vm else (self._lock, self._socket)
        try:
            with lock:
                socket.send_fds(sock, [json.dumps(request).encode()], fds)
                message = sock.recv(_MAX_MESSAGE)
        except OSError as e:
            raise ForkServerError(f"The VMM fork server failed: {e}") from e
        finally:
            if cwd is not None:
                os.close(cwd)
        if not message:
            ended = self.forker if vm and self.forker is not None else self.process
            raise ForkServerError(f"The VMM fork server exited (status {ended.wait()})")
        reply = json.loads(message)
        if "error" in reply:
            raise ForkServerError(f"The VMM fork server could not fork: {reply['error']}")
        pid: int = reply["pid"]
        return pid

    def close(self) -> None:
        """Ends the server and its VM forker (each exits when its socket
        closes); running VMMs stay."""
        self._socket.close()
        self._vm_socket.close()
        if os.getpid() != self.owner:
            return  # a forked copy of the caller: the server is the original's
        for process in (self.process, self.forker):
            if process is None:
                continue
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


_shared: ForkServer | None = None
_shared_lock = threading.Lock()


def shared_server(env: Mapping[str, str], may_start: bool = True) -> ForkServer | None:
    """This process's fork server, started on first use if ``may_start``;
    None when there is none or ``env`` differs from its start-up environment
    in what Python reads at start (the caller then needs a fresh interpreter)."""
    global _shared
    with _shared_lock:
        server = _shared
        if server is not None and (server.owner != os.getpid() or not server.alive):
            if server.owner == os.getpid():
                server.close()
            else:
                server._socket.close()  # inherited through a fork of this process
            server = _shared = None
        if server is None:
            if not may_start:
                return None
            server = _shared = ForkServer(env)
            if not _atexit_registered:
                _register_atexit()
        if server.startup_env != startup_environment(env):
            return None
        return server


_atexit_registered = False


def _register_atexit() -> None:
    global _atexit_registered
    import atexit

    atexit.register(_close_shared)
    _atexit_registered = True


def _close_shared() -> None:
    global _shared
    server, _shared = _shared, None
    if server is not None:
        server.close()


def wait_ended(pidfd: int, timeout: float | None) -> bool:
    """Waits until the process of ``pidfd`` ends, for at most ``timeout``
    seconds (None: no limit); False if it has not ended by then."""
    import select

    waiter = select.poll()
    waiter.register(pidfd, select.POLLIN)
    return bool(waiter.poll(None if timeout is None else max(0, int(timeout * 1000 + 0.999))))


class ForkedProcess:
    """A forked VMM: a child of this process, with the part of
    ``subprocess.Popen``'s interface that ``SpawnedVm`` offers (``pid``,
    ``args``, ``returncode``, ``poll``, ``wait``, ``send_signal``,
    ``terminate``, ``kill``). Waits use a pidfd: they return as the process
    exits, with no polling interval."""

    def __init__(self, pid: int, args: Sequence[str]) -> None:
        self.pid = pid
        self.args = list(args)
        self.returncode: int | None = None
        self._lock = threading.Lock()
        self._pidfd: int | None
        try:
            # Our child, not yet reaped: the pid cannot name another process.
            self._pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            self._pidfd = None  # Linux before 5.3: waits poll instead

    def __repr__(self) -> str:
        return f"<ForkedProcess pid={self.pid} returncode={self.returncode}>"

    def __del__(self) -> None:
        pidfd, self._pidfd = self._pidfd, None
        if pidfd is not None:
            os.close(pidfd)

    def poll(self) -> int | None:
        """The exit status (negative: the signal that ended it), or None while it runs."""
        if self.returncode is not None or not self._lock.acquire(blocking=False):
            return self.returncode
        try:
            if self.returncode is None:
                try:
                    pid, status = os.waitpid(self.pid, os.WNOHANG)
                except ChildProcessError:
                    # SIGCHLD ignored (auto-reaped): dead, its status lost (as Popen says 0).
                    self._reaped(0)
                else:
                    if pid == self.pid:
                        self._reaped(os.waitstatus_to_exitcode(status))
        finally:
            self._lock.release()
        return self.returncode

    def exit_fd(self) -> int | None:
        """A new descriptor that becomes readable when the process ends (the
        caller closes it); None once it is reaped, or without pidfds."""
        with self._lock:
            pidfd = self._pidfd
            return None if pidfd is None else os.dup(pidfd)

    def _reaped(self, returncode: int) -> None:
        self.returncode = returncode
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def wait(self, timeout: float | None = None) -> int:
        """Waits for the process to exit; raises subprocess.TimeoutExpired after ``timeout`` s."""
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            returncode = self.poll()
            if returncode is not None:
                return returncode
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
            pidfd = self._pidfd
            if pidfd is None:
                time.sleep(0.005 if remaining is None else min(0.005, remaining))
                continue
            try:
                wait_ended(pidfd, remaining)
            except OSError:
                time.sleep(0.001)  # the fd was closed by a concurrent poll(): look again

    def send_signal(self, sig: int) -> None:
        """Sends ``sig`` unless the process has been reaped (the pid may be reused then)."""
        self.poll()
        if self.returncode is not None:
            return
        import signal

        pidfd = self._pidfd
        if pidfd is not None:
            try:
                signal.pidfd_send_signal(pidfd, sig)
                return
            except OSError:
                pass  # closed by a concurrent poll(): the process is gone
            return
        os.kill(self.pid, sig)

    def terminate(self) -> None:
        import signal

        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        import signal

        self.send_signal(signal.SIGKILL)


# -- the server process -------------------------------------------------------------------


def serve(fd: int, vm_fd: int) -> None:
    """The fork server's main loop on the request socket ``fd``; first it
    forks the VM forker, which serves ``vm_fd``."""
    import gc

    from vmkit import _native

    # Before the VMM's Python is imported, in a fresh interpreter that imports
    # nothing else: VM processes, forked from the forker, then share pages
    # with a small process that writes none of them.
    root = os.path.dirname(os.path.dirname(os.path.abspath(_native.__file__)))
    program = [sys.executable, "-I", "-S", "-c", _FORKER_MAIN, str(vm_fd), root]
    forker = _native.fork_vm_forker(vm_fd, program if os.path.isabs(sys.executable) else None)
    os.close(vm_fd)
    # Everything the VMM's API path imports, so that no fork imports anything.
    import vmkit.api
    import vmkit.cli
    import vmkit.vmm  # noqa: F401

    requests = socket.socket(fileno=fd)
    # What Python's gc.freeze documents for fork servers: collections were off
    # while importing (freed objects would leave holes that the forks' new
    # objects then fill, copying the page); frozen objects are left out of the
    # forks' collections (which would write to every object's header).
    gc.freeze()
    requests.send(_READY + b" " + str(forker).encode())
    while True:
        try:
            message, fds, _flags, _address = socket.recv_fds(requests, _MAX_MESSAGE, 4)
        except OSError:
            return
        if not message:
            return  # the caller closed its end or exited
        reply: dict[str, object]
        try:
            reply = {"pid": _fork_vmm(json.loads(message), fds, requests)}
        except Exception as e:  # a refusal for this request, not the server's end
            reply = {"error": f"{type(e).__name__}: {e}"}
        finally:
            for received in fds:
                os.close(received)
        requests.send(json.dumps(reply).encode())


def _fork_vmm(request: dict[str, Any], fds: list[int], requests: socket.socket) -> int:
    from vmkit import _native

    if len(fds) not in (3, 4):
        raise ValueError(f"expected 3 or 4 descriptors, got {len(fds)}")
    sys.stdout.flush()
    sys.stderr.flush()
    pid = _native.fork_sibling()
    if pid:
        return pid
    code = 1
    try:
        import gc

        gc.enable()
        # The request socket is the server's: its fd is closed below, and no
        # socket object may close that number again once it is reused.
        requests.detach()
        code = _become_vmm(request, fds)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)


def _become_vmm(request: dict[str, Any], fds: list[int]) -> int:
    """In the forked process: sets it up as a fresh VMM would be, then runs it."""
    import fcntl

    # Above every number used below, so that the dup2s cannot overwrite one.
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 64) for fd in fds]
    stdout, lifeline, ready = high[:3]
    if len(high) == 4:
        os.fchdir(high[3])
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    os.dup2(null, 0)
    os.dup2(stdout, 1)
    os.dup2(stdout, 2)
    os.dup2(lifeline, LIFELINE_FD)
    os.dup2(ready, READY_FD)
    # Nothing else: not the request socket, not what the server or the caller held.
    os.closerange(READY_FD + 1, 1 << 20)
    os.umask(int(request["umask"]))
    affinity = request.get("affinity")
    if isinstance(affinity, list):
        os.sched_setaffinity(0, affinity)
    nice = request.get("nice")
    if isinstance(nice, int) and nice != os.getpriority(os.PRIO_PROCESS, 0):
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ["VMKIT_LIFELINE_FD"] = str(LIFELINE_FD)
    os.environ["VMKIT_READY_FD"] = str(READY_FD)
    argv: list[str] = request["argv"]
    sys.argv = ["vmkit", *argv]

    from vmkit import cli

    code = cli.run(argv)
    # What interpreter exit would do, short of tearing every module down.
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    return code
