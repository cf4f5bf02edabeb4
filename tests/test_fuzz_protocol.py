"""Hostile-input tier: control-message decoding (remote_gevent.wire.protocol) under fuzzing.

Documented outcome (protocol.py docstring, docs/protocol.md): every message goes through
``decode`` and the ``check_*`` / ``verify_*`` functions, which either return or raise
``ProtocolError`` (``Refused`` for the agent's checks) whose ``reason`` is one of
``Reason.ALL``. Nothing else may come out, whatever the bytes: arbitrary bytes, mutated
valid messages, deep nesting, huge numbers, duplicate keys, wrong types, non-UTF-8. Valid
messages round-trip, and no mutation may change what a still-verifying message means.
"""

from __future__ import annotations

import json

from fuzz_settings import examples
from hypothesis import assume, example, given
from hypothesis import strategies as st

from remote_gevent.crypto import authkeys as ak
from remote_gevent.crypto import identity
from remote_gevent.wire import protocol as p
from remote_gevent.wire import envelope
from remote_gevent.crypto import tunnel_crypto as tc
from remote_gevent.wire.protocol import MsgType
from remote_gevent.wire.codes import Reason

NOW = 1700000000
DEVICE = "demo"
SERVER = "fr04"
ALLOW = ["*:*", "@sftp", "@transfer"]

# Module-level keys: hypothesis runs each test body many times in one function call.
OP = identity.IdentityKey.generate()
OTHER_OP = identity.IdentityKey.generate()
DEV = identity.IdentityKey.generate()
NEW_DEV = identity.IdentityKey.generate()
TRUSTED = ak.AuthorizedKeys.parse("%s alice\npermitopen=\"127.0.0.1:22,@sftp\" %s bob\n" % (
    ak.ssh_pubkey_line(OP.public_bytes), ak.ssh_pubkey_line(OTHER_OP.public_bytes)))
CONSOLE_EPK = tc.kx_keypair()[0]
SID = "0123456789abcdef0123456789abcdef"
RID = "fedcba9876543210fedcba9876543210"


def _refusal(exc: BaseException) -> None:
    assert isinstance(exc, p.ProtocolError), repr(exc)
    assert exc.reason in Reason.ALL, exc.reason


def _check(raw, cache=None):
    return p.check_session_request(raw, DEVICE, SERVER, TRUSTED, ALLOW,
                                   cache if cache is not None else p.ReplayCache(), now=NOW)


def _outcome(fn, *args, **kw):
    """fn's result, or None after a documented refusal; anything else fails the test."""
    try:
        return fn(*args, **kw)
    except Exception as exc:  # noqa: BLE001 - the property: only ProtocolError comes out
        _refusal(exc)
        return None


def _valid_messages():
    """One valid raw message of each kind the agent or the console reads."""
    _, req = p.make_session_request(OP, DEVICE, SERVER, CONSOLE_EPK, ["127.0.0.1:22", "@sftp"],
                                    "relay.example:8443", p.new_ticket(), ttl=60, now=NOW,
                                    session_id=SID)
    _, pooled = p.make_session_request(OP, DEVICE, SERVER, CONSOLE_EPK, ["127.0.0.1:22"],
                                       "r1.example:8443", p.new_ticket(), ttl=60, now=NOW,
                                       session_id=SID, relay_pool=["r1.example:8443",
                                                                   "[2001:db8::1]:8443"])
    _, status_req = p.make_status_request(OP, DEVICE, SERVER, request_id=RID, now=NOW)
    accept = p.make_session_accept(DEV, SID, tc.kx_keypair()[0], CONSOLE_EPK, "aes256gcm")
    close = p.make_session_close(OP, SID, envelope.CloseCode.CLOSED_BY_OPERATOR, "bye", ts=NOW)
    key = p.make_key_announcement(NEW_DEV, DEVICE, SERVER, previous_key=DEV, ts=NOW)
    status = p.make_status(DEV, RID, DEVICE, SERVER, "1.0", 12.5, 1, 0, 10, [{
        "session_id": SID, "state": "open", "since": NOW, "operator": OP.fingerprint,
        "targets": ["127.0.0.1:22"], "remote_ip": "192.0.2.1", "bytes_in": 1, "bytes_out": 2,
    }], ts=NOW)
    alive = p.make_alive(DEV, DEVICE, SERVER, "1.0", 3.0, 0, 0, 10, 7, ts=NOW)
    queued = p.make_session_queued(DEV, SID, 3)
    refuse = p.make_session_refuse(DEV, SID, Reason.EXPIRED, "late\n")
    return {"request": req, "pooled_request": pooled, "status_request": status_req,
            "accept": accept, "close": close, "key": key, "status": status, "alive": alive,
            "queued": queued, "refuse": refuse}


