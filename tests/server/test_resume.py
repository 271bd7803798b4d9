"""A run folder continued with other settings is a one-line usage error naming what changed."""
from dataclasses import replace

import pytest

from server.checkpoint import save_checkpoint
from server.federation import FederationConfig, check_resumable
from shared.errors import RunMismatch, UserFileError


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
