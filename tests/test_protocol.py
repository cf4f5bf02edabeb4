
import base64
import json

import nacl.signing
import pytest

from remote_gevent.crypto import authkeys as ak
from remote_gevent.crypto import identity
from remote_gevent.wire import protocol as p
from remote_gevent.wire import envelope
from remote_gevent.crypto import tunnel_crypto as tc
from remote_gevent.wire.codes import Reason

NOW = 1700000000
DEVICE = "demo"
SERVER = "fr04"
ALLOW = ["127.0.0.1:*", "@sftp"]


# A signer as protocol.py expects it (.sign, .fingerprint): the agent's own key type.
Signer = identity.IdentityKey.generate


@pytest.fixture
def op():
    return Signer()


@pytest.fixture
def limited_op():
    return Signer()


@pytest.fixture
def trusted(op, limited_op):
    text = "%s alice\npermitopen=\"127.0.0.1:22\" %s bob\n" % (
        ak.ssh_pubkey_line(op.public_bytes), ak.ssh_pubkey_line(limited_op.public_bytes))
    return ak.AuthorizedKeys.parse(text)


def request(signer, targets=("127.0.0.1:22",), now=NOW, ttl=60, **kw):
    epk, _ = tc.kx_keypair()
    return p.make_session_request(signer, kw.pop("device", DEVICE), kw.pop("server_id", SERVER),
                                  epk, list(targets), "relay.example:8443", p.new_ticket(),
                                  ttl=ttl, now=now, **kw)


def check(raw, trusted, cache=None, now=NOW, allow=ALLOW):
    return p.check_session_request(raw, DEVICE, SERVER, trusted, allow,
                                   cache if cache is not None else p.ReplayCache(), now=now)


def refused(raw, trusted, **kw):
    with pytest.raises(p.Refused) as ei:
        check(raw, trusted, **kw)
    assert ei.value.reason in Reason.ALL
    return ei.value.reason


def resign(raw, signer, mutate):
    """Decode, change the body, re-sign with ``signer``: a validly signed crafted message."""
    env = json.loads(raw)
    mutate(env["body"])
    return p.encode(env["type"], env["body"], signer)


def tamper(raw, mutate):
    """Change the body without re-signing (schema-valid, signature broken)."""
    env = json.loads(raw)
    mutate(env["body"])
    return json.dumps(env).encode()


# ---------------------------------------------------------------- happy path


def test_request_accepted(op, trusted):
    sid, raw = request(op, targets=["127.0.0.1:22", "@sftp"])
    assert len(raw) <= p.MAX_MESSAGE_BYTES
    req = check(raw, trusted)
    assert req.session_id == sid and req.operator.fingerprint == op.fingerprint
    assert len(req.epk) == 32 and len(req.ticket) == 32
    assert req.permits("127.0.0.1:22") and req.permits("@sftp")
    assert not req.permits("127.0.0.1:80")
    assert "ticket" not in repr(req)


def test_socks_wildcard_request_gets_per_stream_checks(op, limited_op, trusted):
    _, raw = request(op, targets=["*:*"])
    req = check(raw, trusted)
    assert req.permits("127.0.0.1:8080") and not req.permits("10.0.0.1:22")
    assert not req.permits("@sftp")  # virtual targets are never covered by *:*
    _, raw = request(limited_op, targets=["*:*"])
    req = check(raw, trusted)
    assert req.permits("127.0.0.1:22") and not req.permits("127.0.0.1:8080")


def test_signature_is_domain_separated(op):
    _, raw = request(op)
    msg = p.decode(raw)
    data = b"remote-gevent/v1/session.request\0" + envelope.canonical(msg.body)
    assert msg.signed_bytes() == data
    nacl.signing.VerifyKey(op.public_bytes).verify(data, msg.sig)
    assert p.verify(msg, op.public_bytes)


def test_signature_for_other_type_does_not_verify(op):
    # Same body signed as another type must not verify as this one.
    sid, raw = request(op)
    msg = p.decode(raw)
    other = p.signing_input("session.close", msg.body)
    forged = json.loads(raw)
    forged["sig"] = base64.b64encode(op.sign(other)).decode()
    with pytest.raises(p.ProtocolError) as ei:
        p.verify(p.decode(json.dumps(forged).encode()), op.public_bytes)
    assert ei.value.reason == Reason.BAD_SIGNATURE


# ---------------------------------------------------------------- refusals


