"""Differential privacy benchmarks.

`run_dp_speed_bench`: local training with DP-SGD (Opacus, record level) against the same
local training without it. It uses the same model, the same user logs and one thread, as a
virtual client has, on synthetic catalogs of several sizes. The two are timed alternately in
one process, so the ratios compare like with like on a shared, noisy machine.
"""
from __future__ import annotations

import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from shared.report import write_json


def run_dp_speed_bench(out: Path, *, catalog_sizes=(1_682, 50_000), content_dim: int = 405,
                       log_lengths=(50, 100, 200), repeats: int = 5, noise_multiplier: float = 3.0,
                       progress: bool = True) -> dict:
    import torch

    from client.local import LocalConfig, UserLog, local_update, shared_weights
    from client.privacy import PrivacyLedger, RecordPrivacy, private_local_update
    from server.app import DEFAULTS
    from shared.model import ModelConfig, Recommender
    from shared.privacy import PrivacyConfig

    torch.set_num_threads(1)
    local = LocalConfig(local_epochs=int(DEFAULTS["local-epochs"]), lr=float(DEFAULTS["local-lr"]),
                        optimizer=str(DEFAULTS["local-optimizer"]), clip=float(DEFAULTS["update-clip"]))
    privacy = RecordPrivacy(noise_multiplier, clip=1.0, window=PrivacyConfig().record_window,
                            budget=math.inf, delta=1e-5)
    rows = []
    for n_items in catalog_sizes:
        torch.manual_seed(0)
        rng = np.random.default_rng(0)
        content = torch.from_numpy(rng.standard_normal((n_items + 1, content_dim)).astype(np.float32))
        cfg = ModelConfig(n_items=n_items, content_dim=content_dim, max_len=int(DEFAULTS["max-len"]),
                          id_buckets=int(DEFAULTS["id-buckets"]))
        model = Recommender(cfg, content)
        weights = shared_weights(model)
        for length in log_lengths:
            user = UserLog(rng.integers(1, n_items + 1, size=length), 1, 2)
            ledger = PrivacyLedger(Path(tempfile.mkdtemp()) / "ledger.json")
            plain_s, private_s = [], []
            for rep in range(repeats + 1):   # the first pair warms up and is not counted
                t = time.perf_counter()
                local_update(model, weights, user, local, rng)
                plain = time.perf_counter() - t
                t = time.perf_counter()
                private_local_update(model, weights, user, local, privacy, ledger, rng)
                private = time.perf_counter() - t
                if rep:
                    plain_s.append(plain)
                    private_s.append(private)
            row = {"items": n_items, "log_length": length,
                   "plain_s": statistics.median(plain_s), "private_s": statistics.median(private_s)}
            row["ratio"] = row["private_s"] / row["plain_s"]
            rows.append(row)
            if progress:
                print(f"{n_items:>7,} items, log of {length:>3}: plain {row['plain_s'] * 1e3:7.1f} ms, "
                      f"private {row['private_s'] * 1e3:7.1f} ms, ratio {row['ratio']:.2f}x", flush=True)
    summary = {}
    for n_items in catalog_sizes:
        mine = [r for r in rows if r["items"] == n_items]
        summary[str(n_items)] = sum(r["private_s"] for r in mine) / sum(r["plain_s"] for r in mine)
    report = {"what": "one client's local training, one round: DP-SGD (record level) vs plain; "
                      "median of alternating repeats; one thread",
              "content_dim": content_dim, "repeats": repeats, "rows": rows,
              "ratio_by_items": summary}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "dp_speed.json", report)
    lines = ["# DP-SGD vs plain local training", "",
             "| items | log length | plain ms | private ms | ratio |", "|---|---|---|---|---|"]
    lines += [f"| {r['items']:,} | {r['log_length']} | {r['plain_s'] * 1e3:.1f} | {r['private_s'] * 1e3:.1f} | "
              f"{r['ratio']:.2f}x |" for r in rows]
    lines += ["", "Total over the three logs, private / plain: " +
              ", ".join(f"{int(k):,} items {v:.2f}x" for k, v in summary.items())]
    (out / "dp_speed.md").write_text("\n".join(lines) + "\n")
    return report
