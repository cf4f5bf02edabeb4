"""Operator certificates from the real ``ssh-keygen`` (issue 14): verified as OpenSSH does,
through ``protocol.check_session_request`` (what the agent runs on every request)."""

import time

import pytest

from remote_gevent.crypto import authkeys as ak
from remote_gevent.crypto import sshcert
from remote_gevent.crypto import tunnel_crypto as tc
from remote_gevent.crypto.krl import parse_revocations
from remote_gevent.wire import protocol as p
from remote_gevent.wire.codes import Reason

from tests.sshcert_helpers import issue, krl, new_key, operator, pub_line

DEVICE, SERVER = "demo", "fr04"
ALLOW = ["127.0.0.1:*", "@sftp", "@transfer"]


@pytest.fixture
def pki(tmp_path):
    class P:
        ca = new_key(tmp_path / "ca", comment="platform-ca")
        ca2 = new_key(tmp_path / "ca2", comment="other-ca")
        op = new_key(tmp_path / "op", comment="alice")
        dir = tmp_path
    return P


def trusted_with(line: str, revoked=None) -> ak.AuthorizedKeys:
    keys = ak.AuthorizedKeys.parse(line + "\n")
    return keys.with_revocations(revoked) if revoked is not None else keys


def request(op, targets=("127.0.0.1:22",), now=None):
    epk, _ = tc.kx_keypair()
    return p.make_session_request(op, DEVICE, SERVER, epk, list(targets),
                                  "relay.example:8443", p.new_ticket(), now=now)


def check(raw, trusted, now=None):
    return p.check_session_request(raw, DEVICE, SERVER, trusted, ALLOW, p.ReplayCache(),
                                   now=time.time() if now is None else now)


def refusal(raw, trusted):
    with pytest.raises(p.Refused) as ei:
        check(raw, trusted)
    return ei.value.reason, ei.value.detail


def test_valid_certificate_is_accepted_with_key_id_and_serial(pki):
    op = operator(pki.op, issue(pki.ca, pki.op))
    req = check(request(op)[1], trusted_with("cert-authority " + pub_line(pki.ca)))
    assert req.operator.fingerprint == op.fingerprint
    assert req.operator.cert.key_id == "alice" and req.operator.cert.serial == 7
    assert [str(t) for t in req.effective] == ["127.0.0.1:22"]


def test_plain_key_still_works_and_ca_line_is_not_an_operator_key(pki):
    plain = operator(pki.op)
    assert check(request(plain)[1], trusted_with(pub_line(pki.op))).operator.cert is None
    ca_as_operator = operator(pki.ca)
    reason, _ = refusal(request(ca_as_operator)[1],
                        trusted_with("cert-authority " + pub_line(pki.ca)))
    assert reason == Reason.UNKNOWN_OPERATOR


@pytest.mark.parametrize("case, opts, kw, reason, text", [
    ("expired", (), {"validity": "-2h:-1h"}, Reason.CERT_EXPIRED, "expired"),
    ("not yet valid", (), {"validity": "+1h:+2h"}, Reason.CERT_NOT_YET_VALID, "not valid before"),
    ("wrong principal", (), {"principals": "fleet-b"}, Reason.PRINCIPAL, "fleet-b"),
    ("host certificate", ("-h",), {}, Reason.CERT_INVALID, "host certificate"),
    ("critical option", ("-O", "critical:frobnicate@example.com=1"), {}, Reason.CERT_INVALID,
     "critical option(s): frobnicate@example.com"),
    ("force-command", ("-O", "force-command=ls"), {}, Reason.CERT_INVALID, "force-command"),
    ("no forwarding", ("-O", "no-port-forwarding"), {}, Reason.CERT_INVALID,
     "does not permit port forwarding"),
])
def test_bad_certificates_refused_each_with_its_reason(pki, case, opts, kw, reason, text):
    op = operator(pki.op, issue(pki.ca, pki.op, *opts, **kw))
    got, detail = refusal(request(op)[1], trusted_with("cert-authority " + pub_line(pki.ca)))
    assert (got, text in detail) == (reason, True), detail


