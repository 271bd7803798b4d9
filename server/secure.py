"""The server's side of secure aggregation: one training round as three Message API
exchanges around `fedrec.shared.secagg.server.SecAggServer` (client side: client/secure.py; the
records: shared/protocol.py).

  register -> nodes never seen (all of them before the first secure round);
              <- the node's identity public key, kept for the rest of the run
  shares   -> each sampled node: its number in the round, the parameters, its neighbours'
              identity keys; <- its mask public key and sealed shares, one per neighbour
  masked   -> global weights, training config, shares sealed for it and the senders' mask
              keys; <- its masked contribution
  confirm  -> the round's one view: who sent a masked input (alive), who did not (dropped);
              <- the client's signature of it (its enrolled device key)
  unmask   -> the view and its holders' signatures;    <- the shares asked for (a client reveals
              only when a threshold of its holders signed the view it signed)

A node that does not answer a step (or answers with an error, when the run tolerates them)
has dropped; the protocol recovers as long as every needed secret keeps `threshold` shares,
and otherwise the round is aborted and the global model left as it was. The server holds
masked vectors and their unmasked sum, never one client's update, count or loss.

`SecureRound.run` returns the decoded sum (or None when the round aborted or was skipped); the
federation turns a sum into the round's mean update exactly as it does a plain round's replies.
"""
from __future__ import annotations

import logging
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from fedrec.server.exchange import Exchange, exchange
from fedrec.shared.protocol import (ConfirmRequest, MalformedRecord, MaskedRequest, SharesRequest, UnmaskRequest, blame_of,
                             pack_abort_request, pack_confirm_request, pack_masked_request, pack_register_request,
                             inputs_digest, pack_shares_request, pack_unmask_request, secagg_message_type, task_digest,
                             unpack_confirm_reply, unpack_masked_reply, unpack_register_reply,
                             unpack_shares_reply, unpack_unmask_reply)
from fedrec.shared.secagg.fixed_point import decode_mean
from fedrec.shared.secagg.identity import IdentityRecord, verify_view, view_message
from fedrec.shared.secagg.params import RoundAborted, SecAggParams, default_params, min_threshold
from fedrec.shared.secagg.server import SecAggServer
from fedrec.shared.settings import MIN_SECURE_CLIENTS, default

log = logging.getLogger("fedrec.server")


@dataclass
class SecureConfig:
    enabled: bool = default("secure-aggregation")
    neighbours: int = default("secagg-neighbours")  # graph degree k; 0: sized from the round
    threshold: int = default("secagg-threshold")    # shares to rebuild a secret; 0: two thirds of holders
    dropout: float = default("secagg-dropout")      # share of a round's clients the sizing must survive
    enrolment_ca: str = ""   # the enrolment CA's public key file: registrations are checked against it

    def to_dict(self) -> dict:
        return asdict(self)

    def params(self, n: int, clip: float, exact: bool = False) -> SecAggParams:
        auto = default_params(n, clip, dropout=self.dropout)
        k = min(self.neighbours or auto.neighbours, n - 1)
        k += k % 2 if k < n - 1 else 0   # the SecAgg+ ring graph has an even degree
        # Above two thirds of the k + 1 holders (the clients refuse less), k + 1 at most.
        t = min(max(self.threshold, min_threshold(k + 1)), k + 1)
        if self.threshold and t != self.threshold:
            log.warning("secure aggregation: threshold %d does not fit a round of %d (degree %d); using %d",
                        self.threshold, n, k, t)
        return SecAggParams(k, t, clip, n, exact)


@dataclass
class SecureTask:
    """What one secure round aggregates: the same inputs a plain round sends, plus how the
    clients weigh themselves and the bound each contribution is clipped to."""
    arrays: ArrayRecord          # global weights
    config: ConfigRecord         # the round config (fedrec.shared.protocol.RoundConfig)
    weighting: str
    weight_cap: float
    clip: float                  # sizes the fixed-point bound (update clip, plus noise room)
    min_contributions: int = 0   # fewer summands than this aborts the round (distributed DP noise
                                 # shares, or a floor on contributors), checked by clients too
    size: int = 0                # coordinates summed (0: those of `arrays`)
    noised: bool = False         # clients add distributed DP noise: the mean may exceed the clip
    exact: bool = False          # whole counts in {0, 1}: summed exactly on the smaller ring (SecAggParams.exact)
    extra: dict = field(default_factory=dict)   # more records sent with the masked step (name -> record)


