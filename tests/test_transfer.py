"""@transfer end to end inside one process: two real mux.Tunnels over a socketpair with
real tunnel_crypto sealers, the agent side serving @transfer through
open_virtual_target, the console side using console/transfer.py.

RG_TRANSFER_TEST_MIB sets the round-trip size (default 64; the 1 GiB run goes
through the real platform in the e2e tests).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import socket
import stat
import subprocess
import time

import gevent
import pytest

from remote_gevent.agent import config
from remote_gevent.crypto import identity
from remote_gevent.wire import mux
from remote_gevent.wire import mux_frames
from remote_gevent.agent.files import dispatch
from remote_gevent.agent.files import fsops
from remote_gevent.agent.files import roots as roots_mod
from remote_gevent.agent.files import transfer
from remote_gevent.wire import transfer_lines
from remote_gevent.crypto import tunnel_crypto as tc
from remote_gevent.console import progress
from remote_gevent.console import transfer as ct
from remote_gevent.wire.transfer_lines import TransferError

MIB = 1024 * 1024
SIZE_MIB = int(os.environ.get("RG_TRANSFER_TEST_MIB", "64"))
SID = "ab" * 16


def sha_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(MIB), b""):
            h.update(block)
    return h.hexdigest()


def write_random(path, size):
    with open(path, "wb") as fh:
        left = size
        while left:
            n = min(left, 4 * MIB)
            fh.write(os.urandom(n))
            left -= n


class Pair:
    """A console and an agent tunnel joined by a socketpair."""

    def __init__(self, tcfg, results):
        self.tcfg = tcfg
        self.results = results
        a, b = socket.socketpair()
        self.raw = (a, b)
        cpk, csk = tc.kx_keypair()
        apk, ask = tc.kx_keypair()
        cipher = tc.choose_cipher()
        ctx, crx = tc.derive_keys("console", cpk, csk, apk, SID)
        atx, arx = tc.derive_keys("agent", apk, ask, cpk, SID)
        self.console = mux.Tunnel(a, tc.FrameSealer(ctx, cipher), tc.FrameOpener(crx, cipher),
                                  "console", name="console", keepalive_interval=0)
        self.agent = mux.Tunnel(b, tc.FrameSealer(atx, cipher), tc.FrameOpener(arx, cipher),
                                "agent", on_open=self.on_open, name="agent",
                                keepalive_interval=0)
        self.g = [gevent.spawn(self.console.run), gevent.spawn(self.agent.run)]
        assert self.console.wait_up(5)

    host_identity = identity.IdentityKey.generate()  # the @sftp host key

    def on_open(self, target):
        return dispatch.open_virtual_target(target, self.tcfg, self.host_identity,
                                            on_result=self.results.append, log_ctx=SID)

    def factory(self):
        return self.console.open_stream("@transfer", timeout=5)

    def kill(self):
        """Abrupt loss of the relay connection."""
        for s in self.raw:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self.console.close()
        self.agent.close()
        gevent.joinall(self.g, timeout=5)


def make_tree(tmp_path):
    """``rw`` and ``ro`` roots (``ro/readme.txt``), a directory ``outside`` every root
    (``outside/secret``) and a ``local`` directory for the operator's side."""
    rw = tmp_path / "rw"
    ro = tmp_path / "ro"
    outside = tmp_path / "outside"
    local = tmp_path / "local"
    for d in (rw, ro, outside, local):
        d.mkdir()
    (ro / "readme.txt").write_bytes(b"read only\n")
    (outside / "secret").write_bytes(b"secret\n")
    return rw, ro, outside, local


@pytest.fixture
def env(tmp_path):
    rw, ro, outside, local = make_tree(tmp_path)
    state = {"overwrite": False, "max_size": 1024 * MIB, "extra_roots": [], "rw_kw": {},
             "ro_kw": {}, "tcfg_kw": {}}

    class Env:
        pass

    e = Env()
    e.tmp, e.rw, e.ro, e.outside, e.local = tmp_path, rw, ro, outside, local
    e.results = []
    e.pairs = []
    e.state = state

    def tcfg():
        roots = [config.TransferRoot(path=str(rw), mode="rw", **state["rw_kw"]),
                 config.TransferRoot(path=str(ro), mode="ro", **state["ro_kw"])] \
            + state["extra_roots"]
        return config.TransferConfig(roots=tuple(roots), max_size=state["max_size"],
                                     overwrite=state["overwrite"], **state["tcfg_kw"])

    def pair():
        p = Pair(tcfg(), e.results)
        e.pairs.append(p)
        return p

    e.pair = pair
    yield e
    for p in e.pairs:
        p.close()


