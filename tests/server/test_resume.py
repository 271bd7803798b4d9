"""A run folder continued with other settings is a one-line usage error naming what changed."""
from dataclasses import replace

import pytest

from fedrec.server.checkpoint import save_checkpoint
from fedrec.server.federation import FederationConfig, check_resumable
from fedrec.shared.errors import RunMismatch, UserFileError


def test_a_checkpoint_of_other_settings_names_them(tmp_path):
    cfg = FederationConfig()
    save_checkpoint(tmp_path / "checkpoint.pt", {"round": 3, "config": cfg.identity(), "history": []})
    assert check_resumable(tmp_path, cfg)["round"] == 3
    assert check_resumable(tmp_path, replace(cfg, min_nodes=7)) is not None   # waiting longer changes nothing
    other = replace(cfg, clients_per_round=cfg.clients_per_round + 1)
    with pytest.raises(RunMismatch, match=rf"clients_per_round: {cfg.clients_per_round} -> "
                                          rf"{cfg.clients_per_round + 1}.*use a new --out") as caught:
        check_resumable(tmp_path, other)
    assert isinstance(caught.value, UserFileError)   # the command line prints it as one line, exit 2
    assert check_resumable(tmp_path / "new", other) is None


def test_a_resume_on_other_data_is_refused_before_anything_in_the_folder_changes(tmp_path):
    import json

    from fedrec.server.app import federation_config
    from fedrec.shared.data.pipeline import DataConfig, prepare_data
    from fedrec.simulation.federated import FederatedJob, _check_resumable, _settings, store_stamp
    prepared = prepare_data(DataConfig(dataset="synthetic:30x20", text_encoder="none", activity_features=False))
    job = FederatedJob(data=DataConfig(dataset="synthetic:30x20", text_encoder="none", activity_features=False))
    settings = _settings(job, prepared, tmp_path)
    save_checkpoint(tmp_path / "checkpoint.pt", {"round": 2, "config": federation_config(settings).identity(),
                                                 "history": []})
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "manifest.json").write_text(json.dumps(store_stamp(prepared)))
    _check_resumable(prepared, settings, tmp_path)                      # same data: resumes
    (tmp_path / "store" / "manifest.json").write_text(json.dumps({**store_stamp(prepared), "events": 1}))
    with pytest.raises(RunMismatch, match="trained on other data"):
        _check_resumable(prepared, settings, tmp_path)
    moved = {**settings, "store": str(tmp_path / "elsewhere")}         # where, not what: still resumes
    (tmp_path / "store" / "manifest.json").write_text(json.dumps(store_stamp(prepared)))
    _check_resumable(prepared, moved, tmp_path)
