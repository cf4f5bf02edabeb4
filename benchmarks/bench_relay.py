"""Relay benchmark: one-stream throughput through the relay vs direct, and relay RSS.

    python benchmarks/bench_relay.py                    # 1 GiB stream, 1000 idle pairs
    python benchmarks/bench_relay.py --pairs 5000       # issue 6's memory figure
    python benchmarks/bench_relay.py --size-mib 256 --pairs 0 --repeat 3

Everything runs on 127.0.0.1 with a throw-away CA. The relay is a real
``remote-gevent-relay`` process; sender and receiver are separate processes (this
script in its ``_client`` mode), so the figures include the client-side TLS work, as
agent and console would. Figures only, no assertions: CI may smoke it, never time it.
"""

from gevent import monkey; monkey.patch_all()  # noqa: E702

import argparse  # noqa: E402
import base64  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import gevent.pool  # noqa: E402

if __package__ in (None, ""):  # run as ``python benchmarks/bench_relay.py``
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.suite_common import cpu_seconds, raise_nofile, rss_kib  # noqa: E402
from remote_gevent.relay import server as relay  # noqa: E402
from remote_gevent.common import tls  # noqa: E402
from remote_gevent.demo.pki import CertificateAuthority  # noqa: E402
from remote_gevent.wire import rendezvous  # noqa: E402

CHUNK = 256 * 1024
READY_TIMEOUT = 20.0
RUN_TIMEOUT = 600.0


# ----------------------------------------------------------------- client processes


def client_main(argv) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["send", "recv"])
    p.add_argument("--kind", choices=["relay", "tcp", "tls"], required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca")
    p.add_argument("--role")
    p.add_argument("--sid")
    p.add_argument("--ticket")
    p.add_argument("--bytes", type=int, required=True)
    a = p.parse_args(argv)
    if a.kind == "relay":
        ctx = tls.client_context(a.ca)
        sock, _ = rendezvous.dial_relay("127.0.0.1", a.port, ctx, "127.0.0.1", a.role, a.sid,
                                   a.ticket, timeout=10, pair_timeout=30)
    else:
        sock = socket.create_connection(("127.0.0.1", a.port), timeout=10)
        sock.settimeout(None)
        if a.kind == "tls":
            ctx = rendezvous.allow_half_close(tls.client_context(a.ca))
            sock = ctx.wrap_socket(sock, server_hostname="127.0.0.1")
    print("ready", flush=True)
    sys.stdin.readline()  # go
    start = time.monotonic()
    if a.mode == "send":
        block = os.urandom(CHUNK)
        view = memoryview(block)
        left = a.bytes
        while left:
            n = min(left, CHUNK)
            sock.sendall(view[:n])
            left -= n
        rendezvous.half_close(sock)
        while sock.recv(4096):
            pass
        total = a.bytes
    else:
        buf = bytearray(CHUNK)
        total = 0
        while True:
            n = sock.recv_into(buf)
            if not n:
                break
            total += n
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"bytes": total, "seconds": time.monotonic() - start,
                      "cpu": usage.ru_utime + usage.ru_stime}), flush=True)


def _spawn_client(args):
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), "_client"] + args,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            universal_newlines=True)


def run_pair(sender_args, receiver_args, size: int) -> float:
    """Start receiver and sender processes, release them together; Gbit/s at the receiver."""
    procs = [_spawn_client(["recv"] + receiver_args), _spawn_client(["send"] + sender_args)]
    try:
        for proc in procs:
            line = proc.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError("client did not get ready: %r" % line)
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = []
        for proc in procs:
            out, _ = proc.communicate(timeout=RUN_TIMEOUT)
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    received = results[0]
    if os.environ.get("BENCH_VERBOSE"):
        print("  receiver %r, sender %r" % (results[0], results[1]))
    if received["bytes"] != size:
        raise RuntimeError("receiver got %d bytes of %d" % (received["bytes"], size))
    return size * 8 / received["seconds"] / 1e9


# ----------------------------------------------------------------- direct baselines


