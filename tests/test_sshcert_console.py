"""The console's certificate handling (issue 14): found beside the key or named in
console.yaml, checked against the key, expiry warnings, refusal hints."""

import io
import os

import pytest

from remote_gevent.console import certs
from remote_gevent.console import config as cconfig
from remote_gevent.console.config import ConsoleError
from remote_gevent.wire.codes import EXIT_CONFIG, Reason

from tests.sshcert_helpers import issue, new_key, operator


def _cfg(tmp_path, key, **extra):
    path = tmp_path / "console.yaml"
    lines = ["user: op", "password: pw", "operator_key: %s" % key]
    lines += ["%s: %s" % kv for kv in extra.items()]
    path.write_text("\n".join(lines) + "\n")
    return cconfig.load(str(path))


def test_certificate_beside_the_key_is_attached(tmp_path):
    ca, op = new_key(tmp_path / "ca"), new_key(tmp_path / "op")
    blob = issue(ca, op)
    err = io.StringIO()
    key = certs.attach_certificate(operator(op), _cfg(tmp_path, op), err)
    assert key.certificate == blob and err.getvalue() == ""


def test_plain_key_without_certificate(tmp_path):
    op = new_key(tmp_path / "op")
    assert certs.attach_certificate(operator(op), _cfg(tmp_path, op)).certificate is None


def test_named_certificate_and_wrong_key(tmp_path):
    ca, op, other = (new_key(tmp_path / n) for n in ("ca", "op", "other"))
    issue(ca, other)
    cfg = _cfg(tmp_path, op, operator_cert=str(tmp_path / "other-cert.pub"))
    with pytest.raises(ConsoleError) as ei:
        certs.attach_certificate(operator(op), cfg)
    assert ei.value.exit_code == EXIT_CONFIG and "not the operator key" in ei.value.message


@pytest.mark.parametrize("validity, text", [
    ("-1h:+5m", "expires in 4 min"),
    ("-2h:-1h", "min ago: devices will refuse it"),
    ("+1h:+2h", "is not valid for another"),
    ("-1h:+11m", ""),
])
def test_expiry_warnings(tmp_path, validity, text):
    ca, op = new_key(tmp_path / "ca"), new_key(tmp_path / "op")
    issue(ca, op, validity=validity)
    err = io.StringIO()
    certs.attach_certificate(operator(op), _cfg(tmp_path, op), err)
    if text:
        assert text in err.getvalue() and os.path.basename(op) + "-cert.pub" in err.getvalue()
    else:
        assert err.getvalue() == ""


def test_refusal_hints():
    for code in (Reason.CERT_EXPIRED, Reason.PRINCIPAL, Reason.UNKNOWN_CA, Reason.REVOKED,
                 Reason.CERT_INVALID, Reason.CERT_NOT_YET_VALID):
        assert certs.refusal_hint(code).startswith("; ")
    assert certs.refusal_hint(Reason.REPLAYED) == ""


@pytest.mark.parametrize("plain", [False, True])
def test_demo_platform_issues_a_certificate_by_default(tmp_path, monkeypatch, plain):
    from remote_gevent.demo import operator_cert
    from remote_gevent.demo.platform import DemoPlatform

    if plain:
        monkeypatch.setenv(operator_cert.PLAIN_KEY_ENV, "1")
    p = DemoPlatform(str(tmp_path / "demo")).prepare()
    with open(p.authorized_keys) as f:
        line = f.read()
    cert_file = p.operator_key_path + "-cert.pub"
    if plain:
        assert line.startswith("ssh-ed25519 ") and not os.path.exists(cert_file)
    else:
        assert line.startswith('cert-authority,principals="demo-fleet" ssh-ed25519 ')
        assert p.remote_overrides["revoked_keys"].endswith("agent/revoked_keys")
        key = certs.attach_certificate(operator(p.operator_key_path),
                                       _cfg(tmp_path, p.operator_key_path))
        assert key.certificate is not None
