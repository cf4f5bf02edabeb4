"""The control-plane envelope (docs/protocol.md, sections 2-3): JSON, UTF-8, at most
16 KiB, version and type, strict per-type schema, ED25519 signatures.

Everything that arrives over AMQP goes through :func:`decode` (size cap, UTF-8 JSON
object, version, known type, strict per-type schema) before any code acts on it; it
raises :class:`ProtocolError` carrying a refusal reason code from ``Reason``.

Envelope::

    {"v": 1, "type": "<type>", "body": {...}, "sig": "<b64>", "signer": "SHA256:..."}

The signature is ED25519 over ``b"remote-gevent/v1/" + type + b"\\0" +
canonical(body)``; the type in the signed input stops a signature made for one message
type from being replayed as another. A *signer* is a
:class:`remote_gevent.crypto.interfaces.Signer` (the agent's identity key, an operator's
key).
"""

import base64
import binascii
import json
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
    fingerprint_of,
    parse_ssh_ed25519_line,
)
from remote_gevent.crypto import certauth
from remote_gevent.crypto.sshcert import MAX_CERT_BYTES, CertError
from remote_gevent.wire.codes import CloseCode, Reason
from remote_gevent.crypto.interfaces import Signer
from remote_gevent.wire import alive_counters

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


#: ``sessions``: sent at once (at most one a second) when a session starts or stops
#: resuming, so that ``watch`` sees it without waiting for the next ``periodic``.
ALIVE_EVENTS = frozenset({"started", "periodic", "key_rotated", "stopping", "sessions"})


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


def sign_with(signer: Signer, data: bytes) -> bytes:
    sig = bytes(signer.sign(data))
    if len(sig) != 64:
        raise ValueError("signer returned %d bytes, expected a 64-byte ed25519 signature"
                         % len(sig))
    return sig


def verify_raw(public_raw32: bytes, data: bytes, sig: bytes) -> bool:
    try:
        nacl.signing.VerifyKey(bytes(public_raw32)).verify(data, sig)
        return True
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError,
            nacl.exceptions.TypeError):
        return False


def public_raw_of(key: Signer) -> bytes:
    """The 32-byte ED25519 public key of a :class:`Signer`."""
    raw = bytes(key.public_bytes)
    if len(raw) != 32:
        raise TypeError("%s.public_bytes is %d bytes, not a 32-byte ed25519 key"
                        % (type(key).__name__, len(raw)))
    return raw


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


def encode(msg_type: str, body: Dict[str, Any], signer: Optional[Signer] = None) -> bytes:
    """Serialize (and sign, when ``signer`` is given) one message.

    The body is validated against its schema first, so we never publish
    something the peer would refuse as malformed. Raises ProtocolError.
    """
    if msg_type not in MsgType.ALL:
        raise ProtocolError(Reason.MALFORMED, "unknown type %s" % short(msg_type))
    _check_body(msg_type, body)
    env: Dict[str, Any] = {"v": PROTOCOL_VERSION, "type": msg_type, "body": body}
    if signer is not None:
        env["sig"] = b64e(sign_with(signer, signing_input(msg_type, body)))
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


def decode(raw: bytes, require_signature: bool = True) -> "Message":
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


def verify(message: "Message", public_raw32: bytes) -> bool:
    """Check ``message``'s signature with ``public_raw32``; True or ProtocolError.

    Also requires the envelope's ``signer`` to be that key's fingerprint.
    """
    if message.sig is None:
        raise ProtocolError(Reason.BAD_SIGNATURE, "%s is not signed" % message.type)
    if message.signer != fingerprint_of(public_raw32):
        raise ProtocolError(Reason.BAD_SIGNATURE, "%s signed by %s, not by the expected key"
                            % (message.type, short(message.signer)))
    if not verify_raw(public_raw32, message.signed_bytes(), message.sig):
        raise ProtocolError(Reason.BAD_SIGNATURE, "%s: signature does not verify" % message.type)
    return True


#: CertError.kind -> refusal reason
CERT_REFUSALS = {
    "invalid": Reason.CERT_INVALID, "unsupported_ca": Reason.CERT_INVALID,
    "unknown_ca": Reason.UNKNOWN_CA, "expired": Reason.CERT_EXPIRED,
    "not_yet_valid": Reason.CERT_NOT_YET_VALID, "principal": Reason.PRINCIPAL,
    "revoked": Reason.REVOKED, "no_targets": Reason.TARGET_NOT_PERMITTED,
}


