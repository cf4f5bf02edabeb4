"""Tests for remote_gevent.wire.mux: streams, flow control, half-close, keepalive, close codes.

Everything runs in-process on socketpairs / 127.0.0.1 with bounded waits.
"""


import contextlib
import hashlib
import json
import logging
import os
import socket
import struct
import sys
import time

import gevent
import gevent.event
import gevent.server
import pytest

from remote_gevent.wire import mux
from remote_gevent.wire import mux_stream
from remote_gevent.wire import mux_frames
from remote_gevent.wire import mux_io
from remote_gevent.wire import mux_receive
from remote_gevent.wire import mux_limits
from benchmarks import plain_frames
from remote_gevent.crypto import tunnel_crypto

SID = "0123456789abcdef0123456789abcdef"
# Generous bound for every wait (seconds); 3.6 and 3.7 (gevent 22.10) run the bulk tests
# 2-3 times slower, so they get more (issue 16).
T = 10 if sys.version_info >= (3, 8) else 25


# ---------------------------------------------------------------- sealers


class _MacSealer:
    """Test stand-in with the FrameSealer interface: plaintext + keyed counter MAC.

    Cheap, but still detects tampering, replay, reordering and wrong keys, so the
    crypto_error paths are testable independently of tunnel_crypto.
    """

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.counter = 0

    def seal(self, plaintext) -> bytes:
        body = bytes(plaintext)
        n = len(body) + 16
        prefix = struct.pack(">I", n)
        tag = hashlib.blake2b(struct.pack(">Q", self.counter) + prefix + body,
                              key=self.key, digest_size=16).digest()
        self.counter += 1
        return prefix + body + tag


class _MacOpener:
    def __init__(self, key: bytes) -> None:
        self.key = key
        self.counter = 0

    def open(self, len_prefix, ciphertext) -> bytes:
        data = bytes(ciphertext)
        body, tag = data[:-16], data[-16:]
        want = hashlib.blake2b(struct.pack(">Q", self.counter) + bytes(len_prefix) + body,
                               key=self.key, digest_size=16).digest()
        if len(data) < 16 or tag != want:
            raise ValueError("bad tag")
        self.counter += 1
        return body


def _pairs(kind):
    """(console_sealer, console_opener, agent_sealer, agent_opener) for ``kind``."""
    if kind == "mac":
        k1, k2 = os.urandom(32), os.urandom(32)
        return _MacSealer(k1), _MacOpener(k2), _MacSealer(k2), _MacOpener(k1)
    if kind == "plain":
        return (plain_frames.PlainSealer(), plain_frames.PlainOpener(),
                plain_frames.PlainSealer(), plain_frames.PlainOpener())
    cpk, csk = tunnel_crypto.kx_keypair()
    apk, ask = tunnel_crypto.kx_keypair()
    ctx, crx = tunnel_crypto.derive_keys("console", cpk, csk, apk, SID)
    atx, arx = tunnel_crypto.derive_keys("agent", apk, ask, cpk, SID)
    return (tunnel_crypto.FrameSealer(ctx, kind), tunnel_crypto.FrameOpener(crx, kind),
            tunnel_crypto.FrameSealer(atx, kind), tunnel_crypto.FrameOpener(arx, kind))


KINDS = ["mac", "plain", tunnel_crypto.XCHACHA20POLY1305]
if tunnel_crypto.aes256gcm_available():
    KINDS.append(tunnel_crypto.AES256GCM)
AUTH_KINDS = [k for k in KINDS if k != "plain"]  # the plain sealer authenticates nothing


# ---------------------------------------------------------------- helpers


def _connect_local(target: str):
    host, port = target.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=T)


class Pair:
    """A console and an agent Tunnel over a socketpair (or a loopback TCP pair)."""

    def __init__(self, kind="mac", on_open=_connect_local, tcp=False, keepalive=0,
                 agent_sock=None, console_sock=None, **agent_kw):
        if console_sock is None:
            if tcp:
                console_sock, agent_sock = _tcp_pair()
            else:
                console_sock, agent_sock = socket.socketpair()
        cs, co, as_, ao = _pairs(kind)
        self.csock, self.asock = console_sock, agent_sock
        self.console = mux.Tunnel(console_sock, cs, co, "console", name="c-" + SID[:8],
                                  keepalive_interval=keepalive)
        self.agent = mux.Tunnel(agent_sock, as_, ao, "agent", on_open=on_open,
                                name="a-" + SID[:8], keepalive_interval=keepalive,
                                **agent_kw)
        self.cg = gevent.spawn(self.console.run)
        self.ag = gevent.spawn(self.agent.run)
        assert self.console.wait_up(T) and self.agent.wait_up(T)

    def results(self):
        return self.cg.get(timeout=T), self.ag.get(timeout=T)

    def close(self):
        self.console.close("normal", "test over")
        self.agent.close("normal", "test over")
        gevent.joinall([self.cg, self.ag], timeout=T)


@pytest.fixture
def pair_factory():
    made = []

    def make(*args, **kwargs):
        p = Pair(*args, **kwargs)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def _tcp_pair():
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    a = socket.create_connection(lsock.getsockname(), timeout=T)
    b, _ = lsock.accept()
    lsock.close()
    a.settimeout(None)
    b.settimeout(None)
    return a, b


@contextlib.contextmanager
def _target(handler):
    """A TCP server on 127.0.0.1 running ``handler(sock, addr)``; yields ``host:port``."""
    server = gevent.server.StreamServer(("127.0.0.1", 0), handler)
    server.start()
    try:
        yield "127.0.0.1:%d" % server.server_port
    finally:
        server.stop(timeout=1)


