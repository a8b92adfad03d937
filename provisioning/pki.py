"""The fleet's keys and certificates: an X.509 CA and the broker's TLS certificate, and the
Ed25519 key pairs that sign updates and global models (docs/security-signing.md).

`cryptography` is imported on first use: a plain-TCP, keyless fleet is provisioned without it.
Ed25519 key pairs come from the one generator, fleetlearn.edge_runtime.core.signing.new_key_pair
(what the aggregator and `flash --new-signing-key` use too).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from fleetlearn.provisioning.errors import BrokerConfigError
from fleetlearn.provisioning.layout import CredentialsLayout
from fleetlearn.provisioning.spec import is_ip

CA_DAYS = 3650
SERVER_CERT_DAYS = 825
CLOCK_SKEW_DAYS = 1  # certificates start a day early: device clocks before NTP sync are often behind

WriteFile = Callable[..., None]  # (path, data, mode)


# ---------------------------------------------------------------- Ed25519 signing keys


def new_signing_key_pair(what: str = "--signing-keys") -> tuple[bytes, bytes]:
    """A fresh Ed25519 key pair as (private PKCS#8 PEM, public SubjectPublicKeyInfo PEM)."""
    from fleetlearn.edge_runtime.core.errors import ConfigError

    try:
        from fleetlearn.edge_runtime.core.signing import new_key_pair
    except ConfigError:
        raise BrokerConfigError(f"{what} needs the `cryptography` package: pip install 'fleetlearn[server]'") from None
    return new_key_pair()


def write_fleet_signing_keys(layout: CredentialsLayout, devices: Iterable[str], write_file: WriteFile) -> None:
    """For `broker-config --signing-keys`: every device's key pair and the aggregator's (the
    paths are CredentialsLayout's: devices/<id>/signing.key|.pub, aggregator/signing.key|.pub,
    aggregator/device-keys/<id>.pub). Private keys 0600, public keys 0644."""
    private, public = new_signing_key_pair()
    write_file(layout.aggregator_signing_key, private, 0o600)
    write_file(layout.aggregator_signing_pub, public, 0o644)
    for device in devices:
        private, public = new_signing_key_pair()
        write_file(layout.device_signing_key(device), private, 0o600)
        write_file(layout.device_signing_pub(device), public, 0o644)
        write_file(layout.device_key_registration(device), public, 0o644)


# ---------------------------------------------------------------- TLS


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: bytes
    ca_key: bytes
    server_cert: bytes
    server_key: bytes


def make_tls_files(fleet: str, hosts: tuple[str, ...]) -> TlsFiles:
    """A P-256 CA for this fleet and a server certificate it signs (SANs: hosts + 127.0.0.1).

    ECDSA P-256 rather than Ed25519: every OpenSSL 1.1+/3 mosquitto and every Python `ssl`
    (paho) accepts P-256 server certificates; Ed25519 ones are not universally supported by TLS stacks."""
    try:
        from cryptography.hazmat.primitives.asymmetric import ec
    except ImportError:
        raise BrokerConfigError("--tls needs the `cryptography` package: pip install 'fleetlearn[server]'") from None
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _ca_certificate(ca_key, fleet)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _server_certificate(server_key, ca_key, ca_cert, hosts)
    return TlsFiles(_cert_pem(ca_cert), _key_pem(ca_key), _cert_pem(server_cert), _key_pem(server_key))


def _validity(days: int):
    import datetime as dt

    now = dt.datetime.now(dt.UTC)
    return now - dt.timedelta(days=CLOCK_SKEW_DAYS), now + dt.timedelta(days=days)


def _ca_certificate(key, fleet: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fleetlearn"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"fleetlearn {fleet} CA"),
        ]
    )
    start, end = _validity(CA_DAYS)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        # path_length=0: this CA signs broker certificates only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def _server_certificate(key, ca_key, ca_cert, hosts: tuple[str, ...]):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    sans: list[x509.GeneralName] = []
    for host in (*hosts, "127.0.0.1"):
        entry = x509.IPAddress(ipaddress.ip_address(host)) if is_ip(host) else x509.DNSName(host)
        if entry not in sans:
            sans.append(entry)
    start, end = _validity(SERVER_CERT_DAYS)
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def _key_usage(ca: bool):
    """A CA signs certificates (and CRLs); an ECDSA server key only signs the TLS handshake."""
    from cryptography import x509

    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _cert_pem(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
