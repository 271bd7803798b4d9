"""The federation's round loop on Flower's Grid (Message API), with checkpoints and resume.

A round: sample clients -> send them the global weights -> receive deltas -> drop bad replies
with a logged reason -> average -> server optimizer step -> checkpoint. Every `eval_every`
rounds a sample of clients evaluates the global model on their validation item; at the end
every client evaluates it on its test item. The server sees deltas and metric values, never a
history, a held-out item or any per-user state (see docs/federated.md).

The loop is ours rather than `Strategy.start` because `start` cannot resume: we keep Flower's
Strategy interface (configure/aggregate) and add the checkpoint between rounds.
"""
from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from client.local import LocalConfig
from server.aggregation import ServerConfig, ServerOptimizer, check_update, dp_mean, mean_delta
from server.checkpoint import load_checkpoint, save_checkpoint
from server.secure import SecureConfig, secure_round
from shared.privacy import PrivacyConfig, resolve, user_epsilon
from shared.secagg import clip_l2
from shared.wire import flatten, from_record, layout_of, to_record, unflatten

log = logging.getLogger("fedrec.server")


class ClientFailure(RuntimeError):
    """A ClientApp raised: a bug on our side, so the run stops with the client's message."""


@dataclass
class FederationConfig:
    rounds: int = 100
    clients_per_round: int = 100
    local: LocalConfig = field(default_factory=LocalConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    model: dict = field(default_factory=dict)   # dim, layers, heads, max_len, dropout, id_buckets
    seed: int = 0
    refit_fraction: float = 0.0  # in the last fraction of rounds clients also train on their
                                 # validation item (as the centralized refit does); never test
    eval_every: int = 0          # federated validation every this many rounds (0: never)
    eval_clients: int = 100      # clients asked per federated validation
    final_test: bool = True      # every client evaluates the final model on its test item
    fail_on_client_error: bool = True
    timeout_s: float = 600.0     # per round, for replies
    secure: SecureConfig = field(default_factory=SecureConfig)  # secure aggregation (server/secure.py)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)  # differential privacy (shared/privacy.py)

    def to_dict(self) -> dict:
        return asdict(self)


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


def record_bytes(content: RecordDict) -> int:
    """Payload size of a message's records (arrays, metrics, config), as Flower counts them."""
    return int(sum(record.count_bytes() for record in content.values()))


class FedRecStrategy(Strategy):
    """Flower Strategy over our plain aggregation functions."""

    def __init__(self, cfg: FederationConfig, optimizer: ServerOptimizer):
        self.cfg = cfg
        self.optimizer = optimizer
        self.expected = layout_of(optimizer.weights())
        self.last_round: RoundRecord | None = None
        self.privacy = cfg.privacy          # with noise multipliers once `resolve_privacy` ran
        self.clients = 0                    # nodes in the federation, known at the first round
        # DP noise and the user-level client sample come from the OS, not the run seed: whoever
        # knows the seed could otherwise subtract the noise or know who took part.
        self.private_rng = np.random.default_rng(secrets.randbits(128))
        # Secure aggregation: node -> its registered identity public key (server/secure.py).
        self.secagg_identities: dict[int, bytes] = {}

    def resolve_privacy(self, grid: Grid) -> None:
        self.clients = len(list(grid.get_node_ids()))
        self.privacy = resolve(self.cfg.privacy, rounds=self.cfg.rounds, clients_per_round=self.cfg.clients_per_round,
                               clients=self.clients, local_epochs=self.cfg.local.local_epochs,
                               dropout=self.cfg.secure.dropout)
        if self.privacy.mode != "none":
            log.info("privacy: %s", json.dumps(self.privacy.to_dict()))

    def privacy_config(self) -> dict:
        p = self.privacy
        if p.mode == "none":
            return {"privacy-mode": "none"}
        return {"privacy-mode": p.mode, "privacy-budget": p.target_epsilon, "privacy-delta": p.delta,
                "privacy-accountant": p.accountant, "record-noise": p.record_noise,
                "record-clip": p.record_clip, "record-window": p.record_window,
                "user-noise": p.user_noise, "noise-shares": p.noise_shares}

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

    def round_config(self, server_round: int, extra: dict) -> ConfigRecord:
        local = self.cfg.local
        refit = server_round > self.cfg.rounds - round(self.cfg.refit_fraction * self.cfg.rounds)
        return ConfigRecord({"server-round": server_round, "seed": self.cfg.seed,
                             "local-epochs": local.local_epochs, "local-lr": local.lr,
                             "local-optimizer": local.optimizer, "update-clip": local.clip,
                             "train-on": "test" if refit else local.train_on,
                             **self.cfg.model, **self.privacy_config(), **extra})

    def sample(self, grid: Grid, server_round: int, k: int, salt: int) -> list[int]:
        nodes = sorted(grid.get_node_ids())
        if salt == 0 and self.privacy.user:
            # Poisson sampling, as the user-level accountant assumes: each node independently.
            keep = self.private_rng.random(len(nodes)) < self.privacy.user_sample_rate
            return [n for n, kept in zip(nodes, keep) if kept]
        rng = np.random.default_rng([self.cfg.seed, server_round, salt])
        # Indices, not the ids themselves: node ids are unsigned 64-bit and numpy would wrap them.
        return [nodes[i] for i in rng.choice(len(nodes), size=min(k, len(nodes)), replace=False)]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        record = RecordDict({"arrays": arrays, "config": self.round_config(server_round, {})})
        return [Message(content=record, message_type=MessageType.TRAIN, dst_node_id=n)
                for n in self.sample(grid, server_round, self.cfg.clients_per_round, 0)]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        deltas, counts, losses, seconds, up, rejected, epsilons = [], [], [], [], [], [], []
        refused = 0
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                reason = f"node {node}: client error: {reply.error.reason}"
                if self.cfg.fail_on_client_error:
                    raise ClientFailure(reason)
                rejected.append(reason)
                continue
            delta, metrics, reason = _unpack_train_reply(reply.content, self.expected)
            if reason is None and metrics.get("privacy-refused"):
                refused += 1
                reason = "privacy budget spent: the client refused to train"
            if reason is None:
                reason = check_update(delta, metrics["num-examples"], self.expected, self.cfg.server)
            if reason is not None:
                log.warning("round %d: rejected reply from node %d: %s", server_round, node, reason)
                rejected.append(f"node {node}: {reason}")
                continue
            deltas.append(delta)
            counts.append(metrics["num-examples"])
            losses.append(metrics.get("train-loss", float("nan")))
            seconds.append(metrics.get("train-seconds", float("nan")))
            up.append(record_bytes(reply.content))
            if "record-epsilon" in metrics:
                epsilons.append(metrics["record-epsilon"])
        if deltas and self.privacy.user:
            # The server holds each update here, so it enforces the clip itself.
            total = sum(clip_l2(flatten(d).astype(np.float64), self.cfg.local.clip) for d in deltas)
            self.optimizer.step(unflatten(self.average(total, float(len(deltas))), self.expected))
        elif deltas:
            self.optimizer.step(mean_delta(deltas, counts, self.cfg.server.weighting, self.cfg.server.weight_cap))
        self.last_round = RoundRecord(
            server_round, 0, len(deltas), rejected, 0, float(np.mean(up)) if up else 0.0, 0.0,
            float(np.nanmean(seconds)) if seconds else 0.0,
            float(np.average(losses, weights=counts)) if deltas else float("nan"))
        if self.privacy.mode != "none":
            self.last_round.metrics["privacy"] = {"refused": refused, "record_epsilon_max":
                                                  max(epsilons) if epsilons else None}
        arrays = to_record(self.optimizer.weights()) if deltas else None
        return arrays, MetricRecord({"accepted": len(deltas), "rejected": len(rejected)})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        stage = str(config["stage"])
        k = len(list(grid.get_node_ids())) if stage == "test" else self.cfg.eval_clients
        record = RecordDict({"arrays": arrays, "config": self.round_config(server_round, {"stage": stage})})
        return [Message(content=record, message_type=MessageType.EVALUATE, dst_node_id=n)
                for n in self.sample(grid, server_round, k, 1)]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Mean over the users who answered of each metric (each reply is one user's values)."""
        sums: dict[str, float] = {}
        for reply in replies:
            if reply.has_error():
                if self.cfg.fail_on_client_error:
                    raise ClientFailure(f"node {reply.metadata.src_node_id}: client error: {reply.error.reason}")
                continue
            metrics = reply.content.get("metrics")
            if not isinstance(metrics, MetricRecord) or "users" not in metrics:
                log.warning("evaluation reply from node %d rejected: no metrics", reply.metadata.src_node_id)
                continue
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and np.isfinite(value):
                    sums[key] = sums.get(key, 0.0) + float(value)
        users = sums.pop("users", 0.0)
        if not users:
            return None
        return MetricRecord({**{k: v / users for k, v in sums.items()}, "users": users})


def _unpack_train_reply(content: RecordDict, layout: dict):
    """(delta, metrics, reason): reason is None when the reply has the expected records."""
    delta_record, metrics = content.get("delta"), content.get("metrics")
    if not isinstance(delta_record, ArrayRecord):
        return None, None, "no 'delta' ArrayRecord"
    if not isinstance(metrics, MetricRecord) or "num-examples" not in metrics:
        return None, None, "no 'metrics' with num-examples"
    try:
        delta = from_record(delta_record, layout)
    except Exception as err:  # a malformed array from a client must not stop the round
        return None, None, f"unreadable delta: {err}"
    return delta, dict(metrics), None


RoundHook = Callable[[int, dict[str, np.ndarray]], dict]


def run_federation(grid: Grid, cfg: FederationConfig, initial_weights: dict[str, np.ndarray],
                   out: Path, *, on_round: RoundHook | None = None,
                   progress: Callable[[RoundRecord], None] | None = None) -> dict:
    """Run (or resume) the federation; returns the final state. Writes to `out`:
    checkpoint.pt after every round, rounds.jsonl (one line per finished round)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    optimizer = ServerOptimizer(initial_weights, cfg.server)
    strategy = FedRecStrategy(cfg, optimizer)
    history: list[dict] = []
    start_round = 1
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    if checkpoint is not None:
        if checkpoint["config"] != cfg.to_dict():
            raise ValueError(f"{out / 'checkpoint.pt'} was written by a run with another "
                             "configuration; use a new output folder or the same flags")
        optimizer.load_state_dict(checkpoint["optimizer"])
        history, start_round = checkpoint["history"], checkpoint["round"] + 1
        log.info("resuming from round %d", checkpoint["round"])
    _write_rounds(out / "rounds.jsonl", history)
    strategy.resolve_privacy(grid)
    for server_round in range(start_round, cfg.rounds + 1):
        record = (_secure_round(grid, strategy, server_round) if cfg.secure.enabled
                  else _plain_round(grid, strategy, server_round))
        if cfg.eval_every and server_round % cfg.eval_every == 0:
            metrics = federated_evaluate(grid, strategy, server_round, "valid")
            record.metrics.update({f"federated_valid_{k}": v for k, v in (metrics or {}).items()})
        if on_round is not None:
            record.metrics.update(on_round(server_round, optimizer.model_weights()))
        saving = time.perf_counter()
        record.phase_seconds["checkpoint"] = 0.0
        history.append(asdict(record))
        save_checkpoint(out / "checkpoint.pt", {"round": server_round, "config": cfg.to_dict(),
                                                "optimizer": optimizer.state_dict(), "history": history})
        history[-1]["phase_seconds"]["checkpoint"] = time.perf_counter() - saving
        _append_round(out / "rounds.jsonl", history[-1])
        if progress is not None:
            progress(record)
    final = {"weights": optimizer.model_weights(), "history": history, "test": None,
             "privacy": privacy_summary(strategy, history)}
    if cfg.final_test:
        final["test"] = federated_evaluate(grid, strategy, cfg.rounds, "test")
    return final


def _plain_round(grid: Grid, strategy: FedRecStrategy, server_round: int) -> RoundRecord:
    started = time.perf_counter()
    arrays = to_record(strategy.optimizer.weights())
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
    down = record_bytes(messages[0].content) if messages else 0
    sent = time.perf_counter()
    replies = list(grid.send_and_receive(messages, timeout=strategy.cfg.timeout_s))
    received = time.perf_counter()
    strategy.aggregate_train(server_round, replies)
    record = strategy.last_round
    record.phase_seconds = {"configure": sent - started, "send_and_receive": received - sent,
                            "aggregate": time.perf_counter() - received}
    record.sampled, record.bytes_down = len(messages), down
    record.seconds = time.perf_counter() - started
    if len(replies) < len(messages):
        record.rejected.append(f"{len(messages) - len(replies)} client(s) did not answer in time")
    return record


def _secure_round(grid: Grid, strategy: FedRecStrategy, server_round: int) -> RoundRecord:
    """Bytes here are per sampled client over all its steps; clients report no timing."""
    o = secure_round(grid, strategy, server_round)
    sampled = max(o["sampled"], 1)
    return RoundRecord(server_round, o["sampled"], o["accepted"], o["rejected"],
                       bytes_down=int(o["bytes_down"] / sampled), bytes_up_mean=o["bytes_up"] / sampled,
                       seconds=o["seconds"], client_seconds_mean=None, train_loss=o["train_loss"],
                       metrics={"secagg": o["params"]}, phase_seconds=o["phases"])


def privacy_summary(strategy: FedRecStrategy, history: list[dict]) -> dict:
    """What the run's differential privacy guarantees, per unit (docs/privacy.md)."""
    p = strategy.privacy
    if p.mode == "none":
        return {"mode": "none"}
    out = {"mode": p.mode, "delta": p.delta, "accountant": p.accountant,
           "noise": "distributed" if p.distributed_noise else "record: on each client; user: on the server"}
    if p.distributed_noise:
        out["noise_shares"] = p.noise_shares
    if p.record:
        reported = [h["metrics"]["privacy"]["record_epsilon_max"] for h in history
                    if (h["metrics"].get("privacy") or {}).get("record_epsilon_max") is not None]
        out["record"] = {
            "unit": f"one record: a chunk of up to {p.record_window} consecutive interactions of one user",
            "epsilon": p.target_epsilon, "epsilon_max_reported": max(reported) if reported else None,
            "noise_multiplier": p.record_noise, "clip": p.record_clip,
            "planned_participations": p.planned_participations,
            "refusals": sum((h["metrics"].get("privacy") or {}).get("refused", 0) for h in history),
            "note": "each client's ledger stops it at epsilon; sampling by the server is not counted"
                    + ("; conditional on secure aggregation and >= noise_shares clients' noise in every sum"
                       if p.distributed_noise else "")}
    if p.user:
        out["user"] = {"unit": "one user's whole contribution", "epsilon": user_epsilon(p, len(history)),
                       "noise_multiplier": p.user_noise, "clip": strategy.cfg.local.clip,
                       "sample_rate": p.user_sample_rate, "rounds": len(history)}
    unit = out.get("user") if p.mode == "user" else out.get("record")
    if p.mode == "both":
        unit = {k: {"record": out["record"][k], "user": out["user"][k]} for k in ("epsilon", "noise_multiplier", "clip")}
    out.update({k: unit[k] if unit else None for k in ("epsilon", "noise_multiplier", "clip")})
    return out


def federated_evaluate(grid: Grid, strategy: FedRecStrategy, server_round: int, stage: str) -> dict | None:
    arrays = to_record(strategy.optimizer.model_weights())
    messages = list(strategy.configure_evaluate(server_round, arrays, ConfigRecord({"stage": stage}), grid))
    replies = grid.send_and_receive(messages, timeout=strategy.cfg.timeout_s)
    metrics = strategy.aggregate_evaluate(server_round, replies)
    return dict(metrics) if metrics is not None else None


def _write_rounds(path: Path, history: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(h) + "\n" for h in history))
    tmp.replace(path)


def _append_round(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
