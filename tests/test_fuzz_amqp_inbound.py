"""Hostile-input tier: inbound AMQP deliveries (remote_gevent.common.amqp_inbound) under fuzzing.

Whoever may publish on ``remote.down`` controls a delivery's content-header properties
(flags, shortstrs, header tables), its routing key and its body. Documented outcome
(amqp_inbound.py docstring): the frame handler never raises over such content; each
delivery reaches the consumer once as a ``Delivery`` with a raw ``bytes`` body, and
either ``problem`` is None and every string property is valid UTF-8, or ``problem`` is a
one-line reason (and the consumer rejects it); a callback that raises gets the delivery
rejected by its tag. The recursion limit is the production default while frames are
handled, in a fresh greenlet like the link's.
"""

from __future__ import annotations

import struct
import sys

import gevent
import poison
from amqp import spec
from fuzz_settings import examples
from hypothesis import example, given
from hypothesis import strategies as st

from remote_gevent.common import amqp_inbound
from remote_gevent.wire import protocol
from remote_gevent.common.logs import escape

MAX_BODY = 4096
PROD_RECURSION = 1000


class _Conn:
    bytes_recv = 0


def _deliver_frames(tag: int, routing_key: bytes, props: bytes, body: bytes, chunk: int):
    args = (struct.pack(">HH", *spec.Basic.Deliver) + poison.shortstr(b"ctag")
            + struct.pack(">QB", tag, 0) + poison.shortstr(b"remote.down")
            + poison.shortstr(routing_key))
    header = struct.pack(">HxxQ", 60, len(body)) + props
    frames = [(1, 1, args), (2, 1, header)]
    for i in range(0, len(body), chunk):
        frames.append((3, 1, body[i:i + chunk]))
    return frames


def _run(deliveries, raise_in_callback=False):
    """Feed the deliveries through one frame handler; return (messages, rejected)."""
    got, rejected = [], []

    def callback(channel, sig, args, msg):
        got.append(msg)
        if msg is not None and msg.problem is None:
            protocol.best_effort_session_id(msg.body)
            try:
                protocol.decode(msg.body)
            except protocol.ProtocolError:
                pass
            for value in msg.properties.values():
                escape(value)
        if raise_in_callback:
            raise ValueError("consumer bug")

    on_frame = amqp_inbound.frame_handler(
        MAX_BODY, amqp_inbound.PoisonMemory(),
        lambda conn, ch, tag: rejected.append(tag))(_Conn(), callback)

    def feed():
        old = sys.getrecursionlimit()
        sys.setrecursionlimit(PROD_RECURSION)
        try:
            for frames in deliveries:
                for frame in frames:
                    on_frame(frame)
        finally:
            sys.setrecursionlimit(old)

    gevent.spawn(feed).get(timeout=10)
    return got, rejected


def _check(got, count):
    assert len(got) == count, got
    for msg in got:
        assert isinstance(msg, amqp_inbound.Delivery)
        assert isinstance(msg.body, bytes)
        if msg.problem is None:
            for value in msg.properties.values():
                if isinstance(value, str):
                    value.encode("utf-8")
        else:
            assert "\n" not in msg.problem and msg.problem


# ---------------------------------------------------------------- strategies

_SHORT = st.one_of(st.none(), st.binary(max_size=40),
                   st.sampled_from([b"\xff\xfe", b"\xed\xa0\x80", b"punycode", b"utf-16",
                                    b"rg.reply.x", b"\x00", b"x" * 255]))


def _field_values(depth_budget: int):
    scalar = st.one_of(
        st.binary(max_size=9).map(lambda b: b"t" + b[:1] if b else b"V"),
        st.binary(max_size=20).map(lambda b: b"S" + struct.pack(">I", len(b)) + b),
        st.binary(max_size=20).map(lambda b: b"x" + struct.pack(">I", len(b)) + b),
        st.binary(min_size=4, max_size=4).map(lambda b: b"I" + b),
        st.binary(min_size=8, max_size=8).map(lambda b: b"T" + b),
        st.binary(min_size=5, max_size=5).map(lambda b: b"D" + b),
        st.binary(max_size=12).map(lambda b: bytes([b[0] if b else 0]) + b[1:]),  # any type
    )
    return st.recursive(
        scalar,
        lambda kids: st.one_of(
            st.lists(kids, max_size=3).map(
                lambda vs: b"A" + struct.pack(">I", len(b"".join(vs))) + b"".join(vs)),
            st.lists(st.tuples(st.binary(max_size=8), kids), max_size=3).map(
                lambda kv: b"F" + poison.table(b"".join(poison.shortstr(k) + v for k, v in kv))),
        ),
        max_leaves=depth_budget)


_TABLES = st.one_of(
    st.lists(st.tuples(st.binary(max_size=8), _field_values(8)), max_size=4).map(
        lambda kv: poison.table(b"".join(poison.shortstr(k) + v for k, v in kv))),
    st.integers(1, 3000).map(poison.nested_table),
    st.integers(1, 3000).map(
        lambda d: poison.table(poison.shortstr(b"a") + poison.nested_array(d))),
    st.binary(max_size=30).map(lambda b: struct.pack(">I", len(b) + 7) + b),  # lying length
)
_PROPS = st.one_of(
    st.builds(poison.properties, content_type=_SHORT, content_encoding=_SHORT,
              headers=st.one_of(st.none(), _TABLES), correlation_id=_SHORT, reply_to=_SHORT,
              expiration=_SHORT),
    st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=60)).map(
        lambda t: struct.pack(">H", t[0]) + t[1]),
)
_BODIES = st.one_of(st.binary(max_size=200), st.integers(0, MAX_BODY + 100).map(lambda n: b"{" * n))


@examples(250)
@given(st.lists(st.tuples(_PROPS, _BODIES, st.binary(max_size=30), st.integers(1, 4096)),
                min_size=1, max_size=3),
       st.booleans())
@example([(poison.properties(correlation_id=b"\xff\xfe"), b"{}", b"t.session", 4096)], False)
@example([(poison.properties(headers=poison.nested_table(2000)), b"{}", b"t.session", 4096)],
         False)
@example([(poison.properties(content_encoding=b"punycode"), b"a" * 3000, b"t.session", 100)],
         True)
def test_any_delivery_reaches_the_consumer_once(deliveries, raise_in_callback):
    frames = [_deliver_frames(tag, rk[:255], props, body, chunk)
              for tag, (props, body, rk, chunk) in enumerate(deliveries, 1)]
    got, rejected = _run(frames, raise_in_callback)
    _check(got, len(deliveries))
    if raise_in_callback:
        assert rejected == list(range(1, len(deliveries) + 1))
    for msg, (_, body, _, _) in zip(got, deliveries):
        assert msg.body == (body if len(body) <= MAX_BODY else b"")
