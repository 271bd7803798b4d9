"""Secure sums of item co-occurrence: the DP item-item model's release, and (without DP) the exact
counts the fused item model is built from (`sum_item_counts`).

The DP item-item model's federated release (shared/privacy/cooccurrence.py): one secure sum over
every node of each user's normalised item co-occurrence, each client adding its share of the
Gaussian noise, then EASE on the noisy sum. The run's whole privacy cost is this one Gaussian
mechanism per user (user level: it covers each record and interaction too).

What the server sees: masked vectors and the noisy sum, never one user's co-occurrence. The
clients check the request against their own policy, account the release in their ledger before
anything leaves, and refuse to unmask a sum with fewer noise shares than counted on
(client/handlers.py, client/secure.py).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from fedrec.server.federation import FederationConfig, RoundRecord, append_round, nodes_needed, wait_for_nodes
from fedrec.server.secure import SecureRound, SecureTask
from fedrec.shared.privacy.accounting import CLAMP_SIGMAS, clamp_probability, epsilon, noise_for, noise_shares
from fedrec.shared.privacy.cooccurrence import (COUNTS_CLIP, COUNTS_STAGE, DECAY, SENSITIVITY, STAGE,
                                         counts_size, ease_weights, pair_count, popularity, popularity_weight,
                                         ridge_for, symmetric, unit_sensitivity)
from fedrec.shared.model.fusion import BLEND_STAGE, Blend, blends, choose_from_statistics, statistics_clip, statistics_size
from fedrec.shared.protocol import PrivacyRound, RoundConfig, pack_blend_request, pack_round_config, to_record

log = logging.getLogger("fedrec.server")


UNITS = {"user": "adding or removing one user's whole log (which also bounds one interaction added, removed "
                 "or changed)",
         "record": "one record of up to {window} interactions added or removed (and so each interaction in it)",
         "both": "one user's whole log, and one record of up to {window} interactions (the noise meets the larger "
                 "sensitivity)"}
RELEASE_ACCOUNTANT = "prv"
MAX_PAIRS = 5_000_000   # about 3,160 items: 20 MB a device, and the server holds every masked vector


class ReleaseFailed(RuntimeError):
    """The release's secure sum aborted: there is no model."""


