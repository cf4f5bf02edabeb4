"""Operator experience of the console (issue 15, items 1, 2, 5, 9).

Real programs on loopback: a DemoPlatform (relay + agent processes) on the suite's
RabbitMQ, ``remote-gevent-console`` processes, and stock OpenSSH ``ssh``/``scp``/``sftp``
with fresh ``known_hosts`` files against a test ``sshd`` and the agent's ``@sftp``.
Fast unit tests of the identity digest come first. Every wait is bounded.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tempfile
from typing import Dict, List

import pytest

from remote_gevent.console import config as console_config
from remote_gevent.console import control_paths as cp
from remote_gevent.console.ssh_config import host_key_alias
from remote_gevent.demo.processes import port_open
from test_e2e import (  # noqa: F401  (sshd: a fixture, used by name)
    WAIT,
    make_platform,
    random_file,
    sha256_file,
    sshd,
    wait_for,
)

MIB = 1024 * 1024


# --------------------------------------------------------------------------- unit


DEMO_LIKE = """\
# written by remote_gevent.demo.platform
server_id: fr04
user: op-1
password: 's3cret #x'
operator_key: keys/op_ed25519
amqp:
  urls:
  - amqps://127.0.0.1:5671/%2F
  - "amqps://other:5671/%2F"
  ca_file: /ca.pem
relay: 127.0.0.1:8443
control_socket_dir: ctl
"""


def _write(path, text: str) -> str:
    path.write_text(text)
    os.chmod(str(path), 0o600)
    return str(path)


def test_fast_and_full_identity_agree(tmp_path):
    """The import-free parser (fast ``stdio``) names the same socket as the validated
    config (master, full path), for the demo's layout and for the documented example."""
    cfg_path = _write(tmp_path / "console.yaml", DEMO_LIKE.replace("ca_file: /ca.pem",
                                                                   "ca_file: null"))
    full = cp.config_socket(console_config.load(cfg_path), "dev1")
    assert cp.settings_socket(cp.read_settings(cfg_path), "dev1") == full
    assert re.search(r"/ctl/fr04-dev1-[0-9a-f]{16}\.sock$", full)
    example = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "conf", "console.yaml")
    shutil.copy(example, str(tmp_path / "example.yaml"))
    full = cp.config_socket(console_config.load(str(tmp_path / "example.yaml")), "d")
    assert cp.settings_socket(cp.read_settings(str(tmp_path / "example.yaml")), "d") == full


@pytest.mark.parametrize("change", [
    ("user: op-1", "user: op-2"),
    ("password: 's3cret #x'", "password: wrong"),
    ("  - amqps://127.0.0.1:5671/%2F", "  - amqps://127.0.0.1:5672/%2F"),
    ("server_id: fr04", "server_id: fr05\nrelay: r:1"),
    ("operator_key: keys/op_ed25519", "operator_key: keys/other"),
])
def test_identity_changes_with_each_part(tmp_path, change):
    """Another broker, operator, password, server id or key: another master socket."""
    a = cp.read_settings(_write(tmp_path / "a.yaml", DEMO_LIKE))
    text = DEMO_LIKE.replace(change[0], change[1])
    if "relay: r:1" in text:
        text = text.replace("relay: 127.0.0.1:8443\n", "")
    b = cp.read_settings(_write(tmp_path / "b.yaml", text))
    assert a is not None and b is not None
    assert cp.settings_socket(a, "dev") != cp.settings_socket(b, "dev")
    assert cp.settings_socket(a, "dev") != cp.settings_socket(a, "dev2")


def test_cheap_parser_declines_what_it_cannot_read(tmp_path):
    for text in ("amqp: {urls: [amqps://h:1/]}\n", "amqp:\n  urls: [amqps://h:1/]\n",
                 "amqp:\n  urls:\n  - &a amqps://h:1/\n", "password: \"a\\\"b\"\n"):
        assert cp.read_settings(_write(tmp_path / "x.yaml", text)) is None, text


def test_identity_defaults_match_the_config_declarations():
    cfg = console_config.parse({}, "/nowhere/console.yaml")
    assert cfg.amqp.urls == cp.DEFAULT_URLS and cfg.server_id == cp.DEFAULT_SERVER_ID
    assert cfg.operator_key == os.path.join("/nowhere", cp.DEFAULT_OPERATOR_KEY)


# --------------------------------------------------------------------------- platform


