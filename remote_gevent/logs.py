"""Logging set-up: stderr (foreground), a log file, or syslog.

Daemonized without ``--log-file``, the agent logs to syslog through ``/dev/log``
when that socket exists and to stderr otherwise (which, for a daemon, is
/dev/null: use ``--log-file`` on systems without syslog).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
SYSLOG_FORMAT = "%(ident)s[%(process)d]: %(levelname)s %(name)s: %(message)s"
SYSLOG_SOCKET = "/dev/log"


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
        handler.setFormatter(logging.Formatter(FORMAT))
    elif not foreground and os.path.exists(syslog_socket):
        from logging.handlers import SysLogHandler

        handler = SysLogHandler(address=syslog_socket, facility=SysLogHandler.LOG_DAEMON)
        handler.addFilter(_IdentFilter(ident))
        handler.setFormatter(logging.Formatter(SYSLOG_FORMAT))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
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
