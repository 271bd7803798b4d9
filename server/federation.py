"""The federation's round loop on Flower's Grid (Message API), with checkpoints and resume.

A round: sample clients -> send them the global weights -> receive deltas -> drop bad replies
with a logged reason -> average -> server optimizer step -> checkpoint. Every `federated_eval_every`
rounds a sample of clients evaluates the global model on their validation item; at the end
every client evaluates it on its test item. The server sees deltas and metric values, never a
history, a held-out item or any per-user state (see docs/federated.md).

The loop is ours rather than `Strategy.start` because `start` cannot resume: we keep Flower's
Strategy interface (configure/aggregate) and add the checkpoint between rounds.
"""
from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedrec.server.aggregation import ServerConfig, ServerOptimizer, check_update, dp_mean, mean_delta
from fedrec.server.checkpoint import load_checkpoint, save_checkpoint
from fedrec.server.exchange import ClientFailure, exchange, record_bytes
from fedrec.server.schedule import MIN_COHORT, Schedule, plan
from fedrec.server.secure import SecureConfig, SecureRound, SecureTask
from fedrec.shared.errors import RunMismatch
from fedrec.shared.model.config import ModelHyper
from fedrec.shared.model.fusion import FusionConfig
from fedrec.shared.privacy.accounting import (CLAMP_SIGMAS, PrivacyConfig, clamp_probability, noise_share_std, resolve, user_epsilon,
                                      user_epsilon_against_server)
from fedrec.shared.protocol import (LocalConfig, MalformedRecord, PrivacyRound, RoundConfig, Weights, clip_l2, flatten,
                             layout_of, pack_round_config, to_record, unflatten, unpack_eval_reply,
                             unpack_train_reply)
from fedrec.shared.settings import SettingsError, default

log = logging.getLogger("fedrec.server")


