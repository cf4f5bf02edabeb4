"""Relay: RG2 pairing, TLS off after OK, splice (and its copy fallback), half-close,
refusals, limits, TLS verification of the rendezvous, CLI stop.

In-process relays on 127.0.0.1 (the suite runs monkey-patched) plus real
``remote-gevent-relay`` processes for the CLI, SIGTERM and log-content checks.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import logging
import os
import re
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time

import gevent
import gevent.event
import pytest

from remote_gevent.relay import server as relay
from remote_gevent.relay.settings import (DEFAULT_HELLO_TIMEOUT, DEFAULT_MAX_PENDING_PER_IP)
from remote_gevent.relay import splicer
from remote_gevent.common import tls
from relay_helpers import relay_factory, relay_pki
from remote_gevent.demo.pki import CertificateAuthority
from remote_gevent.wire import rendezvous

WAIT = 10.0  # seconds: bound for anything that should happen "soon"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    base = tmp_path_factory.mktemp("relay-pki")
    return dict(relay_pki(base), other=CertificateAuthority(str(base / "other")))


@pytest.fixture
def make_relay(pki):
    """``make_relay(splice=None, **settings)``: a started relay, stopped after the test."""
    with relay_factory(pki["cert"], WAIT) as factory:
        yield factory


@pytest.fixture
def client_ctx(pki):
    return tls.client_context(pki["ca"].cert_file)


def new_session():
    return os.urandom(16).hex(), os.urandom(32)


def dial(server, ctx, role, sid, ticket, **kw):
    host, port = server.address
    kw.setdefault("timeout", WAIT)
    kw.setdefault("pair_timeout", WAIT)
    return rendezvous.dial_relay(host, port, ctx, "127.0.0.1", role, sid, ticket, **kw)


def pair(server, ctx, sid=None, ticket=None):
    if sid is None:
        sid, ticket = new_session()
    agent = gevent.spawn(dial, server, ctx, "agent", sid, ticket)
    console = gevent.spawn(dial, server, ctx, "console", sid, ticket)
    with gevent.Timeout(WAIT):
        gevent.joinall([agent, console], raise_error=True)
    return agent.value, console.value


def raw_tls(server, ctx):
    """A TLS connection to the relay that has not said anything yet."""
    sock = socket.create_connection(server.address, timeout=WAIT)
    return ctx.wrap_socket(sock, server_hostname="127.0.0.1")


def answer(sock) -> bytes:
    """The relay's answer line (or b"" if it just closed)."""
    sock.settimeout(WAIT)
    data = b""
    while not data.endswith(b"\n"):
        try:
            chunk = sock.recv(1)
        except (ConnectionError, OSError):
            break
        if not chunk:
            break
        data += chunk
    return data


