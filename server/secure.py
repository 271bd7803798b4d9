"""The server's side of secure aggregation: one training round as four Message API
exchanges around `shared.secagg.SecAggServer` (client side: client/secure.py).

  keys    -> each sampled node: its number in the round and the parameters; <- two public keys
  shares  -> its neighbours' public keys;                   <- sealed shares, one per neighbour
  masked  -> global weights, training config, shares sealed for it; <- its masked contribution
  unmask  -> who is alive and who dropped, among its neighbours;    <- the shares asked for

A node that does not answer a step (or answers with an error, when the run tolerates them)
has dropped; the protocol recovers as long as every needed secret keeps `threshold` shares,
and otherwise the round is aborted and the global model left as it was. The server holds
masked vectors and their unmasked sum, never one client's update, count or loss.
"""
from __future__ import annotations

import logging
import secrets
import time
from dataclasses import asdict, dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from shared.secagg import RoundAborted, SecAggParams, SecAggServer, decode_mean, default_params
from shared.wire import to_record, unflatten

log = logging.getLogger("fedrec.server")


@dataclass
class SecureConfig:
    enabled: bool = False
    neighbours: int = 0      # graph degree k; 0: sized from the round (shared.secagg.default_params)
    threshold: int = 0       # shares to rebuild a secret; 0: a strict majority of the k + 1 holders
    dropout: float = 0.1     # the share of a round's clients the automatic sizing must survive

    def to_dict(self) -> dict:
        return asdict(self)

    def params(self, n: int, clip: float) -> SecAggParams:
        auto = default_params(n, clip, dropout=self.dropout)
        k = min(self.neighbours or auto.neighbours, n - 1)
        t = self.threshold or (k + 1) // 2 + 1
        return SecAggParams(k, t, clip, n)


def _exchange(grid: Grid, step: str, contents: dict[int, RecordDict], timeout: float,
              fail_on_error: bool) -> tuple[dict[int, RecordDict], int, int, list[str]]:
    """Send one message per node, collect the replies. Returns (node -> reply content,
    bytes down, bytes up, reasons nodes dropped)."""
    from server.federation import ClientFailure, record_bytes
    messages = [Message(content=c, message_type=f"{MessageType.TRAIN}.secagg_{step}", dst_node_id=node)
                for node, c in contents.items()]
    down = sum(record_bytes(m.content) for m in messages)
    replies, up, dropped = {}, 0, []
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            if fail_on_error:
                raise ClientFailure(f"node {node}: client error in secure step {step!r}: {reply.error.reason}")
            dropped.append(f"node {node}: error in step {step}: {reply.error.reason}")
            continue
        replies[node] = reply.content
        up += record_bytes(reply.content)
    missing = len(contents) - len(replies) - len(dropped)
    if missing:
        dropped.append(f"{missing} node(s) did not answer step {step}")
    return replies, down, up, dropped


