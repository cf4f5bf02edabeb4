"""``@sftp``: an SFTP server for stock clients, on one tunnel stream, confined to the roots.

The mux hands the agent one end of a ``socketpair`` per ``@sftp`` stream; we run a
paramiko ``Transport`` in server mode on the other end.  No SSH server ever listens
on a network port: this code is only reachable through an operator-authenticated,
end-to-end encrypted tunnel whose session request was signed by a trusted operator
key and checked against the device allow-list.

Why ``none`` authentication is accepted: the operator is already authenticated end
to end (signed session request, ``permitopen`` for ``@sftp``), and the OpenSSH client
has no credential for this inner SSH layer.  Password and publickey attempts are
accepted for the same reason (a client configured to try them must not fail).  The
host key is the agent's ED25519 identity key, so ``ssh`` can pin it like the console
pins the device key.

What is refused: every channel type but ``session``, every channel request but the
``sftp`` subsystem (no shell, exec, pty, env, X11, agent or port forwarding), global
requests (``tcpip-forward``), symlink creation.

Writes follow the same discipline as ``@transfer`` (``transfer.py``): data goes to a
unique ``.<name>.<random>.rgpart`` in the target directory (SFTP writes are random
access, so the file is assembled there), which is fsynced and renamed into place
when the client closes the handle; the overwrite rule applies (no clobbering unless
``remote.transfer.overwrite``); if the session ends before the client closed the
handle, the temp file is removed and nothing is renamed.  Paths as seen by the
client are the real absolute device paths; ``/`` and the other ancestors of the
roots are virtual read-only directories leading to them.
"""

import binascii
import errno
import fcntl
import io
import logging
import os
import posixpath
import stat
from typing import Any, Callable, Dict, List, Optional, Union

import paramiko
from paramiko import (
    AUTH_SUCCESSFUL,
    OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED,
    OPEN_SUCCEEDED,
    SFTP_FAILURE,
    SFTP_NO_SUCH_FILE,
    SFTP_OK,
    SFTP_OP_UNSUPPORTED,
    SFTP_PERMISSION_DENIED,
    SFTPAttributes,
    SFTPHandle,
    SFTPServer,
    SFTPServerInterface,
)

from remote_gevent.agent.files import fsops
from remote_gevent.agent.files import roots
from remote_gevent.agent.files import lookups
from remote_gevent.wire import transfer_lines as tl
from remote_gevent.agent.files import transfer_partials as partials
from remote_gevent.common.logs import escape

from remote_gevent.agent.files.sftp_handles import (
    _ReadHandle,
    _WriteHandle,
    _apply_attrs,
    _attrs,
    status_of,
)

log = logging.getLogger(__name__)

AUTH_TIMEOUT = 30.0          # client must open its session channel within this
MAX_CHANNELS = 4             # session channels per SSH connection
OnResult = Optional[Callable[[Dict[str, Any]], None]]


def host_key_of(identity: Any) -> paramiko.PKey:
    """The SSH host key from the agent identity (``IdentityKey``, a paramiko key, or a
    path to the OpenSSH private key file)."""
    if isinstance(identity, paramiko.PKey):
        return identity
    if hasattr(identity, "openssh_private_bytes"):
        text = identity.openssh_private_bytes().decode("ascii")
        return paramiko.Ed25519Key(file_obj=io.StringIO(text))
    if isinstance(identity, str):
        return paramiko.Ed25519Key(filename=identity)
    raise TypeError("no usable SFTP host key in %r" % (identity,))


