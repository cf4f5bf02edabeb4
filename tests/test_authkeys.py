
import os
import shutil
import subprocess

import nacl.signing
import pytest

from remote_gevent.crypto import authkeys as ak
from remote_gevent.crypto.authkeys import Target, TargetPattern


def _key():
    raw = bytes(nacl.signing.SigningKey.generate().verify_key)
    return raw, ak.ssh_pubkey_line(raw)


RSA_LINE = ("ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQDZ2n7Xx8M2dWTt8Ex8pQMv+1cHlHyY2hxVG8h"
            "0M6CkzBLK7GmVJwU5p9f2a8n6M2ZtT4zvFk7u0uR9fZ7O2M8= rsa@host")


# ---------------------------------------------------------------- targets


@pytest.mark.parametrize("text,host,port", [
    ("127.0.0.1:22", "127.0.0.1", 22),
    ("LocalHost:8080", "localhost", 8080),
    ("[::1]:22", "[::1]", 22),
    ("[0:0:0:0:0:0:0:1]:22", "[::1]", 22),
    ("db.internal.example:5432", "db.internal.example", 5432),
])
def test_target_parse(text, host, port):
    t = Target.parse(text)
    assert isinstance(t, Target)
    assert (t.host, t.port) == (host, port)
    assert t.concrete


def test_target_address_strips_ipv6_brackets():
    assert Target.parse("[::1]:2222").address == ("::1", 2222)
    assert str(Target.parse("[::1]:2222")) == "[::1]:2222"
    with pytest.raises(ak.TargetError):
        _ = Target.parse("@sftp").address


@pytest.mark.parametrize("text", [
    "", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:-1", "::1:22",
    "[::1:22", "[nothex]:22", "host name:22", "a" * 300 + ":22", "127.0.0.1:*", "*:22",
    "@ssh", "bad_host!:22", "1.2.3:22", 22, None, "127.0.0.1:22\n", "host\n:22",
    "\u212aey:22", "@sftp\n", "127.0.0.1:\uff12\uff12",
])
def test_bad_concrete_targets(text):
    with pytest.raises(ak.TargetError):
        Target.parse(text)


def test_patterns_and_virtual():
    assert TargetPattern.parse("127.0.0.1:*") == TargetPattern("127.0.0.1", None)
    assert TargetPattern.parse("*:22") == TargetPattern("*", 22)
    assert TargetPattern.parse("*:*") == TargetPattern("*", None)
    assert TargetPattern.parse("@sftp").virtual
    assert Target.parse("@transfer").concrete
    assert str(TargetPattern.parse("*:*")) == "*:*"


def test_permits():
    pats = ak.parse_patterns(["127.0.0.1:*", "[::1]:22", "db:5432"])
    assert ak.permits(pats, "127.0.0.1:1")
    assert ak.permits(pats, "127.0.0.1:65535")
    assert ak.permits(pats, "[0::1]:22")
    assert not ak.permits(pats, "[::1]:23")
    assert ak.permits(pats, "DB:5432")
    assert not ak.permits(pats, "db.example:5432")
    assert not ak.permits(pats, "localhost:22")  # no DNS: names are not addresses
    assert not ak.permits(pats, "not a target")
    assert not ak.permits(["*:*"], "127.0.0.1:*")  # a pattern is not a stream target


def test_virtual_targets_need_explicit_allow():
    assert not ak.permits(["*:*"], "@sftp")
    assert not ak.permits(["*:*", "@transfer"], "@sftp")
    assert ak.permits(["@sftp"], "@sftp")


def test_is_target_allowed_needs_device_and_operator():
    device = ["127.0.0.1:*"]
    assert ak.is_target_allowed("127.0.0.1:22", device, [])  # no permitopen: device only
    assert ak.is_target_allowed("127.0.0.1:22", device, ["127.0.0.1:22"])
    assert not ak.is_target_allowed("127.0.0.1:80", device, ["127.0.0.1:22"])
    assert not ak.is_target_allowed("10.0.0.1:22", device, ["*:*"])
    assert not ak.is_target_allowed("127.0.0.1:22", [], [])  # empty device list: nothing
    # the session's requested targets narrow it further
    assert not ak.is_target_allowed("127.0.0.1:80", device, [], requested=["127.0.0.1:22"])
    assert ak.is_target_allowed("127.0.0.1:80", device, [], requested=["*:*"])


