"""Durable file writes: the one place that knows how to replace a file safely."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Union


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
