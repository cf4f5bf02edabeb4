"""The SFTP server's open files: reading a served file, and writing through a private
temporary file that replaces the target only on a clean close (counted against the
root's partial quota); SFTP status codes for our transfer errors."""

import logging
import os
import posixpath
import stat
import time
from typing import TYPE_CHECKING, Optional, Union

from paramiko import (
    SFTP_EOF,
    SFTP_FAILURE,
    SFTP_NO_SUCH_FILE,
    SFTP_OK,
    SFTP_PERMISSION_DENIED,
    SFTPAttributes,
    SFTPHandle,
    SFTPServer,
)

from remote_gevent.agent.files import fsops
from remote_gevent.agent.files import roots
from remote_gevent.wire import transfer_lines as tl
from remote_gevent.agent.files import transfer_partials as partials
from remote_gevent.common.logs import escape

if TYPE_CHECKING:  # the server creates the handles; annotations only
    from remote_gevent.agent.files.sftp import RootsSFTPServer

log = logging.getLogger("remote_gevent.agent.files.sftp")  # one logger for SFTP


COPY_CHUNK = tl.CHUNK


# TransferError code -> SFTP status (SFTP v3 has only a handful of codes).
STATUS_OF = {
    tl.NOT_FOUND: SFTP_NO_SUCH_FILE,
    tl.OUTSIDE_ROOT: SFTP_PERMISSION_DENIED,
    tl.NOT_ABSOLUTE: SFTP_PERMISSION_DENIED,
    tl.SYMLINK_ESCAPE: SFTP_PERMISSION_DENIED,
    tl.READ_ONLY: SFTP_PERMISSION_DENIED,
    tl.NOT_REGULAR_FILE: SFTP_PERMISSION_DENIED,
    tl.EXISTS: SFTP_FAILURE,
    tl.TOO_LARGE: SFTP_FAILURE,
    tl.NO_SPACE: SFTP_FAILURE,
    tl.INTEGRITY: SFTP_FAILURE,
    tl.IO_ERROR: SFTP_FAILURE,
    tl.BAD_REQUEST: SFTP_FAILURE,
    tl.BUSY: SFTP_FAILURE,
    tl.HARD_LINK: SFTP_PERMISSION_DENIED,
}


def status_of(e: tl.TransferError) -> int:
    return STATUS_OF.get(e.code, SFTP_FAILURE)


def _attrs(st: os.stat_result, name: str) -> SFTPAttributes:
    return SFTPAttributes.from_stat(st, name)


def _apply_attrs(fd: int, attr: SFTPAttributes, res: roots.Resolved) -> None:
    """setstat of a file in place: size (``fd`` must be open for writing; at most the
    root's max_size, as an upload), then permission bits (never setuid/setgid), then
    times (last: a truncate would move mtime); no chown."""
    if attr is None:
        return
    if attr.st_size is not None and attr.st_size != os.fstat(fd).st_size:
        if attr.st_size > res.root.max_size:
            raise tl.TransferError(tl.TOO_LARGE, "%s: a size of %d bytes is more than the "
                                   "limit of %d" % (res.path, attr.st_size, res.root.max_size))
        os.ftruncate(fd, attr.st_size)
    if attr.st_mode is not None:
        os.fchmod(fd, stat.S_IMODE(attr.st_mode) & 0o1777)
    if attr.st_atime is not None and attr.st_mtime is not None:
        os.utime(fd, (attr.st_atime, attr.st_mtime))


def _merge_attrs(old: Optional[SFTPAttributes], new: SFTPAttributes) -> SFTPAttributes:
    """The mode and times to give a written file at close: each fsetstat overrides only
    what it carries (scp's size-only fsetstat must not drop an earlier mode)."""
    if old is None or new is None:
        return new if new is not None else old
    merged = SFTPAttributes()
    merged.st_mode = new.st_mode if new.st_mode is not None else old.st_mode
    if new.st_atime is not None and new.st_mtime is not None:
        merged.st_atime, merged.st_mtime = new.st_atime, new.st_mtime
    else:
        merged.st_atime, merged.st_mtime = old.st_atime, old.st_mtime
    return merged