def test_bad_signature(op, trusted):
    _, raw = request(op)
    bad = tamper(raw, lambda b: b.__setitem__("targets", ["127.0.0.1:23"]))
    assert refused(bad, trusted) == Reason.BAD_SIGNATURE


def test_signature_by_other_key_claiming_operator(op, trusted):
    mallory = Signer()
    _, raw = request(mallory)
    env = json.loads(raw)
    env["body"]["operator"] = op.fingerprint
    env["signer"] = op.fingerprint
    env["sig"] = base64.b64encode(mallory.sign(p.signing_input(env["type"], env["body"]))).decode()
    assert refused(json.dumps(env).encode(), trusted) == Reason.BAD_SIGNATURE


def test_unknown_operator(trusted):
    assert refused(request(Signer())[1], trusted) == Reason.UNKNOWN_OPERATOR


def test_expired(op, trusted):
    _, raw = request(op, now=NOW - 200, ttl=60)  # exp = NOW-140 < NOW - skew
    assert refused(raw, trusted) == Reason.EXPIRED
    _, raw = request(op, now=NOW - 100, ttl=60)  # exp = NOW-40: within the skew, accepted
    check(raw, trusted)


def test_future_iat(op, trusted):
    _, raw = request(op, now=NOW + p.CLOCK_SKEW + 5)
    assert refused(raw, trusted) == Reason.EXPIRED
    _, raw = request(op, now=NOW + p.CLOCK_SKEW - 5)
    check(raw, trusted)


def test_lifetime_too_long(op, trusted):
    _, raw = request(op)
    bad = resign(raw, op, lambda b: b.__setitem__("exp", b["iat"] + p.MAX_SESSION_LIFETIME + 1))
    assert refused(bad, trusted) == Reason.EXPIRED
    bad = resign(raw, op, lambda b: b.__setitem__("exp", b["iat"] - 1))
    assert refused(bad, trusted) == Reason.EXPIRED
    with pytest.raises(ValueError):
        request(op, ttl=p.MAX_SESSION_LIFETIME + 1)


def test_replayed(op, trusted):
    cache = p.ReplayCache()
    _, raw = request(op)
    check(raw, trusted, cache=cache)
    assert refused(raw, trusted, cache=cache) == Reason.REPLAYED
    # same session id, freshly signed: still a replay of the id
    again = resign(raw, op, lambda b: b.__setitem__("iat", b["iat"] + 1))
    assert refused(again, trusted, cache=cache) == Reason.REPLAYED


def test_wrong_device_and_server(op, trusted):
    assert refused(request(op, device="other")[1], trusted) == Reason.WRONG_DEVICE
    assert refused(request(op, server_id="de01")[1], trusted) == Reason.WRONG_DEVICE


def test_target_not_permitted_by_device(op, trusted):
    _, raw = request(op, targets=["10.0.0.1:22"])
    assert refused(raw, trusted) == Reason.TARGET_NOT_PERMITTED
    _, raw = request(op, targets=["@transfer"])  # virtual, not in ALLOW
    assert refused(raw, trusted) == Reason.TARGET_NOT_PERMITTED
    _, raw = request(op, targets=["127.0.0.1:22", "10.0.0.1:22"])  # one bad target is enough
    assert refused(raw, trusted) == Reason.TARGET_NOT_PERMITTED


def test_target_not_permitted_by_operator_permitopen(limited_op, trusted):
    _, raw = request(limited_op, targets=["127.0.0.1:80"])  # device allows, permitopen doesn't
    assert refused(raw, trusted) == Reason.TARGET_NOT_PERMITTED
    _, raw = request(limited_op, targets=["@sftp"])
    assert refused(raw, trusted) == Reason.TARGET_NOT_PERMITTED
    check(request(limited_op, targets=["127.0.0.1:22"])[1], trusted)


def test_default_allow_list_is_ssh_only(op, trusted):
    _, raw = request(op, targets=["127.0.0.1:80"])
    assert refused(raw, trusted, allow=["127.0.0.1:22"]) == Reason.TARGET_NOT_PERMITTED


def test_check_order_schema_before_identity(trusted):
    # a malformed message from a stranger reports malformed, not unknown_operator
    _, raw = request(Signer())
    bad = tamper(raw, lambda b: b.__setitem__("session_id", "XYZ"))
    assert refused(bad, trusted) == Reason.MALFORMED


