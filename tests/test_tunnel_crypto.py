
import os
import struct
import subprocess
import sys

import pytest

from remote_gevent.crypto import tunnel_crypto as tc

SID = "0123456789abcdef0123456789abcdef"


def _pair(sid: str = SID):
    cpk, csk = tc.kx_keypair()
    apk, ask = tc.kx_keypair()
    console = tc.derive_keys("console", cpk, csk, apk, sid)
    agent = tc.derive_keys("agent", apk, ask, cpk, sid)
    return console, agent, (cpk, csk, apk, ask)


def test_keys_match_crosswise():
    (ctx, crx), (atx, arx), _ = _pair()
    assert ctx == arx
    assert crx == atx
    assert ctx != crx  # the two directions never share a key
    assert len(ctx) == len(crx) == 32


def test_different_session_ids_give_different_keys():
    cpk, csk = tc.kx_keypair()
    apk, ask = tc.kx_keypair()
    k1 = tc.derive_keys("console", cpk, csk, apk, SID)
    k2 = tc.derive_keys("console", cpk, csk, apk, "f" * 32)
    assert k1[0] != k2[0] and k1[1] != k2[1]


def test_keys_are_bound_not_raw_kx():
    cpk, csk = tc.kx_keypair()
    apk, _ = tc.kx_keypair()
    import nacl.bindings

    rx, tx = nacl.bindings.crypto_kx_client_session_keys(cpk, csk, apk)
    mytx, myrx = tc.derive_keys("console", cpk, csk, apk, SID)
    assert mytx != tx and myrx != rx


def test_derive_keys_rejects_bad_input():
    cpk, csk = tc.kx_keypair()
    apk, _ = tc.kx_keypair()
    with pytest.raises(ValueError):
        tc.derive_keys("relay", cpk, csk, apk, SID)
    with pytest.raises(ValueError):
        tc.derive_keys("console", cpk, csk, apk[:31], SID)


def _ciphers():
    out = [tc.XCHACHA20POLY1305]
    if tc.aes256gcm_available():
        out.append(tc.AES256GCM)
    return out


def _split(frame):
    frame = bytes(frame)
    return frame[:4], frame[4:]


def _libsodium(obj):
    """The same sealer/opener with OpenSSL's AES-GCM switched off (libsodium's is used)."""
    obj._gcm = None
    return obj


def _backends():
    out = list(_ciphers())
    if tc.AES256GCM in out:
        out.append(tc.AES256GCM + "/libsodium")
    return out


@pytest.fixture(params=_backends())
def channel(request):
    """Every cipher, AES-256-GCM through OpenSSL (when usable) and through libsodium."""
    (ctx, _), (_, arx), _ = _pair()
    cipher, _, backend = request.param.partition("/")
    sealer, opener = tc.FrameSealer(ctx, cipher), tc.FrameOpener(arx, cipher)
    if backend == "libsodium":
        _libsodium(sealer)
        _libsodium(opener)
    return sealer, opener


@pytest.mark.skipif(tc.AES256GCM not in _ciphers(), reason="no AES-256-GCM here")
def test_openssl_and_libsodium_aes256gcm_are_interchangeable(monkeypatch):
    """OpenSSL's AES-256-GCM (aead_openssl) writes the very frames libsodium writes: an
    agent with one and a console with the other interoperate, frame by frame."""
    monkeypatch.delenv(tc.aead_openssl.ENV, raising=False)
    tc.aead_openssl.use_backend("openssl")
    if tc.aead_openssl.aes256gcm(bytes(32)) is None:
        pytest.skip("cryptography without encrypt_into: libsodium only")
    (ctx, _), (_, arx), _ = _pair()
    fast = tc.FrameSealer(ctx, tc.AES256GCM)
    slow = _libsodium(tc.FrameSealer(ctx, tc.AES256GCM))
    assert fast._gcm is not None
    o_fast = tc.FrameOpener(arx, tc.AES256GCM)
    o_slow = _libsodium(tc.FrameOpener(arx, tc.AES256GCM))
    for pt in (b"", b"x", os.urandom(tc.MAX_PLAINTEXT)):
        a, b = fast.seal(pt), slow.seal(pt)
        assert a == b  # same counter, key, nonce and AAD: identical wire bytes
        assert o_slow.open(*_split(a)) == pt
        assert o_fast.open(*_split(b)) == pt
    bad = bytearray(fast.seal(b"tampered"))
    bad[-1] ^= 1
    with pytest.raises(tc.FrameAuthError):
        o_fast.open(*_split(bad))
    with pytest.raises(tc.FrameAuthError):  # and the opener stays dead
        o_fast.open(*_split(slow.seal(b"next")))
    tc.aead_openssl.use_backend("libsodium")


