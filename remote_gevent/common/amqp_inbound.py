"""Inbound AMQP frames made safe: no delivery, however hostile, takes the consumer down.

py-amqp decodes a delivery's content-header properties (shortstrs as UTF-8, header
tables recursively) *inside* ``drain_events``, before any callback sees the message:
a ``correlation_id`` that is not UTF-8, or a header table nested deeper than Python's
recursion limit, raised out of ``drain_events`` and restarted the consumer, and the
broker redelivered the message to do it again. It also buffers a body of any size
and (``auto_decode``) decodes it by ``content_encoding``, whatever the codec costs.

:func:`frame_handler` replaces py-amqp's (``Connection(frame_handler=...)``); it is the
same state machine with these differences:

- Content (deliveries) is assembled into a :class:`Delivery`: a property list that does
  not decode leaves ``properties`` empty and sets :attr:`Delivery.problem`; a body
  announced larger than ``max_body`` is counted, not kept (``body`` stays ``b""``), and
  sets ``problem`` too. The body is always raw ``bytes``. The consumer (see
  :meth:`remote_gevent.common.amqplink.AmqpLink.consume`) then rejects the delivery without
  requeue: by then its delivery tag is known.
- A ``basic.deliver`` whose handling raises anyway (its method arguments do not decode,
  or a bug) is rejected without requeue by its delivery tag, read from the raw method
  frame, and logged once; the loop goes on. If handling it ends the connection (an AMQP
  error: the broker closed the channel over what we did with it), its digest is
  remembered (:class:`PoisonMemory`) and the redelivery is rejected at once: a message
  that broke the link once cannot do it again and again.
"""

import collections
import hashlib
import logging
import struct
from typing import Any, Callable, Dict, List, Optional

from amqp import spec
from amqp.basic_message import Message
from amqp.exceptions import AMQPError, UnexpectedFrame

from remote_gevent.common.logs import escape

log = logging.getLogger(__name__)

#: Default cap on a delivery's body, in bytes (``AmqpLink(max_body=...)``).
DEFAULT_MAX_BODY = 1024 * 1024
#: Digests of deliveries that broke the link, remembered to reject their redelivery.
POISON_MEMORY = 64

_CONTENT_METHODS = frozenset([spec.Basic.Return, spec.Basic.Deliver, spec.Basic.GetOk])
_HEADER = struct.Struct(">HxxQ")


class Delivery(Message):
    """A received message whose properties and size have been checked, not trusted.

    ``problem`` is None for a usable message, else a one-line, log-safe reason (the
    properties did not decode, or the body is over the link's ``max_body``).
    ``body_size`` is the size announced by the content header.
    """

    def __init__(self, frame_method: Any, frame_args: Any, max_body: int) -> None:
        super().__init__(b"", frame_method=frame_method, frame_args=frame_args)
        self.problem: Optional[str] = None
        self.max_body = max_body
        self.raw_header = b""
        self.properties: Dict[str, Any] = {}
        self._pending_chunks: List[bytes] = []

    def inbound_header(self, buf: Any, offset: int = 0) -> int:
        try:
            class_id, self.body_size = _HEADER.unpack_from(buf, offset)
        except struct.error:
            raise UnexpectedFrame("truncated content header") from None
        self.raw_header = bytes(buf)
        try:
            self._load_properties(class_id, buf, offset + _HEADER.size)
        except Exception as exc:  # noqa: BLE001 - py-amqp decoding outside bytes: any error
            self.properties = {}
            self.problem = "undecodable properties (%s: %s)" % (
                exc.__class__.__name__, escape(str(exc), 120))
        else:
            # py-amqp decodes shortstrs with "surrogatepass": a lone surrogate would get
            # through, and fail later in whatever encodes it (a log line, a reply).
            for name, value in self.properties.items():
                if isinstance(value, str) and not _is_utf8(value):
                    self.properties = {}
                    self.problem = "undecodable properties (%s is not UTF-8)" % name
                    break
        if self.body_size > self.max_body and self.problem is None:
            self.problem = "body of %d bytes over the %d-byte limit" % (self.body_size,
                                                                         self.max_body)
        if not self.body_size:
            self.ready = True
        return offset

    def inbound_body(self, buf: Any) -> None:
        self.body_received += len(buf)
        if self.body_size <= self.max_body:
            self._pending_chunks.append(bytes(buf))
        if self.body_received >= self.body_size:
            self.body = b"".join(self._pending_chunks)
            self._pending_chunks = []
            self.ready = True

    def digest(self) -> bytes:
        """What identifies this message across redeliveries (header and kept body)."""
        return hashlib.sha256(self.raw_header + b"\0" + self.body).digest()


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class PoisonMemory:
    """Bounded memory of digests of deliveries that broke the link."""

    def __init__(self, size: int = POISON_MEMORY) -> None:
        self._seen: "collections.OrderedDict[bytes, None]" = collections.OrderedDict()
        self._size = size

    def add(self, digest: bytes) -> None:
        self._seen[digest] = None
        self._seen.move_to_end(digest)
        while len(self._seen) > self._size:
            self._seen.popitem(last=False)

    def __contains__(self, digest: object) -> bool:
        return digest in self._seen

    def __len__(self) -> int:
        return len(self._seen)