@pytest.fixture(scope="module")
def ctl_dir():
    d = tempfile.mkdtemp(prefix="rgux-")  # short: sun_path holds 107 bytes
    yield os.path.join(d, "ctl")
    subprocess.run(["rm", "-rf", d], check=False)


@pytest.fixture(scope="module")
def platform(rabbit, tmp_path_factory, ctl_dir):
    # health_check 2 s: alives keep coming after the console's status queue exists
    p = make_platform(rabbit, str(tmp_path_factory.mktemp("uxplatform")),
                      console={"control_socket_dir": ctl_dir}, remote={"health_check": 2})
    p.start()
    yield p
    subprocess.run(p.console_argv("master", p.ident, "--stop"), capture_output=True,
                   timeout=WAIT)
    p.stop()


def console(p, *args: str, config: str = "", timeout: float = 60.0,
            env: Dict[str, str] = None) -> subprocess.CompletedProcess:
    argv = p.console_argv(*args)
    if config:
        argv[argv.index(p.console_config)] = config
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env=env)


def ssh_options(sshd, known_hosts: str) -> List[str]:  # noqa: F811
    return ["-i", sshd.client_key, "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=accept-new", "-o", "UserKnownHostsFile=%s" % known_hosts,
            "-o", "LogLevel=ERROR"]


def known_host_names(path: str) -> List[str]:
    with open(path) as f:
        return sorted(line.split()[0] for line in f if line.strip())


def test_ssh_config_makes_ssh_scp_sftp_work_with_one_known_hosts(platform, sshd, tmp_path):  # noqa: F811
    """``ssh-config``'s block: ``ssh DEVICE``, ``scp`` both ways and ``sftp DEVICE-sftp``
    share one fresh known_hosts (sshd's key and the device's key under their own aliases),
    and a second ``ssh`` still verifies; the connections ride one background master."""
    p = platform
    made = console(p, "ssh-config", p.ident, "--user", "root",
                   "--target", "127.0.0.1:%d" % sshd.port)
    assert made.returncode == 0, made.stderr
    ssh_alias = host_key_alias("fr04", p.ident, "127.0.0.1:%d" % sshd.port)
    sftp_alias = host_key_alias("fr04", p.ident, "@sftp")
    assert ssh_alias == "%s.fr04.remote-gevent-127.0.0.1-%d" % (p.ident, sshd.port)
    assert "HostKeyAlias %s\n" % ssh_alias in made.stdout
    assert "HostKeyAlias %s.fr04.remote-gevent-sftp\n" % p.ident in made.stdout
    known = str(tmp_path / "known_hosts")
    ssh_cfg = tmp_path / "ssh_config"
    ssh_cfg.write_text(made.stdout + "\n".join([
        "Host *", "    IdentityFile %s" % sshd.client_key, "    IdentitiesOnly yes",
        "    BatchMode yes", "    StrictHostKeyChecking accept-new",
        "    UserKnownHostsFile %s" % known, "    LogLevel ERROR", ""]))
    ssh = ["ssh", "-F", str(ssh_cfg)]
    try:
        _ssh_scp_sftp(p, ssh, ssh_cfg, known, tmp_path)
        assert known_host_names(known) == sorted([ssh_alias, sftp_alias])
    finally:
        stopped = console(p, "master", p.ident, "--stop")
    assert stopped.returncode == 0, stopped.stderr  # --master auto: a master served them


