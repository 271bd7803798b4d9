"""`fedrec certs`, `fedrec server` and `fedrec device`: the deployment commands (docs/deployment.md).

Flags and their help here; the work in server/pki.py, server/deploy.py, client/store.py and
client/device.py. A mistake the user can fix is one line on stderr and exit 2.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

DEVICE_STORE_HELP = "the device's sealed store folder (made by `fedrec device init`)"
KEY_FILE_HELP = ("the store's key file (32 bytes, owner-only); without it the store's passphrase is read from "
                 "FEDREC_STORE_PASSPHRASE")


def add_parsers(commands, add_training_flags) -> None:
    """`add_training_flags(parser)` adds `fedrec train`'s federated flags (from the settings table)."""
    certs = commands.add_parser("certs", help="the operator's TLS CA, the server's certificate, devices' enrolment")
    kinds = certs.add_subparsers(dest="certs", required=True)
    ca = kinds.add_parser("ca", help="a new TLS CA and secure-aggregation enrolment CA in a folder (files 0600)")
    ca.add_argument("--out", type=Path, required=True, help="the CA folder")
    ca.add_argument("--days", type=int, default=3650, help="validity (default: 3650)")
    server = kinds.add_parser("server", help="the SuperLink's TLS certificate, signed by the CA")
    server.add_argument("--ca", type=Path, required=True, help="the CA folder")
    server.add_argument("--host", action="append", default=[],
                        help="a DNS name or IP address devices dial (repeat; localhost and 127.0.0.1 are always added)")
    server.add_argument("--days", type=int, default=825, help="validity (default: 825)")
    enrol = kinds.add_parser("enrol", help="enrol a device from its request.json (public keys only): writes the "
                             "grant it needs and keeps its SuperNode key as CA/devices/NAME.pub, to register")
    enrol.add_argument("request", type=Path, help="the device's request.json (from `fedrec device init`)")
    enrol.add_argument("--ca", type=Path, required=True, help="the CA folder")
    enrol.add_argument("--out", type=Path, required=True, help="the grant file to send back to the device")
    check = kinds.add_parser("check", help="is a certificate usable: validity, issuer, host name, key pair")
    check.add_argument("cert", type=Path, help="the certificate (PEM)")
    check.add_argument("--ca", type=Path, required=True, help="the CA folder (its ca.crt)")
    check.add_argument("--host", help="a name or address devices dial, which the certificate must name")
    check.add_argument("--key", type=Path, help="the private key that must pair with the certificate")
    _add_server(commands, add_training_flags)
    _add_device(commands)


def _add_server(commands, add_training_flags) -> None:
    server = commands.add_parser("server", help="the aggregation server: a SuperLink with TLS, SuperNode "
                                 "authentication and a database, and our ServerApp submitted to it")
    kinds = server.add_subparsers(dest="server", required=True)
    start = kinds.add_parser("start", help="run the SuperLink until Ctrl-C (its state survives a restart)")
    start.add_argument("--state", type=Path, required=True, help="the server's state folder")
    start.add_argument("--ca", type=Path, required=True, help="the CA folder (ca.crt, server.crt/.key, enrolment-ca.pub)")
    start.add_argument("--catalog", type=Path, required=True, help="the public catalog (catalog.npz from `fedrec store`)")
    start.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default: 127.0.0.1; 0.0.0.0 for devices on other machines)")
    start.add_argument("--port", type=int, default=8000, help="port for devices and the flwr CLI (default: 8000)")
    register = kinds.add_parser("register", help="allow a device to connect: register its SuperNode key (CA/devices/NAME.pub)")
    register.add_argument("--state", type=Path, required=True, help="the server's state folder")
    register.add_argument("public_key", type=Path, nargs="+", help="devices' SuperNode keys (CA/devices/NAME.pub)")
    run = kinds.add_parser("run", help="submit a federated training run to the started SuperLink and follow it")
    run.add_argument("--state", type=Path, required=True, help="the server's state folder")
    add_training_flags(run)
    run.add_argument("--out", type=Path, required=True, help="output folder, on the server (result.json, bundle/)")
    run.add_argument("--min-nodes", type=int, default=0,
                     help="wait until this many devices are connected before round 1, at most --wait-for-nodes "
                          "seconds (default: 0, a round's clients)")


