"""`fedrec` command line: flags from the settings table (shared/settings.py), one call each.

No logic of its own: a setting's type, default, help and check live in the table, the jobs
are built by the modules that run them, and a mistake in the flags is a usage error (exit 2)
before anything starts.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedrec import __version__, deploy_cli
from fedrec.shared.data.schema import DataError
from fedrec.shared.errors import BundleError, RunFailed, UserFileError
from fedrec.shared.settings import SETTINGS, SettingsError, check, default

MODES = ("centralized", "federated")
TRAIN = ("data", "model", "train")
FEDERATED = ("federation", "secagg", "privacy")


def _add_settings(p: argparse.ArgumentParser, groups: tuple[str, ...]) -> None:
    for group in groups:
        g = p.add_argument_group(group)
        for s in SETTINGS:
            if s.group != group or not s.cli:
                continue
            if s.type is bool:
                on = f"--{s.key}" if s.default else f"--no-{s.key}"
                g.add_argument(f"--{s.key}", action=argparse.BooleanOptionalAction, default=s.default,
                               help=f"{s.help} (default: {on})".replace("%", "%%"))
            else:
                g.add_argument(f"--{s.key}", type=s.type, default=s.default, choices=s.choices,
                               help=f"{s.help} (default: {s.default})".replace("%", "%%"))


def _add_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress and no data report: the final line (and warnings)")
    p.add_argument("--verbose", action="store_true",
                   help="also Flower's INFO lines, its deprecation notices and Ray's warnings")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="fedrec", description="Federated, private recommendations")
    top.add_argument("--version", action="version", version=f"fedrec {__version__}")
    commands = top.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a recommender and write DIR/summary.json")
    train.add_argument("--mode", choices=MODES, default="centralized",
                       help="centralized: every log in one place (the upper bound); federated: Flower's simulation, "
                            "one device per user (default: centralized)")
    _add_settings(train, TRAIN + FEDERATED)
    _add_output(train)
    store = commands.add_parser("store", help="write the catalog bundle and one log file per user "
                                "(what `flwr run .` and SuperNodes read)")
    _add_settings(store, ("data",))
    _add_output(store)
    compare = commands.add_parser("compare", help="is a difference between two kinds of run real? "
                                  "Ratio of mean NDCG@10 with a bootstrap interval over users and seeds")
    compare.add_argument("--baseline", type=Path, nargs="+", required=True, help="run folders (test_ranks.npy)")
    compare.add_argument("--candidate", type=Path, nargs="+", required=True, help="run folders (test_ranks.npy)")
    compare.add_argument("--out", type=Path, help="write compare.json here")
    recommend = commands.add_parser("recommend", help="recommendations from a published bundle, on this machine: "
                                    "the history is read here and sent nowhere")
    recommend.add_argument("--bundle", type=Path, required=True, help="bundle folder (a run's OUT/bundle)")
    asked = recommend.add_mutually_exclusive_group(required=True)
    asked.add_argument("--history", help="item ids the user touched, oldest first, comma-separated")
    asked.add_argument("--similar-to", help="an item id: the items nearest to it (by item vector; --diversity and "
                       "reasons do not apply)")
    recommend.add_argument("-k", type=int, default=10, help="how many items (default: 10)")
    recommend.add_argument("--diversity", type=float, default=0.0,
                           help="0 ranks by relevance; up to 1 trades relevance for variety (MMR) (default: 0)")
    recommend.add_argument("--no-explain", action="store_true", help="leave out the 'because you watched' items")
    recommend.add_argument("--json", action="store_true", help="print JSON instead of a table")
    show = commands.add_parser("show", help="a finished run for a person: its NDCG@10 beside a reference run's, "
                               "and a few test users' recent history, recommendations and reasons")
    show.add_argument("--run", type=Path, required=True, help="a run folder (summary.json and bundle/)")
    show.add_argument("--users", type=int, default=3, help="test users to show, picked at random (default: 3)")
    show.add_argument("--reference", type=Path, nargs="*", default=(),
                      help="run folders or summary JSON files to compare NDCG@10 with; the first that exists")
    serve = commands.add_parser("serve", help="the recommendation service: gRPC over a bundle folder, reloaded "
                                "when a newer bundle is published there")
    serve.add_argument("--bundle", type=Path, required=True, help="bundle folder (a run's OUT/bundle)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=int, default=50061, help="port (default: 50061)")
    serve.add_argument("--workers", type=int, default=8, help="request threads (default: 8)")
    _add_benches(commands.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True))
    deploy_cli.add_parsers(commands, lambda p: _add_settings(p, ("model",) + FEDERATED))
    return top


def _add_benches(kinds) -> None:
    quality = kinds.add_parser("quality", help="baselines vs our model on one split")
    _add_settings(quality, TRAIN)
    _add_output(quality)
    held_out = kinds.add_parser("held-out", help="the held-out-user protocol: 15%% of users never train; "
                                "baselines and our model score their last item, and as new devices their event after the first 1, 2, 5")
    _add_settings(held_out, TRAIN)
    _add_output(held_out)
    held_out.add_argument("--held-out-fraction", type=float, default=0.15, help="share of users held out")
    temporal = kinds.add_parser("temporal", help="a global temporal split: one cutoff in time; nothing trained "
                                "on is later than a test event")
    _add_settings(temporal, TRAIN)
    _add_output(temporal)
    temporal.add_argument("--test-fraction", type=float, default=0.1, help="share of all events after the cutoff")
    rule = kinds.add_parser("blend-rule", help="the rules that pick a blend from a few hundred devices' validation, "
                            "judged on the other users' validation (never on test)")
    _add_settings(rule, TRAIN)
    _add_output(rule)
    rule.add_argument("--epoch-counts", default="3,10,150", help="comma-separated epoch counts: weak to converged "
                      "encoders (default: 3,10,150)")
    rule.add_argument("--picks", type=int, default=default("blend-devices"), help="users a rule picks from "
                      "(default: --blend-devices)")
    rule.add_argument("--draws", type=int, default=2000, help="random splits of the users (default: 2000)")
    _add_recommendation_benches(kinds)
    _add_federation_benches(kinds)


def _add_recommendation_benches(kinds) -> None:
    coldstart = kinds.add_parser("coldstart", help="new items: the newest 15%% of items left out of training, "
                                 "then added by their content; cold, warm and all test targets")
    _add_settings(coldstart, TRAIN)
    _add_output(coldstart)
    coldstart.add_argument("--cold-fraction", type=float, default=0.15, help="share of items held out as new "
                           "(default: 0.15)")
    coldstart.add_argument("--cold-id-dropout", type=float, default=0.1, help="--id-dropout of the model that meets "
                           "the new items (the all-items model uses --id-dropout; the warm reference 0) (default: 0.1)")
    diversity = kinds.add_parser("diversity", help="MMR re-ranking at several strengths: NDCG@10 against "
                                 "intra-list diversity, coverage and novelty (table and plot)")
    _add_settings(diversity, ("data",))
    diversity.add_argument("--bundle", type=Path, required=True, help="a bundle trained on the same data settings")
    diversity.add_argument("--out", type=Path, required=True, help="output folder")
    recommend = kinds.add_parser("recommend", help="explanation faithfulness and time, new users, the two-stage "
                                 "path's noise cost, event-to-recommendation time")
    _add_settings(recommend, ("data",))
    recommend.add_argument("--bundle", type=Path, required=True, help="a bundle trained on the same data settings")
    recommend.add_argument("--users", type=int, default=300, help="random test users for the explanation, two-stage "
                           "and timing measurements (default: 300)")
    recommend.add_argument("--out", type=Path, required=True, help="output folder")
    serve = kinds.add_parser("serve", help="the recommendation service under load on loopback: latency, QPS, "
                             "ANN recall, memory, and the on-device top 10")
    serve.add_argument("--bundle", type=Path, required=True, help="a published bundle (a run's OUT/bundle)")
    serve.add_argument("--items", type=int, default=100_000,
                       help="catalog size to serve, made from the bundle's items when larger; 0: the bundle as is "
                            "(default: 100000)")
    serve.add_argument("--requests", type=int, default=5000, help="timed requests (default: 5000)")
    serve.add_argument("--concurrency", type=int, default=8, help="requests in flight (default: 8)")
    serve.add_argument("--out", type=Path, required=True, help="output folder")


def _add_federation_benches(kinds) -> None:
    payload = kinds.add_parser("payload", help="bytes per client-round at 1.7k, 10k, 100k items")
    payload.add_argument("--out", type=Path, required=True, help="output folder")
    population = kinds.add_parser("population", help="round time and peak memory of federated runs at growing "
                                  "populations (synthetic data, the same clients per round)")
    population.add_argument("--out", type=Path, required=True, help="output folder")
    population.add_argument("--users", default="1000,10000,100000", help="comma-separated populations")
    population.add_argument("--items", type=int, default=100_000, help="catalog size")
    population.add_argument("--clients-per-round", type=int, default=25, help="clients in each round")
    population.add_argument("--rounds", type=int, default=3, help="rounds per run (round 1 also starts Ray)")
    population.add_argument("--no-secure-aggregation", dest="secure", action="store_false",
                            help="plain rounds (default: secure aggregation, as shipped)")
    schedule = kinds.add_parser("schedule", help="the schedule derived from the population, federated against "
                                "centralized on several datasets (the encoder alone, plain rounds)")
    schedule.add_argument("--out", type=Path, required=True, help="output folder (finished runs there are kept)")
    schedule.add_argument("--datasets", default="ml-100k,ml-latest-small,synthetic:5000x10000,synthetic:20000x10000",
                          help="comma-separated datasets")
    schedule.add_argument("--data-dir", default=None, help="folder holding the MovieLens datasets")
    buckets = kinds.add_parser("buckets", help="the hashed item-ID table's size against quality, collisions and "
                               "payload (centralized runs, one per size)")
    buckets.add_argument("--out", type=Path, required=True, help="output folder")
    buckets.add_argument("--dataset", default="synthetic:5000x10000", help="dataset (default: synthetic:5000x10000)")
    buckets.add_argument("--data-dir", default=None, help="folder holding the MovieLens datasets")
    buckets.add_argument("--buckets", default="1024,4096,16384", help="comma-separated ID-table sizes")
    buckets.add_argument("--epochs", type=int, default=30, help="most epochs per run (default: 30)")
    secagg = kinds.add_parser("secagg", help="round time and bytes with vs without secure "
                              "aggregation, side by side in one simulation")
    _add_settings(secagg, ("data", "secagg"))
    _add_output(secagg)
    secagg.add_argument("--clients-per-round", type=int, default=100, help="clients in each measured round")
    secagg.add_argument("--rounds", type=int, default=6, help="pairs of rounds (plain, secure)")
    privacy = kinds.add_parser("privacy", help="privacy-utility sweep (record and user level, epsilon "
                               "1, 2, 4, 8, inf) with a canary membership-inference audit")
    _add_settings(privacy, TRAIN + FEDERATED)
    _add_output(privacy)
    privacy.add_argument("--epsilons", default="1,2,4,8,inf", help="comma-separated target epsilons")
    privacy.add_argument("--modes", default="record,user", help="comma-separated: record, user, both")
    privacy.add_argument("--canaries", type=int, default=500, help="canary pairs: 2 x this many canary records, "
                         "each put in a user's log with probability 1/2 (one-run audit)")
    items = kinds.add_parser("dp-items", help="user-level DP item-item model from one noisy co-occurrence "
                             "sum, against most-popular, with a one-run audit")
    _add_settings(items, ("data",))
    _add_output(items)
    speed = kinds.add_parser("dp-speed", help="DP-SGD vs plain local training time, 1.7k and 50k items")
    speed.add_argument("--out", type=Path, required=True, help="output folder")
    speed.add_argument("--repeats", type=int, default=5, help="timed repeats per configuration")


def settings_of(args: argparse.Namespace) -> dict:
    """The settings given on the command line (defaults included), by key, checked: a problem
    is a usage error, exit 2, before anything starts."""
    values = {s.key: getattr(args, s.dest) for s in SETTINGS if s.cli and hasattr(args, s.dest)}
    if getattr(args, "mode", "federated") == "centralized":
        values = {k: v for k, v in values.items() if _group(k) in TRAIN}
    try:
        if getattr(args, "bench", None) == "privacy":   # the sweep's privacy modes come from --modes
            for mode in args.modes.split(","):
                check({**values, "privacy": mode.strip()})
        elif getattr(args, "bench", None) == "secagg":
            check({**values, "clients-per-round": args.clients_per_round, "rounds": args.rounds})
        else:
            check(values)
    except SettingsError as err:
        _usage_error(str(err))
    return values


def _group(key: str) -> str:
    return next(s.group for s in SETTINGS if s.key == key)


def _positive_ints(text: str, flag: str) -> tuple[int, ...]:
    """'1000,10000' -> (1000, 10000); anything else is a usage error naming the flag."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        _usage_error(f"{flag} {text!r}: expected comma-separated positive integers, e.g. 1000,10000")
    return values


