"""`fedrec certs`: what it writes, and the one-line errors for certificates that cannot work."""
import datetime as dt
import stat

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from fedrec.client import device
from fedrec.client.store import DeviceStore
from fedrec.server.pki import CertificateError, check_certificate, enrol_device, make_ca, server_certificate
from fedrec.shared.data.catalog_bundle import CatalogBundle, save_catalog


@pytest.fixture
def ca(tmp_path):
    make_ca(tmp_path / "ca")
    server_certificate(tmp_path / "ca", ["localhost", "127.0.0.1", "fl.example.org"])
    return tmp_path / "ca"


def _device(tmp_path, name="phone-1"):
    catalog = tmp_path / "catalog.npz"
    save_catalog(CatalogBundle(np.asarray(["1", "2", "3"]), np.zeros((3, 0), np.float32)), catalog)
    device.init(tmp_path / name, catalog, key_file=tmp_path / f"{name}.key", passphrase=None, name=name)
    return DeviceStore.open(tmp_path / name, key_file=tmp_path / f"{name}.key")


def test_a_device_makes_its_keys_and_the_operator_certifies_only_public_halves(ca, tmp_path):
    store = _device(tmp_path)
    request = (store.folder / "request.json").read_text()
    assert "PRIVATE" not in request and store.signing_key().hex() not in request
    enrol_device(ca, store.folder / "request.json", tmp_path / "grant.json")
    assert store.signing_key().hex() not in "".join(p.read_text(errors="replace") for p in ca.rglob("*") if p.is_file())
    device.enrol(store, tmp_path / "grant.json")
    creds = store.read_credentials()
    assert creds.ca_public == (ca / "enrolment-ca.pub").read_bytes() and creds.signing_key == store.signing_key()
    files = [p for p in ca.rglob("*") if p.is_file()]
    assert len(files) == 7 and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
    for host in ("localhost", "127.0.0.1", "fl.example.org"):
        check_certificate(ca / "server.crt", ca / "ca.crt", host=host, key_path=ca / "server.key")
    # What Flower 1.41 reads: an EC (NIST) key in OpenSSH format for `--auth-supernode-private-key`,
    # its public half for `flwr supernode register`.
    assert isinstance(load_ssh_private_key((store.folder / "auth.key").read_bytes(), None), ec.EllipticCurvePrivateKey)
    assert stat.S_IMODE((store.folder / "auth.key").stat().st_mode) == 0o600
    assert isinstance(load_ssh_public_key((ca / "devices" / "phone-1.pub").read_bytes()), ec.EllipticCurvePublicKey)


def test_a_grant_for_another_device_is_refused(ca, tmp_path):
    mine, other = _device(tmp_path, "mine"), _device(tmp_path, "other")
    enrol_device(ca, other.folder / "request.json", tmp_path / "other.grant")
    with pytest.raises(device.DeviceError, match="not of this device's key"):
        device.enrol(mine, tmp_path / "other.grant")


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


def test_nothing_is_overwritten(ca, tmp_path):
    with pytest.raises(CertificateError, match="ca.key: already there"):
        make_ca(ca)
    store = _device(tmp_path)
    enrol_device(ca, store.folder / "request.json", tmp_path / "grant.json")
    with pytest.raises(CertificateError, match="phone-1.pub: already there"):
        enrol_device(ca, store.folder / "request.json", tmp_path / "again.json")
    with pytest.raises(device.DeviceError, match="device name"):
        _device(tmp_path, "../escape")
