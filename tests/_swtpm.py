"""swtpm, the TPM emulator ``--tpm socket=`` connects to, started by a test.

``Swtpm(folder)`` starts ``swtpm socket --tpm2`` with its control socket and
state in ``folder`` and ``--flags startup-clear``, as Cloud Hypervisor's
documentation starts it (v37 refuses a swtpm that has not been initialised),
and waits until it listens. ``SWTPM`` is None where swtpm is not installed;
tests that need it skip with ``SWTPM_MISSING``.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from pathlib import Path
from types import TracebackType

from _sockets import wait_listening

SWTPM = shutil.which("swtpm")
SWTPM_MISSING = "swtpm is not installed (Debian: apt-get install swtpm)"


class Swtpm:
    """A swtpm process serving one TPM 2.0 from ``folder``."""

    def __init__(self, folder: Path, flags: str | None = "startup-clear") -> None:
        assert SWTPM is not None, SWTPM_MISSING
        folder.mkdir(parents=True, exist_ok=True)
        self.socket = folder / "swtpm.sock"
        self.log = folder / "swtpm.log"
        state = folder / "state"
        state.mkdir(exist_ok=True)
        argv = [
            SWTPM, "socket", "--tpm2",
            "--ctrl", f"type=unixio,path={self.socket}",
            "--tpmstate", f"dir={state}",
            "--log", f"file={self.log},level=1",
        ]  # fmt: skip
        if flags:
            argv += ["--flags", flags]
        self.process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self._wait_listening()

    def _wait_listening(self, timeout: float = 10) -> None:
        # Not by connecting: that would take swtpm's one control channel.
        wait_listening(self.socket, timeout=timeout, process=self.process, why_not=self.log_text)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def kill(self) -> None:
        """Ends swtpm at once (SIGKILL), as a crash would."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> Swtpm:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def unlistened_socket(path: Path) -> Path:
    """A unix socket file nobody listens on (connecting is refused)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
    return path
