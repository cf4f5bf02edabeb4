"""Every entry point patches the stdlib before socket users (ssl, amqp, paramiko) load.

Each check runs in a clean interpreter with an import hook that records, at the
first import of each watched module, whether gevent had already patched ``socket``.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_POINTS = {
    "remote_gevent.agent.cli": "remote_gevent/agent/cli.py",
    "remote_gevent.relay.cli": "remote_gevent/relay/cli.py",
    "remote_gevent.console.cli": "remote_gevent/console/cli.py",
}

AUDIT = textwrap.dedent(r"""
    import importlib, json, sys

    WATCH = ("ssl", "amqp", "paramiko", "http.client", "urllib.request")
    seen = {}

    def patched():
        mon = sys.modules.get("gevent.monkey")
        return bool(mon and mon.is_module_patched("socket"))

    class Audit:
        def find_spec(self, name, path=None, target=None):
            if name in WATCH and name not in seen:
                seen[name] = patched()
            return None

    sys.meta_path.insert(0, Audit())
    preloaded = sorted(m for m in WATCH if m in sys.modules)
    importlib.import_module(sys.argv[1])
    # Whatever the entry point loads lazily later must also find socket patched.
    for extra in ("amqp", "paramiko"):
        importlib.import_module(extra)
    import socket, gevent.socket
    print(json.dumps({
        "preloaded": preloaded,
        "seen": seen,
        "socket_is_gevent": socket.socket is gevent.socket.socket,
        "patched": patched(),
    }))
""")


def audit(module, cwd=REPO):
    env = dict(os.environ)
    env.pop("PYTHONSTARTUP", None)
    r = subprocess.run([sys.executable, "-c", AUDIT, module],
                       capture_output=True, text=True, timeout=60, cwd=cwd, env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", sorted(ENTRY_POINTS))
def test_entry_point_patches_first(module):
    if not os.path.exists(os.path.join(REPO, ENTRY_POINTS[module])):
        pytest.skip("%s does not exist yet" % ENTRY_POINTS[module])
    result = audit(module)
    assert result["preloaded"] == [], result
    assert result["patched"] and result["socket_is_gevent"], result
    assert result["seen"].get("amqp") is True and result["seen"].get("paramiko") is True
    late = {name: ok for name, ok in result["seen"].items() if not ok}
    assert not late, "imported before monkey.patch_all(): %s" % sorted(late)


def test_audit_detects_late_patching(tmp_path):
    """The audit can fail: a module importing ssl before patching is caught."""
    (tmp_path / "late_patch.py").write_text(
        "import ssl\nfrom gevent import monkey\nmonkey.patch_all()\n")
    result = audit("late_patch", cwd=str(tmp_path))
    assert result["seen"]["ssl"] is False


def test_package_init_imports_nothing():
    r = subprocess.run([sys.executable, "-c",
                        "import sys; import remote_gevent; "
                        "print(sorted(m for m in ('gevent', 'socket', 'ssl') "
                        "if m in sys.modules and m != 'socket'))"],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
