"""Logging set-up: stderr (foreground), a log file, or syslog.

Daemonized without ``--log-file``, the agent logs to syslog through ``/dev/log``
when that socket exists and to stderr otherwise (which, for a daemon, is
/dev/null: use ``--log-file`` on systems without syslog).
"""

import logging
import os
import re
import sys
from typing import Any, Optional

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
SYSLOG_FORMAT = "%(ident)s[%(process)d]: %(levelname)s %(name)s: %(message)s"
SYSLOG_SOCKET = "/dev/log"


# C0 controls, DEL and the C1 range (ESC sequences, CSI, line breaks: all that lets a
# peer forge a log line or drive an operator's terminal), plus the Unicode line and
# paragraph separators, which some log viewers break lines on.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
DEFAULT_ESCAPE_LIMIT = 200


def _escape_char(match: "re.Match[str]") -> str:
    code = ord(match.group(0))
    return "\\x%02x" % code if code <= 0xFF else "\\u%04x" % code


def escape(value: Any, limit: Optional[int] = DEFAULT_ESCAPE_LIMIT) -> str:
    """``value`` made safe for one log line: control characters escaped, truncated.

    Every string that comes from outside (file names, CLOSE reasons, hello lines,
    message fields) goes through this before it reaches a log line, so a peer can
    neither forge a line nor send escape sequences to the terminal reading the log.
    Bytes are decoded as UTF-8 with invalid bytes shown as ``\\xNN``.
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        text = bytes(value).decode("utf-8", "backslashreplace")
    else:
        text = value if isinstance(value, str) else str(value)
    if limit is not None and len(text) > limit:
        text = text[:limit] + "...(truncated)"
    return _CONTROL.sub(_escape_char, text)


class EscapingFormatter(logging.Formatter):
    """Escapes control characters in the message itself (defence in depth).

    Call sites escape untrusted values with :func:`escape`; this catches any that were
    missed: the rendered message can never span two lines or carry an escape sequence.
    A traceback (our own code's) is appended after escaping and keeps its lines.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - stdlib name
        record.message = escape(record.message, limit=None)
        return super().formatMessage(record)


class _IdentFilter(logging.Filter):
    def __init__(self, ident: str) -> None:
        super().__init__()
        self.ident = ident

    def filter(self, record: logging.LogRecord) -> bool:
        record.ident = self.ident
        return True


def setup(level: str = "INFO", log_file: Optional[str] = None, foreground: bool = True,
          ident: str = "remote-gevent", syslog_socket: str = SYSLOG_SOCKET) -> logging.Handler:
    """Configure the root logger once; returns the handler installed."""
    # logging.handlers only when used: an agent logging to stderr does without it (RSS).
    handler: logging.Handler
    if log_file:
        from logging.handlers import WatchedFileHandler

        handler = WatchedFileHandler(log_file)  # logrotate-friendly
        handler.setFormatter(EscapingFormatter(FORMAT))
    elif not foreground and os.path.exists(syslog_socket):
        from logging.handlers import SysLogHandler

        handler = SysLogHandler(address=syslog_socket, facility=SysLogHandler.LOG_DAEMON)
        handler.addFilter(_IdentFilter(ident))
        handler.setFormatter(EscapingFormatter(SYSLOG_FORMAT))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(EscapingFormatter(FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # Libraries are chatty at DEBUG; keep them at INFO unless asked explicitly.
    for noisy in ("amqp", "paramiko"):
        logging.getLogger(noisy).setLevel(max(root.level, logging.INFO))
    return handler


class UserFacingFormatter(EscapingFormatter):
    """``PROG: message`` — a log record shown to an operator as one plain line.

    No level, logger name or traceback (issue 15: raw ``WARNING remote_gevent.mux …``
    lines in the operator's terminal): those are for ``-v``."""

    def __init__(self, prog: str) -> None:
        super().__init__("%s: %%(message)s" % prog.replace("%", "%%"))

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - stdlib name
        text = super().formatMessage(record)
        if record.levelno < logging.ERROR:
            prefix, _, rest = text.partition(": ")
            text = "%s: warning: %s" % (prefix, rest)
        return text

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            text = super().format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved
        return text + (" (run with -v for details)" if saved[0] else "")


class _UserFacing(logging.Filter):
    """ERROR and above from anywhere; warnings only from the tool's own modules (``own``,
    a logger name prefix): the tunnel's and the libraries' warnings are for ``-v``."""

    def __init__(self, own: str) -> None:
        super().__init__()
        self.own = own

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or record.name == self.own \
            or record.name.startswith(self.own + ".")


def setup_console(prog: str, verbose: int, own: str = "remote_gevent.console"
                  ) -> logging.Handler:
    """Logging of a command-line tool run by a person (the console).

    ``verbose`` 0: errors, and warnings of the ``own`` modules, as plain ``PROG: message``
    / ``PROG: warning: message`` lines (what went wrong is otherwise said by the command
    itself, once); 1: INFO, 2+: DEBUG, as log records (level and logger name)."""
    handler = logging.StreamHandler(sys.stderr)
    if verbose <= 0:
        handler.setFormatter(UserFacingFormatter(prog))
        handler.addFilter(_UserFacing(own))
        level = logging.WARNING
    else:
        handler.setFormatter(EscapingFormatter(
            "%s: %%(levelname)s %%(name)s: %%(message)s" % prog.replace("%", "%%")))
        level = logging.INFO if verbose == 1 else logging.DEBUG
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("amqp", "paramiko"):
        logging.getLogger(noisy).setLevel(max(level, logging.INFO))
    return handler
