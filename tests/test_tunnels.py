"""TunnelManager end to end, in-process: a real relay on 127.0.0.1 (TLS, demo PKI), a
real TCP echo target, and an in-test console built from the real pieces (signed
request, ``check_session_request`` as the control plane runs it, ``dial_relay`` as
console, ``tunnel_crypto``, ``mux.Tunnel``, ``verify_session_accept``).  No broker:
``reply`` and ``publish_close`` are collectors.  Every wait is bounded.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from typing import Any, List, Optional, Tuple

import gevent
import gevent.event
import gevent.server
import pytest

from remote_gevent.agent import config as config_mod
from remote_gevent.agent import history as history_mod
from remote_gevent.wire import mux
from remote_gevent.wire import mux_frames
from remote_gevent.wire import protocol
from remote_gevent.relay import server as relay
from remote_gevent.relay.settings import RelaySettings
from remote_gevent.common import tls
from remote_gevent.crypto import tunnel_crypto
from remote_gevent.agent import tunnels
from remote_gevent.agent import session_run as tunnels_run
from remote_gevent.crypto.authkeys import AuthorizedKeys
from remote_gevent.demo.pki import CertificateAuthority
from remote_gevent.crypto.identity import IdentityKey
from remote_gevent.wire.codes import Reason
from remote_gevent.wire.envelope import CloseCode
from echo_server import echo
from remote_gevent.wire import rendezvous

T = 10.0  # generous bound for any single wait
DEVICE = "dev1"
SERVER_ID = "fr04"


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    ca = CertificateAuthority(str(tmp_path_factory.mktemp("tunnels-pki")))
    return ca, ca.issue("relay", ["localhost", "127.0.0.1"])


def _start_relay(pki, **settings: Any) -> relay.Relay:
    ca, cert = pki
    settings.setdefault("pairing_timeout", 10.0)
    r = relay.Relay(RelaySettings(host="127.0.0.1", port=0, cert_file=cert.cert_file,
                                        key_file=cert.key_file, grace=0.5, **settings))
    r.start()
    return r


@pytest.fixture
def relay_server(pki):
    r = _start_relay(pki)
    yield r
    r.stop(grace=0)


@pytest.fixture
def echo_port():
    server = gevent.server.StreamServer(("127.0.0.1", 0), echo)
    server.start()
    yield server.server_port
    server.stop(timeout=1)


class Collector:
    """``publish_close`` stand-in: records calls, lets tests wait for them."""

    def __init__(self) -> None:
        self.calls: List[Tuple[str, str, str]] = []
        self.event = gevent.event.Event()

    def __call__(self, session_id: str, code: str, reason: str) -> None:
        self.calls.append((session_id, code, reason))
        self.event.set()

    def wait_for(self, session_id: str, timeout: float = T) -> Tuple[str, str, str]:
        with gevent.Timeout(timeout):
            while True:
                for call in self.calls:
                    if call[0] == session_id:
                        return call
                self.event.clear()
                self.event.wait(0.5)

    def for_session(self, session_id: str) -> List[Tuple[str, str, str]]:
        return [c for c in self.calls if c[0] == session_id]


class Env:
    """A device (config, identity, TunnelManager) and an operator, on a real relay."""

    def __init__(self, tmp_path, pki, relay_server, echo_port: int, **remote: Any) -> None:
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.tmp_path = tmp_path
        self.ca_file = pki[0].cert_file
        self.relay = relay_server
        self.echo_port = echo_port
        self.relay_addr = "127.0.0.1:%d" % relay_server.address[1]
        self.device_key = IdentityKey.generate()
        self.operator_key = IdentityKey.generate()
        self.history_path = str(tmp_path / "history.csv")
        permitopen = remote.pop("permitopen", None)
        if permitopen is None:
            permitopen = ["127.0.0.1:%d" % echo_port]
        options = ",".join('permitopen="%s"' % p for p in permitopen)
        ak = tmp_path / "authorized_keys"
        ak.write_text("%s %s operator@test\n" % (options, self.operator_key.public_line())
                      if options else "%s operator@test\n" % self.operator_key.public_line())
        self.authorized_keys = AuthorizedKeys.load(str(ak))
        raw = {
            "remote": dict({
                "server_id": SERVER_ID,
                "max_session": 4,
                "history_path": self.history_path,
                "allow": ["127.0.0.1:*"],
                "relays": {SERVER_ID: self.relay_addr},
                "relay_ca_file": self.ca_file,
                "idle_timeout": 600,
                "ack_timeout": 60,
                "keepalive_interval": 1,
                "queue_timeout": 30,
            }, **remote),
        }
        self.cfg = config_mod.parse(raw, str(tmp_path / "config.yaml"))
        self.replay = protocol.ReplayCache()
        self.closes = Collector()
        self.history = history_mod.History(self.history_path)
        self.manager = tunnels.TunnelManager(self.cfg, lambda: self.device_key, self.history,
                                             self.closes)
        self.stop_gc = gevent.event.Event()
        self.gc = gevent.spawn(self.manager.gc_loop, self.stop_gc)
        self.consoles: List[Console] = []

    def console(self, targets=None, **kw: Any) -> "Console":
        c = Console(self, targets or ["127.0.0.1:%d" % self.echo_port], **kw)
        self.consoles.append(c)
        return c

    def rows(self) -> List[dict]:
        return history_mod.read(self.history_path)

    def trust(self, lines: List[str], consult: bool = True) -> AuthorizedKeys:
        """Rewrite authorized_keys with ``lines``; the manager sees it from now on (as
        the control plane's trusted_keys), and with ``consult`` it is told at once."""
        ak = self.tmp_path / "authorized_keys"
        ak.write_text("".join(line + "\n" for line in lines))
        self.authorized_keys = AuthorizedKeys.load(str(ak))
        keys = self.authorized_keys
        self.manager.trusted_keys = lambda: keys
        if consult:
            self.manager.apply_trust(keys)
        return keys

    def row(self, session_id: str) -> dict:
        rows = [r for r in self.rows() if r["session_id"] == session_id]
        assert len(rows) == 1, rows
        return rows[0]

    def close(self) -> None:
        self.manager.shutdown(2.0)
        self.stop_gc.set()
        self.gc.join(timeout=T)
        for c in self.consoles:
            c.close()


@pytest.fixture
def make_env(tmp_path, pki, relay_server, echo_port):
    envs: List[Env] = []

    def make(**remote: Any) -> Env:
        env = Env(tmp_path / ("env%d" % len(envs)), pki, relay_server, echo_port, **remote)
        envs.append(env)
        return env

    yield make
    for env in envs:
        env.close()


class Console:
    """The operator side, from the real pieces."""

    def __init__(self, env: Env, targets: List[str], relay_addr: Optional[str] = None,
                 cipher: str = "xchacha20poly1305", key: Optional[IdentityKey] = None) -> None:
        self.env = env
        self.epk, self.esk = tunnel_crypto.kx_keypair()
        self.ticket = protocol.new_ticket()
        self.session_id, raw = protocol.make_session_request(
            key or env.operator_key, DEVICE, SERVER_ID, self.epk, targets,
            relay_addr or env.relay_addr, self.ticket, cipher=cipher)
        # Exactly what the control plane does before TunnelManager.submit.
        self.request = protocol.check_session_request(
            raw, DEVICE, SERVER_ID, env.authorized_keys, tunnels.device_allow(env.cfg),
            env.replay)
        self.replies: List[protocol.Message] = []
        self.reply_event = gevent.event.Event()
        self.tunnel: Optional[mux.Tunnel] = None
        self.runner: Optional[gevent.Greenlet] = None
        self.sock: Any = None
        self.agent_ip: Optional[str] = None

    def reply(self, raw: bytes) -> None:
        self.replies.append(protocol.decode(raw))
        self.reply_event.set()

    def submit(self) -> "Console":
        self.env.manager.submit(self.request, self.reply)
        return self

    def wait_reply(self, msg_type: str, timeout: float = T) -> protocol.Message:
        with gevent.Timeout(timeout):
            while True:
                for m in self.replies:
                    if m.type == msg_type:
                        return m
                self.reply_event.clear()
                self.reply_event.wait(0.5)

    def accept(self) -> protocol.Accepted:
        msg = self.wait_reply(protocol.MsgType.SESSION_ACCEPT)
        return protocol.verify_session_accept(msg, self.env.device_key.public_bytes,
                                              self.session_id, self.epk)

    def dial(self) -> Any:
        ctx = tls.client_context(self.env.ca_file)
        host, port = self.env.relay.address
        self.sock, self.agent_ip = rendezvous.dial_relay(
            host, port, ctx, "localhost", "console", self.session_id, self.ticket, timeout=T,
            pair_timeout=T)
        return self.sock

    def keys(self, accepted: protocol.Accepted) -> Tuple[Any, Any]:
        tx, rx = tunnel_crypto.derive_keys("console", self.epk, self.esk, accepted.epk,
                                           self.session_id)
        return tunnel_crypto.make_sealer_opener(tx, rx, accepted.cipher)

    def connect(self, keepalive: float = 1.0) -> mux.Tunnel:
        accepted = self.accept()
        sealer, opener = self.keys(accepted)
        self.dial()
        self.tunnel = mux.Tunnel(self.sock, sealer, opener, "console",
                                 name="console %s" % self.session_id,
                                 keepalive_interval=keepalive)
        self.runner = gevent.spawn(self.tunnel.run)
        assert self.tunnel.wait_up(T), self.tunnel.close_code
        return self.tunnel

    def result(self, timeout: float = T) -> Tuple[str, str]:
        assert self.runner is not None
        return self.runner.get(timeout=timeout)

    def close(self) -> None:
        if self.tunnel is not None:
            self.tunnel.close(CloseCode.NORMAL, "test over")
        if self.runner is not None:
            self.runner.join(timeout=T)


def _roundtrip(tunnel: mux.Tunnel, target: str, payload: bytes) -> bytes:
    stream = tunnel.open_stream(target, timeout=T)

    def send() -> None:
        view = memoryview(payload)
        for i in range(0, len(payload), 65536):
            stream.send(view[i:i + 65536])
        stream.shutdown_write()

    sender = gevent.spawn(send)
    got = bytearray()
    with gevent.Timeout(30):
        while True:
            chunk = stream.recv()
            if not chunk:
                break
            got += chunk
    sender.get(timeout=T)
    stream.close()
    return bytes(got)


def _wait(predicate, timeout: float = T, what: str = "condition") -> None:
    with gevent.Timeout(timeout, AssertionError("timed out waiting for %s" % what)):
        while not predicate():
            gevent.sleep(0.02)


def _assert_one_close(env: Env, session_id: str, code: str) -> Tuple[str, str, str]:
    call = env.closes.wait_for(session_id)
    gevent.sleep(0.05)
    calls = env.closes.for_session(session_id)
    assert len(calls) == 1, calls
    assert call[1] == code, call
    row = env.row(session_id)
    assert row["close_code"] == code, row
    return call


# ---------------------------------------------------------------- data path


def test_session_carries_data_both_ways(make_env):
    env = make_env()
    target = "127.0.0.1:%d" % env.echo_port
    c = env.console().submit()
    accepted = c.accept()  # verifies against the device key, session id, console epk
    assert accepted.session_id == c.session_id
    tunnel = c.connect()
    assert c.agent_ip == "127.0.0.1"
    payload = os.urandom(3 * 1024 * 1024 + 17)
    got = _roundtrip(tunnel, target, payload)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest()
    active, waiting = env.manager.stats()
    assert (active, waiting) == (1, 0)
    [info] = env.manager.sessions()
    assert info["id"] == c.session_id and info["remote_ip"] == "127.0.0.1"
    assert info["operator"] == env.operator_key.fingerprint
    assert info["bytes_in"] == len(payload) and info["bytes_out"] == len(payload)
    assert info["state"] == "running"
    agent_tunnel = env.manager._sessions[c.session_id].tunnel
    agent_tunnel.resuming = True  # what a lost relay path looks like (issue 12)
    assert env.manager.sessions()[0]["state"] == "resuming"
    agent_tunnel.resuming = False
    tunnel.close(CloseCode.NORMAL, "done")
    assert c.result() == (CloseCode.NORMAL, "done")
    _assert_one_close(env, c.session_id, CloseCode.NORMAL)
    row = env.row(c.session_id)
    assert row["remote_ip"] == "127.0.0.1"
    assert row["operator"] == env.operator_key.fingerprint
    assert row["targets"] == target
    assert int(row["bytes_in"]) == len(payload) and int(row["bytes_out"]) == len(payload)
    assert row["streams"] == "1"
    assert float(row["duration_s"]) > 0
    assert env.manager.stats() == (0, 0)


def test_targets_checked_per_stream(make_env, echo_port):
    other = socket.socket()
    other.bind(("127.0.0.1", 0))
    other_port = other.getsockname()[1]
    # Operator may open echo, other_port and localhost:echo; the device allows 127.0.0.1:*.
    env = make_env(permitopen=["127.0.0.1:%d" % echo_port, "localhost:%d" % echo_port,
                               "127.0.0.1:%d" % other_port])
    # The request asks for everything (SOCKS-style): effective = allow ∩ permitopen.
    c = env.console(targets=["*:*"]).submit()
    tunnel = c.connect()
    good = "127.0.0.1:%d" % echo_port
    long_stream = tunnel.open_stream(good, timeout=T)
    long_stream.send(b"first")
    # Outside the operator's permitopen (device would allow it).
    with pytest.raises(mux_frames.StreamRefused) as e1:
        tunnel.open_stream("127.0.0.1:%d" % (other_port + 1 if other_port < 65535 else 1),
                           timeout=T)
    assert e1.value.code == Reason.TARGET_NOT_PERMITTED
    # Outside the device allow-list (operator would allow it).
    with pytest.raises(mux_frames.StreamRefused) as e2:
        tunnel.open_stream("localhost:%d" % echo_port, timeout=T)
    assert e2.value.code == Reason.TARGET_NOT_PERMITTED
    # A SIGHUP narrowing the allow-list applies to new streams of a running session.
    narrowed = config_mod.parse({"remote": {
        "server_id": SERVER_ID, "history_path": env.history_path,
        "allow": ["127.0.0.1:%d" % echo_port], "relays": {SERVER_ID: env.relay_addr},
        "relay_ca_file": env.ca_file}}, env.cfg.path)
    env.manager.apply_config(narrowed)
    with pytest.raises(mux_frames.StreamRefused) as e3:
        tunnel.open_stream("127.0.0.1:%d" % other_port, timeout=T)
    assert e3.value.code == Reason.TARGET_NOT_PERMITTED
    other.close()
    # The first stream kept working all along, and new permitted streams open.
    long_stream.send(b" second")
    long_stream.shutdown_write()
    got = bytearray()
    with gevent.Timeout(T):
        while True:
            chunk = long_stream.recv()
            if not chunk:
                break
            got += chunk
    assert bytes(got) == b"first second"
    assert _roundtrip(tunnel, good, b"x" * 100000) == b"x" * 100000
    tunnel.close(CloseCode.NORMAL, "")
    c.result()
    _assert_one_close(env, c.session_id, CloseCode.NORMAL)
    assert env.row(c.session_id)["streams"] == "5"


# ---------------------------------------------------------------- admission


def test_max_session_queues_then_admits(make_env):
    env = make_env(max_session=2, queue_timeout=30)
    target = "127.0.0.1:%d" % env.echo_port
    c1, c2 = env.console().submit(), env.console().submit()
    t1, t2 = c1.connect(), c2.connect()
    c3 = env.console().submit()
    queued = c3.wait_reply(protocol.MsgType.SESSION_QUEUED)
    protocol.verify(queued, env.device_key.public_bytes)
    assert queued.body == {"session_id": c3.session_id, "position": 0}
    c4 = env.console().submit()
    assert c4.wait_reply(protocol.MsgType.SESSION_QUEUED).body["position"] == 1
    _wait(lambda: env.manager.stats() == (2, 2), what="2 active, 2 waiting")
    gevent.sleep(0.3)
    assert not [m for m in c3.replies if m.type != protocol.MsgType.SESSION_QUEUED]
    t1.close(CloseCode.NORMAL, "make room")
    t3 = c3.connect()  # admitted as soon as c1's slot is free
    assert _roundtrip(t3, target, b"third" * 1000) == b"third" * 1000
    assert _roundtrip(t2, target, b"second") == b"second"
    assert env.manager.stats() == (2, 1)
    # Raising max_session (SIGHUP) admits the remaining waiter at once.
    bigger = config_mod.parse({"remote": dict(
        server_id=SERVER_ID, history_path=env.history_path, allow=["127.0.0.1:*"],
        relays={SERVER_ID: env.relay_addr}, relay_ca_file=env.ca_file, max_session=3,
        queue_timeout=30, keepalive_interval=1)}, env.cfg.path)
    env.manager.apply_config(bigger)
    t4 = c4.connect()
    assert _roundtrip(t4, target, b"fourth") == b"fourth"
    assert env.manager.stats() == (3, 0)
    for c in (c2, c3, c4):
        c.tunnel.close(CloseCode.NORMAL, "")
    for c in (c1, c2, c3, c4):
        c.result()
        _assert_one_close(env, c.session_id, CloseCode.NORMAL)
    assert env.manager.stats() == (0, 0)


def test_queue_timeout_refuses(make_env):
    env = make_env(max_session=1, queue_timeout=1)
    c1 = env.console().submit()
    c1.connect()
    c2 = env.console().submit()
    c2.wait_reply(protocol.MsgType.SESSION_QUEUED)
    refuse = c2.wait_reply(protocol.MsgType.SESSION_REFUSE, timeout=5)
    protocol.verify(refuse, env.device_key.public_bytes)
    assert refuse.body["code"] == Reason.QUEUE_TIMEOUT
    _assert_one_close(env, c2.session_id, CloseCode.QUEUE_TIMEOUT)
    row = env.row(c2.session_id)
    assert row["remote_ip"] == "" and 0.9 < float(row["duration_s"]) < 5
    assert env.manager.stats() == (1, 0)
    # The running session is untouched.
    assert _roundtrip(c1.tunnel, "127.0.0.1:%d" % env.echo_port, b"ok") == b"ok"


def test_operator_close_of_a_waiting_session(make_env):
    env = make_env(max_session=1, queue_timeout=30)
    env.console().submit().connect()
    c2 = env.console().submit()
    c2.wait_reply(protocol.MsgType.SESSION_QUEUED)
    assert env.manager.close(c2.session_id, CloseCode.CLOSED_BY_OPERATOR, "changed my mind")
    _assert_one_close(env, c2.session_id, CloseCode.CLOSED_BY_OPERATOR)
    assert env.manager.stats() == (1, 0)
    assert not env.manager.close(c2.session_id, CloseCode.CLOSED_BY_OPERATOR, "again")
    assert not env.manager.close("0" * 32, CloseCode.CLOSED_BY_OPERATOR, "unknown")


# ---------------------------------------------------------------- endings


def test_operator_close_reaches_both_ends(make_env):
    env = make_env()
    c = env.console().submit()
    c.connect()
    assert env.manager.close(c.session_id, CloseCode.CLOSED_BY_OPERATOR, "operator said so")
    assert c.result()[0] == CloseCode.CLOSED_BY_OPERATOR
    _assert_one_close(env, c.session_id, CloseCode.CLOSED_BY_OPERATOR)


def test_idle_timeout(make_env):
    env = make_env(idle_timeout=1, ack_timeout=60)
    c = env.console().submit()
    tunnel = c.connect(keepalive=0.3)  # pings keep it alive, but it carries no data
    assert _roundtrip(tunnel, "127.0.0.1:%d" % env.echo_port, b"a little") == b"a little"
    code, reason = c.result(timeout=6)
    assert code == CloseCode.IDLE_TIMEOUT, reason
    _assert_one_close(env, c.session_id, CloseCode.IDLE_TIMEOUT)


def test_ack_lost(make_env):
    """The console completes the handshake, then goes silent (never reads, never pings)."""
    env = make_env(idle_timeout=600, ack_timeout=1)
    c = env.console().submit()
    accepted = c.accept()
    sealer, _ = c.keys(accepted)
    sock = c.dial()
    hello = b'{"role":"console","version":%d}' % mux_frames.PROTOCOL_VERSION
    sock.sendall(sealer.seal(bytes([mux_frames.HELLO]) + b"\0\0\0\0" + hello))
    call = env.closes.wait_for(c.session_id, timeout=8)
    assert call[1] == CloseCode.ACK_LOST, call
    _assert_one_close(env, c.session_id, CloseCode.ACK_LOST)
    sock.close()


def test_relay_killed_mid_session(pki, make_env, tmp_path):
    own_relay = _start_relay(pki)
    env = make_env(relays={SERVER_ID: "127.0.0.1:%d" % own_relay.address[1]})
    env.relay = own_relay
    env.relay_addr = "127.0.0.1:%d" % own_relay.address[1]
    c = env.console().submit()
    tunnel = c.connect()
    assert _roundtrip(tunnel, "127.0.0.1:%d" % env.echo_port, b"before") == b"before"
    own_relay.stop(grace=0)
    assert c.result()[0] == CloseCode.RELAY_LOST
    _assert_one_close(env, c.session_id, CloseCode.RELAY_LOST)
    assert env.row(c.session_id)["remote_ip"] == "127.0.0.1"


def test_relay_not_the_configured_one_is_refused(make_env):
    env = make_env()
    c = env.console(relay_addr="evil.example.net:8443").submit()
    refuse = c.wait_reply(protocol.MsgType.SESSION_REFUSE)
    protocol.verify(refuse, env.device_key.public_bytes)
    assert refuse.body["code"] in (Reason.MALFORMED, getattr(Reason, "RELAY_REFUSED", None))
    _assert_one_close(env, c.session_id, CloseCode.RELAY_REFUSED)
    assert not [m for m in c.replies if m.type == protocol.MsgType.SESSION_ACCEPT]
    assert env.relay.stats()["accepted"] == 0  # never dialed anything


def test_orphan_never_paired(pki, make_env):
    short = _start_relay(pki, pairing_timeout=0.5)
    try:
        env = make_env(relays={SERVER_ID: "127.0.0.1:%d" % short.address[1]})
        c = env.console(relay_addr="127.0.0.1:%d" % short.address[1]).submit()
        c.accept()  # and the console never comes
        call = env.closes.wait_for(c.session_id, timeout=6)
        assert call[1] == CloseCode.RELAY_REFUSED, call
        _assert_one_close(env, c.session_id, CloseCode.RELAY_REFUSED)
        assert env.manager.stats() == (0, 0)
    finally:
        short.stop(grace=0)


def test_relay_unreachable(make_env):
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()  # nothing listens there
    env = make_env(relays={SERVER_ID: "127.0.0.1:%d" % port})
    c = env.console(relay_addr="127.0.0.1:%d" % port).submit()
    c.accept()
    call = env.closes.wait_for(c.session_id)
    assert call[1] == CloseCode.RELAY_REFUSED and "unreachable" in call[2], call
    _assert_one_close(env, c.session_id, CloseCode.RELAY_REFUSED)


def test_gc_closes_sessions_stuck_dialing(make_env, monkeypatch):
    env = make_env()
    monkeypatch.setattr(tunnels, "DIAL_BOUND", 0.3)
    c = env.console().submit()
    c.accept()  # the relay would wait 10 s for the console; the GC bound is shorter
    call = env.closes.wait_for(c.session_id, timeout=6)
    assert call[1] == CloseCode.RELAY_REFUSED and "not paired" in call[2], call
    _assert_one_close(env, c.session_id, CloseCode.RELAY_REFUSED)


def test_error_in_one_session_ends_that_session_only(make_env, monkeypatch):
    env = make_env()
    good = env.console().submit()
    tunnel = good.connect()
    real = tunnel_crypto.choose_cipher

    def broken(preferred: str) -> str:
        raise RuntimeError("bug")

    monkeypatch.setattr(tunnel_crypto, "choose_cipher", broken)
    bad = env.console().submit()
    call = env.closes.wait_for(bad.session_id)
    assert call[1] == CloseCode.ERROR
    _assert_one_close(env, bad.session_id, CloseCode.ERROR)
    monkeypatch.setattr(tunnel_crypto, "choose_cipher", real)
    assert _roundtrip(tunnel, "127.0.0.1:%d" % env.echo_port, b"still") == b"still"
    assert env.manager.stats() == (1, 0)


def test_shutdown_closes_everything(make_env):
    env = make_env(max_session=2, queue_timeout=30)
    c1, c2 = env.console().submit(), env.console().submit()
    c1.connect()
    c2.connect()
    c3 = env.console().submit()
    c3.wait_reply(protocol.MsgType.SESSION_QUEUED)
    assert env.manager.shutdown(5.0)
    for c in (c1, c2):
        assert c.result()[0] == CloseCode.SHUTDOWN
        _assert_one_close(env, c.session_id, CloseCode.SHUTDOWN)
    refuse = c3.wait_reply(protocol.MsgType.SESSION_REFUSE)
    assert refuse.body["code"] == Reason.SHUTTING_DOWN
    _assert_one_close(env, c3.session_id, CloseCode.SHUTDOWN)
    assert len(env.rows()) == 3
    # After shutdown, new requests are refused too (and still leave a row).
    c4 = env.console().submit()
    assert c4.wait_reply(protocol.MsgType.SESSION_REFUSE).body["code"] == Reason.SHUTTING_DOWN
    _assert_one_close(env, c4.session_id, CloseCode.SHUTDOWN)
    assert env.manager.stats() == (0, 0)


def test_gc_interval_bounds(make_env):
    env = make_env(idle_timeout=1, ack_timeout=1)
    assert tunnels.gc_interval(env.cfg) == 0.25
    env2 = make_env(idle_timeout=1800, ack_timeout=60)
    assert tunnels.gc_interval(env2.cfg) == tunnels.GC_MAX_INTERVAL
    assert tunnels.GC_MIN_INTERVAL <= tunnels.gc_interval(env.cfg)


# ---------------------------------------------------------------- more behaviours


def test_transfer_virtual_target(make_env, tmp_path):
    from remote_gevent.console import transfer as console_transfer

    root = tmp_path / "files"
    root.mkdir()
    env = make_env(permitopen=[], transfer={"roots": [{"path": str(root), "mode": "rw"}]})
    assert "@transfer" in tunnels.device_allow(env.cfg)
    c = env.console(targets=["@transfer", "127.0.0.1:%d" % env.echo_port]).submit()
    tunnel = c.connect()
    local = tmp_path / "upload.bin"
    data = os.urandom(300000)
    local.write_bytes(data)
    console_transfer.push(lambda: tunnel.open_stream("@transfer", timeout=T), str(local),
                          str(root / "upload.bin"))
    assert (root / "upload.bin").read_bytes() == data
    # @sftp is allowed by the device but was not requested: refused per stream.
    with pytest.raises(mux_frames.StreamRefused) as e:
        tunnel.open_stream("@sftp", timeout=T)
    assert e.value.code == Reason.TARGET_NOT_PERMITTED
    tunnel.close(CloseCode.NORMAL, "")
    c.result()
    _assert_one_close(env, c.session_id, CloseCode.NORMAL)


def test_key_rotation_applies_to_new_sessions(make_env):
    env = make_env()
    c1 = env.console().submit()
    t1 = c1.connect()
    old_key = env.device_key
    env.device_key = IdentityKey.generate()  # get_identity() now returns the new key
    c2 = env.console().submit()
    msg = c2.wait_reply(protocol.MsgType.SESSION_ACCEPT)
    with pytest.raises(protocol.ProtocolError):
        protocol.verify_session_accept(msg, old_key.public_bytes, c2.session_id, c2.epk)
    t2 = c2.connect()  # verifies against the new key
    target = "127.0.0.1:%d" % env.echo_port
    assert _roundtrip(t1, target, b"old") == b"old"  # the running tunnel is untouched
    assert _roundtrip(t2, target, b"new") == b"new"


def test_shrinking_max_session_applies_as_sessions_end(make_env):
    env = make_env(max_session=2, queue_timeout=30)
    c1, c2 = env.console().submit(), env.console().submit()
    c1.connect()
    c2.connect()
    smaller = config_mod.parse({"remote": dict(
        server_id=SERVER_ID, history_path=env.history_path, allow=["127.0.0.1:*"],
        relays={SERVER_ID: env.relay_addr}, relay_ca_file=env.ca_file, max_session=1,
        queue_timeout=30, keepalive_interval=1)}, env.cfg.path)
    env.manager.apply_config(smaller)  # nothing is cut
    c3 = env.console().submit()
    c3.wait_reply(protocol.MsgType.SESSION_QUEUED)
    c1.tunnel.close(CloseCode.NORMAL, "")
    _assert_one_close(env, c1.session_id, CloseCode.NORMAL)
    gevent.sleep(0.3)  # c2 still runs: one session is the new cap, c3 keeps waiting
    assert env.manager.stats() == (1, 1)
    c2.tunnel.close(CloseCode.NORMAL, "")
    c3.connect()
    assert env.manager.stats() == (1, 0)


# ---------------------------------------------------------------- issue 10: trust, fairness


def _line(key: IdentityKey, options: str = "") -> str:
    return (options + " " if options else "") + key.public_line() + " op"


def test_revoked_operator_sessions_end_at_once(make_env):
    env = make_env(max_session=2, max_session_per_operator=10, queue_timeout=30)
    other = IdentityKey.generate()
    a_line, b_line = _line(env.operator_key), _line(other)
    env.trust([a_line, b_line])
    target = "127.0.0.1:%d" % env.echo_port
    a1 = env.console().submit()
    ta = a1.connect()
    b1 = env.console(key=other).submit()
    tb = b1.connect()
    a2 = env.console().submit()  # waits for a slot
    a2.wait_reply(protocol.MsgType.SESSION_QUEUED)
    assert _roundtrip(ta, target, b"before") == b"before"
    env.trust([b_line])  # operator A removed (a SIGHUP, or the edit being noticed)
    code, reason = a1.result(timeout=5)
    assert code == CloseCode.REVOKED, reason
    _assert_one_close(env, a1.session_id, CloseCode.REVOKED)
    refuse = a2.wait_reply(protocol.MsgType.SESSION_REFUSE, timeout=5)
    assert refuse.body["code"] == Reason.UNKNOWN_OPERATOR
    _assert_one_close(env, a2.session_id, CloseCode.REVOKED)
    assert env.row(a1.session_id)["reason"].startswith("operator key no longer trusted")
    with pytest.raises((mux_frames.StreamRefused, mux_frames.TunnelClosed)):
        ta.open_stream(target, timeout=T)
    # Operator B is untouched and keeps its tunnel.
    assert _roundtrip(tb, target, b"still here") == b"still here"
    assert env.manager.stats() == (1, 0)


def test_revocation_noticed_at_the_next_stream_open(make_env):
    """The file changed but nothing consulted it yet: the next OPEN of the removed
    operator is refused and its session ends ``revoked``."""
    env = make_env()
    env.trust([_line(env.operator_key)])
    target = "127.0.0.1:%d" % env.echo_port
    c = env.console().submit()
    tunnel = c.connect()
    assert _roundtrip(tunnel, target, b"x") == b"x"
    env.trust([_line(IdentityKey.generate())], consult=False)
    with pytest.raises((mux_frames.StreamRefused, mux_frames.TunnelClosed)) as e:
        tunnel.open_stream(target, timeout=T)
    if isinstance(e.value, mux_frames.StreamRefused):
        assert e.value.code == CloseCode.REVOKED
    assert c.result(timeout=5)[0] == CloseCode.REVOKED
    _assert_one_close(env, c.session_id, CloseCode.REVOKED)


def test_narrowed_permitopen_refuses_new_streams(make_env, echo_port):
    spare = gevent.server.StreamServer(("127.0.0.1", 0), echo)
    spare.start()
    try:
        good = "127.0.0.1:%d" % echo_port
        second = "127.0.0.1:%d" % spare.server_port
        env = make_env(permitopen=[good, second])
        env.trust([_line(env.operator_key, 'permitopen="%s",permitopen="%s"' % (good, second))])
        c = env.console(targets=["*:*"]).submit()
        tunnel = c.connect()
        assert _roundtrip(tunnel, second, b"allowed") == b"allowed"
        env.trust([_line(env.operator_key, 'permitopen="%s"' % good)])
        with pytest.raises(mux_frames.StreamRefused) as e:
            tunnel.open_stream(second, timeout=T)
        assert e.value.code == Reason.TARGET_NOT_PERMITTED
        # The session goes on for what the key still permits.
        assert _roundtrip(tunnel, good, b"still ok") == b"still ok"
        tunnel.close(CloseCode.NORMAL, "")
        assert c.result()[0] == CloseCode.NORMAL
    finally:
        spare.stop(timeout=1)


def test_one_operator_cannot_starve_another(make_env):
    """60 valid requests from operator A (its console never comes to the relay) must
    not hold operator B out: B is accepted at once; A's excess is refused with its own
    codes, before any session (no history row, no greenlet)."""
    env = make_env(max_session=4, queue_timeout=30)
    b_key = IdentityKey.generate()
    env.trust([_line(env.operator_key), _line(b_key)])
    refused: List[str] = []
    for _ in range(60):
        c = env.console()
        try:
            c.submit()
        except protocol.Refused as exc:
            refused.append(exc.reason)
    assert len(env.manager._sessions) == 2  # A's share: half of max_session
    assert refused.count(Reason.OPERATOR_LIMIT) == 28
    assert refused.count(Reason.OPERATOR_RATE) == 30  # burst 30 of operator_rate 60/min
    start = time.monotonic()
    b = env.console(key=b_key).submit()
    b.accept()
    waited = time.monotonic() - start
    print("\nfairness: after 60 requests from operator A, operator B accepted in %.3f s"
          % waited)
    assert waited < 2.0, waited
    assert _roundtrip(b.connect(), "127.0.0.1:%d" % env.echo_port, b"b") == b"b"


def test_operator_share_configurable_and_freed_on_end(make_env):
    env = make_env(max_session=4, max_session_per_operator=1, queue_timeout=30)
    c1 = env.console().submit()  # one trusted operator, but an explicit share of 1
    c1.connect()
    with pytest.raises(protocol.Refused) as e:
        env.console().submit()
    assert e.value.reason == Reason.OPERATOR_LIMIT
    c1.tunnel.close(CloseCode.NORMAL, "")
    _assert_one_close(env, c1.session_id, CloseCode.NORMAL)
    env.console().submit().connect()  # the share is free again


def test_operator_rate_token_bucket():
    from remote_gevent.agent.fairness import OperatorRates, operator_share

    rates = OperatorRates(clock=lambda: 0.0)
    assert [rates.take("A", 6, 2, now=0.0) for _ in range(3)] == [True, True, False]
    assert rates.take("B", 6, 2, now=0.0)  # B has its own bucket
    assert not rates.take("A", 6, 2, now=5.0)  # 6/min: one token every 10 s
    assert rates.take("A", 6, 2, now=10.5)
    assert all(rates.take("A", 0, 1, now=11.0) for _ in range(100))  # 0: no limit

    class R:
        max_session, max_session_per_operator = 10, 0

    class C:
        remote = R

    assert operator_share(C, 1) is None and operator_share(C, 3) == 5
    R.max_session = 1
    assert operator_share(C, 2) == 1
    R.max_session_per_operator = 3
    assert operator_share(C, 2) == 3


# ---------------------------------------------------------------- set-up path (issue 17)


def test_agent_dials_the_relay_before_it_publishes_the_accept(make_env, monkeypatch):
    """The relay dial overlaps the keys, the signature and the publication of the accept."""
    events = []
    dial = rendezvous.dial_relay

    def spy(*args, **kwargs):
        events.append("dial")
        return dial(*args, **kwargs)

    monkeypatch.setattr(tunnels_run.rendezvous, "dial_relay", spy)
    env = make_env()
    c = env.console()
    reply = c.reply
    c.reply = lambda raw: (events.append("accept"), reply(raw))
    c.submit()
    tunnel = c.connect()  # and the session works as before
    assert tunnel.is_up
    assert events[:2] == ["dial", "accept"], events
    c.close()


def test_accept_not_sent_ends_the_early_dial(make_env):
    """The accept could not be published: the relay connection already under way is
    closed, the session ends ``error``, one close."""
    env = make_env()
    c: Console = env.console()

    def broken_reply(raw):
        raise OSError("broker link down")

    c.reply = broken_reply
    c.submit()
    call = env.closes.wait_for(c.session_id, timeout=T)
    assert call[1] == CloseCode.ERROR, call
    with gevent.Timeout(T, AssertionError("the early dial is still at the relay")):
        while env.relay.pending:
            gevent.sleep(0.02)
