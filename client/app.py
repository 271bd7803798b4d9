"""The Flower ClientApp (Message API): a thin adapter around `client.local`.

Where the client's data lives:
  * on a device (a SuperNode), node config `user-log=PATH` (its own log, `UserLog` .npz) and
    `catalog=PATH` (the public catalog bundle);
  * in simulation, run config `store=DIR` plus node config `partition-id`: the log is
    DIR/users/<partition-id>.npz and the catalog DIR/catalog.npz.

This module stays light (Flower, numpy, the secure-aggregation steps): training and
evaluation live in client/handlers.py, imported on first use, because in deployment every
message starts a fresh ClientApp process and torch + Opacus take seconds to import.

A train message carries the global weights ("arrays") and a "config" record (round, model
shape, local training settings). The reply carries "delta" (trained - global, one flat
float32 vector like "arrays", see shared/wire.py) and "metrics" (num-examples, train-loss,
train-seconds). With secure aggregation a round is three messages instead (client/secure.py)
and the reply holds only a masked vector. An evaluate message gets
"metrics" with this one user's HR/NDCG/MRR @10 for the requested stage. Nothing else.
"""
from __future__ import annotations

from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client import secure


def client_paths(node_config: dict, run_config: dict) -> tuple[Path, Path]:
    """(user log, catalog bundle) for this node."""
    if "user-log" in node_config:
        return Path(str(node_config["user-log"])), Path(str(node_config["catalog"]))
    store = Path(str(run_config["store"]))
    return store / "users" / f"{int(node_config['partition-id'])}.npz", store / "catalog.npz"


def ledger_path(node_config: dict, run_config: dict) -> Path:
    """This client's privacy ledger: node config `privacy-ledger`, else beside its log."""
    if "privacy-ledger" in node_config:
        return Path(str(node_config["privacy-ledger"]))
    log_path, _ = client_paths(node_config, run_config)
    return log_path.with_name(log_path.name.removesuffix(".npz") + ".privacy.json")


class FedRecClientApp(ClientApp):
    """Flower's simulation pickles the ClientApp with every message it hands a worker; by
    value, our handler closures cost 2+ ms of the server process's time each (cloudpickle
    scans sys.modules for each). This one pickles as the call that builds it."""

    def __init__(self, settings: dict, mods: list | None):
        super().__init__(mods=mods or [])
        self._recipe = (settings, mods)

    def __reduce__(self):
        return make_client_app, self._recipe


def make_client_app(settings: dict | None = None, mods: list | None = None) -> ClientApp:
    """`settings` stand in for the run config where Flower passes none (run_simulation);
    `mods` are Flower client mods wrapped around every handler."""
    settings = dict(settings or {})
    app = FedRecClientApp(settings, mods)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        from client import handlers
        return handlers.handle_train(msg, context, settings)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        from client import handlers
        return handlers.handle_evaluate(msg, context, settings)

    # Secure aggregation: registration once, then three steps a round (client/secure.py).
    @app.train("secagg_register")
    def secagg_register(msg: Message, context: Context) -> Message:
        return secure.handle_register(msg, context)

    @app.train("secagg_shares")
    def secagg_shares(msg: Message, context: Context) -> Message:
        return secure.handle_shares(msg, context)

    @app.train("secagg_masked")
    def secagg_masked(msg: Message, context: Context) -> Message:
        from client import handlers
        return handlers.handle_masked(msg, context, settings)

    @app.train("secagg_unmask")
    def secagg_unmask(msg: Message, context: Context) -> Message:
        return secure.handle_unmask(msg, context)

    return app


app = make_client_app()
