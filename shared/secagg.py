"""Secure aggregation: the server learns the sum of the clients' vectors and nothing else.

SecAgg+ (Bell et al., CCS 2020), the sparse-graph form of SecAgg (Bonawitz et al., CCS 2017),
for an honest-but-curious server. Plain functions and two small state machines, no Flower;
`server/secure.py` and `client/app.py` carry the messages.

Every client has an identity key: an X25519 key pair `c` made once per run and kept in its
own state, whose public half the server registers before the client's first round and
routes to its neighbours (what a PKI does in SecAgg). It only encrypts shares in transit.

One round, clients numbered 1..n on a random k-regular graph chosen by the server:
  1 shares   client u makes a fresh X25519 key pair s (to agree masks) and a 32-byte self-mask
             seed b_u, and Shamir-shares b_u and its s private key t-of-m among its holders
             (its graph neighbours and itself). Each neighbour's shares go out under AES-GCM
             with a key from X25519 + HKDF of the two identity keys and the round id, bound to
             u's s public key, so the server, which routes them, can neither read them nor
             swap u's mask key unnoticed. u sends its s public key and the sealed shares.
  2 masked   u clips its vector, quantises it to the ring Z_2^32, adds PRG(b_u) and, for every
             neighbour v that shared keys, +PRG(s_uv) if u < v else -PRG(s_uv), where s_uv comes
             from X25519 + HKDF of the s keys. PRG = AES-256-CTR keystream.
  3 unmask   the server says who sent a masked vector (alive) and who did not (dropped). Every
             alive holder answers with its b share of each alive neighbour and its s-key share
             of each dropped one: never both for the same client.
  The server rebuilds b_u of the alive (removing self masks) and the s key of the dropped
  (removing the pairwise masks they left in their alive neighbours' vectors); the pairwise
  masks among alive clients cancel in the sum. Fewer than t shares of any needed secret:
  `RoundAborted`, and the caller leaves the model as it was.

Bonawitz et al. make c fresh each round too, which costs a message exchange per round. The
server never asks for c (it rebuilds only s and b, which stay per round), so a long-lived c
loses only forward secrecy of the sealed shares: someone who recorded them and later steals
a client's c reads that client's shares of its neighbours' secrets, one share per secret,
the same as a colluding client (docs/threat-model.md).

What the server sees: who took part in each step, public keys, ciphertexts, masked vectors
(uniform on the ring by themselves), at most one kind of secret per client, and the sum.
docs/threat-model.md says what this protects against and what it does not.
"""
from __future__ import annotations

import functools
import math
import secrets
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PrivateFormat, PublicFormat, NoEncryption

RING_BITS = 32
HALF_RING = 2 ** (RING_BITS - 1)


class RoundAborted(RuntimeError):
    """Too few clients or shares to finish the round; nothing about it may be applied."""


class ProtocolViolation(RuntimeError):
    """A request an honest client must refuse (it would let the server unmask someone)."""


# ---------------------------------------------------------------- parameters and graph

@dataclass(frozen=True)
class SecAggParams:
    neighbours: int        # k: graph degree; a client masks with and shares among k others
    threshold: int         # t: shares needed to rebuild a secret, of the k + 1 holders
    clip: float            # each vector is clipped to this L2 norm before quantising
    max_clients: int       # most summands: sets the fixed-point scale so the sum never wraps

    def __post_init__(self):
        if not 1 <= self.threshold <= self.neighbours + 1:
            raise ValueError(f"threshold {self.threshold} must be in 1..neighbours + 1 ({self.neighbours + 1})")
        if self.threshold <= (self.neighbours + 1) // 2:
            raise ValueError(f"threshold {self.threshold} must be a strict majority of the "
                             f"{self.neighbours + 1} holders")
        if self.clip <= 0 or self.max_clients < 1:
            raise ValueError("clip must be > 0 and max_clients >= 1")

    @property
    def scale(self) -> float:
        """Fixed-point scale: max_clients values of magnitude <= bound (+1 from rounding) stay
        inside the signed half of the ring, so the sum decodes exactly."""
        return (HALF_RING - 1) / (self.max_clients * (self.bound + 1))

    @property
    def bound(self) -> float:
        """Largest magnitude of one coordinate: the clip (L2 >= any coordinate), or 1 for a
        weight in [0, 1]."""
        return max(self.clip, 1.0)