@dataclass
class SecureSum:
    total: np.ndarray            # decoded sum of the contributions' weighted updates
    weight: float                # sum of their weights
    loss: float                  # their weighted mean training loss
    count: int                   # contributions in it


@dataclass
class SecureOutcome:
    result: SecureSum | None     # None: aborted or skipped; the model stays as it was
    sampled: int
    reasons: list[str] = field(default_factory=list)
    params: dict = field(default_factory=dict)
    bytes_down: int = 0
    bytes_up: int = 0
    phases: dict = field(default_factory=dict)


def check_plausible(mean: np.ndarray, weight: float, loss_sum: float, count: int, task: SecureTask) -> None:
    """Abort a sum no set of honest contributions could make: weights are in [0, 1], each loss term
    in [0, weight], and a weighted mean of updates clipped to C has norm <= C (without distributed
    noise, which widens it). It catches a client that sent values far outside the bounds; one
    inside them can still pull the mean (there are no range proofs; docs/threat-model.md)."""
    slack = 1e-3 * max(count, 1)
    if not 0 < weight <= count + slack or not -slack <= loss_sum <= weight + slack:
        raise RoundAborted(f"implausible sum: total weight {weight:.4g} or loss {loss_sum:.4g} outside what "
                           f"{count} clients can send")
    if not task.noised and float(np.linalg.norm(mean)) > task.clip * 1.01:
        raise RoundAborted(f"implausible sum: mean update norm {float(np.linalg.norm(mean)):.4g} exceeds the "
                           f"clip {task.clip:g}")


REGISTER_ALL_UP_TO = 5_000   # nodes: at ML-100K's 943 one exchange of 6 s, instead of one more step in ~100 rounds


