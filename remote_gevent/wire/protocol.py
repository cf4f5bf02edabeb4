"""Control-plane messages: JSON envelope, size cap, schema, signatures, replay cache.

Everything that arrives over AMQP goes through :func:`decode` (size cap,
UTF-8 JSON object, version, known type, strict per-type schema) before any
code acts on it; session requests then go through
:func:`check_session_request` (device, operator, signature, time window,
replay, targets, in that order). Both raise exceptions carrying a refusal
reason code from :class:`Reason`, which the agent puts in its
``session.refuse`` reply and its log line.

Envelope (docs/protocol.md has every schema with an example)::

    {"v": 1, "type": "<type>", "body": {...}, "sig": "<b64>", "signer": "SHA256:..."}

The signature is ED25519 over ``b"remote-gevent/v1/" + type + b"\\0" +
canonical(body)``; the type in the signed input stops a signature made for
one message type from being replayed as another.

A *signer* is any object with ``.sign(data: bytes) -> bytes`` (the 64-byte
signature; a PyNaCl ``SignedMessage`` is accepted too) and ``.fingerprint``
(``SHA256:...``); for ``key`` announcements it must also expose its public
key (``public_raw``, ``public_key`` or ``verify_key``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import hmac
import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import nacl.exceptions
import nacl.signing

from remote_gevent.crypto.authkeys import (
    AuthorizedKeys,
    OperatorKey,
    TargetError,
    TargetPattern,
    effective_targets,
    fingerprint_of,
    is_target_allowed,
    parse_ssh_ed25519_line,
    ssh_pubkey_line,
)
from remote_gevent.wire.codes import CloseCode, Reason

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 16 * 1024
MAX_SESSION_LIFETIME = 300  # exp - iat of a session request, seconds
CLOCK_SKEW = 60  # seconds of clock difference tolerated each way
MAX_TARGETS = 32
MAX_REASON_CHARS = 256
MAX_DETAIL_CHARS = 120
MAX_STATUS_SESSIONS = 200  # entries in one ``status`` reply (fewer if 16 KiB would not fit)
DEFAULT_REQUEST_TTL = 60
DEFAULT_REPLAY_ENTRIES = 10000

DOMAIN = b"remote-gevent/v1/"
ROTATION_DOMAIN_TYPE = "key.rotate"


class MsgType:
    SESSION_REQUEST = "session.request"
    SESSION_QUEUED = "session.queued"
    SESSION_ACCEPT = "session.accept"
    SESSION_REFUSE = "session.refuse"
    SESSION_CLOSE = "session.close"
    ALIVE = "alive"
    KEY = "key"
    STATUS_REQUEST = "status.request"
    STATUS = "status"
    ALL = frozenset({
        SESSION_REQUEST, SESSION_QUEUED, SESSION_ACCEPT, SESSION_REFUSE, SESSION_CLOSE, ALIVE, KEY,
        STATUS_REQUEST, STATUS,
    })


ALIVE_EVENTS = frozenset({"started", "periodic", "key_rotated", "stopping"})


def short(value: Any, limit: int = 60) -> str:
    """A log/error-safe rendering of untrusted input: repr, ASCII-only, truncated."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value[:limit])
    text = ascii(value)
    if len(text) > limit:
        text = text[:limit] + "...(truncated)"
    return text


class ProtocolError(Exception):
    """A message failed decoding/validation/verification. ``reason`` ∈ Reason.ALL."""

    def __init__(self, reason: str, detail: str = "") -> None:
        detail = detail[:MAX_DETAIL_CHARS * 2]
        super().__init__("%s: %s" % (reason, detail) if detail else reason)
        self.reason = reason
        self.detail = detail


class Refused(ProtocolError):
    """A well-formed request the agent will not serve; ``reason`` goes in session.refuse."""


# ---------------------------------------------------------------- canonical form, signing


def canonical(body: Dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def signing_input(msg_type: str, body: Dict[str, Any]) -> bytes:
    """Bytes covered by a signature: domain | type | NUL | canonical(body)."""
    return DOMAIN + msg_type.encode("ascii") + b"\0" + canonical(body)


def b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _sign(signer: Any, data: bytes) -> bytes:
    sig = signer.sign(data)
    sig = getattr(sig, "signature", sig)  # PyNaCl SignedMessage
    sig = bytes(sig)
    if len(sig) != 64:
        raise ValueError("signer returned %d bytes, expected a 64-byte ed25519 signature"
                         % len(sig))
    return sig


def _verify_raw(public_raw32: bytes, data: bytes, sig: bytes) -> bool:
    try:
        nacl.signing.VerifyKey(bytes(public_raw32)).verify(data, sig)
        return True
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError,
            nacl.exceptions.TypeError):
        return False


def public_raw_of(key: Any) -> bytes:
    """The 32-byte ED25519 public key of a signer object (several spellings accepted)."""
    for attr in ("public_bytes", "public_raw", "public_raw32", "public_key", "verify_key"):
        value = getattr(key, attr, None)
        if value is None:
            continue
        if callable(value) and not isinstance(value, (bytes, bytearray)):
            value = value()
        if isinstance(value, nacl.signing.VerifyKey):
            value = bytes(value)
        if isinstance(value, (bytes, bytearray)) and len(value) == 32:
            return bytes(value)
    raise TypeError("cannot find the 32-byte public key of %r" % type(key).__name__)


