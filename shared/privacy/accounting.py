"""Differential privacy settings and accounting: plain functions over Opacus's accountants.

Two units of protection (docs/privacy.md says what each protects and against whom):
  record  one record of one user's log, a chunk of up to `record_window` consecutive
          interactions (so every single interaction). DP-SGD on the client (client/privacy.py):
          each chunk's gradient clipped to `record_clip`, Gaussian noise on their sum, one
          full-batch step per local epoch. Each client accounts its own steps in a persistent
          ledger. The server's sampling of clients is not counted as amplification, because a
          client cannot check it.
  user    one user's whole contribution. Each sampled client's update is clipped to
          `user_clip`. The server samples each client independently with probability q
          (Poisson), adds Gaussian noise to the sum and divides by the expected count
          (McMahan et al., ICLR 2018, "DP-FedAvg"). Accounted over the rounds with sampling
          rate q.

Distributed noise (`distributed_noise`, needs secure aggregation): instead of the client (record)
or the server (user) adding the whole noise, each sampled client adds an independent share of
std total / sqrt(m) to its already clipped contribution, and only the securely aggregated sum of
at least m contributions is ever seen. The sum then carries at least the full noise. The
guarantee is conditional: it holds against the server and anyone else as long as secure
aggregation holds (docs/threat-model.md) and at least m clients' noise is in every applied sum
(the server discards a round with fewer). m = `noise_shares`, sized so that the round survives
`dropout` of its clients. A client's noise share alone protects it only weakly.

Noise multipliers come from the target epsilon by Opacus's `get_noise_multiplier`. Epsilons
come from its RDP accountant (default) or PRV accountant. tests/shared/test_privacy.py checks
them against Google's dp-accounting.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from fedrec.shared.settings import PrivacyUnits, default

MODES = ("none", "record", "user", "both")
ACCOUNTANTS = {"rdp": RDPAccountant, "prv": PRVAccountant}
# One accountant event: (noise multiplier, sampling rate, number of steps), Opacus's history format.
Event = tuple[float, float, int]


@dataclass
class PrivacyConfig(PrivacyUnits):
    mode: str = default("privacy")
    target_epsilon: float = default("target-epsilon")  # per unit; for "both", each unit gets this epsilon
    delta: float = default("delta")
    accountant: str = default("dp-accountant")
    record_clip: float = default("record-clip")  # L2 bound of one record's gradient (DP-SGD)
    record_window: int = default("record-window")  # interactions per record (training chunk); at most max_len + 1
    participation_quantile: float = 0.95  # record level: plan the noise for this quantile of
                                          # the number of rounds a client is sampled into
    record_noise: float = 0.0     # noise multipliers, resolved by `resolve` before a run
    user_noise: float = 0.0
    distributed_noise: bool = False  # noise added in shares by the clients (needs secure aggregation)
    private_model: str = default("private-model")  # "item-item" (one noisy release) or "encoder" (DP rounds)
    planned_participations: int = 0
    user_sample_rate: float = 0.0
    noise_shares: int = 0         # m: fewest clients whose noise shares every applied sum holds

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"privacy mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, not {self.accountant!r}")
        if self.mode != "none" and not (self.target_epsilon > 0 and 0 < self.delta < 1):
            raise ValueError(f"--target-epsilon must be > 0 (got {self.target_epsilon:g}) and --delta in (0, 1) "
                             f"(got {self.delta:g})")

    @property
    def releases_item_item(self) -> bool:
        """The DP run is one noisy item-item release (server/release.py), not rounds of the encoder."""
        return self.mode != "none" and self.private_model == "item-item"

    def to_dict(self) -> dict:
        return asdict(self)


def epsilon(history: list[Event], delta: float, accountant: str = "rdp") -> float:
    """The accountant's epsilon at `delta` after the events in `history` (0 if none)."""
    if not history:
        return 0.0
    acc = ACCOUNTANTS[accountant]()
    acc.history = [tuple(e) for e in history]
    if accountant == "prv":  # its default error allowance (0.01 absolute) is 1% at epsilon 1
        with np.errstate(divide="ignore"):  # sample rate 1 takes log(0) on a branch it then discards
            return float(acc.get_epsilon(delta, eps_error=0.001))
    return float(acc.get_epsilon(delta))


def noise_for(target_epsilon: float, delta: float, sample_rate: float, steps: int,
              accountant: str = "rdp") -> float:
    """The smallest noise multiplier (to Opacus's tolerance) that keeps `steps` Gaussian steps
    at `sample_rate` within (target_epsilon, delta). Infinite epsilon needs no noise."""
    if math.isinf(target_epsilon):
        return 0.0
    with warnings.catch_warnings():  # the bisection visits noise levels whose best RDP order is
        warnings.simplefilter("ignore")  # off Opacus's grid; the answer's is not
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=steps, accountant=accountant,
                                          epsilon_tolerance=0.005))