def _add_device(commands) -> None:
    device = commands.add_parser("device", help="a device: its sealed store, its events, its SuperNode, "
                                 "its recommendations")
    kinds = device.add_subparsers(dest="device", required=True)
    init = kinds.add_parser("init", help="a new sealed store (AES-256-GCM) with an empty log and ledger")
    _store_args(init)
    init.add_argument("--catalog", type=Path, required=True, help="the public catalog (catalog.npz)")
    init.add_argument("--name", required=True, help="this device's name for the operator (letters, digits, - or _)")
    init.add_argument("--passphrase", action="store_true",
                      help="seal with the passphrase in FEDREC_STORE_PASSPHRASE (scrypt) instead of a key file")
    enrol = kinds.add_parser("enrol", help="take the operator's grant (from `fedrec certs enrol`): seals the "
                             "enrolment in, keeps the server's CA certificate")
    _store_args(enrol)
    enrol.add_argument("--grant", type=Path, required=True, help="the grant file")
    add = kinds.add_parser("add-event", help="append an interaction to the device's log")
    _store_args(add)
    add.add_argument("item", help="the item's id, as in the catalog")
    add.add_argument("--time", type=float, help="when, in seconds since 1970 (default: now)")
    update = kinds.add_parser("update-catalog", help="take a new catalog from the operator (new items)")
    _store_args(update)
    update.add_argument("--catalog", type=Path, required=True, help="the new catalog.npz (the server's)")
    show = kinds.add_parser("show", help="what the store holds: events, privacy spent, enrolment")
    _store_args(show)
    recommend = kinds.add_parser("recommend", help="this device's recommendations, computed here from its own log")
    _store_args(recommend)
    recommend.add_argument("--bundle", type=Path, required=True, help="the published bundle folder")
    recommend.add_argument("-k", type=int, default=10, help="how many items (default: 10)")
    run = kinds.add_parser("run", help="run this device's SuperNode (until Ctrl-C)")
    _store_args(run)
    run.add_argument("--superlink", required=True, help="the server's HOST:PORT")
    run.add_argument("--port", type=int, default=9094,
                     help="local port for the SuperNode's app runtime; one per SuperNode on a machine (default: 9094)")
    own = run.add_argument_group("this device's own rules (no server can lower them; default: the app's)")
    own.add_argument("--privacy-unit", dest="own_privacy_unit", choices=("none", "record", "user", "both"),
                     help="the differential privacy this device requires before it trains or answers")
    own.add_argument("--privacy-budget", dest="own_privacy_budget", type=float, help="this device's epsilon budget over all rounds, ever")
    own.add_argument("--privacy-delta", dest="own_privacy_delta", type=float, help="the delta its budget is counted at")
    own.add_argument("--privacy-record-window", dest="own_privacy_record_window", type=int, help="the smallest record (interactions) it accepts as the unit")
    own.add_argument("--privacy-min-noise", dest="own_privacy_min_noise", type=float, help="the smallest noise multiplier it accepts")
    own.add_argument("--counts-min-devices", dest="own_counts_min_devices", type=int,
                     help="the fewest devices an exact sum of its data may be unmasked in (at least 2)")
    own.add_argument("--secagg-min-neighbours", dest="own_secagg_min_neighbours", type=int, help="the fewest neighbours it shares its keys with")


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", type=Path, required=True, help=DEVICE_STORE_HELP)
    p.add_argument("--key-file", type=Path, help=KEY_FILE_HELP)


def certs(args, values: dict) -> None:
    from fedrec.server import pki
    if args.certs == "ca":
        pki.make_ca(args.out, days=args.days)
        print(f"CA -> {args.out} (ca.crt goes to every device; keep ca.key and enrolment-ca.key offline)")
    elif args.certs == "server":
        hosts = list(dict.fromkeys(args.host + ["localhost", "127.0.0.1"]))
        pki.server_certificate(args.ca, hosts, days=args.days)
        print(f"server certificate for {', '.join(hosts)} -> {args.ca}/server.crt, server.key")
    elif args.certs == "enrol":
        name = pki.enrol_device(args.ca, args.request, args.out)["name"]
        print(f"enrolled {name}: grant -> {args.out} (send it to the device); register its SuperNode key with "
              f"`fedrec server register --state DIR {args.ca}/devices/{name}.pub`")
    else:
        cert = pki.check_certificate(args.cert, args.ca / "ca.crt", host=args.host, key_path=args.key)
        print(f"{args.cert}: valid until {cert.not_valid_after_utc:%Y-%m-%d}, issued by {args.ca}/ca.crt"
              + (f", names {args.host}" if args.host else "") + (", pairs with the key" if args.key else ""))


