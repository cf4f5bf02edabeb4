"""The agent's long-term ED25519 identity key.

The key file is an OpenSSH private key (``ssh-keygen -y -f`` reads it), created with
mode 0600 from the first byte and put in place atomically (temp file, fsync,
rename, fsync of the directory), so a crash never leaves a half-written or
world-readable key.  A PKCS#8 PEM key is accepted as well.  Like OpenSSH, a key
file that group or others can read is refused.

The ``openssh-key-v1`` format (unencrypted, one ed25519 key) is read and written here
with the standard library and PyNaCl only: ``cryptography`` (several MiB of resident
memory) is imported lazily, only to read a PKCS#8 PEM key.

Module functions about ssh-wire public keys (``ssh_pubkey_blob``, ``fingerprint_of``,
``parse_ssh_ed25519_line``) are shared with the authorized_keys and protocol code.
"""

import base64
import binascii
import hashlib
import logging
import os
import socket
import stat
import struct
from typing import Optional, Tuple

import nacl.exceptions
import nacl.signing

from remote_gevent.common import fsutil

log = logging.getLogger(__name__)

KEY_TYPE = "ssh-ed25519"
SIGNATURE_SIZE = 64
PUBLIC_KEY_SIZE = 32


class IdentityError(Exception):
    """The identity key cannot be loaded, created or replaced."""


# --------------------------------------------------------------------------- ssh wire


def _ssh_string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def ssh_pubkey_blob(raw32: bytes) -> bytes:
    """The ssh-wire public key blob: string "ssh-ed25519" + string key."""
    if len(raw32) != PUBLIC_KEY_SIZE:
        raise ValueError("an ed25519 public key is 32 bytes")
    return _ssh_string(KEY_TYPE.encode()) + _ssh_string(bytes(raw32))


def fingerprint_of(raw32: bytes) -> str:
    """``SHA256:…`` fingerprint, byte for byte what ``ssh-keygen -lf`` prints."""
    digest = hashlib.sha256(ssh_pubkey_blob(raw32)).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def public_line_of(raw32: bytes, comment: str = "") -> str:
    """``ssh-ed25519 AAAA… comment`` (no trailing newline)."""
    line = "%s %s" % (KEY_TYPE, base64.b64encode(ssh_pubkey_blob(raw32)).decode("ascii"))
    return "%s %s" % (line, comment) if comment else line


def parse_ssh_ed25519_line(line: str) -> Tuple[bytes, str]:
    """Parse ``ssh-ed25519 AAAA… [comment]`` → (raw 32-byte key, comment).

    Raises ValueError if the line is not a well-formed ssh-ed25519 public key
    (the type inside the blob must match, the blob must have no trailing bytes).
    """
    parts = line.strip().split(None, 2)
    if len(parts) < 2 or parts[0] != KEY_TYPE:
        raise ValueError("not an ssh-ed25519 public key line")
    try:
        blob = base64.b64decode(parts[1].encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError("public key is not valid base64") from None
    try:
        (n,) = struct.unpack(">I", blob[:4])
        ktype = blob[4:4 + n]
        (m,) = struct.unpack(">I", blob[4 + n:8 + n])
        raw = blob[8 + n:8 + n + m]
    except struct.error:
        raise ValueError("truncated public key blob") from None
    if ktype != KEY_TYPE.encode() or m != PUBLIC_KEY_SIZE or len(raw) != PUBLIC_KEY_SIZE \
            or len(blob) != 8 + n + m:
        raise ValueError("malformed ssh-ed25519 public key blob")
    return raw, parts[2] if len(parts) > 2 else ""


def verify(public_raw32: bytes, data: bytes, signature: bytes) -> bool:
    """True if ``signature`` (raw 64 bytes) is ``public_raw32``'s signature of ``data``."""
    if len(signature) != SIGNATURE_SIZE or len(public_raw32) != PUBLIC_KEY_SIZE:
        return False
    try:
        nacl.signing.VerifyKey(bytes(public_raw32)).verify(bytes(data), bytes(signature))
    except nacl.exceptions.BadSignatureError:
        return False
    return True


def default_comment(ident: Optional[str]) -> str:
    """``<ident>@<hostname>`` as in the published key line."""
    return "%s@%s" % (ident or "remote-gevent", socket.gethostname())


# --------------------------------------------------------------------------- the key


class IdentityKey:
    """An ED25519 key pair (nacl ``SigningKey`` inside)."""

    #: An operator key's OpenSSH certificate (wire blob of ``<key>-cert.pub``), sent
    #: with each signed request when set (crypto/sshcert.py); None for a plain key.
    certificate: Optional[bytes] = None

    def __init__(self, signing_key: nacl.signing.SigningKey, path: Optional[str] = None) -> None:
        self.signing_key = signing_key
        self.path = path

    @classmethod
    def generate(cls) -> "IdentityKey":
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes, path: Optional[str] = None) -> "IdentityKey":
        return cls(nacl.signing.SigningKey(bytes(seed)), path)

    @property
    def public_bytes(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.public_bytes)

    def public_line(self, comment: str = "") -> str:
        return public_line_of(self.public_bytes, comment)

    def sign(self, data: bytes) -> bytes:
        """Raw 64-byte ED25519 signature of ``data``."""
        return self.signing_key.sign(bytes(data)).signature

    def verify(self, data: bytes, signature: bytes) -> bool:
        return verify(self.public_bytes, data, signature)

    def openssh_private_bytes(self, comment: str = "") -> bytes:
        """The key as an unencrypted OpenSSH private-key file."""
        return openssh_private_bytes(bytes(self.signing_key), self.public_bytes, comment)

    def __repr__(self) -> str:  # never show key material
        return "IdentityKey(%s)" % self.fingerprint


