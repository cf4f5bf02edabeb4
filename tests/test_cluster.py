"""Broker node loss on a real 3-node RabbitMQ cluster (TLS), started by the test (issue 13).

What must survive: the agent's control plane (it reconnects to a surviving node and
declares its per-connection queue there), the operator's console on a surviving node
(it never depends on a node it is not connected to: no status queue for a session, a
temporary one for `devices` when its durable one's node is down), and the migration
from the durable ``<topic>.cmd`` of older versions when that queue's node is down.
A new session (tunnel + echoed bytes) must succeed within 30 s of a node's death; no
traceback anywhere; the agent does not loop reconnecting.
"""

from __future__ import annotations

import json
import logging
import os
import time

import gevent
import pytest
from gevent.server import StreamServer

from remote_gevent.agent import config as config_mod
from remote_gevent.agent.runtime import Agent
from remote_gevent.common.amqplink import AmqpLink
from remote_gevent.console import config as cconfig
from remote_gevent.console.config import ConsoleError
from remote_gevent.console.control import ConsoleControl
from remote_gevent.console.device_states import device_status
from remote_gevent.console.known_devices import KnownDevices
from remote_gevent.console.session import open_session
from remote_gevent.crypto import identity
from remote_gevent.demo import rabbit as demo_rabbit
from remote_gevent.demo.rabbit_cluster import RabbitCluster
from echo_server import echo
from relay_helpers import start_relay

pytestmark = [pytest.mark.slow, pytest.mark.broker]

VHOST = "rg/cluster"
SID = "fr04"
RECOVERY_LIMIT = 30.0
#: <topic>.cmd as the versions before issue 13 declared it (durable, on one node).
LEGACY_ARGS = {"x-expires": 86400000, "x-message-ttl": 120000, "x-max-length": 100,
               "x-max-length-bytes": 1638400, "x-overflow": "reject-publish"}


@pytest.fixture
def cluster(tmp_path, pki):
    if not demo_rabbit.available():
        pytest.skip("RabbitMQ is not installed")
    ca, broker = pki
    c = RabbitCluster(str(tmp_path / "cluster"), 3, ca.cert_file, broker.cert_file,
                      broker.key_file)
    c.start()
    try:
        yield c
    finally:
        c.stop()


def echo_once(session, target: str) -> bytes:
    stream = session.open_stream(target)
    payload = os.urandom(50000)
    gevent.spawn(lambda: (stream.send(payload), stream.shutdown_write()))
    got = b""
    while True:
        chunk = stream.recv()
        if not chunk:
            return got if got == payload else b"mismatch"
        got += chunk


