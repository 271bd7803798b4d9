"""`fedrec bench serve`: the recommendation service under load, on loopback, as a client sees it.

The service runs as its own process (`fedrec serve`); this process is the clients: `concurrency`
requests in flight at once (grpc.aio), each a user vector asking for the top 10. Reports latency
percentiles, throughput, recall@100 of the service's answer against an exact scan, the time to
load the bundle (and build its index), the service's resident memory, and the on-device path
(history -> top 10, all local). Also times an exact scan at several catalog sizes: the measurement
behind `fedrec.shared.recommend.ANN_FROM_ITEMS`.

A catalog larger than the bundle's (`--items`) is made from it: each new item is a copy of a real
item's vector and content with Gaussian noise (0.25 of the vectors' per-dimension sd), so the
search sees the clustered geometry of trained item vectors rather than random points (on which
any inverted index is at its worst). The encoder is the bundle's own.
"""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from fedrec.shared.bundle import load_bundle, write_bundle
from fedrec.shared.data.catalog_bundle import CatalogBundle
from fedrec.shared.model.config import ModelConfig
from fedrec.shared.model.fusion import ENCODER_ALONE
from fedrec.shared.recommend import Recommender, VectorIndex
from fedrec.shared.report import write_json

EXACT_SIZES = (1_682, 10_000, 20_000, 50_000, 100_000)


def expanded_bundle(source: Path, items: int, out: Path, seed: int = 0) -> Path:
    """A bundle of `items` items made from `source`'s (see the module's docstring); the encoder alone."""
    import torch
    from fedrec.shared.model.recommender import RecommenderModel
    bundle = load_bundle(source)
    rng = np.random.default_rng(seed)
    base = rng.integers(1, bundle.catalog.n_items + 1, items)
    vectors = bundle.item_vectors[1:]
    noise = 0.25 * vectors.std(axis=0)
    item_vectors = np.vstack([np.zeros((1, vectors.shape[1])),
                              bundle.item_vectors[base] + rng.normal(size=(items, vectors.shape[1])) * noise])
    content = np.vstack([bundle.catalog.content[:1], bundle.catalog.content[base]])
    cfg = ModelConfig(**{**bundle.model_config.to_dict(), "n_items": items})
    torch.manual_seed(seed)
    fresh = RecommenderModel(cfg, torch.from_numpy(content) if cfg.content_dim else None)
    weights = {k: v.detach().numpy() for k, v in fresh.named_parameters()}
    weights.update({k: v for k, v in bundle.weights.items() if k.startswith("user_encoder.")})
    titles = np.asarray([f"{bundle.catalog.display_titles[b - 1]} #{i}" for i, b in enumerate(base)], dtype=str)
    catalog = CatalogBundle(np.asarray([f"s{i}" for i in range(items)], dtype=str), content, titles)
    write_bundle(out, model_config=cfg, weights=weights, item_vectors=item_vectors.astype(np.float32),
                 catalog=catalog, blend=ENCODER_ALONE, run={"mode": "synthetic", "made_from": str(source)})
    return out


def exact_scan_ms(sizes=EXACT_SIZES, dim: int = 64, queries: int = 200, seed: int = 0) -> list[dict]:
    """Per query: one user vector against `size` item vectors, top 10, one thread."""
    rng = np.random.default_rng(seed)
    rows = []
    for size in sizes:
        index = VectorIndex(np.vstack([np.zeros((1, dim)), rng.normal(size=(size, dim))]), ann=False)
        q = rng.normal(size=(queries, dim)).astype(np.float32)
        times = []
        for i in range(queries):
            started = time.perf_counter()
            index.search(q[i], 10)
            times.append(time.perf_counter() - started)
        rows.append({"items": size, "p50_ms": round(float(np.percentile(times, 50)) * 1e3, 3),
                     "p99_ms": round(float(np.percentile(times, 99)) * 1e3, 3)})
    return rows


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


async def _load(port: int, vectors: np.ndarray, requests: int, concurrency: int) -> tuple[list[float], float]:
    import grpc
    from fedrec.shared.proto import recommend_pb2 as pb
    from fedrec.shared.proto import recommend_pb2_grpc as pb_grpc
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.RecommendStub(channel)
        messages = [pb.RecommendRequest(user_vector=v.tolist(), k=10) for v in vectors]
        next_request = iter(range(requests))

        async def worker():
            for i in next_request:
                started = time.perf_counter()
                await stub.Recommend(messages[i % len(messages)])
                latencies.append(time.perf_counter() - started)
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return latencies, time.perf_counter() - started