@pytest.fixture
def echo_server():
    """A real TCP echo server on 127.0.0.1 (half-close aware)."""

    def handle(sock, _addr):
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    sock.shutdown(socket.SHUT_WR)
                    break
                sock.sendall(data)
        except OSError:
            pass
        finally:
            sock.close()

    with _target(handle) as target:
        yield target


def _recv_all(stream_or_sock, limit=None):
    chunks = []
    total = 0
    while True:
        data = stream_or_sock.recv() if isinstance(stream_or_sock, mux_stream.Stream) \
            else stream_or_sock.recv(1 << 16)
        if not data:
            return b"".join(chunks)
        chunks.append(data)
        total += len(data)
        if limit is not None and total >= limit:
            return b"".join(chunks)


def _spliced_client(pair, target):
    """A local socket whose other end is spliced into a new stream to ``target``."""
    stream = pair.console.open_stream(target, timeout=T)
    mine, theirs = socket.socketpair()
    g = gevent.spawn(pair.console.splice, stream, theirs)
    return stream, mine, g


class RawPeer:
    """Hand-crafted peer speaking the framing directly (for protocol-error tests)."""

    def __init__(self, sock, role, sealer, opener):
        self.sock, self.role = sock, role
        self.sealer, self.opener = sealer, opener

    def send(self, ftype, sid, payload=b""):
        self.sock.sendall(self.sealer.seal(struct.pack(">BI", ftype, sid) + payload))

    def send_json(self, ftype, sid, obj):
        self.send(ftype, sid, json.dumps(obj).encode())

    def hello(self):
        self.send_json(mux_frames.HELLO, 0, {"role": self.role, "version": 1})

    def recv(self):
        hdr = self._exact(4)
        body = self._exact(struct.unpack(">I", hdr)[0])
        pt = bytes(self.opener.open(hdr, body))
        ftype, sid = struct.unpack_from(">BI", pt)
        return ftype, sid, pt[5:]

    def recv_until(self, ftype):
        while True:
            frame = self.recv()
            if frame[0] == ftype:
                return frame

    def _exact(self, n):
        buf = b""
        while len(buf) < n:
            d = self.sock.recv(n - len(buf))
            if not d:
                raise EOFError
            buf += d
        return buf


def _raw_against(role_under_test, on_open=None, kind="mac", **kw):
    """A Tunnel under test on one end of a socketpair, a RawPeer on the other."""
    a, b = socket.socketpair()
    cs, co, as_, ao = _pairs(kind)
    if role_under_test == "agent":
        tun = mux.Tunnel(a, as_, ao, "agent", on_open=on_open, name="t", **kw)
        peer = RawPeer(b, "console", cs, co)
    else:
        tun = mux.Tunnel(a, cs, co, "console", name="t", **kw)
        peer = RawPeer(b, "agent", as_, ao)
    g = gevent.spawn(tun.run)
    return tun, peer, g


# ---------------------------------------------------------------- basic streams


@pytest.mark.parametrize("kind", KINDS)
def test_echo_through_tcp_echo_server(pair_factory, echo_server, kind):
    p = pair_factory(kind)
    stream, client, g = _spliced_client(p, echo_server)
    client.sendall(b"hello tunnel")
    assert client.recv(100) == b"hello tunnel"
    client.shutdown(socket.SHUT_WR)
    assert _recv_all(client) == b""
    g.get(timeout=T)
    client.close()
    assert p.console.streams_opened == 1 and p.agent.streams_opened == 1
    assert p.console.bytes_out == 12 and p.console.bytes_in == 12
    assert p.agent.bytes_in == 12 and p.agent.bytes_out == 12
    assert p.console.active_streams == 0
    with gevent.Timeout(T):
        while p.agent.active_streams:
            gevent.sleep(0.01)


def test_programmatic_stream_api(pair_factory, echo_server):
    p = pair_factory()
    s = p.console.open_stream(echo_server, timeout=T)
    s.send(b"x" * 200000)
    got = _recv_all(s, limit=200000)
    assert got == b"x" * 200000
    s.shutdown_write()
    assert s.recv() == b""
    assert s.finished
    s.close()  # no-op on a finished stream


def test_many_concurrent_streams(pair_factory, echo_server):
    p = pair_factory(tcp=True)

    def one(i):
        s = p.console.open_stream(echo_server, timeout=T)
        msg = (b"%05d" % i) * 2000
        sender = gevent.spawn(lambda: (s.send(msg), s.shutdown_write()))
        got = _recv_all(s)
        sender.get(timeout=T)
        return got == msg

    jobs = [gevent.spawn(one, i) for i in range(60)]
    gevent.joinall(jobs, timeout=30, raise_error=True)
    assert all(j.value for j in jobs)
    assert p.console.streams_opened == 60
    assert p.agent.streams_opened == 60