def test_check_order_signature_before_time_and_replay(op, trusted):
    cache = p.ReplayCache()
    _, raw = request(op, now=NOW - 1000)
    bad = tamper(raw, lambda b: b.__setitem__("targets", ["127.0.0.1:23"]))
    assert refused(bad, trusted, cache=cache) == Reason.BAD_SIGNATURE
    sid, raw = request(op)
    bad = tamper(raw, lambda b: b.__setitem__("relay", "evil.example:1"))
    assert refused(bad, trusted, cache=cache) == Reason.BAD_SIGNATURE
    assert sid not in cache  # unsigned junk never fills the replay cache
    check(raw, trusted, cache=cache)


def test_signer_must_match_operator(op, trusted):
    _, raw = request(op)
    env = json.loads(raw)
    env["signer"] = Signer().fingerprint
    assert refused(json.dumps(env).encode(), trusted) == Reason.MALFORMED


# ---------------------------------------------------------------- decode / schema


def test_too_large(op, trusted):
    raw = b'{"v":1,"type":"alive","body":{},"pad":"' + b"A" * p.MAX_MESSAGE_BYTES + b'"}'
    with pytest.raises(p.ProtocolError) as ei:
        p.decode(raw)
    assert ei.value.reason == Reason.TOO_LARGE
    assert len(str(ei.value)) < 300
    assert refused(raw, trusted) == Reason.TOO_LARGE


@pytest.mark.parametrize("raw", [
    b"\xff\xfe not utf8",
    b"not json",
    b"[1, 2]",
    b'"string"',
    b"{}",
    b'{"v": 2, "type": "alive", "body": {}}',
    b'{"v": true, "type": "alive", "body": {}}',
    b'{"v": 1, "type": "shell.exec", "body": {}}',
    b'{"v": 1, "type": "alive", "body": []}',
    b'{"v": 1, "type": "alive", "body": {}, "extra": 1}',
    b'{"v": 1, "v": 1, "type": "alive", "body": {}}',
    b'{"v": 1, "type": "alive", "body": {"x": NaN}}',
    b"[" * 5000 + b"]" * 5000,
])
def test_malformed_envelopes(raw):
    with pytest.raises(p.ProtocolError) as ei:
        p.decode(raw)
    assert ei.value.reason == Reason.MALFORMED
    assert len(str(ei.value)) < 300  # never echo large or binary input


def test_binary_not_echoed():
    raw = b"\x00\x01garbage" + bytes(range(256)) * 20
    with pytest.raises(p.ProtocolError) as ei:
        p.decode(raw)
    text = str(ei.value)
    assert len(text) < 300 and "\x00" not in text


FIELD_CASES = [
    ("session_id", "ABCDEF0123456789ABCDEF0123456789"),  # upper case
    ("session_id", "0" * 31),
    ("session_id", 12),
    ("session_id", "a" * 32 + "\n"),
    ("device", "demo\n"),
    ("operator", "SHA256:" + "A" * 43 + "\n"),
    ("device", "a/b"),
    ("device", "x" * 65),
    ("server_id", ""),
    ("operator", "MD5:aa"),
    ("epk", base64.b64encode(b"\0" * 31).decode()),
    ("epk", "!!!!"),
    ("epk", base64.b64encode(b"\0" * 33).decode()),
    ("ticket", base64.b64encode(b"\0" * 16).decode()),
    ("ticket", "A" * 5000),
    ("targets", []),
    ("targets", ["127.0.0.1:%d" % (i + 1) for i in range(envelope.MAX_TARGETS + 1)]),
    ("targets", "127.0.0.1:22"),
    ("targets", [22]),
    ("targets", ["127.0.0.1:0"]),
    ("targets", ["::1:22"]),
    ("relay", "@sftp"),
    ("relay", "relay.example"),
    ("relay", "relay.example:*"),
    # relay_pool (issue 13): optional, but bounded and well-formed when present
    ("relay_pool", []),
    ("relay_pool", "r1.example:8443"),
    ("relay_pool", ["r%d.example:8443" % i for i in range(envelope.MAX_RELAY_POOL + 1)]),
    ("relay_pool", ["r" * 250 + ".example:8443"]),
    ("relay_pool", ["r1.example:8443", "r2.example"]),
    ("relay_pool", ["r1.example:8443", 8443]),
    ("relay_pool", ["@sftp"]),
    ("iat", "1700000000"),
    ("iat", 1.5),
    ("iat", True),
    ("exp", -1),
    ("exp", 2 ** 64),
    ("cipher", "rot13"),
    ("cipher", None),
]