def _ssh_scp_sftp(p, ssh: List[str], ssh_cfg, known: str, tmp_path) -> None:
    first = subprocess.run(ssh + [p.ident, "echo", "via-ssh-config"], capture_output=True,
                           text=True, timeout=WAIT, stdin=subprocess.DEVNULL)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "via-ssh-config"

    src = str(tmp_path / "up.bin")
    digest = random_file(src, 2 * MIB)
    batch = tmp_path / "batch"
    batch.write_text("put %s %s/sftp.bin\nls %s\n" % (src, p.files_dir, p.files_dir))
    sftp = subprocess.run(["sftp", "-F", str(ssh_cfg), "-b", str(batch), p.ident + "-sftp"],
                          capture_output=True, text=True, timeout=WAIT,
                          stdin=subprocess.DEVNULL)
    assert sftp.returncode == 0, sftp.stderr + sftp.stdout
    assert sha256_file(os.path.join(p.files_dir, "sftp.bin")) == digest

    # scp through the device's sshd, both ways (scp to DEVICE-sftp stops at its final
    # fsetstat(size): the agent's SFTP server does not truncate; reported in issue 15)
    up = str(tmp_path / "scp-up.bin")
    scp_up = subprocess.run(["scp", "-F", str(ssh_cfg), src, "%s:%s" % (p.ident, up)],
                            capture_output=True, text=True, timeout=WAIT,
                            stdin=subprocess.DEVNULL)
    assert scp_up.returncode == 0, scp_up.stderr
    assert sha256_file(up) == digest
    back = str(tmp_path / "back.bin")
    scp_down = subprocess.run(["scp", "-F", str(ssh_cfg), "%s:%s" % (p.ident, src), back],
                              capture_output=True, text=True, timeout=WAIT,
                              stdin=subprocess.DEVNULL)
    assert scp_down.returncode == 0, scp_down.stderr
    assert sha256_file(back) == digest

    again = subprocess.run(ssh + [p.ident, "echo", "again"], capture_output=True, text=True,
                           timeout=WAIT, stdin=subprocess.DEVNULL)
    assert again.returncode == 0 and again.stdout.strip() == "again", again.stderr


def _banner_line(p, program: str) -> str:
    for line in p.usage().splitlines():
        if line.strip().startswith(program + " "):
            return line.strip()
    raise AssertionError("no %s line in the banner:\n%s" % (program, p.usage()))