class _Server(paramiko.ServerInterface):
    """SSH policy: anyone who reached this stream may run the sftp subsystem only."""

    def __init__(self, log_ctx: str) -> None:
        self.log_ctx = log_ctx
        self.channels = 0

    def get_allowed_auths(self, username: str) -> str:
        return "none,publickey,password"

    def check_auth_none(self, username: str) -> int:
        return AUTH_SUCCESSFUL

    def check_auth_password(self, username: str, password: str) -> int:
        return AUTH_SUCCESSFUL

    def check_auth_publickey(self, username: str, key: Any) -> int:
        return AUTH_SUCCESSFUL

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind != "session" or self.channels >= MAX_CHANNELS:
            log.info("%s: sftp: channel %s refused", self.log_ctx, escape(repr(kind)))
            return OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        self.channels += 1
        return OPEN_SUCCEEDED

    def check_channel_subsystem_request(self, channel: Any, name: str) -> bool:
        if name != "sftp":
            log.info("%s: sftp: subsystem %s refused", self.log_ctx, escape(repr(name)))
            return False
        return bool(super().check_channel_subsystem_request(channel, name))

    # Everything else keeps paramiko's refusing defaults; spelled out for the reader.
    def check_channel_exec_request(self, channel: Any, command: bytes) -> bool:
        return False

    def check_channel_shell_request(self, channel: Any) -> bool:
        return False

    def check_channel_pty_request(self, *args: Any) -> bool:
        return False

    def check_channel_env_request(self, channel: Any, name: bytes, value: bytes) -> bool:
        return False

    def check_channel_forward_agent_request(self, channel: Any) -> bool:
        return False

    def check_channel_x11_request(self, *args: Any) -> bool:
        return False

    def check_port_forward_request(self, address: str, port: int) -> bool:
        return False

    def check_global_request(self, kind: str, msg: Any) -> bool:
        return False

    def check_channel_direct_tcpip_request(self, chanid: int, origin: Any,
                                           destination: Any) -> int:
        return OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED


def _virtual_dir(name: str) -> SFTPAttributes:
    a = SFTPAttributes()
    a.filename = name
    a.st_mode = stat.S_IFDIR | 0o555
    a.st_size = 0
    a.st_uid = a.st_gid = 0
    a.st_atime = a.st_mtime = 0
    return a


class _Entry:
    """A directory entry addressed *without* following its last component (for
    lstat, remove, rename, mkdir, rmdir): the parent resolved inside a root."""

    def __init__(self, parent: roots.Resolved, name: str) -> None:
        self.parent = parent
        self.name = name
        self.path = parent.path.rstrip("/") + "/" + name


