"""A tiny round-robin TCP forwarder: the demo's stand-in for haproxy ``balance roundrobin``
in front of a routed relay pool (``scripts/demo --relays N``, docs/operations.md).

Each accepted connection goes to the next backend in turn (a backend refusing the
connect is skipped, like haproxy's ``option redispatch``) and its bytes are copied both
ways untouched: the TLS of agent and console ends at the relays, which route the two
legs of a session to the same owner relay by session id (relay/routing.py). Being ours,
the demo runs it even where haproxy is not installed. Not for production: no PROXY
header (the relays see 127.0.0.1), no health checks, no limits.

``python -m remote_gevent.demo.roundrobin --listen 127.0.0.1:PORT BACKEND...``
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
from typing import Iterator, List, Optional, Sequence, Tuple

import gevent
from gevent import socket  # cooperative sockets, without monkey patching
from gevent.server import StreamServer

from remote_gevent.common.addresses import split_host_port
from remote_gevent.common.sockets import close_quietly

log = logging.getLogger("remote_gevent.demo.roundrobin")

CONNECT_TIMEOUT = 2.0
CHUNK = 65536


def _address(value: str) -> Tuple[str, int]:
    host, port = split_host_port(value)
    assert port is not None, "%s: HOST:PORT" % value
    return host, port


def _copy(src: socket.socket, dst: socket.socket) -> None:
    """src -> dst until EOF, then half-close dst (TLS close_notify and the relays'
    half-close must cross us as they would cross haproxy)."""
    try:
        while True:
            data = src.recv(CHUNK)
            if not data:
                break
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        # One side died: end both directions (the other copy sees the close).
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class RoundRobin:
    """Listen on ``listen``; hand each connection to the next of ``backends``."""

    def __init__(self, listen: Tuple[str, int], backends: Sequence[Tuple[str, int]]) -> None:
        self.backends = list(backends)
        self._turn: Iterator[int] = itertools.cycle(range(len(self.backends)))
        self.server = StreamServer(listen, self._handle, backlog=1024)

    def _connect(self) -> Optional[socket.socket]:
        for _ in self.backends:
            backend = self.backends[next(self._turn)]
            try:
                sock = socket.create_connection(backend, timeout=CONNECT_TIMEOUT)
            except OSError as exc:
                log.warning("backend %s:%d refused: %s (next one)", backend[0], backend[1], exc)
                continue
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        return None

    def _handle(self, client: socket.socket, _address: tuple) -> None:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        backend = self._connect()
        if backend is None:
            log.warning("no backend reachable: connection closed")
            close_quietly(client)
            return
        try:
            gevent.joinall([gevent.spawn(_copy, client, backend),
                            gevent.spawn(_copy, backend, client)])
        finally:
            close_quietly(backend)
            close_quietly(client)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m remote_gevent.demo.roundrobin",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, metavar="HOST:PORT")
    parser.add_argument("backends", nargs="+", metavar="BACKEND", help="HOST:PORT")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rr = RoundRobin(_address(args.listen), [_address(b) for b in args.backends])
    rr.server.start()
    log.info("round robin on %s over %s", args.listen, " ".join(args.backends))
    try:
        rr.server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
