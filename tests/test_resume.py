"""Resume (issue 12), in process: two real tunnels (real AEAD) over socketpairs, a fake
relay that pairs redials, faults injected by aborting the current connection. The
real-process proofs (relay, agent, console, fault proxy) are in test_resume_e2e.py."""

from __future__ import annotations

import hashlib
import os
import socket
import time
from typing import Any, List, Optional, Tuple

import gevent
import gevent.event
import gevent.socket
import pytest

from remote_gevent.common.sockets import abort_quietly, recv_exact
from remote_gevent.crypto import tunnel_crypto
from remote_gevent.wire import mux, mux_frames, resume
from echo_server import EchoServer

SID = "ab" * 16


class FakeRelay:
    """Pairs the two roles' redials with a new socketpair (what the relay does for
    the same session id + ticket). ``tamper`` may replace the agent's half."""

    def __init__(self) -> None:
        self.waiting: Optional[Tuple[str, gevent.event.AsyncResult]] = None
        self.sockets: List[socket.socket] = []
        self.pairings = 0
        self.down = False

    def pair(self) -> Tuple[socket.socket, socket.socket]:
        a, b = gevent.socket.socketpair()
        self.sockets += [a, b]
        return a, b

    def dial(self, role: str, timeout: float) -> socket.socket:
        if self.down:
            raise OSError("relay unreachable")
        if self.waiting is not None and self.waiting[0] != role:
            _, result = self.waiting
            self.waiting = None
            a, b = self.pair()
            self.pairings += 1
            result.set(a)
            return b
        result = gevent.event.AsyncResult()
        self.waiting = (role, result)
        return result.get(timeout=min(timeout, 5.0))


def make_pair(relay: FakeRelay, on_open=None, timeout: float = 30.0,
              buffer: int = resume.DEFAULT_RESEND_BUFFER) -> Tuple[mux.Tunnel, mux.Tunnel]:
    cpk, csk = tunnel_crypto.kx_keypair()
    apk, ask = tunnel_crypto.kx_keypair()
    ctx, crx = tunnel_crypto.derive_keys("console", cpk, csk, apk, SID)
    atx, arx = tunnel_crypto.derive_keys("agent", apk, ask, cpk, SID)
    cipher = tunnel_crypto.XCHACHA20POLY1305
    a, b = relay.pair()

    def settings(role: str, tx: bytes, rx: bytes) -> resume.ResumeSettings:
        return resume.ResumeSettings(SID, resume.ResumeKeys.from_session_keys(tx, rx),
                                     lambda t: relay.dial(role, t), timeout, buffer)

    cs, co = tunnel_crypto.make_sealer_opener(ctx, crx, cipher)
    as_, ao = tunnel_crypto.make_sealer_opener(atx, arx, cipher)
    console = mux.Tunnel(a, cs, co, "console", keepalive_interval=0.2,
                         resume=settings("console", ctx, crx))
    agent = mux.Tunnel(b, as_, ao, "agent", on_open=on_open, keepalive_interval=0.2,
                       resume=settings("agent", atx, arx))
    return console, agent


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.stop()


def _connect(echo):
    def on_open(target: str) -> Any:
        return gevent.socket.create_connection(("127.0.0.1", echo.port))
    return on_open


def _start(console, agent):
    runners = [gevent.spawn(console.run), gevent.spawn(agent.run)]
    assert console.wait_up(5) and agent.wait_up(5)
    assert console.resume_enabled and agent.resume_enabled
    return runners


def _stop(console, agent, runners):
    console.close("normal")
    agent.close("normal")  # (its CLOSE may not get out under load: then the agent resumes)
    gevent.joinall(runners, timeout=5)
    assert all(r.ready() for r in runners)


