"""Resilience of a real agent process (issues 3 and 4): broker killed under an open
tunnel, history rows for refusals, max_session seen in ``alive``, a hostile flood, and
SIGHUP reloads.

One :class:`~remote_gevent.demo.platform.DemoPlatform` for the module, on its *own*
private TLS RabbitMQ node (the broker-kill test must not hurt the suite's shared node):
the agent and relay are real processes, sessions are opened by real
``remote-gevent-console`` processes, the device's services are echo servers in this
process. The test talks to the broker as the platform's operator (its own login and
key) to watch ``remote.up`` and to publish what a console never would. Every wait is
bounded; loopback only; everything is torn down.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import time
from typing import Any, Dict, List

import gevent
import gevent.event
import pytest
import yaml
from gevent.queue import Empty, Queue

from remote_gevent.agent import history
from remote_gevent.crypto import identity
from remote_gevent.wire import protocol
from remote_gevent.crypto import tunnel_crypto as tc
from remote_gevent.common.amqplink import AmqpLink
from remote_gevent.demo import operator_cert as demo_cert
from remote_gevent.demo import rabbit as demo_rabbit
from remote_gevent.demo.platform import DemoPlatform
from remote_gevent.demo.processes import port_open
from echo_server import EchoServer
from test_e2e import Procs, free_port, stdio

pytestmark = pytest.mark.e2e

WAIT = 20.0  # bound for any single wait
KIB = 1024
MIB = 1024 * KIB


# --------------------------------------------------------------------------- helpers


def wait_for(predicate, timeout: float = WAIT, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.1f s waiting for %s" % (timeout, what))
        gevent.sleep(interval)


def read_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def rss_kib(pid: int) -> int:
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS for pid %d" % pid)


def read_exactly(stream: Any, n: int, timeout: float = WAIT) -> bytes:
    buf = b""
    with gevent.Timeout(timeout, AssertionError("timed out reading %d bytes" % n)):
        while len(buf) < n:
            chunk = stream.read1(n - len(buf))
            if not chunk:
                raise AssertionError("EOF after %d of %d bytes: %r" % (len(buf), n, buf[:80]))
            buf += chunk
    return buf


@pytest.fixture
def procs():
    p = Procs()
    yield p
    p.close()


def finish(proc: subprocess.Popen, timeout: float = WAIT) -> "tuple[int, str]":
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate(timeout=10)
        raise AssertionError("console did not exit within %.0f s: %s" % (timeout, err)) from None
    return proc.returncode, (err or b"").decode("utf-8", "replace")


class Operator:
    """The platform's operator, in this process: a reconnecting AMQP link with a durable
    watch queue on ``remote.up`` (alive, close) that outlives a broker restart, and the
    operator key to sign requests and closes."""

    def __init__(self, p: DemoPlatform) -> None:
        self.p = p
        self.key = identity.load(p.operator_key_path)
        self.device_key = identity.load(p.device_key_path)
        self.watch_queue = "console.%s.rs-watch-%s" % (p.operator, secrets.token_hex(3))
        self.up: Dict[str, Queue] = {"alive": Queue(), "close": Queue()}
        self.link = AmqpLink([p.broker_url], p.operator, p.operator_password,
                             ca_file=p.broker_ca_file, connect_timeout=3.0,
                             reconnect_max_delay=1.0, heartbeat=10, name="rs-operator")
        self.greenlet = gevent.spawn(self.link.run, self._setup)
        assert self.link.wait_connected(WAIT), self.link.last_error

    def _setup(self, link: AmqpLink) -> None:
        link.declare_queue(self.watch_queue, durable=True, exclusive=False, auto_delete=False)
        for kind in self.up:
            link.bind(self.watch_queue, "remote.up", "%s.%s" % (self.p.topic, kind))
        link.consume(self.watch_queue, self._on_up)

    def _on_up(self, msg: Any) -> None:
        self.link.ack(msg)
        kind = msg.delivery_info["routing_key"].rsplit(".", 1)[1]
        raw = msg.body if isinstance(msg.body, bytes) else msg.body.encode()
        decoded = protocol.decode(raw)
        assert protocol.verify(decoded, self.device_key.public_bytes)
        self.up[kind].put(decoded)

    def drain(self, kind: str) -> None:
        while True:
            try:
                self.up[kind].get_nowait()
            except Empty:
                return

    def wait_up(self, kind: str, predicate, timeout: float = WAIT, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("no %s message %s within %.0f s" % (kind, what, timeout))
            try:
                msg = self.up[kind].get(timeout=left)
            except Empty:
                continue
            if predicate(msg.body):
                return msg

    def publish(self, kind: str, raw: bytes, **props: Any) -> None:
        self.link.publish("remote.down", "%s.%s" % (self.p.topic, kind), raw,
                          delivery_mode=1, expiration=60000, **props)

    def request(self, targets: List[str], key: Any = None, **kw: Any) -> "tuple[str, bytes]":
        epk, _ = tc.kx_keypair()
        return protocol.make_session_request(
            key or self.key, kw.pop("device", self.p.ident), kw.pop("server_id", "fr04"),
            epk, targets, kw.pop("relay", self.p.relay_address), protocol.new_ticket(), **kw)

    def send_request(self, raw: bytes, sid: str) -> None:
        # Nobody listens on this reply queue: the agent's reply is simply not routed.
        self.publish("session", raw, correlation_id=sid,
                     reply_to="amq.gen-rs-%s" % secrets.token_hex(8))

    def close_session(self, sid: str) -> None:
        self.publish("close", protocol.make_session_close(self.key, sid, "closed_by_operator"))

    def stop(self) -> None:
        self.link.stop()
        self.greenlet.join(5.0)
        self.greenlet.kill()


class Streamer:
    """A TCP connection through ``forward`` to an echo target: one greenlet writes
    random data (~8 MiB/s), one reads the echo; both hash what they saw."""

    CHUNK = 32 * KIB

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.sock.settimeout(None)
        self.sent = hashlib.sha256()
        self.received = hashlib.sha256()
        self.n_sent = 0
        self.n_received = 0
        self.stop_writing = gevent.event.Event()
        self.writer = gevent.spawn(self._write)
        self.reader = gevent.spawn(self._read)

    def _write(self) -> None:
        while not self.stop_writing.is_set():
            chunk = os.urandom(self.CHUNK)
            self.sock.sendall(chunk)
            self.sent.update(chunk)
            self.n_sent += len(chunk)
            gevent.sleep(0.004)
        self.sock.shutdown(socket.SHUT_WR)

    def _read(self) -> None:
        while True:
            data = self.sock.recv(65536)
            if not data:
                return
            self.received.update(data)
            self.n_received += len(data)

    def flowing(self, seconds: float) -> int:
        """Bytes echoed during ``seconds`` (asserts the stream is alive and moving)."""
        before = self.n_received
        gevent.sleep(seconds)
        assert not self.writer.dead and not self.reader.dead, (self.writer, self.reader)
        return self.n_received - before

    def finish(self) -> None:
        self.stop_writing.set()
        self.writer.get(timeout=WAIT)
        self.reader.get(timeout=WAIT)
        self.sock.close()
        assert self.n_received == self.n_sent
        assert self.received.hexdigest() == self.sent.hexdigest()


def set_allow(p: DemoPlatform, allow: Any) -> None:
    with open(p.agent_config) as f:
        data = yaml.safe_load(f)
    data["remote"]["allow"] = allow
    tmp = p.agent_config + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    os.chmod(tmp, 0o600)
    os.replace(tmp, p.agent_config)


def queue_depth(p: DemoPlatform) -> "tuple[int, int]":
    """(messages ready, consumers) of the device's command queue, via the admin login."""
    link = AmqpLink([p.broker_url], p.node.admin_user, p.node.admin_password,
                    ca_file=p.broker_ca_file, connect_timeout=5.0, heartbeat=0, prefetch=0,
                    name="rs-admin")
    link.connect()
    try:
        r = link.channel.queue_declare(p.topic + ".conn", passive=True)
        return int(r.message_count), int(r.consumer_count)
    finally:
        link.close()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def echo():
    a, b = EchoServer(), EchoServer()
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture(scope="module")
def plat(tmp_path_factory, echo):
    """Own broker node, relay and agent processes; max_session 2, alive every second."""
    if not demo_rabbit.available():
        pytest.skip("RabbitMQ is not installed")
    p = DemoPlatform(str(tmp_path_factory.mktemp("resilience")), ident="rs-%s"
                     % secrets.token_hex(3),
                     remote={"max_session": 2, "queue_timeout": 30, "health_check": 1,
                             "keepalive_interval": 1},
                     amqp={"reconnect_max_delay": 2})
    # The Operator below signs with the plain operator key (it builds requests, replays
    # and forgeries by hand), so the device must trust that key, not the demo's CA.
    os.environ[demo_cert.PLAIN_KEY_ENV] = "1"
    try:
        p.start()
    finally:
        del os.environ[demo_cert.PLAIN_KEY_ENV]
    op = None
    try:
        op = Operator(p)
        yield p, op
    finally:
        if op is not None:
            op.stop()
        p.stop()
        assert not p.node.running


