"""Socket helpers every role needs: connecting, closing without caring whether it is
still open, reading exactly n bytes."""

import ipaddress
import socket
import struct
import time
from typing import Any, Optional


def connect_tcp(host: str, port: int, timeout: Optional[float]) -> socket.socket:
    """``socket.create_connection((host, port), timeout)``, minus the resolver for a
    literal IP address (a target ``127.0.0.1:22``, a relay given by address).

    gevent's ``create_connection`` asks ``getaddrinfo`` even for ``127.0.0.1``, and its
    resolver runs that in a thread of its pool: two thread hand-offs (0.1-0.2 ms, more on a
    busy machine) on the session set-up path for nothing (issue 17). A host name still
    goes through ``create_connection`` (every address it resolves to, in turn)."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 \
            else socket.AF_INET
    except ValueError:
        return socket.create_connection((host, port), timeout=timeout)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


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