def wait_until(predicate, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        gevent.sleep(0.02)
    return False


def send_all_then_half_close(sock, size, seed):
    block = hashlib.sha256(seed).digest() * 8192  # 256 KiB, deterministic
    digest = hashlib.sha256()
    sent = 0
    while sent < size:
        chunk = block[: min(len(block), size - sent)]
        sock.sendall(chunk)
        digest.update(chunk)
        sent += len(chunk)
    rendezvous.half_close(sock)
    return digest.hexdigest()


def receive_all(sock):
    digest = hashlib.sha256()
    buf = bytearray(256 * 1024)
    total = 0
    while True:
        n = sock.recv_into(buf)
        if not n:
            return total, digest.hexdigest()
        digest.update(memoryview(buf)[:n])
        total += n


# ------------------------------------------------------------------ pairing + splice

needs_splice = pytest.mark.skipif(not hasattr(os, "splice"), reason="no os.splice here")
FORWARDING = [pytest.param(True, id="splice", marks=needs_splice),
              pytest.param(False, id="copy")]


@pytest.mark.parametrize("splice", FORWARDING)
def test_pairs_and_forwards_32_mib_each_way(make_relay, client_ctx, caplog, splice):
    caplog.set_level(logging.INFO, logger="remote_gevent.relay.server")
    server = make_relay(splice=splice)
    assert server.splice is splice
    sid, ticket = new_session()
    (agent, agent_peer), (console, console_peer) = pair(server, client_ctx, sid, ticket)
    assert agent_peer == console_peer == "127.0.0.1"
    assert server.paired == 1 and server.pending == 0
    for sock in (agent, console):  # TLS only for the rendezvous: plain TCP from here on
        assert not isinstance(sock, ssl.SSLSocket)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    size = 32 * 1024 * 1024
    jobs = [gevent.spawn(send_all_then_half_close, agent, size, b"a"),
            gevent.spawn(send_all_then_half_close, console, size, b"c"),
            gevent.spawn(receive_all, console), gevent.spawn(receive_all, agent)]
    with gevent.Timeout(60):
        gevent.joinall(jobs, raise_error=True)
    assert jobs[2].value == (size, jobs[0].value)
    assert jobs[3].value == (size, jobs[1].value)
    stats = server.stats()
    if splice:  # moved kernel to kernel: pipes were lent, no copy buffer ever
        assert stats["pipes"] >= 1 and stats["buffers"] == 0
    else:
        assert stats["pipes"] == 0 and stats["buffers"] >= 1
    agent.close()
    console.close()
    assert wait_until(lambda: server.paired == 0)
    ended = [r.getMessage() for r in caplog.records if "ended" in r.getMessage()]
    assert len(ended) == 1
    assert sid in ended[0] and "normal" in ended[0]
    assert "%d bytes" % size in ended[0]
    assert base64.b64encode(ticket).decode() not in caplog.text


@pytest.mark.parametrize("splice", FORWARDING)
def test_half_close_keeps_the_other_direction_flowing(make_relay, client_ctx, splice):
    server = make_relay(splice=splice)
    (agent, _), (console, _) = pair(server, client_ctx)
    agent.sendall(b"last words from the agent")
    agent.shutdown(socket.SHUT_WR)  # a plain socket: plain shutdown works
    got = b""
    with gevent.Timeout(WAIT):
        while True:
            chunk = console.recv(4096)
            if not chunk:
                break
            got += chunk
    assert got == b"last words from the agent"  # console saw EOF after the data
    # The console can still send, and the half-closed agent still receives all of it.
    size = 4 * 1024 * 1024
    sender = gevent.spawn(send_all_then_half_close, console, size, b"late")
    with gevent.Timeout(WAIT):
        total, digest = receive_all(agent)
    assert (total, digest) == (size, sender.get(timeout=WAIT))
    assert wait_until(lambda: server.paired == 0)


@pytest.mark.parametrize("splice", FORWARDING)
def test_bytes_queued_before_a_reset_still_reach_the_other_side(make_relay, client_ctx,
                                                                 splice):
    """Issue 12's lost CLOSE at the relay: the agent streams to a console that stopped
    reading (an interrupted ``pull``); the console sends its last bytes (a tunnel CLOSE)
    and resets.  The relay's write toward the console fails first; before, that ended the
    whole pair and the console's last bytes, still queued on the relay's socket, never
    reached the agent, which then took the session for a lost link and kept it resuming.
    Now only the direction toward the console ends; the agent gets every byte the console
    sent, in order, then the end of the stream."""
    server = make_relay(splice=splice)
    (agent, _), (console, _) = pair(server, client_ctx)
    console.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stop = gevent.event.Event()

    def agent_sends():  # the device keeps sending until its link breaks
        block = b"d" * 65536
        try:
            while not stop.is_set():
                agent.sendall(block)
        except OSError:
            pass

    received = bytearray()

    def agent_reads():  # the agent's reader, always reading, as the real one
        try:
            while True:
                chunk = agent.recv(65536)
                if not chunk:
                    return "eof"
                received.extend(chunk)
        except OSError as exc:
            return "error: %s" % exc

    sender = gevent.spawn(agent_sends)
    reader = gevent.spawn(agent_reads)
    # The direction toward the console fills up: the relay holds bytes it cannot write.
    assert wait_until(lambda: server.paired == 1)
    gevent.sleep(0.5)  # lets the agent's bulk fill every buffer up to the relay
    last = b"first words " + os.urandom(8).hex().encode() + b" CLOSE"
    console.sendall(last)
    console.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    os.close(console.detach())  # unread data + linger 0: the kernel answers with a RST
    try:
        with gevent.Timeout(WAIT):
            while bytes(received) != last and reader.ready() is False:
                gevent.sleep(0.02)
            reader.join(WAIT)
    finally:
        stop.set()
        sender.kill()
        reader.kill()
    assert bytes(received) == last
    assert wait_until(lambda: server.paired == 0)


def test_bytes_sent_right_after_dial_returns_are_not_lost(make_relay, client_ctx):
    """The client writes plain bytes the moment its TLS is shut down, maybe before the
    relay has read its close_notify: nothing may be swallowed by the relay's TLS layer."""
    server = make_relay()

    def dial_and_send(role, sid, ticket):
        sock, _ = dial(server, client_ctx, role, sid, ticket)
        sock.sendall(("first bytes from the %s" % role).encode())
        return sock

    for _ in range(20):
        sid, ticket = new_session()
        jobs = [gevent.spawn(dial_and_send, role, sid, ticket) for role in rendezvous.ROLES]
        with gevent.Timeout(WAIT):
            gevent.joinall(jobs, raise_error=True)
        for job, other in ((jobs[0], "console"), (jobs[1], "agent")):
            want = ("first bytes from the %s" % other).encode()
            sock = job.value
            sock.settimeout(WAIT)
            got = b""
            while len(got) < len(want):
                got += sock.recv(64)
            assert got == want
        for job in jobs:
            job.value.close()


def test_splice_refused_with_einval_falls_back_to_copying(make_relay, client_ctx,
                                                         monkeypatch):
    def no_splice(*args, **kwargs):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(splicer, "SPLICE", no_splice)
    server = make_relay(splice=True)
    (agent, _), (console, _) = pair(server, client_ctx)
    size = 1024 * 1024
    sender = gevent.spawn(send_all_then_half_close, agent, size, b"einval")
    with gevent.Timeout(WAIT):
        assert receive_all(console) == (size, sender.get(timeout=WAIT))
    assert server.stats()["buffers"] >= 1


def _thread_cpu_seconds(native_id):
    with open("/proc/self/task/%d/stat" % native_id) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not relay.splice_available(), reason="needs os.splice (Python 3.10+)")
def test_splice_thread_waits_quietly_for_room_after_the_peer_finished(make_relay,
                                                                      client_ctx):
    """One direction finished; the other is blocked on a receiver that does not read while
    its sender has already half-closed (a hang-up that epoll reports whatever the mask).
    The thread must sleep until there is room, then deliver every byte."""
    server = make_relay(splice=True)
    (agent, _), (console, _) = pair(server, client_ctx)
    agent.shutdown(socket.SHUT_WR)
    console.settimeout(WAIT)
    assert console.recv(10) == b""
    size = 16 * 1024 * 1024
    sender = gevent.spawn(send_all_then_half_close, console, size, b"late")
    gevent.sleep(0.5)  # the agent reads nothing: buffers and the relay's pipe fill up
    plane = server._plane
    assert plane is not None and plane.native_id is not None
    before = _thread_cpu_seconds(plane.native_id)
    gevent.sleep(1.0)
    assert _thread_cpu_seconds(plane.native_id) - before < 0.2  # not spinning
    with gevent.Timeout(WAIT):
        total, digest = receive_all(agent)
    assert (total, digest) == (size, sender.get(timeout=WAIT))
    assert wait_until(lambda: server.paired == 0)


def _moving_in_the_splice_thread(server, ctx, payload=b"ping"):
    """A paired session that has moved ``payload`` agent -> console; its splice thread."""
    (agent, _), (console, _) = pair(server, ctx)
    agent.sendall(payload)
    console.settimeout(WAIT)
    assert console.recv(len(payload)) == payload
    plane = server._plane
    assert plane is not None and plane.running
    return agent, console, plane


@pytest.mark.skipif(not relay.splice_available(), reason="needs os.splice (Python 3.10+)")
def test_stop_ends_the_splice_thread(make_relay, client_ctx):
    server = make_relay(splice=True)
    agent, console, plane = _moving_in_the_splice_thread(server, client_ctx)
    server.stop(grace=0)
    assert not plane.running
    assert not os.path.exists("/proc/self/task/%d" % plane.native_id)
    assert console.recv(10) == b""  # aborted at stop


