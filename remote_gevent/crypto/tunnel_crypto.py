"""End-to-end tunnel crypto: key exchange and per-frame AEAD with counter nonces.

The relay only ever sees the wire frames produced here. Each session:

1. the console sends its ephemeral curve25519 public key in the signed
   ``session.request``; the agent answers with its own in the signed
   ``session.accept`` (see :mod:`remote_gevent.wire.protocol`);
2. both run libsodium ``crypto_kx`` (console = client, agent = server), which
   yields one key per direction, already bound to both public keys;
3. each kx key is then hashed with keyed BLAKE2b over ``session_id`` and a
   direction label, so a key can only ever be used for that one session and
   that one direction (a frame reflected back to its sender cannot open);
4. every frame is sealed with an AEAD whose nonce is a per-direction 64-bit
   counter starting at 0. The receiver expects exactly the next counter, so
   a tampered, replayed, dropped, reordered or truncated frame fails
   authentication, and the opener then refuses everything after it.

Wire frame: ``len:u32be | ciphertext``; the 4 length bytes are the AAD, so
the length itself is authenticated.

Performance: AES-256-GCM goes through OpenSSL when ``cryptography`` offers
``encrypt_into`` (:mod:`aead_openssl`: same wire format, about 3x faster than
libsodium's on the benchmark machine). Otherwise seal/open are one libsodium
call each, writing straight into the output buffer (no intermediate ``bytes``
objects, no concatenation). We call libsodium through PyNaCl's cffi module
(``nacl._sodium``) rather than its Python wrappers because those allocate a
zeroed cffi buffer and then copy it into ``bytes``: about 30% slower for
AES-256-GCM on 64 KiB frames.
"""

import collections
import struct
import sys
import time
from typing import Deque, Optional, Tuple

import nacl.bindings
import nacl.encoding
import nacl.hash
from nacl._sodium import ffi, lib

from remote_gevent.crypto import aead_openssl

AES256GCM = "aes256gcm"
XCHACHA20POLY1305 = "xchacha20poly1305"
CIPHERS = (AES256GCM, XCHACHA20POLY1305)

ROLE_CONSOLE = "console"
ROLE_AGENT = "agent"

KEY_BYTES = 32
TAG_BYTES = 16  # both ciphers
FRAME_HEADER_BYTES = 5  # frame type u8, stream id u32be (parsed by mux, counted here)
MAX_PAYLOAD = 65536
MAX_PLAINTEXT = MAX_PAYLOAD + FRAME_HEADER_BYTES
MAX_CIPHERTEXT = MAX_PLAINTEXT + TAG_BYTES  # largest legal value of ``len``
LEN_BYTES = 4

# Full-size frames a sealer keeps for reuse (see FrameSealer._new_frame): 80 x 64 KiB, more
# than the default resend buffer (4 MiB) holds, so the oldest is normally acknowledged.
SPARE_FRAMES = 80
# The spares are dropped when a small frame is sealed this long after the last full one
# (a keepalive PING at the latest): an idle session does not keep them.
SPARE_IDLE_SECONDS = 5.0
_FULL_FRAME = LEN_BYTES + MAX_CIPHERTEXT
# CPython: a spare frame is free again when only the spare list (and getrefcount's own
# argument) refers to it. Elsewhere (no getrefcount) frames are never reused.
_refcount = getattr(sys, "getrefcount", None)

# Largest counter value ever used; the next frame is refused rather than
# wrapping the nonce around (nonce reuse would be catastrophic for both
# ciphers). 2**64 frames is unreachable in practice, but the check is free.
MAX_COUNTER = 2 ** 64 - 1

_KDF_PERSON = b"rg1-tunnel-key"  # BLAKE2b personalisation, <= 16 bytes
_LABEL_CONSOLE_TO_AGENT = b"\0console->agent"
_LABEL_AGENT_TO_CONSOLE = b"\0agent->console"

_LEN = struct.Struct(">I")
_COUNTER = struct.Struct("<Q")


class FrameError(Exception):
    """Base class of tunnel frame errors."""


class FrameAuthError(FrameError):
    """A received frame failed authentication (or the opener is dead).

    The tunnel must end with close code ``crypto_error``.
    """


