"""Relays for the tests (one place for what test_cluster, test_relay, test_setup_path,
test_relay_pool, test_relay_pool_failover and test_relay_routing_e2e need): in-process
relays (one, or a fixture's factory), a relay process (which a test can SIGKILL by pid
and whose Prometheus metrics it can scrape), Debian's haproxy publishing each relay on a
port of its own (``send-proxy-v2``) or several behind one address, and the traffic of
the pool tests (an echo target hashing both ways, bulk and short ``stdio`` sessions,
in-process console sessions)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import gevent
import pytest
import yaml
from gevent.server import StreamServer

from remote_gevent.console.session import open_session
from remote_gevent.demo.pki import CertificateAuthority
from remote_gevent.demo.processes import entry_argv
from remote_gevent.demo.rabbit import free_port
from remote_gevent.relay import server as relay_mod
from remote_gevent.relay.settings import RelaySettings

WAIT = 20.0
HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists(
    "/usr/sbin/haproxy") else None)
CHUNK = 1 << 16  # the pool tests' read and write size
PAIRINGS = "remote_gevent_relay_pairings_total"
PAIRED = "remote_gevent_relay_paired"


def relay_pki(base) -> Dict[str, Any]:
    """A test CA in ``base``/ca and the relay certificate it issues for localhost and
    127.0.0.1: ``{"ca": ..., "cert": ...}``."""
    ca = CertificateAuthority(str(base / "ca"))
    return {"ca": ca, "cert": ca.issue("relay", hosts=["localhost", "127.0.0.1"])}


def need_haproxy() -> None:
    if HAPROXY is None:
        pytest.skip("haproxy is not installed (scripts/setup-deps installs it)")


def new_relay(cert, port: int = 0, splice: Optional[bool] = None,
              **settings) -> relay_mod.Relay:
    """An in-process relay on 127.0.0.1:``port`` (0: a free one) with ``cert`` (from the
    test CA, e.g. ``ca.issue(name, ["127.0.0.1"])``), started; ``settings`` as
    :class:`RelaySettings`. Stop it with ``relay.stop(grace=0)``."""
    relay = relay_mod.Relay(RelaySettings(
        host="127.0.0.1", port=port, cert_file=cert.cert_file, key_file=cert.key_file,
        **settings), splice=splice)
    relay.start()
    return relay


def start_relay(cert, proxy_protocol: bool = False, pairing_timeout: float = 10.0,
                **settings) -> relay_mod.Relay:
    """:func:`new_relay` on a free port, with a pool test's defaults."""
    return new_relay(cert, proxy_protocol=proxy_protocol, pairing_timeout=pairing_timeout,
                     **settings)


@contextlib.contextmanager
def relay_factory(cert, wait: float = WAIT) -> Iterator[Callable[..., relay_mod.Relay]]:
    """A fixture's ``factory(port=0, splice=None, **settings)`` of :func:`new_relay`; every
    relay it started is stopped (each within ``wait``) on leaving."""
    started: List[relay_mod.Relay] = []

    def factory(port: int = 0, splice: Optional[bool] = None,
                **settings: Any) -> relay_mod.Relay:
        server = new_relay(cert, port, splice, **settings)
        started.append(server)
        return server

    try:
        yield factory
    finally:
        for server in started:
            with gevent.Timeout(wait):
                server.stop(grace=0)


def _wait_port(port: int, proc: subprocess.Popen, what: str, log: str = "") -> None:
    deadline = time.monotonic() + WAIT
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None:
                raise AssertionError("%s exited with %s%s" % (what, proc.returncode, log)) from None
            assert time.monotonic() < deadline, "%s did not listen on %d" % (what, port)
            time.sleep(0.05)


