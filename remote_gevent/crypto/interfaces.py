"""The interfaces the crypto objects present, written down (``typing.Protocol``).

Code that signs control messages or seals tunnel frames depends on these, not on a
class: the agent's :class:`identity.IdentityKey` and an operator's key are both a
:class:`Signer`; :class:`tunnel_crypto.FrameSealer`/``FrameOpener`` are a
:class:`Sealer`/:class:`Opener` (and so are the no-crypto doubles the benchmarks use).
"""

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING or sys.version_info >= (3, 8):
    from typing import Protocol  # novermin - 3.6/3.7 take the branch below
else:
    # The agent runs on 3.6 and 3.7 too (issue 16). These classes are only ever read by
    # people and the type checker, never instantiated or checked with isinstance, so a
    # plain base is all that old interpreters need.
    Protocol = object


class Signer(Protocol):
    """An ED25519 key that signs: the agent's identity, an operator's key."""

    @property
    def fingerprint(self) -> str:
        """``SHA256:…``, as ``ssh-keygen -lf`` prints it."""

    @property
    def public_bytes(self) -> bytes:
        """The raw 32-byte public key."""

    def sign(self, data: bytes) -> bytes:
        """The raw 64-byte signature of ``data``."""


class Sealer(Protocol):
    """Seals one direction's frames: counter nonces, the length prefix included."""

    cipher: str

    @property
    def counter(self) -> int:
        """Frames sealed so far (the next nonce)."""

    def seal(self, plaintext: bytes) -> bytearray:
        """The full wire frame of ``plaintext``."""


class Opener(Protocol):
    """Opens the other direction's frames, in order; dead after any failure."""

    cipher: str

    @property
    def counter(self) -> int:
        """Frames opened so far."""

    @property
    def dead(self) -> bool:
        """True once a frame failed: nothing more is opened."""

    def frame_length(self, len_prefix: bytes) -> int:
        """The ciphertext length announced by a 4-byte prefix (checked)."""

    def open(self, len_prefix: bytes, ciphertext: bytes) -> bytearray:
        """The plaintext of one frame; raises ``FrameAuthError``."""
