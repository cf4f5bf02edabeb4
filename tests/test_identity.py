"""Identity key: OpenSSH format checked against the real ssh-keygen."""

import os
import shutil
import stat
import subprocess

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from remote_gevent.crypto import identity

SSH_KEYGEN = shutil.which("ssh-keygen")
needs_keygen = pytest.mark.skipif(SSH_KEYGEN is None, reason="ssh-keygen not installed")


def keygen(*args):
    return subprocess.run([SSH_KEYGEN] + list(args), check=True, capture_output=True,
                          text=True, timeout=30).stdout


@needs_keygen
def test_generated_key_matches_ssh_keygen(tmp_path):
    path = str(tmp_path / "secret" / "id_ed25519")
    key = identity.load_or_create(path)
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    line = key.public_line("dev1@host")
    assert keygen("-y", "-f", path).split()[:2] == line.split()[:2]
    assert line.endswith(" dev1@host")
    fp = keygen("-lf", path).split()[1]
    assert fp == key.fingerprint == identity.fingerprint_of(key.public_bytes)
    assert fp.startswith("SHA256:")
    # Loading again gives the same key.
    again = identity.load_or_create(path)
    assert again.public_bytes == key.public_bytes


@needs_keygen
def test_loads_key_made_by_ssh_keygen(tmp_path):
    path = str(tmp_path / "k")
    keygen("-t", "ed25519", "-N", "", "-C", "op", "-f", path, "-q")
    key = identity.load(path)
    assert key.public_line() == " ".join(open(path + ".pub").read().split()[:2])
    raw, comment = identity.parse_ssh_ed25519_line(open(path + ".pub").read())
    assert raw == key.public_bytes and comment == "op"


def test_pkcs8_pem(tmp_path):
    priv = Ed25519PrivateKey.generate()
    pem = priv.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    path = tmp_path / "k.pem"
    path.write_bytes(pem)
    path.chmod(0o600)
    key = identity.load(str(path))
    raw = priv.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)
    assert key.public_bytes == raw


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_refuses_readable_key(tmp_path, mode):
    path = str(tmp_path / "k")
    identity.load_or_create(path)
    os.chmod(path, mode)
    with pytest.raises(identity.IdentityError) as info:
        identity.load(path)
    assert "too open" in str(info.value) and oct(mode)[2:] in str(info.value)


