"""Append-only CSV history of sessions: one row per session, written when it ends.

Each row is rendered in memory and handed to the kernel in a single ``write`` on a
descriptor opened with ``O_APPEND``, so rows from concurrent sessions never interleave
and appear in the order their sessions ended. If a previous crash left a partial last
line, the next row starts on a fresh line so it stays parseable.

Durability (issue 17: the fsync is off the hub and off the set-up path):

* the ``write`` happens in the caller, before the session's ``session.close`` is
  published: once a session has ended, a crash of the agent (even ``kill -9``) cannot
  lose its row, because the kernel holds it; a crash never corrupts an earlier row;
* the ``fsync`` that takes the row to the disk is grouped: the first row written after a
  sync starts a round that waits ``SYNC_DELAY`` (1 s) and then fsyncs every row written
  meanwhile in gevent's thread pool, so a session's end no longer stops the hub for the
  1-5 ms of an fsync (issue 17 measured 2.9 ms, during the next session's set-up) and the
  thread hand-off happens at most once a round, not once a session;
* only a power loss or a kernel crash within that second can lose the rows written in
  it (never an earlier row); :meth:`History.flush` fsyncs everything at once, and the
  agent calls it when it stops (``TunnelManager.shutdown``), so a normal stop leaves
  every row on the disk;
* ``History(path, sync_delay=0)`` fsyncs each row before ``append`` returns, as before.
"""

import csv
import datetime
import io
import logging
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import gevent

from remote_gevent.common.logs import escape

log = logging.getLogger(__name__)

COLUMNS = (
    "start",  # ISO 8601, UTC
    "session_id",
    "remote_ip",
    "duration_s",
    "close_code",
    "operator",
    "targets",
    "bytes_in",  # bytes delivered to the device's local services
    "bytes_out",  # bytes sent back to the operator
    "streams",
    "reason",
    # Issue 14: an operator admitted by certificate (empty for a plain key).
    "cert_key_id",
    "cert_serial",
    # Resume (issue 12), added last so older readers keep their columns: how often the
    # session got its relay path back, and the seconds spent without one.
    "resumes",
    "resume_s",
)
FILE_MODE = 0o640
#: Seconds a written row may wait for its fsync (see the module docstring): long enough
#: that a busy agent syncs once for many sessions, short enough to bound what a power
#: loss can take.
SYNC_DELAY = 1.0
# A cell that starts with one of these is a formula to spreadsheet tools (CSV/formula
# injection, OWASP): such a cell gets a leading apostrophe, as those tools expect.
FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


def neutralise(text: str) -> str:
    """A text cell that a spreadsheet shows as text: no formula, no control characters."""
    text = escape(text, limit=None)  # no line breaks or escape sequences in a cell
    return "'" + text if text.startswith(FORMULA_TRIGGERS) else text


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).isoformat(
        timespec="milliseconds"
    )


