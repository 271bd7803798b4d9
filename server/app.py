"""The Flower ServerApp (Message API): a thin adapter around `fedrec.server.federation`.

Configuration comes from the run config (`[tool.flwr.app.config]` in pyproject.toml, or
`flwr run . --run-config ...`); the simulation passes the same keys as `settings`, because
Flower's `run_simulation` hands the apps an empty run config. The server needs only the
public catalog bundle (to build the initial model), never a user's log.
"""
from __future__ import annotations

import logging
import traceback
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedrec.server.aggregation import ServerConfig
from fedrec.server.checkpoint import load_checkpoint, save_checkpoint
from fedrec.server.exchange import is_simulation
from fedrec.server.federation import FederationConfig, RoundHook, run_federation, same_run
from fedrec.server.release import ReleaseFailed, choose_blend, release_item_item, sum_item_counts
from fedrec.server.secure import SecureConfig, SecureRound
from fedrec.shared.data.catalog_bundle import load_catalog
from fedrec.shared.model.config import ModelHyper
from fedrec.shared.bundle import write_model_bundle
from fedrec.shared.model.fusion import ENCODER_ALONE, Blend, FusionConfig
from fedrec.shared.model.recommender import build_recommender, load_weights, shared_weights
from fedrec.shared.privacy.accounting import PrivacyConfig
from fedrec.shared.privacy.cooccurrence import cooccurrence_from_counts
from fedrec.shared.protocol import LocalConfig
from fedrec.shared.report import write_json
from fedrec.shared.settings import default, read_run_config

log = logging.getLogger("fedrec.server")


def federation_config(run_config: dict) -> FederationConfig:
    """The federation from run-config keys (shared/settings.py), checked there first."""
    c = read_run_config(run_config)
    return FederationConfig(
        rounds=c["rounds"], clients_per_round=c["clients-per-round"], participations=c["participations"], seed=c["seed"],
        local=LocalConfig(local_epochs=c["local-epochs"], lr=c["local-lr"], optimizer=c["local-optimizer"],
                          train_on=c["train-on"], clip=c["update-clip"]),
        server=ServerConfig(optimizer=c["server-optimizer"], lr=c["server-lr"], eps=c["server-eps"],
                            weighting=c["weighting"], averaging=c["server-averaging"]),
        model=ModelHyper(dim=c["dim"], layers=c["layers"], heads=c["heads"], max_len=c["max-len"],
                         dropout=c["dropout"], id_buckets=c["id-buckets"], id_dropout=c["id-dropout"],
                         content=c["content"]),
        refit_fraction=c["refit-fraction"], federated_eval_every=c["federated-eval-every"], eval_clients=c["eval-clients"],
        patience=c["federated-patience"],
        time_budget_s=c["federated-time-budget"],
        final_test=c["final-test"], min_nodes=c["min-nodes"], wait_for_nodes_s=c["wait-for-nodes"],
        secure=SecureConfig(enabled=c["secure-aggregation"], neighbours=c["secagg-neighbours"],
                            threshold=c["secagg-threshold"], dropout=c["secagg-dropout"],
                            enrolment_ca=str(Path(c["store"]) / "enrolment-ca.pub")),
        privacy=PrivacyConfig(mode=c["privacy"], target_epsilon=c["target-epsilon"], delta=c["delta"],
                              accountant=c["dp-accountant"], record_clip=c["record-clip"],
                              record_window=c["record-window"], distributed_noise=c["distributed-noise"],
                              private_model=c["private-model"]),
        fusion=FusionConfig.from_run_config(c))


def initial_weights(catalog_path: Path, cfg: FederationConfig) -> dict:
    catalog = load_catalog(catalog_path)
    torch.manual_seed(cfg.seed)
    return shared_weights(build_recommender(cfg.model, catalog.n_items,
                                            catalog.content if catalog.content_dim else None))


class NoRoundTrained(RuntimeError):
    """Every round was skipped or aborted: there is no trained model to ship."""


