"""Filesystem primitives of the agent's file access: descriptor-relative opens that
never follow a symlink, fsync, ``renameat2(RENAME_NOREPLACE)``, hashing a prefix, and the
hard-link check (docs/transfer.md, "Path policy").
"""

import ctypes
import ctypes.util
import errno
import hashlib
import logging
import os
import stat
from typing import Any, List, Optional
import gevent

from remote_gevent.wire.transfer_lines import (
    CHUNK,
    EXISTS,
    HARD_LINK,
    IO_ERROR,
    NOT_FOUND,
    NOT_REGULAR_FILE,
    NO_SPACE,
    SYMLINK_ESCAPE,
    TransferError,
)

log = logging.getLogger(__name__)

FILE_MODE = 0o644
DIR_MODE = 0o755
PART_MODE = 0o600
YIELD_EVERY = 4 * 1024 * 1024      # gevent.sleep(0) after this many bytes of file I/O

O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_RENAME_NOREPLACE = 1


def open_checked(path: str, flags: int, dir_fd: Optional[int], shown: str) -> int:
    try:
        return os.open(path, flags, dir_fd=dir_fd)
    except OSError as e:
        raise os_error(e, shown) from None


def os_error(e: OSError, shown: str) -> TransferError:
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


def fsync_fd(fd: int) -> None:
    """fsync in gevent's threadpool: a large file's fsync would stall the hub."""
    gevent.get_hub().threadpool.apply(os.fsync, (fd,))


def fsync_dirfd(dfd: int) -> None:
    try:
        fsync_fd(dfd)
    except OSError:
        pass  # some file systems refuse fsync on directories


def close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def unlink_quietly(name: str, dfd: int) -> None:
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


#: ``os.scandir`` takes a directory descriptor from Python 3.7 only.
SCANDIR_TAKES_FD = os.scandir in os.supports_fd


class FdDirEntry:
    """What the sweep uses of an ``os.DirEntry`` (``name``, ``is_dir``), for an entry of a
    directory open as ``dfd``: the Python 3.6 path of :func:`scan_dir`."""

    __slots__ = ("name", "_dfd")

    def __init__(self, dfd: int, name: str) -> None:
        self.name = name
        self._dfd = dfd

    def is_dir(self, follow_symlinks: bool = True) -> bool:
        st = os.stat(self.name, dir_fd=self._dfd, follow_symlinks=follow_symlinks)
        return stat.S_ISDIR(st.st_mode)


def scan_dir(dfd: int) -> List[Any]:
    """The entries of the directory open as ``dfd`` (``os.DirEntry`` where Python can scan
    a descriptor, else :class:`FdDirEntry`: names from ``listdir``, one ``lstat`` each
    when asked)."""
    if SCANDIR_TAKES_FD:
        with os.scandir(dfd) as it:  # novermin - a descriptor: 3.7+, checked above
            return list(it)
    return [FdDirEntry(dfd, name) for name in os.listdir(dfd)]