def _usage_error(message: str) -> None:
    print(f"fedrec: error: {message}", file=sys.stderr)
    raise SystemExit(2)


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


def _train(args, values: dict) -> None:
    from fedrec.api import run_job
    summary = run_job(args.mode, values, args.out, progress=not args.quiet, verbose=args.verbose)
    if not args.quiet and summary.get("data_report"):
        from fedrec.shared.data.preprocess import describe_report
        print(describe_report(summary["data_report"]))
    m = summary["metrics"]
    print(f"{summary['dataset']} {summary['mode']}: NDCG@10 {m['ndcg@10']:.4f}  HR@10 {m['hr@10']:.4f}  "
          f"MRR@10 {m['mrr@10']:.4f}  coverage@10 {m['coverage@10']:.3f}  ({summary['wall_seconds']:.0f} s) "
          f"-> {args.out}/summary.json")
    if not args.quiet and summary.get("schedule"):   # federated: what it ran, and why it ended there
        print(f"schedule: {summary['schedule']['why']}\nstopped at round {summary['stopped']['round']}: "
              f"{summary['stopped']['why']}")


def _store(args, values: dict) -> None:
    from fedrec.shared.data.pipeline import DataConfig, prepare_data
    from fedrec.simulation.federated import write_store
    prepared = prepare_data(DataConfig.from_settings(values, activity_features=False), show_progress=not args.quiet)
    write_store(prepared, args.out)
    if not args.quiet:
        from fedrec.shared.data.preprocess import describe_report
        print(describe_report(prepared.report))
    print(f"{len(prepared.split)} user logs and the catalog bundle -> {args.out}")


