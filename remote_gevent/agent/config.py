"""Agent configuration: declarative keys, YAML loading and validation.

Every key of the ``amqp:`` and ``remote:`` sections (and the top-level ``ident`` /
``token`` credentials) is declared exactly once, as a dataclass field whose
metadata carries its type name, validator and help text.  Loading walks those
declarations, so the documentation (``iter_keys()``), the validation and the
resulting frozen objects can never disagree.

Validation collects *every* problem instead of stopping at the first one, so that
``remote-gevent check-config`` can list them all; each message names the file, the
dotted key and the bad value (credentials are never echoed).

Relative paths in the file are resolved against the directory of the config file.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import yaml

from remote_gevent.common import addresses
from remote_gevent.common.addresses import AddressError, BrokerURL, parse_broker_url, redact_url

DEFAULT_PATH = "/etc/alemca/config.yaml"
ENV_CONFIG = "REMOTE_GEVENT_CONFIG"

SUPPORTED_SERVER_IDS = ("fr04",)
IDENT_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
GIB = 1024 ** 3

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}


class ConfigError(Exception):
    """The configuration is unusable; ``problems`` lists every reason, one per line."""

    def __init__(self, problems: List[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class Invalid(ValueError):
    """Raised by a validator: the message says what is expected.

    ``where`` (e.g. ``"[2]"``) and ``value`` narrow the problem to one item of a list
    or map, so the error names ``remote.allow[2]`` and that item's value.
    """

    def __init__(self, message: str, where: str = "", value: Any = None,
                 has_value: bool = False) -> None:
        super().__init__(message)
        self.where = where
        self.value = value
        self.has_value = has_value


def _item_error(exc: Invalid, where: str, value: Any) -> Invalid:
    return Invalid(str(exc), where=where, value=value, has_value=True)


# --------------------------------------------------------------------------- validators
# A validator receives the raw YAML value and the directory of the config file and
# returns the normalised value, or raises Invalid.

Validator = Callable[[Any, str], Any]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def v_bool(value: Any, base: str) -> bool:
    if not isinstance(value, bool):
        raise Invalid("expected true or false")
    return value


def v_int(minimum: int, maximum: Optional[int] = None) -> Validator:
    def check(value: Any, base: str) -> int:
        if not _is_int(value):
            raise Invalid("expected an integer")
        if value < minimum or (maximum is not None and value > maximum):
            upper = "" if maximum is None else " and <= %d" % maximum
            raise Invalid("expected an integer >= %d%s" % (minimum, upper))
        return int(value)

    return check


def v_float(minimum: float, maximum: Optional[float] = None) -> Validator:
    """A number of seconds in (minimum, maximum]."""

    def check(value: Any, base: str) -> float:
        if not (_is_int(value) or isinstance(value, float)):
            raise Invalid("expected a number of seconds")
        if value < minimum or (maximum is not None and value > maximum):
            upper = "" if maximum is None else " and <= %g" % maximum
            raise Invalid("expected a number >= %g%s" % (minimum, upper))
        return float(value)

    return check


def v_str(value: Any, base: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise Invalid("expected a non-empty string")
    return value


def v_matching(pattern: "re.Pattern[str]", message: str) -> Validator:
    """An optional string (None stays None) that ``pattern`` must match."""
    def check(value: Any, base: str) -> Optional[str]:
        if value is None:
            return None
        if not isinstance(value, str) or not pattern.match(value):
            raise Invalid(message)
        return value
    return check


v_ident = v_matching(IDENT_RE, "expected 1 to 64 characters among A-Z a-z 0-9 _ -")


def v_token(value: Any, base: str) -> Optional[str]:
    if value is None:
        return None
    if _is_int(value):  # an all-digits token written without quotes
        value = str(value)
    if not isinstance(value, str) or not value:
        raise Invalid("expected a non-empty string")
    return value


def _resolve(path: str, base: str) -> str:
    path = os.path.expanduser(path)
    if not os.path.isabs(path):
        path = os.path.normpath(os.path.join(base, path))
    return path


def v_path(value: Any, base: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise Invalid("expected a file path")
    return _resolve(value, base)


def v_opt_path(value: Any, base: str) -> Optional[str]:
    if value is None:
        return None
    return v_path(value, base)


def v_opt_existing_file(value: Any, base: str) -> Optional[str]:
    """An optional path that must name a readable file when set (CA, certificate)."""
    if value is None:
        return None
    path = v_path(value, base)
    if not os.path.isfile(path):
        raise Invalid("file does not exist")
    if not os.access(path, os.R_OK):
        raise Invalid("file is not readable")
    return path


def v_server_id(value: Any, base: str) -> str:
    if value not in SUPPORTED_SERVER_IDS:
        raise Invalid("unsupported server id; supported: %s" % ", ".join(SUPPORTED_SERVER_IDS))
    return value


def parse_amqp_url(url: str) -> BrokerURL:
    """The broker URL parser the AMQP link uses (one set of rules); raises Invalid."""
    try:
        return parse_broker_url(url)
    except AddressError as exc:
        raise Invalid(str(exc)) from None


def v_urls(value: Any, base: str) -> Tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise Invalid("expected a non-empty list of amqps:// URLs")
    for i, url in enumerate(value):
        try:
            parse_amqp_url(url)
        except Invalid as exc:  # the value shown without any user:password@
            raise _item_error(exc, "[%d]" % i, redact_url(url)) from None
    return tuple(value)


def split_host_port(value: str, wildcard_port: bool = False) -> Tuple[str, Optional[int]]:
    """:func:`addresses.split_host_port` raising Invalid (port None means ``*``)."""
    try:
        return addresses.split_host_port(value, wildcard_port)
    except AddressError as exc:
        raise Invalid(str(exc)) from None


def v_allow(value: Any, base: str) -> Tuple[str, ...]:
    if not isinstance(value, list):
        raise Invalid("expected a list of host:port (port may be *)")
    for i, item in enumerate(value):
        try:
            split_host_port(item, wildcard_port=True)
        except Invalid as exc:
            raise _item_error(exc, "[%d]" % i, item) from None
    return tuple(value)


def v_relays(value: Any, base: str) -> Mapping[str, str]:
    if not isinstance(value, dict) or not value:
        raise Invalid("expected a map server_id: host:port")
    for sid, addr in value.items():
        if not isinstance(sid, str):
            raise Invalid("server ids must be strings", where=".%s" % (sid,), value=sid,
                          has_value=True)
        try:
            split_host_port(addr)
        except Invalid as exc:
            raise _item_error(exc, ".%s" % sid, addr) from None
    return MappingProxyType(dict(value))


def parse_size(value: Any) -> int:
    """Bytes from an int or a string like ``512M`` / ``4GiB`` (binary units)."""
    if _is_int(value):
        if value <= 0:
            raise Invalid("expected a positive size")
        return int(value)
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m and len(m.group(1)) <= 30:  # int() refuses over 4300 digits (ValueError)
            size = int(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]
            if size > 0:
                return size
    raise Invalid("expected a positive size in bytes (or with K/M/G/T suffix)")


# --------------------------------------------------------------------------- declarations


def key(default: Any, validator: Validator, type_name: str, help: str,
        secret: bool = False) -> Any:
    """Declare one config key: its default, validator, type (for docs) and help text."""
    meta = {"validator": validator, "type": type_name, "help": help, "secret": secret}
    if isinstance(default, (list, dict)):
        frozen = tuple(default) if isinstance(default, list) else MappingProxyType(default)
        return field(default_factory=lambda: frozen, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class TransferRoot:
    path: str
    mode: str = "ro"
    max_size: Optional[int] = None
    allow_hardlinks: bool = False          # serve/replace files with a link count > 1
    partial_quota: Optional[int] = None    # bytes partial uploads may hold in this root

    @property
    def writable(self) -> bool:
        return self.mode == "rw"


def v_roots(value: Any, base: str) -> Tuple[TransferRoot, ...]:
    # Per-item problems are reported by _validate_transfer with precise keys;
    # this only runs for the shape.
    if not isinstance(value, list):
        raise Invalid("expected a list of {path, mode: ro|rw, max_size}")
    return tuple(value)


def v_size(value: Any, base: str) -> int:
    return parse_size(value)


def v_opt_size(value: Any, base: str) -> Optional[int]:
    return None if value is None else parse_size(value)


def v_buffer_budget(value: Any, base: str) -> int:
    """A session's receive buffer budget: at least 1 MiB (mux_limits.MIN_BUFFER_BUDGET)."""
    size = parse_size(value)
    if size < 1 << 20:
        raise Invalid("expected a size of at least 1M")
    return size