def echo_once(proc: subprocess.Popen, payload: bytes = b"ping\n", timeout: float = WAIT) -> None:
    proc.stdin.write(payload)
    proc.stdin.flush()
    assert read_exactly(proc.stdout, len(payload), timeout) == payload


def rows(p: DemoPlatform) -> List[Dict[str, str]]:
    return history.read(p.history_path)


def row_of(p: DemoPlatform, sid: str) -> List[Dict[str, str]]:
    return [r for r in rows(p) if r["session_id"] == sid]


def wait_log(p: DemoPlatform, text: str, count: int = 1, timeout: float = WAIT) -> None:
    wait_for(lambda: read_text(p.agent_log).count(text) >= count, timeout,
             what="%r (x%d) in %s:\n%s" % (text, count, p.agent_log,
                                           read_text(p.agent_log)[-3000:]))


# --------------------------------------------------------------------------- 2. refusal rows


def test_refusal_history_rows_only_for_trusted_fresh_requests(plat, echo, procs):
    """A trusted operator's fresh request refused before admission writes ONE row
    (``refused``, reason, duration 0, no remote IP); strangers, forgers, expired and
    replayed requests are only logged."""
    p, op = plat
    a, _ = echo
    before = len(rows(p))
    denied, raw = op.request(["10.255.255.1:22"])
    op.send_request(raw, denied)
    wait_log(p, "refused session %s: target_not_permitted" % denied)
    op.send_request(raw, denied)  # the same request again: a replay, logged only
    wait_log(p, "refused session %s: replayed" % denied)
    cases = [("unknown_operator", op.request(["10.255.255.1:22"],
                                             key=identity.IdentityKey.generate()))]
    sid, raw = op.request(["10.255.255.1:22"])
    env = json.loads(raw)
    env["sig"] = protocol.b64e(os.urandom(64))
    cases.append(("bad_signature", (sid, json.dumps(env).encode())))
    cases.append(("expired", op.request(["10.255.255.1:22"], now=time.time() - 1000)))
    cases.append(("wrong_device", op.request(["10.255.255.1:22"], device="someone-else")))
    for code, (sid, raw) in cases:
        op.send_request(raw, sid)
        wait_log(p, "refused session %s: %s" % (sid, code))
    # the console's view of the same refusal
    proc = subprocess.run(p.console_argv("stdio", p.ident, "10.255.255.2:22"),
                          capture_output=True, timeout=WAIT, stdin=subprocess.DEVNULL)
    assert proc.returncode != 0 and b"not permitted" in proc.stderr, proc.stderr
    new = rows(p)[before:]
    refused = [r for r in new if r["close_code"] == "refused"]
    assert len(refused) == 2, new
    first = row_of(p, denied)
    assert len(first) == 1, new
    r = first[0]
    assert r["remote_ip"] == "" and float(r["duration_s"]) == 0.0
    assert r["reason"] == ("target_not_permitted: 10.255.255.1:22 not permitted by the "
                           "device's remote.allow"), r
    assert r["operator"] == op.key.fingerprint and r["targets"] == "10.255.255.1:22"
    assert r["bytes_in"] == r["bytes_out"] == "0"
    assert "10.255.255.2:22" in refused[1]["targets"]
    for _code, (sid, _raw) in cases:
        assert not row_of(p, sid), sid
    # an accepted session still writes its own (single) row
    c = stdio(procs, p, "127.0.0.1:%d" % a.port)
    try:
        echo_once(c)
    finally:
        c.stdin.close()
        assert finish(c)[0] == 0


