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


import base64
import hashlib
import heapq
import hmac
import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple


from remote_gevent.crypto.authkeys import (
    AuthorizedKeys,
    OperatorKey,
    TargetPattern,
    effective_targets,
    fingerprint_of,
    is_target_allowed,
    parse_ssh_ed25519_line,
    ssh_pubkey_line,
)
from remote_gevent.wire.codes import Reason
from remote_gevent.wire.envelope import (
    CLOCK_SKEW,
    DEFAULT_REPLAY_ENTRIES,
    DEFAULT_REQUEST_TTL,
    MAX_MESSAGE_BYTES,
    MAX_REASON_CHARS,
    MAX_SESSION_LIFETIME,
    MAX_STATUS_SESSIONS,
    Message,
    MsgType,
    ProtocolError,
    ROTATION_DOMAIN_TYPE,
    Refused,
    SID_RE,
    b64e,
    decode,
    encode,
    operator_of,
    public_raw_of,
    sign_with,
    signing_input,
    verify,
    verify_raw,
)
from remote_gevent.crypto.interfaces import Signer

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


def _with_certificate(body: Dict[str, Any], signer: Signer) -> Dict[str, Any]:
    """Attach the signer's OpenSSH certificate (its ``certificate`` attribute: the wire
    blob, as the console loads it from ``<key>-cert.pub``), if it has one."""
    cert = getattr(signer, "certificate", None)
    if cert:
        body["cert"] = b64e(bytes(cert))
    return body


def new_session_id() -> str:
    return os.urandom(16).hex()


def new_ticket() -> bytes:
    return os.urandom(32)


def make_session_request(
    operator_key: Signer,
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
    relay_pool: Sequence[str] = (),
) -> Tuple[str, bytes]:
    """Build a signed ``session.request`` (console side); returns ``(session_id, raw)``.
    ``relay_pool``: where both ends may resume (issue 13); empty: not sent."""
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
    if relay_pool:
        body["relay_pool"] = [str(r) for r in relay_pool]
    return sid, encode(MsgType.SESSION_REQUEST, _with_certificate(body, operator_key),
                       operator_key)


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
    relay_pool: Tuple[str, ...] = ()  # signed resume order (issue 13); () = no pool

    def permits(self, target: Any) -> bool:
        """Per-stream check at OPEN time (e.g. each SOCKS CONNECT of a ``*:*`` session)."""
        return is_target_allowed(target, self.effective, ())


def _check_operator_request(msg: Any, msg_type: str, id_field: str, label: str,
                            device: str, server_id: str, trusted: AuthorizedKeys,
                            replay_cache: "ReplayCache", now: Optional[float]
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
    try:
        op = operator_of(msg, trusted, device, now)
    except Refused as exc:
        raise Refused(exc.reason, "%s %s: %s" % (label, rid, exc.detail)) from None
    if not verify_raw(op.public_raw32, msg.signed_bytes(), msg.sig or b""):
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
    replay_cache: "ReplayCache",
    now: Optional[float] = None,
) -> "SessionRequest":
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
        # Say which rule refused (issue 15): the device's allow-list, or the operator's
        # permitopen (only when the allow-list alone would have let the target through).
        by_device = effective_targets(refused, allow, ())[1]
        rule = ("the device's remote.allow" if by_device
                else "this operator's permitopen in the device's authorized_keys")
        raise Refused(Reason.TARGET_NOT_PERMITTED, "session %s: %s not permitted for %s by %s"
                      % (sid, ", ".join(str(t) for t in refused), op.fingerprint, rule))
    return SessionRequest(
        session_id=sid, operator=op, epk=base64.b64decode(b["epk"]),
        ticket=base64.b64decode(b["ticket"]), relay=b["relay"],
        targets=tuple(TargetPattern.parse(t) for t in b["targets"]),
        effective=tuple(effective), iat=b["iat"], exp=b["exp"], cipher=b["cipher"],
        message=msg, relay_pool=tuple(b.get("relay_pool", ())),
    )


# ---------------------------------------------------------------- agent replies


def make_session_accept(identity: Signer, session_id: str, epk: bytes, console_epk: bytes,
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
                          console_epk: bytes) -> "Accepted":
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


