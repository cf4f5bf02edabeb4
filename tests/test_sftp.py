"""The stock OpenSSH ``sftp`` client against ``sftp.serve_sftp``.

Harness without the platform: the test listens on 127.0.0.1, ``sftp`` reaches it
through a tiny ProxyCommand (stdin/stdout <-> TCP, like ``remote-gevent-console
stdio``), and every accepted connection is served by ``serve_sftp`` directly.  The
platform e2e test does the same through the real tunnel.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import subprocess
import sys

import gevent
import gevent.server
import pytest
from paramiko import SFTP_FAILURE, SFTP_NO_SUCH_FILE, SFTP_OK, SFTP_PERMISSION_DENIED
from paramiko import SFTPAttributes

from remote_gevent.crypto import identity
from remote_gevent.agent.files import sftp
from remote_gevent.agent.files import roots as roots_mod
from remote_gevent.wire import transfer_lines
from remote_gevent.agent.files import transfer_partials
from test_transfer import FORGED, make_old, make_tree

SFTP = shutil.which("sftp")
SSH = shutil.which("ssh")
needs_sftp = pytest.mark.skipif(SFTP is None, reason="OpenSSH sftp client not installed")

PROXY = r"""
import os, socket, sys, threading
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
s.settimeout(None)
def up():
    while True:
        d = os.read(0, 65536)
        if not d:
            s.shutdown(socket.SHUT_WR)
            return
        s.sendall(d)
threading.Thread(target=up, daemon=True).start()
while True:
    d = s.recv(65536)
    if not d:
        break
    os.write(1, d)