def test_lines_survive_repeated_resets(echo):
    relay = FakeRelay()
    console, agent = make_pair(relay, _connect(echo))
    runners = _start(console, agent)
    stream = console.open_stream("127.0.0.1:%d" % echo.port)
    got = bytearray()

    def reader() -> None:
        while True:
            chunk = stream.recv()
            if not chunk:
                return
            got.extend(chunk)

    r = gevent.spawn(reader)
    expected = b""
    for i in range(60):
        line = b"line %04d\n" % i
        expected += line
        stream.send(line)
        if i % 15 == 7:  # the connection in use is reset (either end's socket)
            abort_quietly((console if i % 2 else agent)._sock)
        gevent.sleep(0.01)
    with gevent.Timeout(10):
        while len(got) < len(expected):
            gevent.sleep(0.02)
    assert bytes(got) == expected  # each line once, in order
    assert console.resumes >= 3 and agent.resumes >= 3
    assert not console.closed and not agent.closed
    stream.close()
    r.kill()
    _stop(console, agent, runners)


def test_bulk_sha256_across_resets_and_bounded_buffer(echo):
    relay = FakeRelay()
    limit = 1 << 20
    console, agent = make_pair(relay, _connect(echo), buffer=limit)
    runners = _start(console, agent)
    stream = console.open_stream("127.0.0.1:%d" % echo.port)
    data = os.urandom(24 << 20)
    want = hashlib.sha256(data).hexdigest()
    digest = hashlib.sha256()
    received = [0]

    def reader() -> None:
        while received[0] < len(data):
            chunk = stream.recv()
            if not chunk:
                return
            digest.update(chunk)
            received[0] += len(chunk)

    def writer() -> None:
        view = memoryview(data)
        for off in range(0, len(data), 1 << 16):
            stream.send(view[off:off + (1 << 16)])

    g = [gevent.spawn(reader), gevent.spawn(writer)]
    for _ in range(4):
        gevent.sleep(0.15)
        abort_quietly(agent._sock)
    with gevent.Timeout(60):
        gevent.joinall(g, raise_error=True)
    assert received[0] == len(data) and digest.hexdigest() == want
    assert console.resumes >= 1
    # the buffer never grew past its bound by more than one frame each (+ control frames)
    assert console._resend.peak <= limit + 2 * (mux_frames.MAX_FRAME_LEN + 64)
    _stop(console, agent, runners)


def test_no_path_within_resume_timeout_is_link_lost():
    relay = FakeRelay()
    console, agent = make_pair(relay, timeout=1.5)
    runners = _start(console, agent)
    relay.down = True
    abort_quietly(console._sock)
    gevent.joinall(runners, timeout=10)
    assert console.close_code == "link_lost" and agent.close_code == "link_lost"
    assert console.resume_time >= 1.0


def test_dead_path_detected_by_both_ends():
    """No reset, just silence (a blackholed path): keepalives missed → resume."""
    relay = FakeRelay()
    console, agent = make_pair(relay)
    runners = _start(console, agent)
    # Stop the agent's frames from reaching the console and vice versa: swap each end's
    # socket for one whose peer never answers (kept open: no error, no EOF).
    silent_c, keep_c = gevent.socket.socketpair()
    silent_a, keep_a = gevent.socket.socketpair()
    old = [console._sock, agent._sock]
    console._sock, agent._sock = silent_c, silent_a
    for s in old:
        s.close()
    with gevent.Timeout(10):
        while console.resumes < 1 or agent.resumes < 1:
            gevent.sleep(0.05)
    assert not console.closed and not agent.closed
    keep_c.close()
    keep_a.close()
    _stop(console, agent, runners)


@pytest.mark.parametrize("attack", ["wrong_key", "replayed", "rolled_back", "garbage"])
def test_hostile_resume_is_refused_with_crypto_error(attack):
    """A resume that does not prove the session keys, replays an earlier proof, or rolls
    the counter back below what was acknowledged ends the session: crypto_error."""
    relay = FakeRelay()
    console, agent = make_pair(relay)
    runners = _start(console, agent)
    for _i in range(3 * resume.ACK_EVERY):  # some frames acknowledged
        console.ping()
        gevent.sleep(0.01)
    # the agent received them and its ACKs reached the console (a resume claiming less
    # than that is a rollback): wait for it, however slow the machine
    with gevent.Timeout(20):
        while agent._opener.counter <= resume.ACK_EVERY or console._resend.first == 0:
            gevent.sleep(0.02)
    keys = console._resume_cfg.keys
    recorded: List[bytes] = []

    def hostile(role: str, timeout: float) -> socket.socket:
        """Stands in for the agent at the relay: the console talks to us."""
        mine, theirs = gevent.socket.socketpair()
        gevent.spawn(_impersonate, mine, attack, keys, recorded)
        return theirs

    console._resume_cfg = console._resume_cfg._replace(redial=lambda t: hostile("agent", t))
    abort_quietly(console._sock)  # the real agent resumes into the void (FakeRelay)
    with gevent.Timeout(15):
        code, reason = runners[0].get()
    assert code == "crypto_error", (code, reason)
    agent.close("normal")
    gevent.joinall(runners, timeout=5)


