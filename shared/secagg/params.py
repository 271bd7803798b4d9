"""Secure aggregation's parameters (graph degree, threshold, fixed-point range), their
sizing for a round, the neighbour graph, and the two ways a round can fail."""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

RING_BITS = 32                # the ring Z_2^32 of real-valued contributions (fixed point)
HALF_RING = 2 ** (RING_BITS - 1)
EXACT_RING_BITS = 16          # whole numbers in {0, 1} (counts): Z_2^16 holds a sum of up to 32,767 of them


MIN_CLIENTS = 3      # a secure sum of fewer would tell each of two clients its partner's update
MIN_NEIGHBOURS = 4   # a client's own floor: it masks with and shares among at least this many others
                     # (all the round's others when the round is smaller); a device may raise it


class RoundAborted(RuntimeError):
    """Too few clients or shares to finish the round; nothing about it may be applied."""


class ProtocolViolation(RuntimeError):
    """A request an honest client must refuse (it would let the server unmask someone).
    `blame`: the clients (round numbers) whose messages made it refuse, when it knows."""

    def __init__(self, message: str, blame: tuple[int, ...] = ()):
        super().__init__(message)
        self.blame = tuple(blame)



@dataclass(frozen=True)
class SecAggParams:
    neighbours: int        # k: graph degree; a client masks with and shares among k others
    threshold: int         # t: shares needed to rebuild a secret, of the k + 1 holders
    clip: float            # each vector is clipped to this L2 norm before quantising
    max_clients: int       # most summands: sets the fixed-point scale so the sum never wraps
    exact: bool = False    # whole numbers in {0, 1} (counts), summed as they are: scale 1, on the
                           # smallest ring that holds max_clients of them (half the bytes and masks)

    def __post_init__(self):
        if not 1 <= self.threshold <= self.neighbours + 1:
            raise ValueError(f"threshold {self.threshold} must be in 1..neighbours + 1 ({self.neighbours + 1})")
        if 3 * self.threshold <= 2 * (self.neighbours + 1):
            raise ValueError(f"threshold {self.threshold} must exceed two thirds of the "
                             f"{self.neighbours + 1} holders")
        if self.clip <= 0 or self.max_clients < 1:
            raise ValueError("clip must be > 0 and max_clients >= 1")

    @property
    def ring_bits(self) -> int:
        """The ring Z_2^bits the masked vectors live in. Exact sums of at most 2^15 - 1 whole numbers
        in {0, 1} fit 16 bits (the co-occurrence counts: 5.7 MB -> 2.8 MB a device at ML-100K)."""
        return EXACT_RING_BITS if self.exact and self.max_clients < 2 ** (EXACT_RING_BITS - 1) else RING_BITS

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(f"<u{self.ring_bits // 8}")

    @property
    def scale(self) -> float:
        """Fixed-point scale: max_clients values of magnitude <= bound (+1 from rounding) stay
        inside the signed half of the ring, so the sum decodes exactly. Exact: 1 (whole numbers)."""
        if self.exact:
            return 1.0
        return (HALF_RING - 1) / (self.max_clients * (self.bound + 1))

    @property
    def bound(self) -> float:
        """Largest magnitude of one coordinate: the clip (L2 >= any coordinate), or 1 for a
        weight in [0, 1]; exact: 1 (a count of 0 or 1)."""
        return 1.0 if self.exact else max(self.clip, 1.0)


def min_threshold(holders: int) -> int:
    """The smallest t above two thirds of `holders`. A majority is not enough against a malicious
    server: with c colluders signing two views, two groups of size t - c each reach t when
    2t - c <= holders; above two thirds that needs c > holders / 3 (Bonawitz et al.: t > 2n/3)."""
    return 2 * holders // 3 + 1


def unrecoverable_probability(n: int, k: int, t: int, dropout: float) -> float:
    """Union bound on the chance that some client keeps fewer than t live holders (of its
    k + 1) when each client drops independently with probability `dropout`."""
    m = k + 1
    tail = sum(math.comb(m, d) * dropout ** d * (1 - dropout) ** (m - d) for d in range(m - t + 1, m + 1))
    return min(1.0, n * tail)


def default_params(n: int, clip: float, *, dropout: float = 0.1, failure: float = 1e-3) -> SecAggParams:
    """SecAgg+ sizing for n clients: the smallest even degree k >= 2 log2 n (so the graph stays
    connected, Bell et al. Sec. 3) with a two-thirds threshold for which a round survives
    `dropout` of its clients with probability >= 1 - failure; the complete graph (SecAgg) when
    n is too small for that."""
    k = max(2, 2 * math.ceil(math.log2(max(n, 2))))
    k += k % 2
    while k < n - 1:
        t = min_threshold(k + 1)
        if unrecoverable_probability(n, k, t, dropout) <= failure:
            return SecAggParams(k, t, clip, n)
        k += 2
    k = n - 1
    return SecAggParams(k, min_threshold(k + 1), clip, n)


def neighbour_graph(n: int, k: int, seed: bytes) -> dict[int, list[int]]:
    """Clients 1..n -> their neighbours: a Harary graph (each joined to k/2 on either side of
    a ring) over a random placement, as SecAgg+ prescribes. k >= n - 1: the complete graph."""
    if k >= n - 1:
        return {u: [v for v in range(1, n + 1) if v != u] for u in range(1, n + 1)}
    order = np.random.default_rng(np.frombuffer(hashlib.sha256(seed).digest(), dtype=np.uint32)).permutation(n) + 1
    half = k // 2
    # The client at ring position p is joined to those at p +- 1..half (distinct: 2 * half < n here).
    # In numpy: every client builds the whole graph each step, 29 ms a time at 943 clients in Python.
    offsets = np.concatenate([np.arange(1, half + 1), -np.arange(1, half + 1)])
    neighbours = np.sort(order[(np.arange(n)[:, None] + offsets[None, :]) % n], axis=1)
    rows = neighbours[np.argsort(order)].tolist()      # row i: client i + 1
    return {u: rows[u - 1] for u in range(1, n + 1)}


def client_floor_problem(params: SecAggParams, min_neighbours: int = MIN_NEIGHBOURS) -> str | None:
    """Why a client must refuse a round with these (server-chosen) parameters, or None. The
    client checks them itself: a server that sent neighbours=0, threshold=1 would get every
    share equal to its secret."""
    if params.max_clients < MIN_CLIENTS:
        return f"a round of at most {params.max_clients} clients is below the floor of {MIN_CLIENTS}"
    floor = min(min_neighbours, params.max_clients - 1)
    if params.neighbours < floor:
        return f"{params.neighbours} neighbours is below this client's floor of {floor}"
    if params.threshold < 2:
        return f"threshold {params.threshold} would hand out the secret itself"
    return None


def holders_problem(params: SecAggParams, holders: int, min_neighbours: int = MIN_NEIGHBOURS) -> str | None:
    """Why a client must refuse to share among `holders` (itself and the neighbours it was
    actually given), or None: too few, more than declared, more than the round's clients, or a
    threshold not above two thirds of them (then two groups, with colluders signing for both,
    could rebuild both of its secrets)."""
    if holders - 1 > params.neighbours:
        return f"{holders - 1} neighbours given, more than the round's {params.neighbours}"
    if holders - 1 < min(min_neighbours, params.max_clients - 1):
        return f"{holders - 1} neighbours given, below this client's floor"
    if holders > params.max_clients:
        return f"{holders} holders in a round of at most {params.max_clients} clients"
    if params.threshold < min_threshold(holders):
        return f"threshold {params.threshold} is not above two thirds of the {holders} actual holders"
    return None