@pytest.mark.parametrize("name,value", FIELD_CASES)
def test_request_field_validation(op, trusted, name, value):
    _, raw = request(op)
    env = json.loads(raw)
    env["body"][name] = value
    crafted = json.dumps(env).encode()
    with pytest.raises(p.ProtocolError) as ei:
        p.decode(crafted)
    assert ei.value.reason == Reason.MALFORMED
    assert len(str(ei.value)) < 400
    assert refused(crafted, trusted) == Reason.MALFORMED
    # the builder refuses to emit it too
    with pytest.raises(p.ProtocolError):
        p.encode(env["type"], env["body"], op)


def test_missing_and_unknown_fields(op):
    _, raw = request(op)
    env = json.loads(raw)
    del env["body"]["ticket"]
    with pytest.raises(p.ProtocolError, match="missing ticket"):
        p.decode(json.dumps(env).encode())
    env = json.loads(raw)
    env["body"]["shell"] = "rm -rf /"
    with pytest.raises(p.ProtocolError, match="unknown fields"):
        p.decode(json.dumps(env).encode())


def test_unsigned_message_refused(op):
    raw = p.encode("session.queued", {"session_id": "a" * 32, "position": 1})
    with pytest.raises(p.ProtocolError) as ei:
        p.decode(raw)
    assert ei.value.reason == Reason.MALFORMED
    msg = p.decode(raw, require_signature=False)
    with pytest.raises(p.ProtocolError) as ei:
        p.verify(msg, op.public_bytes)
    assert ei.value.reason == Reason.BAD_SIGNATURE


def test_bad_sig_length_in_envelope(op):
    _, raw = request(op)
    env = json.loads(raw)
    env["sig"] = base64.b64encode(b"\0" * 63).decode()
    with pytest.raises(p.ProtocolError) as ei:
        p.decode(json.dumps(env).encode())
    assert ei.value.reason == Reason.MALFORMED


def test_control_characters_in_reason_refused(op):
    env = json.loads(p.make_session_close(op, "a" * 32, "normal", "bye", ts=NOW))
    env["body"]["reason"] = "line1\nFAKE LOG LINE"
    with pytest.raises(p.ProtocolError):
        p.decode(json.dumps(env).encode())


def test_best_effort_session_id(op):
    sid, raw = request(op, now=NOW - 10000)
    assert p.best_effort_session_id(raw) == sid
    assert p.best_effort_session_id(b"junk") is None
    assert p.best_effort_session_id(b'{"body": {"session_id": "../x"}}') is None
    assert p.best_effort_session_id(b'{"body": []}') is None


# ---------------------------------------------------------------- replay cache


def test_replay_cache_bounded_and_evicts_expired_first():
    cache = p.ReplayCache(max_entries=3, skew=60)
    cache.check_and_add("a" * 32, exp=NOW + 10, now=NOW)
    cache.check_and_add("b" * 32, exp=NOW + 100, now=NOW)
    cache.check_and_add("c" * 32, exp=NOW + 100, now=NOW)
    # full of unexpired entries: refuse rather than forget
    with pytest.raises(p.Refused) as ei:
        cache.check_and_add("d" * 32, exp=NOW + 100, now=NOW + 1)
    assert ei.value.reason == Reason.RATE_LIMITED
    assert "a" * 32 in cache and len(cache) == 3
    # once "a" is past exp + skew it is evicted to make room
    cache.check_and_add("d" * 32, exp=NOW + 200, now=NOW + 71)
    assert "a" * 32 not in cache and len(cache) == 3
    # unexpired ids still refused
    with pytest.raises(p.Refused) as ei:
        cache.check_and_add("b" * 32, exp=NOW + 100, now=NOW + 72)
    assert ei.value.reason == Reason.REPLAYED


def test_replay_cache_memory_bounded_under_churn():
    cache = p.ReplayCache(max_entries=100, skew=60)
    for i in range(5000):
        cache.check_and_add("%032x" % i, exp=NOW + i + 10, now=NOW + i)
        assert len(cache) <= 100
    assert len(cache._heap) <= 100


def test_replay_cache_remembers_until_exp_plus_skew():
    cache = p.ReplayCache(max_entries=10, skew=60)
    cache.check_and_add("e" * 32, exp=NOW + 60, now=NOW)
    with pytest.raises(p.Refused):
        cache.check_and_add("e" * 32, exp=NOW + 60, now=NOW + 119)