def operator_of(message: "Message", trusted: AuthorizedKeys, device: str,
                now: float) -> OperatorKey:
    """The trusted operator who signed ``message`` (signature not yet checked): its plain
    key, or the key its ``cert`` certifies; Refused (``unknown_operator``, ``revoked``,
    a certificate refusal) if none.

    A signer whose plain key ``authorized_keys`` trusts is that key's operator even when
    it sends a certificate too (``ssh`` offers the certificate and the key, so OpenSSH
    accepts either; the plain line grants no more than it already does)."""
    signer = message.signer or ""
    plain = trusted.get(signer)
    if plain is not None:
        return plain
    if "cert" in message.body:
        try:
            return certauth.authorize(trusted, base64.b64decode(message.body["cert"]),
                                      signer, device, now, CLOCK_SKEW)
        except CertError as exc:
            raise Refused(CERT_REFUSALS.get(exc.kind, Reason.CERT_INVALID),
                          "%s: %s" % (signer, exc)) from None
    if trusted.listed(signer):
        raise Refused(Reason.REVOKED, "operator key %s is revoked" % signer)
    raise Refused(Reason.UNKNOWN_OPERATOR, "operator %s not trusted (%s)"
                  % (short(signer), trusted.source))


def verify_with_authorized(message: "Message", trusted: AuthorizedKeys, device: str = "",
                           now: Optional[float] = None) -> OperatorKey:
    """Verify a console-signed message (e.g. ``session.close``) against the trusted keys
    (a certificate in the body is checked for ``device``)."""
    op = operator_of(message, trusted, device, time.time() if now is None else now)
    try:
        verify(message, op.public_raw32)
    except ProtocolError as exc:
        raise Refused(exc.reason, exc.detail) from None
    return op


# ---------------------------------------------------------------- schema

SID_RE = re.compile(r"^[0-9a-f]{32}\Z")
_IDENT_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")
_SERVER_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}\Z")
_FP_RE = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}\Z")
_MAX_INT = 2 ** 53  # stays exact in every JSON implementation
_CIPHERS = ("aes256gcm", "xchacha20poly1305")

Validator = Callable[[str, str, Any], None]


def _fail(where: str, name: str, what: str, value: Any) -> "ProtocolError":
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


#: ``relay_pool`` of a session.request (docs/protocol.md §4): at most this many relays
#: (the request stays small, a resume walk short), each host:port of at most 255 chars.
MAX_RELAY_POOL = 8
MAX_RELAY_CHARS = 255


def _relay_pool(where: str, name: str, value: Any) -> None:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_RELAY_POOL:
        raise _fail(where, name, "expected a list of 1..%d relays" % MAX_RELAY_POOL,
                    len(value) if isinstance(value, list) else value)
    for item in value:
        if not isinstance(item, str) or len(item) > MAX_RELAY_CHARS:
            raise _fail(where, name, "expected host:port of at most %d chars"
                        % MAX_RELAY_CHARS, item)
        _relay(where, name, item)


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


_session_id = _regex(SID_RE, "expected 32 lowercase hex chars")
_fingerprint = _regex(_FP_RE, "expected an SHA256:... fingerprint")
_ident = _regex(_IDENT_RE, "expected [A-Za-z0-9_-]{1,64}")
_server_id = _regex(_SERVER_ID_RE, "expected [A-Za-z0-9_-]{1,32}")
_epk = _b64(32)
MAX_CERT_B64 = 4 * ((MAX_CERT_BYTES + 2) // 3)


def _cert(where: str, name: str, value: Any) -> None:
    """An OpenSSH certificate's base64 (parsed and verified later, by the agent)."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_CERT_B64:
        raise _fail(where, name, "expected base64 of a certificate", value)
    try:
        base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise _fail(where, name, "invalid base64", value) from None


def _alive_counters(where: str, name: str, value: Any) -> None:
    try:
        alive_counters.check(value)
    except ValueError as exc:
        raise _fail(where, name, str(exc), value) from None


_cipher = _one_of(_CIPHERS)
_reason_text = _text(MAX_REASON_CHARS)

# type -> (required fields, optional fields)
SCHEMAS: Dict[str, Tuple[Dict[str, Validator], Dict[str, Validator]]] = {
    MsgType.SESSION_REQUEST: ({
        "session_id": _session_id, "device": _ident, "server_id": _server_id,
        "operator": _fingerprint, "epk": _epk, "targets": _targets, "relay": _relay,
        "ticket": _b64(32), "iat": _int(), "exp": _int(), "cipher": _cipher,
    }, {"cert": _cert, "relay_pool": _relay_pool}),
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
    }, {"cert": _cert}),
    MsgType.ALIVE: ({
        "ident": _ident, "server_id": _server_id, "version": _text(64, allow_empty=False),
        "uptime": _number, "sessions_active": _int(0, 1000000),
        "sessions_waiting": _int(0, 1000000), "max_session": _int(0, 1000000),
        "fingerprint": _fingerprint, "seq": _int(), "ts": _number,
        "event": _one_of(sorted(ALIVE_EVENTS)),
    }, {"counters": _alive_counters}),
    MsgType.KEY: ({
        "ident": _ident, "server_id": _server_id, "pubkey": _pubkey_line,
        "fingerprint": _fingerprint, "ts": _number,
    }, {"previous": _fingerprint, "rotation_sig": _b64(64)}),
    MsgType.STATUS_REQUEST: ({
        "request_id": _session_id, "device": _ident, "server_id": _server_id,
        "operator": _fingerprint, "iat": _int(), "exp": _int(),
    }, {"cert": _cert}),
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
