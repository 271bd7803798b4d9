"""The ClientApp's handlers that need torch: local training (plain, DP-SGD or inside a secure
round) and evaluation on this node's own log. client/app.py imports this module on first use,
so a node answering only the small secure-aggregation steps never loads torch or Opacus.
"""
from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from client import secure
from client.app import client_paths, ledger_path
from client.local import (LocalConfig, UserLog, load_weights, local_metrics, local_update, model_layout,
                          zero_update)
from client.privacy import PrivacyBudgetExceeded, PrivacyLedger, RecordPrivacy, private_local_update
from shared.privacy import noise_share_std
from shared.catalog_bundle import load_catalog
from shared.model import ModelConfig, Recommender
from shared.wire import from_record, to_record

MODEL_KEYS = ("dim", "layers", "heads", "max_len", "dropout", "id_buckets")


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


def _record_privacy(config: ConfigRecord, node_config: dict) -> RecordPrivacy | None:
    """Record-level DP settings for this round, or None. The budget is the server's target
    epsilon, or the device's own `privacy-budget` node config when that is smaller."""
    if str(config.get("privacy-mode", "none")) not in ("record", "both"):
        return None
    budget = float(config["privacy-budget"])
    if "privacy-budget" in node_config:
        budget = min(budget, float(node_config["privacy-budget"]))
    return RecordPrivacy(float(config["record-noise"]), float(config["record-clip"]), int(config["record-window"]),
                         budget, float(config["privacy-delta"]), str(config["privacy-accountant"]),
                         int(config.get("noise-shares", 0)))


def _noise_share_std(config: ConfigRecord) -> float:
    """This client's share of the round's distributed DP noise (0: none), from the round's
    parameters; the client checks them rather than taking a std from the server. A unit not
    in force has noise multiplier 0."""
    shares = int(config.get("noise-shares", 0))
    if not shares:
        return 0.0
    return noise_share_std(record_noise=float(config["record-noise"]),
                           record_sensitivity=float(config["local-lr"]) * float(config["record-clip"]),
                           user_noise=float(config["user-noise"]), user_clip=float(config["update-clip"]),
                           shares=shares)


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
    if int(config.get("noise-shares", 0)):
        # A plain reply would carry this client's update without its share of the noise.
        raise ValueError("distributed DP noise needs secure aggregation; refusing a plain round")
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


def handle_masked(msg: Message, context: Context, settings: dict) -> Message:
    """Secure aggregation's `masked` step: train as in a plain round, reply only the masked sum input."""
    model, log, config = _setup(msg, context, settings)
    rng = _seeded_rng(config, context)
    global_weights = from_record(msg.content["arrays"], model_layout(model))
    train = functools.partial(train_update, model, global_weights, log, config, context, settings, rng)
    return secure.handle_masked(msg, context, train, rng, noise_std=_noise_share_std(config))
