"""The ``@transfer`` line protocol, as both ends speak it (docs/transfer.md).

One mux stream carries one operation: JSON lines (at most ``MAX_LINE`` bytes) and raw
bytes. This module has what the console and the agent share: the operations, the
result codes, :class:`TransferError`, the partial-file name and :class:`LineChannel`.
"""

import json
import logging
from typing import Any, Callable, Dict, Optional


log = logging.getLogger(__name__)

CHUNK = 256 * 1024                 # file read/write size
MAX_LINE = 4096                    # header / reply / trailer JSON line
MAX_PATH = 4096
PART_SUFFIX = ".rgpart"
OPS = ("put", "get", "stat", "list", "mkdir")
# Refusal / failure codes (TransferError.code); "transfer_<code>" in history rows.
OUTSIDE_ROOT = "outside_root"
NOT_ABSOLUTE = "not_absolute"
SYMLINK_ESCAPE = "symlink_escape"
NOT_REGULAR_FILE = "not_regular_file"
READ_ONLY = "read_only"
TOO_LARGE = "too_large"
EXISTS = "exists"
NO_SPACE = "no_space"
NOT_FOUND = "not_found"
INTEGRITY = "integrity"
IO_ERROR = "io_error"
BAD_REQUEST = "bad_request"
BUSY = "busy"                      # another upload holds the partial file
INCOMPLETE = "incomplete"          # the stream ended mid-transfer (partial kept)
CONNECTION_LOST = "connection_lost"  # console side: tunnel/stream lost
TARGET_REFUSED = "target_refused"  # the virtual target is disabled / unknown
HARD_LINK = "hard_link"            # a regular file with more than one link (root policy)

CODES = (OUTSIDE_ROOT, NOT_ABSOLUTE, SYMLINK_ESCAPE, NOT_REGULAR_FILE, READ_ONLY,
         TOO_LARGE, EXISTS, NO_SPACE, NOT_FOUND, INTEGRITY, IO_ERROR, BAD_REQUEST, BUSY,
         INCOMPLETE, CONNECTION_LOST, TARGET_REFUSED, HARD_LINK)

RESULT_OK = "transfer_ok"

class TransferError(Exception):
    """A refused or failed transfer; ``code`` is one of ``CODES``.

    ``reason`` mirrors ``message`` so that ``mux`` can turn it into OPEN_FAIL.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__("%s: %s" % (code, message))
        self.code = code
        self.message = message

    @property
    def reason(self) -> str:
        return self.message


def result_code(code: Optional[str]) -> str:
    """History close code of one transfer: ``transfer_ok`` or ``transfer_<code>``."""
    return RESULT_OK if code is None else "transfer_" + code


def part_name(name: str) -> str:
    """The predictable partial-file name of ``name`` (same directory)."""
    return "." + name + PART_SUFFIX


def is_part_name(name: str) -> bool:
    return name.startswith(".") and name.endswith(PART_SUFFIX)


class LineChannel:
    """Line + raw reads over something with ``recv``; sends with ``send_all``.

    Wraps either a socket (agent) or a mux ``Stream`` (console, see
    ``console/transfer.py``), whose ``recv`` takes no size and returns any chunk.
    """

    def __init__(self, recv: Callable[[], bytes], send_all: Callable[[bytes], None]) -> None:
        self._recv = recv
        self.send_all = send_all
        self._buf = bytearray()
        self.eof = False

    def _fill(self) -> bool:
        if self.eof:
            return False
        data = self._recv()
        if not data:
            self.eof = True
            return False
        self._buf += data
        return True

    def readline(self, what: str = "line") -> Optional[bytes]:
        """One ``\\n``-terminated line (without it); None at a clean EOF before any byte."""
        while True:
            i = self._buf.find(b"\n", 0, MAX_LINE + 1)
            if i >= 0:
                line = bytes(self._buf[:i])
                del self._buf[:i + 1]
                return line
            if len(self._buf) > MAX_LINE:
                raise TransferError(BAD_REQUEST, "%s longer than %d bytes" % (what, MAX_LINE))
            if not self._fill():
                if self._buf:
                    raise TransferError(INCOMPLETE, "stream ended inside the %s" % what)
                return None

    def read_json(self, what: str) -> Optional[Dict[str, Any]]:
        line = self.readline(what)
        if line is None:
            return None
        try:
            obj = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):  # nesting: 1 byte a level
            raise TransferError(BAD_REQUEST, "%s is not JSON" % what) from None
        if not isinstance(obj, dict):
            raise TransferError(BAD_REQUEST, "%s is not a JSON object" % what)
        return obj

    def read_some(self, limit: int) -> bytes:
        """Up to ``limit`` bytes (buffered first); b"" at EOF."""
        if self._buf:
            data = bytes(self._buf[:limit])
            del self._buf[:limit]
            return data
        if self.eof:
            return b""
        data = self._recv()
        if not data:
            self.eof = True
            return b""
        if len(data) > limit:
            self._buf += data[limit:]
            data = data[:limit]
        return data

    def peek_byte(self) -> Optional[int]:
        if not self._buf and not self._fill():
            return None
        return self._buf[0]

    def send_json(self, obj: Dict[str, Any]) -> None:
        self.send_all(dump_line(obj))


def dump_line(obj: Dict[str, Any]) -> bytes:
    data = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode("utf-8") + b"\n"
    if len(data) > MAX_LINE and "message" in obj:
        obj = dict(obj)
        obj["message"] = str(obj["message"])[:512]
        data = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode("utf-8") + b"\n"
    return data


def error_obj(e: "TransferError") -> Dict[str, Any]:
    return {"ok": False, "code": e.code, "message": e.message}
