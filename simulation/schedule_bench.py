"""`fedrec bench schedule`: the schedule the federation derives from the population
(server/schedule.py), on several datasets, against the centralized model on the same data.

Per dataset, two real `fedrec train` runs, each in its own process: federated with the shipped
schedule (`--rounds 0 --clients-per-round 0`), and centralized. Both are the encoder alone
(`--fusion none`: a plain federation has no co-occurrence sum, which needs secure aggregation)
with catalog-only item features (no text encoder, no activity features), so the ratio is the
schedule's and nothing else's. Secure aggregation is off: its cost and quality are measured on
their own (`fedrec bench secagg`, docs/results.md). A run already finished in DIR is read back,
not redone, so a stopped bench resumes. Writes schedule.json and schedule.md.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fedrec.shared.report import write_json

DATASETS = ("ml-100k", "ml-latest-small", "synthetic:5000x10000", "synthetic:20000x10000")
COMMON = ("--text-encoder", "none", "--fusion", "none", "--quiet")
MODES = {"federated": ("--no-secure-aggregation",), "centralized": ("--no-activity-features",)}


def run_schedule_bench(out: Path, *, datasets=DATASETS, data_dir: str | None = None, extra: tuple = ()) -> dict:
    """`extra`: more `fedrec train` flags for both runs (the tests make the model tiny)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for dataset in datasets:
        runs = {mode: _run(out / dataset.replace(":", "-") / mode, dataset, data_dir, mode, extra) for mode in MODES}
        rows.append(_row(dataset, runs))
        print(json.dumps(rows[-1]), flush=True)
    report = {"protocol": "federated (the schedule, plain rounds) and centralized, each the encoder alone with "
                          "catalog-only features (no text encoder), one run each, seed 0", "rows": rows}
    write_json(out / "schedule.json", report)
    (out / "schedule.md").write_text(schedule_table(report))
    print(schedule_table(report))
    return report


def _run(folder: Path, dataset: str, data_dir: str | None, mode: str, extra: tuple) -> dict:
    """The run's summary.json, from an earlier finish in `folder` or from a new run there; {"error": ...}
    naming the log when it failed."""
    summary = folder / "summary.json"
    if not summary.exists():
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "fedrec.cli", "train", "--mode", mode, "--dataset", dataset,
               *(["--data-dir", str(data_dir)] if data_dir else []), *COMMON, *MODES[mode], *extra,
               "--out", str(folder)]
        with open(folder.with_suffix(".log"), "w") as log:
            code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
        if code or not summary.exists():
            return {"error": f"exit {code}, see {folder.with_suffix('.log')}"}
    return json.loads(summary.read_text())


def _row(dataset: str, runs: dict) -> dict:
    fed, cen = runs["federated"], runs["centralized"]
    if "error" in fed or "error" in cen:
        return {"dataset": dataset, "error": fed.get("error") or cen.get("error")}
    f, c = fed["metrics"], cen["metrics"]
    # The rounds before the refit: after it, validation items are trained on and the curve jumps.
    refit = fed["config"]["federation"].get("refit-fraction", 0.0)
    last = fed["schedule"]["rounds"] - round(refit * fed["schedule"]["rounds"])
    curve = [p for p in fed.get("validation_curve") or [] if p["round"] <= last]
    best = max(curve, key=lambda p: p["ndcg@10"])["round"] if curve else None
    return {"dataset": dataset, "devices": fed["clients"], "items": fed["data_report"]["catalog_items"],
            "rounds": fed["schedule"]["rounds"], "clients_per_round": fed["schedule"]["clients_per_round"],
            "schedule": fed["schedule"]["why"], "stopped": fed["stopped"]["why"],
            "federated_ndcg@10": f["ndcg@10"], "centralized_ndcg@10": c["ndcg@10"],
            "ndcg_ratio": f["ndcg@10"] / c["ndcg@10"] if c["ndcg@10"] else None,
            "federated_coverage@10": f["coverage@10"], "centralized_coverage@10": c["coverage@10"],
            "coverage_ratio": f["coverage@10"] / c["coverage@10"] if c["coverage@10"] else None,
            # Where the federated validation curve peaked before the refit: at its last point, still rising.
            "best_validation_round": best, "last_validation_round": curve[-1]["round"] if curve else None,
            "federated_wall_seconds": fed["wall_seconds"], "centralized_wall_seconds": cen["wall_seconds"]}


def schedule_table(report: dict) -> str:
    lines = ["# The schedule against centralized: " + report["protocol"], "",
             "| dataset | devices | items | rounds x clients | federated NDCG@10 | centralized | ratio | "
             "coverage@10 fed / cen | ratio | best validation round (of) | federated wall s | centralized wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['dataset']} | failed: {r['error']} |||||||||||")
            continue
        lines.append(f"| {r['dataset']} | {r['devices']:,} | {r['items']:,} | {r['rounds']} x {r['clients_per_round']} | "
                     f"{r['federated_ndcg@10']:.4f} | {r['centralized_ndcg@10']:.4f} | {r['ndcg_ratio']:.3f} | "
                     f"{r['federated_coverage@10']:.3f} / {r['centralized_coverage@10']:.3f} | "
                     f"{r['coverage_ratio']:.2f} | {r['best_validation_round']} ({r['last_validation_round']}) | "
                     f"{r['federated_wall_seconds']:.0f} | {r['centralized_wall_seconds']:.0f} |")
    return "\n".join(lines) + "\n"
