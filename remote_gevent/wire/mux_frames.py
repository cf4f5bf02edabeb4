"""The tunnel's plaintext frames (docs/protocol.md, section 7): frame types, sizes,
windows, timeouts, the errors a tunnel raises, and the JSON control payloads."""

import json
import logging
import struct
from typing import Any, Callable, Dict, Optional


from remote_gevent.wire.codes import STREAM_TOO_MANY, CloseCode, Reason

# One logger for the whole tunnel (its modules are one concern): "remote_gevent.wire.mux".
log = logging.getLogger("remote_gevent.wire.mux")


PROTOCOL_VERSION = 1

# Frame types (docs/design.md, "Tunnel framing").
HELLO = 1
OPEN = 2
OPEN_OK = 3
OPEN_FAIL = 4
DATA = 5
WINDOW = 6
EOF = 7
RESET = 8
PING = 9
PONG = 10
CLOSE = 11
ACK = 12  # resume (issue 12): frames received so far, u64; only to a peer whose HELLO asks

FRAME_NAMES = {
    HELLO: "HELLO", OPEN: "OPEN", OPEN_OK: "OPEN_OK", OPEN_FAIL: "OPEN_FAIL",
    DATA: "DATA", WINDOW: "WINDOW", EOF: "EOF", RESET: "RESET", PING: "PING",
    PONG: "PONG", CLOSE: "CLOSE", ACK: "ACK",
}

MAX_DATA = 65536                       # largest DATA payload
HEADER_LEN = 5                         # frame type (u8) and stream id (u32be)
MAX_FRAME_LEN = MAX_DATA + HEADER_LEN + 64   # bound on the wire ``len`` (AEAD overhead)
# Per-stream flow-control window: a bound on the bytes buffered per stream on the
# receiving side (chunks queued until the local socket takes them), not preallocated.
# Each side announces the window it grants in its HELLO ("window"); a peer that does not
# (before this field existed) gets and grants LEGACY_WINDOW, so mixed versions interoperate.
LEGACY_WINDOW = 1 << 20
INITIAL_WINDOW = 4 << 20               # receive window we grant per stream, bytes
MAX_WINDOW = 1 << 30                   # largest window a peer may announce
# Credit is granted back in batches: one WINDOW frame per this many consumed bytes.
# Must stay <= the window (else a sender could wait for credit never sent).
WINDOW_UPDATE_THRESHOLD = INITIAL_WINDOW // 4
MAX_CONTROL_PAYLOAD = 4096             # JSON payloads (HELLO, OPEN, OPEN_FAIL, RESET, CLOSE)

DEFAULT_KEEPALIVE_INTERVAL = 15.0
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_OPEN_TIMEOUT = 30.0
CLOSE_SEND_TIMEOUT = 1.0               # best-effort CLOSE must not hang on a full socket
CLOSE_JOIN_TIMEOUT = 5.0
LOCAL_SOCKET_BUFFER = 4 * MAX_DATA     # SO_SNDBUF/SO_RCVBUF hint for spliced sockets
RECV_BUFFER = 2 * MAX_FRAME_LEN        # tunnel receive buffer (~128 KiB: per-session RSS)

ROLES = ("console", "agent")

# Codes a peer may send: CLOSE carries a close code; OPEN_FAIL a close code, a refusal
# reason (target_not_permitted) or too_many_streams.  Anything else becomes
# protocol_error: a peer's text never becomes a code (history rows, session.close).
CLOSE_CODES = CloseCode.ALL
OPEN_FAIL_CODES = CloseCode.ALL | Reason.ALL | frozenset({STREAM_TOO_MANY})
RESET_BUDGET = "receive buffer budget exceeded"

HDR = struct.Struct(">BI")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")

OnOpen = Callable[[str], Any]


class MuxError(Exception):
    """Base class of the tunnel's own errors."""


class StreamRefused(MuxError):
    """The far side refused to open a stream (OPEN_FAIL).

    Agents' ``on_open`` callbacks may raise it (or any exception with a ``code``
    attribute) to refuse with a specific code.
    """

    def __init__(self, code: str, reason: str = "") -> None:
        super().__init__("%s: %s" % (code, reason) if reason else code)
        self.code = code
        self.reason = reason


class TunnelClosed(MuxError, ConnectionError):
    """The tunnel is closed (or closing); nothing more can be sent."""


class StreamReset(MuxError, ConnectionResetError):
    """The stream was aborted (RESET from the peer, a local error, or tunnel close)."""


class TunnelFailure(Exception):
    """Internal: ends the read loop with a close code."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def protocol_error(reason: str) -> "TunnelFailure":
    return TunnelFailure(CloseCode.PROTOCOL_ERROR, reason)


def json_payload(payload: bytes, what: str) -> Dict[str, Any]:
    if len(payload) > MAX_CONTROL_PAYLOAD:
        raise protocol_error("%s payload too large" % what)
    try:
        obj = json.loads(bytes(payload).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # nesting: 2 bytes a level
        raise protocol_error("%s payload is not JSON: %s" % (what, e)) from None
    if not isinstance(obj, dict):
        raise protocol_error("%s payload is not a JSON object" % what)
    return obj


def json_str(obj: Dict[str, Any], key: str, what: str, default: Optional[str] = None) -> str:
    value = obj.get(key, default)
    if not isinstance(value, str):
        raise protocol_error("%s: %r must be a string" % (what, key))
    return value


def dump_json(obj: Dict[str, Any]) -> bytes:
    data = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    if len(data) > MAX_CONTROL_PAYLOAD:
        # Only reasons can be long; cut them rather than send an invalid frame.
        obj = dict(obj)
        obj["reason"] = str(obj.get("reason", ""))[:256]
        data = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    return data