# --------------------------------------------------------------------------- 3. max_session


def test_max_session_alive_reports_active_and_waiting(plat, echo, procs):
    p, op = plat
    a, _ = echo
    target = "127.0.0.1:%d" % a.port
    first, second = stdio(procs, p, target), stdio(procs, p, target)
    echo_once(first)
    echo_once(second)
    third = stdio(procs, p, target)
    op.drain("alive")
    msg = op.wait_up("alive", lambda b: b["sessions_waiting"] == 1, what="with a waiter")
    assert msg.body["sessions_active"] == 2 and msg.body["max_session"] == 2, msg.body
    assert third.poll() is None
    first.stdin.close()
    assert finish(first)[0] == 0
    echo_once(third)  # took the freed slot (WAIT: a relay dial + TLS on a loaded box)
    msg = op.wait_up("alive", lambda b: b["sessions_waiting"] == 0, what="after admission")
    assert msg.body["sessions_active"] == 2, msg.body
    for c in (second, third):
        c.stdin.close()
        assert finish(c)[0] == 0
    op.wait_up("alive", lambda b: b["sessions_active"] == 0, what="all closed")


# --------------------------------------------------------------------------- 4. hostile flood


def hostile_messages(op: Operator, n: int) -> List["tuple[str, bytes, Dict[str, Any]]"]:
    rnd = random.Random(4)
    out = []
    sid, good = op.request(["127.0.0.1:1"])
    good_env = json.loads(good)
    for i in range(n):
        kind = rnd.choice(("session", "session", "session", "close", "status"))
        props: Dict[str, Any] = {"correlation_id": protocol.new_session_id()}
        pick = i % 8
        if pick == 0:
            body = os.urandom(rnd.randint(1, 4000))
        elif pick == 1:  # huge: over our 16 KiB, under the broker's max_message_size
            # (256 KiB; a larger publish closes the publisher's channel at the broker,
            # which test_hostile_broker covers), so every one reaches the agent.
            body = (b'{"v":1,"type":"session.request","body":{"pad":"' + b"A" * rnd.randint(
                17 * KIB, 250 * KIB) + b'"}}')
        elif pick == 2:  # deep nesting within the size cap, and far beyond it
            depth = rnd.choice((500, 5000, 7000))
            body = b'{"v":1,"type":"session.request","body":' + b"[" * depth + \
                b"]" * depth + b"}"
        elif pick == 3:  # wrong types in a well-formed envelope
            env = json.loads(json.dumps(good_env))
            field = rnd.choice(("session_id", "targets", "iat", "exp", "epk", "ticket",
                                "relay", "cipher", "device"))
            env["body"][field] = rnd.choice((None, 1.5, [], {}, True, "x" * 300, -1,
                                             2 ** 70, ["a"] * 40))
            body = json.dumps(env).encode()
        elif pick == 4:  # forged signature, claimed by the trusted operator
            env = json.loads(json.dumps(good_env))
            env["body"]["session_id"] = protocol.new_session_id()
            env["sig"] = protocol.b64e(os.urandom(64))
            body = json.dumps(env).encode()
        elif pick == 5:  # wrong envelope types / versions / duplicate keys / NaN
            body = rnd.choice((b'{"v":"1","type":"session.request","body":{}}',
                               b'{"v":1,"v":1,"type":"alive","body":{}}',
                               b'{"v":NaN}', b"[]", b'"str"', b"null", b"",
                               b'{"v":1,"type":["x"],"body":[]}'))
        elif pick == 6:  # valid signature, hostile AMQP properties
            sid2, body = op.request(["127.0.0.1:1"], ttl=1, now=time.time() - 10 ** 6)
            props = rnd.choice(({"reply_to": "x" * 199}, {"reply_to": "../../etc"},
                                {"reply_to": "amq.gen-" + "\u00e9"},
                                {"correlation_id": "\x00" * 5},
                                {"content_encoding": "no-such-codec"},
                                {"headers": {"x": "y" * 1000}}))
        else:  # a close / status by a stranger's key, or garbage in a valid shape
            body = protocol.make_session_close(identity.IdentityKey.generate(),
                                               protocol.new_session_id(), "closed_by_operator")
        if "reply_to" not in props and rnd.random() < 0.7:
            props["reply_to"] = rnd.choice(("amq.gen-rs-%d" % i, "reply.%d" % i, "q"))
        out.append((kind, body, props))
    return out


