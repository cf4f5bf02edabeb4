"""Operator console configuration (``console.yaml``) and the console's exit codes.

Keys are declared once, with the shared machinery (:func:`remote_gevent.common.configschema.key`:
default, validator, type, help), so validation, defaults and ``iter_keys()`` cannot
disagree. Every problem is collected and reported at once, each message naming the
file, the dotted key and the bad value (the password is never echoed).

Default location ``~/.config/remote-gevent/console.yaml``; ``-c/--config`` or the
environment variable ``REMOTE_GEVENT_CONSOLE_CONFIG`` override it. Relative paths in
the file — and the defaults of ``operator_key``, ``known_devices`` and ``state_file`` —
are resolved against the directory of the config file, so one directory holds an
operator's whole console state (the demo platform relies on that).

Unlike the agent's file (shared with other plugins), this file is ours alone: unknown
top-level keys are refused too.

This module is imported by every console command, so it stays light (no gevent, no
amqp, no crypto) and also carries :class:`ConsoleError` and the exit codes.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, Optional, Tuple, Union

from remote_gevent.common.configschema import (
    AmqpConfig,
    ConfigError,
    Invalid,
    build_section,
    check_amqp,
    top_mapping,
    declared_fields,
    field_default,
    Problems,
    key,
    read_document,
    split_host_port,
    v_float,
    v_int,
    v_matching,
    v_opt_existing_file,
    v_opt_path,
    v_path,
    v_server_id,
    v_token,
    v_urls,
)

__all__ = ["ConfigError", "ConsoleConfig", "ConsoleError", "load", "default_path"]

ENV_CONFIG = "REMOTE_GEVENT_CONSOLE_CONFIG"
DEFAULT_DIR = os.path.join("~", ".config", "remote-gevent")
DEFAULT_PATH = os.path.join(DEFAULT_DIR, "console.yaml")

#: Relays of the supported platforms (``relay: null`` picks the server id's one).
DEFAULT_RELAYS = {"fr04": "relay.fr04.alemca.net:8443"}

_USER_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,128}$")
_QUEUE_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")

# Exit codes are defined in remote_gevent.wire.codes (master.py needs them without
# importing this module); the console's modules import them from here.
from remote_gevent.wire.codes import (  # noqa: E402,F401
    EXIT_BROKER,
    EXIT_CONFIG,
    EXIT_CONNECTION,
    EXIT_ERROR,
    EXIT_INTEGRITY,
    EXIT_INTERRUPTED,
    EXIT_KEY,
    EXIT_LOGIN,
    EXIT_NAMES,
    EXIT_NO_SPACE,
    EXIT_OFFLINE,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_RELAY,
    EXIT_USAGE,
)


class ConsoleError(Exception):
    """An expected failure: one line for stderr and the exit code to leave with."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR, code: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.code = code  # machine-readable reason (refusal code, close code, ...)


# --------------------------------------------------------------------------- validators


v_user = v_matching(_USER_RE, "expected a broker user name (1-128 of A-Z a-z 0-9 _ . @ -)")


#: Relays in a console's pool: the bound of a signed ``relay_pool`` (docs/protocol.md §4).
MAX_RELAYS = 8


def _one_relay(value: Any, where: str = "") -> str:
    try:
        if not isinstance(value, str) or len(value) > 255:
            raise Invalid("too long")
        split_host_port(value)
    except Invalid:
        raise Invalid("expected host:port (IPv6 as [addr]:port)", where, value,
                      bool(where)) from None
    return value


def v_relay(value: Any, base: str) -> Union[None, str, Tuple[str, ...]]:
    """One relay (``host:port``) or a pool (a list of 1..8 of them, issue 13)."""
    if value is None or isinstance(value, str):
        return None if value is None else _one_relay(value)
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_RELAYS:
        raise Invalid("expected host:port or a list of 1..%d of them" % MAX_RELAYS)
    pool = tuple(_one_relay(item, "[%d]" % i) for i, item in enumerate(value))
    if len({r.lower() for r in pool}) != len(pool):
        raise Invalid("a relay is listed twice")
    return pool


v_queue = v_matching(_QUEUE_RE, "expected a queue name ([A-Za-z0-9_.:-]{1,200})")


def v_cipher(value: Any, base: str) -> str:
    if value not in ("aes256gcm", "xchacha20poly1305"):
        raise Invalid("expected aes256gcm or xchacha20poly1305")
    return value


