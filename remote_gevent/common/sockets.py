"""Socket helpers every role needs: closing without caring whether it is still open."""

import socket
import struct
from typing import Any


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