@pytest.mark.parametrize("kind", ["mac", tunnel_crypto.XCHACHA20POLY1305])
def test_large_transfer_sha256_both_ways(pair_factory, kind):
    size = 64 << 20
    up_hash = hashlib.sha256()
    received = {}

    def sink_then_send(sock, _addr):
        h = hashlib.sha256()
        n = 0
        while True:
            d = sock.recv(1 << 16)
            if not d:
                break
            h.update(d)
            n += len(d)
        received["n"], received["digest"] = n, h.hexdigest()
        # then send the same amount back (after the client's EOF: half-close)
        block = os.urandom(1 << 20)
        for _ in range(size >> 20):
            sock.sendall(block)
            up_hash.update(block)
        sock.close()

    with _target(sink_then_send) as target:
        p = pair_factory(kind, tcp=True)
        stream, client, g = _spliced_client(p, target)
        send_hash = hashlib.sha256()

        def push():
            block = os.urandom(1 << 20)
            for _ in range(size >> 20):
                client.sendall(block)
                send_hash.update(block)
            client.shutdown(socket.SHUT_WR)

        pusher = gevent.spawn(push)
        h = hashlib.sha256()
        n = 0
        with gevent.Timeout(120):
            while True:
                d = client.recv(1 << 16)
                if not d:
                    break
                h.update(d)
                n += len(d)
            pusher.get()
            g.get()
        assert received["n"] == size and received["digest"] == send_hash.hexdigest()
        assert n == size and h.hexdigest() == up_hash.hexdigest()
        assert p.console.bytes_out == size and p.console.bytes_in == size
        client.close()


def test_half_close_reply_after_eof(pair_factory):
    """The client shuts down writing; the server answers after seeing EOF."""

    def answer_after_eof(sock, _addr):
        data = b""
        while True:
            d = sock.recv(1000)
            if not d:
                break
            data += d
        sock.sendall(b"got %d bytes" % len(data))
        sock.close()

    with _target(answer_after_eof) as target:
        p = pair_factory()
        stream, client, g = _spliced_client(p, target)
        client.sendall(b"a" * 5000)
        client.shutdown(socket.SHUT_WR)
        with gevent.Timeout(T):
            assert _recv_all(client) == b"got 5000 bytes"
        g.get(timeout=T)
        client.close()


def test_slow_reader_does_not_stall_other_stream(pair_factory):
    """A stream whose local reader stopped reading fills its window and blocks;
    another stream in the same tunnel keeps flowing."""
    stalled = gevent.event.Event()

    def firehose(sock, _addr):
        block = b"z" * 65536
        try:
            while True:
                sock.sendall(block)
        except OSError:
            pass
        finally:
            sock.close()

    with _target(firehose) as target:
        p = pair_factory(tcp=True)
        slow = p.console.open_stream(target, timeout=T)   # never read: window fills up
        fast = p.console.open_stream(target, timeout=T)
        # wait until the slow stream's window is exhausted (agent side blocked)
        with gevent.Timeout(T):
            while len(slow._rx_chunks) == 0 or slow._rx_allowed > 0:
                gevent.sleep(0.01)
        stalled.set()
        buffered = sum(len(c) for c in slow._rx_chunks)
        assert buffered <= mux_frames.INITIAL_WINDOW
        # the fast stream still moves 32 MiB while the slow one is stalled
        got = 0
        with gevent.Timeout(30):
            while got < (32 << 20):
                got += len(fast.recv())
        assert sum(len(c) for c in slow._rx_chunks) == buffered  # bounded, unchanged
        slow.close()
        fast.close()
        assert p.console.is_up and p.agent.is_up


def test_direct_delivery_writes_from_the_reader(pair_factory, echo_server, monkeypatch):
    """Small interactive chunks reach an idle local socket straight from the reader."""
    taken = []
    real = mux_io.write_now

    def counting(sock, data):
        n = real(sock, data)
        taken.append(n)
        return n

    monkeypatch.setattr(mux_receive, "write_now", counting)  # the reader calls it
    p = pair_factory(tcp=True)
    stream, client, g = _spliced_client(p, echo_server)
    for i in range(20):
        msg = b"keystroke %d" % i
        client.sendall(msg)
        assert client.recv(100) == msg
    client.close()
    # both directions (console -> echo, echo -> console) went through the reader's write
    assert sum(1 for n in taken if n > 0) >= 40


