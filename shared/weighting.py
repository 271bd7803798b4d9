"""How much one client's update counts in a round's mean: one definition for the plain
server (server/aggregation.py) and the secure-aggregation client (client/secure.py), so the
two paths average the same way."""
from __future__ import annotations


def client_weight(num_examples: float, weighting: str, cap: float) -> float:
    """A client's vote: its training targets up to `cap` ("examples"), or 1 ("uniform")."""
    if weighting == "examples":
        return float(min(num_examples, cap))
    if weighting == "uniform":
        return 1.0
    raise ValueError(f"weighting must be 'examples' or 'uniform', not {weighting!r}")


def unit_weight(num_examples: float, weighting: str, cap: float) -> float:
    """The same vote scaled into [0, 1], as secure aggregation needs it (bounded inputs)."""
    return client_weight(num_examples, weighting, cap) / (cap if weighting == "examples" else 1.0)