"""

TIMEOUT = 60


@pytest.fixture
def server(tmp_path):
    rw, ro, outside, local = make_tree(tmp_path)
    os.symlink(str(outside), str(rw / "out_link"))
    roots = roots_mod.Roots([roots_mod.Root(str(rw), writable=True),
                            roots_mod.Root(str(ro), writable=False)])
    key = identity.IdentityKey.generate()
    results = []

    def handle(sock, addr):
        sftp.serve_sftp(sock, roots, key, log_ctx="test", on_result=results.append)

    srv = gevent.server.StreamServer(("127.0.0.1", 0), handle)
    srv.start()

    class S:
        pass

    s = S()
    s.rw, s.ro, s.outside, s.local, s.tmp = rw, ro, outside, local, tmp_path
    s.roots = roots
    s.port = srv.server_port
    s.results = results
    s.key = key
    yield s
    srv.stop(timeout=5)


def ssh_opts(port):
    proxy = "%s -c '%s' %d" % (sys.executable, PROXY.replace("'", "'\\''"), port)
    return ["-o", "ProxyCommand=" + proxy, "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
            "-o", "LogLevel=ERROR", "-F", "/dev/null"]


def run_batch(s, lines):
    batch = s.tmp / "batch"
    batch.write_text("\n".join(lines) + "\n")
    return subprocess.run([SFTP, "-b", str(batch)] + ssh_opts(s.port) + ["x@device"],
                          capture_output=True, text=True, timeout=TIMEOUT)


def sha(path):
    with open(str(path), "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def leftovers(d):
    return [n for n in os.listdir(str(d)) if n.endswith(transfer_lines.PART_SUFFIX)]


@needs_sftp
def test_put_get_ls_rename_rm(server):
    s = server
    src = s.local / "up.bin"
    src.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    rw = str(s.rw)
    r = run_batch(s, [
        "put %s %s/up.bin" % (src, rw),
        "get %s/up.bin %s/down.bin" % (rw, s.local),
        "ls -l %s" % rw,
        "rename %s/up.bin %s/moved.bin" % (rw, rw),
        "mkdir %s/newdir" % rw,
        "put %s %s/newdir/inner.bin" % (src, rw),
        "ls %s/newdir" % rw,
        "rm %s/newdir/inner.bin" % rw,
        "rmdir %s/newdir" % rw,
        "get %s/readme.txt %s/readme.txt" % (s.ro, s.local),
        "ls /",
    ])
    assert r.returncode == 0, r.stderr + r.stdout
    assert sha(s.local / "down.bin") == sha(src)
    assert "up.bin" in r.stdout and "inner.bin" in r.stdout
    assert sha(s.rw / "moved.bin") == sha(src)
    assert not (s.rw / "up.bin").exists() and not (s.rw / "newdir").exists()
    assert (s.local / "readme.txt").read_bytes() == b"read only\n"
    assert str(s.tmp).split("/")[1] in r.stdout      # "/" lists the way to the roots
    assert leftovers(s.rw) == []
    r = run_batch(s, ["rm %s/moved.bin" % rw])
    assert r.returncode == 0, r.stderr
    assert not (s.rw / "moved.bin").exists()
    gevent.sleep(0.2)
    ops = [x["op"] for x in s.results]
    assert "sftp_put" in ops and "sftp_get" in ops and "sftp_remove" in ops
    assert all(x["code"] == "transfer_ok" for x in s.results), s.results


@needs_sftp
def test_read_only_root_refuses_writes(server):
    s = server
    src = s.local / "x"
    src.write_bytes(b"x")
    for line in ["put %s %s/x" % (src, s.ro), "rm %s/readme.txt" % s.ro,
                 "mkdir %s/d" % s.ro, "rename %s/readme.txt %s/y" % (s.ro, s.ro)]:
        r = run_batch(s, [line])
        assert r.returncode != 0, line
        assert "denied" in (r.stderr + r.stdout).lower(), (line, r.stderr)
    assert sorted(os.listdir(str(s.ro))) == ["readme.txt"]


@needs_sftp
def test_escapes_refused(server):
    s = server
    src = s.local / "x"
    src.write_bytes(b"x")
    for line in ["put %s %s/../outside/x" % (src, s.rw),
                 "put %s %s/out_link/x" % (src, s.rw),
                 "get %s/out_link/secret %s/got" % (s.rw, s.local),
                 "get %s/../outside/secret %s/got" % (s.rw, s.local),
                 "get /etc/passwd %s/got" % s.local,
                 "rm %s/outside/secret" % s.tmp]:
        r = run_batch(s, [line])
        assert r.returncode != 0, line
    assert sorted(os.listdir(str(s.outside))) == ["secret"]
    assert not (s.local / "got").exists()


@needs_sftp
def test_exists_not_clobbered(server):
    s = server
    (s.rw / "keep").write_bytes(b"original")
    src = s.local / "keep"
    src.write_bytes(b"new")
    r = run_batch(s, ["put %s %s/keep" % (src, s.rw)])
    assert r.returncode != 0
    assert (s.rw / "keep").read_bytes() == b"original"
    (s.rw / "other").write_bytes(b"other")
    r = run_batch(s, ["rename %s/other %s/keep" % (s.rw, s.rw)])
    assert r.returncode != 0
    assert (s.rw / "keep").read_bytes() == b"original"
    assert leftovers(s.rw) == []


@needs_sftp
@pytest.mark.skipif(SSH is None, reason="OpenSSH ssh client not installed")
def test_no_shell_no_exec(server):
    r = subprocess.run([SSH] + ssh_opts(server.port) + ["-T", "x@device", "echo pwned"],
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode != 0 and "pwned" not in r.stdout


@needs_sftp
def test_host_key_is_the_identity_key(server):
    key = sftp.host_key_of(server.key)
    assert key.get_name() == "ssh-ed25519"
    assert key.get_base64() == server.key.public_line().split()[1]


@needs_sftp
def test_garbage_ends_quietly(server):
    c = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    c.sendall(b"GET / HTTP/1.0\r\n\r\n")
    c.settimeout(10)
    data = b""
    try:
        while True:
            chunk = c.recv(4096)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    c.close()
    assert data.startswith(b"SSH-2.0-")


# --------------------------------------------------------------------------- issue 10


@needs_sftp
def test_hard_links_refused(server, caplog):
    caplog.set_level(logging.INFO, logger="remote_gevent.agent.files.sftp")
    s = server
    secret = s.outside / "secret"
    link = s.rw / "hl"
    os.link(str(secret), str(link))
    s.roots.overwrite = True
    r = run_batch(s, ["get %s %s/got" % (link, s.local)])
    assert r.returncode != 0 and "denied" in (r.stderr + r.stdout).lower(), r.stderr
    assert not (s.local / "got").exists()
    src = s.local / "x"
    src.write_bytes(b"replacement")
    (s.rw / "other").write_bytes(b"other")
    for line in ["put %s %s" % (src, link), "rename %s/other %s" % (s.rw, link)]:
        r = run_batch(s, [line])
        assert r.returncode != 0, line
    assert secret.read_bytes() == b"secret\n"
    assert os.stat(str(link)).st_ino == os.stat(str(secret)).st_ino
    assert (s.rw / "other").read_bytes() == b"other"
    assert leftovers(s.rw) == []
    lines = [r.getMessage() for r in caplog.records if "hard link" in r.getMessage()]
    # One line per refusal: get and put; the plain SFTP rename never replaces (exists).
    assert len(lines) == 2, lines


def direct(tmp_path, **root_kw):
    """A ``RootsSFTPServer`` called directly (no SSH): the rw and ro roots of make_tree."""
    rw, ro, outside, local = make_tree(tmp_path)
    roots = roots_mod.Roots([roots_mod.Root(str(rw), writable=True, **root_kw),
                            roots_mod.Root(str(ro), writable=False)],
                           partial_ttl=3600)
    srv = sftp.RootsSFTPServer(None, roots, log_ctx="unit")
    return srv, rw, ro, outside


def test_hard_link_update_refused_even_without_truncate(tmp_path):
    srv, rw, ro, outside = direct(tmp_path)
    os.link(str(outside / "secret"), str(rw / "hl"))
    srv.roots.overwrite = True
    # Opening for update copies the old content into the handle (readable back).
    assert srv.open(str(rw / "hl"), os.O_RDWR, SFTPAttributes()) == SFTP_PERMISSION_DENIED
    assert srv.open(str(rw / "hl"), os.O_RDONLY, SFTPAttributes()) == SFTP_PERMISSION_DENIED
    assert srv.chattr(str(rw / "hl"), SFTPAttributes()) == SFTP_PERMISSION_DENIED
    (rw / "other").write_bytes(b"other")
    assert srv.posix_rename(str(rw / "other"), str(rw / "hl")) == SFTP_PERMISSION_DENIED
    assert (rw / "other").exists()
    assert (outside / "secret").read_bytes() == b"secret\n"
    assert os.stat(str(rw / "hl")).st_nlink == 2
    assert leftovers(rw) == []
    (tmp_path / "allowed").mkdir()
    srv2, rw2, _, outside2 = direct(tmp_path / "allowed", allow_hardlinks=True)
    os.link(str(outside2 / "secret"), str(rw2 / "hl"))
    h = srv2.open(str(rw2 / "hl"), os.O_RDONLY, SFTPAttributes())
    assert h.read(0, 100) == b"secret\n"
    h.close()


def test_sftp_names_escaped_in_the_log(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="remote_gevent")
    srv, rw, ro, outside = direct(tmp_path)
    name = "n" + FORGED
    calls = [
        lambda: srv.open(str(rw / name), os.O_RDONLY, SFTPAttributes()),
        lambda: srv.remove(str(ro / name)),
        lambda: srv.rename(str(rw / name), str(rw / "x")),
        lambda: srv.mkdir(str(outside / name), SFTPAttributes()),
    ]
    for i, call in enumerate(calls):
        caplog.clear()
        assert call() != SFTP_OK
        lines = [r.getMessage() for r in caplog.records
                 if r.name.startswith("remote_gevent") and "forged" in r.getMessage()]
        assert len(lines) == 1, (i, lines)
        assert "\n" not in lines[0] and "\\x0a2026-11-30" in lines[0], (i, lines)


def test_sftp_writes_count_against_the_quota(tmp_path):
    srv, rw, ro, outside = direct(tmp_path, partial_quota=1024 * 1024)
    (rw / ".waiting.bin.rgpart").write_bytes(b"w" * (700 * 1024))
    h = srv.open(str(rw / "new.bin"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, SFTPAttributes())
    assert h.write(0, b"a" * (200 * 1024)) == SFTP_OK
    assert h.write(200 * 1024, b"b" * (200 * 1024)) == SFTP_FAILURE    # 1.1 MiB > 1 MiB
    assert h.close() == SFTP_FAILURE
    assert not (rw / "new.bin").exists()
    assert sorted(leftovers(rw)) == [".waiting.bin.rgpart"]
    h = srv.open(str(rw / "ok.bin"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, SFTPAttributes())
    assert h.write(0, b"c" * (300 * 1024)) == SFTP_OK
    assert h.close() == SFTP_OK
    assert (rw / "ok.bin").stat().st_size == 300 * 1024


def test_sweep_spares_an_open_sftp_temp(tmp_path):
    srv, rw, ro, outside = direct(tmp_path)
    h = srv.open(str(rw / "slow.bin"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, SFTPAttributes())
    assert h.write(0, b"s" * 10) == SFTP_OK
    (temp,) = leftovers(rw)
    make_old(rw / temp, 7200)                 # a client idle longer than partial_ttl
    stale = rw / ".stale.bin.rgpart"
    stale.write_bytes(b"x")
    make_old(stale, 7200)
    root = srv.roots.roots[0]
    removed = transfer_partials.ledger_of(root).sweep(root, srv.roots.partial_ttl)
    assert removed == 1 and not stale.exists() and (rw / temp).exists()
    assert h.close() == SFTP_OK
    assert (rw / "slow.bin").read_bytes() == b"s" * 10
    assert srv.open(str(rw / "nope"), os.O_RDONLY, SFTPAttributes()) == SFTP_NO_SUCH_FILE


# ------------------------------------------------- scp (SFTP mode) and setstat(size)

SCP = shutil.which("scp")
needs_scp = pytest.mark.skipif(SCP is None, reason="OpenSSH scp client not installed")


def run_scp(s, *args):
    # -s: SFTP mode, OpenSSH 9's default, spelled out for older clients
    return subprocess.run([SCP, "-s"] + ssh_opts(s.port) + list(args),
                          capture_output=True, text=True, timeout=TIMEOUT)


@needs_scp
def test_scp_sftp_mode_new_file_over_a_longer_one_and_times(server):
    """scp in SFTP mode opens an existing file without O_TRUNC, writes, then sets the
    size with fsetstat ("truncating at N") and needs the subsystem's exit status 0."""
    s = server
    s.roots.overwrite = True
    small = s.local / "small.bin"
    small.write_bytes(os.urandom(100 * 1024 + 3))
    os.utime(str(small), (1500000000, 1500000000))
    r = run_scp(s, str(small), "x@device:%s/new.bin" % s.rw)
    assert r.returncode == 0, r.stderr
    assert sha(s.rw / "new.bin") == sha(small)
    (s.rw / "long.bin").write_bytes(b"L" * (300 * 1024))
    r = run_scp(s, "-p", str(small), "x@device:%s/long.bin" % s.rw)
    assert r.returncode == 0, r.stderr
    assert (s.rw / "long.bin").read_bytes() == small.read_bytes()   # no old tail left
    assert int(os.stat(str(s.rw / "long.bin")).st_mtime) == 1500000000  # -p
    r = run_scp(s, "x@device:%s/long.bin" % s.rw, str(s.local / "back.bin"))
    assert r.returncode == 0, r.stderr
    assert sha(s.local / "back.bin") == sha(small)
    r = run_scp(s, str(small), "x@device:%s/x.bin" % s.ro)
    assert r.returncode != 0 and not (s.ro / "x.bin").exists()
    assert leftovers(s.rw) == []


