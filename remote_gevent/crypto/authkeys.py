"""Trusted operator keys (``authorized_keys`` syntax) and target allow-lists.

The agent trusts an operator only through ``remote.authorized_keys``: a file
of ``ssh-ed25519`` lines in OpenSSH ``authorized_keys`` syntax. The option
``permitopen="host:port"`` (repeatable) limits the targets that operator may
open; without it the operator is limited by the device allow-list alone
(``remote.allow``).

Targets and patterns
--------------------
A *target* is what one stream connects to: ``host:port`` (IPv6 in brackets:
``[::1]:22``) or a virtual service, ``@sftp`` or ``@transfer``. A *pattern*
may also use ``*`` for the whole host and/or the whole port
(``127.0.0.1:*``, ``*:22``, ``*:*``).

Matching is textual on a normalized form (host names lowercased, IP addresses
canonical): no DNS resolution ever happens here, so ``localhost:22`` and
``127.0.0.1:22`` differ. Virtual targets are matched only by the identical pattern:
``*:*`` never permits ``@sftp`` or ``@transfer``; the device allow-list must name them.

A stream is permitted iff its target matches the device allow-list AND the
operator's permitopen (when the operator has one) AND the targets the
session request asked for (see :func:`is_target_allowed`).

Options
-------
Accepted silently (no meaning for us, or implied): ``restrict``,
``port-forwarding``, ``[no-]pty``, ``[no-]agent-forwarding``,
``[no-]x11-forwarding``, ``[no-]user-rc``, ``no-touch-required``,
``verify-required``, ``permitlisten``.
Fail closed (the line is skipped with a warning, because ignoring the option
would grant more than the administrator wrote): ``no-port-forwarding`` (all
we do is forwarding), ``from``, ``expiry-time``, ``command``; ``principals``
without ``cert-authority``.
Anything else: warned about and ignored.

``cert-authority``: the line is a CA whose user certificates are accepted
(:mod:`remote_gevent.crypto.certauth`; ``principals=``, ``permitopen``, admin apply).

``remote-gevent-admin`` (no value) marks an administrator's key: it may list and close
every operator's sessions (``status``, ``session.close``); without it an operator sees
and closes only its own. OpenSSH itself would refuse a line with this option, so keep
it out of files that sshd reads.

File safety (like OpenSSH ``StrictModes``)
------------------------------------------
The file must be a regular file that neither its group nor others may write, in a
directory that neither group nor others may write: whoever can write either can
grant themselves access to the device. An unsafe file trusts nobody until fixed.
:func:`trust_stamp` is the cheap ``stat`` of both the agent compares at every trust
decision, so a ``chmod`` is noticed at once, not only when the content changes.
"""

import ipaddress
import logging
import os
import re
import stat
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Type, TypeVar

from remote_gevent.common import fsutil
from remote_gevent.common.addresses import is_ascii
from remote_gevent.crypto.identity import (
    fingerprint_of,
    parse_ssh_ed25519_line,
    public_line_of,
    ssh_pubkey_blob,
)
from remote_gevent.wire.codes import VIRTUAL_TARGETS

__all__ = [
    "AuthorizedKeys", "AuthorizedKeysError", "OperatorKey", "Target", "TargetError",
    "TargetPattern", "effective_targets", "fingerprint_of", "is_target_allowed",
    "parse_patterns", "parse_ssh_ed25519_blob", "parse_ssh_ed25519_line", "permits",
    "ssh_pubkey_blob", "ssh_pubkey_line", "trust_stamp", "ADMIN_OPTION",
]

log = logging.getLogger(__name__)

SSH_ED25519 = "ssh-ed25519"
WILDCARD = "*"
MAX_TARGET_CHARS = 262  # "[" + 45-char IPv6 + "]:" ... or a 253-char name + ":65535"
MAX_LINE_CHARS = 16384
ADMIN_OPTION = "remote-gevent-admin"
_UNSAFE_MODE = stat.S_IWGRP | stat.S_IWOTH

_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}\Z)[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
    r"(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)*\.?\Z"
)
_PORT_RE = re.compile(r"^[0-9]{1,5}\Z")

_SILENT_OPTIONS = frozenset({
    "restrict", "port-forwarding", "pty", "no-pty", "agent-forwarding",
    "no-agent-forwarding", "x11-forwarding", "no-x11-forwarding", "user-rc",
    "no-user-rc", "no-touch-required", "verify-required", "permitlisten",
})
_FAIL_CLOSED_OPTIONS = frozenset({
    "no-port-forwarding", "from", "expiry-time", "command",
})
_VALUED = frozenset({"principals", "permitopen"})
_KEY_TYPE_RE = re.compile(
    r"^(ssh-ed25519|ssh-rsa|ssh-dss|ecdsa-sha2-nistp\d+|sk-[a-z0-9@.-]+|"
    r"[a-z0-9.-]+-cert-v01@openssh\.com|rsa-sha2-\d+)\Z"
)


