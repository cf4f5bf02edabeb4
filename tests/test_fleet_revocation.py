"""The fleet-wide revocation (issue 14): a KRL signed with ``ssh-keygen -Y sign`` by the
CA, published once on ``remote.fleet``; a real in-process agent applies it within
seconds when online, and before its first request when it comes back from offline."""

import dataclasses
import os
import time

import pytest

from remote_gevent.wire import fleet, protocol
from remote_gevent.wire.codes import Reason

from tests.sshcert_helpers import keygen, krl, new_key
from tests.control_helpers import WAIT, Running, next_close
from tests.test_sshcert_agent import _send, running_cert_platform


@pytest.fixture
def cert_platform(rabbit, device, operator, tmp_path):
    with running_cert_platform(rabbit, device, operator, tmp_path) as parts:
        yield parts


def signed_krl(tmp_path, signer, ca_pub, version, specs, name="fleet"):
    path = krl(tmp_path / name, ca_pub, specs=specs)
    keygen("-k", "-u", "-z", str(version), "-f", path)  # set the KRL version
    keygen("-Y", "sign", "-n", fleet.SIG_NAMESPACE, "-f", signer, path)
    with open(path, "rb") as f, open(path + ".sig") as s:
        return fleet.encode_revocation("fr04", f.read(), s.read())


def publish(console, raw):
    console.link.publish(fleet.FLEET_EXCHANGE, fleet.routing_key("fr04"), raw,
                         delivery_mode=2)


def wait_log(caplog, text):
    deadline = time.monotonic() + WAIT
    while text not in caplog.text:
        assert time.monotonic() < deadline, caplog.text[-3000:]
        time.sleep(0.05)


def test_online_device_applies_it_within_seconds(cert_platform, tmp_path, caplog):
    run, console, device, ca, op, _ = cert_platform
    caplog.set_level("INFO")
    sid, reply = _send(console, device, console.key)
    assert reply.type == protocol.MsgType.SESSION_QUEUED
    # Signed by a key that is not a CA of the device: ignored, the session goes on.
    stranger = new_key(tmp_path / "stranger")
    publish(console, signed_krl(tmp_path, stranger, ca + ".pub", 5, ["serial: 7"], "bad"))
    wait_log(caplog, "not a cert-authority of this device")
    assert run.agent.tunnels.operator_of(sid) == console.key.fingerprint
    # Signed by the CA: the session ends within seconds.
    t0 = time.monotonic()
    publish(console, signed_krl(tmp_path, ca, ca + ".pub", 5, ["serial: 7"]))
    assert next_close(console, sid).body["code"] == "revoked"
    assert time.monotonic() - t0 < 15  # two broker hops; seconds on a loaded CI box
    _, reply = _send(console, device, console.key)
    assert reply.body["code"] == Reason.REVOKED
    # An older list cannot lift it.
    publish(console, signed_krl(tmp_path, ca, ca + ".pub", 4, ["serial: 99"], "old"))
    wait_log(caplog, "version 4 is older than the one in force (5)")
    _, reply = _send(console, device, console.key)
    assert reply.body["code"] == Reason.REVOKED


def test_offline_device_applies_it_before_its_first_request(cert_platform, tmp_path):
    run, console, device, ca, op, _ = cert_platform
    run.stop()  # offline
    publish(console, signed_krl(tmp_path, ca, ca + ".pub", 1, ["id: alice"]))
    again = Running(str(tmp_path / "config.yaml"))
    try:
        again.wait_ready()
        _, reply = _send(console, device, console.key)  # the very first request
        assert (reply.type, reply.body["code"]) == (protocol.MsgType.SESSION_REFUSE,
                                                    Reason.REVOKED)
        assert os.path.exists(again.cfg.remote.fleet_revocation_path)
    finally:
        again.stop()
    # kept on the device: applied at the next start too, with nothing left on the broker
    third = Running(str(tmp_path / "config.yaml"))
    try:
        third.wait_ready()
        _, reply = _send(console, device, console.key)
        assert reply.body["code"] == Reason.REVOKED
    finally:
        third.stop()
    # the cert_platform fixture stops ``run`` again: already stopped, harmless


def test_unwritable_store_applies_and_keeps_the_link(cert_platform, tmp_path, caplog):
    run, console, device, ca, op, _ = cert_platform
    caplog.set_level("INFO")
    # frozen dataclasses: the agent's config replaced by a copy with an unwritable path
    remote = dataclasses.replace(run.agent.cfg.remote,
                                 fleet_revocation_path=str(tmp_path / "missing" / "f.json"))
    run.agent.cfg = dataclasses.replace(run.agent.cfg, remote=remote)
    publish(console, signed_krl(tmp_path, ca, ca + ".pub", 3, ["serial: 7"]))
    wait_log(caplog, "fleet revocation applied but not stored")
    _, reply = _send(console, device, console.key)
    assert reply.body["code"] == Reason.REVOKED
    assert "control link lost" not in caplog.text


def test_platform_without_remote_fleet_still_serves(rabbit, operator, tmp_path, monkeypatch,
                                                    caplog):
    """A device provisioned before issue 14 (no read on remote.fleet): logged, and the
    control plane serves requests as before."""
    from remote_gevent.demo import rabbit as demo_rabbit

    new = demo_rabbit.device_permissions

    def old_permissions(server_id, ident):
        perms = new(server_id, ident)
        perms["read"] = perms["read"].replace(r"remote\.fleet|", "")
        perms["topic"] = [t for t in perms["topic"] if t["exchange"] != "remote.fleet"]
        return perms

    monkeypatch.setattr(demo_rabbit, "device_permissions", old_permissions)
    device = rabbit.new_device()
    caplog.set_level("INFO")
    with running_cert_platform(rabbit, device, operator, tmp_path) as parts:
        run, console, device, ca, op, _ = parts
        assert "no fleet revocation on this platform" in caplog.text
        _, reply = _send(console, device, console.key)
        assert reply.type == protocol.MsgType.SESSION_QUEUED, reply.body
