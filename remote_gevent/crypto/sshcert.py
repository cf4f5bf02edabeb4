"""OpenSSH user certificates (``ssh-ed25519-cert-v01@openssh.com``): parse and verify.

The format is OpenSSH's PROTOCOL.certkeys; certificates come from stock
``ssh-keygen -s CA -I key-id -n principals -V validity key.pub``. Only ed25519 subject
keys and ed25519 CAs are accepted (the operator keys are ed25519 already); any other CA
type is refused with a message naming it.

:func:`parse_certificate` is strict about the encoding (every length checked, nothing
left over, options sorted and unique as the spec requires) and raises
:class:`CertError` for anything else: it never raises another exception, whatever the
input (tests/test_fuzz_sshcert.py). :func:`check_certificate` makes OpenSSH's decisions
for a ``cert-authority`` line: the CA signature, the type (user), the validity interval
(with the request clock-skew allowance), the principals, no critical option (we
honour none: ``force-command`` and ``source-address`` cannot apply to a tunnel, so
ignoring them would grant more than the CA wrote) and ``permit-port-forwarding``
(without it OpenSSH refuses any forwarding, and forwarding is all we do).

Our extension ``permit-open@remote-gevent`` (value: comma-separated targets, as the
``permitopen=`` option) narrows what the certificate's holder may open; it is
intersected with the line's ``permitopen=``, never added to it.
"""

import base64
import binascii
import struct
from typing import List, NamedTuple, Optional, Sequence, Tuple

import nacl.exceptions
import nacl.signing

CERT_TYPE_ED25519 = "ssh-ed25519-cert-v01@openssh.com"
SSH_ED25519 = "ssh-ed25519"
USER_CERT = 1
HOST_CERT = 2
PERMIT_OPEN_EXTENSION = "permit-open@remote-gevent"
PORT_FORWARDING_EXTENSION = "permit-port-forwarding"
MAX_CERT_BYTES = 8192  # a certificate with a few principals is ~400 bytes
MAX_PRINCIPALS = 256
MAX_UINT64 = 2 ** 64 - 1

__all__ = [
    "CertError", "Certificate", "parse_certificate", "parse_certificate_line",
    "check_certificate", "CERT_TYPE_ED25519", "PERMIT_OPEN_EXTENSION",
]


class CertError(ValueError):
    """A certificate cannot be used. ``kind`` says why, for the refusal code:
    ``invalid`` (encoding, type, signature, options), ``unsupported_ca``,
    ``expired``, ``not_yet_valid``, ``principal``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class Certificate(NamedTuple):
    """A parsed (not yet verified) certificate."""

    key_raw32: bytes  # the certified ed25519 public key
    serial: int
    cert_type: int  # USER_CERT or HOST_CERT
    key_id: str
    principals: Tuple[str, ...]
    valid_after: int
    valid_before: int
    critical: Tuple[Tuple[str, bytes], ...]
    extensions: Tuple[Tuple[str, bytes], ...]
    ca_type: str
    ca_blob: bytes  # the CA's public key, SSH wire format
    signed: bytes  # the bytes the CA signed
    sig_type: str
    signature: bytes
    blob: bytes  # the whole certificate

    @property
    def ca_raw32(self) -> Optional[bytes]:
        """The CA's ed25519 key, None when the CA is of another type."""
        if self.ca_type != SSH_ED25519:
            return None
        try:
            r = _Reader(self.ca_blob)
            r.string()
            raw = r.string()
            r.end()
        except CertError:
            return None
        return raw if len(raw) == 32 else None

    def extension(self, name: str) -> Optional[bytes]:
        return dict(self.extensions).get(name)

    def describe(self) -> str:
        """``key id "alice" serial 7`` for log lines (the key id escaped by the caller)."""
        return 'key id "%s" serial %d' % (self.key_id, self.serial)