def direct_stream(kind: str, size: int, cert, ca_file: str) -> float:
    """One hop, no relay: the receiver process listens, the sender process connects."""
    recv_code = r"""
import json, os, socket, ssl, sys, time
kind, cert, key, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen(1)
print(l.getsockname()[1], flush=True)
c, _ = l.accept()
if kind == "tls":
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(cert, key)
    ctx.options |= getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    c = ctx.wrap_socket(c, server_side=True)
buf = bytearray(262144); total = 0; start = None
while True:
    n = c.recv_into(buf)
    if start is None: start = time.monotonic()
    if not n: break
    total += n
print(json.dumps({"bytes": total, "seconds": time.monotonic() - start}), flush=True)
"""
    recv = subprocess.Popen([sys.executable, "-c", recv_code, kind, cert.cert_file,
                             cert.key_file, str(size)], stdout=subprocess.PIPE,
                            universal_newlines=True)
    try:
        port = int(recv.stdout.readline())
        sender = _spawn_client(["send", "--kind", kind, "--port", str(port), "--ca", ca_file,
                                "--bytes", str(size)])
        if sender.stdout.readline().strip() != "ready":
            raise RuntimeError("sender did not get ready")
        sender.stdin.write("go\n")
        sender.stdin.flush()
        sender.communicate(timeout=RUN_TIMEOUT)
        out, _ = recv.communicate(timeout=RUN_TIMEOUT)
    finally:
        if recv.poll() is None:
            recv.kill()
    result = json.loads(out.strip().splitlines()[-1])
    if result["bytes"] != size:
        raise RuntimeError("receiver got %d bytes of %d" % (result["bytes"], size))
    return size * 8 / result["seconds"] / 1e9


# ----------------------------------------------------------------- relay process


