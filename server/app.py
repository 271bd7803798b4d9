"""The Flower ServerApp (Message API): a thin adapter around `server.federation`.

Configuration comes from the run config (`[tool.flwr.app.config]` in pyproject.toml, or
`flwr run . --run-config ...`); the simulation passes the same keys as `settings`, because
Flower's `run_simulation` hands the apps an empty run config. The server needs only the
public catalog bundle (to build the initial model), never a user's log.
"""
from __future__ import annotations

import traceback
from pathlib import Path

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from client.local import LocalConfig, shared_weights
from server.aggregation import ServerConfig
from server.federation import FederationConfig, RoundHook, run_federation
from server.secure import SecureConfig
from shared.catalog_bundle import load_catalog
from shared.model import ModelConfig, Recommender
from shared.privacy import PrivacyConfig
from shared.report import write_json

DEFAULTS = {
    "store": "runs/store/ml-100k", "out": "runs/federated",
    "rounds": 700, "clients-per-round": 25, "seed": 0,
    "local-epochs": 1, "local-lr": 1.0, "local-optimizer": "sgd", "train-on": "valid",
    "update-clip": 5.0,
    "server-optimizer": "fedadam", "server-lr": 1e-2, "server-eps": 1e-8, "weighting": "examples",
    "server-averaging": 0.95,
    "secure-aggregation": True, "secagg-neighbours": 0, "secagg-threshold": 0, "secagg-dropout": 0.1,
    "dim": 64, "layers": 2, "heads": 2, "max-len": 50, "dropout": 0.3, "id-buckets": 4096,
    "refit-fraction": 0.1, "eval-every": 0, "eval-clients": 100, "final-test": True,
    "privacy": "none", "target-epsilon": 8.0, "delta": 1e-5, "dp-accountant": "rdp",
    "record-clip": 1.0, "record-window": 51, "distributed-noise": False,
}


def federation_config(run_config: dict) -> FederationConfig:
    c = {**DEFAULTS, **run_config}
    return FederationConfig(
        rounds=int(c["rounds"]), clients_per_round=int(c["clients-per-round"]), seed=int(c["seed"]),
        local=LocalConfig(local_epochs=int(c["local-epochs"]), lr=float(c["local-lr"]),
                          optimizer=str(c["local-optimizer"]), train_on=str(c["train-on"]),
                          clip=float(c["update-clip"])),
        server=ServerConfig(optimizer=str(c["server-optimizer"]), lr=float(c["server-lr"]),
                            eps=float(c["server-eps"]), weighting=str(c["weighting"]),
                            averaging=float(c["server-averaging"])),
        model={"dim": int(c["dim"]), "layers": int(c["layers"]), "heads": int(c["heads"]),
               "max_len": int(c["max-len"]), "dropout": float(c["dropout"]),
               "id_buckets": int(c["id-buckets"])},
        refit_fraction=float(c["refit-fraction"]), eval_every=int(c["eval-every"]), eval_clients=int(c["eval-clients"]),
        final_test=bool(c["final-test"]),
        secure=SecureConfig(enabled=bool(c["secure-aggregation"]), neighbours=int(c["secagg-neighbours"]),
                            threshold=int(c["secagg-threshold"]), dropout=float(c["secagg-dropout"])),
        privacy=PrivacyConfig(mode=str(c["privacy"]), target_epsilon=float(c["target-epsilon"]),
                              delta=float(c["delta"]), accountant=str(c["dp-accountant"]),
                              record_clip=float(c["record-clip"]), record_window=int(c["record-window"]),
                              distributed_noise=bool(c["distributed-noise"])))


def check_privacy(cfg: FederationConfig) -> None:
    p, local = cfg.privacy, cfg.local
    if p.record and p.record_window - 1 > cfg.model["max_len"]:
        raise ValueError(f"record-window {p.record_window} needs max-len >= "
                         f"{p.record_window - 1} (it is {cfg.model['max_len']})")
    if p.distributed_noise:
        if p.mode == "none":
            raise ValueError("distributed-noise needs a privacy mode (record, user or both)")
        if not cfg.secure.enabled:
            raise ValueError("distributed-noise needs secure aggregation: without it the server "
                             "would see each update with only its own small share of the noise")
        if p.record and (local.local_epochs != 1 or local.optimizer != "sgd"):
            raise ValueError("distributed-noise with record-level DP needs local-epochs 1 and "
                             f"local-optimizer sgd (got {local.local_epochs} and {local.optimizer})")
        if local.clip <= 0:
            raise ValueError("distributed-noise needs update-clip > 0 (it bounds each contribution)")


def initial_weights(catalog_path: Path, cfg: FederationConfig) -> dict:
    catalog = load_catalog(catalog_path)
    torch.manual_seed(cfg.seed)
    model_cfg = ModelConfig(n_items=catalog.n_items, content_dim=catalog.content_dim, **cfg.model)
    content = torch.from_numpy(catalog.content) if catalog.content_dim else None
    return shared_weights(Recommender(model_cfg, content))


def serve(grid: Grid, run_config: dict, *, on_round: RoundHook | None = None, progress=None) -> dict:
    c = {**DEFAULTS, **run_config}
    cfg = federation_config(c)
    check_privacy(cfg)
    out = Path(str(c["out"]))
    try:
        final = run_federation(grid, cfg, initial_weights(Path(str(c["store"])) / "catalog.npz", cfg),
                               out, on_round=on_round, progress=progress)
        torch.save({"weights": final["weights"], "config": cfg.to_dict()}, out / "final.pt")
        write_json(out / "result.json", {"test": final["test"], "rounds": len(final["history"]),
                                         "privacy": final["privacy"]})
        return final
    except BaseException:
        # run_simulation logs and swallows ServerApp exceptions: leave the reason where the
        # caller looks for the result, so the failure cannot vanish.
        out.mkdir(parents=True, exist_ok=True)
        (out / "error.txt").write_text(traceback.format_exc())
        raise


def make_server_app(settings: dict | None = None, *, on_round: RoundHook | None = None,
                    progress=None) -> ServerApp:
    settings = dict(settings or {})
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        serve(grid, {**settings, **context.run_config}, on_round=on_round, progress=progress)

    return app


app = make_server_app()
