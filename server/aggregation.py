"""Server-side aggregation: plain functions, no Flower.

Clients answer with a weight change (delta) and a weight (their number of training targets).
The server
  1. checks every reply and drops bad ones with a reason (missing or extra keys, wrong
     shapes or dtypes, NaN or Inf, a non-positive or absurd weight),
  2. averages the surviving deltas,
  3. applies the average as a pseudo-gradient (-delta) with a torch optimizer: SGD with
     lr 1 is FedAvg (McMahan et al. 2017); Adam is FedAdam (Reddi et al., ICLR 2021). The
     optimizer's state is a torch state_dict, so a checkpoint holds all of it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from fedrec.shared.protocol import Weights, client_weight
from fedrec.shared.settings import default



@dataclass
class ServerConfig:
    optimizer: str = default("server-optimizer")  # "fedavg" | "fedavgm" | "fedadam"
    lr: float = default("server-lr")  # server learning rate (1.0 with fedavg = plain averaging)
    momentum: float = 0.9       # fedavgm only
    betas: tuple[float, float] = (0.9, 0.99)  # fedadam only
    eps: float = default("server-eps")  # fedadam's tau (adaptivity; Reddi et al. tune it per task)
    weighting: str = default("weighting")  # "examples": by training targets; "uniform": one vote per user
    max_examples: float = 10_000.0  # a claimed weight above this is rejected as absurd
    weight_cap: float = 1_000.0  # "examples" weighting counts at most this many per client,
                                 # so no single user dominates a round (also bounds secure sums)
    averaging: float = default("server-averaging")  # >0: also keep an exponential average of the global weights over
                                # rounds (this decay); it is what gets evaluated and shipped

    def to_dict(self) -> dict:
        return asdict(self)


def check_update(delta: Weights, num_examples: float, expected: dict[str, tuple[int, ...]],
                 cfg: ServerConfig) -> str | None:
    """None if the reply can be aggregated, else the reason it cannot."""
    missing = sorted(set(expected) - set(delta))
    if missing:
        return f"missing arrays {missing[:3]}{'...' if len(missing) > 3 else ''}"
    extra = sorted(set(delta) - set(expected))
    if extra:
        return f"unexpected arrays {extra[:3]}{'...' if len(extra) > 3 else ''}"
    for name, shape in expected.items():
        value = delta[name]
        if tuple(value.shape) != tuple(shape):
            return f"{name}: shape {tuple(value.shape)}, expected {tuple(shape)}"
        if not np.issubdtype(value.dtype, np.floating):
            return f"{name}: dtype {value.dtype}, expected a float array"
        if not np.isfinite(value).all():
            return f"{name}: contains NaN or Inf"
    if num_examples == 0:
        return "the client had nothing to train on (num-examples 0)"
    if not np.isfinite(num_examples) or not 0 < num_examples <= cfg.max_examples:
        return f"num-examples {num_examples} outside (0, {cfg.max_examples:g}]"
    return None


def mean_delta(deltas: list[Weights], num_examples: list[float], weighting: str,
               cap: float = float("inf")) -> Weights:
    """Weighted mean of the deltas (float64 accumulation)."""
    w = np.asarray([client_weight(n, weighting, cap) for n in num_examples], dtype=np.float64)
    w = w / w.sum()
    return {name: sum(wi * d[name].astype(np.float64) for wi, d in zip(w, deltas)).astype(np.float32)
            for name in deltas[0]}


def dp_mean(total: np.ndarray, expected_count: float, noise_multiplier: float, clip: float,
            rng: np.random.Generator) -> np.ndarray:
    """User-level DP average (DP-FedAvg, McMahan et al., ICLR 2018): the sum of the clients'
    clipped updates plus Gaussian noise of std noise_multiplier x clip, divided by the
    *expected* number of clients. A data-independent denominator, so adding or removing one
    user moves the result by at most clip / expected_count before the noise."""
    noise = rng.normal(0.0, noise_multiplier * clip, size=total.shape) if noise_multiplier > 0 else 0.0
    return ((total.astype(np.float64) + noise) / expected_count).astype(np.float32)


class ServerOptimizer:
    """Global weights plus the optimizer that moves them by the clients' mean delta."""

    def __init__(self, weights: Weights, cfg: ServerConfig):
        self.cfg = cfg
        self.params = {n: torch.nn.Parameter(torch.from_numpy(np.array(v, dtype=np.float32)))
                       for n, v in weights.items()}
        plist = list(self.params.values())
        if cfg.optimizer == "fedavg":
            self.optimizer = torch.optim.SGD(plist, lr=cfg.lr)
        elif cfg.optimizer == "fedavgm":
            self.optimizer = torch.optim.SGD(plist, lr=cfg.lr, momentum=cfg.momentum)
        elif cfg.optimizer == "fedadam":
            self.optimizer = torch.optim.Adam(plist, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
        else:
            raise ValueError(f"unknown server optimizer {cfg.optimizer!r}: use fedavg, fedavgm or fedadam")
        if not 0 <= cfg.averaging < 1:
            raise ValueError(f"averaging must be in [0, 1), not {cfg.averaging}")
        # Polyak-style averaging of the iterates: the last weights of a FedAdam run jump around
        # by one noisy step per round; their average over ~1/(1 - decay) rounds does not.
        self.average = {n: p.detach().clone() for n, p in self.params.items()}

    def weights(self) -> Weights:
        """The weights clients train from."""
        return {n: p.detach().numpy().copy() for n, p in self.params.items()}

    def model_weights(self) -> Weights:
        """The weights to evaluate and ship: the running average, or the last ones if off."""
        if not self.cfg.averaging:
            return self.weights()
        return {n: a.numpy().copy() for n, a in self.average.items()}

    def step(self, delta: Weights) -> None:
        """Move the global weights by `delta` (the clients' mean change), through the optimizer."""
        for name, p in self.params.items():
            p.grad = -torch.from_numpy(np.asarray(delta[name], dtype=np.float32))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, p in self.params.items():
                self.average[name].lerp_(p.detach(), 1 - self.cfg.averaging)

    def state_dict(self) -> dict:
        return {"weights": {n: p.detach().clone() for n, p in self.params.items()},
                "average": {n: a.clone() for n, a in self.average.items()},
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(state["weights"][n])
                self.average[n].copy_(state["average"][n])
        self.optimizer.load_state_dict(state["optimizer"])
