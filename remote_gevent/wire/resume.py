"""Resume: a tunnel that outlives its relay connection (issue 12, docs/protocol.md §7.5).

Each direction's frame counter (the AEAD nonce) is already a sequence number. A sender
keeps every frame it sealed, as sealed, in a :class:`ResendBuffer` until the peer
acknowledges it (ACK frames: with the next frames sent once :data:`ACK_PIGGYBACK` are
unacknowledged, alone every :data:`ACK_EVERY` frames, and at each keepalive).
When the relay connection fails (reset, end of stream without CLOSE, or a dead path:
no frame for :func:`dead_after`), both ends keep their streams and local sockets, dial the
relay again under the same session id and ticket (the relay pairs them as it did the
first time: it learns nothing new) and run :func:`handshake` on the new connection:

    each side  → RSM1 | role:u8 | nonce:16                 (fresh random nonce)
    each side  → RSM2 | received:u64 | proof:32
    proof = BLAKE2b-256(key = proof key of my direction,
                        session_id | my role | peer's nonce | my nonce | received)

``received`` is the number of frames this side has opened (its opener's counter): the
peer resends, byte for byte, the frames it sealed from that counter on. Identical
ciphertext under the same nonce reuses no nonce for different content. The proof keys
are derived from the session's direction keys (so only the two ends can make or check a
proof); the peer's fresh nonce makes every proof good for one handshake only (an old
generation's or a replayed proof fails); ``received`` outside what the sender still holds
(rolled back below an acknowledged counter, or beyond what was sent) is refused. A proof
that does not verify ends the session with ``crypto_error``; a connection that fails
during the handshake is just another failed attempt.

The buffer is bounded (``limit`` bytes of sealed frames): above it, senders of DATA wait
(the splicers stop reading their local sockets) until an ACK frees room; nothing is ever
dropped. Control frames are small and never wait (the reader must not block).
"""

import collections
import hmac
import os
import socket
import struct
import time
from typing import Any, Callable, Deque, List, NamedTuple, Optional, Tuple

import gevent
import gevent.event
import nacl.encoding
import nacl.hash

from remote_gevent.common.sockets import recv_exact

#: Frames received between two ACKs at most (each DATA frame is at most 64 KiB): the
#: reader sends a standalone ACK when this many are unacknowledged.
ACK_EVERY = 8
#: Frames received after which an ACK rides along with the next frames we send anyway
#: (DATA, WINDOW...) in the same ``send``: no frame of its own on the wire, no extra
#: wake-up of the relay and the peer. Interactive traffic (one frame each way per round
#: trip) is then acknowledged every ACK_PIGGYBACK round trips without a standalone ACK;
#: one-way bulk still gets its standalone ACK every ACK_EVERY frames.
ACK_PIGGYBACK = 4
#: Default bound of a session's resend buffer, bytes of sealed frames.
DEFAULT_RESEND_BUFFER = 4 << 20
#: How long one resume handshake may take on a connected socket.
HANDSHAKE_TIMEOUT = 10.0
#: Backoff between relay dials while resuming: first and largest delay, seconds.
FIRST_DELAY = 0.2
MAX_DELAY = 5.0

MAGIC1 = b"RSM1"
MAGIC2 = b"RSM2"
NONCE_BYTES = 16
PROOF_BYTES = 32
_U64 = struct.Struct(">Q")
_ROLE_BYTE = {"console": b"c", "agent": b"a"}
_PERSON = b"rg1-resume"
_LABEL = b"resume proof key"
MSG1_LEN = len(MAGIC1) + 1 + NONCE_BYTES
MSG2_LEN = len(MAGIC2) + 8 + PROOF_BYTES


class ResumeError(Exception):
    """A resume attempt that cannot go on."""


class ResumeLost(ResumeError):
    """The new connection failed during the handshake: try again."""


class ResumeRefused(ResumeError):
    """The peer's resume is not authentic or not consistent: the session ends
    (``crypto_error``)."""


def proof_key(direction_key: bytes) -> bytes:
    """The key that proves possession of ``direction_key`` in a resume handshake (one-way:
    it reveals nothing of the frame key)."""
    return nacl.hash.blake2b(_LABEL, digest_size=32, key=direction_key, person=_PERSON,
                             encoder=nacl.encoding.RawEncoder)


class ResumeKeys(NamedTuple):
    """Proof keys of one end: ``tx`` makes our proofs, ``rx`` checks the peer's."""
    tx: bytes
    rx: bytes

    @classmethod
    def from_session_keys(cls, tx_key: bytes, rx_key: bytes) -> "ResumeKeys":
        return cls(proof_key(tx_key), proof_key(rx_key))

    def __repr__(self) -> str:  # never in a log line or a traceback
        return "ResumeKeys(<secret>)"


class ResumeSettings(NamedTuple):
    """What a tunnel needs to resume. ``redial(timeout)`` returns a new plain socket
    paired at a relay under the same session (or raises); ``timeout``: longest wait for a
    path (``remote.resume_timeout``), 0 disables resume; ``buffer``: resend buffer bound."""
    session_id: str
    keys: ResumeKeys
    redial: Callable[[float], Any]
    timeout: float
    buffer: int = DEFAULT_RESEND_BUFFER


