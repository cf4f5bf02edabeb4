"""The demo platform's start-up banner: where everything is, and the commands to try.

Every command line it prints is run by ``tests/test_docs_commands.py`` against a
platform (placeholders: ``SESSION_ID``, ``./some-file``), so keep them runnable.
"""

from __future__ import annotations

import os
import shlex
import shutil
from typing import Any, List, Tuple

from remote_gevent.console.ssh_config import host_key_alias
from remote_gevent.demo.processes import entry_argv
from remote_gevent.demo.relays import relay_log

#: The demo's server id (the only one the agent supports).
SERVER_ID = "fr04"

#: The banner's last line when attached; ``--detach`` cuts it (no Ctrl-C there).
ATTACHED_HINT = "Ctrl-C"

#: The banner's first words (``--detach`` finds the banner in the supervisor's log).
BANNER_START = "remote-gevent demo platform is up in"

#: Where a command line ends and its explanation starts, in :func:`usage`.
COMMENT = "  # "


def console_command(console_config: str) -> str:
    """``remote-gevent-console -c CONFIG`` (the installed script, else ``python -m``)."""
    console = "remote-gevent-console"
    if shutil.which(console) is None:
        console = " ".join(shlex.quote(a) for a in entry_argv(
            "remote-gevent-console", "remote_gevent.console.cli"))
    return "%s -c %s" % (console, shlex.quote(console_config))


def _commands(c: str, ident: str, files_dir: str) -> List[Tuple[str, str]]:
    proxy = lambda target: shlex.quote("%s stdio %%n %s" % (c, target))  # noqa: E731
    # Each line names its own HostKeyAlias: ssh meets sshd's key and sftp the device's
    # identity key, which must not clash under one host name in known_hosts (issue 15).
    return [
        ("ssh -o HostKeyAlias=%s -o ProxyCommand=%s %s@%s" % (
            host_key_alias(SERVER_ID, ident), proxy("127.0.0.1:22"),
            os.environ.get("USER", "root"), ident), ""),
        ("%s forward %s -L 2222:127.0.0.1:22" % (c, ident), "then: ssh -p 2222 127.0.0.1"),
        ("%s socks %s -D 1080" % (c, ident),
         "then: curl --socks5-hostname 127.0.0.1:1080 http://127.0.0.1:8000/"),
        ("%s push %s ./some-file %s/some-file" % (c, ident, files_dir),
         "--overwrite replaces, --resume continues"),
        ("%s pull %s %s/some-file ./copy" % (c, ident, files_dir),
         "an existing ./copy needs --overwrite"),
        ("sftp -o HostKeyAlias=%s -o ProxyCommand=%s x@%s" % (
            host_key_alias(SERVER_ID, ident, "@sftp"), proxy("@sftp"), ident),
         "starts in the root"),
        ("", ""),
        ("%s devices" % c, "state, last alive, key fingerprint"),
        ("%s watch" % c, "follows ONLINE/OFFLINE changes as they happen"),
        ("%s sessions %s" % (c, ident), "what is open on the device"),
        ("%s close %s SESSION_ID" % (c, ident), "a SESSION_ID from sessions"),
        ("%s master %s --persist 600" % (c, ident), "stdio/ssh/sftp then reuse its session"),
        ("%s master %s --stop" % (c, ident), "ends it"),
    ]


def usage(p: Any) -> str:
    """The banner of the running platform ``p`` (a DemoPlatform)."""
    c = console_command(p.console_config)
    pids = dict(p.pids())
    lines = [
        "%s %s" % (BANNER_START, p.dir),
        "  broker  %s  (private RabbitMQ node, logs in %s/rabbit/log)" % (p.broker_url, p.dir),
    ] + ([
        "  relays  %s  (round robin over %d relays routing by session id, pid %s, log %s)"
        % (p.relay_address, p.relay_count, pids.get("balancer", "-"),
           os.path.join(p.dir, "balancer.log")),
        "  relay   127.0.0.1:%d  (pid %s, log %s; pool, issue 13)"
        % (p.pool_ports[0], pids.get("relay", "-"), p.relay_log),
    ] if p.routed else [
        "  relay   %s  (pid %s, log %s)" % (p.relay_address, pids.get("relay", "-"),
                                            p.relay_log),
    ]) + [
        "  relay   127.0.0.1:%d  (pid %s, log %s; pool, issue 13)"
        % (port, pids.get("relay%d" % (i + 2), "-"), relay_log(p.dir, i + 1))
        for i, port in enumerate(p.extra_relay_ports)
    ] + [
        "  agent   device %r (pid %s, log %s, history %s)"
        % (p.ident, pids.get("agent", "-"), p.agent_log, p.history_path),
        "  files   %s (transfer root, read-write, --overwrite allowed)" % p.files_dir,
        "",
        "Try (any user/password of this machine's sshd; the tunnel ends at 127.0.0.1):",
    ]
    for cmd, note in _commands(c, p.ident, p.files_dir):
        lines.append(("  " + cmd + COMMENT + note) if note else ("  " + cmd).rstrip())
    return "\n".join(lines)


def detached_banner(log_text: str) -> str:
    """The banner as the attached supervisor logged it, minus its "Ctrl-C tears it all
    down" line, which is not true of a detached platform (``--stop`` is the way); "" until
    that last line is logged (the banner is complete)."""
    start = log_text.rfind(BANNER_START)
    if start < 0 or "\n" + ATTACHED_HINT not in log_text[start:]:
        return ""  # not (completely) printed yet
    return log_text[start:].split("\n" + ATTACHED_HINT, 1)[0].rstrip()


def banner_commands(text: str) -> List[str]:
    """The command lines of a banner (what a user would paste), comments removed."""
    out = []
    for line in text.splitlines():
        if not line.startswith("  ") or line.startswith("   ") or line.strip() == "":
            continue
        cmd = line.strip().split(COMMENT.strip(), 1)[0].rstrip() if COMMENT in line \
            else line.strip()
        if cmd.split(" ", 1)[0] in ("broker", "relay", "agent", "files"):
            continue
        out.append(cmd)
    return out
