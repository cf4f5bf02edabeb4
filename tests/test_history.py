"""History CSV: header once, one row per session, never corrupted by a kill -9."""

import csv
import os
import signal
import subprocess
import sys
import time

import gevent
import pytest

from remote_gevent.agent import history


@pytest.fixture(autouse=True)
def _histories_flushed_at_the_end(monkeypatch):
    """Every History a test makes is flushed when the test ends. Its grouped fsync runs
    up to SYNC_DELAY (1 s) later: left alone it could land in a later test that replaced
    ``os.fsync`` and be counted there (seen on a slow machine: 6 fsyncs where 2 were
    expected)."""
    made = []
    real_init = history.History.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(history.History, "__init__", init)
    yield
    for h in made:
        h.flush()


def _append(h, sid, **kw):
    h.append(start=1700000000.0, session_id=sid, remote_ip="127.0.0.1", duration=1.5,
             close_code="normal", **kw)


def test_header_and_rows(tmp_path):
    path = str(tmp_path / "sub" / "history.csv")
    h = history.History(path)
    _append(h, "a" * 32, operator="SHA256:x", targets=["127.0.0.1:22", "@sftp"],
            bytes_in=10, bytes_out=20, streams=2, reason='said "bye", then left')
    _append(h, "b" * 32)
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == history.COLUMNS
    assert rows[1][:5] == ["2023-11-14T22:13:20.000+00:00", "a" * 32, "127.0.0.1", "1.500",
                           "normal"]
    assert rows[1][6] == "127.0.0.1:22 @sftp"
    assert rows[1][history.COLUMNS.index("reason")] == 'said "bye", then left'
    assert rows[1][history.COLUMNS.index("resumes"):] == ["0", "0.000"]  # issue 12
    assert [r["session_id"] for r in history.read(path)] == ["a" * 32, "b" * 32]
    assert oct(os.stat(path).st_mode & 0o777) == oct(history.FILE_MODE)


def test_resume_columns_and_a_file_with_the_older_header(tmp_path):
    """Rows gain resumes/resume_s; a file begun before them still reads with names."""
    path = str(tmp_path / "history.csv")
    old_header = ",".join(history.COLUMNS[:-2])
    with open(path, "w") as f:
        f.write(old_header + "\n")
    h = history.History(path)
    _append(h, "c" * 32, resumes=3, resume_s=12.25)
    row = history.read(path)[0]
    assert row["resumes"] == "3" and row["resume_s"] == "12.250"
    assert row["close_code"] == "normal" and None not in row


def test_partial_last_line_does_not_swallow_next_row(tmp_path):
    path = str(tmp_path / "history.csv")
    h = history.History(path)
    _append(h, "a" * 32)
    with open(path, "a") as f:
        f.write("2023-11-14T22:13:20,cut-short")  # what a crash mid-row could leave
    _append(h, "c" * 32)
    ids = [r["session_id"] for r in history.read(path)]
    assert ids[0] == "a" * 32 and ids[-1] == "c" * 32


def test_concurrent_greenlets_never_interleave(tmp_path):
    path = str(tmp_path / "history.csv")
    h = history.History(path)
    jobs = [gevent.spawn(_append, h, "%032x" % i, reason="x" * 150) for i in range(200)]
    gevent.joinall(jobs, timeout=30, raise_error=True)
    rows = history.read(path)
    assert sorted(r["session_id"] for r in rows) == ["%032x" % i for i in range(200)]
    assert all(r["close_code"] == "normal" and r["reason"] == "x" * 150 for r in rows)


WRITER = r"""
import sys
from remote_gevent.agent.history import History
h = History(sys.argv[1])
i = 0
while True:
    h.append(start=1.0, session_id="%032x" % i, remote_ip="10.0.0.1", duration=0.1,
             close_code="normal", reason="r" * 100)
    i += 1
"""


def test_kill_9_never_corrupts_earlier_rows(tmp_path):
    path = str(tmp_path / "history.csv")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, path])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (not os.path.exists(path)
                                           or os.path.getsize(path) < 20000):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    history.History(path).append(start=2.0, session_id="f" * 32, remote_ip="::1",
                                 duration=0.0, close_code="shutdown")
    rows = history.read(path)
    assert len(rows) > 50
    *earlier, cut, last = rows
    for i, row in enumerate(earlier):
        assert row["session_id"] == "%032x" % i
        assert row["reason"] == "r" * 100
    # The row being written when the kill came may be cut short (the kernel can stop a
    # write to a file between two pages on SIGKILL): it is the only one, and the next
    # row still starts on a line of its own.
    if cut["reason"] != "r" * 100:
        assert cut["session_id"] is None or ("%032x" % len(earlier)).startswith(
            cut["session_id"])
    else:
        assert cut["session_id"] == "%032x" % len(earlier)
    assert last["session_id"] == "f" * 32 and last["close_code"] == "shutdown"


