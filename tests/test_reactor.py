"""The shared reactor: one thread that runs callbacks for ready descriptors."""

from __future__ import annotations

import gc
import os
import select
import threading
import weakref

from vmkit import _reactor


class _Held:
    """Stands for what a callback's closure keeps: a VM and its descriptors."""


def test_a_callback_that_ran_and_was_removed_keeps_nothing_alive() -> None:
    reactor = _reactor.shared()
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    ran = threading.Event()
    held = _Held()
    alive = weakref.ref(held)

    def callback(ready_fd: int, held: _Held = held) -> None:
        reactor.remove(ready_fd)
        ran.set()

    try:
        reactor.add(fd, select.EPOLLIN, callback)
        os.eventfd_write(fd, 1)
        assert ran.wait(10), "the callback did not run"
        del callback, held
        gc.collect()
        # The reactor's thread now waits for the next event: nothing it ran
        # before may stay referenced from its frame.
        assert alive() is None, "the reactor still holds the callback's closure"
    finally:
        reactor.remove(fd)
        os.close(fd)
