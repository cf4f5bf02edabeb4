"""Revoked keys and certificates: OpenSSH KRLs and plain key lists (``remote.revoked_keys``).

Two formats, as OpenSSH's ``RevokedKeys`` accepts them:

- a **KRL** as ``ssh-keygen -k`` writes it (PROTOCOL.krl): certificates revoked by serial
  (lists, ranges, bitmaps) or by key id, for one CA or for any CA, and plain keys revoked
  explicitly or by SHA1/SHA256 hash;
- a **plain list** of public keys, one per line (``ssh-ed25519 …``; a certificate line
  revokes its key), ``#`` comments and blank lines ignored.

:func:`parse_revocations` never raises anything but :class:`KrlError`, whatever the bytes
(tests/test_fuzz_sshcert.py). A certificate is revoked when its serial or key id is
listed for its CA (or for any CA), when its own key is revoked, or when its CA key is.
"""

import base64
import binascii
import hashlib
import struct
from typing import Dict, List, Optional, Set, Tuple

from remote_gevent.crypto.identity import ssh_pubkey_blob
from remote_gevent.crypto.sshcert import CertError, Certificate, parse_certificate

KRL_MAGIC = b"SSHKRL\n\0"
KRL_FORMAT_VERSION = 1
SECTION_CERTIFICATES = 1
SECTION_EXPLICIT_KEY = 2
SECTION_FINGERPRINT_SHA1 = 3
SECTION_SIGNATURE = 4
SECTION_FINGERPRINT_SHA256 = 5
SECTION_EXTENSION = 255
CERT_SERIAL_LIST = 0x20
CERT_SERIAL_RANGE = 0x21
CERT_SERIAL_BITMAP = 0x22
CERT_KEY_ID = 0x23
CERT_EXTENSION = 0x39
MAX_REVOCATION_BYTES = 4 * 1024 * 1024
MAX_BITMAP_BYTES = 1024 * 1024
ANY_CA = b""  # a certificate section for every CA

__all__ = ["KrlError", "Revocations", "parse_revocations"]


class KrlError(ValueError):
    """The revocation data cannot be read (the agent then trusts nobody: fail closed)."""


class _Reader:
    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.pos, self.what = data, 0, what

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise KrlError("%s truncated" % self.what)
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack(">Q", self.take(8))[0])

    def byte(self) -> int:
        return self.take(1)[0]

    def string(self) -> bytes:
        return self.take(self.u32())

    def done(self) -> bool:
        return self.pos >= len(self.data)


class Revocations:
    """What is revoked (the union of every source given to :meth:`merge`)."""

    def __init__(self) -> None:
        # CA blob (or ANY_CA) -> revoked serial ranges / key ids
        self.serials: Dict[bytes, List[Tuple[int, int]]] = {}
        # CA blob -> (offset, bitmap as an int): bit N revokes serial offset + N
        self.bitmaps: Dict[bytes, List[Tuple[int, int]]] = {}
        self.key_ids: Dict[bytes, Set[str]] = {}
        self.keys: Set[bytes] = set()  # plain key blobs
        self.sha1: Set[bytes] = set()
        self.sha256: Set[bytes] = set()
        self.version = 0  # krl_version (0 for plain lists)

    def __len__(self) -> int:
        return (sum(len(v) for v in self.serials.values())
                + sum(bin(b).count("1") for v in self.bitmaps.values() for _, b in v)
                + sum(len(v) for v in self.key_ids.values())
                + len(self.keys) + len(self.sha1) + len(self.sha256))

    def merge(self, other: "Revocations") -> "Revocations":
        out = Revocations()
        for src in (self, other):
            for ca, ranges in src.serials.items():
                out.serials.setdefault(ca, []).extend(ranges)
            for ca, bitmaps in src.bitmaps.items():
                out.bitmaps.setdefault(ca, []).extend(bitmaps)
            for ca, ids in src.key_ids.items():
                out.key_ids.setdefault(ca, set()).update(ids)
            out.keys |= src.keys
            out.sha1 |= src.sha1
            out.sha256 |= src.sha256
        out.version = max(self.version, other.version)
        return out

    def key_blob_revoked(self, blob: bytes) -> bool:
        return (blob in self.keys or hashlib.sha1(blob).digest() in self.sha1
                or hashlib.sha256(blob).digest() in self.sha256)

    def key_revoked(self, raw32: bytes) -> bool:
        """True if the plain ed25519 key ``raw32`` is revoked."""
        return self.key_blob_revoked(ssh_pubkey_blob(raw32))

    def certificate_revoked(self, cert: "Certificate") -> Optional[str]:
        """Why ``cert`` is revoked ("serial 7", "key id …", "key", "CA key"), or None."""
        for ca in (cert.ca_blob, ANY_CA):
            for lo, hi in self.serials.get(ca, ()):
                # serial 0 cannot be revoked by serial (PROTOCOL.krl; ssh-keygen refuses it)
                if cert.serial and lo <= cert.serial <= hi:
                    return "serial %d" % cert.serial
            for offset, bits in self.bitmaps.get(ca, ()):
                if cert.serial and cert.serial >= offset and (bits >> (cert.serial - offset)) & 1:
                    return "serial %d" % cert.serial
            if cert.key_id in self.key_ids.get(ca, ()):
                return "key id"
        if self.key_revoked(cert.key_raw32):
            return "key"
        if self.key_blob_revoked(cert.ca_blob):
            return "CA key"
        return None