class FrameTooLarge(FrameAuthError):
    """A frame exceeds :data:`MAX_PLAINTEXT` (seal) / :data:`MAX_CIPHERTEXT` (open).

    On the sealing side this is a caller bug (mux must split payloads); on
    the opening side it is hostile or corrupt input, hence a FrameAuthError.
    """


class CounterExhausted(FrameError):
    """The 64-bit nonce counter is used up; the session must be re-keyed."""


# ---------------------------------------------------------------- key exchange


def kx_keypair() -> Tuple[bytes, bytes]:
    """Return a fresh ephemeral curve25519 ``(public_key, secret_key)`` (32 bytes each)."""
    return nacl.bindings.crypto_kx_keypair()


def _bind(kx_key: bytes, session_id: str, label: bytes) -> bytes:
    return nacl.hash.blake2b(
        session_id.encode("ascii") + label,
        digest_size=KEY_BYTES,
        key=kx_key,
        person=_KDF_PERSON,
        encoder=nacl.encoding.RawEncoder,
    )


def derive_keys(
    role: str, my_pk: bytes, my_sk: bytes, peer_pk: bytes, session_id: str
) -> Tuple[bytes, bytes]:
    """Return ``(tx_key, rx_key)`` for this side of session ``session_id``.

    The console is the crypto_kx client, the agent the server; so the
    console's tx key equals the agent's rx key and vice versa. Raises
    ``ValueError`` for a bad role or key length and
    ``nacl.exceptions.CryptoError`` for a degenerate peer key.
    """
    for name, value in (("my_pk", my_pk), ("my_sk", my_sk), ("peer_pk", peer_pk)):
        if not isinstance(value, bytes) or len(value) != 32:
            raise ValueError("%s must be 32 bytes" % name)
    if role == ROLE_CONSOLE:
        rx, tx = nacl.bindings.crypto_kx_client_session_keys(my_pk, my_sk, peer_pk)
        return (
            _bind(tx, session_id, _LABEL_CONSOLE_TO_AGENT),
            _bind(rx, session_id, _LABEL_AGENT_TO_CONSOLE),
        )
    if role == ROLE_AGENT:
        rx, tx = nacl.bindings.crypto_kx_server_session_keys(my_pk, my_sk, peer_pk)
        return (
            _bind(tx, session_id, _LABEL_AGENT_TO_CONSOLE),
            _bind(rx, session_id, _LABEL_CONSOLE_TO_AGENT),
        )
    raise ValueError("role must be %r or %r, not %r" % (ROLE_CONSOLE, ROLE_AGENT, role))


# ---------------------------------------------------------------- ciphers

_aes_available: Optional[bool] = None


def aes256gcm_available() -> bool:
    """True when libsodium can do AES-256-GCM here (needs AES-NI / ARMv8 crypto).

    Checked once by an actual encryption, not only by the presence of the
    binding: older libsodium builds and CPUs without AES instructions raise.
    """
    global _aes_available
    if _aes_available is None:
        ok = False
        if hasattr(nacl.bindings, "crypto_aead_aes256gcm_encrypt"):
            try:
                key = bytes(32)
                nonce = bytes(12)
                ct = nacl.bindings.crypto_aead_aes256gcm_encrypt(b"probe", b"", nonce, key)
                ok = nacl.bindings.crypto_aead_aes256gcm_decrypt(ct, b"", nonce, key) == b"probe"
            except Exception:  # noqa: BLE001 - any failure means "not usable"
                ok = False
        _aes_available = ok
    return _aes_available


def choose_cipher(preferred: str = AES256GCM) -> str:
    """Return the cipher to use: ``preferred`` if usable here, else XChaCha20-Poly1305.

    The agent calls this with the cipher named in the session request; the
    name it returns goes into ``session.accept`` and both sides use it.
    """
    if preferred == AES256GCM and aes256gcm_available():
        return AES256GCM
    return XCHACHA20POLY1305