def _service_recall(port: int, rec: Recommender, vectors: np.ndarray) -> float:
    import grpc
    from fedrec.shared.proto import recommend_pb2 as pb
    from fedrec.shared.proto import recommend_pb2_grpc as pb_grpc
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.RecommendStub(channel)
        recalls = []
        for v in vectors:
            got = rec.indices([i.item_id for i in stub.Recommend(pb.RecommendRequest(user_vector=v.tolist(), k=100)).items])
            truth = rec.top(rec.by_vector(v[None])[0], 100)
            recalls.append(len(set(got.tolist()) & set(truth.tolist())) / 100)
    return float(np.mean(recalls))


def _start_service(bundle: Path, workers: int) -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen([sys.executable, "-m", "fedrec.cli", "serve", "--bundle", str(bundle), "--port", "0",
                                "--workers", str(workers)], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = process.stdout.readline()            # printed once the server listens
    if "serving bundle" not in line:
        process.kill()
        raise RuntimeError(f"fedrec serve did not start: {line!r}")
    return process, int(line.split(" on ")[1].split(" ")[0].rsplit(":", 1)[1])


def run_serve_bench(bundle: Path, out: Path, *, items: int = 100_000, requests: int = 5000, concurrency: int = 8,
                    workers: int = 8, seed: int = 0) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    source = load_bundle(bundle)
    if items and items != source.catalog.n_items:
        bundle = expanded_bundle(Path(bundle), items, out / f"bundle-{items}", seed)
    started = time.perf_counter()
    rec = Recommender.load(bundle)
    index = rec.index_for_vectors
    load_s = time.perf_counter() - started
    rng = np.random.default_rng(seed + 1)   # not the histories the index was calibrated on (seed 0)
    histories = [rng.integers(1, rec.n_items + 1, rng.integers(1, rec.model.cfg.max_len + 1)) for _ in range(500)]
    vectors = rec.user_vectors(histories)
    device_ms = []
    for history in histories[:200]:
        begun = time.perf_counter()
        rec.top(rec.scores([history])[0], 10, exclude=history)
        device_ms.append((time.perf_counter() - begun) * 1e3)
    process, port = _start_service(Path(bundle), workers)
    try:
        asyncio.run(_load(port, vectors, 300, concurrency))              # warm-up
        latencies, wall = asyncio.run(_load(port, vectors, requests, concurrency))
        recall = _service_recall(port, rec, vectors[:200])
        rss = _rss_mb(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=60)
    ms = np.asarray(latencies) * 1e3
    result = {"items": rec.n_items, "bundle": str(bundle), "index": index.info, "requests": requests,
              "concurrency": concurrency, "server_workers": workers, "k": 10,
              "p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3),
              "qps": round(requests / wall, 1), "recall@100": round(recall, 4),
              "bundle_load_s": round(load_s, 3), "rss_mb": rss,
              "on_device_top10_ms": {"p50": round(float(np.percentile(device_ms, 50)), 3),
                                     "p99": round(float(np.percentile(device_ms, 99)), 3),
                                     "blend": rec.bundle.blend.label},
              "served_ranking": "by user vector: the encoder's dot product (the blend's item models need the history)",
              "exact_scan": exact_scan_ms(),
              "targets": {"p99_ms": 10, "qps": 1000, "recall@100": 0.95, "on_device_top10_ms": 20},
              "machine": {"cpus": os.cpu_count()}}
    write_json(out / "serve.json", result)
    lines = [f"# fedrec bench serve: {rec.n_items} items, {index.info['kind']} search",
             f"- top-10 by user vector over gRPC on loopback, {concurrency} in flight, {requests} requests: "
             f"p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, {result['qps']} QPS (targets: p99 <= 10 ms, "
             f">= 1000 QPS)",
             f"- recall@100 of the service against an exact scan: {result['recall@100']} (target >= 0.95)",
             f"- bundle load and index build {result['bundle_load_s']} s; service RSS {rss} MB",
             f"- on the device, history -> top 10 ({result['on_device_top10_ms']['blend']}): p50 "
             f"{result['on_device_top10_ms']['p50']} ms, p99 {result['on_device_top10_ms']['p99']} ms (target <= 20 ms)",
             "- exact scan per query (one thread), the basis of ANN_FROM_ITEMS: " +
             ", ".join(f"{r['items']} items {r['p50_ms']} ms" for r in result["exact_scan"])]
    (out / "serve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result
