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

from fedrec.client import secure
from fedrec.client.local import LocalStep, local_metrics, local_update
from fedrec.client.privacy import DevicePolicy, DPStep, PrivacyBudgetExceeded, PrivacyLedger, PrivacyRefusal
from fedrec.client.sealed import SealedFileError
from fedrec.client.store import DeviceFiles, LedgerFile, LedgerMissing, TooFewEvents, UserLog, device_files
from fedrec.shared.data.catalog_bundle import load_catalog
from fedrec.shared.model import fusion
from fedrec.shared.model.config import ModelHyper
from fedrec.shared.model.recommender import RecommenderModel, build_recommender, load_weights, model_layout
from fedrec.shared.privacy import cooccurrence
from fedrec.shared.privacy.accounting import noise_share_std
from fedrec.shared.settings import default
from fedrec.shared.model.training import model_scorer
from fedrec.shared.protocol import (MalformedRecord, PrivacyRound, RoundConfig, TrainMetrics, Weights, from_record,
                             pack_eval_reply, pack_refusal, pack_train_reply, unpack_blend_request,
                             unpack_round_config, zero_update)

log = logging.getLogger("fedrec.client")


@functools.lru_cache(maxsize=4)
def _model(catalog_path: str, hyper: ModelHyper) -> RecommenderModel:
    """One model object per process and shape, reused by every virtual client it runs: the
    weights are overwritten from the message each time, so nothing carries between users."""
    catalog = load_catalog(Path(catalog_path))
    return build_recommender(hyper, catalog.n_items, catalog.content if catalog.content_dim else None)


def _setup(msg: Message, context: Context, settings: dict,
           config: RoundConfig) -> tuple[RecommenderModel, UserLog, Weights]:
    torch.set_num_threads(1)  # one core per virtual client: several run side by side
    files = _files(context, settings)
    model = _model(str(files.catalog), config.model)
    return model, files.user_log(), from_record(msg.content["arrays"], model_layout(model))


def _files(context: Context, settings: dict) -> DeviceFiles:
    return device_files(context.node_config, {**settings, **context.run_config})


# A device whose own files cannot be used (a wrong key, a changed or torn file, too short a log)
# answers with the reason, and touches nothing.
STORE_PROBLEMS = (SealedFileError, TooFewEvents, FileNotFoundError)


def privacy_problem(config: RoundConfig, context: Context, settings: dict) -> str | None:
    """Why this device will not take part in the round (its privacy policy, a missing ledger), or None."""
    try:
        policy = DevicePolicy.of(context.node_config, settings)
        problems = policy.problems(config.privacy)
        if problems:
            return "the round asks more than this device allows: " + "; ".join(problems)
        if config.privacy.record or config.stage == cooccurrence.STAGE:   # a round that spends needs the ledger
            PrivacyLedger(_files(context, settings).ledger)
        _files(context, settings).user_log()   # a device with no usable log says so before the round
    except (ValueError, PrivacyRefusal, FileNotFoundError) as err:
        return str(err)
    return None


def released(metrics: TrainMetrics, privacy: PrivacyRound) -> TrainMetrics:
    """What may leave with an update. In a DP mode only what does not depend on the data: a fixed
    weight (1; 0 for a client that refused on its budget, which depends only on the rounds it took
    part in), its epsilon, and no loss, example count or timing, none of which is noised."""
    if privacy.mode == "none":
        return metrics
    return TrainMetrics(0.0 if metrics.privacy_refused else 1.0, privacy_refused=metrics.privacy_refused,
                        record_epsilon=metrics.record_epsilon)


def noise_share_of(config: RoundConfig) -> float:
    """This client's share of the round's distributed DP noise (0: none), from the round's
    parameters; the client computes it rather than taking a std from the server. A unit not
    in force has noise multiplier 0."""
    p = config.privacy
    if not p.noise_shares:
        return 0.0
    return noise_share_std(record_noise=p.record_noise, record_sensitivity=config.local.lr * p.record_clip,
                           user_noise=p.user_noise, user_clip=config.local.clip, shares=p.noise_shares)


