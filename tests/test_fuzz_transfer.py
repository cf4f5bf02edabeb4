"""Hostile-input tier: the ``@transfer`` line protocol under fuzzing.

An operator's console sends a JSON header line (then data and a trailer for ``put``).
Documented outcome (transfer.py, docs/transfer.md): ``serve_transfer_stream`` returns a
result whose ``code`` is ``transfer_ok`` or ``transfer_<code>`` with ``<code>`` in
``transfer_lines.CODES``; every refusal it sends is one JSON line ``{"ok": false, "code",
"message"}`` with a code from the same set; no other exception escapes, nothing is
written outside the roots, and nothing hangs. Valid puts round-trip through get.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile

import gevent
from fuzz_settings import examples
from hypothesis import example, given
from hypothesis import strategies as st

from remote_gevent.agent.files import roots
from remote_gevent.agent.files import transfer
from remote_gevent.wire import transfer_lines

LIMIT = 5.0
PROD_RECURSION = 1000

_TMP = tempfile.mkdtemp(prefix="rg-fuzz-transfer-")
atexit.register(shutil.rmtree, _TMP, True)
RW = os.path.join(_TMP, "rw")
RO = os.path.join(_TMP, "ro")
OUTSIDE = os.path.join(_TMP, "outside")
for _d in (RW, RO, OUTSIDE):
    os.mkdir(_d)
with open(os.path.join(RO, "readme.txt"), "wb") as _f:
    _f.write(b"read only\n")
with open(os.path.join(OUTSIDE, "secret"), "wb") as _f:
    _f.write(b"secret\n")
os.symlink(OUTSIDE, os.path.join(RW, "escape"))
ROOTS = roots.Roots([roots.Root(RW, writable=True, max_size=1 << 20),
                        roots.Root(RO)], overwrite=True)
OUTSIDE_BEFORE = sorted(os.listdir(OUTSIDE))


def _serve(wire: bytes):
    """Serve one stream that sends ``wire`` then EOF; return (result, reply bytes)."""
    ours, peer = socket.socketpair()
    old_limit = sys.getrecursionlimit()
    sys.setrecursionlimit(PROD_RECURSION)
    try:
        server = gevent.spawn(transfer.serve_transfer_stream, ours, ROOTS, "fuzz")

        def talk() -> bytes:
            try:
                peer.sendall(wire)
                peer.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the server already answered and closed
            chunks = []
            while True:
                chunk = peer.recv(1 << 16)
                if not chunk:
                    return b"".join(chunks)
                chunks.append(chunk)

        client = gevent.spawn(talk)
        with gevent.Timeout(LIMIT, AssertionError("transfer stream still open after %ss" % LIMIT)):
            result = server.get()
            reply = client.get()
    finally:
        sys.setrecursionlimit(old_limit)
        peer.close()
        ours.close()
    return result, reply


_KNOWN = {transfer_lines.RESULT_OK} | {transfer_lines.result_code(c) for c in transfer_lines.CODES}


def _check(result, reply: bytes) -> None:
    assert result["code"] in _KNOWN, result
    assert sorted(os.listdir(OUTSIDE)) == OUTSIDE_BEFORE
    # The reply starts with one JSON line (header reply or refusal); a refusal's code is
    # documented. (``get`` data follows its first line; not parsed here.)
    if reply:
        first = reply.split(b"\n", 1)[0]
        obj = json.loads(first)
        assert isinstance(obj, dict)
        if obj.get("ok") is False:
            assert obj.get("code") in transfer_lines.CODES, obj


_NAMES = st.sampled_from(["a", "b.txt", ".a.rgpart", "..", ".", "escape", "escape/secret",
                          "readme.txt", "", "x" * 300, "d/e", "\x00", "\ud800", "\udcff",
                          "\n", "é", "a//b", "a/../../outside/secret"])
_PATHS = st.one_of(
    st.builds(lambda top, parts: "/".join([top] + parts),
              st.sampled_from([RW, RO, OUTSIDE, _TMP, "", "/", "/etc", "rel"]),
              st.lists(_NAMES, max_size=3)),
    st.text(max_size=30),
    st.just("/" * 5000),
)
_VALUES = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                    st.text(max_size=10), st.lists(st.integers(), max_size=2),
                    st.sampled_from(["0" * 64, "f" * 64, "F" * 64, 10 ** 30, -1, 2 ** 63]))
_HEADERS = st.fixed_dictionaries(
    {"op": st.one_of(st.sampled_from(transfer_lines.OPS), _VALUES)},
    optional={"path": st.one_of(_PATHS, _VALUES), "size": st.one_of(st.integers(0, 64), _VALUES),
              "sha256": _VALUES, "overwrite": _VALUES, "resume": _VALUES, "parents": _VALUES,
              "offset": _VALUES, "extra": _VALUES})


def _header_line(obj) -> bytes:
    return json.dumps(obj).encode("utf-8", "surrogatepass") + b"\n"


@examples(200, slow=True)
@given(_HEADERS, st.binary(max_size=80))
@example({"op": "stat", "path": RW + "/\ud800"}, b"")
@example({"op": "put", "path": RW + "/\ud800", "size": 0}, b"")
@example({"op": "list", "path": "/\udcff"}, b"")
@example({"op": "put", "path": RW + "/escape/x", "size": 1}, b"x")
def test_any_header(header, rest):
    result, reply = _serve(_header_line(header) + rest)
    _check(result, reply)


@examples(100, slow=True)
@given(st.binary(max_size=200))
@example(b"[" * 2040 + b"\n")
@example(b'{"op":' * 700 + b"\n")
@example(b"x" * (transfer_lines.MAX_LINE + 10))
@example(b"\xff\xfe\n")
@example(b'{"op": "stat", "op": "get", "path": "/"}\n')
def test_any_bytes(wire):
    result, reply = _serve(wire)
    _check(result, reply)


@examples(40, slow=True)
@given(st.binary(max_size=3000), st.from_regex(r"\A[a-z0-9_-]{1,20}\Z"), st.booleans())
def test_valid_put_round_trips(data, name, send_sha):
    path = RW + "/" + name
    header = {"op": "put", "path": path, "size": len(data), "overwrite": True}
    digest = hashlib.sha256(data).hexdigest()
    if send_sha:
        header["sha256"] = digest
    trailer = _header_line({"sha256": digest})
    result, reply = _serve(_header_line(header) + data + trailer)
    assert result["code"] == transfer_lines.RESULT_OK, (result, reply)
    result, reply = _serve(_header_line({"op": "get", "path": path}))
    assert result["code"] == transfer_lines.RESULT_OK, (result, reply)
    assert data in reply


# ---------------------------------------------------------------- console side
# The operator's console parses what the device answers (console/transfer.py, same line
# protocol): a hostile or broken device may answer anything. Documented outcome: the
# operation returns or raises TransferError; nothing lands outside the local target.

from remote_gevent.console import transfer as ctransfer  # noqa: E402


class _FakeStream:
    """A mux Stream double: recv() plays one scripted answer in small chunks, then EOF."""

    def __init__(self, answer: bytes, chunk: int) -> None:
        self.answer = answer
        self.chunk = chunk
        self.sent = []

    def recv(self) -> bytes:
        out, self.answer = self.answer[:self.chunk], self.answer[self.chunk:]
        return out

    def send(self, data) -> None:
        self.sent.append(bytes(data))

    def shutdown_write(self) -> None:
        pass

    def close(self) -> None:
        pass


def _factory(answers, chunk: int, cap: int = 1500):
    state = {"n": 0}

    def open_stream():
        state["n"] += 1
        if state["n"] > cap:
            raise ConnectionResetError(104, "fake tunnel: stream budget used up")
        return _FakeStream(answers[(state["n"] - 1) % len(answers)], chunk)
    return open_stream


_ANSWER_OBJS = st.one_of(
    st.fixed_dictionaries({"ok": st.sampled_from([True, False, None, 1])},
                          optional={"code": _VALUES, "message": _VALUES, "size": _VALUES,
                                    "offset": _VALUES, "prefix_sha256": _VALUES,
                                    "type": st.sampled_from(["dir", "file", "link", 1]),
                                    "name": st.sampled_from(["a", "..", ".", "/", "a/b", "",
                                                             "\x1b[2J", 1]),
                                    "end": st.booleans(), "sha256": _VALUES,
                                    "created": _VALUES}),
    _VALUES,
)
_ANSWER = st.one_of(
    st.lists(_ANSWER_OBJS, max_size=4).map(
        lambda objs: b"".join(_header_line(o) for o in objs)),
    st.binary(max_size=60),
    st.just(b"[" * 3000 + b"\n"),
)
_LOCAL = os.path.join(_TMP, "local")
os.mkdir(_LOCAL)


@examples(150, slow=True)
@given(st.lists(_ANSWER, min_size=1, max_size=3), st.integers(1, 64),
       st.sampled_from(["stat", "list", "mkdir", "get", "pull"]))
@example([b'{"ok": true, "type": "dir"}\n{"name": "a", "type": "dir"}\n'
          b'{"end": true, "ok": true}\n'], 64, "pull")  # a directory "a" inside itself, forever
@example([b'{"ok": true, "type": "dir", "size": 0, "offset": 0}\n'
          b'{"ok": true, "name": "a", "type": "file", "sha256": "%s"}\n'
          b'{"name": "a", "type": "dir"}\n{"end": true, "ok": true}\n'
          % hashlib.sha256(b"").hexdigest().encode()],
         64, "pull")  # "a" listed as a file (and served), then as a directory
def test_console_any_device_answer(answers, chunk, op):
    shutil.rmtree(_LOCAL)
    os.mkdir(_LOCAL)
    factory = _factory(answers, chunk)
    before = set(os.listdir(_TMP))
    old_limit = sys.getrecursionlimit()
    sys.setrecursionlimit(PROD_RECURSION)
    try:
        with gevent.Timeout(LIMIT, AssertionError("console operation still running")):
            if op == "stat":
                ctransfer.remote_stat(factory, "/x")
            elif op == "list":
                ctransfer.remote_list(factory, "/x")
            elif op == "mkdir":
                ctransfer.remote_mkdir(factory, "/x")
            elif op == "get":
                ctransfer.get_file(factory, "/x", os.path.join(_LOCAL, "got"))
            else:
                ctransfer.pull(factory, "/x", os.path.join(_LOCAL, "tree"), recursive=True)
    except ctransfer.TransferError as exc:
        assert isinstance(exc.code, str) and isinstance(exc.message, str)
    finally:
        sys.setrecursionlimit(old_limit)
    assert set(os.listdir(_TMP)) == before  # nothing outside the local target
