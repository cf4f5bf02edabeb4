"""Targeted file transfers, agent side: the roots policy and the ``@transfer`` stream.

An operator moves one file per stream to or from an allowed place on the device
(docs/transfer.md has the wire protocol).  What this module guarantees, and why:

- **Confinement.**  A remote path is absolute, lexically normalised, matched to the
  most specific configured root, then resolved with ``os.path.realpath``; a result
  outside the root (a symlink pointing out) is refused.  The resolved path is then
  opened component by component from the root's directory fd with ``O_NOFOLLOW``, so
  a symlink planted after the realpath check makes the open fail instead of
  escaping.  Only regular files are read or written (no devices, fifos, sockets).
- **Atomic writes.**  An upload goes to ``.<name>.rgpart`` in the target directory,
  is fsynced, its sha256 checked against the console's, and only then renamed over
  the final name (``renameat2(RENAME_NOREPLACE)`` when overwriting is not allowed, so
  a file that appeared meanwhile is never clobbered); the directory is fsynced.  A
  failed or corrupt upload keeps nothing; an *interrupted* one keeps its partial
  file, whose predictable name is what makes resume possible.
- **Integrity.**  sha256 on both ends; resume re-hashes the kept prefix and tells the
  console, which checks it against its own file before continuing.
- **The hub keeps running.**  File I/O blocks the gevent loop, so data moves in
  256 KiB chunks with a ``gevent.sleep(0)`` every few MiB, and fsync (which can take
  seconds on a large file) runs in gevent's threadpool.

- **Hard links.**  A hard link inside a root to a file elsewhere cannot be told
  apart from the file itself, so a regular file whose link count is above 1 is
  neither served nor replaced (``hard_link``) unless the root has
  ``allow_hardlinks``; the count is taken with ``fstat`` on the opened descriptor.
  A partial file is ours alone: one with a second link is always refused.
- **Partials expire and are bounded** (``transfer_partials``): ``partial_ttl`` and
  the root's ``partial_quota``.
- **Log lines.**  Every client-supplied name goes through ``logs.escape``.

Residual risk (documented in docs/transfer.md): a local user who can write inside
a root *and* move directories out of it could race a directory rename between two
steps of the fd walk.  ``openat2(RESOLVE_BENEATH)`` (Linux 5.6+) would close it;
it is not used because Python 3.8 has no binding for it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import json
import logging
import os
import posixpath
import socket
import stat
import struct
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import gevent

from remote_gevent.agent.files import transfer_partials as partials
from remote_gevent.common.logs import escape
from remote_gevent.wire.codes import VIRTUAL_SFTP, VIRTUAL_TARGETS, VIRTUAL_TRANSFER

log = logging.getLogger(__name__)


CHUNK = 256 * 1024                 # file read/write size
MAX_LINE = 4096                    # header / reply / trailer JSON line
MAX_PATH = 4096
YIELD_EVERY = 4 * 1024 * 1024      # gevent.sleep(0) after this many bytes of file I/O
HEADER_TIMEOUT = 30.0              # waiting for the console's header
IDLE_TIMEOUT = 300.0               # no byte either way for this long: give up
BUSY_WAIT = 5.0                    # wait this long for another stream's lock on a partial
DRAIN_TIMEOUT = 10.0               # after an error reply, wait this long for the console's EOF
MAX_LIST_ENTRIES = 100000
DEFAULT_MAX_SIZE = 4 * 1024 ** 3
DEFAULT_PARTIAL_TTL = 86400        # an abandoned partial upload is removed after a day
PART_SUFFIX = ".rgpart"
FILE_MODE = 0o644
DIR_MODE = 0o755
PART_MODE = 0o600

OPS = ("put", "get", "stat", "list", "mkdir")
QUIET_OPS = ("stat", "list")       # lookups, not transfers: not passed to on_result

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

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_RENAME_NOREPLACE = 1


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


# --------------------------------------------------------------------------- roots


class Root:
    """One configured root: a directory, writable or not, with its size cap, the
    bytes its partial uploads may hold, and whether hard-linked files are served."""

    def __init__(self, path: str, writable: bool = False,
                 max_size: int = DEFAULT_MAX_SIZE, allow_hardlinks: bool = False,
                 partial_quota: Optional[int] = None) -> None:
        self.path = _lexical(os.path.abspath(path))
        self.real = os.path.realpath(self.path)
        self.writable = writable
        self.max_size = max_size
        self.allow_hardlinks = allow_hardlinks
        self.partial_quota = partial_quota if partial_quota else 2 * max_size

    def __repr__(self) -> str:
        return "Root(%r, %s, max_size=%d)" % (self.real, "rw" if self.writable else "ro",
                                               self.max_size)

    def open_dir(self, parts: Iterable[str]) -> int:
        """A directory fd for ``root/parts…``, every component opened ``O_NOFOLLOW``."""
        fd = _open_checked(self.real, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC, None,
                           "/".join(parts))
        try:
            for comp in parts:
                nfd = _open_checked(comp, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC,
                                    fd, comp)
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd


def _open_checked(path: str, flags: int, dir_fd: Optional[int], shown: str) -> int:
    try:
        return os.open(path, flags, dir_fd=dir_fd)
    except OSError as e:
        raise _os_error(e, shown) from None


def _os_error(e: OSError, shown: str) -> TransferError:
    """Map an errno from a confined open/stat/rename to a TransferError."""
    if e.errno == errno.ENOENT:
        return TransferError(NOT_FOUND, "%s: no such file or directory" % shown)
    if e.errno == errno.ELOOP:
        return TransferError(SYMLINK_ESCAPE, "%s: a symlink appeared while resolving the path"
                             % shown)
    if e.errno == errno.ENOTDIR:
        return TransferError(NOT_FOUND, "%s: a path component is not a directory" % shown)
    if e.errno == errno.EEXIST:
        return TransferError(EXISTS, "%s already exists" % shown)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return TransferError(NO_SPACE, "no space left on the device for %s" % shown)
    if e.errno == errno.EISDIR:
        return TransferError(NOT_REGULAR_FILE, "%s is a directory" % shown)
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return TransferError(IO_ERROR, "%s: permission denied (%s)"
                             % (shown, os.strerror(e.errno)))
    return TransferError(IO_ERROR, "%s: %s" % (shown, e.strerror or e))


def _lexical(path: str) -> str:
    norm = posixpath.normpath(path)
    return "/" + norm.lstrip("/")


def _within(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


class Resolved:
    """A remote path resolved inside a root.

    ``parts`` are the components below ``root.real`` (empty for the root itself);
    ``name`` is the last one (``None`` for the root), ``path`` the real absolute path.
    """

    def __init__(self, root: Root, parts: List[str]) -> None:
        self.root = root
        self.parts = parts
        self.path = root.real if not parts else root.real.rstrip("/") + "/" + "/".join(parts)

    @property
    def name(self) -> Optional[str]:
        return self.parts[-1] if self.parts else None

    def open_parent(self) -> int:
        """fd of the directory holding ``name`` (the root's parent is never opened)."""
        return self.root.open_dir(self.parts[:-1])

    def open_self_dir(self) -> int:
        return self.root.open_dir(self.parts)

    def __repr__(self) -> str:
        return "Resolved(%r)" % self.path


class Roots:
    """The transfer policy: which absolute paths may be read or written."""

    def __init__(self, roots: Iterable[Root], overwrite: bool = False,
                 partial_ttl: float = DEFAULT_PARTIAL_TTL) -> None:
        self.roots = list(roots)
        self.overwrite = overwrite
        self.partial_ttl = partial_ttl

    @classmethod
    def from_config(cls, transfer_cfg: Any) -> "Roots":
        """From ``cfg.remote.transfer`` (roots of {path, mode, max_size, partial_quota,
        allow_hardlinks}, max_size, overwrite, partial_ttl, partial_quota)."""
        default_cap = getattr(transfer_cfg, "max_size", DEFAULT_MAX_SIZE) or DEFAULT_MAX_SIZE
        default_quota = getattr(transfer_cfg, "partial_quota", None)
        roots = []
        for r in getattr(transfer_cfg, "roots", ()) or ():
            get = r.get if isinstance(r, dict) else (lambda k, d=None, r=r: getattr(r, k, d))
            roots.append(Root(get("path"), writable=(get("mode", "ro") == "rw"),
                              max_size=get("max_size") or default_cap,
                              allow_hardlinks=bool(get("allow_hardlinks", False)),
                              partial_quota=get("partial_quota") or default_quota))
        return cls(roots, overwrite=bool(getattr(transfer_cfg, "overwrite", False)),
                   partial_ttl=getattr(transfer_cfg, "partial_ttl", None)
                   or DEFAULT_PARTIAL_TTL)

    def __bool__(self) -> bool:
        return bool(self.roots)

    def check_path(self, remote_path: Any) -> str:
        """Type/shape checks; return the lexically normalised absolute path."""
        if not isinstance(remote_path, str) or not remote_path:
            raise TransferError(BAD_REQUEST, "path must be a non-empty string")
        if "\0" in remote_path or len(remote_path) > MAX_PATH:
            raise TransferError(BAD_REQUEST, "path contains NUL or is too long")
        try:
            os.fsencode(remote_path)  # a lone surrogate (JSON "\ud800") names no file
        except UnicodeEncodeError:
            raise TransferError(BAD_REQUEST, "path is not valid UTF-8") from None
        if not remote_path.startswith("/"):
            raise TransferError(NOT_ABSOLUTE, "%s: remote paths must be absolute" % remote_path)
        return _lexical(remote_path)

    def virtual_children(self, remote_path: str) -> Optional[List[str]]:
        """Names below ``remote_path`` leading to roots, if it is a strict ancestor of a
        root (``/`` lists the roots' first components); else None."""
        norm = self.check_path(remote_path)
        names = set()
        for root in self.roots:
            for top in (root.path, root.real):
                if top != norm and _within(top, norm):
                    rest = top[len(norm):].lstrip("/")
                    names.add(rest.split("/", 1)[0])
        if not names or self.root_of(norm) is not None:
            return None
        return sorted(names)

    def root_of(self, norm: str) -> Optional[Tuple[Root, str]]:
        """(most specific root containing ``norm``, path relative to it) or None."""
        best: Optional[Tuple[Root, str]] = None
        best_len = -1
        for root in self.roots:
            for top in (root.path, root.real):
                if _within(norm, top) and len(top) > best_len:
                    best, best_len = (root, norm[len(top):].lstrip("/")), len(top)
        return best

    def resolve(self, remote_path: Any, want_write: bool = False) -> Resolved:
        """Resolve ``remote_path`` inside a root or raise ``TransferError``.

        Refuses (in this order) malformed paths, relative paths, paths outside every
        root, paths whose symlinks lead out of their root, and writes to a read-only
        root.  The result names the real path; callers open it through
        ``Resolved.open_parent`` (O_NOFOLLOW walk) so later symlink swaps fail.
        """
        norm = self.check_path(remote_path)
        found = self.root_of(norm)
        if found is None:
            raise TransferError(OUTSIDE_ROOT, "%s is outside the transfer roots" % remote_path)
        root, rel = found
        lexical = root.real if not rel else root.real.rstrip("/") + "/" + rel
        real = os.path.realpath(lexical)
        if not _within(real, root.real):
            raise TransferError(SYMLINK_ESCAPE, "%s leads out of its root through a symlink"
                                % remote_path)
        if want_write and not root.writable:
            raise TransferError(READ_ONLY, "%s is in a read-only root" % remote_path)
        parts = [p for p in real[len(root.real):].split("/") if p]
        return Resolved(root, parts)


# --------------------------------------------------------------------------- helpers


def _fsync(fd: int) -> None:
    """fsync in gevent's threadpool: a large file's fsync would stall the hub."""
    gevent.get_hub().threadpool.apply(os.fsync, (fd,))


def _fsync_dir(dfd: int) -> None:
    try:
        _fsync(dfd)
    except OSError:
        pass  # some file systems refuse fsync on directories


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _unlink_quietly(name: str, dfd: int) -> None:
    try:
        os.unlink(name, dir_fd=dfd)
    except OSError:
        pass


_libc: Any = None


def _renameat2() -> Any:
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            fn = lib.renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                           ctypes.c_uint]
            fn.restype = ctypes.c_int
            _libc = fn
        except (OSError, AttributeError):
            _libc = False
    return _libc or None


