"""What ``@transfer`` answers without moving file data: ``stat``, ``list`` and
``mkdir`` inside the roots (entries from ``lstat`` on the opened directory; at most
``MAX_LIST_ENTRIES`` a listing)."""

import errno
import logging
import os
import stat
from typing import Any, Dict, Iterator, Optional
import gevent

from remote_gevent.wire.transfer_lines import (
    NOT_FOUND,
    NOT_REGULAR_FILE,
    TransferError,
    is_part_name,
)
from remote_gevent.agent.files.fsops import (
    DIR_MODE,
    O_CLOEXEC,
    O_DIRECTORY,
    O_NOFOLLOW,
    close_fd,
    file_type,
    fsync_dirfd,
    lstat_in,
    open_checked,
    os_error,
)
from remote_gevent.agent.files.roots import (
    Resolved,
    Roots,
)

log = logging.getLogger("remote_gevent.agent.files.transfer")


MAX_LIST_ENTRIES = 100000


def stat_path(roots: Roots, path: Any) -> Dict[str, Any]:
    """``{"ok", "type", "size", "mtime", "mode", "path"}`` of a path (virtual dirs too)."""
    if roots.virtual_children(roots.check_path(path)) is not None:
        return {"ok": True, "type": "dir", "size": 0, "mtime": 0, "mode": 0o555,
                "path": roots.check_path(path), "virtual": True}
    res = roots.resolve(path)
    st: Optional[os.stat_result]
    if res.name is None:
        st = os.stat(res.root.real)
    else:
        dfd = res.open_parent()
        try:
            st = lstat_in(dfd, res.name)
        finally:
            close_fd(dfd)
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
        raise os_error(e, res.path) from None
    finally:
        close_fd(dfd)
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
            flags = os.O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC
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
                    raise os_error(e, res.path) from None
                nfd = open_checked(comp, flags, fd, res.path)
            except OSError as e:
                if e.errno == errno.ENOTDIR:
                    raise TransferError(NOT_REGULAR_FILE, "%s exists and is not a directory"
                                        % res.path) from None
                raise os_error(e, res.path) from None
            os.close(fd)
            fd = nfd
        if created:
            fsync_dirfd(fd)
    finally:
        close_fd(fd)
    return created
