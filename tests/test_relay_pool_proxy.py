"""PROXY protocol v1/v2 on the relay's listener (issue 13).

Unit tests of the header reader on socket pairs, then the real thing: haproxy from
Debian, started by the test, in front of the relay with ``send-proxy-v2`` (and
``send-proxy`` for v1); clients from 127.0.0.2 and 127.0.0.3 pair through it and each
is told the *other's* real address, the relay's log names them, and the per-source
pending cap counts them apart.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import time

import gevent
import pytest

from remote_gevent.common import tls
from remote_gevent.demo.pki import CertificateAuthority
from remote_gevent.demo.rabbit import free_port
from remote_gevent.relay import proxy_protocol
from remote_gevent.relay import server as relay
from remote_gevent.relay.settings import RelaySettings
from remote_gevent.wire import rendezvous
from relay_helpers import Haproxy, need_haproxy, new_relay

WAIT = 20.0


def _pair_with(data: bytes):
    a, b = socket.socketpair()
    a.sendall(data)
    return a, b


V2_TCP4 = (proxy_protocol.V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack(">H", 12)
           + socket.inet_aton("203.0.113.7") + socket.inet_aton("10.0.0.1")
           + struct.pack(">HH", 40000, 8443))


@pytest.mark.parametrize("header, expected", [
    (b"PROXY TCP4 198.51.100.9 10.0.0.1 51234 8443\r\n", ("198.51.100.9", 51234)),
    (b"PROXY TCP6 2001:db8::5 2001:db8::1 51234 8443\r\n", ("2001:db8::5", 51234)),
    (b"PROXY UNKNOWN\r\n", None),
    (V2_TCP4, ("203.0.113.7", 40000)),
    (V2_TCP4[:12] + bytes([0x20, 0x00]) + struct.pack(">H", 0), None),  # LOCAL
])
def test_header_parsed_and_nothing_after_it_consumed(header, expected):
    a, b = _pair_with(header + b"\x16\x03\x01TLS")
    try:
        assert proxy_protocol.read_header(b, 2.0) == expected
        assert b.recv(100) == b"\x16\x03\x01TLS"  # the ClientHello is left for TLS
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("header, why", [
    (b"\x16\x03\x01\x02\x00\x01\x00\x01", "does not start with a PROXY header"),
    (b"PROXY TCP4 999.1.1.1 10.0.0.1 1 2\r\n", "malformed PROXY v1 address"),
    (b"PROXY TCP4 " + b"1" * 120, "longer than 107 bytes"),
    (V2_TCP4[:14] + struct.pack(">H", 60000), "header of 60000 bytes refused"),
    (V2_TCP4[:12] + bytes([0x22]) + V2_TCP4[13:], "version/command"),
    (b"PROXY TC", "in time"),  # stalls: bounded by the deadline
])
def test_bad_headers_refused_with_a_reason(header, why):
    a, b = _pair_with(header)
    try:
        t0 = time.monotonic()
        with pytest.raises(proxy_protocol.ProxyHeaderError, match=why):
            proxy_protocol.read_header(b, 0.5)
        assert time.monotonic() - t0 < 2.0
    finally:
        a.close()
        b.close()


# --------------------------------------------------------------------------- haproxy


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    ca = CertificateAuthority(str(tmp_path_factory.mktemp("proxy-pki")))
    return ca, ca.issue("relay", hosts=["127.0.0.1"])


class Proxies(Haproxy):
    """haproxy in the foreground: frontend ``v2`` (send-proxy-v2) and ``v1`` (send-proxy)
    to one relay port."""

    def __init__(self, directory: str, relay_port: int) -> None:
        self.v2, self.v1 = free_port(), free_port()
        super().__init__(directory, "haproxy", self.DEFAULTS + [
            "frontend fe_v2", "    bind 127.0.0.1:%d" % self.v2, "    default_backend be_v2",
            "frontend fe_v1", "    bind 127.0.0.1:%d" % self.v1, "    default_backend be_v1",
            "backend be_v2", "    server relay 127.0.0.1:%d send-proxy-v2" % relay_port,
            "backend be_v1", "    server relay 127.0.0.1:%d send-proxy" % relay_port,
        ], [self.v2], maxconn=200)


@pytest.fixture
def behind_haproxy(pki, tmp_path):
    need_haproxy()
    _, cert = pki
    server = new_relay(cert, proxy_protocol=True, max_pending_per_ip=1, pairing_timeout=10)
    lb = Proxies(str(tmp_path), server.address[1])
    try:
        yield server, lb
    finally:
        lb.stop()
        server.stop(grace=0)


def leg(ctx, port: int, source: str, role: str, sid: str, ticket: bytes):
    """One leg through haproxy from ``source``; returns (plain socket, peer ip told)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=WAIT,
                                   source_address=(source, 0))
    sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    sock.sendall(rendezvous.build_hello(role, sid, ticket))
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(1)
        assert chunk, "relay closed: %r" % line
        line += chunk
    return sock, line.decode().strip()


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_real_client_addresses_through_haproxy(behind_haproxy, pki, caplog, version):
    caplog.set_level(logging.INFO)
    server, lb = behind_haproxy
    ca, _ = pki
    ctx = tls.client_context(ca.cert_file)
    port = lb.v2 if version == "v2" else lb.v1
    sid, ticket = os.urandom(16).hex(), os.urandom(32)
    agent = gevent.spawn(leg, ctx, port, "127.0.0.3", "agent", sid, ticket)
    console = gevent.spawn(leg, ctx, port, "127.0.0.2", "console", sid, ticket)
    with gevent.Timeout(WAIT):
        gevent.joinall([agent, console], raise_error=True)
    # Each leg is told the other's real address, not haproxy's 127.0.0.1.
    assert agent.value[1] == "OK 127.0.0.2"
    assert console.value[1] == "OK 127.0.0.3"
    for sock, _ in (agent.value, console.value):
        sock.close()
    deadline = time.monotonic() + WAIT
    while "session %s ended" % sid not in caplog.text:
        assert time.monotonic() < deadline
        gevent.sleep(0.05)
    assert "agent 127.0.0.3, console 127.0.0.2" in caplog.text