def dead_after(keepalive_interval: float) -> float:
    """No frame from the peer for this long (both ends ping every interval): the path is
    dead, resume."""
    return 3 * keepalive_interval + 1.0


class ResendBuffer:
    """Sealed frames the peer has not acknowledged yet, in counter order.

    ``first`` is the counter of the oldest frame held; ``first + len`` the next one to be
    sealed. ``bytes`` counts what is held; :meth:`wait_room` blocks while it is at or above
    ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.first = 0
        self.bytes = 0
        self.peak = 0
        self._frames: Deque[Any] = collections.deque()
        self._room = gevent.event.Event()
        self._room.set()
        self._closed = False

    def __len__(self) -> int:
        return len(self._frames)

    @property
    def next_counter(self) -> int:
        return self.first + len(self._frames)

    def add(self, frame: Any) -> None:
        self._frames.append(frame)
        self.bytes += len(frame)
        if self.bytes > self.peak:
            self.peak = self.bytes
        if self.bytes >= self.limit:
            self._room.clear()

    def ack(self, received: int, stale_ok: bool = False) -> None:
        """The peer has every frame below counter ``received``; ResumeRefused if that is
        below what it acknowledged before (a rollback) or beyond what we sent.

        ``stale_ok`` (ACK frames): an ACK queued before a resume handshake may arrive
        after it moved ``first`` on; it says nothing new and is ignored. The handshake's
        count (:meth:`unacked`) is the peer's opener counter now: below ``first`` it is a
        rollback."""
        if stale_ok and received < self.first:
            return
        if received < self.first or received > self.next_counter:
            raise ResumeRefused("peer acknowledges frame %d; we hold %d..%d"
                                % (received, self.first, self.next_counter))
        frames = self._frames
        while self.first < received:
            self.bytes -= len(frames.popleft())
            self.first += 1
        if self.bytes < self.limit:
            self._room.set()

    def unacked(self, received: int) -> List[Any]:
        """The frames to send again to a peer that has every one below ``received``."""
        self.ack(received)
        return list(self._frames)

    def wait_room(self) -> None:
        """Block while the buffer is full (until an ACK frees room or :meth:`close`)."""
        while not self._room.is_set() and not self._closed:
            self._room.wait()

    def close(self) -> None:
        self._closed = True
        self._frames.clear()
        self.bytes = 0
        self._room.set()


def _proof(key: bytes, session_id: str, role: str, peer_nonce: bytes, nonce: bytes,
           received: int) -> bytes:
    msg = session_id.encode("ascii") + _ROLE_BYTE[role] + peer_nonce + nonce + \
        _U64.pack(received)
    return nacl.hash.blake2b(msg, digest_size=PROOF_BYTES, key=key,
                             encoder=nacl.encoding.RawEncoder)


def handshake(sock: Any, session_id: str, role: str, keys: ResumeKeys, received: int,
              timeout: float = HANDSHAKE_TIMEOUT, nonce: Optional[bytes] = None
              ) -> int:
    """Run the resume handshake on a freshly paired ``sock``; the number of our frames
    the peer has received. Raises ResumeLost (try again) or ResumeRefused (end)."""
    peer_role = "console" if role == "agent" else "agent"
    nonce = nonce if nonce is not None else os.urandom(NONCE_BYTES)
    try:
        with gevent.Timeout(timeout, socket.timeout("resume handshake timed out")):
            sock.sendall(MAGIC1 + _ROLE_BYTE[role] + nonce)
            msg1 = recv_exact(sock, MSG1_LEN)
            if msg1[:4] != MAGIC1 or msg1[4:5] != _ROLE_BYTE[peer_role]:
                raise ResumeRefused("not a resume from the %s" % peer_role)
            peer_nonce = msg1[5:]
            sock.sendall(MAGIC2 + _U64.pack(received)
                         + _proof(keys.tx, session_id, role, peer_nonce, nonce, received))
            msg2 = recv_exact(sock, MSG2_LEN)
    except OSError as exc:  # socket.timeout included
        raise ResumeLost("resume handshake: %s" % (exc,)) from None
    except EOFError:
        raise ResumeLost("connection closed during the resume handshake") from None
    if msg2[:4] != MAGIC2:
        raise ResumeRefused("malformed resume proof")
    peer_received = _U64.unpack_from(msg2, 4)[0]
    expected = _proof(keys.rx, session_id, peer_role, nonce, peer_nonce, peer_received)
    if not hmac.compare_digest(expected, msg2[12:]):
        raise ResumeRefused("the peer's resume proof does not verify")
    return peer_received


class Backoff:
    """Delays between dials: FIRST_DELAY doubling to MAX_DELAY, never past ``deadline``."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.delay = FIRST_DELAY

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def sleep(self) -> None:
        gevent.sleep(max(0.0, min(self.delay, self.remaining())))
        self.delay = min(self.delay * 2, MAX_DELAY)


def describe(exc: BaseException) -> str:
    return "%s: %s" % (type(exc).__name__, exc) if not str(exc) else str(exc)


def split_counters(frames: List[Any]) -> Tuple[int, int]:
    """Frames and bytes of a resend (for the log line)."""
    return len(frames), sum(len(f) for f in frames)
