"""Record-level differential privacy on the client: DP-SGD with Opacus, and the ledger that
keeps this client's privacy spending across rounds and restarts.

A record is a chunk of up to `record_window` consecutive interactions of the user's log. Chunks
are disjoint, so each interaction is in exactly one record, and each chunk is one training
sequence on its own. One local epoch is one DP-SGD step over all of the client's chunks:
  * Opacus computes each chunk's gradient (shared.privacy.dp_grad for the item tower) and clips it
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

import contextlib
import secrets
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from opacus.optimizers import DPOptimizer

from client.local import LocalStep
from client.store import read_ledger, write_ledger
from shared.model.training import left_pad, per_example_loss
from shared.privacy.accounting import Event, epsilon
from shared.privacy.dp_grad import per_example_gradients
from shared.protocol import TrainMetrics
from shared.settings import distributed_record_step_problems

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
    """This client's privacy spending, kept in a file of the device's store (client/store.py),
    written before an update leaves the client. A crash after the write and before the send
    counts a round that was not used. That errs on the side of privacy."""

    UNIT = "one record (chunk of the log)"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.history: list[Event] = read_ledger(self.path)

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
        write_ledger(self.path, self.history, self.UNIT)


def _compose(history: list[Event], event: Event) -> list[Event]:
    """History plus one event; repeats of the same (noise, rate) merge into one entry, as in
    Opacus's own accountants, so the ledger stays short."""
    noise, rate, steps = event
    if history and tuple(history[-1][:2]) == (noise, rate):
        return history[:-1] + [(noise, rate, history[-1][2] + steps)]
    return history + [(noise, rate, steps)]


class DPStep(LocalStep):
    """The local step of client.local.local_update, made record-level DP-SGD: examples are
    the log's disjoint records, Opacus clips each record's gradient and adds the noise, and
    the ledger is checked before the data is touched and written before anything leaves."""

    def __init__(self, privacy: RecordPrivacy, ledger: PrivacyLedger, local_epochs: int, optimizer: str):
        if privacy.noise_multiplier < 0 or privacy.clip <= 0:
            raise ValueError("record-level DP needs a noise multiplier >= 0 and a positive clip")
        if privacy.noise_shares:
            # The server said so too, but a client cannot trust it: the rule is checked here again.
            problems = distributed_record_step_problems(local_epochs, optimizer)
            if problems:
                raise ValueError(problems[0])
        self.privacy, self.ledger = privacy, ledger
        self.event: Event = (privacy.noise_multiplier, 1.0, local_epochs)   # full batch: sample rate 1
        self.after = 0.0

    def begin(self) -> None:
        p = self.privacy
        self.after = self.ledger.check(self.event, p.budget, p.delta, p.accountant)

    def examples(self, history: np.ndarray, max_len: int) -> list[np.ndarray]:
        return record_chunks(history, self.privacy.window)

    @contextlib.contextmanager
    def optimizer(self, model, base: torch.optim.Optimizer,
                  examples: list[np.ndarray]) -> Iterator[torch.optim.Optimizer]:
        noise = torch.Generator().manual_seed(secrets.randbits(63))
        # Distributed: Opacus clips and sums (batch size 1: a sum, not a mean); the noise comes later.
        distributed = bool(self.privacy.noise_shares)
        with per_example_gradients(model):
            yield DPOptimizer(base, noise_multiplier=0.0 if distributed else self.privacy.noise_multiplier,
                              max_grad_norm=self.privacy.clip, expected_batch_size=1 if distributed else len(examples),
                              loss_reduction="mean", generator=noise)

    def step(self, model, optimizer: torch.optim.Optimizer, examples: list[np.ndarray],
             rng: np.random.Generator) -> float:
        inputs = left_pad([c[:-1] for c in examples], self.privacy.window - 1)
        targets = left_pad([c[1:] for c in examples], self.privacy.window - 1)
        optimizer.zero_grad(set_to_none=True)
        loss = per_example_loss(model, inputs, targets).mean()
        loss.backward()
        optimizer.step()
        return loss.item()

    def finish(self, metrics: TrainMetrics, trained: bool) -> TrainMetrics:
        if trained:
            self.ledger.record(self.event)   # spent: written down before anything derived from the data leaves
            metrics.record_epsilon = self.after
        else:
            metrics.record_epsilon = self.ledger.spent(self.privacy.delta, self.privacy.accountant)
        return metrics