@pytest.mark.skipif(not relay.splice_available(), reason="needs os.splice (Python 3.10+)")
def test_a_failed_splice_thread_ends_its_sessions_and_is_replaced(make_relay, client_ctx,
                                                                   monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="remote_gevent")
    server = make_relay(splice=True)
    agent, console, broken = _moving_in_the_splice_thread(server, client_ctx)

    def explode(pair, direction):  # noqa: ANN001
        raise RuntimeError("bug in the data plane")

    monkeypatch.setattr(broken, "_move", explode)
    agent.sendall(b"boom")
    assert console.recv(10) == b""  # the session was ended, not left hanging
    assert wait_until(lambda: server.paired == 0)
    assert "the splice thread failed" in caplog.text
    assert wait_until(lambda: not broken.running)
    _, _, plane = _moving_in_the_splice_thread(server, client_ctx, b"again")
    assert plane is not broken  # a new thread serves the next pair


def test_splice_can_be_turned_off_by_environment(monkeypatch):
    monkeypatch.setenv("REMOTE_GEVENT_RELAY_SPLICE", "0")
    assert not relay.splice_available()
    monkeypatch.setenv("REMOTE_GEVENT_RELAY_SPLICE", "1")
    assert relay.splice_available() == hasattr(os, "splice")


def test_idle_paired_sessions_hold_no_pipe(make_relay, client_ctx):
    server = make_relay(splice=True)
    held = [pair(server, client_ctx) for _ in range(20)]
    assert server.paired == 20
    assert server.stats()["pipes"] == 0 and server.stats()["buffers"] == 0
    (agent, _), (console, _) = held[0]
    agent.sendall(b"x" * 100000)
    console.settimeout(WAIT)
    got = 0
    while got < 100000:
        got += len(console.recv(65536))
    assert server.stats()["pipes"] <= 1  # lent while moving, kept as a spare


def test_bytes_sent_with_the_hello_are_refused(make_relay, client_ctx):
    """RG2: nothing before OK. Pipelined bytes are refused, never forwarded."""
    server = make_relay()
    sid, ticket = new_session()
    eager = raw_tls(server, client_ctx)
    eager.sendall(rendezvous.build_hello("console", sid, ticket) + b"pipelined")
    assert answer(eager) == b"ERR bad_hello\n"
    assert wait_until(lambda: server.pending == 0)


def test_a_waiter_that_sends_before_ok_is_refused(make_relay, client_ctx):
    server = make_relay()
    sid, ticket = new_session()
    eager = raw_tls(server, client_ctx)
    eager.sendall(rendezvous.build_hello("agent", sid, ticket))
    assert wait_until(lambda: server.pending == 1)
    eager.sendall(b"too early")
    assert answer(eager) == b"ERR bad_hello\n"
    assert wait_until(lambda: server.pending == 0)
    (agent, _), (console, _) = pair(server, client_ctx, sid, ticket)  # the id is free
    agent.sendall(b"ok")
    console.settimeout(WAIT)
    assert console.recv(2) == b"ok"


# ------------------------------------------------------------------ refusals


def test_wrong_ticket_is_never_paired_and_the_waiter_still_pairs(make_relay, client_ctx):
    server = make_relay()
    sid, ticket = new_session()
    agent = gevent.spawn(dial, server, client_ctx, "agent", sid, ticket)
    assert wait_until(lambda: server.pending == 1)
    for role in ("console", "agent"):  # stranger in either role: mismatch, waiter untouched
        with pytest.raises(rendezvous.RelayError) as err:
            dial(server, client_ctx, role, sid, os.urandom(32))
        assert err.value.code == "ticket_mismatch" and err.value.remote
        assert "127.0.0.1:%d" % server.address[1] in str(err.value)
    assert server.paired == 0 and not agent.ready()
    console, peer = dial(server, client_ctx, "console", sid, ticket)
    assert peer == "127.0.0.1"
    sock, _ = agent.get(timeout=WAIT)
    console.sendall(b"ping")
    sock.settimeout(WAIT)
    assert sock.recv(4) == b"ping"


def test_same_role_twice_is_a_duplicate(make_relay, client_ctx):
    server = make_relay()
    sid, ticket = new_session()
    first = gevent.spawn(dial, server, client_ctx, "console", sid, ticket)
    assert wait_until(lambda: server.pending == 1)
    with pytest.raises(rendezvous.RelayError) as err:
        dial(server, client_ctx, "console", sid, ticket)
    assert err.value.code == "duplicate"
    pair_agent = dial(server, client_ctx, "agent", sid, ticket)
    assert first.get(timeout=WAIT)[1] == pair_agent[1] == "127.0.0.1"


def test_a_waiter_that_leaves_frees_its_session_id(make_relay, client_ctx):
    server = make_relay()
    sid, ticket = new_session()
    gave_up = gevent.spawn(dial, server, client_ctx, "agent", sid, ticket)
    assert wait_until(lambda: server.pending == 1)
    gave_up.kill()  # e.g. the agent's session was closed while dialing
    assert wait_until(lambda: server.pending == 0)
    (agent, _), (console, _) = pair(server, client_ctx, sid, ticket)  # the retry pairs
    console.sendall(b"retry")
    agent.settimeout(WAIT)
    assert agent.recv(5) == b"retry"


SID = "0123456789abcdef0123456789abcdef"
TICKET = base64.b64encode(b"t" * 32)


@pytest.mark.parametrize("hello", [
    b"RG9 agent " + SID.encode() + b" " + TICKET + b"\n",      # unknown version
    b"RG2 operator " + SID.encode() + b" " + TICKET + b"\n",   # unknown role
    b"RG2 agent " + SID.upper().encode() + b" " + TICKET + b"\n",  # not lowercase hex
    b"RG2 agent " + SID[:-1].encode() + b" " + TICKET + b"\n",  # 31 digits
    b"RG2 agent " + SID.encode() + b" " + base64.b64encode(b"t" * 31) + b"\n",
    b"RG2 agent " + SID.encode() + b" not*base64*at*all\n",
    b"RG2 agent " + SID.encode() + b"  " + TICKET + b"\n",     # double space
    b"RG2 agent " + SID.encode() + b" " + TICKET + b" extra\n",
    b"\xff\xfe garbage\n",
    b"A" * 600,                                                 # oversized, no newline
    b"RG2 agent " + SID.encode() + b" " + TICKET + b" " + b"x" * 600 + b"\n",
], ids=["version", "role", "uppercase", "short-id", "short-ticket", "not-b64",
        "double-space", "extra-field", "binary", "oversized", "oversized-line"])