class AuthorizedKeysError(Exception):
    """The authorized_keys file cannot be used at all (missing, unsafe, unreadable)."""


class TargetError(ValueError):
    """A target or pattern string is not valid."""


# ---------------------------------------------------------------- ssh key helpers
# Shared with identity.py (one implementation of the ssh wire format).

ssh_pubkey_line = public_line_of


def parse_ssh_ed25519_blob(b64: str) -> bytes:
    """Raw 32-byte key from the base64 blob of an ``ssh-ed25519`` key; ValueError if not."""
    return parse_ssh_ed25519_line(SSH_ED25519 + " " + b64)[0]


# ---------------------------------------------------------------- targets


def _norm_host(host: str, pattern: bool) -> str:
    if pattern and host == WILDCARD:
        return WILDCARD
    if host.startswith("[") and host.endswith("]"):
        try:
            return "[" + str(ipaddress.IPv6Address(host[1:-1])) + "]"
        except ValueError:
            raise TargetError("bad IPv6 address %s" % _short(host)) from None
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    if not is_ascii(host):  # before lower(): e.g. U+212A KELVIN SIGN lowers to "k"
        raise TargetError("bad host %s" % _short(host))
    h = host.lower()
    if not _HOSTNAME_RE.match(h) or h.replace(".", "").isdigit():
        raise TargetError("bad host %s" % _short(host))
    return h.rstrip(".")


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...(%d chars)" % len(text)


_T = TypeVar("_T", bound="TargetPattern")


@dataclass(frozen=True)
class TargetPattern:
    """``host:port`` where host and/or port may be ``*``; or a virtual target.

    ``host`` is normalized (IPv6 kept in brackets); ``port`` is an int or None
    meaning ``*``; for virtual targets ``host`` is ``@sftp``/``@transfer``
    and ``port`` is None.
    """

    host: str
    port: Optional[int]

    @property
    def virtual(self) -> bool:
        return self.host in VIRTUAL_TARGETS

    @property
    def concrete(self) -> bool:
        return self.virtual or (self.host != WILDCARD and self.port is not None)

    @classmethod
    def parse(cls: Type[_T], text: str, pattern: bool = True) -> _T:
        if not isinstance(text, str) or not text or len(text) > MAX_TARGET_CHARS:
            raise TargetError("bad target %s" % _short(text))
        if text in VIRTUAL_TARGETS:
            return cls(text, None)
        # Not addresses.split_host_port: a pattern's host may be "*" and its port "*",
        # and an unbracketed IPv6 target is refused here (it would be ambiguous).
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise TargetError("target %s is not host:port" % _short(text))
        if ":" in host and not host.startswith("["):
            raise TargetError("IPv6 target %s must be written [addr]:port" % _short(text))
        if pattern and port == WILDCARD:
            port_v: Optional[int] = None
        else:
            if not _PORT_RE.match(port) or not 1 <= int(port) <= 65535:
                raise TargetError("bad port in %s" % _short(text))
            port_v = int(port)
        return cls(_norm_host(host, pattern), port_v)

    def __str__(self) -> str:
        if self.virtual:
            return self.host
        return "%s:%s" % (self.host, WILDCARD if self.port is None else self.port)

    def matches(self, target: "TargetPattern") -> bool:
        """True if this pattern permits the concrete ``target``."""
        if self.virtual or target.virtual:
            return self.host == target.host
        if self.host != WILDCARD and self.host != target.host:
            return False
        return self.port is None or self.port == target.port

    def intersect(self, other: "TargetPattern") -> Optional["TargetPattern"]:
        """The pattern matching exactly what both match, or None if they are disjoint."""
        if self.virtual or other.virtual:
            return TargetPattern(self.host, None) if self.host == other.host else None
        if self.host == WILDCARD:
            host = other.host
        elif other.host == WILDCARD or other.host == self.host:
            host = self.host
        else:
            return None
        if self.port is None:
            port = other.port
        elif other.port is None or other.port == self.port:
            port = self.port
        else:
            return None
        return TargetPattern(host, port)


