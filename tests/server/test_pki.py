"""`fedrec certs`: what it writes, and the one-line errors for certificates that cannot work."""
import datetime as dt
import stat

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from server.pki import CertificateError, check_certificate, device_kit, make_ca, server_certificate
from shared.secagg.identity import DeviceCredentials


@pytest.fixture
def ca(tmp_path):
    make_ca(tmp_path / "ca")
    server_certificate(tmp_path / "ca", ["localhost", "127.0.0.1", "fl.example.org"])
    return tmp_path / "ca"


def test_everything_is_owner_only_and_the_server_certificate_checks(ca):
    kit = device_kit(ca, "phone-1")
    files = [p for p in ca.rglob("*") if p.is_file()]
    assert len(files) == 10 and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
    for host in ("localhost", "127.0.0.1", "fl.example.org"):
        check_certificate(ca / "server.crt", ca / "ca.crt", host=host, key_path=ca / "server.key")
    # What Flower 1.41 reads: an EC (NIST) key in OpenSSH format for `--auth-supernode-private-key`,
    # its public half for `flwr supernode register`.
    assert isinstance(load_ssh_private_key((kit / "auth.key").read_bytes(), None), ec.EllipticCurvePrivateKey)
    assert isinstance(load_ssh_public_key((kit / "auth.pub").read_bytes()), ec.EllipticCurvePublicKey)
    creds = DeviceCredentials.from_bytes((kit / "credentials.device").read_bytes())
    assert creds.ca_public == (ca / "enrolment-ca.pub").read_bytes()


def test_expired_foreign_misnamed_and_mismatched_certificates_are_named(ca, tmp_path):
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=900)
    with pytest.raises(CertificateError, match=r"server\.crt: expired on"):
        check_certificate(ca / "server.crt", ca / "ca.crt", now=later)
    earlier = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1)
    with pytest.raises(CertificateError, match="not valid before"):
        check_certificate(ca / "server.crt", ca / "ca.crt", now=earlier)
    make_ca(tmp_path / "other")
    with pytest.raises(CertificateError, match="not issued by the CA in"):
        check_certificate(ca / "server.crt", tmp_path / "other" / "ca.crt")
    with pytest.raises(CertificateError, match="does not name '10.0.0.7'.*--host 10.0.0.7"):
        check_certificate(ca / "server.crt", ca / "ca.crt", host="10.0.0.7")
    with pytest.raises(CertificateError, match="not the key of"):
        check_certificate(ca / "server.crt", ca / "ca.crt", key_path=tmp_path / "other" / "ca.key")


def test_nothing_is_overwritten(ca):
    with pytest.raises(CertificateError, match="ca.key: already there"):
        make_ca(ca)
    device_kit(ca, "phone-1")
    with pytest.raises(CertificateError, match="already has keys"):
        device_kit(ca, "phone-1")
    with pytest.raises(CertificateError, match="device name"):
        device_kit(ca, "../escape")
