"""The client's side of secure aggregation, as Message API handlers around
`fedrec.shared.secagg.client.SecAggClient` (message types "train.secagg_" + register, shares, masked,
confirm, unmask, abort; records in shared/protocol.py; the server's side in server/secure.py;
what holds against whom in docs/threat-model.md).

The node's identity key (made at registration, once per run) and the round's secrets (the
mask private key, the self-mask seed, the shares held for neighbours) live in this node's
own Context state, never in a reply; a round's secrets are deleted after its last step, or
when the client refuses a step or the server aborts the round. A request an honest client must
refuse is answered with a refusal and its reason, never an exception.
Local training happens in the "masked" step, so a client trains only once it is known to
have enough neighbours to be unmasked.
"""
from __future__ import annotations

import logging
import secrets
from collections.abc import Callable

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedrec.client.store import device_files
from fedrec.shared.protocol import (MalformedRecord, RoundConfig, SharesReply, clip_l2, flatten, pack_confirm_reply,
                             pack_masked_reply, pack_refusal, pack_register_reply, pack_shares_reply,
                             pack_unmask_reply, inputs_digest, task_digest, unit_weight, unpack_confirm_request, unpack_masked_request,
                             unpack_shares_request, unpack_unmask_request)
from fedrec.shared.secagg.client import SecAggClient, identity_public, new_identity_key
from fedrec.shared.secagg.fixed_point import encode_contribution
from fedrec.shared.secagg.identity import DeviceCredentials, identity_record
from fedrec.shared.secagg.params import MIN_NEIGHBOURS, ProtocolViolation, SecAggParams

STATE_KEY = "secagg"
IDENTITY_KEY = "secagg-identity"
SEEN_KEY = "secagg-seen-rounds"
SEEN_KEPT = 4096   # round ids remembered (24 bytes each): a replayed one is refused
VERIFIED_KEY = "secagg-verified"   # digests of neighbours' identity records already checked against the CA
VERIFIED_KEPT = 1024
log = logging.getLogger("fedrec.client")


def _refuse(msg: Message, context: Context, err: Exception) -> Message:
    """Refuse the step, say why, and forget the round's secrets: it cannot finish with this client."""
    log.warning("secure aggregation: refusing step %r: %s", msg.metadata.message_type, err)
    context.state.pop(STATE_KEY, None)
    return _reply(msg, pack_refusal(str(err), getattr(err, "blame", ())))


def refuse_round(msg: Message, context: Context, reason: str) -> Message:
    """Refuse a step for a reason outside the protocol (this device's privacy policy)."""
    return _refuse(msg, context, ProtocolViolation(reason))


def _verified(context: Context) -> set[bytes]:
    record = context.state.get(VERIFIED_KEY)
    return {bytes(r) for r in record["digests"]} if isinstance(record, ConfigRecord) else set()


def _fresh_round(context: Context, round_id: bytes) -> None:
    """Refuse a round id this node has seen before (a replay would get old sealed shares
    accepted); remember this one."""
    record = context.state.get(SEEN_KEY)
    seen = [bytes(r) for r in record["ids"]] if isinstance(record, ConfigRecord) else []
    if round_id in seen:
        raise ProtocolViolation("this round id was used before: a replayed round is refused")
    context.state[SEEN_KEY] = ConfigRecord({"ids": (seen + [round_id])[-SEEN_KEPT:]})


def _save(context: Context, client: SecAggClient) -> None:
    context.state[STATE_KEY] = ConfigRecord(client.state())


def _load(context: Context, round_id: bytes) -> SecAggClient:
    record = context.state.get(STATE_KEY)
    if not isinstance(record, ConfigRecord) or bytes(record["round_id"]) != round_id:
        raise ProtocolViolation("secure aggregation step out of order: this node holds no secrets "
                                "for that round (restarted mid-round?)")
    return SecAggClient.from_state({k: bytes(v) for k, v in record.items()})


def _reply(msg: Message, content: RecordDict) -> Message:
    return Message(content=content, reply_to=msg)


def _identity(context: Context) -> bytes | None:
    record = context.state.get(IDENTITY_KEY)
    return bytes(record["private"]) if isinstance(record, ConfigRecord) else None


def _credentials(context: Context, settings: dict) -> DeviceCredentials:
    return device_files(context.node_config, {**settings, **context.run_config}).read_credentials()


