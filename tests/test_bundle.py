"""The offline install bundle (issue 16): ``scripts/bundle`` for this machine's Python 3.6,
then its ``install.sh`` with pip's index off (``--no-index``, none of this machine's pip
settings) into a temp prefix and root, and the installed agent run under 3.6.

Building downloads the wheels (it needs an index, as in CI); installing must not. The
3.6 interpreter comes from ``REMOTE_GEVENT_TEST_PY36`` (its venv's base interpreter is
the system Python the bundle installs onto) or the pyenv 3.6 of these machines.
"""

import glob
import os
import subprocess
import sys
import tarfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WAIT = 300.0

pytestmark = pytest.mark.slow


def system_python36() -> str:
    """A plain CPython 3.6 (not a venv: install.sh makes its own), or skip."""
    candidates = sorted(glob.glob("/root/.pyenv/versions/3.6.*/bin/python3.6"))
    venv_python = os.environ.get("REMOTE_GEVENT_TEST_PY36")
    if venv_python:
        cfg = os.path.join(os.path.dirname(os.path.dirname(venv_python)), "pyvenv.cfg")
        try:
            with open(cfg) as f:
                home = dict(line.split(" = ", 1) for line in f.read().splitlines()
                            if " = " in line).get("home", "")
            candidates.insert(0, os.path.join(home, "python3.6"))
        except OSError:
            candidates.insert(0, venv_python)
    for candidate in candidates + ["/usr/bin/python3.6"]:
        if os.access(candidate, os.X_OK):
            return candidate
    pytest.skip("no Python 3.6 on this machine to install the bundle onto")


def test_bundle_for_python36_installs_offline_and_runs(tmp_path):
    python36 = system_python36()
    out = tmp_path / "dist"
    built = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "bundle"), "--python", "3.6",
         "--platform", "manylinux2014_x86_64", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=WAIT,
        stdin=subprocess.DEVNULL)
    offline = (b"NewConnectionError", b"Temporary failure in name resolution",
               b"Network is unreachable", b"Could not fetch URL")
    if built.returncode != 0 and any(sign in built.stderr for sign in offline):
        pytest.skip("no package index reachable to build the bundle from")
    assert built.returncode == 0, built.stderr.decode(errors="replace")[-3000:]
    tarball = built.stdout.decode().strip().splitlines()[-1]
    assert os.path.basename(tarball).endswith("-py3.6-manylinux2014_x86_64.tar.gz")

    with tarfile.open(tarball) as tar:
        names = tar.getnames()
        tar.extractall(str(tmp_path / "unpacked"))
    wheels = sorted(os.path.basename(n) for n in names if n.endswith(".whl"))
    expected = ["dataclasses-0.8-", "gevent-22.10.2-cp36-", "greenlet-2.0.2-cp36-",
                "PyNaCl-1.5.0-", "paramiko-3.5.1-", "amqp-5.3.1-", "click-8.0.4-",
                "PyYAML-6.0.1-cp36-", "pip-21.3.1-", "remote_gevent-"]
    for prefix in expected:
        assert any(w.startswith(prefix) for w in wheels), (prefix, wheels)
    assert all("manylinux" in w or w.endswith("-none-any.whl") for w in wheels), wheels
    (top,) = os.listdir(str(tmp_path / "unpacked"))
    top = str(tmp_path / "unpacked" / top)

    # Install with no network at all where we may make a network namespace (root),
    # else with every proxy pointing at a closed port; install.sh itself passes
    # --no-index and ignores this machine's pip config (its find-links, its indexes).
    prefix, root = str(tmp_path / "opt"), str(tmp_path / "root")
    env = dict(os.environ, https_proxy="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9")
    env.pop("PYTHONPATH", None)  # the installed package, not this checkout
    isolate = ["unshare", "--net"] if subprocess.run(
        ["unshare", "--net", "true"], stderr=subprocess.DEVNULL).returncode == 0 else []
    done = subprocess.run(isolate + [os.path.join(top, "install.sh"), "--python", python36,
                           "--prefix", prefix, "--root", root], env=env, cwd=str(tmp_path),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=WAIT,
                          stdin=subprocess.DEVNULL)
    log = done.stdout.decode(errors="replace")
    assert done.returncode == 0, log
    config = os.path.join(root, "etc", "alemca", "config.yaml")
    assert "%s: OK ident=device-0001" % config in log, log
    assert os.stat(config).st_mode & 0o777 == 0o600
    init_d = os.path.join(root, "etc", "init.d", "remote-gevent")
    assert os.access(init_d, os.X_OK)
    assert os.readlink(os.path.join(root, "usr", "local", "bin", "remote-gevent")) == \
        os.path.join(prefix, "bin", "remote-gevent")
    unit = os.path.join(REPO, "scripts", "systemd", "remote-gevent.service")
    installed_unit = os.path.join(root, "etc", "systemd", "system", "remote-gevent.service")
    assert os.path.exists(installed_unit) == os.path.exists(unit)
    if os.path.exists(unit):  # pointed at the venv's agent
        with open(installed_unit) as f:
            execs = [line for line in f if line.startswith("ExecStart")]
        assert execs and all(" " in e and e.split("=", 1)[1].lstrip("-@!+:").startswith(
            os.path.join(prefix, "bin", "remote-gevent ")) for e in execs), execs

    # The installed agent runs on 3.6, from the venv, not from this checkout.
    agent = os.path.join(prefix, "bin", "remote-gevent")
    version = subprocess.run([agent, "--version"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, timeout=60, cwd=str(tmp_path))
    assert version.returncode == 0 and b"0." in version.stdout, version.stdout
    check = subprocess.run([agent, "check-config", "--config", config], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60,
                           cwd=str(tmp_path))
    assert check.returncode == 0, check.stdout
    console = subprocess.run([os.path.join(prefix, "bin", "remote-gevent-console"), "devices"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             timeout=60, cwd=str(tmp_path))
    assert console.returncode == 1 and console.stderr.decode().splitlines() == [
        "remote-gevent-console needs Python 3.8 or newer (this is 3.6); only the agent, "
        "remote-gevent, runs on 3.6 and 3.7"], console.stderr
    where = subprocess.run(
        [os.path.join(prefix, "bin", "python"), "-c",
         "import sys, remote_gevent; print('%d.%d' % sys.version_info[:2]); "
         "print(remote_gevent.__file__)"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60,
        cwd=str(tmp_path))  # not the checkout: '' on sys.path would find its package
    py, path = where.stdout.decode().split()
    assert py == "3.6" and path.startswith(prefix), where.stdout
