"""Where a console master listens, and which config it belongs to (issue 15, item 2).

A master's socket is ``<control_socket_dir>/<server_id>-<device>-<identity>.sock``;
``identity`` is 16 hex digits of a SHA-256 over what makes a session *the same* session:
the broker URLs, the operator's broker user and password, the operator key file, the
server id and the device. A console whose config differs in any of these (another
platform, staging vs production with the same device name, a wrong password) computes
another name and never rides that master: it opens its own session (and fails on its
own if its config is wrong). The password enters the digest only; the directory is
0700 and ours, and the same user can read the config file anyway.

This module is imported by the fast ``stdio`` path before gevent, so it uses only the
standard library; :func:`read_settings` understands the plain ``key: value`` subset of
YAML and returns None when unsure, which sends the caller to the full path (real YAML,
:func:`config_identity` on the validated config).
"""

from __future__ import annotations

import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

ENV_CONFIG = "REMOTE_GEVENT_CONSOLE_CONFIG"  # = console.config.ENV_CONFIG
DEFAULT_CONFIG = os.path.join("~", ".config", "remote-gevent", "console.yaml")
UNIX_PATH_MAX = 107
#: Defaults of console.yaml the identity depends on (= console.config's declarations;
#: tests/test_console_ux.py checks they agree).
DEFAULT_URLS = ("amqps://broker.fr04.alemca.net:5671/",)
DEFAULT_SERVER_ID = "fr04"
DEFAULT_OPERATOR_KEY = "operator_ed25519"

_SCALAR_KEYS = ("control_socket_dir", "server_id", "user", "password", "operator_key")
_SCALAR_RE = re.compile(r"^(%s)[ \t]*:[ \t]*(.*?)[ \t]*$" % "|".join(_SCALAR_KEYS))
_URLS_RE = re.compile(r"^urls[ \t]*:[ \t]*(.*?)[ \t]*$")


class ControlError(Exception):
    """A control directory or socket we must not use (message says why)."""


# --------------------------------------------------------------------------- paths


def default_control_dir() -> str:
    """``$XDG_RUNTIME_DIR/remote-gevent``, else ``/tmp/remote-gevent-<uid>`` (short: sun_path)."""
    run = os.environ.get("XDG_RUNTIME_DIR")
    if run and os.path.isabs(run) and os.path.isdir(run):
        return os.path.join(run, "remote-gevent")
    return "/tmp/remote-gevent-%d" % os.getuid()


def _sha256(data: bytes) -> Any:
    """SHA-256 without loading OpenSSL when the builtin module exists (~15 ms of the fast
    path's ~70)."""
    try:
        from _sha256 import sha256  # type: ignore[import-not-found]  # Python < 3.12
    except ImportError:
        try:
            from _sha2 import sha256  # type: ignore[import-not-found,no-redef]  # 3.12+
        except ImportError:
            from hashlib import sha256  # type: ignore[assignment]
    return sha256(data)


