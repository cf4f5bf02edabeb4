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
which an idle agent does not pay.

Which library, when ``REMOTE_GEVENT_AEAD`` (``openssl`` | ``libsodium``) does not say:
libsodium in the agent — the import's 6 MiB would put an agent with one session at
44 MiB, over the 40 MB goal of issue 6, and field gateways are short of memory — and
OpenSSL in the console (``console.cli`` calls :func:`use_backend`), where memory is
plentiful and the CPU per byte is what counts. A device with a weak CPU and memory to
spare sets ``REMOTE_GEVENT_AEAD=openssl`` for its agent (docs/performance.md).
"""

import os
from typing import Any, Optional

ENV = "REMOTE_GEVENT_AEAD"
BACKENDS = ("openssl", "libsodium")

_default_backend = "libsodium"

_checked = False
_aesgcm: Any = None  # the AESGCM class, or None (unusable here)
_invalid_tag: Any = None


def use_backend(name: str) -> None:
    """The library used when ``REMOTE_GEVENT_AEAD`` is unset (before the first tunnel)."""
    global _default_backend, _checked, _aesgcm
    if name not in BACKENDS:
        raise ValueError("AEAD backend must be one of %s" % ", ".join(BACKENDS))
    _default_backend, _checked, _aesgcm = name, False, None


def _load() -> None:
    global _checked, _aesgcm, _invalid_tag
    _checked = True
    if (os.environ.get(ENV, "").strip().lower() or _default_backend) != "openssl":
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