def _cipher_funcs(cipher: str):
    if cipher == AES256GCM:
        if not aes256gcm_available():
            raise ValueError("aes256gcm is not available on this machine")
        return (
            lib.crypto_aead_aes256gcm_encrypt,
            lib.crypto_aead_aes256gcm_decrypt,
            nacl.bindings.crypto_aead_aes256gcm_NPUBBYTES,
        )
    if cipher == XCHACHA20POLY1305:
        return (
            lib.crypto_aead_xchacha20poly1305_ietf_encrypt,
            lib.crypto_aead_xchacha20poly1305_ietf_decrypt,
            nacl.bindings.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES,
        )
    raise ValueError("unknown cipher %r (expected one of %s)" % (cipher, ", ".join(CIPHERS)))


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise ValueError("key must be %d bytes" % KEY_BYTES)
    return key


# ---------------------------------------------------------------- frames


class FrameSealer:
    """Seals outgoing frames for one direction of one session.

    Not thread/greenlet safe: the caller serializes seal + send (the counter
    order must equal the order on the wire).
    """

    __slots__ = ("cipher", "_key", "_encrypt", "_pad", "_counter", "_gcm", "_spares",
                 "_last_full")

    def __init__(self, key: bytes, cipher: str) -> None:
        self._key = _check_key(key)
        self._encrypt, _, npub = _cipher_funcs(cipher)
        self.cipher = cipher
        self._pad = bytes(npub - 8)
        self._counter = 0
        # OpenSSL's AES-256-GCM when usable (same wire format, ~3x faster here)
        self._gcm = aead_openssl.aes256gcm(key) if cipher == AES256GCM else None
        self._spares: Deque[bytearray] = collections.deque()
        self._last_full = 0.0  # time.monotonic() of the last full-size frame

    @property
    def counter(self) -> int:
        """Number of frames sealed so far (= nonce of the next frame)."""
        return self._counter

    def seal(self, plaintext: bytes) -> bytearray:
        """Return the full wire frame ``len:u32be | ciphertext`` for ``plaintext``.

        ``plaintext`` may be any bytes-like object. The result is a fresh
        ``bytearray`` (bytes-like, ready for ``sendall``; no extra copy).
        """
        n = len(plaintext)
        if n > MAX_PLAINTEXT:
            raise FrameTooLarge("plaintext of %d bytes exceeds %d" % (n, MAX_PLAINTEXT))
        counter = self._counter
        if counter > MAX_COUNTER:
            raise CounterExhausted("nonce counter exhausted")
        clen = n + TAG_BYTES
        if clen == MAX_CIPHERTEXT:
            out = self._new_frame()
        else:
            out = bytearray(LEN_BYTES + clen)
            if self._spares and time.monotonic() - self._last_full > SPARE_IDLE_SECONDS:
                self._spares.clear()
        _LEN.pack_into(out, 0, clen)
        gcm = self._gcm
        if gcm is not None:
            gcm.encrypt_into(_COUNTER.pack(counter) + self._pad, plaintext,
                             _LEN.pack(clen), memoryview(out)[LEN_BYTES:])
            self._counter = counter + 1
            return out
        buf = ffi.from_buffer(out)
        rc = self._encrypt(
            buf + LEN_BYTES, ffi.NULL,
            ffi.from_buffer(plaintext), n,
            buf, LEN_BYTES,
            ffi.NULL, _COUNTER.pack(counter) + self._pad, self._key,
        )
        if rc != 0:  # pragma: no cover - libsodium encrypt does not fail
            raise FrameError("encryption failed")
        self._counter = counter + 1
        return out

    def _new_frame(self) -> bytearray:
        """A full-size output frame: the oldest of the last SPARE_FRAMES full frames this
        sealer made if nothing else refers to it any more (sent, and dropped from the
        tunnel's resend buffer once acknowledged), else a new one.

        Why: bulk frames are acknowledged (resume) in batches of 8 or more, so 0.5 MiB
        or more of 64 KiB frames is freed at once; glibc then hands the top of the heap
        back to the kernel (trim threshold 128 KiB) and the next frames fault their pages
        in again: 0.3-0.45 s/GiB in a micro-benchmark, 10-12 % of the sender's CPU in the
        bulk profiles (docs/performance.md, issue 17). A reused frame is overwritten
        completely (length prefix + ciphertext) and is only reused when unreferenced,
        so no frame still held for a resend can change. Cost: up to SPARE_FRAMES x
        64 KiB (5 MiB) per sealer while it sends bulk data, dropped SPARE_IDLE_SECONDS
        after (SPARE_FRAMES = 16 left 5.5 % of the samples in fresh allocations: in bulk
        the resend buffer holds more than 16 unacknowledged frames)."""
        self._last_full = time.monotonic()
        spares = self._spares
        if spares and _refcount is not None and _refcount(spares[0]) == 2:
            out = spares.popleft()  # the deque's reference + getrefcount's argument
        else:
            out = bytearray(_FULL_FRAME)
            if len(spares) >= SPARE_FRAMES:
                spares.popleft()  # still in use elsewhere: let it go
        spares.append(out)
        return out