def _size(n):
    a = SFTPAttributes()
    a.st_size = n
    return a


def test_setstat_size_by_path_confined(tmp_path):
    srv, rw, ro, outside = direct(tmp_path, max_size=1024 * 1024)
    target = rw / "f.bin"
    target.write_bytes(b"0123456789")
    assert srv.chattr(str(target), _size(4)) == SFTP_FAILURE  # overwrite off: as an update
    assert target.read_bytes() == b"0123456789"
    srv.roots.overwrite = True
    assert srv.chattr(str(target), _size(4)) == SFTP_OK
    assert target.read_bytes() == b"0123"
    assert srv.chattr(str(target), _size(1024 * 1024)) == SFTP_OK      # up to max_size
    assert target.stat().st_size == 1024 * 1024
    assert srv.chattr(str(target), _size(1024 * 1024 + 1)) == SFTP_FAILURE
    assert target.stat().st_size == 1024 * 1024
    assert srv.chattr(str(target), _size(0)) == SFTP_OK and target.read_bytes() == b""
    # read-only root, symlink out of the root, hard link, outside, not a file, reserved
    assert srv.chattr(str(ro / "readme.txt"), _size(0)) == SFTP_PERMISSION_DENIED
    os.symlink(str(outside / "secret"), str(rw / "link"))
    assert srv.chattr(str(rw / "link"), _size(0)) == SFTP_PERMISSION_DENIED
    os.link(str(outside / "secret"), str(rw / "hl"))
    assert srv.chattr(str(rw / "hl"), _size(0)) == SFTP_PERMISSION_DENIED
    assert srv.chattr(str(outside / "secret"), _size(0)) == SFTP_PERMISSION_DENIED
    os.mkfifo(str(rw / "fifo"))
    assert srv.chattr(str(rw / "fifo"), _size(0)) != SFTP_OK
    (rw / ".f.bin.abcd.rgpart").write_bytes(b"partial")
    assert srv.chattr(str(rw / ".f.bin.abcd.rgpart"), _size(0)) == SFTP_FAILURE
    assert (rw / ".f.bin.abcd.rgpart").read_bytes() == b"partial"
    assert (outside / "secret").read_bytes() == b"secret\n"
    assert (ro / "readme.txt").read_bytes() == b"read only\n"
    assert srv.chattr(str(rw / "missing"), _size(0)) == SFTP_NO_SUCH_FILE
    assert not (rw / "missing").exists()