# --------------------------------------------------------------------------- declarations


@dataclass(frozen=True)
class ConsoleAmqpConfig(AmqpConfig):
    """The agent's ``amqp:`` keys; only two defaults differ for an operator's machine."""

    urls: Tuple[str, ...] = key(
        ["amqps://broker.fr04.alemca.net:5671/"], v_urls, "list of URL",
        "broker URLs amqps://host:port/vhost, tried in turn; amqp:// only to loopback")
    reconnect_max_delay: float = key(
        30.0, v_float(0.001, 3600), "float s", "cap of the reconnect backoff (watch)")


@dataclass(frozen=True)
class ConsoleConfig:
    path: str
    server_id: str = key(
        "fr04", v_server_id, "str", "platform of the devices; only fr04 is supported")
    user: Optional[str] = key(None, v_user, "str", "operator's broker user")
    password: Optional[str] = key(
        None, v_token, "str", "operator's broker password (never logged)", secret=True)
    operator_key: str = key(
        "operator_ed25519", v_path, "path",
        "operator ED25519 key (made by `keygen`); relative to this file's directory")
    operator_cert: Optional[str] = key(
        None, v_opt_path, "path|null",
        "OpenSSH certificate of the operator key (ssh-keygen -s); null: <operator_key>"
        "-cert.pub when that file exists, as ssh does")
    known_devices: str = key(
        "known_devices", v_path, "path",
        "pinned device keys (like ssh known_hosts); relative to this file's directory")
    state_file: str = key(
        "devices.json", v_path, "path",
        "last alive / fingerprint / health_check per device (devices, watch)")
    relay: Union[None, str, Tuple[str, ...]] = key(
        None, v_relay, "host:port|list|null",
        "relay (exit node), or a pool of up to 8: each session uses one picked at random "
        "among those not seen down in the last 60 s, and resumes on another of the pool if "
        "it dies (docs/operations.md, Relays); null: the server id's relay")
    relay_ca_file: Optional[str] = key(
        None, v_opt_existing_file, "path|null", "CA of the relay certificate; null: amqp.ca_file")
    status_queue: Optional[str] = key(
        None, v_queue, "str|null",
        "durable per-operator queue of alive/key/close messages; null: console.<user>.status")
    status_queue_max_length: int = key(
        10000, v_int(10, 10000000), "int", "bound of the status queue (oldest dropped)")
    status_queue_ttl: int = key(
        86400, v_int(60, 30 * 86400), "int s", "status messages older than this are dropped")
    reply_timeout: float = key(
        15.0, v_float(0.5, 300), "float s",
        "wait for the device's first answer (queued/accept/refuse); none: device offline")
    queue_wait: float = key(
        300.0, v_float(1, 3600), "float s", "longest wait for an accept once queued")
    request_ttl: int = key(
        60, v_int(5, 300), "int s", "validity of a signed request (exp - iat)")
    relay_timeout: float = key(
        10.0, v_float(0.5, 300), "float s", "TCP + TLS + hello bound for the relay dial")
    cipher: str = key(
        "aes256gcm", v_cipher, "str", "preferred AEAD (the agent falls back to xchacha20poly1305)")
    keepalive_interval: float = key(
        15.0, v_float(0, 3600), "float s", "tunnel keepalive ping period (0: off)")
    resume_timeout: float = key(
        600.0, v_float(0, 86400), "float s",
        "how long a session waits for its relay path to come back (resume); then it ends "
        "link_lost. 0: no resume (resume also needs keepalive_interval > 0)")
    control_socket_dir: Optional[str] = key(
        None, v_opt_path, "path|null",
        "directory (0700) of the session reuse sockets of `master` (docs/console.md); null: "
        "$XDG_RUNTIME_DIR/remote-gevent, else /tmp/remote-gevent-<uid>")
    amqp: ConsoleAmqpConfig = field(default_factory=ConsoleAmqpConfig)
    warnings: Tuple[str, ...] = ()

    def __repr__(self) -> str:  # never show the password
        return "ConsoleConfig(path=%r, user=%r, server_id=%r)" % (
            self.path, self.user, self.server_id)

    @property
    def relay_pool(self) -> Tuple[str, ...]:
        """The configured relays in their configured order (one, or a pool)."""
        if isinstance(self.relay, tuple):
            return self.relay
        return (self.relay or DEFAULT_RELAYS[self.server_id],)

    @property
    def relay_address(self) -> str:
        """The first relay (``doctor``, the demo): sessions pick their own (relay_pool)."""
        return self.relay_pool[0]

    @property
    def relay_host_port(self) -> Tuple[str, int]:
        host, port = split_host_port(self.relay_address)
        assert port is not None
        return host, port

    @property
    def status_queue_name(self) -> str:
        return self.status_queue or "console.%s.status" % (self.user or "operator")

    def topic(self, device: str) -> str:
        return "remote.%s.%s" % (self.server_id, device)

    def require_broker(self) -> None:
        """Raise ConfigError unless the broker login is configured."""
        missing = [k for k in ("user", "password") if not getattr(self, k)]
        if missing:
            raise ConfigError(["%s: %s: required to talk to the broker (missing)"
                               % (self.path, k) for k in missing])