def handle_register(msg: Message, context: Context, settings: dict) -> Message:
    """Answer this node's identity record: its identity public key (made on first use), signed
    with its enrolled device key."""
    identity = _identity(context)
    if identity is None:
        identity = new_identity_key()
        context.state[IDENTITY_KEY] = ConfigRecord({"private": identity})
    record = identity_record(_credentials(context, settings), identity_public(identity))
    return _reply(msg, pack_register_reply(record.to_bytes()))


def handle_shares(msg: Message, context: Context, settings: dict) -> Message:
    try:
        return _shares(msg, context, settings)
    except ProtocolViolation as err:
        return _refuse(msg, context, err)


def _shares(msg: Message, context: Context, settings: dict) -> Message:
    request = unpack_shares_request(msg.content)
    _fresh_round(context, request.round_id)
    identity = _identity(context)
    if identity is None or identity_public(identity) != request.identity[:32]:
        # Neighbours would seal shares to a key this node cannot open (it restarted since it
        # registered): sit this round out; the server registers its current key next time.
        log.warning("secure aggregation: this node's identity key is not the one the server registered; "
                    "sitting this round out")
        return _reply(msg, pack_shares_reply(SharesReply(identity_lost=True)))
    try:
        params = SecAggParams(request.neighbours, request.threshold, request.clip, request.max_clients, request.exact)
    except ValueError as err:   # e.g. a threshold that is no majority of the declared holders
        raise ProtocolViolation(str(err)) from None
    floor = int(context.node_config.get("secagg-min-neighbours", MIN_NEIGHBOURS))  # the device's own floor
    credentials = _credentials(context, settings)
    client = SecAggClient(request.index, params, request.round_id, identity, credentials.ca_public,
                          credentials.device_public, min_neighbours=floor)
    verified = _verified(context)
    s_public, commitment, sealed = client.share_keys(request.neighbour_keys, verified)
    context.state[VERIFIED_KEY] = ConfigRecord({"digests": sorted(verified)[-VERIFIED_KEPT:]})
    _save(context, client)
    return _reply(msg, pack_shares_reply(SharesReply(s_public, commitment, sealed)))


def handle_masked(msg: Message, context: Context, train: Callable, config: RoundConfig,
                  noise_std: float = 0.0, *, min_alive: int = 0, exact_clip: float | None = None,
                  whole: bool = False) -> Message:
    """`min_alive`: unmask only a sum of at least this many witnessed inputs (whatever the noise);
    `exact_clip`: refuse unless the round's clip is this one (a contribution must never be rescaled);
    `whole`: the contribution is whole counts (0s and 1s), summed exactly: refuse a round that is not
    exact, and, without it, one that is (a real-valued vector is not made of 0s and 1s)."""
    try:
        return _masked(msg, context, train, config, noise_std, min_alive, exact_clip, whole)
    except (ProtocolViolation, MalformedRecord) as err:
        return _refuse(msg, context, err)


def _check_encoding(params: SecAggParams, weighting: str, exact_clip: float | None, whole: bool) -> None:
    """Refuse a round whose encoding is not the one this contribution was made for."""
    if exact_clip is not None and weighting != "uniform":
        # An exact contribution weighs 1, like every other: weights the server could tune per device
        # would zero the others' terms and leave one device's vector as the sum.
        raise ProtocolViolation(f"an exact contribution is summed with uniform weights, not {weighting!r}")
    if params.exact != whole:
        raise ProtocolViolation("this contribution is " + ("whole counts, summed exactly" if whole else "real-valued")
                                + "; the round's encoding is not")
    if exact_clip is not None and params.clip != exact_clip:
        # A smaller clip would scale each contribution by a factor that depends on its norm, and so
        # tag it: the sum's coordinates would tell the contributors apart.
        raise ProtocolViolation(f"the round's clip {params.clip!r} is not this contribution's {exact_clip!r}")