@dataclass(frozen=True)
class TransferConfig:
    roots: Tuple[TransferRoot, ...] = key(
        [], v_roots, "list",
        "directories the operator may read (ro) or write (rw) with @transfer/@sftp; "
        "each item {path, mode: ro|rw, max_size, partial_quota, allow_hardlinks (serve or "
        "replace files with more than one hard link; default false)}; empty: transfer disabled")
    max_size: int = key(
        4 * GIB, v_size, "size", "largest file accepted or sent, in bytes (K/M/G/T suffix ok)")
    overwrite: bool = key(
        False, v_bool, "bool", "allow an upload to replace an existing file")
    partial_ttl: int = key(
        86400, v_int(600, 366 * 86400), "int s",
        "remove a partial upload (.rgpart) untouched for this long; resume works until then")
    partial_quota: Optional[int] = key(
        None, v_opt_size, "size|null",
        "most bytes partial uploads may hold in one rw root (a root's own partial_quota "
        "wins); null: twice the root's max_size")


@dataclass(frozen=True)
class AmqpConfig:
    urls: Tuple[str, ...] = key(
        ["amqps://localhost:5671/"], v_urls, "list of URL",
        "broker URLs amqps://host:port/vhost, tried in turn; amqp:// only to loopback")
    ca_file: Optional[str] = key(
        None, v_opt_existing_file, "path|null",
        "CA bundle that signs the broker certificate; null: the system store")
    cert_file: Optional[str] = key(
        None, v_opt_existing_file, "path|null", "optional TLS client certificate (PEM)")
    key_file: Optional[str] = key(
        None, v_opt_existing_file, "path|null", "private key of cert_file (PEM)")
    heartbeat: int = key(30, v_int(0, 3600), "int s", "AMQP heartbeat in seconds (0: off)")
    connect_timeout: float = key(
        10.0, v_float(0.001, 600), "float s", "TCP+TLS+AMQP connect timeout in seconds")
    reconnect_max_delay: float = key(
        60.0, v_float(0.001, 3600), "float s", "cap of the reconnect backoff in seconds")