def delivery_tag(frame_args: Any) -> Optional[int]:
    """The delivery tag of a raw ``basic.deliver`` method frame (None if unreadable):
    class/method shorts, ``consumer-tag`` shortstr, then the tag (longlong)."""
    try:
        (length,) = struct.unpack_from(">B", frame_args, 4)
        (tag,) = struct.unpack_from(">Q", frame_args, 5 + length)
    except struct.error:
        return None
    return int(tag)


def frame_handler(max_body: int, poison: "PoisonMemory",  # noqa: C901 - one branch per AMQP frame kind, in py-amqp's order
                  reject: Callable[[Any, int, int], None]
                  ) -> Callable[[Any, Callable[..., Any]], Callable[[Any], bool]]:
    """A py-amqp ``frame_handler`` factory (see the module docstring).

    ``reject(connection, channel_id, delivery_tag)`` rejects a delivery without requeue.
    """

    def factory(connection: Any, callback: Callable[..., Any]) -> Callable[[Any], bool]:
        expected: Dict[int, int] = {}
        partial: Dict[int, Delivery] = {}

        def deliver(channel: int, msg: "Delivery") -> None:
            if msg.frame_method != spec.Basic.Deliver:
                callback(channel, msg.frame_method, msg.frame_args, msg)
                return
            tag = delivery_tag(msg.frame_args)
            digest = msg.digest()
            if tag is not None and digest in poison:
                log.warning("delivery %d rejected: the same message broke the AMQP link "
                            "before", tag)
                reject(connection, channel, tag)
                return
            try:
                callback(channel, msg.frame_method, msg.frame_args, msg)
            except OSError:
                raise  # the socket, not the message
            except AMQPError:
                # The channel or connection ended while we handled it (e.g. the broker
                # refused something we did about it): it will come back redelivered.
                poison.add(digest)
                raise
            except Exception as exc:  # noqa: BLE001 - boundary: one delivery, not the loop
                if tag is None:
                    raise
                log.warning("delivery %d could not be handled (%s: %s); rejected", tag,
                            exc.__class__.__name__, escape(str(exc), 120))
                reject(connection, channel, tag)

        def on_frame(frame: Any) -> bool:
            frame_type, channel, buf = frame
            connection.bytes_recv += 1
            want = expected.get(channel, 1)
            if frame_type not in (want, 8):
                raise UnexpectedFrame("Received frame %s while expecting type: %s"
                                      % (frame_type, want))
            if frame_type == 1:
                method_sig = struct.unpack_from(">HH", buf, 0)
                if method_sig in _CONTENT_METHODS:
                    partial[channel] = Delivery(method_sig, buf, max_body)
                    expected[channel] = 2
                    return False
                callback(channel, method_sig, buf, None)
            elif frame_type in (2, 3):
                msg = partial[channel]
                if frame_type == 2:
                    msg.inbound_header(buf)
                else:
                    msg.inbound_body(buf)
                if not msg.ready:
                    expected[channel] = 3
                    return False
                expected[channel] = 1
                del partial[channel]
                deliver(channel, msg)
            else:  # heartbeat; bytes_recv already updated
                return False
            return True

        return on_frame

    return factory
