"""A half-close-aware TCP echo target on 127.0.0.1, shared by the tunnel tests."""

import socket
from typing import Any

from gevent.server import StreamServer


def echo(sock: socket.socket, address: Any) -> None:
    """Echo until EOF, then half-close: the peer sees every byte, then EOF."""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        sock.close()


class EchoServer:
    def __init__(self) -> None:
        self.server = StreamServer(("127.0.0.1", 0), echo)
        self.server.start()
        self.port = self.server.address[1]

    def stop(self) -> None:
        self.server.stop(timeout=1)