class SecureRound:
    """Runs secure rounds for one federation; keeps the identity keys nodes registered."""

    def __init__(self, cfg: SecureConfig, timeout: float, fail_on_error: bool):
        self.cfg, self.timeout, self.fail_on_error = cfg, timeout, fail_on_error
        self.identities: dict[int, bytes] = {}   # node -> registered identity record
        # The clients check every record against the CA themselves; the server checks too, so a
        # client that registers garbage is turned away at once instead of upsetting its neighbours.
        ca = Path(cfg.enrolment_ca) if cfg.enrolment_ca else None
        self.ca_public = ca.read_bytes() if ca is not None and ca.is_file() else None
        if cfg.enabled and self.ca_public is None:
            log.warning("secure aggregation: no enrolment CA public key at %r; registrations are not checked "
                        "by the server (the clients still check them)", cfg.enrolment_ca)

    def _step(self, grid: Grid, step: str, contents: dict, outcome: SecureOutcome, fail_on_error: bool) -> Exchange:
        started = time.perf_counter()
        result = exchange(grid, secagg_message_type(step), contents, self.timeout, fail_on_error)
        outcome.bytes_down += result.bytes_down
        outcome.bytes_up += result.bytes_up
        outcome.reasons.extend(result.failed)
        outcome.phases[step] = time.perf_counter() - started
        return result

    def register(self, grid: Grid, nodes: list[int], outcome: SecureOutcome) -> None:
        """Learn the identity keys of `nodes` not registered yet; a node that fails is simply not
        registered (asked again when next sampled)."""
        contents = {node: pack_register_request() for node in nodes if node not in self.identities}
        if not contents:
            return
        failed_before = len(outcome.reasons)
        result = self._step(grid, "register", contents, outcome, fail_on_error=False)
        for node, content in result.replies.items():
            try:
                record = unpack_register_reply(content)
                if self.ca_public is not None and not IdentityRecord.from_bytes(record).verify(self.ca_public):
                    raise MalformedRecord("identity record not enrolled with this federation's CA")
                self.identities[node] = record
            except MalformedRecord as err:
                outcome.reasons.append(f"node {node}: {err}")
        missing = sum(node not in self.identities for node in contents)
        if missing:
            log.warning("secure aggregation: %d of %d node(s) not registered (asked again when sampled): %s",
                        missing, len(contents), "; ".join(outcome.reasons[failed_before:][:3]))

    def run(self, grid: Grid, server_round: int, nodes: list[int], task: SecureTask) -> SecureOutcome:
        """One securely aggregated round over the sampled `nodes`."""
        outcome = SecureOutcome(result=None, sampled=len(nodes))
        self.register(grid, self._to_register(grid, nodes), outcome)
        nodes = [node for node in nodes if node in self.identities]
        if len(nodes) < MIN_SECURE_CLIENTS:
            # Poisson sampling (user-level DP) can draw almost nobody; masking needs company.
            log.warning("round %d: %d client(s) sampled and registered, too few to aggregate securely; "
                        "round skipped", server_round, len(nodes))
            outcome.reasons.append(f"round skipped: {len(nodes)} to mask")
            return outcome
        round_id = server_round.to_bytes(8, "big") + secrets.token_bytes(16)
        try:
            outcome.result = self._protocol(grid, round_id, nodes, task, outcome)
        except RoundAborted as err:
            log.warning("round %d: secure aggregation aborted, global model unchanged: %s", server_round, err)
            outcome.reasons.append(f"round aborted: {err}")
            # Best effort: the clients forget the round's secrets now rather than at their next round.
            self._step(grid, "abort", {node: pack_abort_request(round_id) for node in nodes}, outcome,
                       fail_on_error=False)
        return outcome

    def _to_register(self, grid: Grid, sampled: list[int]) -> list[int]:
        """Every node the first time, in one exchange for the whole run, while the population is small;
        past that only the sampled ones (newcomers are asked when first sampled), so a round's cost
        follows the clients in it, not the population (one exchange with 100,000 nodes took minutes)."""
        if self.identities:
            return sampled
        everyone = list(grid.get_node_ids())
        return everyone if len(everyone) <= REGISTER_ALL_UP_TO else sampled

    def _protocol(self, grid: Grid, round_id: bytes, nodes: list[int], task: SecureTask,
                  outcome: SecureOutcome) -> SecureSum:
        index = {node: i + 1 for i, node in enumerate(nodes)}
        node_of = {i: node for node, i in index.items()}
        params = self.cfg.params(len(nodes), task.clip, task.exact)
        outcome.params = asdict(params)
        server = SecAggServer(len(nodes), params, round_id)
        registered = {u: self.identities[node] for node, u in index.items()}
        identities = server.receive_identities(registered)
        shares = self._shares(grid, identities, registered, params, round_id, index, node_of, outcome)
        try:
            inbox = server.route_shares({u: (r.s_public, r.commitment, r.sealed) for u, r in shares.items()})
        finally:   # the malformed replies it dropped are named even when too few are left
            outcome.reasons.extend(f"node {node_of[u]}: {why}" for u, why in server.rejected)
            server.rejected.clear()
        masked = self._step(grid, "masked", {node_of[u]: pack_masked_request(task.arrays, task.config, MaskedRequest(
            round_id, task.weighting, task.weight_cap, {v: box for v, (box, _) in boxes.items()},
            {v: key for v, (_, key) in boxes.items()}), task.extra) for u, boxes in inbox.items()}, outcome,
            self.fail_on_error)
        self._report_blame(masked, node_of, outcome)
        size = (task.size or sum(a.numpy().size for a in task.arrays.values())) + 2
        vectors = {}
        for node, content in masked.replies.items():
            try:
                vectors[index[node]] = unpack_masked_reply(content, size, params.dtype)
            except MalformedRecord as err:
                outcome.reasons.append(f"node {node}: {err}; counted as dropped")
        alive, dropped = server.receive_masked(vectors)
        if len(alive) < task.min_contributions:
            # Before any unmask share is asked for: a sum of fewer is never opened.
            raise RoundAborted(f"{len(alive)} contributions, fewer than the {task.min_contributions} "
                               "whose noise shares (or floor on contributors) the round counts on")
        signatures = self._confirm(grid, round_id, alive, dropped, index, node_of, params,
                                   self._asked(task, params, size), outcome)
        # A floor on contributors (noise shares, counts): every signed alive input's record and
        # signature, for the clients to check that the alive count they are shown is of real devices.
        # All of them, not just the server's floor: a device may hold a higher floor of its own.
        witnesses = ({u: registered[u] + signatures[u] for u in alive if u in signatures}
                     if task.min_contributions else {})
        if len(witnesses) < task.min_contributions:   # the clients would refuse: do not ask them
            raise RoundAborted(f"{len(witnesses)} witnessed inputs, fewer than the {task.min_contributions} "
                               "whose noise shares (or floor on contributors) the round counts on")
        answers = self._step(grid, "unmask", {node_of[u]: pack_unmask_request(UnmaskRequest(
            round_id, alive, dropped, held, witnesses)) for u, held in server.signatures_for(signatures).items()},
            outcome, self.fail_on_error)
        started = time.perf_counter()
        unmasked = {}
        for node, content in answers.replies.items():
            try:
                unmasked[index[node]] = unpack_unmask_reply(content)
            except MalformedRecord as err:
                outcome.reasons.append(f"node {node}: {err}")
        try:
            total, count = server.unmask(unmasked)
        finally:
            outcome.reasons.extend(f"node {node_of[u]}: {why}" for u, why in server.rejected)
        mean, weight, loss = decode_mean(total)   # aborts when the weights sum to zero
        check_plausible(mean, weight, total[-1], count, task)
        outcome.phases["unmask-compute"] = time.perf_counter() - started
        return SecureSum(total[:-2], weight, loss, count)

    @staticmethod
    def _report_blame(result: Exchange, node_of: dict, outcome: SecureOutcome) -> None:
        """Name the nodes whose messages made others refuse (e.g. shares that fail authentication)."""
        blamed: dict[int, int] = {}
        for content in result.refusals.values():
            for u in blame_of(content):
                if u in node_of:
                    blamed[node_of[u]] = blamed.get(node_of[u], 0) + 1
        outcome.reasons += [f"node {node}: blamed by {count} neighbour(s) for messages that fail authentication"
                            for node, count in sorted(blamed.items())]

    @staticmethod
    def _asked(task: SecureTask, params: SecAggParams, size: int) -> bytes:
        """What the round asked of every client, as each signs it into its view (an honest server asks
        all the same)."""
        return task_digest(task.weighting, task.weight_cap, params.clip, params.exact, size,
                           inputs_digest({**task.extra, "arrays": task.arrays, "config": task.config}))

    def _confirm(self, grid: Grid, round_id: bytes, alive: list[int], dropped: list[int], index: dict,
                 node_of: dict, params: SecAggParams, task: bytes, outcome: SecureOutcome) -> dict[int, bytes]:
        """Step 3, the consistency round: every alive client signs the one view of the round;
        client number -> its signature (each client checks its holders' before revealing)."""
        result = self._step(grid, "confirm", {node_of[u]: pack_confirm_request(ConfirmRequest(round_id, alive, dropped))
                                              for u in alive}, outcome, self.fail_on_error)
        signatures = {}
        for node, content in result.replies.items():
            try:
                signature = unpack_confirm_reply(content)
                view = view_message(round_id, alive, dropped, (params.max_clients, params.neighbours), index[node], task)
                if not verify_view(IdentityRecord.from_bytes(self.identities[node]).device_public, signature, view):
                    raise MalformedRecord("view signature does not verify")
                signatures[index[node]] = signature
            except MalformedRecord as err:
                outcome.reasons.append(f"node {node}: {err}; dropped")
        return signatures

    def _shares(self, grid: Grid, identities: dict, registered: dict, params: SecAggParams, round_id: bytes,
                index: dict, node_of: dict, outcome: SecureOutcome) -> dict:
        """Step 1: every client's mask key and sealed shares (client number -> SharesReply)."""
        result = self._step(grid, "shares", {node_of[u]: pack_shares_request(SharesRequest(
            round_id, u, params.neighbours, params.threshold, params.clip, params.max_clients, registered[u], keys,
            params.exact))
            for u, keys in identities.items()}, outcome, self.fail_on_error)
        shares = {}
        for node, content in result.replies.items():
            try:
                reply = unpack_shares_reply(content)
            except MalformedRecord as err:
                outcome.reasons.append(f"node {node}: {err}")
                continue
            if reply.identity_lost:
                # Restarted since it registered: it sits this round out and registers afresh next time.
                outcome.reasons.append(f"node {node}: holds another identity key than the one registered; "
                                       "sits the round out")
                continue
            shares[index[node]] = reply
        for u in set(identities) - set(shares):
            self.identities.pop(node_of[u], None)  # silent, failed or restarted: ask for its key again
        return shares
