"""A device as its owner runs it (`fedrec device`): a sealed store of its own events, its
SuperNode, and recommendations computed from its log on the device. Plain functions; the store
is client/store.py, the SuperNode Flower's own `flower-supernode`.
"""
from __future__ import annotations

from pathlib import Path

from fedrec.client.sealed import SealedFileError
from fedrec.client.store import DeviceStore


class DeviceError(SealedFileError):
    """A device command that cannot go on; the message says why and what to do."""


AUTH_KEY, AUTH_PUBLIC, REQUEST, TLS_CA = "auth.key", "auth.pub", "request.json", "ca.crt"


def init(folder: Path, catalog: Path, *, key_file: Path | None, passphrase: str | None, name: str) -> str:
    """A new sealed store, and this device's own keys, made here: its SuperNode authentication key
    (auth.key, 0600, beside the store: Flower reads it as a file) and its enrolment signing key
    (sealed in the store). Writes request.json: the public halves, for the operator to enrol."""
    import json
    import re
    from fedrec.shared.data.catalog_bundle import load_catalog
    from fedrec.shared.secagg.identity import new_device_key
    if (key_file is None) == (passphrase is None):
        raise DeviceError("give either --key-file (a new one is made if missing) or --passphrase")
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
        raise DeviceError(f"device name {name!r}: use letters, digits, '-' or '_'")
    try:   # checked before anything is written: a mistake leaves no half-made store
        load_catalog(Path(catalog))
    except (OSError, ValueError, KeyError) as err:
        raise DeviceError(f"{catalog}: not a catalog file ({err}); use the catalog.npz the server uses") from None
    store = DeviceStore.create(folder, catalog, key_file=key_file, passphrase=passphrase)
    signing, device_public = new_device_key()
    store.write_signing_key(signing)
    auth_public = _new_auth_key(store.folder / AUTH_KEY)
    (store.folder / AUTH_PUBLIC).write_bytes(auth_public)
    request = {"format": "fedrec-enrolment-request-v1", "name": name, "auth_public": auth_public.decode(),
               "device_public": device_public.hex()}
    (store.folder / REQUEST).write_text(json.dumps(request, indent=1))
    return (f"sealed store -> {folder} (AES-256-GCM; key {'from the passphrase' if passphrase else key_file}); "
            f"send {store.folder / REQUEST} (public keys only) to the operator for `fedrec certs enrol`")


def _new_auth_key(path: Path) -> bytes:
    """The SuperNode's authentication key pair (ECDSA P-384, OpenSSH): private half written owner-only."""
    import os
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    key = ec.generate_private_key(ec.SECP384R1())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                  serialization.NoEncryption()))
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n"


def enrol(store: DeviceStore, grant: Path) -> str:
    """Take the operator's grant: its certificate must be of this device's own key, by the enrolment
    CA it names; the credentials are sealed in, the TLS CA certificate kept beside the store."""
    import json
    from fedrec.shared.secagg.identity import DeviceCredentials, certificate_valid
    try:
        given = json.loads(Path(grant).read_text())
        certificate, ca_public = bytes.fromhex(given["certificate"]), bytes.fromhex(given["enrolment_ca_public"])
        tls_ca = given["tls_ca"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DeviceError(f"{grant}: not an enrolment grant ({err})") from None
    signing = store.signing_key()
    credentials = DeviceCredentials(signing, certificate, ca_public)
    if not certificate_valid(ca_public, credentials.device_public, certificate):
        raise DeviceError(f"{grant}: its certificate is not of this device's key (a grant for another device?)")
    store.write_credentials(credentials)
    (store.folder / TLS_CA).write_text(tls_ca)
    store.seal_digest(store.folder / TLS_CA, "tls-ca")   # an edited ca.crt would let another server in
    return (f"enrolled: credentials sealed in {store.folder}, the server's CA certificate in {store.folder / TLS_CA}.\n"
            f"Compare with the operator, over another channel, before running: TLS CA sha256 "
            f"{_fingerprint(tls_ca.encode())}, enrolment CA sha256 {_fingerprint(ca_public)}")


def _fingerprint(data: bytes) -> str:
    import hashlib
    return hashlib.sha256(data).hexdigest()[:32]


def open_store(folder: Path, key_file: Path | None) -> DeviceStore:
    return DeviceStore.open(folder, key_file=key_file)


def describe(store: DeviceStore) -> str:
    from fedrec.shared.privacy.accounting import epsilon
    events = store.events()
    ledger = store.ledger.read()
    try:
        store.read_credentials()
        enrolled = "enrolled for secure aggregation"
    except FileNotFoundError:
        enrolled = "not enrolled (secure aggregation rounds will be refused)"
    spent = f"epsilon {epsilon(ledger, 1e-5):.3f} at delta 1e-5 spent in {len(ledger)} ledger entries" if ledger \
        else "no privacy budget spent"
    last = f", newest {events[-1][0]}" if events else ""
    return f"{store.folder}: {len(events)} events{last}; {spent}; {enrolled}"


def print_recommendations(store: DeviceStore, bundle: Path, k: int) -> None:
    from fedrec.shared.recommend import Recommender
    rec = Recommender.load(bundle)
    known = set(rec.item_ids.tolist())
    items = [i for i in store.history() if i in known]
    for n, r in enumerate(rec.recommend(items, k, explain=True), 1):
        because = f"  <- because: {'; '.join(b.title for b in r.because)}" if r.because else ""
        print(f"{n:3d}. {r.title}  [{r.item_id}]{because}")


# The device's own rules, which no round config can lower (client/privacy.py: DevicePolicy; the
# exact-sum and neighbour floors in client/handlers.py and client/secure.py): node config keys.
POLICY_KEYS = ("privacy-unit", "privacy-budget", "privacy-delta", "privacy-record-window", "privacy-min-noise",
               "counts-min-devices", "secagg-min-neighbours")


def supernode_argv(store: DeviceStore, key_file: Path | None, superlink: str, port: int,
                   policy: dict | None = None) -> list[str]:
    """flower-supernode with TLS (the operator's CA certificate from the grant), node authentication
    (the device's own key), the sealed store and the device's own policy (POLICY_KEYS) as its node config."""
    from fedrec.shared.processes import tool
    folder = store.folder.resolve()
    for name, why in ((TLS_CA, "run `fedrec device enrol --grant FILE` first"),
                      (AUTH_KEY, "made by `fedrec device init`")):
        if not (folder / name).is_file():
            raise DeviceError(f"{folder / name}: missing ({why})")
    store.check_digest(folder / TLS_CA, "tls-ca")
    paths = [folder] + ([Path(key_file).resolve()] if key_file is not None else [])
    if any("'" in str(p) or '"' in str(p) for p in paths):
        raise DeviceError(f"{', '.join(map(str, paths))}: a quote in the path would break the SuperNode's node config; "
                          "move the store or key file")
    config = f"device-store='{paths[0]}'" + (f" store-key-file='{paths[1]}'" if key_file is not None else "")
    for key, value in (policy or {}).items():
        if key not in POLICY_KEYS:
            raise DeviceError(f"{key}: not a device policy setting ({', '.join(POLICY_KEYS)})")
        config += f" {key}='{value}'" if isinstance(value, str) else f" {key}={value!r}"
    return [tool("flower-supernode"), "--superlink", superlink, "--root-certificates", str(folder / TLS_CA),
            "--auth-supernode-private-key", str(folder / AUTH_KEY), "--port", str(port), "--node-config", config]
