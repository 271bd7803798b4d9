"""The Flower ClientApp (Message API): a thin adapter around `fedrec.client.local`.

Where the client's data lives: client/store.py. What each message carries: shared/protocol.py.

This module stays light (Flower, numpy, the secure-aggregation steps): training and
evaluation live in client/handlers.py, imported on first use, because in deployment every
message starts a fresh ClientApp process and torch + Opacus take seconds to import.

A train message's reply carries the delta (trained - global) and its metrics (num-examples,
train-loss, train-seconds). With secure aggregation a round is three messages instead
(client/secure.py) and the reply holds only a masked vector. An evaluate message gets this one
user's HR/NDCG/MRR @10 for the requested stage. Nothing else.
"""
from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedrec.client import secure


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
        from fedrec.client import handlers
        return handlers.handle_train(msg, context, settings)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        from fedrec.client import handlers
        return handlers.handle_evaluate(msg, context, settings)

    # Secure aggregation: registration once, then three steps a round (client/secure.py).
    @app.train("secagg_register")
    def secagg_register(msg: Message, context: Context) -> Message:
        return secure.handle_register(msg, context, settings)

    @app.train("secagg_shares")
    def secagg_shares(msg: Message, context: Context) -> Message:
        return secure.handle_shares(msg, context, settings)

    @app.train("secagg_masked")
    def secagg_masked(msg: Message, context: Context) -> Message:
        from fedrec.client import handlers
        return handlers.handle_masked(msg, context, settings)

    @app.train("secagg_confirm")
    def secagg_confirm(msg: Message, context: Context) -> Message:
        return secure.handle_confirm(msg, context, settings)

    @app.train("secagg_unmask")
    def secagg_unmask(msg: Message, context: Context) -> Message:
        return secure.handle_unmask(msg, context)

    @app.train("secagg_abort")
    def secagg_abort(msg: Message, context: Context) -> Message:
        return secure.handle_abort(msg, context)

    return app


app = make_client_app()
