"""Certificates and KRLs made by the real ``ssh-keygen`` (tests of issue 14)."""

import base64
import os
import subprocess
from typing import Sequence

from remote_gevent.crypto import identity

KEYGEN = "ssh-keygen"


def keygen(*args: str) -> None:
    subprocess.run([KEYGEN, "-q", *args], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE, timeout=30)


def new_key(path, kind: str = "ed25519", comment: str = "k") -> str:
    path = str(path)
    keygen("-t", kind, "-N", "", "-C", comment, "-f", path)
    return path


def pub_line(path) -> str:
    with open(str(path) + ".pub") as f:
        return f.read().strip()


def issue(ca, key, *opts: str, key_id: str = "alice", principals: str = "demo",
          validity: str = "+1h", serial: int = 7) -> bytes:
    """``ssh-keygen -s ca -I key_id -n principals -V validity -z serial key.pub`` → blob."""
    args = ["-s", str(ca), "-I", key_id, "-V", validity, "-z", str(serial)]
    if principals:
        args += ["-n", principals]
    keygen(*args, *opts, str(key) + ".pub")
    return cert_blob(str(key) + "-cert.pub")


def cert_blob(path) -> bytes:
    with open(str(path)) as f:
        return base64.b64decode(f.read().split()[1])


def operator(key, cert: bytes = None) -> identity.IdentityKey:
    os.chmod(str(key), 0o600)
    op = identity.load(str(key))
    op.certificate = cert
    return op


def krl(path, ca_pub, specs: Sequence[str] = (), keys: Sequence[str] = (),
        update: bool = False) -> str:
    """Write a KRL with ``ssh-keygen -k`` (``specs``: lines such as ``serial: 7``)."""
    args = ["-k", "-f", str(path)]
    if update:
        args.append("-u")
    files = list(keys)
    if specs:
        spec = str(path) + ".spec"
        with open(spec, "w") as f:
            f.write("\n".join(specs) + "\n")
        args += ["-s", str(ca_pub)]
        files.append(spec)
    keygen(*args, *files)
    return str(path)
