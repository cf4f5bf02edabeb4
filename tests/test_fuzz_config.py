"""Hostile-input tier: the agent's config file (remote_gevent.agent.config) under fuzzing.

Documented outcome (config.py docstring): ``config.load`` returns an ``AgentConfig`` or
raises ``ConfigError`` whose ``problems`` each name the file and the dotted key (and the
bad value, never a secret); no other exception, whatever the YAML document holds.
Documents are the example config with keys replaced, removed or added (values: any YAML
tree), written with ``yaml.safe_dump`` and read through ``config.load``.
"""

from __future__ import annotations

import atexit
import copy
import os
import shutil
import tempfile

import yaml
from fuzz_settings import examples
from hypothesis import assume, example, given
from hypothesis import strategies as st

from remote_gevent.agent import config

_TMP = tempfile.mkdtemp(prefix="rg-fuzz-config-")
atexit.register(shutil.rmtree, _TMP, True)
PATH = os.path.join(_TMP, "config.yaml")
HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "..", "conf", "config.yaml")) as _f:
    BASE = yaml.safe_load(_f)
BASE.setdefault("remote", {}).setdefault("transfer", {}).setdefault(
    "roots", [{"path": _TMP, "mode": "rw", "max_size": "1M"}])

_KEYS = sorted({k.split(".")[-1] for k, _, _, _ in config.iter_keys()}
               | {"amqp", "remote", "transfer", "roots", "path", "mode", "max_size"})
_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
    st.text(max_size=20),
    st.sampled_from(["amqps://[::1", "amqps://h:99999/", "amqp://10.0.0.1/", "a:\u00b2",
                     "h:" + "9" * 5000, "9" * 5000 + "K", "\u0661\u0662M", "127.0.0.1:*",
                     "[::1]:22", "~/x", "\x00", "rw", "ro", "fr04", "-1", "1e9"]),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda kids: st.one_of(st.lists(kids, max_size=3),
                           st.dictionaries(st.one_of(st.sampled_from(_KEYS), st.integers(),
                                                     st.text(max_size=5)), kids, max_size=3)),
    max_leaves=8)


def _load(doc):
    try:
        text = yaml.safe_dump(doc, allow_unicode=True)
    except yaml.YAMLError:
        assume(False)
    with open(PATH, "w", encoding="utf-8") as f:
        f.write(text)
    try:
        return config.load(PATH)
    except config.ConfigError as exc:
        assert exc.problems
        for line in exc.problems:
            assert line.startswith(PATH + ": "), line
            assert line[len(PATH) + 2:].split(":", 1)[0], line  # names a key (or the file)
        assert "change-me" not in str(exc) or "token" not in str(exc)
        return None


def _set(doc, path, value):
    node = doc
    for k in path[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[path[-1]] = value


_PATHS = st.sampled_from(
    [(k,) for k in ("ident", "token", "amqp", "remote", "other_plugin")]
    + [("amqp", k.split(".")[1]) for k, _, _, _ in config.iter_keys() if k.startswith("amqp.")]
    + [("remote", k.split(".")[1]) for k, _, _, _ in config.iter_keys()
       if k.startswith("remote.") and not k.startswith("remote.transfer.")]
    + [("remote", "transfer", k.split(".")[2]) for k, _, _, _ in config.iter_keys()
       if k.startswith("remote.transfer.")]
    + [("remote", "transfer", "roots"), ("remote", "unknown"), ("amqp", "unknown")])


@examples(250)
@given(st.lists(st.tuples(_PATHS, st.one_of(_VALUES, st.just("__delete__"))), max_size=4))
@example([(("amqp", "urls"), ["amqps://[::1"])])
@example([(("remote", "allow"), ["a:\u00b2"])])
@example([(("remote", "relays"), {"fr04": "h:" + "9" * 5000})])
@example([(("remote", "transfer", "max_size"), "9" * 5000 + "K")])
@example([(("remote", "transfer", "roots"), [{1: "a", "z": 2, "path": "/x"}])])
@example([(("token", ), 12345), (("remote", "max_session"), True)])
@example([(("remote", "relays"), {1: "h:1", "fr04": "h:2"})])
@example([(("amqp", "unknown"), 1), (("amqp", 2), 1)])
def test_mutated_config(changes):
    doc = copy.deepcopy(BASE)
    for path, value in changes:
        if value == "__delete__":
            node = doc
            for k in path[:-1]:
                node = node.get(k) if isinstance(node, dict) else None
            if isinstance(node, dict):
                node.pop(path[-1], None)
        else:
            _set(doc, path, value)
    _load(doc)


@examples(100)
@given(_VALUES)
def test_any_document(doc):
    _load(doc)


@examples(100)
@given(st.binary(max_size=200))
@example(b"a: &x [*x]\n")
@example(b"\xff\xfe")
@example(b"!!python/object:os.system {}\n")
@example(b"? [a, b]\n: 1\n")
def test_any_bytes(raw):
    with open(PATH, "wb") as f:
        f.write(raw)
    try:
        config.load(PATH)
    except config.ConfigError as exc:
        assert all(line.startswith(PATH + ": ") for line in exc.problems), exc.problems


def test_example_config_loads():
    """The unmutated example (the round-trip anchor of the mutations above) is valid."""
    assert _load(copy.deepcopy(BASE)) is not None
