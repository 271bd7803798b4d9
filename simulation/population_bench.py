"""`fedrec bench population`: round time and peak memory of a federated simulation at growing
populations (1k, 10k, 100k users by default), the same clients per round and catalog, each run a
real `fedrec train --mode federated` in its own process. A round's cost should follow the clients
in it, not the population; the table shows whether it does. The final federated test is off
(`--no-final-test`: at 100k users it is 100,000 evaluation messages, each with the whole model); the
harness still scores every user's test item centrally, and that is in the wall time and the peak.

Memory is the proportional set size (PSS) summed over the run's whole process tree (the driver,
Ray's raylet and workers): shared pages (Ray's object store, loaded libraries) count once, split
between the processes that map them, so the sum is what the run takes from the machine.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from fedrec.shared.report import write_json


def _children() -> dict[int, list[int]]:
    """Every process's children, from /proc (Linux)."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:   # gone meanwhile
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])   # field 4, after the command name
        tree.setdefault(parent, []).append(int(entry))
    return tree


def tree_pss_bytes(root: int) -> int:
    """PSS of `root` and all its descendants, in bytes (0 for a process that is gone)."""
    tree, total, todo = _children(), 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(tree.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total


class PeakMemory:
    """Samples `tree_pss_bytes(pid)` every `every` seconds in a thread until `stop()`; keeps the peak."""

    def __init__(self, pid: int, every: float = 0.5):
        self.pid, self.every, self.peak = pid, every, 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, tree_pss_bytes(self.pid))
            self._done.wait(self.every)

    def stop(self) -> int:
        """The peak, with one last sample (a process still running counts at least as it is now)."""
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, tree_pss_bytes(self.pid))
        return self.peak


def run_population_bench(out: Path, *, users: tuple[int, ...] = (1_000, 10_000, 100_000), items: int = 100_000,
                         clients_per_round: int = 25, rounds: int = 3, secure: bool = True) -> dict:
    """One federated run per population on `synthetic:{users}x{items}` (no text encoder: content is the
    generator's genres and year), side by side; writes population.json and population.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in sorted(users):   # the table's ratios are to the smallest
        rows.append(_measure(out / f"users-{n}", n, items, clients_per_round, rounds, secure))
        print(json.dumps(rows[-1]), flush=True)
    report = {"items": items, "clients_per_round": clients_per_round, "rounds": rounds,
              "secure_aggregation": secure, "runs": rows}
    write_json(out / "population.json", report)
    (out / "population.md").write_text(population_table(report))
    print(population_table(report))
    return report


def _measure(folder: Path, n_users: int, items: int, clients_per_round: int, rounds: int, secure: bool) -> dict:
    cmd = [sys.executable, "-m", "fedrec.cli", "train", "--mode", "federated", "--dataset",
           f"synthetic:{n_users}x{items}", "--text-encoder", "none", "--rounds", str(rounds),
           "--clients-per-round", str(clients_per_round), "--eval-rounds", str(rounds), "--no-final-test", "--quiet",
           "--out", str(folder), *([] if secure else ["--no-secure-aggregation"])]
    shutil.rmtree(folder, ignore_errors=True)   # a fresh run each time, never a resumed one
    started = time.perf_counter()
    with open(folder.with_suffix(".log"), "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        memory = PeakMemory(proc.pid)
        code = proc.wait()
        peak = memory.stop()
    wall = time.perf_counter() - started
    row = {"users": n_users, "items": items, "exit_code": code, "wall_seconds": round(wall, 1),
           "peak_memory_gib": round(peak / 2 ** 30, 2), "log": str(folder.with_suffix(".log"))}
    history = [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines()] \
        if (folder / "rounds.jsonl").exists() else []
    history = [h for h in history if h["round"] <= rounds]
    if history:
        later = [h["seconds"] for h in history[1:]] or [history[0]["seconds"]]
        row.update(first_round_seconds=round(history[0]["seconds"], 2),   # Ray's start, registration
                   round_seconds=round(sum(later) / len(later), 2), accepted=[h["accepted"] for h in history])
    return row


def population_table(report: dict) -> str:
    """The markdown table: per population, round time (after round 1) and its ratio to the smallest
    population's, round 1, wall time and peak memory."""
    runs = [r for r in report["runs"] if "round_seconds" in r]
    base = max(runs[0]["round_seconds"], 0.01) if runs else None
    lines = [f"# Federated rounds by population: {report['items']:,} items, {report['clients_per_round']} clients a "
             f"round, {report['rounds']} rounds, secure aggregation {'on' if report['secure_aggregation'] else 'off'}, "
             "no final federated test (`--no-final-test`)",
             "", "| users | round s (rounds 2+) | x smallest | round 1 s | wall s | peak memory GiB | exit |",
             "|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        if "round_seconds" in r:
            lines.append(f"| {r['users']:,} | {r['round_seconds']:.2f} | {r['round_seconds'] / base:.2f}x | "
                         f"{r['first_round_seconds']:.1f} | {r['wall_seconds']:.0f} | {r['peak_memory_gib']:.2f} | "
                         f"{r['exit_code']} |")
        else:
            lines.append(f"| {r['users']:,} | no round finished | | | {r['wall_seconds']:.0f} | "
                         f"{r['peak_memory_gib']:.2f} | {r['exit_code']} (see {r['log']}) |")
    return "\n".join(lines) + "\n"
