"""One thread that waits on many descriptors for this program's VMMs.

A thread per VM for each thing that waits (a VM's stop, its VM process's
end, its API socket's next connection) costs a start and a join per VM and a
stack each; with fleets of spawned VMs that was most of what starting and
stopping them cost this program. Here one thread waits for all of them and
runs a short callback for each descriptor that is ready. Callbacks must not
block: work that may (a request to a VM process, a lock an API request
holds) goes to a thread of its own.
"""

from __future__ import annotations

import _thread
import os
import select

from vmkit.logs import LazyLogger

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["Reactor", "shared"]

log = LazyLogger("vmkit")


class Reactor:
    """Level-triggered callbacks on descriptors, run by one daemon thread."""

    def __init__(self, name: str = "vmkit-reactor") -> None:
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callable[[int], None]] = {}
        # Held while a callback runs and while one is removed: once
        # ``remove`` returns, that callback is neither running nor to run.
        self._dispatch = _thread.RLock()
        # Loaded here, not with the module: a VMM booting with an API socket
        # starts its guest first (the reactor starts once the VM runs).
        import threading

        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def add(self, fd: int, events: int, callback: Callable[[int], None]) -> None:
        """Calls ``callback(fd)`` on this reactor's thread while ``fd`` is ready
        for ``events`` (``select.EPOLLIN``; 0 for hang-up and errors only)."""
        with self._dispatch:
            self._callbacks[fd] = callback
            self._epoll.register(fd, events)

    def held(self) -> _thread.RLock:
        """Held, no callback runs: several ``add`` calls take effect together,
        and a lock taken inside (callbacks may take it too) is always taken
        after this one."""
        return self._dispatch

    def remove(self, fd: int) -> None:
        """Stops watching ``fd`` (it may be closed after this returns); waits
        for its callback if it is running on another thread."""
        with self._dispatch:
            if self._callbacks.pop(fd, None) is not None:
                try:
                    self._epoll.unregister(fd)
                except OSError:
                    pass  # closed already, which ended its registration

    def _run(self) -> None:
        while True:
            try:
                events = self._epoll.poll()
            except InterruptedError:
                continue
            for fd, _event in events:
                self._dispatch_one(fd)

    def _dispatch_one(self, fd: int) -> None:
        # A function of its own: the callback (and what its closure holds: a
        # VM and its descriptors) is not kept alive by this thread's frame
        # while it waits for the next event.
        with self._dispatch:
            callback = self._callbacks.get(fd)
            if callback is None:
                return  # removed since poll() returned
            try:
                callback(fd)
            except Exception:  # a bug: report it, keep serving the others
                log.exception("Reactor callback for descriptor %d failed", fd)
                self.remove(fd)


_shared: Reactor | None = None
_shared_lock = _thread.allocate_lock()


def shared() -> Reactor:
    """This program's reactor (started on first use)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = Reactor()
        return _shared


def _forget_in_child() -> None:
    # A forked child has the object but not its thread.
    global _shared, _shared_lock
    _shared = None
    _shared_lock = _thread.allocate_lock()


os.register_at_fork(after_in_child=_forget_in_child)
