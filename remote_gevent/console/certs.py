"""The operator's OpenSSH certificate (issue 14): found, checked, sent with each request.

As ``ssh`` does, the certificate of ``operator_key`` is ``<operator_key>-cert.pub`` when
that file exists, or the file ``operator_cert`` names in ``console.yaml``. The console
sends it with every signed request (``session.request``, ``status.request``,
``session.close``); the device verifies it against its ``cert-authority`` lines.
The console warns when the certificate expires within :data:`EXPIRY_WARNING` seconds
(or has expired, or is not valid yet), and explains a device's certificate refusals.
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO, Any, Optional

from remote_gevent.console.config import ConsoleConfig, ConsoleError
from remote_gevent.crypto import sshcert
from remote_gevent.crypto.identity import fingerprint_of
from remote_gevent.wire.codes import EXIT_CONFIG, Reason

EXPIRY_WARNING = 600  # seconds: "expires in 7 min" before the device starts refusing

#: What an operator should do about each refusal a certificate can cause.
REFUSAL_HINTS = {
    Reason.CERT_EXPIRED: "your operator certificate has expired: ask your administrator "
                         "for a new one (check it with `ssh-keygen -L -f CERT`)",
    Reason.CERT_NOT_YET_VALID: "your operator certificate is not valid yet (or the clocks "
                               "differ): check `ssh-keygen -L -f CERT`",
    Reason.PRINCIPAL: "your certificate names no principal this device accepts "
                      "(its cert-authority line's principals=, or the device name)",
    Reason.UNKNOWN_CA: "this device does not trust the CA that signed your certificate",
    Reason.CERT_INVALID: "the device cannot use your certificate (host certificate, "
                         "critical option, no port forwarding, or a bad signature)",
    Reason.REVOKED: "your key or certificate has been revoked on this device",
}


def certificate_path(cfg: ConsoleConfig) -> Optional[str]:
    """The certificate file to use: ``operator_cert``, else ``<operator_key>-cert.pub``
    if it exists, else None (a plain key)."""
    if cfg.operator_cert:
        return cfg.operator_cert
    beside = cfg.operator_key + "-cert.pub"
    return beside if os.path.exists(beside) else None


def attach_certificate(key: Any, cfg: ConsoleConfig, err: Optional[IO[str]] = None,
                       now: Optional[float] = None) -> Any:
    """Load the certificate of ``key`` (if any) into ``key.certificate``; returns ``key``.

    ConsoleError (``EXIT_CONFIG``) when the file is unreadable, not an ed25519
    certificate, or certifies another key: sending it would only be refused."""
    path = certificate_path(cfg)
    if path is None:
        return key
    try:
        with open(path, encoding="utf-8") as f:
            cert = sshcert.parse_certificate_line(f.read(sshcert.MAX_CERT_BYTES * 2))
    except OSError as exc:
        raise ConsoleError("cannot read operator certificate %s: %s" % (path, exc.strerror),
                           EXIT_CONFIG, "operator_cert") from None
    except (sshcert.CertError, UnicodeDecodeError) as exc:
        raise ConsoleError("operator certificate %s unusable: %s" % (path, exc), EXIT_CONFIG,
                           "operator_cert") from None
    if fingerprint_of(cert.key_raw32) != key.fingerprint:
        raise ConsoleError("operator certificate %s certifies %s, not the operator key %s"
                           % (path, fingerprint_of(cert.key_raw32), key.fingerprint),
                           EXIT_CONFIG, "operator_cert")
    warning = expiry_warning(cert, time.time() if now is None else now)
    if warning:
        out = err if err is not None else sys.stderr
        out.write("warning: operator certificate %s %s\n" % (path, warning))
        out.flush()
    key.certificate = cert.blob
    return key


def expiry_warning(cert: sshcert.Certificate, now: float) -> str:
    """A warning about the certificate's validity interval, or ``""``."""
    if now >= cert.valid_before:
        return "expired %s ago: devices will refuse it" % _duration(now - cert.valid_before)
    if now < cert.valid_after:
        return "is not valid for another %s" % _duration(cert.valid_after - now)
    if cert.valid_before - now <= EXPIRY_WARNING:
        return "expires in %s: ask for a new one" % _duration(cert.valid_before - now)
    return ""


def refusal_hint(code: str) -> str:
    """``"; <what to do>"`` for a certificate refusal code, ``""`` for others."""
    hint = REFUSAL_HINTS.get(code)
    return "; " + hint if hint else ""


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return "%d s" % seconds
    if seconds < 7200:
        return "%d min" % (seconds // 60)
    return "%d h" % (seconds // 3600)
