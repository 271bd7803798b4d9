"""Record-level differential privacy on the client: DP-SGD with Opacus, the ledger that keeps
this client's privacy spending across rounds and restarts, and the device's own privacy policy.

The device, not the server, decides how much privacy it gives up (`DevicePolicy`): its epsilon
budget and delta, the smallest record it accepts as the protected unit, and a noise floor. A
round that asks for a larger delta, a smaller record, less noise, or numbers out of range is
refused with the reason; a server's smaller budget is honoured, a larger one is capped.

A record is a chunk of up to `record_window` consecutive interactions of the user's log. Chunks
are disjoint, so each interaction is in exactly one record, and each chunk is one training
sequence on its own. One local epoch is one DP-SGD step over all of the client's chunks:
  * Opacus computes each chunk's gradient (fedrec.shared.privacy.dp_grad for the item tower) and clips it
    to L2 norm `record_clip`;
  * it adds Gaussian noise of std noise_multiplier x record_clip to their sum.
One step is one Gaussian mechanism on the chunk set: the step uses the *sum* of the clipped
gradients plus the noise (a fixed denominator: dividing by the number of chunks would release
that number). Adding or removing one chunk moves the clipped sum by at most record_clip. A log
with no chunk still takes the step (zero gradient, the same noise): an update without noise
would tell the server that this user has almost no data.
The ledger composes these steps over every round this
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
import math
import secrets
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from opacus.optimizers import DPOptimizer

from fedrec.client.local import LocalStep
from fedrec.client.store import LedgerFile, LedgerMissing
from fedrec.shared.model.training import left_pad, per_example_loss
from fedrec.shared.privacy.accounting import ACCOUNTANTS, MODES, Event, epsilon
from fedrec.shared.privacy.dp_grad import per_example_gradients
from fedrec.shared.protocol import PrivacyRound, TrainMetrics
from fedrec.shared.settings import default, distributed_record_step_problems

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


MAX_DELTA = 1e-3   # a device accepts no delta above this (a larger one is no guarantee for a user's log)


class PrivacyRefusal(RuntimeError):
    """A round this device will not train in, and why (its policy, its ledger)."""


@dataclass(frozen=True)
class DevicePolicy:
    """What this device allows whatever a server asks. From its node config (`privacy-budget`,
    `privacy-delta`, `privacy-record-window`, `privacy-min-noise`); in a simulation, where one
    person runs the server and every simulated device, from the ClientApp's settings (the same
    flags); else the shipped defaults. Never from a round's config."""
    unit: str = "none"                            # the protection it requires: none, record, user or both
    budget: float = default("target-epsilon")   # epsilon, over every round this device ever trains in
    delta: float = default("delta")
    window: int = default("record-window")       # the smallest record (interactions) it accepts as the unit
    min_noise: float = 0.0                        # the smallest noise multiplier it accepts

    NODE_KEYS = {"unit": "privacy-unit", "budget": "privacy-budget", "delta": "privacy-delta",
                 "window": "privacy-record-window", "min_noise": "privacy-min-noise"}
    SETTING_KEYS = {"unit": "privacy", "budget": "target-epsilon", "delta": "delta", "window": "record-window"}

    def __post_init__(self):
        if self.unit not in MODES:
            raise ValueError(f"privacy unit {self.unit!r}: must be none, record, user or both")
        if not self.budget > 0:   # inf is the device's own choice (no limit); a server cannot set it
            raise ValueError(f"privacy budget {self.budget!r}: must be an epsilon > 0")
        if not 0 < self.delta <= MAX_DELTA:
            raise ValueError(f"privacy delta {self.delta!r}: must be in (0, {MAX_DELTA:g}]")
        if self.window < 2 or not 0 <= self.min_noise < math.inf:
            raise ValueError(f"record window {self.window!r} must be >= 2 and minimum noise "
                             f"{self.min_noise!r} finite and >= 0")

    @classmethod
    def of(cls, node_config: dict, settings: dict) -> "DevicePolicy":
        values, where = {}, []
        for name, key in cls.NODE_KEYS.items():
            setting = cls.SETTING_KEYS.get(name)
            if key in node_config:
                values[name] = node_config[key]
                where.append(f"node config {key}")
            elif setting in settings:
                values[name] = settings[setting]
                where.append(f"setting {setting}")
        try:
            values = {name: {"window": int, "unit": str}.get(name, float)(v) for name, v in values.items()}
            return cls(**values)
        except (TypeError, ValueError) as err:
            raise ValueError(f"this device's privacy policy ({', '.join(where) or 'defaults'}): "
                             f"{err}") from None

    def record_privacy(self, p: PrivacyRound) -> "RecordPrivacy":
        """The round's record-level settings once checked against this policy; raises
        PrivacyRefusal naming what the round asks beyond it."""
        problems = self.problems(p)
        if problems:
            raise PrivacyRefusal("the round asks more than this device allows: " + "; ".join(problems))
        return RecordPrivacy(p.record_noise, p.record_clip, p.record_window, min(p.budget, self.budget),
                             p.delta, p.accountant, p.noise_shares)

    def problems(self, p: PrivacyRound) -> list[str]:
        out = []
        if p.mode not in MODES:
            return [f"privacy mode {p.mode!r} is not none, record, user or both"]
        if not all(0 <= n < math.inf for n in (p.record_noise, p.user_noise)) or p.noise_shares < 0:
            return ["noise multipliers must be finite and >= 0, noise shares >= 0"]
        if self.unit in ("record", "both") and not p.record:
            out.append("this device requires record-level DP and the round has none")
        if self.unit in ("user", "both") and not p.user:
            out.append("this device requires user-level DP and the round has none")
        if p.mode == "none":
            return out
        if not p.budget > 0:
            out.append(f"budget {p.budget!r} is not an epsilon > 0")
        if not 0 < p.delta <= self.delta:
            out.append(f"delta {p.delta!r} is outside (0, {self.delta:g}], this device's delta")
        if p.accountant not in ACCOUNTANTS:
            out.append(f"accountant {p.accountant!r} is not one of {', '.join(ACCOUNTANTS)}")
        if p.record:
            if p.record_window < self.window:
                out.append(f"a record of {p.record_window} interactions is smaller than this device's unit "
                           f"of {self.window}")
            if not 0 < p.record_clip < math.inf:
                out.append(f"record clip {p.record_clip!r} is not finite and > 0")
        noise = [n for n, on in ((p.record_noise, p.record), (p.user_noise, p.user)) if on]
        if any(not self.min_noise <= n < math.inf for n in noise):
            out.append(f"noise multiplier {min(noise)!r} is below this device's floor of {self.min_noise:g} "
                       "(or not finite)")
        return out