# ---------------------------------------------------------------- agent replies


def test_session_accept_binding(op):
    device = Signer()
    sid, raw = request(op)
    console_epk = p.decode(raw).body["epk"]
    console_epk = base64.b64decode(console_epk)
    agent_epk, _ = tc.kx_keypair()
    acc = p.make_session_accept(device, sid, agent_epk, console_epk, "xchacha20poly1305")
    got = p.verify_session_accept(acc, device.public_bytes, sid, console_epk)
    assert got.epk == agent_epk and got.cipher == "xchacha20poly1305"
    # a different (unpinned) device key
    with pytest.raises(p.ProtocolError) as ei:
        p.verify_session_accept(acc, Signer().public_bytes, sid, console_epk)
    assert ei.value.reason == Reason.BAD_SIGNATURE
    # an accept for another session / another console key
    with pytest.raises(p.ProtocolError) as ei:
        p.verify_session_accept(acc, device.public_bytes, "f" * 32, console_epk)
    assert ei.value.reason == Reason.REPLAYED
    with pytest.raises(p.ProtocolError) as ei:
        p.verify_session_accept(acc, device.public_bytes, sid, tc.kx_keypair()[0])
    assert ei.value.reason == Reason.REPLAYED
    # a relay/broker swapping the agent's epk breaks the signature
    other_epk = base64.b64encode(tc.kx_keypair()[0]).decode()
    bad = tamper(acc, lambda b: b.__setitem__("epk", other_epk))
    with pytest.raises(p.ProtocolError) as ei:
        p.verify_session_accept(bad, device.public_bytes, sid, console_epk)
    assert ei.value.reason == Reason.BAD_SIGNATURE


def test_queued_refuse_close_alive_round_trip(op):
    device = Signer()
    sid = p.new_session_id()
    for raw in (
        p.make_session_queued(device, sid, 3),
        p.make_session_refuse(device, sid, Reason.TARGET_NOT_PERMITTED, "10.0.0.1:22\x00"),
        p.make_session_close(device, sid, envelope.CloseCode.IDLE_TIMEOUT, "idle 1800s"),
        p.make_alive(device, "demo", "fr04", "0.1.0", 12.5, 1, 0, 10, seq=7, event="started"),
    ):
        msg = p.decode(raw)
        assert p.verify(msg, device.public_bytes)
        with pytest.raises(p.ProtocolError):
            p.verify(msg, op.public_bytes)
    refuse = p.decode(p.make_session_refuse(device, sid, "expired", "x" * 1000))
    assert len(refuse.body["reason"]) == p.MAX_REASON_CHARS
    with pytest.raises(p.ProtocolError):
        p.make_session_refuse(device, sid, "no_such_reason")
    with pytest.raises(p.ProtocolError):
        p.make_session_close(device, sid, "no_such_code")


def test_close_from_console_verified_against_authorized_keys(op, trusted):
    sid = p.new_session_id()
    msg = p.decode(p.make_session_close(op, sid, envelope.CloseCode.CLOSED_BY_OPERATOR, "done"))
    assert envelope.verify_with_authorized(msg, trusted).fingerprint == op.fingerprint
    stranger = p.decode(p.make_session_close(Signer(), sid, "normal"))
    with pytest.raises(p.Refused) as ei:
        envelope.verify_with_authorized(stranger, trusted)
    assert ei.value.reason == Reason.UNKNOWN_OPERATOR


def test_codes_match_design():
    assert envelope.CloseCode.ALL == {
        "normal", "closed_by_operator", "closed_by_agent", "idle_timeout", "ack_lost", "refused",
        "queue_timeout", "relay_lost", "relay_refused", "shutdown", "crypto_error",
        "protocol_error", "target_refused", "error", "revoked", "link_lost"}
    assert {"bad_signature", "unknown_operator", "expired", "replayed", "malformed", "too_large",
            "wrong_device", "target_not_permitted", "queue_timeout",
            "shutting_down", "operator_limit", "operator_rate_limited",
            "not_session_owner"} <= Reason.ALL


# ---------------------------------------------------------------- key publication / rotation