def test_hostile_flood_does_not_disturb_the_agent(plat):
    p, op = plat
    pid = p.agent_proc.pid
    log_start = len(read_text(p.agent_log))
    rss_before = rss_kib(pid)
    messages = hostile_messages(op, 2000)
    t0 = time.monotonic()
    for kind, body, props in messages:
        op.publish(kind, body, **props)
    flood_s = time.monotonic() - t0
    # The broker keeps at most 100 waiting (reject-publish) and the agent drains them.
    # Published is not yet routed: until the broker has worked through what is still in
    # our socket, a request sent now could be dropped by the full queue. So wait until
    # the queue stays empty (with the agent still consuming) for a while.
    empty_polls = [0]

    def drained() -> bool:
        empty_polls[0] = empty_polls[0] + 1 if queue_depth(p) == (0, 1) else 0
        return empty_polls[0] >= 4

    wait_for(drained, 30, interval=0.25,
             what="the command queue to stay drained with the agent still consuming")
    sid, raw = op.request(["127.0.0.1:1"])
    t1 = time.monotonic()
    op.send_request(raw, sid)
    wait_log(p, "session %s: request from operator" % sid, timeout=10)
    accepted_s = time.monotonic() - t1
    op.close_session(sid)
    wait_for(lambda: row_of(p, sid), what="the valid session's row")
    text = read_text(p.agent_log)[log_start:]
    refused = text.count("refused ")
    rss_after = rss_kib(pid)
    print("\nflood: 2000 hostile messages published in %.2f s, %d refusals logged by the "
          "agent; valid request handled %.2f s later; RSS %d -> %d KiB"
          % (flood_s, refused, accepted_s, rss_before, rss_after))
    assert p.agent_proc.poll() is None
    assert refused >= 100, text[-2000:]
    for bad in ("restarting service", "crashed", "Traceback", "error handling",
                "control link lost"):
        assert bad not in text, (bad, text[text.find(bad) - 500:text.find(bad) + 1500])
    assert rss_after - rss_before < 64 * 1024, (rss_before, rss_after)
    assert accepted_s < 10