class RootsSFTPServer(SFTPServerInterface):
    """paramiko SFTP server interface confined to ``roots.Roots``."""

    def __init__(self, server: Any, roots: roots.Roots, log_ctx: str = "",
                 on_result: OnResult = None, *args: Any, **kwargs: Any) -> None:
        super().__init__(server, *args, **kwargs)
        self.roots = roots
        self.log_ctx = log_ctx or "sftp"
        self.on_result = on_result
        self.ended = False

    def session_ended(self) -> None:
        # paramiko calls this *before* closing the handles still open: the writes
        # of a client that vanished must not be renamed into place.
        self.ended = True

    def report(self, result: Dict[str, Any]) -> None:
        if self.on_result is not None:
            try:
                self.on_result(result)
            except Exception:  # noqa: BLE001 - reporting must not break the session
                log.exception("%s: on_result failed", self.log_ctx)

    # -- path helpers ---------------------------------------------------------

    def home(self) -> str:
        """Where a relative path starts (sftp's first ``realpath .``): the first
        writable root, else the only root, else the virtual ``/`` (issue 15: starting in
        the read-only ``/`` made a plain ``put`` fail with "Permission denied")."""
        writable = [r for r in self.roots.roots if r.writable]
        if writable:
            return writable[0].path
        if len(self.roots.roots) == 1:
            return self.roots.roots[0].path
        return "/"

    def canonicalize(self, path: str) -> str:
        if not path.startswith("/"):
            path = self.home().rstrip("/") + "/" + path
        return "/" + posixpath.normpath(path).lstrip("/")

    def _entry(self, path: str, want_write: bool) -> "_Entry":
        norm = self.roots.check_path(self.canonicalize(path))
        parent_path, name = posixpath.split(norm)
        if not name:
            raise tl.TransferError(tl.READ_ONLY, "/ is virtual")
        if self.roots.root_of(norm) is None or self.roots.root_of(parent_path) is None:
            # A root itself or a virtual ancestor: not removable/renamable.
            if self.roots.root_of(norm) is None:
                raise tl.TransferError(tl.OUTSIDE_ROOT, "%s is outside the roots" % norm)
            raise tl.TransferError(tl.READ_ONLY, "%s is a transfer root" % norm)
        parent = self.roots.resolve(parent_path, want_write=want_write)
        return _Entry(parent, name)

    # -- reading the tree -------------------------------------------------------

    def list_folder(self, path: str) -> Union[List[SFTPAttributes], int]:
        try:
            norm = self.roots.check_path(self.canonicalize(path))
            virtual = self.roots.virtual_children(norm)
            if virtual is not None:
                return [_virtual_dir(n) for n in virtual]
            res = self.roots.resolve(norm)
            dfd = res.open_self_dir()
            try:
                out = []
                for name in sorted(os.listdir(dfd))[:lookups.MAX_LIST_ENTRIES]:
                    st = fsops.lstat_in(dfd, name)
                    if st is not None:
                        out.append(_attrs(st, name))
                return out
            finally:
                os.close(dfd)
        except tl.TransferError as e:
            return status_of(e)
        except OSError as e:
            return SFTPServer.convert_errno(e.errno)

    def stat(self, path: str) -> Union[SFTPAttributes, int]:
        try:
            norm = self.roots.check_path(self.canonicalize(path))
            if self.roots.virtual_children(norm) is not None:
                return _virtual_dir(posixpath.basename(norm))
            res = self.roots.resolve(norm)
            if res.name is None:
                return _attrs(os.stat(res.root.real), posixpath.basename(norm))
            dfd = res.open_parent()
            try:
                st = fsops.lstat_in(dfd, res.name)
            finally:
                os.close(dfd)
            if st is None:
                return SFTP_NO_SUCH_FILE
            return _attrs(st, res.name)
        except tl.TransferError as e:
            return status_of(e)
        except OSError as e:
            return SFTPServer.convert_errno(e.errno)

    def lstat(self, path: str) -> Union[SFTPAttributes, int]:
        norm = self.canonicalize(path)
        try:
            if self.roots.virtual_children(norm) is not None \
                    or self.roots.root_of(posixpath.dirname(norm)) is None:
                return self.stat(norm)
            ent = self._entry(norm, want_write=False)
            dfd = ent.parent.open_self_dir()
            try:
                st = fsops.lstat_in(dfd, ent.name)
            finally:
                os.close(dfd)
            return SFTP_NO_SUCH_FILE if st is None else _attrs(st, ent.name)
        except tl.TransferError as e:
            return status_of(e)
        except OSError as e:
            return SFTPServer.convert_errno(e.errno)

    def readlink(self, path: str) -> int:
        return SFTP_OP_UNSUPPORTED

    def symlink(self, target_path: str, path: str) -> int:
        return SFTP_PERMISSION_DENIED

    # -- files ------------------------------------------------------------------

    def open(self, path: str, flags: int, attr: SFTPAttributes) -> Union[SFTPHandle, int]:
        try:
            if flags & (os.O_WRONLY | os.O_RDWR):
                return self._open_write(path, flags, attr)
            res = self.roots.resolve(self.canonicalize(path))
            if res.name is None:
                return SFTP_PERMISSION_DENIED
            dfd = res.open_parent()
            try:
                fd, st = roots.open_regular(res, dfd)
            finally:
                os.close(dfd)
            if st.st_size > res.root.max_size:
                os.close(fd)
                raise tl.TransferError(tl.TOO_LARGE, "%s is larger than the limit" % res.path)
            return _ReadHandle(self, fd, res.path, flags)
        except tl.TransferError as e:
            log.info("%s: sftp open %s refused: %s", self.log_ctx, escape(path), escape(e))
            return status_of(e)
        except OSError as e:
            return SFTPServer.convert_errno(e.errno)

    def _open_write(self, path: str, flags: int, attr: SFTPAttributes) -> SFTPHandle:
        res = self.roots.resolve(self.canonicalize(path), want_write=True)
        name = res.name
        if name is None:
            raise tl.TransferError(tl.NOT_REGULAR_FILE, "%s is a transfer root" % res.path)
        if tl.is_part_name(name):
            raise tl.TransferError(tl.BAD_REQUEST, "reserved name %s" % name)
        dfd = res.open_parent()
        try:
            st = fsops.lstat_in(dfd, name)
            if st is not None:
                if not stat.S_ISREG(st.st_mode):
                    raise tl.TransferError(tl.NOT_REGULAR_FILE, "%s is not a regular file"
                                           % res.path)
                if flags & os.O_EXCL or not self.roots.overwrite:
                    raise tl.TransferError(tl.EXISTS, "%s already exists" % res.path)
                fsops.check_links(st, res.path, res.root.allow_hardlinks)
            elif not flags & os.O_CREAT:
                raise tl.TransferError(tl.NOT_FOUND, "%s does not exist" % res.path)
            ledger = partials.ledger_of(res.root)
            ledger.maybe_sweep(res.root, self.roots.partial_ttl)
            tmp = ".%s.%s%s" % (name, binascii.hexlify(os.urandom(4)).decode(), tl.PART_SUFFIX)
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | fsops.O_NOFOLLOW
                         | fsops.O_CLOEXEC, fsops.PART_MODE, dir_fd=dfd)
            # Ours alone (O_EXCL): the lock tells a sweep that this partial is in use,
            # however long the client stays idle.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(dfd)
            raise
        handle = _WriteHandle(self, dfd, fd, tmp, name, res, flags, attr)
        handle.ledger.begin(handle.key)
        if st is not None and not flags & os.O_TRUNC:
            handle.copy_existing()       # random-access update of an existing file
        return handle

    # -- namespace changes ----------------------------------------------------

    def _namespace_op(self, what: str, fn: Callable[[], None]) -> int:
        try:
            fn()
            return SFTP_OK
        except tl.TransferError as e:
            log.info("%s: sftp %s refused: %s", self.log_ctx, escape(what), escape(e))
            return status_of(e)
        except OSError as e:
            log.info("%s: sftp %s failed: %s", self.log_ctx, escape(what), escape(e))
            if e.errno == errno.EEXIST:
                return SFTP_FAILURE
            return SFTPServer.convert_errno(e.errno)

    def _with_parent(self, ent: "_Entry", fn: Callable[[int], None]) -> None:
        dfd = ent.parent.open_self_dir()
        try:
            fn(dfd)
            fsops.fsync_dirfd(dfd)
        finally:
            os.close(dfd)

    def remove(self, path: str) -> int:
        def do() -> None:
            ent = self._entry(path, want_write=True)

            def rm(dfd: int) -> None:
                st = fsops.lstat_in(dfd, ent.name)
                if st is None:
                    raise tl.TransferError(tl.NOT_FOUND, "%s: no such file" % ent.path)
                if stat.S_ISDIR(st.st_mode):
                    raise tl.TransferError(tl.NOT_REGULAR_FILE, "%s is a directory" % ent.path)
                os.unlink(ent.name, dir_fd=dfd)
            self._with_parent(ent, rm)
            self.report({"op": "sftp_remove", "path": ent.path, "bytes": 0,
                         "code": tl.RESULT_OK})
        return self._namespace_op("remove %s" % path, do)

    def rename(self, oldpath: str, newpath: str) -> int:
        return self._rename(oldpath, newpath, replace=False)

    def posix_rename(self, oldpath: str, newpath: str) -> int:
        return self._rename(oldpath, newpath, replace=self.roots.overwrite)

    def _rename(self, oldpath: str, newpath: str, replace: bool) -> int:
        def do() -> None:
            src = self._entry(oldpath, want_write=True)
            dst = self._entry(newpath, want_write=True)
            if tl.is_part_name(dst.name):
                raise tl.TransferError(tl.BAD_REQUEST, "reserved name %s" % dst.name)
            sfd = src.parent.open_self_dir()
            try:
                dfd = dst.parent.open_self_dir()
                try:
                    if fsops.lstat_in(sfd, src.name) is None:
                        raise tl.TransferError(tl.NOT_FOUND, "%s: no such file" % src.path)
                    old = fsops.lstat_in(dfd, dst.name) if replace else None
                    if old is not None:
                        fsops.check_links(old, dst.path, dst.parent.root.allow_hardlinks)
                    if replace:
                        os.rename(src.name, dst.name, src_dir_fd=sfd, dst_dir_fd=dfd)
                    else:
                        fsops.rename_noreplace(sfd, src.name, dfd, dst.name)
                    fsops.fsync_dirfd(dfd)
                    if dfd != sfd:
                        fsops.fsync_dirfd(sfd)
                finally:
                    os.close(dfd)
            finally:
                os.close(sfd)
        return self._namespace_op("rename %s %s" % (oldpath, newpath), do)

    def mkdir(self, path: str, attr: SFTPAttributes) -> int:
        def do() -> None:
            ent = self._entry(path, want_write=True)
            self._with_parent(ent, lambda dfd: os.mkdir(ent.name, fsops.DIR_MODE, dir_fd=dfd))
        return self._namespace_op("mkdir %s" % path, do)

    def rmdir(self, path: str) -> int:
        def do() -> None:
            ent = self._entry(path, want_write=True)
            self._with_parent(ent, lambda dfd: os.rmdir(ent.name, dir_fd=dfd))
        return self._namespace_op("rmdir %s" % path, do)

    def chattr(self, path: str, attr: SFTPAttributes) -> int:
        def do() -> None:
            res = self.roots.resolve(self.canonicalize(path), want_write=True)
            if res.name is None:
                raise tl.TransferError(tl.READ_ONLY, "%s is a transfer root" % res.path)
            sized = attr is not None and attr.st_size is not None
            if sized and tl.is_part_name(res.name):
                raise tl.TransferError(tl.BAD_REQUEST, "reserved name %s" % res.name)
            if sized and not self.roots.overwrite:  # new content, as an open for update
                raise tl.TransferError(tl.EXISTS, "%s already exists (a size changes it; "
                                       "remote.transfer.overwrite is off)" % res.path)
            # A size needs a descriptor open for writing: the same confined open (no
            # symlink, regular file, no hard link unless allowed) as a read.
            flags = os.O_WRONLY if sized else os.O_RDONLY
            dfd = res.open_parent()
            try:
                fd, _ = roots.open_regular(res, dfd, flags)
            finally:
                os.close(dfd)
            try:
                _apply_attrs(fd, attr, res)
            finally:
                os.close(fd)
        return self._namespace_op("setstat %s" % path, do)