def test_printed_ssh_and_sftp_lines_share_a_fresh_known_hosts(platform, sshd, tmp_path):  # noqa: F811
    """The demo banner's ``ssh`` and ``sftp`` lines, run as printed (through a shell; only
    the sshd port, the login and the client options of this test added), both succeed
    with one fresh known_hosts — before HostKeyAlias the second one failed with
    "REMOTE HOST IDENTIFICATION HAS CHANGED"."""
    p = platform
    known = str(tmp_path / "known_hosts")
    extra = " ".join(shlex.quote(o) for o in ["-F", "/dev/null"] + ssh_options(sshd, known))
    ssh_line = _banner_line(p, "ssh").replace("127.0.0.1:22", "127.0.0.1:%d" % sshd.port)
    ssh_line = re.sub(r" \S+@%s$" % re.escape(p.ident), " root@%s echo printed-ok" % p.ident,
                      ssh_line)
    ssh_line = ssh_line.replace("ssh ", "ssh %s " % extra, 1)
    done = subprocess.run(["bash", "-c", ssh_line], capture_output=True, text=True,
                          timeout=WAIT, stdin=subprocess.DEVNULL)
    assert done.returncode == 0 and done.stdout.strip() == "printed-ok", done.stderr
    batch = tmp_path / "batch"
    batch.write_text("ls %s\n" % p.files_dir)
    sftp_line = _banner_line(p, "sftp").replace(
        "sftp ", "sftp -b %s %s " % (shlex.quote(str(batch)), extra), 1)
    done = subprocess.run(["bash", "-c", sftp_line], capture_output=True, text=True,
                          timeout=WAIT, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr + done.stdout
    assert len(known_host_names(known)) == 2


def test_master_of_another_config_is_not_ridden(platform, sshd, tmp_path):  # noqa: F811
    """A console whose config differs (here: a wrong password) does not ride the master
    opened with the right one: it opens its own session and fails on its own (exit 9);
    the right config still goes through the master."""
    p = platform
    master = subprocess.Popen(p.console_argv("master", p.ident, "--persist", "60"),
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    try:
        sock = cp.config_socket(console_config.load(p.console_config), p.ident)
        wait_for(lambda: master.poll() is not None or os.path.exists(sock), WAIT,
                 what="the master's socket")
        assert master.poll() is None, master.stderr.read()
        with open(p.console_config) as f:
            text = f.read()
        wrong = tmp_path / "wrong.yaml"
        wrong.write_text(re.sub(r"(?m)^password: .*$", "password: not-the-password", text))
        os.chmod(str(wrong), 0o600)
        env = dict(os.environ, REMOTE_GEVENT_CONSOLE_DEBUG_MODULES="1")
        target = "127.0.0.1:%d" % sshd.port
        bad = console(p, "stdio", p.ident, target, config=str(wrong), env=env)
        assert "via master" not in bad.stderr
        assert bad.returncode == 9, bad.stderr
        argv = p.console_argv("stdio", "%n", target)
        argv[argv.index(p.console_config)] = str(wrong)
        proxy = " ".join(shlex.quote(a) for a in argv)
        ssh = subprocess.run(sshd.ssh_argv(proxy, p.ident, "echo", "no"), capture_output=True,
                             text=True, timeout=WAIT, stdin=subprocess.DEVNULL)
        assert ssh.returncode != 0 and "no" not in ssh.stdout
        good = subprocess.run(p.console_argv("stdio", p.ident, target), capture_output=True,
                              timeout=WAIT, env=env, input=b"")
        assert "via master %s" % sock in good.stderr.decode(), good.stderr
    finally:
        subprocess.run(p.console_argv("master", p.ident, "--stop"), capture_output=True,
                       timeout=WAIT)
        try:
            master.wait(WAIT)
        finally:
            master.stderr.close()


def test_typo_device_is_unknown_and_known_ones_listed(platform):
    """A device never pinned nor seen: "unknown device", the known ones with their state;
    no advice to pin the typo."""
    p = platform
    wait_for(lambda: " online " in console(p, "devices").stdout, WAIT,
             what="an alive of the device")
    typo = p.ident + "x"
    done = console(p, "stdio", typo, "127.0.0.1:22")
    assert done.returncode == 11
    assert "unknown device fr04/%s" % typo in done.stderr, done.stderr
    assert "%s (online, last alive" % p.ident in done.stderr
    assert "pin %s" % typo not in done.stderr and "--key" not in done.stderr
    listing = console(p, "sessions", typo)
    assert listing.returncode == 11 and "unknown device" in listing.stderr


# --------------------------------------------------------------------------- item 9


def test_check_config_ok_and_every_problem(platform, tmp_path):
    p = platform
    ok = console(p, "check-config")
    assert ok.returncode == 0 and ok.stdout.startswith(p.console_config + ": ok"), ok.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("server_id: fr04\nuser: 'a b'\nreply_timeout: -1\nbogus: 1\n")
    done = console(p, "check-config", config=str(bad))
    assert done.returncode == 7
    for key in ("user", "reply_timeout", "bogus", "password"):
        assert re.search(r"%s: %s" % (re.escape(str(bad)), key), done.stderr), (key, done.stderr)


def test_doctor_all_ok_then_each_failure_with_its_fix(platform, tmp_path):
    p = platform
    done = console(p, "doctor")
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stdout + done.stderr
    names = [line.split()[1] for line in lines]
    assert names == ["config", "key", "broker", "relay", "pinned", "online"], lines
    assert all(line.startswith("ok ") for line in lines), lines
    with open(p.console_config) as f:
        text = f.read()
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(re.sub(r"(?m)^password: .*$", "password: nope", text))
    os.chmod(str(wrong), 0o600)
    done = console(p, "doctor", p.ident, config=str(wrong))
    assert done.returncode == 9, done.stdout
    broker = [line for line in done.stdout.splitlines() if line.split()[1] == "broker"][0]
    assert broker.startswith("FAIL") and "fix: check user: and password:" in broker
    nodevice = console(p, "doctor", "nosuchdevice")
    assert nodevice.returncode == 11
    assert "FAIL  pinned    fr04/nosuchdevice" in nodevice.stdout
    assert "fix: remote-gevent-console pin nosuchdevice" in nodevice.stdout
    p.stop_relay()
    try:
        done = console(p, "doctor", p.ident)
    finally:
        p.start_relay()
        host, port = p.relay_address.rsplit(":", 1)
        wait_for(lambda: port_open(host, int(port)), WAIT, what="the relay back")
    relay = [line for line in done.stdout.splitlines() if line.split()[1] == "relay"][0]
    assert done.returncode == 12 and relay.startswith("FAIL") and "unreachable" in relay
    assert "fix: check relay:" in relay


def test_sessions_of_every_device(platform, sshd):  # noqa: F811
    p = platform
    holder = subprocess.Popen(p.console_argv("stdio", "--master", "no", p.ident,
                                             "127.0.0.1:%d" % sshd.port),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL)
    try:
        assert holder.stdout.read(4) == b"SSH-"  # the session is up
        done = console(p, "sessions")
        assert done.returncode == 0, done.stderr
        assert re.match(r"fr04/%s: [1-9]\d* active" % p.ident, done.stdout), done.stdout
        assert "127.0.0.1:%d" % sshd.port in done.stdout
    finally:
        holder.stdin.close()
        holder.kill()
        holder.wait(WAIT)
        holder.stdout.close()
