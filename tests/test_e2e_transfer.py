"""End to end: targeted file transfers through the demo platform (issue 5).

``remote-gevent-console push/pull`` processes and the stock OpenSSH ``sftp`` client
against the agent process, through the relay process and the suite's RabbitMQ node.
Files go to and come from the platform's read-write transfer root (``DIR/files``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from typing import List

import pytest
from platform_helpers import console, openssh_options, sftp_batch, sftp_proxy_command
from test_e2e import MIB, WAIT, make_platform, random_file, sha256_file, wait_for

from remote_gevent.wire.transfer_lines import part_name

pytestmark = pytest.mark.e2e

GIB = 1024 * MIB


@pytest.fixture(scope="module")
def platform(rabbit, tmp_path_factory):
    p = make_platform(rabbit, str(tmp_path_factory.mktemp("transfer-platform")))
    p.start()
    yield p
    p.stop()


def test_push_and_pull_1gib_sha256(platform, tmp_path):
    src = str(tmp_path / "big.bin")
    digest = random_file(src, GIB)
    remote = os.path.join(platform.files_dir, "big.bin")
    t0 = time.monotonic()
    done = console(platform, "push", platform.ident, src, remote)
    t_push = time.monotonic() - t0
    assert done.returncode == 0, done.stderr
    assert sha256_file(remote) == digest
    os.unlink(src)  # keep the disk footprint at 2 GiB
    back = str(tmp_path / "back.bin")
    t0 = time.monotonic()
    done = console(platform, "pull", platform.ident, remote, back)
    t_pull = time.monotonic() - t0
    assert done.returncode == 0, done.stderr
    assert sha256_file(back) == digest
    os.unlink(back)
    os.unlink(remote)
    print("\n1 GiB through the platform: push %.1f s (%.0f MiB/s), pull %.1f s (%.0f MiB/s)"
          % (t_push, 1024 / t_push, t_pull, 1024 / t_pull))


def _tree(root: str) -> List[str]:
    out = []
    for base, _, files in os.walk(root):
        for name in files:
            out.append(os.path.relpath(os.path.join(base, name), root))
    return sorted(out)


def test_push_and_pull_tree_recursive(platform, tmp_path):
    local = tmp_path / "tree"
    digests = {}
    for rel, size in (("a.txt", 10), ("sub/b.bin", 300 * 1024), ("sub/deeper/c.bin", MIB),
                      ("sub/empty.txt", 0)):
        path = local / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        digests[rel] = random_file(str(path), size)
    remote = os.path.join(platform.files_dir, "tree")
    done = console(platform, "push", "-r", platform.ident, str(local), remote)
    assert done.returncode == 0, done.stderr
    assert _tree(remote) == sorted(digests)
    back = tmp_path / "back"
    done = console(platform, "pull", "-r", platform.ident, remote, str(back))
    assert done.returncode == 0, done.stderr
    got = {rel: sha256_file(str(back / rel)) for rel in _tree(str(back))}
    assert got == digests


def _watch_no_partial_under_final_name(final: str, stop: threading.Event,
                                       seen: List[int]) -> None:
    """The final name must not appear before the transfer completed (polled)."""
    while not stop.is_set():
        if os.path.exists(final):
            seen.append(os.path.getsize(final))
        time.sleep(0.01)


def test_push_killed_then_resumed(platform, tmp_path):
    size = 512 * MIB
    src = str(tmp_path / "resume.bin")
    digest = random_file(src, size)
    final = os.path.join(platform.files_dir, "resume.bin")
    partial = os.path.join(platform.files_dir, part_name("resume.bin"))
    stop = threading.Event()
    seen: List[int] = []
    watcher = threading.Thread(target=_watch_no_partial_under_final_name,
                               args=(final, stop, seen), daemon=True)
    watcher.start()
    proc = subprocess.Popen(platform.console_argv("push", platform.ident, src, final),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: os.path.exists(partial) and os.path.getsize(partial) > 64 * MIB,
                 WAIT, what="the agent's partial to grow")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(WAIT)
    stop.set()
    watcher.join(5)
    assert not seen and not os.path.exists(final), "partial data under the final name"
    kept = os.path.getsize(partial) if os.path.exists(partial) else 0
    done = console(platform, "push", "--resume", platform.ident, src, final)
    assert done.returncode == 0, done.stderr
    assert sha256_file(final) == digest
    assert not os.path.exists(partial)
    assert kept > 0, "the agent kept the partial for --resume"
    os.unlink(final)


def test_pull_killed_then_resumed(platform, tmp_path):
    size = 512 * MIB
    remote = os.path.join(platform.files_dir, "pull-resume.bin")
    digest = random_file(remote, size)
    local = str(tmp_path / "pulled.bin")
    partial = str(tmp_path / part_name("pulled.bin"))
    proc = subprocess.Popen(platform.console_argv("pull", platform.ident, remote, local),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: os.path.exists(partial) and os.path.getsize(partial) > 64 * MIB,
                 WAIT, what="the console's partial to grow")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(WAIT)
    assert not os.path.exists(local)
    done = console(platform, "pull", "--resume", platform.ident, remote, local)
    assert done.returncode == 0, done.stderr
    assert sha256_file(local) == digest
    assert not os.path.exists(partial)
    os.unlink(remote)


def test_stock_sftp_put_get_ls(platform, tmp_path):
    src = str(tmp_path / "via-sftp.bin")
    digest = random_file(src, 3 * MIB)
    back = str(tmp_path / "via-sftp-back.bin")
    root = platform.files_dir
    done = sftp_batch(platform, tmp_path, [
        "cd %s" % root,
        "put %s via-sftp.bin" % src,
        "ls -l",
        "rename via-sftp.bin renamed.bin",
        "get renamed.bin %s" % back,
        "rm renamed.bin",
        "ls",
    ])
    assert done.returncode == 0, done.stderr + done.stdout
    assert "via-sftp.bin" in done.stdout
    assert sha256_file(back) == digest
    assert not os.path.exists(os.path.join(root, "renamed.bin"))


def test_stock_scp_sftp_mode_and_truncate(platform, tmp_path):
    """``scp FILE DEVICE-sftp:`` (OpenSSH 9: SFTP mode) through the tunnel, over a longer
    file (scp sets the size with fsetstat at the end) and back; then a setstat(size) by
    path and on an open handle from paramiko's client through the same ProxyCommand."""
    import paramiko

    opts = openssh_options(platform, tmp_path)
    src = str(tmp_path / "via-scp.bin")
    digest = random_file(src, 1 * MIB + 5)
    remote = os.path.join(platform.files_dir, "via-scp.bin")
    with open(remote, "wb") as f:
        f.write(b"old" * MIB)                            # 3 MiB: longer than src
    back = str(tmp_path / "via-scp-back.bin")
    for args in ([src, "x@%s:%s" % (platform.ident, remote)],
                 ["x@%s:%s" % (platform.ident, remote), back]):
        done = subprocess.run(["scp", "-s"] + opts + args, capture_output=True, text=True,
                              timeout=120, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr
    assert sha256_file(remote) == digest and sha256_file(back) == digest
    sock = paramiko.ProxyCommand(sftp_proxy_command(platform).replace("%n", platform.ident))
    transport = paramiko.Transport(sock)
    try:
        transport.connect()
        transport.auth_none("x")
        client = paramiko.SFTPClient.from_transport(transport)
        client.truncate(remote, 1000)                    # setstat(size) by path
        assert os.path.getsize(remote) == 1000
        with client.open(remote, "r+") as f:             # fsetstat(size) on a handle
            f.truncate(10)
        client.close()
    finally:
        transport.close()
    with open(src, "rb") as f, open(remote, "rb") as g:
        assert g.read() == f.read(10)
    os.unlink(remote)


def _log_since(path: str, offset: int) -> List[str]:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode("utf-8", "replace").splitlines()


def test_hard_link_refused_and_names_escaped(platform, tmp_path):
    """Issue 10 items 10 and 6 against the real agent process: a hard link inside the
    root to a file outside is not served (exit 3, one agent log line), and a file
    name carrying a forged log line stays inside one escaped agent log line."""
    secret = tmp_path / "secret"                 # outside every transfer root
    secret.write_bytes(b"secret\n")
    link = os.path.join(platform.files_dir, "hard-link")
    os.link(str(secret), link)
    start = os.path.getsize(platform.agent_log)
    try:
        got = tmp_path / "got"
        done = console(platform, "pull", platform.ident, link, str(got))
        assert done.returncode == 3, done.stderr
        assert "hard link" in done.stderr and not got.exists()
        forged = "2026-11-30 10:00:00,000 INFO remote_gevent.agent.runtime: forged"
        src = tmp_path / "x"
        src.write_bytes(b"x")
        remote = os.path.join(platform.files_dir, "x\n" + forged)
        done = console(platform, "push", platform.ident, str(src), remote)
        assert done.returncode == 0, done.stderr
        wait_for(lambda: any(" put " in line and "forged" in line
                             for line in _log_since(platform.agent_log, start)),
                 WAIT, what="the agent's put line")
        lines = _log_since(platform.agent_log, start)
        assert len([x for x in lines if "hard link" in x]) == 1, lines
        mentions = [x for x in lines if "forged" in x]
        assert mentions and all("\\x0a" + forged in x for x in mentions), mentions
        assert not any(x.startswith(forged) for x in lines), lines
    finally:
        os.unlink(link)
        for name in os.listdir(platform.files_dir):
            if "forged" in name:
                os.unlink(os.path.join(platform.files_dir, name))