def serve(grid: Grid, run_config: dict, *, on_round: RoundHook | None = None, progress=None) -> dict:
    out = Path(str(run_config.get("out", default("out"))))
    try:
        cfg = federation_config(run_config)
        store = Path(str(run_config.get("store", default("store"))))
        if cfg.privacy.releases_item_item:
            try:
                final = release_item_item(grid, cfg, load_catalog(store / "catalog.npz").n_items, out,
                                          progress=progress)
            except ReleaseFailed as err:
                write_json(out / "result.json", {"test": None, "rounds": 1, "rounds_trained": 0, "privacy": None,
                                                 "stopped": {"round": 1, "why": f"the release failed: {err}"}})
                raise NoRoundTrained(str(err)) from None
            save_checkpoint(out / "final.pt", {key: final[key] for key in ("item_item", "decay", "popularity",
                                                                        "popularity_weight")} | {"config": cfg.to_dict()})
        else:
            final = run_federation(grid, cfg, initial_weights(store / "catalog.npz", cfg),
                                   out, on_round=on_round, progress=progress)
            cfg = final["federation"]   # with the rounds and cohort the schedule chose
            saved = {"weights": final["weights"], "config": cfg.to_dict()}
            final["fusion"] = fuse_item_model(grid, cfg, load_catalog(store / "catalog.npz").n_items, out, saved,
                                              final["selected_weights"], progress, resumed=final["resumed"],
                                              # In deployment a device may have restarted (a new identity
                                              # key) since round 1: it registers afresh, not sit the
                                              # once-only sums out. In simulation none restarts.
                                              secure=final.get("secure_round") if is_simulation(grid) else None)
            save_checkpoint(out / "final.pt", saved)   # atomic: it may hold the only copy of a once-only sum
            final["bundle"] = publish_bundle(out / "bundle", cfg, load_catalog(store / "catalog.npz"), saved, final)
        trained = sum(bool(h.get("trained")) for h in final["history"])
        write_json(out / "result.json", {"test": final["test"], "rounds": len(final["history"]),
                                         "rounds_trained": trained, "privacy": final["privacy"],
                                         "fusion": final.get("fusion"), "bundle": final.get("bundle"),
                                         "stopped": final.get("stopped"), "schedule": final.get("schedule")})
        if final["history"] and not trained:
            reasons = sorted({r for h in final["history"] for r in h["rejected"]})[:3]
            raise NoRoundTrained(f"none of the {len(final['history'])} rounds trained (skipped or aborted): "
                                 f"{'; '.join(reasons)}")
        return final
    except BaseException:
        # run_simulation logs and swallows ServerApp exceptions: leave the reason where the
        # caller looks for the result, so the failure cannot vanish.
        out.mkdir(parents=True, exist_ok=True)
        (out / "error.txt").write_text(traceback.format_exc())
        raise