def rename_noreplace(src_dfd: int, src: str, dst_dfd: int, dst: str) -> None:
    """Rename without ever replacing ``dst``; ``OSError(EEXIST)`` if it exists.

    ``renameat2(RENAME_NOREPLACE)`` where the kernel and file system support it;
    else ``link`` + ``unlink`` (also atomic no-clobber, regular files only); last
    resort a check just before ``rename`` (a tiny race, documented).
    """
    fn = _renameat2()
    if fn is not None:
        if fn(src_dfd, os.fsencode(src), dst_dfd, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), dst)
    try:
        os.link(src, dst, src_dir_fd=src_dfd, dst_dir_fd=dst_dfd, follow_symlinks=False)
    except OSError as e:
        if e.errno == errno.EEXIST:
            raise
        try:
            os.stat(dst, dir_fd=dst_dfd, follow_symlinks=False)
        except FileNotFoundError:
            os.rename(src, dst, src_dir_fd=src_dfd, dst_dir_fd=dst_dfd)
            return
        raise OSError(errno.EEXIST, os.strerror(errno.EEXIST), dst) from None
    os.unlink(src, dir_fd=src_dfd)


def part_name(name: str) -> str:
    """The predictable partial-file name of ``name`` (same directory)."""
    return "." + name + PART_SUFFIX


