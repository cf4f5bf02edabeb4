"""``stdio``'s stdin reader (issue 17, the added round trip through ``stdio``): one io
watcher for the session, and after a short read a wait for readability instead of a
read that fails with EAGAIN (one system call less per keystroke)."""

import fcntl
import os

import gevent
from gevent import monkey

from remote_gevent.console import stdio

WAIT = 10.0


def _nonblocking_pipe():
    r, w = os.pipe()
    fcntl.fcntl(r, fcntl.F_SETFL, fcntl.fcntl(r, fcntl.F_GETFL) | os.O_NONBLOCK)
    return r, w


def test_interactive_bytes_are_read_without_eagain(monkeypatch):
    real_read = os.read
    calls = []

    def spy(fd, n):
        try:
            data = real_read(fd, n)
        except BlockingIOError:
            calls.append("EAGAIN")
            raise
        calls.append(len(data))
        return data

    r, w = _nonblocking_pipe()
    reader = stdio._Reader(r)
    monkeypatch.setattr(stdio.os, "read", spy)
    try:
        os.write(w, b"a")
        with gevent.Timeout(WAIT):
            assert reader.read(stdio.CHUNK) == b"a"
            for ch in (b"b", b"c", b"d"):  # each arrives while the reader waits
                gevent.spawn_later(0.01, os.write, w, ch)
                assert reader.read(stdio.CHUNK) == ch
            # gevent's patched os.close closes in the loop's next check phase, which an
            # idle loop reaches only after its poll: close the writer at once, as a peer
            # process exiting does.
            monkey.get_original("os", "close")(w)
            w = -1
            assert reader.read(stdio.CHUNK) == b""
    finally:
        reader.close()
        os.close(r)
        if w >= 0:
            os.close(w)
    assert calls == [1, 1, 1, 1, 0]  # one read per byte, none that would block


def test_full_reads_and_regular_files_are_read_straight_on(tmp_path):
    path = tmp_path / "input"
    path.write_bytes(b"x" * (stdio.CHUNK + 10))
    fd = os.open(str(path), os.O_RDONLY)
    reader = stdio._Reader(fd)
    try:
        with gevent.Timeout(WAIT):
            assert len(reader.read(stdio.CHUNK)) == stdio.CHUNK
            assert reader.read(stdio.CHUNK) == b"x" * 10
            assert reader.read(stdio.CHUNK) == b""
    finally:
        reader.close()
        os.close(fd)
