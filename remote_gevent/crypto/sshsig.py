"""OpenSSH signatures (``ssh-keygen -Y sign``, PROTOCOL.sshsig), ed25519 only: how a CA
signs the fleet-wide revocation list (OpenSSH recommends SSHSIG for KRLs, whose own
signature sections it no longer loads)."""

import base64
import binascii
import hashlib
import struct
from typing import Tuple

import nacl.exceptions
import nacl.signing

BEGIN = "-----BEGIN SSH SIGNATURE-----"
END = "-----END SSH SIGNATURE-----"
MAGIC = b"SSHSIG"
MAX_ARMORED = 4096
_HASHES = {"sha256": hashlib.sha256, "sha512": hashlib.sha512}


class SigError(ValueError):
    """The signature is malformed, of another namespace or key type, or does not verify."""


def _strings(data: bytes, count: int) -> Tuple[bytes, ...]:
    out = []
    pos = 0
    for _ in range(count):
        if pos + 4 > len(data):
            raise SigError("signature truncated")
        n = struct.unpack(">I", data[pos:pos + 4])[0]
        if pos + 4 + n > len(data):
            raise SigError("signature truncated")
        out.append(data[pos + 4:pos + 4 + n])
        pos += 4 + n
    if pos != len(data):
        raise SigError("trailing bytes after the signature")
    return tuple(out)


def _s(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def verify(armored: str, message: bytes, namespace: str) -> bytes:
    """The raw 32-byte ed25519 key that made ``armored`` over ``message`` in ``namespace``;
    SigError otherwise. The caller decides whether it trusts that key."""
    text = armored.strip() if isinstance(armored, str) else ""
    if not text.startswith(BEGIN) or not text.endswith(END) or len(text) > MAX_ARMORED:
        raise SigError("not an armored SSH signature")
    try:
        blob = base64.b64decode("".join(text[len(BEGIN):-len(END)].split()), validate=True)
    except (binascii.Error, ValueError):
        raise SigError("signature is not base64") from None
    if blob[:6] != MAGIC or len(blob) < 10 or struct.unpack(">I", blob[6:10])[0] != 1:
        raise SigError("not an SSHSIG version 1 signature")
    pubkey, ns, reserved, hash_alg, sig = _strings(blob[10:], 5)
    key_type, raw = _strings(pubkey, 2)
    if key_type != b"ssh-ed25519" or len(raw) != 32:
        raise SigError("only ssh-ed25519 signatures are supported")
    if ns != namespace.encode():
        raise SigError("signature namespace is not %s" % namespace)
    hasher = _HASHES.get(hash_alg.decode("ascii", "replace"))
    if hasher is None:
        raise SigError("unsupported hash algorithm")
    sig_type, sig_raw = _strings(sig, 2)
    if sig_type != b"ssh-ed25519" or len(sig_raw) != 64:
        raise SigError("not an ed25519 signature")
    signed = MAGIC + _s(ns) + _s(reserved) + _s(hash_alg) + _s(hasher(message).digest())
    try:
        nacl.signing.VerifyKey(raw).verify(signed, sig_raw)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError,
            nacl.exceptions.TypeError):
        raise SigError("signature does not verify") from None
    return raw
