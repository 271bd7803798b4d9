"""The operator's keys and certificates (`fedrec certs`), with `cryptography`.

One folder (the CA folder) holds, all written owner-only (0600):
  ca.key, ca.crt              the TLS certificate authority (ECDSA P-384, self-signed)
  server.key, server.crt      the SuperLink's TLS certificate, with the names and addresses
                              devices reach it by as subject alternative names
  enrolment-ca.key/.pub       the secure-aggregation enrolment CA (ed25519; shared/secagg/identity.py):
                              keep its private half away from the aggregation server, which
                              could otherwise enrol devices of its own
  devices/NAME/               one device's kit: auth.key/.pub (its SuperNode authentication key,
                              ECDSA P-384 in OpenSSH format, as Flower 1.41 requires; the server
                              registers auth.pub), credentials.device (its enrolment), ca.crt
Checks (`check_certificate`) say in one line what is wrong: expired, not yet valid, issued by
another CA, a host it does not name, a key that is not its own.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.errors import UserFileError

CURVE = ec.SECP384R1()


class CertificateError(UserFileError):
    """A certificate or key that cannot be used; the message names the file and the fix."""


def write_private(path: Path, data: bytes) -> None:
    """Owner-only from the first byte (created 0600, never chmod-ed after), and never over an
    existing file: replacing a CA or a key silently would orphan everything signed with it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise CertificateError(f"{path}: already there; refusing to replace it (move it away first)") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedrec"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def make_ca(folder: Path, days: int = 3650, name: str = "fedrec CA") -> None:
    """The TLS CA and the enrolment CA."""
    from shared.secagg.identity import EnrolmentCA
    folder = Path(folder)
    key = ec.generate_private_key(CURVE)
    start = _now() - dt.timedelta(minutes=5)   # a device clock a little behind still accepts it
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA384()))
    write_private(folder / "ca.key", _pem_key(key))
    write_private(folder / "ca.crt", cert.public_bytes(serialization.Encoding.PEM))
    enrolment = EnrolmentCA.new()
    write_private(folder / "enrolment-ca.key", enrolment.private)
    write_private(folder / "enrolment-ca.pub", enrolment.public)


def _load_ca(folder: Path) -> tuple:
    folder = Path(folder)
    try:
        key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), None)
        cert = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
    except FileNotFoundError as err:
        raise CertificateError(f"{err.filename}: missing; make the CA first with `fedrec certs ca --out {folder}`") from None
    except ValueError as err:
        raise CertificateError(f"{folder}: the CA's key or certificate does not parse ({err})") from None
    return key, cert


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def server_certificate(folder: Path, hosts: list[str], days: int = 825) -> None:
    """The SuperLink's certificate, naming every host or address a device dials (TLS checks the
    name it dialled against these)."""
    if not hosts:
        raise CertificateError("a server certificate needs at least one --host (the name or address devices dial)")
    ca_key, ca_cert = _load_ca(folder)
    key = ec.generate_private_key(CURVE)
    start = _now() - dt.timedelta(minutes=5)
    end = min(start + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(_san(hosts), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA384()))
    write_private(Path(folder) / "server.key", _pem_key(key))
    write_private(Path(folder) / "server.crt", cert.public_bytes(serialization.Encoding.PEM))


def device_kit(folder: Path, name: str) -> Path:
    """One device's keys: its SuperNode authentication key pair, its enrolment credentials, and
    the CA certificate it checks the server against. Returns the kit's folder."""
    from shared.secagg.identity import EnrolmentCA
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name or ""):
        raise CertificateError(f"device name {name!r}: use letters, digits, '-' or '_'")
    folder = Path(folder)
    kit = folder / "devices" / name
    if kit.exists():
        raise CertificateError(f"{kit}: a device of that name already has keys")
    _load_ca(folder)
    try:
        enrolment = EnrolmentCA((folder / "enrolment-ca.key").read_bytes(), (folder / "enrolment-ca.pub").read_bytes())
    except FileNotFoundError as err:
        raise CertificateError(f"{err.filename}: missing (the enrolment CA is made by `fedrec certs ca`)") from None
    key = ec.generate_private_key(CURVE)
    write_private(kit / "auth.key", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                      serialization.NoEncryption()))
    write_private(kit / "auth.pub", key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                  serialization.PublicFormat.OpenSSH) + b"\n")
    write_private(kit / "credentials.device", enrolment.enrol().to_bytes())
    write_private(kit / "ca.crt", (folder / "ca.crt").read_bytes())
    return kit


def check_certificate(cert_path: Path, ca_path: Path, host: str | None = None, key_path: Path | None = None,
                      now: dt.datetime | None = None) -> x509.Certificate:
    """The certificate at `cert_path` is usable: in its validity window, signed by the CA at
    `ca_path`, naming `host` (if given), and the pair of the key at `key_path` (if given)."""
    now = now or _now()
    try:
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
        ca = x509.load_pem_x509_certificate(Path(ca_path).read_bytes())
    except FileNotFoundError as err:
        raise CertificateError(f"{err.filename}: missing") from None
    except ValueError as err:
        raise CertificateError(f"{cert_path} or {ca_path}: not a PEM certificate ({err})") from None
    if now > cert.not_valid_after_utc:
        raise CertificateError(f"{cert_path}: expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; "
                               "issue a new one with `fedrec certs server`")
    if now < cert.not_valid_before_utc:
        raise CertificateError(f"{cert_path}: not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC "
                               "(is this machine's clock right?)")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise CertificateError(f"{cert_path}: not issued by the CA in {ca_path} (issuer "
                               f"{cert.issuer.rfc4514_string()!r}); devices trusting that CA would refuse it") from None
    if host is not None:
        _check_host(cert, cert_path, host)
    if key_path is not None:
        _check_key(cert, cert_path, Path(key_path))
    return cert


def _check_host(cert: x509.Certificate, cert_path: Path, host: str) -> None:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CertificateError(f"{cert_path}: names no hosts (no subject alternative names)") from None
    named = [str(n) for n in san.get_values_for_type(x509.DNSName)] + \
            [str(a) for a in san.get_values_for_type(x509.IPAddress)]
    if host not in named:
        raise CertificateError(f"{cert_path}: does not name {host!r} (it names {', '.join(named)}); devices dialling "
                               f"{host} would refuse it: issue one with `fedrec certs server --host {host}`")


def _check_key(cert: x509.Certificate, cert_path: Path, key_path: Path) -> None:
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    except FileNotFoundError:
        raise CertificateError(f"{key_path}: missing") from None
    except ValueError as err:
        raise CertificateError(f"{key_path}: not a PEM private key ({err})") from None
    if key.public_key().public_numbers() != cert.public_key().public_numbers():
        raise CertificateError(f"{key_path}: not the key of {cert_path} (mismatched pair)")
