"""py-amqp glue for :mod:`amqplink`: the link's errors, the broker URL (through
:mod:`addresses`), a TLS transport that really uses our verifying context (py-amqp
ignores an ``SSLContext`` passed as ``ssl=``), and one-line descriptions of failures."""

import logging
import socket
import ssl
from typing import Any, Optional

import amqp
from amqp.exceptions import AccessRefused, AMQPError
from amqp.transport import SSLTransport

from remote_gevent.common import tls
from remote_gevent.common.addresses import (
    AddressError,
    BrokerURL,
    parse_broker_url,
    redact_url,
)

log = logging.getLogger("remote_gevent.common.amqplink")  # one logger for the link


class LinkError(Exception):
    """A one-line, credential-free reason why the link failed (safe to log)."""


class LinkConfigError(LinkError):
    """Irrecoverable configuration problem (bad URL, unusable TLS files): not retried."""


class TLSVerifyError(LinkError):
    """The broker's certificate was not trusted or does not match the host name."""


class LoginRefused(LinkError):
    """The broker refused the login (wrong ident/token) or access to the vhost."""


class NotConnected(LinkError):
    """The link is down (publish with ``wait=0``, or the wait ran out)."""


def parse_url(url: str) -> BrokerURL:
    """:func:`addresses.parse_broker_url` (the one parser config validation uses too),
    raising :class:`LinkConfigError`; warns about plain ``amqp://`` (loopback only)."""
    try:
        result = parse_broker_url(url)
    except AddressError as exc:
        raise LinkConfigError("bad broker URL %s: %s" % (redact_url(url), exc)) from None
    if not result.tls:
        log.warning("broker URL %s is NOT encrypted (plain amqp:// on loopback)", result)
    return result


# --------------------------------------------------------------------------- py-amqp glue
class _VerifiedSSLTransport(SSLTransport):
    """py-amqp SSL transport wrapping with *our* context and SNI/host name check."""

    def __init__(self, host: str, connect_timeout: Optional[float] = None,
                 ssl: Any = None, **kwargs: Any) -> None:
        self._rg_context, self._rg_server_hostname = ssl
        super().__init__(host, connect_timeout=connect_timeout, ssl=None, **kwargs)

    def _wrap_socket(self, sock: socket.socket, context: Any = None,
                     **sslopts: Any) -> ssl.SSLSocket:
        # _setup_transport() then sets connect_timeout and runs do_handshake().
        return self._rg_context.wrap_socket(
            sock, server_hostname=self._rg_server_hostname, do_handshake_on_connect=False)


class _Connection(amqp.Connection):
    # Without "connection.blocked" py-amqp's basic_publish would not drain; we bypass it
    # anyway, and keep the capability so that the broker's blocked notices reach us.
    def __init__(self, *args: Any, tls_context: Optional[ssl.SSLContext] = None,
                 server_hostname: Optional[str] = None, **kwargs: Any) -> None:
        self._rg_tls = (tls_context, server_hostname)
        super().__init__(*args, **kwargs)

    def Transport(self, host: str, connect_timeout: Optional[float], ssl: Any = False,
                  read_timeout: Optional[float] = None, write_timeout: Optional[float] = None,
                  socket_settings: Any = None, **kwargs: Any) -> Any:
        if self._rg_tls[0] is None:
            return super().Transport(host, connect_timeout, False, read_timeout,
                                     write_timeout, socket_settings=socket_settings, **kwargs)
        return _VerifiedSSLTransport(host, connect_timeout=connect_timeout, ssl=self._rg_tls,
                                     read_timeout=read_timeout, write_timeout=write_timeout,
                                     socket_settings=socket_settings, **kwargs)


def _reply_text(exc: AMQPError) -> str:
    text = getattr(exc, "reply_text", None) or getattr(exc, "message", None) or str(exc)
    return str(text).splitlines()[0] if text else exc.__class__.__name__


def describe_error(exc: BaseException, url: Optional[BrokerURL] = None,
                   userid: Optional[str] = None) -> str:
    """One line saying what went wrong; never contains the password."""
    where = url.address if url is not None else "broker"
    if isinstance(exc, LinkError):
        return str(exc)
    if tls.is_verify_error(exc):
        return "%s: %s" % (where, tls.describe_verify_error(exc))
    if isinstance(exc, AccessRefused):
        text = _reply_text(exc)
        if "vhost" in text.lower():
            return ("broker %s refused access to vhost %r for user %s (ACCESS_REFUSED)"
                    % (where, url.vhost if url else "?", userid))
        if "login" in text.lower() or "auth" in text.lower():
            return "broker %s refused login for user %s (ACCESS_REFUSED)" % (where, userid)
        return "broker %s: access refused (ACCESS_REFUSED): %s" % (where, text)
    if isinstance(exc, AMQPError):
        code = getattr(exc, "code", None)
        return "broker %s: %s%s" % (where, _reply_text(exc),
                                    " (%s)" % code if code else "")
    if isinstance(exc, ConnectionRefusedError):
        return "cannot connect to %s: connection refused" % where
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "cannot connect to %s: timed out" % where
    if isinstance(exc, ssl.SSLError):
        return "%s: TLS error: %s" % (where, exc.reason or exc)
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc) or exc.__class__.__name__
        return "connection to %s failed: %s" % (where, reason)
    return "%s: %s: %s" % (where, exc.__class__.__name__, exc)