def test_effective_targets():
    eff, refused = ak.effective_targets(["*:*"], ["127.0.0.1:*", "@sftp"], [])
    assert eff == [TargetPattern("127.0.0.1", None)] and not refused
    eff, refused = ak.effective_targets(["127.0.0.1:*"], ["127.0.0.1:*"], ["*:22", "*:80"])
    assert eff == [TargetPattern("127.0.0.1", 22), TargetPattern("127.0.0.1", 80)]
    eff, refused = ak.effective_targets(["127.0.0.1:22", "10.0.0.1:22"], ["127.0.0.1:22"], [])
    assert refused == [TargetPattern("10.0.0.1", 22)]
    eff, refused = ak.effective_targets(["@sftp"], ["@sftp"], ["127.0.0.1:22"])
    assert refused == [TargetPattern("@sftp", None)]  # permitopen limits virtual targets too
    eff, refused = ak.effective_targets(["@sftp"], ["@sftp"], ["@sftp"])
    assert eff == [TargetPattern("@sftp", None)] and not refused


# ---------------------------------------------------------------- authorized_keys


def test_parse_plain_and_options():
    raw1, line1 = _key()
    raw2, line2 = _key()
    raw3, line3 = _key()
    text = "\n".join([
        "# trusted operators",
        "",
        line1 + " alice@laptop",
        'restrict,permitopen="127.0.0.1:22",permitopen="[::1]:2222",no-pty ' + line2 + " bob",
        'command="echo a, b \\"c\\"",port-forwarding ' + line3,
        "   ",
    ])
    keys = ak.AuthorizedKeys.parse(text, source="ak")
    # command= is a restriction we cannot honour: that line is skipped, not widened
    assert len(keys) == 2
    alice = keys.get(ak.fingerprint_of(raw1))
    assert alice.comment == "alice@laptop" and alice.permitopen == () and alice.line_no == 3
    bob = keys.get(ak.fingerprint_of(raw2))
    assert bob.public_raw32 == raw2
    assert bob.permitopen == (TargetPattern("127.0.0.1", 22), TargetPattern("[::1]", 2222))
    assert keys.get(ak.fingerprint_of(raw3)) is None
    assert any("ak:5" in w and "command" in w for w in keys.warnings)


def test_quoted_option_with_commas_and_spaces():
    raw, line = _key()
    text = 'environment="A=1, B=2",permitopen="127.0.0.1:22" %s comment with spaces' % line
    keys = ak.AuthorizedKeys.parse(text)
    (k,) = list(keys)
    assert k.comment == "comment with spaces"
    assert k.permitopen == (TargetPattern("127.0.0.1", 22),)
    assert any("environment" in w for w in keys.warnings)  # unknown option: warned


def test_rsa_and_other_types_skipped_with_line_number(caplog):
    raw, line = _key()
    text = "\n".join([RSA_LINE, "ecdsa-sha2-nistp256 AAAAE2VjZHNh x", line])
    keys = ak.AuthorizedKeys.parse(text, source="f")
    assert len(keys) == 1
    assert any(w.startswith("f:1:") and "ssh-rsa" in w for w in keys.warnings)
    assert any(w.startswith("f:2:") for w in keys.warnings)
    assert "f:1:" in caplog.text


def test_options_before_rsa_key_skipped():
    keys = ak.AuthorizedKeys.parse('permitopen="127.0.0.1:22" ' + RSA_LINE)
    assert len(keys) == 0 and len(keys.warnings) == 1


@pytest.mark.parametrize("bad", [
    'permitopen="127.0.0.1:22 %s',  # unterminated quote
    'permitopen=127.0.0.1:22 %s',  # unquoted value
    'permitopen="nonsense" %s',
    'permitopen="127.0.0.1:22"x %s',
    ',restrict %s',
    'from="10.0.0.0/8" %s',  # would be ignored: fail closed
    'expiry-time="20200101" %s',
    'no-port-forwarding %s',
    'principals="a" %s',  # principals only make sense with cert-authority
    'cert-authority="x" %s',
])
def test_bad_lines_skipped_others_kept(bad):
    raw, line = _key()
    raw2, good = _key()
    keys = ak.AuthorizedKeys.parse((bad % line) + "\n" + good)
    assert list(keys)[0].public_raw32 == raw2 and len(keys) == 1
    assert keys.warnings and keys.warnings[0].startswith("<string>:1:")


def test_corrupt_blobs_skipped():
    raw, line = _key()
    ktype, blob = line.split()[:2]
    rsa_blob = RSA_LINE.split()[1]
    text = "\n".join([
        "ssh-ed25519 " + blob[:-4],  # truncated
        "ssh-ed25519 !!!notbase64",
        "ssh-ed25519 " + rsa_blob,  # type mismatch inside the blob
        "ssh-ed25519",
        "garbage line here",
    ])
    keys = ak.AuthorizedKeys.parse(text)
    assert len(keys) == 0 and len(keys.warnings) == 5


def test_duplicate_key_first_wins():
    raw, line = _key()
    keys = ak.AuthorizedKeys.parse('%s first\npermitopen="*:*" %s second' % (line, line))
    (k,) = list(keys)
    assert k.comment == "first" and k.permitopen == ()
    assert any("duplicate" in w for w in keys.warnings)


