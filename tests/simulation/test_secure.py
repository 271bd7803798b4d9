"""Secure aggregation inside the real Flower simulation: the same result as the plain round,
only masked vectors reach the server, dropouts are survived, too many abort the round."""
import numpy as np
import pytest
from flwr.app import ConfigRecord, Message
from flwr.serverapp import ServerApp

from fedrec.client.app import make_client_app
from fedrec.server.aggregation import ServerConfig, ServerOptimizer
from fedrec.server.app import federation_config, initial_weights
from fedrec.server.federation import FedRecStrategy, train_round, wait_for_nodes
from fedrec.shared.data.pipeline import DataConfig, prepare_data
from fedrec.shared.secagg.client import new_identity_key
from fedrec.shared.secagg.fixed_point import quantisation_error_bound
from fedrec.shared.secagg.params import SecAggParams
from fedrec.shared.settings import run_config_defaults
from fedrec.simulation.federated import simulate, write_store

DEFAULTS_CAP = ServerConfig().weight_cap

SETTINGS = {"dim": 16, "layers": 1, "heads": 2, "max-len": 10, "dropout": 0.0, "id-buckets": 4096,
            "clients-per-round": 12, "rounds": 500, "local-epochs": 1, "local-lr": 0.5, "update-clip": 5.0,
            "server-optimizer": "fedavg", "server-lr": 1.0, "server-averaging": 0.0,
            "secure-aggregation": True, "secagg-neighbours": 6, "secagg-threshold": 5, "counts-min-devices": 10}


class RecordingGrid:
    def __init__(self, grid):
        self.grid, self.replies = grid, []

    def get_node_ids(self):
        return self.grid.get_node_ids()

    def push_messages(self, messages):
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids):
        replies = list(self.grid.pull_messages(message_ids))
        self.replies.extend(replies)
        return replies


def run_in_simulation(tmp_path, body, mods=None, n_users=30, extra=None):
    prepared = prepare_data(DataConfig(dataset=f"synthetic:{n_users}x25", text_encoder="none",
                                       activity_features=False))
    store = write_store(prepared, tmp_path / "store")
    settings = {**run_config_defaults(), **SETTINGS, **(extra or {}), "store": str(store),
                "out": str(tmp_path / "out")}
    result = {}
    app = ServerApp()

    @app.main()
    def main_(grid, context):
        cfg = federation_config(settings)
        cfg.fail_on_client_error = False  # vanishing clients answer with errors here
        start = initial_weights(store / "catalog.npz", cfg)
        strategy = FedRecStrategy(cfg, ServerOptimizer(start, cfg.server))
        wait_for_nodes(grid, len(prepared.split), timeout_s=300)
        result.update(body(RecordingGrid(grid), strategy, start))

    simulate(app, make_client_app(settings, mods), len(prepared.split))
    assert result, "the ServerApp did not finish"
    return result


def _fresh(strategy, start):
    strategy.optimizer = ServerOptimizer(start, strategy.cfg.server)


def test_secure_round_equals_the_plain_round_and_server_sees_only_masked_vectors(tmp_path):
    def body(grid, strategy, start):
        _fresh(strategy, start)
        plain_record = train_round(grid, strategy, 1, secure=False)
        plain = strategy.optimizer.weights()
        first = len(grid.replies)
        _fresh(strategy, start)
        secure_record = train_round(grid, strategy, 1, secure=True)   # same round: same clients, same training
        return {"plain": plain, "secure": strategy.optimizer.weights(), "replies": grid.replies[first:],
                "plain_record": plain_record, "secure_record": secure_record}

    r = run_in_simulation(tmp_path, body)
    # Users with one item have nothing to train on: the plain server skips them, in the
    # secure sum they take part with weight 0 (the server cannot tell them apart).
    idle = sum("nothing to train on" in reason for reason in r["plain_record"].rejected)
    assert r["secure_record"].accepted == 12 and r["plain_record"].accepted == 12 - idle
    assert not r["secure_record"].rejected
    # The mean is sum(w d) / sum(w), both sums off by at most the ring's rounding bound e;
    # |d| <= clip and each weight >= 1/cap, so the mean is off by <= e (1 + clip) cap / n.
    params = SecAggParams(**r["secure_record"].metrics["secagg"])
    e = quantisation_error_bound(params, 12)
    bound = e * (1 + params.clip) * DEFAULTS_CAP / 12
    worst = max(float(np.abs(r["plain"][k] - r["secure"][k]).max()) for k in r["plain"])
    assert 0 < worst <= bound, (worst, bound)
    # Every reply the server got in the secure round: identity records (every node, once), mask
    # keys and sealed shares, one uint32 masked vector, a signature of the view, shares for
    # unmasking. No float array, no metrics, no example count.
    kinds = {}
    for reply in r["replies"]:
        kind = reply.metadata.message_type
        kinds[kind] = kinds.get(kind, 0) + 1
        assert "metrics" not in reply.content and "delta" not in reply.content
        for name, record in reply.content.items():
            if hasattr(record, "numpy") or name == "masked":
                arrays = list(record.values())
                assert [a.numpy().dtype for a in arrays] == [np.dtype(np.uint32)]
    assert kinds == {"train.secagg_register": 30, **{f"train.secagg_{s}": 12 for s in ("shares", "masked", "confirm", "unmask")}}


