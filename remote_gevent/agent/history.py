"""Append-only CSV history of sessions: one row per session, written when it ends.

Each row is rendered in memory and handed to the kernel in a single ``write`` on a
descriptor opened with ``O_APPEND``, then fsynced, so rows from concurrent sessions
never interleave and a crash (even ``kill -9``) can at worst lose the row being
written, never corrupt an earlier one. If a previous crash left a partial last line,
the next row starts on a fresh line so it stays parseable.
"""

import csv
import datetime
import io
import logging
import os
from typing import List, Optional, Sequence

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
    """Writer for the ``history_path`` CSV file."""

    def __init__(self, path: str) -> None:
        self.path = path

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

    def _write(self, line: str) -> None:
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, mode=0o750, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
        try:
            size = os.fstat(fd).st_size
            prefix = ""
            if size == 0:
                prefix = ",".join(COLUMNS) + "\n"
            elif not self._ends_with_newline(size):
                prefix = "\n"  # a crash cut the previous row short: keep ours intact
            data = (prefix + line).encode("utf-8")
            written = os.write(fd, data)
            if written != len(data):  # disk full: say so, the row is incomplete
                raise OSError("short write to %s (%d of %d bytes)" % (self.path, written,
                                                                      len(data)))
            os.fsync(fd)
        finally:
            os.close(fd)

    def _ends_with_newline(self, size: int) -> bool:
        with open(self.path, "rb") as f:
            f.seek(size - 1)
            return f.read(1) == b"\n"


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