def test_key_announcement_and_rotation():
    old, new, newer = Signer(), Signer(), Signer()
    first = p.make_key_announcement(old, "demo", "fr04", ts=NOW)
    ann = p.verify_key_announcement(first)
    assert ann.public_raw32 == old.public_bytes and ann.previous is None
    assert ann.fingerprint == old.fingerprint
    # the same key again: nothing changes
    assert p.verify_key_rotation(first, old.public_bytes) == old.public_bytes
    rot = p.make_key_announcement(new, "demo", "fr04", previous_key=old, ts=NOW + 1)
    assert p.verify_key_rotation(rot, old.public_bytes) == new.public_bytes
    # the chain continues from the new pin only
    rot2 = p.make_key_announcement(newer, "demo", "fr04", previous_key=new, ts=NOW + 2)
    assert p.verify_key_rotation(rot2, new.public_bytes) == newer.public_bytes
    with pytest.raises(p.ProtocolError):
        p.verify_key_rotation(rot2, old.public_bytes)
    # replaying the old rotation once the pin moved on does nothing good
    with pytest.raises(p.ProtocolError):
        p.verify_key_rotation(rot, newer.public_bytes)


def test_key_change_without_rotation_refused():
    old, attacker = Signer(), Signer()
    plain = p.make_key_announcement(attacker, "demo", "fr04")
    with pytest.raises(p.ProtocolError) as ei:
        p.verify_key_rotation(plain, old.public_bytes)
    assert ei.value.reason == Reason.BAD_SIGNATURE
    # claims old as previous but the rotation_sig is by someone else
    forged = p.make_key_announcement(attacker, "demo", "fr04", previous_key=Signer())
    forged = resign(forged, attacker, lambda b: b.__setitem__("previous", old.fingerprint))
    with pytest.raises(p.ProtocolError) as ei:
        p.verify_key_rotation(forged, old.public_bytes)
    assert ei.value.reason == Reason.BAD_SIGNATURE


def test_rotation_sig_bound_to_ident_and_ts():
    old, new = Signer(), Signer()
    rot = p.make_key_announcement(new, "demo", "fr04", previous_key=old, ts=NOW)
    for field, value in (("ident", "other"), ("ts", NOW + 1)):
        bad = resign(rot, new, lambda b, f=field, v=value: b.__setitem__(f, v))
        with pytest.raises(p.ProtocolError):
            p.verify_key_rotation(bad, old.public_bytes)


def test_key_message_consistency():
    k = Signer()
    raw = p.make_key_announcement(k, "demo", "fr04")
    bad = resign(raw, k, lambda b: b.__setitem__("fingerprint", Signer().fingerprint))
    with pytest.raises(p.ProtocolError):
        p.verify_key_announcement(bad)
    with pytest.raises(p.ProtocolError):  # previous without rotation_sig
        resign(raw, k, lambda b: b.__setitem__("previous", k.fingerprint))
    bad = tamper(raw, lambda b: b.__setitem__("previous", k.fingerprint))
    with pytest.raises(p.ProtocolError):
        p.decode(bad)
    # signed by someone else than the announced key
    other = Signer()
    stolen = resign(raw, other, lambda b: None)
    with pytest.raises(p.ProtocolError):
        p.verify_key_announcement(stolen)


def test_reply_to_validation():
    assert p.is_valid_reply_to("amq.gen-JzTY20BRgKO-HjmUJj0wLg")
    for bad in ("", "a b", "x" * 201, None, "q\n", "ä"):
        assert not p.is_valid_reply_to(bad)


# ---------------------------------------------------------------- status


def status_request(signer, now=NOW, **kw):
    return p.make_status_request(signer, kw.pop("device", DEVICE),
                                 kw.pop("server_id", SERVER), now=now, **kw)


def check_status(raw, trusted, cache=None, now=NOW):
    return p.check_status_request(raw, DEVICE, SERVER, trusted,
                                  cache if cache is not None else p.ReplayCache(), now=now)


