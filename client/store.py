"""The device's own files: its behaviour log, its privacy ledger, its enrolment credentials,
and where each lives.

One home for everything a device keeps on disk (docs/threat-model.md). Where the files are:
  * on a device (a SuperNode run by `fedrec device run`), node config `device-store=DIR`: a
    sealed store (`DeviceStore`: AES-256-GCM at rest, client/sealed.py) holding the log as
    events (item id, time), the ledger and the credentials, with the public catalog beside
    them; its key from node config `store-key-file=PATH`, or a passphrase in the SuperNode's
    environment (FEDREC_STORE_PASSPHRASE);
  * on a device with plain files, node config `user-log=PATH` (`UserLog` .npz), `catalog=PATH`
    and optionally `privacy-ledger=PATH`, `device-credentials=PATH`;
  * in simulation, run config `store=DIR` plus node config `partition-id`: the log is
    DIR/users/<partition-id>.npz and the catalog DIR/catalog.npz.
Every write is atomic (temporary file, fsync, rename): a crash leaves the old file or the new.

Light on purpose (numpy only): the ClientApp module imports it without torch.
"""
from __future__ import annotations

import fcntl
import functools
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedrec.client.sealed import (PASSPHRASE_ENV, SCRYPT, SealedFileError, StoreKey, read_sealed, seal, unseal, write_atomic,
                           write_sealed)


@dataclass(frozen=True)
class UserLog:
    """One user's private behaviour log in catalog indices, oldest first."""
    train: np.ndarray  # (T,) items trained on
    valid: int         # second-last item: validation target
    test: int          # last item: test target (trained on by nobody)

    def history(self, stage: str) -> np.ndarray:
        """The items the user had touched before the `stage` target."""
        if stage == "valid":
            return self.train
        if stage == "test":
            return np.append(self.train, self.valid)
        raise ValueError(f"stage must be 'valid' or 'test', not {stage!r}")

    def target(self, stage: str) -> int:
        return self.valid if stage == "valid" else self.test

    def save(self, path: Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, train=self.train, valid=self.valid, test=self.test)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "UserLog":
        with np.load(path) as f:
            return cls(f["train"].astype(np.int64), int(f["valid"]), int(f["test"]))


def client_paths(node_config: dict, run_config: dict) -> tuple[Path, Path]:
    """(user log, catalog bundle) for this node."""
    if "user-log" in node_config:
        return Path(str(node_config["user-log"])), Path(str(node_config["catalog"]))
    store = Path(str(run_config["store"]))
    return store / "users" / f"{int(node_config['partition-id'])}.npz", store / "catalog.npz"


def ledger_path(node_config: dict, run_config: dict) -> Path:
    """This client's privacy ledger: node config `privacy-ledger`, else beside its log."""
    if "privacy-ledger" in node_config:
        return Path(str(node_config["privacy-ledger"]))
    log_path, _ = client_paths(node_config, run_config)
    return log_path.with_name(log_path.name.removesuffix(".npz") + ".privacy.json")


class LedgerMissing(FileNotFoundError):
    """The device's privacy ledger is gone: training on would start a fresh budget."""


# What one entry of the ledger protects (docs/privacy.md, "The unit").
LEDGER_UNIT = ("one record: an aligned chunk of up to record-window consecutive interactions of the log; "
               "changing any one interaction changes one record")


def start_ledger(path: Path) -> None:
    """An empty ledger for a newly enrolled device (`fedrec store` writes one per user). Only here
    does a ledger begin: a missing one later is an error, never a fresh start."""
    if not Path(path).exists():
        write_ledger(path, [])


def _ledger_document(history: list[tuple]) -> dict:
    return {"history": history, "unit": LEDGER_UNIT, "accountant_history_format": "[noise multiplier, sample rate, steps]"}


def write_ledger(path: Path, history: list[tuple]) -> None:
    """Replace the ledger atomically and durably (synced before the rename)."""
    write_atomic(Path(path), json.dumps(_ledger_document(history)).encode())