def _compare(args, values: dict) -> None:
    from fedrec.shared.evaluation.compare import compare_folders
    report = compare_folders(args.baseline, args.candidate, args.out)
    low, high = report["ratio_ci95"]
    print(f"NDCG@10 baseline {report['baseline_ndcg@10']:.4f} ({report['baseline_runs']} runs), candidate "
          f"{report['candidate_ndcg@10']:.4f} ({report['candidate_runs']} runs): candidate / baseline "
          f"{report['ratio']:.4f}, 95% interval {low:.4f}-{high:.4f} ({report['users']} users)")


def _bench(args, values: dict) -> None:
    if args.bench in ("secagg", "privacy", "dp-items", "payload"):   # the ones that run Flower in this process
        from fedrec.shared.console import tame_library_output
        tame_library_output(getattr(args, "verbose", False))
    if args.bench == "quality":
        from fedrec.simulation.bench import run_quality_bench
        from fedrec.simulation.centralized import CentralizedJob
        run_quality_bench(CentralizedJob.from_settings(values), args.out, progress=not args.quiet)
    elif args.bench == "held-out":
        from fedrec.simulation.protocols import run_held_out_bench
        from fedrec.simulation.centralized import CentralizedJob
        run_held_out_bench(CentralizedJob.from_settings(values), args.out, fraction=args.held_out_fraction,
                           progress=not args.quiet)
    elif args.bench == "temporal":
        from fedrec.simulation.centralized import CentralizedJob
        from fedrec.simulation.protocols import run_temporal_bench
        run_temporal_bench(CentralizedJob.from_settings(values), args.out, fraction=args.test_fraction,
                           progress=not args.quiet)
    elif args.bench == "blend-rule":
        from fedrec.simulation.blend_rule_bench import run_blend_rule_bench
        from fedrec.simulation.centralized import CentralizedJob
        run_blend_rule_bench(CentralizedJob.from_settings(values), args.out, picks=args.picks, draws=args.draws,
                             epochs=_positive_ints(args.epoch_counts, "--epoch-counts"), progress=not args.quiet)
    elif args.bench == "coldstart":
        from fedrec.simulation.centralized import CentralizedJob
        from fedrec.simulation.coldstart import run_coldstart_bench
        run_coldstart_bench(CentralizedJob.from_settings(values), args.out, fraction=args.cold_fraction,
                            id_dropout=args.cold_id_dropout, progress=not args.quiet)
    elif args.bench in ("diversity", "recommend"):
        from fedrec.shared.data.pipeline import DataConfig
        from fedrec.simulation import recommend_bench
        data = DataConfig.from_settings(values)
        try:
            if args.bench == "diversity":
                recommend_bench.run_diversity_bench(args.bundle, data, args.out)
            else:
                recommend_bench.run_recommend_bench(args.bundle, data, args.out, users=args.users)
        except recommend_bench.BundleMismatch as err:
            _usage_error(str(err))
    elif args.bench in FEDERATION_BENCHES:
        _federation_bench(args, values)
    elif args.bench == "serve":
        from fedrec.simulation.serve_bench import run_serve_bench
        run_serve_bench(args.bundle, args.out, items=args.items, requests=args.requests, concurrency=args.concurrency)
    elif args.bench == "dp-speed":
        from fedrec.simulation.dp_bench import run_dp_speed_bench
        run_dp_speed_bench(args.out, repeats=args.repeats)


