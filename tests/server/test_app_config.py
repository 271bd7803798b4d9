"""`flwr run .` takes its run config from pyproject.toml, and Flower refuses an override whose
key is not declared there: every setting the ServerApp reads (shared/settings.py, run_config)
must be declared, with the table's default."""
import tomllib
from pathlib import Path

import pytest

from fedrec.server.app import federation_config
from fedrec.shared.settings import RUN_CONFIG, SettingsError, read_run_config, run_config_defaults

ROOT = Path(__file__).resolve().parents[2]


def test_every_server_setting_is_declared_for_flwr_run_with_the_same_default():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    defaults = run_config_defaults()
    assert set(defaults) == set(declared)
    # pyproject's small flwr-run job differs on purpose in where it writes and how long it runs.
    differs = {k for k in defaults if defaults[k] != declared[k]}
    assert differs == {"out", "rounds", "clients-per-round"}, differs


def test_the_server_reads_the_declared_config_and_refuses_unknown_or_bad_keys():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    cfg = federation_config(declared)
    assert cfg.rounds == declared["rounds"] and cfg.secure.enabled == declared["secure-aggregation"]
    with pytest.raises(SettingsError, match="unknown run-config key"):
        read_run_config({"roundz": 3})
    with pytest.raises(SettingsError, match="--rounds -1"):
        read_run_config({"rounds": -1})
    assert read_run_config({"rounds": 0})["rounds"] == 0   # 0: the schedule derives it
    with pytest.raises(SettingsError, match="expected int"):
        read_run_config({"rounds": "many"})
    assert len(RUN_CONFIG) == len(declared)



def test_a_catalog_too_large_for_the_counts_sum_gets_the_encoder_alone_without_asking_devices(tmp_path):
    """Past MAX_PAIRS the dense counts vector would be hundreds of MB from every device (ml-latest-small:
    9,742 items): the server says why and asks nobody (no grid is given: asking would fail)."""
    from fedrec.server.app import fuse_item_model
    from fedrec.server.federation import FederationConfig
    report = fuse_item_model(None, FederationConfig(), 9_742, tmp_path, {}, None, None)
    assert report["chosen"] == "encoder alone" and "190 MB each" in report["why"], report