def wait_results(e, n, timeout=10):
    deadline = time.monotonic() + timeout
    while len(e.results) < n and time.monotonic() < deadline:
        gevent.sleep(0.01)
    assert len(e.results) >= n, e.results


def no_partials(d):
    return [p for p in os.listdir(str(d)) if p.endswith(transfer_lines.PART_SUFFIX)] == []


# --------------------------------------------------------------------------- happy paths


def test_push_pull_round_trip_sha256(env, capsys):
    size = SIZE_MIB * MIB
    src = env.local / "big.bin"
    write_random(str(src), size)
    want = sha_file(str(src))
    p = env.pair()
    t0 = time.monotonic()
    out = ct.push(p.factory, str(src), str(env.rw / "big.bin"))
    t_push = time.monotonic() - t0
    assert out == {"files": 1, "bytes": size}
    assert sha_file(str(env.rw / "big.bin")) == want
    assert no_partials(env.rw)
    dst = env.local / "back.bin"
    t0 = time.monotonic()
    out = ct.pull(p.factory, str(env.rw / "big.bin"), str(dst))
    t_pull = time.monotonic() - t0
    assert sha_file(str(dst)) == want
    assert no_partials(env.local)
    wait_results(env, 2)
    assert [r["code"] for r in env.results[-2:]] == ["transfer_ok", "transfer_ok"]
    assert env.results[-2]["op"] == "put" and env.results[-2]["bytes"] == size
    with capsys.disabled():
        print("\n[transfer] %d MiB in-process (console+agent in one process, %s): "
              "push %.0f MiB/s, pull %.0f MiB/s"
              % (SIZE_MIB, tc.choose_cipher(), SIZE_MIB / t_push, SIZE_MIB / t_pull))


def test_push_into_existing_dir_and_pull_into_dir(env):
    src = env.local / "a.txt"
    src.write_bytes(b"hello\n")
    p = env.pair()
    ct.push(p.factory, str(src), str(env.rw))
    assert (env.rw / "a.txt").read_bytes() == b"hello\n"
    d = env.local / "into"
    d.mkdir()
    ct.pull(p.factory, str(env.rw / "a.txt"), str(d))
    assert (d / "a.txt").read_bytes() == b"hello\n"


def test_empty_file(env):
    src = env.local / "empty"
    src.write_bytes(b"")
    p = env.pair()
    ct.push(p.factory, str(src), str(env.rw / "empty"))
    assert (env.rw / "empty").read_bytes() == b""
    ct.pull(p.factory, str(env.rw / "empty"), str(env.local / "empty2"))
    assert (env.local / "empty2").read_bytes() == b""


def test_recursive_tree(env):
    tree = env.local / "tree"
    (tree / "sub" / "deeper").mkdir(parents=True)
    (tree / "empty_dir").mkdir()
    files = {"top.txt": b"top", "sub/a.bin": os.urandom(300000),
             "sub/deeper/b.txt": b"b" * 10}
    for rel, data in files.items():
        (tree / rel).write_bytes(data)
    p = env.pair()
    out = ct.push(p.factory, str(tree), str(env.rw / "copy"), recursive=True)
    assert out["files"] == 3
    for rel, data in files.items():
        assert (env.rw / "copy" / rel).read_bytes() == data
    assert (env.rw / "copy" / "empty_dir").is_dir()
    out = ct.pull(p.factory, str(env.rw / "copy"), str(env.local / "back"), recursive=True)
    assert out["files"] == 3
    for rel, data in files.items():
        assert (env.local / "back" / rel).read_bytes() == data
    assert (env.local / "back" / "empty_dir").is_dir()
    assert ct.run_push(p.factory, str(tree), str(env.rw / "x"), err=io.StringIO()) \
        == ct.EXIT_USAGE


