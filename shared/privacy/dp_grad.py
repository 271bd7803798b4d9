"""Per-example gradients of the item tower, for Opacus.

Registering `item_tower_grad_sample` makes Opacus's GradSampleModule treat `ItemTower` as
one layer. The stock rules would fail here: the tower's catalog-wide table is shared by every
example (the softmax scores all items), and the nn.Embedding rule materialises a
batch x catalog x width tensor per call.

The rule follows the chain of the table itself. For scores = states @ table.T, example b's
gradient with respect to the table is G_b = backprops_b.T @ states_b (N+1, D). It flows into
the ID table through the public item -> row map, and into the content projection through
the public content matrix. Per example this costs O(N * D * (L + D + C)), the order of one
forward pass over the catalog. The batch x vocabulary x width tensor of the ID table
(4,097 rows at most) is never built, only batch x rows x width. `tests/shared/test_dp_grad.py`
checks every per-example gradient against one backward pass per example.
"""
from __future__ import annotations

import math
import weakref
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import torch
from opacus.grad_sample import register_grad_sampler

from fedrec.shared.model.recommender import ItemTower

if TYPE_CHECKING:
    from opacus import GradSampleModule

EXAMPLES_PER_CHUNK = 8  # bounds the B x (N+1) x D intermediate on large catalogs


@register_grad_sampler(ItemTower)
def item_tower_grad_sample(layer: ItemTower, activations: list[torch.Tensor],
                           backprops: torch.Tensor) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Per-example gradients of one call of the tower: {parameter: (B, *parameter.shape)}."""
    x = activations[0]
    if x.is_floating_point():       # a scoring call: states (B, L, D) -> scores (B, L, N+1)
        return _scoring_grads(layer, x, backprops)
    return _lookup_grads(layer, x, backprops)


def _lookup_grads(layer: ItemTower, items: torch.Tensor, backprops: torch.Tensor) -> dict:
    """items (B, ...) -> vectors (B, ..., D); backprops the gradient of the vectors."""
    B, D = items.shape[0], backprops.shape[-1]
    items = items.reshape(B, -1)                                 # (B, M)
    grads = backprops.reshape(B, -1, D)                          # (B, M, D)
    rows = layer.id_rows[items]                                  # (B, M, k)
    k = rows.shape[-1]
    id_grad = torch.zeros(B, *layer.id_table.shape, dtype=grads.dtype)
    id_grad.scatter_add_(1, rows.reshape(B, -1, 1).expand(-1, -1, D),
                         grads if k == 1 else grads.repeat_interleave(k, dim=1))
    out = {layer.id_table: id_grad}
    if layer.content_dim:
        content = layer.content[items]
        out.update(_content_grads(layer, content, grads, "bmd,bmc->bdc", "bmd,bme->bde",
                                  _content_pre(layer, content)))
    return out


def _scoring_grads(layer: ItemTower, states: torch.Tensor, backprops: torch.Tensor) -> dict:
    """states (B, L, D) -> scores (B, L, N+1); backprops the gradient of the scores."""
    # The padding item's score is a constant (-inf), not a function of the table. (In place:
    # Opacus hands each rule a fresh tensor, already rescaled from the mean loss.)
    backprops[..., 0] = 0
    if layer.catalog_pass:
        content_pre = layer.catalog_pass.pop()
    else:
        content_pre = _content_pre(layer, layer.content) if layer.content_dim else None
    parts = [_scoring_chunk(layer, states[i:i + EXAMPLES_PER_CHUNK], backprops[i:i + EXAMPLES_PER_CHUNK],
                            content_pre) for i in range(0, states.shape[0], EXAMPLES_PER_CHUNK)]
    return {p: torch.cat([part[p] for part in parts]) for p in parts[0]}


def _scoring_chunk(layer: ItemTower, states: torch.Tensor, backprops: torch.Tensor,
                   content_pre: torch.Tensor | None) -> dict:
    table_grad = torch.einsum("bln,bld->bnd", backprops, states)  # (b, N+1, D): G_b
    id_grad = torch.zeros(states.shape[0], *layer.id_table.shape, dtype=states.dtype)
    for column in layer.id_rows.T:                                 # one or two hashed rows
        id_grad.index_add_(1, column, table_grad)
    out = {layer.id_table: id_grad}
    if layer.content_dim:
        out.update(_content_grads(layer, layer.content, table_grad, "bnd,nc->bdc", "bnd,ne->bde", content_pre))
    return out


def _content_pre(layer: ItemTower, content: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(content, layer.content_hidden_weight, layer.content_hidden_bias)


def _content_grads(layer: ItemTower, content: torch.Tensor, grads: torch.Tensor,
                   hidden_weight_eq: str, out_weight_eq: str, pre: torch.Tensor) -> dict:
    """Back through vectors = W2 gelu(W1 c + b1) + b2 for each example's gradient `grads`
    (B, M, D) of the vectors of content rows `content` ((B, M, C) or shared (M, C)), whose
    first-layer pre-activations are `pre`."""
    hidden = torch.nn.functional.gelu(pre)
    # d gelu(x)/dx for the exact (erf) GELU: Phi(x) + x phi(x)
    slope = 0.5 * (1 + torch.erf(pre / math.sqrt(2))) + pre * torch.exp(-0.5 * pre * pre) / math.sqrt(2 * math.pi)
    pre_grad = (grads @ layer.content_out_weight) * slope          # (B, M, D)
    return {
        layer.content_out_weight: torch.einsum(out_weight_eq, grads, hidden),
        layer.content_out_bias: grads.sum(1),
        layer.content_hidden_weight: torch.einsum(hidden_weight_eq, pre_grad, content),
        layer.content_hidden_bias: pre_grad.sum(1),
    }


_wrapped: "weakref.WeakKeyDictionary[torch.nn.Module, object]" = weakref.WeakKeyDictionary()


@contextmanager
def per_example_gradients(model: torch.nn.Module) -> Iterator["GradSampleModule"]:
    """Opacus's GradSampleModule over `model` (mean-reduced loss, batch first), active for the
    duration of the block; outside it the model computes ordinary gradients. The wrapper is
    made once per model object and its hooks switched on and off, because building it walks
    every module (5 ms a round on the ML-100K model).

    Opacus's validator refuses any trainable layer that has buffers, for fear of statistics
    like BatchNorm's that mix examples. The item tower's buffers are the public catalog (content
    features, item -> ID-row map), the same for every example, so that one refusal is waived;
    any other stays an error."""
    from opacus import GradSampleModule

    wrapped = _wrapped.get(model)
    if wrapped is None:
        errors = [e for e in GradSampleModule.validate(model, strict=False) if "ItemTower" not in str(e)]
        if errors:
            raise NotImplementedError(errors)
        wrapped = _wrapped[model] = GradSampleModule(model, loss_reduction="mean", strict=False)
    towers = [m for m in model.modules() if isinstance(m, ItemTower)]
    wrapped.enable_hooks()
    for tower in towers:
        tower.gradients_by_rule = True
    try:
        yield wrapped
    finally:
        for tower in towers:
            tower.gradients_by_rule = False
            tower.catalog_pass.clear()
        wrapped.disable_hooks()
        wrapped.zero_grad(set_to_none=True)   # drops per-example gradients with the gradients
