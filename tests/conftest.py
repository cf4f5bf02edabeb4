# The product runs monkey-patched; so do the in-process tests.
from gevent import monkey

monkey.patch_all()

# ruff: noqa: E402  (imports must follow the monkey patch)
import itertools
import secrets
from typing import TYPE_CHECKING, Any, List, NamedTuple, Optional

import pytest

if TYPE_CHECKING:
    # The demo platform is Python 3.8+; the agent's tier of the suite runs on 3.6 and 3.7
    # (issue 16), so the fixtures that need it import it when they run.
    from remote_gevent.demo import rabbit as demo_rabbit
    from remote_gevent.demo.pki import CertificateAuthority

# A test that uses one of these fixtures needs RabbitMQ: marked ``broker`` so that
# ``./scripts/test -m "not broker and not e2e"`` runs the fast tier without it.
BROKER_FIXTURES = frozenset({"rabbit", "own_rabbit", "device", "operator"})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if BROKER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.broker)


TEST_VHOST = "rg/test"  # a "/" inside on purpose: exercises URL-encoding of the vhost
SERVER_ID = "fr04"


class Device(NamedTuple):
    ident: str
    token: str
    server_id: str
    topic: str  # remote.<server_id>.<ident>
    url: str  # amqps URL of the test vhost
    ca_file: str


class Operator(NamedTuple):
    user: str
    password: str
    url: str
    ca_file: str


class RabbitFixture:
    """The session's private TLS broker and provisioning helpers (unique names per call)."""

    def __init__(self, node: "demo_rabbit.RabbitNode", ca: "CertificateAuthority",
                 vhost: str = TEST_VHOST) -> None:
        self.node = node
        self.ca = ca
        self.ca_file = ca.cert_file
        self.vhost = vhost
        self._seq = itertools.count(1)

    def amqps_url(self, vhost: Optional[str] = None, host: Optional[str] = None) -> str:
        return self.node.amqps_url(self.vhost if vhost is None else vhost, host=host)

    def _unique(self, prefix: str) -> str:
        return "%s-%d-%s" % (prefix, next(self._seq), secrets.token_hex(3))

    def new_devices(self, count: int, prefix: str = "dev",
                    server_id: str = SERVER_ID) -> List[Device]:
        devices = [
            Device(ident, secrets.token_urlsafe(18), server_id,
                   "remote.%s.%s" % (server_id, ident), self.amqps_url(), self.ca_file)
            for ident in (self._unique(prefix) for _ in range(count))
        ]
        self.node.add_devices(self.vhost, [(d.ident, d.token, d.server_id) for d in devices])
        return devices

    def new_device(self, prefix: str = "dev", server_id: str = SERVER_ID) -> Device:
        return self.new_devices(1, prefix, server_id)[0]

    def new_operator(self, prefix: str = "op") -> Operator:
        user = self._unique(prefix)
        password = secrets.token_urlsafe(18)
        self.node.add_operator(self.vhost, user, password)
        return Operator(user, password, self.amqps_url(), self.ca_file)

    def admin(self) -> Operator:
        """The node's administrator: for tests of link mechanics, not of permissions."""
        return Operator(self.node.admin_user, self.node.admin_password, self.amqps_url(),
                        self.ca_file)

    def link(self, who: Any, **kwargs: Any):
        """An AmqpLink for a Device or an Operator (not started)."""
        from remote_gevent.common.amqplink import AmqpLink

        userid = who.ident if isinstance(who, Device) else who.user
        password = who.token if isinstance(who, Device) else who.password
        kwargs.setdefault("connect_timeout", 5.0)
        kwargs.setdefault("reconnect_max_delay", 5.0)
        return AmqpLink([kwargs.pop("url", who.url)], userid, password,
                        ca_file=kwargs.pop("ca_file", who.ca_file), **kwargs)


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    """The suite's CA with a broker certificate for localhost and 127.0.0.1."""
    from remote_gevent.demo.pki import CertificateAuthority

    ca = CertificateAuthority(str(tmp_path_factory.mktemp("pki")))
    return ca, ca.issue("broker", ["localhost", "127.0.0.1"])


@pytest.fixture(scope="session")
def rabbit(tmp_path_factory, pki):
    """One private TLS RabbitMQ node for the whole run (≈5 s to boot), torn down at the end."""
    from remote_gevent.demo import rabbit as demo_rabbit

    if not demo_rabbit.available():
        pytest.skip("RabbitMQ is not installed (%s missing): the real-broker tests need it"
                    % demo_rabbit.RABBITMQ_SERVER)
    ca, broker = pki
    node = demo_rabbit.RabbitNode(
        str(tmp_path_factory.mktemp("rabbit")), amqp_port=0, ca_file=ca.cert_file,
        cert_file=broker.cert_file, key_file=broker.key_file)
    node.start()
    try:
        node.declare_platform(TEST_VHOST)
        yield RabbitFixture(node, ca)
    finally:
        node.stop()


@pytest.fixture
def own_rabbit(tmp_path, pki):
    """A private TLS node of this test's own, for tests that restart the broker."""
    from remote_gevent.demo import rabbit as demo_rabbit

    ca, broker = pki
    node = demo_rabbit.RabbitNode(str(tmp_path / "node"), ca_file=ca.cert_file,
                                  cert_file=broker.cert_file, key_file=broker.key_file)
    node.start()
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture
def device(rabbit) -> Device:
    """A freshly provisioned device (ident, token, topic, url, ca_file) on the test vhost."""
    return rabbit.new_device()


@pytest.fixture
def operator(rabbit) -> Operator:
    """A freshly provisioned operator (console) user on the test vhost."""
    return rabbit.new_operator()
