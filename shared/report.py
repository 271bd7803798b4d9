"""Run outputs: `summary.json` (one shape for every mode) and plots a person looks at.

summary.json: {"dataset", "mode", "metrics": {"hr@10", "ndcg@10", "mrr@10", "coverage@10", ...},
               "wall_seconds", "config", ...}; federated and private runs add "privacy",
               "rounds", "bytes_up", "bytes_down".
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers or in CI
import matplotlib.pyplot as plt  # noqa: E402


def write_json(path: Path, data: dict) -> None:
    """Write atomically: a crash mid-write leaves the previous file, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def plot_validation_curve(curves: dict[str, list[dict]], path: Path, *, x: str = "epoch",
                          metric: str = "ndcg@10", title: str = "",
                          levels: dict[str, float] | None = None) -> None:
    """One line per run: validation `metric` against `x` (epochs or rounds); `levels` adds
    horizontal reference lines (e.g. the centralized model's best validation value)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, curve in curves.items():
        points = [(p[x], p[metric]) for p in curve if metric in p]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, label=label)
    for i, (label, value) in enumerate((levels or {}).items()):
        ax.axhline(value, linestyle="--", color=f"C{i + 1}", label=label)
    ax.set_xlabel(x)
    ax.set_ylabel(f"validation {metric.upper()}")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