def train_update(model: RecommenderModel, global_weights: Weights, user: UserLog, config: RoundConfig,
                 context: Context, settings: dict, rng: np.random.Generator) -> tuple[Weights, TrainMetrics]:
    """One round of local training, private or not: (delta, metrics as they may be released). A
    client whose record-level budget would be exceeded does not train; it answers a zero update
    with `privacy_refused`. Raises PrivacyRefusal for a round beyond this device's policy."""
    if not config.privacy.record:
        delta, metrics = local_update(model, global_weights, user, config.local, rng, LocalStep())
        return delta, released(metrics, config.privacy)
    privacy = DevicePolicy.of(context.node_config, settings).record_privacy(config.privacy)
    ledger = PrivacyLedger(_files(context, settings).ledger)
    step = DPStep(privacy, ledger, config.local.local_epochs, config.local.optimizer)
    try:
        delta, metrics = local_update(model, global_weights, user, config.local, rng, step)
    except PrivacyBudgetExceeded as refusal:
        log.warning("node %d refuses to train: %s", context.node_id, refusal)
        delta, metrics = zero_update(global_weights), TrainMetrics(
            0.0, privacy_refused=True, record_epsilon=ledger.spent(privacy.delta, privacy.accountant))
    return delta, released(metrics, config.privacy)


def _seeded_rng(config: RoundConfig, context: Context) -> np.random.Generator:
    """Per (run seed, round, node): reproducible local training (dropout, window order)."""
    seed = (config.seed, config.server_round, int(context.node_id) % (2**32))
    torch.manual_seed(hash(seed) % (2**31))
    return np.random.default_rng(seed)


def _refuse(msg: Message, context: Context, reason: str) -> Message:
    log.warning("node %d refuses %r: %s", context.node_id, msg.metadata.message_type, reason)
    return Message(content=pack_refusal(reason), reply_to=msg)


def handle_train(msg: Message, context: Context, settings: dict) -> Message:
    config = unpack_round_config(msg.content["config"])
    if config.privacy.noise_shares:
        # A plain reply would carry this client's update without its share of the noise.
        return _refuse(msg, context, "distributed DP noise needs secure aggregation; refusing a plain round")
    problem = privacy_problem(config, context, settings)
    if problem:
        return _refuse(msg, context, problem)
    model, log_, global_weights = _setup(msg, context, settings, config)
    started = time.perf_counter()
    delta, metrics = train_update(model, global_weights, log_, config, context, settings, _seeded_rng(config, context))
    if config.privacy.mode == "none":   # timing grows with the data: not released under DP
        metrics.train_seconds = time.perf_counter() - started
    return Message(content=pack_train_reply(delta, metrics), reply_to=msg)


def handle_evaluate(msg: Message, context: Context, settings: dict) -> Message:
    try:
        unit = DevicePolicy.of(context.node_config, settings).unit
    except ValueError as err:   # a device whose own policy is broken answers nothing about its data
        return _refuse(msg, context, str(err))
    if unit != "none":
        # One user's metrics on a held-out interaction, exact: nothing a DP guarantee covers.
        return _refuse(msg, context, "this device requires differential privacy, and evaluation replies are "
                                     "not noised")
    config = unpack_round_config(msg.content["config"])
    try:
        model, log_, weights = _setup(msg, context, settings, config)
    except STORE_PROBLEMS as err:
        return _refuse(msg, context, str(err))
    load_weights(model, weights)
    return Message(content=pack_eval_reply(local_metrics(model, log_, config.stage)), reply_to=msg)


def handle_masked(msg: Message, context: Context, settings: dict) -> Message:
    """Secure aggregation's `masked` step: train as in a plain round (or, for the DP item-item
    release, compute this user's co-occurrence), reply only the masked sum input."""
    config = unpack_round_config(msg.content["config"])
    problem = privacy_problem(config, context, settings)
    if problem:
        return secure.refuse_round(msg, context, problem)
    if config.stage == cooccurrence.STAGE:
        return _item_item_masked(msg, context, settings, config)
    if config.stage == cooccurrence.COUNTS_STAGE:
        return _item_counts_masked(msg, context, settings, config)
    if config.stage == fusion.BLEND_STAGE:
        return _blend_masked(msg, context, settings, config)
    model, log_, global_weights = _setup(msg, context, settings, config)
    rng = _seeded_rng(config, context)
    train = functools.partial(train_update, model, global_weights, log_, config, context, settings, rng)
    return secure.handle_masked(msg, context, train, config, noise_std=noise_share_of(config))


