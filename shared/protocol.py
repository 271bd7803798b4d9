"""Everything that crosses between a client and the server, defined once.

client/ and server/ import this module and never each other. Each record is a pack/unpack
pair: one side packs what it sends, the other unpacks (and checks) what it receives, so a
key's name and meaning live here only. Torch-free: the ClientApp module loads without torch.

Messages (Flower's message types) and their records:
  train                  -> "arrays" (global weights), "config" (RoundConfig)
                         <- "delta" (trained - global), "metrics" (TrainMetrics)
  evaluate               -> "arrays", "config" (RoundConfig with a stage)
                         <- "metrics" (one user's HR/NDCG/MRR @10 and users = 1)
  train.secagg_register  -> "secagg" {register}            <- "secagg" {identity}
  train.secagg_shares    -> SharesRequest                  <- SharesReply
  train.secagg_masked    -> "arrays", "config", MaskedRequest   <- "masked" (one vector of the round's ring: uint32, or uint16 for exact counts)
  train.secagg_confirm   -> ConfirmRequest (the view)      <- "secagg" {signature}
  train.secagg_unmask    -> UnmaskRequest (view, holders' signatures)   <- "shares" {owner: share}
  train.secagg_abort     -> the round id                   <- nothing
Any secure step may be answered with "refused" {reason}: a request an honest client must refuse.

Weights travel as ONE flat float32 vector ("flat"), in the order of their sorted names; each
side rebuilds names and shapes from its own copy of the model (`Layout`), so no layout
travels and a reply of the wrong length is refused. One array instead of ~34 matters:
Flower decodes each array with `np.load`, which took 2.7 ms per message of 34 arrays.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType, MetricRecord, RecordDict

from fedrec.shared.model.config import ModelHyper
from fedrec.shared.secagg.identity import RECORD_BYTES
from fedrec.shared.settings import PrivacyUnits, default

Weights = dict[str, np.ndarray]
Layout = dict[str, tuple[int, ...]]
FLAT = "flat"


class MalformedRecord(ValueError):
    """A record that does not have the form this protocol defines."""


# ---------------------------------------------------------------- weights on the wire

def layout_of(weights: Weights) -> Layout:
    return {name: tuple(weights[name].shape) for name in sorted(weights)}


def flatten(weights: Weights) -> np.ndarray:
    return np.concatenate([np.ravel(weights[name]).astype(np.float32, copy=False) for name in sorted(weights)])


def unflatten(vector: np.ndarray, layout: Layout) -> Weights:
    size = sum(int(np.prod(shape)) for shape in layout.values())
    if vector.ndim != 1 or vector.size != size:
        raise MalformedRecord(f"expected a flat vector of {size} values, got shape {vector.shape}")
    out, start = {}, 0
    for name, shape in layout.items():
        n = int(np.prod(shape))
        out[name] = vector[start:start + n].reshape(shape)
        start += n
    return out


def to_record(weights: Weights) -> ArrayRecord:
    return ArrayRecord({FLAT: Array(flatten(weights))})


def from_record(record: ArrayRecord, layout: Layout) -> Weights:
    """Raises MalformedRecord (with the reason) unless the record is one float vector of the
    layout's size."""
    if not isinstance(record, ArrayRecord) or list(record.keys()) != [FLAT]:
        keys = sorted(record.keys())[:3] if isinstance(record, ArrayRecord) else type(record).__name__
        raise MalformedRecord(f"expected one array {FLAT!r}, got {keys}")
    vector = record[FLAT].numpy()
    if not np.issubdtype(vector.dtype, np.floating):
        raise MalformedRecord(f"dtype {vector.dtype}, expected a float array")
    return unflatten(vector, layout)


def clip_l2(vector: np.ndarray, clip: float) -> np.ndarray:
    """`vector` scaled down to L2 norm `clip` at most (clip <= 0: unchanged). The one clip:
    every bound on a client's influence (update clip, DP, secure aggregation) goes through it."""
    if clip <= 0:
        return vector
    norm = float(np.linalg.norm(vector.astype(np.float64, copy=False)))
    return vector * (clip / norm) if norm > clip else vector


