"""Tiny plain-socket programs the suite runs as separate processes (no gevent, no patching).

    python benchmarks/suite_targets.py banner   # listens, prints its port; sends b"x" on
                                                # connect, then reads until EOF and closes
    python benchmarks/suite_targets.py echo     # listens, prints its port; echoes bytes
    python benchmarks/suite_targets.py rtt PORT ROUNDS
                                                # 1-byte request/response round trips;
                                                # prints JSON {"samples_ms": [...]}
    python benchmarks/suite_targets.py rtt-cmd ROUNDS ARGV...
                                                # the same through a command's stdin and
                                                # stdout (``stdio``, the ProxyCommand path)

Threads, one per connection: the servers must never be the bottleneck of what we
measure, and they stay out of the measured processes' CPU accounting.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, List


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


def rtt_cmd(rounds: int, argv: List[str]) -> None:
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    assert proc.stdin is not None and proc.stdout is not None
    wfd, rfd = proc.stdin.fileno(), proc.stdout.fileno()
    samples = []
    clock = time.perf_counter
    try:
        for _ in range(rounds):
            t0 = clock()
            os.write(wfd, b"p")
            if not os.read(rfd, 1):
                raise SystemExit("the command closed its stdout (exit %s)" % proc.poll())
            samples.append((clock() - t0) * 1000.0)
    finally:
        proc.stdin.close()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    print(json.dumps({"samples_ms": samples}), flush=True)


def main() -> None:
    mode = sys.argv[1]
    if mode == "banner":
        _serve(banner)
    elif mode == "echo":
        _serve(echo)
    elif mode == "rtt":
        rtt(int(sys.argv[2]), int(sys.argv[3]))
    elif mode == "rtt-cmd":
        rtt_cmd(int(sys.argv[2]), sys.argv[3:])
    else:
        raise SystemExit("unknown mode %r" % mode)


if __name__ == "__main__":
    main()