class History:
    """Writer for the ``history_path`` CSV file (one per agent process)."""

    def __init__(self, path: str, sync_delay: float = SYNC_DELAY) -> None:
        self.path = path
        self.sync_delay = sync_delay
        # Written, not yet fsynced: one open descriptor per file (device, inode), kept
        # until its fsync so that a rename of the file meanwhile still syncs our rows.
        self._unsynced: Dict[Tuple[int, int], int] = {}
        self._syncer: Optional[gevent.Greenlet] = None
        self._syncing = False  # the syncer took its descriptors (fsync under way)

    def append(self, start: float, session_id: str, remote_ip: str, duration: float,
               close_code: str, operator: str = "", targets: Sequence[str] = (),
               bytes_in: int = 0, bytes_out: int = 0, streams: int = 0,
               reason: str = "", cert_key_id: str = "", cert_serial: str = "",
               resumes: int = 0, resume_s: float = 0.0) -> None:
        # Every text cell may carry a peer's words (a relay's answer, a reason): neutralised.
        row = [
            _iso(start), neutralise(session_id), neutralise(remote_ip), "%.3f" % duration,
            neutralise(close_code), neutralise(operator), neutralise(" ".join(targets)),
            str(bytes_in), str(bytes_out), str(streams), neutralise(reason[:200]),
            neutralise(cert_key_id[:200]), neutralise(str(cert_serial)),
            str(resumes), "%.3f" % resume_s,
        ]
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(row)
        self._write(buf.getvalue())

    def _open(self) -> int:
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT  # read: the last byte
        try:
            return os.open(self.path, flags, FILE_MODE)
        except FileNotFoundError:  # first row: the directory is made once, not per row
            directory = os.path.dirname(self.path)
            if not directory:
                raise
            os.makedirs(directory, mode=0o750, exist_ok=True)
            return os.open(self.path, flags, FILE_MODE)

    def _write(self, line: str) -> None:
        fd = self._open()
        try:
            st = os.fstat(fd)
            prefix = ""
            if st.st_size == 0:
                prefix = ",".join(COLUMNS) + "\n"
            elif not self._ends_with_newline(fd, st.st_size):
                prefix = "\n"  # a crash cut the previous row short: keep ours intact
            data = (prefix + line).encode("utf-8")
            written = os.write(fd, data)
            if written != len(data):  # disk full: say so, the row is incomplete
                raise OSError("short write to %s (%d of %d bytes)" % (self.path, written,
                                                                      len(data)))
            if self.sync_delay <= 0:
                os.fsync(fd)
                return
            key = (st.st_dev, st.st_ino)
            if key not in self._unsynced:
                self._unsynced[key] = fd
                fd = -1  # kept open for the syncer
            self._sync_soon()
        finally:
            if fd >= 0:
                os.close(fd)

    @staticmethod
    def _ends_with_newline(fd: int, size: int) -> bool:
        return os.pread(fd, 1, size - 1) == b"\n"  # O_APPEND: pread leaves writes alone

    # -- grouped fsync ---------------------------------------------------------------

    def _sync_soon(self) -> None:
        if self._syncer is None:
            self._syncer = gevent.spawn(self._sync_round)

    def _sync_round(self) -> None:
        """Wait ``sync_delay``, then fsync what was written until then, off the hub."""
        try:
            gevent.sleep(self.sync_delay)
            self._syncing = True
            fds = self._take_unsynced()
            pool = gevent.get_hub().threadpool
            for fd in fds:
                self._sync_fd(fd, lambda f: pool.apply(os.fsync, (f,)))
        finally:
            self._syncing = False
            self._syncer = None
            if self._unsynced:  # written during the fsync: the next round
                self._sync_soon()

    def _take_unsynced(self) -> List[int]:
        fds = list(self._unsynced.values())
        self._unsynced.clear()
        return fds

    def _sync_fd(self, fd: int, fsync: Callable[[int], Any]) -> None:
        try:
            fsync(fd)
        except OSError as exc:  # the rows stay in the kernel's cache: say so, go on
            log.error("cannot fsync history %s: %s", self.path, exc)
        finally:
            try:
                os.close(fd)
            except OSError:
                pass

    @property
    def pending(self) -> int:
        """Files with rows written and not yet fsynced (0: everything is on the disk)."""
        return len(self._unsynced) + (1 if self._syncing else 0)

    def flush(self) -> None:
        """Fsync every row written so far, now (the agent's stop; blocks the caller)."""
        syncer = self._syncer
        if syncer is not None and self._syncing:
            syncer.join()  # its fsync is under way in the thread pool: let it finish
        fds = self._take_unsynced()
        syncer = self._syncer
        if syncer is not None and not self._syncing:
            syncer.kill()  # still waiting: its rows are synced here, now
        for fd in fds:
            self._sync_fd(fd, os.fsync)


def read(path: str) -> List[dict]:
    """All rows as dicts (for ``sessions`` listings and tests)."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        # A file begun before a column was added: its header is shorter than newer rows.
        extra = row.pop(None, None)  # type: ignore[call-overload]
        if extra:
            missing = [c for c in COLUMNS if c not in row]
            row.update(zip(missing, extra))
    return [row for row in rows if row.get("session_id")]


def record_safely(history: "Optional[History]", **fields: object) -> None:
    """Append, logging (not raising) on I/O failure: losing a row must not kill a tunnel."""
    if history is None:
        return
    try:
        history.append(**fields)  # type: ignore[arg-type]
    except OSError as exc:
        log.error("cannot append session %s to history %s: %s",
                  fields.get("session_id"), history.path, exc)


def cert_fields(operator: object) -> dict:
    """``cert_key_id`` and ``cert_serial`` of an operator admitted by certificate."""
    cert = getattr(operator, "cert", None)
    if cert is None:
        return {}
    return {"cert_key_id": cert.key_id, "cert_serial": str(cert.serial)}
