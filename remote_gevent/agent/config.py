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

import dataclasses
import os
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

from remote_gevent.common.configschema import (
    v_server_id,
    AmqpConfig,
    ConfigError,
    GIB,
    Invalid,
    Problems,
    build_section,
    check_amqp,
    top_mapping,
    declared_fields,
    field_default,
    item_error,
    key,
    parse_size,
    read_document,
    split_host_port,
    unreadable,
    v_bool,
    v_int,
    v_matching,
    v_opt_existing_file,
    v_opt_size,
    v_opt_path,
    v_path,
    v_size,
    v_token,
)

DEFAULT_PATH = "/etc/alemca/config.yaml"
ENV_CONFIG = "REMOTE_GEVENT_CONFIG"

IDENT_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
v_ident = v_matching(IDENT_RE, "expected 1 to 64 characters among A-Z a-z 0-9 _ -")


def v_allow(value: Any, base: str) -> Tuple[str, ...]:
    if not isinstance(value, list):
        raise Invalid("expected a list of host:port (port may be *)")
    for i, item in enumerate(value):
        try:
            split_host_port(item, wildcard_port=True)
        except Invalid as exc:
            raise item_error(exc, "[%d]" % i, item) from None
    return tuple(value)


def v_relays(value: Any, base: str) -> Mapping[str, Any]:
    """server_id -> ``host:port``, or a list of them (a relay pool: the agent accepts
    any of them that a request names; agent/relay_accept.py)."""
    if not isinstance(value, dict) or not value:
        raise Invalid("expected a map server_id: host:port (or a list of host:port)")
    out: Dict[str, Any] = {}
    for sid, addr in value.items():
        if not isinstance(sid, str):
            raise Invalid("server ids must be strings", where=".%s" % (sid,), value=sid,
                          has_value=True)
        if isinstance(addr, list):
            if not addr:
                raise Invalid("empty relay list", where=".%s" % sid, value=addr,
                              has_value=True)
            for i, item in enumerate(addr):
                try:
                    split_host_port(item)
                except Invalid as exc:
                    raise item_error(exc, ".%s[%d]" % (sid, i), item) from None
            out[sid] = tuple(addr)
            continue
        try:
            split_host_port(addr)
        except Invalid as exc:
            raise item_error(exc, ".%s" % sid, addr) from None
        out[sid] = addr
    return MappingProxyType(out)


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


def v_roots(value: Any, base: str) -> "Tuple[TransferRoot, ...]":
    # Per-item problems are reported by _validate_transfer with precise keys;
    # this only runs for the shape.
    if not isinstance(value, list):
        raise Invalid("expected a list of {path, mode: ro|rw, max_size}")
    return tuple(value)


def v_buffer_budget(value: Any, base: str) -> int:
    """A session's receive buffer budget: at least 1 MiB (mux_limits.MIN_BUFFER_BUDGET)."""
    size = parse_size(value)
    if size < 1 << 20:
        raise Invalid("expected a size of at least 1M")
    return size