@dataclass
class FederationConfig:
    rounds: int = default("rounds")                        # 0: from the population (server/schedule.py)
    clients_per_round: int = default("clients-per-round")  # 0: from the population
    participations: float = default("participations")      # turns per device the schedule aims at
    local: LocalConfig = field(default_factory=LocalConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    model: ModelHyper = field(default_factory=ModelHyper)
    seed: int = default("seed")
    refit_fraction: float = default("refit-fraction")  # in the last fraction of rounds clients also
                                 # train on their validation item (as the centralized refit does); never test
    federated_eval_every: int = default("federated-eval-every")  # federated validation every this many
                                 # rounds (0: never)
    eval_clients: int = default("eval-clients")   # clients asked per federated validation (the same ones each time)
    patience: int = default("federated-patience")  # validations without a better one before the refit (0: never)
    time_budget_s: float = default("federated-time-budget")  # seconds for the rounds before the refit (0: none)
    final_test: bool = default("final-test")     # every client evaluates the final model on its test item
    fail_on_client_error: bool = True
    timeout_s: float = 600.0     # per exchange (one step of a round), for all its replies
    min_nodes: int = default("min-nodes")  # wait for this many connected nodes before round 1
                                           # (0: clients_per_round)
    wait_for_nodes_s: float = default("wait-for-nodes")
    secure: SecureConfig = field(default_factory=SecureConfig)  # secure aggregation (server/secure.py)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)  # differential privacy
    fusion: FusionConfig = field(default_factory=FusionConfig)     # the item model fused with the encoder

    def to_dict(self) -> dict:
        return asdict(self)

    def identity(self) -> dict:
        """What a checkpoint must agree with to be resumed: everything that shapes the result
        (how long to wait for nodes does not)."""
        return {k: v for k, v in self.to_dict().items() if k not in ("min_nodes", "wait_for_nodes_s")}


@dataclass
class RoundRecord:
    round: int
    sampled: int
    accepted: int
    rejected: list[str]
    bytes_down: int              # per client
    bytes_up_mean: float         # per accepted client
    seconds: float               # wall time of the round (send -> aggregate)
    client_seconds_mean: float | None  # local training time reported by clients (None: secure
                                       # rounds, where clients report no timing)
    train_loss: float
    metrics: dict = field(default_factory=dict)
    phase_seconds: dict = field(default_factory=dict)  # where the round's wall time went
    trained: bool = False        # an update was applied (False: aborted, skipped or nobody answered)


@dataclass
class RoundOutcome:
    """What a round (plain or secure) produced: the mean update to apply (None: nothing), and
    its record. `train_round` applies it; nothing else touches the global weights."""
    update: Weights | None
    record: RoundRecord


class FedRecStrategy(Strategy):
    """Flower Strategy over our plain aggregation functions."""

    def __init__(self, cfg: FederationConfig, optimizer: ServerOptimizer):
        self.cfg = cfg
        self.optimizer = optimizer
        self.expected = layout_of(optimizer.weights())
        self.privacy = cfg.privacy          # with noise multipliers once `resolve` ran
        self.clients = 0                    # nodes in the federation, known at the first round
        # DP noise and the user-level client sample come from the OS, not the run seed: whoever
        # knows the seed could otherwise subtract the noise or know who took part.
        self.private_rng = np.random.default_rng(secrets.randbits(128))
        self.secure = SecureRound(cfg.secure, cfg.timeout_s, cfg.fail_on_client_error)
        self.participations: Counter[int] = Counter()   # user-level DP: rounds each node was sampled into

    def count_participations(self, history: list[dict]) -> None:
        """Rebuild the per-node counts from a resumed run's rounds."""
        self.participations = Counter(n for h in history for n in _sampled_nodes(h))

    @property
    def secagg_identities(self) -> dict[int, bytes]:
        return self.secure.identities

    def resolve(self, grid: Grid, schedule: Schedule | None = None) -> Schedule:
        """Against the nodes connected now: the schedule (the rounds and cohort given as 0 derived from
        how many there are, server/schedule.py; or `schedule`, a resumed run's) and then the privacy
        noise, which depends on both."""
        self.clients = len(list(grid.get_node_ids()))
        schedule = schedule or plan(self.clients, self.cfg.rounds, self.cfg.clients_per_round, self.cfg.participations)
        self.cfg = replace(self.cfg, rounds=schedule.rounds, clients_per_round=schedule.clients_per_round)
        self.privacy = resolve(self.cfg.privacy, rounds=self.cfg.rounds, clients_per_round=self.cfg.clients_per_round,
                               clients=self.clients, local_epochs=self.cfg.local.local_epochs,
                               dropout=self.cfg.secure.dropout)
        if self.privacy.mode != "none":
            log.info("privacy: %s", json.dumps(self.privacy.to_dict()))
        return schedule

    def privacy_round(self) -> PrivacyRound:
        p = self.privacy
        if p.mode == "none":
            return PrivacyRound()
        return PrivacyRound(mode=p.mode, budget=p.target_epsilon, delta=p.delta, accountant=p.accountant,
                            record_noise=p.record_noise, record_clip=p.record_clip, record_window=p.record_window,
                            user_noise=p.user_noise, noise_shares=p.noise_shares)

    def expected_clients(self) -> float:
        """The data-independent denominator of a user-level DP round."""
        return self.privacy.user_sample_rate * self.clients

    def average(self, total: np.ndarray, weight: float) -> np.ndarray:
        """The round's mean update from the sum of contributions: DP-FedAvg under user-level
        DP (unit weights, noise, expected count), else the weighted mean. With distributed
        noise the clients' shares are already in the sum: no noise is added here."""
        if self.privacy.user and self.privacy.distributed_noise:
            return (total / self.expected_clients()).astype(np.float32)
        if self.privacy.user:
            return dp_mean(total, self.expected_clients(), self.privacy.user_noise, self.cfg.local.clip,
                           self.private_rng)
        return (total / weight).astype(np.float32)

    def summary(self) -> None:
        log.info("fedrec strategy: %s", json.dumps(self.cfg.to_dict()))

    def round_config(self, server_round: int, stage: str = "") -> ConfigRecord:
        local = self.cfg.local
        if server_round > last_round_before_refit(self.cfg):
            local = LocalConfig(**{**local.to_dict(), "train_on": "test"})
        return pack_round_config(RoundConfig(server_round, self.cfg.seed, local, self.cfg.model,
                                             self.privacy_round(), stage))

    def sample(self, grid: Grid, server_round: int, k: int, salt: int) -> list[int]:
        nodes = sorted(grid.get_node_ids())
        if salt == 0 and self.privacy.user:
            # Poisson sampling, as the user-level accountant assumes: each node independently.
            keep = self.private_rng.random(len(nodes)) < self.privacy.user_sample_rate
            chosen = [n for n, kept in zip(nodes, keep) if kept]
            if self.privacy.distributed_noise:   # accounted per participation: none past the plan
                chosen = [n for n in chosen if self.participations[n] < self.privacy.planned_participations]
            return chosen
        rng = np.random.default_rng([self.cfg.seed, server_round, salt])
        # Indices, not the ids themselves: node ids are unsigned 64-bit and numpy would wrap them.
        return [nodes[i] for i in rng.choice(len(nodes), size=min(k, len(nodes)), replace=False)]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        record = RecordDict({"arrays": arrays, "config": self.round_config(server_round)})
        return [Message(content=record, message_type=MessageType.TRAIN, dst_node_id=n)
                for n in self.sample(grid, server_round, self.cfg.clients_per_round, 0)]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        """Flower's Strategy interface; our loop calls `plain_mean` and `train_round` applies."""
        outcome = self.plain_mean(server_round, {r.metadata.src_node_id: r.content for r in replies
                                                 if not r.has_error()})
        if outcome.update is None:
            return None, MetricRecord({"accepted": 0})
        self.optimizer.step(outcome.update)
        return to_record(self.optimizer.weights()), MetricRecord({"accepted": outcome.record.accepted})

    def plain_mean(self, server_round: int, replies: dict[int, RecordDict]) -> RoundOutcome:
        """The mean update of a plain round's replies (node -> content), bad ones dropped with a reason."""
        accepted: list[tuple] = []
        rejected, refused = [], 0
        for node, content in replies.items():
            try:
                delta, metrics = unpack_train_reply(content, self.expected)
            except MalformedRecord as err:
                reason = str(err)
            else:
                refused += metrics.privacy_refused
                reason = ("privacy budget spent: the client refused to train" if metrics.privacy_refused
                          else check_update(delta, metrics.num_examples, self.expected, self.cfg.server))
            if reason is not None:
                log.warning("round %d: rejected reply from node %d: %s", server_round, node, reason)
                rejected.append(f"node {node}: {reason}")
                continue
            accepted.append((delta, metrics, record_bytes(content)))
        return self._plain_outcome(server_round, accepted, rejected, refused)

    def _plain_outcome(self, server_round: int, accepted: list[tuple], rejected: list[str],
                       refused: int) -> RoundOutcome:
        deltas = [d for d, _, _ in accepted]
        counts = [m.num_examples for _, m, _ in accepted]
        update = None
        if deltas and self.privacy.user:
            # The server holds each update here, so it enforces the clip itself.
            total = sum(clip_l2(flatten(d).astype(np.float64), self.cfg.local.clip) for d in deltas)
            update = unflatten(self.average(total, float(len(deltas))), self.expected)
        elif deltas:
            update = mean_delta(deltas, counts, self.cfg.server.weighting, self.cfg.server.weight_cap)
        seconds = [m.train_seconds for _, m, _ in accepted]
        record = RoundRecord(
            server_round, 0, len(deltas), rejected, 0, float(np.mean([b for *_, b in accepted])) if accepted else 0.0,
            0.0, float(np.nanmean(seconds)) if seconds else 0.0,
            float(np.average([m.train_loss for _, m, _ in accepted], weights=counts)) if deltas else float("nan"))
        if self.privacy.mode != "none":
            epsilons = [m.record_epsilon for _, m, _ in accepted if m.record_epsilon is not None]
            record.metrics["privacy"] = {"refused": refused, "record_epsilon_max": max(epsilons) if epsilons else None}
        return RoundOutcome(update, record)

    def validation_panel(self, grid: Grid) -> list[int]:
        """The devices asked for validation metrics: round 0's draw, the same each time while the
        federation's nodes are."""
        return self.sample(grid, 0, self.cfg.eval_clients, 1)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        stage = str(config["stage"])
        k = len(list(grid.get_node_ids())) if stage == "test" else self.cfg.eval_clients
        record = RecordDict({"arrays": arrays, "config": self.round_config(server_round, stage)})
        # Validation asks the same panel every time (round 0's draw): successive values then differ by
        # the model, not by who was asked, which the stopping rule (--federated-patience) compares.
        return [Message(content=record, message_type=MessageType.EVALUATE, dst_node_id=n)
                for n in (self.sample(grid, server_round, k, 1) if stage == "test" else self.validation_panel(grid))]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Flower's Strategy interface over `evaluation_mean`."""
        replies = list(replies)
        failed = [r for r in replies if r.has_error()]
        if failed and self.cfg.fail_on_client_error:
            raise ClientFailure(f"node {failed[0].metadata.src_node_id}: client error: {failed[0].error.reason}")
        return evaluation_mean({r.metadata.src_node_id: r.content for r in replies if not r.has_error()})


def evaluation_mean(replies: dict[int, RecordDict]) -> MetricRecord | None:
    """Mean over the users who answered of each metric (each reply is one user's values)."""
    sums: dict[str, float] = {}
    for node, content in replies.items():
        try:
            metrics = unpack_eval_reply(content)
        except MalformedRecord as err:
            log.warning("evaluation reply from node %d rejected: %s", node, err)
            continue
        for key, value in metrics.items():
            if np.isfinite(value):
                sums[key] = sums.get(key, 0.0) + value
    users = sums.pop("users", 0.0)
    if not users:
        return None
    return MetricRecord({**{k: v / users for k, v in sums.items()}, "users": users})


RoundHook = Callable[[int, dict[str, np.ndarray]], dict]


def run_federation(grid: Grid, cfg: FederationConfig, initial_weights: dict[str, np.ndarray],
                   out: Path, *, on_round: RoundHook | None = None,
                   progress: Callable[[RoundRecord], None] | None = None) -> dict:
    """Run (or resume) the federation; returns the final state. Writes to `out`:
    checkpoint.pt after every round, rounds.jsonl (one line per finished round)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    strategy = FedRecStrategy(cfg, ServerOptimizer(initial_weights, cfg.server))
    history, start_round, planned_before = _resume(out, cfg, strategy.optimizer)   # the settings as given
    _write_rounds(out / "rounds.jsonl", history)
    problem = schedule_problem(cfg)
    if problem:
        raise SettingsError(problem)
    wait_for_nodes(grid, nodes_needed(cfg), cfg.wait_for_nodes_s)
    schedule = strategy.resolve(grid, planned_before)   # a resumed run keeps its schedule
    log.info("schedule: %s", schedule.why)
    checkpointed, cfg = cfg, strategy.cfg
    strategy.count_participations(history)
    planned, stopped = planned_rounds(cfg, history)
    strategy.cfg = replace(cfg, rounds=planned)   # the refit starts from where the budget ended
    for server_round in range(start_round, planned + 1):
        record = train_round(grid, strategy, server_round)
        if cfg.federated_eval_every and server_round % cfg.federated_eval_every == 0:
            metrics = federated_evaluate(grid, strategy, server_round, "valid")
            record.metrics.update({f"federated_valid_{k}": v for k, v in (metrics or {}).items()})
            record.metrics[PANEL] = panel_digest(strategy.validation_panel(grid))
        if on_round is not None:
            record.metrics.update(on_round(server_round, strategy.optimizer.model_weights()))
        _checkpoint(out, checkpointed, schedule, strategy.optimizer, history, record, server_round)
        if server_round <= last_round_before_refit(strategy.cfg):
            planned, stopped = planned_rounds(cfg, history)
            strategy.cfg = replace(cfg, rounds=planned)
        if server_round == last_round_before_refit(strategy.cfg):   # also where a longer run continues from
            save_checkpoint(out / SELECTED, {"round": server_round, "weights": strategy.optimizer.model_weights(),
                                             "optimizer": strategy.optimizer.state_dict(), "history": list(history),
                                             "schedule": schedule.to_dict()})
        if progress is not None:
            progress(record)
        if server_round >= planned:
            break
    selected = load_checkpoint(out / SELECTED)
    if selected is None and last_round_before_refit(strategy.cfg) == planned:
        selected = {"weights": strategy.optimizer.model_weights()}   # no refit rounds: the final weights
    final = {"weights": strategy.optimizer.model_weights(), "history": history, "test": None,
             # None: lost (a run resumed from before session 10); the final weights have seen validation items
             "selected_weights": selected["weights"] if selected else None,
             "privacy": privacy_summary(strategy, history),
             "stopped": {"round": planned, "why": f"rounds: the {planned} the schedule chose"
                         if not checkpointed.rounds and stopped.startswith("rounds:") else stopped},
             "schedule": schedule.to_dict(),
             "federation": cfg,   # the settings as run: the schedule's rounds and cohort in place of 0
             "resumed": start_round > 1,   # taken up again from a checkpoint (not a new run)
             "secure_round": strategy.secure}   # its registered nodes: the counts and blend rounds reuse them
    if cfg.final_test:
        final["test"] = federated_evaluate(grid, strategy, planned, "test")
    return final


def planned_rounds(cfg: FederationConfig, history: list[dict]) -> tuple[int, str]:
    """The run's last round and why: --rounds, or fewer when the rounds before the refit spent
    --federated-time-budget first, or when --federated-patience federated validations in a row found
    no better NDCG@10 than the best before them (then the refit rounds follow: --refit-fraction of
    the new total). Worked out from the rounds' own records, so a resumed run ends where it would have
    (the validation count starts again when other devices are asked: a simulation's restart gives its
    nodes new ids, so a new panel)."""
    before_refit = last_round_before_refit(cfg)
    spent, best, best_round, since, panel = 0.0, -np.inf, 0, 0, None
    for h in history:
        if h["round"] >= before_refit:
            break
        why = None
        spent += h["seconds"]
        if cfg.time_budget_s and spent >= cfg.time_budget_s:
            why = (f"time budget: the rounds before the refit took {spent:.0f} s of --federated-time-budget "
                   f"{cfg.time_budget_s:g} s by round {h['round']} (of {before_refit} planned)")
        score = h.get("metrics", {}).get(VALIDATION_METRIC) if cfg.federated_eval_every and cfg.patience else None
        if score is not None and np.isfinite(score):
            if h["metrics"].get(PANEL) != panel:   # other devices asked (a restart, nodes gone): compare anew
                best, best_round, since, panel = -np.inf, 0, 0, h["metrics"].get(PANEL)
            best, best_round, since = (score, h["round"], 0) if score > best + 1e-9 else (best, best_round, since + 1)
            if why is None and since >= cfg.patience:
                why = (f"validation: {since} federated validation(s) in a row (--federated-patience) found no "
                       f"NDCG@10 above round {best_round}'s {best:.4f} by round {h['round']} "
                       f"(of {before_refit} planned)")
        if why:
            total = _total_with_refit(cfg, h["round"])
            return total, f"{why}; then {total - h['round']} refit round(s)"
    return cfg.rounds, f"rounds: the {cfg.rounds} of --rounds"


# What the stopping rule watches (run_federation records it); better means by more than the order of
# summing the replies can change (1e-9).
VALIDATION_METRIC = "federated_valid_ndcg@10"
PANEL = "federated_valid_panel"   # which devices gave it (panel_digest)


def panel_digest(nodes: list[int]) -> str:
    return hashlib.sha256(",".join(map(str, sorted(nodes))).encode()).hexdigest()[:16]


def _total_with_refit(cfg: FederationConfig, last_before_refit: int) -> int:
    """The run's length when its refit begins after `last_before_refit`: of the totals that qualify, the
    one whose refit rounds are nearest --refit-fraction of it (rounding makes several qualify: 1, 2 or
    3 for 0.5 at round 1)."""
    ends = [t for t in range(last_before_refit, cfg.rounds + 1)
            if last_round_before_refit(replace(cfg, rounds=t)) == last_before_refit]
    return min(ends, key=lambda t: abs(t * (1 - cfg.refit_fraction) - last_before_refit))


SELECTED = "selected.pt"   # the weights after the last round before the refit rounds


def last_round_before_refit(cfg: FederationConfig) -> int:
    """After this round clients also train on their validation items (the refit): the weights
    then are the ones validation can still judge (the blend round's encoder)."""
    return cfg.rounds - round(cfg.refit_fraction * cfg.rounds)


def check_resumable(out: Path, cfg: FederationConfig) -> dict | None:
    """The checkpoint in `out` to continue from (None: a new run), if `cfg` may continue it;
    RunMismatch naming the settings that differ if not. Only --rounds may grow (`_longer_run`)."""
    checkpoint = load_checkpoint(Path(out) / "checkpoint.pt")
    if checkpoint is None or checkpoint["config"] == cfg.identity():
        return checkpoint
    changed = changed_settings(checkpoint["config"], cfg.identity())
    if not changed:
        return checkpoint
    if changed == ["rounds"]:
        return _longer_run(Path(out), checkpoint, cfg)
    old, new = _settings_of(checkpoint["config"]), _settings_of(cfg.identity())
    shown = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:6]]
    more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
    raise RunMismatch(f"{Path(out) / 'checkpoint.pt'}: written by a run with other settings ({'; '.join(shown)}"
                      f"{more}); use a new --out, or the same settings to resume it")


