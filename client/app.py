"""The Flower ClientApp (Message API): a thin adapter around `client.local`.

Where the client's data lives:
  * on a device (a SuperNode), node config `user-log=PATH` (its own log, `UserLog` .npz) and
    `catalog=PATH` (the public catalog bundle);
  * in simulation, run config `store=DIR` plus node config `partition-id`: the log is
    DIR/users/<partition-id>.npz and the catalog DIR/catalog.npz.

A train message carries the global weights ("arrays") and a "config" record (round, model
shape, local training settings). The reply carries "delta" (trained - global, one flat
float32 vector like "arrays", see shared/wire.py) and "metrics" (num-examples, train-loss,
train-seconds). With secure aggregation a round is three messages instead (client/secure.py)
and the reply holds only a masked vector. An evaluate message gets
"metrics" with this one user's HR/NDCG/MRR @10 for the requested stage. Nothing else.
"""
from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import secure
from client.local import (LocalConfig, UserLog, load_weights, local_metrics, local_update, model_layout,
                          zero_update)
from client.privacy import PrivacyBudgetExceeded, PrivacyLedger, RecordPrivacy, private_local_update
from shared.catalog_bundle import load_catalog
from shared.model import ModelConfig, Recommender
from shared.wire import from_record, to_record

MODEL_KEYS = ("dim", "layers", "heads", "max_len", "dropout", "id_buckets")


def client_paths(node_config: dict, run_config: dict) -> tuple[Path, Path]:
    """(user log, catalog bundle) for this node."""
    if "user-log" in node_config:
        return Path(str(node_config["user-log"])), Path(str(node_config["catalog"]))
    store = Path(str(run_config["store"]))
    return store / "users" / f"{int(node_config['partition-id'])}.npz", store / "catalog.npz"


@functools.lru_cache(maxsize=4)
def _model(catalog_path: str, model_items: tuple) -> Recommender:
    """One model object per process and shape, reused by every virtual client it runs: the
    weights are overwritten from the message each time, so nothing carries between users."""
    catalog = load_catalog(Path(catalog_path))
    cfg = ModelConfig(n_items=catalog.n_items, content_dim=catalog.content_dim, **dict(model_items))
    return Recommender(cfg, torch.from_numpy(catalog.content) if catalog.content_dim else None)


def _setup(msg: Message, context: Context, settings: dict) -> tuple[Recommender, UserLog, ConfigRecord]:
    torch.set_num_threads(1)  # one core per virtual client: several run side by side
    log_path, catalog_path = client_paths(context.node_config, {**settings, **context.run_config})
    config = msg.content["config"]
    model_items = tuple((k, config[k]) for k in MODEL_KEYS)
    return _model(str(catalog_path), model_items), UserLog.load(log_path), config


def ledger_path(node_config: dict, run_config: dict) -> Path:
    """This client's privacy ledger: node config `privacy-ledger`, else beside its log."""
    if "privacy-ledger" in node_config:
        return Path(str(node_config["privacy-ledger"]))
    log_path, _ = client_paths(node_config, run_config)
    return log_path.with_name(log_path.name.removesuffix(".npz") + ".privacy.json")


def _record_privacy(config: ConfigRecord, node_config: dict) -> RecordPrivacy | None:
    """Record-level DP settings for this round, or None. The budget is the server's target
    epsilon, or the device's own `privacy-budget` node config when that is smaller."""
    if str(config.get("privacy-mode", "none")) not in ("record", "both"):
        return None
    budget = float(config["privacy-budget"])
    if "privacy-budget" in node_config:
        budget = min(budget, float(node_config["privacy-budget"]))
    return RecordPrivacy(float(config["record-noise"]), float(config["record-clip"]), int(config["record-window"]),
                         budget, float(config["privacy-delta"]), str(config["privacy-accountant"]))


