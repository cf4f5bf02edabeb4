"""What one forwarding hop adds to a 1-byte round trip, by how the hop is written.

    python benchmarks/bench_hop.py [--rounds 5000] [--runs 3]

A client and an echo server (plain threads) talk directly and through a one-hop TCP proxy
in a child process, on 127.0.0.1. The proxy is written four ways:

* ``greenlet-splice``: one greenlet per direction waits on a persistent io watcher, then
  ``os.splice`` socket → pipe → socket (what the relay did before ``splicer.py``);
* ``thread-splice``: the relay's data plane today, :class:`remote_gevent.relay.splicer.SplicePlane`
  (one OS thread, level-triggered epoll, ``os.splice``);
* ``greenlet-copy``: gevent sockets, ``recv_into`` + ``send`` (the shape of agent and
  console's data path);
* ``thread-copy``: one blocking OS thread per direction, ``recv_into`` + ``sendall``.

Prints per proxy the round trip's p50/p99, the p50 added over direct, and the proxy's CPU
time per round trip. This is what chose the relay's data-plane thread
(docs/performance.md). Figures only, no assertions; splice needs Linux and Python 3.10+.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

KINDS = ("greenlet-splice", "thread-splice", "greenlet-copy", "thread-copy")
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def _echo_server() -> int:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)

    def serve(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                conn.sendall(data)

    def accept() -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener.getsockname()[1]


def _round_trips(port: int, rounds: int) -> tuple:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with sock:
        for _ in range(200):  # warm-up
            sock.send(b"x")
            sock.recv(1)
        times = []
        clock = time.perf_counter
        for _ in range(rounds):
            start = clock()
            sock.send(b"x")
            if sock.recv(1) != b"x":
                raise RuntimeError("echo lost a byte")
            times.append(clock() - start)
    times.sort()
    return times[len(times) // 2] * 1e6, times[int(len(times) * 0.99)] * 1e6


# ---------------------------------------------------------------- the proxy child

def _proxy(kind: str, target_port: int) -> None:
    if kind.startswith("greenlet") or kind == "thread-splice":
        from gevent import monkey
        monkey.patch_all()
    import socket as sockmod  # patched or not, as chosen above

    listener = sockmod.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    print(listener.getsockname()[1], flush=True)
    plane = None
    if kind == "thread-splice":
        sys.path.insert(0, ROOT)
        from remote_gevent.relay import splicer
        plane = splicer.SplicePlane(splicer.PipePool(256 * 1024))
    while True:
        client, _ = listener.accept()
        upstream = sockmod.create_connection(("127.0.0.1", target_port))
        for s in (client, upstream):
            s.setsockopt(sockmod.IPPROTO_TCP, sockmod.TCP_NODELAY, 1)
        if plane is not None:
            plane.forward(splicer.Pair(client.fileno(), "client", upstream.fileno(), "server",
                                       on_done=lambda _pair: None))
            continue
        for src, dst in ((client, upstream), (upstream, client)):
            if kind == "greenlet-splice":
                import gevent
                gevent.spawn(_greenlet_splice, src, dst)
            elif kind == "greenlet-copy":
                import gevent
                gevent.spawn(_copy, src, dst)
            else:
                threading.Thread(target=_copy, args=(src, dst), daemon=True).start()


def _greenlet_splice(src, dst) -> None:  # noqa: ANN001
    from gevent.hub import get_hub

    r, w = os.pipe2(os.O_NONBLOCK)
    s_fd, d_fd = src.fileno(), dst.fileno()
    hub = get_hub()
    readable = hub.loop.io(s_fd, 1)
    flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
    while True:
        hub.wait(readable)
        try:
            n = os.splice(s_fd, w, 1 << 18, flags=flags)
        except BlockingIOError:
            continue
        if not n:
            dst.shutdown(socket.SHUT_WR)
            return
        while n:
            try:
                n -= os.splice(r, d_fd, n, flags=flags)
            except BlockingIOError:
                hub.wait(hub.loop.io(d_fd, 2))


def _copy(src, dst) -> None:  # noqa: ANN001
    buf = bytearray(65536)
    view = memoryview(buf)
    while True:
        n = src.recv_into(buf)
        if not n:
            dst.shutdown(socket.SHUT_WR)
            return
        sent = dst.send(view[:n])
        if sent < n:
            dst.sendall(view[sent:n])


# ---------------------------------------------------------------- main

def round_trip_args(doc: str) -> argparse.Namespace:
    """``--rounds`` and ``--runs`` of a round-trip benchmark (this one, bench_rtt_floor)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5000)
    ap.add_argument("--runs", type=int, default=3)
    return ap.parse_args()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--proxy":
        _proxy(sys.argv[2], int(sys.argv[3]))
        return
    args = round_trip_args(__doc__)
    sys.path.insert(0, ROOT)
    from benchmarks.suite_common import cpu_seconds  # here: the proxy child patches first
    kinds = [k for k in KINDS if "splice" not in k or hasattr(os, "splice")]
    echo_port = _echo_server()
    children = {}
    try:
        for kind in kinds:
            child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--proxy",
                                      kind, str(echo_port)], stdout=subprocess.PIPE, text=True)
            port = int(child.stdout.readline())
            children[kind] = (child, port)
        results = {"direct": []}
        results.update({k: [] for k in kinds})
        cpu = {k: 0.0 for k in kinds}
        for _ in range(args.runs):  # interleaved, so drift hits every kind alike
            results["direct"].append(_round_trips(echo_port, args.rounds))
            for kind in kinds:
                child, port = children[kind]
                before = cpu_seconds(child.pid)
                results[kind].append(_round_trips(port, args.rounds))
                cpu[kind] += cpu_seconds(child.pid) - before
        direct = statistics.median(r[0] for r in results["direct"])
        print("1-byte round trips, %d x %d, medians (us):" % (args.runs, args.rounds))
        for kind, runs in results.items():
            p50 = statistics.median(r[0] for r in runs)
            p99 = statistics.median(r[1] for r in runs)
            line = "  %-16s p50 %6.1f  p99 %6.1f  added %6.1f" % (kind, p50, p99, p50 - direct)
            if kind in cpu:
                line += "  proxy CPU %5.1f us per round trip" % (
                    cpu[kind] / (args.runs * args.rounds) * 1e6)
            print(line)
    finally:
        for child, _ in children.values():
            child.kill()
            child.wait()


if __name__ == "__main__":
    main()
