"""The API's listening socket, made without the ``socket`` module.

``socket`` builds its enums at import (with ``enum``, ``functools`` and
``selectors``): several milliseconds that the ``vmkit`` command need not pay
before its guest starts. ``_socket`` is the C module under it.
"""

from __future__ import annotations

import os
import stat


def listen_private(path: str, backlog: int = 128) -> tuple[int, tuple[int, int]]:
    """Binds a UNIX stream socket at ``path``, owner-only from the moment the
    file exists, and listens: (its descriptor, close-on-exec; the file's
    (st_dev, st_ino)). Raises OSError as ``bind`` does."""
    import _socket

    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        # Linux gives the socket file the socket's mode (less the umask).
        os.fchmod(sock.fileno(), stat.S_IRUSR | stat.S_IWUSR)
        sock.bind(path)
        info = os.stat(path)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock.detach(), (info.st_dev, info.st_ino)


def remove_if_same(path: str, inode: tuple[int, int]) -> None:
    """Removes the socket file at ``path`` if it is still the one made
    (someone may have put another in its place)."""
    try:
        info = os.stat(path)
        if (info.st_dev, info.st_ino) == inode:
            os.unlink(path)
    except OSError:
        pass
