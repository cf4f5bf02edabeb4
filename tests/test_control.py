"""The agent's control plane end to end: a real in-process Agent on the private TLS broker,
an in-test operator (own broker login, nacl key) publishing requests and listening on an
exclusive reply queue and on ``remote.up``. Bounded waits everywhere, loopback only."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import statistics
import subprocess
import time

import gevent
import gevent.lock
import pytest
from gevent.queue import Empty

from remote_gevent.agent import runtime as agent_mod
from remote_gevent.crypto import authkeys
from remote_gevent.agent import daemon
from remote_gevent.agent import history
from remote_gevent.crypto import identity
from remote_gevent.common import memory
from remote_gevent.wire import protocol
from remote_gevent.agent import config as config_mod
from remote_gevent.wire.codes import Reason

from tests.control_helpers import (CLI, WAIT, Console, OperatorKey, Running, next_close,
                                   running_agent, write_config)

@pytest.fixture
def op_key():
    return OperatorKey()


@pytest.fixture
def platform(rabbit, device, operator, op_key, tmp_path):
    """(agent, console) wired together; stopped at the end."""
    limited = OperatorKey()
    path = write_config(tmp_path, device,
                        [op_key.line(), limited.line('permitopen="127.0.0.1:2222"')])
    with running_agent(rabbit, device, operator, path, op_key) as (run, console):
        yield run, console, device


@pytest.fixture
def releases(monkeypatch):
    """Calls of memory.release (start-up delay shortened); requested before ``platform``."""
    calls = []
    monkeypatch.setattr(agent_mod, "RELEASE_MEMORY_DELAY", 0.05)
    monkeypatch.setattr(memory, "release", lambda: calls.append(time.monotonic()) or True)
    return calls


def expect_accept(console, device, run, key=None):
    sid, epk, raw = console.request(device)
    reply = console.send(raw, sid)
    assert reply.type == protocol.MsgType.SESSION_ACCEPT, reply
    accepted = protocol.verify_session_accept(reply, (key or run.key).public_bytes, sid, epk)
    assert accepted.session_id == sid
    return sid


def expect_refuse(console, raw, cid, code, **props):
    reply = console.send(raw, cid, **props)
    assert reply.type == protocol.MsgType.SESSION_REFUSE, reply
    assert reply.body["code"] == code, reply.body
    assert reply.body["session_id"] == cid
    return reply


# ----------------------------------------------------------------------------- sessions
def test_valid_request_accepted_signed_by_device_key(platform):
    run, console, device = platform
    sid = expect_accept(console, device, run)
    # No relay listens on the configured port: the session ends relay_refused, with a
    # signed session.close on remote.up and one history row.
    _, close = console.next_up("close")
    assert protocol.verify(close, run.key.public_bytes)
    assert close.body["session_id"] == sid and close.body["code"] == "relay_refused"
    rows = history.read(run.cfg.remote.history_path)
    assert [r["session_id"] for r in rows] == [sid]


def test_each_bad_message_refused_while_agent_keeps_serving(platform, caplog):
    run, console, device = platform
    key = console.key
    caplog.set_level(logging.INFO, logger="remote_gevent.agent.control")

    def sid_raw(**kw):
        sid, _, raw = console.request(device, **kw)
        return sid, raw

    cases = []
    cid = protocol.new_session_id()
    cases.append(("malformed JSON", b'{"v": 1, "type": "session.req', cid, Reason.MALFORMED))
    cid = protocol.new_session_id()
    cases.append(("binary", os.urandom(300), cid, Reason.MALFORMED))
    sid, raw = sid_raw()
    env = json.loads(raw)
    del env["sig"], env["signer"]
    cases.append(("unsigned", json.dumps(env).encode(), sid, Reason.MALFORMED))
    sid, raw = sid_raw()
    env = json.loads(raw)
    env["body"]["targets"] = ["127.0.0.1:22", "127.0.0.1:22"]  # still schema-valid
    cases.append(("bad signature", json.dumps(env).encode(), sid, Reason.BAD_SIGNATURE))
    sid, raw = sid_raw(key=OperatorKey())
    cases.append(("unknown operator", raw, sid, Reason.UNKNOWN_OPERATOR))
    sid, raw = sid_raw(now=time.time() - 1000)
    cases.append(("expired", raw, sid, Reason.EXPIRED))
    sid, raw = sid_raw(ident="someone-else")
    cases.append(("wrong device", raw, sid, Reason.WRONG_DEVICE))
    sid, raw = sid_raw(server_id="xx01")
    cases.append(("wrong server", raw, sid, Reason.WRONG_DEVICE))
    sid, raw = sid_raw(targets=["10.0.0.1:22"])
    cases.append(("target not permitted", raw, sid, Reason.TARGET_NOT_PERMITTED))
    cid = protocol.new_session_id()
    big = json.dumps({"v": 1, "type": "session.request",
                      "body": {"session_id": cid, "pad": "x" * (17 * 1024)}}).encode()
    cases.append(("oversized", big, cid, Reason.TOO_LARGE))

    for name, raw, cid, code in cases:
        reply = expect_refuse(console, raw, cid, code)
        assert protocol.verify(reply, run.key.public_bytes), name
        assert "refused session %s: %s" % (cid, code) in caplog.text, name
        assert raw.decode("latin-1")[:40] not in caplog.text or name == "binary"

    # replayed: the same valid request twice
    sid, _, raw = console.request(device)
    assert console.send(raw, sid).type == protocol.MsgType.SESSION_ACCEPT
    expect_refuse(console, raw, sid, Reason.REPLAYED)

    # no reply_to: nowhere to answer; refused, logged, the consumer goes on
    sid, _, raw = console.request(device)
    console.send(raw, sid, reply_to=False)
    # a body in an odd content_encoding, a close by a stranger, a close for no session
    console.send(b"\xff\xfe", protocol.new_session_id(), reply_to=False,
                 content_encoding="no-such-codec")
    stranger_close = protocol.make_session_close(OperatorKey(), protocol.new_session_id(),
                                                 "closed_by_operator")
    console.send(stranger_close, "x", kind="close", reply_to=False)
    console.send(protocol.make_session_close(key, protocol.new_session_id(),
                                             "closed_by_operator"), "y", kind="close",
                 reply_to=False)

    # ... and after all of them a valid request is still served
    expect_accept(console, device, run)
    counters = run.agent.control.counters
    assert counters["errors"] == 0
    assert counters["refused:malformed"] >= 4 and counters["refused:unknown_operator"] >= 2
    assert counters["closes"] == 1
    assert "no such session" in caplog.text
    assert run.agent.supervisor.services["control"].restarts == 0
    assert device.token not in caplog.text


def test_operator_close_ends_a_waiting_session(platform):
    run, console, device = platform
    # Fill the slots so the next request waits, then close it as its operator.
    run.agent.tunnels._sem = gevent.lock.BoundedSemaphore(1)
    run.agent.tunnels._sem.acquire()
    sid, _, raw = console.request(device)
    reply = console.send(raw, sid)
    assert reply.type == protocol.MsgType.SESSION_QUEUED
    console.send(protocol.make_session_close(console.key, sid, "closed_by_operator"), sid,
                 kind="close", reply_to=False)
    deadline = time.monotonic() + WAIT
    while True:
        _, close = console.next_up("close")
        if close.body["session_id"] == sid:
            break
        assert time.monotonic() < deadline
    assert close.body["code"] == "closed_by_operator"


def test_status_request(platform):
    run, console, device = platform
    rid, raw = protocol.make_status_request(console.key, device.ident, device.server_id)
    reply = console.send(raw, rid, kind="status")
    body = protocol.verify_status(reply, run.key.public_bytes, rid)
    assert body["ident"] == device.ident and body["max_session"] == run.cfg.remote.max_session
    assert body["sessions_total"] == len(body["sessions"])
    # replayed, and from an unknown operator: refused with the request id
    expect_refuse(console, raw, rid, Reason.REPLAYED, kind="status")
    rid2, raw2 = protocol.make_status_request(OperatorKey(), device.ident, device.server_id)
    expect_refuse(console, raw2, rid2, Reason.UNKNOWN_OPERATOR, kind="status")


# ----------------------------------------------------------------------------- heartbeat, key
def test_started_alive_and_key_published_on_start(platform):
    run, console, device = platform
    _, key_msg = console.next_up("key")
    ann = protocol.verify_key_announcement(key_msg)
    assert ann.previous is None and ann.ident == device.ident
    out = subprocess.run(CLI + ["--config", run.agent.config_path, "pubkey", "--fingerprint"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert ann.fingerprint == out.stdout.strip() == run.key.fingerprint
    _, alive = console.next_up("alive")
    assert protocol.verify(alive, run.key.public_bytes)
    assert alive.body["event"] == "started" and alive.body["seq"] == 1


def test_startup_memory_released_once_ready(releases, platform):
    """gc + malloc_trim run once the control plane is up, and only once."""
    run, _, _ = platform  # connected already
    deadline = time.monotonic() + WAIT
    while not releases:
        assert time.monotonic() < deadline, "start-up memory never released"
        gevent.sleep(0.02)
    assert run.agent.control.link.connected.is_set()
    gevent.sleep(0.3)
    assert len(releases) == 1


def test_heartbeat_cadence_and_content(rabbit, device, operator, op_key, tmp_path):
    path = write_config(tmp_path, device, [op_key.line()], health_check=1)
    console = Console(rabbit.link(operator), device.topic, op_key, "x:1")
    console.start()
    run = Running(path)
    try:
        run.wait_ready()
        t0, first = console.next_up("alive")
        assert first.body["event"] == "started"
        got = []
        # three periodic alives, 1 s apart by the agent's own clock (``ts``, whole
        # seconds): the broker's delivery on a loaded machine may lag, so wait for them
        # (bounded) rather than for 3.5 s of arrivals
        while len([m for _, m in got if m.body["event"] == "periodic"]) < 3 \
                and time.monotonic() - t0 < 20:
            try:
                got.append(console.next_up("alive", timeout=0.2))
            except Empty:
                pass
        periodic = [m for _, m in got if m.body["event"] == "periodic"]
        assert len(periodic) >= 3, [m.body for _, m in got]
        assert periodic[2].body["ts"] - first.body["ts"] <= 4, [m.body for _, m in got]
        seqs = [first.body["seq"]] + [m.body["seq"] for _, m in got]
        assert seqs == list(range(1, len(seqs) + 1))
        b = periodic[-1].body
        assert protocol.verify(periodic[-1], run.key.public_bytes)
        assert (b["ident"], b["server_id"], b["max_session"], b["fingerprint"]) == (
            device.ident, device.server_id, run.cfg.remote.max_session, run.key.fingerprint)
        assert b["version"] == run.agent.version and b["sessions_active"] == 0
        assert b["sessions_waiting"] == 0 and 1.0 < b["uptime"] < 30
        assert abs(b["ts"] - time.time()) < 5
        gaps = [t2 - t1 for (t1, _), (t2, _) in zip(got, got[1:])]
        print("\nalive gaps: %s" % ", ".join("%.2f" % g for g in gaps))
    finally:
        assert run.stop() == 0
        # stopping alive sent before the link went away
        # (waited for, bounded: the broker's delivery on a loaded box may take seconds)
        events = []
        deadline = time.monotonic() + WAIT
        while "stopping" not in events:
            try:
                events.append(console.next_up("alive", timeout=0.2)[1].body["event"])
            except Empty:
                assert time.monotonic() < deadline, events
        try:  # and nothing after it
            while True:
                events.append(console.next_up("alive", timeout=1.0)[1].body["event"])
        except Empty:
            pass
        assert events[-1:] == ["stopping"], events
        console.stop()


def test_key_rotation_via_cli_signal(platform, tmp_path):
    run, console, device = platform
    _, first = console.next_up("key")
    old_raw = protocol.verify_key_announcement(first).public_raw32
    console.next_up("alive")  # started
    pidfile = str(tmp_path / "agent.pid")
    daemon.write_pidfile(pidfile)  # the in-process agent is this pid
    # rotate-key refuses to signal itself; run it from a child that sees another pid
    out = subprocess.run(CLI + ["--pidfile", pidfile, "rotate-key"], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    _, rot = console.next_up("key")
    new_raw = protocol.verify_key_rotation(rot, old_raw)
    assert new_raw != old_raw and new_raw == run.key.public_bytes
    _, alive = console.next_up("alive")
    assert alive.body["event"] == "key_rotated"
    assert alive.body["fingerprint"] == authkeys.fingerprint_of(new_raw)
    # new sessions are signed by the new key
    expect_accept(console, device, run, key=run.key)
    # a second rotation (in-process API) chains from the new key
    old, new = run.agent.rotate_key()
    _, rot2 = console.next_up("key")
    assert protocol.verify_key_rotation(rot2, new_raw) == new.public_bytes
    os.unlink(pidfile)


def test_sigusr1_rotation_in_process(platform):
    run, console, device = platform
    _, first = console.next_up("key")
    old_raw = protocol.verify_key_announcement(first).public_raw32
    os.kill(os.getpid(), signal.SIGUSR1)
    _, rot = console.next_up("key")
    assert protocol.verify_key_rotation(rot, old_raw) == run.key.public_bytes


# ----------------------------------------------------------------------------- broker restart
def test_broker_restart_agent_reconnects_and_serves(own_rabbit, pki, tmp_path, op_key):
    ca, _ = pki
    node = own_rabbit
    vhost = "rg-ctl-restart"
    node.declare_platform(vhost)
    node.add_device(vhost, "restart-dev", "restart-token")
    node.add_operator(vhost, "restart-op", "restart-pw")
    url = node.amqps_url(vhost)

    class Dev:
        ident, token, server_id = "restart-dev", "restart-token", "fr04"
        topic = "remote.fr04.restart-dev"
        ca_file = ca.cert_file

    Dev.url = url
    path = write_config(tmp_path, Dev, [op_key.line()])
    from remote_gevent.common.amqplink import AmqpLink

    op_link = AmqpLink([url], "restart-op", "restart-pw", ca_file=ca.cert_file,
                       connect_timeout=3.0, reconnect_max_delay=2.0)
    console = Console(op_link, Dev.topic, op_key,
                      config_mod.load(path).remote.relays["fr04"])
    console.start()
    run = Running(path)
    try:
        run.wait_ready()
        expect_accept(console, Dev, run)
        node.restart()
        t_up = time.monotonic()
        link = run.agent.control.link
        deadline = time.monotonic() + 20
        while not (link.connected.is_set() and link.reconnects >= 1):
            assert time.monotonic() < deadline, link.last_error
            gevent.sleep(0.05)
        assert op_link.wait_connected(20.0)
        deadline = time.monotonic() + 20
        while console.reply_queue is None or not op_link.connected.is_set():
            assert time.monotonic() < deadline
            gevent.sleep(0.05)
        expect_accept(console, Dev, run)
        print("\nagent reconnected and accepted a new request %.2f s after the node "
              "was back" % (time.monotonic() - t_up))
        assert run.agent.supervisor.services["control"].restarts == 0
    finally:
        run.stop()
        console.stop()


# ----------------------------------------------------------------------------- latency
def test_request_reply_round_trip_time(platform):
    run, console, device = platform
    # A latency figure, not the fairness limits (tested on their own): lift them.
    cfg = run.agent.cfg
    run.agent.tunnels.apply_config(dataclasses.replace(cfg, remote=dataclasses.replace(
        cfg.remote, operator_rate=0, max_session_per_operator=1000)))
    refusals, accepts = [], []
    for _n in range(200):
        sid, _, raw = console.request(device, targets=["10.9.9.9:22"])
        t0 = time.perf_counter()
        reply = console.send(raw, sid)
        refusals.append(time.perf_counter() - t0)
        assert reply.body["code"] == Reason.TARGET_NOT_PERMITTED
    for _n in range(50):
        sid, _, raw = console.request(device)
        t0 = time.perf_counter()
        reply = console.send(raw, sid)
        accepts.append(time.perf_counter() - t0)
        assert reply.type == protocol.MsgType.SESSION_ACCEPT
    print("\nsession.request -> reply through RabbitMQ over TLS (agent checks + signs): "
          "refuse median %.2f ms (200), accept median %.2f ms (50)"
          % (statistics.median(refusals) * 1000, statistics.median(accepts) * 1000))


# ----------------------------------------------------------------------------- issue 10
@pytest.fixture
def three_operators(rabbit, device, operator, op_key, tmp_path):
    """Agent trusting operator A (op_key), operator B and an admin key; one session slot
    taken, so every accepted request waits (and stays listed) for queue_timeout."""
    b_key, admin_key = OperatorKey(), OperatorKey()
    path = write_config(tmp_path, device, [op_key.line(), b_key.line(),
                                           admin_key.line("remote-gevent-admin")])
    with running_agent(rabbit, device, operator, path, op_key, hold_slot=True) \
            as (run, console):
        yield run, console, device, b_key, admin_key


def _queued(console, device, key=None):
    sid, _, raw = console.request(device, key=key)
    reply = console.send(raw, sid)
    assert reply.type == protocol.MsgType.SESSION_QUEUED, reply
    return sid


def _status_ids(console, device, run, key):
    rid, raw = protocol.make_status_request(key, device.ident, device.server_id)
    body = protocol.verify_status(console.send(raw, rid, kind="status"),
                                  run.key.public_bytes, rid)
    return {s["session_id"] for s in body["sessions"]}


def test_status_and_close_only_for_the_sessions_owner(three_operators, caplog):
    run, console, device, b_key, admin_key = three_operators
    caplog.set_level(logging.INFO, logger="remote_gevent.agent.control")
    a_sid = _queued(console, device)
    b_sid = _queued(console, device, key=b_key)
    assert _status_ids(console, device, run, console.key) == {a_sid}
    assert _status_ids(console, device, run, b_key) == {b_sid}
    assert _status_ids(console, device, run, admin_key) == {a_sid, b_sid}
    # B cannot close A's session: refused, logged once, A's session goes on.
    console.send(protocol.make_session_close(b_key, a_sid, "closed_by_operator"), a_sid,
                 kind="close", reply_to=False)
    deadline = time.monotonic() + WAIT
    while "not_session_owner" not in caplog.text:
        assert time.monotonic() < deadline, caplog.text[-2000:]
        gevent.sleep(0.05)
    assert caplog.text.count("not_session_owner") == 1
    assert run.agent.tunnels.operator_of(a_sid) == console.key.fingerprint
    # The admin key may close it.
    console.send(protocol.make_session_close(admin_key, a_sid, "closed_by_operator"), a_sid,
                 kind="close", reply_to=False)
    assert next_close(console, a_sid).body["code"] == "closed_by_operator"
    assert _status_ids(console, device, run, admin_key) == {b_sid}


def test_sighup_revokes_a_removed_operators_sessions(three_operators, tmp_path):
    run, console, device, b_key, admin_key = three_operators
    a_sid = _queued(console, device)
    b_sid = _queued(console, device, key=b_key)
    ak = tmp_path / "authorized_keys"
    # Same size on purpose (the stamp still differs, and SIGHUP forces a re-read anyway).
    ak.write_text(b_key.line() + "\n" + admin_key.line("remote-gevent-admin") + "\n")
    os.chmod(str(ak), 0o600)
    os.kill(os.getpid(), signal.SIGHUP)
    close = next_close(console, a_sid)
    assert close.body["code"] == "revoked"
    protocol.verify(close, run.key.public_bytes)
    rows = [r for r in history.read(run.cfg.remote.history_path) if r["session_id"] == a_sid]
    assert [r["close_code"] for r in rows] == ["revoked"]
    assert run.agent.tunnels.operator_of(b_sid) == b_key.fingerprint  # B untouched
    sid, _, raw = console.request(device)
    expect_refuse(console, raw, sid, Reason.UNKNOWN_OPERATOR)


def test_unsafe_authorized_keys_mode_trusts_nobody_logged_once(three_operators, tmp_path,
                                                               caplog):
    run, console, device, b_key, admin_key = three_operators
    caplog.set_level(logging.INFO, logger="remote_gevent.agent.control")
    a_sid = _queued(console, device)
    ak = tmp_path / "authorized_keys"
    os.chmod(str(ak), 0o620)  # content unchanged
    for _ in range(3):
        sid, _, raw = console.request(device)
        expect_refuse(console, raw, sid, Reason.UNKNOWN_OPERATOR)
    assert caplog.text.count("refusing a group- or world-writable file") == 1
    assert next_close(console, a_sid).body["code"] == "revoked"
    os.chmod(str(ak), 0o600)
    _queued(console, device)  # trusted again once fixed


def test_operator_limit_and_rate_refused_with_their_codes(three_operators):
    run, console, device, b_key, admin_key = three_operators
    share = run.cfg.remote.max_session // 2  # three operators trusted: half of max_session
    for _ in range(share):
        _queued(console, device)
    sid, _, raw = console.request(device)
    reply = expect_refuse(console, raw, sid, Reason.OPERATOR_LIMIT)
    assert "max_session_per_operator" in reply.body["reason"]
    rows = [r for r in history.read(run.cfg.remote.history_path) if r["session_id"] == sid]
    assert [r["close_code"] for r in rows] == ["refused"]
    _queued(console, device, key=b_key)  # B is not held out by A
    for _ in range(40):  # burst 30 of 60/min: the rest is refused operator_rate_limited
        sid, _, raw = console.request(device, key=admin_key)
        reply = console.send(raw, sid)
        if reply.type == protocol.MsgType.SESSION_REFUSE \
                and reply.body["code"] == Reason.OPERATOR_RATE:
            break
    else:
        raise AssertionError("no operator_rate_limited refusal in 40 requests")


# ----------------------------------------------------------------------------- real processes
def _echo_through(port, payload=b"ping\n", timeout=WAIT):
    """One connection to the console's forward: a stream of the session, echoed back."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = s.recv(len(payload) - len(got))
            if not chunk:
                break
            got += chunk
        return got


