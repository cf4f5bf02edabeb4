"""TLS contexts verify chain and host name against a real loopback TLS server."""

import socket
import ssl
import threading

import pytest

from remote_gevent.common import tls
from remote_gevent.demo.pki import CertificateAuthority


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    base = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(str(base / "ca"))
    other = CertificateAuthority(str(base / "other"))
    return ca, ca.issue("server", hosts=["localhost", "127.0.0.1"]), other


def _serve_once(ctx):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def accept():
        conn, _ = listener.accept()
        try:
            with ctx.wrap_socket(conn, server_side=True) as tls_conn:
                tls_conn.sendall(b"hi")
        except (ssl.SSLError, OSError):
            pass
        finally:
            listener.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    return listener.getsockname()[1], thread


def _connect(ctx, port, host):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=host) as conn:
            return conn.recv(2)


def test_verified_connection(pki):
    ca, server, _ = pki
    port, thread = _serve_once(tls.server_context(server.cert_file, server.key_file))
    assert _connect(tls.client_context(ca.cert_file), port, "localhost") == b"hi"
    thread.join(5)


# What a failed check raises: SSLCertVerificationError from Python 3.7; on 3.6 an SSLError
# for the chain and a CertificateError (a ValueError) for the host name. The product
# recognises all of them with tls.is_verify_error (issue 16).
VERIFY_ERRORS = tls.HANDSHAKE_ERRORS


def test_wrong_ca_is_refused_and_described(pki):
    _, server, other = pki
    port, thread = _serve_once(tls.server_context(server.cert_file, server.key_file))
    with pytest.raises(VERIFY_ERRORS) as info:
        _connect(tls.client_context(other.cert_file), port, "localhost")
    assert tls.is_verify_error(info.value)
    assert "wrong CA" in tls.describe_verify_error(info.value)
    thread.join(5)


def test_wrong_host_name_is_refused_and_described(pki):
    ca, server, _ = pki
    port, thread = _serve_once(tls.server_context(server.cert_file, server.key_file))
    with pytest.raises(VERIFY_ERRORS) as info:
        _connect(tls.client_context(ca.cert_file), port, "broker.example.net")
    assert tls.is_verify_error(info.value)
    assert "host name mismatch" in tls.describe_verify_error(info.value)
    thread.join(5)


def test_unreadable_ca_names_the_file(tmp_path):
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(tls.TLSConfigError, match="nope.pem"):
        tls.client_context(missing)


def test_issued_key_is_private(pki):
    import os
    import stat
    _, server, _ = pki
    assert stat.S_IMODE(os.stat(server.key_file).st_mode) == 0o600


@pytest.mark.parametrize("name, why", [("relay.example.net", "host name mismatch"),
                                       (None, "wrong CA")])
def test_relay_dial_turns_a_failed_check_into_relay_error(pki, name, why):
    """The agent's relay dial reports a certificate that does not verify as RelayError
    ``tls`` on every Python: on 3.6 a host-name mismatch is a ValueError
    (``ssl.CertificateError``) that escaped the dial and its session (issue 16)."""
    from remote_gevent.wire import rendezvous

    ca, server, other = pki
    port, thread = _serve_once(tls.server_context(server.cert_file, server.key_file))
    trusted = ca if name else other
    with pytest.raises(rendezvous.RelayError) as info:
        rendezvous.dial_relay("127.0.0.1", port, tls.client_context(trusted.cert_file),
                              name or "localhost", "agent", "0" * 32, bytes(32), timeout=5)
    assert info.value.code == "tls" and why in str(info.value), str(info.value)
    thread.join(5)


def test_amqp_link_turns_a_host_name_mismatch_into_tls_verify_error(pki):
    """The AMQP link's TLS handshake (before any AMQP byte) against a certificate for
    another name: TLSVerifyError naming the mismatch on every Python, not a ValueError
    escaping the link on 3.6 (issue 16)."""
    from remote_gevent.common.amqplink import AmqpLink, TLSVerifyError

    ca, _, _ = pki
    elsewhere = ca.issue("elsewhere", hosts=["broker.example.net"])
    port, thread = _serve_once(tls.server_context(elsewhere.cert_file, elsewhere.key_file))
    link = AmqpLink(["amqps://127.0.0.1:%d/" % port], "dev", "secret", ca_file=ca.cert_file,
                    connect_timeout=5.0, reconnect_max_delay=1.0)
    with pytest.raises(TLSVerifyError, match="host name mismatch"):
        link.connect()
    thread.join(5)
