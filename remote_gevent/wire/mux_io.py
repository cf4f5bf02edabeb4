"""Socket plumbing of the tunnel: option tuning, a lean ``sendall``, and the
non-blocking direct write to an idle local socket."""

import errno
import logging
import os
import socket
from typing import Any, Callable


from remote_gevent.wire.mux_frames import (
    LOCAL_SOCKET_BUFFER,
)

# One logger for the whole tunnel (its modules are one concern): "remote_gevent.wire.mux".
log = logging.getLogger("remote_gevent.wire.mux")


def set_sockopts(sock: Any, buffers: bool) -> None:
    """Best effort: TCP_NODELAY (interactive streams) and socket buffer sizes."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError, ValueError):
        pass  # not TCP (socketpair, pipe-like object)
    if buffers:
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                if sock.getsockopt(socket.SOL_SOCKET, opt) < LOCAL_SOCKET_BUFFER:
                    sock.setsockopt(socket.SOL_SOCKET, opt, LOCAL_SOCKET_BUFFER)
            except (OSError, AttributeError, ValueError):
                pass


def os_err(e: OSError) -> str:
    if e.errno is not None and e.errno in errno.errorcode:
        return "%s %s" % (errno.errorcode[e.errno], e.strerror or "")
    return str(e) or type(e).__name__


def send_all(send: Callable[[Any], int], data: Any) -> None:
    """``sendall`` without gevent's per-call ``getsockopt(SO_SNDBUF)`` and chunking:
    the first ``send`` nearly always takes the whole frame."""
    sent = send(data)
    total = len(data)
    if sent < total:
        view = memoryview(data)
        while sent < total:
            sent += send(view[sent:])


def send_frames(sock: Any, data: Any) -> None:
    """:func:`send_all` of sealed frames on the tunnel socket, the first ``send`` straight
    on the C socket under a gevent socket (its descriptor is non-blocking): gevent's
    Python ``send`` wrapper costs ~1.5 us a call, and a 1-byte round trip crosses it on
    every hop. What the kernel does not take goes through gevent's ``send``, which waits
    for room in the hub."""
    raw = getattr(sock, "_sock", None) if type(sock) is socket.socket else None
    if raw is not None:
        try:
            sent = raw.send(data)
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            return
        data = memoryview(data)[sent:]
    send_all(sock.send, data)


def write_now(sock: Any, data: Any) -> int:
    """Bytes of ``data`` the kernel takes right now from a non-blocking ``os.write`` to
    ``sock`` (gevent keeps its sockets' descriptors non-blocking); 0 if it would block,
    on any error (the stream's writer meets it again and resets the stream), and for
    anything but a plain socket.  ``fileno()`` is asked every time: a closed socket
    answers -1, so a descriptor number reused after a close is never written to."""
    if type(sock) is not socket.socket:
        return 0
    fd = sock.fileno()
    if fd < 0:
        return 0
    try:
        return os.write(fd, data)
    except OSError:
        return 0