def test_status_request_accepted_and_refusals(op, trusted):
    rid, raw = status_request(op)
    cache = p.ReplayCache()
    req = check_status(raw, trusted, cache)
    assert req.request_id == rid and req.operator.fingerprint == op.fingerprint
    cases = [
        (raw, Reason.REPLAYED),  # same cache
        (status_request(op, device="other")[1], Reason.WRONG_DEVICE),
        (status_request(op, server_id="xx01")[1], Reason.WRONG_DEVICE),
        (status_request(Signer())[1], Reason.UNKNOWN_OPERATOR),
        (tamper(status_request(op)[1], lambda b: b.__setitem__("iat", NOW - 1)),
         Reason.BAD_SIGNATURE),
        (status_request(op, now=NOW - 1000)[1], Reason.EXPIRED),
        (status_request(op, now=NOW + 1000)[1], Reason.EXPIRED),
        (resign(status_request(op)[1], op, lambda b: b.__setitem__("exp", NOW + 10000)),
         Reason.EXPIRED),
        (b'{"v": 1, "type": "status.request", "body": {}}', Reason.MALFORMED),
        (b"x" * (p.MAX_MESSAGE_BYTES + 1), Reason.TOO_LARGE),
    ]
    for raw_case, reason in cases:
        with pytest.raises(p.Refused) as ei:
            check_status(raw_case, trusted, cache)
        assert ei.value.reason == reason, (reason, ei.value)
    # a session.request is not a status request, and vice versa
    with pytest.raises(p.Refused) as ei:
        check_status(request(op)[1], trusted)
    assert ei.value.reason == Reason.MALFORMED
    with pytest.raises(p.Refused) as ei:
        check(status_request(op)[1], trusted)
    assert ei.value.reason == Reason.MALFORMED


def test_status_request_signer_must_be_operator(op, trusted):
    other = Signer()
    raw = resign(status_request(op)[1], other, lambda b: None)  # body names op, signed by other
    with pytest.raises(p.Refused) as ei:
        check_status(raw, trusted)
    assert ei.value.reason == Reason.MALFORMED


def _entry(i, targets=("127.0.0.1:22",)):
    return {"session_id": "%032x" % i, "state": "active", "since": NOW + 0.5,
            "operator": "SHA256:" + "A" * 43, "targets": list(targets),
            "remote_ip": "192.0.2.%d" % (i % 250), "bytes_in": i, "bytes_out": 2 * i}


def test_status_reply_round_trip_and_binding():
    device = Signer()
    rid = p.new_session_id()
    raw = p.make_status(device, rid, "demo", "fr04", "0.1.0", 12.5, 2, 1, 10,
                        [_entry(1), _entry(2)])
    body = p.verify_status(raw, device.public_bytes, rid)
    assert body["sessions_total"] == 2 and [e["bytes_in"] for e in body["sessions"]] == [1, 2]
    with pytest.raises(p.ProtocolError) as ei:
        p.verify_status(raw, device.public_bytes, p.new_session_id())
    assert ei.value.reason == Reason.REPLAYED
    with pytest.raises(p.ProtocolError) as ei:
        p.verify_status(raw, Signer().public_bytes, rid)
    assert ei.value.reason == Reason.BAD_SIGNATURE


def test_status_reply_capped_to_200_and_16k():
    device = Signer()
    rid = p.new_session_id()
    raw = p.make_status(device, rid, "demo", "fr04", "0.1.0", 1, 500, 0, 1000,
                        [_entry(i) for i in range(500)])
    assert len(raw) <= p.MAX_MESSAGE_BYTES
    body = p.verify_status(raw, device.public_bytes, rid)
    assert body["sessions_total"] == 500
    assert 0 < len(body["sessions"]) <= p.MAX_STATUS_SESSIONS
    # bigger entries: fewer fit, but as many as possible
    fat = [_entry(i, ["10.0.%d.%d:22" % (i, j) for j in range(32)]) for i in range(50)]
    raw = p.make_status(device, rid, "demo", "fr04", "0.1.0", 1, 50, 0, 100, fat)
    n = len(p.decode(raw).body["sessions"])
    assert len(raw) <= p.MAX_MESSAGE_BYTES and 0 < n < 50
    with pytest.raises(p.ProtocolError) as ei:  # n + 1 entries would not have fit
        p.encode(p.MsgType.STATUS, dict(p.decode(raw).body, sessions=fat[:n + 1]), device)
    assert ei.value.reason == Reason.TOO_LARGE


def test_status_entry_schema_is_strict():
    device = Signer()
    rid = p.new_session_id()
    for mutate in (lambda e: e.update(extra=1), lambda e: e.pop("state"),
                   lambda e: e.update(bytes_in=-1), lambda e: e.update(remote_ip="a\nb"),
                   lambda e: e.update(session_id="nothex")):
        e = _entry(1)
        mutate(e)
        with pytest.raises(p.ProtocolError) as ei:
            p.make_status(device, rid, "demo", "fr04", "0.1.0", 1, 1, 0, 10, [e])
        assert ei.value.reason == Reason.MALFORMED