def test_sftp_through_the_tunnel(env):
    import paramiko
    (env.rw / "hello.txt").write_bytes(b"hi\n")
    p = env.pair()
    ours, theirs = socket.socketpair()
    stream = p.console.open_stream("@sftp", timeout=5)
    g = gevent.spawn(p.console.splice, stream, ours)
    t = paramiko.Transport(theirs)
    try:
        t.start_client(timeout=10)
        assert t.get_remote_server_key().get_base64() == p.host_identity.public_line().split()[1]
        t.auth_none("x")
        client = paramiko.SFTPClient.from_transport(t)
        assert "hello.txt" in client.listdir(str(env.rw))
        with client.open(str(env.rw / "new.txt"), "wb") as fh:
            fh.write(b"via the tunnel")
        assert (env.rw / "new.txt").read_bytes() == b"via the tunnel"
        with pytest.raises(PermissionError):
            client.open(str(env.ro / "nope"), "wb")
        client.close()
    finally:
        t.close()
        g.join(timeout=5)


def test_list_and_stat_virtual_root(env):
    p = env.pair()
    entries = ct.remote_list(p.factory, "/")
    assert [e["type"] for e in entries] == ["dir"]
    assert ct.remote_stat(p.factory, "/")["type"] == "dir"
    assert ct.remote_stat(p.factory, str(env.ro / "readme.txt"))["size"] == 10
    with pytest.raises(TransferError) as ei:
        ct.remote_stat(p.factory, str(env.rw / "nope"))
    assert ei.value.code == "not_found"


# --------------------------------------------------------------------------- resume


class KillAfter(progress.Progress):
    """Progress hook that cuts the tunnel after ``limit`` bytes and checks, at every
    update, that the final name never holds a partial file."""

    def __init__(self, pair, limit, final):
        super().__init__(enabled=False)
        self.pair, self.limit, self.final = pair, limit, final
        self.killed = False

    def update(self, n):
        super().update(n)
        assert not os.path.exists(self.final)
        if not self.killed and self.done >= self.limit:
            self.killed = True
            self.pair.kill()


def test_kill_mid_push_then_resume(env):
    size = 24 * MIB
    src = env.local / "r.bin"
    write_random(str(src), size)
    final = env.rw / "r.bin"
    p = env.pair()
    prog = KillAfter(p, 8 * MIB, str(final))
    with pytest.raises(TransferError) as ei:
        ct.push(p.factory, str(src), str(final), progress=prog)
    assert ei.value.code == "connection_lost"
    assert ct.exit_code(ei.value.code) == ct.EXIT_CONNECTION
    wait_results(env, 1)
    assert env.results[-1]["code"] == "transfer_incomplete"
    assert not final.exists()
    part = env.rw / ".r.bin.rgpart"
    kept = part.stat().st_size
    assert 0 < kept < size
    p2 = env.pair()
    out = ct.push(p2.factory, str(src), str(final), resume=True)
    assert out["bytes"] == size - kept        # only the rest was sent
    assert sha_file(str(final)) == sha_file(str(src))
    assert not part.exists()
    wait_results(env, 2)
    assert env.results[-1]["code"] == "transfer_ok"


def test_resume_push_with_foreign_partial_restarts(env):
    src = env.local / "f.bin"
    write_random(str(src), 3 * MIB)
    (env.rw / ".f.bin.rgpart").write_bytes(b"not a prefix of the file")
    p = env.pair()
    out = ct.push(p.factory, str(src), str(env.rw / "f.bin"), resume=True)
    assert out["bytes"] == 3 * MIB
    assert sha_file(str(env.rw / "f.bin")) == sha_file(str(src))


def test_kill_mid_pull_then_resume(env):
    size = 24 * MIB
    remote = env.rw / "p.bin"
    write_random(str(remote), size)
    local = env.local / "p.bin"
    p = env.pair()
    prog = KillAfter(p, 8 * MIB, str(local))
    with pytest.raises(TransferError) as ei:
        ct.pull(p.factory, str(remote), str(local), progress=prog)
    assert ei.value.code == "connection_lost"
    part = env.local / ".p.bin.rgpart"
    kept = part.stat().st_size
    assert 0 < kept < size and not local.exists()
    p2 = env.pair()
    out = ct.pull(p2.factory, str(remote), str(local), resume=True)
    assert out["bytes"] == size - kept
    assert sha_file(str(local)) == sha_file(str(remote))
    assert not part.exists()


