"""The server's side of a secure-aggregation round (the state machine behind server/secure.py):
route, sum, unmask; it never holds an unmasked individual vector."""
from __future__ import annotations

import secrets

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from shared.secagg.fixed_point import dequantise
from shared.secagg.params import RoundAborted, SecAggParams, neighbour_graph
from shared.secagg.primitives import pair_mask_seed, prg, public_bytes, shamir_combine


class SecAggServer:
    """The server's side of one round over clients 1..n. It routes, sums and unmasks; it
    never holds an unmasked individual vector."""

    def __init__(self, n: int, params: SecAggParams, round_id: bytes, graph_seed: bytes | None = None):
        if n > params.max_clients:
            raise ValueError(f"{n} clients > max_clients={params.max_clients}")
        self.n, self.params, self.round_id = n, params, round_id
        self.graph = neighbour_graph(n, params.neighbours, graph_seed or secrets.token_bytes(16))
        self.identities: dict[int, bytes] = {}
        self.keys: dict[int, tuple[bytes, bytes]] = {}  # client -> (identity, s) public keys
        self.shared: set[int] = set()
        self.alive: list[int] = []
        self.total: np.ndarray | None = None

    def _need(self, count: int, what: str) -> None:
        if count < self.params.threshold:
            raise RoundAborted(f"{what}: {count} clients < threshold {self.params.threshold}")

    # before step 1
    def receive_identities(self, identities: dict[int, bytes]) -> dict[int, dict[int, bytes]]:
        """client -> its registered identity public key. Returns, per client, its neighbours' keys."""
        self._need(len(identities), "identities")
        self.identities = dict(identities)
        return {u: {v: identities[v] for v in self.graph[u] if v in identities} for u in identities}

    # after step 1
    def route_shares(self, replies: dict[int, tuple[bytes, dict[int, bytes]]]) -> dict[int, dict[int, tuple[bytes, bytes]]]:
        """sender -> (its s public key, {recipient: ciphertext}). Returns recipient -> {sender:
        (ciphertext, sender's s public key)}, among clients that sent their shares."""
        replies = {u: r for u, r in replies.items() if u in self.identities}
        self.keys = {u: (self.identities[u], s_public) for u, (s_public, _) in replies.items()}
        self.shared = set(replies)
        self._need(len(self.shared), "shares")
        inbox: dict[int, dict[int, tuple[bytes, bytes]]] = {u: {} for u in self.shared}
        for sender, (s_public, boxes) in replies.items():
            for recipient, box in boxes.items():
                if recipient in self.shared:
                    inbox[recipient][sender] = (box, s_public)
        return inbox

    # after step 2
    def receive_masked(self, masked: dict[int, np.ndarray]) -> dict[int, tuple[list[int], list[int]]]:
        """Sum the masked vectors. Returns, per alive client, (alive, dropped) neighbours to
        ask shares for."""
        self.alive = sorted(u for u in masked if u in self.shared)
        self._need(len(self.alive), "masked inputs")
        self.total = np.zeros_like(next(iter(masked.values())), dtype=np.uint32)
        for u in self.alive:
            self.total += masked[u]
        alive = set(self.alive)
        dropped = self.shared - alive
        return {u: ([v for v in [*self.graph[u], u] if v in alive],
                    [v for v in self.graph[u] if v in dropped]) for u in self.alive}

    # after step 3
    def unmask(self, answers: dict[int, dict[int, bytes]]) -> tuple[np.ndarray, int]:
        """holder -> {owner: share}. Returns (decoded sum of the alive clients' vectors, how
        many). Raises RoundAborted when a secret has fewer than t shares."""
        alive, dropped = set(self.alive), self.shared - set(self.alive)
        b_shares: dict[int, dict[int, bytes]] = {u: {} for u in alive}
        s_shares: dict[int, dict[int, bytes]] = {u: {} for u in dropped}
        for holder, shares in answers.items():
            for owner, share in shares.items():
                kind, body = share[:1], share[1:]
                if kind == b"b" and owner in alive:
                    b_shares[owner][holder] = body
                elif kind == b"s" and owner in dropped:
                    s_shares[owner][holder] = body
        total = self.total.copy()
        for u, shares in b_shares.items():
            self._enough(shares, u, "self-mask seed")
            total -= prg(shamir_combine(_first(shares, self.params.threshold)), len(total))
        for u, shares in s_shares.items():
            self._enough(shares, u, "mask key")
            s_private = shamir_combine(_first(shares, self.params.threshold))
            if public_bytes(X25519PrivateKey.from_private_bytes(s_private)) != self.keys[u][1]:
                raise RoundAborted(f"rebuilt mask key of client {u} does not match its public key")
            for v in self.graph[u]:
                if v in alive:  # v added +mask if v < u, else -mask: take it back out
                    mask = prg(pair_mask_seed(s_private, self.keys[v][1], self.round_id, u, v), len(total))
                    if v < u:
                        total -= mask
                    else:
                        total += mask
        return dequantise(total, self.params, len(alive)), len(alive)

    def _enough(self, shares: dict[int, bytes], owner: int, what: str) -> None:
        if len(shares) < self.params.threshold:
            raise RoundAborted(f"{what} of client {owner}: {len(shares)} shares < threshold {self.params.threshold}")


def _first(shares: dict[int, bytes], count: int) -> dict[int, bytes]:
    return dict(sorted(shares.items())[:count])
