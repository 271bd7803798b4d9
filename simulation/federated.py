"""Federated simulation: one virtual Flower SuperNode per user, on this machine.

1. Prepare the dataset as in the centralized job (same split), but with catalog-only item
   features: popularity and recency would need a central log the federation does not have.
2. Write the store: the public catalog bundle and one private log file per user.
3. Run our ServerApp and ClientApp on Flower's simulation engine (Ray backend, one CPU per
   virtual client so two train side by side on two cores).
4. The harness, not the server, holds every user's data here, so after each round it may
   score the global model centrally on the validation items: the per-round curve is then
   exactly comparable with the centralized run. The server itself only sees what clients
   send; the final test metrics come from federated evaluation, and are checked against the
   harness's own evaluation of the final weights.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from fedrec.client.store import UserLog, write_credentials, write_ledger
from fedrec.server.schedule import plan
from fedrec.shared.data.catalog_bundle import catalog_of, save_catalog
from fedrec.shared.errors import RunFailed, RunMismatch
from fedrec.shared.evaluation.ranking import evaluate, subset_metrics, tie_free_users
from fedrec.shared.console import Progress
from fedrec.shared.data.pipeline import DataConfig, PreparedData, prepare_data
from fedrec.shared.report import plot_validation_curve, write_json
from fedrec.shared.secagg.identity import EnrolmentCA
from fedrec.shared.model.fusion import Blend, FusedScorer, FusionConfig
from fedrec.shared.model.training import model_scorer
from fedrec.shared.model.config import ModelHyper
from fedrec.shared.model.recommender import load_weights
from fedrec.shared.settings import RUN_CONFIG, default, run_config_defaults
from fedrec.simulation.centralized import build_model


@dataclass
class FederatedJob:
    data: DataConfig = field(default_factory=lambda: DataConfig(activity_features=False))
    model: ModelHyper = field(default_factory=ModelHyper)
    settings: dict = field(default_factory=dict)   # run-config keys (shared/settings.py)
    eval_rounds: int = default("eval-rounds")  # the harness scores the model on validation every this many rounds
    compare_with: str | None = None  # a centralized run's folder: drawn on the same chart
    threads: int = 1

    @classmethod
    def from_settings(cls, v: dict) -> "FederatedJob":
        """From setting keys: the run-config ones go to the ServerApp and ClientApp as they are."""
        return cls(data=DataConfig.from_settings(v, activity_features=False), model=ModelHyper.from_settings(v),
                   settings={s.key: v[s.key] for s in RUN_CONFIG if s.key in v},
                   eval_rounds=v["eval-rounds"], compare_with=v["compare-with"])


def store_stamp(prepared: PreparedData) -> dict:
    """What identifies the data a store was written from (a resumed run must see the same)."""
    logs = hashlib.sha256()   # every user's log, item ids and times: counts alone miss a relabelled item
    for u in prepared.split.users:
        logs.update(f"{u.user_id}\x00{u.valid}\x00{u.test}\x00".encode())
        logs.update(np.ascontiguousarray(u.train, dtype=np.int64).tobytes())
        logs.update(np.ascontiguousarray(u.train_times, dtype=np.int64).tobytes())
    logs.update("\x00".join(map(str, prepared.encoded.item_ids)).encode())
    return {"version": 4, "users": len(prepared.split), "items": prepared.split.n_items,
            "content_dim": prepared.features.dim, "events": int(sum(len(u.train) + 2 for u in prepared.split.users)),
            "content_sum": float(prepared.features.matrix.astype(np.float64).sum()), "logs": logs.hexdigest()}


def write_store(prepared: PreparedData, store: Path) -> Path:
    """The catalog bundle and one log per user (partition i = user i), and each simulated
    device's enrolment credentials (the harness plays the operator: it makes an enrolment CA,
    enrols every device, and keeps only the CA's public key). Rewritten only when the data it
    came from changed."""
    store = Path(store)
    stamp = store_stamp(prepared)
    manifest = store / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text()) == stamp:
        return store
    (store / "users").mkdir(parents=True, exist_ok=True)
    save_catalog(catalog_of(prepared.encoded.item_ids, prepared.features.matrix, prepared.dataset.catalog.frame),
                 store / "catalog.npz")
    ca = EnrolmentCA.new()
    for i, u in enumerate(prepared.split.users):
        UserLog(u.train, u.valid, u.test).save(store / "users" / f"{i}.npz")
        write_credentials(store / "users" / f"{i}.device", ca.enrol())
        write_ledger(store / "users" / f"{i}.privacy.json", [])   # a new device: nothing spent
    (store / "enrolment-ca.pub").write_bytes(ca.public)
    write_json(manifest, stamp)
    return store


def ray_init_args() -> dict:
    """A local Ray on this machine's cores; or, with RAY_ADDRESS set (Ray's own variable, e.g.
    127.0.0.1:6379 or "auto"), the running Ray cluster there: a head and workers started with
    `ray start` (docs/federated.md). Ray refuses a CPU count when joining a cluster."""
    address = os.environ.get("RAY_ADDRESS")
    if address:
        return {"address": address, "log_to_driver": False}
    return {"num_cpus": os.cpu_count() or 1, "include_dashboard": False, "log_to_driver": False}


def simulate(server_app, client_app, num_clients: int) -> None:
    """Flower's simulation engine, one virtual SuperNode per client, one CPU per ClientApp
    (two at a time on two cores; asking for more CPUs than exist makes Ray hang)."""
    from flwr.simulation import run_simulation
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": ray_init_args()}
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_clients,
                   backend_config=backend)


def run_federated(job: FederatedJob, out: Path, *, progress: bool = True,
                  prepared: PreparedData | None = None) -> dict:
    """Train federated in Flower's simulation; writes DIR/summary.json. `prepared` replaces
    the data `job.data` describes (the privacy audit passes data with canaries in it).
    Raises RunFailed (after writing the summary) when no round trained."""
    from fedrec.client.app import make_client_app
    from fedrec.server.app import NoRoundTrained, make_server_app

    started = time.perf_counter()
    torch.set_num_threads(job.threads)
    out = Path(out)
    prepared = prepared or prepare_data(job.data, show_progress=progress)
    _check_resumable(prepared, _settings(job, prepared, out), out)   # before anything in `out` changes
    settings = _prepare_run(job, prepared, out)
    harness = _Harness(build_model(prepared, job.model), prepared, job.eval_rounds, scheduled_rounds(settings, prepared),
                       progress)
    if progress:
        print(f"federated: starting Flower's simulation engine (Ray) with {len(prepared.split)} virtual clients; "
              "round 1 waits until they are up", file=sys.stderr, flush=True)
    try:
        simulate(make_server_app(settings, on_round=harness.on_round, progress=harness.on_progress),
                 make_client_app(settings), len(prepared.split))
    except NoRoundTrained:
        pass  # the summary says what happened to every round, and RunFailed follows it
    harness.bar.close()
    summary = _summarize(job, prepared, settings, out, harness, _read_result(out), started)
    write_json(out / "summary.json", summary)
    plot_federated(summary, out / "validation_curve.png", job.compare_with)
    if summary["rounds"] and not summary["rounds_trained"]:
        raise RunFailed(f"none of the {summary['rounds']} rounds trained (each was skipped or aborted; "
                        f"{out / 'rounds.jsonl'}): {'; '.join(summary['round_problems'])}")
    return summary


def _prepare_run(job: FederatedJob, prepared: PreparedData, out: Path) -> dict:
    """Clear a previous attempt's result, write the store, and the settings the apps run with."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("error.txt", "result.json"):
        (out / stale).unlink(missing_ok=True)
    write_store(prepared, out / "store")
    store = out / "store"
    if not (out / "checkpoint.pt").exists():
        for stale in ("selected.pt", "final.pt"):   # a previous run's encoder before its refit, its end
            (out / stale).unlink(missing_ok=True)
        # A new run (not a resume): new simulated devices, with unspent privacy budgets. Runs in other
        # --out folders over the same users are not composed (docs/privacy.md).
        for i in range(len(prepared.split)):
            write_ledger(store / "users" / f"{i}.privacy.json", [])
    return _settings(job, prepared, out)