@dataclass(frozen=True)
class RemoteConfig:
    enabled: bool = key(
        False, v_bool, "bool", "false: the agent logs that the plugin is disabled and exits 0")
    server_id: str = key(
        "fr04", v_server_id, "str", "platform the device belongs to; only fr04 is supported")
    health_check: int = key(
        600, v_int(1, 86400), "int s", "seconds between two alive messages")
    max_session: int = key(
        10, v_int(1, 10000), "int", "simultaneous tunnels; further requests wait for a slot")
    max_session_per_operator: int = key(
        0, v_int(0, 10000), "int",
        "sessions (running + waiting) one operator may hold; more are refused "
        "operator_limit; 0: half of max_session (at least 1) when several operators are "
        "trusted, no cap when only one is")
    operator_rate: int = key(
        60, v_int(0, 100000), "int /min",
        "session requests one operator may make per minute (token bucket); more are "
        "refused operator_rate_limited; 0: no limit")
    operator_burst: int = key(
        30, v_int(1, 100000), "int", "requests one operator may make at once before "
        "operator_rate applies (the bucket's size)")
    key_path: str = key(
        "/etc/alemca/remote_ed25519", v_path, "path",
        "ED25519 identity key (OpenSSH format, mode 0600), generated if missing")
    history_path: str = key(
        "/var/lib/alemca/remote_history.csv", v_path, "path", "append-only CSV session history")
    authorized_keys: str = key(
        "/etc/alemca/remote_authorized_keys", v_path, "path",
        "trusted operator keys (ssh-ed25519 lines, optional permitopen=)")
    allow: Tuple[str, ...] = key(
        ["127.0.0.1:22"], v_allow, "list of host:port",
        "targets this device may open; port * is a wildcard")
    relays: Mapping[str, str] = key(
        {"fr04": "relay.fr04.alemca.net:8443"}, v_relays, "map",
        "relay (exit node) host:port per server id")
    relay_ca_file: Optional[str] = key(
        None, v_opt_existing_file, "path|null",
        "CA for the relay certificate; null: amqp.ca_file")
    idle_timeout: int = key(
        1800, v_int(1), "int s", "close a session without traffic for this long")
    ack_timeout: int = key(
        60, v_int(1), "int s", "close a session whose peer stopped acknowledging")
    keepalive_interval: int = key(
        15, v_int(1, 3600), "int s", "tunnel keepalive ping period")
    queue_timeout: int = key(
        60, v_int(1, 3600), "int s", "longest wait for a free session slot")
    max_streams_per_session: int = key(
        256, v_int(1, 100000), "int",
        "streams one session may have open; more are refused too_many_streams")
    max_streams: int = key(
        512, v_int(1, 1000000), "int",
        "streams open on the device, all sessions together (one fd each); more are "
        "refused too_many_streams")
    max_buffered_per_session: int = key(
        16 << 20, v_buffer_budget, "size",
        "bytes a session may hold queued for slow local sockets, frame overhead "
        "included (>= 1M); a stream that would exceed it is reset")
    key_rotation_days: int = key(
        0, v_int(0, 36500), "int days", "rotate the identity key this often; 0: never")
    transfer: TransferConfig = key(
        TransferConfig(), lambda v, b: v, "map", "targeted file transfer: roots, max_size, "
        "overwrite")