class _ReadHandle(SFTPHandle):
    def __init__(self, server: "RootsSFTPServer", fd: int, path: str, flags: int) -> None:
        super().__init__(flags)
        self.server = server
        self.fd = fd
        self.path = path
        self.bytes = 0
        self.started = time.monotonic()

    def read(self, offset: int, length: int) -> Union[bytes, int]:
        try:
            data = os.pread(self.fd, length, offset)
        except OSError as e:
            return SFTPServer.convert_errno(e.errno)
        if not data:
            return SFTP_EOF
        self.bytes += len(data)
        return data

    def write(self, offset: int, data: bytes) -> int:
        return SFTP_PERMISSION_DENIED

    def stat(self) -> Union[SFTPAttributes, int]:
        return _attrs(os.fstat(self.fd), posixpath.basename(self.path))

    def chattr(self, attr: SFTPAttributes) -> int:
        return SFTP_PERMISSION_DENIED

    def close(self) -> None:
        if self.fd < 0:
            return
        os.close(self.fd)
        self.fd = -1
        self.server.report({"op": "sftp_get", "path": self.path, "bytes": self.bytes,
                            "code": tl.RESULT_OK,
                            "duration": round(time.monotonic() - self.started, 3)})


class _WriteHandle(SFTPHandle):
    """Writes land in a temp file renamed into place on a client CLOSE."""

    def __init__(self, server: "RootsSFTPServer", dfd: int, fd: int, tmp: str, name: str,
                 res: roots.Resolved, flags: int, attr: SFTPAttributes) -> None:
        super().__init__(flags)
        self.server = server
        self.dfd = dfd
        self.fd = fd
        self.tmp = tmp
        self.name = name
        self.res = res
        self.append = bool(flags & os.O_APPEND)
        self.attr = attr
        self.size = 0
        self.cap = res.root.max_size
        self.error: Optional[tl.TransferError] = None
        self.bytes = 0
        self.started = time.monotonic()
        self.ledger = partials.ledger_of(res.root)
        self.key = "/".join(res.parts[:-1] + [tmp])

    def account(self, end: int) -> None:
        """Count the temp file's ``end`` bytes against the root's partial quota
        (raises ``TransferError(no_space)`` if it would go over)."""
        self.ledger.reserve(self.key, end, self.res.root.partial_quota, self.res.path)

    def copy_existing(self) -> None:
        src = os.open(self.name, os.O_RDONLY | fsops.O_NOFOLLOW | os.O_NONBLOCK | fsops.O_CLOEXEC,
                      dir_fd=self.dfd)
        try:
            st = os.fstat(src)
            if not stat.S_ISREG(st.st_mode):
                self._fail(tl.TransferError(tl.NOT_REGULAR_FILE, "%s is not a regular file"
                                            % self.res.path))
                return
            try:
                fsops.check_links(st, self.res.path, self.res.root.allow_hardlinks)
            except tl.TransferError as e:
                self._fail(e)
                return
            pos = 0
            while True:
                data = os.read(src, COPY_CHUNK)
                if not data:
                    break
                if pos + len(data) > self.cap:
                    self._fail(tl.TransferError(tl.TOO_LARGE, "%s exceeds the limit"
                                                % self.res.path))
                    return
                try:
                    self.account(pos + len(data))
                except tl.TransferError as e:
                    self._fail(e)
                    return
                os.pwrite(self.fd, data, pos)
                pos += len(data)
            self.size = pos
        finally:
            os.close(src)

    def _fail(self, e: tl.TransferError) -> int:
        if self.error is None:
            self.error = e
            log.info("%s: sftp write %s failed: %s", self.server.log_ctx,
                     escape(self.res.path), escape(e))
        return status_of(e)

    def read(self, offset: int, length: int) -> Union[bytes, int]:
        try:
            data = os.pread(self.fd, length, offset)
        except OSError as e:
            return SFTPServer.convert_errno(e.errno)
        return data if data else SFTP_EOF

    def write(self, offset: int, data: bytes) -> int:
        if self.error is not None:
            return status_of(self.error)
        if self.append:
            offset = self.size
        end = offset + len(data)
        if end > self.cap:
            return self._fail(tl.TransferError(tl.TOO_LARGE, "%s: more than %d bytes"
                                               % (self.res.path, self.cap)))
        if end > self.size:
            try:
                self.account(end)
            except tl.TransferError as e:
                return self._fail(e)
        try:
            view = memoryview(data)
            pos = offset
            while view:
                n = os.pwrite(self.fd, view, pos)
                view = view[n:]
                pos += n
        except OSError as e:
            return self._fail(fsops.os_error(e, self.res.path))
        self.size = max(self.size, end)
        self.bytes += len(data)
        return SFTP_OK

    def stat(self) -> Union[SFTPAttributes, int]:
        return _attrs(os.fstat(self.fd), self.name)

    def chattr(self, attr: SFTPAttributes) -> int:
        """fsetstat: the size now (OpenSSH's upload ends with one, ``truncating at N``,
        as it opens an existing file without O_TRUNC), mode and times at close."""
        if attr is not None and attr.st_size is not None:
            code = self.resize(attr.st_size)
            if code != SFTP_OK:
                return code
        self.attr = _merge_attrs(self.attr, attr)
        return SFTP_OK

    def resize(self, size: int) -> int:
        """Truncate or extend the temp file to ``size`` bytes, bounded like writes (the
        root's max_size, the partial quota)."""
        if self.error is not None:
            return status_of(self.error)
        if size > self.cap:
            return self._fail(tl.TransferError(tl.TOO_LARGE, "%s: a size of %d bytes is more "
                                               "than %d" % (self.res.path, size, self.cap)))
        try:
            if size > self.size:
                self.account(size)
            os.ftruncate(self.fd, size)
        except tl.TransferError as e:
            return self._fail(e)
        except OSError as e:
            return self._fail(fsops.os_error(e, self.res.path))
        self.size = size
        return SFTP_OK

    def close(self) -> int:
        if self.fd < 0:
            return SFTP_OK
        code = SFTP_OK
        keep = False
        try:
            if self.server.ended and self.error is None:
                self.error = tl.TransferError(tl.INCOMPLETE, "session ended before close")
            if self.error is not None:
                code = status_of(self.error)
                return code
            try:
                os.fchmod(self.fd, fsops.FILE_MODE)
                if self.attr is not None and self.attr.st_mode is not None:
                    os.fchmod(self.fd, stat.S_IMODE(self.attr.st_mode) & 0o1777)
                if self.attr is not None and self.attr.st_mtime is not None \
                        and self.attr.st_atime is not None:  # scp -p, sftp put -p
                    os.utime(self.fd, (self.attr.st_atime, self.attr.st_mtime))
                fsops.fsync_fd(self.fd)
                if self.server.roots.overwrite:
                    st = fsops.lstat_in(self.dfd, self.name)
                    if st is not None and not stat.S_ISREG(st.st_mode):
                        raise tl.TransferError(tl.NOT_REGULAR_FILE, "%s is not a regular file"
                                               % self.res.path)
                    if st is not None:
                        fsops.check_links(st, self.res.path, self.res.root.allow_hardlinks)
                    os.rename(self.tmp, self.name, src_dir_fd=self.dfd, dst_dir_fd=self.dfd)
                else:
                    fsops.rename_noreplace(self.dfd, self.tmp, self.dfd, self.name)
                keep = True
                fsops.fsync_dirfd(self.dfd)
            except tl.TransferError as e:
                code = self._fail(e)
            except OSError as e:
                code = self._fail(fsops.os_error(e, self.res.path))
            return code
        finally:
            os.close(self.fd)
            self.fd = -1
            if not keep:
                fsops.unlink_quietly(self.tmp, self.dfd)
            self.ledger.release(self.key, None)
            os.close(self.dfd)
            self.server.report({
                "op": "sftp_put", "path": self.res.path, "bytes": self.bytes,
                "code": tl.result_code(self.error.code if self.error else None),
                "duration": round(time.monotonic() - self.started, 3)})