def test_the_agent_keeps_libsodium_unless_told_and_the_console_uses_openssl(monkeypatch):
    """The default library per role (memory on the device, CPU on the console)."""
    monkeypatch.delenv(tc.aead_openssl.ENV, raising=False)
    tc.aead_openssl.use_backend("libsodium")  # the agent's default (module default)
    assert tc.aead_openssl.aes256gcm(bytes(32)) is None
    monkeypatch.setenv(tc.aead_openssl.ENV, "openssl")
    tc.aead_openssl.use_backend("libsodium")  # the environment wins
    openssl_here = tc.aead_openssl.aes256gcm(bytes(32)) is not None
    monkeypatch.delenv(tc.aead_openssl.ENV)
    tc.aead_openssl.use_backend("libsodium")
    with pytest.raises(ValueError):
        tc.aead_openssl.use_backend("rot13")
    if sys.version_info < (3, 8):
        return  # the console needs Python 3.8 (the agent's tiers run this file on 3.6/3.7)
    code = ("import remote_gevent.console.cli\n"
            "from remote_gevent.crypto import aead_openssl as a\n"
            "print(a.aes256gcm(bytes(32)) is not None)\n")
    env = {k: v for k, v in os.environ.items() if k != tc.aead_openssl.ENV}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(openssl_here)


def test_round_trip_both_ciphers(channel):
    sealer, opener = channel
    for pt in (b"", b"\x05\x00\x00\x00\x01hello", os.urandom(tc.MAX_PLAINTEXT)):
        frame = sealer.seal(pt)
        (n,) = struct.unpack(">I", bytes(frame[:4]))
        assert n == len(pt) + tc.TAG_BYTES == len(frame) - 4
        assert pt not in bytes(frame) or pt == b""
        assert opener.open(*_split(frame)) == pt
    assert sealer.counter == opener.counter == 3


def test_full_frames_are_reused_only_once_nobody_holds_them(channel):
    """Full-size frames come from a small spare list (no heap trim per ACK batch); a frame
    still held (e.g. in the resend buffer, or a memoryview of it) is never overwritten,
    and every frame, reused or not, opens to its own plaintext."""
    sealer, opener = channel
    held = []
    for i in range(3 * tc.SPARE_FRAMES):
        pt = bytes([i]) * tc.MAX_PLAINTEXT
        held.append((pt, sealer.seal(pt), bytes(sealer.seal(b"short"))))
    assert len({id(frame) for _, frame, _ in held}) == len(held)  # all held: all distinct
    views = [memoryview(frame) for _, frame, _ in held[-4:]]
    for pt, frame, short in held:
        assert opener.open(*_split(frame)) == pt
        assert opener.open(*_split(short)) == b"short"
    snapshot = [bytes(v) for v in views]
    held = None
    reused = 0
    for i in range(3 * tc.SPARE_FRAMES):
        pt = bytes([200 + i % 50]) * tc.MAX_PLAINTEXT
        oldest = id(sealer._spares[0])  # its id only: a reference would pin it
        frame = sealer.seal(pt)
        reused += id(frame) == oldest
        assert opener.open(*_split(frame)) == pt
        frame = None
    assert [bytes(v) for v in views] == snapshot  # frames behind live views untouched
    if hasattr(sys, "getrefcount"):  # CPython: the dropped frames come back
        assert reused >= 2 * tc.SPARE_FRAMES
    # A small frame long after the last full one (an idle session's PING): spares dropped.
    assert sealer._spares
    assert opener.open(*_split(sealer.seal(b"ping"))) == b"ping"
    assert sealer._spares  # not yet idle
    sealer._last_full -= tc.SPARE_IDLE_SECONDS + 1
    assert opener.open(*_split(sealer.seal(b"ping"))) == b"ping"
    assert not sealer._spares


