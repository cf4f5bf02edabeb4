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


import fcntl
import hashlib
import logging
import os
import socket
import stat
import struct
import time
from typing import Any, Callable, Dict, Optional
import gevent

from remote_gevent.agent.files import transfer_partials as partials
from remote_gevent.common.logs import escape
from remote_gevent.wire.transfer_lines import (
    BAD_REQUEST,
    BUSY,
    CHUNK,
    EXISTS,
    HARD_LINK,
    INCOMPLETE,
    INTEGRITY,
    IO_ERROR,
    LineChannel,
    NOT_REGULAR_FILE,
    NO_SPACE,
    OPS,
    PART_SUFFIX,
    RESULT_OK,
    TARGET_REFUSED,
    TOO_LARGE,
    TransferError,
    error_obj,
    is_part_name,
    part_name,
    result_code,
)
from remote_gevent.agent.files.fsops import (
    FILE_MODE,
    PART_MODE,
    YIELD_EVERY,
    O_CLOEXEC,
    O_NOFOLLOW,
    check_links,
    close_fd,
    file_type,
    fsync_dirfd,
    fsync_fd,
    hash_fd_prefix,
    lstat_in,
    os_error,
    rename_noreplace,
    unlink_quietly,
)
from remote_gevent.agent.files.roots import (
    open_regular,
    Resolved,
    Roots,
)

from remote_gevent.agent.files.lookups import (
    list_path,
    make_dirs,
    stat_path,
)

log = logging.getLogger(__name__)

HEADER_TIMEOUT = 30.0              # waiting for the console's header
IDLE_TIMEOUT = 300.0               # no byte either way for this long: give up
BUSY_WAIT = 5.0                    # wait this long for another stream's lock on a partial
PREEMPT_WAIT = 15.0                # after ending a stale session: its stream lets go
DRAIN_TIMEOUT = 10.0               # after an error reply, wait this long for the console's EOF
QUIET_OPS = ("stat", "list")       # lookups, not transfers: not passed to on_result

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


class _Session:
    """One ``@transfer`` stream being served (one operation)."""

    def __init__(self, sock: Any, roots: Roots, log_ctx: str,
                 preempt: Optional[Callable[[], int]] = None) -> None:
        self.sock = sock
        self.roots = roots
        self.preempt = preempt
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
            close_fd(dfd)

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
        """One upload into directory ``dfd``: resume or restart the partial file, reserve
        its quota, receive, verify and rename it into place."""
        self._check_final(dfd, res, name, overwrite, want_overwrite)
        part = part_name(name)
        ledger = partials.ledger_of(res.root)
        ledger.maybe_sweep(res.root, self.roots.partial_ttl)  # at most once per SWEEP_INTERVAL
        key = "/".join(res.parts[:-1] + [part])
        pfd = _open_partial(dfd, part, res)
        keep = True   # keep the partial unless the transfer failed for good
        reserved = False
        try:
            offset = self._resume_offset(pfd, res, size, resume)
            keep = offset > 0
            ledger.reserve(key, size, res.root.partial_quota, res.path)
            reserved = True
            h = hashlib.sha256()
            if offset:
                hash_fd_prefix(pfd, offset, h)
            avail = _available(dfd)
            if avail is not None and size - offset > avail:
                raise TransferError(NO_SPACE, "%s: %d bytes needed, %d available on the device"
                                    % (res.path, size - offset, avail))
            self.reply({"ok": True, "offset": offset, "prefix_sha256": h.hexdigest(),
                        "path": res.path})
            keep = False
            if self._receive(pfd, offset, size, h, res) is None:
                keep = True     # interrupted: keep the verified prefix for resume
                return
            digest = self._verify_put(h, header_sha, res, size)
            os.fchmod(pfd, FILE_MODE)
            fsync_fd(pfd)
            self._check_final(dfd, res, name, overwrite, want_overwrite)
            _rename_into_place(dfd, part, name, overwrite, res)
            keep = True   # renamed: nothing left to remove
            fsync_dirfd(dfd)
            self._report_put(res, size, offset, digest)
        except _KeepPartial:
            keep = True
            raise
        except OSError as e:
            raise os_error(e, res.path) from None
        finally:
            if not keep:
                unlink_quietly(part, dfd)
            close_fd(pfd)
            if reserved:
                ledger.release(key, _partial_size(dfd, part))

    def _resume_offset(self, pfd: int, res: Resolved, size: int, resume: bool) -> int:
        """Lock the partial file and say where this upload starts: its size when resuming
        a fresh partial no larger than the file, else 0 (the partial is emptied)."""
        _lock_partial(pfd, res, self.preempt)
        st = os.fstat(pfd)
        ttl = self.roots.partial_ttl
        fresh = not partials.expired(st, ttl)
        if resume and st.st_size and not fresh:
            log.info("%s: put %s: partial older than partial_ttl (%d s): starting over",
                     self.log_ctx, escape(res.path), ttl)
        offset = st.st_size if resume and fresh and st.st_size <= size else 0
        if offset == 0 and st.st_size:
            os.ftruncate(pfd, 0)
        return offset

    def _verify_put(self, h: Any, header_sha: Optional[str], res: Resolved, size: int) -> str:
        """The sha256 of what was written, checked against the console's."""
        sha = self._read_put_trailer(header_sha, res, size)
        digest = h.hexdigest()
        if sha != digest:
            raise TransferError(INTEGRITY, "%s: sha256 mismatch (console %s, device %s); "
                                "nothing kept" % (res.path, sha, digest))
        return digest

    def _report_put(self, res: Resolved, size: int, offset: int, digest: str) -> None:
        self.result["bytes"] = size - offset
        self.result["sha256"] = digest
        self.reply({"ok": True, "sha256": digest, "bytes": size, "received": size - offset,
                    "path": res.path})
        log.info("%s: put %s: %d bytes (from offset %d) sha256 %s", self.log_ctx,
                 escape(res.path), size, offset, digest)

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
                    fsync_fd(pfd)
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
                    raise os_error(e, res.path) from None
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
            close_fd(dfd)
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
            raise os_error(e, res.path) from None
        finally:
            close_fd(fd)

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


