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
                          levels: dict[str, float] | None = None,
                          secondary: tuple[str, list[dict], str] | None = None,
                          shade: tuple[float, float, str] | None = None,
                          points: dict[str, tuple[float, float]] | None = None) -> Path:
    """One line per run: validation `metric` against `x` (epochs or rounds).
    levels:    horizontal reference lines (label -> value);
    secondary: (label, curve, its x key): another run against its own x axis, drawn on top
               (e.g. the centralized run by epoch beside the federated run by round);
    shade:     (from, to, label): a span of x to grey out (e.g. where validation is trained on);
    points:    label -> (x, value) single markers (e.g. the final test value).
    A curve of fewer than two points is no plot (a dot on an empty axis): it is written as a table,
    `path` with the suffix .txt, instead. Returns the file written."""
    path = Path(path)
    if max((sum(metric in p for p in c) for c in curves.values()), default=0) < 2:
        return _curve_table(curves, path, x=x, metric=metric, title=title, points=points, levels=levels,
                            secondary=secondary)
    path.with_suffix(".txt").unlink(missing_ok=True)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    handles = []
    for label, curve in curves.items():
        pts = [(p[x], p[metric]) for p in curve if metric in p]
        if pts:
            handles += ax.plot(*zip(*pts), marker="o", markersize=3, label=label)
    for i, (label, value) in enumerate((levels or {}).items()):
        handles.append(ax.axhline(value, linestyle="--", color=f"C{i + 2}", label=label))
    if shade is not None:
        handles.append(ax.axvspan(shade[0], shade[1], color="grey", alpha=0.15, label=shade[2]))
    for i, (label, (px, py)) in enumerate((points or {}).items()):
        handles += ax.plot([px], [py], marker="*", markersize=12, linestyle="none", color=f"C{i + 4}", label=label)
    ax.set_xlabel(x)
    ax.set_ylabel(f"validation {metric.upper()}")
    if secondary is not None:
        label, curve, sx = secondary
        pts = [(p[sx], p[metric]) for p in curve if metric in p]
        if pts:
            top = ax.twiny()
            handles += top.plot(*zip(*pts), marker="s", markersize=3, color="C1", alpha=0.8, label=label)
            top.set_xlabel(f"{sx} ({label})")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, labels=[h.get_label() for h in handles], fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _curve_table(curves: dict[str, list[dict]], path: Path, *, x: str, metric: str, title: str,
                 points: dict[str, tuple[float, float]] | None, levels: dict[str, float] | None,
                 secondary: tuple[str, list[dict], str] | None) -> Path:
    """Too few points to draw: the same figures as lines of text (a reference run's too)."""
    path.unlink(missing_ok=True)   # never a stale plot of another run beside the table
    rows = [f"{title}" if title else f"validation {metric.upper()}", f"{'run':<40} {'at':>12} {metric.upper():>10}"]
    rows += [f"{label:<40} {f'{x} {p[x]}':>12} {p[metric]:>10.4f}"
             for label, curve in curves.items() for p in curve if metric in p]
    rows += [f"{label:<40} {f'{x} {px}':>12} {py:>10.4f}" for label, (px, py) in (points or {}).items()]
    if secondary is not None:
        label, curve, sx = secondary
        rows += [f"{label:<40} {f'{sx} {p[sx]}':>12} {p[metric]:>10.4f}" for p in curve if metric in p]
    rows += [f"{label:<40} {'end':>12} {value:>10.4f}" for label, value in (levels or {}).items()]
    table = path.with_suffix(".txt")
    table.write_text("\n".join(rows) + "\n")
    return table
