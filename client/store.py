"""The device's own files: its behaviour log, its privacy ledger, and where each lives.

One home for everything a device keeps on disk, so an encrypted store has one place to go
(docs/threat-model.md). Where the files are:
  * on a device (a SuperNode), node config `user-log=PATH` (its own log, `UserLog` .npz),
    `catalog=PATH` (the public catalog bundle) and optionally `privacy-ledger=PATH`;
  * in simulation, run config `store=DIR` plus node config `partition-id`: the log is
    DIR/users/<partition-id>.npz and the catalog DIR/catalog.npz.
Every write is atomic (temporary file, fsync, rename): a crash leaves the old file or the new.

Light on purpose (numpy only): the ClientApp module imports it without torch.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


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


def read_ledger(path: Path) -> list[tuple]:
    """The privacy events a ledger file holds. A missing or unreadable file is an error, never an
    empty history: that would hand the device a fresh budget. (What this cannot catch: a device
    owner restoring an older copy of the file; docs/privacy.md.)"""
    path = Path(path)
    if not path.exists():
        raise LedgerMissing(f"{path}: this device's privacy ledger is missing; refusing to train, since "
                            "starting a new one would reset its privacy budget (restore the file, or enrol "
                            "the device afresh with `fedrec store`)")
    try:
        return [tuple(e) for e in json.loads(path.read_text())["history"]]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: unreadable privacy ledger ({err}); refusing to guess what was spent") from None


def write_ledger(path: Path, history: list[tuple]) -> None:
    """Replace the ledger atomically and durably (synced before the rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"history": history, "unit": LEDGER_UNIT,
                   "accountant_history_format": "[noise multiplier, sample rate, steps]"}, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def credentials_path(node_config: dict, run_config: dict) -> Path:
    """This device's enrolment credentials (shared.secagg.identity.DeviceCredentials): node config
    `device-credentials`, else beside its log."""
    if "device-credentials" in node_config:
        return Path(str(node_config["device-credentials"]))
    log_path, _ = client_paths(node_config, run_config)
    return log_path.with_name(log_path.name.removesuffix(".npz") + ".device")


def read_credentials(path: Path):
    from shared.secagg.identity import DeviceCredentials
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no device credentials; secure aggregation needs an enrolled device "
                                "(`fedrec store` enrols simulated ones)")
    return DeviceCredentials.from_bytes(path.read_bytes())


def write_credentials(path: Path, credentials) -> None:
    """Owner-only, atomic: the device's signing key is in it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(credentials.to_bytes())
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
