"""First-sight pins in batch mode (what a console draining a status queue uses): one
fsync'd write for many devices, visible at once, merged with other consoles' pins."""

from __future__ import annotations

import logging

from remote_gevent.common import fsutil
from remote_gevent.console import known_devices
from remote_gevent.console.known_devices import KnownDevices
from remote_gevent.crypto import identity
from remote_gevent.wire import protocol

Key = identity.IdentityKey.generate


def key_msg(key, ident, previous=None):
    return protocol.make_key_announcement(key, ident, "fr04", previous_key=previous, ts=1000)


def counting_writes(monkeypatch):
    writes = []
    real = fsutil.write_atomic

    def write_atomic(path, text, mode):
        writes.append(path)
        return real(path, text, mode)

    monkeypatch.setattr(fsutil, "write_atomic", write_atomic)
    return writes


def test_many_first_sights_are_one_write_per_batch_and_visible_at_once(tmp_path, monkeypatch):
    writes = counting_writes(monkeypatch)
    monkeypatch.setattr(known_devices, "BATCH_MAX_AGE", 3600.0)  # only the count bound
    kd = KnownDevices(str(tmp_path / "kd"))
    kd.batch_first_sight = True
    keys = {"dev-%04d" % i: Key() for i in range(known_devices.BATCH_MAX_PINS + 20)}
    for ident, key in keys.items():
        outcome, pin = kd.learn(key_msg(key, ident))
        assert outcome == "new" and kd.get("fr04", ident).fingerprint == key.fingerprint
    assert len(writes) == 1  # the count bound flushed the first 500 at once
    kd.flush()
    assert len(writes) == 2
    fresh = KnownDevices(kd.path)  # what the next console run reads
    assert {p.ident: p.fingerprint for p in fresh.all()} == {
        ident: key.fingerprint for ident, key in keys.items()}
    assert all(p.via == "tofu" for p in fresh.all())
    kd.flush()
    assert len(writes) == 2  # nothing staged: no write


def test_a_batch_flushes_once_its_oldest_pin_is_old(tmp_path, monkeypatch):
    writes = counting_writes(monkeypatch)
    monkeypatch.setattr(known_devices, "BATCH_MAX_AGE", 0.0)
    kd = KnownDevices(str(tmp_path / "kd"))
    kd.batch_first_sight = True
    kd.learn(key_msg(Key(), "dev-1"))
    assert len(writes) == 1 and KnownDevices(kd.path).get("fr04", "dev-1") is not None


def test_another_consoles_pin_written_meanwhile_wins_and_is_reported(tmp_path, caplog):
    path = str(tmp_path / "kd")
    ours, theirs = KnownDevices(path), KnownDevices(path)
    ours.batch_first_sight = True
    k_ours, k_theirs, k_other = Key(), Key(), Key()
    ours.learn(key_msg(k_ours, "dev-1"))
    ours.learn(key_msg(k_other, "dev-2"))
    theirs.learn(key_msg(k_theirs, "dev-1"))  # written at once (not in batch mode)
    with caplog.at_level(logging.ERROR):
        ours.flush()
    fresh = KnownDevices(path)
    assert fresh.get("fr04", "dev-1").fingerprint == k_theirs.fingerprint
    assert fresh.get("fr04", "dev-2").fingerprint == k_other.fingerprint
    assert "pinned by another console meanwhile" in caplog.text


def test_a_rotation_or_forget_of_a_staged_pin_is_not_undone_by_the_flush(tmp_path):
    kd = KnownDevices(str(tmp_path / "kd"))
    kd.batch_first_sight = True
    k1, k2, k3 = Key(), Key(), Key()
    kd.learn(key_msg(k1, "dev-1"))
    assert kd.learn(key_msg(k2, "dev-1", previous=k1))[0] == "rotated"
    kd.learn(key_msg(k3, "dev-2"))
    assert kd.forget("fr04", "dev-2")
    kd.flush()
    fresh = KnownDevices(kd.path)
    assert fresh.get("fr04", "dev-1").fingerprint == k2.fingerprint
    assert fresh.get("fr04", "dev-2") is None
