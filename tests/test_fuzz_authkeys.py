"""Hostile-input tier: ``authorized_keys`` lines and targets (remote_gevent.crypto.authkeys).

Documented outcome (authkeys.py docstring): ``AuthorizedKeys.parse`` never fails as a
whole — a line it cannot use is skipped with one warning naming the source and line;
``TargetPattern.parse`` returns a pattern or raises ``TargetError``. The warnings are
logged, so each is one line without control characters. Valid lines round-trip (key,
comment, permitopen, admin).
"""

from __future__ import annotations

import logging

from fuzz_settings import examples
from hypothesis import example, given
from hypothesis import strategies as st

from remote_gevent.crypto import authkeys as ak
from remote_gevent.crypto import identity

KEYS = [identity.IdentityKey.generate() for _ in range(3)]
KEY_LINES = [ak.ssh_pubkey_line(k.public_bytes) for k in KEYS]


def _parse(text: str) -> ak.AuthorizedKeys:
    trusted = ak.AuthorizedKeys.parse(text, source="fuzz")
    for w in trusted.warnings:
        assert w.startswith("fuzz:"), w
        assert not any(c < " " or c == "\x7f" for c in w), w
    for op in trusted:
        assert len(op.public_raw32) == 32
        assert all(isinstance(t, ak.TargetPattern) for t in op.permitopen)
    return trusted


_OPTION_NAMES = st.sampled_from(["permitopen", "PermitOpen", "restrict", "no-pty", "from",
                                 "command", "cert-authority", "no-port-forwarding",
                                 ak.ADMIN_OPTION, "expiry-time", "x", ""])
_OPTION_VALUES = st.one_of(st.none(), st.text(max_size=30),
                           st.sampled_from(['127.0.0.1:22', '*:*', '@sftp', '[::1]:22,*:80',
                                            'a\\"b', '"', '', 'host:0', 'host:65536']))


def _option(name, value) -> str:
    return name if value is None else '%s="%s"' % (name, value)


_LINES = st.one_of(
    st.text(max_size=120),
    st.builds(lambda opts, key, comment: ",".join(_option(n, v) for n, v in opts) + " " + key
              + comment,
              st.lists(st.tuples(_OPTION_NAMES, _OPTION_VALUES), max_size=3),
              st.sampled_from(KEY_LINES + ["ssh-ed25519", "ssh-ed25519 AAAA", "ssh-rsa AAAA",
                                           "ssh-ed25519 " + "A" * 68]),
              st.sampled_from(["", " alice", " \x1b[31m", " a b c"])),
)


@examples(300)
@given(st.lists(_LINES, max_size=6), st.sampled_from(["\n", "\r\n", "\r", "\x0b", "\u2028"]))
@example(['permitopen="127.0.0.1:22" ' + KEY_LINES[0] + " \x1b[2J"], "\n")
@example(["from=\"\n\" " + KEY_LINES[0]], "\n")
@example(["x" * (ak.MAX_LINE_CHARS + 1)], "\n")
@example(['\udcff="a" ' + KEY_LINES[1]], "\n")
def test_any_authorized_keys_text(lines, sep):
    # warnings are checked
    logging.getLogger("remote_gevent.crypto.authkeys").setLevel(logging.CRITICAL)
    _parse(sep.join(lines))


@examples(300)
@given(st.one_of(st.text(max_size=40), st.none(), st.integers(), st.binary(max_size=10)),
       st.booleans())
@example("[::1%eth0]:22", True)
@example("1.2.3.4:00022", True)
@example("K.example:22", True)
@example("\u212a.example:22", True)
def test_target_pattern_any_text(text, pattern):
    try:
        t = ak.TargetPattern.parse(text, pattern=pattern)
    except ak.TargetError:
        return
    assert ak.TargetPattern.parse(str(t), pattern=pattern) == t  # normal form is stable
    assert str(t).isascii()


_PATTERNS = st.lists(st.sampled_from(["127.0.0.1:22", "*:*", "@sftp", "@transfer", "[::1]:2222",
                                      "host.example:*", "*:443"]), max_size=3, unique=True)


@examples(150)
@given(st.lists(st.tuples(st.integers(0, 2), _PATTERNS, st.booleans(),
                          st.from_regex(r"\A[A-Za-z0-9@._-]{0,20}\Z")),
                min_size=1, max_size=3))
def test_valid_lines_round_trip(entries):
    text, expected = [], {}
    for i, permit, admin, comment in entries:
        opts = ['permitopen="%s"' % p for p in permit] + ([ak.ADMIN_OPTION] if admin else [])
        line = (",".join(opts) + " " if opts else "") + KEY_LINES[i] + (
            " " + comment if comment else "")
        text.append(line)
        fp = KEYS[i].fingerprint
        if fp not in expected:
            expected[fp] = (tuple(ak.TargetPattern.parse(p) for p in permit), admin, comment)
    trusted = _parse("\n".join(text))
    assert {op.fingerprint for op in trusted} == set(expected)
    for op in trusted:
        assert (op.permitopen, op.admin, op.comment) == expected[op.fingerprint]