# --------------------------------------------------------------------------- 5. SIGHUP


def test_sighup_narrows_allow_for_next_stream_and_refuses_invalid_config(plat, echo, procs):
    p, op = plat
    a, b = echo
    with open(p.agent_config) as f:
        original = f.read()
    port = free_port()
    fwd = procs.start(p.console_argv("forward", p.ident, "-L",
                                     "127.0.0.1:%d:127.0.0.1:%d" % (port, a.port)))
    wait_for(lambda: port_open("127.0.0.1", port, 0.2), what="forward listener")
    old = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    old.sendall(b"before\n")
    assert old.recv(100) == b"before\n"
    applied = read_text(p.agent_log).count("reload: applied remote.allow")
    try:
        set_allow(p, ["127.0.0.1:%d" % b.port])
        p.agent_proc.send_signal(signal.SIGHUP)
        wait_log(p, "reload: applied remote.allow", applied + 1)
        # the open stream keeps flowing; the next stream to the same target is refused
        old.sendall(b"still\n")
        assert old.recv(100) == b"still\n"
        new = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        new.settimeout(WAIT)
        new.sendall(b"after\n")
        try:
            got = new.recv(100)
        except ConnectionResetError:
            got = b""
        assert got == b"", got
        new.close()
        # a new session for the removed target is refused, the allowed one works
        status, err = finish(stdio(procs, p, "127.0.0.1:%d" % a.port))
        assert status != 0 and "not permitted" in err, err
        # an invalid file is refused and the agent keeps serving with what it had
        refused = read_text(p.agent_log).count("reload refused")
        with open(p.agent_config, "a") as f:
            f.write("\n  max_session: many\n")
        with open(p.agent_config) as f:
            bad_text = f.read()
        p.agent_proc.send_signal(signal.SIGHUP)
        wait_log(p, "reload refused", refused + 1)
        assert p.agent_proc.poll() is None
        c = stdio(procs, p, "127.0.0.1:%d" % b.port)
        echo_once(c)
        c.stdin.close()
        assert finish(c)[0] == 0
        status, err = finish(stdio(procs, p, "127.0.0.1:%d" % a.port))
        assert status != 0 and "not permitted" in err, err
        assert "many" in bad_text
    finally:
        old.close()
        with open(p.agent_config, "w") as f:
            f.write(original)
        p.agent_proc.send_signal(signal.SIGHUP)
        wait_log(p, "reload: applied remote.allow", applied + 2)
        fwd.send_signal(signal.SIGTERM)
        finish(fwd)