class RelayProcess:
    def __init__(self, workdir: str, cert, pairs: int) -> None:
        conf = os.path.join(workdir, "relay.yaml")
        with open(conf, "w") as f:
            f.write("listen: 127.0.0.1:0\ncert: %s\nkey: %s\nmax_paired: %d\n"
                    "max_pending: %d\nmax_pending_per_ip: %d\n"
                    % (cert.cert_file, cert.key_file, max(pairs, 10) + 10, 2000, 2000))
        self.log_path = os.path.join(workdir, "relay.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "remote_gevent.relay.cli",
                                      "--config", conf, "--log-level", "warning"],
                                     stderr=subprocess.PIPE, universal_newlines=True)
        deadline = time.monotonic() + READY_TIMEOUT
        self.port = 0
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            m = re.search(r"relay listening on 127\.0\.0\.1:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                break
        if not self.port:
            self.proc.kill()
            raise RuntimeError("relay did not start")
        # keep draining stderr so the relay never blocks on a full pipe
        self._drainer = gevent.spawn(self._drain)

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.log.write(line)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._drainer.join(timeout=2)
        self.log.close()


def session_args(port: int, ca: str):
    sid = os.urandom(16).hex()
    ticket = base64.b64encode(os.urandom(32)).decode()
    common = ["--kind", "relay", "--port", str(port), "--ca", ca, "--sid", sid,
              "--ticket", ticket]
    return common + ["--role", "agent"], common + ["--role", "console"]


def idle_pairs(port: int, ca_file: str, pairs: int, pid: int) -> dict:
    ctx = tls.client_context(ca_file)
    socks = []
    pool = gevent.pool.Pool(20)
    before = rss_kib(pid)

    def one_pair(_i: int) -> None:
        sid = os.urandom(16).hex()
        ticket = os.urandom(32)
        a = gevent.spawn(rendezvous.dial_relay, "127.0.0.1", port, ctx, "127.0.0.1", "agent",
                         sid, ticket, 10)
        c = gevent.spawn(rendezvous.dial_relay, "127.0.0.1", port, ctx, "127.0.0.1", "console",
                         sid, ticket, 10)
        gevent.joinall([a, c], raise_error=True)
        socks.append((a.value[0], c.value[0]))

    start = time.monotonic()
    for _ in pool.imap_unordered(one_pair, range(pairs)):
        pass
    setup = time.monotonic() - start
    gevent.sleep(1)
    paired = rss_kib(pid)
    # One small exchange each way, as a real tunnel's HELLO frames would do, then idle.
    for a, c in socks:
        a.sendall(b"x" * 1024)
        c.sendall(b"y" * 1024)
    for a, c in socks:
        c.recv(4096)
        a.recv(4096)
    gevent.sleep(1)
    used = rss_kib(pid)
    for a, c in socks:
        a.close()
        c.close()
    return {"pairs": pairs, "setup_s": round(setup, 1), "rss_before_mib": before / 1024,
            "rss_paired_mib": paired / 1024, "rss_after_traffic_mib": used / 1024,
            "per_session_kib": (used - before) / max(pairs, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mib", type=int, default=1024, help="bytes per stream (MiB)")
    p.add_argument("--pairs", type=int, default=1000, help="idle paired sessions (0: skip)")
    p.add_argument("--repeat", type=int, default=1, help="throughput runs (median)")
    p.add_argument("--json", help="write the figures to this file too")
    a = p.parse_args()
    limit = raise_nofile()
    if a.pairs * 2 + 64 > limit:
        sys.exit("--pairs %d needs %d descriptors, the limit is %d"
                 % (a.pairs, a.pairs * 2 + 64, limit))
    size = a.size_mib * 1024 * 1024
    workdir = tempfile.mkdtemp(prefix="bench-relay-")
    results = {"machine": {"cores": os.cpu_count(), "python": sys.version.split()[0],
                           "openssl": relay.ssl.OPENSSL_VERSION}}
    try:
        ca = CertificateAuthority(os.path.join(workdir, "ca"))
        cert = ca.issue("relay", hosts=["127.0.0.1", "localhost"])
        rp = RelayProcess(workdir, cert, a.pairs)
        try:
            rows = {"direct_tcp": [], "direct_tls": [], "relay_tls": []}
            relay_cpu = []
            for _ in range(a.repeat):
                rows["direct_tcp"].append(direct_stream("tcp", size, cert, ca.cert_file))
                rows["direct_tls"].append(direct_stream("tls", size, cert, ca.cert_file))
                agent, console = session_args(rp.port, ca.cert_file)
                cpu0 = cpu_seconds(rp.proc.pid)
                rows["relay_tls"].append(run_pair(agent + ["--bytes", str(size)],
                                                  console + ["--bytes", str(size)], size))
                relay_cpu.append((cpu_seconds(rp.proc.pid) - cpu0) / (size / 2 ** 30))
            results["throughput_gbit_s"] = {k: sorted(v)[len(v) // 2] for k, v in rows.items()}
            per_gib = sorted(relay_cpu)[len(relay_cpu) // 2]
            results["relay_cpu_s_per_gib"] = per_gib
            print("one stream, %d MiB, median of %d:" % (a.size_mib, a.repeat))
            for k, v in results["throughput_gbit_s"].items():
                print("  %-11s %6.2f Gbit/s" % (k, v))
            print("  relay CPU  %6.2f s per GiB forwarded (one core: ~%.1f Gbit/s capacity)"
                  % (per_gib, 8 * 2 ** 30 / 1e9 / per_gib if per_gib else 0.0))
            if a.pairs:
                mem = idle_pairs(rp.port, ca.cert_file, a.pairs, rp.proc.pid)
                results["idle_pairs"] = mem
                print("relay RSS: %.1f MiB empty, %.1f MiB with %d paired sessions, "
                      "%.1f MiB after 1 KiB each way; %.1f KiB per session; setup %.1fs"
                      % (mem["rss_before_mib"], mem["rss_paired_mib"], a.pairs,
                         mem["rss_after_traffic_mib"], mem["per_session_kib"],
                         mem["setup_s"]))
        finally:
            rp.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_client":
        client_main(sys.argv[2:])
    else:
        main()


def suite_section(bench: Any) -> None:
    """``python -m benchmarks.run``'s relay memory section: RSS with paired idle sessions."""
    from remote_gevent.demo.pki import CertificateAuthority

    pairs = int(bench.opt("relay_pairs"))
    ca = CertificateAuthority(os.path.join(bench.workdir, "relay-ca"))
    cert = ca.issue("relay", hosts=["127.0.0.1", "localhost"])
    work = os.path.join(bench.workdir, "relay-mem")
    os.makedirs(work, exist_ok=True)
    rp = RelayProcess(work, cert, pairs)
    try:
        res = idle_pairs(rp.port, ca.cert_file, pairs, rp.proc.pid)
    finally:
        rp.stop()
    bench.results.setdefault("memory", {})["relay"] = res
    bench.say("  relay RSS %.1f MiB empty, %.1f MiB with %d paired idle sessions (%.1f KiB each)"
              % (res["rss_before_mib"], res["rss_after_traffic_mib"], pairs,
                 res["per_session_kib"]))