def test_node_loss_agent_node_and_legacy_queue_node(tmp_path, pki, cluster, caplog):
    caplog.set_level(logging.INFO)
    ca, _ = pki
    n1, n2, n3 = cluster.nodes
    n1.declare_platform(VHOST)
    ident, token, user, password = "clu-dev", "tok-" + os.urandom(8).hex(), "clu-op", \
        "pw-" + os.urandom(8).hex()
    n1.add_device(VHOST, ident, token, SID)
    n1.add_operator(VHOST, user, password)
    topic = "remote.%s.%s" % (SID, ident)

    relay_cert = ca.issue("cluster-relay", ["127.0.0.1"])
    relay = start_relay(relay_cert)
    echo_server = StreamServer(("127.0.0.1", 0), echo)
    echo_server.start()
    target = "127.0.0.1:%d" % echo_server.address[1]
    relay_addr = "127.0.0.1:%d" % relay.address[1]

    op = identity.IdentityKey.generate()
    op_key = str(tmp_path / "op_ed25519")
    identity.write(op, op_key)
    ak = tmp_path / "authorized_keys"
    ak.write_text(op.public_line("op") + "\n")
    os.chmod(str(ak), 0o600)
    agent_path = str(tmp_path / "agent.yaml")
    with open(agent_path, "w") as fh:
        json.dump({
            "ident": ident, "token": token,
            "amqp": {"urls": [n1.amqps_url(VHOST), n3.amqps_url(VHOST)],
                     "ca_file": ca.cert_file, "connect_timeout": 5,
                     "reconnect_max_delay": 10},
            "remote": {"enabled": True, "server_id": SID, "health_check": 600,
                       "key_path": str(tmp_path / "dev_ed25519"),
                       "history_path": str(tmp_path / "history.csv"),
                       "authorized_keys": str(ak), "allow": ["127.0.0.1:*"],
                       "relays": {SID: relay_addr}, "queue_timeout": 5}}, fh)

    def console_cfg(node):
        path = str(tmp_path / ("console-%d.yaml" % node.amqps_port))
        with open(path, "w") as fh:
            json.dump({"user": user, "password": password,
                       "amqp": {"urls": [node.amqps_url(VHOST)], "ca_file": ca.cert_file,
                                "connect_timeout": 5},
                       "operator_key": op_key, "relay": relay_addr, "reply_timeout": 5,
                       "known_devices": str(tmp_path / "known_devices"),
                       "state_file": str(tmp_path / "state.json")}, fh)
        return cconfig.load(path)

    # What an older version left on node 2: the device's durable command queue (bound,
    # so it would take requests) and the operator's durable status queue.
    old = AmqpLink([n2.amqps_url(VHOST)], ident, token, ca_file=ca.cert_file)
    old.connect()
    old.declare_queue(topic + ".cmd", durable=True, arguments=LEGACY_ARGS)
    old.bind(topic + ".cmd", "remote.down", topic + ".session")
    old.close()
    with ConsoleControl(console_cfg(n2), consume_status=True):
        pass
    n2.kill()

    agent_cfg = config_mod.load(agent_path)
    agent = Agent(agent_cfg, agent_path)
    agent.stop_grace = 3.0
    greenlet = gevent.spawn(agent.run)
    cfg = console_cfg(n3)  # the operator's console, on a node that survives throughout
    try:
        deadline = time.monotonic() + 30
        while getattr(agent, "control", None) is None \
                or not agent.control.link.connected.is_set():
            assert time.monotonic() < deadline, "agent did not come up with node 2 down"
            gevent.sleep(0.1)
        assert agent.control.link.url.port == n1.amqps_port
        # Whatever the broker answers the delete of a queue whose home node is down
        # (NOT_FOUND, logged "not deleted" — or, when the survivors have not marked the
        # node down yet, an OK), the agent came up at its first connection: no loop.
        gevent.sleep(2.0)
        assert agent.control.counters["connects"] == 1
        # Its key announcement went to the status queue on n2 (down): pinned by hand.
        KnownDevices(cfg.known_devices).pin(SID, ident, agent.get_identity().public_bytes)

        # `devices` on n3 while the status queue's home node (n2) is down: it works,
        # learns the key, and the broker says the device is connected.
        with ConsoleControl(cfg, consume_status=True) as control:
            control.sync_status()
            assert control.status_queue.startswith("amq.gen-")  # n2's is unreachable
            entry = control.states.devices["%s/%s" % (SID, ident)]
            assert entry.get("presence") == "connected"
            assert device_status(entry) == "online"
        session = open_session(cfg, ident, [target])
        assert echo_once(session, target) != b"mismatch"
        session.close()

        # Kill the node the agent is connected to (its per-connection queue lived there).
        connects_before = agent.control.counters["connects"]
        n1.kill()
        killed_at = time.monotonic()
        failures = []
        recovered = None
        while time.monotonic() - killed_at < RECOVERY_LIMIT + 5:
            try:
                session = open_session(cfg, ident, [target])
            except ConsoleError as exc:
                failures.append((round(time.monotonic() - killed_at, 1), exc.code))
                gevent.sleep(0.5)
                continue
            assert echo_once(session, target) != b"mismatch"
            session.close()
            recovered = time.monotonic() - killed_at
            break
        print("node loss: session again after %.1f s; failures meanwhile: %s"
              % (recovered or -1, failures))
        assert recovered is not None and recovered < RECOVERY_LIMIT, failures
        # The console's own link (on n3) never failed; while the agent was away the
        # requests failed fast ("not connected"), not with a broker error.
        assert all(code in ("not_connected", "no_reply") for _, code in failures), failures
        assert agent.control.link.url.port == n3.amqps_port
        assert agent.control.counters["connects"] - connects_before <= 2  # no loop
    finally:
        agent.request_stop()
        greenlet.join(15.0)
        relay.stop(grace=1.0)
        echo_server.stop()
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