def test_malformed_hello_is_refused(make_relay, client_ctx, hello):
    server = make_relay()
    sock = raw_tls(server, client_ctx)
    sock.sendall(hello)
    expected = b"ERR bad_hello RG2\n" if hello.startswith(b"RG9 ") else b"ERR bad_hello\n"
    assert answer(sock) == expected
    sock.close()
    assert wait_until(lambda: server.pending == 0)


def test_an_rg1_client_is_refused_loudly(make_relay, client_ctx, caplog):
    caplog.set_level(logging.INFO, logger="remote_gevent.relay.server")
    server = make_relay()
    sock = raw_tls(server, client_ctx)
    sock.sendall(b"RG1 agent " + SID.encode() + b" " + TICKET + b"\n")
    assert answer(sock) == b"ERR bad_hello RG2\n"  # names the version the relay speaks
    assert "RG1 hello; this relay speaks RG2 only" in caplog.text


def test_the_version_token_of_a_hello_is_logged_bounded(make_relay, client_ctx, caplog):
    """The one piece of a refused hello that reaches the log goes through logs.escape."""
    caplog.set_level(logging.INFO, logger="remote_gevent.relay.server")
    server = make_relay()
    sock = raw_tls(server, client_ctx)
    sock.sendall(b"RG" + b"9" * 400 + b" agent x\n")
    assert answer(sock) == b"ERR bad_hello RG2\n"
    assert wait_until(lambda: "this relay speaks RG2 only" in caplog.text)
    assert "9" * 40 not in caplog.text and "truncated" in caplog.text


def test_client_reports_the_relay_version_on_a_version_refusal(client_ctx, pki):
    """A relay that answers ``ERR bad_hello RG<n>`` gets a message naming both versions."""
    server_ctx = tls.server_context(pki["cert"].cert_file, pki["cert"].key_file)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def fake_relay():
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tconn:
            answer(tconn)
            tconn.sendall(b"ERR bad_hello RG3\n")

    fake = gevent.spawn(fake_relay)
    with pytest.raises(rendezvous.RelayError) as err:
        rendezvous.dial_relay("127.0.0.1", listener.getsockname()[1], client_ctx, "127.0.0.1",
                         "agent", *new_session(), timeout=WAIT)
    fake.get(timeout=WAIT)
    listener.close()
    assert err.value.code == "bad_hello" and err.value.remote
    assert "RG3" in str(err.value) and "RG2" in str(err.value)


def test_pairing_timeout(make_relay, client_ctx):
    server = make_relay(pairing_timeout=0.5)
    sid, ticket = new_session()
    start = time.monotonic()
    with pytest.raises(rendezvous.RelayError) as err:
        dial(server, client_ctx, "agent", sid, ticket)
    assert err.value.code == "timeout" and err.value.remote
    assert 0.4 < time.monotonic() - start < 5
    assert wait_until(lambda: server.pending == 0)


def test_handshake_timeout_for_a_silent_client(make_relay, client_ctx):
    server = make_relay(handshake_timeout=0.5)
    silent_tcp = socket.create_connection(server.address, timeout=WAIT)  # no TLS at all
    silent_tls = raw_tls(server, client_ctx)  # TLS, but no hello
    start = time.monotonic()
    assert answer(silent_tls) == b"ERR timeout\n"
    assert silent_tcp.recv(100) == b""  # closed without a word: there is no TLS to say it
    assert time.monotonic() - start < 5
    assert wait_until(lambda: server.pending == 0)


def test_max_pending_gives_busy(make_relay, client_ctx):
    server = make_relay(max_pending=2, max_pending_per_ip=10)
    waiters = [gevent.spawn(dial, server, client_ctx, "agent", *new_session())
               for _ in range(2)]
    assert wait_until(lambda: server.pending == 2)
    with pytest.raises(rendezvous.RelayError) as err:
        dial(server, client_ctx, "agent", *new_session())
    assert err.value.code == "busy"
    gevent.killall(waiters)


def test_per_ip_pending_limit_gives_busy(make_relay, client_ctx):
    server = make_relay(max_pending=100, max_pending_per_ip=2)
    waiters = [gevent.spawn(dial, server, client_ctx, "console", *new_session())
               for _ in range(2)]
    assert wait_until(lambda: server.pending == 2)
    with pytest.raises(rendezvous.RelayError) as err:
        dial(server, client_ctx, "console", *new_session())
    assert err.value.code == "busy"
    gevent.killall(waiters)
    # Slots come back once the waiters leave.
    assert wait_until(lambda: server.pending == 0)
    (agent, _), (console, _) = pair(server, client_ctx)
    agent.close()
    console.close()


def half_open(server, ctx, n, kind):
    """``n`` connections from 127.0.0.1 that never finish their hello: ``tcp`` (connected,
    no TLS), ``tls`` (TLS up, nothing said) or ``partial`` (half a hello, no newline)."""
    socks = []
    for _ in range(n):
        sock = socket.create_connection(server.address, timeout=WAIT)
        if kind != "tcp":
            sock = ctx.wrap_socket(sock, server_hostname="127.0.0.1")
        if kind == "partial":
            sock.sendall(rendezvous.build_hello("agent", *new_session())[:40])
        socks.append(sock)
    return socks


def timed_pair(server, ctx):
    start = time.monotonic()
    (agent, peer), (console, _) = pair(server, ctx)
    elapsed = time.monotonic() - start
    agent.sendall(b"hi")
    console.settimeout(WAIT)
    assert console.recv(2) == b"hi" and peer == "127.0.0.1"
    agent.close()
    console.close()
    return elapsed


@pytest.mark.parametrize("kind", ["tcp", "tls", "partial"])
def test_half_open_flood_from_one_ip_does_not_hold_its_sessions_out(make_relay, client_ctx,
                                                                    kind):
    """Issue 10 item 12: 55+ half-open connections from one address, then a legitimate
    agent + console from the same address pair at once (default limits)."""
    server = make_relay()
    flood = half_open(server, client_ctx, DEFAULT_MAX_PENDING_PER_IP + 10, kind)
    assert wait_until(lambda: server.stats().get("accepted", 0) >= len(flood))
    assert wait_until(lambda: server.pending == DEFAULT_MAX_PENDING_PER_IP)
    assert timed_pair(server, client_ctx) < 2.0
    assert server.stats()["evicted"] >= 12  # 10 over the limit + the agent and console
    assert server.pending <= DEFAULT_MAX_PENDING_PER_IP
    for sock in flood:
        sock.close()
    assert wait_until(lambda: server.pending == 0)


