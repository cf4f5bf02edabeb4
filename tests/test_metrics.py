"""The relay's Prometheus endpoint (issue 13): scraped over HTTP and parsed with
prometheus_client's own parser, after real pairings, refusals and endings."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import gevent
import pytest

from remote_gevent.common import tls
from remote_gevent.demo.pki import CertificateAuthority
from remote_gevent.relay import server as relay
from remote_gevent.relay.settings import RelaySettings
from remote_gevent.wire import rendezvous

parser = pytest.importorskip("prometheus_client.parser")
from remote_gevent.relay.metrics import RelayMetrics  # noqa: E402

WAIT = 20.0
PAYLOAD = 300000


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    ca = CertificateAuthority(str(tmp_path_factory.mktemp("metrics-pki")))
    return ca, ca.issue("relay", hosts=["127.0.0.1"])


def scrape(port: int) -> dict:
    """``{(name, frozenset(labels)): value}`` of every sample on the endpoint."""
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=WAIT) as r:
        text = r.read().decode("utf-8")
    samples = {}
    for family in parser.text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def one_session(server, ctx, payload: int, ticket_console=None):
    sid, ticket = os.urandom(16).hex(), os.urandom(32)
    host, port = server.address

    def leg(role, tk):
        sock, _ = rendezvous.dial_relay(host, port, ctx, "127.0.0.1", role, sid, tk,
                                        timeout=WAIT, pair_timeout=WAIT)
        if role == "agent":
            sock.sendall(b"a" * payload)
        rendezvous.half_close(sock)
        got = 0
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += len(chunk)
        sock.close()
        return got

    agent = gevent.spawn(leg, "agent", ticket)
    console = gevent.spawn(leg, "console", ticket)
    with gevent.Timeout(WAIT):
        gevent.joinall([agent, console], raise_error=True)
    return console.value


def test_metrics_endpoint_counts_pairings_bytes_refusals_endings(pki):
    ca, cert = pki
    ctx = tls.client_context(ca.cert_file)
    server = relay.Relay(RelaySettings(host="127.0.0.1", port=0,
                                             cert_file=cert.cert_file,
                                             key_file=cert.key_file))
    server.start()
    metrics = RelayMetrics(server)
    _, port = metrics.serve("127.0.0.1", 0)
    try:
        before = scrape(port)
        assert before[("remote_gevent_relay_pairings_total", frozenset())] == 0
        for _ in range(3):
            assert one_session(server, ctx, PAYLOAD) == PAYLOAD
        # A hello that is not one: ERR bad_hello.
        raw = ctx.wrap_socket(__import__("socket").create_connection(server.address),
                              server_hostname="127.0.0.1")
        raw.sendall(b"HELLO?\n")
        assert raw.recv(100).startswith(b"ERR bad_hello")
        raw.close()
        deadline = time.monotonic() + WAIT
        while server.paired or server.pending:
            assert time.monotonic() < deadline
            gevent.sleep(0.05)
        m = scrape(port)
        assert m[("remote_gevent_relay_pairings_total", frozenset())] == 3
        assert m[("remote_gevent_relay_accepted_total", frozenset())] == 7
        assert m[("remote_gevent_relay_refusals_total",
                  frozenset({("code", "bad_hello")}))] == 1
        assert m[("remote_gevent_relay_endings_total", frozenset({("code", "normal")}))] == 3
        assert m[("remote_gevent_relay_bytes_total",
                  frozenset({("direction", "agent_to_console")}))] == 3 * PAYLOAD
        assert m[("remote_gevent_relay_bytes_total",
                  frozenset({("direction", "console_to_agent")}))] == 0
        for role in ("agent", "console"):
            assert m[("remote_gevent_relay_handshake_seconds_count",
                      frozenset({("role", role)}))] == 3
            assert 0 < m[("remote_gevent_relay_handshake_seconds_sum",
                          frozenset({("role", role)}))] < 3 * WAIT
        assert m[("remote_gevent_relay_paired", frozenset())] == 0
        assert m[("remote_gevent_relay_pending", frozenset())] == 0
    finally:
        metrics.stop()
        server.stop(grace=0)


def test_relay_process_serves_metrics_from_its_config(tmp_path, pki):
    ca, cert = pki
    from remote_gevent.demo.rabbit import free_port

    mport = free_port()
    conf = tmp_path / "relay.yaml"
    conf.write_text("listen: 127.0.0.1:0\ncert: %s\nkey: %s\nmetrics_listen: 127.0.0.1:%d\n"
                    % (cert.cert_file, cert.key_file, mport))
    proc = subprocess.Popen([sys.executable, "-m", "remote_gevent.relay.cli", "--config",
                             str(conf)], stderr=subprocess.PIPE, universal_newlines=True)
    try:
        deadline = time.monotonic() + WAIT
        lines = []
        while not any(re.search(r"relay metrics on http://127", line) for line in lines):
            assert time.monotonic() < deadline, "".join(lines)
            line = proc.stderr.readline()
            assert line, "".join(lines)
            lines.append(line)
        m = scrape(mport)
        assert m[("remote_gevent_relay_pending", frozenset())] == 0
        assert ("remote_gevent_relay_pairings_total", frozenset()) in m
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(WAIT)
