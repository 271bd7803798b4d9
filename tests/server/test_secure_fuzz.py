"""Malformed replies at every step of a secure round, as a faulty or malicious client would send
them: the real ClientApp and the real server code, over an in-process transport. The run never
crashes; each bad reply is dropped with a logged reason naming its node."""
from uuid import uuid4

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

from fedrec.client.app import make_client_app
from fedrec.server.aggregation import ServerOptimizer
from fedrec.server.app import federation_config, initial_weights
from fedrec.server.federation import FedRecStrategy, train_round
from fedrec.shared.data.pipeline import DataConfig, prepare_data
from fedrec.shared.settings import run_config_defaults
from fedrec.simulation.federated import write_store

SETTINGS = {"dim": 8, "layers": 1, "heads": 2, "max-len": 10, "dropout": 0.0, "clients-per-round": 8, "rounds": 10,
            "secure-aggregation": True, "server-optimizer": "fedavg", "server-lr": 1.0, "server-averaging": 0.0}
STEPS = ("register", "shares", "masked", "confirm", "unmask")


def _mutate_value(value, kind, rng):
    if isinstance(value, bytes):
        return {"short": value[:-3], "flip": bytes([value[0] ^ 1]) + value[1:], "random": rng.bytes(len(value)),
                "integer": 2 ** 62, "huge": value * 2000}.get(kind, value)
    if isinstance(value, list):
        return {"short": value[:-1], "flip": [v ^ 1 if isinstance(v, int) else v for v in value]}.get(kind, value)
    return value


def damage(content: RecordDict, kind: str, rng) -> RecordDict:
    """The reply, broken one way: fields missing, the wrong record type, values cut short,
    flipped, random, an integer where bytes belong (bytes(2**62) would allocate exabytes) or
    a thousandfold too long, or an array of the wrong length or type."""
    if kind == "missing":
        return RecordDict({})
    out = {}
    for name, record in content.items():
        if kind == "wrong-type":
            out[name] = MetricRecord({"x": 1.0})
        elif isinstance(record, ConfigRecord):
            out[name] = ConfigRecord({k: _mutate_value(v, kind, rng) for k, v in record.items()})
        elif isinstance(record, ArrayRecord):
            arrays = {k: a.numpy() for k, a in record.items()}
            out[name] = ArrayRecord({k: Array(a[:-3] if kind == "short" else a.astype(np.float32))
                                     for k, a in arrays.items()})
        else:
            out[name] = record
    return RecordDict(out)


class LoopbackGrid:
    """Flower's Grid interface over the real ClientApp in this process (one Context per node);
    one node's reply to one step is damaged, or sent twice."""

    def __init__(self, store, users, bad_step, kind):
        self.app = make_client_app({})
        self.contexts = {100 + i: Context(run_id=1, node_id=100 + i, node_config={"partition-id": i},
                                          state=RecordDict(), run_config={"store": str(store)}) for i in range(users)}
        self.bad_step, self.kind, self.bad_node = bad_step, kind, None
        self.rng = np.random.default_rng(0)
        self.sent: list[str] = []                     # message types, in order
        self.answered: list = []                      # replies not pulled yet

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        """Each node answers at once; `pull_messages` hands over what came back."""
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid4().hex   # as Flower's grids do on push
            ids.append(message.metadata.message_id)
            self.sent.append(message.metadata.message_type)
            node = message.metadata.dst_node_id
            reply = self.app(message, self.contexts[node])
            if message.metadata.message_type == f"train.secagg_{self.bad_step}" and self.bad_node in (None, node):
                self.bad_node = node
                if self.kind == "duplicate":
                    self.answered.append(reply)
                reply.content = damage(reply.content, self.kind, self.rng)
            self.answered.append(reply)
        return ids

    def pull_messages(self, message_ids):
        replies, self.answered = self.answered, []
        return replies


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    prepared = prepare_data(DataConfig(dataset="synthetic:12x25", text_encoder="none", activity_features=False))
    return write_store(prepared, tmp_path_factory.mktemp("store")), len(prepared.split)


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity
    for name in ("run_id", "node_id", "task_id"):
        monkeypatch.setattr(TaskIdentity, f"_{name}", 1)


@pytest.mark.parametrize("kind", ["missing", "wrong-type", "short", "flip", "random", "integer", "huge", "duplicate"])
@pytest.mark.parametrize("step", STEPS)
def test_a_malformed_reply_is_dropped_with_a_reason_and_the_run_goes_on(store, step, kind):
    store, users = store
    cfg = federation_config({**run_config_defaults(), **SETTINGS, "store": str(store)})
    start = initial_weights(store / "catalog.npz", cfg)
    strategy = FedRecStrategy(cfg, ServerOptimizer(start, cfg.server))
    grid = LoopbackGrid(store, users, step, kind)
    record = train_round(grid, strategy, 1, secure=True)        # must not raise
    assert grid.bad_node is not None
    reasons = " | ".join(record.rejected)
    assert f"node {grid.bad_node}" in reasons, reasons
    changed = any(not np.array_equal(start[k], v) for k, v in strategy.optimizer.weights().items())
    assert changed == record.trained
    # A second round with everyone honest trains: nothing is left broken.
    grid.bad_step = None
    assert train_round(grid, strategy, 2, secure=True).trained


def _strategy(store):
    cfg = federation_config({**run_config_defaults(), **SETTINGS, "store": str(store)})
    start = initial_weights(store / "catalog.npz", cfg)
    return FedRecStrategy(cfg, ServerOptimizer(start, cfg.server)), start


def test_a_sum_with_fewer_noise_shares_than_counted_on_is_never_unmasked(store):
    """Distributed DP noise: the guarantee counts on m clients' shares in every sum. With fewer
    alive, the honest server aborts before it asks anyone for an unmask share (at 4b8af3e it
    unmasked first and checked after)."""
    from fedrec.server.federation import secure_round
    store, users = store
    strategy, start = _strategy(store)
    strategy.privacy.distributed_noise, strategy.privacy.noise_shares = True, 9   # 8 clients a round
    grid = LoopbackGrid(store, users, None, None)
    outcome = secure_round(grid, strategy, 1)
    assert outcome.update is None
    assert any("fewer than the 9 whose noise shares" in r for r in outcome.record.rejected)
    assert "train.secagg_masked" in grid.sent
    assert not {"train.secagg_confirm", "train.secagg_unmask"} & set(grid.sent)


def test_a_client_that_skips_its_clip_aborts_the_round_not_the_model(store, monkeypatch):
    """A malicious client masks an update far past the clip (every coordinate 0.5, norm ~25 on
    this tiny model against a clip of 5; each coordinate inside the ring's bound, so masking hides it):
    no set of honest clients could make that mean, and the round aborts, the model untouched."""
    from fedrec.client import secure as client_secure
    store, users = store
    honest = client_secure.encode_contribution
    calls = []

    def unclipped(flat, weight, loss):
        vector = honest(flat, weight, loss)
        if not calls:
            vector[:-2], vector[-2] = 0.5, 1.0   # the largest honest weight, times an unclipped update
        calls.append(1)
        return vector

    monkeypatch.setattr(client_secure, "encode_contribution", unclipped)
    strategy, start = _strategy(store)
    record = train_round(LoopbackGrid(store, users, None, None), strategy, 1, secure=True)
    assert not record.trained and any("implausible sum" in r for r in record.rejected), record.rejected
    assert all(np.array_equal(start[k], v) for k, v in strategy.optimizer.weights().items())
