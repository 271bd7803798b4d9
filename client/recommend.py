"""Recommendations on the device: its history never leaves it.

Default (on-device): the device holds the published bundle (fetched once with GetBundle) and
runs `fedrec.shared.recommend.Recommender` on its own history: scores, filters what it has seen,
explains, re-ranks. Nothing about the history is sent anywhere.

Two-stage (`two_stage`): for a device that cannot score the whole catalog. It computes its user
vector, scales it to unit length (the ranking by inner product is the same; the length would say
something about the history) and optionally adds Gaussian noise, and sends only that to the
service's Recommend for a fixed number of candidates (never its history, never what to exclude);
it then scores just those candidates with the blend and re-ranks them itself. Without noise the
server gets the exact vector of a public model: for a short history it can find the history by
trying them (docs/recommend.md). The noise is drawn once per history (from `noise_key`), so asking
again does not let the server average it away (a new event is a new history: a fresh draw). Its
cost in quality, and how often the server still finds a one-item history: `fedrec bench recommend`.
What leaves the device: that vector, the pool size, and the bundle version it holds.
With no history there is nothing to send: the device offers its bundle's most popular items.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np

from fedrec.shared.recommend import Recommendation, Recommender

CANDIDATES = 200   # the pool the two-stage path asks for: fixed, so its size says nothing of the history

# user vector (D,), pool size -> candidate item indices (the service, or a local stand-in)
CandidateSource = Callable[[np.ndarray, int], np.ndarray]


class StaleBundle(RuntimeError):
    """The service serves another bundle version than the device holds: fetch it again."""


def query_vector(rec: Recommender, items: np.ndarray, noise_std: float, noise_key: bytes | None) -> np.ndarray:
    """The vector that leaves the device: the user vector at unit length, plus N(0, noise_std^2) per
    coordinate, the noise seeded by (noise_key, history) so the same history always gets the same
    noise (no key: fresh noise each call, which repeated asking averages away)."""
    vector = rec.user_vectors([items])[0].astype(np.float64)
    vector /= max(float(np.linalg.norm(vector)), 1e-12)
    if noise_std > 0:
        seed = None if noise_key is None else int.from_bytes(
            hashlib.sha256(noise_key + np.asarray(items, np.int64).tobytes()).digest()[:8], "little")
        vector = vector + np.random.default_rng(seed).normal(0.0, noise_std, vector.shape)
    return vector.astype(np.float32)


def two_stage(rec: Recommender, history: list[str], k: int, candidates: CandidateSource, *,
              noise_std: float = 0.0, noise_key: bytes | None = None, pool: int = CANDIDATES,
              diversity: float = 0.0) -> list[Recommendation]:
    """Top-k from candidates fetched by the (noisy) user vector alone, re-ranked here by the blend
    scored on those candidates only. A stale bundle (the service moved on) falls back to ranking on
    the device, which holds the whole bundle."""
    if noise_std > 0 and noise_key is None:
        raise ValueError("noise without a noise_key is drawn afresh on every request, and the server can average "
                         "it away: give the device's own secret")
    items = rec.indices(history)
    if not len(items):
        return rec.recommend([], k, diversity=diversity)
    try:
        offered = np.asarray(candidates(query_vector(rec, items, noise_std, noise_key), pool), dtype=np.int64)
    except StaleBundle:
        return rec.recommend(history, k, diversity=diversity)
    offered = np.setdiff1d(offered, items)
    if len(offered) < k:   # a long history ate the pool: rank here rather than return a short list
        return rec.recommend(history, k, diversity=diversity)
    scores = np.full(rec.n_items + 1, -np.inf)
    scores[offered] = rec.scores_of(items, offered)
    top = rec.top(scores, k, diversity=diversity)
    return [Recommendation(str(rec.item_ids[i - 1]), rec.title(i), float(scores[i])) for i in top]


def service_candidates(stub, rec: Recommender) -> CandidateSource:
    """The Recommend RPC as a candidate source: it sends the vector, the pool size and the bundle
    version the device holds, nothing else."""
    from fedrec.shared.proto import recommend_pb2 as pb

    def ask(vector: np.ndarray, pool: int) -> np.ndarray:
        import grpc
        try:
            reply = stub.Recommend(pb.RecommendRequest(model_version=rec.version, user_vector=vector.tolist(), k=pool))
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                raise StaleBundle(err.details()) from None
            raise
        return rec.indices([item.item_id for item in reply.items])
    return ask


def local_candidates(rec: Recommender) -> CandidateSource:
    """What the service computes for a vector, run in-process (for measuring the two-stage path)."""
    return lambda vector, pool: rec.top(rec.by_vector(vector[None])[0], pool)


MAX_BUNDLE_FILE = 4 << 30   # bytes: a server that streams more for one file is refused


def fetch_bundle(stub, folder: Path, version: str = "", *, max_file_bytes: int = MAX_BUNDLE_FILE) -> dict:
    """Fetch the served bundle into `folder` with GetBundle. Trusts nothing the server sends: the
    manifest must be one this fedrec reads (shared/bundle.py: check_manifest) and come first; only the
    files it names are written (bundle file names only, never a path), each to a temporary file,
    checked against its SHA-256 and size cap, then renamed; the manifest goes in last, so until every
    file checks out the device keeps the bundle it had. BundleError otherwise. Returns the manifest."""
    from fedrec.shared.bundle import MANIFEST, BundleError, check_manifest
    from fedrec.shared.proto import recommend_pb2 as pb
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest, expected, open_file, received = None, {}, None, set()
    try:
        for chunk in stub.GetBundle(pb.GetBundleRequest(model_version=version, include_files=True)):
            if manifest is None:
                if not chunk.manifest_json:
                    raise BundleError("the server sent file data before a manifest")
                manifest = check_manifest(json.loads(chunk.manifest_json), "the served manifest")
                expected = {e["name"]: e["sha256"] for e in manifest["files"].values()}
                continue
            name = chunk.file_name
            if name not in expected or name in received:
                raise BundleError(f"the server sent a file the manifest does not name: {name!r}")
            if open_file is None or open_file[0] != name:
                if open_file is not None:
                    raise BundleError(f"the server began {name!r} before finishing {open_file[0]!r}")
                open_file = (name, open(folder / f".{name}.part", "wb"), hashlib.sha256())
            _, handle, digest = open_file
            if chunk.offset != handle.tell() or handle.tell() + len(chunk.data) > max_file_bytes:
                raise BundleError(f"{name}: a chunk out of order, or over {max_file_bytes} bytes")
            handle.write(chunk.data)
            digest.update(chunk.data)
            if chunk.last:
                handle.flush()
                os.fsync(handle.fileno())
                handle.close()
                if digest.hexdigest() != expected[name]:
                    raise BundleError(f"{name}: its SHA-256 does not match the manifest")
                os.replace(folder / f".{name}.part", folder / name)
                received.add(name)
                open_file = None
    except json.JSONDecodeError as err:
        raise BundleError(f"the served manifest is not JSON ({err})") from None
    finally:
        if open_file is not None:
            open_file[1].close()
        for part in folder.glob(".*.part"):
            part.unlink(missing_ok=True)
    if manifest is None or received != set(expected):
        raise BundleError(f"the server sent {len(received)} of the bundle's {len(expected)} files")
    tmp = folder / f".{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(manifest, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST)
    for stale in folder.glob("*.npz"):     # the previous bundle's files
        if stale.name not in expected:
            stale.unlink(missing_ok=True)
    return manifest
