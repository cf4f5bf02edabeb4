"""Hostile-input tier: OpenSSH certificates and KRLs (crypto/sshcert.py, crypto/krl.py).

Documented outcomes: ``parse_certificate`` returns a Certificate or raises CertError;
``check_certificate`` passes or raises CertError; ``parse_revocations`` returns
Revocations or raises KrlError — never another exception, whatever the bytes. A
certificate that passes every check is byte-identical to what the CA signed. KRLs built
from random serials, ranges, bitmaps and key ids read back exactly.
"""

import struct

import nacl.signing
from fuzz_settings import examples
from hypothesis import given
from hypothesis import strategies as st

from remote_gevent.crypto import sshcert
from remote_gevent.crypto.identity import ssh_pubkey_blob
from remote_gevent.crypto.krl import KRL_MAGIC, KrlError, Revocations, parse_revocations

CA = nacl.signing.SigningKey(b"\x01" * 32)
CA_BLOB = ssh_pubkey_blob(bytes(CA.verify_key))
KEY = bytes(nacl.signing.SigningKey(b"\x02" * 32).verify_key)
NOW = 1700000000


def s(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def options(pairs) -> bytes:
    return b"".join(s(n.encode()) + (s(s(v.encode())) if v is not None else s(b""))
                    for n, v in sorted(pairs))


def make_cert(serial=7, cert_type=1, key_id="alice", principals=("demo",),
              valid=(NOW - 60, NOW + 3600), critical=(),
              extensions=(("permit-port-forwarding", None),), ca=CA) -> bytes:
    body = (s(sshcert.CERT_TYPE_ED25519.encode()) + s(b"n" * 32) + s(KEY)
            + struct.pack(">QI", serial, cert_type) + s(key_id.encode())
            + s(b"".join(s(p.encode()) for p in principals))
            + struct.pack(">QQ", *valid) + s(options(critical)) + s(options(extensions))
            + s(b"") + s(ssh_pubkey_blob(bytes(ca.verify_key))))
    return body + s(s(b"ssh-ed25519") + s(ca.sign(body).signature))


GOOD = make_cert()


def _check(blob: bytes):
    try:
        cert = sshcert.parse_certificate(blob)
    except sshcert.CertError as exc:
        assert exc.kind in ("invalid", "unsupported_ca"), exc.kind
        return None
    try:
        sshcert.check_certificate(cert, bytes(CA.verify_key), ["demo"], NOW, 60)
        sshcert.permit_open_of(cert)
    except sshcert.CertError as exc:
        assert exc.kind in ("invalid", "expired", "not_yet_valid", "principal"), exc.kind
        return None
    return cert


def test_the_builder_makes_a_valid_certificate():
    assert _check(GOOD) is not None


@examples(300)
@given(st.binary(max_size=600))
def test_random_bytes_are_refused(data):
    assert _check(data) is None


@examples(300)
@given(st.integers(0, len(GOOD) - 1), st.integers(1, 255), st.integers(0, 40),
       st.binary(max_size=8))
def test_mutated_certificate_is_refused_unless_unchanged(pos, xor, cut, insert):
    mutations = [
        GOOD[:pos] + bytes([GOOD[pos] ^ xor]) + GOOD[pos + 1:],  # flip
        GOOD[:max(0, len(GOOD) - cut - 1)],  # truncate
        GOOD[:pos] + insert + GOOD[pos:],  # insert
    ]
    for blob in mutations:
        cert = _check(blob)
        assert cert is None or blob == GOOD


@examples(200)
@given(st.integers(0, 2 ** 64 - 1), st.sampled_from([0, 1, 2, 3, 2 ** 32 - 1]),
       st.text(max_size=20), st.lists(st.text(max_size=10), max_size=4),
       st.tuples(st.integers(0, 2 ** 64 - 1), st.integers(0, 2 ** 64 - 1)),
       st.lists(st.tuples(st.sampled_from(["force-command", "source-address", "x@y", "a"]),
                          st.one_of(st.none(), st.text(max_size=10))), max_size=2,
                unique_by=lambda t: t[0]),
       st.lists(st.tuples(st.sampled_from(["permit-port-forwarding", "permit-pty",
                                           sshcert.PERMIT_OPEN_EXTENSION]),
                          st.one_of(st.none(), st.sampled_from(["127.0.0.1:22", "", "*:*",
                                                                 "bad", "@sftp,1.2.3.4:5"]))),
                max_size=3, unique_by=lambda t: t[0]))
def test_structured_certificates_decided_without_crash(serial, ctype, key_id, principals,
                                                        valid, critical, extensions):
    blob = make_cert(serial, ctype, key_id, tuple(principals), valid, critical, extensions)
    cert = _check(blob)
    if cert is not None:  # everything OpenSSH requires holds
        assert ctype == 1 and not critical and "demo" in principals
        assert valid[0] <= NOW + 60 and NOW - 60 < valid[1]
        assert "permit-port-forwarding" in dict(extensions)


def krl(sections, version=1) -> bytes:
    out = KRL_MAGIC + struct.pack(">IQQQ", 1, version, NOW, 0) + s(b"") + s(b"comment")
    for kind, body in sections:
        out += bytes([kind]) + s(body)
    return out


@examples(300)
@given(st.binary(max_size=300))
def test_random_krl_bytes_refused_or_read(data):
    for blob in (data, KRL_MAGIC + data, krl([]) + data):
        try:
            revs = parse_revocations(blob)
        except KrlError:
            continue
        assert isinstance(revs, Revocations)


@examples(200)
@given(st.lists(st.integers(1, 2 ** 64 - 1), max_size=5),
       st.lists(st.tuples(st.integers(1, 2 ** 40), st.integers(0, 1000)), max_size=3),
       st.tuples(st.integers(0, 2 ** 40), st.binary(max_size=16)),
       st.lists(st.text(st.characters(min_codepoint=32, max_codepoint=0x7e), max_size=12),
                max_size=4), st.integers(0, 2 ** 64 - 1))
def test_krl_round_trip(serials, ranges, bitmap, key_ids, probe):
    offset, bits = bitmap
    bits = bytes([bits[0] & 0x7F]) + bits[1:] if bits else bits  # a positive mpint
    subs = (bytes([0x20]) + s(b"".join(struct.pack(">Q", x) for x in serials))
            + b"".join(bytes([0x21]) + s(struct.pack(">QQ", lo, lo + n)) for lo, n in ranges)
            + bytes([0x22]) + s(struct.pack(">Q", offset) + s(bits))
            + bytes([0x23]) + s(b"".join(s(k.encode()) for k in key_ids)))
    revs = parse_revocations(krl([(1, s(CA_BLOB) + s(b"") + subs)]))
    bitmap_value = int.from_bytes(bits, "big")
    for serial in serials + [lo for lo, _ in ranges] + [probe]:
        expected = (serial in serials or any(lo <= serial <= lo + n for lo, n in ranges)
                    or (serial >= offset and (bitmap_value >> (serial - offset)) & 1 == 1))
        cert = sshcert.parse_certificate(make_cert(serial=serial, key_id="zz-not-listed"))
        assert (revs.certificate_revoked(cert) is not None) == (expected and serial != 0)
    for k in key_ids:
        cert = sshcert.parse_certificate(make_cert(serial=0, key_id=k))
        assert revs.certificate_revoked(cert) == "key id"
