"""The roots policy: which directories ``@transfer`` and ``@sftp`` may touch, and how
a remote path is resolved inside one (lexical normalisation, realpath confinement, then
an fd walk with ``O_NOFOLLOW``; docs/transfer.md, "Path policy").
"""

import fcntl
import logging
import os
import posixpath
import stat
from typing import TYPE_CHECKING, Any, Iterable, List, Optional, Tuple

from remote_gevent.wire.transfer_lines import (
    BAD_REQUEST,
    MAX_PATH,
    NOT_ABSOLUTE,
    NOT_REGULAR_FILE,
    OUTSIDE_ROOT,
    READ_ONLY,
    SYMLINK_ESCAPE,
    TransferError,
)
from remote_gevent.agent.files.fsops import (
    O_CLOEXEC,
    O_DIRECTORY,
    O_NOFOLLOW,
    check_links,
    file_type,
    open_checked,
)

if TYPE_CHECKING:
    from remote_gevent.agent.config import TransferConfig

log = logging.getLogger(__name__)

DEFAULT_MAX_SIZE = 4 * 1024 ** 3
DEFAULT_PARTIAL_TTL = 86400        # an abandoned partial upload is removed after a day


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
        fd = open_checked(self.real, os.O_RDONLY | O_DIRECTORY | O_CLOEXEC, None,
                           "/".join(parts))
        try:
            for comp in parts:
                nfd = open_checked(comp, os.O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC,
                                    fd, comp)
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd


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

    def __init__(self, root: "Root", parts: List[str]) -> None:
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

    def __init__(self, roots: "Iterable[Root]", overwrite: bool = False,
                 partial_ttl: float = DEFAULT_PARTIAL_TTL) -> None:
        self.roots = list(roots)
        self.overwrite = overwrite
        self.partial_ttl = partial_ttl

    @classmethod
    def from_config(cls, transfer_cfg: "TransferConfig") -> "Roots":
        """From the agent's ``remote.transfer`` section."""
        default_cap = transfer_cfg.max_size or DEFAULT_MAX_SIZE
        roots = [Root(r.path, writable=r.writable, max_size=r.max_size or default_cap,
                      allow_hardlinks=r.allow_hardlinks,
                      partial_quota=r.partial_quota or transfer_cfg.partial_quota)
                 for r in transfer_cfg.roots]
        return cls(roots, overwrite=transfer_cfg.overwrite,
                   partial_ttl=transfer_cfg.partial_ttl or DEFAULT_PARTIAL_TTL)

    def __bool__(self) -> bool:
        return bool(self.roots)

    def describe(self, limit: int = 8) -> str:
        """The roots for an error message: ``/srv/files (rw), /var/log (ro)`` (the first
        ``limit``; the reply line is capped)."""
        shown = ["%s (%s)" % (r.path, "rw" if r.writable else "ro") for r in self.roots[:limit]]
        more = len(self.roots) - limit
        return ", ".join(shown) + (" and %d more" % more if more > 0 else "")

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

    def root_of(self, norm: str) -> "Optional[Tuple[Root, str]]":
        """(most specific root containing ``norm``, path relative to it) or None."""
        best: Optional[Tuple[Root, str]] = None
        best_len = -1
        for root in self.roots:
            for top in (root.path, root.real):
                if _within(norm, top) and len(top) > best_len:
                    best, best_len = (root, norm[len(top):].lstrip("/")), len(top)
        return best

    def resolve(self, remote_path: Any, want_write: bool = False) -> "Resolved":
        """Resolve ``remote_path`` inside a root or raise ``TransferError``.

        Refuses (in this order) malformed paths, relative paths, paths outside every
        root, paths whose symlinks lead out of their root, and writes to a read-only
        root.  The result names the real path; callers open it through
        ``Resolved.open_parent`` (O_NOFOLLOW walk) so later symlink swaps fail.
        """
        norm = self.check_path(remote_path)
        found = self.root_of(norm)
        if found is None:
            raise TransferError(OUTSIDE_ROOT, "%s is outside the transfer roots; allowed: %s"
                                % (remote_path, self.describe()))
        root, rel = found
        lexical = root.real if not rel else root.real.rstrip("/") + "/" + rel
        real = os.path.realpath(lexical)
        if not _within(real, root.real):
            raise TransferError(SYMLINK_ESCAPE, "%s leads out of its root through a symlink"
                                % remote_path)
        if want_write and not root.writable:
            raise TransferError(READ_ONLY, "%s is in a read-only root (%s); writable: %s"
                                % (remote_path, root.path,
                                   ", ".join(r.path for r in self.roots if r.writable)
                                   or "none"))
        parts = [p for p in real[len(root.real):].split("/") if p]
        return Resolved(root, parts)


def open_regular(res: "Resolved", dfd: int, flags: int = os.O_RDONLY) -> Tuple[int, os.stat_result]:
    """Open ``res.name`` in ``dfd`` (O_NOFOLLOW, O_NONBLOCK so a fifo can't hang us)
    and insist on a regular file."""
    assert res.name is not None
    fd = open_checked(res.name, flags | O_NOFOLLOW | os.O_NONBLOCK | O_CLOEXEC, dfd, res.path)
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
