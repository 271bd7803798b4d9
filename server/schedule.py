"""How long a federated run trains and how many devices a round asks, from the population:
what `--rounds 0` and `--clients-per-round 0` (the defaults) derive.

The rule keeps the number of turns each device gets over the run (`--participations`, a turn
being one local pass over its own log) and keeps the round count near `MOST_ROUNDS` by growing
the cohort rather than the number of rounds. ML-100K's tuned setting, 500 rounds of 25 of its 943
users (session 3), is 13.25 turns a device; a population five times larger gets the same turns
from rounds of 5 x 25 devices, not from 2,500 rounds. Why the cohort grows: a round has a fixed
cost that does not shrink with its cohort (Flower's exchange floor, secure aggregation's four
steps: docs/results.md), and a larger cohort averages more users into each server step.

Pure: the server applies it to the nodes connected when round 1 starts; the simulation harness
applies it to the users it simulates (the same number there).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

MIN_COHORT = 25      # clients a round at least (fewer when the population is smaller): ML-100K's tuned cohort
MOST_ROUNDS = 500    # the cohort grows once the turns would take more rounds than this


@dataclass(frozen=True)
class Schedule:
    rounds: int
    clients_per_round: int
    why: str

    def to_dict(self) -> dict:
        return {"rounds": self.rounds, "clients_per_round": self.clients_per_round, "why": self.why}


def plan(population: int, rounds: int, clients_per_round: int, participations: float) -> Schedule:
    """The run's rounds and cohort: each as given when > 0, else derived: the cohort from the
    population, the rounds so that every one of `population` devices gets about `participations` turns."""
    if population < 1:
        raise ValueError("a schedule needs at least one device")
    turns = participations * population
    cohort_given, rounds_given = bool(clients_per_round), bool(rounds)
    if not cohort_given:
        # From the population alone, not from a given --rounds: a short run (make run's 60 rounds) keeps
        # the cohort a round costs, and gives each device fewer turns.
        clients_per_round = min(population, max(MIN_COHORT, math.ceil(turns / MOST_ROUNDS)))
    if not rounds_given:
        rounds = max(1, math.ceil(turns / clients_per_round))
    each = f"{rounds * clients_per_round / population:.2f} turns for each of {population:,} devices"
    cohort = (f"--clients-per-round {clients_per_round}" if cohort_given else
              f"{clients_per_round:,} clients (at least {MIN_COHORT}; more when that would need over {MOST_ROUNDS} "
              f"rounds)")
    length = f"--rounds {rounds}" if rounds_given else f"{rounds:,} rounds (for --participations {participations:g})"
    return Schedule(rounds, clients_per_round, f"{length} of {cohort}: {each}")