class Target(TargetPattern):
    """A concrete target (no wildcard): what one stream opens."""

    @classmethod
    def parse(cls, text: str, pattern: bool = False) -> "Target":
        return super().parse(text, pattern=False)

    @property
    def address(self) -> Tuple[str, int]:
        """``(host, port)`` for ``socket.create_connection`` (IPv6 without brackets)."""
        if self.virtual or self.port is None:
            raise TargetError("%s has no network address" % self.host)
        return self.host.strip("[]"), self.port


def parse_patterns(texts: Iterable[str]) -> "List[TargetPattern]":
    return [TargetPattern.parse(t) for t in texts]


def _as_patterns(items: Iterable) -> "List[TargetPattern]":
    return [i if isinstance(i, TargetPattern) else TargetPattern.parse(i) for i in items]


def permits(patterns: Iterable, target) -> bool:
    """True if any of ``patterns`` permits the concrete ``target`` (str or TargetPattern).

    A malformed target is never permitted.
    """
    if not isinstance(target, TargetPattern):
        try:
            target = TargetPattern.parse(target, pattern=False)
        except TargetError:
            return False
    if not target.concrete:
        return False
    return any(p.matches(target) for p in _as_patterns(patterns))


def is_target_allowed(
    target,
    device_allow: Sequence,
    operator_permitopen: Sequence,
    requested: Optional[Sequence] = None,
) -> bool:
    """Decide one stream at open time.

    Permitted iff the target is concrete and valid, matches ``device_allow``,
    matches ``operator_permitopen`` unless that list is empty (= no
    restriction from the operator's key), and matches ``requested`` when
    given (the targets of the signed session request, e.g. ``*:*`` for SOCKS).
    """
    if not permits(device_allow, target):
        return False
    if operator_permitopen and not permits(operator_permitopen, target):
        return False
    if requested is not None and not permits(requested, target):
        return False
    return True


def effective_targets(
    requested: Sequence, device_allow: Sequence, operator_permitopen: Sequence
) -> "Tuple[List[TargetPattern], List[TargetPattern]]":
    """Intersect a request's targets with what the device and the operator permit.

    Returns ``(effective, refused)``: ``effective`` is the de-duplicated list
    of patterns reachable in this session (each requested pattern ∩ a device
    pattern ∩ an operator pattern; with an empty permitopen the operator adds
    no restriction); ``refused`` lists the requested targets that permit
    nothing at all. The agent refuses a request whose ``refused`` is not empty
    (``target_not_permitted``): a request for ``*:*`` is fine as long as some
    target is reachable, and then every stream is checked with
    :func:`is_target_allowed` / :func:`permits` against ``effective``.
    """
    req = _as_patterns(requested)
    dev = _as_patterns(device_allow)
    ops: Optional[List[TargetPattern]] = (
        _as_patterns(operator_permitopen) if operator_permitopen else None)
    effective: List[TargetPattern] = []
    refused: List[TargetPattern] = []
    for r in req:
        found = False
        for d in dev:
            rd = r.intersect(d)
            if rd is None:
                continue
            # No permitopen: the operator adds no restriction (not even "*:*",
            # which would exclude the virtual targets).
            for rdo in ([rd] if ops is None else [rd.intersect(o) for o in ops]):
                if rdo is not None:
                    found = True
                    if rdo not in effective:
                        effective.append(rdo)
        if not found:
            refused.append(r)
    return effective, refused


# ---------------------------------------------------------------- authorized_keys


@dataclass(frozen=True)
class OperatorKey:
    """One trusted operator key. ``permitopen`` empty = no restriction from the key."""

    public_raw32: bytes
    fingerprint: str
    comment: str = ""
    permitopen: "Tuple[TargetPattern, ...]" = ()
    line_no: int = 0
    admin: bool = False  # ADMIN_OPTION: may list and close every operator's sessions
    cert_authority: bool = False  # a CA line, never an operator key itself
    principals: "Tuple[str, ...]" = ()  # the line's principals= (empty: the device ident)
    #: An operator admitted by certificate: its sshcert.Certificate and the CA line's fp.
    cert: Any = field(default=None, compare=False)
    ca_fingerprint: str = ""