def _item_counts_masked(msg: Message, context: Context, settings: dict, config: RoundConfig) -> Message:
    """This user's exact item and item-pair counts (its newest items, shared/privacy/cooccurrence.py)
    for the item model fused with the encoder: only inside a secure sum (this handler is secure
    aggregation's masked step), only without DP (a DP device refused above, on its policy), and
    against a server that may not follow the protocol:
    - once per device, ever (recorded in its ledger before anything leaves): two sums
      that differ by one device would show that device's items;
    - unmasked only in a sum of at least `counts-min-devices` witnessed devices (its node config's
      floor, else the app's): a thin sum would show its few contributors' items;
    - only at the clip its vector was made for: a smaller clip would rescale it by a factor that
      depends on how many items it holds, and tag its coordinates in the sum."""
    if config.privacy.mode != "none":
        return secure.refuse_round(msg, context, "exact co-occurrence counts are not sent in a DP run")
    files = _files(context, settings)
    n_items = load_catalog(files.catalog).n_items
    floor = exact_sum_floor(context, settings)

    def contribute() -> tuple[Weights, TrainMetrics]:
        _give_once(files.ledger, "counts", "its co-occurrence counts", config, context)   # the blend round checks the run
        # Never the test item: the history a test-time recommendation would start from.
        items = files.user_log().history("test")
        return {"counts": cooccurrence.counts_contribution(items, n_items)}, TrainMetrics(1.0)

    return secure.handle_masked(msg, context, contribute, config, noise_std=0.0, min_alive=floor,
                                exact_clip=cooccurrence.COUNTS_CLIP, whole=True)


def _blend_masked(msg: Message, context: Context, settings: dict, config: RoundConfig) -> Message:
    """This user's NDCG@10 on its validation item under each candidate blend (shared/model/fusion.py:
    the encoder the message carries, item models fit from the summed counts it carries, with this
    device's validation item taken back out), with their products, for the server to choose the blend
    from their sum. Only inside a secure sum, only without DP, only from a device whose counts are in
    the sum (it gave them in this run), and against a server that may not follow the protocol, as the
    counts: once per device (recorded in its ledger), unmasked only in a sum of at least its floor
    of devices, with uniform weights, at the clip its vector was made for. Never the test item."""
    if config.privacy.mode != "none":
        return secure.refuse_round(msg, context, "validation statistics are not sent in a DP run")
    files = _files(context, settings)
    n_items = load_catalog(files.catalog).n_items
    try:
        counts, kinds, wire = unpack_blend_request(msg.content, cooccurrence.counts_size(n_items), fusion.BLEND_KINDS)
    except MalformedRecord as err:
        return secure.refuse_round(msg, context, str(err))
    try:
        counted = files.ledger.given("counts") if files.ledger else None
    except (LedgerMissing, ValueError) as err:   # a missing or damaged ledger: refuse, never crash the round
        return secure.refuse_round(msg, context, str(err))
    if not counted or f"run {context.run_id}\n" not in counted:
        # Its own part must be in the counts to be taken back out; else the item models would be wrong.
        return secure.refuse_round(msg, context, "this device's counts are not in this run's sum")
    kinds = tuple(k for k in fusion.BLEND_KINDS if k in kinds)   # one order for every device
    candidates = fusion.blends(kinds)

    def contribute() -> tuple[Weights, TrainMetrics]:
        model, log_, weights = _setup(msg, context, settings, config)
        if not all(np.isfinite(w).all() for w in weights.values()):
            raise secure.ProtocolViolation("the encoder's weights are not finite")
        load_weights(model, weights)
        try:
            own = cooccurrence.without_own_validation(counts, log_.history("valid"), log_.target("valid"), n_items)
            values = fusion.device_blend_ndcg(model_scorer(model), own, log_.history("valid"), log_.target("valid"),
                                              kinds, fusion.FusionConfig(**wire))
        except (ValueError, np.linalg.LinAlgError) as err:   # counts no honest sum gives
            raise secure.ProtocolViolation(f"the item models cannot be fit from these counts: {err}") from None
        _give_once(files.ledger, "blend", "its validation statistics", config, context)   # after computing, before it leaves
        return {"statistics": fusion.blend_statistics(values[None, :])}, TrainMetrics(1.0)

    return secure.handle_masked(msg, context, contribute, config, noise_std=0.0,
                                min_alive=exact_sum_floor(context, settings),
                                exact_clip=fusion.statistics_clip(len(candidates)))


