"""What routing by session id adds: a 1-byte round trip through a leg forwarded by its
entry relay to the session's owner, against both legs on the owner.

    python benchmarks/bench_route_hop.py [--rounds 3000]

Two relay processes with ``pool_peers`` on 127.0.0.1 (no load balancer: each leg dials
the relay the measurement wants). For a session id owned by relay A, the "local" case
dials both legs to A; the "forwarded" case dials the console's leg to B, which forwards
it to A (one more splice hop, relay to relay). The agent's end echoes each byte in a
thread. Prints p50/p99 of each and the p50 added. Figures only, no assertions.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import yaml

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from remote_gevent.common import tls  # noqa: E402
from remote_gevent.demo.pki import CertificateAuthority  # noqa: E402
from remote_gevent.demo.processes import entry_argv  # noqa: E402
from remote_gevent.demo.rabbit import free_port  # noqa: E402
from remote_gevent.relay.routing import owner  # noqa: E402
from remote_gevent.wire.rendezvous import dial_relay  # noqa: E402


def _start(directory: str, ca: CertificateAuthority, ports, i: int) -> subprocess.Popen:
    cert = ca.issue("relay%d" % i, ["127.0.0.1"])
    peers = ["127.0.0.1:%d" % p for p in ports]
    path = os.path.join(directory, "relay%d.yaml" % i)
    with open(path, "w") as fh:
        yaml.safe_dump({"listen": peers[i], "cert": cert.cert_file, "key": cert.key_file,
                        "pool_peers": peers, "pool_self": peers[i],
                        "pool_secret_file": os.path.join(directory, "secret"),
                        "pool_ca_file": ca.cert_file}, fh)
    proc = subprocess.Popen(entry_argv("remote-gevent-relay", "remote_gevent.relay.cli")
                            + ["--config", path, "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", ports[i]), timeout=1).close()
            return proc
        except OSError:
            assert time.monotonic() < deadline, "relay did not start"
            time.sleep(0.05)


def _rtt(ctx, agent_port: int, console_port: int, sid: str, rounds: int):
    ticket = os.urandom(32)
    out = {}

    def agent() -> None:
        sock, _ = dial_relay("127.0.0.1", agent_port, ctx, None, "agent", sid, ticket)
        out["agent"] = sock
        while True:
            b = sock.recv(1)
            if not b:
                break
            sock.sendall(b)
        sock.close()

    t = threading.Thread(target=agent, daemon=True)
    t.start()
    sock, _ = dial_relay("127.0.0.1", console_port, ctx, None, "console", sid, ticket)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        sock.sendall(b"x")
        sock.recv(1)
        times.append(time.perf_counter() - start)
    sock.close()
    t.join(5)
    times.sort()
    return statistics.median(times) * 1e6, times[int(len(times) * 0.99)] * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        ca = CertificateAuthority(os.path.join(directory, "pki"))
        with open(os.path.join(directory, "secret"), "w") as fh:
            fh.write(os.urandom(24).hex())
        ports = [free_port(), free_port()]
        procs = [_start(directory, ca, ports, i) for i in range(2)]
        try:
            ctx = tls.client_context(ca.cert_file)
            a = "127.0.0.1:%d" % ports[0]
            peers = [a, "127.0.0.1:%d" % ports[1]]
            sids = (os.urandom(16).hex() for _ in range(1000))
            owned = [s for s in sids if owner(s, peers) == a][:4]
            local = [_rtt(ctx, ports[0], ports[0], owned[i], args.rounds) for i in (0, 1)]
            fwd = [_rtt(ctx, ports[0], ports[1], owned[i], args.rounds) for i in (2, 3)]
            lp50 = min(x[0] for x in local)
            fp50 = min(x[0] for x in fwd)
            print("1-byte RTT, both legs on the owner:  p50 %.0f us, p99 %.0f us"
                  % (lp50, min(x[1] for x in local)))
            print("1-byte RTT, console leg forwarded:   p50 %.0f us, p99 %.0f us"
                  % (fp50, min(x[1] for x in fwd)))
            print("added by the forwarding hop (p50):   %.0f us" % (fp50 - lp50))
        finally:
            for p in procs:
                p.terminate()
                p.wait(10)


if __name__ == "__main__":
    main()
