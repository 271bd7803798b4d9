"""One client's side of a secure-aggregation round (the state machine behind client/secure.py)."""
from __future__ import annotations

import secrets

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from shared.secagg.fixed_point import quantise
from shared.secagg.params import (MIN_NEIGHBOURS, ProtocolViolation, SecAggParams, client_floor_problem,
                                  holders_problem)
from shared.secagg.primitives import (SHARE_BYTES, agree, commit_seed, kdf, open_sealed, pair_mask_seed, prg, private_bytes,
                                      public_bytes, seal, shamir_split)


def new_identity_key() -> bytes:
    """A client's long-lived X25519 private key for receiving shares (kept in its own state)."""
    return private_bytes(X25519PrivateKey.generate())


def identity_public(identity: bytes) -> bytes:
    return public_bytes(X25519PrivateKey.from_private_bytes(identity))


class SecAggClient:
    """One client's side of one round. Holds its secrets between the steps; `state()` and
    `from_state()` let a ClientApp keep them in its private node state."""

    def __init__(self, index: int, params: SecAggParams, round_id: bytes, identity: bytes,
                 min_neighbours: int = MIN_NEIGHBOURS):
        problem = client_floor_problem(params, min_neighbours)
        if problem:
            raise ProtocolViolation(problem)
        self.index, self.params, self.round_id = index, params, round_id
        self.min_neighbours = min_neighbours
        self.c_private = identity
        self.s_private = private_bytes(X25519PrivateKey.generate())
        self.self_seed = secrets.token_bytes(32)
        self.s_publics: dict[int, bytes] = {}    # neighbours' mask-agreement keys
        self.held: dict[int, bytes] = {}         # owner -> my share of (b_owner, s_owner)
        self.masked_with: list[int] = []         # neighbours whose pairwise mask I added
        self._c_publics: dict[int, bytes] = {}   # neighbours' identity keys
        self.masked = False                      # a masked input was sent this round (once only)
        self.answered = False

    @property
    def s_public(self) -> bytes:
        return public_bytes(X25519PrivateKey.from_private_bytes(self.s_private))

    # step 1
    def share_keys(self, neighbour_identities: dict[int, bytes]) -> tuple[bytes, bytes, dict[int, bytes]]:
        """neighbour -> its identity public key. Returns (my s public key, a commitment to my
        self-mask seed, neighbour -> sealed shares for it). Refuses neighbourhoods below its
        floors or in which the threshold is no strict majority of the actual holders."""
        if self.index in neighbour_identities:
            raise ProtocolViolation("a client is not its own neighbour")
        holders = sorted([*neighbour_identities, self.index])
        problem = holders_problem(self.params, len(holders), self.min_neighbours)
        if problem:
            raise ProtocolViolation(problem)
        b_shares = shamir_split(self.self_seed, self.params.threshold, holders)
        s_shares = shamir_split(self.s_private, self.params.threshold, holders)
        s_public = self.s_public
        sealed = {}
        for v in holders:
            bundle = b_shares[v] + s_shares[v]
            if v == self.index:
                self.held[v] = bundle
                continue
            key = kdf(agree(self.c_private, neighbour_identities[v]), b"shares", self.round_id, self.index, v)
            sealed[v] = seal(key, bundle, self._aad(self.index, v, s_public))
        self._c_publics = dict(neighbour_identities)
        return s_public, commit_seed(self.self_seed, self.round_id, self.index), sealed

    # step 2
    def masked_input(self, vector: np.ndarray, inbox: dict[int, tuple[bytes, bytes]],
                     rng: np.random.Generator) -> np.ndarray:
        """inbox: neighbour -> (its shares sealed for me, its s public key), for the
        neighbours that shared. Decrypt the shares (which authenticate the s key), then mask
        the clipped, quantised `vector` with the self mask and a pairwise mask per sender.
        Refuses a second masked input in a round, and an inbox with fewer than t - 1 senders:
        then the vector would carry too few pairwise masks (none, for an empty inbox) and a
        server that tells the holders this client is alive would read it from its self mask."""
        if self.masked:
            raise ProtocolViolation("a masked input is sent once per round")
        if len(inbox) < self.params.threshold - 1:
            raise ProtocolViolation(f"{len(inbox)} senders in the inbox, fewer than threshold - 1 = "
                                    f"{self.params.threshold - 1}")
        for u, (sealed, s_public) in inbox.items():
            if u not in self._c_publics:
                raise ProtocolViolation(f"shares from client {u}, who is not a neighbour")
            key = kdf(agree(self.c_private, self._c_publics[u]), b"shares", self.round_id, u, self.index)
            try:
                self.held[u] = open_sealed(key, sealed, self._aad(u, self.index, s_public))
            except InvalidTag:
                raise ProtocolViolation(f"shares or mask key from client {u} fail authentication") from None
            self.s_publics[u] = s_public
        y = quantise(vector, self.params, rng)
        y += prg(self.self_seed, len(y))
        self.masked_with = sorted(inbox)
        self.masked = True
        for v in self.masked_with:
            mask = prg(pair_mask_seed(self.s_private, self.s_publics[v], self.round_id, self.index, v), len(y))
            if self.index < v:
                y += mask
            else:
                y -= mask
        return y

    # step 3
    def unmask_shares(self, alive: list[int], dropped: list[int]) -> dict[int, bytes]:
        """The b share of each alive neighbour, the s-key share of each dropped one."""
        if self.answered:
            raise ProtocolViolation("unmasking is answered once per round")
        alive_set, dropped_set = set(alive), set(dropped)
        if alive_set & dropped_set:
            raise ProtocolViolation("a client cannot be both alive and dropped")
        if self.index not in alive_set or not self.masked:
            raise ProtocolViolation("only a client that sent its masked input takes part in unmasking")
        if len(alive_set) < self.params.threshold:
            raise ProtocolViolation(f"{len(alive_set)} alive clients < threshold {self.params.threshold}")
        # A neighbour I masked with but that the server calls dropped only gets its s key rebuilt;
        # one I never masked with (it sent no shares) has nothing in my vector to remove.
        self.answered = True
        out = {}
        for owner, bundle in self.held.items():
            if owner in alive_set:
                out[owner] = b"b" + bundle[:SHARE_BYTES]
            elif owner in dropped_set:
                out[owner] = b"s" + bundle[SHARE_BYTES:]
        return out

    def _aad(self, sender: int, recipient: int, sender_s_public: bytes) -> bytes:
        return self.round_id + sender.to_bytes(4, "big") + recipient.to_bytes(4, "big") + sender_s_public

    # persistence between steps, in the client's own (never sent) state
    def state(self) -> dict[str, bytes]:
        pack = lambda d: b"".join(k.to_bytes(4, "big") + len(v).to_bytes(2, "big") + v for k, v in sorted(d.items()))
        return {"index": self.index.to_bytes(4, "big"), "round": self.round_id,
                "params": np.array([self.params.neighbours, self.params.threshold, self.params.max_clients],
                                   dtype=">i8").tobytes() + np.array([self.params.clip], dtype=">f8").tobytes(),
                "c": self.c_private, "s": self.s_private, "b": self.self_seed,
                "s_publics": pack(self.s_publics), "c_publics": pack(self._c_publics),
                "held": pack(self.held), "answered": bytes([self.answered]),
                "masked": bytes([self.masked]), "min_neighbours": self.min_neighbours.to_bytes(4, "big")}

    @classmethod
    def from_state(cls, state: dict[str, bytes]) -> "SecAggClient":
        def unpack(blob: bytes) -> dict[int, bytes]:
            out, i = {}, 0
            while i < len(blob):
                k, n = int.from_bytes(blob[i:i + 4], "big"), int.from_bytes(blob[i + 4:i + 6], "big")
                out[k] = blob[i + 6:i + 6 + n]
                i += 6 + n
            return out
        ints = np.frombuffer(state["params"][:24], dtype=">i8")
        clip = float(np.frombuffer(state["params"][24:], dtype=">f8")[0])
        client = cls.__new__(cls)
        client.index = int.from_bytes(state["index"], "big")
        client.params = SecAggParams(int(ints[0]), int(ints[1]), clip, int(ints[2]))
        client.round_id = state["round"]
        client.c_private, client.s_private, client.self_seed = state["c"], state["s"], state["b"]
        client.s_publics, client._c_publics = unpack(state["s_publics"]), unpack(state["c_publics"])
        client.held, client.masked_with = unpack(state["held"]), []
        client.answered = bool(state["answered"][0])
        client.masked = bool(state["masked"][0])
        client.min_neighbours = int.from_bytes(state["min_neighbours"], "big")
        return client
