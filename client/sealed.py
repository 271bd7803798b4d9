"""Files sealed at rest: AES-256-GCM with a key from an owner-only key file or a passphrase.

The device's private state (its behaviour log, privacy ledger and enrolment credentials) lives
in a folder of sealed files (client/store.py: DeviceStore). Against whom: someone who copies
the folder (a backup, a stolen disk, another account on the machine) learns nothing from it
without the key, and cannot change a file undetected: each file is authenticated, and bound
to its role (the log cannot be swapped for the ledger). What this cannot stop: someone who
holds the key, or who restores an older sealed copy of a file in the owner's place.

Layout of a sealed file: MAGIC, a 12-byte random nonce, the ciphertext with its 16-byte tag;
associated data: MAGIC + role. Every write is atomic and durable (temporary file, fsync,
rename, fsync of the folder), so a crash leaves the old file or the new one, never a mix.
"""
from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from fedrec.shared.errors import UserFileError

MAGIC = b"fedrec-sealed-v1\n"
NONCE = 12
KEY_BYTES = 32
PASSPHRASE_ENV = "FEDREC_STORE_PASSPHRASE"
# scrypt cost: N=2^15, r=8 takes 32 MB and about 0.1 s here; the OWASP floor is N=2^17 for
# interactive logins, but this key is re-derived for every message a device answers.
SCRYPT = {"n": 2 ** 15, "r": 8, "p": 1}


class SealedFileError(UserFileError):
    """A sealed file or key that cannot be used; the message names the file and what to do."""


@dataclass(frozen=True)
class StoreKey:
    key: bytes   # AES-256

    @classmethod
    def from_file(cls, path: Path) -> "StoreKey":
        """A key file: 32 random bytes, readable by its owner only (else refused: the key would
        be as open as the data it protects)."""
        path = Path(path)
        try:
            mode = path.stat().st_mode
            raw = path.read_bytes()
        except OSError as err:
            raise SealedFileError(f"{path}: cannot read the store's key file ({err.strerror})") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SealedFileError(f"{path}: the key file is readable by others (mode {stat.S_IMODE(mode):o}); "
                                  f"run `chmod 600 {path}`")
        if len(raw) != KEY_BYTES:
            raise SealedFileError(f"{path}: a key file holds {KEY_BYTES} bytes, this one {len(raw)}")
        return cls(raw)

    @classmethod
    def new_file(cls, path: Path) -> "StoreKey":
        """Write a fresh random key file, owner-only; never over an existing one."""
        key = os.urandom(KEY_BYTES)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise SealedFileError(f"{path}: a key file is already there; refusing to replace it "
                                  "(the store sealed with it would be lost)") from None
        with os.fdopen(fd, "wb") as f:
            f.write(key)
            f.flush()
            os.fsync(f.fileno())
        return cls(key)

    @classmethod
    def from_passphrase(cls, passphrase: str, salt: bytes, params: dict = SCRYPT) -> "StoreKey":
        if not passphrase:
            raise SealedFileError("the store's passphrase is empty")
        kdf = Scrypt(salt=salt, length=KEY_BYTES, **params)
        return cls(kdf.derive(passphrase.encode()))


def seal(key: StoreKey, role: str, plaintext: bytes) -> bytes:
    nonce = os.urandom(NONCE)
    return MAGIC + nonce + AESGCM(key.key).encrypt(nonce, plaintext, MAGIC + role.encode())


def unseal(key: StoreKey, role: str, blob: bytes, path: Path) -> bytes:
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + NONCE + 16:
        raise SealedFileError(f"{path}: not a sealed fedrec file, or cut short (torn write?)")
    nonce = blob[len(MAGIC):len(MAGIC) + NONCE]
    try:
        return AESGCM(key.key).decrypt(nonce, blob[len(MAGIC) + NONCE:], MAGIC + role.encode())
    except InvalidTag:
        raise SealedFileError(f"{path}: fails its integrity check: the file was changed, cut short, swapped "
                              "with another file of the store, or the key is not this store's") from None


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` durably: a temporary file in the same folder, fsync, rename,
    fsync of the folder (so the rename itself survives a power cut)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)   # a stale one from a killed process of the same pid
    # Exclusive and not through a link: a planted symlink cannot redirect the write.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def write_sealed(path: Path, key: StoreKey, role: str, value) -> None:
    write_atomic(path, seal(key, role, json.dumps(value).encode()))


def read_sealed(path: Path, key: StoreKey, role: str):
    path = Path(path)
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise SealedFileError(f"{path}: missing from the device store") from None
    try:
        return json.loads(unseal(key, role, blob, path))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:   # authentic but not ours: a bug, say so
        raise SealedFileError(f"{path}: decrypts but does not parse ({err})") from None
