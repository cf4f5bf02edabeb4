"""Operators admitted by certificate: a ``cert-authority`` line + an OpenSSH user
certificate signed by that CA (docs/protocol.md, "Operator certificates").

:func:`authorize` turns the certificate a request carries into the
:class:`~remote_gevent.crypto.authkeys.OperatorKey` the agent acts on, or raises
:class:`~remote_gevent.crypto.sshcert.CertError` whose ``kind`` is the refusal:
``invalid`` / ``unsupported_ca`` / ``unknown_ca`` / ``expired`` / ``not_yet_valid`` /
``principal`` / ``revoked`` / ``no_targets``. :func:`recheck` is the live check of a
running session after ``authorized_keys`` or the revocations changed.

Restrictions: the operator's targets are the line's ``permitopen`` ∩ the certificate's
``permit-open@remote-gevent`` extension (either alone when the other is absent) —
an intersection, never a union; an empty intersection permits nothing and is refused.
"""

import logging
from typing import Any, List, Optional, Sequence, Tuple

from remote_gevent.common.logs import escape
from remote_gevent.crypto.authkeys import (
    AuthorizedKeys,
    OperatorKey,
    TargetError,
    TargetPattern,
    fingerprint_of,
)
from remote_gevent.crypto.sshcert import (
    CertError,
    Certificate,
    check_certificate,
    parse_certificate,
    permit_open_of,
)

__all__ = ["authorize", "recheck", "intersect_permitopen"]

log = logging.getLogger(__name__)


def intersect_permitopen(line: Sequence[TargetPattern], cert: Optional[Sequence[TargetPattern]]
                         ) -> "Optional[Tuple[TargetPattern, ...]]":
    """The operator's permitopen from the line's and the certificate's: () = no restriction,
    None = nothing permitted (both restrict and have nothing in common)."""
    if cert is None:
        return tuple(line)
    if not line:
        return tuple(cert)
    out: List[TargetPattern] = []
    for a in line:
        for b in cert:
            both = a.intersect(b)
            if both is not None and both not in out:
                out.append(both)
    return tuple(out) if out else None


def _cert_patterns(cert: "Certificate") -> "Optional[List[TargetPattern]]":
    items = permit_open_of(cert)
    if items is None:
        return None
    try:
        return [TargetPattern.parse(t) for t in items]
    except TargetError as exc:
        raise CertError("invalid", "permit-open@remote-gevent: %s" % exc) from None


def _operator(ca_line: OperatorKey, cert: "Certificate", revoked: Any) -> "OperatorKey":
    """The operator a valid certificate stands for, restricted and revocation-checked."""
    why = revoked.certificate_revoked(cert) if revoked is not None else None
    if why is not None:
        raise CertError("revoked", "certificate revoked (%s)" % why)
    permitopen = intersect_permitopen(ca_line.permitopen, _cert_patterns(cert))
    if permitopen is None:
        raise CertError("no_targets", "the line's permitopen and the certificate's "
                        "permit-open@remote-gevent have no target in common")
    return OperatorKey(cert.key_raw32, fingerprint_of(cert.key_raw32), cert.key_id,
                       permitopen, ca_line.line_no, ca_line.admin, cert=cert,
                       ca_fingerprint=ca_line.fingerprint)


def authorize(trusted: AuthorizedKeys, cert_blob: bytes, signer: str, device: str,
              now: float, skew: int) -> "OperatorKey":
    """Verify the certificate of a request signed by ``signer`` (a fingerprint)."""
    cert = parse_certificate(cert_blob)
    if fingerprint_of(cert.key_raw32) != signer:
        raise CertError("invalid", "certificate is for another key than the signer's")
    ca_raw = cert.ca_raw32
    ca_fp = fingerprint_of(ca_raw) if ca_raw is not None else ""
    line = trusted.authority(ca_fp)
    if line is None:
        raise CertError("unknown_ca", "certificate signed by CA %s, not a cert-authority "
                        "of this device" % ca_fp)
    check_certificate(cert, line.public_raw32, line.principals or (device,), now, skew)
    op = _operator(line, cert, trusted.revoked)
    log.info("operator %s: certificate %s by CA %s (line %d), valid until %d", signer,
             escape(cert.describe()), ca_fp, line.line_no, cert.valid_before)
    return op


def recheck(trusted: AuthorizedKeys, operator: "OperatorKey") -> "Optional[OperatorKey]":
    """``operator`` (admitted by certificate) as ``trusted`` sees it now, or None: its CA
    line gone, its principals no longer accepted by the line, the certificate or a key
    revoked, or no target left. Expiry ends no running session (as in OpenSSH)."""
    cert = operator.cert
    line = trusted.authority(operator.ca_fingerprint)
    if line is None or cert is None:
        return None
    if line.principals and not set(line.principals) & set(cert.principals):
        return None
    try:
        return _operator(line, cert, trusted.revoked)
    except CertError:
        return None