def fuse_item_model(grid: Grid, cfg: FederationConfig, n_items: int, out: Path, saved: dict, selected: dict | None,
                    progress, *, resumed: bool = False, secure: SecureRound | None = None) -> dict:
    """After the encoder's rounds: the item co-occurrence counts by one secure sum, saved for the item
    models blended with the encoder (shared/model/fusion.py), then the blend chosen from a second
    secure sum, of devices' validation statistics (`choose_blend`; `selected`: the encoder before its
    refit rounds; `secure`: the training rounds' SecureRound, whose registrations both sums reuse).
    Only with secure aggregation and without DP: in the clear every device's item set
    would show, and exact counts are not DP. Returns what the summary says about it."""
    fusion = cfg.fusion
    if fusion.kind == "none":
        return {"chosen": "encoder alone", "why": "--fusion none"}
    if not cfg.secure.enabled or cfg.privacy.mode != "none":
        why = ("it needs secure aggregation (each device's counts would reach the server in the clear)"
               if not cfg.secure.enabled else "exact counts are not differentially private")
        log.warning("the encoder alone, without the item model: %s", why)
        return {"chosen": "encoder alone", "why": why}
    earlier = _released_before(out, cfg, saved, n_items) if resumed else None
    if earlier is not None:
        return earlier
    try:
        counts, record = sum_item_counts(grid, cfg, n_items, cfg.rounds + 1, out, progress=progress, secure=secure)
    except ReleaseFailed as err:
        log.warning("the encoder alone, without the item model: %s", err)
        return {"chosen": "encoder alone", "why": str(err)}
    saved["item_counts"] = cooccurrence_from_counts(counts, n_items).astype(np.float32)
    saved["fusion"] = asdict(fusion)
    blend, report = fusion.fallback, {"chosen": fusion.fallback.label,
                                      "why": "no blend round (--blend-devices 0): the fixed --fusion-weight"}
    if fusion.blend_devices and selected is None:
        report = {"chosen": blend.label, "why": "no encoder from before the refit rounds (selected.pt) to judge on "
                                                "validation: the fixed --fusion-weight"}
    elif fusion.blend_devices:
        try:
            blend, report = choose_blend(grid, cfg, counts, selected, cfg.rounds + 2, out, progress=progress,
                                         secure=secure)
        except ReleaseFailed as err:
            log.warning("the blend round failed; the fixed --fusion-weight instead: %s", err)
            report = {"chosen": blend.label, "why": f"the blend round failed ({err}): the fixed --fusion-weight"}
    saved["blend"] = blend.to_dict()
    return {**report, "chosen": blend.label, "blend": blend.to_dict(),
            "item_model": {k: fusion.settings(k) for k in blend.kinds},
            "counts_round": {"contributions": record["accepted"], "seconds": record["seconds"],
                             "bytes_up_per_client": record["bytes_up_mean"],
                             "server_learns": "the item and item-pair counts summed over every device (not DP)"}}


def _released_before(out: Path, cfg: FederationConfig, saved: dict, n_items: int) -> dict | None:
    """This run finished before (it is resumed, or continued with more rounds): its devices gave their
    counts and validation statistics then, once ever, so the sum and the blend it chose are kept
    (the blend is not judged again on the new encoder). None when there is no such earlier finish."""
    earlier = load_checkpoint(out / "final.pt")
    if earlier is None or earlier.get("item_counts") is None or not same_run(earlier["config"], cfg.to_dict()) \
            or np.shape(earlier["item_counts"]) != (n_items + 1, n_items + 1):
        return None
    fusion = cfg.fusion
    blend = Blend.from_dict(earlier["blend"]) if "blend" in earlier else fusion.fallback
    saved.update(item_counts=earlier["item_counts"], fusion=asdict(fusion), blend=blend.to_dict())
    return {"chosen": blend.label, "blend": blend.to_dict(), "item_model": {k: fusion.settings(k) for k in blend.kinds},
            "why": "kept from this run's earlier finish: devices give their counts and validation statistics once"}


def publish_bundle(folder: Path, cfg: FederationConfig, catalog, saved: dict, final: dict) -> dict:
    """The published model (shared/bundle.py) from what the server holds at the end: the final shared
    weights, the public catalog, and with a blend its item models fit from the summed counts."""
    model = build_recommender(cfg.model, catalog.n_items, catalog.content if catalog.content_dim else None)
    load_weights(model, saved["weights"])
    blend = Blend.from_dict(saved["blend"]) if "blend" in saved else ENCODER_ALONE
    counts = saved.get("item_counts")
    fitted = {k: cfg.fusion.item_model(k, np.asarray(counts, dtype=np.float64)) for k in blend.kinds}
    # The summed counts' diagonal: how many devices hold each item (not DP; only without DP is there a sum).
    popularity = np.diag(np.asarray(counts, dtype=np.float64)).copy() if counts is not None else None
    manifest = write_model_bundle(folder, model, catalog, blend=blend, fitted=fitted, popularity=popularity,
                                  run={"mode": "federated", "metrics": final.get("test"),
                                       "privacy": final.get("privacy"), "rounds": len(final.get("history", []))})
    return {"path": str(folder), "version": manifest["version"]}


def make_server_app(settings: dict | None = None, *, on_round: RoundHook | None = None,
                    progress=None) -> ServerApp:
    settings = dict(settings or {})
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        serve(grid, {**settings, **context.run_config}, on_round=on_round, progress=progress)

    return app


app = make_server_app()