class _SFTPSubsystem(SFTPServer):
    """paramiko's SFTP subsystem, ending like OpenSSH's sftp-server: with exit-status 0
    before the channel closes. scp in SFTP mode (OpenSSH 9's default) checks its ssh's
    exit status, and ssh without one exits 255: every ``scp FILE DEVICE-sftp:`` failed."""

    def finish_subsystem(self) -> None:
        channel = getattr(self, "sock", None)  # set by start_subsystem
        if channel is not None:
            try:
                channel.send_exit_status(0)
            except (EOFError, OSError, paramiko.SSHException):
                pass  # the client is already gone: nobody to tell
        super().finish_subsystem()


def serve_sftp(sock: Any, roots: roots.Roots, host_key: Any, log_ctx: str = "",
               on_result: OnResult = None, auth_timeout: float = AUTH_TIMEOUT) -> None:
    """Run an SSH server with only the sftp subsystem on ``sock`` until the client
    leaves; ``on_result`` gets one dict per file read, written or removed."""
    ctx = log_ctx or "sftp"
    transport = paramiko.Transport(sock)
    try:
        transport.add_server_key(host_key_of(host_key))
        transport.set_subsystem_handler("sftp", _SFTPSubsystem, RootsSFTPServer, roots, ctx,
                                        on_result)
        try:
            transport.start_server(server=_Server(ctx))
        except (paramiko.SSHException, EOFError, OSError) as e:
            log.info("%s: sftp: SSH negotiation failed: %s", ctx, escape(e))
            return
        chan = transport.accept(auth_timeout)
        if chan is None:
            log.info("%s: sftp: no session channel within %ss", ctx, auth_timeout)
            return
        log.info("%s: sftp session started", ctx)
        transport.join()
        log.info("%s: sftp session ended", ctx)
    finally:
        transport.close()
        try:
            sock.close()
        except OSError:
            pass