def clip_update(update: Weights, clip: float) -> Weights:
    """A whole named update scaled down to L2 norm `clip` at most (0: no clipping)."""
    if clip <= 0:
        return update
    layout = layout_of(update)
    return {k: v.astype(np.float32, copy=False) for k, v in unflatten(clip_l2(flatten(update), clip), layout).items()}


def zero_update(weights: Weights) -> Weights:
    """The reply of a client that did not train: no change to any weight."""
    return {name: np.zeros_like(v) for name, v in weights.items()}


# ---------------------------------------------------------------- a client's weight in the mean

def client_weight(num_examples: float, weighting: str, cap: float) -> float:
    """A client's vote: its training targets up to `cap` ("examples"), or 1 ("uniform"). One
    definition for the plain server and the secure-aggregation client."""
    if weighting == "examples":
        return float(min(num_examples, cap))
    if weighting == "uniform":
        return 1.0
    raise ValueError(f"weighting must be 'examples' or 'uniform', not {weighting!r}")


def unit_weight(num_examples: float, weighting: str, cap: float) -> float:
    """The same vote scaled into [0, 1], as secure aggregation needs it (bounded inputs)."""
    return client_weight(num_examples, weighting, cap) / (cap if weighting == "examples" else 1.0)


# ---------------------------------------------------------------- round config (server -> client)

@dataclass(frozen=True)
class LocalConfig:
    """Local training on one client, per round."""
    local_epochs: int = default("local-epochs")   # passes over the user's own history
    lr: float = default("local-lr")
    optimizer: str = default("local-optimizer")    # "adam" or "sgd"; fresh every round (no state kept)
    train_on: str = default("train-on")           # "valid": train items only; "test": + validation item
    clip: float = default("update-clip")          # >0: scale the whole delta down to this L2 norm at most

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PrivacyRound(PrivacyUnits):
    """The differential privacy a round asks of a client (mode "none": none)."""
    mode: str = "none"
    budget: float = 0.0          # the server's target epsilon; a device may hold a smaller one
    delta: float = 0.0
    accountant: str = "rdp"
    record_noise: float = 0.0
    record_clip: float = 0.0
    record_window: int = 0
    user_noise: float = 0.0
    noise_shares: int = 0        # m > 0: distributed noise, this many clients' shares in every sum


@dataclass(frozen=True)
class RoundConfig:
    server_round: int
    seed: int
    local: LocalConfig
    model: ModelHyper
    privacy: PrivacyRound = field(default_factory=PrivacyRound)
    stage: str = ""              # evaluation only: "valid" or "test"


_LOCAL_KEYS = {"local_epochs": "local-epochs", "lr": "local-lr", "optimizer": "local-optimizer",
               "train_on": "train-on", "clip": "update-clip"}
_MODEL_KEYS = {f.name: f.name.replace("_", "-") for f in fields(ModelHyper)}
_PRIVACY_KEYS = {f.name: "privacy-" + f.name.replace("_", "-") for f in fields(PrivacyRound)}


def pack_round_config(cfg: RoundConfig) -> ConfigRecord:
    # (Flower cannot count the bytes of an empty string: "stage" is left out of a train round.)
    values = {"server-round": cfg.server_round, "seed": cfg.seed, **({"stage": cfg.stage} if cfg.stage else {})}
    values.update({key: getattr(cfg.local, name) for name, key in _LOCAL_KEYS.items()})
    values.update({key: getattr(cfg.model, name) for name, key in _MODEL_KEYS.items()})
    if cfg.privacy.mode != "none":
        values.update({key: getattr(cfg.privacy, name) for name, key in _PRIVACY_KEYS.items()})
    return ConfigRecord(values)


def unpack_round_config(record: ConfigRecord) -> RoundConfig:
    try:
        local = LocalConfig(**{name: type(getattr(LocalConfig(), name))(record[key])
                               for name, key in _LOCAL_KEYS.items()})
        model = ModelHyper(**{name: type(getattr(ModelHyper(), name))(record[key])
                              for name, key in _MODEL_KEYS.items()})
        privacy = PrivacyRound()
        if "privacy-mode" in record:
            privacy = PrivacyRound(**{name: type(getattr(PrivacyRound(), name))(record[key])
                                      for name, key in _PRIVACY_KEYS.items()})
        return RoundConfig(int(record["server-round"]), int(record["seed"]), local, model, privacy,
                           str(record.get("stage", "")))
    except (KeyError, TypeError, ValueError) as err:
        raise MalformedRecord(f"round config: {err!r}") from None