def test_half_open_flood_over_max_pending_evicts_too(make_relay, client_ctx):
    server = make_relay(max_pending=8, max_pending_per_ip=100)
    flood = half_open(server, client_ctx, 20, "tcp")
    assert wait_until(lambda: server.stats().get("accepted", 0) >= len(flood))
    assert timed_pair(server, client_ctx) < 2.0
    assert server.pending <= 8
    for sock in flood:
        sock.close()


def test_waiters_with_a_valid_hello_are_never_displaced_by_half_open(make_relay, client_ctx,
                                                                     caplog):
    caplog.set_level(logging.INFO, logger="remote_gevent.relay.server")
    server = make_relay(max_pending_per_ip=3)
    sid, ticket = new_session()
    waiter = gevent.spawn(dial, server, client_ctx, "agent", sid, ticket)
    assert wait_until(lambda: sid in server._waiting)
    flood = half_open(server, client_ctx, 10, "tls")
    assert wait_until(lambda: server.stats().get("accepted", 0) >= 11)
    assert timed_pair(server, client_ctx) < 2.0  # pairs through the half-open ones
    assert sid in server._waiting and not waiter.ready()  # still there, still waiting
    console, _ = dial(server, client_ctx, "console", sid, ticket)
    agent, _ = waiter.get(timeout=WAIT)
    agent.close()
    console.close()
    # Only waiters in the way: the newcomer is refused, the waiters stay.
    held = [gevent.spawn(dial, server, client_ctx, "console", *new_session())
            for _ in range(3)]
    assert wait_until(lambda: len(server._waiting) == 3)
    with pytest.raises(rendezvous.RelayError) as err:
        dial(server, client_ctx, "agent", *new_session())
    assert err.value.code == "busy"
    assert len(server._waiting) == 3 and not any(g.ready() for g in held)
    gevent.killall(held)
    for sock in flood:
        sock.close()
    assert "evicted" in caplog.text and "max_pending_per_ip" in caplog.text


def test_hello_timeout_bounds_tls_and_hello_separately(make_relay, client_ctx):
    server = make_relay(hello_timeout=0.5, handshake_timeout=10.0, pairing_timeout=10.0)
    silent = raw_tls(server, client_ctx)
    start = time.monotonic()
    assert answer(silent) == b"ERR timeout\n"
    assert time.monotonic() - start < 3.0
    # The pairing wait is not shortened by it.
    sid, ticket = new_session()
    waiter = gevent.spawn(dial, server, client_ctx, "agent", sid, ticket)
    gevent.sleep(1.0)
    assert not waiter.ready()
    dial(server, client_ctx, "console", sid, ticket)[0].close()
    waiter.get(timeout=WAIT)[0].close()


def test_pending_table_evicts_the_oldest_half_open_and_never_a_waiter():
    from remote_gevent.relay.pending import PendingTable
    table = PendingTable(max_total=4, max_per_source=2)
    assert table.make_room("a") == []
    table.add("a1", "a")
    table.add("a2", "a")
    assert table.make_room("a") == ["a1"]  # oldest half-open of that source
    table.authenticated("a1")
    assert table.make_room("a") == ["a2"]
    table.authenticated("a2")
    assert table.make_room("a") is None  # only waiters in the way: refuse the newcomer
    table.add("b1", "b")
    table.add("b2", "b")
    assert table.total == 4 and table.half_open == 2
    assert table.make_room("c") == ["b1"]  # the table is full: its oldest half-open
    assert table.make_room("b") == ["b1"]  # both limits, one eviction satisfies both
    assert table.remove("b1") and not table.remove("b1")
    assert table.count("b") == 1 and table.make_room("c") == []
    for entry in ("a1", "a2", "b2"):
        table.remove(entry)
    assert table.total == table.half_open == 0 and table.count("a") == 0


def test_max_paired_gives_busy(make_relay, client_ctx):
    server = make_relay(max_paired=1)
    held = pair(server, client_ctx)  # keep the sockets: dropping them would end the session
    assert server.paired == 1
    with pytest.raises(rendezvous.RelayError) as err:
        dial(server, client_ctx, "agent", *new_session())
    assert err.value.code == "busy"
    assert held[0][0].fileno() != -1


def test_idle_timeout_closes_a_silent_session(make_relay, client_ctx, caplog):
    caplog.set_level(logging.INFO, logger="remote_gevent.relay.server")
    server = make_relay(idle_timeout=0.5)
    (agent, _), (console, _) = pair(server, client_ctx)
    agent.settimeout(WAIT)
    start = time.monotonic()
    assert agent.recv(10) == b""
    assert time.monotonic() - start < 3
    assert wait_until(lambda: server.paired == 0)
    assert "timeout (idle" in caplog.text


def test_stop_drains_then_closes_after_grace(make_relay, client_ctx, caplog):
    caplog.set_level(logging.INFO, logger="remote_gevent.relay.server")
    server = make_relay()
    (agent, _), (console, _) = pair(server, client_ctx)
    waiter = gevent.spawn(dial, server, client_ctx, "agent", *new_session())
    assert wait_until(lambda: server.pending == 1)
    stopper = gevent.spawn(server.stop, 0.5)
    with pytest.raises(rendezvous.RelayError) as err:
        waiter.get(timeout=WAIT)
    assert err.value.code == "busy"  # unpaired clients are sent away at once
    console.sendall(b"still flowing")  # paired sessions keep working during the grace
    agent.settimeout(WAIT)
    assert agent.recv(100) == b"still flowing"
    stopper.get(timeout=WAIT)
    assert agent.recv(100) == b""
    assert "shutdown" in caplog.text


# ------------------------------------------------------------------ client side


def test_client_verifies_the_relay_certificate(make_relay, pki):
    server = make_relay()
    wrong_ca = tls.client_context(pki["other"].cert_file)
    with pytest.raises(rendezvous.RelayError) as err:
        rendezvous.dial_relay("127.0.0.1", server.address[1], wrong_ca, "127.0.0.1", "agent",
                         *new_session(), timeout=WAIT)
    assert err.value.code == "tls" and not err.value.remote
    assert "wrong CA" in str(err.value)
    right_ca = tls.client_context(pki["ca"].cert_file)
    with pytest.raises(rendezvous.RelayError) as err:
        rendezvous.dial_relay("127.0.0.1", server.address[1], right_ca, "relay.example.org",
                         "agent", *new_session(), timeout=WAIT)
    assert err.value.code == "tls" and "host name" in str(err.value)


