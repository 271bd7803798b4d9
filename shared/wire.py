"""Weights on the wire: one conversion between named numpy arrays and Flower's ArrayRecord,
used by the client, the server and the payload benchmark alike (float32, contiguous)."""
from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

Weights = dict[str, np.ndarray]


def to_record(weights: Weights) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v, dtype=np.float32)) for k, v in weights.items()})


def from_record(record: ArrayRecord) -> Weights:
    return {k: v.numpy() for k, v in record.items()}
