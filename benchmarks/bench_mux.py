"""Throughput of one mux stream over a loopback TCP tunnel, with real sealers.

    python benchmarks/bench_mux.py [--size-mib 1024] [--direction up|down|both]
                                   [--cipher all|aes256gcm|xchacha20poly1305|plain]
                                   [--writer lock|queue]
                                   [--inproc] [--repeat 3] [--json FILE]

Two Tunnels (console and agent) talk over one loopback TCP connection.  By
default the agent runs in a child process (as in production, where console and
agent are separate machines; this box has 2 cores): the console process pushes
SIZE bytes from a local TCP socket into a stream, the agent splices the stream to
a TCP sink in its process, which answers with the byte count after EOF
(half-close), or the reverse for ``down``.  ``--inproc`` runs everything in one
process (one core: a lower bound).  ``--writer queue`` swaps mux's lock-based
writer for a single writer greenlet fed by a bounded queue, to reproduce the
measurement that chose the lock.  Also prints a direct TCP baseline.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
import gevent.queue  # noqa: E402
import gevent.server  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from remote_gevent.common.sockets import recv_exact  # noqa: E402
from remote_gevent.wire import mux  # noqa: E402
from remote_gevent.wire import mux_frames  # noqa: E402
from benchmarks import plain_frames  # noqa: E402
from remote_gevent.crypto import tunnel_crypto  # noqa: E402

SID = "0123456789abcdef0123456789abcdef"
CHUNK = 1 << 20
_Q = struct.Struct(">Q")


class QueueWriterTunnel(mux.Tunnel):
    """Variant: one writer greenlet seals and sends frames taken from a bounded queue."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._wq = gevent.queue.Queue(64)
        self._writer = gevent.spawn(self._write_loop)

    def _send_plain(self, plaintext):
        if self._close_code is not None:
            raise mux_frames.TunnelClosed("closed")
        self._wq.put(bytes(plaintext))  # callers reuse their buffers: copy

    def _write_loop(self):
        seal, sendall = self._sealer.seal, self._sock.sendall
        try:
            while True:
                sendall(seal(self._wq.get()))
        except OSError:
            pass


def _sealers(cipher):
    if cipher == "plain":
        return (plain_frames.PlainSealer(), plain_frames.PlainOpener(),
                plain_frames.PlainSealer(), plain_frames.PlainOpener())
    cpk, csk = tunnel_crypto.kx_keypair()
    apk, ask = tunnel_crypto.kx_keypair()
    ctx, crx = tunnel_crypto.derive_keys("console", cpk, csk, apk, SID)
    atx, arx = tunnel_crypto.derive_keys("agent", apk, ask, cpk, SID)
    return (tunnel_crypto.FrameSealer(ctx, cipher), tunnel_crypto.FrameOpener(crx, cipher),
            tunnel_crypto.FrameSealer(atx, cipher), tunnel_crypto.FrameOpener(arx, cipher))


# ---------------------------------------------------------------- data source / sink

def _pump_out(sock, size):
    block = memoryview(os.urandom(CHUNK))
    left = size
    while left:
        n = min(left, CHUNK)
        sock.sendall(block[:n])
        left -= n


def _drain(sock):
    buf = bytearray(1 << 18)
    total = 0
    while True:
        n = sock.recv_into(buf)
        if not n:
            return total
        total += n


def _sink_handler(sock, _addr):
    """'U': read to EOF, answer the count.  'D'+size: send size bytes, close."""
    try:
        op = sock.recv(1)
        if op == b"U":
            sock.sendall(_Q.pack(_drain(sock)))
        elif op == b"D":
            size = _Q.unpack(recv_exact(sock, 8))[0]
            _pump_out(sock, size)
    finally:
        sock.close()


def _transfer(client, direction, size):
    """Run one transfer over ``client`` (connected to a sink); return seconds."""
    t0 = time.perf_counter()
    if direction == "up":
        client.sendall(b"U")
        _pump_out(client, size)
        client.shutdown(socket.SHUT_WR)
        got = _Q.unpack(recv_exact(client, 8))[0]
    else:
        client.sendall(b"D" + _Q.pack(size))
        got = _drain(client)
    dt = time.perf_counter() - t0
    if got != size:
        raise RuntimeError("transferred %d of %d bytes" % (got, size))
    return dt


# ---------------------------------------------------------------- agent side

def _start_sink():
    server = gevent.server.StreamServer(("127.0.0.1", 0), _sink_handler)
    server.start()
    return server


def _agent_tunnel(sock, sealer, opener, sink_port, cls):
    def on_open(target):
        return socket.create_connection(("127.0.0.1", sink_port))
    return cls(sock, sealer, opener, "agent", on_open=on_open, name="bench-agent",
               keepalive_interval=0)