def test_unreachable_relay_names_host_and_port(client_ctx):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    with pytest.raises(rendezvous.RelayError) as err:
        rendezvous.dial_relay("127.0.0.1", port, client_ctx, None, "agent", *new_session(),
                         timeout=2)
    assert err.value.code == "unreachable"
    assert "127.0.0.1:%d" % port in str(err.value)


class FakeRelay:
    """A TLS (or plain, ``tls=False``) listener on 127.0.0.1 that reads one hello and
    answers ``reply`` (then close_notify when ``unwrap``), or just hangs up (``reply=None``)."""

    def __init__(self, pki, reply, unwrap=False, tls_on=True, count=1):
        self.ctx = tls.server_context(pki["cert"].cert_file, pki["cert"].key_file)
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.address = ("127.0.0.1", self.port)
        self.reply, self.unwrap, self.tls_on = reply, unwrap, tls_on
        self.greenlet = gevent.spawn(self._serve, count)

    def _serve(self, count):
        for _ in range(count):
            conn, _ = self.listener.accept()
            try:
                if not self.tls_on:
                    conn.sendall(b"HTTP/1.0 400 not a relay\r\n\r\n")
                    continue
                with self.ctx.wrap_socket(conn, server_side=True) as tconn:
                    answer(tconn)
                    if self.reply is not None:
                        tconn.sendall(self.reply)
                    if self.unwrap:
                        tconn.settimeout(WAIT)
                        tconn.unwrap().close()
            except (OSError, ssl.SSLError):
                pass
            finally:
                conn.close()

    def close(self):
        self.greenlet.kill()
        self.listener.close()


@pytest.mark.parametrize("value", [
    '=HYPERLINK("http://evil.example/x","click")', "+1-2", "relay.example.org",
    "1.2.3.4.5", "127.0.0.1\x1b[31mred", "::1::2", "-", "@SUM(A1)",
], ids=["formula", "plus", "hostname", "five-octets", "escape-seq", "bad-v6", "minus", "at"])
def test_ok_without_an_ip_address_is_a_protocol_failure(pki, client_ctx, value):
    """Issue 10 item 7: the OK value becomes the history's remote_ip: only an IP passes."""
    fake = FakeRelay(pki, ("OK %s\n" % value).encode("latin-1"), unwrap=True)
    try:
        with pytest.raises(rendezvous.RelayError) as err:
            rendezvous.dial_relay("127.0.0.1", fake.port, client_ctx, "127.0.0.1", "agent",
                             *new_session(), timeout=WAIT, pair_timeout=WAIT)
    finally:
        fake.close()
    assert err.value.code == "protocol" and not err.value.remote
    assert "IP address" in str(err.value)
    assert "\x1b" not in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("value,expected", [
    ("127.0.0.1", "127.0.0.1"), ("::1", "::1"), ("2001:DB8:0:0::7", "2001:db8::7"),
])
def test_ok_with_an_ip_address_pairs_and_returns_it_normalised(pki, client_ctx, value,
                                                               expected):
    fake = FakeRelay(pki, ("OK %s\n" % value).encode("ascii"), unwrap=True)
    try:
        sock, peer = rendezvous.dial_relay("127.0.0.1", fake.port, client_ctx, "127.0.0.1",
                                      "agent", *new_session(), timeout=WAIT,
                                      pair_timeout=WAIT)
        sock.close()
    finally:
        fake.close()
    assert peer == expected


def test_a_parsed_hello_never_shows_its_ticket():
    sid, ticket = new_session()
    hello = rendezvous.parse_hello(rendezvous.build_hello("agent", sid, ticket)[:-1])
    assert hello.ticket == ticket and sid in repr(hello)
    for piece in _ticket_traces(ticket):
        assert piece not in repr(hello) and piece not in str(hello)


def test_the_relay_sends_an_ok_its_clients_accept():
    for seen, sent in (("192.0.2.7", "192.0.2.7"), ("2001:db8::7", "2001:db8::7"),
                       ("fe80::1%eth0", "fe80::1"), ("::ffff:192.0.2.7", "::ffff:192.0.2.7")):
        line = rendezvous.ok_line(seen)
        assert line == b"OK %s\n" % sent.encode()
        rendezvous.parse_peer_ip(line[3:-1].decode())  # no RelayError


def test_peer_text_in_relay_errors_is_escaped(pki, client_ctx):
    fake = FakeRelay(pki, b"ERR evil\x1b[2Jcode\r\n")
    try:
        with pytest.raises(rendezvous.RelayError) as err:
            rendezvous.dial_relay("127.0.0.1", fake.port, client_ctx, "127.0.0.1", "agent",
                             *new_session(), timeout=WAIT, pair_timeout=WAIT)
    finally:
        fake.close()
    assert "\x1b" not in str(err.value) and "\r" not in str(err.value)
    assert "\x1b" not in err.value.code and "\r" not in err.value.code


def test_dial_validates_its_input(client_ctx):
    with pytest.raises(ValueError):
        rendezvous.dial_relay("127.0.0.1", 1, client_ctx, None, "operator", *new_session())
    with pytest.raises(ValueError):
        rendezvous.dial_relay("127.0.0.1", 1, client_ctx, None, "agent", "XYZ", os.urandom(32))
    with pytest.raises(ValueError):
        rendezvous.dial_relay("127.0.0.1", 1, client_ctx, None, "agent", new_session()[0],
                         os.urandom(16))


# ------------------------------------------------------------------ agent side: failed pairing


def _agent_env(tmp_path, pki, address, **remote):
    """test_tunnels' in-process agent (TunnelManager) configured for the relay at
    ``address``, and a console request for it (not dialed)."""
    from test_tunnels import SERVER_ID, Env

    class _At:
        def __init__(self, addr):
            self.address = addr

    addr = "127.0.0.1:%d" % address[1]
    env = Env(tmp_path, (pki["ca"], pki["cert"]), _At(address), 1,
              relays={SERVER_ID: addr}, **remote)
    return env, env.console(["127.0.0.1:1"], relay_addr=addr)


def _ticket_traces(ticket):
    """Every 8-character piece of the ticket's base64, and the start of its bytes' repr
    (what a greenlet's repr printed in its call arguments)."""
    b64 = base64.b64encode(ticket).decode()
    return [b64[i:i + 8] for i in range(len(b64) - 7)] + [repr(ticket)[:10]]


