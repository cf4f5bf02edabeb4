"""Partial uploads (``.rgpart``) of one writable transfer root: expiry and quota.

An interrupted ``@transfer`` put keeps its partial file so that ``--resume`` only
sends the rest; an ``@sftp`` write assembles the file in a temporary partial.  A
client that never comes back must not hold that space forever, nor fill the disk
with hidden files.  So (issue 10 item 9):

- **Expiry.**  A partial not written for ``partial_ttl`` seconds is removed.  The
  root is swept at the start of an upload when its last sweep is older than
  ``SWEEP_INTERVAL`` (never a tree walk per request); an upload that finds its own
  partial expired starts over instead of resuming.  A partial still open by an
  upload is ``flock``ed and never removed (the lock is tried before the unlink).
- **Quota.**  The bytes all partials of a root hold, plus what the uploads in
  progress have declared, may not exceed the root's ``partial_quota``; an upload
  that would go over is refused ``no_space`` before a byte is written.  The ledger
  learns the on-disk sizes from the sweep and keeps them up to date from the
  uploads this process serves; the next sweep corrects anything done behind its back.

The walk opens every directory ``O_NOFOLLOW`` from the root (``Root.open_dir``), reads
entry types from ``scandir`` (no stat per entry: only partials are stat'ed), visits
at most ``MAX_SWEEP_ENTRIES`` entries and yields to the hub as it goes.
"""

import errno
import fcntl
import logging
import os
import stat
import time
from typing import Any, Dict, List, Optional

import gevent
import gevent.lock

from remote_gevent.agent.files import fsops
from remote_gevent.common.logs import escape
from remote_gevent.wire import transfer_lines as tl

log = logging.getLogger("remote_gevent.agent.files.transfer")

SWEEP_INTERVAL = 600.0          # seconds between two sweeps of one root
MAX_SWEEP_ENTRIES = 200000      # directory entries visited by one sweep
YIELD_EVERY_ENTRIES = 256

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def expired(st: os.stat_result, ttl: float, now: Optional[float] = None) -> bool:
    """True if a partial with this stat was last written more than ``ttl`` s ago."""
    return (time.time() if now is None else now) - st.st_mtime > ttl