@dataclass(frozen=True)
class LedgerFile:
    """Where a device's privacy ledger lives: a plain JSON file, or sealed in its DeviceStore. It
    holds what the device spent (`history`) and what it gave once ever (`given`: the exact
    co-occurrence counts, the blend's validation statistics), so deleting a marker file cannot let
    it give them twice: a missing ledger is a refusal, never a fresh start."""
    path: Path
    key: StoreKey | None = None
    role: str = "ledger"   # a sealed store's: bound to that store (DeviceStore.role)

    def _load(self) -> dict:
        """The ledger document. A missing or unreadable file is an error, never an empty history: that
        would hand the device a fresh budget. (What this cannot catch: an older copy of the file put
        back; docs/threat-model.md.)"""
        if not self.path.exists():
            raise LedgerMissing(f"{self.path}: this device's privacy ledger is missing; refusing to train, since "
                                "starting a new one would reset its privacy budget (restore the file, or enrol "
                                "the device afresh)")
        try:
            document = json.loads(self.path.read_text()) if self.key is None else \
                read_sealed(self.path, self.key, self.role)
            document["history"] = [tuple(e) for e in document["history"]]
            return document
        except SealedFileError:
            raise   # names the file and what failed already
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{self.path}: unreadable privacy ledger ({err}); refusing to guess what was spent") from None

    def _save(self, document: dict) -> None:
        if self.key is None:
            write_atomic(self.path, json.dumps(document).encode())
        else:
            write_sealed(self.path, self.key, self.role, document)

    def read(self) -> list[tuple]:
        return self._load()["history"]

    def write(self, history: list[tuple]) -> None:
        """Replace the spending history, keeping what was given once."""
        given = self._load().get("given", {}) if self.path.exists() else {}
        self._save({**_ledger_document(history), "given": given})

    @contextmanager
    def locked(self):
        """One process at a time reads and changes the ledger (two answering for one device must
        not both spend the last of its budget, or both give once)."""
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def given(self, name: str) -> str | None:
        return self._load().get("given", {}).get(name)

    def give_once(self, name: str, note: str) -> bool:
        """Record, durably and before anything leaves, that `name` is given; False if it was before."""
        with self.locked():
            document = self._load()
            if name in document.get("given", {}):
                return False
            document["given"] = {**document.get("given", {}), name: note}
            self._save(document)
            return True


def credentials_path(node_config: dict, run_config: dict) -> Path:
    """This device's enrolment credentials (fedrec.shared.secagg.identity.DeviceCredentials): node config
    `device-credentials`, else beside its log."""
    if "device-credentials" in node_config:
        return Path(str(node_config["device-credentials"]))
    log_path, _ = client_paths(node_config, run_config)
    return log_path.with_name(log_path.name.removesuffix(".npz") + ".device")


def read_credentials(path: Path):
    from fedrec.shared.secagg.identity import DeviceCredentials
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no device credentials; secure aggregation needs an enrolled device "
                                "(`fedrec store` enrols simulated ones)")
    return DeviceCredentials.from_bytes(path.read_bytes())


def write_credentials(path: Path, credentials) -> None:
    """Owner-only, atomic: the device's signing key is in it."""
    write_atomic(Path(path), credentials.to_bytes())


def _digest(path: Path) -> str:
    import hashlib
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class TooFewEvents(ValueError):
    """A device's log is too short to train or be evaluated on (it needs a history, a validation
    and a test interaction)."""