def _split_options(text: str) -> Tuple[List[Tuple[str, Optional[str]]], str]:
    """Split a leading OpenSSH option list off ``text``.

    Returns ``([(name, value_or_None), ...], rest)``. Values are double-quoted
    and may contain commas, spaces and ``\\"``. Raises ValueError when the
    list is malformed (unterminated quote, empty option, junk after a value).
    """
    opts: List[Tuple[str, Optional[str]]] = []
    i, n = 0, len(text)
    while True:
        start = i
        while i < n and text[i] not in ',= \t"':
            i += 1
        name = text[start:i]
        if not name:
            raise ValueError("empty option")
        value: Optional[str] = None
        if i < n and text[i] == "=":
            i += 1
            if i >= n or text[i] != '"':
                raise ValueError("option %s: value must be double-quoted" % _short(name))
            i += 1
            buf = []
            while True:
                if i >= n:
                    raise ValueError("option %s: unterminated quote" % _short(name))
                c = text[i]
                if c == "\\" and i + 1 < n and text[i + 1] == '"':
                    buf.append('"')
                    i += 2
                    continue
                if c == '"':
                    i += 1
                    break
                buf.append(c)
                i += 1
            value = "".join(buf)
        elif i < n and text[i] == '"':
            raise ValueError("stray quote after option %s" % _short(name))
        opts.append((name.lower(), value))
        if i < n and text[i] == ",":
            i += 1
            continue
        if i >= n or text[i] in " \t":
            return opts, text[i:].strip()
        raise ValueError("unexpected character after option %s" % _short(name))


class AuthorizedKeys:
    """The set of trusted operator keys, looked up by fingerprint.

    Built with :meth:`load` (a file) or :meth:`parse` (text). Lines that
    cannot be used are skipped and described in :attr:`warnings` (also
    logged), each naming the source and line number; a broken line never
    makes the other keys unusable.
    """

    def __init__(self, keys: "Iterable[OperatorKey]" = (), source: str = "<memory>",
                 warnings: Optional[List[str]] = None) -> None:
        self.source = source
        self.warnings: List[str] = list(warnings or [])
        self._by_fp: Dict[str, OperatorKey] = {}
        self._cas: Dict[str, OperatorKey] = {}
        self.revoked: Any = None  # krl.Revocations in force (None: nothing revoked)
        for key in keys:
            (self._cas if key.cert_authority else self._by_fp).setdefault(key.fingerprint, key)

    def __len__(self) -> int:
        return len(self._by_fp) + len(self._cas)  # a CA line counts once (fairness share)

    def __iter__(self) -> "Iterator[OperatorKey]":
        return iter(self._by_fp.values())

    def __contains__(self, fingerprint: object) -> bool:
        return fingerprint in self._by_fp

    def get(self, fingerprint: str) -> "Optional[OperatorKey]":
        """The plain operator key with this fingerprint, unless revoked."""
        key = self._by_fp.get(fingerprint)
        if key is not None and self.revoked is not None \
                and self.revoked.key_revoked(key.public_raw32):
            return None
        return key

    def listed(self, fingerprint: str) -> bool:  # a plain key of the file, revoked or not
        return fingerprint in self._by_fp

    def authority(self, fingerprint: str) -> "Optional[OperatorKey]":  # a CA's line
        return self._cas.get(fingerprint)

    def current(self, operator: "OperatorKey") -> "Optional[OperatorKey]":
        """``operator`` as trusted now (None: no longer): the live check of sessions."""
        if operator.cert is None:
            return self.get(operator.fingerprint)
        from remote_gevent.crypto import certauth  # certauth imports this module
        return certauth.recheck(self, operator)

    def with_revocations(self, revoked: Any) -> "AuthorizedKeys":  # a krl.Revocations
        out = AuthorizedKeys([*self._by_fp.values(), *self._cas.values()], self.source,
                             self.warnings)
        out.revoked = revoked
        return out

    @classmethod
    def load(cls, path: str) -> "AuthorizedKeys":
        """Read and parse ``path``. Raises AuthorizedKeysError if missing,
        unreadable, not a regular file, or writable by others (anyone who can
        write the file can grant themselves access to the device)."""
        def check(st: os.stat_result) -> None:
            if not stat.S_ISREG(st.st_mode):
                raise AuthorizedKeysError("%s: not a regular file" % path)
            if st.st_mode & _UNSAFE_MODE:
                raise AuthorizedKeysError(
                    "%s: refusing a group- or world-writable file (mode %04o); chmod go-w it"
                    % (path, stat.S_IMODE(st.st_mode)))
            _check_directory(path)
            if st.st_size > 4 * 1024 * 1024:
                raise AuthorizedKeysError("%s: file too large (%d bytes)" % (path, st.st_size))

        try:
            data = fsutil.read_checked(path, check, follow_symlinks=True)
        except OSError as exc:
            raise AuthorizedKeysError("%s: cannot open: %s" % (path, exc.strerror)) from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise AuthorizedKeysError("%s: not UTF-8 text" % path) from None
        return cls.parse(text, source=path)

    @classmethod
    def parse(cls, text: str, source: str = "<string>") -> "AuthorizedKeys":
        keys: List[OperatorKey] = []
        warnings: List[str] = []
        seen = set()

        def warn(line_no: int, message: str) -> None:
            msg = "%s:%d: %s" % (source, line_no, message)
            warnings.append(msg)
            log.warning("authorized_keys: %s", msg)

        for line_no, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if len(line) > MAX_LINE_CHARS:
                warn(line_no, "line too long, skipped")
                continue
            try:
                key = _parse_line(line, line_no, lambda m, n=line_no: warn(n, m))
            except ValueError as exc:
                warn(line_no, "%s, line skipped" % exc)
                continue
            if key is None:
                continue
            if key.fingerprint in seen:
                warn(line_no, "duplicate key %s, first occurrence kept" % key.fingerprint)
                continue
            seen.add(key.fingerprint)
            keys.append(key)
        return cls(keys, source=source, warnings=warnings)