def _vanish(partitions, step):
    """A client mod: these partitions raise (an error reply = gone) at this secure step."""
    def mod(msg: Message, context, call_next):
        if msg.metadata.message_type == f"train.secagg_{step}" and int(context.node_config["partition-id"]) in partitions:
            raise ConnectionError("vanished")
        return call_next(msg, context)
    return mod


@pytest.mark.parametrize("gone,aborts", [(range(0, 9), False), (range(0, 24), True)])
def test_vanishing_clients_are_survived_or_abort_the_round_leaving_the_model(tmp_path, gone, aborts):
    """30% of 30 users vanish after sending their masked input and signing the view: the round
    completes (t = 21 of 30). 80% vanish: fewer shares than the threshold, the round aborts and
    the weights stay put."""
    def body(grid, strategy, start):
        strategy.cfg.clients_per_round = 30
        strategy.cfg.secure.neighbours, strategy.cfg.secure.threshold = 29, 21
        _fresh(strategy, start)
        record = train_round(grid, strategy, 1, secure=True)
        return {"record": record, "after": strategy.optimizer.weights(), "start": start}

    r = run_in_simulation(tmp_path, body, mods=[_vanish(set(gone), "unmask")])
    record = r["record"]
    unchanged = all(np.array_equal(r["after"][k], r["start"][k]) for k in r["start"])
    if aborts:
        assert record.accepted == 0 and unchanged
        assert any("round aborted" in reason for reason in record.rejected), record.rejected
    else:
        assert record.accepted == 30 and not unchanged  # their masked inputs count
        assert not any("round aborted" in reason for reason in record.rejected)


def test_a_node_that_lost_its_identity_key_sits_one_round_out_and_registers_again(tmp_path):
    """A restarted node (its state gone) cannot open shares sealed to its old key: it says so
    in the round's first step, the others finish without it, and it is registered afresh."""
    def forget(msg: Message, context, call_next):
        reply = call_next(msg, context)
        if msg.metadata.message_type == "train.secagg_register" and int(context.node_config["partition-id"]) == 0 \
                and "restarted" not in context.state:
            # Restarted after registering: a new identity key, the old one gone.
            context.state["secagg-identity"] = ConfigRecord({"private": new_identity_key()})
            context.state["restarted"] = ConfigRecord({"once": True})
        return reply

    def body(grid, strategy, start):
        strategy.cfg.clients_per_round = 30
        strategy.cfg.fail_on_client_error = True  # a restart is routine, not a client failure
        _fresh(strategy, start)
        first = train_round(grid, strategy, 1, secure=True)
        registered_after_first = len(strategy.secagg_identities)
        second = train_round(grid, strategy, 2, secure=True)
        return {"first": first, "second": second, "registered_after_first": registered_after_first,
                "registered_after_second": len(strategy.secagg_identities)}

    r = run_in_simulation(tmp_path, body, mods=[forget])
    assert r["first"].accepted == 29 and any("sits the round out" in reason for reason in r["first"].rejected)
    assert r["registered_after_first"] == 29
    assert r["second"].accepted == 30 and r["registered_after_second"] == 30


