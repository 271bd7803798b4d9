"""One client's side of a secure-aggregation round (the state machine behind client/secure.py).

A client trusts nothing the server says that it can check itself: the parameters must meet
its floors, a neighbour's identity key must be enrolled (shared/secagg/identity.py), the
threshold must exceed two thirds of the holders it actually has, a masked input goes out once
and only with enough pairwise masks in it, the view it signs must match its own masking, and no
share is revealed before a threshold of its holders signed the same view of who is alive and
who dropped.
"""
from __future__ import annotations

import secrets

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedrec.shared.secagg.fixed_point import quantise
from fedrec.shared.secagg.identity import (RECORD_BYTES, DeviceCredentials, IdentityRecord, record_digest, verify_view,
                                    view_message)
from fedrec.shared.secagg.params import (MIN_NEIGHBOURS, ProtocolViolation, SecAggParams, client_floor_problem,
                                  holders_problem, neighbour_graph)
from fedrec.shared.secagg.primitives import (SHARE_BYTES, agree, commit_seed, kdf, load_private, open_sealed, pair_mask_seed,
                                      prg, private_bytes, public_bytes, seal, shamir_split)


def new_identity_key() -> bytes:
    """A client's X25519 private key for receiving shares, made once per run (kept in its own state)."""
    return private_bytes(X25519PrivateKey.generate())


def identity_public(identity: bytes) -> bytes:
    return public_bytes(X25519PrivateKey.from_private_bytes(identity))


WITNESS_SAMPLE = 40   # alive inputs' witnesses a client checks before unmasking a DP-noised sum