def server(args, values: dict) -> None:
    from fedrec.server import deploy
    from fedrec.shared.errors import RunFailed
    from fedrec.shared.processes import stop_group
    if args.server == "start":
        proc = deploy.start_superlink(args.state, args.ca, args.catalog, host=args.host, port=args.port)
        print(f"SuperLink on {args.host}:{args.port} (TLS, SuperNode authentication, state {args.state}); "
              f"log {args.state}/superlink.log. Ctrl-C stops it.", flush=True)
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            code = 0
        finally:
            stop_group(proc)
        if code:
            raise RunFailed(f"the SuperLink exited with code {code}; see {args.state}/superlink.log")
    elif args.server == "register":
        for key in args.public_key:
            print(f"{key}: registered as node {deploy.register(args.state, key)}")
    else:
        _server_run(args, values)


def _server_run(args, values: dict) -> None:
    import time
    from fedrec.server import deploy
    from fedrec.shared.errors import RunFailed
    from fedrec.shared.processes import flower_env
    from fedrec.shared.settings import RUN_CONFIG
    info = deploy.server_info(args.state)
    run_config = {s.key: values[s.key] for s in RUN_CONFIG if s.key in values}
    run_config.update(store=info["store"], out=str(args.out.resolve()), **{"min-nodes": args.min_nodes})
    # The ServerApp would refuse other settings, or a shorter run, only on the SuperLink, as a failed run;
    # its folder is here, so say it here: one line, exit 2.
    from fedrec.server.app import federation_config
    from fedrec.server.federation import check_resumable, schedule_problem
    from fedrec.shared.settings import SettingsError
    cfg = federation_config(run_config)
    check_resumable(args.out, cfg)
    problem = schedule_problem(cfg)
    if problem:
        raise SettingsError(problem)
    started, result = time.time(), args.out / "result.json"
    try:
        code = subprocess.call(deploy.submit_argv(args.state, run_config), env=flower_env(args.state),
                               cwd=deploy.PROJECT)
    except KeyboardInterrupt:
        raise RunFailed("stopped following the run; it goes on on the SuperLink (`flwr ls` and `flwr stop RUN_ID` "
                        f"with FLWR_HOME={args.state.resolve() / 'flwr'})") from None
    # `flwr run --stream` exits 0 whatever the ServerApp did: the result file is the proof.
    if code or not result.is_file() or result.stat().st_mtime < started:
        raise RunFailed(f"the run did not finish (flwr run exit {code}; no new {result}); see the log above and "
                        f"{args.state}/superlink.log")
    print(f"run finished -> {result}, {args.out}/bundle")


def device(args, values: dict) -> None:
    import os
    from fedrec.client import device as dev
    if args.device == "init":
        passphrase = os.environ.get("FEDREC_STORE_PASSPHRASE") if args.passphrase else None
        if args.passphrase and not passphrase:
            raise dev.DeviceError("--passphrase: set FEDREC_STORE_PASSPHRASE to the passphrase first")
        print(dev.init(args.store, args.catalog, key_file=args.key_file, passphrase=passphrase, name=args.name))
        return
    store = dev.open_store(args.store, args.key_file)
    if args.device == "enrol":
        print(dev.enrol(store, args.grant))
    elif args.device == "add-event":
        print(f"{store.add_events([(args.item, args.time)])} events in {args.store}")
    elif args.device == "update-catalog":
        store.update_catalog(args.catalog)
        print(f"{args.store}: catalog updated from {args.catalog}")
    elif args.device == "show":
        print(dev.describe(store))
    elif args.device == "recommend":
        dev.print_recommendations(store, args.bundle, args.k)
    else:
        # dest "own_*": the settings table has keys of the same names, read from the app's settings
        policy = {key: getattr(args, "own_" + key.replace("-", "_")) for key in dev.POLICY_KEYS
                  if getattr(args, "own_" + key.replace("-", "_")) is not None}
        argv = dev.supernode_argv(store, args.key_file, args.superlink, args.port, policy)
        from fedrec.shared.processes import flower_env
        try:
            code = subprocess.call(argv, env=flower_env())
        except KeyboardInterrupt:
            code = 0
        sys.exit(code)