def test_record_safely_logs_instead_of_raising(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    h = history.History(str(blocker / "history.csv"))
    history.record_safely(h, start=1.0, session_id="d" * 32, remote_ip="", duration=0.0,
                          close_code="error")
    assert "d" * 32 in caplog.text and "cannot append" in caplog.text


def test_formula_and_control_characters_are_neutralised(tmp_path):
    # Issue 10 item 7: a peer's text must never become a spreadsheet formula or split a row.
    path = str(tmp_path / "history.csv")
    h = history.History(path)
    h.append(start=1700000000.0, session_id="c" * 32, remote_ip="=1+2", duration=0.5,
             close_code="+cmd", operator="@SUM(A1)", targets=["-x"],
             reason='=HYPERLINK("http://evil")\r\nforged,row')
    h.append(start=1700000000.0, session_id="d" * 32, remote_ip="\tx", duration=0.5,
             close_code="normal", reason="\rcr")
    rows = history.read(path)
    assert len(rows) == 2
    first, second = rows
    assert first["remote_ip"] == "'=1+2"
    assert first["close_code"] == "'+cmd"
    assert first["operator"] == "'@SUM(A1)"
    assert first["targets"] == "'-x"
    assert first["reason"].startswith("'=HYPERLINK(")
    assert "\n" not in first["reason"] and "\r" not in first["reason"]
    assert second["remote_ip"] == "\\x09x"  # escaped: no longer a tab, nor a formula
    assert second["reason"] == "\\x0dcr"
    with open(path) as f:
        assert len(f.read().splitlines()) == 3  # header + 2 rows, nothing forged


# Issue 17: the fsync is grouped and runs off the hub; the write is not.


def test_append_writes_at_once_and_fsyncs_later_off_the_hub(tmp_path, monkeypatch):
    """A row is in the file (the kernel) when append returns, with no fsync in the
    caller; one fsync for every row of the round follows, in a thread pool worker."""
    import threading

    real_fsync = os.fsync
    synced = []  # (thread id, fd)

    def spy(fd):
        synced.append(threading.get_ident())
        real_fsync(fd)

    monkeypatch.setattr(history.os, "fsync", spy)
    path = str(tmp_path / "history.csv")
    h = history.History(path, sync_delay=0.2)
    for i in range(5):
        _append(h, "%032x" % i)
        assert [r["session_id"] for r in history.read(path)][-1] == "%032x" % i
    assert synced == [] and h.pending == 1
    with gevent.Timeout(30):
        while h.pending:
            gevent.sleep(0.05)
    assert len(synced) == 1 and synced[0] != threading.get_ident()
    _append(h, "e" * 32)  # a later row starts the next round
    with gevent.Timeout(30):
        while h.pending:
            gevent.sleep(0.05)
    assert len(synced) == 2


def test_flush_fsyncs_pending_rows_now(tmp_path, monkeypatch):
    real_fsync = os.fsync
    synced = []
    monkeypatch.setattr(history.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    path = str(tmp_path / "history.csv")
    h = history.History(path, sync_delay=3600)
    _append(h, "a" * 32)
    _append(h, "b" * 32)
    assert h.pending == 1 and synced == []
    h.flush()
    assert h.pending == 0 and len(synced) == 1
    h.flush()  # nothing left: no fsync
    assert len(synced) == 1
    assert [r["session_id"] for r in history.read(path)] == ["a" * 32, "b" * 32]


def test_sync_delay_zero_fsyncs_each_row_in_append(tmp_path, monkeypatch):
    real_fsync = os.fsync
    synced = []
    monkeypatch.setattr(history.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    h = history.History(str(tmp_path / "history.csv"), sync_delay=0)
    _append(h, "a" * 32)
    _append(h, "b" * 32)
    assert len(synced) == 2 and h.pending == 0


def test_a_failing_fsync_is_logged_not_raised(tmp_path, monkeypatch, caplog):
    def broken(fd):
        raise OSError(5, "Input/output error")

    path = str(tmp_path / "history.csv")
    h = history.History(path, sync_delay=0.05)
    monkeypatch.setattr(history.os, "fsync", broken)
    _append(h, "a" * 32)
    with gevent.Timeout(30):
        while h.pending:
            gevent.sleep(0.02)
    _append(h, "b" * 32)
    h.flush()
    assert caplog.text.count("cannot fsync history") == 2
    assert [r["session_id"] for r in history.read(path)] == ["a" * 32, "b" * 32]
