"""The model's contract: shapes, causality, padding, cold items, Opacus compatibility."""
import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator

from fedrec.shared.model.config import ModelConfig

from fedrec.shared.model.recommender import RecommenderModel
from fedrec.shared.model.training import left_pad, next_item_loss

N_ITEMS, CONTENT = 30, 8


def model(dropout=0.0, content=True):
    torch.manual_seed(0)
    cfg = ModelConfig(n_items=N_ITEMS, content_dim=CONTENT if content else 0, dim=16, layers=2,
                      heads=2, max_len=12, dropout=dropout)
    features = torch.randn(N_ITEMS + 1, CONTENT)
    features[0] = 0
    return RecommenderModel(cfg, features if content else None).eval()


def test_shapes_and_padding_scores_minus_inf():
    m = model()
    items = left_pad([np.array([1, 2, 3]), np.array([4])], 12)
    states = m.user_states(items)
    assert states.shape == (2, 12, 16)
    scores = m.score_all(m.user_vector(items))
    assert scores.shape == (2, N_ITEMS + 1) and torch.isinf(scores[:, 0]).all()
    assert torch.isfinite(states).all()                     # fully padded rows stay finite


def test_causal_a_later_item_does_not_change_earlier_states():
    m = model()
    a = m.user_states(left_pad([np.array([1, 2, 3, 4])], 12))
    b = m.user_states(left_pad([np.array([1, 2, 3, 9])], 12))
    assert torch.allclose(a[0, -2], b[0, -2], atol=1e-6)      # state after item 3 is the same
    assert not torch.allclose(a[0, -1], b[0, -1])


def test_more_left_padding_does_not_change_the_user_vector():
    m = model()
    history = np.array([5, 6, 7])
    wide, narrow = left_pad([history], 12), left_pad([history], 4)   # 9 vs 1 padding slots
    assert torch.allclose(m.user_vector(wide), m.user_vector(narrow), atol=1e-6)


def test_cold_item_is_represented_by_its_content():
    m = model()
    items = m.item_tower.all_items()
    with torch.no_grad():
        m.item_tower.id_table.zero_()             # no collaborative signal at all
    content_only = m.item_tower.all_items()
    assert content_only[1:].norm(dim=1).min() > 0            # every item still has a vector
    assert not torch.allclose(content_only[1], content_only[2])
    assert items.shape == content_only.shape


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # inputs are data, not parameters
def test_encoder_uses_only_layers_opacus_supports_with_per_example_gradients():
    m = model(content=False).train()
    assert ModuleValidator.validate(m.user_encoder, strict=False) == []
    # Per-example gradients for the encoder: the user's history goes in, a per-example loss out.
    encoder = GradSampleModule(m.user_encoder)
    items = left_pad([np.array([1, 2, 3]), np.array([4, 5]), np.array([6, 7, 8, 9])], 12)
    vectors = m.item_tower(items).detach()
    states = encoder(vectors, items)
    states[:, -1].pow(2).sum().backward()
    for name, p in encoder.named_parameters():
        assert p.grad_sample is not None and p.grad_sample.shape[0] == 3, name


def test_one_training_step_lowers_the_loss_on_a_fixed_batch():
    m = model().train()
    inputs = left_pad([np.array([1, 2, 3, 4]), np.array([5, 6, 7])], 12)
    targets = left_pad([np.array([2, 3, 4, 5]), np.array([6, 7, 8])], 12)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    before = next_item_loss(m, inputs, targets).item()
    for _ in range(20):
        opt.zero_grad()
        next_item_loss(m, inputs, targets).backward()
        opt.step()
    assert next_item_loss(m, inputs, targets).item() < before - 0.5


def test_id_table_is_bounded_and_hashing_is_deterministic():
    from fedrec.shared.model.recommender import id_rows
    small = id_rows(10, 16)
    assert small.shape == (11, 1) and small[:, 0].tolist() == list(range(11))
    big = id_rows(1000, 256)
    assert big.shape == (1001, 2) and big[0].tolist() == [0, 0]
    assert 1 <= int(big[1:].min()) and int(big.max()) <= 256
    assert torch.equal(big, id_rows(1000, 256))
    # Independent hashes: 1000 items in 256^2 pairs collide about as often as random pairs
    # would (birthday bound: ~998 distinct); correlated hashes would give at most 256.
    assert len({tuple(r) for r in big[1:].tolist()}) > 0.98 * 1000
    m = RecommenderModel(ModelConfig(n_items=1000, content_dim=0, dim=8, layers=1, heads=2, max_len=5,
                                id_buckets=64))
    assert m.item_tower.id_table.shape[0] == 65
    assert m.item_tower.all_items().shape == (1001, 8)