def train_update(model: Recommender, global_weights: dict, user: UserLog, config: ConfigRecord,
                 context: Context, settings: dict, rng: np.random.Generator) -> tuple[dict, dict]:
    """One round of local training, private or not: (delta, metrics). A client whose record-level
    budget would be exceeded does not train; it answers a zero update with `privacy-refused`."""
    local = _local_config(config)
    privacy = _record_privacy(config, context.node_config)
    if privacy is None:
        return local_update(model, global_weights, user, local, rng)
    ledger = PrivacyLedger(ledger_path(context.node_config, {**settings, **context.run_config}))
    try:
        return private_local_update(model, global_weights, user, local, privacy, ledger, rng)
    except PrivacyBudgetExceeded as refusal:
        logging.getLogger("fedrec.client").warning("node %d refuses to train: %s", context.node_id, refusal)
        return zero_update(global_weights), {"num-examples": 0.0, "train-loss": float("nan"), "privacy-refused": 1.0,
                                             "record-epsilon": ledger.spent(privacy.delta, privacy.accountant)}


def _local_config(config: ConfigRecord) -> LocalConfig:
    return LocalConfig(local_epochs=int(config["local-epochs"]), lr=float(config["local-lr"]),
                       optimizer=str(config["local-optimizer"]), train_on=str(config["train-on"]),
                       clip=float(config.get("update-clip", 0.0)))


def _seeded_rng(config: ConfigRecord, context: Context) -> np.random.Generator:
    """Per (run seed, round, node): reproducible local training (dropout, window order)."""
    seed = (int(config["seed"]), int(config["server-round"]), int(context.node_id) % (2**32))
    torch.manual_seed(hash(seed) % (2**31))
    return np.random.default_rng(seed)


def handle_train(msg: Message, context: Context, settings: dict) -> Message:
    model, log, config = _setup(msg, context, settings)
    global_weights = from_record(msg.content["arrays"], model_layout(model))
    rng = _seeded_rng(config, context)
    started = time.perf_counter()
    delta, metrics = train_update(model, global_weights, log, config, context, settings, rng)
    metrics["train-seconds"] = time.perf_counter() - started
    content = RecordDict({"delta": to_record(delta),
                          "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


def handle_evaluate(msg: Message, context: Context, settings: dict) -> Message:
    model, log, config = _setup(msg, context, settings)
    load_weights(model, from_record(msg.content["arrays"], model_layout(model)))
    metrics = local_metrics(model, log, str(config["stage"]))
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


class FedRecClientApp(ClientApp):
    """Flower's simulation pickles the ClientApp with every message it hands a worker; by
    value, our handler closures cost 2+ ms of the server process's time each (cloudpickle
    scans sys.modules for each). This one pickles as the call that builds it."""

    def __init__(self, settings: dict, mods: list | None):
        super().__init__(mods=mods or [])
        self._recipe = (settings, mods)

    def __reduce__(self):
        return make_client_app, self._recipe


def make_client_app(settings: dict | None = None, mods: list | None = None) -> ClientApp:
    """`settings` stand in for the run config where Flower passes none (run_simulation);
    `mods` are Flower client mods wrapped around every handler."""
    settings = dict(settings or {})
    app = FedRecClientApp(settings, mods)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, settings)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, settings)

    # Secure aggregation: registration once, then three steps a round (client/secure.py).
    @app.train("secagg_register")
    def secagg_register(msg: Message, context: Context) -> Message:
        return secure.handle_register(msg, context)

    @app.train("secagg_shares")
    def secagg_shares(msg: Message, context: Context) -> Message:
        return secure.handle_shares(msg, context)

    @app.train("secagg_masked")
    def secagg_masked(msg: Message, context: Context) -> Message:
        model, log, config = _setup(msg, context, settings)
        rng = _seeded_rng(config, context)
        train = functools.partial(train_update, model, user=log, config=config, context=context,
                                  settings=settings, rng=rng)
        return secure.handle_masked(msg, context, model, train, rng)

    @app.train("secagg_unmask")
    def secagg_unmask(msg: Message, context: Context) -> Message:
        return secure.handle_unmask(msg, context)

    return app


app = make_client_app()