class _Reader:
    """SSH wire-format reader over bytes; every error is a CertError."""

    def __init__(self, data: bytes, what: str = "certificate") -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def _take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise CertError("invalid", "%s truncated" % self.what)
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u32(self) -> int:
        return int(struct.unpack(">I", self._take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack(">Q", self._take(8))[0])

    def string(self) -> bytes:
        return self._take(self.u32())

    def text(self, name: str) -> str:
        raw = self.string()
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CertError("invalid", "%s: %s is not UTF-8" % (self.what, name)) from None
        if any(c < " " or c == "\x7f" for c in value):
            raise CertError("invalid", "%s: %s has control characters" % (self.what, name))
        return value

    def done(self) -> bool:
        return self.pos == len(self.data)

    def end(self) -> None:
        if not self.done():
            raise CertError("invalid", "%s: %d unexpected trailing bytes"
                            % (self.what, len(self.data) - self.pos))


def _options(data: bytes, what: str) -> Tuple[Tuple[str, bytes], ...]:
    """Critical options or extensions: (name, data) pairs, lexically sorted and unique
    (PROTOCOL.certkeys requires it; a repeated name could be read two ways)."""
    r = _Reader(data, what)
    out: List[Tuple[str, bytes]] = []
    while not r.done():
        name = r.text("%s name" % what)
        value = r.string()
        if not name or (out and name <= out[-1][0]):
            raise CertError("invalid", "%s not sorted, repeated or empty" % what)
        out.append((name, value))
    return tuple(out)


def option_text(value: bytes, name: str) -> str:
    """The text of an option or extension with a value (an SSH string inside the data)."""
    r = _Reader(value, name)
    text = r.text(name)
    r.end()
    return text


def parse_certificate(blob: bytes) -> "Certificate":
    """Decode a certificate's wire form; CertError (``invalid``/``unsupported_ca``) if it
    is not a well-formed ed25519 user or host certificate."""
    if not isinstance(blob, (bytes, bytearray)) or len(blob) > MAX_CERT_BYTES:
        raise CertError("invalid", "certificate missing or over %d bytes" % MAX_CERT_BYTES)
    blob = bytes(blob)
    r = _Reader(blob)
    ctype = r.string()
    if ctype != CERT_TYPE_ED25519.encode():
        raise CertError("invalid", "not an ssh-ed25519 certificate (type %s)"
                        % _printable(ctype))
    r.string()  # nonce
    key = r.string()
    if len(key) != 32:
        raise CertError("invalid", "certified key is not 32 bytes")
    serial = r.u64()
    cert_type = r.u32()
    key_id = r.text("key id")
    principals = _principals(r.string())
    valid_after = r.u64()
    valid_before = r.u64()
    critical = _options(r.string(), "critical options")
    extensions = _options(r.string(), "extensions")
    r.string()  # reserved
    ca_blob = r.string()
    signed = blob[:r.pos]
    sig_blob = r.string()
    r.end()
    ca_type = _printable(_Reader(ca_blob, "CA key").string())
    if ca_type != SSH_ED25519:
        raise CertError("unsupported_ca", "certificate signed by a %s CA: only ssh-ed25519 "
                        "CAs are supported" % ca_type)
    sr = _Reader(sig_blob, "signature")
    sig_type = _printable(sr.string())
    signature = sr.string()
    sr.end()
    if cert_type not in (USER_CERT, HOST_CERT):
        raise CertError("invalid", "unknown certificate type %d" % cert_type)
    return Certificate(key, serial, cert_type, key_id, principals, valid_after, valid_before,
                       critical, extensions, ca_type, ca_blob, signed, sig_type, signature,
                       blob)


def _principals(data: bytes) -> Tuple[str, ...]:
    r = _Reader(data, "principals")
    out: List[str] = []
    while not r.done():
        if len(out) >= MAX_PRINCIPALS:
            raise CertError("invalid", "more than %d principals" % MAX_PRINCIPALS)
        out.append(r.text("principal"))
    return tuple(out)


def _printable(raw: bytes) -> str:
    text = raw[:64].decode("ascii", "replace")
    return "".join(c if " " < c < "\x7f" else "?" for c in text) or "(empty)"


def parse_certificate_line(line: str) -> "Certificate":
    """A ``…-cert.pub`` line (``ssh-ed25519-cert-v01@openssh.com AAAA… comment``)."""
    parts = line.strip().split()
    if len(parts) < 2 or parts[0] != CERT_TYPE_ED25519:
        raise CertError("invalid", "not an %s line" % CERT_TYPE_ED25519)
    return parse_certificate(decode_b64(parts[1]))


def decode_b64(text: str) -> bytes:
    if len(text) > MAX_CERT_BYTES * 2:
        raise CertError("invalid", "certificate over %d bytes" % MAX_CERT_BYTES)
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise CertError("invalid", "certificate is not base64") from None


def verify_signature(cert: "Certificate") -> bool:
    ca = cert.ca_raw32
    if ca is None or cert.sig_type != SSH_ED25519 or len(cert.signature) != 64:
        return False
    try:
        nacl.signing.VerifyKey(ca).verify(cert.signed, cert.signature)
        return True
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError,
            nacl.exceptions.TypeError):
        return False


def check_certificate(cert: "Certificate", ca_raw32: bytes, accepted_principals: Sequence[str],
                      now: float, skew: int) -> None:
    """OpenSSH's checks of a user certificate against one ``cert-authority`` line.

    ``accepted_principals``: the line's ``principals=`` names, or the device ident when
    the line has none; one of them must be in the certificate. Raises CertError whose
    ``kind`` is ``invalid``, ``expired``, ``not_yet_valid`` or ``principal``.
    """
    if cert.ca_raw32 != bytes(ca_raw32):
        raise CertError("invalid", "certificate is not signed by this CA")
    if not verify_signature(cert):
        raise CertError("invalid", "CA signature does not verify")
    if cert.cert_type != USER_CERT:
        raise CertError("invalid", "host certificate, not a user certificate")
    if cert.critical:
        raise CertError("invalid", "unsupported critical option(s): %s"
                        % ", ".join(_printable(n.encode()) for n, _ in cert.critical))
    if cert.extension(PORT_FORWARDING_EXTENSION) is None:
        raise CertError("invalid", "certificate does not permit port forwarding")
    if now + skew < cert.valid_after:
        raise CertError("not_yet_valid", "certificate not valid before %d (%d s from now)"
                        % (cert.valid_after, cert.valid_after - now))
    if now - skew >= cert.valid_before:
        raise CertError("expired", "certificate expired at %d (%d s ago)"
                        % (cert.valid_before, now - cert.valid_before))
    if not cert.principals:
        # OpenSSH would accept a certificate without principals for any user; a wildcard
        # operator for every device of a fleet is refused here instead.
        raise CertError("principal", "certificate lists no principals")
    wanted = set(accepted_principals)
    if not any(p in wanted for p in cert.principals):
        raise CertError("principal", "no principal of the certificate (%s) is accepted here"
                        % ", ".join(_printable(p.encode()) for p in cert.principals[:8]))


def permit_open_of(cert: "Certificate") -> Optional[List[str]]:
    """The targets of our ``permit-open@remote-gevent`` extension; None when absent.

    CertError when the extension is present but not an SSH string of targets."""
    value = cert.extension(PERMIT_OPEN_EXTENSION)
    if value is None:
        return None
    text = option_text(value, PERMIT_OPEN_EXTENSION)
    items = [t.strip() for t in text.split(",")]
    if not items or any(not t for t in items):
        raise CertError("invalid", "%s: empty target" % PERMIT_OPEN_EXTENSION)
    return items