VALID = _valid_messages()


def _every_reader(raw) -> None:
    """Feed ``raw`` to every function that reads a control message from outside."""
    for require in (True, False):
        msg = _outcome(p.decode, raw, require_signature=require)
        if msg is not None:
            # What decode accepted is schema-valid: it re-encodes (no signer) without error.
            p.encode(msg.type, msg.body)
    _outcome(_check, raw)
    _outcome(p.check_status_request, raw, DEVICE, SERVER, TRUSTED, p.ReplayCache(), now=NOW)
    _outcome(p.verify_session_accept, raw, DEV.public_bytes, SID, CONSOLE_EPK)
    _outcome(p.verify_status, raw, DEV.public_bytes, RID)
    _outcome(p.verify_key_announcement, raw)
    _outcome(p.verify_key_rotation, raw, DEV.public_bytes)
    msg = _outcome(p.decode, raw)
    if msg is not None:
        _outcome(envelope.verify_with_authorized, msg, TRUSTED)
        _outcome(p.verify, msg, OP.public_bytes)
    sid = p.best_effort_session_id(raw)
    assert sid is None or (isinstance(sid, str) and len(sid) == 32)


# ---------------------------------------------------------------- strategies

_SPECIAL_TEXT = st.sampled_from([
    "", "\x00", "\ud800", "\udfff", "\n", "\x7f", "\u2028", "\ufeff", "A" * 300,
    "SHA256:" + "A" * 43, SID, "127.0.0.1:22", "@sftp", "*:*", "[::1]:22", "aes256gcm",
])
_ANY_TEXT = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF,
                                           exclude_categories=()), max_size=40)
_SPECIAL_NUM = st.sampled_from([
    0, -1, 1, True, False, 2 ** 53, 2 ** 53 + 1, 2 ** 64, -(2 ** 63), 10 ** 300, 0.5,
    1e308, -0.0, NOW, NOW + 60,
])
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                     _ANY_TEXT, _SPECIAL_TEXT, _SPECIAL_NUM)
JSON_VALUES = st.recursive(
    _SCALARS,
    lambda kids: st.one_of(st.lists(kids, max_size=4),
                           st.dictionaries(st.one_of(_ANY_TEXT, _SPECIAL_TEXT), kids, max_size=4)),
    max_leaves=8)

_FIELD_NAMES = sorted({name for req, opt in envelope.SCHEMAS.values()
                       for name in list(req) + list(opt)}
                      | {"v", "type", "body", "sig", "signer"})