def test_secagg_bench_writes_side_by_side_rounds_and_bytes(tmp_path):
    from fedrec.simulation.bench import run_secagg_bench
    small = {k: v for k, v in SETTINGS.items() if k not in ("secagg-neighbours", "secagg-threshold")}
    report = run_secagg_bench(DataConfig(dataset="synthetic:20x25", text_encoder="none", activity_features=False),
                              tmp_path, clients_per_round=6, rounds=2, settings=small)
    assert (tmp_path / "secagg.json").exists() and "secure / plain" in (tmp_path / "secagg.md").read_text()
    assert [(r["round"], r["mode"]) for r in report["rounds"]] == [(1, "plain"), (1, "secure"), (2, "plain"), (2, "secure")]
    assert all(r["accepted"] >= 5 for r in report["rounds"])  # users with one item may sit out plain rounds
    assert report["registration_seconds"] > 0 and "register" not in report["rounds"][3]["phases"]
    # The masked vector is as large as the float32 delta; keys and shares add a little.
    assert 1.0 < report["ratio_secure_over_plain"]["bytes_up_per_client"] < 1.5


def test_the_secure_co_occurrence_sum_is_exactly_the_central_one(tmp_path):
    """The item model fused with the encoder is built from one secure sum of every device's item and
    item-pair counts: decoded, it equals X^T X over the devices' histories (never their test item)."""
    from fedrec.server.release import sum_item_counts
    from fedrec.server.secure import SecureOutcome
    from fedrec.shared.data.catalog_bundle import load_catalog

    def body(grid, strategy, start):
        n_items = load_catalog(tmp_path / "store" / "catalog.npz").n_items
        strategy.secure.register(grid, sorted(grid.get_node_ids()), SecureOutcome(None, 0))   # as round 1 does
        first = len(grid.replies)
        counts, record = sum_item_counts(grid, strategy.cfg, n_items, 1, tmp_path / "out", secure=strategy.secure)
        return {"counts": counts, "record": record, "replies": grid.replies[first:]}

    from fedrec.shared.privacy.cooccurrence import cooccurrence_from_counts
    r = run_in_simulation(tmp_path, body)
    prepared = prepare_data(DataConfig(dataset="synthetic:30x25", text_encoder="none", activity_features=False))
    X = np.zeros((30, prepared.split.n_items + 1))
    for row, user in enumerate(prepared.split.users):
        X[row, user.history_for_test] = 1.0
    assert r["record"]["accepted"] == 30
    assert np.array_equal(cooccurrence_from_counts(r["counts"], prepared.split.n_items), X.T @ X)
    # The training rounds' registrations are reused: no node is asked to register again.
    assert "train.secagg_register" not in {reply.metadata.message_type for reply in r["replies"]}
    for reply in r["replies"]:   # what reached the server: masked vectors of the 16-bit ring, never counts
        assert "counts" not in reply.content and "metrics" not in reply.content
        if reply.metadata.message_type == "train.secagg_masked":
            assert [a.numpy().dtype for a in reply.content["masked"].values()] == [np.dtype(np.uint16)]