def is_part_name(name: str) -> bool:
    return name.startswith(".") and name.endswith(PART_SUFFIX)


def hash_fd_prefix(fd: int, length: int, h: Any = None) -> Any:
    """Feed the first ``length`` bytes of ``fd`` to ``h`` (new sha256 if None)."""
    h = h if h is not None else hashlib.sha256()
    pos = 0
    since_yield = 0
    while pos < length:
        data = os.pread(fd, min(CHUNK, length - pos), pos)
        if not data:
            raise TransferError(IO_ERROR, "file shorter than expected while hashing")
        h.update(data)
        pos += len(data)
        since_yield += len(data)
        if since_yield >= YIELD_EVERY:
            since_yield = 0
            gevent.sleep(0)
    return h


def file_type(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def open_regular(res: Resolved, dfd: int, flags: int = os.O_RDONLY) -> Tuple[int, os.stat_result]:
    """Open ``res.name`` in ``dfd`` (O_NOFOLLOW, O_NONBLOCK so a fifo can't hang us)
    and insist on a regular file."""
    assert res.name is not None
    fd = _open_checked(res.name, flags | _O_NOFOLLOW | os.O_NONBLOCK | _O_CLOEXEC, dfd, res.path)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise TransferError(NOT_REGULAR_FILE, "%s is not a regular file (%s)"
                                % (res.path, file_type(st.st_mode)))
        check_links(st, res.path, res.root.allow_hardlinks)
        fl = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, fl & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def check_links(st: os.stat_result, shown: str, allowed: bool) -> None:
    """Refuse a regular file with more than one hard link (it may be a file outside
    the root) unless the root allows it.  ``st`` should come from ``fstat`` of the
    descriptor about to be used, so the check and the use see the same inode."""
    if stat.S_ISREG(st.st_mode) and st.st_nlink > 1 and not allowed:
        raise TransferError(HARD_LINK, "%s has %d hard links; this root neither serves nor "
                            "replaces hard-linked files (allow_hardlinks)"
                            % (shown, st.st_nlink))


def lstat_in(dfd: int, name: str) -> Optional[os.stat_result]:
    try:
        return os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


# --------------------------------------------------------------------------- wire


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


def error_obj(e: TransferError) -> Dict[str, Any]:
    return {"ok": False, "code": e.code, "message": e.message}


def _bool(req: Dict[str, Any], key: str) -> bool:
    value = req.get(key, False)
    if not isinstance(value, bool):
        raise TransferError(BAD_REQUEST, "%r must be true or false" % key)
    return value


def _int(req: Dict[str, Any], key: str, default: Optional[int] = None) -> int:
    value = req.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TransferError(BAD_REQUEST, "%r must be a non-negative integer" % key)
    return value


def _sha(value: Any, key: str) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) != 64 \
            or any(c not in "0123456789abcdef" for c in value):
        raise TransferError(BAD_REQUEST, "%r must be 64 lowercase hex digits" % key)
    return value