FEDERATION_BENCHES = ("payload", "population", "schedule", "buckets", "secagg", "privacy", "dp-items")


def _federation_bench(args, values: dict) -> None:
    """The benches of federated training: bytes, population scale, secure aggregation, privacy."""
    if args.bench == "payload":
        from fedrec.simulation.bench import run_payload_bench
        run_payload_bench(args.out)
    elif args.bench == "population":
        from fedrec.simulation.population_bench import run_population_bench
        run_population_bench(args.out, users=_positive_ints(args.users, "--users"), items=args.items,
                             clients_per_round=args.clients_per_round, rounds=args.rounds, secure=args.secure)
    elif args.bench == "schedule":
        from fedrec.simulation.schedule_bench import run_schedule_bench
        run_schedule_bench(args.out, datasets=tuple(d.strip() for d in args.datasets.split(",") if d.strip()),
                           data_dir=args.data_dir)
    elif args.bench == "buckets":
        from fedrec.simulation.buckets_bench import run_buckets_bench
        run_buckets_bench(args.out, dataset=args.dataset, data_dir=args.data_dir,
                          buckets=_positive_ints(args.buckets, "--buckets"), epochs=args.epochs)
    elif args.bench == "secagg":
        from fedrec.shared.data.pipeline import DataConfig
        from fedrec.simulation.bench import run_secagg_bench
        sizing = {s.key: values[s.key] for s in SETTINGS if s.group == "secagg" and s.key in values}
        run_secagg_bench(DataConfig.from_settings(values, activity_features=False), args.out,
                         clients_per_round=args.clients_per_round, rounds=args.rounds, settings=sizing)
    elif args.bench == "privacy":
        from fedrec.simulation.dp_bench import run_privacy_sweep
        from fedrec.simulation.federated import FederatedJob
        run_privacy_sweep(FederatedJob.from_settings(values), args.out,
                          epsilons=tuple(float(e) for e in args.epsilons.split(",")),
                          modes=tuple(m.strip() for m in args.modes.split(",")),
                          canaries=args.canaries, progress=not args.quiet)
    elif args.bench == "dp-items":
        from fedrec.shared.data.pipeline import DataConfig
        from fedrec.simulation.dp_bench import run_dp_items_bench
        run_dp_items_bench(DataConfig.from_settings(values, activity_features=False), args.out, progress=not args.quiet)


