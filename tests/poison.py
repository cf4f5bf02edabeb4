"""Poison AMQP messages for the hostile-input tests: raw content-header properties.

py-amqp cannot *send* some of what a hostile publisher can (a table nested deeper than
Python's recursion limit: its own encoder recurses too), so these helpers write the
basic-class property list byte by byte (AMQP 0-9-1 §4.2.6.1, flags in the first short)
and publish it on an :class:`~remote_gevent.common.amqplink.AmqpLink`'s channel.
"""

from __future__ import annotations

import struct
from typing import Optional

import amqp
from amqp import spec

# Property flags of the basic class, in wire order.
CONTENT_TYPE, CONTENT_ENCODING, HEADERS, DELIVERY_MODE = 0x8000, 0x4000, 0x2000, 0x1000
CORRELATION_ID, REPLY_TO, EXPIRATION = 0x0400, 0x0200, 0x0100


def shortstr(value: bytes) -> bytes:
    assert len(value) < 256
    return struct.pack(">B", len(value)) + value


def table(entries: bytes) -> bytes:
    return struct.pack(">I", len(entries)) + entries


def nested_table(depth: int) -> bytes:
    """``{"a": {"a": ... {}}}`` ``depth`` levels deep (7 bytes per level)."""
    inner = b""
    for _ in range(depth):
        inner = shortstr(b"a") + b"F" + table(inner)
    return table(inner)


def nested_array(depth: int) -> bytes:
    """A field value ``[[...[]]]`` ``depth`` levels deep (type ``A``, 5 bytes per level)."""
    inner = b""
    for _ in range(depth):
        inner = b"A" + struct.pack(">I", len(inner)) + inner
    return inner


def huge_table(entries: int, value_size: int = 16) -> bytes:
    """A flat table of ``entries`` long strings (keys k0, k1, ...)."""
    value = b"v" * value_size
    body = b"".join(shortstr(b"k%d" % i) + b"S" + struct.pack(">I", len(value)) + value
                    for i in range(entries))
    return table(body)


def properties(content_type: Optional[bytes] = b"application/json",
               content_encoding: Optional[bytes] = None, headers: Optional[bytes] = None,
               correlation_id: Optional[bytes] = None, reply_to: Optional[bytes] = None,
               expiration: Optional[bytes] = b"60000") -> bytes:
    """A raw property list; ``headers`` is an already encoded table."""
    flags, parts = 0, []
    if content_type is not None:
        flags |= CONTENT_TYPE
        parts.append(shortstr(content_type))
    if content_encoding is not None:
        flags |= CONTENT_ENCODING
        parts.append(shortstr(content_encoding))
    if headers is not None:
        flags |= HEADERS
        parts.append(headers)
    flags |= DELIVERY_MODE
    parts.append(b"\x01")
    if correlation_id is not None:
        flags |= CORRELATION_ID
        parts.append(shortstr(correlation_id))
    if reply_to is not None:
        flags |= REPLY_TO
        parts.append(shortstr(reply_to))
    if expiration is not None:
        flags |= EXPIRATION
        parts.append(shortstr(expiration))
    return struct.pack(">H", flags) + b"".join(parts)


class RawMessage(amqp.Message):
    """A message whose property list is sent exactly as given."""

    def __init__(self, body: bytes, raw_properties: bytes) -> None:
        super().__init__(body)
        self._rg_raw_properties = raw_properties

    def _serialize_properties(self) -> bytes:
        return self._rg_raw_properties


def publish_raw(link, exchange: str, routing_key: str, body: bytes,
                raw_properties: bytes) -> None:
    """Publish on ``link`` (connected) with a hand-made property list."""
    with link.lock:
        link.channel.send_method(spec.Basic.Publish, "Bssbb",
                                 (0, exchange, routing_key, False, False),
                                 RawMessage(body, raw_properties))