def test_refuses_non_ed25519_and_garbage(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    p = tmp_path / "ec.pem"
    p.write_bytes(pem)
    p.chmod(0o600)
    with pytest.raises(identity.IdentityError, match="not an ed25519"):
        identity.load(str(p))
    g = tmp_path / "g"
    g.write_bytes(b"hello")
    g.chmod(0o600)
    with pytest.raises(identity.IdentityError):
        identity.load(str(g))


def test_atomic_write_leaves_no_temp_and_is_0600_under_loose_umask(tmp_path):
    old = os.umask(0)
    try:
        path = str(tmp_path / "k")
        identity.load_or_create(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.listdir(str(tmp_path)) == ["k"]


def test_write_failure_keeps_old_key(tmp_path, monkeypatch):
    path = str(tmp_path / "k")
    key = identity.load_or_create(path)
    before = open(path, "rb").read()

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(identity.os, "replace", boom)
    with pytest.raises(identity.IdentityError, match="No space"):
        identity.write(identity.IdentityKey.generate(), path)
    assert open(path, "rb").read() == before
    assert os.listdir(str(tmp_path)) == ["k"]
    assert identity.load(path).public_bytes == key.public_bytes


def test_sign_verify_and_rotate(tmp_path):
    path = str(tmp_path / "k")
    key = identity.load_or_create(path)
    sig = key.sign(b"data")
    assert len(sig) == 64
    assert identity.verify(key.public_bytes, b"data", sig)
    assert not identity.verify(key.public_bytes, b"datA", sig)
    assert not identity.verify(key.public_bytes, b"data", sig[:63])
    old, new = identity.rotate(path)
    assert old.public_bytes == key.public_bytes
    assert new.public_bytes != old.public_bytes
    assert identity.load(path).public_bytes == new.public_bytes
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert old.verify(b"x", old.sign(b"x"))
    assert "IdentityKey(SHA256:" in repr(key)


def test_parse_line_rejects_malformed():
    key = identity.IdentityKey.generate()
    line = key.public_line("c")
    assert identity.parse_ssh_ed25519_line(line) == (key.public_bytes, "c")
    for bad in ("ssh-rsa AAAA", "ssh-ed25519", "ssh-ed25519 !!!",
                "ssh-ed25519 " + line.split()[1][:-8],
                "ssh-ed25519 AAAAB3NzaC1yc2EAAAADAQABAAABAQ"):
        with pytest.raises(ValueError):
            identity.parse_ssh_ed25519_line(bad)
    blob = identity.ssh_pubkey_blob(key.public_bytes)
    assert blob[:4] == b"\x00\x00\x00\x0bssh-ed25519"[:4]


@needs_keygen
def test_written_key_accepted_by_ssh_keygen_and_round_trips(tmp_path):
    path = str(tmp_path / "k")
    key = identity.IdentityKey.generate()
    identity.write(key, path)
    data = open(path, "rb").read()
    assert data.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----\n")
    assert data.endswith(b"-----END OPENSSH PRIVATE KEY-----\n")
    assert all(len(line) <= 70 for line in data.splitlines())
    assert keygen("-y", "-f", path).split()[:2] == key.public_line().split()
    assert keygen("-lf", path).split()[1] == key.fingerprint
    # ssh-keygen rewrites it (new comment): we read ssh-keygen's own output back.
    keygen("-c", "-C", "renamed", "-f", path, "-q")
    assert identity.load(path).public_bytes == key.public_bytes
    seed, comment = identity.parse_openssh_private(open(path, "rb").read())
    assert comment == "renamed" and seed == bytes(key.signing_key)


@needs_keygen
def test_loads_ssh_keygen_keys_with_every_padding_length(tmp_path):
    # The comment length moves the padding through every value 0..7.
    for n in range(8):
        path = str(tmp_path / ("k%d" % n))
        keygen("-t", "ed25519", "-N", "", "-C", "c" * n, "-f", path, "-q")
        key = identity.load(path)
        assert key.public_line() == " ".join(open(path + ".pub").read().split()[:2])
        assert identity.parse_openssh_private(open(path, "rb").read())[1] == "c" * n
        ours = identity.openssh_private_bytes(bytes(key.signing_key), key.public_bytes, "c" * n)
        assert identity.parse_openssh_private(ours) == (bytes(key.signing_key), "c" * n)


@needs_keygen
def test_refuses_encrypted_openssh_key(tmp_path):
    path = str(tmp_path / "k")
    keygen("-t", "ed25519", "-N", "secret pass", "-f", path, "-q")
    with pytest.raises(identity.IdentityError, match="encrypted"):
        identity.load(path)


@needs_keygen
def test_refuses_non_ed25519_openssh_key(tmp_path):
    path = str(tmp_path / "k")
    keygen("-t", "ecdsa", "-N", "", "-f", path, "-q")
    with pytest.raises(identity.IdentityError, match="not an ed25519"):
        identity.load(path)


def test_refuses_corrupt_openssh_key(tmp_path):
    import base64

    key = identity.IdentityKey.generate()
    good = key.openssh_private_bytes()
    lines = good.splitlines()
    blob = bytearray(base64.b64decode(b"".join(lines[1:-1])))

    def variant(mutate):
        b = bytearray(blob)
        mutate(b)
        b64 = base64.b64encode(bytes(b))
        return lines[0] + b"\n" + b64 + b"\n" + lines[-1] + b"\n"

    def flip_check(b):
        i = blob.find(b"\x00\x00\x00\x0bssh-ed25519", 60) - 8  # first checkint
        b[i] ^= 1

    def flip_public_in_secret(b):
        b[-20] ^= 1  # inside the private section (seed/public/comment/padding)

    def truncate(b):
        del b[-9:]

    for i, bad in enumerate([variant(flip_check), variant(flip_public_in_secret),
                             variant(truncate), good.replace(b"A", b"!", 1)[:40]
                             + good[40:]]):
        with pytest.raises(ValueError):
            identity.parse_openssh_private(bad)
        p = tmp_path / ("bad%d" % i)
        p.write_bytes(bad)
        p.chmod(0o600)
        with pytest.raises(identity.IdentityError):
            identity.load(str(p))


def test_identity_does_not_import_cryptography():
    import subprocess as sp
    import sys

    code = ("import sys, tempfile, os; from remote_gevent.crypto import identity; "
            "d = tempfile.mkdtemp(); p = os.path.join(d, 'k'); "
            "k = identity.load_or_create(p); identity.load(p); "
            "print('cryptography' in sys.modules)")
    out = sp.run([sys.executable, "-c", code], check=True, capture_output=True,
                 text=True, timeout=60).stdout.strip()
    assert out == "False"