def unrecoverable_probability(n: int, k: int, t: int, dropout: float) -> float:
    """Union bound on the chance that some client keeps fewer than t live holders (of its
    k + 1) when each client drops independently with probability `dropout`."""
    m = k + 1
    tail = sum(math.comb(m, d) * dropout ** d * (1 - dropout) ** (m - d) for d in range(m - t + 1, m + 1))
    return min(1.0, n * tail)


def default_params(n: int, clip: float, *, dropout: float = 0.1, failure: float = 1e-3) -> SecAggParams:
    """SecAgg+ sizing for n clients: the smallest even degree k >= 2 log2 n (so the graph stays
    connected, Bell et al. Sec. 3) with a majority threshold for which a round survives
    `dropout` of its clients with probability >= 1 - failure; the complete graph (SecAgg) when
    n is too small for that."""
    k = max(2, 2 * math.ceil(math.log2(max(n, 2))))
    k += k % 2
    while k < n - 1:
        t = (k + 1) // 2 + 1
        if unrecoverable_probability(n, k, t, dropout) <= failure:
            return SecAggParams(k, t, clip, n)
        k += 2
    k = n - 1
    return SecAggParams(k, (k + 1) // 2 + 1, clip, n)


def neighbour_graph(n: int, k: int, seed: bytes) -> dict[int, list[int]]:
    """Clients 1..n -> their neighbours: a Harary graph (each joined to k/2 on either side of
    a ring) over a random placement, as SecAgg+ prescribes. k >= n - 1: the complete graph."""
    if k >= n - 1:
        return {u: [v for v in range(1, n + 1) if v != u] for u in range(1, n + 1)}
    order = np.random.default_rng(np.frombuffer(seed, dtype=np.uint32)).permutation(n) + 1
    half = k // 2
    graph: dict[int, set[int]] = {int(u): set() for u in order}
    for pos, u in enumerate(order):
        for step in range(1, half + 1):
            v = int(order[(pos + step) % n])
            graph[int(u)].add(v)
            graph[v].add(int(u))
    return {u: sorted(vs) for u, vs in sorted(graph.items())}


# ---------------------------------------------------------------- primitives (all from libraries)

def _kdf(shared_secret: bytes, purpose: bytes, round_id: bytes, u: int, v: int) -> bytes:
    lo, hi = min(u, v), max(u, v)
    info = b"fedrec-secagg|" + purpose + b"|" + round_id + lo.to_bytes(4, "big") + hi.to_bytes(4, "big")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared_secret)


def prg(seed: bytes, length: int) -> np.ndarray:
    """`length` uniform ring elements from a 32-byte seed: the AES-256-CTR keystream (AES-NI:
    0.19 ms per MB here, against 0.36 ms for ChaCha20). Every seed expands one vector only
    (seeds are fresh per round), so a fixed counter block is safe."""
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(b"\x00" * 16)).encryptor()
    return np.frombuffer(encryptor.update(_zeros(4 * length)), dtype="<u4")  # read-only view


@functools.lru_cache(maxsize=4)
def _zeros(n: int) -> bytes:
    return bytes(n)


def _private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def _public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _agree(private: bytes, public: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(public))


def pair_mask_seed(s_private: bytes, s_public_other: bytes, round_id: bytes, u: int, v: int) -> bytes:
    return _kdf(_agree(s_private, s_public_other), b"mask", round_id, u, v)


# Shamir over the prime field of p = 2^521 - 1 (a Mersenne prime, so one element holds a
# whole 32-byte secret). pycryptodome's Shamir works in GF(2^128) in pure Python: at 100
# holders it took 0.5 s to split and 0.35 s to combine per client, most of a round.
PRIME = 2 ** 521 - 1
SHARE_BYTES = 66