# --------------------------------------------------------------------------- refusals


def push_err(p, local, remote, **kw):
    with pytest.raises(TransferError) as ei:
        ct.push(p.factory, str(local), remote, **kw)
    return ei.value


def pull_err(p, remote, local, **kw):
    with pytest.raises(TransferError) as ei:
        ct.pull(p.factory, remote, str(local), **kw)
    return ei.value


def tree_snapshot(*dirs):
    out = {}
    for d in dirs:
        for root, dnames, fnames in os.walk(str(d)):
            for n in dnames + fnames:
                path = os.path.join(root, n)
                st = os.lstat(path)
                out[path] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def raw_request(p, header, data=b""):
    """Speak the wire protocol directly (what a buggy or hostile console could send)."""
    s = p.factory()
    s.send(json.dumps(header).encode() + b"\n")
    if data:
        try:
            s.send(data)
        except (mux_frames.MuxError, OSError):
            pass
    try:
        s.shutdown_write()
    except (mux_frames.MuxError, OSError):
        pass
    buf = b""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            chunk = s.recv()
        except (mux_frames.MuxError, OSError):
            break
        if not chunk:
            break
        buf += chunk
    return [json.loads(line) for line in buf.split(b"\n") if line.startswith(b"{")]


def test_escapes_refused_nothing_written(env):
    os.symlink(str(env.outside), str(env.rw / "out_link"))
    os.symlink("/dev/null", str(env.rw / "null_link"))
    os.symlink(str(env.outside / "secret"), str(env.rw / "secret_link"))
    os.mkfifo(str(env.rw / "fifo"))
    src = env.local / "x"
    src.write_bytes(b"payload")
    before = tree_snapshot(env.rw, env.outside, env.ro)
    p = env.pair()
    rw = str(env.rw)
    cases = [
        (rw + "/../outside/x", "outside_root"),
        (rw + "/a/../../outside/x", "outside_root"),
        ("/etc/x", "outside_root"),
        (rw + "/out_link/x", "symlink_escape"),
        (rw + "/null_link", "symlink_escape"),
        (rw + "/secret_link", "symlink_escape"),
        (rw + "/fifo", "not_regular_file"),
    ]
    for remote, code in cases:
        assert push_err(p, src, remote).code == code, remote
    assert push_err(p, src, "relative/x").code == "not_absolute"
    # A root itself is a directory, never a file to replace.
    assert raw_request(p, {"op": "put", "path": rw, "size": 1})[0]["code"] \
        == "not_regular_file"
    # The agent refuses a relative path itself too (not only the console).
    assert raw_request(p, {"op": "put", "path": "rel/x", "size": 1})[0]["code"] \
        == "not_absolute"
    for remote, code in [(rw + "/../outside/secret", "outside_root"),
                         (rw + "/out_link/secret", "symlink_escape"),
                         (rw + "/secret_link", "symlink_escape"),
                         (rw + "/null_link", "symlink_escape"),
                         (rw + "/fifo", "not_regular_file"),
                         ("/etc/passwd", "outside_root")]:
        assert pull_err(p, remote, env.local / "got").code == code, remote
    assert not (env.local / "got").exists() and no_partials(env.local)
    assert tree_snapshot(env.rw, env.outside, env.ro) == before
    assert (env.outside / "secret").read_bytes() == b"secret\n"
    wait_results(env, 1)
    assert any(r["code"] == "transfer_symlink_escape" for r in env.results)


