"""`flwr run .` takes its run config from pyproject.toml, and Flower refuses an override whose
key is not declared there: every setting the ServerApp reads must be declared, with our default."""
import tomllib
from pathlib import Path

from server.app import DEFAULTS

ROOT = Path(__file__).resolve().parents[2]


def test_every_server_setting_is_declared_for_flwr_run_with_the_same_default():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(DEFAULTS) == set(declared)
    # pyproject's small flwr-run job differs on purpose in where it writes and how long it runs.
    differs = {k for k in DEFAULTS if DEFAULTS[k] != declared[k]}
    assert differs == {"out", "rounds", "clients-per-round"}, differs
