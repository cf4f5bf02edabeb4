"""The session set-up path (issue 17): what was cut from it keeps every check.

- a relay dial resumes the TLS session of the previous one (no certificate signature and
  chain verification again), only for the same name, address and context, and falls back
  to a full, verified handshake when the relay does not know the session;
- a literal IP address is connected without gevent's resolver thread.
"""

from __future__ import annotations

import os
import socket

import gevent
import pytest

from remote_gevent.common import sockets, tls
from remote_gevent.wire import rendezvous
from relay_helpers import relay_factory, relay_pki

WAIT = 10.0


# --------------------------------------------------------------------------- relay TLS


@pytest.fixture(scope="module")
def setup_pki(tmp_path_factory):
    return relay_pki(tmp_path_factory.mktemp("setup-pki"))


@pytest.fixture
def relays(setup_pki):
    """``relays(port=0)``: a started relay, stopped after the test."""
    with relay_factory(setup_pki["cert"], WAIT) as factory:
        yield factory


@pytest.fixture
def reused(monkeypatch):
    """``session_reused`` of every successful dial, in order."""
    seen = []
    keep = rendezvous._keep_tls_session

    def spy(ctx, name, host, port, sock):
        seen.append(sock.session_reused)
        keep(ctx, name, host, port, sock)

    monkeypatch.setattr(rendezvous, "_keep_tls_session", spy)
    monkeypatch.setattr(rendezvous, "_TLS_SESSIONS", {})
    return seen


def _pair(server, ctx, name="127.0.0.1"):
    host, port = server.address
    sid, ticket = os.urandom(16).hex(), os.urandom(32)
    dials = [gevent.spawn(rendezvous.dial_relay, host, port, ctx, name, role, sid, ticket,
                          timeout=WAIT, pair_timeout=WAIT) for role in ("agent", "console")]
    with gevent.Timeout(WAIT):
        gevent.joinall(dials, raise_error=True)
    socks = [g.value[0] for g in dials]
    socks[0].sendall(b"ping")  # the pair works: plain TCP through the relay
    socks[1].settimeout(WAIT)
    assert socks[1].recv(4) == b"ping"
    for s in socks:
        s.close()


def test_relay_dial_resumes_the_previous_tls_session(relays, setup_pki, reused):
    server = relays()
    ctx = tls.client_context(setup_pki["ca"].cert_file)
    _pair(server, ctx)
    assert reused == [False, False]
    _pair(server, ctx)
    assert reused[2:] == [True, True]


def test_no_resumption_across_names_or_contexts(relays, setup_pki, reused):
    server = relays()
    ctx = tls.client_context(setup_pki["ca"].cert_file)
    _pair(server, ctx, name="127.0.0.1")
    _pair(server, ctx, name="localhost")  # verified for its own name: a full handshake
    assert reused == [False] * 4
    _pair(server, tls.client_context(setup_pki["ca"].cert_file))  # another context: full again
    assert reused == [False] * 6


def test_unknown_session_falls_back_to_a_verified_handshake(relays, setup_pki, reused):
    """A relay restarted on the same port (new ticket keys) does not know the session:
    the handshake is a full one, the certificate verified again."""
    first = relays()
    port = first.address[1]
    ctx = tls.client_context(setup_pki["ca"].cert_file)
    _pair(first, ctx)
    with gevent.Timeout(WAIT):
        first.stop(grace=0)
    second = relays(port)
    _pair(second, ctx)
    assert reused == [False] * 4


# --------------------------------------------------------------------------- connect


def test_connect_tcp_literal_ip_skips_the_resolver(monkeypatch):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]

    def no_resolver(*args, **kwargs):
        raise AssertionError("getaddrinfo called for a literal address")

    try:
        monkeypatch.setattr(socket, "getaddrinfo", no_resolver)
        monkeypatch.setattr(socket, "create_connection", no_resolver)
        sock = sockets.connect_tcp("127.0.0.1", port, WAIT)
        assert sock.getpeername() == ("127.0.0.1", port)
        assert sock.gettimeout() == WAIT
        sock.close()
        monkeypatch.undo()
        sock = sockets.connect_tcp("localhost", port, WAIT)  # a name: resolved
        sock.close()
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        with pytest.raises(OSError):
            sockets.connect_tcp("127.0.0.1", closed.getsockname()[1], WAIT)
        closed.close()
    finally:
        listener.close()
