"""Real vectors onto the ring Z_2^32 and back: unbiased stochastic rounding within a bound
that no sum of max_clients summands can wrap, and the layout of one client's contribution
(weighted update, weight, weighted loss). Exact contributions (whole numbers in {0, 1}) go onto
the params' smaller ring as they are."""
from __future__ import annotations

import numpy as np

from fedrec.shared.secagg.params import RoundAborted, SecAggParams


def quantise(vector: np.ndarray, params: SecAggParams, rng: np.random.Generator) -> np.ndarray:
    """Coordinates in [-bound, bound] -> ring elements, by unbiased stochastic rounding
    (error < 1/scale per coordinate); exact: whole numbers in {0, 1}, taken as they are."""
    if params.exact:
        if not np.isin(vector, (0.0, 1.0)).all():
            raise ValueError("an exact contribution holds only 0s and 1s")
        return vector.astype(params.dtype)
    if np.abs(vector).max(initial=0.0) > params.bound * (1 + 1e-9):
        raise ValueError("vector exceeds the quantisation bound: clip it first")
    # floor(x + U[0,1)) is x rounded up with probability frac(x): unbiased.
    rounded = np.floor(vector.astype(np.float64) * params.scale + rng.random(vector.shape))
    return (rounded.astype(np.int64) & (2 ** params.ring_bits - 1)).astype(params.dtype)  # two's complement


def dequantise(total: np.ndarray, params: SecAggParams, summands: int) -> np.ndarray:
    if summands > params.max_clients:
        raise ValueError(f"{summands} summands exceed max_clients={params.max_clients}: the sum may have wrapped")
    signed = total.astype(np.int64)
    signed[signed >= 2 ** (params.ring_bits - 1)] -= 2 ** params.ring_bits
    return signed / params.scale


def quantisation_error_bound(params: SecAggParams, summands: int) -> float:
    """Most any coordinate of the decoded sum can differ from the exact sum (exact: none)."""
    return 0.0 if params.exact else summands / params.scale



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