def identity(server_id: str, device: str, user: Optional[str], password: Optional[str],
             urls: Sequence[str], operator_key: str) -> str:
    """16 hex digits naming the (broker, operator, server id, device) a master serves."""
    h = _sha256(b"remote-gevent master identity 1\0")
    for part in [server_id, device, user or "", password or "", operator_key] + list(urls):
        h.update(part.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()[:16]


def config_identity(cfg: Any, device: str) -> str:
    """:func:`identity` of a loaded :class:`~remote_gevent.console.config.ConsoleConfig`."""
    return identity(cfg.server_id, device, cfg.user, cfg.password, cfg.amqp.urls,
                    cfg.operator_key)


def socket_path(control_dir: Optional[str], server_id: str, device: str, ident: str) -> str:
    """``<control_dir>/<server_id>-<device>-<ident>.sock``; ControlError if too long."""
    path = os.path.join(control_dir or default_control_dir(),
                        "%s-%s-%s.sock" % (server_id, device, ident))
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise ControlError("control socket path too long for a Unix socket (%d > %d bytes): "
                           "%s; set a shorter control_socket_dir" % (
                               len(os.fsencode(path)), UNIX_PATH_MAX, path))
    return path


def config_socket(cfg: Any, device: str) -> str:
    """The socket of ``device``'s master for this loaded config."""
    return socket_path(cfg.control_socket_dir, cfg.server_id, device,
                       config_identity(cfg, device))


def check_dir(path: str) -> None:
    """Raise ControlError unless ``path`` is a directory of ours that nobody else may use."""
    import stat

    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise ControlError("%s is not a directory" % path)
    if st.st_uid != os.getuid():
        raise ControlError("%s belongs to uid %d, not to us (%d)" % (path, st.st_uid,
                                                                     os.getuid()))
    if st.st_mode & 0o077:
        raise ControlError("%s is accessible by others (mode %04o; expected 0700)"
                           % (path, stat.S_IMODE(st.st_mode)))


def ensure_dir(path: str) -> None:
    """Create the control directory 0700 (parents too) and check it."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise ControlError("cannot create %s: %s" % (path, exc.strerror or exc)) from None
    check_dir(path)


# --------------------------------------------------------------------------- cheap config


def _scalar(value: str) -> Tuple[bool, Optional[str]]:
    """A plain or simply quoted YAML scalar: (understood, value; None for null)."""
    if value[:1] in ("'", '"'):
        end = value.find(value[0], 1)
        rest = value[end + 1:].strip() if end > 0 else ""
        if end < 0 or "\\" in value[:end] or value[end + 1:end + 2] == value[0] or (
                rest and not rest.startswith("#")):
            return False, None
        return True, value[1:end]
    if value.startswith("#"):
        value = ""
    elif " #" in value:
        value = value.split(" #", 1)[0].rstrip()
    if value[:1] in ("{", "[", "&", "*", "|", ">", "!", "%", "@", "`"):
        return False, None
    if value in ("", "null", "~", "Null", "NULL"):
        return True, None
    return True, value


def _amqp_urls(lines: List[str]) -> Tuple[bool, Optional[List[str]]]:
    """``amqp.urls`` in block style (or one scalar): (understood, URLs; None if unset)."""
    in_amqp = seen_amqp = False
    urls: Optional[List[str]] = None
    collecting = False
    for line in lines:
        body = line.strip()
        if not body or body.startswith("#"):
            continue
        if "\t" in line[:len(line) - len(line.lstrip())]:
            return False, None
        if not line[0].isspace():
            collecting = False
            in_amqp = re.match(r"^amqp[ \t]*:[ \t]*(#.*)?$", line) is not None
            if line.startswith("amqp") and not in_amqp and re.match(r"^amqp[ \t]*:", line):
                return False, None  # flow style or anchors: not ours to guess
            if in_amqp:
                if seen_amqp:
                    return False, None
                seen_amqp = True
            continue
        if not in_amqp:
            continue
        if collecting and body.startswith("- "):
            ok, item = _scalar(body[2:].strip())
            if not ok or item is None or urls is None:
                return False, None
            urls.append(item)
            continue
        collecting = False
        m = _URLS_RE.match(body)
        if m is None:
            continue
        if urls is not None:
            return False, None
        ok, value = _scalar(m.group(1))
        if not ok:
            return False, None
        urls = [value] if value is not None else []
        collecting = value is None
    if urls is not None and not urls:
        return False, None
    return True, urls


def read_settings(config_path: Optional[str]) -> Optional[Dict[str, str]]:
    """The few settings the fast path needs, without YAML; None if unsure.

    Top-level scalars (``server_id``, ``control_socket_dir``, ``user``, ``password``,
    ``operator_key``) at column 0 and ``amqp.urls`` in block style; anything fancier for
    these keys (flow style, anchors, block scalars, escapes) returns None and the full
    path (real YAML, full validation) takes over. ``_identity`` is the master identity
    of this file for :func:`settings_socket`; ``_path`` the file read.
    """
    path = os.path.expanduser(config_path or os.environ.get(ENV_CONFIG) or DEFAULT_CONFIG)
    try:
        with open(path, "rb") as fh:
            text = fh.read().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    found: Dict[str, str] = {"_path": path}
    lines = text.splitlines()
    for line in lines:
        m = _SCALAR_RE.match(line)
        if m is None:
            continue
        key, raw = m.group(1), m.group(2)
        ok, value = _scalar(raw)
        if not ok or key in found:
            return None
        found[key] = value or ""
    ok, urls = _amqp_urls(lines)
    if not ok:
        return None
    base = os.path.dirname(os.path.abspath(path))
    key_file = os.path.expanduser(found.get("operator_key") or DEFAULT_OPERATOR_KEY)
    if not os.path.isabs(key_file):
        key_file = os.path.normpath(os.path.join(base, key_file))
    found["_urls"] = "\n".join(urls or DEFAULT_URLS)
    found["_operator_key"] = key_file
    return found


def settings_socket(settings: Dict[str, str], device: str) -> Optional[str]:
    """Socket path from :func:`read_settings` output (relative dirs: against the file's)."""
    d = settings.get("control_socket_dir") or ""
    if d:
        d = os.path.expanduser(d)
        if not os.path.isabs(d):
            d = os.path.join(os.path.dirname(os.path.abspath(settings["_path"])), d)
    server_id = settings.get("server_id") or DEFAULT_SERVER_ID
    ident = identity(server_id, device, settings.get("user") or None,
                     settings.get("password") or None, settings["_urls"].split("\n"),
                     settings["_operator_key"])
    try:
        return socket_path(d or None, server_id, device, ident)
    except ControlError:
        return None