def _masked(msg: Message, context: Context, train: Callable, config: RoundConfig, noise_std: float,
            min_alive: int = 0, exact_clip: float | None = None, whole: bool = False) -> Message:
    """Train as in a plain round (`train() -> (delta, TrainMetrics)`), then send only the masked,
    quantised contribution. A client that refused to train (privacy budget)
    contributes weight 0: the server cannot tell it from the others. With distributed DP
    (`noise_std` > 0) the contribution gets this client's noise share, refusing or not."""
    request = unpack_masked_request(msg.content)
    client = _load(context, request.round_id)
    if set(request.inbox) != set(request.mask_keys):
        raise ProtocolViolation("the inbox and the mask keys name different senders")
    shares = config.privacy.noise_shares
    if noise_std > 0 and shares > client.params.max_clients:
        # More shares than the round has clients: the sum would carry less noise than claimed.
        raise ProtocolViolation(f"noise split into {shares} shares but the round has at most "
                                f"{client.params.max_clients} clients")
    _check_encoding(client.params, request.weighting, exact_clip, whole)
    if min_alive > client.params.max_clients:
        raise ProtocolViolation(f"this contribution needs a sum of >= {min_alive} inputs; the round has at most "
                                f"{client.params.max_clients}")
    # The server will ask for unmask shares only with at least this many inputs alive (checked then).
    client.min_alive = max(shares if noise_std > 0 else 0, min_alive)
    inbox = {u: (request.inbox[u], request.mask_keys[u]) for u in request.inbox}
    # Before train(): a short or forged inbox is refused before the ledger is charged or a
    # once-only contribution is recorded (a peer must not make this device spend for nothing).
    client.open_inbox(inbox)
    delta, metrics = train()
    weight = (unit_weight(metrics.num_examples, request.weighting, request.weight_cap)
              if metrics.num_examples > 0 else 0.0)
    # Under distributed noise the server widens params.clip to leave the noise room: the
    # update itself is held to the round's update clip, which the noise is calibrated to.
    clip = config.local.clip if noise_std > 0 else client.params.clip
    flat = clip_l2(flatten(delta).astype(np.float64), clip)
    if not np.isfinite(flat).all():
        # The plain server would drop this reply; here a weight-0 zero vector keeps the masks
        # consistent and the round averages the others.
        log.warning("non-finite local update: contributing weight 0 this round")
        flat, weight = np.zeros_like(flat), 0.0
    vector = encode_contribution(flat, weight, metrics.train_loss)
    if noise_std > 0:
        # After the weight: a weight-0 client still adds its noise share. A coordinate past
        # the bound takes a > 10-sigma draw (the server's sizing); clamped so the sum cannot wrap.
        vector[:-2] = np.clip(add_noise_share(vector[:-2], noise_std), -client.params.bound, client.params.bound)
    # Stochastic rounding draws from the OS, never from the run's seed (the server's): a server
    # that knew the draws could undo the rounding's randomness.
    # The view it signs names what it was asked to do: its holders and witnesses must have done the same.
    client.task = task_digest(request.weighting, request.weight_cap, client.params.clip, client.params.exact,
                              len(vector), inputs_digest(dict(msg.content.items())))
    try:
        masked = client.masked_input(vector, inbox, np.random.default_rng(secrets.randbits(128)))
    except ValueError as err:   # e.g. an exact round and a vector that is not 0s and 1s
        raise ProtocolViolation(str(err)) from None
    _save(context, client)
    # Nothing else: no example count, loss or timing of this user leaves in the clear.
    return _reply(msg, pack_masked_reply(masked))


def handle_confirm(msg: Message, context: Context, settings: dict) -> Message:
    """The consistency round: sign the server's view of who is alive and who dropped."""
    request = unpack_confirm_request(msg.content)
    try:
        client = _load(context, request.round_id)
        signature = client.confirm(request.alive, request.dropped, _credentials(context, settings))
    except ProtocolViolation as err:
        return _refuse(msg, context, err)
    _save(context, client)
    return _reply(msg, pack_confirm_reply(signature))


def handle_unmask(msg: Message, context: Context) -> Message:
    try:
        request = unpack_unmask_request(msg.content)
    except (MalformedRecord, KeyError, TypeError, ValueError) as err:   # malformed: refused, never a crash
        return _refuse(msg, context, ProtocolViolation(f"malformed unmask request: {err}"))
    try:
        client = _load(context, request.round_id)
        shares = client.unmask_shares(request.alive, request.dropped, request.signatures, request.witnesses)
    except ProtocolViolation as err:
        return _refuse(msg, context, err)
    del context.state[STATE_KEY]  # the round is over for this client: forget its secrets
    return _reply(msg, pack_unmask_reply(shares))


def handle_abort(msg: Message, context: Context) -> Message:
    """The server gave the round up: forget its secrets now."""
    record = context.state.get(STATE_KEY)
    if isinstance(record, ConfigRecord) and bytes(record["round_id"]) == bytes(msg.content["secagg"]["round-id"]):
        del context.state[STATE_KEY]
    return _reply(msg, RecordDict({}))


def add_noise_share(vector: np.ndarray, std: float) -> np.ndarray:
    """`vector` plus this client's share of distributed Gaussian DP noise. The generator is
    seeded from the OS, never from the run's seed, which the server knows."""
    return vector + np.random.default_rng(secrets.randbits(128)).normal(0.0, std, size=vector.shape)