@dataclass(frozen=True)
class AgentConfig:
    path: str
    ident: Optional[str] = key(
        None, v_ident, "str", "device identity and broker user ([A-Za-z0-9_-]{1,64})")
    token: Optional[str] = key(
        None, v_token, "str", "broker password (never logged)", secret=True)
    amqp: AmqpConfig = field(default_factory=AmqpConfig)
    remote: RemoteConfig = field(default_factory=RemoteConfig)
    warnings: Tuple[str, ...] = ()

    def __repr__(self) -> str:  # never show the token
        return "AgentConfig(path=%r, ident=%r, server_id=%r, enabled=%r)" % (
            self.path, self.ident, self.remote.server_id, self.remote.enabled)

    @property
    def topic(self) -> str:
        return topic(self)


SECTIONS = (("amqp", AmqpConfig), ("remote", RemoteConfig))
TOP_LEVEL_KEYS = ("ident", "token")


def _declared(cls: type) -> List[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "validator" in f.metadata]


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def iter_keys() -> Iterator[Tuple[str, str, Any, str]]:
    """Yield (dotted key, type, default, help) for every key: the reference docs."""
    for f in _declared(AgentConfig):
        yield f.name, f.metadata["type"], _default(f), f.metadata["help"]
    for section, cls in SECTIONS:
        for f in _declared(cls):
            yield "%s.%s" % (section, f.name), f.metadata["type"], _default(f), f.metadata["help"]
    for f in _declared(TransferConfig):
        yield "remote.transfer.%s" % f.name, f.metadata["type"], _default(f), f.metadata["help"]


# --------------------------------------------------------------------------- loading


def default_path() -> str:
    """``$REMOTE_GEVENT_CONFIG`` if set and non-empty, else ``/etc/alemca/config.yaml``."""
    return os.environ.get(ENV_CONFIG) or DEFAULT_PATH