# ---------------------------------------------------------------- the blend round's request

def pack_blend_request(counts: np.ndarray, kinds: tuple[str, ...], settings: dict[str, float]) -> dict:
    """The records the blend round sends besides the encoder's weights: the summed co-occurrence
    counts (shared/privacy/cooccurrence.py's layout) and the item models to fit from them."""
    return {"item-counts": ArrayRecord({"counts": Array(np.asarray(counts, dtype=np.float32))}),
            "blend": ConfigRecord({"kinds": ",".join(kinds), **{k: float(v) for k, v in settings.items()}})}


BLEND_SETTINGS = {"l2": (1e-6, 1e9), "decay": (1e-6, 1.0), "neighbours": (1, 1e6), "shrink": (0.0, 1e9)}


def unpack_blend_request(content: RecordDict, size: int, known_kinds: tuple[str, ...]) -> tuple[np.ndarray, tuple, dict]:
    """(counts, kinds, settings); MalformedRecord unless the counts are `size` whole numbers >= 0 and
    every kind and setting is one this device knows, within its bounds (a device's work must not grow
    with what a server asks)."""
    try:
        counts = content["item-counts"]["counts"].numpy().astype(np.float64)
        c = content["blend"]
        kinds = tuple(str(c["kinds"]).split(","))
        settings = {k: float(c[k]) for k in BLEND_SETTINGS}
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise MalformedRecord(f"blend request: {err!r}") from None
    if counts.shape != (size,) or not np.isfinite(counts).all() or (counts < 0).any() or (counts != np.rint(counts)).any():
        raise MalformedRecord(f"blend request: the counts must be {size} whole numbers >= 0")
    if not kinds or len(set(kinds)) != len(kinds) or not set(kinds) <= set(known_kinds):
        raise MalformedRecord(f"blend request: item models {kinds} (known: {known_kinds})")
    for k, (low, high) in BLEND_SETTINGS.items():
        if not low <= settings[k] <= high:
            raise MalformedRecord(f"blend request: {k} = {settings[k]!r} outside [{low:g}, {high:g}]")
    settings["neighbours"] = int(settings["neighbours"])
    return counts, kinds, settings


# ---------------------------------------------------------------- replies (client -> server)

@dataclass
class TrainMetrics:
    """What a plain round's reply says besides the delta."""
    num_examples: float
    train_loss: float = float("nan")
    train_seconds: float = float("nan")
    privacy_refused: bool = False
    record_epsilon: float | None = None   # record-level DP: this client's epsilon after the round


def pack_train_reply(delta: Weights, metrics: TrainMetrics) -> RecordDict:
    values = {"num-examples": float(metrics.num_examples), "train-loss": float(metrics.train_loss),
              "train-seconds": float(metrics.train_seconds)}
    if metrics.privacy_refused:
        values["privacy-refused"] = 1.0
    if metrics.record_epsilon is not None:
        values["record-epsilon"] = float(metrics.record_epsilon)
    return RecordDict({"delta": to_record(delta), "metrics": MetricRecord(values)})


def unpack_train_reply(content: RecordDict, layout: Layout) -> tuple[Weights, TrainMetrics]:
    """Raises MalformedRecord with the reason when the reply lacks a record or has the wrong form."""
    delta_record, metrics = content.get("delta"), content.get("metrics")
    if not isinstance(delta_record, ArrayRecord):
        raise MalformedRecord("no 'delta' ArrayRecord")
    if not isinstance(metrics, MetricRecord) or "num-examples" not in metrics:
        raise MalformedRecord("no 'metrics' with num-examples")
    delta = from_record(delta_record, layout)
    return delta, TrainMetrics(float(metrics["num-examples"]), float(metrics.get("train-loss", float("nan"))),
                               float(metrics.get("train-seconds", float("nan"))),
                               bool(metrics.get("privacy-refused", 0.0)),
                               float(metrics["record-epsilon"]) if "record-epsilon" in metrics else None)


