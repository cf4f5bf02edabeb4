"""A private certificate authority for the demo platform and the test suite.

Real deployments bring their own PKI; here we only need a CA and a few
server certificates for 127.0.0.1 / localhost so that TLS is verified exactly
as in production (chain *and* host name), never switched off.
"""

import datetime
import ipaddress
import os
from typing import Iterable, List, NamedTuple, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from remote_gevent.common import fsutil

VALIDITY = datetime.timedelta(days=825)
# Backdate a little so a clock that is slightly behind still accepts the certificate.
BACKDATE = datetime.timedelta(hours=1)


class Issued(NamedTuple):
    cert_file: str
    key_file: str


def _write_private(path: str, data: bytes) -> None:
    fsutil.write_atomic(path, data, 0o600)


def _write_public(path: str, data: bytes) -> None:
    fsutil.write_atomic(path, data, 0o644)

def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "remote-gevent demo"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


class CertificateAuthority:
    """A CA whose certificate and key live in ``directory`` (created on first use)."""

    def __init__(self, directory: str, name: str = "remote-gevent demo CA") -> None:
        self.directory = directory
        self.cert_file = os.path.join(directory, "ca.pem")
        self.key_file = os.path.join(directory, "ca.key")
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if os.path.exists(self.cert_file) and os.path.exists(self.key_file):
            with open(self.key_file, "rb") as f:
                loaded = serialization.load_pem_private_key(f.read(), password=None)
            if not isinstance(loaded, ec.EllipticCurvePrivateKey):
                raise ValueError("%s: not the EC key this CA writes" % self.key_file)
            self._key = loaded
            with open(self.cert_file, "rb") as f:
                self._cert = x509.load_pem_x509_certificate(f.read())
        else:
            self._key, self._cert = self._create(name)

    def _create(self, name: str) -> Tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = _name(name)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - BACKDATE)
            .not_valid_after(_now() + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        _write_private(self.key_file, _key_pem(key))
        _write_public(self.cert_file, cert.public_bytes(serialization.Encoding.PEM))
        return key, cert

    def issue(self, name: str, hosts: Iterable[str] = ("localhost", "127.0.0.1", "::1"),
              client: bool = False) -> Issued:
        """Issue a certificate for ``hosts`` (DNS names or IP addresses) into the CA dir.

        Files are ``<name>.pem`` and ``<name>.key`` (0600). Server certificates carry
        the serverAuth usage; ``client=True`` adds clientAuth for mutual TLS.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        hosts = list(hosts)
        sans: List[x509.GeneralName] = []
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        usages = [ExtendedKeyUsageOID.SERVER_AUTH]
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(hosts[0] if hosts else name))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - BACKDATE)
            .not_valid_after(_now() + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        issued = Issued(
            os.path.join(self.directory, name + ".pem"),
            os.path.join(self.directory, name + ".key"),
        )
        _write_private(issued.key_file, _key_pem(key))
        _write_public(issued.cert_file, cert.public_bytes(serialization.Encoding.PEM))
        return issued