def topic(cfg: AgentConfig) -> str:
    """The device's topic: ``remote.<server_id>.<ident>``."""
    return "remote.%s.%s" % (cfg.remote.server_id, cfg.ident)


class _Problems:
    def __init__(self, path: str) -> None:
        self.path = path
        self.items: List[str] = []

    def add(self, dotted: str, message: str, value: Any = dataclasses.MISSING,
            secret: bool = False) -> None:
        if value is dataclasses.MISSING:
            self.items.append("%s: %s: %s" % (self.path, dotted, message))
            return
        shown = "<redacted %s>" % type(value).__name__ if secret else repr(value)
        self.items.append("%s: %s: %s (got %s)" % (self.path, dotted, message, shown))


def _build(cls: type, section: str, raw: Any, base: str, problems: _Problems,
           skip: Tuple[str, ...] = ()) -> Dict[str, Any]:
    """Validate a mapping against the declared fields of ``cls``; return kwargs."""
    values: Dict[str, Any] = {}
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.add(section, "expected a mapping of keys", raw)
        return values
    declared = {f.name: f for f in _declared(cls)}
    for name in raw:
        if name not in declared:
            problems.add("%s.%s" % (section, name),
                         "unknown key; known keys: %s" % ", ".join(sorted(declared)),
                         raw[name])
    for name, f in declared.items():
        if name in skip or name not in raw:
            continue
        try:
            values[name] = f.metadata["validator"](raw[name], base)
        except Invalid as exc:
            problems.add("%s.%s%s" % (section, name, exc.where), str(exc),
                         exc.value if exc.has_value else raw[name], f.metadata["secret"])
    return values


def _build_transfer(raw: Any, base: str, problems: _Problems) -> TransferConfig:
    prefix = "remote.transfer"
    values = _build(TransferConfig, prefix, raw, base, problems, skip=("roots",))
    roots: List[TransferRoot] = []
    raw_roots = raw.get("roots", []) if isinstance(raw, dict) else []
    if raw_roots is None:
        raw_roots = []
    if not isinstance(raw_roots, list):
        problems.add(prefix + ".roots", "expected a list of {path, mode: ro|rw, max_size}",
                     raw_roots)
        raw_roots = []
    for i, item in enumerate(raw_roots):
        where = "%s.roots[%d]" % (prefix, i)
        if not isinstance(item, dict):
            problems.add(where, "expected a mapping {path, mode, max_size}", item)
            continue
        known = ("allow_hardlinks", "max_size", "mode", "partial_quota", "path")
        for extra in sorted(set(item) - set(known), key=str):  # keys 1 and "a" in one item
            problems.add("%s.%s" % (where, extra), "unknown key; known keys: "
                         + ", ".join(known), item[extra])
        ok = True
        try:
            path = v_path(item.get("path"), base)
        except Invalid as exc:
            problems.add(where + ".path", str(exc), item.get("path"))
            ok = False
        mode = item.get("mode", "ro")
        if mode not in ("ro", "rw"):
            problems.add(where + ".mode", "expected ro or rw", mode)
            ok = False
        sizes: Dict[str, Optional[int]] = {"max_size": None, "partial_quota": None}
        for name in sizes:
            if item.get(name) is not None:
                try:
                    sizes[name] = parse_size(item[name])
                except Invalid as exc:
                    problems.add("%s.%s" % (where, name), str(exc), item[name])
                    ok = False
        allow_hardlinks = item.get("allow_hardlinks", False)
        if not isinstance(allow_hardlinks, bool):
            problems.add(where + ".allow_hardlinks", "expected true or false", allow_hardlinks)
            ok = False
        if ok:
            roots.append(TransferRoot(path=path, mode=mode, max_size=sizes["max_size"],
                                      allow_hardlinks=allow_hardlinks,
                                      partial_quota=sizes["partial_quota"]))
    values["roots"] = tuple(roots)
    return TransferConfig(**values)


