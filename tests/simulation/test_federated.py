"""The federation on Flower's real simulation engine (Ray), on small synthetic data.

Each test starts Ray (about 10 s): they are few and small on purpose.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord
from flwr.serverapp import ServerApp

from fedrec.client.app import make_client_app
from fedrec.cli import main
from fedrec.server.app import serve
from fedrec.shared.data.pipeline import DataConfig, prepare_data
from fedrec.shared.evaluation.ranking import evaluate
from fedrec.shared.settings import run_config_defaults
from fedrec.simulation.federated import simulate, write_store

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--dataset", "synthetic:40x30", "--text-encoder", "none", "--dim", "16", "--layers", "1",
        "--max-len", "10", "--clients-per-round", "6", "--eval-rounds", "1", "--quiet"]
SETTINGS = {"dim": 16, "layers": 1, "heads": 2, "max-len": 10, "dropout": 0.0, "id-buckets": 4096,
            "clients-per-round": 8, "local-epochs": 1, "local-lr": 1e-2,
            "secure-aggregation": False}  # the plain path; tests/simulation/test_secure.py has the other


def test_federated_run_writes_summary_with_rounds_bytes_and_timing(tmp_path, capsys):
    out, central = tmp_path / "fed", tmp_path / "central"
    (central).mkdir()
    (central / "summary.json").write_text(json.dumps(
        {"metrics": {"ndcg@10": 0.05}, "validation_curve": [{"epoch": 1, "ndcg@10": 0.06}]}))
    # The floors lowered to fit 40 devices, so the counts and blend rounds run (issue 21's safeguard).
    assert main(["train", "--mode", "federated", "--rounds", "3", "--out", str(out),
                 "--compare-with", str(central), "--counts-min-devices", "10", "--blend-devices", "20", *TINY]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["mode"] == "federated" and s["rounds"] == 3 and 30 <= s["clients"] <= 40
    assert s["stopped"] == {"round": 3, "why": "rounds: the 3 of --rounds"}
    assert s["bytes_down"] > 0 and s["bytes_up"] > 0
    assert s["bytes_per_client_round"]["down"] > 0 and {"p50", "p90", "p99"} <= set(s["round_seconds"])
    assert s["privacy"] == {"mode": "none"}
    assert (out / "test_ranks.npy").is_file()
    # Secure aggregation is the default: recorded with its parameters, no round aborted.
    sa = s["secure_aggregation"]
    assert sa["enabled"] and sa["aborted_rounds"] == 0 and sa["params_last_round"]["threshold"] >= 2
    assert sa["protocol_step_seconds_mean"] > 0
    # The server's federated test evaluation (every client, its own test item, the encoder alone) is
    # the same number the harness computes centrally from the final weights.
    fusion = s["fusion"]
    for key in ("hr@10", "ndcg@10", "mrr@10"):
        assert s["federated_test_metrics"][key] == pytest.approx(fusion["encoder_alone_test"][key], abs=1e-9)
    # The blend: chosen from 20 devices' summed validation statistics, with every candidate's figure.
    assert fusion["valid_users"] == 20 and fusion["chosen"] in fusion["valid_ndcg@10"]
    assert {"encoder alone", "ease alone", "item-knn alone", "popular alone"} <= set(fusion["valid_ndcg@10"])
    assert fusion["counts_round"]["contributions"] == s["clients"] and "why" in fusion
    assert s["federated_test_metrics"]["users"] == s["clients"]
    # Rounds 4 and 5: the counts sum and the blend round.
    assert [json.loads(line)["round"] for line in (out / "rounds.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
    assert len(s["validation_curve"]) == 3 and (out / "validation_curve.png").stat().st_size > 1000
    assert "federated: NDCG@10" in capsys.readouterr().out   # --quiet: that one line
    assert s["schedule"]["rounds"] == 3 and s["schedule"]["clients_per_round"] == 6
    # The server published the bundle: the final weights, the chosen blend over the summed counts, and
    # popularity from them; ranking with it gives the run's test figure.
    from fedrec.shared.recommend import Recommender
    rec = Recommender.load(out / "bundle")
    assert s["bundle"]["version"] == rec.version and rec.bundle.blend.label == fusion["chosen"]
    assert rec.bundle.popularity is not None and rec.bundle.manifest["run"]["mode"] == "federated"
    prepared = prepare_data(DataConfig(dataset="synthetic:40x30", text_encoder="none", activity_features=False))
    again = evaluate(rec.scores, prepared.split, "test").metrics["ndcg@10"]
    assert again == pytest.approx(s["metrics"]["ndcg@10"], abs=0.02)


class RecordingGrid:
    """The real Grid, with every reply the server receives kept for inspection (and,
    optionally, damaged on the way in, as a faulty or malicious client would send it)."""

    def __init__(self, grid, damage=None):
        self.grid, self.damage, self.replies = grid, damage, []

    def get_node_ids(self):
        return self.grid.get_node_ids()

    def push_messages(self, messages):
        self.trained_replies = 0        # numbers the damaged replies within one exchange
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids):
        replies = list(self.grid.pull_messages(message_ids))
        if self.damage:
            # Only replies that carry training (a user with one item has nothing to train on
            # and answers num-examples 0, which the server skips anyway).
            trained = [r for r in replies if "delta" in r.content and r.content["metrics"]["num-examples"] > 0]
            for reply in trained:
                self.damage(self.trained_replies, reply)
                self.trained_replies += 1
        self.replies.extend(replies)
        return replies


def run_recorded(tmp_path, settings, damage=None):
    prepared = prepare_data(DataConfig(dataset="synthetic:30x25", text_encoder="none",
                                       activity_features=False))
    store = write_store(prepared, tmp_path / "store")
    settings = {**run_config_defaults(), **SETTINGS, "store": str(store), "out": str(tmp_path / "out"), **settings}
    recorder = {}
    app = ServerApp()

    @app.main()
    def main_(grid, context):
        recorder["grid"] = RecordingGrid(grid, damage)
        recorder["final"] = serve(recorder["grid"], settings)

    simulate(app, make_client_app(settings), len(prepared.split))
    assert "final" in recorder, "the ServerApp did not finish"
    return prepared, recorder["grid"].replies, recorder["final"]


def test_every_reply_carries_only_the_delta_and_metric_values(tmp_path):
    prepared, replies, final = run_recorded(tmp_path, {"rounds": 2})
    expected_shapes = {k: v.shape for k, v in final["weights"].items()}
    train = [r for r in replies if "delta" in r.content]
    evaluation = [r for r in replies if "delta" not in r.content]
    assert len(train) == 2 * 8 and len(evaluation) == 30
    for reply in train:
        assert set(reply.content.keys()) == {"delta", "metrics"}
        delta = reply.content["delta"]
        # Exactly the shared weights, as one float32 vector: no extra array, so no per-user
        # embedding or state.
        assert list(delta.keys()) == ["flat"]
        flat = delta["flat"].numpy()
        assert flat.dtype == np.float32
        assert flat.shape == (sum(int(np.prod(s)) for s in expected_shapes.values()),)
        assert set(reply.content["metrics"].keys()) == {"num-examples", "train-loss", "train-seconds"}
    for reply in evaluation:
        assert set(reply.content.keys()) == {"metrics"}
        m = reply.content["metrics"]
        assert set(m.keys()) == {"users", "hr@10", "ndcg@10", "mrr@10"}
        assert m["users"] == 1 and m["hr@10"] in (0.0, 1.0) and 0 <= m["ndcg@10"] <= 1
    # No integer arrays anywhere (item indices would be integers) and no reply holds a
    # user's held-out item or history as a value.
    held_out = {float(u.test) for u in prepared.split.users} | {float(u.valid) for u in prepared.split.users}
    for reply in evaluation:
        assert not (set(reply.content["metrics"].values()) - {0.0, 1.0}) & held_out


def test_bad_replies_are_dropped_with_a_reason_and_the_round_goes_on(tmp_path):
    def damage(i, reply):
        if "delta" not in reply.content:
            return
        flat = reply.content["delta"]["flat"].numpy()
        if i == 0:
            arrays = {"flat": np.full_like(flat, np.nan)}
        elif i == 1:
            arrays = {"flat": flat[:-5]}
        elif i == 2:
            arrays = {"other": flat}
        elif i == 3:
            reply.content["metrics"] = MetricRecord({"train-loss": 1.0})
            return
        else:
            return
        reply.content["delta"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})

    _, _, final = run_recorded(tmp_path, {"rounds": 2, "final-test": False}, damage)
    for record in final["history"]:
        reasons = " | ".join(record["rejected"])
        idle = reasons.count("nothing to train on")
        assert record["sampled"] == 8 and record["accepted"] == 8 - idle - 4, record["rejected"]
        assert "contains NaN or Inf" in reasons and "expected a flat vector of" in reasons
        assert "expected one array 'flat'" in reasons and "no 'metrics' with num-examples" in reasons
    assert all(np.isfinite(w).all() for w in final["weights"].values())


def test_a_spent_time_budget_ends_the_run_early_with_its_refit_rounds_and_says_why(tmp_path):
    """Any first round spends a budget of a microsecond: the run keeps the state after round 1 (the
    encoder validation can judge), trains one refit round (--refit-fraction 0.5 of 2) and ends there,
    four rounds early, with the reason in its result."""
    import torch
    _, _, final = run_recorded(tmp_path, {"rounds": 6, "refit-fraction": 0.5, "federated-time-budget": 1e-6,
                                          "final-test": False, "fusion": "none"})
    assert [h["round"] for h in final["history"]] == [1, 2] and all(h["trained"] for h in final["history"])
    assert final["stopped"]["round"] == 2 and final["stopped"]["why"].startswith("time budget")
    assert torch.load(tmp_path / "out" / "selected.pt", weights_only=False)["round"] == 1
    assert json.loads((tmp_path / "out" / "result.json").read_text())["stopped"] == final["stopped"]


def test_rounds_and_cohort_left_at_0_come_from_the_population_and_the_run_says_so(tmp_path):
    """30 devices, one turn each asked (--participations 1): cohorts of 25 (the smallest the schedule
    picks), so 2 rounds; the result names the schedule and why it stopped."""
    _, _, final = run_recorded(tmp_path, {"rounds": 0, "clients-per-round": 0, "participations": 1.0, "min-nodes": 30,
                                          "refit-fraction": 0.0, "final-test": False, "fusion": "none"})
    assert final["schedule"]["rounds"] == 2 and final["schedule"]["clients_per_round"] == 25
    assert "for each of 30 devices" in final["schedule"]["why"] and "--participations 1)" in final["schedule"]["why"]
    assert [(h["round"], h["sampled"]) for h in final["history"]] == [(1, 25), (2, 25)]
    assert final["stopped"] == {"round": 2, "why": "rounds: the 2 the schedule chose"}
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["schedule"] == final["schedule"] and result["stopped"] == final["stopped"]


def test_a_validation_that_finds_nothing_better_ends_the_run_asking_the_same_panel_each_time(tmp_path):
    """A server step too small to move the model: the same weights, asked of the same 10 devices after
    rounds 1 and 2, score the same, so --federated-patience 1 ends the run at round 2 of 6 (on a new
    panel each time the two values would differ by who was asked)."""
    _, _, final = run_recorded(tmp_path, {"rounds": 6, "refit-fraction": 0.0, "server-lr": 1e-30,
                                          "federated-eval-every": 1, "eval-clients": 10, "federated-patience": 1,
                                          "final-test": False, "fusion": "none"})
    values = [h["metrics"]["federated_valid_ndcg@10"] for h in final["history"]]
    assert len(values) == 2 and values[0] == pytest.approx(values[1], abs=1e-12)   # summed in arrival order
    assert [h["metrics"]["federated_valid_users"] for h in final["history"]] == [10.0, 10.0]
    assert final["stopped"]["round"] == 2 and final["stopped"]["why"].startswith("validation: 1 federated")


def test_a_killed_server_resumes_from_its_last_checkpoint(tmp_path):
    out = tmp_path / "fed"
    cmd = [sys.executable, "-m", "fedrec.cli", "train", "--mode", "federated", "--rounds", "6",
           "--out", str(out), *TINY, "--eval-rounds", "100"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rounds = out / "rounds.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and first.poll() is None:
        if rounds.exists() and len(rounds.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    assert first.poll() is None, "the first run ended before it could be killed"
    os.killpg(first.pid, signal.SIGKILL)  # the server and its Ray workers, mid-run
    first.wait()
    done_before = len(rounds.read_text().splitlines())
    assert 2 <= done_before < 6
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming from round {done_before}" in second.stderr
    history = [json.loads(line)["round"] for line in rounds.read_text().splitlines()]
    assert history == [1, 2, 3, 4, 5, 6]
    assert json.loads((out / "summary.json").read_text())["rounds"] == 6
    # Output into a pipe (issue 19): plain lines, no colour codes, no tqdm frames, no DEBUG; --quiet
    # leaves the final line alone on stdout.
    both = second.stdout + second.stderr
    assert "\x1b[" not in both and "\r" not in both and "DEBUG" not in both
    assert len(second.stdout.splitlines()) == 1 and "NDCG@10" in second.stdout

    # The finished run, given more rounds, continues: its refit round (6) is redone at the end.
    longer = subprocess.run([*cmd[:cmd.index("--rounds") + 1], "8", *cmd[cmd.index("--rounds") + 2:]], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert "continuing a run of 6 rounds to 8 rounds, from round 5" in longer.stderr
    history = [json.loads(line)["round"] for line in rounds.read_text().splitlines()]
    assert history == [1, 2, 3, 4, 5, 6, 7, 8]
    assert json.loads((out / "summary.json").read_text())["rounds"] == 8
    shorter = subprocess.run([*cmd[:cmd.index("--rounds") + 1], "3", *cmd[cmd.index("--rounds") + 2:]], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=300)
    assert shorter.returncode == 2 and shorter.stderr.count("\n") == 1 and "not cut to 3" in shorter.stderr