def agent_child(port, cipher, keys_hex, writer):
    """Child process: connect to the console, run the agent tunnel until closed."""
    cls = QueueWriterTunnel if writer == "queue" else mux.Tunnel
    tx, rx = (bytes.fromhex(k) for k in keys_hex.split(":"))
    if cipher == "plain":
        sealer, opener = plain_frames.PlainSealer(), plain_frames.PlainOpener()
    else:
        sealer = tunnel_crypto.FrameSealer(tx, cipher)
        opener = tunnel_crypto.FrameOpener(rx, cipher)
    sink = _start_sink()
    sock = socket.create_connection(("127.0.0.1", port))
    tun = _agent_tunnel(sock, sealer, opener, sink.server_port, cls)
    tun.run()
    sink.stop(timeout=1)


# ---------------------------------------------------------------- console side

def _local_pair():
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    a = socket.create_connection(lsock.getsockname())
    b, _ = lsock.accept()
    lsock.close()
    return a, b


def run_one(cipher, direction, size, writer, inproc):
    cls = QueueWriterTunnel if writer == "queue" else mux.Tunnel
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    child = sink = agent = None
    if inproc:
        cs, co, as_, ao = _sealers(cipher)
        sink = _start_sink()
        asock = socket.create_connection(("127.0.0.1", port))
        csock, _ = listener.accept()
        agent = _agent_tunnel(asock, as_, ao, sink.server_port, cls)
        gevent.spawn(agent.run)
    else:
        if cipher == "plain":
            cs, co = plain_frames.PlainSealer(), plain_frames.PlainOpener()
            keys = "00:00"
        else:
            k1, k2 = os.urandom(32), os.urandom(32)
            cs, co = tunnel_crypto.FrameSealer(k1, cipher), tunnel_crypto.FrameOpener(k2, cipher)
            keys = "%s:%s" % (k2.hex(), k1.hex())
        child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--agent-child",
                                  str(port), cipher, keys, writer])
        csock, _ = listener.accept()
    listener.close()
    console = cls(csock, cs, co, "console", name="bench-console", keepalive_interval=0)
    runner = gevent.spawn(console.run)
    try:
        if not console.wait_up(10):
            raise RuntimeError("tunnel did not come up")
        stream = console.open_stream("sink", timeout=10)
        client, local = _local_pair()
        splicer = gevent.spawn(console.splice, stream, local)
        dt = _transfer(client, direction, size)
        client.close()
        splicer.join(timeout=10)
        return size * 8 / dt / 1e9
    finally:
        console.close("normal", "bench over")
        runner.join(timeout=10)
        if child is not None:
            child.wait(timeout=10)
        if sink is not None:
            sink.stop(timeout=1)


def run_direct(direction, size):
    sink = _start_sink()
    try:
        client = socket.create_connection(("127.0.0.1", sink.server_port))
        dt = _transfer(client, direction, size)
        client.close()
        return size * 8 / dt / 1e9
    finally:
        sink.stop(timeout=1)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--agent-child":
        agent_child(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--cipher", default="all")
    ap.add_argument("--direction", default="both", choices=["up", "down", "both"])
    ap.add_argument("--writer", default="lock", choices=["lock", "queue"])
    ap.add_argument("--inproc", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    size = args.size_mib << 20
    ciphers = [args.cipher]
    if args.cipher == "all":
        ciphers = ["plain", tunnel_crypto.XCHACHA20POLY1305]
        if tunnel_crypto.aes256gcm_available():
            ciphers.insert(1, tunnel_crypto.AES256GCM)
    directions = ["up", "down"] if args.direction == "both" else [args.direction]
    machine = {"cores": os.cpu_count(), "python": platform.python_version(),
               "cpu": _cpu_model(), "gevent": gevent.__version__}
    print("machine: %s" % json.dumps(machine))
    print("size %d MiB, writer=%s, %s, median of %d"
          % (args.size_mib, args.writer, "1 process" if args.inproc else "2 processes",
             args.repeat))
    results = []
    for d in directions:
        rates = [run_direct(d, size) for _ in range(args.repeat)]
        results.append({"path": "direct tcp", "direction": d, "gbit_s": statistics.median(rates)})
        print("%-22s %-4s %6.2f Gbit/s" % ("direct tcp", d, results[-1]["gbit_s"]))
        for c in ciphers:
            rates = [run_one(c, d, size, args.writer, args.inproc) for _ in range(args.repeat)]
            results.append({"path": "mux " + c, "direction": d, "writer": args.writer,
                            "inproc": args.inproc, "gbit_s": statistics.median(rates),
                            "runs": rates})
            print("%-22s %-4s %6.2f Gbit/s  (runs: %s)" % (
                "mux " + c, d, results[-1]["gbit_s"], ", ".join("%.2f" % r for r in rates)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "results": results}, f, indent=2)


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