def record_chunks(history: np.ndarray, window: int) -> list[np.ndarray]:
    """The log cut into disjoint chunks of up to `window` interactions, oldest first. A
    chunk's first item is context only, so a chunk of one item has no target and is dropped."""
    chunks = [history[i:i + window] for i in range(0, len(history), window)]
    return [c for c in chunks if len(c) >= 2]


class PrivacyBudgetExceeded(RuntimeError):
    """Training once more would take this client past its epsilon budget."""


class PrivacyLedger:
    """This client's privacy spending, kept in a file of the device's store (client/store.py),
    written (`spend`) before the data is used. A crash after the write counts a round that was
    not used. That errs on the side of privacy."""

    def __init__(self, ledger: Path | LedgerFile | None):
        if ledger is None:
            raise PrivacyRefusal("this device's node config names no privacy ledger; refusing to spend without one")
        self.file = ledger if isinstance(ledger, LedgerFile) else LedgerFile(Path(ledger))
        self.path = self.file.path
        try:
            self.history: list[Event] = self.file.read()
        except LedgerMissing as err:
            raise PrivacyRefusal(str(err)) from None

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
        self.file.write(self.history)

    def spend(self, event: Event, budget: float, delta: float, accountant: str = "rdp") -> float:
        """Check and record `event` as one step under an exclusive lock on the ledger (re-read
        inside it), so two processes answering for one device cannot both spend the last of its
        budget. Returns the epsilon after it; raises PrivacyBudgetExceeded with nothing written."""
        with self.file.locked():
            self.history = self.file.read()
            after = self.check(event, budget, delta, accountant)
            self.record(event)
            return after


def _compose(history: list[Event], event: Event) -> list[Event]:
    """History plus one event; repeats of the same (noise, rate) merge into one entry, as in
    Opacus's own accountants, so the ledger stays short."""
    noise, rate, steps = event
    if history and tuple(history[-1][:2]) == (noise, rate):
        return history[:-1] + [(noise, rate, history[-1][2] + steps)]
    return history + [(noise, rate, steps)]


class DPStep(LocalStep):
    """The local step of fedrec.client.local.local_update, made record-level DP-SGD: examples are
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
        # Spent here, before the data is touched: a crash later counts a round that was not used.
        self.after = self.ledger.spend(self.event, p.budget, p.delta, p.accountant)

    def examples(self, history: np.ndarray, max_len: int) -> list[np.ndarray]:
        chunks = record_chunks(history, self.privacy.window)
        self.placeholder = not chunks
        # No record: one placeholder example whose loss is multiplied by 0 (zero gradient), so the
        # step is the noise alone, as it would be for any record-free log.
        return chunks or [np.resize(history if len(history) else np.ones(1, np.int64), 2)]

    @contextlib.contextmanager
    def optimizer(self, model, base: torch.optim.Optimizer,
                  examples: list[np.ndarray]) -> Iterator[torch.optim.Optimizer]:
        noise = torch.Generator().manual_seed(secrets.randbits(63))
        # Opacus clips each record's gradient and sums them (expected batch size 1: a fixed
        # denominator, not the data's record count). Distributed: the noise comes later, in shares.
        distributed = bool(self.privacy.noise_shares)
        with per_example_gradients(model):
            yield DPOptimizer(base, noise_multiplier=0.0 if distributed else self.privacy.noise_multiplier,
                              max_grad_norm=self.privacy.clip, expected_batch_size=1,
                              loss_reduction="mean", generator=noise)

    def step(self, model, optimizer: torch.optim.Optimizer, examples: list[np.ndarray],
             rng: np.random.Generator) -> float:
        inputs = left_pad([c[:-1] for c in examples], self.privacy.window - 1)
        targets = left_pad([c[1:] for c in examples], self.privacy.window - 1)
        optimizer.zero_grad(set_to_none=True)
        losses = per_example_loss(model, inputs, targets)
        # (The mean: per_example_gradients undoes it per example; the optimizer then sums.)
        (losses.mean() * (0.0 if self.placeholder else 1.0)).backward()
        optimizer.step()
        return float("nan") if self.placeholder else losses.mean().item()

    def finish(self, metrics: TrainMetrics, trained: bool) -> TrainMetrics:
        metrics.record_epsilon = self.after   # the step always runs (a record-free log: the noise alone)
        return metrics
