"""The floor under the agent's CPU per GiB: what any process pays that receives a byte
stream on one TCP socket, (de)crypts it and writes it to another — with nothing else.

    python benchmarks/bench_floor.py [--mib 2048] [--runs 3]

Issue 17 asks for an agent CPU per GiB of at most 0.5x sshd's. sshd and the agent do the
same work per byte on a bulk stream: one read from one socket, one AEAD pass, one write
to another socket. This measures that work alone, in a forwarder process with blocking
sockets, 64 KiB reads and the tunnel's own FrameSealer / FrameOpener (no streams, no
flow control, no resume, no gevent hub): source -> forwarder -> sink on 127.0.0.1, the
forwarder's user and system CPU seconds from ``os.times()`` over the whole stream.

Modes:
  copy            recv_into + sendall: the two kernel copies and TCP, nothing else
  seal-libsodium  + seal each 64 KiB read into a frame (the agent's default AEAD)
  seal-openssl    + the same with OpenSSL (the console's default; agent opt-in)
  open-libsodium  frames in, each opened, the plaintext written (the agent receiving)
  open-openssl    the same with OpenSSL

Prints, per mode, the median CPU s/GiB (user + system) of the forwarder over the runs.
Compare with the agent's and sshd's figures of ``python -m benchmarks.run`` on the same
machine (docs/performance.md). Figures only, no assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
from typing import Any, Dict, List, Sequence

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from remote_gevent.crypto import aead_openssl, tunnel_crypto  # noqa: E402

MODES = ("copy", "seal-libsodium", "seal-openssl", "open-libsodium", "open-openssl")
CHUNK = tunnel_crypto.MAX_PLAINTEXT  # the largest plaintext a frame carries
KEY = bytes(range(32))  # a benchmark key: nothing secret travels here
GIB = 1 << 30
SINK_IDLE_SECONDS = 60.0


def _use(mode: str) -> None:
    aead_openssl.use_backend("openssl" if mode.endswith("openssl") else "libsodium")
    os.environ.pop(aead_openssl.ENV, None)


def _listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock


def _sink(listener: socket.socket) -> None:
    """Read the forwarder's output to its end; 60 s without a connection or a byte (a
    child that died or hangs) raises instead of waiting for ever."""
    listener.settimeout(SINK_IDLE_SECONDS)
    conn, _ = listener.accept()
    conn.settimeout(SINK_IDLE_SECONDS)
    view = memoryview(bytearray(1 << 20))
    while conn.recv_into(view):
        pass


def _source(port: int, mode: str, total: int) -> None:
    """Send ``total`` plaintext bytes, as sealed frames when the forwarder opens them."""
    _use(mode)
    sock = socket.create_connection(("127.0.0.1", port))
    chunk = bytes(CHUNK)
    sealer = tunnel_crypto.FrameSealer(KEY, tunnel_crypto.AES256GCM)
    for _ in range(total // CHUNK):
        sock.sendall(sealer.seal(chunk) if mode.startswith("open") else chunk)
    sock.close()


def _open_loop(src: socket.socket, dst: socket.socket) -> int:
    """Frames in, plaintext out; the buffer is parsed in place and compacted."""
    opener = tunnel_crypto.FrameOpener(KEY, tunnel_crypto.AES256GCM)
    buf = bytearray(4 << 20)
    view = memoryview(buf)
    start = end = moved = 0
    while True:
        n = src.recv_into(view[end:])
        if not n:
            return moved
        end += n
        while end - start >= tunnel_crypto.LEN_BYTES:
            clen = opener.frame_length(view[start:start + tunnel_crypto.LEN_BYTES])
            stop = start + tunnel_crypto.LEN_BYTES + clen
            if stop > end:
                break
            plain = opener.open(view[start:start + tunnel_crypto.LEN_BYTES],
                                view[start + tunnel_crypto.LEN_BYTES:stop])
            dst.sendall(plain)
            moved += len(plain)
            start = stop
        if start:
            buf[:end - start] = buf[start:end]
            end -= start
            start = 0


def _forward(sink_port: int, mode: str) -> None:
    """The measured process: its port on the first line of stdout (as bench_hop's proxy
    children), then one stream, then its CPU figures as JSON on the second line."""
    _use(mode)
    listener = _listener()
    print(listener.getsockname()[1], flush=True)
    src, _ = listener.accept()
    dst = socket.create_connection(("127.0.0.1", sink_port))
    before = os.times()
    if mode.startswith("open"):
        moved = _open_loop(src, dst)
    else:
        sealer = (tunnel_crypto.FrameSealer(KEY, tunnel_crypto.AES256GCM)
                  if mode.startswith("seal") else None)
        view = memoryview(bytearray(CHUNK))
        moved = 0
        while True:
            n = src.recv_into(view)
            if not n:
                break
            dst.sendall(sealer.seal(view[:n]) if sealer is not None else view[:n])
            moved += n
    after = os.times()
    dst.close()
    print(json.dumps({"bytes": moved, "user": after.user - before.user,
                      "system": after.system - before.system}))


def _one_run(mode: str, total: int) -> Dict[str, float]:
    sink = _listener()
    me = os.path.abspath(__file__)
    forwarder = subprocess.Popen([sys.executable, me, "--role", "forward", "--mode", mode,
                                  "--port", str(sink.getsockname()[1])],
                                 stdout=subprocess.PIPE)
    source = None
    try:
        line = forwarder.stdout.readline()  # type: ignore[union-attr] - stdout=PIPE
        if not line.strip():  # it exited before listening: its stderr says why
            raise RuntimeError("the forwarder did not start")
        port = int(line)
        source = subprocess.Popen([sys.executable, me, "--role", "source", "--mode", mode,
                                   "--port", str(port), "--bytes", str(total)])
        _sink(sink)
        out, _ = forwarder.communicate(timeout=300)
        source.wait(timeout=30)
    finally:
        for proc in (forwarder, source):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        sink.close()
    figures = json.loads(out)
    gib = figures["bytes"] / GIB
    return {"user": figures["user"] / gib, "system": figures["system"] / gib,
            "total": (figures["user"] + figures["system"]) / gib}


def floor_figures(mib: int, runs: int, modes: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """Per mode: the median user, system and total CPU s/GiB of ``runs`` runs, and each
    run's total (``runs``)."""
    total = max(1, mib * (1 << 20) // CHUNK) * CHUNK
    figures: Dict[str, Dict[str, Any]] = {}
    for mode in modes:
        if mode not in MODES:
            raise ValueError("unknown mode %r (one of %s)" % (mode, ", ".join(MODES)))
        done = [_one_run(mode, total) for _ in range(runs)]
        med: Dict[str, Any] = {k: statistics.median(r[k] for r in done)
                               for k in ("user", "system", "total")}
        med["runs"] = [r["total"] for r in done]
        figures[mode] = med
    return figures


def suite_section(bench: Any) -> None:
    """Section 7 of ``python -m benchmarks.run``: the floor, in the same run as the
    agent's and sshd's CPU per GiB of section 1 (1 GiB per run; --quick 32 MiB)."""
    figures = floor_figures(32 if bench.quick else 1024, int(bench.opt("runs")), MODES)
    bench.results["cpu_floor_s_per_gib"] = {m: round(f["total"], 3)
                                            for m, f in figures.items()}
    for mode, f in figures.items():
        bench.say("  floor %-15s %.3f s/GiB" % (mode, f["total"]))


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=2048, help="MiB per run (default 2048)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--role", choices=("forward", "source"), help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--bytes", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "forward":
        _forward(args.port, args.mode)
        return 0
    if args.role == "source":
        _source(args.port, args.mode, args.bytes)
        return 0
    print("forwarder CPU s/GiB, median of %d runs of %d MiB (user + system)"
          % (args.runs, args.mib))
    for mode, med in floor_figures(args.mib, args.runs, args.modes.split(",")).items():
        print("%-15s %.3f s/GiB  (user %.3f, system %.3f; runs %s)"
              % (mode, med["total"], med["user"], med["system"],
                 ", ".join("%.3f" % t for t in med["runs"])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