def test_direct_delivery_keeps_order_when_the_local_socket_fills(pair_factory):
    """The reader writes what the local socket takes and queues the rest; the queued
    part goes out before anything newer, so a slow local reader sees every byte in
    order (the bytes are a counter: any reordering changes the digest)."""
    size = 24 << 20
    payload = b"".join(struct.pack(">Q", i) for i in range(size // 8))

    def source(sock, _addr):
        try:
            sock.sendall(payload)
        finally:
            sock.close()

    with _target(source) as target:
        p = pair_factory(tcp=True)
        stream = p.console.open_stream(target, timeout=T)
        mine, theirs = socket.socketpair()
        for s in (mine, theirs):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        splicer = gevent.spawn(p.console.splice, stream, theirs)
        digest = hashlib.sha256()
        got = 0
        with gevent.Timeout(60):
            while True:
                if got < (1 << 20):
                    gevent.sleep(0.001)  # slow at first: the socket fills, chunks queue
                data = mine.recv(7001)
                if not data:
                    break
                digest.update(data)
                got += len(data)
        assert got == size
        assert digest.digest() == hashlib.sha256(payload).digest()
        mine.close()
        splicer.get(timeout=T)


def test_write_now_never_touches_a_closed_socket():
    a, b = socket.socketpair()
    try:
        assert mux_io.write_now(a, b"x") == 1
        assert b.recv(1) == b"x"
        a.close()
        assert a.fileno() == -1
        assert mux_io.write_now(a, b"x") == 0
        assert mux_io.write_now(object(), b"x") == 0   # not a socket: left to the writer
    finally:
        b.close()


# ---------------------------------------------------------------- refusals, resets


def test_open_refused_with_code(pair_factory):
    def on_open(target):
        if target == "nope:1":
            raise mux_frames.StreamRefused("target_not_permitted", "not in allow-list")
        raise ConnectionRefusedError(111, "Connection refused")

    p = pair_factory(on_open=on_open)
    with pytest.raises(mux_frames.StreamRefused) as ei:
        p.console.open_stream("nope:1", timeout=T)
    assert ei.value.code == "target_not_permitted"
    assert "allow-list" in ei.value.reason
    with pytest.raises(mux_frames.StreamRefused) as ei:
        p.console.open_stream("127.0.0.1:1", timeout=T)
    assert ei.value.code == "target_refused"
    assert p.console.is_up and p.agent.is_up
    assert p.console.active_streams == 0


def test_real_connection_refused(pair_factory):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    p = pair_factory()
    with pytest.raises(mux_frames.StreamRefused) as ei:
        p.console.open_stream("127.0.0.1:%d" % port, timeout=T)
    assert ei.value.code == "target_refused"


def test_local_error_resets_only_that_stream(pair_factory, echo_server):
    p = pair_factory()
    s1, c1, g1 = _spliced_client(p, echo_server)
    s2, c2, g2 = _spliced_client(p, echo_server)
    # abort c1 with RST
    c1.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c1.sendall(b"data")
    c1.close()
    g1.get(timeout=T)
    # stream 2 still works
    c2.sendall(b"ping")
    assert c2.recv(10) == b"ping"
    c2.close()
    g2.get(timeout=T)
    assert p.console.is_up and p.agent.is_up


def test_peer_reset_reaches_programmatic_stream(pair_factory, echo_server):
    p = pair_factory()
    s = p.console.open_stream(echo_server, timeout=T)
    s.send(b"abc")
    assert s.recv() == b"abc"
    # the agent resets its side of the stream
    agent_stream = p.agent._streams[s.id]
    p.agent._reset_stream(agent_stream, "test abort", send=True)
    with gevent.Timeout(T):
        with pytest.raises(mux_frames.StreamReset):
            while True:
                s.recv()
    assert p.console.is_up


# ---------------------------------------------------------------- close codes


def test_peer_close_code_propagates(pair_factory):
    p = pair_factory()
    p.agent.close("idle_timeout", "idle for 1800s")
    (ccode, creason), (acode, _) = p.results()
    assert ccode == "idle_timeout" and "1800" in creason
    assert acode == "idle_timeout"


def test_close_wakes_streams(pair_factory, echo_server):
    p = pair_factory()
    s = p.console.open_stream(echo_server, timeout=T)
    waiter = gevent.spawn(s.recv)
    gevent.sleep(0.05)
    p.console.close("closed_by_operator", "bye")
    with pytest.raises((mux_frames.StreamReset, mux_frames.TunnelClosed)):
        waiter.get(timeout=T)
    assert p.results()[1][0] == "closed_by_operator"
    with pytest.raises(mux_frames.TunnelClosed):
        p.console.open_stream(echo_server, timeout=T)


def test_socket_drop_is_relay_lost(pair_factory):
    p = pair_factory()
    p.csock.shutdown(socket.SHUT_RDWR)  # the relay went away under both
    (ccode, _), (acode, areason) = p.results()
    assert acode == "relay_lost"
    assert ccode == "relay_lost"


@pytest.mark.parametrize("kind", AUTH_KINDS)
def test_tampered_frame_is_crypto_error(kind):
    a, relay_a = socket.socketpair()
    relay_b, b = socket.socketpair()
    cs, co, as_, ao = _pairs(kind)
    console = mux.Tunnel(a, cs, co, "console", name="c", keepalive_interval=0)
    agent = mux.Tunnel(b, as_, ao, "agent", on_open=_connect_local, name="a",
                       keepalive_interval=0)
    flip = {"on": False}

    def relay(src, dst):
        try:
            while True:
                d = src.recv(65536)
                if not d:
                    break
                if flip["on"]:
                    d = bytearray(d)
                    d[-1] ^= 1
                    d = bytes(d)
                dst.sendall(d)
        except OSError:
            pass
        dst.close()

    r1 = gevent.spawn(relay, relay_a, relay_b)
    r2 = gevent.spawn(relay, relay_b, relay_a)
    cg, ag = gevent.spawn(console.run), gevent.spawn(agent.run)
    assert console.wait_up(T) and agent.wait_up(T)
    flip["on"] = True
    console.ping()
    code, reason = ag.get(timeout=T)
    assert code == "crypto_error"
    console.close()
    cg.get(timeout=T)
    gevent.killall([r1, r2])


@pytest.mark.parametrize("kind", AUTH_KINDS)
def test_wrong_keys_fail_at_hello(kind):
    a, b = socket.socketpair()
    cs, co, _, _ = _pairs(kind)
    _, _, as_, ao = _pairs(kind)  # keys of another session
    console = mux.Tunnel(a, cs, co, "console", name="c", keepalive_interval=0)
    agent = mux.Tunnel(b, as_, ao, "agent", on_open=_connect_local, name="a",
                       keepalive_interval=0)
    cg, ag = gevent.spawn(console.run), gevent.spawn(agent.run)
    assert cg.get(timeout=T)[0] == "crypto_error"
    assert ag.get(timeout=T)[0] == "crypto_error"
    assert not console.is_up and not agent.is_up


def test_replayed_frame_is_crypto_error():
    tun, peer, g = _raw_against("agent")
    peer.hello()
    frame = peer.sealer.seal(struct.pack(">BI", mux_frames.PING, 0) + struct.pack(">Q", 1))
    peer.sock.sendall(frame)
    peer.sock.sendall(frame)  # replay
    assert g.get(timeout=T)[0] == "crypto_error"


def test_handshake_timeout():
    tun, peer, g = _raw_against("agent", handshake_timeout=0.2)
    code, reason = g.get(timeout=T)
    assert code == "protocol_error" and "HELLO" in reason


# ---------------------------------------------------------------- protocol errors


class _StuckSocket:
    """Socket-like local end that never reads nor writes: no credit is ever granted."""

    def __init__(self):
        self._never = gevent.event.Event()

    def recv_into(self, buf, n=0):
        self._never.wait()
        return 0

    def sendall(self, data):
        self._never.wait()

    def shutdown(self, how):
        pass

    def close(self):
        self._never.set()


def test_window_violation_is_protocol_error():
    tun, peer, g = _raw_against("agent", on_open=lambda target: _StuckSocket())
    peer.hello()
    peer.send_json(mux_frames.OPEN, 1, {"target": "stuck:1"})
    assert peer.recv_until(mux_frames.OPEN_OK)[1] == 1
    chunk = b"w" * mux_frames.MAX_DATA
    for _ in range(mux_frames.INITIAL_WINDOW // mux_frames.MAX_DATA):  # exactly the window: fine
        peer.send(mux_frames.DATA, 1, chunk)
    gevent.sleep(0.05)
    assert not tun.closed
    peer.send(mux_frames.DATA, 1, b"!")  # one byte beyond the window
    code, reason = g.get(timeout=T)
    assert code == "protocol_error", reason
    assert "window" in reason


def test_oversized_data_frame_is_protocol_error():
    tun, peer, g = _raw_against("agent", on_open=_connect_local, kind="plain")
    peer.hello()
    peer.sock.sendall(struct.pack(">I", mux_frames.MAX_FRAME_LEN + 1))
    code, reason = g.get(timeout=T)
    assert code == "protocol_error" and "length" in reason


@pytest.mark.parametrize("frame,needle", [
    ((99, 0, b""), "unknown frame type"),
    ((mux_frames.OPEN, 1, b"not json"), "JSON"),
    ((mux_frames.OPEN, 1, b'{"target": 5}'), "target"),
    ((mux_frames.WINDOW, 0, b"\0\0\0\1"), "unknown stream"),
    ((mux_frames.DATA, 7, b"x"), "unknown stream"),
    ((mux_frames.PING, 0, b"short"), "PING"),
    ((mux_frames.HELLO, 0, b'{"role":"console","version":1}'), "second HELLO"),
    ((mux_frames.OPEN_OK, 1, b""), "received by the agent"),
])
def test_malformed_frames_are_protocol_errors(frame, needle):
    tun, peer, g = _raw_against("agent", on_open=_connect_local)
    peer.hello()
    peer.send(*frame)
    code, reason = g.get(timeout=T)
    assert code == "protocol_error"
    assert needle in reason


def test_duplicate_stream_id_is_protocol_error(echo_server):
    tun, peer, g = _raw_against("agent", on_open=_connect_local)
    peer.hello()
    peer.send_json(mux_frames.OPEN, 1, {"target": echo_server})
    peer.recv_until(mux_frames.OPEN_OK)
    peer.send_json(mux_frames.OPEN, 1, {"target": echo_server})
    code, reason = g.get(timeout=T)
    assert code == "protocol_error" and "stream id" in reason


def test_wrong_peer_role_is_protocol_error():
    tun, peer, g = _raw_against("agent")
    peer.send_json(mux_frames.HELLO, 0, {"role": "agent", "version": 1})
    code, reason = g.get(timeout=T)
    assert code == "protocol_error" and "role" in reason


def test_first_frame_not_hello():
    tun, peer, g = _raw_against("console")
    peer.send(mux_frames.PING, 0, struct.pack(">Q", 1))
    assert g.get(timeout=T)[0] == "protocol_error"


def test_window_credit_overflow_is_protocol_error(echo_server):
    tun, peer, g = _raw_against("console")
    peer.hello()
    opener = gevent.spawn(tun.open_stream, "x:1", T)
    ftype, sid, _ = peer.recv_until(mux_frames.OPEN)
    peer.send(mux_frames.OPEN_OK, sid)
    opener.get(timeout=T)
    peer.send(mux_frames.WINDOW, sid, struct.pack(">I", 1))  # window already full
    code, reason = g.get(timeout=T)
    assert code == "protocol_error" and "window" in reason


# ---------------------------------------------------------------- keepalive, timeouts


def test_keepalive_pong_updates_last_ack(pair_factory):
    p = pair_factory(keepalive=0.05)
    t0 = time.monotonic()
    with gevent.Timeout(T):
        while p.console.last_pong is None or p.console.last_pong < t0:
            gevent.sleep(0.01)
    assert p.console.last_ack >= t0
    assert p.agent.last_pong is not None


def test_ping_answered_by_pong():
    tun, peer, g = _raw_against("agent", keepalive_interval=0)
    peer.hello()
    peer.recv_until(mux_frames.HELLO)
    peer.send(mux_frames.PING, 0, struct.pack(">Q", 42))
    ftype, sid, payload = peer.recv_until(mux_frames.PONG)
    assert struct.unpack(">Q", payload)[0] == 42
    tun.close()
    g.get(timeout=T)


def test_last_activity_tracks_data_only(pair_factory, echo_server):
    p = pair_factory()
    before = p.console.last_activity
    p.console.ping()
    gevent.sleep(0.05)
    assert p.console.last_activity == before
    s = p.console.open_stream(echo_server, timeout=T)
    s.send(b"x")
    assert s.recv() == b"x"
    assert p.console.last_activity > before


def test_check_timeouts(pair_factory):
    p = pair_factory()
    t = p.agent
    now = time.monotonic()
    assert t.check_timeouts(1800, 60, now) is None
    t.last_activity = now - 1801
    assert t.check_timeouts(1800, 60, now) == "idle_timeout"
    assert t.check_timeouts(0, 60, now) is None          # idle GC off
    t.last_ack = now - 61
    assert t.check_timeouts(1800, 60, now) == "ack_lost"  # ack_lost wins
    assert t.check_timeouts(1800, None, now) == "idle_timeout"
    t.last_activity = now
    t.last_ack = now
    assert t.check_timeouts(1800, 60, now + 30) is None
    t.close("normal")
    assert t.check_timeouts(1, 1, now + 1e6) is None      # nothing to collect


def test_constructor_validation():
    a, b = socket.socketpair()
    with pytest.raises(ValueError):
        mux.Tunnel(a, None, None, "relay")
    with pytest.raises(ValueError):
        mux.Tunnel(a, None, None, "console", on_open=_connect_local)
    a.close()
    b.close()


def test_fragmented_wire_stream(echo_server):
    """Frames split at every odd boundary by a trickling relay still parse."""
    a, relay_a = socket.socketpair()
    relay_b, b = socket.socketpair()
    cs, co, as_, ao = _pairs(tunnel_crypto.XCHACHA20POLY1305)
    console = mux.Tunnel(a, cs, co, "console", name="c", keepalive_interval=0)
    agent = mux.Tunnel(b, as_, ao, "agent", on_open=_connect_local, name="a",
                       keepalive_interval=0)

    def relay(src, dst, sizes):
        i = 0
        try:
            while True:
                d = src.recv(sizes[i % len(sizes)])
                i += 1
                if not d:
                    break
                dst.sendall(d)
        except OSError:
            pass
        dst.close()

    r1 = gevent.spawn(relay, relay_a, relay_b, [1, 3, 7, 4, 65536, 100003, 5])
    r2 = gevent.spawn(relay, relay_b, relay_a, [2, 9, 70001, 1, 262144])
    cg, ag = gevent.spawn(console.run), gevent.spawn(agent.run)
    try:
        s = console.open_stream(echo_server, timeout=T)
        payload = os.urandom(3 << 20)
        sender = gevent.spawn(lambda: (s.send(payload), s.shutdown_write()))
        with gevent.Timeout(30):
            assert _recv_all(s) == payload
        sender.get(timeout=T)
    finally:
        console.close()
        cg.get(timeout=T)
        ag.get(timeout=T)
        gevent.killall([r1, r2])


# ---------------------------------------------------------------- limits (issue 10 item 3)


class _IdleTargets:
    """``on_open`` returning one end of a fresh socketpair: a target that never speaks
    first; ``close_all`` ends them (EOF to the agent)."""

    def __init__(self):
        self.ours = []

    def __call__(self, target):
        mine, theirs = socket.socketpair()
        self.ours.append(mine)
        return theirs

    def close_all(self):
        for s in self.ours:
            s.close()
        self.ours = []


def _open_many(tunnel, n, target="idle:1"):
    jobs = [gevent.spawn(tunnel.open_stream, target, T) for _ in range(n)]
    gevent.joinall(jobs, timeout=30)
    opened = [j.value for j in jobs if j.successful()]
    refused = [j.exception for j in jobs if isinstance(j.exception, mux_frames.StreamRefused)]
    return opened, refused


def test_stream_cap_per_session_refuses_with_too_many_streams(pair_factory, caplog):
    """The default session cap: the OPEN after it is refused too_many_streams with a
    reason naming the setting, logged once; a closed stream frees its slot."""
    targets = _IdleTargets()
    p = pair_factory(on_open=targets)
    cap = 256  # the documented default of remote.max_streams_per_session
    opened, refused = _open_many(p.console, cap + 20)
    assert len(opened) == cap
    assert len(refused) == 20
    assert {e.code for e in refused} == {"too_many_streams"}
    assert "max_streams_per_session" in refused[0].reason
    assert p.agent.active_streams == cap and p.agent.is_up and p.console.is_up
    assert sum("too_many_streams" in r.getMessage() for r in caplog.records) == 1
    # a stream that ends gives its slot back
    opened[0].close()
    with gevent.Timeout(T):
        while p.agent.active_streams == cap:
            gevent.sleep(0.01)
    assert p.console.open_stream("idle:1", timeout=T).id > 0
    targets.close_all()


def test_stream_cap_per_agent_spans_tunnels(pair_factory):
    """One StreamCounter for all tunnels of the agent: the cap counts both sessions, a
    slot comes back when a stream ends and when a tunnel closes."""
    counter = mux_limits.StreamCounter(3)
    targets = _IdleTargets()
    p1 = pair_factory(on_open=targets, agent_streams=counter)
    p2 = pair_factory(on_open=targets, agent_streams=counter)
    s1 = p1.console.open_stream("idle:1", timeout=T)
    p1.console.open_stream("idle:1", timeout=T)
    p2.console.open_stream("idle:1", timeout=T)
    assert counter.count == 3
    with pytest.raises(mux_frames.StreamRefused) as ei:
        p2.console.open_stream("idle:1", timeout=T)
    assert ei.value.code == "too_many_streams" and "max_streams" in ei.value.reason
    assert p2.agent.is_up
    s1.close()  # RESET: the agent forgets the stream, the device-wide slot is free
    with gevent.Timeout(T):
        while counter.count == 3:
            gevent.sleep(0.01)
    p2.console.open_stream("idle:1", timeout=T)
    p1.close()
    p1.results()
    assert counter.count == 2  # p2's two streams; p1's were released with its tunnel
    targets.close_all()


def _stuck_stream(**kw):
    """RawPeer (console) + agent Tunnel under test, one open stream to a target that
    never reads (everything the peer sends is queued)."""
    tun, peer, g = _raw_against("agent", on_open=lambda target: _StuckSocket(), kind="plain",
                                **kw)
    peer.hello()
    peer.send_json(mux_frames.OPEN, 1, {"target": "stuck:1"})
    assert peer.recv_until(mux_frames.OPEN_OK)[1] == 1
    return tun, peer, g


def _sync(peer, seq=7):
    """Every frame sent before is processed once the PONG to this PING comes back
    (frames received meanwhile are dropped)."""
    peer.send(mux_frames.PING, 0, struct.pack(">Q", seq))
    with gevent.Timeout(T):
        while True:
            ftype, _, payload = peer.recv()
            if ftype == mux_frames.PONG and payload == struct.pack(">Q", seq):
                return


def test_one_byte_frames_cost_about_a_byte_each():
    """1-byte DATA to a target that never reads: the mux holds about one byte of memory
    per payload byte (small frames coalesced), not a frame object each (~406 bytes)."""
    import tracemalloc

    tun, peer, g = _stuck_stream()
    count = 20000
    frames = b"".join(peer.sealer.seal(struct.pack(">BI", mux_frames.DATA, 1) + b"x")
                      for _ in range(count))
    gevent.sleep(0.05)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        peer.sock.sendall(frames)
        _sync(peer)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert not tun.closed
    assert held < 16 * count, "%d bytes held for %d payload bytes" % (held, count)
    assert count <= tun.rx_buffered <= count + 2 * mux_limits.CHUNK_OVERHEAD
    tun.close()
    g.get(timeout=T)


@pytest.mark.parametrize("size", [1, mux_frames.MAX_DATA])
def test_buffer_budget_resets_the_stream_not_the_session(size):
    """Queued bytes (frame overhead included) never exceed the session's budget: the
    stream that would exceed it is reset (RESET with the reason), the session goes on."""
    budget = 256 * 1024
    tun, peer, g = _stuck_stream(buffer_budget=budget)
    count = 2 * budget // size if size > 1 else budget + 1000
    frame = peer.sealer.seal(struct.pack(">BI", mux_frames.DATA, 1) + b"y" * size)
    sender = gevent.spawn(peer.sock.sendall, frame * count)
    with gevent.Timeout(T):
        ftype, sid, payload = peer.recv_until(mux_frames.RESET)
    assert sid == 1 and "budget" in json.loads(payload)["reason"]
    sender.get(timeout=30)
    _sync(peer, 8)
    assert not tun.closed and tun.rx_buffered == 0 and tun.active_streams == 0
    tun.close()
    g.get(timeout=T)


def test_idle_streams_hold_no_buffer(pair_factory, echo_server):
    """Streams that exchanged nothing hold no read buffer (they were 64 KiB each, taken
    eagerly); a stream that carried data gives its buffer back once idle again."""
    import tracemalloc

    p = pair_factory()
    first = p.console.open_stream(echo_server, timeout=T)  # warm-up (code paths, pools)
    n = 40
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        streams, _ = _open_many(p.console, n, echo_server)
        with gevent.Timeout(T):
            while p.agent.active_streams < n + 1:
                gevent.sleep(0.01)
        gevent.sleep(0.1)
        per_stream = (tracemalloc.get_traced_memory()[0] - before) / n
    finally:
        tracemalloc.stop()
    assert len(streams) == n
    print("idle stream: %d bytes" % per_stream)
    # Below one 64 KiB read buffer (the old code took one per stream eagerly: ~85 KiB);
    # the rest is greenlet stacks and bookkeeping: ~21 KiB on 3.11, ~30 KiB on 3.8.
    assert per_stream < 48 * 1024, "%d bytes per idle stream" % per_stream
    assert p.agent.buffers_held == 0
    first.send(b"ping")
    assert first.recv() == b"ping"
    with gevent.Timeout(T):
        while p.agent.buffers_held:
            gevent.sleep(0.01)
    for s in streams + [first]:
        s.close()


def test_unknown_close_code_becomes_protocol_error(caplog):
    """A CLOSE code that is not a known close code never becomes the session's code (it
    would land in the history and in session.close): protocol_error, text escaped."""
    tun, peer, g = _raw_against("agent", on_open=_connect_local)
    peer.hello()
    peer.send_json(mux_frames.CLOSE, 0, {"code": '=HYPERLINK("http://x")',
                                  "reason": "bye\n2026-01-01 INFO forged line"})
    code, reason = g.get(timeout=T)
    assert code == "protocol_error"
    assert "HYPERLINK" not in reason and "\n" not in reason
    messages = [r.getMessage() for r in caplog.records]
    assert any("HYPERLINK" in m for m in messages)  # logged, escaped
    assert not any("\n" in m for m in messages)


def test_known_close_code_from_peer_still_propagates():
    tun, peer, g = _raw_against("agent", on_open=_connect_local)
    peer.hello()
    peer.send_json(mux_frames.CLOSE, 0, {"code": "closed_by_operator", "reason": "done"})
    assert g.get(timeout=T) == ("closed_by_operator", "done")


def test_unknown_open_fail_code_becomes_protocol_error(caplog):
    tun, peer, g = _raw_against("console")
    peer.hello()
    opener = gevent.spawn(tun.open_stream, "x:1", T)
    _, sid, _ = peer.recv_until(mux_frames.OPEN)
    peer.send_json(mux_frames.OPEN_FAIL, sid, {"code": "@SUM(1+1)\r", "reason": "no\x1b[31m"})
    with pytest.raises(mux_frames.StreamRefused) as ei:
        opener.get(timeout=T)
    assert ei.value.code == "protocol_error"
    assert "\x1b" not in ei.value.reason
    assert not any("\r" in r.getMessage() or "\x1b" in r.getMessage()
                   for r in caplog.records)
    assert tun.is_up
    tun.close()


def test_reset_reason_is_escaped_in_the_log(caplog, echo_server):
    caplog.set_level(logging.INFO, logger="remote_gevent.wire.mux")
    tun, peer, g = _raw_against("agent", on_open=_connect_local)
    peer.hello()
    peer.send_json(mux_frames.OPEN, 1, {"target": echo_server})
    peer.recv_until(mux_frames.OPEN_OK)
    peer.send_json(mux_frames.RESET, 1, {"reason": "x\nERROR forged"})
    _sync(peer, 9)
    resets = [r.getMessage() for r in caplog.records if "reset by peer" in r.getMessage()]
    assert resets and not any("\n" in m for m in resets)
    tun.close()
    g.get(timeout=T)


def test_control_replies_queued_together_go_out_in_one_send(monkeypatch):
    """Replies the reader queues in one pass (here PONGs to PINGs that arrived in one read;
    in bulk transfers an ACK and a WINDOW) are sealed in order and sent with one system
    call, not one each (issue 17: each small send also wakes the relay and the peer)."""
    sends = []
    real_send_frames = mux.send_frames

    def counting_send_frames(sock, data):
        sends.append(len(data))
        real_send_frames(sock, data)

    monkeypatch.setattr(mux, "send_frames", counting_send_frames)
    tun, peer, g = _raw_against("agent", on_open=_connect_local, kind="plain")
    peer.hello()
    peer.recv_until(mux_frames.HELLO)
    before = len(sends)
    pings = b"".join(peer.sealer.seal(struct.pack(">BI", mux_frames.PING, 0)
                                      + struct.pack(">Q", seq)) for seq in range(1, 6))
    peer.sock.sendall(pings)
    with gevent.Timeout(T):
        got = [peer.recv_until(mux_frames.PONG)[2] for _ in range(5)]
    assert got == [struct.pack(">Q", seq) for seq in range(1, 6)]  # all, in order
    assert 1 <= len(sends) - before <= 2, sends[before:]  # one send (two if split)
    tun.close()
    g.get(timeout=T)


def test_peer_that_never_reads_cannot_pile_up_replies():
    """PINGs from a peer that never reads: the PONGs waiting to be sent are bounded (the
    reader stops reading), not one parked greenlet per PING."""
    tun, peer, g = _raw_against("agent", on_open=_connect_local, kind="plain")
    peer.hello()
    ping = peer.sealer.seal(struct.pack(">BI", mux_frames.PING, 0) + struct.pack(">Q", 1))
    sender = gevent.spawn(peer.sock.sendall, ping * 60000)
    gevent.sleep(1.0)
    assert len(tun._group) <= mux_limits.ASYNC_PENDING_MAX + 8
    assert not tun.closed
    sender.kill()
    tun.close()
    g.get(timeout=T)


@pytest.mark.e2e
def test_agent_process_refuses_streams_over_the_cap_and_gives_memory_back(rabbit, tmp_path):
    """Real processes (relay, agent, ``console forward``): 2000 connections into one
    session.  The default cap holds (256 streams reach the device's service, every other
    one is refused ``too_many_streams`` with the setting named, logged once by the agent),
    the agent's RSS (/proc/<pid>/status) stays bounded, and it comes back close to the
    baseline once the streams closed.  Before: all 2000 opened at ~85 KiB each."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks import bench_streams_memory as bench
    from benchmarks.suite_common import raise_nofile
    from test_e2e import make_platform

    n = 2000
    if raise_nofile() < 3 * n + 256:
        pytest.skip("RLIMIT_NOFILE too low for %d streams" % n)
    p = make_platform(rabbit, str(tmp_path / "platform"))
    p.start()
    try:
        r = bench.measure(p, n, 2.0, str(tmp_path))
        with open(p.agent_log) as f:
            agent_log = f.read()
    finally:
        p.stop()
    print("\nagent RSS with %d connections: baseline %.1f MiB, peak %.1f MiB, settled %.1f MiB"
          % (n, r["baseline_kib"] / 1024, r["peak_kib"] / 1024, r["settled_kib"] / 1024))
    assert r["held"] == 256
    assert r["refused_in_console_log"] == n - 256
    assert "too_many_streams" in r["example_refusal"]
    assert "max_streams_per_session" in r["example_refusal"]
    assert agent_log.count("too_many_streams") == 1
    assert "%d stream(s) refused" % (n - 256) in agent_log
    assert r["peak_kib"] - r["baseline_kib"] < 32 * 1024
    assert r["settled_kib"] - r["baseline_kib"] < 12 * 1024


def test_send_frames_delivers_everything_when_the_kernel_takes_part():
    """``mux_io.send_frames`` tries the C socket first; when the kernel takes only part
    (a full send buffer), gevent's send finishes it, waiting in the hub: 8 MiB through a
    socketpair read in small pieces arrive whole and in order."""
    a, b = gevent.socket.socketpair()
    data = os.urandom(8 << 20)
    got = bytearray()

    def reader() -> None:
        while len(got) < len(data):
            chunk = b.recv(4096)
            if not chunk:
                return
            got.extend(chunk)
            gevent.sleep(0)

    r = gevent.spawn(reader)
    with gevent.Timeout(T):
        mux_io.send_frames(a, data)
        r.join()
    assert bytes(got) == data
    a.close()
    b.close()
