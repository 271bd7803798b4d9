"""Every setting a user can give, once: key, type, default, help, and the check of its value.

The `fedrec` flags (`--key`), the ServerApp's run config (`flwr run . --run-config "key=value"`,
declared in pyproject.toml's `[tool.flwr.app.config]`, which a test keeps in step with this
table) and the dataclass defaults all come from here. Rules about a combination of settings
are written once, in `combination_problems`, and used by the command line, the ServerApp and
(for the ones a device must enforce itself) the client.

Pure: no torch, no Flower, nothing from client/ or server/.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from fedrec.shared.secagg.params import MIN_CLIENTS as MIN_SECURE_CLIENTS

Check = Callable[[Any], "str | None"]


class SettingsError(ValueError):
    """A setting, or a combination of settings, that cannot work; the message says which and why."""


def at_least(low: float) -> Check:
    return lambda v: None if v >= low else f"must be >= {low:g}"


def column_problem(spec: str | None) -> str | None:
    """None if `spec` reads as FIELD=COLUMN pairs for user, item, timestamp and rating."""
    if spec is None:
        return None
    for pair in spec.split(","):
        field, _, column = pair.partition("=")
        if field.strip() not in ("user", "item", "timestamp", "rating") or not column.strip():
            return f"{pair.strip()!r}: use FIELD=COLUMN with FIELD one of user, item, timestamp, rating"
    return None


def positive(v) -> str | None:
    return None if v > 0 else "must be > 0"


def fraction(v) -> str | None:
    return None if 0 <= v < 1 else "must be in [0, 1)"


def probability_open(v) -> str | None:
    return None if 0 < v < 1 else "must be in (0, 1)"


@dataclass(frozen=True)
class Setting:
    key: str             # flag `--key`, run-config key `key`
    type: type           # int, float, str or bool (bool flags get --key / --no-key)
    default: Any
    help: str
    group: str           # data | model | train | federation | secagg | privacy | output
    choices: tuple | None = None
    check: Check | None = None
    run_config: bool = False  # read by the ServerApp (declared for `flwr run`)
    optional: bool = False    # None allowed (no value)
    cli: bool = True          # a `fedrec` flag (False: set by the simulation itself, or run config only)

    @property
    def dest(self) -> str:
        return self.key.replace("-", "_")

    def parse(self, value: Any) -> Any:
        """The value as this setting's type (run config and TOML give strings, ints or floats)."""
        if value is None and self.optional:
            return None
        if self.type is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise SettingsError(f"{self.key}: expected true or false, not {value!r}")
                return value.lower() in ("true", "1")
            return bool(value)
        try:
            return self.type(value)
        except (TypeError, ValueError):
            raise SettingsError(f"{self.key}: expected {self.type.__name__}, not {value!r}") from None

    def problem(self, value: Any) -> str | None:
        if value is None:
            return None if self.optional else f"--{self.key}: a value is required"
        if self.choices is not None and value not in self.choices:
            return f"--{self.key}: must be one of {', '.join(map(str, self.choices))}, not {value!r}"
        if isinstance(value, float) and math.isnan(value):
            return f"--{self.key}: must be a number, not nan"
        if self.check is not None:
            reason = self.check(value)
            if reason:
                return f"--{self.key} {value!r}: {reason}"
        return None


def _s(key, type_, default, help_, group, **kw) -> Setting:
    return Setting(key, type_, default, help_, group, **kw)