# ---------------------------------------------------------------- message + codec


@dataclass(frozen=True)
class Message:
    """A decoded, schema-checked (not yet signature-checked) control message."""

    type: str
    body: Dict[str, Any]
    sig: Optional[bytes] = None
    signer: Optional[str] = None
    v: int = PROTOCOL_VERSION
    raw: bytes = field(default=b"", repr=False, compare=False)

    @property
    def session_id(self) -> Optional[str]:
        return self.body.get("session_id")

    def signed_bytes(self) -> bytes:
        return signing_input(self.type, self.body)


def encode(msg_type: str, body: Dict[str, Any], signer: Any = None) -> bytes:
    """Serialize (and sign, when ``signer`` is given) one message.

    The body is validated against its schema first, so we never publish
    something the peer would refuse as malformed. Raises ProtocolError.
    """
    if msg_type not in MsgType.ALL:
        raise ProtocolError(Reason.MALFORMED, "unknown type %s" % short(msg_type))
    _check_body(msg_type, body)
    env: Dict[str, Any] = {"v": PROTOCOL_VERSION, "type": msg_type, "body": body}
    if signer is not None:
        env["sig"] = b64e(_sign(signer, signing_input(msg_type, body)))
        env["signer"] = signer.fingerprint
    raw = json.dumps(env, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                     allow_nan=False).encode("ascii")
    if len(raw) > MAX_MESSAGE_BYTES:
        raise ProtocolError(Reason.TOO_LARGE, "%d bytes > %d" % (len(raw), MAX_MESSAGE_BYTES))
    return raw


def _no_duplicates(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    # A duplicate key would let two parsers disagree on what was signed.
    out: Dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError("duplicate key %s" % short(k))
        out[k] = v
    return out


def _bad_constant(name: str) -> Any:
    raise ValueError("non-finite number %s" % name)


def decode(raw: bytes, require_signature: bool = True) -> Message:
    """Parse and schema-check one message. Raises ProtocolError(reason, detail)."""
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise ProtocolError(Reason.MALFORMED, "message is not bytes")
    if len(raw) > MAX_MESSAGE_BYTES:
        raise ProtocolError(Reason.TOO_LARGE, "%d bytes > %d" % (len(raw), MAX_MESSAGE_BYTES))
    raw = bytes(raw)
    try:
        text = raw.decode("utf-8")
        env = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_bad_constant)
    except UnicodeDecodeError:
        raise ProtocolError(Reason.MALFORMED, "not UTF-8: %s" % short(raw)) from None
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(Reason.MALFORMED, "not JSON: %s" % short(str(exc), 100)) from None
    if not isinstance(env, dict):
        raise ProtocolError(Reason.MALFORMED, "not a JSON object")
    extra = set(env) - {"v", "type", "body", "sig", "signer"}
    if extra:
        raise ProtocolError(Reason.MALFORMED, "unknown envelope keys %s" % short(sorted(extra)))
    v = env.get("v")
    if type(v) is not int or v != PROTOCOL_VERSION:
        raise ProtocolError(Reason.MALFORMED, "unsupported version %s" % short(v))
    msg_type = env.get("type")
    if not isinstance(msg_type, str) or msg_type not in MsgType.ALL:
        raise ProtocolError(Reason.MALFORMED, "unknown type %s" % short(msg_type))
    body = env.get("body")
    if not isinstance(body, dict):
        raise ProtocolError(Reason.MALFORMED, "%s: body is not an object" % msg_type)
    _check_body(msg_type, body)
    sig = signer = None
    if "sig" in env or "signer" in env or require_signature:
        sig = _b64_field(env, "sig", 64, msg_type + " envelope")
        signer = env.get("signer")
        if not isinstance(signer, str) or not _FP_RE.match(signer):
            raise ProtocolError(Reason.MALFORMED, "%s: bad signer %s" % (msg_type, short(signer)))
    return Message(msg_type, body, sig, signer, v, raw)


def verify(message: Message, public_raw32: bytes) -> bool:
    """Check ``message``'s signature with ``public_raw32``; True or ProtocolError.

    Also requires the envelope's ``signer`` to be that key's fingerprint.
    """
    if message.sig is None:
        raise ProtocolError(Reason.BAD_SIGNATURE, "%s is not signed" % message.type)
    if message.signer != fingerprint_of(public_raw32):
        raise ProtocolError(Reason.BAD_SIGNATURE, "%s signed by %s, not by the expected key"
                            % (message.type, short(message.signer)))
    if not _verify_raw(public_raw32, message.signed_bytes(), message.sig):
        raise ProtocolError(Reason.BAD_SIGNATURE, "%s: signature does not verify" % message.type)
    return True


def verify_with_authorized(message: Message, trusted: AuthorizedKeys) -> OperatorKey:
    """Verify a console-signed message (e.g. ``session.close``) against the trusted keys."""
    op = trusted.get(message.signer or "")
    if op is None:
        raise Refused(Reason.UNKNOWN_OPERATOR, "signer %s not in %s"
                      % (short(message.signer), trusted.source))
    try:
        verify(message, op.public_raw32)
    except ProtocolError as exc:
        raise Refused(exc.reason, exc.detail) from None
    return op


