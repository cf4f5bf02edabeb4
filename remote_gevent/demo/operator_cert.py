"""The demo platform's operator certificate (issue 14): what an administrator does with
stock ``ssh-keygen``, done for ``scripts/demo``.

- a CA key ``DIR/pki/operator_ca`` (made once, reused);
- the device trusts the CA, not the operator key: ``agent/authorized_keys`` holds
  ``cert-authority,principals="demo-fleet" <CA> demo-operator-ca``;
- the operator's certificate ``DIR/operator_ed25519-cert.pub`` (``ssh-keygen -s``, principal
  ``demo-fleet``, valid from 5 minutes ago for 12 hours, serial = the time), found beside
  the key by the console as ``ssh`` finds it;
- an empty KRL ``agent/revoked_keys`` (``remote.revoked_keys``) to revoke into.

Without ``ssh-keygen`` on the machine, or with ``REMOTE_GEVENT_DEMO_PLAIN_KEY=1`` in the
environment, the demo keeps the plain operator key in ``authorized_keys``.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from typing import Any

log = logging.getLogger(__name__)

FLEET_PRINCIPAL = "demo-fleet"
VALIDITY = "-5m:+12h"
KEYGEN_TIMEOUT = 30.0
PLAIN_KEY_ENV = "REMOTE_GEVENT_DEMO_PLAIN_KEY"


def _keygen(*args: str) -> None:
    subprocess.run(["ssh-keygen", "-q", *args], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE, timeout=KEYGEN_TIMEOUT)


def issue_demo_certificate(platform: Any) -> bool:
    """Set ``platform`` (a prepared ``DemoPlatform``) up with a CA and an operator
    certificate; False (plain key kept) when ``ssh-keygen`` is missing or the environment
    asks for a plain key."""
    if os.environ.get(PLAIN_KEY_ENV) == "1":
        return False
    if shutil.which("ssh-keygen") is None:
        log.warning("ssh-keygen not found: the demo operator uses a plain key")
        return False
    ca = os.path.join(platform.pki_dir, "operator_ca")
    if not os.path.exists(ca):
        _keygen("-t", "ed25519", "-N", "", "-C", "demo-operator-ca", "-f", ca)
    _keygen("-s", ca, "-I", "%s@demo-platform" % platform.operator, "-n", FLEET_PRINCIPAL,
            "-V", VALIDITY, "-z", str(int(time.time())), platform.operator_key_path + ".pub")
    with open(ca + ".pub", encoding="ascii") as f:
        ca_line = f.read().strip()
    _write(platform.authorized_keys,
           'cert-authority,principals="%s" %s\n' % (FLEET_PRINCIPAL, ca_line))
    revoked = os.path.join(platform.agent_dir, "revoked_keys")
    if not os.path.exists(revoked):
        _keygen("-k", "-f", revoked)
        os.chmod(revoked, 0o600)
    platform.remote_overrides.setdefault("revoked_keys", revoked)
    platform.remote_overrides.setdefault(
        "fleet_revocation_path", os.path.join(platform.agent_dir, "fleet_revocation.json"))
    return True


def _write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