def _impersonate(sock: socket.socket, attack: str, keys: resume.ResumeKeys,
                 recorded: List[bytes]) -> None:
    msg1 = recv_exact(sock, resume.MSG1_LEN)
    console_nonce = msg1[5:]
    nonce = os.urandom(resume.NONCE_BYTES)
    sock.sendall(resume.MAGIC1 + b"a" + nonce)
    received = 0
    if attack == "wrong_key":
        key = os.urandom(32)
    elif attack == "replayed":  # a proof made for another handshake's nonce
        key, console_nonce = keys.rx, os.urandom(resume.NONCE_BYTES)
    elif attack == "rolled_back":  # a valid proof (the agent's key) of a rolled-back counter
        key = keys.rx
    else:
        sock.sendall(b"\xff" * resume.MSG2_LEN)
        gevent.sleep(5)  # (a peer that hangs up is a lost attempt, tried again)
        return
    proof = resume._proof(key, SID, "agent", console_nonce, nonce, received)
    sock.sendall(resume.MAGIC2 + resume._U64.pack(received) + proof)
    gevent.sleep(5)


def test_resend_buffer_refuses_rollback_and_overreach():
    buf = resume.ResendBuffer(100)
    for _i in range(5):
        buf.add(b"x" * 10)
    buf.ack(2)
    assert buf.first == 2 and buf.bytes == 30
    with pytest.raises(resume.ResumeRefused):
        buf.ack(1)  # rolled back
    with pytest.raises(resume.ResumeRefused):
        buf.unacked(6)  # beyond what was sent
    assert buf.unacked(3) == [b"x" * 10] * 2


def test_resume_off_when_the_peer_does_not_ask():
    relay = FakeRelay()
    console, agent = make_pair(relay)
    agent._init_resume(None)  # an older agent: no "resume" in its HELLO
    runners = _start_plain(console, agent)
    abort_quietly(console._sock)
    gevent.joinall(runners, timeout=5)
    assert console.close_code == "relay_lost"


def _start_plain(console, agent):
    runners = [gevent.spawn(console.run), gevent.spawn(agent.run)]
    assert console.wait_up(5) and agent.wait_up(5)
    assert not console.resume_enabled and console._resend is None
    return runners