def test_fsetstat_size_bounded_like_writes(tmp_path):
    srv, rw, ro, outside = direct(tmp_path, max_size=1024 * 1024, partial_quota=1536 * 1024)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    h = srv.open(str(rw / "a.bin"), flags, SFTPAttributes())
    assert h.write(0, b"x" * 1000) == SFTP_OK
    assert h.chattr(_size(10)) == SFTP_OK                 # truncate the temp file
    assert h.chattr(_size(1024 * 1024)) == SFTP_OK        # extend it, up to max_size
    other = srv.open(str(rw / "b.bin"), flags, SFTPAttributes())
    assert other.chattr(_size(600 * 1024)) == SFTP_FAILURE   # 1.6 MiB > partial_quota
    assert other.close() == SFTP_FAILURE and not (rw / "b.bin").exists()
    assert h.chattr(_size(20)) == SFTP_OK
    assert h.close() == SFTP_OK
    assert (rw / "a.bin").read_bytes() == b"x" * 10 + b"\0" * 10
    h = srv.open(str(rw / "c.bin"), flags, SFTPAttributes())
    assert h.chattr(_size(1024 * 1024 + 1)) == SFTP_FAILURE  # past max_size
    assert h.close() == SFTP_FAILURE and not (rw / "c.bin").exists()
    assert leftovers(rw) == []