# --------------------------------------------------------------------------- server


class _Session:
    """One ``@transfer`` stream being served (one operation)."""

    def __init__(self, sock: Any, roots: Roots, log_ctx: str) -> None:
        self.sock = sock
        self.roots = roots
        self.log_ctx = log_ctx or "transfer"
        self.ch = LineChannel(lambda: sock.recv(CHUNK), sock.sendall)
        self.replied = False
        self.result: Dict[str, Any] = {"op": None, "path": None, "bytes": 0,
                                       "code": RESULT_OK}

    def reply(self, obj: Dict[str, Any]) -> None:
        self.ch.send_json(obj)
        self.replied = True

    # -- put ----------------------------------------------------------------

    def op_put(self, req: Dict[str, Any]) -> None:
        size = _int(req, "size")
        header_sha = _sha(req.get("sha256"), "sha256")
        want_overwrite = _bool(req, "overwrite")
        resume = _bool(req, "resume")
        res = self.roots.resolve(req.get("path"), want_write=True)
        self.result["path"] = res.path
        name = res.name
        if name is None:
            raise TransferError(NOT_REGULAR_FILE, "%s is a transfer root (a directory)"
                                % res.path)
        if is_part_name(name):
            raise TransferError(BAD_REQUEST, "%s: names .*%s are reserved for partial uploads"
                                % (res.path, PART_SUFFIX))
        cap = res.root.max_size
        if size > cap:
            raise TransferError(TOO_LARGE, "%s: %d bytes declared, the limit is %d"
                                % (res.path, size, cap))
        overwrite = want_overwrite and self.roots.overwrite
        dfd = res.open_parent()
        try:
            self._put_in(dfd, res, name, size, header_sha, overwrite, want_overwrite, resume)
        finally:
            _close(dfd)

    def _check_final(self, dfd: int, res: Resolved, name: str, overwrite: bool,
                     want_overwrite: bool) -> None:
        st = lstat_in(dfd, name)
        if st is None:
            return
        if not stat.S_ISREG(st.st_mode):
            raise TransferError(NOT_REGULAR_FILE, "%s exists and is not a regular file (%s)"
                                % (res.path, file_type(st.st_mode)))
        if not overwrite:
            why = ("the device does not allow overwriting (remote.transfer.overwrite)"
                   if want_overwrite else "use --overwrite to replace it")
            raise TransferError(EXISTS, "%s already exists; %s" % (res.path, why))
        check_links(st, res.path, res.root.allow_hardlinks)

    def _put_in(self, dfd: int, res: Resolved, name: str, size: int,
                header_sha: Optional[str], overwrite: bool, want_overwrite: bool,
                resume: bool) -> None:
        self._check_final(dfd, res, name, overwrite, want_overwrite)
        part = part_name(name)
        ttl = self.roots.partial_ttl
        ledger = partials.ledger_of(res.root)
        ledger.maybe_sweep(res.root, ttl)          # cheap: at most once per SWEEP_INTERVAL
        key = "/".join(res.parts[:-1] + [part])
        try:
            pfd = os.open(part, os.O_RDWR | os.O_CREAT | _O_NOFOLLOW | os.O_NONBLOCK | _O_CLOEXEC,
                          PART_MODE, dir_fd=dfd)
        except OSError as e:
            raise _os_error(e, res.path) from None
        keep = True   # keep the partial unless the transfer failed for good
        reserved = False
        try:
            st = os.fstat(pfd)
            if not stat.S_ISREG(st.st_mode):
                keep = True  # not ours to delete
                raise TransferError(NOT_REGULAR_FILE, "partial file of %s is not a regular file"
                                    % res.path)
            if st.st_nlink > 1:
                keep = True  # not ours: never truncate, hash or write a file linked elsewhere
                raise TransferError(HARD_LINK, "partial file of %s has %d hard links; refused"
                                    % (res.path, st.st_nlink))
            _lock_partial(pfd, res)
            st = os.fstat(pfd)
            fresh = not partials.expired(st, ttl)
            if resume and st.st_size and not fresh:
                log.info("%s: put %s: partial older than partial_ttl (%d s): starting over",
                         self.log_ctx, escape(res.path), ttl)
            offset = st.st_size if resume and fresh and st.st_size <= size else 0
            if offset == 0 and st.st_size:
                os.ftruncate(pfd, 0)
            keep = offset > 0
            ledger.reserve(key, size, res.root.partial_quota, res.path)
            reserved = True
            h = hashlib.sha256()
            if offset:
                hash_fd_prefix(pfd, offset, h)
            avail = _available(dfd)
            if avail is not None and size - offset > avail:
                keep = offset > 0
                raise TransferError(NO_SPACE, "%s: %d bytes needed, %d available on the device"
                                    % (res.path, size - offset, avail))
            self.reply({"ok": True, "offset": offset, "prefix_sha256": h.hexdigest(),
                        "path": res.path})
            keep = False
            received = self._receive(pfd, offset, size, h, res)
            if received is None:        # interrupted: keep the verified prefix for resume
                keep = True
                return
            sha = self._read_put_trailer(header_sha, res, size)
            digest = h.hexdigest()
            if sha != digest:
                raise TransferError(INTEGRITY, "%s: sha256 mismatch (console %s, device %s); "
                                    "nothing kept" % (res.path, sha, digest))
            os.fchmod(pfd, FILE_MODE)
            _fsync(pfd)
            self._check_final(dfd, res, name, overwrite, want_overwrite)
            try:
                if overwrite:
                    os.rename(part, name, src_dir_fd=dfd, dst_dir_fd=dfd)
                else:
                    rename_noreplace(dfd, part, dfd, name)
            except OSError as e:
                raise _os_error(e, res.path) from None
            keep = True   # renamed: nothing left to remove
            _fsync_dir(dfd)
            self.result["bytes"] = size - offset
            self.result["sha256"] = digest
            self.reply({"ok": True, "sha256": digest, "bytes": size, "received": size - offset,
                        "path": res.path})
            log.info("%s: put %s: %d bytes (from offset %d) sha256 %s", self.log_ctx,
                     escape(res.path), size, offset, digest)
        except _KeepPartial:
            keep = True
            raise
        except OSError as e:
            raise _os_error(e, res.path) from None
        finally:
            if not keep:
                _unlink_quietly(part, dfd)
            _close(pfd)
            if reserved:
                ledger.release(key, _partial_size(dfd, part))

    def _receive(self, pfd: int, offset: int, size: int, h: Any,
                 res: Resolved) -> Optional[int]:
        """Write the console's bytes [offset, size) to ``pfd``; None if the stream ended
        early (the prefix is fsynced and kept for resume)."""
        pos = offset
        since_yield = 0
        ch = self.ch
        while pos < size:
            try:
                data = ch.read_some(min(CHUNK, size - pos))
            except OSError as e:
                data = b""
                log.info("%s: put %s: stream error at %d/%d: %s", self.log_ctx,
                         escape(res.path), pos, size, e)
            except socket.timeout:
                data = b""
            if not data:
                self.result["bytes"] = pos - offset
                self.result["code"] = result_code(INCOMPLETE)
                try:
                    _fsync(pfd)
                except OSError:
                    pass
                log.info("%s: put %s interrupted at %d/%d bytes; partial kept for resume",
                         self.log_ctx, escape(res.path), pos, size)
                return None
            view = memoryview(data)
            while view:
                try:
                    n = os.pwrite(pfd, view, pos)
                except OSError as e:
                    self.result["bytes"] = pos - offset
                    raise _os_error(e, res.path) from None
                h.update(view[:n])
                view = view[n:]
                pos += n
            since_yield += len(data)
            if since_yield >= YIELD_EVERY:
                since_yield = 0
                gevent.sleep(0)
        self.result["bytes"] = pos - offset
        return pos

    def _read_put_trailer(self, header_sha: Optional[str], res: Resolved, size: int) -> str:
        first = self.ch.peek_byte()
        if first is not None and first != ord("{"):
            raise TransferError(TOO_LARGE, "%s: the console sent more than the declared %d "
                                "bytes; nothing kept" % (res.path, size))
        trailer = self.ch.read_json("trailer")
        if trailer is None:
            if header_sha is None:
                # Every byte arrived but no checksum: keep the partial so a resume
                # only has to send the trailer.
                raise _KeepPartial(INCOMPLETE, "%s: no trailer after the data" % res.path)
            return header_sha
        sha = _sha(trailer.get("sha256"), "sha256")
        if header_sha is not None and sha is not None and sha != header_sha:
            raise TransferError(INTEGRITY, "%s: header and trailer sha256 differ" % res.path)
        sha = sha or header_sha
        if sha is None:
            raise TransferError(BAD_REQUEST, "%s: no sha256 in header or trailer" % res.path)
        return sha

    # -- get ----------------------------------------------------------------

    def op_get(self, req: Dict[str, Any]) -> None:
        offset = _int(req, "offset", 0)
        res = self.roots.resolve(req.get("path"), want_write=False)
        self.result["path"] = res.path
        if res.name is None:
            raise TransferError(NOT_REGULAR_FILE, "%s is a transfer root (a directory)"
                                % res.path)
        dfd = res.open_parent()
        try:
            fd, st = open_regular(res, dfd)
        finally:
            _close(dfd)
        try:
            size = st.st_size
            if size > res.root.max_size:
                raise TransferError(TOO_LARGE, "%s: %d bytes, the limit is %d"
                                    % (res.path, size, res.root.max_size))
            if offset > size:
                offset = 0     # the console's partial is longer than the file: start over
            h = hashlib.sha256()
            if offset:
                hash_fd_prefix(fd, offset, h)
            self.reply({"ok": True, "size": size, "offset": offset,
                        "prefix_sha256": h.hexdigest(), "mtime": int(st.st_mtime),
                        "mode": stat.S_IMODE(st.st_mode), "path": res.path})
            pos = offset
            since_yield = 0
            while pos < size:
                data = os.pread(fd, min(CHUNK, size - pos), pos)
                if not data:
                    # The file shrank: we cannot send the promised bytes.  Abort the
                    # stream without a trailer; the console sees the early end.
                    self.result["bytes"] = pos - offset
                    raise _Abort(IO_ERROR, "%s shrank during the transfer" % res.path)
                h.update(data)
                try:
                    self.sock.sendall(data)
                except OSError as e:
                    self.result["bytes"] = pos - offset
                    raise _Abort(INCOMPLETE, "stream lost at %d/%d: %s" % (pos, size, e)) \
                        from None
                pos += len(data)
                since_yield += len(data)
                if since_yield >= YIELD_EVERY:
                    since_yield = 0
                    gevent.sleep(0)
            digest = h.hexdigest()
            self.result["bytes"] = size - offset
            self.result["sha256"] = digest
            self.ch.send_json({"ok": True, "sha256": digest, "bytes": size})
            log.info("%s: get %s: %d bytes (from offset %d) sha256 %s", self.log_ctx,
                     escape(res.path), size, offset, digest)
        except OSError as e:
            raise _os_error(e, res.path) from None
        finally:
            _close(fd)

    # -- stat / list / mkdir ------------------------------------------------

    def op_stat(self, req: Dict[str, Any]) -> None:
        self.reply(stat_path(self.roots, req.get("path")))

    def op_list(self, req: Dict[str, Any]) -> None:
        path = req.get("path")
        entries = list_path(self.roots, path)
        self.result["path"] = path
        self.reply({"ok": True, "path": path})
        count = 0
        for entry in entries:
            self.ch.send_json(entry)
            count += 1
        self.ch.send_json({"ok": True, "count": count, "end": True})

    def op_mkdir(self, req: Dict[str, Any]) -> None:
        parents = _bool(req, "parents")
        res = self.roots.resolve(req.get("path"), want_write=True)
        self.result["path"] = res.path
        created = make_dirs(res, parents)
        self.reply({"ok": True, "path": res.path, "created": created})


