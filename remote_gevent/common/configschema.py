"""The declarative config framework every role uses (agent, console, relay).

A config section is a frozen dataclass whose fields are declared with :func:`key`
(default, validator, type name, help). :func:`build_section` validates a YAML mapping
against it, collecting every problem (naming the file, the key and the bad value)
instead of stopping at the first; :class:`ConfigError` carries them all. Validators
take the raw YAML value and the config file's directory (for relative paths) and return
the normalised value or raise :class:`Invalid`. :func:`read_document` reads one YAML file
with ``safe_load``. ``AmqpConfig`` is the ``amqp:`` section shared by the agent and the
console; broker URLs and ``host:port`` go through :mod:`remote_gevent.common.addresses`,
the parser the code that dials uses too.
"""

import dataclasses
import os
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Dict, List, Optional, Tuple
import yaml
from remote_gevent.common import addresses
from remote_gevent.common.addresses import AddressError, BrokerURL, parse_broker_url, redact_url

GIB = 1024 ** 3

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}


SUPPORTED_SERVER_IDS = ("fr04",)


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


def item_error(exc: "Invalid", where: str, value: Any) -> "Invalid":
    return Invalid(str(exc), where=where, value=value, has_value=True)


# --------------------------------------------------------------------------- validators
# A validator receives the raw YAML value and the directory of the config file and
# returns the normalised value, or raises Invalid.

Validator = Callable[[Any, str], Any]


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def v_bool(value: Any, base: str) -> bool:
    if not isinstance(value, bool):
        raise Invalid("expected true or false")
    return value


def v_int(minimum: int, maximum: Optional[int] = None) -> Validator:
    def check(value: Any, base: str) -> int:
        if not is_int(value):
            raise Invalid("expected an integer")
        if value < minimum or (maximum is not None and value > maximum):
            upper = "" if maximum is None else " and <= %d" % maximum
            raise Invalid("expected an integer >= %d%s" % (minimum, upper))
        return int(value)

    return check


def v_float(minimum: float, maximum: Optional[float] = None) -> Validator:
    """A number of seconds in (minimum, maximum]."""

    def check(value: Any, base: str) -> float:
        if not (is_int(value) or isinstance(value, float)):
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


def v_token(value: Any, base: str) -> Optional[str]:
    if value is None:
        return None
    if is_int(value):  # an all-digits token written without quotes
        value = str(value)
    if not isinstance(value, str) or not value:
        raise Invalid("expected a non-empty string")
    return value


def resolve_path(path: str, base: str) -> str:
    path = os.path.expanduser(path)
    if not os.path.isabs(path):
        path = os.path.normpath(os.path.join(base, path))
    return path


def v_path(value: Any, base: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise Invalid("expected a file path")
    return resolve_path(value, base)


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
            raise item_error(exc, "[%d]" % i, redact_url(url)) from None
    return tuple(value)


def split_host_port(value: str, wildcard_port: bool = False) -> Tuple[str, Optional[int]]:
    """:func:`addresses.split_host_port` raising Invalid (port None means ``*``)."""
    try:
        return addresses.split_host_port(value, wildcard_port)
    except AddressError as exc:
        raise Invalid(str(exc)) from None


def parse_size(value: Any) -> int:
    """Bytes from an int or a string like ``512M`` / ``4GiB`` (binary units)."""
    if is_int(value):
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


def v_size(value: Any, base: str) -> int:
    return parse_size(value)


def v_opt_size(value: Any, base: str) -> Optional[int]:
    return None if value is None else parse_size(value)


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


def declared_fields(cls: type) -> List[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "validator" in f.metadata]


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[operator]


class Problems:
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


def _dotted(section: str, name: str) -> str:
    return "%s.%s" % (section, name) if section else name


def build_section(cls: type, section: str, raw: Any, base: str, problems: "Problems",
           skip: Tuple[str, ...] = ()) -> Dict[str, Any]:
    """Validate a mapping against the declared fields of ``cls``; return kwargs."""
    values: Dict[str, Any] = {}
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.add(section, "expected a mapping of keys", raw)
        return values
    declared = {f.name: f for f in declared_fields(cls)}
    for name in raw:
        if name not in declared:
            problems.add(_dotted(section, name),
                         "unknown key; known keys: %s" % ", ".join(sorted(declared)),
                         raw[name])
    for name, f in declared.items():
        if name in skip or name not in raw:
            continue
        try:
            values[name] = f.metadata["validator"](raw[name], base)
        except Invalid as exc:
            problems.add(_dotted(section, name) + exc.where, str(exc),
                         exc.value if exc.has_value else raw[name], f.metadata["secret"])
    return values


def top_mapping(data: Any, path: str) -> Dict[str, Any]:
    """The document's top level as a mapping (an empty file is an empty mapping)."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(["%s: expected a YAML mapping at the top level (got %s)"
                           % (path, type(data).__name__)])
    return data


def check_amqp(amqp: Any, path: str, problems: "Problems") -> Tuple[str, ...]:
    """The rules across an ``amqp`` section's keys, the same for agent and console:
    record problems; return the warnings (a plain-text URL, allowed only to loopback)."""
    if (amqp.cert_file is None) != (amqp.key_file is None):
        problems.add("amqp.key_file" if amqp.key_file is None else "amqp.cert_file",
                     "cert_file and key_file go together")
    warnings = []
    for url in amqp.urls:
        try:
            if parse_amqp_url(url)[0] == "amqp":
                warnings.append("%s: amqp.urls: %s is not encrypted (loopback only)"
                                % (path, url))
        except Invalid:
            pass  # already a problem of v_urls
    return tuple(warnings)


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
        raise ConfigError([unreadable(path, exc)]) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(["%s: invalid YAML: %s" % (path, " ".join(str(exc).split()))]) \
            from None


def unreadable(path: str, exc: OSError) -> str:
    return "%s: cannot read config file: %s" % (path, exc.strerror or exc)

def v_server_id(value: Any, base: str) -> str:
    if value not in SUPPORTED_SERVER_IDS:
        raise Invalid("unsupported server id; supported: %s" % ", ".join(SUPPORTED_SERVER_IDS))
    return value