def _check_resumable(prepared: PreparedData, settings: dict, out: Path) -> None:
    """A checkpoint in `out` is continued only with the same settings and the same data; else a
    one-line usage error, before Flower starts and before anything in `out` is touched."""
    from fedrec.server.app import federation_config
    from fedrec.server.federation import check_resumable
    if check_resumable(out, federation_config(settings)) is None:
        return
    manifest = out / "store" / "manifest.json"
    if not manifest.exists():
        return
    stamp = json.loads(manifest.read_text())
    if stamp.get("version") != store_stamp(prepared)["version"]:
        raise RunMismatch(f"{out}: its store was written by an older fedrec ({manifest}: version {stamp.get('version')}), "
                          "which did not record a digest of every log, so the data cannot be checked; use a new --out")
    if stamp != store_stamp(prepared):
        raise RunMismatch(f"{out}: its run was trained on other data ({manifest} differs: users, items, events, "
                          "content or the digest of every user's log); use a new --out, or the same data settings "
                          "to resume it")


def scheduled_rounds(settings: dict, prepared: PreparedData) -> int:
    """The rounds the server's schedule gives this run (server/schedule.py: every simulated user is a
    node); a time budget or the stopping rule may end it sooner."""
    return plan(len(prepared.split), int(settings["rounds"]), int(settings["clients-per-round"]),
                float(settings["participations"])).rounds