# --------------------------------------------------------------------------- 1. broker kill


def test_broker_killed_mid_session_tunnel_keeps_flowing(plat, echo, procs):
    """kill -9 of the broker node while data flows: the tunnel does not notice (sha256
    match); the old session, closed while the broker is down, still gets its history row
    at once and its ``session.close`` published from the outbox once the node is back;
    the agent reconnects and a new session works within seconds."""
    p, op = plat
    a, _ = echo
    port = free_port()
    earlier = set(_running_sessions(p))  # the platform is shared: earlier tests' sessions
    fwd = procs.start(p.console_argv("forward", p.ident, "-L",
                                     "127.0.0.1:%d:127.0.0.1:%d" % (port, a.port)))
    wait_for(lambda: port_open("127.0.0.1", port, 0.2), what="forward listener")
    stream = Streamer(port)
    assert stream.flowing(1.0) > 0
    sid = wait_for(lambda: [s for s in _running_sessions(p) if s not in earlier],
                   what="the forward's session in the log")[-1]
    lost = read_text(p.agent_log).count("control link lost")
    p.node.kill()
    t_kill = time.monotonic()
    wait_log(p, "control link lost", lost + 1)
    moved = stream.flowing(2.0)
    assert moved > 256 * KIB, moved
    stream.finish()  # EOF both ways, every byte back, sha256 equal
    print("\nbroker down: %d bytes echoed in 2 s, %d bytes total, sha256 match"
          % (moved, stream.n_sent))
    # close the old session while the broker is still down
    fwd.send_signal(signal.SIGTERM)
    finish(fwd)
    row = wait_for(lambda: row_of(p, sid), what="the old session's history row")
    assert len(row) == 1 and int(row[0]["bytes_in"]) >= stream.n_sent, row
    # the node comes back: the agent reconnects, flushes its outbox, serves new sessions
    op.drain("close")
    p.node.start()
    t_up = time.monotonic()
    close = op.wait_up("close", lambda b: b["session_id"] == sid, timeout=30,
                       what="for the old session")
    assert close.body["code"] == row[0]["close_code"], (close.body, row)
    c = stdio(procs, p, "127.0.0.1:%d" % a.port)
    echo_once(c, timeout=30)
    t_new = time.monotonic() - t_up
    c.stdin.close()
    assert finish(c)[0] == 0
    print("broker down %.1f s; old close delivered and a new session echoed %.2f s after "
          "the node was back" % (t_up - t_kill, t_new))
    assert t_new < 20
    assert "restarting service" not in read_text(p.agent_log)


def _running_sessions(p: DemoPlatform) -> List[str]:
    out = []
    for line in read_text(p.agent_log).splitlines():
        if ": paired at relay " in line and "session " in line:
            out.append(line.split("session ", 1)[1].split(":", 1)[0])
    return out
