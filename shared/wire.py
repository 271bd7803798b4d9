"""Weights on the wire: one conversion between named numpy arrays and Flower's ArrayRecord,
used by the client, the server and the payload benchmark alike.

All arrays travel as ONE flat float32 vector ("flat"), in the order of their sorted names;
each side rebuilds the names and shapes from its own copy of the model (`Layout`), so no
layout travels and a reply of the wrong length is refused. One array instead of ~34 matters:
Flower decodes each array with `np.load` (header parsing included), which took 2.7 ms per
message of 34 arrays, 68 ms of every 25-client round on the server alone.
"""
from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

Weights = dict[str, np.ndarray]
Layout = dict[str, tuple[int, ...]]
FLAT = "flat"


def layout_of(weights: Weights) -> Layout:
    return {name: tuple(weights[name].shape) for name in sorted(weights)}


def flatten(weights: Weights) -> np.ndarray:
    return np.concatenate([np.ravel(weights[name]).astype(np.float32, copy=False) for name in sorted(weights)])


def unflatten(vector: np.ndarray, layout: Layout) -> Weights:
    size = sum(int(np.prod(shape)) for shape in layout.values())
    if vector.ndim != 1 or vector.size != size:
        raise ValueError(f"expected a flat vector of {size} values, got shape {vector.shape}")
    out, start = {}, 0
    for name, shape in layout.items():
        n = int(np.prod(shape))
        out[name] = vector[start:start + n].reshape(shape)
        start += n
    return out


def to_record(weights: Weights) -> ArrayRecord:
    return ArrayRecord({FLAT: Array(flatten(weights))})


def from_record(record: ArrayRecord, layout: Layout) -> Weights:
    """Raises ValueError (with the reason) unless the record is one float vector of the
    layout's size."""
    if list(record.keys()) != [FLAT]:
        raise ValueError(f"expected one array {FLAT!r}, got {sorted(record.keys())[:3]}")
    vector = record[FLAT].numpy()
    if not np.issubdtype(vector.dtype, np.floating):
        raise ValueError(f"dtype {vector.dtype}, expected a float array")
    return unflatten(vector, layout)