@dataclass(frozen=True)
class TransferConfig:
    roots: "Tuple[TransferRoot, ...]" = key(
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
class RemoteConfig:
    enabled: bool = key(
        False, v_bool, "bool", "false: the agent logs that the plugin is disabled and exits 0")
    server_id: str = key(
        "fr04", v_server_id, "str", "platform the device belongs to; only fr04 is supported")
    health_check: int = key(
        600, v_int(1, 86400), "int s", "seconds between two alive messages")
    metrics_textfile: Optional[str] = key(
        None, v_opt_path, "path|null", "node-exporter textfile (*.prom) rewritten at every "
        "alive with the agent's counters; null: none")
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
        "trusted operator keys (ssh-ed25519 lines, optional permitopen=; cert-authority "
        "lines for operator certificates)")
    revoked_keys: Optional[str] = key(
        None, v_opt_path, "path|null",
        "revoked operator keys and certificates: an OpenSSH KRL (ssh-keygen -k) or a list "
        "of public keys; re-read on change and SIGHUP; unreadable: nobody is trusted")
    fleet_revocation_path: str = key(
        "/var/lib/alemca/remote_fleet_revocation.json", v_path, "path",
        "where the last fleet-wide revocation received from the broker is kept (signed "
        "by a cert-authority CA; applied again at start)")
    allow: Tuple[str, ...] = key(
        ["127.0.0.1:22"], v_allow, "list of host:port",
        "targets this device may open; port * is a wildcard")
    relays: Mapping[str, Any] = key(
        {"fr04": "relay.fr04.alemca.net:8443"}, v_relays, "map",
        "relay (exit node) host:port per server id, or a list of them (a pool: a request "
        "may name any)")
    relay_ca_file: Optional[str] = key(
        None, v_opt_existing_file, "path|null",
        "CA for the relay certificate; null: amqp.ca_file")
    idle_timeout: int = key(
        1800, v_int(1), "int s", "close a session without traffic for this long")
    ack_timeout: int = key(
        60, v_int(1), "int s", "close a session whose peer stopped acknowledging")
    keepalive_interval: int = key(
        15, v_int(1, 3600), "int s", "tunnel keepalive ping period")
    resume_timeout: int = key(
        600, v_int(0, 86400), "int s",
        "how long a session waits for its relay path to come back (resume; both ends keep "
        "streams and local sockets); then it ends link_lost. 0: no resume")
    resend_buffer: int = key(
        4 << 20, v_buffer_budget, "size",
        "sealed frames a session keeps until the console acknowledges them, for a resume "
        "(>= 1M); when full, local sockets are not read until acknowledgements free room")
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
    transfer: "TransferConfig" = key(
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
    remote: "RemoteConfig" = field(default_factory=RemoteConfig)
    warnings: Tuple[str, ...] = ()

    def __repr__(self) -> str:  # never show the token
        return "AgentConfig(path=%r, ident=%r, server_id=%r, enabled=%r)" % (
            self.path, self.ident, self.remote.server_id, self.remote.enabled)

    @property
    def topic(self) -> str:
        return topic(self)


SECTIONS = (("amqp", AmqpConfig), ("remote", RemoteConfig))
TOP_LEVEL_KEYS = ("ident", "token")


def iter_keys() -> Iterator[Tuple[str, str, Any, str]]:
    """Yield (dotted key, type, default, help) for every key: the reference docs."""
    for f in declared_fields(AgentConfig):
        yield f.name, f.metadata["type"], field_default(f), f.metadata["help"]
    for section, cls in SECTIONS:
        for f in declared_fields(cls):
            yield ("%s.%s" % (section, f.name), f.metadata["type"], field_default(f),
                   f.metadata["help"])
    for f in declared_fields(TransferConfig):
        yield ("remote.transfer.%s" % f.name, f.metadata["type"], field_default(f),
               f.metadata["help"])


# --------------------------------------------------------------------------- loading


def default_path() -> str:
    """``$REMOTE_GEVENT_CONFIG`` if set and non-empty, else ``/etc/alemca/config.yaml``."""
    return os.environ.get(ENV_CONFIG) or DEFAULT_PATH


def topic(cfg: "AgentConfig") -> str:
    """The device's topic: ``remote.<server_id>.<ident>``."""
    return "remote.%s.%s" % (cfg.remote.server_id, cfg.ident)


def _build_transfer(raw: Any, base: str, problems: Problems) -> "TransferConfig":
    prefix = "remote.transfer"
    values = build_section(TransferConfig, prefix, raw, base, problems, skip=("roots",))
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


def parse(data: Any, path: str) -> "AgentConfig":
    """Validate already-parsed YAML ``data`` read from ``path``; raise ConfigError."""
    problems = Problems(path)
    base = os.path.dirname(os.path.abspath(path))
    data = top_mapping(data, path)
    top: Dict[str, Any] = {}
    for f in declared_fields(AgentConfig):
        if f.name in data:
            try:
                top[f.name] = f.metadata["validator"](data[f.name], base)
            except Invalid as exc:
                problems.add(f.name, str(exc), data[f.name], f.metadata["secret"])

    amqp = AmqpConfig(**build_section(AmqpConfig, "amqp", data.get("amqp"), base, problems))
    raw_remote = data.get("remote")
    remote_kw = build_section(RemoteConfig, "remote", raw_remote, base, problems,
                              skip=("transfer",))
    if isinstance(raw_remote, dict) and raw_remote.get("transfer") is not None:
        remote_kw["transfer"] = _build_transfer(raw_remote["transfer"], base, problems)
    remote = RemoteConfig(**remote_kw)

    warnings = check_amqp(amqp, path, problems)
    bad_server_id = isinstance(raw_remote, dict) and "server_id" in raw_remote \
        and "server_id" not in remote_kw
    if not bad_server_id and remote.server_id not in remote.relays:
        problems.add("remote.relays", "no relay for server_id %s" % remote.server_id,
                     dict(remote.relays))
    if remote.enabled:
        _check_credentials(data, top, problems)
    if remote.relay_ca_file is None and amqp.ca_file is not None:
        remote = dataclasses.replace(remote, relay_ca_file=amqp.ca_file)

    if problems.items:
        raise ConfigError(problems.items)
    return AgentConfig(path=path, amqp=amqp, remote=remote, warnings=warnings, **top)


def _check_credentials(data: Dict[str, Any], top: Dict[str, Any], problems: Problems) -> None:
    """An enabled agent needs its ident and token (a missing key and a null one are
    told apart: the second is usually an unquoted empty value)."""
    for name in ("ident", "token"):
        if top.get(name):
            continue
        if name not in data:
            problems.add(name, "required when remote.enabled is true (missing)")
        elif data.get(name) is None:
            problems.add(name, "required when remote.enabled is true", None)


def load(path: Optional[str] = None) -> "AgentConfig":
    """Read and validate the config file (default: ``default_path()``)."""
    if path is None:
        path = default_path()
    try:
        data = read_document(path)
    except FileNotFoundError as exc:
        raise ConfigError([unreadable(path, exc)]) from None
    return parse(data, path)


def summary(cfg: "AgentConfig") -> str:
    """One line for ``check-config`` and start-up logs (no credentials)."""
    return ("%s: OK ident=%s server_id=%s topic=%s enabled=%s brokers=%d max_session=%d "
            "allow=%d transfer_roots=%d" % (
                cfg.path, cfg.ident or "-", cfg.remote.server_id,
                topic(cfg) if cfg.ident else "-", "true" if cfg.remote.enabled else "false",
                len(cfg.amqp.urls), cfg.remote.max_session, len(cfg.remote.allow),
                len(cfg.remote.transfer.roots)))
