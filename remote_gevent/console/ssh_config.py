"""OpenSSH client lines for devices (``ssh-config``; the ssh/sftp lines the demo prints).

Why ``HostKeyAlias``: ``ssh DEVICE`` reaches the device's sshd (its host key) while
``sftp`` to ``@sftp`` reaches the agent's SFTP server, which presents the device's
identity key. Both go to "host" ``DEVICE``, so without an alias they share one
``known_hosts`` entry and the second one fails with "REMOTE HOST IDENTIFICATION HAS
CHANGED". Each (server id, device, target) gets its own alias, hence its own entry; the
alias names the platform too, so a staging and a production device of the same name do
not clash either.

Why ``--master auto`` in the ProxyCommand: the first connection starts a background
master (docs/console.md, "Session reuse") and later ones ride its session, like
OpenSSH's ControlMaster/ControlPersist, without a new session request each time.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from typing import Any, List, Sequence

PROG = "remote-gevent-console"
DEFAULT_SSH_TARGET = "127.0.0.1:22"
SFTP_TARGET = "@sftp"
SFTP_SUFFIX = "-sftp"


def host_key_alias(server_id: str, device: str, target: str = DEFAULT_SSH_TARGET) -> str:
    """The known_hosts name of ``target`` on ``device``: one per (platform, device, target)."""
    base = "%s.%s.remote-gevent" % (device, server_id)
    if target == DEFAULT_SSH_TARGET:
        return base
    if target == SFTP_TARGET:
        return base + SFTP_SUFFIX
    return "%s-%s" % (base, re.sub(r"[^A-Za-z0-9.-]", "-", target).strip("-"))


def console_argv() -> List[str]:
    """How to run this console from a shell: the installed script, else ``python -m``."""
    found = shutil.which(PROG)
    if found:
        return [found]
    return [sys.executable, "-m", "remote_gevent.console.cli"]


def _ssh_escape(text: str) -> str:
    return text.replace("%", "%%")  # ProxyCommand expands %-tokens


def proxy_command(config_path: str, device: str, target: str, master: str = "auto",
                  argv: Sequence[str] = ()) -> str:
    """The ProxyCommand running ``stdio`` to ``target`` on ``device`` (shell-quoted)."""
    words = list(argv or console_argv()) + ["-c", os.path.abspath(config_path), "stdio"]
    if master != "use":
        words += ["--master", master]
    return " ".join(_ssh_escape(shlex.quote(w)) for w in words + [device, target])


def host_block(cfg: Any, device: str, user: str = "", target: str = DEFAULT_SSH_TARGET,
               master: str = "auto", argv: Sequence[str] = ()) -> str:
    """``Host DEVICE`` (its sshd) and ``Host DEVICE-sftp`` (the agent's SFTP server)."""
    lines = ["# remote-gevent device %s/%s (console config %s)"
             % (cfg.server_id, device, os.path.abspath(cfg.path))]
    for host, tgt, login in ((device, target, user), (device + SFTP_SUFFIX, SFTP_TARGET, "")):
        lines += ["Host %s" % host,
                  "    HostName %s" % device,
                  "    HostKeyAlias %s" % host_key_alias(cfg.server_id, device, tgt),
                  "    ProxyCommand %s" % proxy_command(cfg.path, device, tgt, master, argv)]
        if login:
            lines.append("    User %s" % login)
        lines.append("")
    return "\n".join(lines)


def ssh_config(cfg: Any, devices: Sequence[str], user: str = "",
               target: str = DEFAULT_SSH_TARGET, master: str = "auto",
               argv: Sequence[str] = ()) -> str:
    """The ``~/.ssh/config`` text for ``devices`` (``ssh-config``)."""
    return "\n".join(host_block(cfg, d, user, target, master, argv) for d in devices)