FAILURES = ["ticket_mismatch", "relay_timeout", "local_timeout", "hangs_up", "no_tls",
            "not_an_ip", "unreachable"]


@pytest.mark.parametrize("failure", FAILURES)
def test_a_failed_pairing_is_one_line_without_traceback_or_ticket(
        failure, make_relay, client_ctx, pki, tmp_path, capfd, caplog, monkeypatch):
    """Issue 10 item 13: the agent's log of a failed pairing is one line naming the session
    and the reason: no traceback (a greenlet's repr printed a prefix of the ticket)."""
    from remote_gevent.agent import session_run
    caplog.set_level(logging.DEBUG)
    fake = squatter = None
    expect = {"ticket_mismatch": "ticket_mismatch", "relay_timeout": "console never came",
              "local_timeout": "not paired within", "hangs_up": "closed by the relay",
              "no_tls": "TLS", "not_an_ip": "IP address", "unreachable": "unreachable"}
    server = None
    if failure in ("ticket_mismatch", "local_timeout"):
        server = make_relay()
        address = server.address
    elif failure == "relay_timeout":
        address = make_relay(pairing_timeout=0.5).address
    elif failure == "unreachable":
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        address = probe.getsockname()
        probe.close()
    else:
        fake = FakeRelay(pki, {"hangs_up": None, "no_tls": None,
                               "not_an_ip": b'OK =HYPERLINK("x")\n'}[failure],
                         unwrap=True, tls_on=failure != "no_tls")
        address = fake.address
    if failure == "local_timeout":
        monkeypatch.setattr(session_run, "PAIRING_TIMEOUT", 0.5)
    env, console = _agent_env(tmp_path, pki, address)
    try:
        if failure == "ticket_mismatch":  # a stranger waits there with the id, not the ticket
            squatter = gevent.spawn(rendezvous.dial_relay, *address, client_ctx, "127.0.0.1",
                                    "console", console.session_id, os.urandom(32),
                                    timeout=WAIT, pair_timeout=WAIT)
            assert wait_until(lambda: console.session_id in server._waiting)
        console.submit()
        console.accept()
        _, code, reason = env.closes.wait_for(console.session_id)
        gevent.sleep(0.3)  # whatever the hub would print has been printed
        row = env.row(console.session_id)
        assert row["remote_ip"] == "" and row["close_code"] == code, row  # item 7
    finally:
        if squatter is not None:
            squatter.kill()
        if fake is not None:
            fake.close()
        env.close()
    assert code in ("relay_refused", "relay_lost"), (code, reason)
    assert expect[failure] in reason, reason
    out, err = capfd.readouterr()
    text = out + err + caplog.text
    assert "Traceback" not in text, text
    for piece in _ticket_traces(console.ticket):
        assert piece not in text, (piece, text)
    agent_lines = [r.getMessage() for r in caplog.records
                   if r.name != "remote_gevent.relay.server" and expect[failure] in r.getMessage()]
    assert len(agent_lines) == 1, agent_lines
    assert console.session_id in agent_lines[0]
    assert "\n" not in agent_lines[0] and "\x1b" not in agent_lines[0]


class _ConsoleControl:
    """The broker side of ``open_session`` reduced to what a failed early dial touches:
    the request (a fresh session id and ticket) and the wait for the answer."""

    def __init__(self, relay_addr):
        self.relay_addr = relay_addr
        self.closed = []

    def start_request(self, device, targets, relay=None, relay_pool=()):
        import gevent.queue
        from remote_gevent.console.control import PendingSession
        sid, ticket = new_session()
        return PendingSession(sid, device, "fr04", tuple(targets), self.relay_addr, ticket,
                              b"", b"", None, gevent.queue.Queue())

    def wait_offer(self, pending):
        self.pending = pending
        raw = pending.replies.get(timeout=WAIT)  # the failed early dial is put here
        assert isinstance(raw, BaseException), raw
        raise raw

    def close_session(self, device, session_id, reason=""):
        self.closed.append(session_id)

    def close(self):
        pass


@pytest.mark.parametrize("failure", ["ticket_mismatch", "hangs_up", "not_an_ip"])
def test_a_failed_pairing_on_the_console_prints_no_traceback_or_ticket(
        failure, make_relay, client_ctx, pki, capfd, caplog):
    """Issue 10 item 13, console side: the early dial's failure is the console's one error
    message (exit code for the relay), not a greenlet traceback on the terminal."""
    from types import SimpleNamespace

    from remote_gevent.console.config import EXIT_RELAY, ConsoleError
    from remote_gevent.console.session import open_session
    caplog.set_level(logging.DEBUG)
    fake = squatter = None
    if failure == "ticket_mismatch":
        server = make_relay()
        address = server.address
    else:
        fake = FakeRelay(pki, None if failure == "hangs_up" else b"OK =1+1\n", unwrap=True)
        address = fake.address
    control = _ConsoleControl("127.0.0.1:%d" % address[1])
    if failure == "ticket_mismatch":  # the id is known, the ticket is not: it waits there
        real_start = control.start_request

        def start_request(device, targets, *relays):
            nonlocal squatter
            pending = real_start(device, targets, *relays)
            squatter = gevent.spawn(rendezvous.dial_relay, *address, client_ctx, "127.0.0.1",
                                    "agent", pending.session_id, os.urandom(32),
                                    timeout=WAIT, pair_timeout=WAIT)
            assert wait_until(lambda: pending.session_id in server._waiting)
            return pending
        control.start_request = start_request
    cfg = SimpleNamespace(relay_ca_file=pki["ca"].cert_file, relay_timeout=WAIT,
                          relay_pool=("127.0.0.1:%d" % address[1],))
    try:
        with pytest.raises(ConsoleError) as err:
            open_session(cfg, "dev1", ["127.0.0.1:22"], control=control)
        gevent.sleep(0.3)
    finally:
        if squatter is not None:
            squatter.kill()
        if fake is not None:
            fake.close()
    assert err.value.exit_code == EXIT_RELAY, err.value
    assert {"ticket_mismatch": "ticket_mismatch", "hangs_up": "closed by the relay",
            "not_an_ip": "IP address"}[failure] in str(err.value)
    out, errout = capfd.readouterr()
    text = out + errout + caplog.text + str(err.value)
    assert "Traceback" not in text, text
    for piece in _ticket_traces(control.pending.ticket):
        assert piece not in text, (piece, text)


# ------------------------------------------------------------------ the CLI process


