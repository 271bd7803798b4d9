"""`fedrec` command line: parses flags and dispatches; no logic of its own."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared.schema import DataError

MODES = ("centralized", "federated")


def _add_common(p: argparse.ArgumentParser) -> None:
    from shared.pipeline import DataConfig
    from simulation.centralized import ModelHyper
    from shared.training import TrainConfig
    d, m, t = DataConfig(), ModelHyper(), TrainConfig()
    p.add_argument("--dataset", default=d.dataset,
                   help="ml-100k | ml-latest-small | ml-1m | ml-20m | ml-25m | synthetic:UxI | a folder | a CSV/Parquet file")
    p.add_argument("--data-dir", help="folder holding the dataset (or <name>/ inside it)")
    p.add_argument("--catalog", help="item catalog CSV for a generic interactions file")
    p.add_argument("--no-download", action="store_true", help="never download; fail if not found locally")
    p.add_argument("--min-rating", type=float, help="count only ratings >= this as positives")
    p.add_argument("--user-core", type=int, default=d.user_core)
    p.add_argument("--item-core", type=int, default=d.item_core)
    p.add_argument("--text-encoder", default=d.text_encoder, choices=["all-MiniLM-L6-v2", "none"])
    p.add_argument("--dim", type=int, default=m.dim)
    p.add_argument("--layers", type=int, default=m.layers)
    p.add_argument("--heads", type=int, default=m.heads)
    p.add_argument("--max-len", type=int, default=m.max_len)
    p.add_argument("--dropout", type=float, default=m.dropout)
    p.add_argument("--id-buckets", type=int, default=m.id_buckets,
                   help="rows of the item ID table; a larger catalog hashes into them")
    p.add_argument("--no-content", action="store_true", help="item tower without content features")
    p.add_argument("--epochs", type=int, default=t.epochs)
    p.add_argument("--batch-size", type=int, default=t.batch_size)
    p.add_argument("--lr", type=float, default=t.lr)
    p.add_argument("--weight-decay", type=float, default=t.weight_decay)
    p.add_argument("--eval-every", type=int, default=t.eval_every)
    p.add_argument("--patience", type=int, default=t.patience)
    p.add_argument("--refit-fraction", type=float, default=t.refit_fraction,
                   help="centralized: after model selection, train this x the best epoch count "
                        "more epochs on train + validation items; federated: in this last "
                        "fraction of the rounds clients also train on their validation item "
                        "(0: no refit)")
    p.add_argument("--epoch-averaging", type=float, default=t.epoch_averaging,
                   help="select the exponential average of the weights over epochs (decay; 0: off)")
    p.add_argument("--time-budget", type=float, help="stop training after this many seconds")
    p.add_argument("--seed", type=int, default=t.seed)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _job(args: argparse.Namespace):
    from shared.pipeline import DataConfig
    from shared.training import TrainConfig
    from simulation.centralized import CentralizedJob, ModelHyper
    return CentralizedJob(
        data=DataConfig(dataset=args.dataset, data_dir=args.data_dir, catalog=args.catalog,
                        min_rating=args.min_rating, user_core=args.user_core,
                        item_core=args.item_core, text_encoder=args.text_encoder,
                        allow_download=not args.no_download, seed=args.seed),
        model=ModelHyper(dim=args.dim, layers=args.layers, heads=args.heads, max_len=args.max_len,
                         dropout=args.dropout, content=not args.no_content,
                         id_buckets=args.id_buckets),
        train=TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                          weight_decay=args.weight_decay, eval_every=args.eval_every,
                          patience=args.patience, seed=args.seed, time_budget_s=args.time_budget,
                          refit_fraction=args.refit_fraction,
                          epoch_averaging=args.epoch_averaging),
        threads=args.threads)


def _add_federated(p: argparse.ArgumentParser) -> None:
    from server.app import DEFAULTS as d
    g = p.add_argument_group("federated (--mode federated)")
    g.add_argument("--rounds", type=int, default=d["rounds"])
    g.add_argument("--clients-per-round", type=int, default=d["clients-per-round"])
    g.add_argument("--local-epochs", type=int, default=d["local-epochs"],
                   help="passes over its own history a client makes per round")
    g.add_argument("--local-lr", type=float, default=d["local-lr"])
    g.add_argument("--local-optimizer", choices=["adam", "sgd"], default=d["local-optimizer"])
    g.add_argument("--server-optimizer", choices=["fedavg", "fedavgm", "fedadam"], default=d["server-optimizer"])
    g.add_argument("--server-lr", type=float, default=d["server-lr"])
    g.add_argument("--server-eps", type=float, default=d["server-eps"], help="fedadam's epsilon (tau)")
    g.add_argument("--weighting", choices=["examples", "uniform"], default=d["weighting"])
    g.add_argument("--update-clip", type=float, default=d["update-clip"],
                   help="each client scales its update down to this L2 norm at most (0: off)")
    g.add_argument("--server-averaging", type=float, default=d["server-averaging"],
                   help="evaluate and ship the exponential average of the global weights over "
                        "rounds, with this decay (0: the last weights)")
    g.add_argument("--secure-aggregation", action=argparse.BooleanOptionalAction,
                   default=d["secure-aggregation"],
                   help="SecAgg+: the server learns only the sum of each round's updates")
    g.add_argument("--secagg-neighbours", type=int, default=d["secagg-neighbours"],
                   help="masking/sharing neighbours per client (0: sized from the round)")
    g.add_argument("--secagg-threshold", type=int, default=d["secagg-threshold"],
                   help="shares needed to rebuild a secret (0: a strict majority of holders)")
    g.add_argument("--secagg-dropout", type=float, default=d["secagg-dropout"],
                   help="share of a round's clients that may vanish (sizes the graph when "
                        "--secagg-neighbours is 0)")
    g.add_argument("--privacy", choices=["none", "record", "user", "both"], default=d["privacy"],
                   help="differential privacy: record (DP-SGD on each client, protects one chunk of "
                        "--record-window interactions), user (clipped updates plus noise on the "
                        "aggregate, protects a whole user), or both (docs/privacy.md)")
    g.add_argument("--target-epsilon", type=float, default=d["target-epsilon"],
                   help="epsilon per protected unit; the noise is computed for the planned rounds")
    g.add_argument("--delta", type=float, default=d["delta"])
    g.add_argument("--dp-accountant", choices=["rdp", "prv"], default=d["dp-accountant"])
    g.add_argument("--record-clip", type=float, default=d["record-clip"],
                   help="record level: L2 bound of one record's gradient")
    g.add_argument("--record-window", type=int, default=d["record-window"],
                   help="record level: interactions per record (at most --max-len + 1)")
    g.add_argument("--distributed-noise", action="store_true",
                   help="each client adds a share of the DP noise and only the secure sum carries "
                        "all of it: the guarantee then also holds against the server, conditional on "
                        "secure aggregation (docs/privacy.md)")
    g.add_argument("--compare-with", help="a centralized run's output folder, drawn on the same chart")
    g.add_argument("--eval-rounds", type=int, default=40,
                   help="score the global model on the validation items every this many rounds")


def _check_privacy_flags(args: argparse.Namespace) -> None:
    """Mistakes in the DP flags, reported before anything starts (exit 2, no traceback)."""
    from shared.privacy import PrivacyConfig
    try:
        PrivacyConfig(mode=args.privacy, target_epsilon=args.target_epsilon, delta=args.delta,
                      accountant=args.dp_accountant)
    except ValueError as err:
        _usage_error(str(err))
    if args.privacy in ("record", "both"):
        if args.record_clip <= 0:
            _usage_error(f"--record-clip must be > 0, not {args.record_clip}")
        if not 2 <= args.record_window <= args.max_len + 1:
            _usage_error(f"--record-window {args.record_window} must be between 2 and --max-len + 1 = "
                         f"{args.max_len + 1}")
    if args.privacy in ("user", "both") and args.update_clip <= 0:
        _usage_error("user-level DP needs --update-clip > 0 (it bounds one user's update)")
    if args.distributed_noise:
        sweep = getattr(args, "bench", None) == "privacy"   # its modes come from --modes
        if args.privacy == "none" and not sweep:
            _usage_error("--distributed-noise needs --privacy record, user or both")
        if not args.secure_aggregation:
            _usage_error("--distributed-noise needs secure aggregation (drop --no-secure-aggregation)")
        if (args.privacy in ("record", "both") or sweep) and (args.local_epochs != 1 or args.local_optimizer != "sgd"):
            _usage_error("--distributed-noise with record-level DP needs --local-epochs 1 and "
                         "--local-optimizer sgd (one plain SGD step per round)")
        if args.update_clip <= 0:
            _usage_error("--distributed-noise needs --update-clip > 0")


def _usage_error(message: str) -> None:
    print(f"fedrec: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _federated_job(args: argparse.Namespace):
    from dataclasses import replace
    from simulation.federated import FederatedJob
    _check_privacy_flags(args)
    job = _job(args)
    settings = {"rounds": args.rounds, "clients-per-round": args.clients_per_round,
                "local-epochs": args.local_epochs, "local-lr": args.local_lr,
                "local-optimizer": args.local_optimizer, "server-optimizer": args.server_optimizer,
                "server-lr": args.server_lr, "server-eps": args.server_eps, "weighting": args.weighting, "seed": args.seed,
                "server-averaging": args.server_averaging, "update-clip": args.update_clip,
                "secure-aggregation": args.secure_aggregation, "secagg-neighbours": args.secagg_neighbours,
                "secagg-threshold": args.secagg_threshold, "secagg-dropout": args.secagg_dropout,
                "refit-fraction": args.refit_fraction, "privacy": args.privacy,
                "target-epsilon": args.target_epsilon, "delta": args.delta, "dp-accountant": args.dp_accountant,
                "record-clip": args.record_clip, "record-window": args.record_window,
                "distributed-noise": args.distributed_noise}
    return FederatedJob(data=replace(job.data, activity_features=False), model=job.model,
                        settings=settings, eval_every=args.eval_rounds, compare_with=args.compare_with)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="fedrec", description="Federated, private recommendations")
    commands = top.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a recommender and write DIR/summary.json")
    train.add_argument("--mode", choices=MODES, default="centralized")
    _add_common(train)
    _add_federated(train)
    bench = commands.add_parser("bench", help="benchmarks")
    kinds = bench.add_subparsers(dest="bench", required=True)
    _add_common(kinds.add_parser("quality", help="baselines vs our model on one split"))
    store = commands.add_parser("store", help="write the catalog bundle and one log file per user "
                                "(what `flwr run .` and SuperNodes read)")
    _add_common(store)
    payload = kinds.add_parser("payload", help="bytes per client-round at 1.7k, 10k, 100k items")
    payload.add_argument("--out", type=Path, required=True)
    secagg = kinds.add_parser("secagg", help="round time and bytes with vs without secure "
                              "aggregation, side by side in one simulation")
    _add_common(secagg)
    secagg.add_argument("--clients-per-round", type=int, default=100)
    secagg.add_argument("--rounds", type=int, default=6, help="pairs of rounds (plain, secure)")
    privacy = kinds.add_parser("privacy", help="privacy-utility sweep (record and user level, epsilon "
                               "1, 2, 4, 8, inf) with a canary membership-inference audit")
    _add_common(privacy)
    _add_federated(privacy)
    privacy.add_argument("--epsilons", default="1,2,4,8,inf", help="comma-separated target epsilons")
    privacy.add_argument("--modes", default="record,user", help="comma-separated: record, user, both")
    privacy.add_argument("--canaries", type=int, default=100, help="member canaries (as many non-members)")
    compare = commands.add_parser("compare", help="is a difference between two kinds of run real? "
                                  "Ratio of mean NDCG@10 with a bootstrap interval over users and seeds")
    compare.add_argument("--baseline", type=Path, nargs="+", required=True, help="run folders (test_ranks.npy)")
    compare.add_argument("--candidate", type=Path, nargs="+", required=True, help="run folders (test_ranks.npy)")
    compare.add_argument("--out", type=Path, help="write compare.json here")
    speed = kinds.add_parser("dp-speed", help="DP-SGD vs plain local training time, 1.7k and 50k items")
    speed.add_argument("--out", type=Path, required=True)
    speed.add_argument("--repeats", type=int, default=5)
    return top


def _log_to_stderr() -> None:
    """fedrec's own log lines (resume, rejected replies) on stderr, once."""
    import logging
    logger = logging.getLogger("fedrec")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("fedrec: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _compare(args) -> None:
    import numpy as np
    from shared.compare import compare_runs
    from shared.report import write_json

    def ranks(folder: Path):
        path = folder / "test_ranks.npy"
        if not path.exists():
            raise DataError(f"{path}: no per-user test ranks (`fedrec train` writes them; older runs lack them)")
        return np.load(path)

    try:
        report = compare_runs([ranks(f) for f in args.baseline], [ranks(f) for f in args.candidate])
    except ValueError as err:
        raise DataError(str(err)) from None
    report.update(baseline=[str(f) for f in args.baseline], candidate=[str(f) for f in args.candidate])
    low, high = report["ratio_ci95"]
    print(f"NDCG@10 baseline {report['baseline_ndcg@10']:.4f} ({report['baseline_runs']} runs), candidate "
          f"{report['candidate_ndcg@10']:.4f} ({report['candidate_runs']} runs): candidate / baseline "
          f"{report['ratio']:.4f}, 95% interval {low:.4f}-{high:.4f} ({report['users']} users)")
    if args.out:
        write_json(args.out / "compare.json", report)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    _log_to_stderr()
    try:
        if args.command == "train":
            if args.mode == "federated":
                from simulation.federated import run_federated
                summary = run_federated(_federated_job(args), args.out, progress=not args.quiet)
            else:
                from simulation.centralized import run_centralized
                summary = run_centralized(_job(args), args.out, progress=not args.quiet)
            m = summary["metrics"]
            print(f"{summary['dataset']} {summary['mode']}: NDCG@10 {m['ndcg@10']:.4f}  "
                  f"HR@10 {m['hr@10']:.4f}  MRR@10 {m['mrr@10']:.4f}  coverage@10 "
                  f"{m['coverage@10']:.3f}  ({summary['wall_seconds']:.0f} s) -> {args.out}/summary.json")
        elif args.command == "bench" and args.bench == "quality":
            from simulation.bench import run_quality_bench
            run_quality_bench(_job(args), args.out, progress=not args.quiet)
        elif args.command == "store":
            from dataclasses import replace
            from shared.pipeline import prepare_data
            from simulation.federated import write_store
            prepared = prepare_data(replace(_job(args).data, activity_features=False),
                                    show_progress=not args.quiet)
            write_store(prepared, args.out)
            print(f"{len(prepared.split)} user logs and the catalog bundle -> {args.out}")
        elif args.command == "bench" and args.bench == "payload":
            from simulation.bench import run_payload_bench
            run_payload_bench(args.out)
        elif args.command == "bench" and args.bench == "secagg":
            from dataclasses import replace
            from simulation.bench import run_secagg_bench
            run_secagg_bench(replace(_job(args).data, activity_features=False), args.out,
                             clients_per_round=args.clients_per_round, rounds=args.rounds)
        elif args.command == "bench" and args.bench == "privacy":
            from simulation.dp_bench import run_privacy_sweep
            run_privacy_sweep(_federated_job(args), args.out,
                              epsilons=tuple(float(e) for e in args.epsilons.split(",")),
                              modes=tuple(m.strip() for m in args.modes.split(",")),
                              canaries=args.canaries, progress=not args.quiet)
        elif args.command == "compare":
            _compare(args)
        elif args.command == "bench" and args.bench == "dp-speed":
            from simulation.dp_bench import run_dp_speed_bench
            run_dp_speed_bench(args.out, repeats=args.repeats)
    except DataError as err:
        print(f"fedrec: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