def _settings(job: FederatedJob, prepared: PreparedData, out: Path) -> dict:
    """The run config the apps run with (no side effects)."""
    m = job.model
    store = out / "store"
    return {**run_config_defaults(), "store": str(store), "out": str(out), "dim": m.dim, "layers": m.layers,
            "heads": m.heads, "max-len": m.max_len, "dropout": m.dropout, "id-buckets": m.id_buckets,
            "id-dropout": m.id_dropout,
            "content": m.content, "min-nodes": len(prepared.split), **job.settings}


class _Harness:
    """What only a simulation can do: score each round's global model on every user's validation
    item (it holds all the data), and show progress."""

    def __init__(self, model, prepared: PreparedData, eval_rounds: int, rounds: int, progress: bool):
        self.model, self.prepared, self.eval_rounds, self.rounds = model, prepared, eval_rounds, rounds
        self.curve: list[dict] = []
        self.bar = Progress(rounds, "federated", "round", enabled=progress)

    def on_round(self, server_round: int, weights: dict) -> dict:
        if server_round % self.eval_rounds and server_round != self.rounds:
            return {}
        load_weights(self.model, weights)
        v = evaluate(model_scorer(self.model), self.prepared.split, "valid").metrics
        self.curve.append({"round": server_round, "ndcg@10": v["ndcg@10"], "hr@10": v["hr@10"]})
        return {"valid_ndcg@10": v["ndcg@10"], "valid_hr@10": v["hr@10"]}

    def on_progress(self, record) -> None:
        if record.round > self.rounds:   # the secure sums after training (server/app.py: rounds + 1, + 2)
            what = "the co-occurrence sum" if record.round == self.rounds + 1 else "the blend round"
            if self.bar.enabled:
                print(f"federated: {what}: {record.seconds:.1f} s, {record.accepted} devices", file=sys.stderr,
                      flush=True)
            return
        self.bar.update(record.round, **{"seconds": f"{record.seconds:.1f}", "clients accepted": record.accepted,
                           "last validation NDCG@10": f"{self.curve[-1]['ndcg@10']:.4f}" if self.curve else None})


