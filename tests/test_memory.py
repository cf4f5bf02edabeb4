"""remote_gevent.common.memory: gc + glibc malloc_trim, never fatal."""

import os
import sys

import pytest

from remote_gevent.common import memory

GLIBC = bool(getattr(os, "confstr", None) and os.confstr("CS_GNU_LIBC_VERSION"))


@pytest.fixture(autouse=True)
def fresh_lookup(monkeypatch):
    monkeypatch.setattr(memory, "_malloc_trim", None)


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_release_trims_on_glibc():
    assert memory.release() is True
    assert memory.release() is True  # looked up once, callable again


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_release_falls_back_to_ctypes_without_cffi_backend(monkeypatch):
    monkeypatch.setitem(sys.modules, "_cffi_backend", None)  # import raises ImportError
    assert memory.release() is True
    assert "ctypes" in type(memory._malloc_trim).__module__


def test_release_does_nothing_off_glibc(monkeypatch):
    monkeypatch.setattr(os, "confstr", lambda name: None)
    assert memory.release() is False
    monkeypatch.setattr(memory, "_malloc_trim", None)

    def unknown(name):
        raise ValueError("unrecognized configuration name")

    monkeypatch.setattr(os, "confstr", unknown)
    assert memory.release() is False


def test_rss_kib():
    rss = memory.rss_kib()
    assert rss is None or rss > 0