def test_device_file_inside_root_refused(env):
    try:
        os.mknod(str(env.rw / "null"), 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    except (OSError, PermissionError) as e:
        pytest.skip("cannot mknod a device file here: %s" % e)
    p = env.pair()
    assert pull_err(p, str(env.rw / "null"), env.local / "n").code == "not_regular_file"
    src = env.local / "x"
    src.write_bytes(b"x")
    assert push_err(p, src, str(env.rw / "null"), overwrite=True).code == "not_regular_file"


def test_oversize_declared_and_actual(env):
    env.state["extra_roots"] = [config.TransferRoot(path=str(env.tmp / "small"), mode="rw",
                                                    max_size=MIB)]
    (env.tmp / "small").mkdir()
    src = env.local / "two.bin"
    write_random(str(src), 2 * MIB)
    p = env.pair()
    err = push_err(p, src, str(env.tmp / "small" / "two.bin"))
    assert err.code == "too_large" and ct.exit_code(err.code) == ct.EXIT_REFUSED
    # Actual bytes beyond the declared size: refused, nothing kept.
    answers = raw_request(p, {"op": "put", "path": str(env.tmp / "small" / "liar"),
                              "size": 10}, data=os.urandom(2 * MIB))
    assert answers[0]["ok"] is True
    assert answers[-1]["ok"] is False and answers[-1]["code"] == "too_large"
    assert os.listdir(str(env.tmp / "small")) == []


def test_integrity_mismatch_keeps_nothing(env):
    p = env.pair()
    answers = raw_request(p, {"op": "put", "path": str(env.rw / "bad"), "size": 5},
                          data=b"hello" + b'{"sha256": "' + b"0" * 64 + b'"}\n')
    assert answers[-1]["code"] == "integrity"
    assert os.listdir(str(env.rw)) == []
    assert ct.exit_code("integrity") == ct.EXIT_INTEGRITY


def test_exists_without_overwrite(env):
    (env.rw / "keep.txt").write_bytes(b"original")
    src = env.local / "keep.txt"
    src.write_bytes(b"new content")
    p = env.pair()
    assert push_err(p, src, str(env.rw / "keep.txt")).code == "exists"
    # --overwrite asked but the device does not allow it
    err = push_err(p, src, str(env.rw / "keep.txt"), overwrite=True)
    assert err.code == "exists" and "remote.transfer.overwrite" in err.message
    assert (env.rw / "keep.txt").read_bytes() == b"original"
    assert no_partials(env.rw)
    errout = io.StringIO()
    assert ct.run_push(p.factory, str(src), str(env.rw / "keep.txt"), err=errout) \
        == ct.EXIT_REFUSED
    assert errout.getvalue().count("\n") == 1 and "exists" in errout.getvalue()
    env.state["overwrite"] = True
    p2 = env.pair()
    ct.push(p2.factory, str(src), str(env.rw / "keep.txt"), overwrite=True)
    assert (env.rw / "keep.txt").read_bytes() == b"new content"


def test_read_only_root(env):
    src = env.local / "x"
    src.write_bytes(b"x")
    p = env.pair()
    before = tree_snapshot(env.ro)
    assert push_err(p, src, str(env.ro / "x")).code == "read_only"
    with pytest.raises(TransferError) as ei:
        ct.remote_mkdir(p.factory, str(env.ro / "d"))
    assert ei.value.code == "read_only"
    assert tree_snapshot(env.ro) == before
    ct.pull(p.factory, str(env.ro / "readme.txt"), str(env.local / "readme.txt"))
    assert (env.local / "readme.txt").read_bytes() == b"read only\n"


def test_not_found_and_disabled(env):
    p = env.pair()
    err = pull_err(p, str(env.rw / "missing"), env.local / "m")
    assert err.code == "not_found" and ct.exit_code(err.code) == ct.EXIT_OTHER
    assert not (env.local / "m").exists() and no_partials(env.local)
    disabled = Pair(config.TransferConfig(), [])
    env.pairs.append(disabled)
    with pytest.raises(TransferError) as ei:
        ct.pull(disabled.factory, "/x", str(env.local / "y"))
    assert ei.value.code == "target_refused"


@pytest.fixture
def tiny_fs(tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                       capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        pytest.skip("cannot mount a 1 MiB tmpfs: %s" % r.stderr.strip())
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], timeout=10)


def test_no_space_declared(env, tiny_fs):
    env.state["extra_roots"] = [config.TransferRoot(path=str(tiny_fs), mode="rw")]
    src = env.local / "two.bin"
    write_random(str(src), 2 * MIB)
    p = env.pair()
    err = push_err(p, src, str(tiny_fs / "two.bin"))
    assert err.code == "no_space" and ct.exit_code(err.code) == ct.EXIT_NO_SPACE
    assert os.listdir(str(tiny_fs)) == []