def test_open_accepts_memoryview(channel):
    sealer, opener = channel
    frame = sealer.seal(bytearray(b"abc"))
    mv = memoryview(frame)
    assert opener.open(mv[:4], mv[4:]) == b"abc"


def test_tampered_byte_fails_and_kills_opener(channel):
    sealer, opener = channel
    frame = bytearray(sealer.seal(b"payload" * 100))
    frame[20] ^= 1
    with pytest.raises(tc.FrameAuthError):
        opener.open(*_split(frame))
    assert opener.dead
    # even a genuine frame is refused afterwards
    with pytest.raises(tc.FrameAuthError):
        opener.open(*_split(sealer.seal(b"fine")))


def test_tampered_length_prefix_fails(channel):
    sealer, opener = channel
    prefix, body = _split(sealer.seal(b"abcdef"))
    with pytest.raises(tc.FrameAuthError):
        opener.open(struct.pack(">I", len(body) - 1), body[:-1])


def test_replayed_frame_fails(channel):
    sealer, opener = channel
    frame = sealer.seal(b"once")
    assert opener.open(*_split(frame)) == b"once"
    with pytest.raises(tc.FrameAuthError):
        opener.open(*_split(frame))


def test_reordered_frames_fail(channel):
    sealer, opener = channel
    f1 = sealer.seal(b"first")
    f2 = sealer.seal(b"second")
    with pytest.raises(tc.FrameAuthError):
        opener.open(*_split(f2))
    with pytest.raises(tc.FrameAuthError):
        opener.open(*_split(f1))  # dead now


def test_dropped_frame_fails(channel):
    sealer, opener = channel
    sealer.seal(b"lost")
    with pytest.raises(tc.FrameAuthError):
        opener.open(*_split(sealer.seal(b"next")))


def test_truncated_frame_fails(channel):
    sealer, opener = channel
    prefix, body = _split(sealer.seal(b"x" * 50))
    with pytest.raises(tc.FrameAuthError):
        opener.open(prefix, body[:-1])
    _, opener2 = channel
    with pytest.raises(tc.FrameAuthError):
        opener2.open(prefix[:3], body)


def test_reflected_frame_fails():
    # A frame sent by the console, bounced back to the console by a hostile relay.
    (ctx, crx), _, _ = _pair()
    cipher = tc.XCHACHA20POLY1305
    frame = tc.FrameSealer(ctx, cipher).seal(b"hello")
    with pytest.raises(tc.FrameAuthError):
        tc.FrameOpener(crx, cipher).open(*_split(frame))


def test_other_session_key_fails():
    (ctx, _), _, _ = _pair()
    _, (_, arx_other), _ = _pair()
    frame = tc.FrameSealer(ctx, tc.XCHACHA20POLY1305).seal(b"hello")
    with pytest.raises(tc.FrameAuthError):
        tc.FrameOpener(arx_other, tc.XCHACHA20POLY1305).open(*_split(frame))


def test_cipher_mismatch_fails():
    if not tc.aes256gcm_available():
        pytest.skip("no AES-256-GCM here")
    (ctx, _), (_, arx), _ = _pair()
    frame = tc.FrameSealer(ctx, tc.AES256GCM).seal(b"hello")
    with pytest.raises(tc.FrameAuthError):
        tc.FrameOpener(arx, tc.XCHACHA20POLY1305).open(*_split(frame))


def test_too_large(channel):
    sealer, opener = channel
    with pytest.raises(tc.FrameTooLarge):
        sealer.seal(bytes(tc.MAX_PLAINTEXT + 1))
    assert sealer.counter == 0  # nothing consumed
    big = tc.MAX_CIPHERTEXT + 1
    with pytest.raises(tc.FrameTooLarge):
        opener.frame_length(struct.pack(">I", big))
    assert opener.dead
    # the design bound: len <= 65536 + 64
    assert tc.MAX_CIPHERTEXT <= 65536 + 64


