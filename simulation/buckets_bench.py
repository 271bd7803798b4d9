"""`fedrec bench buckets`: the hashed item-ID table's size against quality and payload.

A catalog larger than `--id-buckets` hashes its items into that many ID rows, so colliding items
share a row (each keeps its own content features). For each table size this trains the model
centrally on the same data (`fedrec train --mode centralized --id-buckets B`, a process each) and
reports the encoder's test NDCG@10 and coverage@10 (`--fusion none`: an item model blended in would
hide what the table costs, and fitting EASE on a large catalog dominates the run), the collisions,
and the bytes one client would send and receive per federated round. Centralized, because the question is the table's, not the
federation's: the federated model is the same network, and a federated run per size would take
hours here. Writes buckets.json and buckets.md.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from fedrec.shared.report import write_json


def run_buckets_bench(out: Path, *, dataset: str, data_dir: str | None, buckets: tuple[int, ...],
                      epochs: int, text_encoder: str = "none") -> dict:
    """One centralized run per table size on `dataset`; the report's ratios are to the largest table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for b in sorted(buckets):
        rows.append(_measure(out / f"buckets-{b}", dataset, data_dir, b, epochs, text_encoder))
        print(json.dumps(rows[-1]), flush=True)
    report = {"dataset": dataset, "epochs": epochs, "text_encoder": text_encoder, "runs": rows,
              "note": "centralized training with each ID-table size; payload: the shared weights one client "
                      "receives (and sends) per federated round, float32"}
    write_json(out / "buckets.json", report)
    (out / "buckets.md").write_text(buckets_table(report))
    print(buckets_table(report))
    return report


def _measure(folder: Path, dataset: str, data_dir: str | None, buckets: int, epochs: int, text_encoder: str) -> dict:
    cmd = [sys.executable, "-m", "fedrec.cli", "train", "--mode", "centralized", "--dataset", dataset,
           "--text-encoder", text_encoder, "--id-buckets", str(buckets), "--epochs", str(epochs), "--fusion", "none",
           "--quiet",
           "--out", str(folder), *(["--data-dir", data_dir] if data_dir else [])]
    shutil.rmtree(folder, ignore_errors=True)   # a fresh run each time, never a resumed one
    started = time.perf_counter()
    with open(folder.with_suffix(".log"), "w") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    row = {"id_buckets": buckets, "exit_code": code, "wall_seconds": round(time.perf_counter() - started, 1),
           "log": str(folder.with_suffix(".log"))}
    summary = folder / "summary.json"
    if code == 0 and summary.exists():
        s = json.loads(summary.read_text())
        n_items = s.get("data_report", {}).get("catalog_items")
        row.update(ndcg10=s["metrics"]["ndcg@10"], hr10=s["metrics"]["hr@10"],
                   coverage10=s["metrics"]["coverage@10"], items=n_items, **_table_facts(n_items, buckets, s))
    return row


def _table_facts(n_items: int | None, buckets: int, summary: dict) -> dict:
    """The table's rows, the items whose rows another item also has (all of them: no ID of their own),
    and the ID table's bytes in the federated payload."""
    if n_items is None:
        return {}
    from fedrec.shared.model.recommender import id_rows
    rows = id_rows(n_items, buckets).numpy()[1:]             # item 1..n -> its row(s)
    _, inverse, counts = np.unique(rows, axis=0, return_inverse=True, return_counts=True)
    dim = int(summary["config"]["model"]["dim"])
    return {"id_rows": int(min(n_items, buckets)), "items_without_own_rows": int((counts[inverse.ravel()] > 1).sum()),
            "id_table_bytes": (min(n_items, buckets) + 1) * dim * 4}


def buckets_table(report: dict) -> str:
    runs = [r for r in report["runs"] if "ndcg10" in r]
    largest = max(runs, key=lambda r: r["id_buckets"]) if runs else None
    lines = [f"# The item-ID table's size: {report['dataset']}, centralized, {report['epochs']} epochs at most, "
             f"text encoder {report['text_encoder']}", "",
             "| ID rows asked | items | items without own rows | test NDCG@10 | x largest table | coverage@10 | "
             "ID table bytes | wall s |", "|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        if "ndcg10" not in r:
            lines.append(f"| {r['id_buckets']:,} | failed (exit {r['exit_code']}, see {r['log']}) | | | | | | "
                         f"{r['wall_seconds']:.0f} |")
            continue
        lines.append(f"| {r['id_buckets']:,} | {r.get('items') or '-'} | {r.get('items_without_own_rows', '-')} | "
                     f"{r['ndcg10']:.4f} | {r['ndcg10'] / max(largest['ndcg10'], 1e-12):.3f} | {r['coverage10']:.3f} | "
                     f"{r.get('id_table_bytes', '-')} | {r['wall_seconds']:.0f} |")
    return "\n".join(lines) + "\n"
