"""Who a client is, so that a server cannot pretend: device keys certified by an enrollment CA.

Secure aggregation against a malicious server needs a PKI (Bonawitz et al. 2017, Sec. 6): a
client must know that the key it seals shares to belongs to a real client, not to the server.
Here:
  * the operator keeps an **enrollment CA**: an ed25519 key pair. Its private half stays
    offline, away from the aggregation server; its public half is on every device;
  * every device has a long-term ed25519 **device key**, and a **certificate**: the CA's
    signature over that public key;
  * for each run the device makes an X25519 **identity key** (it receives shares under it) and
    signs it with its device key. The server registers and routes this `IdentityRecord`; every
    client checks a neighbour's record against the CA before sealing anything to it;
  * before revealing any share a client signs the round's **view** (who is alive, who dropped)
    with its device key, and reveals only when a threshold of its share holders signed the same
    view (Bonawitz's consistency round): the server cannot tell some holders a client is alive
    and others that it dropped.
What this does not stop: a server that holds the CA's private key can enrol devices of its own.
Plain functions over `cryptography`; no Flower.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

ENROLMENT = b"fedrec-enrolment-v1|"
IDENTITY = b"fedrec-secagg-identity-v1|"
VIEW = b"fedrec-secagg-view-v2|"   # v2: the task is in the view (session 17)
RECORD_BYTES = 32 + 32 + 64 + 64


def _private(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def _public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _verify(public: bytes, signature: bytes, message: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
        return True
    except (InvalidSignature, ValueError):
        return False


@dataclass(frozen=True)
class EnrolmentCA:
    private: bytes   # ed25519, raw; kept offline by the operator
    public: bytes

    @classmethod
    def new(cls) -> "EnrolmentCA":
        key = Ed25519PrivateKey.generate()
        return cls(_private(key), _public(key))

    def enrol(self) -> "DeviceCredentials":
        """A new device, its key made here (simulation, where the harness plays every device): its
        signing key and this CA's certificate of it. A real device makes its own key
        (`new_device_key`) and sends only the public half to `certify`."""
        device = Ed25519PrivateKey.generate()
        return DeviceCredentials(_private(device), self.certify(_public(device)), self.public)

    def certify(self, device_public: bytes) -> bytes:
        """This CA's certificate of a device's public key (which the CA never sees the private half of)."""
        Ed25519PublicKey.from_public_bytes(device_public)   # a malformed key is refused here, not at use
        return Ed25519PrivateKey.from_private_bytes(self.private).sign(ENROLMENT + device_public)


def new_device_key() -> tuple[bytes, bytes]:
    """(private, public) raw ed25519: a device's long-term signing key, made on the device."""
    key = Ed25519PrivateKey.generate()
    return _private(key), _public(key)


def certificate_valid(ca_public: bytes, device_public: bytes, certificate: bytes) -> bool:
    return _verify(ca_public, certificate, ENROLMENT + device_public)


@dataclass(frozen=True)
class DeviceCredentials:
    signing_key: bytes   # the device's ed25519 private key, raw (never leaves the device)
    certificate: bytes   # the CA's signature over the device's public key
    ca_public: bytes     # the trust anchor: the enrolment CA's public key

    @property
    def device_public(self) -> bytes:
        return _public(Ed25519PrivateKey.from_private_bytes(self.signing_key))

    def sign(self, message: bytes) -> bytes:
        return Ed25519PrivateKey.from_private_bytes(self.signing_key).sign(message)

    def to_bytes(self) -> bytes:
        return self.signing_key + self.certificate + self.ca_public

    @classmethod
    def from_bytes(cls, blob: bytes) -> "DeviceCredentials":
        if len(blob) != 32 + 64 + 32:
            raise ValueError(f"device credentials are {32 + 64 + 32} bytes, not {len(blob)}")
        return cls(blob[:32], blob[32:96], blob[96:])


@dataclass(frozen=True)
class IdentityRecord:
    """A run's identity key, vouched for by the device that made it and the CA that enrolled it."""
    identity_public: bytes   # X25519
    device_public: bytes     # ed25519
    certificate: bytes       # CA over device_public
    signature: bytes         # device over identity_public

    def to_bytes(self) -> bytes:
        return self.identity_public + self.device_public + self.certificate + self.signature

    @classmethod
    def from_bytes(cls, blob: bytes) -> "IdentityRecord":
        if not isinstance(blob, bytes) or len(blob) != RECORD_BYTES:
            raise ValueError(f"an identity record is {RECORD_BYTES} bytes")
        return cls(blob[:32], blob[32:64], blob[64:128], blob[128:])

    def verify(self, ca_public: bytes) -> bool:
        """Enrolled by this CA, and the identity key signed by that device."""
        return (_verify(ca_public, self.certificate, ENROLMENT + self.device_public)
                and _verify(self.device_public, self.signature, IDENTITY + self.identity_public))


def record_digest(record: bytes) -> bytes:
    """A short name for a record this device already checked (SHA-256, first 16 bytes)."""
    digest = hashes.Hash(hashes.SHA256())
    digest.update(record)
    return digest.finalize()[:16]


def identity_record(credentials: DeviceCredentials, identity_public: bytes) -> IdentityRecord:
    return IdentityRecord(identity_public, credentials.device_public, credentials.certificate,
                          credentials.sign(IDENTITY + identity_public))


def view_message(round_id: bytes, alive: list[int], dropped: list[int], graph: tuple[int, int], signer: int,
                 task: bytes) -> bytes:
    """The bytes client `signer` signs to say: in this round (whose neighbour graph is fixed by the
    round id and `graph` = (clients, degree)), doing `task` (shared/protocol.py: task_digest), these
    sent a masked input, these did not. Naming the signer ties a signature to its number; naming the
    graph stops a server from showing clients different graphs; naming the task, from counting
    devices it gave another task. Raises ValueError for a number outside 0..2^32 - 1."""
    return VIEW + round_id + _uint32s([*graph, signer]) + _counted(alive) + _counted(dropped) + task


def _counted(ids: list[int]) -> bytes:
    return _uint32s([len(ids)]) + _uint32s(sorted(int(u) for u in ids))


def _uint32s(values: list[int]) -> bytes:
    """Big-endian 4-byte integers (numpy: a holder checks up to t views of ~1,000 numbers each)."""
    try:
        array = np.array(values, dtype=np.int64)
    except OverflowError:
        array = np.array([-1])
    if array.size and (array.min() < 0 or array.max() > 2 ** 32 - 1):
        raise ValueError("a client number outside 0..2^32 - 1")
    return array.astype(">u4").tobytes()


def verify_view(device_public: bytes, signature: bytes, message: bytes) -> bool:
    return isinstance(signature, bytes) and _verify(device_public, signature, message)
