"""Tiny plain-socket programs the suite runs as separate processes (no gevent, no patching).

    python benchmarks/suite_targets.py banner   # listens, prints its port; sends b"x" on
                                                # connect, then reads until EOF and closes
    python benchmarks/suite_targets.py echo     # listens, prints its port; echoes bytes
    python benchmarks/suite_targets.py rtt PORT ROUNDS
                                                # 1-byte request/response round trips;
                                                # prints JSON {"samples_ms": [...]}

Threads, one per connection: the servers must never be the bottleneck of what we
measure, and they stay out of the measured processes' CPU accounting.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from typing import Callable


def _serve(handler: Callable[[socket.socket], None]) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    print(listener.getsockname()[1], flush=True)
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_guarded, args=(handler, conn), daemon=True).start()


def _guarded(handler: Callable[[socket.socket], None], conn: socket.socket) -> None:
    try:
        handler(conn)
    except OSError:
        pass
    finally:
        conn.close()


def banner(conn: socket.socket) -> None:
    conn.sendall(b"x")
    while conn.recv(65536):
        pass


def echo(conn: socket.socket) -> None:
    while True:
        data = conn.recv(65536)
        if not data:
            return
        conn.sendall(data)


def rtt(port: int, rounds: int) -> None:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    samples = []
    clock = time.perf_counter
    for _ in range(rounds):
        t0 = clock()
        sock.sendall(b"p")
        if not sock.recv(1):
            raise SystemExit("echo closed the connection")
        samples.append((clock() - t0) * 1000.0)
    sock.close()
    print(json.dumps({"samples_ms": samples}), flush=True)


def main() -> None:
    mode = sys.argv[1]
    if mode == "banner":
        _serve(banner)
    elif mode == "echo":
        _serve(echo)
    elif mode == "rtt":
        rtt(int(sys.argv[2]), int(sys.argv[3]))
    else:
        raise SystemExit("unknown mode %r" % mode)


if __name__ == "__main__":
    main()
