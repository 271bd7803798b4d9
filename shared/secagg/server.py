"""The server's side of a secure-aggregation round (the state machine behind server/secure.py):
route, sum, unmask; it never holds an unmasked individual vector."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedrec.shared.secagg.fixed_point import dequantise
from fedrec.shared.secagg.params import RoundAborted, SecAggParams, neighbour_graph
from fedrec.shared.secagg.primitives import (SEALED_BYTES, SHARE_BYTES, commit_seed, load_private, pair_mask_seed, prg,
                                      public_bytes, shamir_combine, shamir_interpolate)

MAX_SUBSETS = 64   # subsets of t shares tried per secret before the round is given up


class SecAggServer:
    """The server's side of one round over clients 1..n. It routes, sums and unmasks; it
    never holds an unmasked individual vector."""

    def __init__(self, n: int, params: SecAggParams, round_id: bytes, graph_seed: bytes | None = None):
        if n > params.max_clients:
            raise ValueError(f"{n} clients > max_clients={params.max_clients}")
        self.n, self.params, self.round_id = n, params, round_id
        # The graph follows from the round id (which the clients sign), so every client can rebuild
        # it and check its own neighbours and the part of the round its sum is connected to.
        self.graph = neighbour_graph(n, params.neighbours, graph_seed or round_id)
        self.identities: dict[int, bytes] = {}
        self.keys: dict[int, tuple[bytes, bytes]] = {}  # client -> (identity, s) public keys
        self.shared: set[int] = set()
        self.alive: list[int] = []
        self.total: np.ndarray | None = None
        self.commitments: dict[int, bytes] = {}         # client -> commitment to its self-mask seed
        self.rejected: list[tuple[int, str]] = []       # (client, why): what was dropped from replies

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
    def route_shares(self, replies: dict[int, tuple[bytes, bytes, dict[int, bytes]]]) -> dict[int, dict[int, tuple[bytes, bytes]]]:
        """sender -> (its s public key, commitment to its seed, {recipient: ciphertext}). Returns
        recipient -> {sender: (ciphertext, sender's s public key)}, among clients that sent their
        shares. A malformed reply drops its sender, with the reason in `rejected`."""
        replies = {u: r for u, r in replies.items() if u in self.identities and self._well_formed(u, r)}
        self.keys = {u: (self.identities[u], s_public) for u, (s_public, _, _) in replies.items()}
        self.commitments = {u: commitment for u, (_, commitment, _) in replies.items()}
        self.shared = set(replies)
        self._need(len(self.shared), "shares")
        inbox: dict[int, dict[int, tuple[bytes, bytes]]] = {u: {} for u in self.shared}
        for sender, (s_public, _, boxes) in replies.items():
            for recipient, box in boxes.items():
                if recipient in self.shared:
                    inbox[recipient][sender] = (box, s_public)
        return inbox

    def _well_formed(self, u: int, reply) -> bool:
        try:
            s_public, commitment, boxes = reply
            ok = (isinstance(s_public, bytes) and len(s_public) == 32 and isinstance(commitment, bytes)
                  and len(commitment) == 32 and set(boxes) <= set(self.graph[u])
                  and all(isinstance(b, bytes) and len(b) == SEALED_BYTES for b in boxes.values()))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            self.rejected.append((u, "malformed keys or shares; dropped from the round"))
        return ok

    # after step 2
    def receive_masked(self, masked: dict[int, np.ndarray]) -> tuple[list[int], list[int]]:
        """Sum the masked vectors. Returns the round's view, the same for every client: (alive:
        sent a masked input, dropped: shared keys but did not)."""
        self.alive = sorted(u for u in masked if u in self.shared)
        self._need(len(self.alive), "masked inputs")
        self.total = np.zeros_like(next(iter(masked.values())), dtype=self.params.dtype)
        for u in self.alive:
            self.total += masked[u]
        return self.alive, sorted(self.shared - set(self.alive))

    # after step 3 (consistency)
    def signatures_for(self, signatures: dict[int, bytes]) -> dict[int, dict[int, bytes]]:
        """client -> the view signatures of its holders (its neighbours and itself) that came in,
        for each alive client that signed: each checks that a threshold of its holders did."""
        return {u: {v: signatures[v] for v in [*self.graph[u], u] if v in signatures}
                for u in self.alive if u in signatures}

    # after step 4
    def unmask(self, answers: dict[int, dict[int, bytes]]) -> tuple[np.ndarray, int]:
        """holder -> {owner: share}. Returns (decoded sum of the alive clients' vectors, how
        many). Malformed and inconsistent shares are dropped (reasons in `rejected`); raises
        RoundAborted when a secret does not have t consistent shares."""
        b_shares, s_shares = self._sort_shares(answers)
        alive = set(self.alive)
        total = self.total.copy()
        for u, shares in b_shares.items():
            seed = self._rebuild(shares, u, "self-mask seed",
                                 lambda seed, u=u: commit_seed(seed, self.round_id, u) == self.commitments[u])
            total -= prg(seed, len(total), total.dtype)
        for u, shares in s_shares.items():
            s_private = self._rebuild(shares, u, "mask key", lambda key, u=u: public_bytes(
                X25519PrivateKey.from_private_bytes(key)) == self.keys[u][1])
            s_key = load_private(s_private)
            for v in self.graph[u]:
                if v in alive:  # v added +mask if v < u, else -mask: take it back out
                    mask = prg(pair_mask_seed(s_key, self.keys[v][1], self.round_id, u, v), len(total), total.dtype)
                    if v < u:
                        total -= mask
                    else:
                        total += mask
        return dequantise(total, self.params, len(alive)), len(alive)

    def _sort_shares(self, answers: dict) -> tuple[dict[int, dict[int, bytes]], dict[int, dict[int, bytes]]]:
        """Each alive owner's b shares and each dropped owner's s shares, from holders that hold
        them; anything else in an answer is dropped with a reason."""
        alive, dropped = set(self.alive), self.shared - set(self.alive)
        b_shares: dict[int, dict[int, bytes]] = {u: {} for u in alive}
        s_shares: dict[int, dict[int, bytes]] = {u: {} for u in dropped}
        for holder, shares in answers.items():
            if holder not in alive:
                self.rejected.append((holder, "unmask answer from a client not alive; dropped"))
                continue
            for owner, share in shares.items():
                wanted = (b_shares if owner in alive else s_shares).get(owner)
                kind = b"b" if owner in alive else b"s"
                if (wanted is None or owner not in [*self.graph[holder], holder] or not isinstance(share, bytes)
                        or len(share) != 1 + SHARE_BYTES or share[:1] != kind):
                    self.rejected.append((holder, f"malformed or unasked share for client {owner}; dropped"))
                    continue
                wanted[holder] = share[1:]
        return b_shares, s_shares

    def _rebuild(self, shares: dict[int, bytes], owner: int, what: str, verify: Callable[[bytes], bool]) -> bytes:
        """The secret from t of `shares` that passes `verify`: the first t (all honest: the one
        try), else random subsets of t, which avoid a few bad shares among a surplus with high
        probability; then the shares off the polynomial the secret lies on are reported in
        `rejected` (a bad share outside the first t is never used, so it is not looked for)."""
        t = self.params.threshold
        if len(shares) < t:
            raise RoundAborted(f"{what} of client {owner}: {len(shares)} shares < threshold {t}")
        holders = sorted(shares)
        rng = np.random.default_rng(owner)
        subsets = [holders[:t]] + [sorted(rng.choice(holders, size=t, replace=False).tolist())
                                   for _ in range(MAX_SUBSETS if len(holders) > t else 0)]
        for attempt, subset in enumerate(subsets):
            chosen = {x: shares[x] for x in subset}
            try:
                secret = shamir_combine(chosen)
            except ValueError:
                continue
            if verify(secret):
                # Some share was bad (the first t did not do): name the holders off the polynomial.
                for x in set(shares) - set(subset) if attempt else ():
                    if shamir_interpolate(chosen, x) != int.from_bytes(shares[x], "big"):
                        self.rejected.append((x, f"inconsistent share of client {owner}'s {what}; dropped"))
                return secret
        raise RoundAborted(f"{what} of client {owner}: no {t} consistent shares among {len(shares)}")