def _lock_partial(pfd: int, res: Resolved,
                  preempt: Optional[Callable[[], int]] = None) -> None:
    """flock the partial file; wait a little, since the holder is often the previous
    stream of the same upload, going away (a console restarting or resuming).

    ``preempt`` (the session's): ends this operator's other sessions whose relay path is
    down and returns how many. A console killed mid-upload leaves its session resuming
    for ``resume_timeout`` with the partial locked; the same operator's new upload must
    not be told "busy" for minutes (issue 12)."""
    deadline = time.monotonic() + BUSY_WAIT
    while True:
        try:
            fcntl.flock(pfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError:
            if preempt is not None:
                if preempt():
                    deadline = time.monotonic() + PREEMPT_WAIT
                preempt = None
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


def serve_transfer_stream(sock: Any, roots: Roots, log_ctx: str = "",
                          on_result: Optional[Callable[[Dict[str, Any]], None]] = None,
                          preempt: Optional[Callable[[], int]] = None) -> Dict[str, Any]:
    """Serve one ``@transfer`` operation on ``sock`` (one end of a socketpair spliced
    by the mux), close it, and return (and pass to ``on_result``) the result:
    ``{"op", "path", "bytes", "code": "transfer_ok"|"transfer_<code>", "duration", …}``.
    """
    s = _Session(sock, roots, log_ctx, preempt)
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


def _send_error(s: "_Session", e: TransferError) -> None:
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


def _open_partial(dfd: int, part: str, res: Resolved) -> int:
    """Open (or create) the partial file of ``res``; refuse one that is not ours to
    write: not a regular file, or linked elsewhere (never truncated, hashed or written)."""
    try:
        pfd = os.open(part, os.O_RDWR | os.O_CREAT | O_NOFOLLOW | os.O_NONBLOCK | O_CLOEXEC,
                      PART_MODE, dir_fd=dfd)
    except OSError as e:
        raise os_error(e, res.path) from None
    try:
        st = os.fstat(pfd)
        if not stat.S_ISREG(st.st_mode):
            raise TransferError(NOT_REGULAR_FILE, "partial file of %s is not a regular file"
                                % res.path)
        if st.st_nlink > 1:
            raise TransferError(HARD_LINK, "partial file of %s has %d hard links; refused"
                                % (res.path, st.st_nlink))
    except OSError as e:
        close_fd(pfd)
        raise os_error(e, res.path) from None
    except BaseException:
        close_fd(pfd)
        raise
    return pfd


def _rename_into_place(dfd: int, part: str, name: str, overwrite: bool,
                       res: Resolved) -> None:
    try:
        if overwrite:
            os.rename(part, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        else:
            rename_noreplace(dfd, part, dfd, name)
    except OSError as e:
        raise os_error(e, res.path) from None
