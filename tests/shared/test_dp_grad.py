"""Opacus per-example gradients of the whole model, item tower included (fedrec.shared.privacy.dp_grad),
against one plain backward pass per example."""
import numpy as np
import pytest
import torch

from fedrec.shared.privacy.dp_grad import per_example_gradients
from fedrec.shared.model.config import ModelConfig
from fedrec.shared.model.recommender import RecommenderModel
from fedrec.shared.model.training import left_pad, per_example_loss


def recommender(n_items: int, buckets: int, content_dim: int) -> RecommenderModel:
    torch.manual_seed(0)
    cfg = ModelConfig(n_items=n_items, content_dim=content_dim, dim=8, layers=1, heads=2,
                      max_len=10, dropout=0.0, id_buckets=buckets)
    content = torch.randn(n_items + 1, content_dim) if content_dim else None
    return RecommenderModel(cfg, content).double()


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # item ids are data, not parameters
@pytest.mark.parametrize("n_items,buckets,content_dim", [(40, 64, 5), (300, 32, 6), (25, 64, 0)],
                         ids=["one-row-per-item", "hashed-rows", "no-content"])
def test_per_example_gradients_match_one_backward_per_example(n_items, buckets, content_dim):
    model = recommender(n_items, buckets, content_dim)
    rng = np.random.default_rng(1)
    sequences = [rng.integers(1, n_items + 1, size=n) for n in (7, 4, 9)]
    inputs = left_pad([s[:-1] for s in sequences], 8)
    targets = left_pad([s[1:] for s in sequences], 8)

    with per_example_gradients(model) as wrapped:
        per_example_loss(model, inputs, targets).mean().backward()
        per_example = {name: p.grad_sample.clone() for name, p in model.named_parameters()}
        wrapped.zero_grad(set_to_none=True)

    # Brute force, by plain autograd (the rule is off outside the block): one backward per example.
    names = dict(model.named_parameters())
    assert set(per_example) == set(names)
    for b in range(len(sequences)):
        model.zero_grad(set_to_none=True)
        per_example_loss(model, inputs[b:b + 1], targets[b:b + 1]).sum().backward()
        for name, p in names.items():
            expected = p.grad if p.grad is not None else torch.zeros_like(p)
            assert torch.allclose(per_example[name][b], expected, atol=1e-10), (name, b)
    # The norms DP-SGD clips are those of the brute-force gradients, and they differ by example.
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in per_example.values()]).norm(dim=0)
    assert norms.min() > 0 and not torch.allclose(norms[0], norms[1])
