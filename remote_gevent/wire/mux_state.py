"""What the halves of a tunnel share, written down for readers and the type checker.

:class:`mux.Tunnel` is one object assembled from a receiving half
(:class:`mux_receive.FrameReceiving`) and a serving/splicing half
(:class:`mux_splice.StreamSplicing`). Both inherit :class:`TunnelState`, which only
*declares* the state :class:`mux.Tunnel` sets in ``__init__`` and the methods each half
calls on the other: the annotations create nothing at run time, and the method
signatures exist only for the type checker, so a method is always the one the tunnel
really defines.
"""

from typing import TYPE_CHECKING, Any, Dict, Optional

import gevent.event
import gevent.pool

if TYPE_CHECKING:
    from remote_gevent.wire.mux_frames import OnOpen
    from remote_gevent.wire.mux_limits import BufferPool, StreamCounter
    from remote_gevent.wire.mux_stream import Stream


class TunnelState:
    """State and cross-half methods of a tunnel (declarations only)."""

    name: str
    role: str
    peer_role: str
    handshake_timeout: Optional[float]
    max_streams: int
    agent_streams: "Optional[StreamCounter]"
    buffer_budget: int
    rx_buffered: int
    recv_window: int
    streams_refused: int
    streams_opened: int
    bytes_in: int
    last_ack: float
    last_activity: float
    last_pong: Optional[float]
    rtt: Optional[float]
    _sock: Any
    _sealer: Any
    _wlock: Any
    keepalive_interval: float
    _opener: Any
    _on_open: "Optional[OnOpen]"
    _pool: "BufferPool"
    _peek: bytearray
    _async_drained: gevent.event.Event
    _group: gevent.pool.Group
    _streams: "Dict[int, Stream]"
    _next_id: int
    _last_peer_id: int
    _up: gevent.event.Event
    _ready: gevent.event.Event
    _close_code: Optional[str]
    _rbuf: bytearray
    _rview: memoryview
    _rstart: int
    _rend: int
    _rdrained: bool

    if TYPE_CHECKING:
        @property
        def closed(self) -> bool: ...
        def _send_frame(self, ftype: int, sid: int, payload: Any) -> None: ...
        def _read_loop(self) -> None: ...
        def _negotiate_resume(self, hello: dict) -> None: ...
        def _note_received(self) -> None: ...
        def _on_ack(self, sid: int, pt: Any) -> None: ...
        def _send_data_frame(self, stream: "Stream", plaintext: Any, n: int) -> None: ...
        def _send_async(self, ftype: int, sid: int, payload: bytes) -> None: ...
        def _wait_async_drained(self) -> None: ...
        def _mark_reset(self, stream: "Stream", reason: str) -> None: ...
        def _reset_stream(self, stream: "Stream", reason: str, send: bool) -> None: ...
        def _forget(self, stream: "Stream") -> None: ...
        def _maybe_forget(self, stream: "Stream") -> None: ...
        def _on_peer_open(self, sid: int, payload: bytes) -> None: ...