def planned_participations(rounds: int, sample_rate: float, quantile: float) -> int:
    """Rounds a client takes part in, at this quantile of Binomial(rounds, sample_rate)."""
    from scipy.stats import binom
    return max(1, int(binom.ppf(quantile, rounds, min(sample_rate, 1.0))))


def noise_shares(clients_per_round: int, clients: int, poisson: bool, dropout: float) -> int:
    """m for distributed noise: the fewest contributions a round may sum. With Poisson sampling
    (user level) the round size varies, so m starts from its 0.1% quantile; either way it
    leaves room for `dropout` of the round's clients to drop."""
    from scipy.stats import binom
    q = min(clients_per_round / clients, 1.0)
    drawn = int(binom.ppf(1e-3, clients, q)) if poisson else min(clients_per_round, clients)
    return max(1, math.floor((1 - dropout) * drawn))


def resolve(cfg: PrivacyConfig, *, rounds: int, clients_per_round: int, clients: int,
            local_epochs: int, dropout: float = 0.1) -> PrivacyConfig:
    """Fill in the noise multipliers for a planned run of `rounds` rounds that samples
    `clients_per_round` of `clients` each round (and m, for distributed noise, surviving
    `dropout` of a round's clients)."""
    if cfg.mode == "none":
        return cfg
    if rounds < 1 or clients_per_round < 1:   # 0 means "from the population": plan the schedule first
        raise ValueError(f"privacy noise needs the run's rounds and cohort (got {rounds} and {clients_per_round})")
    q = min(clients_per_round / clients, 1.0)
    out = PrivacyConfig(**{**cfg.to_dict(), "user_sample_rate": q if cfg.user else 0.0})
    if cfg.distributed_noise:
        out.noise_shares = noise_shares(clients_per_round, clients, cfg.user, dropout)
    if cfg.record or (cfg.user and cfg.distributed_noise):
        out.planned_participations = planned_participations(rounds, q, cfg.participation_quantile)
    if cfg.record:
        out.record_noise = noise_for(cfg.target_epsilon, cfg.delta, 1.0,
                                     out.planned_participations * local_epochs, cfg.accountant)
    if cfg.user and cfg.distributed_noise:
        # Against the server, which draws the sample and sees who is in it, sampling amplifies
        # nothing: each participation is one full Gaussian step (the server stops sampling a
        # user at the planned count).
        out.user_noise = noise_for(cfg.target_epsilon, cfg.delta, 1.0, out.planned_participations, cfg.accountant)
    elif cfg.user:
        # Central noise: the server sees the sum before it adds the noise, so this epsilon holds
        # only for whoever sees just the released models, trusting the server's sampling.
        out.user_noise = noise_for(cfg.target_epsilon, cfg.delta, q, rounds, cfg.accountant)
    return out


def noise_share_std(*, record_noise: float, record_sensitivity: float, user_noise: float,
                    user_clip: float, shares: int) -> float:
    """Std of one client's distributed noise share. The summed shares of `shares` clients must
    carry noise_multiplier x sensitivity for each unit in force: record_sensitivity is what
    one record can move a client's contribution (local lr x record clip, one SGD step), the
    user clip what a whole user can. A unit not in force has noise multiplier 0 (`resolve`)."""
    total = max(record_noise * record_sensitivity, user_noise * user_clip)
    return total / math.sqrt(shares)


CLAMP_SIGMAS = 10   # distributed noise: the fixed-point range leaves room for this many share deviations


def clamp_probability(coordinates: int, participations: int) -> float:
    """Union bound on the chance that a user's noise share is clamped in some coordinate of some
    round it takes part in (a clamped mechanism is not the Gaussian one accounted): goes into delta."""
    return participations * coordinates * math.erfc(CLAMP_SIGMAS / math.sqrt(2))


def user_epsilon_against_server(cfg: PrivacyConfig, participations: int) -> float | None:
    """User-level epsilon against the aggregation server for a user sampled `participations`
    times: no amplification (the server draws the sample). None without distributed noise: the
    server then sees sums before any noise, and nothing holds against it."""
    if not cfg.user or not cfg.distributed_noise:
        return None
    if participations == 0:
        return 0.0
    return math.inf if cfg.user_noise == 0 else epsilon([(cfg.user_noise, 1.0, participations)], cfg.delta,
                                                        cfg.accountant)


def user_epsilon(cfg: PrivacyConfig, rounds_done: int) -> float:
    """User-level epsilon after `rounds_done` rounds against whoever sees only the released models,
    with amplification by the server's Poisson sampling (which that observer must trust)."""
    if not cfg.user or rounds_done == 0:
        return 0.0
    if cfg.user_noise == 0:
        return math.inf
    return epsilon([(cfg.user_noise, cfg.user_sample_rate, rounds_done)], cfg.delta, cfg.accountant)