def _summarize(job: FederatedJob, prepared: PreparedData, settings: dict, out: Path, harness: _Harness,
               result: dict, started: float) -> dict:
    scorer = _final_scorer(out / "final.pt", harness.model)
    evaluation = evaluate(scorer, prepared.split, "test")
    np.save(out / "test_ranks.npy", evaluation.ranks)  # per user, for `fedrec compare`
    everything = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    # The co-occurrence sum after the training rounds is reported under "fusion", not as a round.
    history = [h for h in everything if h["round"] <= scheduled_rounds(settings, prepared)]
    untrained = [h for h in history if not h.get("trained")]
    fusion = result.get("fusion")
    if isinstance(scorer, FusedScorer):
        fusion = {**fusion, "encoder_alone_test": evaluate(scorer.encoder, prepared.split, "test").metrics}
    return {
        "dataset": prepared.dataset.name, "mode": "federated", "metrics": evaluation.metrics,
        "data_report": prepared.report,
        "federated_test_metrics": result["test"],   # each client's own figures, the encoder alone
        "tie_free_users": subset_metrics(evaluation.ranks, tie_free_users(prepared.encoded.timestamps)),
        "fusion": fusion,
        "bundle": result.get("bundle"),
        "wall_seconds": round(time.perf_counter() - started, 2),
        "rounds": len(history), "rounds_trained": len(history) - len(untrained),
        "stopped": result.get("stopped"),   # the round the run ended at, and why
        "schedule": result.get("schedule"),  # the rounds and cohort it ran with, and why those
        # The round's own verdict ("round skipped: ...") first, then what single nodes said.
        "round_problems": sorted({r.splitlines()[0][:200] for h in untrained for r in h["rejected"]},
                                 key=lambda r: (not r.startswith("round "), r))[:5],
        "clients": len(prepared.split),
        "bytes_down": int(sum(h["bytes_down"] * h["sampled"] for h in everything)),
        "bytes_up": int(sum(h["bytes_up_mean"] * h["accepted"] for h in everything)),
        "bytes_per_client_round": {"down": history[-1]["bytes_down"] if history else 0,
                                   "up": history[-1]["bytes_up_mean"] if history else 0},
        "round_seconds": _percentiles([h["seconds"] for h in history]),
        "round_time_split": _time_split(history[1:] or history),
        "rejected_replies": sum(len(h["rejected"]) for h in history),
        "privacy": result["privacy"],
        "secure_aggregation": _secure_summary(settings, history),
        "config": {"data": asdict(job.data), "model": asdict(job.model), "federation": settings,
                   "text_encoder": prepared.features.text_encoder},
        # From every round's record, so a resumed or longer run's curve starts at round 1.
        "validation_curve": [{"round": h["round"], "ndcg@10": h["metrics"]["valid_ndcg@10"],
                              "hr@10": h["metrics"]["valid_hr@10"]} for h in history
                             if "valid_ndcg@10" in h.get("metrics", {})],
    }


def _final_scorer(path: Path, model):
    """The shipped model as a scorer: the DP item-item weights (scored as a device would, recency
    weighted), or the encoder's weights in `model`, fused with the item model when the run summed the
    co-occurrence counts (the item model). No file (nothing trained): a scorer of zeros."""
    from fedrec.shared.privacy.cooccurrence import ItemItemScorer
    if not path.exists():
        return lambda histories: np.zeros((len(histories), model.cfg.n_items + 1))
    final = torch.load(path, weights_only=False)
    if "item_item" in final:
        return ItemItemScorer(np.asarray(final["item_item"], dtype=np.float64), final["decay"],
                              final.get("popularity"), final.get("popularity_weight", 0.0))
    load_weights(model, final["weights"])
    if "item_counts" in final:   # the item models from the secure co-occurrence sum, blended with the encoder
        fusion = FusionConfig(**final["fusion"])
        blend = Blend.from_dict(final["blend"]) if "blend" in final else fusion.fallback
        counts = np.asarray(final["item_counts"], dtype=np.float64)
        return FusedScorer(model_scorer(model), {k: fusion.item_model(k, counts) for k in blend.kinds}, blend)
    return model_scorer(model)


def _read_result(out: Path) -> dict:
    """The ServerApp's result.json; RuntimeError with the server's traceback when there is none."""
    if (out / "result.json").exists():
        return json.loads((out / "result.json").read_text())
    if (out / "error.txt").exists():
        raise RuntimeError(f"the federation failed:\n{(out / 'error.txt').read_text()}")
    raise RuntimeError(f"the federation ended without a result in {out}; see the log above")


