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
from flwr.app import Context, Message

from client import secure
from client.local import LocalStep, local_metrics, local_update
from client.privacy import DPStep, PrivacyBudgetExceeded, PrivacyLedger, RecordPrivacy
from client.store import UserLog, client_paths, ledger_path
from shared.data.catalog_bundle import load_catalog
from shared.model.config import ModelHyper
from shared.model.recommender import Recommender, build_recommender, load_weights, model_layout
from shared.privacy.accounting import noise_share_std
from shared.protocol import (PrivacyRound, RoundConfig, TrainMetrics, Weights, from_record, pack_eval_reply,
                             pack_train_reply, unpack_round_config, zero_update)

log = logging.getLogger("fedrec.client")


@functools.lru_cache(maxsize=4)
def _model(catalog_path: str, hyper: ModelHyper) -> Recommender:
    """One model object per process and shape, reused by every virtual client it runs: the
    weights are overwritten from the message each time, so nothing carries between users."""
    catalog = load_catalog(Path(catalog_path))
    return build_recommender(hyper, catalog.n_items, catalog.content if catalog.content_dim else None)


def _setup(msg: Message, context: Context, settings: dict) -> tuple[Recommender, UserLog, RoundConfig, Weights]:
    torch.set_num_threads(1)  # one core per virtual client: several run side by side
    log_path, catalog_path = client_paths(context.node_config, {**settings, **context.run_config})
    config = unpack_round_config(msg.content["config"])
    model = _model(str(catalog_path), config.model)
    return model, UserLog.load(log_path), config, from_record(msg.content["arrays"], model_layout(model))


def _record_privacy(p: PrivacyRound, node_config: dict) -> RecordPrivacy | None:
    """Record-level DP settings for this round, or None. The budget is the server's target
    epsilon, or the device's own `privacy-budget` node config when that is smaller."""
    if not p.record:
        return None
    budget = p.budget
    if "privacy-budget" in node_config:
        budget = min(budget, float(node_config["privacy-budget"]))
    return RecordPrivacy(p.record_noise, p.record_clip, p.record_window, budget, p.delta, p.accountant,
                         p.noise_shares)


def noise_share_of(config: RoundConfig) -> float:
    """This client's share of the round's distributed DP noise (0: none), from the round's
    parameters; the client computes it rather than taking a std from the server. A unit not
    in force has noise multiplier 0."""
    p = config.privacy
    if not p.noise_shares:
        return 0.0
    return noise_share_std(record_noise=p.record_noise, record_sensitivity=config.local.lr * p.record_clip,
                           user_noise=p.user_noise, user_clip=config.local.clip, shares=p.noise_shares)


def train_update(model: Recommender, global_weights: Weights, user: UserLog, config: RoundConfig,
                 context: Context, settings: dict, rng: np.random.Generator) -> tuple[Weights, TrainMetrics]:
    """One round of local training, private or not: (delta, metrics). A client whose record-level
    budget would be exceeded does not train; it answers a zero update with `privacy_refused`."""
    privacy = _record_privacy(config.privacy, context.node_config)
    if privacy is None:
        return local_update(model, global_weights, user, config.local, rng, LocalStep())
    ledger = PrivacyLedger(ledger_path(context.node_config, {**settings, **context.run_config}))
    step = DPStep(privacy, ledger, config.local.local_epochs, config.local.optimizer)
    try:
        return local_update(model, global_weights, user, config.local, rng, step)
    except PrivacyBudgetExceeded as refusal:
        log.warning("node %d refuses to train: %s", context.node_id, refusal)
        return zero_update(global_weights), TrainMetrics(0.0, privacy_refused=True,
                                                         record_epsilon=ledger.spent(privacy.delta, privacy.accountant))


def _seeded_rng(config: RoundConfig, context: Context) -> np.random.Generator:
    """Per (run seed, round, node): reproducible local training (dropout, window order)."""
    seed = (config.seed, config.server_round, int(context.node_id) % (2**32))
    torch.manual_seed(hash(seed) % (2**31))
    return np.random.default_rng(seed)


def handle_train(msg: Message, context: Context, settings: dict) -> Message:
    model, log_, config, global_weights = _setup(msg, context, settings)
    if config.privacy.noise_shares:
        # A plain reply would carry this client's update without its share of the noise.
        raise ValueError("distributed DP noise needs secure aggregation; refusing a plain round")
    started = time.perf_counter()
    delta, metrics = train_update(model, global_weights, log_, config, context, settings, _seeded_rng(config, context))
    metrics.train_seconds = time.perf_counter() - started
    return Message(content=pack_train_reply(delta, metrics), reply_to=msg)


def handle_evaluate(msg: Message, context: Context, settings: dict) -> Message:
    model, log_, config, weights = _setup(msg, context, settings)
    load_weights(model, weights)
    return Message(content=pack_eval_reply(local_metrics(model, log_, config.stage)), reply_to=msg)


def handle_masked(msg: Message, context: Context, settings: dict) -> Message:
    """Secure aggregation's `masked` step: train as in a plain round, reply only the masked sum input."""
    model, log_, config, global_weights = _setup(msg, context, settings)
    rng = _seeded_rng(config, context)
    train = functools.partial(train_update, model, global_weights, log_, config, context, settings, rng)
    return secure.handle_masked(msg, context, train, rng, config, noise_std=noise_share_of(config))
