"""TLS contexts: one place decides how every connection is secured.

Client contexts always verify the certificate chain *and* the host name; there is
deliberately no switch to turn either off. Minimum protocol is TLS 1.2.
"""

import ssl
from typing import Optional


class TLSConfigError(Exception):
    """A CA, certificate or key file could not be used (message names the file)."""


def client_context(ca_file: Optional[str] = None, cert_file: Optional[str] = None,
                   key_file: Optional[str] = None) -> ssl.SSLContext:
    """Context for dialing out to the broker or a relay.

    ``ca_file`` None means the system trust store. ``cert_file``/``key_file`` add a
    client certificate for brokers that require mutual TLS.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname + CERT_REQUIRED
    _require_tls12(ctx)
    try:
        if ca_file:
            ctx.load_verify_locations(cafile=ca_file)
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError("cannot load CA file %s: %s" % (ca_file, exc)) from exc
    if cert_file:
        _load_chain(ctx, cert_file, key_file)
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    return ctx


def server_context(cert_file: str, key_file: str, client_ca_file: Optional[str] = None
                   ) -> ssl.SSLContext:
    """Context for the relay's listener; ``client_ca_file`` makes client certs mandatory."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _require_tls12(ctx)
    _load_chain(ctx, cert_file, key_file)
    if client_ca_file:
        try:
            ctx.load_verify_locations(cafile=client_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise TLSConfigError("cannot load CA file %s: %s" % (client_ca_file, exc)) from exc
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _load_chain(ctx: ssl.SSLContext, cert_file: str, key_file: Optional[str]) -> None:
    try:
        ctx.load_cert_chain(certfile=cert_file, keyfile=key_file)
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(
            "cannot load certificate %s / key %s: %s" % (cert_file, key_file, exc)
        ) from exc


def _require_tls12(ctx: ssl.SSLContext) -> None:
    """TLS 1.2 or newer: ``minimum_version`` where Python has it (3.7+), else the
    OpenSSL options that turn the older versions off (3.6, same effect)."""
    if hasattr(ssl, "TLSVersion"):
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # novermin - guarded by hasattr
    else:
        ctx.options |= ssl.OP_NO_SSLv3 | ssl.OP_NO_TLSv1 | ssl.OP_NO_TLSv1_1


#: What a failed certificate check raises: its own class from Python 3.7; on 3.6 a plain
#: SSLError (reason CERTIFICATE_VERIFY_FAILED) for the chain, and for the host name an
#: ``ssl.CertificateError``, which is a ValueError there (Python checks the name itself
#: after the handshake), not an OSError.
_VERIFY_ERROR = getattr(ssl, "SSLCertVerificationError", None)

#: Everything a TLS handshake can raise: catch this, not ``(ssl.SSLError, OSError)``, or a
#: host name mismatch escapes as a ValueError on 3.6. (From 3.7 ``CertificateError`` is an
#: alias of ``SSLCertVerificationError``, already an SSLError.)
HANDSHAKE_ERRORS = (ssl.SSLError, OSError, ssl.CertificateError)


def is_verify_error(exc: BaseException) -> bool:
    """True if ``exc`` says the peer's certificate or host name did not verify."""
    if _VERIFY_ERROR is not None:
        return isinstance(exc, _VERIFY_ERROR)
    if isinstance(exc, ssl.CertificateError):
        return True
    return isinstance(exc, ssl.SSLError) and \
        getattr(exc, "reason", None) == "CERTIFICATE_VERIFY_FAILED"


def describe_verify_error(exc: BaseException) -> str:
    """One line saying *why* verification failed: wrong CA or wrong host name."""
    if is_verify_error(exc):
        message = getattr(exc, "verify_message", None) or str(exc)
        if "hostname" in message.lower() or "ip address mismatch" in message.lower():
            return "TLS host name mismatch: %s" % message
        return "TLS certificate not trusted (wrong CA?): %s" % message
    return "TLS error: %s" % exc