def pack_eval_reply(metrics: dict[str, float]) -> RecordDict:
    return RecordDict({"metrics": MetricRecord({**metrics, "users": 1.0})})


def unpack_eval_reply(content: RecordDict) -> dict[str, float]:
    metrics = content.get("metrics")
    if not isinstance(metrics, MetricRecord) or "users" not in metrics:
        raise MalformedRecord("no 'metrics' with users")
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


# ---------------------------------------------------------------- secure aggregation's steps

def pack_refusal(reason: str, blame: tuple[int, ...] = ()) -> RecordDict:
    """A client's answer to a request an honest client must refuse, with its reason and the
    clients (round numbers) whose messages made it refuse, when it knows."""
    return RecordDict({"refused": ConfigRecord({"reason": reason or "refused",
                                                **({"blame": [int(u) for u in blame]} if blame else {})})})


def refusal_of(content: RecordDict) -> str | None:
    record = content.get("refused")
    return str(record.get("reason", "refused")) if isinstance(record, ConfigRecord) else None


def blame_of(content: RecordDict) -> list[int]:
    record = content.get("refused")
    blame = record.get("blame", []) if isinstance(record, ConfigRecord) else []
    return [int(u) for u in blame] if isinstance(blame, list) else []


def secagg_message_type(step: str) -> str:
    return f"{MessageType.TRAIN}.secagg_{step}"


MAX_FIELD_BYTES = 4096   # no honest secure-aggregation field is longer (keys 32, records 192, boxes 160)


def _bytes(value) -> bytes:
    """A bytes field as sent, or MalformedRecord: never bytes(int), which allocates that many."""
    if not isinstance(value, bytes) or len(value) > MAX_FIELD_BYTES:
        raise MalformedRecord(f"expected at most {MAX_FIELD_BYTES} bytes, got {type(value).__name__}")
    return value


def _ids(record: ConfigRecord) -> dict[int, bytes]:
    if not isinstance(record, ConfigRecord):
        raise MalformedRecord(f"expected a ConfigRecord, got {type(record).__name__}")
    try:
        return {int(k): _bytes(v) for k, v in record.items()}
    except ValueError as err:   # a key that is no number (MalformedRecord is a ValueError too)
        raise MalformedRecord(f"bad entry: {err}") from None


def _id_record(values: dict[int, bytes]) -> ConfigRecord:
    return ConfigRecord({str(k): v for k, v in values.items()})


def pack_register_request() -> RecordDict:
    return RecordDict({"secagg": ConfigRecord({"register": True})})


def pack_register_reply(identity_record: bytes) -> RecordDict:
    return RecordDict({"secagg": ConfigRecord({"identity": identity_record})})


def unpack_register_reply(content: RecordDict) -> bytes:
    """The node's identity record (fedrec.shared.secagg.identity.IdentityRecord, as bytes)."""
    record = content["secagg"].get("identity") if isinstance(content.get("secagg"), ConfigRecord) else None
    if not isinstance(record, bytes) or len(record) != RECORD_BYTES:
        raise MalformedRecord("no valid identity record in its registration")
    return record


@dataclass(frozen=True)
class SharesRequest:
    round_id: bytes
    index: int                   # this client's number in the round
    neighbours: int
    threshold: int
    clip: float
    max_clients: int
    identity: bytes              # the identity record the server registered for this client
    neighbour_keys: dict[int, bytes]   # neighbour -> its identity record
    exact: bool = False          # whole-number contributions on the smaller ring (SecAggParams.exact)


def pack_shares_request(r: SharesRequest) -> RecordDict:
    return RecordDict({"secagg": ConfigRecord({"round-id": r.round_id, "index": r.index, "neighbours": r.neighbours,
                                               "threshold": r.threshold, "clip": r.clip,
                                               "max-clients": r.max_clients, "identity": r.identity,
                                               "exact": bool(r.exact)}),
                       "neighbour-keys": _id_record(r.neighbour_keys)})