def _dumps(obj, ensure_ascii: bool) -> bytes:
    return json.dumps(obj, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")


# ---------------------------------------------------------------- properties


@examples(300)
@given(st.binary(max_size=600))
@example(b"")
@example(b"\xff\xfe{}")
@example(b'{"v":1,"type":"session.request","body":{}}\xc3')
@example(b"[" * 100000)
@example(b"{" * (p.MAX_MESSAGE_BYTES + 1))
@example(b'{"v": 1' + b"0" * 5000 + b"}")
@example(b'{"v": NaN}')
@example(b'{"v": Infinity, "v": -Infinity}')
@example(b"\x00" * 64)
def test_decode_arbitrary_bytes(raw):
    _every_reader(raw)
    _every_reader(bytearray(raw))


@examples(150)
@given(st.dictionaries(st.sampled_from(_FIELD_NAMES), JSON_VALUES, max_size=4),
       st.sampled_from(sorted(MsgType.ALL)),
       st.dictionaries(st.sampled_from(_FIELD_NAMES), JSON_VALUES, max_size=8),
       st.booleans())
def test_decode_wrong_types(envelope, msg_type, body, ensure_ascii):
    """Envelopes and bodies with the right field names and arbitrary JSON values."""
    env = {"v": 1, "type": msg_type, "body": body}
    env.update(envelope)
    try:
        raw = _dumps(env, ensure_ascii)
    except ValueError:  # e.g. a float json.dumps refuses; not a message anyone can send
        assume(False)
    _every_reader(raw)


@examples(200)
@given(st.sampled_from(sorted(VALID)), st.data())
def test_field_replaced_with_any_json(kind, data):
    """A valid message with one field (envelope or body) replaced, removed or added."""
    env = json.loads(VALID[kind])
    where = env if data.draw(st.booleans(), "envelope?") else env["body"]
    name = data.draw(st.sampled_from(sorted(where) + _FIELD_NAMES), "field")
    action = data.draw(st.sampled_from(["replace", "delete"]), "action")
    if action == "delete":
        where.pop(name, None)
    else:
        where[name] = data.draw(JSON_VALUES, "value")
    try:
        raw = _dumps(env, data.draw(st.booleans(), "ascii"))
    except ValueError:
        assume(False)
    _every_reader(raw)


_MUTATIONS = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10 ** 6), st.integers(1, 255)),
    st.tuples(st.just("delete"), st.integers(0, 10 ** 6), st.integers(1, 40)),
    st.tuples(st.just("insert"), st.integers(0, 10 ** 6), st.binary(min_size=1, max_size=20)),
    st.tuples(st.just("truncate"), st.integers(0, 10 ** 6), st.just(0)),
    st.tuples(st.just("space"), st.integers(0, 10 ** 6), st.sampled_from([b" ", b"\n", b"\t"])),
)


def _mutate(raw: bytes, ops) -> bytes:
    data = bytearray(raw)
    for op, pos, arg in ops:
        if not data:
            break
        i = pos % (len(data) + 1)
        if op == "flip" and i < len(data):
            data[i] ^= arg
        elif op == "delete":
            del data[i:i + arg]
        elif op in ("insert", "space"):
            data[i:i] = arg
        elif op == "truncate":
            del data[i:]
    return bytes(data)


@examples(300)
@given(st.sampled_from(sorted(VALID)), st.lists(_MUTATIONS, min_size=1, max_size=4))
def test_mutated_valid_messages(kind, ops):
    raw = _mutate(VALID[kind], ops)
    _every_reader(raw)
    if kind in ("request", "pooled_request"):
        # A mutation the agent still accepts must not have changed what was signed.
        got = _outcome(_check, raw)
        if got is not None:
            assert got.message.body == json.loads(VALID[kind])["body"]
            assert list(got.relay_pool) == got.message.body.get("relay_pool", [])


@examples(100)
@given(st.integers(1, 8100), st.sampled_from(["[", "{\"a\":"]),
       st.sampled_from(["targets", "ident", "sessions", "v", "body"]))
@example(8100, "[", "targets")
@example(2700, "{\"a\":", "body")
def test_deeply_nested(depth, opener, field_name):
    """Nesting deeper than the recursion limit (hypothesis raises it while a test runs:
    the examples go up to what fits in 16 KiB) is malformed, not a RecursionError."""
    closer = "]" if opener == "[" else "}"
    inner = opener * depth + "1" + closer * depth
    if field_name in ("v", "body"):
        text = '{"v":1,"type":"session.request","%s":%s}' % (field_name, inner)
    else:
        text = '{"v":1,"type":"status","body":{"%s":%s}}' % (field_name, inner)
    _every_reader(text.encode())


@examples(100)
@given(st.sampled_from(sorted(VALID)), st.sampled_from(["v", "type", "body", "sig", "signer"]),
       JSON_VALUES, st.booleans())