class SecAggClient:
    """One client's side of one round. Holds its secrets between the steps; `state()` and
    `from_state()` let a ClientApp keep them in its private node state."""

    def __init__(self, index: int, params: SecAggParams, round_id: bytes, identity: bytes, ca_public: bytes,
                 own_device: bytes, min_neighbours: int = MIN_NEIGHBOURS):
        problem = client_floor_problem(params, min_neighbours)
        if problem:
            raise ProtocolViolation(problem)
        if not 1 <= index <= params.max_clients:
            raise ProtocolViolation(f"index {index} outside 1..{params.max_clients}")
        self.index, self.params, self.round_id = index, params, round_id
        self.c_private, self.ca_public, self.min_neighbours = identity, ca_public, min_neighbours
        self.own_device = own_device
        self.s_private = private_bytes(X25519PrivateKey.generate())
        self.self_seed = secrets.token_bytes(32)
        self.s_publics: dict[int, bytes] = {}    # neighbours' mask-agreement keys
        self.held: dict[int, bytes] = {}         # owner -> my share of (b_owner, s_owner)
        self.c_publics: dict[int, bytes] = {}    # neighbours' identity keys (enrolment checked)
        self.devices: dict[int, bytes] = {}      # neighbours' device keys: they sign the view
        self.seal_keys: dict[int, bytes] = {}    # neighbour -> the round's key for shares to and from it
        self.view = b""                          # the view this client signed (once per round)
        self.task = b""                          # what the round asked of it (shared/protocol.py: task_digest)
        self.masked = False                      # a masked input was sent this round (once only)
        self.answered = False
        self.min_alive = 0                       # distributed DP: the fewest inputs whose sum it helps unmask

    def graph(self) -> dict[int, list[int]]:
        return neighbour_graph(self.params.max_clients, self.params.neighbours, self.round_id)

    def _view(self, alive: list[int], dropped: list[int], signer: int) -> bytes:
        try:
            return view_message(self.round_id, alive, dropped, (self.params.max_clients, self.params.neighbours),
                                signer, self.task)
        except ValueError as err:
            raise ProtocolViolation(str(err)) from None

    @property
    def s_public(self) -> bytes:
        return public_bytes(X25519PrivateKey.from_private_bytes(self.s_private))

    # step 1
    def share_keys(self, neighbour_records: dict[int, bytes],
                   verified: set[bytes] | None = None) -> tuple[bytes, bytes, dict[int, bytes]]:
        """neighbour -> its identity record. Returns (my s public key, a commitment to my
        self-mask seed, neighbour -> sealed shares for it). A neighbour whose record is not
        enrolled with this client's CA is left out; refuses a neighbourhood below its floors or
        one in which the threshold is not above two thirds of the actual holders. `verified`: digests
        of the records this device already checked (a run's records do not change); new ones are added."""
        if self.index in neighbour_records:
            raise ProtocolViolation("a client is not its own neighbour")
        if not set(neighbour_records) <= set(self.graph()[self.index]):
            # The graph follows from the round id: a server cannot hand out another one (e.g.
            # disjoint groups whose sums it could unmask one by one).
            raise ProtocolViolation("neighbours outside this round's graph")
        verified = set() if verified is None else verified
        for v, blob in neighbour_records.items():
            try:
                record = IdentityRecord.from_bytes(blob)
            except ValueError:
                continue
            digest = record_digest(blob)
            if digest in verified or record.verify(self.ca_public):
                verified.add(digest)
                self.c_publics[v], self.devices[v] = record.identity_public, record.device_public
        # One device, one neighbour: a server listing a colluder's record under several numbers
        # (or this client's own) would hand that colluder several shares of each secret.
        devices = [*self.devices.values(), self.own_device]
        identities = [*self.c_publics.values(), identity_public(self.c_private)]
        if len(set(devices)) != len(devices) or len(set(identities)) != len(identities):
            raise ProtocolViolation("the neighbour records repeat a device or an identity key")
        holders = sorted([*self.c_publics, self.index])
        problem = holders_problem(self.params, len(holders), self.min_neighbours)
        if problem:
            raise ProtocolViolation(problem)
        b_shares = shamir_split(self.self_seed, self.params.threshold, holders)
        s_shares = shamir_split(self.s_private, self.params.threshold, holders)
        s_public = self.s_public
        sealed = {}
        c_key = load_private(self.c_private)
        for v in holders:
            bundle = b_shares[v] + s_shares[v]
            if v == self.index:
                self.held[v] = bundle
                continue
            # One key per pair and round, both ways (the kdf orders the pair; the AAD names the sender).
            self.seal_keys[v] = kdf(agree(c_key, self.c_publics[v]), b"shares", self.round_id, self.index, v)
            sealed[v] = seal(self.seal_keys[v], bundle, self._aad(self.index, v, s_public))
        return s_public, commit_seed(self.self_seed, self.round_id, self.index), sealed

    # step 2
    def open_inbox(self, inbox: dict[int, tuple[bytes, bytes]]) -> dict[int, tuple[bytes, bytes]]:
        """Check and open the inbox of step 2 (neighbour -> its shares sealed for me, its s public
        key) before anything of this user's data is used: refuses an inbox with fewer than t - 1
        senders, and shares that fail authentication. Senders this client did not accept as
        neighbours are ignored. Returns the inbox it accepted; calling it again is harmless."""
        if self.masked:
            raise ProtocolViolation("a masked input is sent once per round")
        inbox = {u: entry for u, entry in inbox.items() if u in self.c_publics}
        if len(inbox) < self.params.threshold - 1:
            raise ProtocolViolation(f"{len(inbox)} senders in the inbox, fewer than threshold - 1 = "
                                    f"{self.params.threshold - 1}")
        for u, (sealed, s_public) in inbox.items():
            try:
                self.held[u] = open_sealed(self.seal_keys[u], sealed, self._aad(u, self.index, s_public))
            except InvalidTag:
                raise ProtocolViolation(f"shares or mask key from client {u} fail authentication",
                                        blame=(u,)) from None
            self.s_publics[u] = s_public
        return inbox

    def masked_input(self, vector: np.ndarray, inbox: dict[int, tuple[bytes, bytes]],
                     rng: np.random.Generator) -> np.ndarray:
        """Mask the clipped, quantised `vector` with the self mask and a pairwise mask per sender of
        the inbox (opened by `open_inbox`: too few senders would leave the vector with too few
        pairwise masks (none, for an empty inbox), and a server that tells the holders this client
        is alive would read it from its self mask). Refuses a second masked input in a round."""
        inbox = self.open_inbox(inbox)
        y = quantise(vector, self.params, rng)
        y += prg(self.self_seed, len(y), y.dtype)
        self.masked = True
        s_key = load_private(self.s_private)
        for v in sorted(inbox):
            mask = prg(pair_mask_seed(s_key, self.s_publics[v], self.round_id, self.index, v), len(y), y.dtype)
            if self.index < v:
                y += mask
            else:
                y -= mask
        return y

    # step 3: the consistency round
    def confirm(self, alive: list[int], dropped: list[int], credentials: DeviceCredentials) -> bytes:
        """Sign the server's view of the round (who sent a masked input, who did not). Signed
        once: a second, different view is refused."""
        if not self.masked or self.index not in alive:
            raise ProtocolViolation("only a client that sent its masked input confirms the view")
        if set(alive) & set(dropped):
            raise ProtocolViolation("a client cannot be both alive and dropped")
        # The view must match this client's own masking: every neighbour called alive masked with
        # it, and every one it masked with is accounted for. Otherwise a server that withheld part
        # of the inbox could call the senders dropped and strip every mask from this vector.
        masked_with, neighbours_alive = set(self.s_publics), set(alive) & set(self.c_publics)
        if not neighbours_alive <= masked_with:
            raise ProtocolViolation(f"neighbours {sorted(neighbours_alive - masked_with)} are called alive but sent "
                                    "this client no shares")
        if not masked_with <= set(alive) | set(dropped):
            raise ProtocolViolation("the view leaves out neighbours this client masked with")
        view = self._view(alive, dropped, self.index)
        if self.view and self.view != view:
            raise ProtocolViolation("a second, different view of the round is refused")
        self.view = view
        return credentials.sign(view)

    # step 4
    def unmask_shares(self, alive: list[int], dropped: list[int], signatures: dict[int, bytes],
                      witnesses: dict[int, bytes] | None = None) -> dict[int, bytes]:
        """The b share of each alive holder-owner, the s-key share of each dropped one, once,
        and only for the view this client signed, signed too by at least t of its holders. With
        distributed noise (`min_alive`), also only when `witnesses` show that many alive inputs of
        distinct enrolled devices that signed the view (`_check_witnesses`)."""
        if self.answered:
            raise ProtocolViolation("unmasking is answered once per round")
        view = self._view(alive, dropped, self.index)
        if not self.view or view != self.view:
            raise ProtocolViolation("unmasking is answered only for the view this client signed")
        signed = 1   # this client's own signature of the view; then its holders', until t verify
        for v, signature in signatures.items():
            if signed >= self.params.threshold:
                break
            signed += v in self.devices and verify_view(self.devices[v], signature, self._view(alive, dropped, v))
        if signed < self.params.threshold:
            raise ProtocolViolation(f"{signed} of this client's holders signed the view, fewer than the "
                                    f"threshold {self.params.threshold}")
        if self.min_alive:
            self._check_witnesses(alive, dropped, witnesses or {})
        alive_set, dropped_set = set(alive), set(dropped)
        holders_alive = len(alive_set & {*self.c_publics, self.index})
        if holders_alive < self.params.threshold:
            raise ProtocolViolation(f"{holders_alive} alive holders < threshold {self.params.threshold}")
        self.answered = True
        out = {}
        for owner, bundle in self.held.items():
            if owner in alive_set:
                out[owner] = b"b" + bundle[:SHARE_BYTES]
            elif owner in dropped_set:
                out[owner] = b"s" + bundle[SHARE_BYTES:]
        return out

    def _check_witnesses(self, alive: list[int], dropped: list[int], witnesses: dict[int, bytes]) -> None:
        """The sum this client helps unmask must carry at least `min_alive` noise shares. The server
        could pad the alive list with numbers that are nobody, or cut the graph so that part of the
        round unmasks alone. So only inputs connected to this one through alive neighbours in the
        round's graph count (the part whose masks it helps remove), each needs a witness (identity
        record + its signature of the view under its own number), all of distinct devices, and a
        random sample of WITNESS_SAMPLE of them, drawn here after the server committed, is checked
        against the CA. A made-up fraction f passes with probability (1 - f)^WITNESS_SAMPLE."""
        part = _connected(self.graph(), set(alive), self.index)
        witnessed = {u: w for u, w in witnesses.items() if u in part and len(w) == RECORD_BYTES + 64}
        devices = {IdentityRecord.from_bytes(w[:RECORD_BYTES]).device_public for w in witnessed.values()}
        if len(witnessed) < self.min_alive or len(devices) < len(witnessed):
            raise ProtocolViolation(f"{len(witnessed)} witnessed inputs of {len(devices)} distinct devices in this "
                                    f"client's part of the round, fewer than the {self.min_alive} this client's "
                                    "input must be summed with (noise shares, or a floor on the contributors)")
        chosen = secrets.SystemRandom().sample(sorted(witnessed), min(WITNESS_SAMPLE, len(witnessed)))
        for u in chosen:
            record = IdentityRecord.from_bytes(witnessed[u][:RECORD_BYTES])
            if not record.verify(self.ca_public) or not verify_view(
                    record.device_public, witnessed[u][RECORD_BYTES:], self._view(alive, dropped, u)):
                raise ProtocolViolation(f"the witness of alive input {u} is no enrolled device's signature of "
                                        "this view", blame=(u,))

    def _aad(self, sender: int, recipient: int, sender_s_public: bytes) -> bytes:
        return self.round_id + sender.to_bytes(4, "big") + recipient.to_bytes(4, "big") + sender_s_public

    # persistence between steps, in the client's own (never sent) state
    _MAPS = ("s_publics", "held", "c_publics", "devices", "seal_keys")
    _BYTES = ("round_id", "c_private", "ca_public", "own_device", "s_private", "self_seed", "view", "task")

    def state(self) -> dict[str, bytes]:
        numbers = [self.index, self.params.neighbours, self.params.threshold, self.params.max_clients,
                   self.min_neighbours, int(self.masked), int(self.answered), self.min_alive, int(self.params.exact)]
        return {"numbers": np.array(numbers, dtype=">i8").tobytes(),
                "clip": np.array([self.params.clip], dtype=">f8").tobytes(),
                **{name: getattr(self, name) for name in self._BYTES},
                **{name: _pack(getattr(self, name)) for name in self._MAPS}}

    @classmethod
    def from_state(cls, state: dict[str, bytes]) -> "SecAggClient":
        index, k, t, n, floor, masked, answered, min_alive, exact = (
            int(x) for x in np.frombuffer(state["numbers"], dtype=">i8"))
        client = cls.__new__(cls)
        client.index, client.min_neighbours, client.masked, client.answered = index, floor, bool(masked), bool(answered)
        client.min_alive = min_alive
        client.params = SecAggParams(k, t, float(np.frombuffer(state["clip"], dtype=">f8")[0]), n, bool(exact))
        for name in cls._BYTES:
            setattr(client, name, bytes(state.get(name, b"")))
        for name in cls._MAPS:
            setattr(client, name, _unpack(bytes(state[name])))
        return client


def _connected(graph: dict[int, list[int]], alive: set[int], start: int) -> set[int]:
    """The alive clients reachable from `start` through alive neighbours."""
    seen, stack = {start}, [start]
    while stack:
        for v in graph.get(stack.pop(), ()):
            if v in alive and v not in seen:
                seen.add(v)
                stack.append(v)
    return seen


def _pack(d: dict[int, bytes]) -> bytes:
    return b"".join(k.to_bytes(4, "big") + len(v).to_bytes(2, "big") + v for k, v in sorted(d.items()))


def _unpack(blob: bytes) -> dict[int, bytes]:
    out, i = {}, 0
    while i < len(blob):
        k, n = int.from_bytes(blob[i:i + 4], "big"), int.from_bytes(blob[i + 4:i + 6], "big")
        out[k] = blob[i + 6:i + 6 + n]
        i += 6 + n
    return out