class Ledger:
    """Bytes held by the partial files of one root (keys: paths relative to it)."""

    def __init__(self, real: str) -> None:
        self.real = real
        self.on_disk: Dict[str, int] = {}   # kept partials, as last seen
        self.active: Dict[str, int] = {}    # uploads in progress: bytes they may reach
        self.swept_at: Optional[float] = None
        self._lock = gevent.lock.BoundedSemaphore()

    def held(self, exclude: Optional[str] = None) -> int:
        total = 0
        for k, n in self.on_disk.items():
            if k != exclude and k not in self.active:
                total += n
        for k, n in self.active.items():
            if k != exclude:
                total += n
        return total

    def reserve(self, key: str, nbytes: int, quota: int, shown: str) -> None:
        """Account ``nbytes`` for the upload writing ``key``, or refuse it (NO_SPACE)."""
        others = self.held(exclude=key)
        if others + nbytes > quota:
            raise tl.TransferError(
                tl.NO_SPACE, "%s: partial uploads in this root already hold %d bytes; %d more "
                "would pass its partial quota of %d (remote.transfer.partial_quota); resume "
                "them or wait until they expire (remote.transfer.partial_ttl)"
                % (shown, others, nbytes, quota))
        self.active[key] = max(nbytes, self.active.get(key, 0))

    def begin(self, key: str) -> None:
        """Mark ``key`` in use (spared by sweeps) before any byte is accounted."""
        self.active.setdefault(key, 0)

    def release(self, key: str, kept: Optional[int]) -> None:
        """The upload of ``key`` ended; ``kept`` bytes stay on disk (None: none)."""
        self.active.pop(key, None)
        if kept is None:
            self.on_disk.pop(key, None)
        else:
            self.on_disk[key] = kept

    def maybe_sweep(self, root: Any, ttl: float) -> None:
        """Sweep ``root`` if it never was, or not for ``SWEEP_INTERVAL`` seconds."""
        if self._due():
            with self._lock:
                if self._due():       # another greenlet may have swept while we waited
                    self.sweep(root, ttl)

    def _due(self) -> bool:
        return self.swept_at is None or time.monotonic() - self.swept_at >= SWEEP_INTERVAL

    def sweep(self, root: Any, ttl: float) -> int:
        """Remove expired partials below ``root``, re-count the others; returns the
        number removed (one log line if any)."""
        found: Dict[str, int] = {}
        removed = 0
        freed = 0
        visited = 0
        now = time.time()
        pending: List[List[str]] = [[]]
        while pending:
            parts = pending.pop()
            try:
                dfd = root.open_dir(parts)
            except (tl.TransferError, OSError):
                continue    # gone, or swapped for a symlink since it was listed: skip it
            try:
                entries = fsops.scan_dir(dfd)  # os.scandir(fd) is 3.7+
                for entry in entries:
                    visited += 1
                    if visited % YIELD_EVERY_ENTRIES == 0:
                        gevent.sleep(0)
                    if visited > MAX_SWEEP_ENTRIES:
                        break
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            pending.append(parts + [entry.name])
                            continue
                    except OSError:
                        continue
                    if not _is_part_name(entry.name):
                        continue
                    key = "/".join(parts + [entry.name])
                    st = _regular(dfd, entry.name)
                    if st is None:
                        continue    # not a regular file: neither ours to count nor remove
                    if key not in self.active and expired(st, ttl, now) \
                            and remove_if_unused(dfd, entry.name, st):
                        removed += 1
                        freed += st.st_size
                    else:
                        found[key] = st.st_size
            except OSError as e:
                log.info("transfer: sweeping partials in %s: %s", escape(root.real), e)
            finally:
                os.close(dfd)
            if visited > MAX_SWEEP_ENTRIES:
                log.warning("transfer: root %s has more than %d entries; partial uploads "
                            "beyond them are neither expired nor counted", escape(root.real),
                            MAX_SWEEP_ENTRIES)
                break
        self.on_disk = found
        self.swept_at = time.monotonic()
        if removed:
            log.info("transfer: expired %d partial upload(s) (%d bytes) untouched for more "
                     "than %d s in %s", removed, freed, ttl, escape(root.real))
        return removed


def _regular(dfd: int, name: str) -> Optional[os.stat_result]:
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None


def remove_if_unused(dfd: int, name: str, st: os.stat_result) -> bool:
    """Unlink ``name`` in ``dfd`` if it is still the file ``st`` and no upload holds
    its lock (an upload in progress keeps the partial flock'ed)."""
    try:
        fd = os.open(name, os.O_RDONLY | _O_NOFOLLOW | os.O_NONBLOCK | _O_CLOEXEC, dir_fd=dfd)
    except OSError:
        return False
    try:
        fst = os.fstat(fd)
        if (fst.st_ino, fst.st_dev) != (st.st_ino, st.st_dev) or not stat.S_ISREG(fst.st_mode):
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False    # in use
            raise
        now_st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if (now_st.st_ino, now_st.st_dev) != (fst.st_ino, fst.st_dev):
            return False
        os.unlink(name, dir_fd=dfd)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _is_part_name(name: str) -> bool:
    return tl.is_part_name(name)


_LEDGERS: "Dict[str, Ledger]" = {}


def ledger_of(root: Any) -> "Ledger":
    """The process-wide ledger of ``root`` (by real path: ``Roots`` are rebuilt for
    every stream, the bytes on disk are not)."""
    led = _LEDGERS.get(root.real)
    if led is None:
        led = _LEDGERS[root.real] = Ledger(root.real)
    return led