def release_item_item(grid: Grid, cfg: FederationConfig, n_items: int, out: Path, *, progress=None) -> dict:
    """Run the release; returns {"item_item": weights, "decay", "popularity", "popularity_weight",
    "history", "privacy", "test": None}.
    Writes rounds.jsonl (one record). Raises ReleaseFailed when the sum aborts."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rounds.jsonl").write_text("")
    _check_pairs(n_items, "the item-item release", "; use --private-model encoder")
    wait_for_nodes(grid, nodes_needed(cfg), cfg.wait_for_nodes_s)
    nodes = sorted(grid.get_node_ids())
    p = cfg.privacy
    # One Gaussian release: the PRV accountant is exact to its error bound here (0.1%), where RDP's
    # conversion overstates epsilon (it would ask 6% more noise at epsilon 8).
    accountant = RELEASE_ACCOUNTANT
    multiplier = 0.0 if math.isinf(p.target_epsilon) else noise_for(p.target_epsilon, p.delta, 1.0, 1, accountant)
    m = noise_shares(len(nodes), len(nodes), False, cfg.secure.dropout)
    sensitivity = unit_sensitivity(p.mode, p.record_window)
    share_std = multiplier * sensitivity / math.sqrt(m)
    request = PrivacyRound(mode=p.mode, budget=p.target_epsilon, delta=p.delta, accountant=accountant,
                           record_noise=multiplier if p.record else 0.0, record_clip=p.record_clip,
                           record_window=p.record_window, user_noise=multiplier if p.user else 0.0, noise_shares=m)
    config = pack_round_config(RoundConfig(1, cfg.seed, cfg.local, cfg.model, request, stage=STAGE))
    task = SecureTask(ArrayRecord(), config, "uniform", 1.0, clip=SENSITIVITY + CLAMP_SIGMAS * share_std,
                      min_contributions=m, size=pair_count(n_items), noised=multiplier > 0)
    log.info("item-item release: %d nodes, noise multiplier %.3g, %d noise shares, %d pairs", len(nodes),
             multiplier, m, pair_count(n_items))
    outcome, record = _one_secure_sum(grid, cfg, 1, nodes, task, out, progress, "the item-item release")
    history = [record]
    counts = symmetric(outcome.result.total, n_items)
    weights = ease_weights(counts, ridge_for(multiplier * sensitivity))
    spent = 0.0 if multiplier == 0 else epsilon([(multiplier, 1.0, 1)], p.delta, accountant)
    clamp = clamp_probability(pair_count(n_items), 1) if multiplier else 0.0
    privacy = {
        "mode": p.mode, "model": "item-item", "accountant": f"{accountant} (one Gaussian release)",
        "delta": p.delta + clamp,
        "clamp_probability": clamp, "noise": "distributed", "noise_shares": m, "noise_multiplier": multiplier,
        "clip": SENSITIVITY, "sensitivity": sensitivity, "unit": UNITS[p.mode].format(window=p.record_window),
        "epsilon": spent,
        "against": "the aggregation server, as long as secure aggregation holds and the sum has >= noise_shares "
                   "clients' noise; and anyone who sees the released model",
        "contributions": outcome.result.count,
        "refused": int(round(outcome.result.count - outcome.result.weight))}   # weight 0: budget spent
    return {"item_item": weights.astype(np.float32), "decay": DECAY,
            "popularity": popularity(counts).astype(np.float32),
            "popularity_weight": popularity_weight(multiplier * sensitivity),
            "history": history, "privacy": privacy, "test": None,
            "stopped": {"round": 1, "why": "the private item-item model is one release round"}}


def sum_item_counts(grid: Grid, cfg: FederationConfig, n_items: int, round_id: int, out: Path, *,
                    progress=None, secure: SecureRound | None = None) -> tuple[np.ndarray, dict]:
    """One secure sum over every node of its exact item and item-pair counts (no noise: only for
    runs without DP); returns the decoded sum (whole counts; `cooccurrence_from_counts` makes it the
    (n_items + 1)^2 co-occurrence matrix) and the round's record (also appended to rounds.jsonl). The
    item models blended with the encoder are built from it. `secure`: the training rounds' SecureRound,
    whose registered nodes are not asked again (else every node registers afresh). Raises ReleaseFailed when the sum aborts or the catalog has too many pairs."""
    _check_pairs(n_items, "the co-occurrence sum")
    nodes = sorted(grid.get_node_ids())
    floor = cfg.fusion.min_devices
    if len(nodes) < floor:
        raise ReleaseFailed(f"{len(nodes)} devices, fewer than the co-occurrence sum's floor of {floor} "
                            "(--counts-min-devices): a sum over few devices would show their items")
    config = pack_round_config(RoundConfig(round_id, cfg.seed, cfg.local, cfg.model, PrivacyRound(),
                                           stage=COUNTS_STAGE))
    # Whole counts, summed as they are (no rounding) on a 16-bit ring while fewer than 32,768 devices
    # add up (SecAggParams.exact): half the bytes of the 32-bit ring (docs/results.md "Session 17").
    task = SecureTask(ArrayRecord(), config, "uniform", 1.0, clip=COUNTS_CLIP, min_contributions=floor,
                      size=counts_size(n_items), exact=True)
    log.info("item co-occurrence sum: %d nodes, %d coordinates", len(nodes), counts_size(n_items))
    outcome, record = _one_secure_sum(grid, cfg, round_id, nodes, task, out, progress, "the co-occurrence sum", secure)
    return np.rint(outcome.result.total), record


def choose_blend(grid: Grid, cfg: FederationConfig, counts: np.ndarray, weights: dict, round_id: int, out: Path, *,
                 progress=None, secure: SecureRound | None = None) -> tuple[Blend, dict]:
    """The blend of the encoder and the item models (shared/model/fusion.py) that the blend rule
    picks (`choose_from_statistics`) from one secure sum over `blend-devices` sampled devices of
    each one's NDCG@10 under every candidate and their products (the server learns only the sum). `counts`: the summed co-occurrence counts as decoded;
    `weights`: the encoder before its refit rounds (it has not trained on validation items). Returns
    (the blend, what the summary says about it). Raises ReleaseFailed when the sum aborts."""
    fusion = cfg.fusion
    nodes = sorted(grid.get_node_ids())
    k = min(len(nodes), fusion.blend_devices)
    if k < fusion.min_devices:
        raise ReleaseFailed(f"{k} devices for the blend round, fewer than its floor of {fusion.min_devices} "
                            "(--counts-min-devices; --blend-devices asks for more)")
    # By index: node ids are 64-bit, which numpy would turn into floats.
    sampled = sorted(nodes[i] for i in np.random.default_rng([cfg.seed, round_id]).choice(len(nodes), k, replace=False))
    candidates = blends(fusion.kinds)
    config = pack_round_config(RoundConfig(round_id, cfg.seed, cfg.local, cfg.model, PrivacyRound(), stage=BLEND_STAGE))
    task = SecureTask(to_record(weights), config, "uniform", 1.0, clip=statistics_clip(len(candidates)),
                      min_contributions=fusion.min_devices, size=statistics_size(len(candidates)),
                      extra=pack_blend_request(counts, fusion.kinds, fusion.wire_settings()))
    log.info("blend round: %d devices, %d candidates", k, len(candidates))
    outcome, record = _one_secure_sum(grid, cfg, round_id, sampled, task, out, progress, "the blend round", secure)
    chosen, report = choose_from_statistics(candidates, outcome.result.total, outcome.result.weight)
    return chosen, {**report, "seconds": record["seconds"], "bytes_down_per_client": record["bytes_down"],
                    "chosen_on": "validation items of the devices asked: the encoder after the last round before the "
                                 "refit rounds, the item models (fixed settings) from the summed counts less each "
                                 "device's own validation item (other devices' stay in); not the centralized job's "
                                 "choice (tuned settings, the best epoch, every user)",
                    "server_learns": "each candidate's validation NDCG@10 and each pair's product, summed over the "
                                     "devices asked"}


def _check_pairs(n_items: int, what: str, hint: str = "") -> None:
    """ReleaseFailed for a catalog whose item pairs are too many to send densely from every device."""
    if pair_count(n_items) > MAX_PAIRS:
        raise ReleaseFailed(f"a catalog of {n_items:,} items has {pair_count(n_items):,} item pairs, more than the "
                            f"{MAX_PAIRS:,} {what} sends densely from every device "
                            f"({4 * pair_count(n_items) / 1e6:.0f} MB each){hint}")


def _one_secure_sum(grid: Grid, cfg: FederationConfig, round_id: int, nodes: list[int], task: SecureTask, out: Path,
                    progress, what: str, secure: SecureRound | None = None):
    """Run one secure round as `task` says (with `secure`'s registered nodes, or a new SecureRound),
    record it in rounds.jsonl; ReleaseFailed if it aborts."""
    started = time.perf_counter()
    Path(out).mkdir(parents=True, exist_ok=True)
    if secure is None:
        secure = SecureRound(cfg.secure, cfg.timeout_s, cfg.fail_on_client_error)
    outcome = secure.run(grid, round_id, nodes, task)
    record = RoundRecord(
        round_id, outcome.sampled, outcome.result.count if outcome.result else 0, outcome.reasons,
        int(outcome.bytes_down / max(outcome.sampled, 1)), outcome.bytes_up / max(outcome.sampled, 1),
        time.perf_counter() - started, None, float("nan"), metrics={"secagg": outcome.params},
        phase_seconds=outcome.phases, trained=outcome.result is not None)
    append_round(Path(out) / "rounds.jsonl", asdict(record))
    if progress is not None:
        progress(record)
    if outcome.result is None:
        raise ReleaseFailed(f"{what}'s secure sum aborted: " + "; ".join(outcome.reasons[:3]))
    return outcome, asdict(record)