def parse(data: Any, path: str) -> AgentConfig:
    """Validate already-parsed YAML ``data`` read from ``path``; raise ConfigError."""
    problems = _Problems(path)
    base = os.path.dirname(os.path.abspath(path))
    warnings: List[str] = []
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(["%s: expected a YAML mapping at the top level (got %s)"
                           % (path, type(data).__name__)])

    top: Dict[str, Any] = {}
    for f in _declared(AgentConfig):
        if f.name in data:
            try:
                top[f.name] = f.metadata["validator"](data[f.name], base)
            except Invalid as exc:
                problems.add(f.name, str(exc), data[f.name], f.metadata["secret"])

    amqp_kw = _build(AmqpConfig, "amqp", data.get("amqp"), base, problems)
    raw_remote = data.get("remote")
    remote_kw = _build(RemoteConfig, "remote", raw_remote, base, problems, skip=("transfer",))
    if isinstance(raw_remote, dict) and raw_remote.get("transfer") is not None:
        remote_kw["transfer"] = _build_transfer(raw_remote["transfer"], base, problems)

    amqp = AmqpConfig(**amqp_kw)
    remote = RemoteConfig(**remote_kw)

    # Cross-key rules.
    if (amqp.cert_file is None) != (amqp.key_file is None):
        problems.add("amqp.key_file" if amqp.key_file is None else "amqp.cert_file",
                     "cert_file and key_file go together")
    bad_server_id = isinstance(raw_remote, dict) and "server_id" in raw_remote \
        and "server_id" not in remote_kw
    if not bad_server_id and remote.server_id not in remote.relays:
        problems.add("remote.relays", "no relay for server_id %s" % remote.server_id,
                     dict(remote.relays))
    if remote.enabled:
        if not top.get("ident"):
            if "ident" not in data:
                problems.add("ident", "required when remote.enabled is true (missing)")
            elif data.get("ident") is None:
                problems.add("ident", "required when remote.enabled is true", None)
        if not top.get("token"):
            if "token" not in data:
                problems.add("token", "required when remote.enabled is true (missing)")
            elif data.get("token") is None:
                problems.add("token", "required when remote.enabled is true", None)
    for url in amqp.urls:
        try:
            if parse_amqp_url(url)[0] == "amqp":
                warnings.append("%s: amqp.urls: %s is not encrypted (loopback only)" % (path, url))
        except Invalid:
            pass
    if remote.relay_ca_file is None and amqp.ca_file is not None:
        remote = dataclasses.replace(remote, relay_ca_file=amqp.ca_file)

    if problems.items:
        raise ConfigError(problems.items)
    return AgentConfig(path=path, amqp=amqp, remote=remote, warnings=tuple(warnings), **top)


def read_document(path: str) -> Any:
    """The YAML document in ``path``: ConfigError naming the file when it cannot be read
    or is not YAML. FileNotFoundError is left to the caller (agent and console word it
    differently)."""
    try:
        with open(path, "rb") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ConfigError([_unreadable(path, exc)]) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(["%s: invalid YAML: %s" % (path, " ".join(str(exc).split()))]) \
            from None


def _unreadable(path: str, exc: OSError) -> str:
    return "%s: cannot read config file: %s" % (path, exc.strerror or exc)


def load(path: Optional[str] = None) -> AgentConfig:
    """Read and validate the config file (default: ``default_path()``)."""
    if path is None:
        path = default_path()
    try:
        data = read_document(path)
    except FileNotFoundError as exc:
        raise ConfigError([_unreadable(path, exc)]) from None
    return parse(data, path)


def summary(cfg: AgentConfig) -> str:
    """One line for ``check-config`` and start-up logs (no credentials)."""
    return ("%s: OK ident=%s server_id=%s topic=%s enabled=%s brokers=%d max_session=%d "
            "allow=%d transfer_roots=%d" % (
                cfg.path, cfg.ident or "-", cfg.remote.server_id,
                topic(cfg) if cfg.ident else "-", "true" if cfg.remote.enabled else "false",
                len(cfg.amqp.urls), cfg.remote.max_session, len(cfg.remote.allow),
                len(cfg.remote.transfer.roots)))