def plot_federated(summary: dict, path: Path, compare_with: str | None = None) -> None:
    """NDCG@10 by round, the final test value, and (with a centralized run's folder) that run's
    validation curve by epoch on the top axis and its test value as a line. The refit rounds
    are greyed out: there clients train on their validation items, so it is not held out."""
    rounds = summary["rounds"]
    refit = float(summary["config"]["federation"].get("refit-fraction", 0.0))
    first_refit = rounds - round(refit * rounds)
    levels, secondary = {}, None
    if compare_with:
        central = json.loads((Path(compare_with) / "summary.json").read_text())
        levels["centralized, test"] = central["metrics"]["ndcg@10"]
        secondary = ("centralized, validation", central["validation_curve"], "epoch")
    plot_validation_curve(
        {"federated, validation (by round)": summary["validation_curve"]}, path, x="round",
        title=(f"{summary['dataset']}: validation NDCG@10, federated (by round) vs centralized (by epoch)"
               if compare_with else f"{summary['dataset']}: validation NDCG@10 of federated training, by round"),
        levels=levels, secondary=secondary,
        shade=(first_refit, rounds, "refit rounds (validation items trained on)") if refit else None,
        points={"federated, test": (rounds, summary["metrics"]["ndcg@10"])})


def _secure_summary(settings: dict, history: list[dict]) -> dict:
    """Whether rounds were securely aggregated, with what parameters, how many aborted, and
    what the protocol's own steps cost per round (the `masked` step carries the training, as
    a plain round does). `fedrec bench secagg` measures the ratio to plain rounds."""
    if not settings.get("secure-aggregation"):
        return {"enabled": False}
    rounds = history[1:] or history  # round 1 includes starting Ray's workers
    steps = ("register", "shares", "unmask", "unmask-compute")
    extra = [sum(h["phase_seconds"].get(k, 0.0) for k in steps) for h in rounds]
    return {"enabled": True, "protocol": "SecAgg+ (X25519, HKDF-SHA256, AES-256-CTR masks, "
                                          "AES-GCM shares, Shamir over GF(2^521-1))",
            "params_last_round": history[-1]["metrics"].get("secagg") if history else None,
            "dropout_sized_for": settings.get("secagg-dropout"),
            "aborted_rounds": sum(any(r.startswith("round aborted") for r in h["rejected"]) for h in history),
            "skipped_rounds": sum(any(r.startswith("round skipped") for r in h["rejected"]) for h in history),
            "protocol_step_seconds_mean": round(float(np.mean(extra)), 3) if extra else 0.0,
            "masked_step_seconds_mean": round(float(np.mean([h["phase_seconds"].get("masked", 0.0)
                                                             for h in rounds])), 3) if rounds else 0.0}


def _time_split(history: list[dict]) -> dict:
    """Where a round's wall time goes: clients' own training (as they report it, spread over
    the CPUs that run them side by side) against everything else (Flower's scheduling,
    serialisation, Ray transfers, our aggregation and checkpoint). Round 1 is left out when
    there are others: it includes starting Ray's workers."""
    if not history:
        return {}
    if any(h["client_seconds_mean"] is None for h in history):
        return {"round_seconds_mean": round(float(np.mean([h["seconds"] for h in history])), 3),
                "note": "secure aggregation: clients report no timing; see secure_aggregation"}
    slots = os.cpu_count() or 1
    wall = float(np.mean([h["seconds"] for h in history]))
    compute = float(np.mean([h["client_seconds_mean"] * h["accepted"] for h in history])) / slots
    return {"round_seconds_mean": round(wall, 3), "client_seconds_mean": round(float(np.mean(
                [h["client_seconds_mean"] for h in history])), 4),
            "clients_side_by_side": slots, "client_compute_seconds": round(compute, 3),
            "overhead_seconds": round(wall - compute, 3),
            "client_compute_share": round(compute / wall, 3) if wall else 0.0}


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    p = np.percentile(values, [50, 90, 99])
    return {"p50": round(float(p[0]), 3), "p90": round(float(p[1]), 3), "p99": round(float(p[2]), 3),
            "mean": round(float(np.mean(values)), 3)}
