"""INSECURE no-crypto frame sealer/opener for benchmarks and tests.

They have the interface of ``tunnel_crypto.FrameSealer``/``FrameOpener`` (length prefix,
counter, the same size limits and failure modes) and no encryption or authentication:
the mux benchmarks use them to measure the multiplexer alone, the mux tests to craft
frames a peer could send after decryption. They live outside the product package so
that nothing shipped can build a plaintext tunnel.
"""

from remote_gevent.crypto.tunnel_crypto import (
    _LEN,
    LEN_BYTES,
    MAX_PLAINTEXT,
    FrameAuthError,
    FrameTooLarge,
)


class PlainSealerNoCrypto:
    """INSECURE: frames with no encryption and no authentication.

    Same interface as ``FrameSealer``, for benchmarks and tests only: the product
    cannot construct it (it lives outside the package).
    """

    cipher = "none"

    def __init__(self, key: bytes = b"", cipher: str = "none") -> None:
        self._counter = 0

    @property
    def counter(self) -> int:
        return self._counter

    def seal(self, plaintext: bytes) -> bytearray:
        n = len(plaintext)
        if n > MAX_PLAINTEXT:
            raise FrameTooLarge("plaintext of %d bytes exceeds %d" % (n, MAX_PLAINTEXT))
        out = bytearray(LEN_BYTES + n)
        _LEN.pack_into(out, 0, n)
        out[LEN_BYTES:] = plaintext
        self._counter += 1
        return out


class PlainOpenerNoCrypto:
    """INSECURE counterpart of PlainSealerNoCrypto (benchmarks and tests only)."""

    cipher = "none"

    def __init__(self, key: bytes = b"", cipher: str = "none") -> None:
        self._counter = 0
        self._dead = False

    @property
    def counter(self) -> int:
        return self._counter

    @property
    def dead(self) -> bool:
        return self._dead

    def frame_length(self, len_prefix: bytes) -> int:
        if self._dead:
            raise FrameAuthError("opener is dead after an earlier failure")
        if len(len_prefix) != LEN_BYTES:
            self._dead = True
            raise FrameAuthError("truncated length prefix")
        (n,) = _LEN.unpack(len_prefix)
        if n > MAX_PLAINTEXT:
            self._dead = True
            raise FrameTooLarge("frame of %d bytes exceeds %d" % (n, MAX_PLAINTEXT))
        return n

    def open(self, len_prefix: bytes, ciphertext: bytes) -> bytearray:
        n = self.frame_length(len_prefix)
        if len(ciphertext) != n:
            self._dead = True
            raise FrameAuthError("frame length does not match its prefix")
        self._counter += 1
        return bytearray(ciphertext)


# Short aliases named in the brief; both names say "plain".
PlainSealer = PlainSealerNoCrypto
PlainOpener = PlainOpenerNoCrypto