SETTINGS: tuple[Setting, ...] = (
    # data
    _s("dataset", str, "ml-100k", "ml-100k | ml-latest-small | ml-1m | ml-20m | ml-25m | synthetic:UxI | "
       "a folder | a CSV/Parquet file with columns user,item,timestamp[,rating]", "data"),
    _s("data-dir", str, None, "folder holding the dataset (or <name>/ inside it)", "data", optional=True),
    _s("catalog", str, None, "item catalog CSV for a generic interactions file", "data", optional=True),
    _s("columns", str, None, "a generic file's column names, e.g. user=user_id,item=movie,timestamp=ts,rating=stars "
       "(unset: user, item, timestamp and, when there is one, rating)", "data", optional=True,
       check=lambda v: column_problem(v)),
    _s("drop-unknown-items", bool, False, "drop (and count) events whose item is not in the catalog instead of "
       "stopping at the first", "data"),
    _s("download", bool, True, "download a registered dataset when it is not found locally "
       "(sha256-checked); --no-download fails instead", "data"),
    _s("activity-features", bool, False, "centralized: item popularity and recency features counted over every "
       "user's training events (some later than a given user's test event); federated runs never have them",
       "data"),
    _s("rated-items-only", bool, False, "rank only catalog items the log has an event for (as RecBole does; "
       "ML-1M lists movies nobody rated)", "data"),
    _s("min-rating", float, None, "count only ratings >= this as positives (default: every event)", "data",
       optional=True),
    _s("user-core", int, 3, "drop users with fewer events than this (3: a training, a validation and a "
       "test item)", "data", check=at_least(3)),
    _s("last-events", int, 0, "keep only each user's newest this many events (0: all): a sparse log cut from a "
       "dense one", "data", check=at_least(0)),
    _s("item-core", int, 0, "drop items with fewer events than this (0: keep all)", "data", check=at_least(0)),
    _s("seed", int, 0, "seed of synthetic data, the split's ties, the model's initialisation and training",
       "data", check=at_least(0), run_config=True),
    _s("text-encoder", str, "all-MiniLM-L6-v2", "sentence encoder for item titles and descriptions", "data",
       choices=("all-MiniLM-L6-v2", "none")),
    # model (the same in every mode; clients build the model the server sends them the shape of)
    _s("dim", int, 64, "width of item and user vectors", "model", check=at_least(1), run_config=True),
    _s("layers", int, 2, "self-attention blocks in the user interest encoder", "model", check=at_least(1),
       run_config=True),
    _s("heads", int, 2, "attention heads per block (must divide --dim)", "model", check=at_least(1),
       run_config=True),
    _s("max-len", int, 50, "most recent items of a history the encoder reads", "model", check=at_least(1),
       run_config=True),
    _s("dropout", float, 0.3, "dropout in the encoder during training", "model", check=fraction,
       run_config=True),
    _s("id-buckets", int, 4096, "rows of the item ID table; a larger catalog hashes into them", "model",
       check=at_least(1), run_config=True),
    _s("id-dropout", float, 0.0, "training: each item's ID row is left out with this probability, so the content "
       "projection learns to place an item alone (DropoutNet, Volkovs et al. 2017): what a new item, with no ID row "
       "trained, relies on. Not applied in DP-SGD steps", "model", check=fraction, run_config=True),
    _s("content", bool, True, "item tower with content features (text, genres, year); --no-content: IDs only",
       "model", run_config=True),
    _s("fusion", str, "auto", "blend the encoder's scores with an item model's: ease, item-knn (both recency-"
       "weighted), popular, or auto (any of them; none: the encoder alone). The blend (the encoder alone, an item "
       "model alone, the encoder with one item model at a weight, or with EASE and item-kNN together) is chosen on "
       "validation (the best that keeps the encoder, unless an item model alone is clearly ahead). Centralized: the item models' settings too; "
       "federated: the item models come from one secure sum of item co-occurrence counts (needs secure "
       "aggregation, no DP), with --fusion-decay, --ease-l2 and --knn-*, and the blend from a second secure sum of "
       "devices' validation NDCG@10 (--blend-devices)",
       "model", choices=("auto", "ease", "item-knn", "popular", "none"), run_config=True),
    _s("fusion-weight", float, 0.25, "federated, without a blend round (--blend-devices 0, too few devices, it aborted, or no "
       "encoder from before the refit rounds): "
       "the item model's weight against the encoder's (both standardised per user; auto: ease)", "model",
       check=at_least(0), run_config=True),
    _s("blend-devices", int, 200, "federated: devices asked for their validation NDCG@10 under each candidate "
       "blend, summed securely (at least --counts-min-devices; 0: no round, --fusion-weight)", "model",
       check=at_least(0), run_config=True),
    _s("fusion-decay", float, 0.95, "federated: EASE and item-kNN weigh a history item decay^age (newest: 1)",
       "model", check=positive, run_config=True),
    _s("ease-l2", float, 500.0, "federated: EASE's ridge", "model", check=positive, run_config=True),
    _s("counts-min-devices", int, 100, "federated: the exact sums' floor (the counts and the blend round): the server "
       "aborts, and a device refuses to unmask, a sum of fewer witnessed devices (a device takes its own from its node config or app settings, "
       "never from the run config)", "model",
       check=at_least(2), run_config=True),
    _s("knn-neighbours", int, 50, "federated: neighbours each item keeps in the item-kNN", "model",
       check=at_least(1), run_config=True),
    _s("knn-shrink", float, 10.0, "federated: the item-kNN's similarity shrinkage", "model", check=at_least(0),
       run_config=True),
    # centralized training
    _s("epochs", int, 150, "most passes over the training data (early stopping may end sooner)", "train",
       check=at_least(1)),
    _s("batch-size", int, 64, "sequences per training step", "train", check=at_least(1)),
    _s("lr", float, 1e-2, "Adam learning rate", "train", check=positive),
    _s("weight-decay", float, 0.0, "AdamW weight decay", "train", check=at_least(0)),
    _s("eval-every", int, 5, "epochs between validation runs", "train", check=at_least(1)),
    _s("patience", int, 5, "validation runs without improvement before stopping", "train", check=at_least(1)),
    _s("epoch-averaging", float, 0.5, "select the exponential average of the weights over epochs with this "
       "decay (0: the last weights)", "train", check=fraction),
    _s("refit-fraction", float, 0.1, "centralized: after model selection, train this x the best epoch count "
       "more epochs on train + validation items; federated: in this last fraction of the rounds clients "
       "also train on their validation item (0: no refit)", "train", check=fraction, run_config=True),
    _s("time-budget", float, None, "centralized: stop training after this many seconds, keeping the best model so far "
       "(federated: --federated-time-budget)",
       "train", optional=True, check=positive),

    _s("threads", int, 2, "torch CPU threads", "train", check=at_least(1)),
    # federation
    _s("rounds", int, 0, "federated rounds (0: from the population, so each device gets --participations turns; "
       "summary.json says what the schedule chose and why)", "federation", check=at_least(0), run_config=True),
    _s("participations", float, 13.25, "with --rounds 0 or --clients-per-round 0: the turns (local passes) each "
       "device gets over the run; 13.25 is ML-100K's tuned 500 rounds of 25 of its 943 users", "federation",
       check=positive, run_config=True),
    _s("federated-time-budget", float, 0.0, "seconds the rounds before the refit may take: once spent, the run "
       "goes on to its refit rounds (--refit-fraction of the rounds it then has) and ends before --rounds; "
       "summary.json says why it stopped. The counts, blend and test rounds come after it (0: no limit)",
       "federation", check=at_least(0), run_config=True),
    _s("clients-per-round", int, 0, "clients sampled each round (user-level DP: the expected number; 0: from "
       "the population: 25, or more once 25 a round would need over 500 rounds for --participations)",
       "federation", check=at_least(0), run_config=True),
    _s("local-epochs", int, 1, "passes over its own history a client makes per round", "federation",
       check=at_least(1), run_config=True),
    _s("local-lr", float, 1.0, "the client's learning rate", "federation", check=positive, run_config=True),
    _s("local-optimizer", str, "sgd", "the client's optimizer (fresh every round: no state is kept)",
       "federation", choices=("adam", "sgd"), run_config=True),
    _s("train-on", str, "valid", "valid: clients train on their training items; test: also on their "
       "validation item", "federation", choices=("valid", "test"), run_config=True),
    _s("update-clip", float, 5.0, "each client scales its update down to this L2 norm at most (0: off)",
       "federation", check=at_least(0), run_config=True),
    _s("server-optimizer", str, "fedadam", "how the server applies the mean update", "federation",
       choices=("fedavg", "fedavgm", "fedadam"), run_config=True),
    _s("server-lr", float, 1e-2, "the server optimizer's learning rate", "federation", check=positive,
       run_config=True),
    _s("server-eps", float, 1e-8, "fedadam's epsilon (tau)", "federation", check=positive, run_config=True),
    _s("weighting", str, "examples", "a client's weight in the mean: its training targets (capped), or one "
       "vote per user", "federation", choices=("examples", "uniform"), run_config=True),
    _s("server-averaging", float, 0.95, "evaluate and ship the exponential average of the global weights "
       "over rounds, with this decay (0: the last weights)", "federation", check=fraction, run_config=True),
    _s("federated-eval-every", int, 0, "the server asks clients for validation metrics every this many "
       "rounds (0: never)", "federation", check=at_least(0), run_config=True),
    _s("eval-clients", int, 100, "clients asked per federated validation (the same ones each time)", "federation",
       check=at_least(1), run_config=True),
    _s("federated-patience", int, 3, "with --federated-eval-every: after this many federated validations in a row "
       "without a better NDCG@10, the run goes on to its refit rounds and ends (0: never; summary.json says why)",
       "federation", check=at_least(0), run_config=True),
    _s("final-test", bool, True, "every client evaluates the final model on its test item", "federation",
       run_config=True),
    _s("min-nodes", int, 0, "wait until this many nodes are connected before round 1 (0: clients-per-round, or 25 "
       "when that is 0)",
       "federation", check=at_least(0), run_config=True, cli=False),
    _s("wait-for-nodes", float, 300.0, "seconds to wait for min-nodes before giving up", "federation",
       check=positive, run_config=True),
    _s("store", str, "runs/store/ml-100k", "folder with the catalog bundle and users/<partition-id>.npz "
       "(`fedrec store` writes it)", "federation", run_config=True, cli=False),
    _s("out", str, "runs/federated", "where the server writes checkpoints and results", "output",
       run_config=True, cli=False),
    _s("eval-rounds", int, 40, "simulation: score the global model on the validation items every this many "
       "rounds", "federation", check=at_least(1)),
    _s("compare-with", str, None, "a centralized run's output folder, drawn on the same chart", "federation",
       optional=True),
    # secure aggregation
    _s("secure-aggregation", bool, True, "SecAgg+: the server learns only the sum of each round's updates",
       "secagg", run_config=True),
    _s("secagg-neighbours", int, 0, "masking/sharing neighbours per client (0: sized from the round)",
       "secagg", check=at_least(0), run_config=True),
    _s("secagg-threshold", int, 0, "shares needed to rebuild a secret (0: just above two thirds of the holders)",
       "secagg", check=at_least(0), run_config=True),
    _s("secagg-dropout", float, 0.1, "share of a round's clients that may vanish (sizes the graph when "
       "--secagg-neighbours is 0)", "secagg", check=fraction, run_config=True),
    # differential privacy
    _s("privacy", str, "none", "differential privacy: record (DP-SGD on each client, protects one chunk of "
       "--record-window interactions), user (clipped updates plus noise on the aggregate, protects a whole "
       "user), or both (docs/privacy.md)", "privacy", choices=("none", "record", "user", "both"),
       run_config=True),
    _s("target-epsilon", float, 8.0, "epsilon per protected unit; the noise is computed for the planned "
       "rounds (inf: no noise)", "privacy", check=positive, run_config=True),
    _s("delta", float, 1e-5, "delta per protected unit", "privacy", check=probability_open, run_config=True),
    _s("dp-accountant", str, "rdp", "privacy accountant", "privacy", choices=("rdp", "prv"), run_config=True),
    _s("record-clip", float, 1.0, "record level: L2 bound of one record's gradient", "privacy", check=positive,
       run_config=True),
    _s("record-window", int, 51, "record level: interactions per record (at most --max-len + 1)", "privacy",
       check=at_least(2), run_config=True),
    _s("private-model", str, "item-item", "what a DP run trains: item-item (one noisy secure sum of every "
       "user's item co-occurrence, EASE on it; user level, so it covers records too) or encoder (DP-SGD or "
       "DP-FedAvg rounds of the sequence model; docs/privacy.md)", "privacy", choices=("item-item", "encoder"),
       run_config=True),
    _s("distributed-noise", bool, False, "each client adds a share of the DP noise and only the secure sum "
       "carries all of it: the guarantee then also holds against the server, conditional on secure "
       "aggregation (docs/privacy.md)", "privacy", run_config=True),
)