def _check_directory(path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    try:
        dst = os.stat(directory)
    except OSError as exc:
        raise AuthorizedKeysError("%s: cannot stat its directory: %s"
                                  % (path, exc.strerror)) from None
    if dst.st_mode & _UNSAFE_MODE:
        raise AuthorizedKeysError(
            "%s: refusing a file in a group- or world-writable directory %s (mode %04o); "
            "chmod go-w it" % (path, directory, stat.S_IMODE(dst.st_mode)))


def trust_stamp(path: str) -> Tuple[object, ...]:
    """What decides whether ``path`` must be re-read: identity, size, times, mode and
    owner of the file and of its directory (two ``stat`` calls). Any change, including
    a ``chmod`` that leaves the content alone, gives another stamp."""
    stamp: List[object] = [path]
    for name in (path, os.path.dirname(os.path.abspath(path))):
        try:
            st = os.stat(name)
        except OSError as exc:
            stamp.append(("error", exc.errno))
            continue
        item: Tuple[int, ...] = (st.st_dev, st.st_ino, st.st_mode, st.st_uid)
        if name == path:  # not the directory's times: files come and go beside ours
            item += (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        stamp.append(item)
    return tuple(stamp)


def _parse_line(line: str, line_no: int, warn) -> "Optional[OperatorKey]":
    first = line.split(None, 1)[0]
    options: List[Tuple[str, Optional[str]]] = []
    if _KEY_TYPE_RE.match(first):
        rest = line
    else:
        options, rest = _split_options(line)
    parts = rest.split(None, 2)
    if not parts:
        raise ValueError("no key after options")
    ktype = parts[0]
    if ktype != SSH_ED25519:
        if _KEY_TYPE_RE.match(ktype):
            warn("key type %s not supported (only ssh-ed25519), line skipped" % _short(ktype))
            return None
        raise ValueError("not a key line")
    if len(parts) < 2:
        raise ValueError("ssh-ed25519 without key data")
    raw = parse_ssh_ed25519_blob(parts[1])
    comment = parts[2] if len(parts) > 2 else ""
    permitopen, admin, ca, principals = _line_options(options, warn)
    if principals and not ca:
        raise ValueError("principals= is only meaningful with cert-authority")
    return OperatorKey(raw, fingerprint_of(raw), comment, tuple(permitopen), line_no, admin,
                       ca, principals)


def _line_options(options: "List[Tuple[str, Optional[str]]]", warn
                  ) -> "Tuple[List[TargetPattern], bool, bool, Tuple[str, ...]]":
    """``(permitopen, admin, cert_authority, principals)`` of one line's options."""
    permitopen: List[TargetPattern] = []
    admin = ca = False
    principals: Tuple[str, ...] = ()
    for name, value in options:
        flag = name in ("cert-authority", ADMIN_OPTION)
        if flag and value is not None or not flag and name in _VALUED and value is None:
            raise ValueError("option %s %s" % (name, "takes no value" if flag
                                               else "needs a value"))
        if name == "cert-authority":
            ca = True
        elif name == ADMIN_OPTION:
            admin = True
        elif name == "principals":
            principals = tuple(p.strip() for p in (value or "").split(",") if p.strip())
            if not principals:
                raise ValueError("principals= lists no principal")
        elif name == "permitopen":
            # OpenSSH allows several comma-separated targets in one value.
            for item in (value or "").split(","):
                try:
                    permitopen.append(TargetPattern.parse(item.strip()))
                except TargetError as exc:
                    raise ValueError("permitopen: %s" % exc) from None
        elif name in _FAIL_CLOSED_OPTIONS:
            raise ValueError("option %s cannot be honoured by remote-gevent" % name)
        elif name not in _SILENT_OPTIONS:
            warn("unknown option %s ignored" % _short(name))
    return permitopen, admin, ca, principals
