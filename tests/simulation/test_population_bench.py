"""The population bench's memory figure: PSS summed over a process tree, children included."""
import os
import signal
import subprocess
import sys

from fedrec.simulation.population_bench import PeakMemory, _children, population_table, tree_pss_bytes

HOLD_300_MB = ("import subprocess, sys\n"
               "child = subprocess.Popen([sys.executable, '-c', 'b = bytearray(300 * 2**20); import time; "
               "print(1, flush=True); time.sleep(60)'], stdout=subprocess.PIPE)\n"
               "child.stdout.readline(); print('ready', flush=True); child.wait()")


def test_the_peak_counts_a_grandchilds_memory():
    """A parent that holds nothing and a child that holds 300 MB: the tree's peak has the 300 MB
    (the parent's own RSS alone would not)."""
    parent = subprocess.Popen([sys.executable, "-c", HOLD_300_MB], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout.readline().strip() == "ready"     # the child has touched its 300 MB
        assert tree_pss_bytes(parent.pid) >= 300 * 2 ** 20
        assert PeakMemory(parent.pid, every=0.05).stop() >= 300 * 2 ** 20
    finally:
        for child in _children().get(parent.pid, []):
            os.kill(child, signal.SIGKILL)
        parent.kill()
        parent.wait()
    assert tree_pss_bytes(parent.pid) == 0                      # gone: nothing counted


def test_the_table_gives_each_population_its_ratio_to_the_smallest_and_names_a_failed_run():
    report = {"items": 100, "clients_per_round": 25, "rounds": 3, "secure_aggregation": True, "runs": [
        {"users": 1000, "round_seconds": 2.0, "first_round_seconds": 9.0, "wall_seconds": 60, "peak_memory_gib": 3.0,
         "exit_code": 0},
        {"users": 10000, "round_seconds": 3.0, "first_round_seconds": 12.0, "wall_seconds": 90,
         "peak_memory_gib": 4.0, "exit_code": 0},
        {"users": 100000, "wall_seconds": 10, "peak_memory_gib": 1.0, "exit_code": 1, "log": "x.log"}]}
    table = population_table(report)
    assert "| 10,000 | 3.00 | 1.50x |" in table and "no round finished" in table and "x.log" in table


def test_registration_asks_everyone_once_while_small_and_only_the_sampled_past_the_limit():
    """Round 1 registers every node up to REGISTER_ALL_UP_TO; past it only the sampled nodes (a
    round's cost then follows its clients), and once some are registered only the sampled ones."""
    from fedrec.server.secure import REGISTER_ALL_UP_TO, SecureConfig, SecureRound

    class Nodes:
        def __init__(self, n):
            self.n = n

        def get_node_ids(self):
            return list(range(1, self.n + 1))

    secure = SecureRound(SecureConfig(), timeout=1.0, fail_on_error=True)
    assert len(secure._to_register(Nodes(REGISTER_ALL_UP_TO), [3, 4, 5])) == REGISTER_ALL_UP_TO
    assert secure._to_register(Nodes(REGISTER_ALL_UP_TO + 1), [3, 4, 5]) == [3, 4, 5]
    secure.identities[1] = b"record"
    assert secure._to_register(Nodes(10), [3, 4, 5]) == [3, 4, 5]