def test_duplicate_keys_refused(kind, name, value, body_level):
    """A key given twice (envelope or body) is malformed, never first- or last-wins."""
    raw = VALID[kind].decode()
    dup = '"%s":%s,' % (name, json.dumps(value))
    if body_level:
        env = json.loads(raw)
        name = sorted(env["body"])[0]
        dup = '"%s":%s,' % (name, json.dumps(value))
        i = raw.index('"body":{') + len('"body":{')
    else:
        i = 1
    mutated = (raw[:i] + dup + raw[i:]).encode()
    for require in (True, False):
        try:
            p.decode(mutated, require_signature=require)
        except p.ProtocolError as exc:
            assert exc.reason in (Reason.MALFORMED, Reason.TOO_LARGE), exc.reason
        else:
            raise AssertionError("duplicate key %r accepted" % name)
    _every_reader(mutated)


@examples(100)
@given(st.sampled_from(["iat", "exp", "ts", "position", "seq", "uptime", "v"]),
       st.integers(1, 6000), st.sampled_from(["", "-", "0.", "1e"]))
def test_huge_numbers(name, digits, prefix):
    for kind in ("request", "close", "alive", "queued", "status"):
        env = json.loads(VALID[kind])
        where = env if name == "v" else env["body"]
        if name not in where:
            continue
        placeholder = "__HUGE__"
        where[name] = placeholder
        raw = json.dumps(env).replace('"%s"' % placeholder, prefix + "9" * digits).encode()
        _every_reader(raw)


_HOSTS = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda a: "[%s]" % a),
    st.from_regex(r"\A[a-z]([a-z0-9-]{0,18}[a-z0-9])?(\.[a-z]([a-z0-9-]{0,18}[a-z0-9])?){0,3}\Z"),
)
_TARGETS = st.one_of(
    st.sampled_from(["@sftp", "@transfer", "*:*", "127.0.0.1:*", "*:22"]),
    st.builds(lambda h, port: "%s:%d" % (h, port), _HOSTS, st.integers(1, 65535)),
)


@examples(150)
@given(st.lists(_TARGETS, min_size=1, max_size=envelope.MAX_TARGETS, unique=True),
       st.integers(1, p.MAX_SESSION_LIFETIME), st.sampled_from(["aes256gcm", "xchacha20poly1305"]),
       st.binary(min_size=32, max_size=32), st.integers(0, 300))
def test_valid_request_round_trips(targets, ttl, cipher, ticket, age):
    epk = tc.kx_keypair()[0]
    sid, raw = p.make_session_request(OP, DEVICE, SERVER, epk, targets, "relay.example:8443",
                                      ticket, ttl=ttl, cipher=cipher, now=NOW - age)
    msg = p.decode(raw)
    assert p.encode(msg.type, msg.body, OP) == raw
    assert p.verify(msg, OP.public_bytes)
    cache = p.ReplayCache()
    if age > ttl + p.CLOCK_SKEW:
        try:
            _check(raw, cache)
        except p.Refused as exc:
            assert exc.reason == Reason.EXPIRED
        else:
            raise AssertionError("expired request accepted")
        return
    req = _check(raw, cache)
    assert (req.session_id, req.epk, req.ticket, req.cipher) == (sid, epk, ticket, cipher)
    assert [str(t) for t in req.targets] == [str(ak.TargetPattern.parse(t)) for t in targets]
    try:
        _check(raw, cache)
    except p.Refused as exc:
        assert exc.reason == Reason.REPLAYED
    else:
        raise AssertionError("replayed request accepted")


@examples(100)
@given(st.one_of(JSON_VALUES, st.binary(max_size=80)))
def test_reply_to_and_session_id_helpers(value):
    assert p.is_valid_reply_to(value) in (True, False)
    raw = value if isinstance(value, bytes) else _dumps({"body": {"session_id": value}}, True)
    sid = p.best_effort_session_id(raw)
    assert sid is None or sid == value
