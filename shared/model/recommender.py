"""The recommender, top to bottom: item tower -> user interest encoder -> scorer.

  ItemTower     item index -> vector. A collaborative ID embedding plus a projection of the
                item's content features, so an item nobody has touched (ID row untrained) is
                still placed by what it is. The ID table has at most `id_buckets` rows: a
                larger catalog shares rows by two fixed hashes (Svenstrup et al., NeurIPS 2017
                "hash embeddings", Weinberger et al. 2009), so the shared weights, and with them
                a federated client's upload, stay bounded however large the catalog grows.
  UserEncoder   a user's recent items -> interest vector at every position: SASRec-style causal
                self-attention (Kang & McAuley, ICDM 2018), built only from nn.Embedding,
                nn.Linear and nn.LayerNorm, the layers Opacus computes per-example gradients for
                (nn.MultiheadAttention is not one of them).
  RecommenderModel   score(user, item) = <user vector, item vector>, over the whole catalog.

A user's representation is computed from their own history every time: the model holds no
per-user parameter, so a server never needs (or sees) one.

Shapes: B batch, L sequence length, D model width, N items (index 0 pads).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedrec.shared.model.config import ModelConfig, ModelHyper

if TYPE_CHECKING:  # the wire format's names only: the model itself needs no Flower
    from fedrec.shared.protocol import Layout, Weights


def id_rows(n_items: int, buckets: int) -> torch.Tensor:
    """(N+1, k) ID-table rows of each item index; row 0 is padding.

    k = 1 and the identity when the catalog fits; otherwise k = 2 rows from two independent
    hashes (splitmix64's finaliser with two seeds), so two items rarely share both rows and
    the content projection tells the rest apart. Public and deterministic: every client and
    the server derive the same map from (n_items, buckets)."""
    items = np.arange(n_items + 1, dtype=np.uint64)
    if n_items <= buckets:
        return torch.from_numpy(items.astype(np.int64))[:, None]
    rows = np.stack([_splitmix64(items, seed) % np.uint64(buckets) + np.uint64(1) for seed in (1, 2)], axis=1)
    rows[0] = 0
    return torch.from_numpy(rows.astype(np.int64))


def _splitmix64(x: np.ndarray, seed: int) -> np.ndarray:
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
        x = x + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


class ItemTower(nn.Module):
    """Item vectors: a row (or two hashed rows) of the ID table plus a two-layer projection of
    the item's public content features.

    Its parameters are its own (no child modules), so that Opacus treats it as one layer with
    one per-example gradient rule (`fedrec.shared.privacy.dp_grad`): the catalog-wide table is used at every
    position, on the input side and in the softmax, and the stock per-layer rules would
    materialise a batch x catalog x width gradient or refuse the shared use outright.

    Called with a long tensor of items it returns their vectors; called with float user
    states (B, L, D) it returns their scores over the whole catalog (B, L, N+1)."""

    def __init__(self, cfg: ModelConfig, content: torch.Tensor | None):
        super().__init__()
        self.n_items = cfg.n_items
        self.register_buffer("id_rows", id_rows(cfg.n_items, cfg.id_buckets), persistent=False)
        self.id_table = nn.Parameter(torch.randn(min(cfg.n_items, cfg.id_buckets) + 1, cfg.dim) * 0.02)
        with torch.no_grad():
            self.id_table[0].zero_()
        self.content_dim = cfg.content_dim
        self.id_dropout = cfg.id_dropout
        self.catalog_pass: list[torch.Tensor | None] = []
        if cfg.content_dim > 0:
            # Public catalog data, not learned: a buffer travels with the model, never in updates.
            self.register_buffer("content", content.float(), persistent=False)  # (N+1, C)
            self.content_hidden_weight, self.content_hidden_bias = _linear_parameters(cfg.content_dim, cfg.dim)
            self.content_out_weight, self.content_out_bias = _linear_parameters(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """items (...,) long -> (..., D) vectors;  states (B, L, D) float -> (B, L, N+1) scores,
        the padding item at -inf."""
        if self.gradients_by_rule:
            return self._forward_for_rule(x)
        if not x.is_floating_point():
            return self.vectors(x)
        scores = x @ self.all_items().T
        scores[..., 0] = float("-inf")
        return scores

    # Set while Opacus computes per-example gradients (shared.dp_grad.per_example_gradients):
    # the registered rule then yields every parameter gradient, so autograd is spared the
    # catalog-wide parameter backward that the optimizer would never read.
    gradients_by_rule = False

    def _forward_for_rule(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            with torch.no_grad():
                vectors = self.vectors(x)
            return _AttachToParameters.apply(vectors, self.id_table)
        with torch.no_grad():
            pre = (F.linear(self.content, self.content_hidden_weight, self.content_hidden_bias)
                   if self.content_dim else None)
            table = self._table_from(pre)
            self.catalog_pass.append(pre)   # the rule reuses it instead of recomputing
        scores = x @ table.T                # gradient flows to the states only
        scores[..., 0] = float("-inf")
        return scores

    def _table_from(self, content_pre: torch.Tensor | None) -> torch.Tensor:
        table = self.id_table[self.id_rows].sum(-2)
        if content_pre is not None:
            table = table + F.linear(F.gelu(content_pre), self.content_out_weight, self.content_out_bias)
        return table

    def vectors(self, items: torch.Tensor) -> torch.Tensor:
        vectors = self.id_table[self.id_rows[items]].sum(-2)
        if self.training and self.id_dropout > 0 and self.content_dim and not self.gradients_by_rule:
            # An item whose ID row is left out is placed by its content alone, as a new item is.
            kept = torch.rand(self.n_items + 1, device=vectors.device) >= self.id_dropout
            # Inverted dropout: kept rows scaled up, so evaluation (every row kept) sees the expected value.
            vectors = vectors * (kept[items].unsqueeze(-1) / (1.0 - self.id_dropout))
        if self.content_dim:
            vectors = vectors + self.content_vectors(self.content[items])
        return vectors

    def content_vectors(self, content: torch.Tensor) -> torch.Tensor:
        hidden = F.gelu(F.linear(content, self.content_hidden_weight, self.content_hidden_bias))
        return F.linear(hidden, self.content_out_weight, self.content_out_bias)

    def all_items(self) -> torch.Tensor:
        """(N+1, D): every catalog item, row 0 the padding item."""
        return self.vectors(torch.arange(self.n_items + 1, device=self.id_rows.device))


class _AttachToParameters(torch.autograd.Function):
    """Identity on values computed without autograd, made part of the graph (through a
    parameter) so the module's backward hook sees their gradient; passes no gradient on."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, parameter: torch.Tensor) -> torch.Tensor:
        return values.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, None


def _linear_parameters(fan_in: int, fan_out: int) -> tuple[nn.Parameter, nn.Parameter]:
    """nn.Linear's default initialisation, as bare parameters."""
    bound = 1 / fan_in ** 0.5
    return (nn.Parameter(torch.empty(fan_out, fan_in).uniform_(-bound, bound)),
            nn.Parameter(torch.empty(fan_out).uniform_(-bound, bound)))


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t sees positions <= t that are not padding."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        assert dim % heads == 0, "dim must be a multiple of heads"
        self.heads = heads
        self.query, self.key, self.value = (nn.Linear(dim, dim) for _ in range(3))
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """x (B, L, D); allowed (B, 1, L, L) bool, True where query t may attend to key s."""
        B, L, D = x.shape
        split = lambda t: t.view(B, L, self.heads, D // self.heads).transpose(1, 2)  # (B, H, L, D/H)
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        # No dropout on the attention weights: on CPU it cost a third of training time
        # (a B x H x L x L mask per layer) for no measured gain; residual dropout remains.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.out(y.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then x + feed_forward(norm(x))."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = CausalSelfAttention(dim, heads)
        self.feed_forward_norm = nn.LayerNorm(dim)
        # Dropout only on the residual branches: masks on the 4D-wide hidden layer were most
        # of the random-number cost on CPU.
        self.feed_forward = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.attention_norm(x), allowed))
        return x + self.dropout(self.feed_forward(self.feed_forward_norm(x)))


class UserEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.position = nn.Embedding(cfg.max_len, cfg.dim)
        self.input_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.dropout) for _ in range(cfg.layers))
        self.final_norm = nn.LayerNorm(cfg.dim)

    def forward(self, item_vectors: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """item_vectors (B, L, D) of the left-padded history `items` (B, L) -> (B, L, D):
        the user's interest after each position."""
        B, L = items.shape
        real = items != 0                                                     # (B, L)
        causal = torch.ones(L, L, dtype=torch.bool, device=items.device).tril()
        # A padded query would see no key at all (NaN softmax): let every position see itself.
        allowed = (causal & real[:, None, :]) | torch.eye(L, dtype=torch.bool, device=items.device)
        # Positions count back from the newest item, so "most recent" always has index 0.
        positions = (L - 1 - torch.arange(L, device=items.device)).expand(B, L)
        x = self.input_dropout(item_vectors + self.position(positions)) * real[..., None]
        for block in self.blocks:
            x = block(x, allowed[:, None])
        return self.final_norm(x)


class RecommenderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, content: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        self.item_tower = ItemTower(cfg, content)
        self.user_encoder = UserEncoder(cfg)

    def user_states(self, items: torch.Tensor, item_table: torch.Tensor | None = None) -> torch.Tensor:
        """items (B, L) left-padded histories -> (B, L, D) interest after each position.
        `item_table` (N+1, D) is `item_tower.all_items()` when the caller already has it."""
        vectors = item_table[items] if item_table is not None else self.item_tower(items)
        return self.user_encoder(vectors, items)

    def user_vector(self, items: torch.Tensor) -> torch.Tensor:
        """items (B, L) left-padded histories -> (B, D): interest after the newest item."""
        return self.user_states(items)[:, -1]

    def score_all(self, user_vectors: torch.Tensor, item_table: torch.Tensor | None = None) -> torch.Tensor:
        """(..., D) -> (..., N+1) scores over the whole catalog; the padding item scores -inf."""
        table = item_table if item_table is not None else self.item_tower.all_items()
        scores = user_vectors @ table.T
        scores[..., 0] = float("-inf")
        return scores



def build_recommender(hyper: ModelHyper, n_items: int, content: np.ndarray | None) -> RecommenderModel:
    """The model for a catalog of `n_items` with its (N+1, C) content matrix (None: no content)."""
    content = content if hyper.content and content is not None and content.shape[1] else None
    cfg = hyper.config(n_items, content.shape[1] if content is not None else 0)
    return RecommenderModel(cfg, torch.from_numpy(content) if content is not None else None)


# ---------------------------------------------------------------- the weights the federation shares

def shared_weights(model: RecommenderModel) -> Weights:
    """The weights every client trains and the server aggregates: all trainable parameters.
    Buffers (content features, ID hashing) are public catalog data and never travel."""
    return {name: p.detach().cpu().numpy().copy() for name, p in model.named_parameters()}


def model_layout(model: RecommenderModel) -> Layout:
    """Names and shapes of the shared weights, in wire order (fedrec.shared.protocol)."""
    return {name: tuple(p.shape) for name, p in sorted(model.named_parameters())}


def load_weights(model: RecommenderModel, weights: Weights) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(torch.from_numpy(np.asarray(value)))
