"""Is a difference between two kinds of run real? Ratio of mean NDCG@K, candidate over
baseline, with a bootstrap interval that resamples both the test users and the runs (seeds)
of each kind: on ML-100K one run's NDCG@10 moves by a few percent with the seed alone, and
943 test users leave a few percent of sampling error, so one pair of runs says little.

Input: per-user test ranks (1 = first), one array per run, the same users in the same
order in every run (`test_ranks.npy`, written beside each run's summary.json).
"""
from __future__ import annotations

import numpy as np

from shared.metrics import ndcg


def compare_runs(baseline: list[np.ndarray], candidate: list[np.ndarray], *, k: int = 10,
                 resamples: int = 4000, seed: int = 0) -> dict:
    runs = [np.asarray(r) for r in [*baseline, *candidate]]
    if not baseline or not candidate:
        raise ValueError("need at least one baseline run and one candidate run")
    if len({len(r) for r in runs}) != 1:
        raise ValueError(f"runs rank different numbers of users: {sorted({len(r) for r in runs})}")
    a = np.stack([ndcg(r, k) for r in baseline])   # runs x users
    b = np.stack([ndcg(r, k) for r in candidate])
    n = a.shape[1]
    rng = np.random.default_rng(seed)
    ratios = np.empty(resamples)
    for i in range(resamples):
        users = np.bincount(rng.integers(0, n, n), minlength=n) / n   # resampled users, as weights
        runs_a = rng.integers(0, len(a), len(a))
        runs_b = rng.integers(0, len(b), len(b))
        ratios[i] = (b[runs_b] @ users).mean() / (a[runs_a] @ users).mean()
    low, high = np.quantile(ratios, [0.025, 0.975])
    return {"k": k, "users": n, "baseline_runs": len(a), "candidate_runs": len(b),
            f"baseline_ndcg@{k}": float(a.mean()), f"candidate_ndcg@{k}": float(b.mean()),
            f"baseline_ndcg@{k}_per_run": a.mean(axis=1).round(5).tolist(),
            f"candidate_ndcg@{k}_per_run": b.mean(axis=1).round(5).tolist(),
            "ratio": float(b.mean() / a.mean()), "ratio_ci95": [float(low), float(high)],
            "method": f"bootstrap, {resamples} resamples of test users and of runs within each kind"}
