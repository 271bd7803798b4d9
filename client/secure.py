"""The client's side of secure aggregation, as four Message API handlers around
`shared.secagg.SecAggClient` (message types "train.secagg_keys", "train.secagg_shares",
"train.secagg_masked", "train.secagg_unmask"; see server/secure.py for the server's side and docs/threat-model.md).

The round's secrets (two X25519 private keys, the self-mask seed, the shares held for
neighbours) live in this node's own Context state between the steps, never in a reply, and
are deleted after the last step. Local training happens in the "masked" step, so a client
trains only once it is known to have enough neighbours to be unmasked.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client.local import model_layout
from shared.weighting import unit_weight
from shared.secagg import SecAggClient, SecAggParams, clip_l2, encode_contribution
from shared.wire import flatten, from_record

STATE_KEY = "secagg"
log = logging.getLogger("fedrec.client")


def _save(context: Context, client: SecAggClient) -> None:
    context.state[STATE_KEY] = ConfigRecord(client.state())


def _load(context: Context, round_id: bytes) -> SecAggClient:
    record = context.state.get(STATE_KEY)
    if not isinstance(record, ConfigRecord) or bytes(record["round"]) != round_id:
        raise RuntimeError("secure aggregation step out of order: this node holds no secrets "
                           "for that round (restarted mid-round?)")
    return SecAggClient.from_state({k: bytes(v) for k, v in record.items()})


def _ids(record: ConfigRecord) -> dict[int, bytes]:
    return {int(k): bytes(v) for k, v in record.items()}


def _reply(msg: Message, **records) -> Message:
    return Message(content=RecordDict(records), reply_to=msg)


def handle_keys(msg: Message, context: Context) -> Message:
    c = msg.content["secagg"]
    params = SecAggParams(int(c["neighbours"]), int(c["threshold"]), float(c["clip"]), int(c["max-clients"]))
    client = SecAggClient(int(c["index"]), params, bytes(c["round-id"]))
    _save(context, client)
    c_public, s_public = client.public_keys()
    return _reply(msg, secagg=ConfigRecord({"c-public": c_public, "s-public": s_public}))


def handle_shares(msg: Message, context: Context) -> Message:
    round_id = bytes(msg.content["secagg"]["round-id"])
    client = _load(context, round_id)
    keys = {v: (blob[:32], blob[32:]) for v, blob in _ids(msg.content["neighbour-keys"]).items()}
    sealed = client.share_keys(keys)
    _save(context, client)
    return _reply(msg, shares=ConfigRecord({str(v): box for v, box in sealed.items()}))


def handle_masked(msg: Message, context: Context, model, train: Callable, rng: np.random.Generator) -> Message:
    """Train as in a plain round (`train(global_weights) -> (delta, metrics)`), then send only
    the masked, quantised contribution. A client that refused to train (privacy budget)
    contributes weight 0: the server cannot tell it from the others."""
    round_id = bytes(msg.content["secagg"]["round-id"])
    client = _load(context, round_id)
    global_weights = from_record(msg.content["arrays"], model_layout(model))
    delta, metrics = train(global_weights)
    c = msg.content["secagg"]
    weight = (unit_weight(metrics["num-examples"], str(c["weighting"]), float(c["weight-cap"]))
              if metrics["num-examples"] > 0 else 0.0)
    flat = clip_l2(flatten(delta).astype(np.float64), client.params.clip)
    if not np.isfinite(flat).all():
        # The plain server would drop this reply; here a weight-0 zero vector keeps the masks
        # consistent and the round averages the others.
        log.warning("non-finite local update: contributing weight 0 this round")
        flat, weight = np.zeros_like(flat), 0.0
    vector = encode_contribution(flat, weight, metrics["train-loss"])
    masked = client.masked_input(vector, _ids(msg.content["inbox"]), rng)
    _save(context, client)
    # Nothing else: no example count, loss or timing of this user leaves in the clear.
    return _reply(msg, masked=ArrayRecord({"masked": Array(masked)}))


def handle_unmask(msg: Message, context: Context) -> Message:
    c = msg.content["secagg"]
    client = _load(context, bytes(c["round-id"]))
    shares = client.unmask_shares(list(c["alive"]), list(c.get("dropped", [])))
    del context.state[STATE_KEY]  # the round is over for this client: forget its secrets
    return _reply(msg, shares=ConfigRecord({str(owner): share for owner, share in shares.items()}))