def unpack_shares_request(content: RecordDict) -> SharesRequest:
    c = content["secagg"]
    return SharesRequest(_bytes(c["round-id"]), int(c["index"]), int(c["neighbours"]), int(c["threshold"]),
                         float(c["clip"]), int(c["max-clients"]), _bytes(c["identity"]),
                         _ids(content["neighbour-keys"]), bool(c.get("exact", False)))


@dataclass(frozen=True)
class SharesReply:
    s_public: bytes = b""
    commitment: bytes = b""      # to the self-mask seed, so a wrong rebuilt seed is caught
    sealed: dict[int, bytes] = field(default_factory=dict)
    identity_lost: bool = False  # the node holds another identity key than the registered one


def pack_shares_reply(r: SharesReply) -> RecordDict:
    if r.identity_lost:
        return RecordDict({"secagg": ConfigRecord({"identity-lost": True})})
    return RecordDict({"secagg": ConfigRecord({"s-public": r.s_public, "b-commitment": r.commitment}),
                       "shares": _id_record(r.sealed)})


def unpack_shares_reply(content: RecordDict) -> SharesReply:
    try:
        c = content["secagg"]
        if c.get("identity-lost"):
            return SharesReply(identity_lost=True)
        return SharesReply(_bytes(c["s-public"]), _bytes(c["b-commitment"]), _ids(content["shares"]))
    except (KeyError, TypeError, ValueError) as err:
        raise MalformedRecord(f"shares reply: {err!r}") from None


def task_digest(weighting: str, weight_cap: float, clip: float, exact: bool, size: int, inputs: bytes) -> bytes:
    """What a secure round asks of every contributor, in 32 bytes each client signs into its view of
    the round (shared/secagg/identity.py: view_message): the weighting and its cap, the clip, the
    ring's encoding, the vector's length and the inputs it was sent (`inputs_digest`: the round
    config with its stage and privacy, the weights, the blend round's counts and candidates). Holders' and
    witnesses' signatures then vouch for devices given the same task: a server cannot count devices
    it gave a zero-weight training task, or an encoder whose answers it can predict, toward the floor
    of a device it asked for its counts or its validation statistics."""
    description = json.dumps({"weighting": weighting, "weight-cap": float(weight_cap),
                              "clip": float(clip), "exact": bool(exact), "size": int(size), "inputs": inputs.hex()},
                             sort_keys=True)
    return hashlib.sha256(b"fedrec-secagg-task|" + description.encode()).digest()


MASKING_RECORDS = ("secagg", "inbox", "mask-keys")   # a masked request's per-client records (not its task)


def inputs_digest(records: dict) -> bytes:
    """SHA-256 of a masked request's task records (every record but MASKING_RECORDS), byte for byte:
    each array's dtype, shape and data, each config or metric entry's type and value."""
    digest = hashlib.sha256()
    for name in sorted(n for n in records if n not in MASKING_RECORDS):
        record = records[name]
        digest.update(f"|{name}:{type(record).__name__}|".encode())
        for key in sorted(record.keys()):
            value = record[key]
            if isinstance(value, Array):
                digest.update(f"{key}={value.dtype}{tuple(value.shape)}{value.stype}:".encode() + value.data)
            else:
                digest.update(f"{key}={type(value).__name__}:{value!r};".encode())
    return digest.digest()


@dataclass(frozen=True)
class MaskedRequest:
    round_id: bytes
    weighting: str
    weight_cap: float
    inbox: dict[int, bytes]       # sender -> its shares sealed for this client
    mask_keys: dict[int, bytes]   # sender -> its mask public key


def pack_masked_request(arrays: ArrayRecord, config: ConfigRecord, r: MaskedRequest,
                        extra: dict | None = None) -> RecordDict:
    """`extra`: more records the round's task needs (the blend round's counts and candidates)."""
    return RecordDict({**(extra or {}), "arrays": arrays, "config": config,
                       "secagg": ConfigRecord({"round-id": r.round_id, "weighting": r.weighting,
                                               "weight-cap": r.weight_cap}),
                       "inbox": _id_record(r.inbox), "mask-keys": _id_record(r.mask_keys)})