class FrameOpener:
    """Opens incoming frames for one direction of one session.

    Any failure kills the opener: every later call raises FrameAuthError,
    so nothing received after a bad frame can ever be delivered.
    """

    __slots__ = ("cipher", "_key", "_decrypt", "_pad", "_counter", "_dead", "_gcm")

    def __init__(self, key: bytes, cipher: str) -> None:
        self._key = _check_key(key)
        _, self._decrypt, npub = _cipher_funcs(cipher)
        self.cipher = cipher
        self._pad = bytes(npub - 8)
        self._counter = 0
        self._dead = False
        self._gcm = aead_openssl.aes256gcm(key) if cipher == AES256GCM else None

    @property
    def counter(self) -> int:
        """Number of frames opened so far (= nonce expected next)."""
        return self._counter

    @property
    def dead(self) -> bool:
        return self._dead

    def _fail(self, exc_type, message: str):
        self._dead = True
        return exc_type(message)

    def frame_length(self, len_prefix: bytes) -> int:
        """Parse and bound-check the 4-byte length prefix; return the ciphertext size.

        The reader calls this before reading the body, so a hostile length
        never makes it allocate or wait for more than MAX_CIPHERTEXT bytes.
        """
        if self._dead:
            raise FrameAuthError("tunnel opener is dead after an earlier failure")
        if len(len_prefix) != LEN_BYTES:
            raise self._fail(FrameAuthError, "truncated length prefix")
        (clen,) = _LEN.unpack(len_prefix)
        if clen > MAX_CIPHERTEXT:
            raise self._fail(FrameTooLarge, "frame of %d bytes exceeds %d" % (clen, MAX_CIPHERTEXT))
        if clen < TAG_BYTES:
            raise self._fail(FrameAuthError, "frame of %d bytes is shorter than a tag" % clen)
        return clen

    def open(self, len_prefix: bytes, ciphertext: bytes) -> bytearray:
        """Authenticate and decrypt one frame; return its plaintext (a fresh bytearray).

        ``ciphertext`` may be any bytes-like object (e.g. a memoryview of the
        receive buffer). Raises FrameAuthError (or its subclass FrameTooLarge).
        """
        clen = self.frame_length(len_prefix)
        if len(ciphertext) != clen:
            raise self._fail(FrameAuthError, "frame length does not match its prefix")
        counter = self._counter
        if counter > MAX_COUNTER:
            raise self._fail(FrameAuthError, "nonce counter exhausted")
        out = bytearray(clen - TAG_BYTES)
        gcm = self._gcm
        if gcm is not None:
            try:
                gcm.decrypt_into(_COUNTER.pack(counter) + self._pad, ciphertext,
                                 len_prefix, out)
            except aead_openssl.invalid_tag():
                raise self._fail(FrameAuthError,
                                 "frame %d failed authentication" % counter) from None
            self._counter = counter + 1
            return out
        rc = self._decrypt(
            ffi.from_buffer(out), ffi.NULL, ffi.NULL,
            ffi.from_buffer(ciphertext), clen,
            ffi.from_buffer(len_prefix), LEN_BYTES,
            _COUNTER.pack(counter) + self._pad, self._key,
        )
        if rc != 0:
            raise self._fail(FrameAuthError, "frame %d failed authentication" % counter)
        self._counter = counter + 1
        return out


# ---------------------------------------------------------------- plain (no crypto)


def make_sealer_opener(tx_key: bytes, rx_key: bytes, cipher: str):
    """Return ``(sealer, opener)`` for a tunnel; an unknown cipher name raises instead of
    falling back. There is no plaintext variant in the product: the no-crypto doubles
    the benchmarks and tests use live in ``benchmarks/plain_frames.py``."""
    return FrameSealer(tx_key, cipher), FrameOpener(rx_key, cipher)