def test_clock_skew_allowance(pki):
    op = operator(pki.op, issue(pki.ca, pki.op, validity="-10m:-30s"))
    now = time.time()
    assert check(request(op, now=now)[1], trusted_with("cert-authority " + pub_line(pki.ca)),
                 now=now)


def test_wrong_ca_and_tampered_signature(pki):
    blob = issue(pki.ca2, pki.op)
    got, detail = refusal(request(operator(pki.op, blob))[1],
                          trusted_with("cert-authority " + pub_line(pki.ca)))
    assert got == Reason.UNKNOWN_CA and "not a cert-authority" in detail
    good = issue(pki.ca, pki.op)
    tampered = good[:-1] + bytes([good[-1] ^ 1])  # last byte of the CA signature
    got, detail = refusal(request(operator(pki.op, tampered))[1],
                          trusted_with("cert-authority " + pub_line(pki.ca)))
    assert got == Reason.CERT_INVALID and "signature does not verify" in detail
    # a certified field changed (the serial): the signature no longer covers it
    changed = bytearray(good)
    i = good.index((7).to_bytes(8, "big"))
    changed[i + 7] = 8
    got, detail = refusal(request(operator(pki.op, bytes(changed)))[1],
                          trusted_with("cert-authority " + pub_line(pki.ca)))
    assert got == Reason.CERT_INVALID and "signature does not verify" in detail


def test_certificate_of_another_key_refused(pki, tmp_path):
    other = new_key(tmp_path / "mallory")
    stolen = issue(pki.ca, pki.op)  # alice's certificate, mallory's signature
    got, detail = refusal(request(operator(other, stolen))[1],
                          trusted_with("cert-authority " + pub_line(pki.ca)))
    assert got == Reason.CERT_INVALID and "another key" in detail


def test_non_ed25519_ca_refused_clearly(pki, tmp_path):
    ecdsa_ca = new_key(tmp_path / "ecdsa_ca", kind="ecdsa")
    blob = issue(ecdsa_ca, pki.op)
    got, detail = refusal(request(operator(pki.op, blob))[1],
                          trusted_with("cert-authority " + pub_line(pki.ca)))
    assert got == Reason.CERT_INVALID and "ecdsa-sha2-nistp256 CA" in detail
    assert "only ssh-ed25519" in detail


def test_principals_option_of_the_line(pki):
    op = operator(pki.op, issue(pki.ca, pki.op, principals="fleet-a"))
    line = 'cert-authority,principals="fleet-a,fleet-c" ' + pub_line(pki.ca)
    assert check(request(op)[1], trusted_with(line))
    # with principals= the device ident is no longer accepted by itself
    op2 = operator(pki.op, issue(pki.ca, pki.op, principals="demo"))
    assert refusal(request(op2)[1], trusted_with(line))[0] == Reason.PRINCIPAL
    # a certificate without principals is refused (OpenSSH would take it for anyone)
    op3 = operator(pki.op, issue(pki.ca, pki.op, principals=""))
    got, detail = refusal(request(op3)[1], trusted_with("cert-authority " + pub_line(pki.ca)))
    assert got == Reason.PRINCIPAL and "no principals" in detail


