"""The command line: every subcommand's flags build the job it runs (no flag missing from the
settings table), and `fedrec store` writes what `flwr run .` and SuperNodes read."""
import pytest

from fedrec.cli import main, parser, settings_of
from fedrec.shared.data.pipeline import DataConfig
from fedrec.simulation.centralized import CentralizedJob
from fedrec.simulation.federated import FederatedJob

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


def test_every_flag_has_help_and_every_setting_shows_its_default(capsys):
    import argparse
    from fedrec.cli import parser

    def actions(p, path):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from actions(sub, f"{path} {name}")
            else:
                yield path, action
    missing = [f"{path} {a.option_strings}" for path, a in actions(parser(), "fedrec") if not a.help]
    assert not missing, missing
    train = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    text = train.format_help()
    for flag, default in (("--rounds", "0"), ("--epochs", "150"), ("--clients-per-round", "0"), ("--participations", "13.25")):
        line = text[text.index(f"  {flag} "):]
        assert f"(default: {default})" in " ".join(line.split())[:400], flag
    assert "(default: --secure-aggregation)" in " ".join(
        text[text.index("--secure-aggregation, --no-secure-aggregation"):].split())[:400]


def test_version(capsys):
    import pytest
    from fedrec.cli import main
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    import fedrec
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"fedrec {fedrec.__version__}"
    assert fedrec.__version__[0].isdigit()


def test_device_run_takes_the_devices_own_rules_beside_the_settings_of_the_same_names():
    """`--counts-min-devices` is also a setting of the app: the device's flag must not be read as
    that setting (it was: 'a value is required' before the device could start)."""
    from fedrec.cli import parser, settings_of
    args = parser().parse_args(["device", "run", "--store", "d", "--superlink", "h:1", "--privacy-budget", "8",
                                "--counts-min-devices", "20"])
    settings_of(args)
    assert (args.own_privacy_budget, args.own_counts_min_devices) == (8.0, 20)


def test_library_chatter_is_quiet_unless_verbose():
    """Issue 19: a federated run printed Flower's deprecations twice, DEBUG lines (a second copy of
    each record through the root handler Opacus installs) and ANSI colours into files."""
    import io
    import logging
    from flwr.supercore.logger import FLOWER_LOGGER, ConsoleHandler, update_console_handler
    from fedrec.shared.console import tame_library_output
    seen = io.StringIO()   # where Flower's own handler and a root handler (as opacus adds) both write
    flower = [h for h in FLOWER_LOGGER.handlers if isinstance(h, ConsoleHandler)]
    streams = [h.stream for h in flower]   # (not setStream: it flushes the old one, maybe a closed capture)
    for h in flower:
        h.stream = seen
    root = logging.StreamHandler(seen)
    logging.getLogger().addHandler(root)
    try:
        tame_library_output(verbose=False)
        FLOWER_LOGGER.info("an INFO line")
        FLOWER_LOGGER.warning("run_simulation is deprecated")
        FLOWER_LOGGER.warning("a real warning")
        err = seen.getvalue()
        assert err.count("a real warning") == 1 and "INFO line" not in err and "deprecated" not in err
        assert "\x1b[" not in err   # not a terminal: no colour codes
    finally:   # the rest of the session sees Flower as it was
        logging.getLogger().removeHandler(root)
        for handler, stream in zip(flower, streams):
            handler.stream = stream
        FLOWER_LOGGER.propagate = True
        FLOWER_LOGGER.filters.clear()
        update_console_handler(level=logging.INFO, colored=True)


def test_progress_into_a_file_is_plain_lines_with_named_fields(capsys):
    """Not a terminal: no tqdm frames, a line every few steps and for the last, fields in full,
    and a figure only once it exists."""
    from fedrec.shared.console import Progress
    bar = Progress(10, "train", "epoch", every=5)
    for epoch in range(10):
        bar.update(loss=f"{1 / (epoch + 1):.3f}", **{"best validation NDCG@10": "0.1000" if epoch >= 7 else None})
    bar.close()
    err = capsys.readouterr().err
    assert "\r" not in err and err.splitlines() == [
        "train: epoch 5/10: loss 0.200", "train: epoch 10/10: loss 0.100, best validation NDCG@10 0.1000"]
