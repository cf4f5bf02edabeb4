"""Console side of targeted file transfers: ``push`` and ``pull`` over ``@transfer``.

One mux stream per operation (docs/transfer.md).  ``stream_factory()`` opens a new
``@transfer`` stream in the operator's session.  Every failure raises
``TransferError(code, message)``; ``run_push`` / ``run_pull`` turn it into one line
on stderr and an exit code scripts can rely on (``EXIT_*``).

Local writes on pull are as careful as the agent's: ``.<name>.rgpart`` next to the
target, fsynced, sha256 checked against the agent's trailer, then renamed.  The
partial is kept when the stream is lost, so ``resume=True`` continues it after the
agent confirmed (prefix sha256) that it is a prefix of the same file; Ctrl-C / SIGTERM
(KeyboardInterrupt in the main greenlet, cli_base) keeps it too. An existing local file
is replaced only with ``overwrite``, as ``push`` does on the device.

The stream itself and the one-request operations (stat, list, mkdir) are in
:mod:`remote_gevent.console.transfer_conn`.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import sys
import time
from typing import IO, Any, Callable, Dict, Optional

import gevent
import gevent.event

from remote_gevent.common import fsutil
from remote_gevent.wire.transfer_lines import (
    BAD_REQUEST,
    CHUNK,
    CONNECTION_LOST,
    EXISTS,
    HARD_LINK,
    INCOMPLETE,
    INTEGRITY,
    IO_ERROR,
    NO_SPACE,
    NOT_ABSOLUTE,
    NOT_FOUND,
    NOT_REGULAR_FILE,
    OUTSIDE_ROOT,
    READ_ONLY,
    SYMLINK_ESCAPE,
    TARGET_REFUSED,
    TOO_LARGE,
    TransferError,
    dump_line,
    part_name,
)

from remote_gevent.wire.codes import (
    EXIT_CONNECTION,
    EXIT_INTEGRITY,
    EXIT_INTERRUPTED,
    EXIT_NO_SPACE,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_USAGE,
)
from remote_gevent.wire.codes import EXIT_ERROR as EXIT_OTHER

from remote_gevent.console.transfer_conn import (  # noqa: F401 - re-exported
    StreamFactory,
    _Conn,
    remote_list,
    remote_mkdir,
    remote_stat,
)
from remote_gevent.console.progress import (
    Progress,
    _NoProgress,
    _human,
)


EXIT_OF = {
    NOT_ABSOLUTE: EXIT_USAGE,
    BAD_REQUEST: EXIT_USAGE,
    OUTSIDE_ROOT: EXIT_REFUSED,
    SYMLINK_ESCAPE: EXIT_REFUSED,
    NOT_REGULAR_FILE: EXIT_REFUSED,
    READ_ONLY: EXIT_REFUSED,
    TOO_LARGE: EXIT_REFUSED,
    EXISTS: EXIT_REFUSED,
    TARGET_REFUSED: EXIT_REFUSED,
    HARD_LINK: EXIT_REFUSED,
    INTEGRITY: EXIT_INTEGRITY,
    CONNECTION_LOST: EXIT_CONNECTION,
    INCOMPLETE: EXIT_CONNECTION,
    NO_SPACE: EXIT_NO_SPACE,
}

TRAILER_TIMEOUT = 600.0    # agent fsync + rename of a large file, after the last byte
MAX_PULL_DEPTH = 128       # directory levels a recursive pull descends
LOCAL_PART_MODE = 0o600
LOCAL_FILE_MODE = 0o644


def exit_code(code: str) -> int:
    """The process exit status for a TransferError code (docs/transfer.md)."""
    return EXIT_OF.get(code, EXIT_OTHER)


def _join(remote_dir: str, name: str) -> str:
    return remote_dir.rstrip("/") + "/" + name


def _hash_local_prefix(fh: Any, length: int) -> Any:
    h = hashlib.sha256()
    fh.seek(0)
    left = length
    while left > 0:
        data = fh.read(min(CHUNK, left))
        if not data:
            raise TransferError(IO_ERROR, "local file shorter than the remote partial")
        h.update(data)
        left -= len(data)
    return h


# --------------------------------------------------------------------------- push


def push(stream_factory: StreamFactory, local: str, remote: str, overwrite: bool = False,
         resume: bool = False, recursive: bool = False,
         progress: Optional[Progress] = None) -> Dict[str, Any]:
    """Send ``local`` to the device path ``remote``; return ``{"files", "bytes"}``.

    A file pushed onto an existing remote directory lands inside it (like ``scp``).
    With ``recursive`` and a local directory, ``remote`` *is* the destination
    directory (created if needed) and receives the local directory's contents.
    """
    progress = progress or _NoProgress()
    if not remote.startswith("/"):
        raise TransferError(NOT_ABSOLUTE, "%s: remote paths must be absolute" % remote)
    try:
        st = os.stat(local)
    except OSError as e:
        raise TransferError(BAD_REQUEST, "%s: %s" % (local, e.strerror)) from None
    summary = {"files": 0, "bytes": 0}
    if stat.S_ISDIR(st.st_mode):
        if not recursive:
            raise TransferError(BAD_REQUEST, "%s is a directory (use -r)" % local)
        remote_mkdir(stream_factory, remote, parents=True)
        for dirpath, dirnames, filenames in os.walk(local):
            dirnames.sort()
            rel = os.path.relpath(dirpath, local)
            rdir = remote if rel == "." else _join(remote, rel.replace(os.sep, "/"))
            for d in dirnames:
                remote_mkdir(stream_factory, _join(rdir, d), parents=False)
            for f in sorted(filenames):
                lpath = os.path.join(dirpath, f)
                if not os.path.isfile(lpath):
                    continue     # sockets, fifos, dangling symlinks: nothing to send
                n = put_file(stream_factory, lpath, _join(rdir, f), overwrite, resume,
                             progress)
                summary["files"] += 1
                summary["bytes"] += n
        return summary
    if not stat.S_ISREG(st.st_mode):
        raise TransferError(BAD_REQUEST, "%s is not a regular file" % local)
    target = remote
    try:
        if remote_stat(stream_factory, remote).get("type") == "dir":
            target = _join(remote, os.path.basename(local))
    except TransferError as e:
        if e.code != NOT_FOUND:
            raise
    summary["bytes"] = put_file(stream_factory, local, target, overwrite, resume, progress)
    summary["files"] = 1
    return summary


def put_file(stream_factory: StreamFactory, local: str, remote: str, overwrite: bool = False,
             resume: bool = False, progress: Optional[Progress] = None) -> int:
    """Upload one file; return the bytes sent in this run."""
    progress = progress or _NoProgress()
    with open(local, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        for attempt in (resume, False):
            conn = _Conn(stream_factory)
            try:
                reply = conn.request({"op": "put", "path": remote, "size": size,
                                      "overwrite": overwrite, "resume": attempt},
                                     half_close=False)
                offset = reply.get("offset", 0)
                if not isinstance(offset, int) or not 0 <= offset <= size:
                    raise TransferError(BAD_REQUEST, "device answered a bad offset %r" % offset)
                h = _hash_local_prefix(fh, offset)
                if offset and h.hexdigest() != reply.get("prefix_sha256"):
                    # The device's partial is not a prefix of this file: start over.
                    conn.close()
                    continue
                try:
                    return _put_data(conn, fh, remote, size, offset, h, progress)
                except BaseException:
                    progress.abort()
                    raise
            finally:
                conn.close()
        raise TransferError(INTEGRITY, "%s: the device's partial upload does not match "
                            "and could not be restarted" % remote)


def _put_data(conn: _Conn, fh: Any, remote: str, size: int, offset: int, h: Any,
              progress: Progress) -> int:
    # The agent answers with a trailer after our data, or early with an error
    # (no space, stream problem): read it concurrently so we stop sending at once.
    answer = gevent.event.AsyncResult()

    def read_answer() -> None:
        try:
            answer.set(conn.answer("trailer"))
        except TransferError as e:
            answer.set_exception(e)

    reader = gevent.spawn(read_answer)
    try:
        progress.start(remote, size, offset)
        fh.seek(offset)
        pos = offset
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while pos < size and not answer.ready():
            n = fh.readinto(view[:min(CHUNK, size - pos)])
            if not n:
                raise TransferError(IO_ERROR, "local file shrank during the upload")
            chunk = view[:n]
            h.update(chunk)
            try:
                conn._send(chunk)
            except TransferError:
                if answer.ready():
                    break    # the agent's early error explains the reset
                raise
            pos += n
            progress.update(n)
        if not answer.ready():
            digest = h.hexdigest()
            conn._send(dump_line({"sha256": digest}))
            conn.shutdown_write()
        else:
            digest = None
        result = answer.get(timeout=TRAILER_TIMEOUT)
    except gevent.Timeout:
        raise TransferError(CONNECTION_LOST, "no answer from the device for %ss after the "
                            "data" % TRAILER_TIMEOUT) from None
    finally:
        reader.kill(block=False)
    if digest is None or result.get("sha256") != digest:
        raise TransferError(INTEGRITY, "%s: sha256 mismatch (local %s, device %s)"
                            % (remote, digest, result.get("sha256")))
    progress.finish()
    conn.finish()
    return size - offset


# --------------------------------------------------------------------------- pull


def pull(stream_factory: StreamFactory, remote: str, local: str, resume: bool = False,
         recursive: bool = False, progress: Optional[Progress] = None,
         overwrite: bool = False) -> Dict[str, Any]:
    """Fetch the device path ``remote`` into ``local``; return ``{"files", "bytes"}``.

    A file pulled onto an existing local directory lands inside it.  With
    ``recursive`` and a remote directory, ``local`` *is* the destination directory.
    An existing local file is refused unless ``overwrite`` (then replaced atomically).
    """
    progress = progress or _NoProgress()
    if not remote.startswith("/"):
        raise TransferError(NOT_ABSOLUTE, "%s: remote paths must be absolute" % remote)
    summary = {"files": 0, "bytes": 0}
    if recursive:
        info = remote_stat(stream_factory, remote)
        if info.get("type") == "dir":
            _pull_tree(stream_factory, remote, local, resume, progress, summary,
                       overwrite=overwrite)
            return summary
    target = local
    if os.path.isdir(local):
        target = os.path.join(local, os.path.basename(remote.rstrip("/")))
    summary["bytes"] = get_file(stream_factory, remote, target, resume, progress, overwrite)
    summary["files"] = 1
    return summary


def _pull_tree(stream_factory: StreamFactory, remote: str, local: str, resume: bool,
               progress: Progress, summary: Dict[str, Any], depth: int = 0,
               overwrite: bool = False) -> None:
    # The device names the tree: one listing itself forever must not recurse us to death.
    if depth > MAX_PULL_DEPTH:
        raise TransferError(BAD_REQUEST, "%s: more than %d directory levels" % (remote,
                                                                              MAX_PULL_DEPTH))
    try:
        os.makedirs(local, exist_ok=True)
    except OSError as e:  # e.g. the device listed "a" as a file, then as a directory
        raise TransferError(IO_ERROR, "%s: %s" % (local, e.strerror)) from None
    for entry in remote_list(stream_factory, remote):
        name = entry.get("name")
        if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
            raise TransferError(BAD_REQUEST, "device listed a bad name %r" % (name,))
        rpath, lpath = _join(remote, name), os.path.join(local, name)
        if entry.get("type") == "dir":
            _pull_tree(stream_factory, rpath, lpath, resume, progress, summary, depth + 1,
                       overwrite)
        elif entry.get("type") == "file":
            summary["bytes"] += get_file(stream_factory, rpath, lpath, resume, progress,
                                         overwrite)
            summary["files"] += 1
        # symlinks and special files are not followed or copied


class Interrupted(KeyboardInterrupt):
    """Ctrl-C / SIGTERM during a download: the local partial was kept."""

    def __init__(self, part: str, size: int) -> None:
        super().__init__(part)
        self.part = part
        self.size = size


def _exists_error(local: str) -> TransferError:
    return TransferError(EXISTS, "%s already exists; use --overwrite to replace it" % local)


def _install(part: str, local: str, overwrite: bool) -> None:
    """Move the verified partial to ``local``: replace only when ``overwrite`` (like push),
    else ``link`` + ``unlink`` so a file that appeared meanwhile is never clobbered."""
    if overwrite:
        os.replace(part, local)
        return
    try:
        os.link(part, local)
    except FileExistsError:
        raise _exists_error(local) from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        if os.path.lexists(local):  # a file system without hard links: check, then rename
            raise _exists_error(local) from None
        os.rename(part, local)
        return
    os.unlink(part)


def get_file(stream_factory: StreamFactory, remote: str, local: str, resume: bool = False,
             progress: Optional[Progress] = None, overwrite: bool = False) -> int:
    """Download one file atomically to ``local``; return the bytes received this run.

    An existing ``local`` is refused (``exists``) unless ``overwrite``, as ``push`` does
    on the device."""
    progress = progress or _NoProgress()
    local = os.path.abspath(local)
    ldir, name = os.path.split(local)
    if not name:
        raise TransferError(BAD_REQUEST, "%s: no file name" % local)
    if not overwrite and os.path.lexists(local):
        raise _exists_error(local)
    part = os.path.join(ldir, part_name(name))
    existed = os.path.lexists(part)
    try:
        fd = os.open(part, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0),
                     LOCAL_PART_MODE)
    except OSError as e:
        raise TransferError(NO_SPACE if e.errno == errno.ENOSPC else IO_ERROR,
                            "%s: %s" % (part, e.strerror)) from None
    keep = existed   # a refusal before any byte removes only a partial we created
    try:
        with os.fdopen(fd, "r+b") as fh:
            have = os.fstat(fh.fileno()).st_size if resume else 0
            for offset in ((have, 0) if have else (0,)):
                conn = _Conn(stream_factory)
                try:
                    reply = conn.request({"op": "get", "path": remote, "offset": offset},
                                         half_close=True)
                    size, start = reply.get("size"), reply.get("offset", 0)
                    if not isinstance(size, int) or not isinstance(start, int) \
                            or not 0 <= start <= min(offset, size):
                        raise TransferError(BAD_REQUEST, "device answered a bad size/offset")
                    h = _hash_local_prefix(fh, start)
                    if start and h.hexdigest() != reply.get("prefix_sha256"):
                        conn.close()
                        continue       # our partial is not a prefix of this file
                    fh.truncate(start)
                    keep = False
                    try:
                        n = _get_data(conn, fh, remote, size, start, h, progress)
                    except TransferError as e:
                        progress.abort()
                        keep = e.code in (CONNECTION_LOST, INCOMPLETE)
                        raise
                    except (KeyboardInterrupt, gevent.GreenletExit):
                        # Ctrl-C / SIGTERM: what arrived is a verified-later prefix,
                        # kept (flushed by the with block) so --resume continues it.
                        keep = True
                        raise Interrupted(part, fh.tell()) from None
                    fh.flush()
                    os.fsync(fh.fileno())
                    os.chmod(part, LOCAL_FILE_MODE)
                    _install(part, local, overwrite)
                    keep = True
                    fsutil.fsync_dir(ldir)
                    conn.finish()
                    return n
                finally:
                    conn.close()
            raise TransferError(INTEGRITY, "%s: could not restart the download" % remote)
    except OSError as e:
        keep = False
        raise TransferError(NO_SPACE if e.errno == errno.ENOSPC else IO_ERROR,
                            "%s: %s" % (local, e.strerror)) from None
    finally:
        if not keep:
            try:
                os.unlink(part)
            except OSError:
                pass


def _get_data(conn: _Conn, fh: Any, remote: str, size: int, offset: int, h: Any,
              progress: Progress) -> int:
    progress.start(remote, size, offset)
    fh.seek(offset)
    pos = offset
    while pos < size:
        data = conn.ch.read_some(min(CHUNK, size - pos))
        if not data:
            raise TransferError(INCOMPLETE, "%s: the device ended the stream at %d of %d bytes"
                                % (remote, pos, size))
        fh.write(data)
        h.update(data)
        pos += len(data)
        progress.update(len(data))
    trailer = conn.answer("trailer")
    digest = h.hexdigest()
    if trailer.get("sha256") != digest:
        raise TransferError(INTEGRITY, "%s: sha256 mismatch (device %s, local %s); nothing "
                            "kept" % (remote, trailer.get("sha256"), digest))
    progress.finish()
    return size - offset


# --------------------------------------------------------------------------- CLI glue


def _run(what: str, fn: Callable[[], Dict[str, Any]], progress: Progress,
         err: IO[str], quiet: bool = False) -> int:
    """One line on failure or interruption; the one-line summary on success, also when
    stderr is not a terminal (a script's log), unless ``quiet``."""
    def say(text: str) -> None:
        err.write("remote-gevent-console %s: %s\n" % (what, text))
        err.flush()

    t0 = time.monotonic()
    try:
        summary = fn()
    except TransferError as e:
        progress.abort()
        say("%s: %s" % (e.code, e.message))
        return exit_code(e.code)
    except KeyboardInterrupt as e:  # Ctrl-C / SIGTERM (cli_base._install_sigterm)
        progress.abort()
        if isinstance(e, Interrupted):
            kept = "the partial download %s (%s) is kept" % (e.part, _human(e.size))
        elif what == "push":
            kept = "the device keeps the partial upload"
        else:
            kept = "nothing was written"
        say("interrupted; %s: run the same command with --resume to continue" % kept)
        return EXIT_INTERRUPTED
    if not quiet:
        dt = max(time.monotonic() - t0, 1e-6)
        err.write("%s: %d file(s), %s in %.1fs (%s/s)\n" % (
            what, summary["files"], _human(summary["bytes"]), dt, _human(summary["bytes"] / dt)))
        err.flush()
    return EXIT_OK


def run_push(stream_factory: StreamFactory, local: str, remote: str, overwrite: bool = False,
             resume: bool = False, recursive: bool = False,
             progress: Optional[Progress] = None, err: Optional[IO[str]] = None,
             quiet: bool = False) -> int:
    """``push`` for the CLI: returns the exit code, prints one line (summary or failure)."""
    err = err if err is not None else sys.stderr
    progress = progress if progress is not None else Progress(out=err, enabled=None
                                                              if not quiet else False)
    return _run("push", lambda: push(stream_factory, local, remote, overwrite=overwrite,
                                     resume=resume, recursive=recursive, progress=progress),
                progress, err, quiet)


def run_pull(stream_factory: StreamFactory, remote: str, local: str, resume: bool = False,
             recursive: bool = False, progress: Optional[Progress] = None,
             err: Optional[IO[str]] = None, overwrite: bool = False, quiet: bool = False) -> int:
    """``pull`` for the CLI: returns the exit code, prints one line (summary or failure)."""
    err = err if err is not None else sys.stderr
    progress = progress if progress is not None else Progress(out=err, enabled=None
                                                              if not quiet else False)
    return _run("pull", lambda: pull(stream_factory, remote, local, resume=resume,
                                     recursive=recursive, progress=progress,
                                     overwrite=overwrite),
                progress, err, quiet)