def test_a_server_gets_no_device_s_counts_from_a_thin_sum_a_rescaled_one_or_a_second_sum(tmp_path):
    """The attacks of the session-9 review, as a malicious server would run them: a sum over 5
    devices (a device's floor is 10), a clip smaller than the counts were made for (it would tag
    each device's coordinates by its item count), and a second sum to difference with the first.
    Each aborts; the honest sum in between goes through."""
    from flwr.app import ArrayRecord

    from fedrec.server.release import ReleaseFailed, sum_item_counts
    from fedrec.server.secure import SecureRound, SecureTask
    from fedrec.shared.data.catalog_bundle import load_catalog
    from fedrec.shared.privacy.cooccurrence import COUNTS_CLIP, COUNTS_STAGE, counts_size
    from fedrec.shared.protocol import PrivacyRound, RoundConfig, pack_round_config, to_record

    def body(grid, strategy, start):
        cfg, n_items = strategy.cfg, load_catalog(tmp_path / "store" / "catalog.npz").n_items
        nodes = sorted(grid.get_node_ids())

        def crafted(round_id, chosen, clip, weighting="uniform", cap=1.0, exact=True):
            config = pack_round_config(RoundConfig(round_id, cfg.seed, cfg.local, cfg.model, PrivacyRound(),
                                                   stage=COUNTS_STAGE))
            task = SecureTask(ArrayRecord(), config, weighting, cap, clip=clip,
                              size=counts_size(n_items), exact=exact)   # no floor on the server's side
            return reused.run(grid, round_id, chosen, task)

        # One SecureRound for every sum, as a run reuses its training rounds' registrations in
        # simulation (server/app.py): the attacks meet the same identity records as the honest sum.
        reused = SecureRound(cfg.secure, cfg.timeout_s, False)

        rescaled = crafted(1, nodes, COUNTS_CLIP / 4)
        thin = crafted(2, nodes[:5], COUNTS_CLIP)
        # Weights the server sets (session-10 review): "examples" at a cap so large every other term
        # weighs ~0 would leave one device's counts as the sum; an infinite cap is malformed.
        weighed = crafted(5, nodes, COUNTS_CLIP, "examples", 1e300)
        infinite = crafted(6, nodes, COUNTS_CLIP, "examples", float("inf"))
        # The encoding is the device's to check: counts only on the exact ring, a real-valued update
        # never on it (a round mixing them across devices is refused at unmasking: the task is in the view).
        inexact = crafted(7, nodes, COUNTS_CLIP, exact=False)
        training = reused.run(grid, 8, nodes[:12], SecureTask(
            to_record(start), pack_round_config(RoundConfig(8, cfg.seed, cfg.local, cfg.model, PrivacyRound())),
            "uniform", 1.0, clip=cfg.local.clip, exact=True))
        honest = sum_item_counts(grid, cfg, n_items, 3, tmp_path / "out", secure=reused)[1]
        try:
            sum_item_counts(grid, cfg, n_items, 4, tmp_path / "out", secure=reused)
            again = None
        except ReleaseFailed as err:
            again = str(err)
        return {"rescaled": rescaled, "thin": thin, "honest": honest, "again": again, "weighed": weighed,
                "infinite": infinite, "inexact": inexact, "training": training}

    r = run_in_simulation(tmp_path, body)
    assert r["weighed"].result is None and any("uniform weights" in reason for reason in r["weighed"].reasons)
    assert r["infinite"].result is None and any("weight cap" in reason for reason in r["infinite"].reasons)
    assert r["rescaled"].result is None and any("clip" in reason for reason in r["rescaled"].reasons)
    assert r["inexact"].result is None and any("whole counts, summed exactly" in reason for reason in r["inexact"].reasons)
    assert r["training"].result is None and any("real-valued" in reason for reason in r["training"].reasons)
    # A round of 5 is refused before anything is computed (a server that declared a larger round
    # would meet the witness check at unmasking: tests/shared/test_secagg_attacks.py).
    assert r["thin"].result is None and any("needs a sum of >= 10" in reason for reason in r["thin"].reasons)
    assert r["honest"]["accepted"] == 30
    assert r["again"] is not None and "aborted" in r["again"]   # nobody gives a second time


def test_devices_that_require_dp_refuse_the_exact_counts_round(tmp_path):
    """A server that asks devices under record-level DP for exact co-occurrence counts (a round
    without DP) is refused by every device, on its own policy, before anything is computed."""
    from fedrec.server.release import ReleaseFailed, sum_item_counts
    from fedrec.shared.data.catalog_bundle import load_catalog

    def body(grid, strategy, start):
        n_items = load_catalog(tmp_path / "store" / "catalog.npz").n_items
        try:
            sum_item_counts(grid, strategy.cfg, n_items, 1, tmp_path / "out")
        except ReleaseFailed as err:
            return {"error": str(err), "replies": grid.replies}
        return {"error": None, "replies": grid.replies}

    r = run_in_simulation(tmp_path, body, extra={"privacy": "record", "record-window": 10})
    assert r["error"] is not None and "requires record-level DP" in r["error"]
    assert not any("masked" in reply.content for reply in r["replies"])   # no masked input left a device


def test_no_co_occurrence_sum_without_secure_aggregation_or_under_dp(tmp_path):
    from fedrec.server.app import fuse_item_model
    for override, why in (({"secure-aggregation": False}, "needs secure aggregation"),
                          ({"privacy": "record", "record-window": 10}, "not differentially private")):
        cfg = federation_config({**run_config_defaults(), **SETTINGS, **override})
        saved = {}
        report = fuse_item_model(None, cfg, 25, tmp_path, saved, {}, None)   # no grid: nothing may be sent
        assert report["chosen"] == "encoder alone" and why in report["why"] and "item_counts" not in saved


