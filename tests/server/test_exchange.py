"""server/exchange.py: the in-flight window keeps Flower's in-memory LinkState small, and loses nothing."""
import time
from uuid import uuid4

import pytest

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.superlink.grid import InMemoryGrid

from fedrec.server import exchange as exchange_module
from fedrec.server.exchange import FEWEST_IN_FLIGHT, MOST_IN_FLIGHT, in_flight_limit, send_and_receive, window_for


class QueueGrid:
    """Answers each pushed message on a later pull (two per pull, oldest first), and records how many
    were outstanding at the most; `silent` nodes never answer."""

    def __init__(self, silent=()):
        self.outstanding, self.most, self.silent, self.silent_asked = [], 0, set(silent), 0

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid4().hex   # as Flower's grids do on push
            ids.append(message.metadata.message_id)
            if message.metadata.dst_node_id in self.silent:
                self.silent_asked += 1
            else:
                self.outstanding.append(message)
        self.most = max(self.most, len(self.outstanding) + self.silent_asked)
        return ids

    def pull_messages(self, message_ids):
        answered, self.outstanding = self.outstanding[:2], self.outstanding[2:]
        return [Message(RecordDict({"r": ConfigRecord({"node": m.metadata.dst_node_id})}), reply_to=m)
                for m in answered]


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Building a reply Message reads the task's identity, which Flower sets inside a real app."""
    from flwr.supercore.task_identity import TaskIdentity
    for name in ("run_id", "node_id", "task_id"):
        monkeypatch.setattr(TaskIdentity, f"_{name}", 1)


def _messages(nodes):
    return [Message(RecordDict(), message_type="train", dst_node_id=node) for node in nodes]


def test_a_window_keeps_at_most_that_many_outstanding_and_every_reply_comes():
    grid = QueueGrid()
    replies = list(send_and_receive(grid, _messages(range(1, 101)), timeout=30, in_flight=8))
    assert sorted(r.content["r"]["node"] for r in replies) == list(range(1, 101))
    assert grid.most == 8


def test_without_a_window_every_message_goes_at_once():
    grid = QueueGrid()
    assert len(list(send_and_receive(grid, _messages(range(1, 41)), timeout=30))) == 40
    assert grid.most == 40


def test_nodes_that_never_answer_stop_holding_the_window_and_the_rest_are_asked(monkeypatch):
    """As many silent nodes as the window has places: after STALE_S they no longer block it, so every
    other node is still asked and answers before the deadline."""
    monkeypatch.setattr(exchange_module, "STALE_S", 0.05)
    grid = QueueGrid(silent={1, 2, 3, 4})
    replies = list(send_and_receive(grid, _messages(range(1, 21)), timeout=2.0, in_flight=4))
    assert sorted(r.content["r"]["node"] for r in replies) == list(range(5, 21))


def test_the_window_applies_in_simulation_only():
    assert in_flight_limit(object.__new__(InMemoryGrid)) == MOST_IN_FLIGHT
    assert in_flight_limit(QueueGrid()) is None


def test_the_window_keeps_what_the_actors_answer_in_a_refill_at_the_measured_rate():
    assert window_for(0, 1.0, 64) == 64                       # no rate yet: the most
    assert window_for(100, 1.0, 64) == 30                     # 100 a second, 0.3 s refill
    assert window_for(20, 2.0, 64) == FEWEST_IN_FLIGHT        # slow replies: never below the fewest
    assert window_for(10_000, 1.0, 64) == 64                  # never above the most
    assert window_for(100, 1.0, 4) == 4                       # a smaller bound wins


class DeploymentLikeGrid(QueueGrid):
    """As Flower's deployment grid does for a message the SuperLink did not store: an empty id."""

    def push_messages(self, messages):
        ids = super().push_messages(messages)
        unstored = [i for i, m in enumerate(messages) if m.metadata.dst_node_id == 3]
        for i in unstored:
            self.outstanding = [m for m in self.outstanding if m.metadata.dst_node_id != 3]
            ids[i] = ""
        return ids


def test_a_message_the_grid_did_not_store_is_not_waited_for_until_the_deadline():
    started = time.monotonic()
    replies = list(send_and_receive(DeploymentLikeGrid(), _messages(range(1, 11)), timeout=60))
    assert sorted(r.content["r"]["node"] for r in replies) == [1, 2, 4, 5, 6, 7, 8, 9, 10]
    assert time.monotonic() - started < 30   # not the 60 s deadline
