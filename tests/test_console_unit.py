"""Console unit tests: no network (config, pins, specs, SOCKS5 parsing, exit codes)."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys

import gevent
import pytest

from remote_gevent.crypto import authkeys
from remote_gevent.crypto import identity
from remote_gevent.wire import protocol
from remote_gevent.console import config as cconfig
from remote_gevent.console import control as ccontrol
from remote_gevent.console import socks
from remote_gevent.console.forward import SpecError, parse_forward_spec, parse_listen_spec
from remote_gevent.console.known_devices import KeyChanged, KnownDevices, parse_line

CLI = [sys.executable, "-m", "remote_gevent.console.cli"]


# A signer as protocol.py expects it (.sign, .fingerprint): the agent's own key type.
Key = identity.IdentityKey.generate


def run_cli(*args, env=None, stdin=subprocess.DEVNULL):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True,
                          timeout=30, env=env, stdin=stdin)


# --------------------------------------------------------------------------- config


def write(tmp_path, text, name="console.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_config_defaults_relative_to_the_file(tmp_path):
    cfg = cconfig.load(write(tmp_path, "user: op\npassword: pw\n"))
    assert cfg.operator_key == str(tmp_path / "operator_ed25519")
    assert cfg.known_devices == str(tmp_path / "known_devices")
    assert cfg.state_file == str(tmp_path / "devices.json")
    assert cfg.relay_address == "relay.fr04.alemca.net:8443"
    assert cfg.status_queue_name == "console.op.status"
    assert cfg.amqp.urls == ("amqps://broker.fr04.alemca.net:5671/",)
    assert "pw" not in repr(cfg)


def test_config_errors_name_file_key_and_value_and_hide_the_password(tmp_path):
    path = write(tmp_path, "user: op\npassword: [secret-pw]\nserver_id: xx99\nrelay: nope\n"
                           "bogus: 1\namqp: {urls: ['http://x/'], heartbeat: -1}\n"
                           "reply_timeout: fast\n")
    with pytest.raises(cconfig.ConfigError) as info:
        cconfig.load(path)
    text = "\n".join(info.value.problems)
    for needle in ("server_id", "'xx99'", "relay", "'nope'", "bogus", "amqp.urls[0]",
                   "'http://x/'", "amqp.heartbeat", "reply_timeout", "'fast'", "password"):
        assert needle in text, needle
    assert "secret-pw" not in text
    assert all(p.startswith(path + ": ") for p in info.value.problems)


def test_config_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(cconfig.ConfigError, match="not found"):
        cconfig.load(str(tmp_path / "none.yaml"))
    assert cconfig.load(str(tmp_path / "none.yaml"), allow_missing=True).user is None
    with pytest.raises(cconfig.ConfigError, match="invalid YAML"):
        cconfig.load(write(tmp_path, "user: [unclosed\n"))


def test_config_env_default_path(monkeypatch, tmp_path):
    monkeypatch.setenv(cconfig.ENV_CONFIG, str(tmp_path / "x.yaml"))
    assert cconfig.default_path() == str(tmp_path / "x.yaml")
    monkeypatch.delenv(cconfig.ENV_CONFIG)
    assert cconfig.default_path().endswith("/.config/remote-gevent/console.yaml")


def test_example_config_is_valid():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(here, "conf", "console.yaml")
    cfg = cconfig.load(path)
    assert cfg.user and cfg.password
    documented = open(path).read()
    for name, _type, _default, _help in cconfig.iter_keys():
        assert name.split(".")[-1] + ":" in documented, name


def test_require_broker(tmp_path):
    cfg = cconfig.load(write(tmp_path, "user: op\n"))
    with pytest.raises(cconfig.ConfigError, match="password"):
        cfg.require_broker()


# --------------------------------------------------------------------------- known devices


def key_msg(new, ident="demo", previous=None, ts=1000):
    return protocol.make_key_announcement(new, ident, "fr04", previous_key=previous, ts=ts)


def test_tofu_then_same_then_valid_rotation(tmp_path):
    kd = KnownDevices(str(tmp_path / "kd"))
    k1, k2, k3 = Key(), Key(), Key()
    outcome, pin = kd.learn(key_msg(k1))
    assert (outcome, pin.fingerprint, pin.via) == ("new", k1.fingerprint, "tofu")
    assert kd.learn(key_msg(k1))[0] == "same"
    outcome, pin = kd.learn(key_msg(k2, previous=k1))
    assert (outcome, pin.fingerprint, pin.via) == ("rotated", k2.fingerprint, "rotation")
    assert kd.learn(key_msg(k3, previous=k2))[1].fingerprint == k3.fingerprint
    # Replaying an old rotation does nothing.
    with pytest.raises(KeyChanged):
        kd.learn(key_msg(k2, previous=k1))
    assert kd.get("fr04", "demo").fingerprint == k3.fingerprint
    assert oct(os.stat(kd.path).st_mode & 0o777) == "0o644"


def test_key_change_without_rotation_is_refused_loudly(tmp_path):
    kd = KnownDevices(str(tmp_path / "kd"))
    k1, evil, k2 = Key(), Key(), Key()
    kd.learn(key_msg(k1))
    with pytest.raises(KeyChanged, match="possible impersonation") as info:
        kd.learn(key_msg(evil))
    assert k1.fingerprint in str(info.value) and evil.fingerprint in str(info.value)
    # A rotation signed by some other key is refused too.
    with pytest.raises(KeyChanged):
        kd.learn(key_msg(k2, previous=evil))
    assert kd.get("fr04", "demo").fingerprint == k1.fingerprint


def test_manual_pin_replace_forget_and_file_format(tmp_path):
    kd = KnownDevices(str(tmp_path / "kd"))
    k1, k2 = Key(), Key()
    kd.pin("fr04", "dev-1", k1.public_bytes, now=5)
    kd.pin("fr04", "dev-2", k2.public_bytes, now=5)
    with pytest.raises(KeyChanged):
        kd.pin("fr04", "dev-1", k2.public_bytes)
    kd.pin("fr04", "dev-1", k2.public_bytes, replace=True)
    lines = [ln for ln in open(kd.path).read().splitlines() if not ln.startswith("#")]
    assert len(lines) == 2
    assert lines[1] == "fr04/dev-2 %s pinned=5 via=manual" % authkeys.ssh_pubkey_line(
        k2.public_bytes)
    assert parse_line(lines[0]).public_raw32 == k2.public_bytes
    assert kd.forget("fr04", "dev-2") and not kd.forget("fr04", "dev-2")
    assert [p.ident for p in kd.all()] == ["dev-1"]


def test_known_devices_keeps_bad_lines_and_refuses_conflicting_duplicates(tmp_path):
    k1, k2 = Key(), Key()
    path = tmp_path / "kd"
    path.write_text("garbage line here\nfr04/a %s\n" % authkeys.ssh_pubkey_line(k1.public_bytes))
    kd = KnownDevices(str(path))
    assert kd.get("fr04", "a").public_raw32 == k1.public_bytes
    assert kd.warnings and "kd:1" in kd.warnings[0]
    kd.pin("fr04", "b", k2.public_bytes)
    assert "garbage line here" in path.read_text()
    path.write_text(path.read_text() + "fr04/a %s\n" % authkeys.ssh_pubkey_line(k2.public_bytes))
    with pytest.raises(Exception, match="pinned twice"):
        kd.get("fr04", "a")


# --------------------------------------------------------------------------- status messages


def test_alive_with_pinned_key_updates_state_and_goes_offline(tmp_path):
    kd = KnownDevices(str(tmp_path / "kd"))
    states = ccontrol.DeviceStates(str(tmp_path / "devices.json"))
    k1, evil = Key(), Key()
    ev = ccontrol.handle_up_message(kd, states, "fr04", key_msg(k1), "remote.fr04.demo.key", {},
                                    now=1000)
    assert ev.kind == "key" and "first sight" in ev.text
    alive = protocol.make_alive(k1, "demo", "fr04", "0.1.0", 5.0, 1, 0, 10, 3, "started",
                                ts=1000)
    ev = ccontrol.handle_up_message(kd, states, "fr04", alive, "remote.fr04.demo.alive",
                                    {"expiration": "120000"}, now=1001)
    assert ev.transition == "online"
    entry = states.devices["fr04/demo"]
    assert entry["health_check"] == 60.0 and entry["verified"] is True
    assert ccontrol.device_status(entry, now=1000 + 179) == "online"
    assert ccontrol.device_status(entry, now=1000 + 181) == "offline"
    # A forged alive (other key) is ignored with a warning; a body naming another device too.
    forged = protocol.make_alive(evil, "demo", "fr04", "0.1.0", 5.0, 0, 0, 10, 4, ts=2000)
    ev = ccontrol.handle_up_message(kd, states, "fr04", forged, "remote.fr04.demo.alive", {},
                                    now=2000)
    assert ev.kind == "warning" and "impersonation" in ev.text
    assert states.devices["fr04/demo"]["last_alive"] == 1000
    assert ccontrol.handle_up_message(kd, states, "fr04", alive, "remote.fr04.other.alive", {},
                                      now=1001) is None
    stopping = protocol.make_alive(k1, "demo", "fr04", "0.1.0", 6.0, 0, 0, 10, 4, "stopping",
                                   ts=1010)
    ev = ccontrol.handle_up_message(kd, states, "fr04", stopping, "remote.fr04.demo.alive", {},
                                    now=1010)
    assert ev.transition == "stopped"
    states.flush()
    saved = json.load(open(states.path))["devices"]["fr04/demo"]
    assert saved["event"] == "stopping" and saved["seq"] == 4


def test_health_check_inferred_from_periodic_alives_without_expiration(tmp_path):
    kd = KnownDevices(str(tmp_path / "kd"))
    states = ccontrol.DeviceStates(str(tmp_path / "devices.json"))
    k = Key()
    kd.learn(key_msg(k))
    for seq, ts in ((7, 1000), (8, 1030)):
        raw = protocol.make_alive(k, "demo", "fr04", "0.1.0", 5.0, 0, 0, 10, seq, "periodic",
                                  ts=ts)
        ccontrol.handle_up_message(kd, states, "fr04", raw, "remote.fr04.demo.alive", {},
                                   now=ts)
    assert states.devices["fr04/demo"]["health_check"] == 30.0


def test_close_message_recorded(tmp_path):
    kd = KnownDevices(str(tmp_path / "kd"))
    states = ccontrol.DeviceStates(str(tmp_path / "devices.json"))
    k = Key()
    kd.learn(key_msg(k))
    raw = protocol.make_session_close(k, "ab" * 16, "idle_timeout", "idle", ts=5)
    ev = ccontrol.handle_up_message(kd, states, "fr04", raw, "remote.fr04.demo.close", {})
    assert ev.kind == "close" and "idle_timeout" in ev.text
    assert states.devices["fr04/demo"]["last_close"]["verified"] is True


# --------------------------------------------------------------------------- specs


@pytest.mark.parametrize("spec,bind,port,target", [
    ("8080:127.0.0.1:22", "127.0.0.1", 8080, "127.0.0.1:22"),
    ("0.0.0.0:8080:Example.COM:80", "0.0.0.0", 8080, "example.com:80"),
    ("*:0:host:1", "", 0, "host:1"),
    (":2222:h:22", "", 2222, "h:22"),
    ("[::1]:8022:[fe80::1]:22", "::1", 8022, "[fe80::1]:22"),
    ("9000:[::1]:22", "127.0.0.1", 9000, "[::1]:22"),
    ("localhost:1:10.0.0.1:22", "127.0.0.1", 1, "10.0.0.1:22"),
])
def test_forward_spec(spec, bind, port, target):
    s = parse_forward_spec(spec)
    assert (s.bind_host, s.bind_port, s.target) == (bind, port, target)


@pytest.mark.parametrize("spec", [
    "8080", "8080:host", "a:b:c:d:e", "x:host:22", "8080:host:0", "8080:host:65536",
    "8080:::1:22", "8080:[::1:22", "8080:[]:22", "70000:h:1", "8080:h o:22",
])
def test_forward_spec_errors(spec):
    with pytest.raises(SpecError):
        parse_forward_spec(spec)


def test_listen_spec():
    assert parse_listen_spec("1080") == ("127.0.0.1", 1080)
    assert parse_listen_spec("[::1]:1080") == ("::1", 1080)
    assert parse_listen_spec("*:1080") == ("", 1080)
    for bad in ("", "x", "1:2:3", "::1:1080"):
        with pytest.raises(SpecError):
            parse_listen_spec(bad)


# --------------------------------------------------------------------------- SOCKS5


def handshake(request: bytes, greeting: bytes = b"\x05\x01\x00"):
    client, server = socket.socketpair()
    try:
        client.sendall(greeting + request)
        result = {}
        try:
            result["target"] = socks.negotiate(server)
        except socks.SocksError as exc:
            result["error"] = exc
        server.close()
        data = b""
        while True:
            try:
                chunk = client.recv(100)
            except ConnectionResetError:  # we closed with unread request bytes
                break
            if not chunk:
                break
            data += chunk
        return result, data
    finally:
        client.close()


def test_socks_connect_ipv4_ipv6_domain():
    port = struct.pack("!H", 22)
    r, data = handshake(b"\x05\x01\x00\x01" + bytes([127, 0, 0, 1]) + port)
    assert r["target"] == "127.0.0.1:22" and data == b"\x05\x00"
    r, _ = handshake(b"\x05\x01\x00\x04" + socket.inet_pton(socket.AF_INET6, "::1") + port)
    assert r["target"] == "[::1]:22"
    name = b"Intranet.Example"
    r, _ = handshake(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + port)
    assert r["target"] == "intranet.example:22"  # resolved on the device, not here


def test_socks_refusals():
    port = struct.pack("!H", 22)
    r, data = handshake(b"", greeting=b"\x05\x01\x02")  # username/password only
    assert "error" in r and data == b"\x05\xff"
    r, data = handshake(b"\x05\x02\x00\x01" + bytes(4) + port)  # BIND
    assert r["error"].reply == socks.REP_COMMAND_NOT_SUPPORTED and data[2:4] == b"\x05\x07"
    r, data = handshake(b"\x05\x01\x00\x09" + bytes(6))
    assert r["error"].reply == socks.REP_ADDRESS_NOT_SUPPORTED
    r, data = handshake(b"\x05\x01\x00\x03\x03a b" + port)
    assert r["error"].reply == socks.REP_ADDRESS_NOT_SUPPORTED
    r, data = handshake(b"", greeting=b"\x04\x01\x00")
    assert "not SOCKS5" in str(r["error"])


@pytest.mark.parametrize("code,reason,rep", [
    ("target_not_permitted", "x not permitted", 0x02),
    ("target_refused", "ECONNREFUSED Connection refused", 0x05),
    ("target_refused", "ENETUNREACH Network is unreachable", 0x03),
    ("target_refused", "EHOSTUNREACH No route to host", 0x04),
    ("target_refused", "[Errno -2] Name or service not known", 0x04),
    ("target_refused", "timed out", 0x04),
    ("error", "internal error", 0x01),
])
def test_socks_reply_codes(code, reason, rep):
    assert socks.reply_for_refusal(code, reason) == rep


# --------------------------------------------------------------------------- CLI exit codes


def test_cli_missing_config_is_one_line_and_exit_7(tmp_path):
    r = run_cli("-c", tmp_path / "nope.yaml", "devices")
    assert r.returncode == cconfig.EXIT_CONFIG
    assert r.stderr.count("\n") == 1 and "not found" in r.stderr and "Traceback" not in r.stderr


def test_cli_bad_spec_is_usage_error(tmp_path):
    r = run_cli("-c", tmp_path / "nope.yaml", "forward", "demo", "-L", "bad")
    assert r.returncode == cconfig.EXIT_USAGE and "Traceback" not in r.stderr


def test_cli_broker_unreachable_exit_8(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    path = write(tmp_path, "user: op\npassword: pw\namqp: {urls: ['amqp://127.0.0.1:%d/'], "
                           "connect_timeout: 2}\n" % port)
    r = run_cli("-c", path, "sessions", "demo")
    assert r.returncode == cconfig.EXIT_BROKER, r.stderr
    assert "connection refused" in r.stderr and "Traceback" not in r.stderr


def test_cli_keygen_writes_0600_key_and_prints_line(tmp_path):
    path = tmp_path / "k" / "op"
    r = run_cli("keygen", "-f", path, "-C", "me@test")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ssh-ed25519 ") and r.stdout.strip().endswith("me@test")
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert "permitopen" in r.stderr
    r = run_cli("keygen", "-f", path)
    assert r.returncode == cconfig.EXIT_ERROR and "--force" in r.stderr


def test_cli_pin_by_hand_and_mismatch(tmp_path):
    k1, k2 = Key(), Key()
    path = write(tmp_path, "user: op\npassword: pw\n")
    r = run_cli("-c", path, "pin", "demo", "--key", authkeys.ssh_pubkey_line(k1.public_bytes))
    assert r.returncode == 0 and k1.fingerprint in r.stdout
    r = run_cli("-c", path, "pin", "demo", "--key", authkeys.ssh_pubkey_line(k2.public_bytes))
    assert r.returncode == cconfig.EXIT_KEY and "possible impersonation" in r.stderr
    r = run_cli("-c", path, "pin", "demo", "--key", authkeys.ssh_pubkey_line(k2.public_bytes),
                "--fingerprint", k1.fingerprint)
    assert r.returncode == cconfig.EXIT_KEY


def test_cli_monkey_patch_first_and_lazy_imports():
    code = ("import sys; import remote_gevent.console.cli as c; "
            "import socket, gevent.socket; assert socket.socket is gevent.socket.socket; "
            "heavy = [m for m in ('amqp', 'nacl', 'remote_gevent.wire.mux', 'paramiko', 'yaml') "
            "if m in sys.modules]; print(heavy)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_close_exit_codes():
    from remote_gevent.console.session import close_exit_code

    assert close_exit_code("normal") == 0 and close_exit_code("closed_by_operator") == 0
    assert close_exit_code("relay_lost") == cconfig.EXIT_CONNECTION
    assert close_exit_code("target_refused") == cconfig.EXIT_REFUSED


def test_gevent_is_patched_in_tests():
    assert gevent.socket.socket is socket.socket