def _give_once(ledger: LedgerFile | None, name: str, what: str, config: RoundConfig, context: Context) -> None:
    """Record in the device's ledger, before anything leaves, that this device gives `what` (once,
    ever: two sums that differ by one device would show its part); ProtocolViolation when it already
    has, or has no ledger to record it in. The record names the round and the run."""
    if ledger is None:
        raise secure.ProtocolViolation(f"this device has no ledger to record that it gave {what}")
    try:
        first = ledger.give_once(name, f"round {config.server_round} run {context.run_id}\n")
    except (LedgerMissing, ValueError) as err:   # a missing or damaged ledger: refuse, never crash the round
        raise secure.ProtocolViolation(str(err)) from None
    if not first:
        raise secure.ProtocolViolation(f"this device gave {what} once already ({ledger.path}: {ledger.given(name).strip()}); "
                                       "it gives them at most once")


def exact_sum_floor(context: Context, settings: dict) -> int:
    """The fewest devices an exact (un-noised) sum of this device's data may be unmasked in: its node
    config's `counts-min-devices`, else the app's (the device's own settings), never the run config,
    which the party that submits the run writes; at least 2."""
    value = context.node_config.get("counts-min-devices", settings.get("counts-min-devices",
                                                                        default("counts-min-devices")))
    return max(2, int(value))


def _item_item_masked(msg: Message, context: Context, settings: dict, config: RoundConfig) -> Message:
    """This user's contribution to the DP item-item release: its normalised co-occurrence (norm <=
    cooccurrence.SENSITIVITY), accounted in the ledger as one Gaussian step before it leaves, plus
    its share of the noise. A device whose budget is spent contributes weight 0 and its noise."""
    files = _files(context, settings)
    n_items = load_catalog(files.catalog).n_items
    p = config.privacy
    multiplier = max(p.record_noise, p.user_noise)   # the one in force; the policy checked its floor
    policy = DevicePolicy.of(context.node_config, settings)
    unnoised = multiplier == 0 and policy.unit != "none"
    if p.mode == "none" or p.noise_shares < 1 or not 0 <= multiplier < np.inf or unnoised:
        # Without noise shares nobody adds noise, and the sum of a few devices would show their items.
        return secure.refuse_round(msg, context, f"an item-item release needs a DP mode, noise shares >= 1 and a "
                                                 f"finite noise multiplier (got mode {p.mode!r}, {p.noise_shares} "
                                                 f"shares, multiplier {multiplier!r})")
    ledger = PrivacyLedger(files.ledger)   # its presence: privacy_problem
    event = (multiplier, 1.0, 1)

    def contribute() -> tuple[Weights, TrainMetrics]:
        try:   # spent before anything derived from the log leaves
            ledger.spend(event, min(p.budget, policy.budget), p.delta, p.accountant)
        except PrivacyBudgetExceeded as refusal:
            log.warning("node %d sits the release out: %s", context.node_id, refusal)
            return {"pairs": np.zeros(cooccurrence.pair_count(n_items))}, TrainMetrics(0.0, privacy_refused=True)
        return {"pairs": cooccurrence.user_contribution(files.user_log().train, n_items)}, TrainMetrics(1.0)

    std = multiplier * cooccurrence.unit_sensitivity(p.mode, p.record_window) / np.sqrt(p.noise_shares)
    return secure.handle_masked(msg, context, contribute, config, noise_std=std)
