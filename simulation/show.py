"""`fedrec show`: what a finished run recommends, for a person to read: its test NDCG@10 beside a
reference run's, and for a few test users their recent history, the top 10 from the run's bundle
with the history items that explain each, and where their held-out test item landed."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fedrec.shared.data.pipeline import DataConfig, prepare_data
from fedrec.shared.recommend import Recommender


def _headline(summary: dict) -> str:
    m = summary["metrics"]
    extra = ""
    if summary["mode"] == "federated":
        secure = "secure aggregation" if summary.get("secure_aggregation", {}).get("enabled") else "plain aggregation"
        extra = f", {summary['clients']} simulated devices, {summary['rounds']} rounds, {secure}"
    fusion = summary.get("fusion")
    ranking = fusion if isinstance(fusion, str) else (fusion or {}).get("chosen", "encoder alone")
    return (f"{summary['mode']}{extra}, ranking by {ranking}: test NDCG@10 {m['ndcg@10']:.4f}, HR@10 "
            f"{m['hr@10']:.4f} ({summary['wall_seconds']:.0f} s)")


def show_run(run: Path, *, users: int = 3, references: tuple = (), seed: int = 0) -> str:
    """`references`: run folders or summary-shaped JSON files; the first that exists is compared with."""
    run = Path(run)
    summary = json.loads((run / "summary.json").read_text())
    rec = Recommender.load(run / "bundle")
    lines = [f"{summary['dataset']} {_headline(summary)}"]
    for candidate in references:
        path = Path(candidate) / "summary.json" if Path(candidate).is_dir() else Path(candidate)
        if path.is_file():
            ref = json.loads(path.read_text())
            ratio = summary["metrics"]["ndcg@10"] / max(ref["metrics"]["ndcg@10"], 1e-12)
            lines.append(f"reference ({path}), {_headline(ref)}; this run / reference: {ratio:.3f}")
            if ref.get("provenance"):
                lines.append(f"  {ref['provenance']}")
            alone = (ref.get("fusion") or {}).get("encoder_alone_test", {}).get("ndcg@10") \
                if isinstance(ref.get("fusion"), dict) else ref.get("encoder_alone_ndcg@10")
            if alone:
                lines.append(f"  the reference's encoder alone: NDCG@10 {alone:.4f}; this run / it: "
                             f"{summary['metrics']['ndcg@10'] / alone:.3f}")
            break
    data = {k: v for k, v in summary["config"]["data"].items() if k in DataConfig.__dataclass_fields__}
    prepared = prepare_data(DataConfig(**data))
    picked = np.random.default_rng(seed).choice(len(prepared.split), size=min(users, len(prepared.split)),
                                                replace=False)
    for u in sorted(picked):
        user = prepared.split.users[u]
        history = [str(prepared.encoded.item_ids[i - 1]) for i in user.history_for_test]
        target = str(prepared.encoded.item_ids[user.test - 1])
        lines += ["", f"user {user.user_id} ({len(history)} events); most recent: "
                  + "; ".join(rec.title(i) for i in rec.indices(history[-5:])[::-1])]
        recs = rec.recommend(history, 10, explain=True)
        for n, r in enumerate(recs, 1):
            mark = "  <== their next item (held out)" if r.item_id == target else ""
            because = f"   because: {'; '.join(b.title for b in r.because)}" if r.because else ""
            lines.append(f"  {n:2d}. {r.title}{mark}{because}")
        if target not in [r.item_id for r in recs]:
            lines.append(f"  (their held-out next item, {rec.title(int(rec.indices([target])[0]))}, is not in this top 10)")
    return "\n".join(lines)