BY_KEY: dict[str, Setting] = {s.key: s for s in SETTINGS}


class PrivacyUnits:
    """Which units a privacy `mode` ("none", "record", "user", "both") protects: one rule for the
    server's plan (PrivacyConfig) and the round a client is sent (PrivacyRound)."""
    mode: str

    @property
    def record(self) -> bool:
        return self.mode in ("record", "both")

    @property
    def user(self) -> bool:
        return self.mode in ("user", "both")
RUN_CONFIG: tuple[Setting, ...] = tuple(s for s in SETTINGS if s.run_config)


def default(key: str) -> Any:
    return BY_KEY[key].default


def run_config_defaults() -> dict[str, Any]:
    return {s.key: s.default for s in RUN_CONFIG}


def read_run_config(run_config: dict) -> dict[str, Any]:
    """The ServerApp's settings: defaults overridden by the run config, typed and checked.
    Raises SettingsError naming every key that is unknown or wrong."""
    unknown = sorted(set(run_config) - {s.key for s in RUN_CONFIG})
    if unknown:
        raise SettingsError(f"unknown run-config key(s) {unknown}")
    values = {s.key: s.parse(run_config[s.key]) if s.key in run_config else s.default for s in RUN_CONFIG}
    check(values)
    return values


def check(values: dict[str, Any]) -> None:
    """Raises SettingsError with every problem in `values` (a key -> value map; keys missing
    from it are not checked), each value's own check first, then the combinations."""
    problems = [p for key, v in values.items() if key in BY_KEY for p in [BY_KEY[key].problem(v)] if p]
    if not problems:
        problems = combination_problems(values)
    if problems:
        raise SettingsError("; ".join(problems))