# --------------------------------------------------------------------------- openssh-key-v1

_OPENSSH_BEGIN = b"-----BEGIN OPENSSH PRIVATE KEY-----"
_OPENSSH_END = b"-----END OPENSSH PRIVATE KEY-----"
_OPENSSH_MAGIC = b"openssh-key-v1\0"
_OPENSSH_BLOCK = 8  # cipher "none": padding to a multiple of 8


def openssh_private_bytes(seed: bytes, public: bytes, comment: str = "") -> bytes:
    """An unencrypted ``openssh-key-v1`` file holding one ed25519 key (PROTOCOL.key)."""
    if len(seed) != 32 or len(public) != PUBLIC_KEY_SIZE:
        raise ValueError("an ed25519 seed and public key are 32 bytes each")
    pub_blob = ssh_pubkey_blob(public)
    check = os.urandom(4)
    priv = (check + check + _ssh_string(KEY_TYPE.encode()) + _ssh_string(public)
            + _ssh_string(seed + public) + _ssh_string(comment.encode("utf-8")))
    priv += bytes(range(1, 1 + (-len(priv)) % _OPENSSH_BLOCK))
    blob = (_OPENSSH_MAGIC + _ssh_string(b"none") + _ssh_string(b"none") + _ssh_string(b"")
            + struct.pack(">I", 1) + _ssh_string(pub_blob) + _ssh_string(priv))
    b64 = base64.b64encode(blob)
    lines = [b64[i:i + 70] for i in range(0, len(b64), 70)]
    return b"\n".join([_OPENSSH_BEGIN] + lines + [_OPENSSH_END]) + b"\n"


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def u32(self) -> int:
        if self.pos + 4 > len(self.data):
            raise ValueError("truncated key")
        (n,) = struct.unpack_from(">I", self.data, self.pos)
        self.pos += 4
        return n

    def string(self) -> bytes:
        n = self.u32()
        if self.pos + n > len(self.data):
            raise ValueError("truncated key")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def rest(self) -> bytes:
        return self.data[self.pos:]


def parse_openssh_private(data: bytes) -> Tuple[bytes, str]:
    """Parse an unencrypted ``openssh-key-v1`` ed25519 file → (32-byte seed, comment).

    Raises ValueError (encrypted key, other key type, malformed file).
    """
    start = data.find(_OPENSSH_BEGIN)
    end = data.find(_OPENSSH_END, start)
    if start < 0 or end < 0:
        raise ValueError("not an OpenSSH private key")
    body = b"".join(data[start + len(_OPENSSH_BEGIN):end].split())
    try:
        blob = base64.b64decode(body, validate=True)
    except binascii.Error:
        raise ValueError("OpenSSH private key is not valid base64") from None
    if not blob.startswith(_OPENSSH_MAGIC):
        raise ValueError("not an openssh-key-v1 private key")
    r = _Reader(blob[len(_OPENSSH_MAGIC):])
    cipher, kdf, _kdfopts = r.string(), r.string(), r.string()
    if cipher != b"none" or kdf != b"none":
        raise ValueError("the key is encrypted (cipher %s); remote-gevent needs an "
                         "unencrypted key (ssh-keygen -p -N '' -f FILE removes the passphrase)"
                         % cipher.decode("ascii", "replace"))
    if r.u32() != 1:
        raise ValueError("the file holds more than one key")
    pub_blob = r.string()
    priv = _Reader(r.string())
    if r.rest():
        raise ValueError("trailing bytes after the private section")
    if len(priv.data) % _OPENSSH_BLOCK:
        raise ValueError("private section is not padded to the block size")
    if priv.u32() != priv.u32():
        raise ValueError("check bytes mismatch (corrupt or encrypted key)")
    ktype = priv.string()
    if ktype != KEY_TYPE.encode():
        raise ValueError("not an ed25519 key (%s)" % ktype.decode("ascii", "replace"))
    public = priv.string()
    secret = priv.string()
    comment = priv.string()
    pad = priv.rest()
    if pad != bytes(range(1, 1 + len(pad))) or len(pad) >= _OPENSSH_BLOCK:
        raise ValueError("bad padding in the private section")
    if len(public) != PUBLIC_KEY_SIZE or len(secret) != 64 or secret[32:] != public:
        raise ValueError("malformed ed25519 private key")
    if pub_blob != ssh_pubkey_blob(public):
        raise ValueError("public key does not match the private key")
    seed = secret[:32]
    if bytes(nacl.signing.SigningKey(seed).verify_key) != public:
        raise ValueError("public key does not match the private key")
    return seed, comment.decode("utf-8", "replace")


