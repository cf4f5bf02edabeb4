"""Console against the real private TLS broker, a real in-process Agent and relay.

Focused on the console's side of the control plane: request/refuse and request/accept
round trips, learning an unpinned device key from the status queue, status, device
state, login errors. Full end-to-end runs with ssh/curl live in test_e2e*.py.
"""

from __future__ import annotations

import json
import os
import socket
import time

import gevent
import pytest
from gevent.server import StreamServer

from remote_gevent.agent import config as config_mod
from remote_gevent.crypto import identity
from remote_gevent.relay import server as relay_mod
from remote_gevent.relay.settings import RelaySettings
from remote_gevent.agent.runtime import Agent
from remote_gevent.console import config as cconfig
from remote_gevent.console.config import ConsoleError
from remote_gevent.console.control import ConsoleControl
from remote_gevent.console.device_states import DeviceStates, device_status
from remote_gevent.console.known_devices import KnownDevices
from remote_gevent.console.session import open_session
from echo_server import echo

WAIT = 20.0


@pytest.fixture(scope="module")
def relay_server(pki):
    ca, _ = pki
    cert = ca.issue("console-relay", ["127.0.0.1"])
    r = relay_mod.Relay(RelaySettings(host="127.0.0.1", port=0,
                                                cert_file=cert.cert_file,
                                                key_file=cert.key_file, pairing_timeout=10))
    r.start()
    yield r
    r.stop(grace=1.0)


@pytest.fixture(scope="module")
def echo_port():
    server = StreamServer(("127.0.0.1", 0), echo)
    server.start()
    yield server.address[1]
    server.stop()


class Platform:
    """An operator console config + an agent for ``device`` (started on demand)."""

    def __init__(self, tmp_path, rabbit, device, operator, relay_server, health_check=600):
        self.tmp = tmp_path
        self.device = device
        self.op_key_path = str(tmp_path / "operator_ed25519")
        op = identity.IdentityKey.generate()
        identity.write(op, self.op_key_path)
        relay = "127.0.0.1:%d" % relay_server.address[1]
        ak = tmp_path / "authorized_keys"
        ak.write_text(op.public_line("op") + "\n")
        os.chmod(str(ak), 0o600)
        agent_cfg = {
            "ident": device.ident, "token": device.token,
            "amqp": {"urls": [device.url], "ca_file": device.ca_file, "connect_timeout": 5,
                     "reconnect_max_delay": 2},
            "remote": {"enabled": True, "server_id": device.server_id,
                       "health_check": health_check,
                       "key_path": str(tmp_path / "device_ed25519"),
                       "history_path": str(tmp_path / "history.csv"),
                       "authorized_keys": str(ak), "allow": ["127.0.0.1:*"],
                       "relays": {device.server_id: relay}, "queue_timeout": 5},
        }
        self.agent_path = str(tmp_path / "agent.yaml")
        with open(self.agent_path, "w") as fh:
            json.dump(agent_cfg, fh)
        self.console_path = str(tmp_path / "console.yaml")
        with open(self.console_path, "w") as fh:
            json.dump({"user": operator.user, "password": operator.password,
                       "amqp": {"urls": [operator.url], "ca_file": operator.ca_file,
                                "connect_timeout": 5},
                       "operator_key": self.op_key_path, "relay": relay,
                       "reply_timeout": 5}, fh)
        self.cfg = cconfig.load(self.console_path)
        self.agent = None
        self.greenlet = None

    def start_agent(self):
        cfg = config_mod.load(self.agent_path)
        self.agent = Agent(cfg, self.agent_path)
        self.agent.stop_grace = 5.0
        self.greenlet = gevent.spawn(self.agent.run)
        deadline = time.monotonic() + WAIT
        while getattr(self.agent, "control", None) is None or \
                not self.agent.control.link.connected.is_set():
            assert time.monotonic() < deadline, "agent did not connect"
            gevent.sleep(0.02)
        return self.agent

    def stop(self):
        if self.greenlet is not None and not self.greenlet.dead:
            self.agent.request_stop()
            self.greenlet.join(15.0)

    def pin_device(self):
        key = self.agent.get_identity()
        KnownDevices(self.cfg.known_devices).pin(self.device.server_id, self.device.ident,
                                                 key.public_bytes)
        return key


@pytest.fixture
def platform(tmp_path, rabbit, device, operator, relay_server):
    p = Platform(tmp_path, rabbit, device, operator, relay_server)
    try:
        yield p
    finally:
        p.stop()