def start_cli(tmp_path, pki, extra_yaml=""):
    conf = tmp_path / "relay.yaml"
    conf.write_text("listen: 127.0.0.1:0\ncert: %s\nkey: %s\n%s"
                    % (pki["cert"].cert_file, pki["cert"].key_file, extra_yaml))
    proc = subprocess.Popen([sys.executable, "-m", "remote_gevent.relay.cli",
                             "--config", str(conf)],
                            stderr=subprocess.PIPE, universal_newlines=True)
    lines = []
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"relay listening on 127\.0\.0\.1:(\d+)", line)
        if m:
            return proc, int(m.group(1)), lines
    proc.kill()
    raise AssertionError("relay did not start: %s" % "".join(lines))


class _Addr:
    def __init__(self, port):
        self.address = ("127.0.0.1", port)


def test_cli_sigterm_lets_the_session_finish_and_logs_no_payload(tmp_path, pki, client_ctx):
    proc, port, lines = start_cli(tmp_path, pki, "grace: 10\n")
    try:
        sid, ticket = new_session()
        (agent, _), (console, _) = pair(_Addr(port), client_ctx, sid, ticket)
        marker = b"MARKER-%s" % os.urandom(8).hex().encode()
        agent.sendall(marker)
        console.settimeout(WAIT)
        assert console.recv(len(marker)) == marker
        proc.send_signal(signal.SIGTERM)
        # New connections are no longer accepted ...
        assert wait_until(lambda: _refused(port))
        # ... but the in-flight session keeps flowing during the grace period.
        size = 2 * 1024 * 1024
        sender = gevent.spawn(send_all_then_half_close, agent, size, b"after-term")
        with gevent.Timeout(WAIT):
            assert receive_all(console) == (size, sender.get())
        rendezvous.half_close(console)
        agent.settimeout(WAIT)
        assert agent.recv(10) == b""
        agent.close()
        console.close()
        _, rest = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    log = "".join(lines) + rest
    assert re.search(r"session %s ended: normal" % sid, log), log
    assert marker.decode() not in log
    assert base64.b64encode(ticket).decode() not in log
    assert "relay stopped" in log


def _refused(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


def test_cli_refuses_unknown_keys_and_bad_values(tmp_path, pki):
    conf = tmp_path / "relay.yaml"
    conf.write_text("listen: 127.0.0.1:0\ncert: c\nkey: k\nmax_pendign: 5\ngrace: -1\n")
    result = subprocess.run([sys.executable, "-m", "remote_gevent.relay.cli", "--config",
                             str(conf)], stderr=subprocess.PIPE, universal_newlines=True,
                            timeout=WAIT)
    assert result.returncode == 1
    assert "max_pendign" in result.stderr and "5" in result.stderr
    assert "grace" in result.stderr and "-1" in result.stderr


def test_cli_hello_timeout_and_per_source_limit_from_yaml_and_flags(tmp_path):
    from remote_gevent.relay.cli import build_settings, load_config
    conf = tmp_path / "relay.yaml"
    conf.write_text("cert: c\nkey: k\nhello_timeout: 2.5\nmax_pending_per_ip: 7\n")
    settings = build_settings(load_config(str(conf)), None, None, None)
    assert settings.hello_timeout == 2.5 and settings.max_pending_per_ip == 7
    settings = build_settings(load_config(str(conf)), None, None, None,
                              {"max_pending_per_ip": 300, "hello_timeout": 1.0})
    assert settings.max_pending_per_ip == 300 and settings.hello_timeout == 1.0
    defaults = build_settings({}, None, "c", "k")
    assert defaults.hello_timeout == DEFAULT_HELLO_TIMEOUT == 5.0
    assert defaults.max_pending_per_ip == DEFAULT_MAX_PENDING_PER_IP == 50
    result = subprocess.run([sys.executable, "-m", "remote_gevent.relay.cli", "--config",
                             str(conf), "--max-pending-per-ip", "0", "--hello-timeout", "-1"],
                            stderr=subprocess.PIPE, universal_newlines=True, timeout=WAIT)
    assert result.returncode == 1, result.stderr
    assert "--max-pending-per-ip" in result.stderr and "0" in result.stderr
    assert "--hello-timeout" in result.stderr and "-1" in result.stderr


def test_cli_listen_forms():
    from remote_gevent.relay.cli import parse_listen
    assert parse_listen("[::1]:8443") == ("::1", 8443)
    assert parse_listen("relay.example.org:443") == ("relay.example.org", 443)
    assert parse_listen(":8443") == ("0.0.0.0", 8443)
    for bad in ("::1:8443", "host", "host:http", "[::1]8443", "host:70000"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_cli_patches_gevent_before_anything_else():
    code = ("import remote_gevent.relay.cli, gevent.monkey, sys; "
            "sys.exit(0 if gevent.monkey.is_module_patched('socket') and "
            "gevent.monkey.is_module_patched('ssl') else 3)")
    assert subprocess.run([sys.executable, "-c", code], timeout=WAIT).returncode == 0
    with open(relay_cli_path()) as f:
        assert f.readline().startswith("from gevent import monkey; monkey.patch_all()")


def relay_cli_path():
    import remote_gevent
    return os.path.join(os.path.dirname(remote_gevent.__file__), "relay", "cli.py")


@pytest.mark.parametrize("splice", [True, False])
def test_a_resumed_pairing_supersedes_the_stale_one(make_relay, client_ctx, splice):
    """Issue 12: both ends pair again under the same session id and ticket while the
    relay still splices their old pairing (a path only they saw die). The new pair
    forwards, the old one is ended, and the old one's end does not drop the new entry."""
    server = make_relay(splice=splice)
    sid, ticket = new_session()
    (old_agent, _), (old_console, _) = pair(server, client_ctx, sid, ticket)
    assert wait_until(lambda: server.paired == 1)
    (agent, _), (console, _) = pair(server, client_ctx, sid, ticket)
    old_console.settimeout(WAIT)
    try:
        assert old_console.recv(10) == b""  # the stale pairing was ended
    except ConnectionResetError:
        pass
    assert wait_until(lambda: server.paired == 1)
    agent.sendall(b"resumed")
    console.settimeout(WAIT)
    assert console.recv(100) == b"resumed"
    assert server.paired == 1  # the old pairing's end left the new one in the table
    for s in (agent, console, old_agent, old_console):
        s.close()
    assert wait_until(lambda: server.paired == 0)
