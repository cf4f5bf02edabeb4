"""Agent config: defaults, validation messages (file, key, value), unknown keys."""

import dataclasses
import os
import textwrap

import pytest

from remote_gevent.agent import config
from remote_gevent.common.configschema import parse_amqp_url

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, "conf", "config.yaml")


def write(tmp_path, text, name="config.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def problems_of(path):
    with pytest.raises(config.ConfigError) as info:
        config.load(path)
    return info.value.problems


def test_example_config_is_valid_and_complete():
    cfg = config.load(EXAMPLE)
    assert cfg.remote.enabled is True
    assert cfg.ident == "device-0001"
    assert config.topic(cfg) == "remote.fr04.device-0001"
    # Every declared key is documented in the example (as a key and in a comment).
    text = open(EXAMPLE).read()
    for dotted, _type, _default, _help in config.iter_keys():
        name = dotted.split(".")[-1]
        assert "%s:" % name in text, dotted
        assert "# %s" % name in text or "%s /" % name in text or "/ %s" % name in text, dotted


def test_defaults_from_empty_file(tmp_path):
    cfg = config.load(write(tmp_path, ""))
    assert cfg.remote.enabled is False
    assert cfg.remote.server_id == "fr04"
    assert cfg.remote.health_check == 600
    assert cfg.remote.max_session == 10
    assert cfg.remote.key_path == "/etc/alemca/remote_ed25519"
    assert cfg.remote.history_path == "/var/lib/alemca/remote_history.csv"
    assert cfg.remote.authorized_keys == "/etc/alemca/remote_authorized_keys"
    assert cfg.remote.allow == ("127.0.0.1:22",)
    assert dict(cfg.remote.relays) == {"fr04": "relay.fr04.alemca.net:8443"}
    assert cfg.remote.idle_timeout == 1800
    assert cfg.remote.ack_timeout == 60
    assert cfg.remote.keepalive_interval == 15
    assert cfg.remote.queue_timeout == 60
    assert cfg.remote.key_rotation_days == 0
    assert cfg.remote.transfer.roots == ()
    assert cfg.remote.transfer.max_size == 4 * 1024 ** 3
    assert cfg.remote.transfer.overwrite is False
    assert cfg.amqp.urls == ("amqps://localhost:5671/",)
    assert cfg.amqp.ca_file is None
    assert cfg.amqp.heartbeat == 30
    assert cfg.amqp.connect_timeout == 10.0
    assert cfg.amqp.reconnect_max_delay == 60.0
    assert cfg.ident is None and cfg.token is None


def test_frozen(tmp_path):
    cfg = config.load(write(tmp_path, ""))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.remote.max_session = 3  # type: ignore[misc]


def test_other_sections_ignored_and_relative_paths(tmp_path):
    path = write(tmp_path, """
        ident: dev_1
        token: s3cret
        monitoring: {interval: 5, whatever: [1, 2]}
        remote:
          enabled: true
          key_path: keys/id_ed25519
          transfer:
            roots: [{path: files, mode: rw, max_size: 1M}]
            max_size: 2G
            overwrite: true
    """)
    cfg = config.load(path)
    assert cfg.remote.key_path == str(tmp_path / "keys" / "id_ed25519")
    root = cfg.remote.transfer.roots[0]
    assert root.path == str(tmp_path / "files") and root.writable and root.max_size == 1024 ** 2
    assert cfg.remote.transfer.max_size == 2 * 1024 ** 3
    assert cfg.remote.transfer.overwrite is True
    assert "s3cret" not in repr(cfg)


def test_every_problem_listed_with_file_key_and_value(tmp_path):
    path = write(tmp_path, """
        ident: "bad ident!"
        amqp:
          urls: ["amqp://broker.example.com/"]
          heartbeat: -1
          colour: blue
        remote:
          enabled: yes
          server_id: de01
          max_session: ten
          health_check: 0
          allow: ["127.0.0.1:*", "nohostport"]
          frobnicate: 1
          transfer:
            roots: [{path: /srv, mode: rx}]
            max_size: lots
    """)
    problems = problems_of(path)
    joined = "\n".join(problems)
    expected = [
        ("ident", "'bad ident!'"),
        ("amqp.urls[0]", "'amqp://broker.example.com/'"),
        ("amqp.heartbeat", "-1"),
        ("amqp.colour", "'blue'"),
        ("remote.server_id", "'de01'"),
        ("remote.max_session", "'ten'"),
        ("remote.health_check", "0"),
        ("remote.allow[1]", "'nohostport'"),
        ("remote.frobnicate", "1"),
        ("remote.transfer.roots[0].mode", "'rx'"),
        ("remote.transfer.max_size", "'lots'"),
        ("token", "required"),
    ]
    for key, value in expected:
        line = [p for p in problems if (": %s:" % key) in p]
        assert line, "no problem for %s in:\n%s" % (key, joined)
        assert line[0].startswith(path + ": "), line[0]
        assert value in line[0], line[0]
    assert "supported: fr04" in joined


def test_server_id_refused_naming_supported(tmp_path):
    problems = problems_of(write(tmp_path, "remote: {server_id: us01}\n"))
    assert len(problems) == 1
    assert "remote.server_id" in problems[0] and "'us01'" in problems[0]
    assert "fr04" in problems[0]


def test_enabled_requires_credentials(tmp_path):
    problems = problems_of(write(tmp_path, "remote: {enabled: true}\n"))
    assert any(": ident:" in p for p in problems)
    assert any(": token:" in p for p in problems)
    assert config.load(write(tmp_path, "ident: a\ntoken: b\nremote: {enabled: true}\n"))


def test_token_never_echoed(tmp_path):
    problems = problems_of(write(tmp_path, "token: [hunter2]\n"))
    assert "hunter2" not in "\n".join(problems)
    assert "token" in problems[0]


@pytest.mark.parametrize("ident", ["x" * 65, "a.b", "a b", "", "é"])
def test_ident_pattern(tmp_path, ident):
    problems = problems_of(write(tmp_path, "ident: %r\n" % ident))
    assert ": ident:" in problems[0]


def test_amqp_urls_and_tls_files(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    cfg = config.load(write(tmp_path, """
        amqp:
          urls: [amqps://b1:5671/vh, "amqp://127.0.0.1:5672/"]
          ca_file: ca.pem
    """))
    assert cfg.amqp.ca_file == str(ca)
    assert cfg.remote.relay_ca_file == str(ca)  # null → amqp.ca_file
    assert any("not encrypted" in w for w in cfg.warnings)
    assert parse_amqp_url("amqps://b1/") == ("amqps", "b1", 5671, "/")
    problems = problems_of(write(tmp_path, """
        amqp: {ca_file: missing.pem, cert_file: ca.pem, urls: ["amqps://u:p@h/"]}
    """))
    joined = "\n".join(problems)
    assert "amqp.ca_file" in joined and "does not exist" in joined
    assert "amqp.key_file" in joined  # cert without key
    assert "amqp.urls[0]" in joined


def test_relays_must_cover_server_id(tmp_path):
    problems = problems_of(write(tmp_path, "remote: {relays: {xx01: 'h:1'}}\n"))
    assert "remote.relays" in problems[0] and "fr04" in problems[0]
    problems = problems_of(write(tmp_path, "remote: {relays: {fr04: 'h:port'}}\n"))
    assert "remote.relays.fr04" in problems[0]


def test_bad_yaml_and_missing_file(tmp_path):
    problems = problems_of(write(tmp_path, "remote: [unclosed\n"))
    assert "invalid YAML" in problems[0]
    problems = problems_of(str(tmp_path / "nope.yaml"))
    assert "cannot read" in problems[0]
    problems = problems_of(write(tmp_path, "- a list\n"))
    assert "mapping" in problems[0]
    problems = problems_of(write(tmp_path, "remote: 3\n"))
    assert "remote" in problems[0] and "mapping" in problems[0]


def test_default_path(monkeypatch):
    monkeypatch.delenv("REMOTE_GEVENT_CONFIG", raising=False)
    assert config.default_path() == "/etc/alemca/config.yaml"
    monkeypatch.setenv("REMOTE_GEVENT_CONFIG", "/tmp/x.yaml")
    assert config.default_path() == "/tmp/x.yaml"


def test_sizes_and_host_port():
    assert config.parse_size("4G") == 4 * 1024 ** 3
    assert config.parse_size("512MiB") == 512 * 1024 ** 2
    assert config.parse_size(10) == 10
    for bad in (0, -1, "x", True, "1.5G"):
        with pytest.raises(config.Invalid):
            config.parse_size(bad)
    assert config.split_host_port("[::1]:22") == ("::1", 22)
    assert config.split_host_port("h:*", wildcard_port=True) == ("h", None)
    for bad in ("h:*", "h:0", "h:70000", ":22", "*:22"):
        with pytest.raises(config.Invalid):
            config.split_host_port(bad)


# The broker URL used to be parsed by config validation and by the AMQP link with
# different rules: "amqps://host/vh?heartbeat=5" passed check-config, then the agent
# stopped at start (after the daemon's readiness pipe had said "started").
BROKER_URLS = [
    ("amqps://broker.example/", True),
    ("amqps://broker.example:5671/rg%2Ftest", True),
    ("amqps://[::1]:5671/x", True),
    ("amqp://127.0.0.1:5672/", True),
    ("amqp://localhost/", True),
    ("amqps://broker.example/vh?heartbeat=5", False),
    ("amqps://broker.example/#frag", False),
    ("amqps://user:secret-token@broker.example/", False),
    ("amqp://broker.example/", False),
    ("http://broker.example/", False),
    ("amqps://[::1/", False),
    ("amqps://broker.example:99999/", False),
    ("amqps://broker.example:port/", False),
    ("amqps:///vh", False),
]


@pytest.mark.parametrize("url,valid", BROKER_URLS)
def test_check_config_and_the_link_accept_exactly_the_same_broker_urls(tmp_path, url, valid):
    from remote_gevent.common.amqplink import LinkConfigError, parse_url
    from agent_helpers import run_cli

    path = write(tmp_path, """\
        ident: dev1
        token: t0k3n
        amqp:
          urls: ["%s"]
        remote:
          enabled: true
    """ % url)
    checked = run_cli("check-config", "--config", path)
    try:
        parse_url(url)
        link_ok = True
    except LinkConfigError as exc:
        link_ok = False
        assert "secret-token" not in str(exc)
    assert (checked.returncode == 0) is valid, checked.stdout + checked.stderr
    assert link_ok is valid
    assert "secret-token" not in checked.stdout + checked.stderr  # never echo a password