def make_session_queued(identity: Signer, session_id: str, position: int) -> bytes:
    return encode(MsgType.SESSION_QUEUED, {"session_id": session_id, "position": position},
                  identity)


def make_session_refuse(identity: Signer, session_id: str, code: str, reason: str = "") -> bytes:
    """Signed refusal; ``reason`` (human text) is sanitized and truncated, never echoed raw."""
    return encode(MsgType.SESSION_REFUSE, {"session_id": session_id, "code": code,
                                           "reason": _clean(reason)}, identity)


def make_session_close(signer: Signer, session_id: str, code: str, reason: str = "",
                       ts: Optional[float] = None) -> bytes:
    body = {"session_id": session_id, "code": code, "reason": _clean(reason),
            "ts": int(time.time()) if ts is None else ts}
    return encode(MsgType.SESSION_CLOSE, _with_certificate(body, signer), signer)


def make_alive(identity: Signer, ident: str, server_id: str, version: str, uptime: float,
               sessions_active: int, sessions_waiting: int, max_session: int, seq: int,
               event: str = "periodic", ts: Optional[float] = None,
               counters: Optional[Dict[str, Any]] = None) -> bytes:
    body = {
        "ident": ident, "server_id": server_id, "version": version,
        "uptime": round(float(uptime), 3), "sessions_active": sessions_active,
        "sessions_waiting": sessions_waiting, "max_session": max_session,
        "fingerprint": identity.fingerprint, "seq": seq,
        "ts": int(time.time()) if ts is None else ts, "event": event,
    }
    if counters is not None:  # optional (wire/alive_counters.py)
        body["counters"] = counters
    return encode(MsgType.ALIVE, body, identity)


def _clean(text: str) -> str:
    text = "".join(c if " " <= c < "\x7f" else "?" for c in str(text))
    return text[:MAX_REASON_CHARS]


# ---------------------------------------------------------------- key publication / rotation


def _rotation_body(ident: str, new_fp: str, old_fp: str, ts: Any) -> Dict[str, Any]:
    return {"ident": ident, "new": new_fp, "old": old_fp, "ts": ts}


def make_key_announcement(new_key: Signer, ident: str, server_id: str,
                          previous_key: Optional[Signer] = None,
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
        body["rotation_sig"] = b64e(sign_with(previous_key,
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


def verify_key_announcement(msg: Any) -> "KeyAnnouncement":
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
    if not verify_raw(pinned_raw32, signing_input(ROTATION_DOMAIN_TYPE, rot), sig):
        raise ProtocolError(Reason.BAD_SIGNATURE, "%s: rotation signature does not verify"
                            % ann.ident)
    return ann.public_raw32


# ---------------------------------------------------------------- status


def make_status_request(operator_key: Signer, device: str, server_id: str,
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
    return rid, encode(MsgType.STATUS_REQUEST, _with_certificate(body, operator_key),
                       operator_key)


@dataclass(frozen=True)
class StatusRequest:
    request_id: str
    operator: OperatorKey
    iat: int
    exp: int
    message: Message = field(repr=False, compare=False)


def check_status_request(msg: Any, device: str, server_id: str, trusted: AuthorizedKeys,
                         replay_cache: "ReplayCache", now: Optional[float] = None
                         ) -> "StatusRequest":
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


def make_status(identity: Signer, request_id: str, ident: str, server_id: str, version: str,
                uptime: float, sessions_active: int, sessions_waiting: int, max_session: int,
                sessions: Sequence[Dict[str, Any]], ts: Optional[float] = None) -> bytes:
    """Signed ``status`` reply. ``sessions`` entries follow the ``status`` schema
    (session_id, state, since, operator, targets, remote_ip, bytes_in, bytes_out).

    At most :data:`MAX_STATUS_SESSIONS` entries are sent, fewer when the message
    would exceed 16 KiB; ``sessions_total`` always says how many there were.
    """
    entries = list(sessions)
    body: Dict[str, Any] = {
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
    return sid if isinstance(sid, str) and SID_RE.match(sid) else None


_REPLY_TO_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,200}\Z")


def is_valid_reply_to(name: Any) -> bool:
    """True if an AMQP ``reply_to`` looks like a queue name we may publish a reply to."""
    return isinstance(name, str) and bool(_REPLY_TO_RE.match(name))