class RelayProcess:
    """``remote-gevent-relay`` as a process of its own, with a metrics listener."""

    def __init__(self, directory: str, name: str, cert_file: str, key_file: str,
                 proxy_protocol: bool = False, port: Optional[int] = None,
                 extra: Optional[Dict[str, object]] = None) -> None:
        self.name = name
        self.port = port or free_port()
        self.metrics_port = free_port()
        self.log = os.path.join(directory, "%s.log" % name)
        config = os.path.join(directory, "%s.yaml" % name)
        doc = {"listen": "127.0.0.1:%d" % self.port, "cert": cert_file,
               "key": key_file, "proxy_protocol": proxy_protocol,
               "metrics_listen": "127.0.0.1:%d" % self.metrics_port}
        doc.update(extra or {})
        with open(config, "w") as fh:
            yaml.safe_dump(doc, fh)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                entry_argv("remote-gevent-relay", "remote_gevent.relay.cli")
                + ["--config", config], stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT)
        _wait_port(self.port, self.proc, "relay %s" % name, " (see %s)" % self.log)
        _wait_port(self.metrics_port, self.proc, "relay %s metrics" % name)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def metrics(self) -> Dict[str, float]:
        """``{sample name: value}`` of the relay's /metrics (prometheus_client's parser)."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % self.metrics_port,
                                    timeout=5) as resp:
            text = resp.read().decode("utf-8")
        return {s.name: s.value for f in text_string_to_metric_families(text)
                for s in f.samples if not s.labels}

    def kill(self) -> None:
        """SIGKILL, by pid: no drain, no goodbye (the relay's sockets just die)."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class Haproxy:
    """Debian's haproxy in the foreground (``-db``) with ``lines`` as its configuration
    (``mode tcp`` defaults first), once it listens on every one of ``ports``."""

    DEFAULTS = ["defaults", "    mode tcp", "    timeout connect 5s",
                "    timeout client 60s", "    timeout server 60s"]

    def __init__(self, directory: str, name: str, lines: List[str], ports: Sequence[int],
                 maxconn: int = 500) -> None:
        assert HAPROXY is not None
        cfg = os.path.join(directory, "%s.cfg" % name)
        with open(cfg, "w") as f:
            f.write("\n".join(["global", "    maxconn %d" % maxconn] + lines) + "\n")
        self.proc = subprocess.Popen([HAPROXY, "-db", "-f", cfg],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for port in ports:
            _wait_port(port, self.proc, "haproxy")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


class Balancer(Haproxy):
    """haproxy publishing each relay on its own port, with send-proxy-v2."""

    def __init__(self, directory: str, relay_ports: Sequence[int],
                 ports: Optional[List[int]] = None) -> None:
        self.ports = ports or [free_port() for _ in relay_ports]
        lines = list(self.DEFAULTS)
        for i, (front, back) in enumerate(zip(self.ports, relay_ports)):
            lines += ["listen relay%d" % i, "    bind 127.0.0.1:%d" % front,
                      "    server r%d 127.0.0.1:%d send-proxy-v2" % (i, back)]
        super().__init__(directory, "haproxy", lines, self.ports)


class RoundRobin(Haproxy):
    """haproxy publishing several relays behind ONE address, ``balance roundrobin``
    (optionally ``send-proxy-v2``)."""

    def __init__(self, directory: str, relay_ports: Sequence[int], port: Optional[int] = None,
                 send_proxy: bool = False) -> None:
        self.port = port or free_port()
        lines = ["defaults", "    mode tcp", "    timeout connect 2s",
                 "    timeout client 120s", "    timeout server 120s",
                 "    option redispatch", "    retries 3",
                 "listen pool", "    bind 127.0.0.1:%d" % self.port, "    balance roundrobin"]
        for i, back in enumerate(relay_ports):
            lines.append("    server r%d 127.0.0.1:%d%s" % (
                i, back, " send-proxy-v2" if send_proxy else ""))
        super().__init__(directory, "haproxy-rr", lines, [self.port], maxconn=2000)


# --------------------------------------------------------------------------- pool traffic


def pool_platform(rabbit, directory: str, pool: List[str], resume_timeout: float,
                  **remote: Any):
    """A demo platform on the suite's broker whose agent and console know the relay
    ``pool`` (addresses) and resume; neither relay nor agent started (the test starts
    its relays, then ``p.start_agent()``)."""
    from test_e2e import make_platform

    resume = {"keepalive_interval": 1, "resume_timeout": resume_timeout}
    return make_platform(rabbit, directory, start_relay=False, start_agent=False,
                         relay_port=int(pool[0].rsplit(":", 1)[1]),
                         remote=dict(resume, relays={"fr04": pool}, max_session=20, **remote),
                         console=dict(resume, relay=pool))


class HashingEcho:
    """Echoes every connection, with the sha256 of what it received and what it sent."""

    def __init__(self) -> None:
        self.done: List[Dict[str, object]] = []
        self.server = StreamServer(("127.0.0.1", 0), self._handle)
        self.server.start()
        self.target = "127.0.0.1:%d" % self.server.address[1]

    def _handle(self, sock: socket.socket, _addr) -> None:
        rx, tx, n = hashlib.sha256(), hashlib.sha256(), 0
        try:
            while True:
                data = sock.recv(CHUNK)
                if not data:
                    break
                rx.update(data)
                n += len(data)
                sock.sendall(data)
                tx.update(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            self.done.append({"rx": rx.hexdigest(), "tx": tx.hexdigest(), "n": n})
            sock.close()


class Bulk:
    """A stdio console carrying ``size`` random bytes to the echo target and back, one
    CHUNK every ``pace`` seconds."""

    def __init__(self, runner, argv: List[str], size: int, pace: float) -> None:
        self.size, self.pace = size, pace
        self.proc = runner.start(argv, stdin=subprocess.PIPE)
        self.sent, self.got = hashlib.sha256(), hashlib.sha256()
        self.received = 0
        self._g = [gevent.spawn(self._write), gevent.spawn(self._read)]

    def _write(self) -> None:
        left = self.size
        while left:
            chunk = os.urandom(min(CHUNK, left))
            self.proc.stdin.write(chunk)
            self.proc.stdin.flush()
            self.sent.update(chunk)
            left -= len(chunk)
            gevent.sleep(self.pace)
        self.proc.stdin.close()

    def _read(self) -> None:
        while True:
            chunk = self.proc.stdout.read1(CHUNK)
            if not chunk:
                return
            self.got.update(chunk)
            self.received += len(chunk)

    def finish(self) -> str:
        gevent.joinall(self._g, timeout=180, raise_error=True)
        _, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, err
        assert self.received == self.size
        assert self.got.hexdigest() == self.sent.hexdigest()
        return err.decode("utf-8", "replace")


def echo_once(runner, argv: List[str]) -> str:
    """A short ``stdio`` session: 200 kB there and back; its stderr."""
    payload = os.urandom(200000)
    proc = runner.start(argv, stdin=subprocess.PIPE)
    out, err = proc.communicate(payload, timeout=90)
    text = err.decode("utf-8", "replace")
    assert proc.returncode == 0 and out == payload, text
    return text


def echo_session(control, ident: str, target: str) -> bool:
    """One session of an in-process console: whether it paired and echoed 2000 bytes."""
    session = open_session(control.cfg, ident, [target], control=control)
    try:
        stream = session.open_stream(target)
        payload = os.urandom(2000)
        stream.send(payload)
        stream.shutdown_write()
        got = b""
        while len(got) < len(payload):
            chunk = stream.recv()
            if not chunk:
                break
            got += chunk
        return got == payload
    finally:
        session.close()
