"""Socket helpers every role needs: closing without caring whether it is still open,
reading exactly n bytes."""

import socket
import struct
import time
from typing import Any, Optional


def close_quietly(sock: Any) -> None:
    """Close ``sock`` (a socket, an SSL socket or anything with ``close``; None is fine),
    ignoring the OS error of a socket that is already broken: at that point there is
    nothing left to tell anyone."""
    if sock is None:
        return
    try:
        sock.close()
    except OSError:
        pass


def abort_quietly(sock: Any) -> None:
    """Close with a TCP RST rather than a FIN where the socket allows it (SO_LINGER 0):
    the way to pass on a peer's RESET of a stream to the local connection."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except (OSError, AttributeError, ValueError):
        pass
    close_quietly(sock)


def recv_exact(sock: Any, n: int, deadline: Optional[float] = None) -> bytes:
    """Read exactly ``n`` bytes from ``sock``.

    Raises EOFError when the peer closes first (what was read is lost: every caller
    treats a short header as a broken connection and says so in its own error type).
    With ``deadline`` (a ``time.monotonic()`` instant) the socket's timeout is set to
    the time left before each read and ``socket.timeout`` is raised once it has passed;
    the caller restores the socket's timeout if it cares. Without, the socket's own
    timeout (or an enclosing gevent.Timeout) bounds the reads.
    """
    data = b""
    while len(data) < n:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout("timed out after %d of %d bytes" % (len(data), n))
            sock.settimeout(remaining)
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError("connection closed after %d of %d bytes" % (len(data), n))
        data += chunk
    return data
