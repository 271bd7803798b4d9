"""A careless user's inputs: each is a one-line error with the right exit code, before anything
starts (exit 2: usage or data), or, for rounds that cannot train at run time, counted in
summary.json and a failed run (exit 1) when no round trained."""
import json

import pytest

from fedrec.cli import main
from fedrec.shared.settings import SettingsError, read_run_config

TINY = ["--dataset", "synthetic:40x30", "--text-encoder", "none", "--dim", "16", "--layers", "1",
        "--max-len", "10", "--quiet"]
FEDERATED = ["train", "--mode", "federated", *TINY]


@pytest.mark.parametrize("flags,message", [
    # Before: user-level DP with no rounds or no clients searched for a noise level forever.
    ([*FEDERATED, "--privacy", "user", "--rounds", "-1"], "--rounds -1: must be >= 0"),
    ([*FEDERATED, "--privacy", "user", "--clients-per-round", "-1"], "--clients-per-round -1: must be >= 0"),
    ([*FEDERATED, "--participations", "0"], "--participations 0.0: must be > 0"),
    # Validation replies are not noised: they must not decide how long a DP model trains.
    ([*FEDERATED, "--privacy", "user", "--private-model", "encoder", "--federated-eval-every", "5"],
     "--federated-patience 3 would decide"),
    # Before: tracebacks.
    (["train", *TINY, "--epochs", "0"], "--epochs 0: must be >= 1"),
    (["train", *TINY, "--batch-size", "0"], "--batch-size 0: must be >= 1"),
    # Before: every round skipped and exit 0 with aborted_rounds 0.
    ([*FEDERATED, "--clients-per-round", "2"], "secure aggregation needs --clients-per-round >= 3"),
    ([*FEDERATED, "--heads", "3"], "--heads 3 must divide --dim 16"),
    (["bench", "blend-rule", *TINY, "--epoch-counts", "3,ten"], "--epoch-counts '3,ten': expected comma-separated"),
    (["bench", "privacy", *TINY, "--modes", "record,user", "--record-window", "11", "--update-clip", "0"], "user-level DP needs --update-clip > 0"),
])
def test_bad_settings_are_usage_errors_before_anything_starts(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as stop:
        main([*flags, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_the_server_app_refuses_the_same_settings_from_a_run_config():
    for config, message in [({"rounds": -1}, "--rounds -1"), ({"clients-per-round": 2}, "clients-per-round >= 3"),
                            ({"privacy": "record", "record-window": 80}, "--record-window 80")]:
        with pytest.raises(SettingsError, match=message):
            read_run_config(config)


@pytest.mark.parametrize("value", ["inf", "1e30", "-inf"])
def test_a_timestamp_that_is_no_time_is_a_data_error_naming_file_line_and_field(tmp_path, capsys, value):
    log = tmp_path / "events.csv"
    rows = [f"u{u},i{i},{1000 + 10 * u + i}" for u in range(4) for i in range(5)]
    rows[6] = f"u1,i1,{value}"
    log.write_text("user,item,timestamp\n" + "\n".join(rows) + "\n")
    code = main(["train", "--dataset", str(log), "--text-encoder", "none", "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and f"{log}:8: field 'timestamp': timestamp out of range" in err, err


def _registration_fails(msg, context, call_next):
    """A client mod: the node never gets its identity key registered."""
    if msg.metadata.message_type == "train.secagg_register":
        raise ConnectionError("unreachable")
    return call_next(msg, context)


def test_a_run_in_which_no_round_trained_fails_and_says_why(tmp_path, capsys, monkeypatch):
    from fedrec.client import app as client_app
    original = client_app.make_client_app
    monkeypatch.setattr(client_app, "make_client_app",
                        lambda settings=None, mods=None: original(settings, [_registration_fails]))
    code = main([*FEDERATED, "--rounds", "2", "--clients-per-round", "6", "--eval-rounds", "2",
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1 and "none of the 2 rounds trained" in err and "round skipped" in err, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["rounds_trained"] == 0
    assert summary["secure_aggregation"]["skipped_rounds"] == 2