def test_no_space_during_write(env, tiny_fs, monkeypatch):
    # The up-front free-space check cannot see another writer filling the disk;
    # switch it off so the real ENOSPC comes from the write itself.
    monkeypatch.setattr(transfer, "_available", lambda dfd: None)
    env.state["extra_roots"] = [config.TransferRoot(path=str(tiny_fs), mode="rw")]
    src = env.local / "two.bin"
    write_random(str(src), 2 * MIB)
    p = env.pair()
    err = push_err(p, src, str(tiny_fs / "two.bin"))
    assert err.code == "no_space"
    assert os.listdir(str(tiny_fs)) == []
    wait_results(env, 1)
    assert env.results[-1]["code"] == "transfer_no_space"


# --------------------------------------------------------------------------- issue 10

# A file name a hostile operator could pick to forge a second agent log line.
FORGED = "\n2026-11-30 10:00:00,000 INFO remote_gevent.agent.runtime: forged"


def agent_records(caplog, needle, logger="remote_gevent.agent.files.transfer"):
    return [r.getMessage() for r in caplog.records
            if r.name == logger and needle in r.getMessage()]


def make_old(path, age):
    t = time.time() - age
    os.utime(str(path), (t, t))


def test_client_names_escaped_in_the_log(env, caplog):
    caplog.set_level(logging.INFO, logger="remote_gevent")
    p = env.pair()
    name = "a" + FORGED               # a newline is a legal character in a file name
    # One stream, one operation: a put that succeeds (ct.push would stat first).
    replies = raw_request(p, {"op": "put", "path": str(env.rw / name), "size": 1,
                              "sha256": hashlib.sha256(b"x").hexdigest()}, b"x")
    assert replies[-1]["ok"] is True, replies
    assert (env.rw / name).read_bytes() == b"x"
    wait_results(env, 1)
    cases = [
        lambda: raw_request(p, {"op": "put", "path": str(env.ro / name), "size": 1}),  # ro
        lambda: raw_request(p, {"op": "get", "path": "/nowhere" + FORGED}),     # outside
        lambda: raw_request(p, {"op": "get", "path": str(env.rw / ("b" + FORGED))}),
    ]
    for i, case in enumerate([None] + cases):
        if case is not None:
            caplog.clear()
            case()
            gevent.sleep(0.1)
        lines = agent_records(caplog, "forged")
        assert len(lines) == 1, (i, lines)
        assert "\n" not in lines[0] and "\\x0a2026-11-30" in lines[0], (i, lines)


def test_hard_links_not_served_or_replaced(env, caplog):
    caplog.set_level(logging.INFO, logger="remote_gevent.agent.files.transfer")
    secret = env.outside / "secret"
    link = env.rw / "hl"
    os.link(str(secret), str(link))
    env.state["overwrite"] = True
    p = env.pair()
    err = pull_err(p, str(link), env.local / "got")
    assert err.code == "hard_link" and "hard link" in err.message
    assert ct.exit_code(err.code) == ct.EXIT_REFUSED
    assert not (env.local / "got").exists()
    src = env.local / "new"
    src.write_bytes(b"replacement")
    err = push_err(p, src, str(link), overwrite=True)
    assert err.code == "hard_link"
    assert secret.read_bytes() == b"secret\n"
    assert os.stat(str(link)).st_ino == os.stat(str(secret)).st_ino
    assert len(agent_records(caplog, "hard link")) == 2     # one line per refusal
    wait_results(env, 2)
    assert [r["code"] for r in env.results[-2:]] == ["transfer_hard_link"] * 2
    # A root may allow hard links explicitly.
    env.state["rw_kw"] = {"allow_hardlinks": True}
    p2 = env.pair()
    ct.pull(p2.factory, str(link), str(env.local / "got"))
    assert (env.local / "got").read_bytes() == b"secret\n"