def test_load_file_and_permissions(tmp_path):
    raw, line = _key()
    p = tmp_path / "authorized_keys"
    p.write_text(line + " op\n")
    os.chmod(str(p), 0o644)
    keys = ak.AuthorizedKeys.load(str(p))
    assert ak.fingerprint_of(raw) in keys and keys.source == str(p)
    os.chmod(str(p), 0o666)
    with pytest.raises(ak.AuthorizedKeysError, match="world-writable"):
        ak.AuthorizedKeys.load(str(p))
    with pytest.raises(ak.AuthorizedKeysError, match="cannot open"):
        ak.AuthorizedKeys.load(str(tmp_path / "missing"))
    with pytest.raises(ak.AuthorizedKeysError, match="regular file"):
        ak.AuthorizedKeys.load(str(tmp_path))


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen")
def test_real_openssh_key_and_fingerprint(tmp_path):
    key = tmp_path / "k"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "op@test",
                    "-f", str(key)], check=True)
    pub = (tmp_path / "k.pub").read_text().strip()
    out = subprocess.run(["ssh-keygen", "-lf", str(tmp_path / "k.pub")], check=True,
                         stdout=subprocess.PIPE, universal_newlines=True).stdout.split()[1]
    keys = ak.AuthorizedKeys.parse('restrict,port-forwarding,permitopen="127.0.0.1:22" ' + pub)
    (k,) = list(keys)
    assert k.fingerprint == out
    assert k.comment == "op@test" and not keys.warnings


# ---------------------------------------------------------------- issue 10: admin, StrictModes


def test_admin_option_parsed_and_reported():
    raw1, line1 = _key()
    raw2, line2 = _key()
    raw3, line3 = _key()
    keys = ak.AuthorizedKeys.parse("\n".join([
        'remote-gevent-admin,permitopen="127.0.0.1:22" %s admin' % line1,
        line2 + " plain",
        'remote-gevent-admin="yes" %s' % line3,  # the option takes no value: line skipped
    ]), source="ak")
    assert keys.get(ak.fingerprint_of(raw1)).admin is True
    assert keys.get(ak.fingerprint_of(raw1)).permitopen == (TargetPattern("127.0.0.1", 22),)
    assert keys.get(ak.fingerprint_of(raw2)).admin is False
    assert keys.get(ak.fingerprint_of(raw3)) is None
    assert any(w.startswith("ak:3:") and ak.ADMIN_OPTION in w for w in keys.warnings)
    assert not any(ak.ADMIN_OPTION in w for w in keys.warnings if w.startswith("ak:1:"))


@pytest.mark.parametrize("mode", [0o620, 0o660, 0o602, 0o664])
def test_group_or_world_writable_file_refused(tmp_path, mode):
    raw, line = _key()
    p = tmp_path / "authorized_keys"
    p.write_text(line + " op\n")
    os.chmod(str(p), mode)
    with pytest.raises(ak.AuthorizedKeysError, match="group- or world-writable file"):
        ak.AuthorizedKeys.load(str(p))
    os.chmod(str(p), 0o640)
    assert ak.fingerprint_of(raw) in ak.AuthorizedKeys.load(str(p))


@pytest.mark.parametrize("mode", [0o770, 0o757, 0o1777])
def test_file_in_group_or_world_writable_directory_refused(tmp_path, mode):
    raw, line = _key()
    d = tmp_path / "etc"
    d.mkdir()
    p = d / "authorized_keys"
    p.write_text(line + " op\n")
    os.chmod(str(p), 0o600)
    os.chmod(str(d), mode)
    try:
        with pytest.raises(ak.AuthorizedKeysError, match="writable directory"):
            ak.AuthorizedKeys.load(str(p))
    finally:
        os.chmod(str(d), 0o700)
    assert ak.fingerprint_of(raw) in ak.AuthorizedKeys.load(str(p))


def test_trust_stamp_sees_chmod_without_content_change(tmp_path):
    _, line = _key()
    p = tmp_path / "authorized_keys"
    p.write_text(line + "\n")
    os.chmod(str(p), 0o600)
    first = ak.trust_stamp(str(p))
    assert ak.trust_stamp(str(p)) == first
    (tmp_path / "neighbour").write_text("x")  # another file in the directory: no change
    assert ak.trust_stamp(str(p)) == first
    os.chmod(str(p), 0o620)
    second = ak.trust_stamp(str(p))
    assert second != first
    os.chmod(str(tmp_path), 0o770)
    try:
        assert ak.trust_stamp(str(p)) != second
    finally:
        os.chmod(str(tmp_path), 0o700)
    assert ak.trust_stamp(str(tmp_path / "missing")) != first
