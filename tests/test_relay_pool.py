"""A pool of relays for one server id (issue 13): the agent accepts any relay its
``remote.relays`` list admits, as named in the signed request, and no other.

The relays sit behind Debian's haproxy (started by the test), which publishes each
relay on an address of its own (``send-proxy-v2``; the relays run with
``proxy_protocol``): consoles configured with different relays of the pool all reach
the same device, 50 of 50 sessions pair and carry data. A request naming a relay the
device does not list is refused (``relay_refused``). A console configured with the whole
pool, and a relay's death: tests/test_relay_pool_failover.py.
"""

from __future__ import annotations

import json
import os
import time

import gevent
import pytest
from gevent.server import StreamServer

from remote_gevent.agent import config as config_mod
from remote_gevent.agent.relay_accept import RelayNotAdmitted, admit_relay
from remote_gevent.agent.runtime import Agent
from remote_gevent.common.configschema import ConfigError
from remote_gevent.console import config as cconfig
from remote_gevent.console.config import ConsoleError
from remote_gevent.console.control import ConsoleControl
from remote_gevent.console.known_devices import KnownDevices
from remote_gevent.console.session import open_session
from remote_gevent.crypto import identity
from echo_server import echo
from relay_helpers import Balancer, echo_session, need_haproxy, start_relay

WAIT = 20.0
SESSIONS = 50


class _Cfg:
    def __init__(self, relays):
        self.remote = type("R", (), {"relays": {"fr04": relays}, "server_id": "fr04"})()


def test_admit_relay_from_a_list_and_nothing_else():
    cfg = _Cfg(("r1.example:8443", "R2.example.:8443", "[2001:db8::1]:9000"))
    assert admit_relay(cfg, "r1.example:8443") == ("r1.example", 8443)
    assert admit_relay(cfg, "r2.EXAMPLE:8443") == ("R2.example.", 8443)
    assert admit_relay(cfg, "[2001:db8::1]:9000") == ("2001:db8::1", 9000)
    for bad in ("r1.example:8444", "r3.example:8443", "r1.example", "x" * 500):
        with pytest.raises(RelayNotAdmitted):
            admit_relay(cfg, bad)
    assert admit_relay(_Cfg("r1.example:8443"), "R1.example:8443") == ("r1.example", 8443)


def test_config_accepts_a_list_and_names_a_bad_item(tmp_path):
    def load(relays):
        path = tmp_path / "agent.yaml"
        path.write_text(json.dumps({"ident": "d", "token": "t", "remote": {
            "enabled": True, "relays": {"fr04": relays}}}))
        return config_mod.load(str(path))

    assert load(["a:1", "b:2"]).remote.relays["fr04"] == ("a:1", "b:2")
    with pytest.raises(ConfigError) as info:
        load(["a:1", "nope"])
    assert "remote.relays.fr04[1]" in str(info.value)
    with pytest.raises(ConfigError):
        load([])


@pytest.mark.slow
@pytest.mark.e2e
def test_fifty_sessions_pair_through_three_relays_behind_haproxy(rabbit, device, operator,
                                                                  pki, tmp_path):
    need_haproxy()
    ca, _ = pki
    cert = ca.issue("pool-relay", ["127.0.0.1"])
    relays = [start_relay(cert, proxy_protocol=True) for _ in range(4)]
    lb = Balancer(str(tmp_path), [r.address[1] for r in relays])
    pool = ["127.0.0.1:%d" % p for p in lb.ports[:3]]  # the 4th is not the device's
    echo_server = StreamServer(("127.0.0.1", 0), echo)
    echo_server.start()
    target = "127.0.0.1:%d" % echo_server.address[1]

    op = identity.IdentityKey.generate()
    op_key = str(tmp_path / "op_ed25519")
    identity.write(op, op_key)
    ak = tmp_path / "authorized_keys"
    ak.write_text(op.public_line("op") + "\n")
    os.chmod(str(ak), 0o600)
    agent_path = str(tmp_path / "agent.yaml")
    with open(agent_path, "w") as fh:
        json.dump({"ident": device.ident, "token": device.token,
                   "amqp": {"urls": [device.url], "ca_file": device.ca_file},
                   "remote": {"enabled": True, "server_id": device.server_id,
                              "key_path": str(tmp_path / "dev_ed25519"),
                              "history_path": str(tmp_path / "history.csv"),
                              "authorized_keys": str(ak), "allow": ["127.0.0.1:*"],
                              "relays": {device.server_id: pool}, "max_session": 50,
                              "operator_rate": 0}}, fh)
    agent = Agent(config_mod.load(agent_path), agent_path)
    agent.stop_grace = 3.0
    greenlet = gevent.spawn(agent.run)

    def console(relay_addr):
        path = str(tmp_path / ("console-%s.yaml" % relay_addr.split(":")[1]))
        with open(path, "w") as fh:
            json.dump({"user": operator.user, "password": operator.password,
                       "amqp": {"urls": [operator.url], "ca_file": operator.ca_file},
                       "operator_key": op_key, "relay": relay_addr, "reply_timeout": 10,
                       "known_devices": str(tmp_path / "known"),
                       "state_file": str(tmp_path / "state.json")}, fh)
        return ConsoleControl(cconfig.load(path)).start()

    controls = []
    try:
        deadline = time.monotonic() + WAIT
        while getattr(agent, "control", None) is None \
                or not agent.control.link.connected.is_set():
            assert time.monotonic() < deadline, "agent did not connect"
            gevent.sleep(0.05)
        KnownDevices(str(tmp_path / "known")).pin(device.server_id, device.ident,
                                                  agent.get_identity().public_bytes)
        controls = [console(addr) for addr in pool]
        paired = sum(echo_session(controls[i % 3], device.ident, target)
                     for i in range(SESSIONS))
        assert paired == SESSIONS
        counts = [r.counters["sessions"] for r in relays]
        print("pairings per relay:", counts)
        assert counts[:3] == [17, 17, 16] and counts[3] == 0
        # A relay the device does not list: refused, whatever the console signed.
        outsider = console("127.0.0.1:%d" % lb.ports[3])
        controls.append(outsider)
        with pytest.raises(ConsoleError) as info:
            open_session(outsider.cfg, device.ident, [target], control=outsider)
        assert "relay" in info.value.message
    finally:
        for c in controls:
            c.close()
        agent.request_stop()
        greenlet.join(15.0)
        lb.stop()
        for r in relays:
            r.stop(grace=0)
        echo_server.stop()
