"""The server's side of secure aggregation: one training round as three Message API
exchanges around `shared.secagg.SecAggServer` (client side: client/secure.py).

  register -> nodes never seen (all of them before the first secure round);
              <- the node's identity public key, kept for the rest of the run
  shares   -> each sampled node: its number in the round, the parameters, its neighbours'
              identity keys; <- its mask public key and sealed shares, one per neighbour
  masked   -> global weights, training config, shares sealed for it and the senders' mask
              keys; <- its masked contribution
  unmask   -> who is alive and who dropped, among its neighbours;    <- the shares asked for

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

from shared.privacy import noise_share_std
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


def secagg_clip(strategy) -> float:
    """The L2 clip that sizes the fixed-point bound. With distributed DP noise each coordinate
    also carries a noise share: the bound leaves room for 10 of its standard deviations."""
    p, local = strategy.privacy, strategy.cfg.local
    if not p.distributed_noise:
        return local.clip
    std = noise_share_std(record_noise=p.record_noise, record_sensitivity=local.lr * p.record_clip,
                          user_noise=p.user_noise, user_clip=local.clip, shares=p.noise_shares)
    return local.clip + 10 * std


def register(grid: Grid, strategy, nodes: list[int], timeout: float) -> tuple[int, int, list[str]]:
    """Learn the identity keys of `nodes` (ones not registered yet). Returns (bytes down, bytes
    up, reasons nodes failed); a node that fails is simply not registered (asked again later)."""
    contents = {node: RecordDict({"secagg": ConfigRecord({"register": True})})
                for node in nodes if node not in strategy.secagg_identities}
    if not contents:
        return 0, 0, []
    replies, down, up, failed = _exchange(grid, "register", contents, timeout, fail_on_error=False)
    for node, content in replies.items():
        key = content["secagg"].get("identity") if "secagg" in content else None
        if isinstance(key, bytes) and len(key) == 32:
            strategy.secagg_identities[node] = key
        else:
            failed.append(f"node {node}: no valid identity key in its registration")
    if failed:
        missing = sum(node not in strategy.secagg_identities for node in contents)
        log.warning("secure aggregation: %d of %d node(s) not registered (asked again when sampled): %s",
                    missing, len(contents), "; ".join(failed[:3]))
    return down, up, failed


def secure_round(grid: Grid, strategy, server_round: int) -> dict:
    """Run one securely aggregated training round and apply it (unless aborted). Returns
    what happened: accepted (clients in the sum), rejected (reasons), bytes, loss, params."""
    cfg = strategy.cfg
    started = time.perf_counter()
    nodes = strategy.sample(grid, server_round, cfg.clients_per_round, 0)
    # Every node the first time (one exchange for the whole run), newcomers afterwards.
    new = list(grid.get_node_ids()) if not strategy.secagg_identities else nodes
    down, up, reasons = register(grid, strategy, new, cfg.timeout_s)
    timings = {"register": time.perf_counter() - started} if down else {}
    sampled = len(nodes)
    nodes = [node for node in nodes if node in strategy.secagg_identities]
    if len(nodes) < 3:
        # Poisson sampling (user-level DP) can draw almost nobody; masking needs company.
        log.warning("round %d: %d client(s) sampled and registered, too few to aggregate securely; "
                    "round skipped", server_round, len(nodes))
        return {"sampled": sampled, "accepted": 0, "rejected": [*reasons, f"round skipped: {len(nodes)} to mask"],
                "params": {}, "train_loss": float("nan"), "bytes_down": down, "bytes_up": up,
                "seconds": time.perf_counter() - started, "phases": timings}
    index = {node: i + 1 for i, node in enumerate(nodes)}
    node_of = {i: node for node, i in index.items()}
    params = cfg.secure.params(len(nodes), secagg_clip(strategy))
    round_id = server_round.to_bytes(8, "big") + secrets.token_bytes(16)
    server = SecAggServer(len(nodes), params, round_id)
    base = {"round-id": round_id}

    def step(name, contents):
        nonlocal down, up
        t = time.perf_counter()
        replies, d, u, dropped = _exchange(grid, name, contents, cfg.timeout_s, cfg.fail_on_client_error)
        down, up = down + d, up + u
        reasons.extend(dropped)
        timings[name] = time.perf_counter() - t
        return {index[node]: content for node, content in replies.items()}

    outcome = {"sampled": sampled, "accepted": 0, "rejected": reasons, "params": asdict(params),
               "train_loss": float("nan")}
    try:
        registered = {u: strategy.secagg_identities[node] for node, u in index.items()}
        identities = server.receive_identities(registered)
        shares = step("shares", {node_of[u]: RecordDict({
            "secagg": ConfigRecord({**base, "index": u, "neighbours": params.neighbours,
                                    "threshold": params.threshold, "clip": params.clip,
                                    "max-clients": params.max_clients, "identity": registered[u]}),
            "neighbour-keys": ConfigRecord({str(v): key for v, key in keys.items()})})
            for u, keys in identities.items()})
        for u in [u for u, c in shares.items() if c["secagg"].get("identity-lost")]:
            # Restarted since it registered: it sits this round out and registers afresh next time.
            reasons.append(f"node {node_of[u]}: holds another identity key than the one registered; "
                           "sits the round out")
            strategy.secagg_identities.pop(node_of[u])
            del shares[u]
        for u in set(identities) - set(shares):
            strategy.secagg_identities.pop(node_of[u], None)  # silent or failed: ask for its key again
        inbox = server.route_shares({u: (bytes(c["secagg"]["s-public"]),
                                         {int(v): bytes(box) for v, box in c["shares"].items()})
                                     for u, c in shares.items()})
        arrays = to_record(strategy.optimizer.weights())
        train_config = strategy.round_config(server_round, {})
        # User-level DP counts every user once (unit weights): its sensitivity is per user.
        # Distributed noise needs them too: every share enters the sum at the same scale.
        weighting = "uniform" if strategy.privacy.user or strategy.privacy.distributed_noise else cfg.server.weighting
        secagg_config = ConfigRecord({**base, "weighting": weighting, "weight-cap": cfg.server.weight_cap})
        masked = step("masked", {node_of[u]: RecordDict({
            "arrays": arrays, "config": train_config, "secagg": secagg_config,
            "inbox": ConfigRecord({str(v): box for v, (box, _) in boxes.items()}),
            "mask-keys": ConfigRecord({str(v): s_public for v, (_, s_public) in boxes.items()})})
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
        shares = strategy.privacy.noise_shares
        if strategy.privacy.distributed_noise and count < shares:
            raise RoundAborted(f"{count} contributions in the sum, fewer than the {shares} whose "
                               "noise shares the privacy guarantee counts on")
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