def test_hard_linked_partial_never_written(env):
    secret = env.outside / "secret"
    os.link(str(secret), str(env.rw / ".x.rgpart"))
    src = env.local / "x"
    src.write_bytes(b"payload")
    env.state["rw_kw"] = {"allow_hardlinks": True}   # even then: a partial is ours only
    p = env.pair()
    for resume in (False, True):
        err = push_err(p, src, str(env.rw / "x"), resume=resume)
        assert err.code == "hard_link", resume
    assert secret.read_bytes() == b"secret\n"
    assert not (env.rw / "x").exists()


def test_expired_partials_swept_fresh_ones_kept(env, caplog):
    caplog.set_level(logging.INFO, logger="remote_gevent.agent.files.transfer")
    env.state["tcfg_kw"] = {"partial_ttl": 3600}
    (env.rw / "sub" / "deeper").mkdir(parents=True)
    stale = [env.rw / ".gone.bin.rgpart", env.rw / "sub" / ".deep.bin.rgpart",
             env.rw / "sub" / "deeper" / ".s.bin.1a2b3c4d.rgpart"]
    for path in stale:
        path.write_bytes(b"x" * 1000)
        make_old(path, 7200)
    fresh = env.rw / ".fresh.bin.rgpart"
    fresh.write_bytes(b"y" * 1000)
    make_old(fresh, 600)
    old_file = env.rw / "sub" / "old.txt"        # old, but not a partial
    old_file.write_bytes(b"keep")
    make_old(old_file, 7200)
    src = env.local / "new.bin"
    src.write_bytes(b"new")
    p = env.pair()
    ct.push(p.factory, str(src), str(env.rw / "new.bin"))
    assert [str(x) for x in stale if x.exists()] == []
    assert fresh.exists() and old_file.exists()
    assert len(agent_records(caplog, "expired 3 partial upload")) == 1


def test_resume_within_ttl_restart_after(env):
    env.state["tcfg_kw"] = {"partial_ttl": 3600}
    data = os.urandom(3 * MIB)
    src = env.local / "r.bin"
    src.write_bytes(data)
    part = env.rw / ".r.bin.rgpart"
    final = env.rw / "r.bin"
    part.write_bytes(data[:MIB])
    make_old(part, 600)
    p = env.pair()
    out = ct.push(p.factory, str(src), str(final), resume=True)
    assert out["bytes"] == 2 * MIB                 # resumed: within the TTL
    final.unlink()
    part.write_bytes(data[:MIB])
    make_old(part, 7200)
    out = ct.push(p.factory, str(src), str(final), resume=True)
    assert out["bytes"] == 3 * MIB                 # expired: started over
    assert sha_file(str(final)) == hashlib.sha256(data).hexdigest()


def test_partials_count_against_the_root_quota(env):
    env.state["rw_kw"] = {"partial_quota": MIB}
    other = env.rw / ".other.bin.rgpart"
    other.write_bytes(b"z" * (700 * 1024))
    big = env.local / "big.bin"
    big.write_bytes(os.urandom(500 * 1024))
    p = env.pair()
    err = push_err(p, big, str(env.rw / "big.bin"))
    assert err.code == "no_space" and "partial" in err.message, err.message
    assert not (env.rw / "big.bin").exists() and other.exists()
    assert not (env.rw / ".big.bin.rgpart").exists()
    small = env.local / "small.bin"
    small.write_bytes(os.urandom(200 * 1024))
    ct.push(p.factory, str(small), str(env.rw / "small.bin"))
    # The waiting partial's own upload is not counted twice: it can always go on.
    mine = env.local / "other.bin"
    mine.write_bytes(os.urandom(900 * 1024))
    ct.push(p.factory, str(mine), str(env.rw / "other.bin"))
    assert not other.exists() and (env.rw / "other.bin").stat().st_size == 900 * 1024


def test_abandoned_upload_counted_without_a_new_sweep(env):
    env.state["rw_kw"] = {"partial_quota": MIB}
    p = env.pair()
    first = env.local / "first"
    first.write_bytes(b"1")
    ct.push(p.factory, str(first), str(env.rw / "first"))       # the root's sweep is done
    # A console that declares 900 KiB, sends 800 KiB and goes away: partial kept.
    replies = raw_request(p, {"op": "put", "path": str(env.rw / "gone.bin"),
                              "size": 900 * 1024}, b"g" * (800 * 1024))
    assert replies[0]["ok"] is True
    wait_results(env, 2)
    assert (env.rw / ".gone.bin.rgpart").stat().st_size == 800 * 1024
    src = env.local / "next.bin"
    src.write_bytes(os.urandom(300 * 1024))
    err = push_err(p, src, str(env.rw / "next.bin"))
    assert err.code == "no_space" and "partial" in err.message, err.message