# ---------------------------------------------------------------- schema

_SID_RE = re.compile(r"^[0-9a-f]{32}\Z")
_IDENT_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")
_SERVER_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}\Z")
_FP_RE = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}\Z")
_MAX_INT = 2 ** 53  # stays exact in every JSON implementation
_CIPHERS = ("aes256gcm", "xchacha20poly1305")

Validator = Callable[[str, str, Any], None]


def _fail(where: str, name: str, what: str, value: Any) -> ProtocolError:
    return ProtocolError(Reason.MALFORMED, "%s.%s: %s (got %s)" % (where, name, what, short(value)))


def _b64_field(obj: Dict[str, Any], name: str, size: int, where: str) -> bytes:
    value = obj.get(name)
    if not isinstance(value, str) or len(value) > 4 * ((size + 2) // 3):
        raise _fail(where, name, "expected base64 of %d bytes" % size, value)
    try:
        data = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise _fail(where, name, "invalid base64", value) from None
    if len(data) != size:
        raise _fail(where, name, "expected %d bytes, got %d" % (size, len(data)), value)
    return data


def _regex(rx: "re.Pattern[str]", what: str) -> Validator:
    def check(where: str, name: str, value: Any) -> None:
        if not isinstance(value, str) or not rx.match(value):
            raise _fail(where, name, what, value)
    return check


def _b64(size: int) -> Validator:
    def check(where: str, name: str, value: Any) -> None:
        _b64_field({name: value}, name, size, where)
    return check


def _int(lo: int = 0, hi: int = _MAX_INT) -> Validator:
    def check(where: str, name: str, value: Any) -> None:
        if type(value) is not int or not lo <= value <= hi:  # bool is not an int here
            raise _fail(where, name, "expected an integer in [%d, %d]" % (lo, hi), value)
    return check


def _number(where: str, name: str, value: Any) -> None:
    if type(value) not in (int, float) or not 0 <= value <= _MAX_INT:
        raise _fail(where, name, "expected a non-negative number", value)


def _text(max_chars: int, allow_empty: bool = True) -> Validator:
    def check(where: str, name: str, value: Any) -> None:
        if not isinstance(value, str) or len(value) > max_chars or (not value and not allow_empty):
            raise _fail(where, name, "expected a string of at most %d chars" % max_chars, value)
        # No control characters or lone surrogates: this text ends up in logs.
        if any(c < " " or c == "\x7f" or "\ud800" <= c <= "\udfff" for c in value):
            raise _fail(where, name, "control characters not allowed", value)
    return check


def _one_of(values: Sequence[str]) -> Validator:
    allowed = frozenset(values)

    def check(where: str, name: str, value: Any) -> None:
        if not isinstance(value, str) or value not in allowed:
            raise _fail(where, name, "expected one of %s" % ", ".join(sorted(allowed)), value)
    return check


def _targets(where: str, name: str, value: Any) -> None:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_TARGETS:
        raise _fail(where, name, "expected a list of 1..%d targets" % MAX_TARGETS,
                    len(value) if isinstance(value, list) else value)
    for item in value:
        try:
            TargetPattern.parse(item)
        except TargetError as exc:
            raise _fail(where, name, str(exc), item) from None


def _relay(where: str, name: str, value: Any) -> None:
    try:
        t = TargetPattern.parse(value, pattern=False)
    except TargetError as exc:
        raise _fail(where, name, str(exc), value) from None
    if t.virtual:
        raise _fail(where, name, "expected host:port", value)


def _pubkey_line(where: str, name: str, value: Any) -> None:
    _text(512, allow_empty=False)(where, name, value)
    try:
        parse_ssh_ed25519_line(value)
    except ValueError as exc:
        raise _fail(where, name, str(exc), value) from None


def _status_sessions(where: str, name: str, value: Any) -> None:
    if not isinstance(value, list) or len(value) > MAX_STATUS_SESSIONS:
        raise _fail(where, name, "expected a list of at most %d sessions" % MAX_STATUS_SESSIONS,
                    len(value) if isinstance(value, list) else value)
    for i, entry in enumerate(value):
        item = "%s.%s[%d]" % (where, name, i)
        if not isinstance(entry, dict):
            raise _fail(where, "%s[%d]" % (name, i), "expected an object", entry)
        _check_fields(item, entry, _STATUS_ENTRY, {})


def _short_texts(max_items: int, max_chars: int) -> Validator:
    def check(where: str, name: str, value: Any) -> None:
        if not isinstance(value, list) or len(value) > max_items:
            raise _fail(where, name, "expected a list of at most %d strings" % max_items,
                        len(value) if isinstance(value, list) else value)
        for item in value:
            _text(max_chars, allow_empty=False)(where, name, item)
    return check


_session_id = _regex(_SID_RE, "expected 32 lowercase hex chars")
_fingerprint = _regex(_FP_RE, "expected an SHA256:... fingerprint")
_ident = _regex(_IDENT_RE, "expected [A-Za-z0-9_-]{1,64}")
_server_id = _regex(_SERVER_ID_RE, "expected [A-Za-z0-9_-]{1,32}")
_epk = _b64(32)
_cipher = _one_of(_CIPHERS)
_reason_text = _text(MAX_REASON_CHARS)

# type -> (required fields, optional fields)
SCHEMAS: Dict[str, Tuple[Dict[str, Validator], Dict[str, Validator]]] = {
    MsgType.SESSION_REQUEST: ({
        "session_id": _session_id, "device": _ident, "server_id": _server_id,
        "operator": _fingerprint, "epk": _epk, "targets": _targets, "relay": _relay,
        "ticket": _b64(32), "iat": _int(), "exp": _int(), "cipher": _cipher,
    }, {}),
    MsgType.SESSION_QUEUED: ({"session_id": _session_id, "position": _int(0, 1000000)}, {}),
    MsgType.SESSION_ACCEPT: ({
        "session_id": _session_id, "epk": _epk, "console_epk": _epk, "cipher": _cipher,
        "device_key": _fingerprint,
    }, {}),
    MsgType.SESSION_REFUSE: ({
        "session_id": _session_id, "code": _one_of(sorted(Reason.ALL)), "reason": _reason_text,
    }, {}),
    MsgType.SESSION_CLOSE: ({
        "session_id": _session_id, "code": _one_of(sorted(CloseCode.ALL)),
        "reason": _reason_text, "ts": _number,
    }, {}),
    MsgType.ALIVE: ({
        "ident": _ident, "server_id": _server_id, "version": _text(64, allow_empty=False),
        "uptime": _number, "sessions_active": _int(0, 1000000),
        "sessions_waiting": _int(0, 1000000), "max_session": _int(0, 1000000),
        "fingerprint": _fingerprint, "seq": _int(), "ts": _number,
        "event": _one_of(sorted(ALIVE_EVENTS)),
    }, {}),
    MsgType.KEY: ({
        "ident": _ident, "server_id": _server_id, "pubkey": _pubkey_line,
        "fingerprint": _fingerprint, "ts": _number,
    }, {"previous": _fingerprint, "rotation_sig": _b64(64)}),
    MsgType.STATUS_REQUEST: ({
        "request_id": _session_id, "device": _ident, "server_id": _server_id,
        "operator": _fingerprint, "iat": _int(), "exp": _int(),
    }, {}),
    MsgType.STATUS: ({
        "request_id": _session_id, "ident": _ident, "server_id": _server_id,
        "fingerprint": _fingerprint, "version": _text(64, allow_empty=False),
        "uptime": _number, "sessions_active": _int(0, 1000000),
        "sessions_waiting": _int(0, 1000000), "max_session": _int(0, 1000000),
        "sessions_total": _int(0, 1000000), "sessions": _status_sessions, "ts": _number,
    }, {}),
}

# One entry of ``status.sessions`` (what an operator needs to find and close a session).
_STATUS_ENTRY: Dict[str, Validator] = {
    "session_id": _session_id, "state": _text(16, allow_empty=False), "since": _number,
    "operator": _text(64), "targets": _short_texts(MAX_TARGETS, 300),
    "remote_ip": _text(64), "bytes_in": _int(), "bytes_out": _int(),
}


def _check_fields(where: str, body: Dict[str, Any], required: Dict[str, Validator],
                  optional: Dict[str, Validator]) -> None:
    missing = [k for k in required if k not in body]
    if missing:
        raise ProtocolError(Reason.MALFORMED, "%s: missing %s" % (where, ", ".join(missing)))
    unknown = [k for k in body if k not in required and k not in optional]
    if unknown:
        raise ProtocolError(Reason.MALFORMED, "%s: unknown fields %s"
                            % (where, short(sorted(unknown))))
    for name, check in required.items():
        check(where, name, body[name])
    for name, check in optional.items():
        if name in body:
            check(where, name, body[name])


def _check_body(msg_type: str, body: Dict[str, Any]) -> None:
    required, optional = SCHEMAS[msg_type]
    if not isinstance(body, dict):
        raise ProtocolError(Reason.MALFORMED, "%s: body is not an object" % msg_type)
    _check_fields(msg_type, body, required, optional)
    if msg_type == MsgType.KEY and (("previous" in body) != ("rotation_sig" in body)):
        raise ProtocolError(Reason.MALFORMED, "key: previous and rotation_sig go together")


# ---------------------------------------------------------------- replay cache


class ReplayCache:
    """Remembers accepted session ids until ``exp + CLOCK_SKEW``.

    Memory is bounded by ``max_entries``. When full, expired ids are evicted
    first; if every remembered id is still within its validity window, the
    new request is refused (``rate_limited``) instead of forgetting an old
    id: forgetting one would let that still-valid request be replayed,
    whereas refusing only delays a legitimate operator (and filling the
    cache takes thousands of validly signed requests within ~7 minutes,
    since the signature is checked before the cache is touched).

    In memory only: after an agent restart a captured request could be
    replayed within its (at most 5 minute) validity. That is harmless for
    confidentiality — the replayer lacks the console's ephemeral secret key
    and cannot complete the tunnel — and costs at most one slot until the
    relay pairing times out. Not greenlet-switching: safe under gevent.
    """

    def __init__(self, max_entries: int = DEFAULT_REPLAY_ENTRIES, skew: int = CLOCK_SKEW) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = max_entries
        self.skew = skew
        self._expiry: Dict[str, float] = {}
        self._heap: List[Tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._expiry)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._expiry

    def purge(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] < now:
            until, sid = heapq.heappop(heap)
            if self._expiry.get(sid) == until:
                del self._expiry[sid]

    def check_and_add(self, session_id: str, exp: float, now: Optional[float] = None) -> None:
        """Record ``session_id``; raise Refused(replayed / rate_limited) if we must not serve it."""
        if now is None:
            now = time.time()
        until = exp + self.skew
        known = self._expiry.get(session_id)
        if known is not None and known >= now:
            raise Refused(Reason.REPLAYED, "session %s already seen" % session_id)
        if len(self._expiry) >= self.max_entries:
            self.purge(now)
            if len(self._expiry) >= self.max_entries:
                raise Refused(Reason.RATE_LIMITED, "replay cache full (%d unexpired requests)"
                              % self.max_entries)
        self._expiry[session_id] = until
        heapq.heappush(self._heap, (until, session_id))


# ---------------------------------------------------------------- session.request


def new_session_id() -> str:
    return os.urandom(16).hex()


def new_ticket() -> bytes:
    return os.urandom(32)


def make_session_request(
    operator_key: Any,
    device: str,
    server_id: str,
    epk: bytes,
    targets: Sequence[str],
    relay: str,
    ticket: bytes,
    ttl: int = DEFAULT_REQUEST_TTL,
    cipher: str = "aes256gcm",
    session_id: Optional[str] = None,
    now: Optional[float] = None,
) -> Tuple[str, bytes]:
    """Build a signed ``session.request`` (console side); returns ``(session_id, raw)``."""
    if not 1 <= ttl <= MAX_SESSION_LIFETIME:
        raise ValueError("ttl must be in [1, %d]" % MAX_SESSION_LIFETIME)
    iat = int(time.time() if now is None else now)
    sid = session_id or new_session_id()
    body = {
        "session_id": sid, "device": device, "server_id": server_id,
        "operator": operator_key.fingerprint, "epk": b64e(epk),
        "targets": [str(t) for t in targets], "relay": str(relay), "ticket": b64e(ticket),
        "iat": iat, "exp": iat + int(ttl), "cipher": cipher,
    }
    return sid, encode(MsgType.SESSION_REQUEST, body, operator_key)


@dataclass(frozen=True)
class SessionRequest:
    """An accepted session request, as the agent acts on it."""

    session_id: str
    operator: OperatorKey
    epk: bytes
    ticket: bytes = field(repr=False)
    relay: str
    targets: Tuple[TargetPattern, ...]  # as requested
    effective: Tuple[TargetPattern, ...]  # requested ∩ device allow ∩ operator permitopen
    iat: int
    exp: int
    cipher: str
    message: Message = field(repr=False, compare=False)

    def permits(self, target: Any) -> bool:
        """Per-stream check at OPEN time (e.g. each SOCKS CONNECT of a ``*:*`` session)."""
        return is_target_allowed(target, self.effective, ())


def _check_operator_request(msg: Any, msg_type: str, id_field: str, label: str,
                            device: str, server_id: str, trusted: AuthorizedKeys,
                            replay_cache: ReplayCache, now: Optional[float]
                            ) -> Tuple[Message, OperatorKey, str]:
    """The trust checks shared by every operator-signed request, in their fixed order:
    schema, signer = operator, device, operator trusted, signature, time window, replay.

    Cheap checks come first and the replay cache is only touched by validly signed,
    current requests, so strangers cannot fill it. Returns (message, operator, id).
    """
    if now is None:
        now = time.time()
    try:
        if not isinstance(msg, Message):
            msg = decode(msg)
        if msg.type != msg_type:
            raise ProtocolError(Reason.MALFORMED, "expected %s, got %s" % (msg_type, msg.type))
        if msg.signer != msg.body["operator"]:
            raise ProtocolError(Reason.MALFORMED, "envelope signer differs from body.operator")
    except Refused:
        raise
    except ProtocolError as exc:
        raise Refused(exc.reason, exc.detail) from None
    b = msg.body
    rid = b[id_field]
    if b["device"] != device or b["server_id"] != server_id:
        raise Refused(Reason.WRONG_DEVICE, "%s %s is for %s/%s, we are %s/%s"
                      % (label, rid, b["server_id"], b["device"], server_id, device))
    op = trusted.get(b["operator"])
    if op is None:
        raise Refused(Reason.UNKNOWN_OPERATOR, "%s %s: operator %s not trusted"
                      % (label, rid, b["operator"]))
    if not _verify_raw(op.public_raw32, msg.signed_bytes(), msg.sig or b""):
        raise Refused(Reason.BAD_SIGNATURE, "%s %s: signature by %s does not verify"
                      % (label, rid, op.fingerprint))
    iat, exp = b["iat"], b["exp"]
    if iat > now + CLOCK_SKEW:
        raise Refused(Reason.EXPIRED, "%s %s: issued %ds in the future" % (label, rid, iat - now))
    if exp < iat or exp - iat > MAX_SESSION_LIFETIME:
        raise Refused(Reason.EXPIRED, "%s %s: lifetime %ds outside [0, %d]"
                      % (label, rid, exp - iat, MAX_SESSION_LIFETIME))
    if exp + CLOCK_SKEW < now:
        raise Refused(Reason.EXPIRED, "%s %s: expired %ds ago" % (label, rid, now - exp))
    replay_cache.check_and_add(rid, exp, now)
    return msg, op, rid


def check_session_request(
    msg: Any,
    device: str,
    server_id: str,
    trusted: AuthorizedKeys,
    allow: Sequence[Any],
    replay_cache: ReplayCache,
    now: Optional[float] = None,
) -> SessionRequest:
    """Decide whether the agent serves a session request; raise Refused(reason, detail) if not.

    ``msg`` is raw bytes or a decoded Message. Checks, in order: schema
    (``malformed``/``too_large``), device and server id (``wrong_device``),
    operator known (``unknown_operator``), signature (``bad_signature``),
    time window with CLOCK_SKEW (``expired``: past exp, iat in the future,
    or a lifetime over MAX_SESSION_LIFETIME), replay (``replayed``), targets
    permitted by both the device allow-list and the operator's permitopen
    (``target_not_permitted``). The cheap checks come first and the replay
    cache is only touched by validly signed, current requests, so strangers
    cannot fill it.
    """
    msg, op, sid = _check_operator_request(msg, MsgType.SESSION_REQUEST, "session_id",
                                           "session", device, server_id, trusted,
                                           replay_cache, now)
    b = msg.body
    effective, refused = effective_targets(b["targets"], allow, op.permitopen)
    if refused:
        raise Refused(Reason.TARGET_NOT_PERMITTED, "session %s: %s not permitted for %s"
                      % (sid, ", ".join(str(t) for t in refused), op.fingerprint))
    return SessionRequest(
        session_id=sid, operator=op, epk=base64.b64decode(b["epk"]),
        ticket=base64.b64decode(b["ticket"]), relay=b["relay"],
        targets=tuple(TargetPattern.parse(t) for t in b["targets"]),
        effective=tuple(effective), iat=b["iat"], exp=b["exp"], cipher=b["cipher"],
        message=msg,
    )


# ---------------------------------------------------------------- agent replies


def make_session_accept(identity: Any, session_id: str, epk: bytes, console_epk: bytes,
                        cipher: str) -> bytes:
    """Signed ``session.accept``: binds session id, both ephemeral keys and the cipher
    to the device's identity key."""
    body = {"session_id": session_id, "epk": b64e(epk), "console_epk": b64e(console_epk),
            "cipher": cipher, "device_key": identity.fingerprint}
    return encode(MsgType.SESSION_ACCEPT, body, identity)


@dataclass(frozen=True)
class Accepted:
    session_id: str
    epk: bytes  # the agent's ephemeral curve25519 key
    cipher: str


def verify_session_accept(msg: Any, pinned_device_raw32: bytes, session_id: str,
                          console_epk: bytes) -> Accepted:
    """Console side: accept only a reply signed by the pinned device key for *this* request.

    Raises ProtocolError: ``bad_signature`` (not the pinned key, bad
    signature), ``replayed`` (an accept for another session or another
    console key), ``malformed``.
    """
    if not isinstance(msg, Message):
        msg = decode(msg)
    if msg.type != MsgType.SESSION_ACCEPT:
        raise ProtocolError(Reason.MALFORMED, "expected session.accept, got %s" % msg.type)
    b = msg.body
    if b["device_key"] != fingerprint_of(pinned_device_raw32):
        raise ProtocolError(Reason.BAD_SIGNATURE, "accept names device key %s, pinned is %s"
                            % (b["device_key"], fingerprint_of(pinned_device_raw32)))
    verify(msg, pinned_device_raw32)
    if b["session_id"] != session_id:
        raise ProtocolError(Reason.REPLAYED, "accept is for session %s, not %s"
                            % (b["session_id"], session_id))
    if not hmac.compare_digest(base64.b64decode(b["console_epk"]), bytes(console_epk)):
        raise ProtocolError(Reason.REPLAYED, "session %s: accept binds another console key"
                            % session_id)
    return Accepted(session_id, base64.b64decode(b["epk"]), b["cipher"])


def make_session_queued(identity: Any, session_id: str, position: int) -> bytes:
    return encode(MsgType.SESSION_QUEUED, {"session_id": session_id, "position": position},
                  identity)


def make_session_refuse(identity: Any, session_id: str, code: str, reason: str = "") -> bytes:
    """Signed refusal; ``reason`` (human text) is sanitized and truncated, never echoed raw."""
    return encode(MsgType.SESSION_REFUSE, {"session_id": session_id, "code": code,
                                           "reason": _clean(reason)}, identity)


def make_session_close(signer: Any, session_id: str, code: str, reason: str = "",
                       ts: Optional[float] = None) -> bytes:
    body = {"session_id": session_id, "code": code, "reason": _clean(reason),
            "ts": int(time.time()) if ts is None else ts}
    return encode(MsgType.SESSION_CLOSE, body, signer)


def make_alive(identity: Any, ident: str, server_id: str, version: str, uptime: float,
               sessions_active: int, sessions_waiting: int, max_session: int, seq: int,
               event: str = "periodic", ts: Optional[float] = None) -> bytes:
    body = {
        "ident": ident, "server_id": server_id, "version": version,
        "uptime": round(float(uptime), 3), "sessions_active": sessions_active,
        "sessions_waiting": sessions_waiting, "max_session": max_session,
        "fingerprint": identity.fingerprint, "seq": seq,
        "ts": int(time.time()) if ts is None else ts, "event": event,
    }
    return encode(MsgType.ALIVE, body, identity)


def _clean(text: str) -> str:
    text = "".join(c if " " <= c < "\x7f" else "?" for c in str(text))
    return text[:MAX_REASON_CHARS]


# ---------------------------------------------------------------- key publication / rotation


def _rotation_body(ident: str, new_fp: str, old_fp: str, ts: Any) -> Dict[str, Any]:
    return {"ident": ident, "new": new_fp, "old": old_fp, "ts": ts}


def make_key_announcement(new_key: Any, ident: str, server_id: str, previous_key: Any = None,
                          ts: Optional[float] = None) -> bytes:
    """Signed ``key`` message. With ``previous_key`` it is a rotation: it carries the
    old fingerprint and the old key's signature over
    ``{ident, new, old, ts}`` (domain ``key.rotate``), so a console that pinned
    the old key can follow the chain."""
    raw = public_raw_of(new_key)
    ts = int(time.time()) if ts is None else ts
    body: Dict[str, Any] = {"ident": ident, "server_id": server_id,
                            "pubkey": ssh_pubkey_line(raw), "fingerprint": fingerprint_of(raw),
                            "ts": ts}
    if new_key.fingerprint != body["fingerprint"]:
        raise ValueError("new_key.fingerprint does not match its public key")
    if previous_key is not None:
        old_fp = previous_key.fingerprint
        rot = _rotation_body(ident, body["fingerprint"], old_fp, ts)
        body["previous"] = old_fp
        body["rotation_sig"] = b64e(_sign(previous_key,
                                          signing_input(ROTATION_DOMAIN_TYPE, rot)))
    return encode(MsgType.KEY, body, new_key)


@dataclass(frozen=True)
class KeyAnnouncement:
    ident: str
    server_id: str
    public_raw32: bytes
    fingerprint: str
    previous: Optional[str]
    ts: float


def verify_key_announcement(msg: Any) -> KeyAnnouncement:
    """Check a ``key`` message is self-consistent and signed by the key it announces.

    This alone proves possession, not authenticity: use it for trust on
    first sight; a change of a pinned key needs :func:`verify_key_rotation`.
    """
    if not isinstance(msg, Message):
        msg = decode(msg)
    if msg.type != MsgType.KEY:
        raise ProtocolError(Reason.MALFORMED, "expected key, got %s" % msg.type)
    b = msg.body
    raw, _ = parse_ssh_ed25519_line(b["pubkey"])
    if fingerprint_of(raw) != b["fingerprint"]:
        raise ProtocolError(Reason.MALFORMED, "key: fingerprint does not match pubkey")
    verify(msg, raw)
    return KeyAnnouncement(b["ident"], b["server_id"], raw, b["fingerprint"],
                           b.get("previous"), b["ts"])


def verify_key_rotation(msg: Any, pinned_raw32: bytes) -> bytes:
    """Console side: return the key to pin after this ``key`` message.

    Same key as pinned → ``pinned_raw32``. A new key → only if the message is
    a rotation whose ``previous`` is the pinned key and whose
    ``rotation_sig`` verifies under it; else ProtocolError(bad_signature).
    """
    ann = verify_key_announcement(msg)
    if hmac.compare_digest(ann.public_raw32, bytes(pinned_raw32)):
        return bytes(pinned_raw32)
    pinned_fp = fingerprint_of(pinned_raw32)
    b = msg.body if isinstance(msg, Message) else decode(msg).body
    if ann.previous is None:
        raise ProtocolError(Reason.BAD_SIGNATURE, "%s: new key %s without a rotation signature"
                            " (pinned %s)" % (ann.ident, ann.fingerprint, pinned_fp))
    if ann.previous != pinned_fp:
        raise ProtocolError(Reason.BAD_SIGNATURE, "%s: rotation from %s, pinned key is %s"
                            % (ann.ident, ann.previous, pinned_fp))
    rot = _rotation_body(ann.ident, ann.fingerprint, ann.previous, b["ts"])
    sig = base64.b64decode(b["rotation_sig"])
    if not _verify_raw(pinned_raw32, signing_input(ROTATION_DOMAIN_TYPE, rot), sig):
        raise ProtocolError(Reason.BAD_SIGNATURE, "%s: rotation signature does not verify"
                            % ann.ident)
    return ann.public_raw32


# ---------------------------------------------------------------- status


def make_status_request(operator_key: Any, device: str, server_id: str,
                        ttl: int = DEFAULT_REQUEST_TTL, request_id: Optional[str] = None,
                        now: Optional[float] = None) -> Tuple[str, bytes]:
    """Signed ``status.request`` (console side); returns ``(request_id, raw)``.

    Sent on ``remote.down`` ``<topic>.status`` with ``reply_to`` and
    ``correlation_id`` = ``request_id``, like a session request.
    """
    if not 1 <= ttl <= MAX_SESSION_LIFETIME:
        raise ValueError("ttl must be in [1, %d]" % MAX_SESSION_LIFETIME)
    iat = int(time.time() if now is None else now)
    rid = request_id or new_session_id()
    body = {"request_id": rid, "device": device, "server_id": server_id,
            "operator": operator_key.fingerprint, "iat": iat, "exp": iat + int(ttl)}
    return rid, encode(MsgType.STATUS_REQUEST, body, operator_key)


@dataclass(frozen=True)
class StatusRequest:
    request_id: str
    operator: OperatorKey
    iat: int
    exp: int
    message: Message = field(repr=False, compare=False)


def check_status_request(msg: Any, device: str, server_id: str, trusted: AuthorizedKeys,
                         replay_cache: ReplayCache, now: Optional[float] = None
                         ) -> StatusRequest:
    """Decide whether the agent answers a ``status.request``; raise Refused if not.

    Same rules and order as :func:`check_session_request` (schema, signer =
    operator, device, operator trusted, signature, time window, replay): the
    session list names operators and targets, so only a trusted operator may
    read it, and a captured request cannot be replayed to keep polling.
    """
    msg, op, rid = _check_operator_request(msg, MsgType.STATUS_REQUEST, "request_id",
                                           "status", device, server_id, trusted,
                                           replay_cache, now)
    return StatusRequest(rid, op, msg.body["iat"], msg.body["exp"], msg)


def make_status(identity: Any, request_id: str, ident: str, server_id: str, version: str,
                uptime: float, sessions_active: int, sessions_waiting: int, max_session: int,
                sessions: Sequence[Dict[str, Any]], ts: Optional[float] = None) -> bytes:
    """Signed ``status`` reply. ``sessions`` entries follow the ``status`` schema
    (session_id, state, since, operator, targets, remote_ip, bytes_in, bytes_out).

    At most :data:`MAX_STATUS_SESSIONS` entries are sent, fewer when the message
    would exceed 16 KiB; ``sessions_total`` always says how many there were.
    """
    entries = list(sessions)
    body = {
        "request_id": request_id, "ident": ident, "server_id": server_id,
        "fingerprint": identity.fingerprint, "version": version,
        "uptime": round(float(uptime), 3), "sessions_active": sessions_active,
        "sessions_waiting": sessions_waiting, "max_session": max_session,
        "sessions_total": len(entries), "sessions": entries[:MAX_STATUS_SESSIONS],
        "ts": int(time.time()) if ts is None else ts,
    }
    entries = body["sessions"]

    def attempt(count: int) -> Optional[bytes]:
        try:
            return encode(MsgType.STATUS, dict(body, sessions=entries[:count]), identity)
        except ProtocolError as exc:
            if exc.reason != Reason.TOO_LARGE:
                raise
            return None

    raw = attempt(len(entries))
    if raw is not None:
        return raw
    lo, hi = 0, len(entries)  # attempt(lo) fits, attempt(hi) does not
    best = attempt(0)
    if best is None:
        raise ProtocolError(Reason.TOO_LARGE, "status without sessions does not fit")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        raw = attempt(mid)
        if raw is None:
            hi = mid
        else:
            lo, best = mid, raw
    return best


def verify_status(msg: Any, pinned_device_raw32: bytes, request_id: str) -> Dict[str, Any]:
    """Console side: the body of a ``status`` reply signed by the pinned device key for
    *this* request; ProtocolError (``bad_signature``, ``replayed``, ``malformed``) if not."""
    if not isinstance(msg, Message):
        msg = decode(msg)
    if msg.type != MsgType.STATUS:
        raise ProtocolError(Reason.MALFORMED, "expected status, got %s" % msg.type)
    verify(msg, pinned_device_raw32)
    if msg.body["request_id"] != request_id:
        raise ProtocolError(Reason.REPLAYED, "status answers request %s, not %s"
                            % (msg.body["request_id"], request_id))
    return msg.body


def request_digest(raw: bytes) -> str:
    """Short stable id of a raw message for logs (never log the message itself)."""
    return hashlib.sha256(raw).hexdigest()[:16]


def best_effort_session_id(raw: Any) -> Optional[str]:
    """The session id of a message that failed validation, if one can be found safely.

    Lets the agent address a ``session.refuse`` (e.g. ``expired``,
    ``malformed`` targets) to the requester; returns None for anything odd.
    """
    try:
        if len(raw) > MAX_MESSAGE_BYTES:
            return None
        env = json.loads(bytes(raw).decode("utf-8"))
        sid = env["body"]["session_id"]
    except (ValueError, TypeError, KeyError, RecursionError):
        return None
    return sid if isinstance(sid, str) and _SID_RE.match(sid) else None


_REPLY_TO_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,200}\Z")


def is_valid_reply_to(name: Any) -> bool:
    """True if an AMQP ``reply_to`` looks like a queue name we may publish a reply to."""
    return isinstance(name, str) and bool(_REPLY_TO_RE.match(name))
