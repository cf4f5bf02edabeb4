"""Hostile input through the real broker: poison messages against a real agent process.

An operator account (any broker user allowed to publish on ``remote.down``, no trusted
key needed) publishes each poison message of issue 10 to the agent's command routing
keys while an already-open tunnel carries an echo round trip every ~50 ms. The same
agent process (same pid, no service restart in its log) must refuse each one, logged
exactly once, keep that tunnel flowing (no gap near a second, no byte lost) and serve a
new session right after. Real processes: broker (suite's private TLS node), relay,
agent, ``remote-gevent-console`` — as in tests/test_e2e.py, whose helpers are reused.
"""

from __future__ import annotations

import json
import os
import socket
import time

import gevent
import pytest
from amqp.exceptions import NotFound

import poison
from echo_server import EchoServer
from remote_gevent.wire import protocol
from remote_gevent.common.amqplink import AmqpLink
from remote_gevent.demo.rabbit import MAX_MESSAGE_SIZE
from test_e2e import (
    Procs,
    finish,
    free_port,
    make_platform,
    read_exactly,
    stdio,
    wait_for,
    wait_port,
)

pytestmark = pytest.mark.e2e

WAIT = 20.0
PING_EVERY = 0.05
MAX_GAP = 1.0  # s: the open tunnel may never go this long without a round trip
#: <topic>.cmd arguments of the agent versions before issue 10 (no byte cap).
OLD_CMD_QUEUE_ARGS = {"x-expires": 86400000, "x-message-ttl": 120000, "x-max-length": 100,
                      "x-overflow": "reject-publish"}


