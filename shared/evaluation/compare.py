"""Is a difference between two kinds of run real? Ratio of mean NDCG@K, candidate over
baseline, with a bootstrap interval that resamples both the test users and the runs (seeds)
of each kind: on ML-100K one run's NDCG@10 moves by a few percent with the seed alone, and
943 test users leave a few percent of sampling error, so one pair of runs says little.

Input: per-user test ranks (1 = first), one array per run, the same users in the same
order in every run (`test_ranks.npy`, written beside each run's summary.json): (users, 2) rank
spans since session 9 (ties at their expected value), (users,) ranks before (ties to the lower
index). Runs of the two kinds are not compared.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fedrec.shared.evaluation.metrics import ndcg


def compare_runs(baseline: list[np.ndarray], candidate: list[np.ndarray], *, k: int = 10,
                 resamples: int = 4000, seed: int = 0) -> dict:
    runs = [np.asarray(r) for r in [*baseline, *candidate]]
    if not baseline or not candidate:
        raise ValueError("need at least one baseline run and one candidate run")
    if len({len(r) for r in runs}) != 1:
        raise ValueError(f"runs rank different numbers of users: {sorted({len(r) for r in runs})}")
    if len({r.ndim for r in runs}) != 1:
        raise ValueError("some runs' ranks break ties by item index (made before session 9) and others at their "
                         "expected value; rerun the older ones")
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


def compare_folders(baseline: list[Path], candidate: list[Path], out: Path | None = None) -> dict:
    """`compare_runs` over run folders (their test_ranks.npy); writes OUT/compare.json when given.
    Raises DataError for a folder without ranks or runs that cannot be paired."""
    from fedrec.shared.data.schema import DataError
    from fedrec.shared.report import write_json

    def ranks(folder: Path) -> np.ndarray:
        path = Path(folder) / "test_ranks.npy"
        if not path.exists():
            raise DataError(f"{path}: no per-user test ranks (`fedrec train` writes them; older runs lack them)")
        return np.load(path)

    try:
        report = compare_runs([ranks(f) for f in baseline], [ranks(f) for f in candidate])
    except ValueError as err:
        raise DataError(str(err)) from None
    report.update(baseline=[str(f) for f in baseline], candidate=[str(f) for f in candidate])
    if out is not None:
        write_json(Path(out) / "compare.json", report)
    return report