def _on(values: dict, key: str):
    return values.get(key, default(key))


def combination_problems(values: dict[str, Any]) -> list[str]:
    """Rules about settings that are fine alone but not together: each written once, here."""
    problems = []
    privacy = _on(values, "privacy")
    record, user = privacy in ("record", "both"), privacy in ("user", "both")
    if record and not 2 <= _on(values, "record-window") <= _on(values, "max-len") + 1:
        problems.append(f"--record-window {_on(values, 'record-window')} must be between 2 and --max-len + 1 = "
                        f"{_on(values, 'max-len') + 1}")
    if user and _on(values, "update-clip") <= 0:
        problems.append("user-level DP needs --update-clip > 0 (it bounds one user's update)")
    if _on(values, "dim") % _on(values, "heads"):
        problems.append(f"--heads {_on(values, 'heads')} must divide --dim {_on(values, 'dim')}")
    if privacy != "none" and _on(values, "private-model") == "item-item" and not _on(values, "secure-aggregation"):
        problems.append("--private-model item-item is released by one secure sum with distributed noise: it "
                        "needs secure aggregation (or --private-model encoder)")
    if _on(values, "distributed-noise"):
        problems += distributed_noise_problems(privacy, _on(values, "secure-aggregation"),
                                               _on(values, "local-epochs"), _on(values, "local-optimizer"),
                                               _on(values, "update-clip"))
    if privacy != "none" and _on(values, "private-model") == "encoder" and _on(values, "federated-eval-every") \
            and _on(values, "federated-patience"):
        problems.append(f"--federated-patience {_on(values, 'federated-patience')} would decide how long the DP "
                        "model trains from validation replies that are not noised: with --privacy use "
                        "--federated-patience 0 (or no --federated-eval-every)")
    if _on(values, "secure-aggregation") and 0 < _on(values, "clients-per-round") < MIN_SECURE_CLIENTS:
        problems.append(f"secure aggregation needs --clients-per-round >= {MIN_SECURE_CLIENTS} (got "
                        f"{_on(values, 'clients-per-round')}): masking needs company; or --no-secure-aggregation")
    if _on(values, "secagg-neighbours") % 2:
        problems.append(f"--secagg-neighbours {_on(values, 'secagg-neighbours')} must be even (the SecAgg+ "
                        "graph joins each client to k/2 on either side of a ring)")
    if _on(values, "secagg-threshold") and 0 < _on(values, "clients-per-round") < _on(values, "secagg-threshold"):
        problems.append(f"--secagg-threshold {_on(values, 'secagg-threshold')} exceeds --clients-per-round "
                        f"{_on(values, 'clients-per-round')}")
    return problems




def distributed_noise_problems(privacy: str, secure: bool, local_epochs: int, optimizer: str,
                               update_clip: float) -> list[str]:
    """What distributed DP noise needs; the server checks it all before a run."""
    problems = []
    if privacy == "none":
        problems.append("--distributed-noise needs --privacy record, user or both")
    if not secure:
        problems.append("--distributed-noise needs secure aggregation: without it the server would see each "
                        "update with only its own small share of the noise")
    if privacy in ("record", "both"):
        problems += distributed_record_step_problems(local_epochs, optimizer)
    if update_clip <= 0:
        problems.append("--distributed-noise needs --update-clip > 0 (it bounds each contribution)")
    return problems


def distributed_record_step_problems(local_epochs: int, optimizer: str) -> list[str]:
    """Record-level DP with distributed noise needs one plain SGD step a round: only then is the
    sum of the updates the sum of the clipped gradients plus the sum of the noise shares. A
    client checks this again on the round it is sent, since it cannot trust the server."""
    if local_epochs != 1 or optimizer != "sgd":
        return ["--distributed-noise with record-level DP needs --local-epochs 1 and --local-optimizer "
                f"sgd: one plain SGD step per round (got {local_epochs} x {optimizer})"]
    return []
