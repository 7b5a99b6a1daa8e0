"""A real federation's keys and certificates (``fedsynth keys``), written in Python with the
``cryptography`` package Flower itself uses, so no ``openssl``/``ssh-keygen`` step can go wrong.

What it writes into one new folder:

- ``ca.crt`` / ``ca.key``: a certificate authority of this federation (keep ``ca.key`` offline);
- ``server.pem`` / ``server.key``: the SuperLink's TLS certificate, signed by that CA, whose
  subject alternative name is the SuperLink's host name or IP (what TLS checks);
- ``node-<i>.key`` / ``node-<i>.pub``: one ECDSA P-384 key pair per data holder in OpenSSH
  format (what ``flower-supernode --auth-supernode-private-key`` and
  ``flwr supernode register`` read).

Private keys are written with mode 0600, everything else follows the umask.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedsynth.core.errors import FedsynthError
from fedsynth.core.rundir import write_bytes_atomic

PRIVATE = 0o600


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _alt_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _certificate(subject, issuer, key, signer, days: int, extensions) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signer, hashes.SHA256())


def write_keys(folder: Path, hosts: list[str], nodes: int, days: int = 365) -> list[Path]:
    """Write the CA, the SuperLink's certificate for ``hosts`` and ``nodes`` node key pairs
    into ``folder`` (new or empty); the paths written."""
    if nodes < 1:
        raise FedsynthError(f"--nodes = {nodes}: a federation needs at least one node")
    if not hosts or not all(h.strip() for h in hosts):
        raise FedsynthError("--host: give the SuperLink's host name or IP (repeat for several)")
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise FedsynthError(f"{folder} already exists and is not an empty folder; keys are never overwritten")
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, server_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca = _certificate(
        _name("fedsynth federation CA"),
        _name("fedsynth federation CA"),
        ca_key,
        ca_key,
        days,
        [(x509.BasicConstraints(ca=True, path_length=0), True)],
    )
    server = _certificate(
        _name(hosts[0]),
        ca.subject,
        server_key,
        ca_key,
        days,
        [
            (x509.SubjectAlternativeName([_alt_name(h) for h in hosts]), False),
            (x509.BasicConstraints(ca=False, path_length=None), True),
        ],
    )
    pem = serialization.Encoding.PEM
    files = {
        "ca.crt": (ca.public_bytes(pem), None),
        "ca.key": (_pem_key(ca_key), PRIVATE),
        "server.pem": (server.public_bytes(pem), None),
        "server.key": (_pem_key(server_key), PRIVATE),
    }
    for i in range(nodes):
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(pem, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
        ssh = serialization.Encoding.OpenSSH
        public = key.public_key().public_bytes(ssh, serialization.PublicFormat.OpenSSH)
        files[f"node-{i}.key"] = (private, PRIVATE)
        files[f"node-{i}.pub"] = (public + f" fedsynth-node-{i}\n".encode(), None)
    written = []
    for name, (data, mode) in files.items():
        path = folder / name
        write_bytes_atomic(path, data, mode)
        written.append(path)
    return written
