"""FedRecStrategy's messages: who is sampled and what they are told."""
import numpy as np

from fedrec.server.aggregation import ServerConfig, ServerOptimizer
from fedrec.server.federation import FederationConfig, FedRecStrategy


class Nodes:
    """Just the node list of a Grid: sampling needs nothing else."""

    def __init__(self, ids):
        self.ids = ids

    def get_node_ids(self):
        return self.ids


def strategy(**kw):
    cfg = FederationConfig(rounds=10, clients_per_round=3, **kw)
    return FedRecStrategy(cfg, ServerOptimizer({"w": np.zeros(2, np.float32)}, ServerConfig()))


def test_sampling_is_reproducible_per_round_and_handles_64_bit_node_ids():
    ids = [2**63 + 5, 17, 2**64 - 1, 3, 2**40]
    s = strategy()
    first = s.sample(Nodes(ids), 4, 3, 0)
    assert first == s.sample(Nodes(ids), 4, 3, 0) and first != s.sample(Nodes(ids), 5, 3, 0)
    assert len(set(first)) == 3 and set(first) <= set(ids)


def test_clients_train_on_their_validation_item_only_in_the_refit_rounds():
    s = strategy(refit_fraction=0.2)
    told = {r: s.round_config(r)["train-on"] for r in (1, 8, 9, 10)}
    assert told == {1: "valid", 8: "valid", 9: "test", 10: "test"}


def test_the_server_refuses_distributed_noise_that_its_guarantee_does_not_cover():
    import pytest
    from fedrec.server.app import federation_config
    base = {"privacy": "record", "distributed-noise": True}
    federation_config(base)
    for extra, message in [({"secure-aggregation": False}, "needs secure aggregation"),
                           ({"local-epochs": 2}, "local-epochs 1"),
                           ({"local-optimizer": "adam"}, "local-optimizer sgd"),
                           ({"privacy": "none"}, "needs --privacy record, user or both")]:
        with pytest.raises(ValueError, match=message):
            federation_config({**base, **extra})


def test_distributed_user_noise_is_left_to_the_clients_and_divided_by_the_expected_count():
    from fedrec.shared.privacy.accounting import PrivacyConfig
    s = strategy(privacy=PrivacyConfig(mode="user", distributed_noise=True))
    s.resolve(Nodes(list(range(30))))
    assert s.privacy.user_noise > 0 and s.privacy.noise_shares >= 1
    total = np.full(4, 6.0)
    assert np.allclose(s.average(total, 3.0), 6.0 / (s.privacy.user_sample_rate * 30))