def iter_keys() -> Iterator[Tuple[str, str, Any, str]]:
    """(dotted key, type, default, help) of every console key: the reference docs."""
    for f in declared_fields(ConsoleConfig):
        yield f.name, f.metadata["type"], field_default(f), f.metadata["help"]
    for f in declared_fields(ConsoleAmqpConfig):
        yield "amqp.%s" % f.name, f.metadata["type"], field_default(f), f.metadata["help"]


# --------------------------------------------------------------------------- loading


def default_path() -> str:
    """``$REMOTE_GEVENT_CONSOLE_CONFIG`` if set, else ``~/.config/remote-gevent/console.yaml``."""
    return os.path.expanduser(os.environ.get(ENV_CONFIG) or DEFAULT_PATH)


_PATH_DEFAULTS = ("operator_key", "known_devices", "state_file")


def parse(data: Any, path: str) -> ConsoleConfig:
    """Validate parsed YAML ``data`` read from ``path``; raise ConfigError listing every problem."""
    problems = Problems(path)
    base = os.path.dirname(os.path.abspath(path))
    data = top_mapping(data, path)
    top = _parse_top(data, base, problems)
    amqp = ConsoleAmqpConfig(**build_section(ConsoleAmqpConfig, "amqp", data.get("amqp"), base,
                                             problems))
    warnings = check_amqp(amqp, path, problems)
    server_id = top.get("server_id", "fr04")
    if top.get("relay") is None and server_id not in DEFAULT_RELAYS:
        problems.add("relay", "no default relay for server_id %s; set relay: host:port"
                     % server_id)
    if top.get("relay_ca_file") is None and amqp.ca_file is not None:
        top["relay_ca_file"] = amqp.ca_file
    if problems.items:
        raise ConfigError(problems.items)
    return ConsoleConfig(path=path, amqp=amqp, warnings=warnings, **top)


def _parse_top(data: Dict[str, Any], base: str, problems: Problems) -> Dict[str, Any]:
    """The top-level keys (all but ``amqp``), validated; paths default beside ``base``."""
    declared = {f.name: f for f in declared_fields(ConsoleConfig)}
    known = sorted(list(declared) + ["amqp"])
    top: Dict[str, Any] = {}
    for name, value in data.items():
        if name == "amqp":
            continue
        f = declared.get(name)
        if f is None:
            problems.add(str(name), "unknown key; known keys: %s" % ", ".join(known), value)
            continue
        try:
            top[name] = f.metadata["validator"](value, base)
        except Invalid as exc:
            problems.add(name + exc.where, str(exc), exc.value if exc.has_value else value,
                         f.metadata["secret"])
    for name in _PATH_DEFAULTS:
        if name not in data:
            top[name] = v_path(field_default(declared[name]), base)
    return top


def load(path: Optional[str] = None, allow_missing: bool = False) -> ConsoleConfig:
    """Read and validate the console config (default :func:`default_path`).

    ``allow_missing``: a missing file gives the defaults (``keygen`` works before the
    file exists); any other read problem is still an error.
    """
    if path is None:
        path = default_path()
    try:
        data = read_document(path)
    except FileNotFoundError:
        if allow_missing:
            return parse({}, path)
        raise ConfigError(["%s: console config not found (create it from conf/console.yaml, "
                           "or pass -c PATH / set %s)" % (path, ENV_CONFIG)]) from None
    return parse(data, path)


def replace(cfg: ConsoleConfig, **changes: Any) -> ConsoleConfig:
    """A copy of ``cfg`` with some keys changed (tests, command-line overrides)."""
    return dataclasses.replace(cfg, **changes)