def parse_revocations(data: bytes, source: str = "<revocations>") -> "Revocations":
    """A KRL (binary, starting with ``SSHKRL\\n\\0``) or a plain list of public keys."""
    if not isinstance(data, (bytes, bytearray)) or len(data) > MAX_REVOCATION_BYTES:
        raise KrlError("%s: missing or over %d bytes" % (source, MAX_REVOCATION_BYTES))
    data = bytes(data)
    if data.startswith(KRL_MAGIC):
        return _parse_krl(data, source)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise KrlError("%s: neither a KRL nor a UTF-8 key list" % source) from None
    return _parse_key_list(text, source)


def _parse_key_list(text: str, source: str) -> "Revocations":
    out = Revocations()
    for line_no, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) < 2:
            raise KrlError("%s:%d: not a public key line" % (source, line_no))
        try:
            blob = base64.b64decode(parts[1].encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError, ValueError):
            raise KrlError("%s:%d: key is not base64" % (source, line_no)) from None
        if parts[0].endswith("-cert-v01@openssh.com"):
            try:
                blob = ssh_pubkey_blob(parse_certificate(blob).key_raw32)
            except CertError as exc:
                raise KrlError("%s:%d: %s" % (source, line_no, exc)) from None
        out.keys.add(blob)  # other key types can never match an ed25519 key: harmless
    return out


def _parse_krl(data: bytes, source: str) -> "Revocations":
    r = _Reader(data, source)
    r.take(len(KRL_MAGIC))
    if r.u32() != KRL_FORMAT_VERSION:
        raise KrlError("%s: unsupported KRL format version" % source)
    out = Revocations()
    out.version = r.u64()
    r.u64()  # generated_date
    r.u64()  # flags
    r.string()  # reserved
    r.string()  # comment
    while not r.done():
        kind = r.byte()
        body = r.string()
        if kind == SECTION_CERTIFICATES:
            _cert_section(_Reader(body, source + " certificates section"), out)
        elif kind in (SECTION_EXPLICIT_KEY, SECTION_FINGERPRINT_SHA1,
                      SECTION_FINGERPRINT_SHA256):
            _key_section(kind, _Reader(body, source + " key section"), out)
        elif kind == SECTION_EXTENSION:
            _extension(_Reader(body, source + " extension"))
        else:  # includes SECTION_SIGNATURE, which OpenSSH >= 9.4 refuses too
            raise KrlError("%s: unsupported KRL section type %d" % (source, kind))
    return out


def _extension(r: _Reader) -> None:
    name = r.string()
    critical = r.byte()
    r.string()
    if critical:
        raise KrlError("%s: unsupported critical extension %s"
                       % (r.what, name[:64].decode("ascii", "replace")))


def _key_section(kind: int, r: _Reader, out: "Revocations") -> None:
    target = {SECTION_EXPLICIT_KEY: out.keys, SECTION_FINGERPRINT_SHA1: out.sha1,
              SECTION_FINGERPRINT_SHA256: out.sha256}[kind]
    size = {SECTION_FINGERPRINT_SHA1: 20, SECTION_FINGERPRINT_SHA256: 32}.get(kind)
    while not r.done():
        item = r.string()
        if size is not None and len(item) != size:
            raise KrlError("%s: hash of %d bytes" % (r.what, len(item)))
        target.add(item)


def _cert_section(r: _Reader, out: "Revocations") -> None:
    ca = r.string()
    r.string()  # reserved
    ranges = out.serials.setdefault(ca, [])
    ids = out.key_ids.setdefault(ca, set())
    while not r.done():
        kind = r.byte()
        sub = _Reader(r.string(), r.what)
        if kind == CERT_SERIAL_LIST:
            while not sub.done():
                s = sub.u64()
                ranges.append((s, s))
        elif kind == CERT_SERIAL_RANGE:
            lo, hi = sub.u64(), sub.u64()
            if lo > hi:
                raise KrlError("%s: serial range %d > %d" % (r.what, lo, hi))
            ranges.append((lo, hi))
        elif kind == CERT_SERIAL_BITMAP:
            out.bitmaps.setdefault(ca, []).append(_bitmap(sub))
        elif kind == CERT_KEY_ID:
            while not sub.done():
                try:
                    ids.add(sub.string().decode("utf-8"))
                except UnicodeDecodeError:
                    raise KrlError("%s: key id is not UTF-8" % r.what) from None
        elif kind == CERT_EXTENSION:
            _extension(sub)
        else:
            raise KrlError("%s: unsupported certificate subsection %d" % (r.what, kind))
        if kind != CERT_EXTENSION and not sub.done():
            raise KrlError("%s: trailing bytes in subsection %d" % (r.what, kind))


def _bitmap(r: _Reader) -> Tuple[int, int]:
    """``(offset, bits)``: kept as one integer, tested per serial (never expanded)."""
    offset = r.u64()
    bits = r.string()
    if len(bits) > MAX_BITMAP_BYTES:
        raise KrlError("%s: serial bitmap over %d bytes" % (r.what, MAX_BITMAP_BYTES))
    if bits and bits[0] & 0x80:
        raise KrlError("%s: negative serial bitmap" % r.what)
    return offset, int.from_bytes(bits, "big")