def secure_round(grid: Grid, strategy, server_round: int) -> dict:
    """Run one securely aggregated training round and apply it (unless aborted). Returns
    what happened: accepted (clients in the sum), rejected (reasons), bytes, loss, params."""
    cfg = strategy.cfg
    nodes = strategy.sample(grid, server_round, cfg.clients_per_round, 0)
    if len(nodes) < 3:
        # Poisson sampling (user-level DP) can draw almost nobody; masking needs company.
        log.warning("round %d: %d client(s) sampled, too few to aggregate securely; round skipped",
                    server_round, len(nodes))
        return {"sampled": len(nodes), "accepted": 0, "rejected": [f"round skipped: {len(nodes)} sampled"],
                "params": {}, "train_loss": float("nan"), "bytes_down": 0, "bytes_up": 0,
                "seconds": 0.0, "phases": {}}
    index = {node: i + 1 for i, node in enumerate(nodes)}
    node_of = {i: node for node, i in index.items()}
    params = cfg.secure.params(len(nodes), cfg.local.clip)
    round_id = server_round.to_bytes(8, "big") + secrets.token_bytes(16)
    server = SecAggServer(len(nodes), params, round_id)
    base = {"round-id": round_id}
    down = up = 0
    reasons: list[str] = []
    started = time.perf_counter()
    timings = {}

    def step(name, contents):
        nonlocal down, up
        t = time.perf_counter()
        replies, d, u, dropped = _exchange(grid, name, contents, cfg.timeout_s, cfg.fail_on_client_error)
        down, up = down + d, up + u
        reasons.extend(dropped)
        timings[name] = time.perf_counter() - t
        return {index[node]: content for node, content in replies.items()}

    outcome = {"sampled": len(nodes), "accepted": 0, "rejected": reasons, "params": asdict(params),
               "train_loss": float("nan")}
    try:
        keys = step("keys", {node: RecordDict({"secagg": ConfigRecord({
            **base, "index": index[node], "neighbours": params.neighbours, "threshold": params.threshold,
            "clip": params.clip, "max-clients": params.max_clients})}) for node in nodes})
        neighbour_keys = server.receive_keys({u: (bytes(c["secagg"]["c-public"]), bytes(c["secagg"]["s-public"]))
                                              for u, c in keys.items()})
        shares = step("shares", {node_of[u]: RecordDict({
            "secagg": ConfigRecord(base),
            "neighbour-keys": ConfigRecord({str(v): c + s for v, (c, s) in ks.items()})})
            for u, ks in neighbour_keys.items()})
        inbox = server.route_shares({u: {int(v): bytes(box) for v, box in c["shares"].items()}
                                     for u, c in shares.items()})
        arrays = to_record(strategy.optimizer.weights())
        train_config = strategy.round_config(server_round, {})
        # User-level DP counts every user once (unit weights): its sensitivity is per user.
        weighting = "uniform" if strategy.privacy.user else cfg.server.weighting
        secagg_config = ConfigRecord({**base, "weighting": weighting, "weight-cap": cfg.server.weight_cap})
        masked = step("masked", {node_of[u]: RecordDict({
            "arrays": arrays, "config": train_config, "secagg": secagg_config,
            "inbox": ConfigRecord({str(v): box for v, box in boxes.items()})})
            for u, boxes in inbox.items()})
        vectors = {}
        size = sum(a.numpy().size for a in arrays.values()) + 2
        for u, content in masked.items():
            record = content.get("masked")
            vector = record["masked"].numpy() if isinstance(record, ArrayRecord) and "masked" in record else None
            if vector is None or vector.dtype != np.uint32 or vector.shape != (size,):
                reasons.append(f"node {node_of[u]}: masked input malformed; counted as dropped")
                continue
            vectors[u] = vector
        asks = server.receive_masked(vectors)
        # (Flower's ConfigRecord.count_bytes fails on an empty list: leave "dropped" out then.)
        answers = step("unmask", {node_of[u]: RecordDict({"secagg": ConfigRecord({
            **base, "alive": alive, **({"dropped": gone} if gone else {})})})
            for u, (alive, gone) in asks.items()})
        t = time.perf_counter()
        total, count = server.unmask({u: {int(o): bytes(s) for o, s in c["shares"].items()}
                                      for u, c in answers.items()})
        _, weight, loss = decode_mean(total)
        mean = strategy.average(total[:-2], weight)
        timings["unmask-compute"] = time.perf_counter() - t
    except RoundAborted as err:
        log.warning("round %d: secure aggregation aborted, global model unchanged: %s", server_round, err)
        reasons.append(f"round aborted: {err}")
        outcome.update(bytes_down=down, bytes_up=up, seconds=time.perf_counter() - started, phases=timings)
        return outcome
    strategy.optimizer.step(unflatten(mean, strategy.expected))
    outcome.update(accepted=count, train_loss=loss, bytes_down=down, bytes_up=up,
                   seconds=time.perf_counter() - started, phases=timings)
    return outcome