def _longer_run(out: Path, checkpoint: dict, cfg: FederationConfig) -> dict:
    """A run continued with more rounds. Its refit rounds (trained on validation items too) belong
    at the end, so once they began it continues from the state before them (selected.pt) and
    redoes them; a run with differential privacy cannot grow (its noise spends the budget over
    the rounds it was started with)."""
    before = checkpoint["config"]["rounds"]
    where = out / "checkpoint.pt"
    if not before or not cfg.rounds:
        raise RunMismatch(f"{where}: a run whose rounds the schedule chose (--rounds 0) is neither lengthened nor "
                          "given a schedule afterwards; use a new --out, or the same --rounds to resume it")
    if cfg.rounds < before:
        raise RunMismatch(f"{where}: a run of {before} rounds can be continued with more rounds, not cut to "
                          f"{cfg.rounds}; use a new --out")
    if cfg.privacy.mode != "none":
        raise RunMismatch(f"{where}: its noise was calibrated to spend --target-epsilon {cfg.privacy.target_epsilon} "
                          f"over {before} rounds; more rounds would spend more. Use a new --out")
    if cfg.time_budget_s:
        raise RunMismatch(f"{where}: a run with --federated-time-budget ends where its budget did; more rounds "
                          "would not run. Use a new --out, or a larger budget there")
    if cfg.federated_eval_every and cfg.patience:
        raise RunMismatch(f"{where}: a run with a stopping rule (--federated-eval-every, --federated-patience) ends "
                          "where its validation did; more rounds would not run. Use a new --out")
    if checkpoint["round"] <= last_round_before_refit(replace(cfg, rounds=before)):
        return checkpoint
    selected = load_checkpoint(out / SELECTED)
    if selected is None or "optimizer" not in selected:
        raise RunMismatch(f"{where}: its refit rounds began and the state before them was not kept "
                          "(a run from an older fedrec); use a new --out")
    return {**selected, "config": checkpoint["config"]}