def test_resend_buffer_memory_interactive_and_bulk(echo, capsys):
    """What resume costs in memory per session (docs/protocol.md §7.5, "Cost"): the peak
    of the sealed bytes held for a resend, interactive (200 11-byte lines, 5 ms apart) and
    bulk (16 MiB at 64 KiB writes) with the default 4 MiB bound."""
    peaks = {}
    for label, size, chunk, pause in (("interactive", 200 * 11, 11, 0.005),
                                      ("bulk", 16 << 20, 1 << 16, 0.0)):
        relay = FakeRelay()
        console, agent = make_pair(relay, _connect(echo))
        runners = _start(console, agent)
        stream = console.open_stream("127.0.0.1:%d" % echo.port)
        got = [0]

        def reader(stream=stream, got=got, size=size) -> None:
            while got[0] < size:
                chunk_in = stream.recv()
                if not chunk_in:
                    return
                got[0] += len(chunk_in)

        r = gevent.spawn(reader)
        data = os.urandom(chunk)
        for _ in range(size // chunk):
            stream.send(data)
            if pause:
                gevent.sleep(pause)
        r.join(60)
        assert got[0] == size
        peaks[label] = max(console._resend.peak, agent._resend.peak)
        _stop(console, agent, runners)
    with capsys.disabled():
        print("\nresend buffer peak per session: interactive %d B, bulk %d B (bound %d B)"
              % (peaks["interactive"], peaks["bulk"], resume.DEFAULT_RESEND_BUFFER))
    assert peaks["interactive"] < 4096
    assert peaks["bulk"] <= resume.DEFAULT_RESEND_BUFFER + mux_frames.MAX_FRAME_LEN + 64


def test_timeouts_while_resuming_and_idle_clock_after():
    """ack_timeout/idle_timeout do not fire while the path is down (resume_timeout bounds
    it), and the outage is not counted as the user's inactivity afterwards."""
    relay = FakeRelay()
    console, agent = make_pair(relay)
    runners = _start(console, agent)
    console.last_activity = agent.last_activity = time.monotonic()  # "last DATA": now
    relay.down = True
    abort_quietly(agent._sock)
    gevent.sleep(1.5)
    assert agent.resuming
    assert agent.check_timeouts(idle_timeout=1.0, ack_timeout=1.0) is None
    relay.down = False
    with gevent.Timeout(10):
        while agent.resuming or console.resuming:
            gevent.sleep(0.05)
    assert agent.resumes == 1 and agent.resume_time >= 1.4
    # 1.5 s since the last DATA, all of it outage: not idle for 1 s
    assert agent.check_timeouts(idle_timeout=1.0, ack_timeout=1.0) is None
    gevent.sleep(1.1)
    assert agent.check_timeouts(idle_timeout=1.0, ack_timeout=None) == "idle_timeout"
    _stop(console, agent, runners)


class _SendLog:
    """Stands between a tunnel and its socket and sealer: records, for each ``send``
    on the socket, the frame types sealed since the previous one (what that system call
    carried)."""

    def __init__(self, tunnel: mux.Tunnel) -> None:
        self.sends: List[List[int]] = []
        self._pending: List[int] = []
        self._sock, self._sealer = tunnel._sock, tunnel._sealer
        log = self

        class Sealer:
            def __getattr__(self, name: str) -> Any:
                return getattr(log._sealer, name)

            def seal(self, plaintext: Any) -> Any:
                log._pending.append(bytes(plaintext[:1])[0])
                return log._sealer.seal(plaintext)

        class Sock:
            def __getattr__(self, name: str) -> Any:
                return getattr(log._sock, name)

            def send(self, data: Any) -> int:
                log.sends.append(log._pending)
                log._pending = []
                return log._sock.send(data)

        tunnel._sock, tunnel._sealer = Sock(), Sealer()


def test_interactive_acks_ride_with_data_frames(echo):
    """1-byte round trips: the resume ACKs go out in the same ``send`` as a DATA frame
    (no ACK alone on the wire: that would cost a relay move and a wake-up of the peer per
    ACK), and they still come often enough to keep the peer's resend buffer small."""
    relay = FakeRelay()
    console, agent = make_pair(relay, _connect(echo))
    for tunnel in (console, agent):
        tunnel.keepalive_interval = 60.0  # no keepalive-tick ACK during the test
    sent = {"console": _SendLog(console), "agent": _SendLog(agent)}
    runners = _start(console, agent)
    stream = console.open_stream("127.0.0.1:%d" % echo.port)
    rounds = 64
    with gevent.Timeout(20):
        for i in range(rounds):
            stream.send(bytes([i]))
            assert stream.recv() == bytes([i])
    for role, log in sent.items():
        acks = [batch for batch in log.sends if mux_frames.ACK in batch]
        alone = [batch for batch in acks if set(batch) == {mux_frames.ACK}]
        assert alone == [], (role, log.sends)
        assert len(acks) >= rounds // resume.ACK_PIGGYBACK - 2, (role, log.sends)
    # acknowledged: neither end holds more than the last few frames for a resend
    assert len(console._resend) <= resume.ACK_PIGGYBACK + 2
    assert len(agent._resend) <= resume.ACK_PIGGYBACK + 2
    _stop(console, agent, runners)