def shamir_split(secret: bytes, threshold: int, holders: list[int]) -> dict[int, bytes]:
    """32-byte secret -> one share per holder id (the id is the evaluation point, so ids must
    be distinct and >= 1); any `threshold` shares rebuild it, fewer say nothing about it."""
    if len(secret) != 32 or min(holders) < 1 or len(set(holders)) != len(holders):
        raise ValueError("a 32-byte secret and distinct holder ids >= 1")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in holders:
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares[x] = y.to_bytes(SHARE_BYTES, "big")
    return shares


def shamir_combine(shares: dict[int, bytes]) -> bytes:
    """holder id -> share (at least `threshold` of them) -> the secret, by Lagrange at 0."""
    xs = list(shares)
    secret = 0
    for x_i in xs:
        numerator, denominator = 1, 1
        for x_j in xs:
            if x_j != x_i:
                numerator = numerator * -x_j % PRIME
                denominator = denominator * (x_i - x_j) % PRIME
        secret = (secret + int.from_bytes(shares[x_i], "big") * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret >= 2 ** 256:
        raise ValueError("shares do not interpolate to a 32-byte secret (too few or corrupted)")
    return secret.to_bytes(32, "big")


def _seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = secrets.token_bytes(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def _open(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    return AESGCM(key).decrypt(sealed[:12], sealed[12:], aad)


# ---------------------------------------------------------------- fixed point

def clip_l2(vector: np.ndarray, clip: float) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return vector * (clip / norm) if norm > clip else vector


def quantise(vector: np.ndarray, params: SecAggParams, rng: np.random.Generator) -> np.ndarray:
    """Coordinates in [-bound, bound] -> ring elements, by unbiased stochastic rounding
    (error < 1/scale per coordinate)."""
    if np.abs(vector).max(initial=0.0) > params.bound * (1 + 1e-9):
        raise ValueError("vector exceeds the quantisation bound: clip it first")
    # floor(x + U[0,1)) is x rounded up with probability frac(x): unbiased.
    rounded = np.floor(vector.astype(np.float64) * params.scale + rng.random(vector.shape))
    return (rounded.astype(np.int64) & 0xFFFFFFFF).astype(np.uint32)  # two's complement onto the ring


def dequantise(total: np.ndarray, params: SecAggParams, summands: int) -> np.ndarray:
    if summands > params.max_clients:
        raise ValueError(f"{summands} summands exceed max_clients={params.max_clients}: the sum may have wrapped")
    signed = total.astype(np.int64)
    signed[signed >= HALF_RING] -= 2 ** RING_BITS
    return signed / params.scale


def quantisation_error_bound(params: SecAggParams, summands: int) -> float:
    """Most any coordinate of the decoded sum can differ from the exact sum."""
    return summands / params.scale


# ---------------------------------------------------------------- client

def new_identity_key() -> bytes:
    """A client's long-lived X25519 private key for receiving shares (kept in its own state)."""
    return _private_bytes(X25519PrivateKey.generate())


def identity_public(identity: bytes) -> bytes:
    return _public_bytes(X25519PrivateKey.from_private_bytes(identity))


class SecAggClient:
    """One client's side of one round. Holds its secrets between the steps; `state()` and
    `from_state()` let a ClientApp keep them in its private node state."""

    def __init__(self, index: int, params: SecAggParams, round_id: bytes, identity: bytes):
        self.index, self.params, self.round_id = index, params, round_id
        self.c_private = identity
        self.s_private = _private_bytes(X25519PrivateKey.generate())
        self.self_seed = secrets.token_bytes(32)
        self.s_publics: dict[int, bytes] = {}    # neighbours' mask-agreement keys
        self.held: dict[int, bytes] = {}         # owner -> my share of (b_owner, s_owner)
        self.masked_with: list[int] = []         # neighbours whose pairwise mask I added
        self._c_publics: dict[int, bytes] = {}   # neighbours' identity keys
        self.answered = False

    @property
    def s_public(self) -> bytes:
        return _public_bytes(X25519PrivateKey.from_private_bytes(self.s_private))

    # step 1
    def share_keys(self, neighbour_identities: dict[int, bytes]) -> tuple[bytes, dict[int, bytes]]:
        """neighbour -> its identity public key. Returns (my s public key, neighbour -> sealed
        shares for it). Refuses if its secrets could not be rebuilt."""
        if self.index in neighbour_identities:
            raise ProtocolViolation("a client is not its own neighbour")
        holders = sorted([*neighbour_identities, self.index])
        if len(holders) < self.params.threshold:
            raise RoundAborted(f"client {self.index}: {len(holders)} holders < threshold {self.params.threshold}")
        b_shares = shamir_split(self.self_seed, self.params.threshold, holders)
        s_shares = shamir_split(self.s_private, self.params.threshold, holders)
        s_public = self.s_public
        sealed = {}
        for v in holders:
            bundle = b_shares[v] + s_shares[v]
            if v == self.index:
                self.held[v] = bundle
                continue
            key = _kdf(_agree(self.c_private, neighbour_identities[v]), b"shares", self.round_id, self.index, v)
            sealed[v] = _seal(key, bundle, self._aad(self.index, v, s_public))
        self._c_publics = dict(neighbour_identities)
        return s_public, sealed

    # step 2
    def masked_input(self, vector: np.ndarray, inbox: dict[int, tuple[bytes, bytes]],
                     rng: np.random.Generator) -> np.ndarray:
        """inbox: neighbour -> (its shares sealed for me, its s public key), for the
        neighbours that shared. Decrypt the shares (which authenticate the s key), then mask
        the clipped, quantised `vector` with the self mask and a pairwise mask per sender."""
        for u, (sealed, s_public) in inbox.items():
            if u not in self._c_publics:
                raise ProtocolViolation(f"shares from client {u}, who is not a neighbour")
            key = _kdf(_agree(self.c_private, self._c_publics[u]), b"shares", self.round_id, u, self.index)
            try:
                self.held[u] = _open(key, sealed, self._aad(u, self.index, s_public))
            except InvalidTag:
                raise ProtocolViolation(f"shares or mask key from client {u} fail authentication") from None
            self.s_publics[u] = s_public
        y = quantise(vector, self.params, rng)
        y += prg(self.self_seed, len(y))
        self.masked_with = sorted(inbox)
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
        if self.index not in alive_set:
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
                "held": pack(self.held), "answered": bytes([self.answered])}

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
        return client


# ---------------------------------------------------------------- server

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
            if _public_bytes(X25519PrivateKey.from_private_bytes(s_private)) != self.keys[u][1]:
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


# ---------------------------------------------------------------- one client's contribution

LOSS_SCALE = 32.0  # a training loss enters the sum divided by this, to stay inside the bound


def encode_contribution(delta_flat: np.ndarray, weight: float, loss: float) -> np.ndarray:
    """What a client feeds into the secure sum: [weight * delta, weight, weight * loss / 32].
    The server gets sum(w * delta) / sum(w), the weighted mean, and a mean loss, without any
    client's weight (its history length) or loss. `weight` must be in [0, 1] and the delta
    already clipped, so every coordinate is within the quantisation bound."""
    if not 0 <= weight <= 1:
        raise ValueError(f"weight {weight} outside [0, 1]")
    loss_term = min(max(float(loss), 0.0), LOSS_SCALE) / LOSS_SCALE if np.isfinite(loss) else 0.0
    return np.concatenate([delta_flat.astype(np.float64) * weight, [weight, weight * loss_term]])


def decode_mean(total: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Sum of contributions -> (weighted mean delta, total weight, weighted mean loss)."""
    weight = float(total[-2])
    if weight <= 0:
        raise RoundAborted("the clients' weights sum to zero: nothing to average")
    return (total[:-2] / weight).astype(np.float32), weight, float(total[-1]) / weight * LOSS_SCALE
