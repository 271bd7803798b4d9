"""A device as its owner runs it (`fedrec device`): a sealed store of its own events, its
SuperNode, and recommendations computed from its log on the device. Plain functions; the store
is client/store.py, the SuperNode Flower's own `flower-supernode`.
"""
from __future__ import annotations

from pathlib import Path

from client.sealed import SealedFileError
from client.store import DeviceStore


class DeviceError(SealedFileError):
    """A device command that cannot go on; the message says why and what to do."""


def init(folder: Path, catalog: Path, *, key_file: Path | None, passphrase: str | None,
         credentials: Path | None) -> str:
    from shared.data.catalog_bundle import load_catalog
    from shared.secagg.identity import DeviceCredentials
    if (key_file is None) == (passphrase is None):
        raise DeviceError("give either --key-file (a new one is made if missing) or --passphrase")
    # Everything read and checked before anything is written: a mistake leaves no half-made store.
    try:
        load_catalog(Path(catalog))
    except (OSError, ValueError, KeyError) as err:
        raise DeviceError(f"{catalog}: not a catalog file ({err}); use the catalog.npz the server uses") from None
    enrolment = None
    if credentials is not None:
        try:
            enrolment = DeviceCredentials.from_bytes(Path(credentials).read_bytes())
        except (OSError, ValueError) as err:
            raise DeviceError(f"{credentials}: cannot read the device's credentials ({err})") from None
    store = DeviceStore.create(folder, catalog, key_file=key_file, passphrase=passphrase)
    said = f"sealed store -> {folder} (AES-256-GCM; key {'from the passphrase' if passphrase else key_file})"
    if enrolment is not None:
        store.write_credentials(enrolment)
        said += f"; enrolment sealed in (delete the plain copy {credentials} once the device runs)"
    return said


def open_store(folder: Path, key_file: Path | None) -> DeviceStore:
    return DeviceStore.open(folder, key_file=key_file)


def describe(store: DeviceStore) -> str:
    from shared.privacy.accounting import epsilon
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


def history(store: DeviceStore) -> list[str]:
    """Item ids by time, each once (its first time), as the model reads a log."""
    seen, items = set(), []
    for item, _ in sorted(store.events(), key=lambda e: e[1]):
        if item not in seen:
            seen.add(item)
            items.append(item)
    return items


def print_recommendations(store: DeviceStore, bundle: Path, k: int) -> None:
    from shared.recommend import Recommender
    rec = Recommender.load(bundle)
    known = set(rec.item_ids.tolist())
    items = [i for i in history(store) if i in known]
    for n, r in enumerate(rec.recommend(items, k, explain=True), 1):
        because = f"  <- because: {'; '.join(b.title for b in r.because)}" if r.because else ""
        print(f"{n:3d}. {r.title}  [{r.item_id}]{because}")


def supernode_argv(store: DeviceStore, key_file: Path | None, kit: Path, superlink: str, port: int) -> list[str]:
    """flower-supernode with TLS (the kit's CA certificate), node authentication (the kit's key) and
    the sealed store as its node config."""
    from shared.processes import tool
    kit = Path(kit).resolve()
    for name in ("ca.crt", "auth.key"):
        if not (kit / name).is_file():
            raise DeviceError(f"{kit / name}: missing (a kit from `fedrec certs device` holds it)")
    paths = [store.folder.resolve()] + ([Path(key_file).resolve()] if key_file is not None else [])
    if any("'" in str(p) or '"' in str(p) for p in paths):
        raise DeviceError(f"{', '.join(map(str, paths))}: a quote in the path would break the SuperNode's node config; "
                          "move the store or key file")
    config = f"device-store='{paths[0]}'" + (f" store-key-file='{paths[1]}'" if key_file is not None else "")
    return [tool("flower-supernode"), "--superlink", superlink, "--root-certificates", str(kit / "ca.crt"),
            "--auth-supernode-private-key", str(kit / "auth.key"), "--port", str(port), "--node-config", config]