def test_permitopen_is_the_intersection_of_line_and_certificate(pki):
    ext = "extension:permit-open@remote-gevent=127.0.0.1:22,127.0.0.1:80,@sftp"
    op = operator(pki.op, issue(pki.ca, pki.op, "-O", ext))
    line = 'cert-authority,permitopen="127.0.0.1:*" ' + pub_line(pki.ca)
    trusted = trusted_with(line)
    req = check(request(op, targets=["*:*"])[1], trusted)
    assert sorted(str(t) for t in req.effective) == ["127.0.0.1:22", "127.0.0.1:80"]
    assert req.permits("127.0.0.1:22") and not req.permits("127.0.0.1:443")
    got, _ = refusal(request(op, targets=["@sftp"])[1], trusted)  # the cert alone: not enough
    assert got == Reason.TARGET_NOT_PERMITTED
    # certificate alone restricts too
    req = check(request(op, targets=["*:*"])[1], trusted_with("cert-authority " + pub_line(pki.ca)))
    assert sorted(str(t) for t in req.effective) == ["127.0.0.1:22", "127.0.0.1:80"]
    # nothing in common: refused, never widened
    narrow = 'cert-authority,permitopen="10.0.0.1:22" ' + pub_line(pki.ca)
    got, detail = refusal(request(op, targets=["*:*"])[1], trusted_with(narrow))
    assert got == Reason.TARGET_NOT_PERMITTED and "in common" in detail


@pytest.mark.parametrize("spec, why", [
    (["serial: 7"], "serial 7"),
    (["serial: 1-100"], "serial 7"),
    (["id: alice"], "key id"),
])
def test_revoked_by_krl_from_ssh_keygen(pki, spec, why):
    op = operator(pki.op, issue(pki.ca, pki.op))
    path = krl(pki.dir / "krl", pki.ca + ".pub", specs=spec)
    with open(path, "rb") as f:
        revs = parse_revocations(f.read())
    got, detail = refusal(request(op)[1],
                          trusted_with("cert-authority " + pub_line(pki.ca), revs))
    assert got == Reason.REVOKED and why in detail
    other = operator(pki.op, issue(pki.ca, pki.op, key_id="bob", serial=1000))
    assert check(request(other)[1], trusted_with("cert-authority " + pub_line(pki.ca), revs))


def test_revoked_by_key_krl_and_plain_list(pki):
    op = operator(pki.op, issue(pki.ca, pki.op))
    ca_line = "cert-authority " + pub_line(pki.ca)
    path = krl(pki.dir / "krl", None, keys=[pki.op + ".pub"])
    with open(path, "rb") as f:
        revs = parse_revocations(f.read())
    assert refusal(request(op)[1], trusted_with(ca_line, revs))[0] == Reason.REVOKED
    plain = operator(pki.op)  # the same key, listed plainly: revoked too
    got, detail = refusal(request(plain)[1], trusted_with(pub_line(pki.op), revs))
    assert got == Reason.REVOKED and "revoked" in detail
    listed = parse_revocations(("# lost laptop\n" + pub_line(pki.op) + "\n").encode())
    assert refusal(request(op)[1], trusted_with(ca_line, listed))[0] == Reason.REVOKED
    # a revoked CA key revokes every certificate it signed
    ca_revoked = parse_revocations((pub_line(pki.ca) + "\n").encode())
    got, detail = refusal(request(op)[1], trusted_with(ca_line, ca_revoked))
    assert got == Reason.REVOKED and "CA key" in detail


def test_parser_reads_what_ssh_keygen_prints(pki):
    blob = issue(pki.ca, pki.op, "-O", "extension:permit-open@remote-gevent=127.0.0.1:22",
                 principals="fleet-a,demo")
    cert = sshcert.parse_certificate(blob)
    assert cert.principals == ("fleet-a", "demo") and cert.cert_type == sshcert.USER_CERT
    assert sshcert.permit_open_of(cert) == ["127.0.0.1:22"]
    assert cert.valid_before - cert.valid_after > 3500
    assert sshcert.verify_signature(cert)


def test_a_listed_plain_key_is_trusted_even_with_a_certificate(pki):
    """As ssh offers both, OpenSSH accepts either: the plain line's grant applies."""
    op = operator(pki.op, issue(pki.ca2, pki.op))  # a CA the device does not know
    req = check(request(op)[1], trusted_with('permitopen="127.0.0.1:22" ' + pub_line(pki.op)))
    assert req.operator.cert is None and [str(t) for t in req.operator.permitopen] == [
        "127.0.0.1:22"]


