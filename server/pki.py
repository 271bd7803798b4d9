"""The operator's keys and certificates (`fedrec certs`), with `cryptography`.

One folder (the CA folder) holds, all written owner-only (0600):
  ca.key, ca.crt              the TLS certificate authority (ECDSA P-384, self-signed)
  server.key, server.crt      the SuperLink's TLS certificate, with the names and addresses
                              devices reach it by as subject alternative names
  enrolment-ca.key/.pub       the secure-aggregation enrolment CA (ed25519; shared/secagg/identity.py):
                              keep its private half away from the aggregation server, which
                              could otherwise enrol devices of its own
  devices/NAME.pub            each enrolled device's SuperNode key (public; the server registers it)
A device makes its own keys (`fedrec device init`: its SuperNode key, ECDSA P-384 in OpenSSH
format as Flower 1.41 requires, and its ed25519 enrolment key) and sends only the public halves
in a request; `enrol_device` answers with a grant (the enrolment CA's certificate of its key and
the TLS CA certificate). No private key of a device is ever made or held here.
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

from fedrec.shared.errors import UserFileError

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
    from fedrec.shared.secagg.identity import EnrolmentCA
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


REQUEST = "fedrec-enrolment-request-v1"
GRANT = "fedrec-enrolment-grant-v1"


def enrol_device(folder: Path, request: Path, grant: Path) -> dict:
    """Enrol a device from its request (`fedrec device init` writes it, with public keys only: the
    device made its keys and keeps the private halves). Writes the grant for the device (the
    enrolment CA's certificate of its key, the enrolment CA's public key, the TLS CA certificate)
    and keeps the device's SuperNode key as devices/NAME.pub, to register. Returns the request."""
    import json
    from fedrec.shared.secagg.identity import EnrolmentCA
    folder = Path(folder)
    try:
        asked = json.loads(Path(request).read_text())
        name, auth_public, device_public = asked["name"], asked["auth_public"], bytes.fromhex(asked["device_public"])
        if asked.get("format") != REQUEST:
            raise ValueError(f"format {asked.get('format')!r}")
    except FileNotFoundError:
        raise CertificateError(f"{request}: no such file (a device's request.json, from `fedrec device init`)") from None
    except (ValueError, KeyError, TypeError) as err:
        raise CertificateError(f"{request}: not an enrolment request ({err})") from None
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", str(name)) or not isinstance(auth_public, str):
        raise CertificateError(f"{request}: device name {name!r} (letters, digits, '-' or '_') or its SuperNode key "
                               "is malformed")
    for taken in (folder / "devices" / f"{name}.pub", Path(grant)):   # both checked before either is written
        if taken.exists():
            raise CertificateError(f"{taken}: already there; refusing to replace it (a device of that name is enrolled)")
    _check_auth_key(auth_public.encode(), request)
    _load_ca(folder)
    try:
        enrolment = EnrolmentCA((folder / "enrolment-ca.key").read_bytes(), (folder / "enrolment-ca.pub").read_bytes())
        certificate = enrolment.certify(device_public)
    except FileNotFoundError as err:
        raise CertificateError(f"{err.filename}: missing (the enrolment CA is made by `fedrec certs ca`)") from None
    except ValueError as err:
        raise CertificateError(f"{request}: the device's public key is malformed ({err})") from None
    write_private(folder / "devices" / f"{name}.pub", auth_public.encode())   # refuses a name already enrolled
    write_private(Path(grant), json.dumps({
        "format": GRANT, "name": name, "device_public": device_public.hex(), "certificate": certificate.hex(),
        "enrolment_ca_public": enrolment.public.hex(), "tls_ca": (folder / "ca.crt").read_text()}, indent=1).encode())
    return asked


def _check_auth_key(auth_public: bytes, source: Path) -> None:
    """What Flower 1.41 accepts for SuperNode authentication: an EC key on a NIST curve, OpenSSH format."""
    try:
        key = serialization.load_ssh_public_key(auth_public)
    except (ValueError, TypeError) as err:
        raise CertificateError(f"{source}: the SuperNode key is not an OpenSSH public key ({err})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CertificateError(f"{source}: the SuperNode key must be an EC (P-384) key, as Flower 1.41 requires")


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
    _check_ca(ca, Path(ca_path), now)
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


def _check_ca(ca: x509.Certificate, ca_path: Path, now: dt.datetime) -> None:
    try:
        is_ca = ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise CertificateError(f"{ca_path}: not a CA certificate (no CA basic constraint)")
    if not ca.not_valid_before_utc <= now <= ca.not_valid_after_utc:
        raise CertificateError(f"{ca_path}: the CA certificate is outside its validity "
                               f"({ca.not_valid_before_utc:%Y-%m-%d} to {ca.not_valid_after_utc:%Y-%m-%d})")


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
