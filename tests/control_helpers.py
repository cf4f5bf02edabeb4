"""The in-process agent and operator console of the control-plane tests (test_control,
test_sshcert_agent, test_fleet_revocation): an agent on a real config file and the
suite's TLS broker, and a console that signs requests and watches ``remote.up``."""

import contextlib
import json
import os
import socket
import sys
import time

import gevent
import gevent.lock
import nacl.signing
from gevent.event import AsyncResult
from gevent.queue import Queue

from remote_gevent.agent import config as config_mod
from remote_gevent.agent.runtime import Agent
from remote_gevent.crypto import authkeys
from remote_gevent.crypto import identity
from remote_gevent.crypto import tunnel_crypto as tc
from remote_gevent.wire import protocol

WAIT = 30.0  # bound for anything that should take milliseconds (broker round trips and TLS
#              take seconds on a loaded CI box)
CLI = [sys.executable, "-m", "remote_gevent.agent.cli"]


class OperatorKey(identity.IdentityKey):
    """An operator's key: the agent's own key type, plus its ``authorized_keys`` line."""

    def __init__(self):
        super().__init__(nacl.signing.SigningKey.generate())

    def line(self, options=""):
        return (options + " " if options else "") + authkeys.ssh_pubkey_line(self.public_bytes)


def closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def write_config(tmp_path, device, ops, health_check=600, url=None, relay=None):
    ak = tmp_path / "authorized_keys"
    ak.write_text("".join(line + "\n" for line in ops))
    os.chmod(str(ak), 0o600)
    path = tmp_path / "config.yaml"
    cfg = {
        "ident": device.ident, "token": device.token,
        "amqp": {"urls": [url or device.url], "ca_file": device.ca_file,
                 "connect_timeout": 5, "reconnect_max_delay": 2, "heartbeat": 10},
        "remote": {"enabled": True, "server_id": device.server_id,
                   "health_check": health_check, "key_path": str(tmp_path / "id_ed25519"),
                   "history_path": str(tmp_path / "history.csv"),
                   "authorized_keys": str(ak), "allow": ["127.0.0.1:22"],
                   "relays": {device.server_id: relay or "127.0.0.1:%d" % closed_port()},
                   # queued sessions must outlive the test's broker round trips
                   # (revocation, status, close), seconds on a loaded CI box
                   "queue_timeout": 30},
    }
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return str(path)


class Console:
    """Operator side: reply queue (by correlation id) and a watch queue on remote.up."""

    def __init__(self, link, topic, key, relay):
        self.link = link
        self.topic = topic
        self.key = key
        self.relay = relay
        self.reply_queue = None
        self.pending = {}
        self.up = {"alive": Queue(), "key": Queue(), "close": Queue()}
        self.greenlet = None

    def setup(self, link):
        self.reply_queue = link.declare_queue("", durable=False, exclusive=True,
                                              auto_delete=True)
        link.bind(self.reply_queue, "remote.reply", self.reply_queue)
        link.consume(self.reply_queue, self._on_reply, exclusive=True)
        watch = link.declare_queue("", durable=False, exclusive=True, auto_delete=True)
        for kind in self.up:
            link.bind(watch, "remote.up", "%s.%s" % (self.topic, kind))
        link.consume(watch, self._on_up, exclusive=True)

    def _on_reply(self, msg):
        self.link.ack(msg)
        waiter = self.pending.pop(msg.properties.get("correlation_id"), None)
        if waiter is not None:
            waiter.set(msg.body)

    def _on_up(self, msg):
        self.link.ack(msg)
        kind = msg.delivery_info["routing_key"].rsplit(".", 1)[1]
        self.up[kind].put((time.monotonic(), protocol.decode(msg.body)))

    def start(self):
        self.greenlet = gevent.spawn(self.link.run, self.setup)
        assert self.link.wait_connected(WAIT), self.link.last_error

    def stop(self):
        self.link.stop()
        self.greenlet.join(5.0)

    # -- requests
    def request(self, device, targets=("127.0.0.1:22",), key=None, **kw):
        epk, _ = tc.kx_keypair()
        sid, raw = protocol.make_session_request(
            key or self.key, kw.pop("ident", device.ident), kw.pop("server_id", device.server_id),
            epk, list(targets), kw.pop("relay", self.relay), protocol.new_ticket(), **kw)
        return sid, epk, raw

    def send(self, raw, cid, kind="session", reply_to=True, timeout=WAIT, **props):
        waiter = AsyncResult()
        if reply_to:
            self.pending[cid] = waiter
        self.link.publish("remote.down", "%s.%s" % (self.topic, kind), raw, correlation_id=cid,
                          reply_to=self.reply_queue if reply_to else None, expiration=60000,
                          delivery_mode=1, **props)
        if not reply_to:
            return None
        return protocol.decode(waiter.get(timeout=timeout))

    def next_up(self, kind, timeout=WAIT):
        return self.up[kind].get(timeout=timeout)


class Running:
    """An in-process Agent (real config file, real link) run in a greenlet."""

    def __init__(self, path):
        self.cfg = config_mod.load(path)
        self.agent = Agent(self.cfg, path)
        self.agent.stop_grace = 5.0
        self.greenlet = gevent.spawn(self.agent.run)

    @property
    def key(self):
        return self.agent.get_identity()

    def wait_ready(self):
        deadline = time.monotonic() + WAIT
        while getattr(self.agent, "control", None) is None or \
                not self.agent.control.link.connected.is_set():
            assert time.monotonic() < deadline, "agent did not connect"
            gevent.sleep(0.02)

    def stop(self):
        if not self.greenlet.dead:
            self.agent.request_stop()
            self.greenlet.join(15.0)
        assert self.greenlet.dead, "agent did not stop"
        return self.greenlet.value



@contextlib.contextmanager
def running_agent(rabbit, device, operator, path, key, hold_slot=False):
    """``(run, console)``: the agent of the config at ``path`` and a console signing with
    ``key``, both on the suite's broker, stopped at the end. ``hold_slot``: the agent's
    only session slot is taken, so an accepted request waits (queued, listed, revocable)
    for ``queue_timeout``."""
    cfg = config_mod.load(path)
    console = Console(rabbit.link(operator), device.topic, key,
                      cfg.remote.relays[device.server_id])
    console.start()
    try:
        run = Running(path)
        try:
            run.wait_ready()
            if hold_slot:
                run.agent.tunnels._sem = gevent.lock.BoundedSemaphore(1)
                run.agent.tunnels._sem.acquire()
            yield run, console
        finally:
            run.stop()
    finally:
        console.stop()


def next_close(console, sid):
    deadline = time.monotonic() + WAIT
    while True:
        _, close = console.next_up("close", timeout=max(0.1, deadline - time.monotonic()))
        if close.body["session_id"] == sid:
            return close