class DeviceStore:
    """A device's private state, sealed at rest in one folder (client/sealed.py):
      store.json     plain: format, how the key is made (key file, or scrypt's salt), a key check
      log.sealed     the behaviour log: events [item id, time], in the order they were added
      ledger.sealed  the privacy ledger (client/privacy.py: PrivacyLedger)
      signing-key.sealed  the device's enrolment signing key, made here (client/device.py)
      device.sealed  the secure-aggregation enrolment credentials, once the operator's grant came
      auth.key/.pub, request.json, ca.crt  not sealed (client/device.py): Flower reads auth.key and
                     ca.crt as files; auth.key is owner-only
      catalog.npz    the public catalog (item ids, content), not secret
    A wrong key is told apart from a changed file by the key check in store.json."""

    HEADER, LOG, LEDGER, CREDENTIALS, CATALOG = "store.json", "log.sealed", "ledger.sealed", "device.sealed", "catalog.npz"
    SIGNING_KEY = "signing-key.sealed"
    FORMAT = "fedrec-device-store-v1"

    def __init__(self, folder: Path, key: StoreKey, store_id: str):
        self.folder, self.key, self.id = Path(folder), key, store_id

    def role(self, name: str) -> str:
        """A sealed file's role, bound to this store: a file of another store sealed with the same
        key (or passphrase) does not open here."""
        return f"{self.id}/{name}"

    @classmethod
    def create(cls, folder: Path, catalog: Path, *, key_file: Path | None = None,
               passphrase: str | None = None) -> "DeviceStore":
        """A new, empty store: an empty log and ledger (nothing spent), the catalog copied in.
        The key: a new key file (`key_file`, written 0600) or a passphrase through scrypt."""
        folder = Path(folder)
        if folder.exists() and any(folder.iterdir()):
            # Never over what is there: a store that lost its header must not become a fresh one
            # (an empty ledger: a fresh privacy budget) by following an error's advice.
            raise SealedFileError(f"{folder}: not empty; a device store is made in a new folder")
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        header: dict = {"format": cls.FORMAT}
        if passphrase is not None:
            salt = os.urandom(16)
            key = StoreKey.from_passphrase(passphrase, salt)
            header["kdf"] = {"scrypt": SCRYPT, "salt": salt.hex()}
        elif key_file is not None:
            key = StoreKey.new_file(Path(key_file)) if not Path(key_file).exists() else StoreKey.from_file(key_file)
            header["kdf"] = "key-file"
        else:
            raise SealedFileError("a device store needs a key file or a passphrase")
        header["id"] = os.urandom(16).hex()
        store = cls(folder, key, header["id"])
        header["check"] = seal(key, store.role("check"), cls.FORMAT.encode()).hex()
        store.update_catalog(catalog)
        write_sealed(folder / cls.LOG, key, store.role("log"), {"events": []})
        store.ledger.write([])
        write_atomic(folder / cls.HEADER, json.dumps(header, indent=1).encode())   # last: the store is whole
        return store

    @classmethod
    def open(cls, folder: Path, *, key_file: Path | None = None, passphrase: str | None = None) -> "DeviceStore":
        folder = Path(folder)
        try:
            header = json.loads((folder / cls.HEADER).read_text())
        except FileNotFoundError:
            if (folder / cls.LEDGER).exists():
                raise SealedFileError(f"{folder / cls.HEADER}: missing beside sealed files: the store is damaged; "
                                      "restore it from a backup (a new store would start a fresh privacy ledger)") from None
            raise SealedFileError(f"{folder}: not a device store (no {cls.HEADER}; create one in a new folder with "
                                  "`fedrec device init`)") from None
        except ValueError as err:
            raise SealedFileError(f"{folder / cls.HEADER}: unreadable ({err})") from None
        found = header.get("format") if isinstance(header, dict) else None
        if found != cls.FORMAT:
            raise SealedFileError(f"{folder / cls.HEADER}: format {found!r}, expected {cls.FORMAT!r}")
        key = cls._key(folder, header, key_file, passphrase)
        try:
            unseal(key, f"{header['id']}/check", bytes.fromhex(header["check"]), folder / cls.HEADER)
        except (SealedFileError, KeyError, ValueError, TypeError, AttributeError):
            raise SealedFileError(f"{folder}: wrong key or passphrase for this device store, or its store.json "
                                  "was changed") from None
        return cls(folder, key, header["id"])

    @staticmethod
    def _key(folder: Path, header: dict, key_file: Path | None, passphrase: str | None) -> StoreKey:
        kdf = header.get("kdf")
        if isinstance(kdf, dict):
            passphrase = passphrase if passphrase is not None else os.environ.get(PASSPHRASE_ENV)
            if passphrase is None:
                raise SealedFileError(f"{folder}: this store is sealed with a passphrase; give it in "
                                      f"{PASSPHRASE_ENV}")
            params = kdf.get("scrypt")
            if params != SCRYPT:   # the header is not authenticated: never let it choose the cost
                raise SealedFileError(f"{folder / DeviceStore.HEADER}: scrypt parameters {params!r} are not "
                                      f"fedrec's {SCRYPT!r}; refusing them")
            return StoreKey.from_passphrase(passphrase, bytes.fromhex(kdf["salt"]), params)
        if key_file is None:
            raise SealedFileError(f"{folder}: this store is sealed with a key file; give its path "
                                  "(--key-file, or node config store-key-file)")
        return StoreKey.from_file(Path(key_file))

    @property
    def ledger(self) -> LedgerFile:
        return LedgerFile(self.folder / self.LEDGER, self.key, self.role("ledger"))

    def seal_digest(self, path: Path, name: str) -> None:
        """Seal the SHA-256 of a plain file the store keeps (public, but not to be changed unseen)."""
        write_sealed(self.folder / f"{name}.sha256.sealed", self.key, self.role(name), _digest(path))

    def check_digest(self, path: Path, name: str) -> None:
        if _digest(path) != read_sealed(self.folder / f"{name}.sha256.sealed", self.key, self.role(name)):
            raise SealedFileError(f"{path}: not the file this store sealed; it was changed"
                                  + (" (a new catalog from the operator is taken with `fedrec device update-catalog`)"
                                     if name == "catalog" else ""))

    @property
    def catalog(self) -> Path:
        """The store's catalog, checked against the digest sealed with it: a changed item order would
        map the log to other items, and the device would train on what someone else chose."""
        self.check_digest(self.folder / self.CATALOG, "catalog")
        return self.folder / self.CATALOG

    def update_catalog(self, catalog: Path) -> None:
        """Take a new catalog (new items); the log keeps item ids, so it maps onto the new one."""
        from fedrec.shared.data.catalog_bundle import load_catalog
        load_catalog(Path(catalog))   # a file that is not a catalog is refused before anything changes
        write_atomic(self.folder / self.CATALOG, Path(catalog).read_bytes(), mode=0o644)
        self.seal_digest(self.folder / self.CATALOG, "catalog")

    def events(self) -> list[tuple[str, float]]:
        try:
            return [(str(i), float(t)) for i, t in read_sealed(self.folder / self.LOG, self.key, self.role("log"))["events"]]
        except (KeyError, TypeError, ValueError) as err:
            if isinstance(err, SealedFileError):
                raise
            raise SealedFileError(f"{self.folder / self.LOG}: unreadable log ({err})") from None

    @contextmanager
    def _locked(self):
        """One writer at a time (two `add-event` calls must not lose each other's event)."""
        with open(self.folder / "log.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def add_events(self, events: list[tuple[str, float | None]]) -> int:
        """Append events (item id, time; None: now). Each id must be in the catalog. Durable on
        return: a crash before then loses these events and nothing else. Returns the log's length."""
        from fedrec.shared.data.catalog_bundle import load_catalog
        known = set(load_catalog(self.catalog).item_ids.tolist())
        unknown = [str(i) for i, _ in events if str(i) not in known]
        if unknown:
            raise SealedFileError(f"item(s) {', '.join(unknown[:5])} are not in this store's catalog ({self.catalog})")
        now = time.time()
        with self._locked():
            log_ = self.events() + [(str(i), now if t is None else float(t)) for i, t in events]
            write_sealed(self.folder / self.LOG, self.key, self.role("log"), {"events": log_})
        return len(log_)

    def history(self) -> list[str]:
        """Item ids by time (ties keep the order added), each once, at its first time: a log as the
        data preparation reads one."""
        return list(dict.fromkeys(item for item, _ in sorted(self.events(), key=lambda e: e[1])))

    def user_log(self) -> UserLog:
        """The log as the model reads it: `history` in catalog indices, items no longer in the catalog
        left out; the second-last item is the validation target, the last the test's."""
        from fedrec.shared.data.catalog_bundle import load_catalog
        index = {item: i + 1 for i, item in enumerate(load_catalog(self.catalog).item_ids.tolist())}
        items = [index[item] for item in self.history() if item in index]
        if len(items) < 3:
            raise TooFewEvents(f"{self.folder}: {len(items)} distinct catalog item(s) in the log; training needs at least 3")
        return UserLog(np.asarray(items[:-2], dtype=np.int64), items[-2], items[-1])

    def read_credentials(self):
        import base64
        from fedrec.shared.secagg.identity import DeviceCredentials
        path = self.folder / self.CREDENTIALS
        if not path.exists():
            raise FileNotFoundError(f"{path}: no device credentials; secure aggregation needs an enrolled device "
                                    "(`fedrec device init --credentials FILE` seals them in)")
        return DeviceCredentials.from_bytes(base64.b64decode(read_sealed(path, self.key, self.role("credentials"))))

    def write_signing_key(self, key: bytes) -> None:
        """The device's enrolment signing key, made on the device, sealed until its certificate comes."""
        write_sealed(self.folder / self.SIGNING_KEY, self.key, self.role("signing-key"), key.hex())

    def signing_key(self) -> bytes:
        if not (self.folder / self.SIGNING_KEY).exists():
            raise SealedFileError(f"{self.folder / self.SIGNING_KEY}: missing (made by `fedrec device init`)")
        return bytes.fromhex(read_sealed(self.folder / self.SIGNING_KEY, self.key, self.role("signing-key")))

    def write_credentials(self, credentials) -> None:
        import base64
        write_sealed(self.folder / self.CREDENTIALS, self.key, self.role("credentials"), base64.b64encode(credentials.to_bytes()).decode())


@dataclass(frozen=True)
class DeviceFiles:
    """Everything a handler reads or writes of this device, resolved once from its configs."""
    catalog: Path | None
    ledger: LedgerFile | None
    log: Path | None = None          # a plain UserLog file
    credentials: Path | None = None  # a plain credentials file
    store: DeviceStore | None = None

    def user_log(self) -> UserLog:
        return self.store.user_log() if self.store else UserLog.load(self.log)

    def read_credentials(self):
        return self.store.read_credentials() if self.store else read_credentials(self.credentials)


@functools.lru_cache(maxsize=8)
def _open_store(folder: str, key_file: str | None) -> DeviceStore:
    """A handler resolves the device's files several times a message; opening derives the key (scrypt,
    about 0.1 s and 32 MB, with a passphrase) and checks it: once per process is enough."""
    return DeviceStore.open(Path(folder), key_file=Path(key_file) if key_file else None)


def device_files(node_config: dict, run_config: dict) -> DeviceFiles:
    if "device-store" in node_config:
        key_file = node_config.get("store-key-file")
        store = _open_store(str(node_config["device-store"]), str(key_file) if key_file else None)
        return DeviceFiles(store.catalog, store.ledger, store=store)   # the sealed store's catalog, checked
    try:
        log_path, catalog = client_paths(node_config, run_config)
    except KeyError:   # a node config that names some files only (the secure key steps read only credentials)
        log_path = catalog = None
    named = "privacy-ledger" in node_config or log_path is not None
    return DeviceFiles(catalog, LedgerFile(ledger_path(node_config, run_config)) if named else None, log=log_path,
                       credentials=credentials_path(node_config, run_config))
