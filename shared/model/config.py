"""The model's shape: what a user chooses (`ModelHyper`) and what the data adds (`ModelConfig`).

Torch-free, so the round config (shared/protocol.py) can carry the shape without importing torch.
Defaults come from the settings table (shared/settings.py).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from fedrec.shared.settings import default


@dataclass(frozen=True)
class ModelHyper:
    """Model width etc., as chosen by the user; the catalog fills in the rest (`config`)."""
    dim: int = default("dim")
    layers: int = default("layers")
    heads: int = default("heads")
    max_len: int = default("max-len")
    dropout: float = default("dropout")
    id_buckets: int = default("id-buckets")
    id_dropout: float = default("id-dropout")
    content: bool = default("content")

    @classmethod
    def from_settings(cls, v: dict) -> "ModelHyper":
        return cls(dim=v["dim"], layers=v["layers"], heads=v["heads"], max_len=v["max-len"], dropout=v["dropout"],
                   id_buckets=v["id-buckets"], id_dropout=v["id-dropout"], content=v["content"])

    def config(self, n_items: int, content_dim: int) -> "ModelConfig":
        fields = {k: v for k, v in asdict(self).items() if k != "content"}
        return ModelConfig(n_items=n_items, content_dim=content_dim if self.content else 0, **fields)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ModelConfig:
    """Everything `RecommenderModel` needs to be built."""
    n_items: int           # catalog size, without the padding index
    content_dim: int       # width of the content feature matrix (0: no content features)
    dim: int = default("dim")
    layers: int = default("layers")
    heads: int = default("heads")
    max_len: int = default("max-len")
    dropout: float = default("dropout")
    id_buckets: int = default("id-buckets")  # rows of the ID table; a larger catalog hashes into them
    id_dropout: float = 0.0  # training only: the chance an item's ID row is left out of its vector

    def to_dict(self) -> dict:
        return asdict(self)