def test_per_source_cap_counts_the_real_source(behind_haproxy, pki, caplog):
    """max_pending_per_ip 1: a second half-open connection from 127.0.0.2 evicts the
    first, one from 127.0.0.3 does not — all of them come from haproxy's 127.0.0.1."""
    caplog.set_level(logging.INFO)
    server, lb = behind_haproxy
    first = socket.create_connection(("127.0.0.1", lb.v2), source_address=("127.0.0.2", 0))
    other = socket.create_connection(("127.0.0.1", lb.v2), source_address=("127.0.0.3", 0))
    deadline = time.monotonic() + WAIT
    while server.pending < 2:
        assert time.monotonic() < deadline, server.stats()
        gevent.sleep(0.05)
    second = socket.create_connection(("127.0.0.1", lb.v2), source_address=("127.0.0.2", 0))
    while "evicted a half-open connection from 127.0.0.2" not in caplog.text:
        assert time.monotonic() < deadline, caplog.text
        gevent.sleep(0.05)
    assert "from 127.0.0.3" not in caplog.text.split("evicted", 1)[1].split("\n", 1)[0]
    assert server.pending == 2
    for s in (first, other, second):
        s.close()


def test_connection_without_header_is_closed(pki, tmp_path):
    _, cert = pki
    server = relay.Relay(RelaySettings(
        host="127.0.0.1", port=0, cert_file=cert.cert_file, key_file=cert.key_file,
        proxy_protocol=True, hello_timeout=1.0))
    server.start()
    try:
        ca, _ = pki
        with pytest.raises(rendezvous.RelayError):
            rendezvous.dial_relay("127.0.0.1", server.address[1],
                                  tls.client_context(ca.cert_file), "127.0.0.1", "agent",
                                  os.urandom(16).hex(), os.urandom(32), timeout=5,
                                  pair_timeout=5)
        assert server.stats()["refused_proxy_header"] == 1
    finally:
        server.stop(grace=0)