def test_new_keys_reach_the_roots(tmp_path):
    rw = tmp_path / "rw"
    rw.mkdir()
    raw = {"remote": {"transfer": {
        "partial_ttl": 7200, "partial_quota": "3M",
        "roots": [{"path": str(rw), "mode": "rw", "allow_hardlinks": True,
                   "partial_quota": "1M"},
                  {"path": str(tmp_path), "mode": "ro"}]}}}
    cfg = config.parse(raw, str(tmp_path / "c.yaml"))
    roots = roots_mod.Roots.from_config(cfg.remote.transfer)
    assert roots.partial_ttl == 7200
    by_path = {r.real: r for r in roots.roots}
    assert by_path[os.path.realpath(str(rw))].allow_hardlinks is True
    assert by_path[os.path.realpath(str(rw))].partial_quota == MIB
    assert by_path[os.path.realpath(str(tmp_path))].allow_hardlinks is False
    assert by_path[os.path.realpath(str(tmp_path))].partial_quota == 3 * MIB
    defaults = roots_mod.Roots.from_config(config.parse(
        {"remote": {"transfer": {"roots": [{"path": str(rw), "mode": "rw"}]}}},
        str(tmp_path / "c.yaml")).remote.transfer)
    assert defaults.partial_ttl == 86400
    assert defaults.roots[0].partial_quota == 2 * defaults.roots[0].max_size
    for bad in ({"partial_ttl": 10}, {"partial_quota": "lots"},
                {"roots": [{"path": str(rw), "allow_hardlinks": "yes"}]},
                {"roots": [{"path": str(rw), "partial_quota": -1}]}):
        with pytest.raises(config.ConfigError):
            config.parse({"remote": {"transfer": bad}}, str(tmp_path / "c.yaml"))


# --------------------------------------------------------------------------- units


def test_roots_resolve_unit(tmp_path):
    root = tmp_path / "r"
    (root / "d").mkdir(parents=True)
    os.symlink("d", str(root / "inner"))   # symlink inside the root: allowed
    roots = roots_mod.Roots([roots_mod.Root(str(root), writable=False)])
    assert roots.resolve(str(root / "inner")).path == os.path.realpath(str(root / "d"))
    assert roots.resolve(str(root) + "//d/./").path == os.path.realpath(str(root / "d"))
    for path, code in [("", "bad_request"), ("a", "not_absolute"),
                       (str(root) + "/d\0x", "bad_request"),
                       (str(root) + "/../x", "outside_root"),
                       (str(root) + "x/y", "outside_root")]:
        with pytest.raises(TransferError) as ei:
            roots.resolve(path)
        assert ei.value.code == code, path
    with pytest.raises(TransferError) as ei:
        roots.resolve(str(root / "d"), want_write=True)
    assert ei.value.code == "read_only"
    assert roots.virtual_children("/") == [str(tmp_path).split("/")[1]]
    assert roots.virtual_children(str(root)) is None


def test_rename_noreplace(tmp_path):
    (tmp_path / "a").write_bytes(b"a")
    (tmp_path / "b").write_bytes(b"b")
    dfd = os.open(str(tmp_path), os.O_RDONLY)
    try:
        with pytest.raises(FileExistsError):
            fsops.rename_noreplace(dfd, "a", dfd, "b")
        fsops.rename_noreplace(dfd, "a", dfd, "c")
    finally:
        os.close(dfd)
    assert (tmp_path / "b").read_bytes() == b"b" and (tmp_path / "c").read_bytes() == b"a"


def test_progress_quiet_unless_tty():
    out = io.StringIO()
    p = progress.Progress(out=out)
    p.start("f", 100)
    p.update(50)
    p.finish()
    assert out.getvalue() == ""
    p = progress.Progress(out=out, enabled=True)
    p.start("f", 100)
    p.update(100)
    p.finish()
    assert "100%" in out.getvalue() and out.getvalue().endswith("\n")

