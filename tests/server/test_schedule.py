"""The schedule `--rounds 0` and `--clients-per-round 0` derive from the population."""
import pytest

from fedrec.server.schedule import MIN_COHORT, MOST_ROUNDS, plan


def test_ml_100k_gets_the_tuned_500_rounds_of_25():
    s = plan(943, 0, 0, 13.25)
    assert (s.rounds, s.clients_per_round) == (500, 25)
    assert s.why == ("500 rounds (for --participations 13.25) of 25 clients (at least 25; more when that would need "
                     "over 500 rounds): 13.26 turns for each of 943 devices")


@pytest.mark.parametrize("population", [610, 943, 5_000, 20_000, 100_000, 1_000_000])
def test_every_device_gets_its_turns_in_about_500_rounds_of_at_least_25(population):
    s = plan(population, 0, 0, 13.25)
    assert s.rounds * s.clients_per_round >= 13.25 * population   # the turns asked for, at least
    assert s.clients_per_round >= MIN_COHORT and s.rounds <= MOST_ROUNDS
    # ... and not many more: rounding up costs under one round's cohort.
    assert s.rounds * s.clients_per_round < 13.25 * population + s.clients_per_round + s.rounds


def test_a_population_grows_the_cohort_not_the_rounds():
    small, large = plan(5_000, 0, 0, 13.25), plan(20_000, 0, 0, 13.25)
    assert large.clients_per_round == pytest.approx(4 * small.clients_per_round, rel=0.01)
    assert abs(large.rounds - small.rounds) <= 2


def test_what_is_given_stays_and_the_other_is_derived_from_it():
    assert plan(943, 0, 50, 13.25).clients_per_round == 50 and plan(943, 0, 50, 13.25).rounds == 250
    # A given --rounds keeps the population's cohort (a short run stays cheap a round): fewer turns.
    short = plan(943, 60, 0, 13.25)
    assert (short.rounds, short.clients_per_round) == (60, 25) and "1.59 turns" in short.why
    assert plan(20_000, 60, 0, 13.25).clients_per_round == plan(20_000, 0, 0, 13.25).clients_per_round
    both = plan(943, 700, 25, 13.25)
    assert (both.rounds, both.clients_per_round) == (700, 25) and "--rounds 700" in both.why


def test_a_population_smaller_than_a_cohort_is_asked_whole():
    s = plan(8, 0, 0, 13.25)
    assert (s.rounds, s.clients_per_round) == (14, 8)
    with pytest.raises(ValueError):
        plan(0, 0, 0, 13.25)