def _recommend(args, values: dict) -> None:
    import json
    from fedrec.shared.recommend import Recommender, UnknownItem
    if args.k < 1:
        _usage_error(f"-k must be at least 1, got {args.k}")
    rec = Recommender.load(args.bundle)
    try:
        if args.similar_to:
            history, recs = [], rec.similar_items(args.similar_to.strip(), args.k)
        else:
            history = [i.strip() for i in args.history.split(",") if i.strip()]
            recs = rec.recommend(history, args.k, diversity=args.diversity, explain=not args.no_explain)
    except (UnknownItem, ValueError) as err:
        _usage_error(str(err))
    if args.json:
        print(json.dumps({"bundle": rec.version, "recommendations": [
            {"item": r.item_id, "title": r.title, "score": round(r.score, 4),
             "because": [{"item": b.item_id, "title": b.title, "contribution": round(b.contribution, 4)}
                         for b in r.because]} for r in recs]}, indent=2))
        return
    if args.similar_to:
        print(f"items like {rec.title(int(rec.indices([args.similar_to.strip()])[0]))}:")
    elif history:
        titles = [rec.title(i) for i in rec.indices(history[-5:])]
        print(f"recent history ({len(history)} items, newest last): " + "; ".join(titles))
    else:
        print("no history yet: " + ("the most popular items" if rec.bundle.popularity is not None
                                    else "this bundle counted no popularity; the encoder's view of an empty history"))
    for n, r in enumerate(recs, 1):
        because = f"  <- because: {'; '.join(b.title for b in r.because)}" if r.because else ""
        print(f"{n:3d}. {r.title}  [{r.item_id}]{because}")


