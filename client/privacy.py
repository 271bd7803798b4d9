"""Record-level differential privacy on the client: DP-SGD with Opacus, and the ledger that
keeps this client's privacy spending across rounds and restarts.

A record is a chunk of up to `record_window` consecutive interactions of the user's log. Chunks
are disjoint, so each interaction is in exactly one record, and each chunk is one training
sequence on its own. One local epoch is one DP-SGD step over all of the client's chunks:
  * Opacus computes each chunk's gradient (shared.dp_grad for the item tower) and clips it
    to L2 norm `record_clip`;
  * it adds Gaussian noise of std noise_multiplier x record_clip to their sum.
One step is one Gaussian mechanism on the chunk set. Adding or removing one chunk moves the
clipped sum by at most record_clip. The ledger composes these steps over every round this
client ever trained in. The server's random choice of clients would amplify the guarantee,
but the client cannot check that choice, so the ledger does not count it.

With distributed noise (`noise_shares` m > 0, secure aggregation only) the client's DP-SGD step
adds no noise and sums its clipped chunk gradients: the delta is -lr x that sum. The caller then
adds this client's share of the noise (client/secure.py, std total / sqrt(m)) before masking,
so the server's sum of >= m contributions carries the full noise. The ledger accounts the full
noise multiplier: the guarantee is conditional on secure aggregation (docs/privacy.md). It
needs exactly one plain SGD step per round, because only then is the sum of the clients'
updates the sum of their gradients plus the sum of their noise.

The noise comes from the operating system's randomness, never from the run's seed: the server
chooses that seed, and with it the server could subtract the noise.
"""
from __future__ import annotations

import json
import os
import secrets
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from opacus.optimizers import DPOptimizer

from client.local import LocalConfig, UserLog, clip_delta, load_weights, shared_weights, zero_update
from shared.dp_grad import per_example_gradients
from shared.privacy import Event, epsilon
from shared.training import left_pad, per_example_loss
from shared.wire import Weights

# The item tower's input is item ids (data, not differentiable): Opacus's hook still fires, as
# it must, and torch warns about exactly that on every step.
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)


@dataclass(frozen=True)
class RecordPrivacy:
    """What one DP-SGD round on the client uses; sent by the server, checked by the client."""
    noise_multiplier: float
    clip: float
    window: int
    budget: float     # the client's total epsilon
    delta: float
    accountant: str = "rdp"
    noise_shares: int = 0   # m > 0: distributed noise; the caller adds this client's share


def record_chunks(history: np.ndarray, window: int) -> list[np.ndarray]:
    """The log cut into disjoint chunks of up to `window` interactions, oldest first. A
    chunk's first item is context only, so a chunk of one item has no target and is dropped."""
    chunks = [history[i:i + window] for i in range(0, len(history), window)]
    return [c for c in chunks if len(c) >= 2]


class PrivacyBudgetExceeded(RuntimeError):
    """Training once more would take this client past its epsilon budget."""


class PrivacyLedger:
    """This client's privacy spending: a JSON file beside its log, written (atomically, and
    synced to disk) before an update leaves the client. A crash after the write and before the
    send counts a round that was not used. That errs on the side of privacy."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.history: list[Event] = []
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                self.history = [tuple(e) for e in data["history"]]
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{self.path}: unreadable privacy ledger ({err}); refusing to "
                                 "guess what was spent") from None

    def spent(self, delta: float, accountant: str = "rdp") -> float:
        return epsilon(self.history, delta, accountant)

    def check(self, event: Event, budget: float, delta: float, accountant: str = "rdp") -> float:
        """The epsilon after `event`; raises PrivacyBudgetExceeded if over `budget`."""
        after = epsilon(_compose(self.history, event), delta, accountant)
        if after > budget:
            raise PrivacyBudgetExceeded(
                f"privacy budget: epsilon {after:.3f} after this round would exceed the budget "
                f"{budget:g} (delta {delta:g}; spent so far {self.spent(delta, accountant):.3f} "
                f"in {len(self.history)} rounds; ledger {self.path})")
        return after

    def record(self, event: Event) -> None:
        self.history = _compose(self.history, event)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"history": self.history, "unit": "one record (chunk of the log)",
                       "accountant_history_format": "[noise multiplier, sample rate, steps]"}, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)


def _compose(history: list[Event], event: Event) -> list[Event]:
    """History plus one event; repeats of the same (noise, rate) merge into one entry, as in
    Opacus's own accountants, so the ledger stays short."""
    noise, rate, steps = event
    if history and tuple(history[-1][:2]) == (noise, rate):
        return history[:-1] + [(noise, rate, history[-1][2] + steps)]
    return history + [(noise, rate, steps)]


def private_local_update(model, global_weights: Weights, user: UserLog, cfg: LocalConfig,
                         privacy: RecordPrivacy, ledger: PrivacyLedger,
                         rng: np.random.Generator) -> tuple[Weights, dict[str, float]]:
    """`client.local.local_update` with DP-SGD: returns (delta, metrics), metrics including
    this client's record-level epsilon after the round. Raises PrivacyBudgetExceeded (before
    touching the data) if the round would take the client past its budget."""
    if privacy.noise_multiplier < 0 or privacy.clip <= 0:
        raise ValueError("record-level DP needs a noise multiplier >= 0 and a positive clip")
    if privacy.noise_shares and (cfg.local_epochs != 1 or cfg.optimizer != "sgd"):
        raise ValueError("distributed noise needs one plain SGD step per round (local-epochs 1, "
                         f"local-optimizer sgd), not {cfg.local_epochs} x {cfg.optimizer}")
    event = (privacy.noise_multiplier, 1.0, cfg.local_epochs)   # full batch: sample rate 1
    after = ledger.check(event, privacy.budget, privacy.delta, privacy.accountant)
    load_weights(model, global_weights)
    chunks = record_chunks(user.history(cfg.train_on), privacy.window)
    if not chunks:
        return zero_update(global_weights), {"num-examples": 0.0, "train-loss": float("nan"),
                                             "record-epsilon": ledger.spent(privacy.delta, privacy.accountant)}
    inputs = left_pad([c[:-1] for c in chunks], privacy.window - 1)
    targets = left_pad([c[1:] for c in chunks], privacy.window - 1)
    base = (torch.optim.Adam(model.parameters(), lr=cfg.lr) if cfg.optimizer == "adam"
            else torch.optim.SGD(model.parameters(), lr=cfg.lr))
    noise = torch.Generator().manual_seed(secrets.randbits(63))
    # Distributed: Opacus clips and sums (batch size 1: a sum, not a mean); the noise comes later.
    local_noise, batch = (0.0, 1) if privacy.noise_shares else (privacy.noise_multiplier, len(chunks))
    with per_example_gradients(model):
        optimizer = DPOptimizer(base, noise_multiplier=local_noise, max_grad_norm=privacy.clip,
                                expected_batch_size=batch, loss_reduction="mean", generator=noise)
        model.train()
        losses = []
        for _ in range(cfg.local_epochs):
            optimizer.zero_grad(set_to_none=True)
            loss = per_example_loss(model, inputs, targets).mean()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    # Spent: written down before anything derived from the data leaves this client.
    ledger.record(event)
    trained = shared_weights(model)
    delta = clip_delta({name: trained[name] - global_weights[name] for name in trained}, cfg.clip)
    targets_count = float(sum(len(c) - 1 for c in chunks))
    return delta, {"num-examples": targets_count, "train-loss": float(np.mean(losses)),
                   "record-epsilon": after}