# Where a file is, not what the run does: a moved folder still resumes.
WHERE_NOT_WHAT = ("secure.enrolment_ca",)


def changed_settings(a: dict, b: dict) -> list[str]:
    """The (flattened) settings two configurations differ in; where files are does not count. A
    setting one of them lacks (written before it existed) counts as its default."""
    old, new = _settings_of(a), _settings_of(b)
    return [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k) and k not in WHERE_NOT_WHAT]


def same_run(a: dict, b: dict) -> bool:
    """Two configurations (to_dict) of one run: equal but for its length and how long to wait for nodes."""
    return set(changed_settings(a, b)) <= {"rounds", "min_nodes", "wait_for_nodes_s"}


def _settings_of(config: dict) -> dict:
    """A (to_dict) configuration flattened, with the default of any setting it predates."""
    return {**_flat(FederationConfig().to_dict()), **_flat(config)}


def _flat(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        flat.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return flat


def _resume(out: Path, cfg: FederationConfig, optimizer: ServerOptimizer) -> tuple[list[dict], int, Schedule | None]:
    """(history, first round to run, the schedule it ran with): from the checkpoint in `out`, if there is one."""
    checkpoint = check_resumable(out, cfg)
    if checkpoint is None:
        return [], 1, None
    optimizer.load_state_dict(checkpoint["optimizer"])
    if checkpoint["config"]["rounds"] == cfg.rounds:
        log.info("resuming from round %d", checkpoint["round"])
    else:
        log.info("continuing a run of %d rounds to %d rounds, from round %d (rounds after it are redone)",
                 checkpoint["config"]["rounds"], cfg.rounds, checkpoint["round"])
    kept = checkpoint.get("schedule")   # None: a run from before session 18
    if kept and checkpoint["config"]["rounds"] != cfg.rounds:   # a longer run (both given): its cohort, the new length
        kept = {**kept, "rounds": cfg.rounds, "why": f"--rounds {cfg.rounds}, lengthened, of the run's "
                                                     f"{kept['clients_per_round']} clients"}
    return checkpoint["history"], checkpoint["round"] + 1, Schedule(**kept) if kept else None


def _checkpoint(out: Path, cfg: FederationConfig, schedule: Schedule, optimizer: ServerOptimizer, history: list[dict],
                record: RoundRecord, server_round: int) -> None:
    saving = time.perf_counter()
    record.phase_seconds["checkpoint"] = 0.0
    history.append(asdict(record))
    save_checkpoint(out / "checkpoint.pt", {"round": server_round, "config": cfg.identity(), "schedule": schedule.to_dict(),
                                            "optimizer": optimizer.state_dict(), "history": history})
    history[-1]["phase_seconds"]["checkpoint"] = time.perf_counter() - saving
    append_round(out / "rounds.jsonl", history[-1])


def schedule_problem(cfg: FederationConfig) -> str | None:
    """Why the schedule cannot be derived here (None: it can): it plans from the nodes connected at
    round 1, so a run must say how many to wait for, or the first 25 to connect would set it."""
    if (cfg.rounds and cfg.clients_per_round) or cfg.min_nodes or cfg.privacy.releases_item_item:
        return None
    return ("--rounds 0 and --clients-per-round 0 are derived from the devices connected when round 1 starts: "
            "give min-nodes (the devices to wait for; `fedrec server run --min-nodes N`), or both --rounds and "
            "--clients-per-round")


def nodes_needed(cfg: FederationConfig) -> int:
    """Connected nodes to wait for before round 1: --min-nodes, else a round's cohort (the
    smallest the schedule picks when that is derived)."""
    return cfg.min_nodes or cfg.clients_per_round or MIN_COHORT


class NotEnoughNodes(RuntimeError):
    """Fewer nodes connected than the run needs, after waiting."""


def wait_for_nodes(grid: Grid, needed: int, timeout_s: float, poll_s: float = 0.2) -> int:
    """Block until `needed` nodes are connected (SuperNodes start and register at their own pace,
    in simulation too); returns how many are. Raises NotEnoughNodes after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        connected = len(list(grid.get_node_ids()))
        if connected >= needed:
            return connected
        if time.monotonic() > deadline:
            raise NotEnoughNodes(f"{connected} node(s) connected after {timeout_s:g} s; the run needs {needed} "
                                 "(start more SuperNodes, or lower the run config's min-nodes or clients-per-round)")
        time.sleep(poll_s)


def train_round(grid: Grid, strategy: FedRecStrategy, server_round: int, secure: bool | None = None) -> RoundRecord:
    """One training round, secure or plain (default: as configured); applies its update, if any."""
    secure = strategy.cfg.secure.enabled if secure is None else secure
    started = time.perf_counter()
    outcome = secure_round(grid, strategy, server_round) if secure else plain_round(grid, strategy, server_round)
    if outcome.update is not None:
        strategy.optimizer.step(outcome.update)
        outcome.record.trained = True
    outcome.record.seconds = time.perf_counter() - started
    return outcome.record


def plain_round(grid: Grid, strategy: FedRecStrategy, server_round: int) -> RoundOutcome:
    started = time.perf_counter()
    arrays = to_record(strategy.optimizer.weights())
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
    sent = time.perf_counter()
    result = exchange(grid, MessageType.TRAIN, {m.metadata.dst_node_id: m.content for m in messages},
                      strategy.cfg.timeout_s, strategy.cfg.fail_on_client_error)
    received = time.perf_counter()
    outcome = strategy.plain_mean(server_round, result.replies)
    record = outcome.record
    record.rejected.extend(result.failed)
    record.phase_seconds = {"configure": sent - started, "send_and_receive": received - sent,
                            "aggregate": time.perf_counter() - received}
    record.sampled, record.bytes_down = len(messages), result.bytes_down // max(len(messages), 1)
    _note_sampled(strategy, record, [m.metadata.dst_node_id for m in messages])
    return outcome


def secure_round(grid: Grid, strategy: FedRecStrategy, server_round: int) -> RoundOutcome:
    """Bytes here are per sampled client over all its steps; clients report no timing."""
    p = strategy.privacy
    # Under DP every user counts once (unit weights): a weight from the data (its length) would be
    # released un-noised, and user-level sensitivity and noise shares are per user anyway.
    weighting = "uniform" if p.mode != "none" else strategy.cfg.server.weighting
    task = SecureTask(to_record(strategy.optimizer.weights()), strategy.round_config(server_round), weighting,
                      strategy.cfg.server.weight_cap, secagg_clip(strategy), p.noise_shares if p.distributed_noise else 0,
                      noised=bool(p.distributed_noise and p.noise_shares))
    nodes = strategy.sample(grid, server_round, strategy.cfg.clients_per_round, 0)
    o = strategy.secure.run(grid, server_round, nodes, task)
    update, loss, count = None, float("nan"), 0
    if o.result is not None:
        update = unflatten(strategy.average(o.result.total, o.result.weight), strategy.expected)
        loss, count = (o.result.loss if p.mode == "none" else float("nan")), o.result.count   # DP: no loss sent
    sampled = max(o.sampled, 1)
    record = RoundRecord(server_round, o.sampled, count, o.reasons, bytes_down=int(o.bytes_down / sampled),
                         bytes_up_mean=o.bytes_up / sampled, seconds=0.0, client_seconds_mean=None, train_loss=loss,
                         metrics={"secagg": o.params}, phase_seconds=o.phases)
    _note_sampled(strategy, record, nodes)
    return RoundOutcome(update, record)


def _note_sampled(strategy: FedRecStrategy, record: RoundRecord, nodes: list[int]) -> None:
    """User-level DP: who was sampled (the server's own knowledge), for the per-user accounting
    against the server; kept in the round's record so a resumed run counts them too."""
    if strategy.privacy.user:
        strategy.participations.update(nodes)
        record.metrics.setdefault("privacy", {})["sampled_nodes"] = [int(n) for n in nodes]


def _sampled_nodes(record: dict) -> list[int]:
    return (record.get("metrics", {}).get("privacy") or {}).get("sampled_nodes") or []


def secagg_clip(strategy: FedRecStrategy) -> float:
    """The L2 clip that sizes the fixed-point bound. With distributed DP noise each coordinate
    also carries a noise share: the bound leaves room for 10 of its standard deviations."""
    p, local = strategy.privacy, strategy.cfg.local
    if not p.distributed_noise:
        return local.clip
    std = noise_share_std(record_noise=p.record_noise, record_sensitivity=local.lr * p.record_clip,
                          user_noise=p.user_noise, user_clip=local.clip, shares=p.noise_shares)
    return local.clip + CLAMP_SIGMAS * std


def privacy_summary(strategy: FedRecStrategy, history: list[dict]) -> dict:
    """What the run's differential privacy guarantees, per unit and against whom (docs/privacy.md).
    `epsilon` is always the guarantee against the aggregation server (null: none holds)."""
    p = strategy.privacy
    if p.mode == "none":
        return {"mode": "none"}
    out = {"mode": p.mode, "delta": p.delta, "accountant": p.accountant,
           "noise": "distributed" if p.distributed_noise else "record: on each client; user: on the server"}
    if p.distributed_noise:
        # A coordinate whose noise share passes 10 sigma is clamped (the fixed-point range): that
        # event's probability, over a user's planned participations, is added to delta.
        coordinates = sum(int(np.prod(shape)) for shape in strategy.expected.values())
        out["noise_shares"] = p.noise_shares
        out["clamp_probability"] = clamp_probability(coordinates, p.planned_participations)
        out["delta"] = p.delta + out["clamp_probability"]
    if p.record:
        out["record"] = _record_summary(p, history)
    if p.user:
        out["user"] = _user_summary(p, history, strategy.cfg.local.clip)
    unit = out.get("user") if p.mode == "user" else out.get("record")
    if p.mode == "both":
        unit = {k: {"record": out["record"][k], "user": out["user"][k]} for k in ("epsilon", "noise_multiplier", "clip")}
    out.update({k: unit[k] if unit else None for k in ("epsilon", "noise_multiplier", "clip")})
    return out


def _record_summary(p: PrivacyConfig, history: list[dict]) -> dict:
    reported = [h["metrics"]["privacy"]["record_epsilon_max"] for h in history
                if (h["metrics"].get("privacy") or {}).get("record_epsilon_max") is not None]
    return {
        "unit": f"one record: an aligned chunk of up to {p.record_window} consecutive interactions of one user's "
                "log; changing any one interaction changes one record (adding or deleting one shifts the "
                "later chunks: docs/privacy.md)",
        "epsilon": p.target_epsilon,
        "against": ("the aggregation server, as long as secure aggregation holds and every applied sum has "
                    ">= noise_shares clients' noise" if p.distributed_noise else
                    "the aggregation server and anyone who sees the models: the noise is added on the device"),
        "epsilon_max_reported": max(reported) if reported else None,
        "noise_multiplier": p.record_noise, "clip": p.record_clip,
        "planned_participations": p.planned_participations,
        "refusals": sum((h["metrics"].get("privacy") or {}).get("refused", 0) for h in history),
        "note": "each device's ledger stops it at its epsilon; sampling by the server is not counted"}


def _user_summary(p: PrivacyConfig, history: list[dict], clip: float) -> dict:
    most = max(Counter(n for h in history for n in _sampled_nodes(h)).values(), default=0)
    return {
        "unit": "one user's whole contribution",
        "epsilon": user_epsilon_against_server(p, most),
        "against": ("the aggregation server (no amplification: it draws the sample), as long as secure "
                    "aggregation holds and every applied sum has >= noise_shares clients' noise"
                    if p.distributed_noise else
                    "nobody who runs the server: it sees the sum before it adds the noise (null)"),
        "epsilon_released_model": user_epsilon(p, len(history)),
        "released_model_note": "against whoever sees only the released models, trusting the server's Poisson "
                               "sampling (amplification by sampling)",
        "max_participations": most, "planned_participations": p.planned_participations or None,
        "noise_multiplier": p.user_noise, "clip": clip, "sample_rate": p.user_sample_rate, "rounds": len(history)}


def federated_evaluate(grid: Grid, strategy: FedRecStrategy, server_round: int, stage: str) -> dict | None:
    arrays = to_record(strategy.optimizer.model_weights())
    messages = strategy.configure_evaluate(server_round, arrays, ConfigRecord({"stage": stage}), grid)
    result = exchange(grid, MessageType.EVALUATE, {m.metadata.dst_node_id: m.content for m in messages},
                      strategy.cfg.timeout_s, strategy.cfg.fail_on_client_error)
    metrics = evaluation_mean(result.replies)
    return dict(metrics) if metrics is not None else None


def _write_rounds(path: Path, history: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(h) + "\n" for h in history))
    tmp.replace(path)


def append_round(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