def read_log(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


@pytest.fixture
def hostile(rabbit, tmp_path):
    """Relay + agent processes whose <topic>.cmd an older agent version declared."""
    p = make_platform(rabbit, str(tmp_path / "platform"), start_agent=False)
    p.start()
    try:
        old = AmqpLink([p.broker_url], p.ident, p.token, ca_file=p.broker_ca_file)
        old.connect()
        try:
            old.declare_queue(p.topic + ".cmd", durable=True, arguments=OLD_CMD_QUEUE_ARGS)
        finally:
            old.close()
        p.start_agent()
        yield p
    finally:
        p.stop()


class Pinger:
    """Echo round trips through an open forward: every ~50 ms, 64 fresh bytes."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.done_at = [time.monotonic()]
        self.sent = self.echoed = 0
        self.error = None
        self.greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        try:
            while True:
                data = os.urandom(64)
                self.sock.sendall(data)
                self.sent += len(data)
                back = b""
                while len(back) < len(data):
                    chunk = self.sock.recv(len(data) - len(back))
                    if not chunk:
                        raise AssertionError("tunnel closed after %d bytes" % self.echoed)
                    back += chunk
                if back != data:
                    raise AssertionError("echo mismatch after %d bytes" % self.echoed)
                self.echoed += len(back)
                self.done_at.append(time.monotonic())
                gevent.sleep(PING_EVERY)
        except (OSError, AssertionError) as exc:
            self.error = exc

    def max_gap(self) -> float:
        points = self.done_at + [time.monotonic()]
        return max(b - a for a, b in zip(points, points[1:]))

    def stop(self) -> None:
        self.greenlet.kill()
        self.sock.close()


def poison_messages(topic: str):
    """(name, routing key, body, raw properties, text expected once in the agent log)."""
    session, close, status = topic + ".session", topic + ".close", topic + ".status"
    cases = []

    def add(name, key, body, props, expect=None):
        digest = protocol.request_digest(body)
        cases.append((name, key, body, props, expect or "[digest %s, %d bytes]"
                      % (digest, len(body))))

    def body(n):
        return json.dumps({"poison": n}).encode()

    add("bad UTF-8 correlation_id", session, body(1),
        poison.properties(correlation_id=b"\xff\xfe" + b"\x1b[31m"))
    add("headers nested 3000 deep", session, body(2),
        poison.properties(headers=poison.nested_table(3000)))
    add("headers nested 3000 deep (close)", close, body(3),
        poison.properties(headers=poison.nested_table(3000)))
    add("arrays nested 3000 deep (status)", status, body(4), poison.properties(
        headers=poison.table(poison.shortstr(b"a") + poison.nested_array(3000))))
    add("bad UTF-8 content_type", session, body(5), poison.properties(content_type=b"\xc3("))
    add("lone surrogate reply_to", session, body(6),
        poison.properties(reply_to=b"amq.gen-\xed\xa0\x80"))
    add("huge headers table", session, body(7), poison.properties(
        headers=poison.huge_table(2500, 24)))
    add("punycode encoding", session, body(8),
        poison.properties(content_encoding=b"punycode"))
    big = b"a" * (MAX_MESSAGE_SIZE - 1024)  # under the broker's cap, over the agent's
    add("punycode body of %d bytes" % len(big), session, big,
        poison.properties(content_encoding=b"punycode"),
        "too_large (%d bytes > %d)" % (len(big), protocol.MAX_MESSAGE_BYTES))
    big2 = b"{" + b" " * (64 * 1024) + b"}"
    add("oversized body", session, big2, poison.properties(),
        "too_large (%d bytes > %d)" % (len(big2), protocol.MAX_MESSAGE_BYTES))
    add("non-JSON", session, b"\x00\x01not json\r\nforged line", poison.properties())
    add("JSON nested 8000 deep", session, b"[" * 8000 + b"]" * 8000, poison.properties())
    add("JSON nested 2500 deep (status)", status, b"{\"a\":" * 2500 + b"1" + b"}" * 2500,
        poison.properties())
    return cases


def test_poison_messages_refused_once_same_agent_open_tunnel_never_stalls(hostile, caplog):
    p = hostile
    log_path = p.agent_log
    pid = p.agent_proc.pid
    # The durable <topic>.cmd an older version left is gone (issue 13: the agent now
    # consumes its per-connection <topic>.conn and deletes the legacy queue).
    admin = AmqpLink([p.broker_url], p.node.admin_user, p.node.admin_password,
                     ca_file=p.broker_ca_file, heartbeat=0, prefetch=0)
    admin.connect()
    try:
        with pytest.raises(NotFound):
            admin.channel.queue_declare(p.topic + ".cmd", passive=True)
        assert admin.channel.queue_declare(p.topic + ".conn", passive=True).consumer_count == 1
    finally:
        admin.close()
    echo = EchoServer()
    procs = Procs()
    pinger = None
    op = AmqpLink([p.broker_url], p.operator, p.operator_password, ca_file=p.broker_ca_file,
                  connect_timeout=5, reconnect_max_delay=1, first_retry=0.1)
    op_greenlet = gevent.spawn(op.run, lambda _link: None)
    try:
        port = free_port()
        forward = procs.start(p.console_argv(
            "forward", p.ident, "-L", "127.0.0.1:%d:127.0.0.1:%d" % (port, echo.port)))
        wait_port(port, forward)
        pinger = Pinger(port)
        wait_for(lambda: pinger.echoed >= 640, WAIT, what="the tunnel to echo")
        assert op.wait_connected(WAIT), op.last_error
        cases = poison_messages(p.topic)
        started = time.monotonic()
        for _name, key, body, props, _expect in cases:
            poison.publish_raw(op, "remote.down", key, body, props)
            gevent.sleep(0.05)
        # Over the broker's max_message_size: the broker closes the publisher's channel,
        # the agent never sees it.
        reconnects = op.reconnects
        poison.publish_raw(op, "remote.down", p.topic + ".session", b"a" * (1024 * 1024),
                           poison.properties(content_encoding=b"punycode"))
        wait_for(lambda: op.reconnects > reconnects and op.connected.is_set(), WAIT,
                 what="the broker to refuse a 1 MiB message")
        assert "larger than configured max size %d" % MAX_MESSAGE_SIZE in caplog.text
        for name, _key, _body, _props, expect in cases:
            wait_for(lambda text=expect: text in read_log(log_path), WAIT,
                     what="refusal of %s (%r) in the agent log" % (name, expect))
        refused_in = time.monotonic() - started

        # A new session, served by the same process.
        t0 = time.monotonic()
        proc = stdio(procs, p, "127.0.0.1:%d" % echo.port)
        proc.stdin.write(b"new session\n")
        proc.stdin.flush()
        assert read_exactly(proc.stdout, 12, WAIT) == b"new session\n"
        new_session = time.monotonic() - t0
        proc.stdin.close()
        finish(proc)
        gevent.sleep(0.3)  # a few more round trips after the attack
        assert pinger.error is None, pinger.error
        gap = pinger.max_gap()
        assert gap < MAX_GAP, "the open tunnel stalled %.2f s" % gap
        assert pinger.echoed == pinger.sent or pinger.sent - pinger.echoed == 64
    finally:
        if pinger is not None:
            pinger.stop()
        op.stop()
        op_greenlet.join(5.0)
        procs.close()
        echo.stop()

    assert p.agent_proc.poll() is None and p.agent_proc.pid == pid
    text = read_log(log_path)
    for bad in ("restarting service", "crashed", "Traceback", "link down"):
        assert bad not in text, "%r in the agent log:\n%s" % (bad, text[-3000:])
    for name, _key, _body, _props, expect in cases:
        assert text.count(expect) == 1, (name, expect, text[-3000:])
    assert text.count("refused ") >= len(cases)
    assert "\x1b" not in text and "forged line" not in text
    print("\n%d poison messages refused in %.2f s; new session in %.2f s; open tunnel: "
          "max gap %.3f s, %d bytes echoed" % (len(cases), refused_in, new_session, gap,
                                               pinger.echoed))