def unpack_masked_request(content: RecordDict) -> MaskedRequest:
    c = content["secagg"]
    weighting, cap = str(c["weighting"]), float(c["weight-cap"])
    if weighting not in ("uniform", "examples") or not (0 < cap < float("inf")):
        # A cap of 0 or inf (or NaN) would zero or break every weight: a sum whose other terms weigh
        # nothing is one device's vector.
        raise MalformedRecord(f"masked request: weighting {weighting!r}, weight cap {cap!r}")
    return MaskedRequest(_bytes(c["round-id"]), weighting, cap,
                         _ids(content["inbox"]), _ids(content["mask-keys"]))


def pack_masked_reply(vector: np.ndarray) -> RecordDict:
    return RecordDict({"masked": ArrayRecord({"masked": Array(vector)})})


def unpack_masked_reply(content: RecordDict, size: int, dtype: np.dtype = np.dtype(np.uint32)) -> np.ndarray:
    """The masked vector: `size` elements of the round's ring (`SecAggParams.dtype`)."""
    record = content.get("masked")
    vector = record["masked"].numpy() if isinstance(record, ArrayRecord) and "masked" in record else None
    if vector is None or vector.dtype != np.dtype(dtype) or vector.shape != (size,):
        raise MalformedRecord("masked input malformed")
    return vector


@dataclass(frozen=True)
class ConfirmRequest:
    round_id: bytes
    alive: list[int]             # the round's view: sent a masked input
    dropped: list[int]           #                   shared keys, sent no masked input


def pack_confirm_request(r: ConfirmRequest) -> RecordDict:
    # (Flower's ConfigRecord.count_bytes fails on an empty list: leave "dropped" out then.)
    return RecordDict({"secagg": ConfigRecord({"round-id": r.round_id, "alive": list(r.alive),
                                               **({"dropped": list(r.dropped)} if r.dropped else {})})})


def unpack_confirm_request(content: RecordDict) -> ConfirmRequest:
    c = content["secagg"]
    return ConfirmRequest(_bytes(c["round-id"]), [int(u) for u in c["alive"]], [int(u) for u in c.get("dropped", [])])


def pack_confirm_reply(signature: bytes) -> RecordDict:
    return RecordDict({"secagg": ConfigRecord({"signature": signature})})


def unpack_confirm_reply(content: RecordDict) -> bytes:
    signature = content["secagg"].get("signature") if isinstance(content.get("secagg"), ConfigRecord) else None
    if not isinstance(signature, bytes) or len(signature) != 64:
        raise MalformedRecord("no valid view signature")
    return signature


@dataclass(frozen=True)
class UnmaskRequest:
    round_id: bytes
    alive: list[int]
    dropped: list[int]
    signatures: dict[int, bytes]   # holder -> its signature of the view
    # Distributed DP noise: alive client -> its identity record + its signature of the view, so a
    # client can check that the inputs called alive are real enrolled devices (shared/secagg/client.py).
    witnesses: dict[int, bytes] = field(default_factory=dict)


def pack_unmask_request(r: UnmaskRequest) -> RecordDict:
    view = pack_confirm_request(ConfirmRequest(r.round_id, r.alive, r.dropped))
    records = {"secagg": view["secagg"], "signatures": _id_record(r.signatures)}
    if r.witnesses:   # (Flower cannot count the bytes of an empty record's values)
        records["witnesses"] = _id_record(r.witnesses)
    return RecordDict(records)


def unpack_unmask_request(content: RecordDict) -> UnmaskRequest:
    view = unpack_confirm_request(content)
    witnesses = _ids(content["witnesses"]) if "witnesses" in content else {}
    return UnmaskRequest(view.round_id, view.alive, view.dropped, _ids(content["signatures"]), witnesses)


def pack_abort_request(round_id: bytes) -> RecordDict:
    """The round is over without a sum: clients forget its secrets now, not at their next round."""
    return RecordDict({"secagg": ConfigRecord({"round-id": round_id})})


def pack_unmask_reply(shares: dict[int, bytes]) -> RecordDict:
    return RecordDict({"shares": _id_record(shares)})


def unpack_unmask_reply(content: RecordDict) -> dict[int, bytes]:
    try:
        return _ids(content["shares"])
    except (KeyError, TypeError, ValueError) as err:
        raise MalformedRecord(f"unmask reply: {err!r}") from None

