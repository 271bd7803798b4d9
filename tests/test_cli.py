"""The command line: every subcommand's flags build the job it runs (no flag missing from the
settings table), and `fedrec store` writes what `flwr run .` and SuperNodes read."""
import pytest

from fedrec.cli import main, parser, settings_of
from shared.data.pipeline import DataConfig
from simulation.centralized import CentralizedJob
from simulation.federated import FederatedJob

BUILDERS = {
    ("train", "--mode", "centralized"): CentralizedJob.from_settings,
    ("train", "--mode", "federated"): FederatedJob.from_settings,
    ("bench", "quality"): CentralizedJob.from_settings,
    ("bench", "held-out"): CentralizedJob.from_settings,
    ("bench", "temporal"): CentralizedJob.from_settings,
    ("bench", "privacy"): FederatedJob.from_settings,
    ("bench", "secagg"): lambda v: DataConfig.from_settings(v, activity_features=False),
    ("store",): lambda v: DataConfig.from_settings(v, activity_features=False),
}


@pytest.mark.parametrize("command", list(BUILDERS), ids=" ".join)
def test_each_command_gets_the_settings_its_job_needs(command):
    args = parser().parse_args([*command, "--out", "x", "--seed", "3"])
    job = BUILDERS[command](settings_of(args))
    assert (job.data.seed if hasattr(job, "data") else job.seed) == 3


def test_store_writes_the_catalog_and_one_log_per_user(tmp_path, capsys):
    assert main(["store", "--dataset", "synthetic:20x15", "--text-encoder", "none", "--out", str(tmp_path),
                 "--quiet"]) == 0
    assert (tmp_path / "catalog.npz").exists() and len(list((tmp_path / "users").glob("*.npz"))) == 20
    assert "20 user logs" in capsys.readouterr().out
