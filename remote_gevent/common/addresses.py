"""Addresses, parsed once for every role: ``host:port``, ``[v6]:port`` and broker URLs.

Config validation and the code that dials use these same functions, so a value that
``check-config`` accepts is exactly a value the running program accepts (the broker URL
used to be parsed twice with different rules: ``amqps://host/vh?heartbeat=5`` passed the
check and then stopped the agent at start).

Errors are :class:`AddressError` (a ``ValueError``) with a message that says what is
expected; callers wrap it in their own error type (config ``Invalid``, ``LinkConfigError``).
"""

import ipaddress
from typing import NamedTuple, Optional, Tuple
from urllib.parse import quote, unquote, urlsplit

BROKER_DEFAULT_PORTS = {"amqps": 5671, "amqp": 5672}
_LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


class AddressError(ValueError):
    """A host:port or URL that cannot be used; the message says what is expected."""


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and the usual names of the loopback host."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def format_address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 literal bracketed (``[::1]:22``)."""
    if ":" in host and not host.startswith("["):
        return "[%s]:%d" % (host, port)
    return "%s:%d" % (host, port)


def is_ascii(text: str) -> bool:
    """``str.isascii()``, which Python 3.6 lacks (the agent runs there: issue 16)."""
    return all(ord(char) < 128 for char in text)


def _port(text: str, lowest: int) -> int:
    # isdigit() is also true for "²" and for 5000 digits, which int() refuses or chokes on.
    if not (is_ascii(text) and text.isdigit() and len(text) <= 5) \
            or not lowest <= int(text) < 65536:
        raise AddressError("expected a port %d-65535" % lowest)
    return int(text)


def split_host_port(value: str, wildcard_port: bool = False) -> Tuple[str, Optional[int]]:
    """``host:port`` / ``[v6]:port`` → (host, port). With ``wildcard_port``, port ``*``
    gives ``None``. A host is required; it may not contain blanks or ``*``."""
    if not isinstance(value, str) or ":" not in value:
        raise AddressError("expected host:port")
    if value.startswith("["):
        end = value.find("]")
        if end < 0 or value[end + 1:end + 2] != ":":
            raise AddressError("expected [ipv6]:port")
        host, port_s = value[1:end], value[end + 2:]
    else:
        host, _, port_s = value.rpartition(":")
    if not host or any(c.isspace() for c in host) or ("*" in host):
        raise AddressError("expected host:port with a host name or address")
    if port_s == "*" and wildcard_port:
        return host, None
    try:
        return host, _port(port_s, 1)
    except AddressError:
        raise AddressError("expected a port 1-65535%s"
                           % (" or *" if wildcard_port else "")) from None


def parse_listen(value: str) -> Tuple[str, int]:
    """A listening address: ``HOST:PORT``, ``[v6]:PORT`` or ``:PORT`` (all interfaces,
    ``0.0.0.0``); port 0 means any free port. An IPv6 literal must be bracketed."""
    value = value.strip()
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise AddressError("expected [IPV6]:PORT")
        port_text = rest[1:]
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep:
            raise AddressError("expected HOST:PORT")
        if ":" in host:
            raise AddressError("IPv6 addresses must be bracketed: [::1]:8443")
    try:
        port = _port(port_text, 0)
    except AddressError:
        raise AddressError("port must be 0-65535 (0: any free port)") from None
    return host or "0.0.0.0", port


def redact_url(url: object) -> str:
    """``url`` fit for an error message or a log line: any ``user:password@`` hidden."""
    text = url if isinstance(url, str) else repr(url)
    scheme, sep, rest = text.partition("://")
    if not sep:
        return text
    netloc, slash, path = rest.partition("/")
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    return scheme + sep + netloc + slash + path


class BrokerURL(NamedTuple):
    scheme: str  # "amqps" or "amqp"
    host: str
    port: int
    vhost: str  # decoded; "/" for the default vhost

    @property
    def tls(self) -> bool:
        return self.scheme == "amqps"

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)

    def __str__(self) -> str:
        return "%s://%s/%s" % (self.scheme, self.address, quote(self.vhost, safe=""))


def parse_broker_url(url: str) -> "BrokerURL":
    """``amqps://host[:port]/vhost`` (vhost URL-decoded; empty or ``/`` = ``/``).

    Plain ``amqp://`` only to a loopback host. Credentials (the login is ``ident`` /
    ``token``), query strings and fragments are refused: py-amqp would not honour them.
    """
    if not isinstance(url, str):
        raise AddressError("expected an amqps://host:port/vhost URL string")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:  # "amqps://[::1", a port of letters or out of range
        raise AddressError("expected an amqps://host:port/vhost URL (%s)" % exc) from None
    scheme = parts.scheme.lower()
    if scheme not in BROKER_DEFAULT_PORTS:
        raise AddressError("scheme must be amqps:// (or amqp:// to loopback)")
    if parts.username is not None or parts.password is not None:
        raise AddressError("credentials do not belong in the URL, use ident/token")
    if parts.query or parts.fragment:
        raise AddressError("no query string or fragment allowed (heartbeat and timeouts "
                           "are config keys)")
    host = parts.hostname
    if not host:
        raise AddressError("URL has no host")
    vhost = unquote(parts.path[1:]) if parts.path.startswith("/") else unquote(parts.path)
    result = BrokerURL(scheme, host, port or BROKER_DEFAULT_PORTS[scheme], vhost or "/")
    if scheme == "amqp" and not is_loopback(host):
        raise AddressError("refusing plain amqp:// to %s: unencrypted AMQP is allowed only to "
                           "loopback addresses, use amqps://" % result.address)
    return result