def _show(args, values: dict) -> None:
    from fedrec.simulation.show import show_run
    if not (args.run / "summary.json").is_file():
        _usage_error(f"{args.run}: no summary.json (is it a finished run's folder?)")
    if args.users < 1:
        _usage_error(f"--users must be at least 1, got {args.users}")
    print(show_run(args.run, users=args.users, references=tuple(args.reference)))


def _serve(args, values: dict) -> None:
    import threading
    from fedrec.server.serving import start_server
    try:
        server, watcher, port = start_server(args.bundle, host=args.host, port=args.port, workers=args.workers)
    except (OSError, RuntimeError) as err:   # grpc raises RuntimeError for a port it cannot bind
        raise RunFailed(f"cannot serve on {args.host}:{args.port}: {err}") from None
    print(f"serving bundle {watcher.current.version} on {args.host}:{port} (gRPC, fedrec.v1.Recommend and "
          f"grpc.health.v1); a newer bundle in {args.bundle} is picked up without a restart. Ctrl-C stops.",
          flush=True)
    stopped = threading.Event()
    try:
        stopped.wait()
    except KeyboardInterrupt:
        pass
    finally:
        watcher.stop()
        server.stop(grace=2)


COMMANDS = {"train": _train, "store": _store, "compare": _compare, "bench": _bench, "recommend": _recommend,
            "serve": _serve, "show": _show, "certs": deploy_cli.certs, "server": deploy_cli.server,
            "device": deploy_cli.device}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    values = settings_of(args)
    _log_to_stderr()
    try:
        COMMANDS[args.command](args, values)
    except (DataError, BundleError, UserFileError, SettingsError) as err:
        print(f"fedrec: error: {err}", file=sys.stderr)
        return 2
    except RunFailed as err:
        print(f"fedrec: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