def _load_pkcs8(data: bytes) -> bytes:
    """Seed of a PKCS#8 PEM ed25519 key (imports ``cryptography`` only now)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        priv = serialization.load_pem_private_key(data, password=None)
    except UnsupportedAlgorithm as exc:  # a key type this cryptography cannot load
        raise ValueError(str(exc)) from None
    if not isinstance(priv, Ed25519PrivateKey):
        raise _NotEd25519(type(priv).__name__)
    return priv.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                              serialization.NoEncryption())


class _NotEd25519(Exception):
    pass


# --------------------------------------------------------------------------- files


def _check_permissions(path: str, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise IdentityError("identity key %s is not a regular file" % path)
    if st.st_mode & 0o077:
        raise IdentityError(
            "Permissions 0%03o for '%s' are too open. It is required that your private "
            "key files are NOT accessible by others. This private key will be refused; "
            "run: chmod 600 %s" % (stat.S_IMODE(st.st_mode), path, path))


def load(path: str) -> "IdentityKey":
    """Load an ED25519 private key (OpenSSH or PKCS#8 PEM, unencrypted)."""
    try:
        data = fsutil.read_checked(path, lambda st: _check_permissions(path, st))
    except OSError as exc:
        raise IdentityError("cannot open identity key %s: %s" % (path, exc.strerror)) from None
    try:
        if _OPENSSH_BEGIN in data:
            try:
                seed, _comment = parse_openssh_private(data)
            except ValueError as exc:
                if "not an ed25519 key" in str(exc):
                    raise IdentityError("identity key %s is %s" % (path, exc)) from None
                raise
        else:
            seed = _load_pkcs8(data)
    except _NotEd25519 as exc:
        raise IdentityError("identity key %s is not an ed25519 key (%s)"
                            % (path, exc)) from None
    except (ValueError, TypeError) as exc:
        # TypeError: encrypted key without password; ValueError: unreadable.
        raise IdentityError("cannot read identity key %s: %s (an unencrypted OpenSSH or "
                            "PKCS#8 PEM ed25519 key is expected)"
                            % (path, str(exc).split("\n")[0])) from None
    return IdentityKey.from_seed(seed, path)


def _ensure_parent(path: str) -> str:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        try:
            os.makedirs(parent, mode=0o700)
            os.chmod(parent, 0o700)  # makedirs' mode is subject to the umask
        except FileExistsError:
            pass
        except OSError as exc:
            raise IdentityError("cannot create directory %s for the identity key: %s"
                                % (parent, exc.strerror)) from None
    return parent


def write(key: "IdentityKey", path: str) -> None:
    """Atomically write ``key`` to ``path`` (0600 from creation, fsynced, renamed)."""
    _ensure_parent(path)
    try:
        fsutil.write_atomic(path, key.openssh_private_bytes(), 0o600)
    except OSError as exc:
        raise IdentityError("cannot write identity key %s: %s"
                            % (path, exc.strerror or exc)) from None
    key.path = path


def load_or_create(path: str) -> "IdentityKey":
    """Load the key at ``path``; generate and store a new one if the file is missing."""
    if not os.path.lexists(path):
        key = IdentityKey.generate()
        write(key, path)
        log.info("generated new identity key %s (%s)", path, key.fingerprint)
        return key
    return load(path)


def rotate(path: str) -> "Tuple[IdentityKey, IdentityKey]":
    """Replace the key at ``path`` with a new one; return (old, new).

    The old key is kept in memory so the caller can sign the rotation statement.
    """
    old = load(path)
    new = IdentityKey.generate()
    write(new, path)
    log.info("identity key %s rotated: %s -> %s", path, old.fingerprint, new.fingerprint)
    return old, new