def test_short_frame_refused(channel):
    _, opener = channel
    with pytest.raises(tc.FrameAuthError):
        opener.open(struct.pack(">I", 3), b"abc")


def test_counter_overflow_refused():
    (ctx, _), (_, arx), _ = _pair()
    sealer = tc.FrameSealer(ctx, tc.XCHACHA20POLY1305)
    opener = tc.FrameOpener(arx, tc.XCHACHA20POLY1305)
    sealer._counter = tc.MAX_COUNTER
    opener._counter = tc.MAX_COUNTER
    frame = sealer.seal(b"last")
    assert opener.open(*_split(frame)) == b"last"
    with pytest.raises(tc.CounterExhausted):
        sealer.seal(b"one too many")
    with pytest.raises(tc.FrameAuthError):
        opener.open(*_split(frame))


def test_nonce_is_little_endian_counter():
    # Frame n must open with an independent implementation using nonce = LE(n) | zeros.
    import nacl.bindings

    key = os.urandom(32)
    sealer = tc.FrameSealer(key, tc.XCHACHA20POLY1305)
    sealer.seal(b"zero")
    prefix, body = _split(sealer.seal(b"one"))
    nonce = struct.pack("<Q", 1) + bytes(16)
    opened = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(body, prefix, nonce, key)
    assert opened == b"one"


def test_choose_cipher():
    assert tc.choose_cipher(tc.XCHACHA20POLY1305) == tc.XCHACHA20POLY1305
    assert tc.choose_cipher("rot13") == tc.XCHACHA20POLY1305
    expected = tc.AES256GCM if tc.aes256gcm_available() else tc.XCHACHA20POLY1305
    assert tc.choose_cipher(tc.AES256GCM) == expected


def test_choose_cipher_falls_back_when_aes_raises(monkeypatch):
    import nacl.bindings
    from nacl.exceptions import UnavailableError

    def broken(*args):
        raise UnavailableError("Construction requires hardware acceleration")

    monkeypatch.setattr(tc, "_aes_available", None)
    # PyNaCl 1.5 (the last for Python 3.6) has no AES-GCM binding at all: add one.
    monkeypatch.setattr(nacl.bindings, "crypto_aead_aes256gcm_encrypt", broken, raising=False)
    assert tc.choose_cipher(tc.AES256GCM) == tc.XCHACHA20POLY1305
    with pytest.raises(ValueError):
        tc.FrameSealer(bytes(32), tc.AES256GCM)
    monkeypatch.setattr(tc, "_aes_available", None)  # re-probe for later tests


def test_unknown_cipher_and_bad_key():
    with pytest.raises(ValueError):
        tc.FrameSealer(bytes(32), "none")
    with pytest.raises(ValueError):
        tc.FrameOpener(bytes(31), tc.XCHACHA20POLY1305)


def test_plain_variants_are_explicit():
    sealer, opener = tc.make_sealer_opener(bytes(32), bytes(32), tc.XCHACHA20POLY1305)
    assert isinstance(sealer, tc.FrameSealer) and isinstance(opener, tc.FrameOpener)
    # The product cannot build a plaintext tunnel: the doubles live outside the package.
    assert not any(name.startswith("Plain") for name in dir(tc))
    with pytest.raises(TypeError):
        tc.make_sealer_opener(b"", b"", "", insecure_plaintext=True)  # type: ignore[call-arg]
    from benchmarks.plain_frames import PlainOpener, PlainSealer

    ps, po = PlainSealer(), PlainOpener()
    frame = ps.seal(b"clear")
    assert bytes(frame) == struct.pack(">I", 5) + b"clear"
    assert po.open(*_split(frame)) == b"clear"
    with pytest.raises(tc.FrameTooLarge):
        ps.seal(bytes(tc.MAX_PLAINTEXT + 1))
