"""Durable file writes: the one place that knows how to replace a file safely."""

import contextlib
import os
import tempfile
from typing import Callable, Union


def write_atomic(path: str, data: Union[bytes, str], mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old file or the new one.

    The temporary file is created beside the target by ``mkstemp`` (O_EXCL, mode 0600) and
    only then given ``mode``, so key material is never readable by others, not even for a
    moment; it is fsynced before the rename, and the directory after it. Raises OSError.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    parent = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".%s." % os.path.basename(path), suffix=".tmp",
                               dir=parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(parent)


def fsync_dir(path: str) -> None:
    """Make a rename in ``path`` durable (best effort: some filesystems refuse it)."""
    try:
        dfd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def read_checked(path: str, check: Callable[[os.stat_result], None],
                 follow_symlinks: bool = False) -> bytes:
    """The bytes of the file ``path``, read only after ``check(fstat)`` accepted it.

    The one way to read a file whose owner and mode matter (the identity key,
    ``authorized_keys``): checked on the opened descriptor (so a file swapped after the
    check is never read), closed in every case; a symlink is refused unless
    ``follow_symlinks`` (``authorized_keys`` may be one, as OpenSSH allows). ``check``
    raises to refuse; OSError from opening or reading reaches the caller.
    """
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags)
    try:
        check(os.fstat(fd))
        with os.fdopen(fd, "rb") as fh:
            fd = -1
            return fh.read()
    finally:
        if fd >= 0:
            os.close(fd)
