"""Makes a system call from inside another process's thread, with ptrace.

The seccomp tests use it to have a real VMM thread, in a release build, make a
call its filter does not allow: no test-only code path in the VMM is needed.
The thread is stopped, made to execute one ``syscall`` instruction found in
its own executable memory, and (if it survives) put back as it was.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import signal
from dataclasses import dataclass

PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_SYSCALL = 24
PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
WALL = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
_libc.ptrace.restype = ctypes.c_long


class _Regs(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_ulonglong)
        for name in (
            "r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi orig_rax "
            "rip cs eflags rsp ss fs_base gs_base ds es fs gs"
        ).split()
    ]


def _ptrace(request: int, tid: int, addr: int = 0, data: int | ctypes.c_void_p = 0) -> int:
    ctypes.set_errno(0)
    result = int(_libc.ptrace(request, tid, ctypes.c_void_p(addr), data))
    if result == -1 and ctypes.get_errno() != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"ptrace({request}) on {tid}: {os.strerror(code)}")
    return result


def _syscall_instruction(pid: int) -> int:
    """An address in ``pid``'s executable memory holding ``0f 05`` (syscall)."""
    with open(f"/proc/{pid}/maps") as maps:
        regions = [line.split() for line in maps]
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for fields in regions:
            if "x" not in fields[1] or len(fields) < 6 or not fields[5].startswith("/"):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            try:
                mem.seek(start)
                code = mem.read(min(end - start, 4 << 20))
            except OSError:
                continue
            at = code.find(b"\x0f\x05")
            if at >= 0:
                return start + at
    raise LookupError(f"no syscall instruction in the executable mappings of {pid}")


@dataclass
class Injected:
    """What became of the call: the thread died of ``signal`` (SIGSYS), or
    the call returned ``result`` and the thread goes on."""

    killed_by: int | None
    result: int | None


def inject_syscall(
    pid: int, tid: int, number: int, *args: int, refuse_exiting: bool = False
) -> Injected:
    """Makes thread ``tid`` of ``pid`` execute system call ``number(args)``.
    ``refuse_exiting``: a thread on its way out raises ProcessLookupError (a
    call its filter traps would kill the process there unreported)."""
    address = _syscall_instruction(pid)
    _ptrace(PTRACE_SEIZE, tid)
    try:
        _ptrace(PTRACE_INTERRUPT, tid)
        _, status = os.waitpid(tid, WALL)
        if os.WIFEXITED(status):
            # A short-lived worker that ended before the stop reached it.
            raise ProcessLookupError(f"thread {tid} ended before it stopped")
        if not os.WIFSTOPPED(status):
            raise RuntimeError(f"thread {tid} did not stop: status {status:#x}")
        if refuse_exiting and _signal_mask(pid, tid, "SigBlk") & (1 << (signal.SIGSYS - 1)):
            # glibc blocks every signal in a thread on its way out: a trapped
            # call there kills the process by the default action, unreported.
            raise ProcessLookupError(f"thread {tid} is exiting (SIGSYS blocked)")
        saved = _Regs()
        _ptrace(PTRACE_GETREGS, tid, 0, ctypes.addressof(saved))
        regs = _Regs.from_buffer_copy(saved)
        regs.rip = address
        regs.rax = number
        # No system call restart for the injected one.
        regs.orig_rax = 2**64 - 1
        for name, value in zip(
            ("rdi", "rsi", "rdx", "r10", "r8", "r9")[: len(args)], args, strict=True
        ):
            setattr(regs, name, value & (2**64 - 1))
        _ptrace(PTRACE_SETREGS, tid, 0, ctypes.addressof(regs))
        # Syscall stops, not single-stepping: a step's SIGTRAP would stay
        # pending and kill the process before a trapped call's SIGSYS.
        for stop in ("entry", "exit"):
            _ptrace(PTRACE_SYSCALL, tid)
            _, status = os.waitpid(tid, WALL)
            if not os.WIFSTOPPED(status):
                return Injected(killed_by=os.WTERMSIG(status), result=None)
            if os.WSTOPSIG(status) == signal.SIGSYS:
                # The filter trapped the call: the VMM's handler gets the signal.
                _ptrace(PTRACE_DETACH, tid, 0, signal.SIGSYS)
                return Injected(killed_by=signal.SIGSYS, result=None)
            if stop == "exit" and _sigsys_pending(pid, tid):
                _ptrace(PTRACE_DETACH, tid, 0, 0)
                return Injected(killed_by=signal.SIGSYS, result=None)
        after = _Regs()
        _ptrace(PTRACE_GETREGS, tid, 0, ctypes.addressof(after))
        result = ctypes.c_longlong(after.rax).value
        _ptrace(PTRACE_SETREGS, tid, 0, ctypes.addressof(saved))
        _ptrace(PTRACE_DETACH, tid, 0, 0)
        return Injected(killed_by=None, result=result)
    except BaseException:
        try:
            _ptrace(PTRACE_DETACH, tid, 0, 0)
        except OSError as e:
            if e.errno != errno.ESRCH:
                raise
        raise


def _sigsys_pending(pid: int, tid: int) -> bool:
    pending = _signal_mask(pid, tid, "SigPnd", "ShdPnd")
    return bool(pending & (1 << (signal.SIGSYS - 1)))


def _signal_mask(pid: int, tid: int, *fields: str) -> int:
    """The union of a thread's signal sets ``fields`` (its status's hex masks)."""
    with open(f"/proc/{pid}/task/{tid}/status") as f:
        status = f.read()
    mask = 0
    for field in fields:
        match = re.search(rf"^{field}:\s+([0-9a-f]+)", status, re.M)
        if match:
            mask |= int(match.group(1), 16)
    return mask


def threads(pid: int) -> dict[str, list[int]]:
    """``pid``'s threads by name (comm)."""
    found: dict[str, list[int]] = {}
    for entry in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{entry}/comm") as f:
                name = f.read().strip()
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that just ended
        found.setdefault(name, []).append(int(entry))
    return found


def seccomp_mode(pid: int, tid: int) -> int:
    """The ``Seccomp:`` field of a thread's status (0 none, 2 filter)."""
    return _status_number(pid, tid, "Seccomp")


def seccomp_filters(pid: int, tid: int) -> int:
    """How many seccomp filters a thread runs under (its own and inherited)."""
    return _status_number(pid, tid, "Seccomp_filters")


def _status_number(pid: int, tid: int, field: str) -> int:
    with open(f"/proc/{pid}/task/{tid}/status") as f:
        match = re.search(rf"^{field}:\s+(\d+)", f.read(), re.M)
    assert match is not None
    return int(match.group(1))
