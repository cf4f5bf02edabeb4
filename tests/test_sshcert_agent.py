"""Operator certificates and revocation against a real in-process agent on the private TLS
broker (issue 14): certificates and KRLs from the real ``ssh-keygen``."""

import contextlib
import json
import os
import signal
import time

import pytest

from remote_gevent.agent import history
from remote_gevent.wire import protocol
from remote_gevent.wire.codes import Reason

from tests.sshcert_helpers import issue, krl, new_key, pub_line
from tests.sshcert_helpers import operator as cert_key
from tests.control_helpers import WAIT, next_close, running_agent, write_config


@pytest.fixture
def cert_platform(rabbit, device, operator, tmp_path):
    with running_cert_platform(rabbit, device, operator, tmp_path) as parts:
        yield parts


@contextlib.contextmanager
def running_cert_platform(rabbit, device, operator, tmp_path):
    """An agent trusting one CA (cert-authority line), with ``remote.revoked_keys``; one
    session slot taken, so an accepted request waits (and is revocable) for a while."""
    ca = new_key(tmp_path / "ca", comment="platform-ca")
    op = new_key(tmp_path / "op", comment="alice")
    revoked = tmp_path / "revoked_keys"
    revoked.write_text("# nothing revoked yet\n")
    os.chmod(str(revoked), 0o600)
    path = write_config(tmp_path, device, ["cert-authority,principals=\"fleet-a\" "
                                           + pub_line(ca)])
    cfg_dict = json.loads(open(path).read())
    cfg_dict["remote"]["revoked_keys"] = str(revoked)
    cfg_dict["remote"]["queue_timeout"] = 30
    cfg_dict["remote"]["fleet_revocation_path"] = str(tmp_path / "fleet_revocation.json")
    open(path, "w").write(json.dumps(cfg_dict))
    key = cert_key(op, issue(ca, op, principals="fleet-a"))
    with running_agent(rabbit, device, operator, path, key, hold_slot=True) \
            as (run, console):
        yield run, console, device, ca, op, revoked


def _send(console, device, key):
    sid, _, raw = console.request(device, key=key)
    return sid, console.send(raw, sid)


def test_certificate_session_and_each_refusal_while_serving(cert_platform, tmp_path, caplog):
    run, console, device, ca, op, _ = cert_platform
    caplog.set_level("INFO")
    sid, reply = _send(console, device, console.key)
    assert reply.type == protocol.MsgType.SESSION_QUEUED, reply.body
    assert 'key id "alice" serial 7' in caplog.text  # logged with the session's operator
    ca2 = new_key(tmp_path / "ca2")
    cases = [
        (issue(ca, op, principals="fleet-a", validity="-2h:-1h"), Reason.CERT_EXPIRED),
        (issue(ca, op, principals="fleet-a", validity="+1h:+2h"), Reason.CERT_NOT_YET_VALID),
        (issue(ca, op, principals="fleet-b"), Reason.PRINCIPAL),
        (issue(ca2, op, principals="fleet-a"), Reason.UNKNOWN_CA),
        (issue(ca, op, "-h", principals="fleet-a"), Reason.CERT_INVALID),
        (issue(ca, op, "-O", "critical:x@example.com=1", principals="fleet-a"),
         Reason.CERT_INVALID),
    ]
    good = issue(ca, op, principals="fleet-a", serial=8)
    cases.append((good[:-1] + bytes([good[-1] ^ 1]), Reason.CERT_INVALID))
    for blob, code in cases:
        _, reply = _send(console, device, cert_key(op, blob))
        assert (reply.type, reply.body["code"]) == (protocol.MsgType.SESSION_REFUSE, code)
    # and the agent still serves the good certificate
    _, reply = _send(console, device, cert_key(op, issue(ca, op, principals="fleet-a", serial=9)))
    assert reply.type == protocol.MsgType.SESSION_QUEUED
    assert run.agent.tunnels.operator_of(sid) == console.key.fingerprint


@pytest.mark.parametrize("spec", [["serial: 7"], ["id: alice"], None])
def test_krl_change_ends_the_open_session_and_refuses_the_next(cert_platform, tmp_path, spec):
    run, console, device, ca, op, revoked = cert_platform
    sid, reply = _send(console, device, console.key)
    assert reply.type == protocol.MsgType.SESSION_QUEUED
    new = tmp_path / "krl.new"
    if spec is None:  # revoke the key itself
        krl(new, None, keys=[op + ".pub"])
    else:
        krl(new, ca + ".pub", specs=spec)
    os.chmod(str(new), 0o600)
    os.replace(str(new), str(revoked))  # atomic, as an administrator should
    t0 = time.monotonic()
    os.kill(os.getpid(), signal.SIGHUP)
    close = next_close(console, sid)
    # at once, not at a later check (15 s: a broker round trip on a loaded CI box)
    assert close.body["code"] == "revoked" and time.monotonic() - t0 < 15
    rows = [r for r in history.read(run.cfg.remote.history_path) if r["session_id"] == sid]
    assert [(r["close_code"], r["cert_key_id"], r["cert_serial"]) for r in rows] == [
        ("revoked", "alice", "7")]
    _, reply = _send(console, device, console.key)
    assert (reply.type, reply.body["code"]) == (protocol.MsgType.SESSION_REFUSE, Reason.REVOKED)


def test_revocation_file_edit_applies_without_sighup(cert_platform):
    run, console, device, ca, op, revoked = cert_platform
    sid, reply = _send(console, device, console.key)
    assert reply.type == protocol.MsgType.SESSION_QUEUED
    revoked.write_text(pub_line(op) + "\n")  # a plain key list; the GC notices the mtime
    close = next_close(console, sid)
    assert close.body["code"] == "revoked"


def test_unreadable_revocation_file_trusts_nobody(cert_platform):
    run, console, device, ca, op, revoked = cert_platform
    revoked.write_bytes(b"SSHKRL\n\0garbage")
    deadline = time.monotonic() + WAIT
    while True:
        _, reply = _send(console, device, console.key)
        if reply.type == protocol.MsgType.SESSION_REFUSE:
            break
        assert time.monotonic() < deadline
    assert reply.body["code"] == Reason.UNKNOWN_CA


def test_certificate_operator_status_close_and_ca_removal(cert_platform, tmp_path):
    """status.request and session.close carry the certificate too; removing the CA line
    ends the certificate's sessions (live trust, as for a plain key)."""
    run, console, device, ca, op, _ = cert_platform
    sid, reply = _send(console, device, console.key)
    assert reply.type == protocol.MsgType.SESSION_QUEUED
    rid, raw = protocol.make_status_request(console.key, device.ident, device.server_id)
    body = protocol.verify_status(console.send(raw, rid, kind="status"),
                                  run.key.public_bytes, rid)
    assert [s["session_id"] for s in body["sessions"]] == [sid]
    console.send(protocol.make_session_close(console.key, sid, "closed_by_operator"), sid,
                 kind="close", reply_to=False)
    assert next_close(console, sid).body["code"] == "closed_by_operator"
    sid2, reply = _send(console, device, console.key)
    assert reply.type == protocol.MsgType.SESSION_QUEUED
    ak = tmp_path / "authorized_keys"
    ak.write_text("# the CA is gone\n")
    os.chmod(str(ak), 0o600)
    assert next_close(console, sid2).body["code"] == "revoked"
    _, reply = _send(console, device, console.key)
    assert reply.body["code"] == Reason.UNKNOWN_CA