def test_the_blend_is_chosen_from_the_devices_securely_summed_validation_statistics(tmp_path):
    """The federated safeguard (issue 21): after the counts sum, sampled devices score every candidate
    blend on their validation item and the server sees only the sum. Decoded, the sum equals each
    device's statistics computed centrally (item models without that device's validation item); a
    second blend round and a thin one are refused, as for the counts."""
    from fedrec.server.release import ReleaseFailed, choose_blend, sum_item_counts
    from fedrec.server.secure import SecureRound, SecureTask
    from fedrec.shared.data.catalog_bundle import load_catalog
    from fedrec.shared.model.fusion import BLEND_STAGE, blends, statistics_clip, statistics_size
    from fedrec.shared.privacy.cooccurrence import counts_size
    from fedrec.shared.protocol import PrivacyRound, RoundConfig, pack_blend_request, pack_round_config, to_record

    def body(grid, strategy, start):
        cfg, n_items = strategy.cfg, load_catalog(tmp_path / "store" / "catalog.npz").n_items
        try:   # before any device gave its counts: none can take its own part out, so none answers
            choose_blend(grid, cfg, np.zeros(counts_size(n_items)), start, 9, tmp_path / "out")
            early = None
        except ReleaseFailed as err:
            early = str(err)
        counts, _ = sum_item_counts(grid, cfg, n_items, 1, tmp_path / "out")
        candidates = blends(cfg.fusion.kinds)
        config = pack_round_config(RoundConfig(2, cfg.seed, cfg.local, cfg.model, PrivacyRound(), stage=BLEND_STAGE))
        thin = SecureRound(cfg.secure, cfg.timeout_s, False).run(grid, 2, sorted(grid.get_node_ids())[:5], SecureTask(
            to_record(start), config, "uniform", 1.0, clip=statistics_clip(len(candidates)),
            size=statistics_size(len(candidates)),
            extra=pack_blend_request(counts, cfg.fusion.kinds, cfg.fusion.wire_settings())))
        chosen, report = choose_blend(grid, cfg, counts, start, 3, tmp_path / "out")
        try:
            choose_blend(grid, cfg, counts, start, 4, tmp_path / "out")
            again = None
        except ReleaseFailed as err:
            again = str(err)
        return {"counts": counts, "chosen": chosen, "report": report, "thin": thin, "again": again, "early": early,
                "replies": grid.replies, "n_items": n_items}

    r = run_in_simulation(tmp_path, body)
    assert r["thin"].result is None and any("needs a sum of >= 10" in reason for reason in r["thin"].reasons)
    assert r["again"] is not None and "aborted" in r["again"]     # nobody gives a second time
    assert r["early"] is not None and "not in this run's sum" in r["early"]
    # The same statistics computed centrally, device by device.
    from fedrec.shared.model.fusion import blend_statistics, choose_from_statistics, device_blend_ndcg
    from fedrec.shared.privacy.cooccurrence import without_own_validation
    from fedrec.shared.model.recommender import build_recommender, load_weights
    from fedrec.shared.model.training import model_scorer
    prepared = prepare_data(DataConfig(dataset="synthetic:30x25", text_encoder="none", activity_features=False))
    cfg = federation_config({**run_config_defaults(), **SETTINGS})
    catalog = load_catalog(tmp_path / "store" / "catalog.npz")
    model = build_recommender(cfg.model, catalog.n_items, catalog.content if catalog.content_dim else None)
    load_weights(model, initial_weights(tmp_path / "store" / "catalog.npz", cfg))
    per_user = np.array([device_blend_ndcg(model_scorer(model),
                                           without_own_validation(r["counts"], u.train, u.valid, r["n_items"]),
                                           u.train, u.valid, cfg.fusion.kinds, cfg.fusion)
                         for u in prepared.split.users])
    report = r["report"]
    assert report["valid_users"] == 30
    assert np.allclose(list(report["valid_ndcg@10"].values()), per_user.mean(axis=0), atol=1e-3)
    central, _ = choose_from_statistics(blends(cfg.fusion.kinds), blend_statistics(per_user), 30)
    assert report["chosen"] == r["chosen"].label == central.label
    for reply in r["replies"]:            # what reached the server: masked vectors, never a device's figures
        assert "ndcg" not in reply.content and "metrics" not in reply.content
