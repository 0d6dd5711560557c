"""Running VMs from Python.

    >>> from vmkit import Vm, VmConfig
    >>> config = VmConfig.from_cli(["--kernel", "vmlinux", "--cmdline", "console=ttyS0"])
    >>> with Vm(config) as vm:                    # doctest: +SKIP
    ...     vm.boot()
    ...     vm.serial.wait_for(r"login:", timeout=30)
    ...     vm.shutdown()

The VM runs in threads owned by the Rust extension; every blocking call here
releases the GIL. Leaving the ``with`` block always shuts the VM down and
releases what it holds (vCPU threads, guest memory, pty, socket).
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmkit import _native
from vmkit.config import VmConfig

if TYPE_CHECKING:
    from vmkit.client import SpawnedVm

__all__ = ["DebugPortWrite", "SerialConsole", "Vm", "VmError", "VmExit"]


class VmError(RuntimeError):
    """The VMM could not do what was asked.

    ``kind`` says which part failed: ``Unsupported``, ``Kernel``,
    ``Initramfs``, ``Memory``, ``Kvm``, ``Device``, ``State`` (an invalid
    state transition, with Cloud Hypervisor's text) or ``Stopped`` (the VM
    stopped while something waited on it).
    """

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind

    def __str__(self) -> str:
        return self.message


_native.register_vm_error(VmError)

#: How long one blocking call into the VMM lasts before Python checks signals.
_WAIT_SLICE = 0.25


@dataclass(frozen=True)
class VmExit:
    """Why a VM stopped.

    ``reason`` is one of ``poweroff``, ``shutdown`` (asked for by the user),
    ``triple-fault``, ``internal-error`` (KVM could not run the guest; the
    message has RIP and the instruction bytes), ``hang`` (the watchdog saw no
    vCPU make progress) or ``vmm-error``.
    """

    reason: str
    message: str


@dataclass(frozen=True)
class DebugPortWrite:
    """A write to port 0x80: ``value``, ``seconds`` since the VM was created,
    and ``monotonic`` (``time.monotonic()`` clock) when it happened."""

    value: int
    seconds: float
    monotonic: float


class SerialConsole:
    """The guest's serial port output, readable while the VM runs.

    ``wait_for`` consumes output line by line: each call continues after the
    line the previous call matched.
    """

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self._cursor = 0

    def read(self) -> bytes:
        """Everything the guest has printed so far (the last 16 MiB)."""
        _start, data = self._handle.serial_read(0)
        result: bytes = data
        return result

    @property
    def text(self) -> str:
        """``read()`` decoded as UTF-8 (invalid bytes replaced)."""
        return self.read().decode(errors="replace")

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float = 30.0) -> re.Match[str]:
        """Waits for a whole output line matching ``pattern`` (``re.search``).

        Raises TimeoutError when no line matches in time, and VmError (kind
        ``Stopped``) when the VM stops first.
        """
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            start, data = self._handle.serial_read(self._cursor)
            consumed = 0
            for line in data.splitlines(keepends=True):
                if not line.endswith(b"\n"):
                    break
                consumed += len(line)
                match = regex.search(line.rstrip(b"\r\n").decode(errors="replace"))
                if match:
                    self._cursor = start + consumed
                    return match
            self._cursor = start + consumed
            if self._handle.state == "Shutdown":
                exit_info = self._handle.wait(0.0)
                why = exit_info[1] if exit_info else "it was shut down"
                raise VmError(
                    f"The VM stopped before printing a line matching {regex.pattern!r}: {why}",
                    "Stopped",
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"No serial line matched {regex.pattern!r} within {timeout} s")
            self._handle.serial_wait(start + len(data), min(remaining, 0.5))


class Vm:
    """One virtual machine, with Cloud Hypervisor's states and transitions.

    ``Vm(config)`` validates the config and opens KVM and the serial backend;
    ``boot()`` builds and starts the VM. ``watchdog_timeout`` (seconds, or
    None to disable) ends a VM in which no vCPU makes progress with
    interrupts disabled for that long.
    """

    def __init__(self, config: VmConfig, *, watchdog_timeout: float | None = 30.0) -> None:
        config.validate()
        self.config = config
        self._handle = _native.VmHandle(config.to_json(), watchdog_timeout)
        self.serial = SerialConsole(self._handle)

    def boot(self) -> None:
        """Builds the VM and starts it (Created or Shutdown → Running)."""
        self._handle.boot()

    def pause(self) -> None:
        """Takes every vCPU out of the guest (Running → Paused)."""
        self._handle.pause()

    def resume(self) -> None:
        """Lets the vCPUs run again (Paused → Running)."""
        self._handle.resume()

    def shutdown(self) -> None:
        """Stops the VM and waits for its threads (→ Shutdown)."""
        self._handle.shutdown()

    def reboot(self) -> None:
        """Resets the VM: the running boot stops and a fresh one starts."""
        self._handle.reboot()

    def device_events(self, since: int = 0) -> list[tuple[str, str]]:
        """virtio device events from index ``since`` on: ``(event, device id)``
        with event ``activated`` (the driver set DRIVER_OK) or ``reset``."""
        events: list[tuple[str, str]] = self._handle.device_events(since)
        return events

    def power_button(self) -> None:
        """Presses the ACPI power button (a Generic Event Device event).

        The guest decides what follows; Linux shuts down in an orderly way.
        Raises VmError ("VM is not running") when no boot is running.
        """
        self._handle.power_button()

    def wait(self, timeout: float | None = None) -> VmExit | None:
        """Waits for the VM to stop; returns why, or None on timeout.

        Waits in short slices so that Ctrl-C (KeyboardInterrupt) gets through.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = _WAIT_SLICE if deadline is None else deadline - time.monotonic()
            result = self._handle.wait(max(0.0, min(remaining, _WAIT_SLICE)))
            if result is not None:
                return VmExit(result[0], result[1])
            if self._handle.state == "Created":
                return None
            if deadline is not None and time.monotonic() >= deadline:
                return None

    @property
    def state(self) -> str:
        """``Created``, ``Running``, ``Paused`` or ``Shutdown``."""
        state: str = self._handle.state
        return state

    def debug_port_writes(self) -> list[DebugPortWrite]:
        """Each write to the debug port 0x80, in order (at most 4096)."""
        return [DebugPortWrite(*w) for w in self._handle.debug_port_writes()]

    def info(self) -> dict[str, Any]:
        """Cloud Hypervisor's VmInfo: config, state, memory_actual_size, device_tree.

        vmkit adds ``vmkit``: boots so far, the kernel format, the serial pty path.
        """
        runtime: dict[str, Any] = self._handle.runtime_info()
        config = self.config
        if runtime["config_json"] is not None:
            config = VmConfig.from_json(runtime["config_json"])
        return {
            "config": config.to_dict(),
            "state": runtime["state"],
            "memory_actual_size": runtime["memory_size"],
            "device_tree": runtime["device_tree"],
            "vmkit": {
                "boots": runtime["boots"],
                "kernel_format": runtime["kernel_format"],
                "serial_pty": runtime["serial_pty"],
                "console_pty": runtime["console_pty"],
            },
        }

    def counters(self) -> dict[str, dict[str, int]]:
        """Cloud Hypervisor's device counters, ``{device id: {counter: value}}``.

        Raises VmError ("VM is not running") when no boot is running.
        """
        counters: dict[str, dict[str, int]] = self._handle.counters()
        return counters

    def close(self) -> None:
        """Shuts down and releases everything; the Vm cannot boot again."""
        self._handle.close()

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def spawn(
        cls,
        config: VmConfig | None,
        *,
        api_socket: str | Path | None = None,
        serial_log: bool = True,
        vmm_args: Sequence[str] = (),
        startup_timeout: float = 30.0,
        request_timeout: float | None = 60.0,
        stop_timeout: float = 5.0,
        env: Mapping[str, str] | None = None,
    ) -> SpawnedVm:
        """Runs the VM in a ``python -m vmkit --api-socket`` child process.

        See ``vmkit.client.spawn``: the returned ``SpawnedVm`` has this
        class's methods, carried out over the HTTP API, and its ``with``
        block always ends the process and removes its files.
        """
        from vmkit.client import spawn

        return spawn(
            config,
            api_socket=api_socket,
            serial_log=serial_log,
            vmm_args=vmm_args,
            startup_timeout=startup_timeout,
            request_timeout=request_timeout,
            stop_timeout=stop_timeout,
            env=env,
        )
