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
    """The run's rounds and cohort: each as given when > 0, else derived so that every one of
    `population` devices gets about `participations` turns."""
    if population < 1:
        raise ValueError("a schedule needs at least one device")
    turns = participations * population
    given = []
    if clients_per_round:
        given.append(f"--clients-per-round {clients_per_round}")
    else:
        clients_per_round = min(population, max(MIN_COHORT, math.ceil(turns / (rounds or MOST_ROUNDS))))
    if rounds:
        given.append(f"--rounds {rounds}")
    else:
        rounds = max(1, math.ceil(turns / clients_per_round))
    each = rounds * clients_per_round / population
    if len(given) == 2:
        why = f"{' and '.join(given)}: {each:.2f} turns for each of {population:,} devices"
    else:
        why = (f"{rounds:,} rounds of {clients_per_round:,} clients give each of {population:,} devices "
               f"{each:.2f} turns (--participations {participations:g}"
               + (f"; {given[0]}" if given else f"; cohorts of at least {MIN_COHORT}, rounds at most about "
                                                f"{MOST_ROUNDS}") + ")")
    return Schedule(rounds, clients_per_round, why)
