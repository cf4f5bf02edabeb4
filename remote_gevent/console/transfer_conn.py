"""The ``@transfer`` stream as the console uses it: line framing over one mux stream,
mux errors turned into ``TransferError``; and the one-request operations (stat, mkdir,
list) that ``push -r`` / ``pull -r`` build on (docs/transfer.md)."""

from __future__ import annotations

from typing import Any, Callable, Dict, List

from remote_gevent.wire.transfer_lines import (
    CONNECTION_LOST,
    TARGET_REFUSED,
    LineChannel,
    TransferError,
    dump_line,
)

DRAIN_LIMIT = 64 * 1024    # bytes we read after a trailer while waiting for EOF

StreamFactory = Callable[[], Any]


def _lost(e: BaseException) -> TransferError:
    return TransferError(CONNECTION_LOST, "tunnel or stream lost: %s" % (e,))


class _Conn:
    """One ``@transfer`` stream with line framing; mux errors become TransferError."""

    def __init__(self, stream_factory: StreamFactory) -> None:
        from remote_gevent.wire import mux  # late: mux is heavy and not needed for exit codes
        from remote_gevent.wire import mux_frames
        self._mux = mux
        try:
            self.stream = stream_factory()
        except mux_frames.StreamRefused as e:
            raise TransferError(TARGET_REFUSED if e.code == "target_refused" else e.code,
                                "@transfer refused by the device: %s" % (e.reason or e.code)) \
                from None
        except (mux_frames.MuxError, OSError) as e:
            raise _lost(e) from None
        self.ch = LineChannel(self._recv, self._send)

    def _recv(self) -> bytes:
        try:
            return self.stream.recv()
        except (self._mux.MuxError, OSError) as e:
            raise _lost(e) from None

    def _send(self, data: Any) -> None:
        try:
            self.stream.send(data)
        except (self._mux.MuxError, OSError) as e:
            raise _lost(e) from None

    def request(self, header: Dict[str, Any], half_close: bool) -> Dict[str, Any]:
        self._send(dump_line(header))
        if half_close:
            self.shutdown_write()
        return self.answer("reply")

    def answer(self, what: str) -> Dict[str, Any]:
        obj = self.ch.read_json(what)
        if obj is None:
            raise TransferError(CONNECTION_LOST, "the device ended the stream before its %s"
                                % what)
        if obj.get("ok") is not True:
            raise TransferError(str(obj.get("code") or "error"),
                                str(obj.get("message") or "refused by the device"))
        return obj

    def shutdown_write(self) -> None:
        try:
            self.stream.shutdown_write()
        except (self._mux.MuxError, OSError) as e:
            raise _lost(e) from None

    def close(self) -> None:
        try:
            self.stream.close()
        except (self._mux.MuxError, OSError):
            pass

    def finish(self) -> None:
        """After the final line: wait briefly for the agent's EOF, then close."""
        try:
            got = 0
            while got < DRAIN_LIMIT:
                data = self.ch.read_some(DRAIN_LIMIT)
                if not data:
                    break
                got += len(data)
        except TransferError:
            pass
        self.close()


def remote_stat(stream_factory: StreamFactory, remote: str) -> Dict[str, Any]:
    """``stat`` a remote path; raises TransferError (``not_found`` if missing)."""
    conn = _Conn(stream_factory)
    try:
        return conn.request({"op": "stat", "path": remote}, half_close=True)
    finally:
        conn.finish()


def remote_mkdir(stream_factory: StreamFactory, remote: str, parents: bool = True) -> bool:
    conn = _Conn(stream_factory)
    try:
        return bool(conn.request({"op": "mkdir", "path": remote, "parents": parents},
                                 half_close=True).get("created"))
    finally:
        conn.finish()


def remote_list(stream_factory: StreamFactory, remote: str) -> list:
    conn = _Conn(stream_factory)
    try:
        conn.request({"op": "list", "path": remote}, half_close=True)
        entries: List[Dict[str, Any]] = []
        while True:
            obj = conn.ch.read_json("entry")
            if obj is None:
                raise TransferError(CONNECTION_LOST, "listing of %s cut short" % remote)
            if obj.get("end"):
                if obj.get("ok") is not True:
                    raise TransferError(str(obj.get("code")), str(obj.get("message")))
                return entries
            entries.append(obj)
    finally:
        conn.finish()