class _KeepPartial(TransferError):
    """Failure after which the partial upload stays for a resume."""


class _Abort(TransferError):
    """End the stream without a trailer (the promised bytes cannot be sent)."""


def _lock_partial(pfd: int, res: Resolved) -> None:
    """flock the partial file; wait a little, since the holder is often the previous
    stream of the same upload, going away (a console restarting or resuming)."""
    deadline = time.monotonic() + BUSY_WAIT
    while True:
        try:
            fcntl.flock(pfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError:
            if time.monotonic() >= deadline:
                raise TransferError(BUSY, "another upload to %s is in progress"
                                    % res.path) from None
            gevent.sleep(0.05)


def _partial_size(dfd: int, part: str) -> Optional[int]:
    """Bytes of the partial ``part`` still in ``dfd`` (None: gone or not a file)."""
    try:
        st = lstat_in(dfd, part)
    except OSError:
        return None
    return st.st_size if st is not None and stat.S_ISREG(st.st_mode) else None


def _available(dfd: int) -> Optional[int]:
    try:
        st = os.fstatvfs(dfd)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def stat_path(roots: Roots, path: Any) -> Dict[str, Any]:
    """``{"ok", "type", "size", "mtime", "mode", "path"}`` of a path (virtual dirs too)."""
    if roots.virtual_children(roots.check_path(path)) is not None:
        return {"ok": True, "type": "dir", "size": 0, "mtime": 0, "mode": 0o555,
                "path": roots.check_path(path), "virtual": True}
    res = roots.resolve(path)
    if res.name is None:
        st = os.stat(res.root.real)
    else:
        dfd = res.open_parent()
        try:
            st = lstat_in(dfd, res.name)
        finally:
            _close(dfd)
        if st is None:
            raise TransferError(NOT_FOUND, "%s: no such file or directory" % res.path)
    return {"ok": True, "type": file_type(st.st_mode), "size": st.st_size,
            "mtime": int(st.st_mtime), "mode": stat.S_IMODE(st.st_mode), "path": res.path,
            "writable": res.root.writable}


def list_path(roots: Roots, path: Any) -> Iterator[Dict[str, Any]]:
    """Directory entries ``{"name", "type", "size", "mtime", "mode"}`` (partials hidden).

    Raises before yielding anything, so callers can reply first.
    """
    virtual = roots.virtual_children(roots.check_path(path))
    if virtual is not None:
        return iter([{"name": n, "type": "dir", "size": 0, "mtime": 0, "mode": 0o555}
                     for n in virtual])
    res = roots.resolve(path)
    dfd = res.open_self_dir()
    try:
        names = sorted(os.listdir(dfd))[:MAX_LIST_ENTRIES]
        out = []
        for i, name in enumerate(names):
            if is_part_name(name):
                continue
            st = lstat_in(dfd, name)
            if st is None:
                continue
            out.append({"name": name, "type": file_type(st.st_mode), "size": st.st_size,
                        "mtime": int(st.st_mtime), "mode": stat.S_IMODE(st.st_mode)})
            if i % 1000 == 999:
                gevent.sleep(0)
    except OSError as e:
        raise _os_error(e, res.path) from None
    finally:
        _close(dfd)
    return iter(out)


def make_dirs(res: Resolved, parents: bool) -> bool:
    """mkdir ``res`` (and missing parents if asked) with O_NOFOLLOW discipline;
    True if created, False if it already was a directory."""
    if res.name is None:
        return False
    created = False
    fd = res.root.open_dir([])
    try:
        for i, comp in enumerate(res.parts):
            last = i == len(res.parts) - 1
            flags = os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC
            try:
                nfd = os.open(comp, flags, dir_fd=fd)
            except FileNotFoundError:
                if not (last or parents):
                    raise TransferError(NOT_FOUND, "%s: parent directory missing" % res.path) \
                        from None
                try:
                    os.mkdir(comp, DIR_MODE, dir_fd=fd)
                    created = created or last
                except FileExistsError:
                    pass
                except OSError as e:
                    raise _os_error(e, res.path) from None
                nfd = _open_checked(comp, flags, fd, res.path)
            except OSError as e:
                if e.errno == errno.ENOTDIR:
                    raise TransferError(NOT_REGULAR_FILE, "%s exists and is not a directory"
                                        % res.path) from None
                raise _os_error(e, res.path) from None
            os.close(fd)
            fd = nfd
        if created:
            _fsync_dir(fd)
    finally:
        _close(fd)
    return created


def serve_transfer_stream(sock: Any, roots: Roots, log_ctx: str = "",
                          on_result: Optional[Callable[[Dict[str, Any]], None]] = None,
                          ) -> Dict[str, Any]:
    """Serve one ``@transfer`` operation on ``sock`` (one end of a socketpair spliced
    by the mux), close it, and return (and pass to ``on_result``) the result:
    ``{"op", "path", "bytes", "code": "transfer_ok"|"transfer_<code>", "duration", …}``.
    """
    s = _Session(sock, roots, log_ctx)
    started = time.monotonic()
    abort = False
    try:
        sock.settimeout(HEADER_TIMEOUT)
        req = s.ch.read_json("header")
        if req is None:
            raise TransferError(BAD_REQUEST, "no header")
        op = req.get("op")
        if op not in OPS:
            raise TransferError(BAD_REQUEST, "unknown op %r (expected one of %s)"
                                % (op, ", ".join(OPS)))
        s.result["op"] = op
        s.result["path"] = req.get("path")
        if not roots:
            raise TransferError(TARGET_REFUSED, "file transfer is disabled on this device")
        sock.settimeout(IDLE_TIMEOUT)
        getattr(s, "op_" + op)(req)
    except _Abort as e:
        s.result["code"] = result_code(e.code)
        s.result["message"] = e.message
        abort = True
        log.warning("%s: %s %s aborted: %s", s.log_ctx, s.result["op"],
                    escape(s.result["path"]), escape(e))
    except TransferError as e:
        s.result["code"] = result_code(e.code)
        s.result["message"] = e.message
        log.info("%s: %s %s refused: %s", s.log_ctx, s.result["op"],
                 escape(s.result["path"]), escape(e))
        _send_error(s, e)
    except (OSError, socket.timeout) as e:
        s.result["code"] = result_code(INCOMPLETE)
        s.result["message"] = str(e)
        log.info("%s: %s %s: stream lost: %s", s.log_ctx, s.result["op"],
                 escape(s.result["path"]), e)
    finally:
        _finish(sock, abort)
        s.result["duration"] = round(time.monotonic() - started, 3)
    if on_result is not None and s.result["op"] not in QUIET_OPS:
        try:
            on_result(dict(s.result))
        except Exception:  # noqa: BLE001 - a reporting bug must not hide the transfer
            log.exception("%s: on_result failed", s.log_ctx)
    return s.result


def _send_error(s: _Session, e: TransferError) -> None:
    """Error reply (or trailer), then drain the console's remaining bytes until its
    EOF so the mux delivers our line instead of resetting the stream under it."""
    try:
        s.ch.send_json(error_obj(e))
        s.sock.shutdown(socket.SHUT_WR)
    except OSError:
        return
    if s.ch.eof:
        return
    deadline = time.monotonic() + DRAIN_TIMEOUT
    try:
        s.sock.settimeout(DRAIN_TIMEOUT)
        while time.monotonic() < deadline:
            if not s.sock.recv(CHUNK):
                return
    except (OSError, socket.timeout):
        return


def _finish(sock: Any, abort: bool) -> None:
    if abort:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except (OSError, ValueError):
            pass
    else:
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
    try:
        sock.close()
    except OSError:
        pass


# --------------------------------------------------------------------------- targets


def open_virtual_target(target: str, cfg: Any, identity: Any = None,
                        on_result: Optional[Callable[[Dict[str, Any]], None]] = None,
                        log_ctx: str = "") -> socket.socket:
    """Serve ``@transfer`` / ``@sftp`` in-process; return the socket for the mux to splice.

    ``cfg`` is the agent config (``cfg.remote.transfer`` is used) or a
    ``TransferConfig`` itself; ``identity`` the agent's ``IdentityKey`` (or a callable
    returning it, or a paramiko key) — the SFTP host key.  Raises ``TransferError``
    (code ``target_refused``) when transfers are disabled or the target is unknown;
    mux turns it into OPEN_FAIL.
    """
    tcfg = getattr(getattr(cfg, "remote", None), "transfer", None) or cfg
    roots = Roots.from_config(tcfg)
    if target not in VIRTUAL_TARGETS:
        raise TransferError(TARGET_REFUSED, "unknown virtual target %s" % target)
    if not roots:
        raise TransferError(TARGET_REFUSED, "file transfer is disabled on this device "
                            "(remote.transfer.roots is empty)")
    host_key = None
    if target == VIRTUAL_SFTP:
        from remote_gevent.agent.files import sftp
        host_key = sftp.host_key_of(identity() if callable(identity) else identity)
    ours, theirs = socket.socketpair()
    if target == VIRTUAL_TRANSFER:
        gevent.spawn(_serve_guarded, serve_transfer_stream, ours, roots, log_ctx, on_result)
    else:
        from remote_gevent.agent.files import sftp
        gevent.spawn(_serve_guarded, sftp.serve_sftp, ours, roots, log_ctx, on_result,
                     host_key)
    return theirs


def _serve_guarded(fn: Callable[..., Any], sock: Any, roots: Roots, log_ctx: str,
                   on_result: Any, *extra: Any) -> None:
    try:
        if extra:
            fn(sock, roots, *extra, log_ctx=log_ctx, on_result=on_result)
        else:
            fn(sock, roots, log_ctx=log_ctx, on_result=on_result)
    except Exception:  # noqa: BLE001 - one stream's bug ends that stream only
        log.exception("%s: %s server failed", log_ctx or "transfer", fn.__name__)
        try:
            sock.close()
        except OSError:
            pass
