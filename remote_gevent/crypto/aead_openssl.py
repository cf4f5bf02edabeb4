"""AES-256-GCM through OpenSSL (``cryptography``'s ``AESGCM``) for the tunnel frames.

Same algorithm, nonce, tag and AAD as libsodium's ``crypto_aead_aes256gcm`` (the wire
does not change and either end may use either library), but OpenSSL's implementation
uses the CPU's wide AES and carry-less multiply instructions (VAES/AVX2/AVX-512 where
present): measured on the 2-core benchmark machine (issue 17), 64 KiB frames, sealing
0.31 s/GiB against libsodium's 0.94 s/GiB.  The tunnel's sender and receiver each
spend that per byte, so it is the largest single cost on the data path after the
system calls.

Only ``cryptography`` with ``encrypt_into``/``decrypt_into`` (no intermediate
``bytes``, the frame is written in place) is used; older ones (Python 3.6 devices:
cryptography < 41) and any import failure fall back to libsodium.  Imported on the
first AES-GCM tunnel only, never at agent start: the import costs about 6 MiB of RSS,
which an idle agent does not pay.  ``REMOTE_GEVENT_AEAD=libsodium`` in the environment
keeps libsodium (memory-tight devices; before/after measurements).
"""

import os
from typing import Any, Optional

ENV = "REMOTE_GEVENT_AEAD"

_checked = False
_aesgcm: Any = None  # the AESGCM class, or None (unusable here)
_invalid_tag: Any = None


def _load() -> None:
    global _checked, _aesgcm, _invalid_tag
    _checked = True
    if os.environ.get(ENV, "").strip().lower() == "libsodium":
        return
    try:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        if not (hasattr(AESGCM, "encrypt_into") and hasattr(AESGCM, "decrypt_into")):
            return
        # Known-answer check against libsodium: the two must be interchangeable.
        import nacl.bindings

        key, nonce = bytes(range(32)), bytes(range(12))
        want = nacl.bindings.crypto_aead_aes256gcm_encrypt(b"probe", b"aad", nonce, key)
        out = bytearray(len(want))
        AESGCM(key).encrypt_into(nonce, b"probe", b"aad", out)
        if bytes(out) != want:
            return
    except Exception:  # noqa: BLE001 - any failure: libsodium stays in use
        return
    _aesgcm, _invalid_tag = AESGCM, InvalidTag


def aes256gcm(key: bytes) -> Optional[Any]:
    """An OpenSSL AES-256-GCM context for ``key``, or None to use libsodium."""
    if not _checked:
        _load()
    if _aesgcm is None:
        return None
    return _aesgcm(key)


def invalid_tag() -> Any:
    """The exception a failed ``decrypt_into`` raises (valid once a context exists)."""
    return _invalid_tag