def test_unpinned_device_key_learnt_from_status_queue_then_refusal(platform):
    # A console that needs it (devices, watch, pin) declares its status queue: from then
    # on announcements are kept.
    with ConsoleControl(platform.cfg, consume_status=True) as control:
        pass
    agent = platform.start_agent()
    with ConsoleControl(platform.cfg) as control:
        with pytest.raises(ConsoleError) as info:
            control.request_session(platform.device.ident, ["10.0.0.1:22"])
    assert info.value.exit_code == cconfig.EXIT_REFUSED
    assert info.value.code == "target_not_permitted"
    assert "10.0.0.1:22" in info.value.message
    pin = KnownDevices(platform.cfg.known_devices).get(platform.device.server_id,
                                                       platform.device.ident)
    assert pin is not None and pin.fingerprint == agent.get_identity().fingerprint
    assert pin.via == "tofu"


def test_no_pin_and_no_announcement_is_a_clear_refusal(platform):
    platform.start_agent()  # announced before the status queue existed: lost
    with ConsoleControl(platform.cfg) as control:
        with pytest.raises(ConsoleError) as info:
            control.request_session(platform.device.ident, ["127.0.0.1:22"])
    assert info.value.exit_code == cconfig.EXIT_KEY
    assert "pin %s --key" % platform.device.ident in info.value.message


def test_session_accept_tunnel_streams_and_status(platform, echo_port):
    platform.start_agent()
    platform.pin_device()
    target = "127.0.0.1:%d" % echo_port
    session = open_session(platform.cfg, platform.device.ident, [target])
    try:
        for _ in range(3):
            stream = session.open_stream(target)
            payload = os.urandom(200000)
            gevent.spawn(lambda s=stream, p=payload: (s.send(p), s.shutdown_write()))
            got = b""
            while True:
                chunk = stream.recv()
                if not chunk:
                    break
                got += chunk
            assert got == payload
        with ConsoleControl(platform.cfg) as control:
            status = control.status(platform.device.ident)
        assert status["sessions_active"] == 1
        assert [s["session_id"] for s in status["sessions"]] == [session.session_id]
    finally:
        session.close()
    assert session.wait(timeout=10)[0] == "closed_by_operator"


def test_accept_signed_by_another_key_is_refused(platform, echo_port):
    platform.start_agent()
    impostor = identity.IdentityKey.generate()
    KnownDevices(platform.cfg.known_devices).pin(platform.device.server_id,
                                                 platform.device.ident,
                                                 impostor.public_bytes)
    with pytest.raises(ConsoleError) as info:
        open_session(platform.cfg, platform.device.ident, ["127.0.0.1:%d" % echo_port])
    assert info.value.exit_code == cconfig.EXIT_KEY
    assert "possible impersonation" in info.value.message


def test_offline_device_fails_fast_not_connected(platform):
    """No agent connected: no <topic>.conn queue, the mandatory request comes back and
    the console says so at once, long before its 30 s reply timeout (issue 13)."""
    KnownDevices(platform.cfg.known_devices).pin(
        platform.device.server_id, platform.device.ident,
        identity.IdentityKey.generate().public_bytes)
    cfg = cconfig.replace(platform.cfg, reply_timeout=30.0)
    with ConsoleControl(cfg) as control:
        t0 = time.monotonic()
        with pytest.raises(ConsoleError) as info:
            control.request_session(platform.device.ident, ["127.0.0.1:22"])
        with pytest.raises(ConsoleError) as status_info:
            control.status(platform.device.ident)
    assert info.value.exit_code == cconfig.EXIT_OFFLINE
    assert info.value.code == status_info.value.code == "not_connected"
    assert "not connected" in info.value.message
    assert time.monotonic() - t0 < 15  # fast: not the 30 s reply_timeout (loaded CI box)


def test_wrong_password_is_exit_9(platform):
    cfg = cconfig.replace(platform.cfg, password="wrong")
    with pytest.raises(ConsoleError) as info:
        ConsoleControl(cfg).start()
    assert info.value.exit_code == cconfig.EXIT_LOGIN
    assert "wrong" not in info.value.message


def test_devices_state_from_alive(platform):
    with ConsoleControl(platform.cfg, consume_status=True):
        pass
    agent = platform.start_agent()
    with ConsoleControl(platform.cfg, consume_status=True) as control:
        deadline = time.monotonic() + WAIT
        did = "%s/%s" % (platform.device.server_id, platform.device.ident)
        while "last_alive" not in control.states.devices.get(did, {}):
            assert time.monotonic() < deadline
            control.sync_status()
    entry = DeviceStates(platform.cfg.state_file).devices[did]
    assert entry["fingerprint"] == agent.get_identity().fingerprint
    assert entry["health_check"] == 600.0 and entry["verified"] is True
    assert device_status(entry) == "online"


def test_stream_refusal_code_for_closed_port(platform):
    platform.start_agent()
    platform.pin_device()
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    from remote_gevent.wire import mux_frames

    session = open_session(platform.cfg, platform.device.ident, ["127.0.0.1:%d" % port])
    try:
        with pytest.raises(mux_frames.StreamRefused) as info:
            session.open_stream("127.0.0.1:%d" % port)
        assert info.value.code == "target_refused" and "ECONNREFUSED" in info.value.reason
    finally:
        session.close()