def test_real_agent_owner_only_and_sighup_revocation(rabbit, tmp_path):
    """Agent, relay and consoles as real processes on the real broker: operator B can
    neither list nor close A's session; A removed from authorized_keys + SIGHUP ends A's
    open session at once (history ``revoked``) and its next stream gets nowhere."""
    import yaml
    from echo_server import EchoServer
    from test_e2e import Procs, finish, free_port, make_platform, wait_row

    procs = Procs()
    echo = EchoServer()
    p = make_platform(rabbit, str(tmp_path / "plat"))
    p.prepare()
    b_key_path = str(tmp_path / "plat" / "operator_b_ed25519")
    b_key = identity.load_or_create(b_key_path)
    with open(p.authorized_keys) as fh:
        a_line = fh.read().strip()
    b_line = b_key.public_line("b@test")
    with open(p.authorized_keys, "w") as fh:
        fh.write(a_line + "\n" + b_line + "\n")
    p.start()
    try:
        b_config = str(tmp_path / "plat" / "console_b.yaml")
        with open(p.console_config) as fh:
            data = yaml.safe_load(fh)
        data["operator_key"] = b_key_path
        with open(b_config, "w") as fh:
            yaml.safe_dump(data, fh)
        os.chmod(b_config, 0o600)

        def console_b(*args):
            argv = p.console_argv(*args)
            argv[argv.index(p.console_config)] = b_config
            return subprocess.run(argv, capture_output=True, text=True, timeout=60,
                                  stdin=subprocess.DEVNULL)

        lport = free_port()
        fwd = procs.start(p.console_argv("forward", p.ident, "-L",
                                         "%d:127.0.0.1:%d" % (lport, echo.port)))
        deadline = time.monotonic() + 30
        while True:
            try:
                if _echo_through(lport) == b"ping\n":
                    break
            except OSError:
                pass
            assert fwd.poll() is None, finish(fwd)
            assert time.monotonic() < deadline, "forward never carried a stream"
            time.sleep(0.2)

        mine = subprocess.run(p.console_argv("sessions", p.ident, "--json"),
                              capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
        assert mine.returncode == 0, mine.stderr
        (a_session,) = json.loads(mine.stdout)["sessions"]
        a_sid = a_session["session_id"]
        theirs = console_b("sessions", p.ident, "--json")
        assert theirs.returncode == 0, theirs.stderr
        assert json.loads(theirs.stdout)["sessions"] == [], theirs.stdout
        assert a_sid not in theirs.stdout

        closed = console_b("close", p.ident, a_sid)  # B's console: not among B's sessions
        assert closed.returncode == 1, closed.stderr
        assert "no session %s on %s that you may close" % (a_sid, p.ident) in closed.stderr
        # The agent's own check, for a console that sends B's signed close anyway:
        from remote_gevent.console import config as console_config
        from remote_gevent.console.control import ConsoleControl

        with ConsoleControl(console_config.load(b_config)) as control:
            control.close_session(p.ident, a_sid)
        deadline = time.monotonic() + WAIT
        while "not_session_owner" not in _read(p.agent_log):
            assert time.monotonic() < deadline, _read(p.agent_log)[-3000:]
            time.sleep(0.1)
        assert _read(p.agent_log).count("not_session_owner") == 1
        assert _echo_through(lport, b"still mine\n") == b"still mine\n"  # A's session lives

        with open(p.authorized_keys, "w") as fh:
            fh.write(b_line + "\n")
        t0 = time.monotonic()
        p.agent_proc.send_signal(signal.SIGHUP)
        row = wait_row(p, lambda r: r["session_id"] == a_sid, timeout=WAIT,
                       what="the revoked session's row")
        revoked_s = time.monotonic() - t0
        print("\nrevocation: SIGHUP -> history row %.2f s" % revoked_s)
        assert row["close_code"] == "revoked", row
        assert revoked_s < 15, revoked_s  # at once (not at a later check), on a loaded box
        # The next stream gets nowhere: no echo through the (now closed) session.
        try:
            got = _echo_through(lport, b"after\n", timeout=5)
        except OSError:
            got = b""
        assert got != b"after\n"
        assert p.agent_proc.poll() is None
    finally:
        procs.close()
        p.stop()
        echo.stop()


def _read(path):
    try:
        with open(path, errors="replace") as fh:
            return fh.read()
    except FileNotFoundError:
        return ""
