"""One exchange with a set of nodes: send one message each, collect the replies, count bytes.

Every step of a round (a plain round's train, evaluation, each secure-aggregation step) goes
through `exchange`, so what counts as a failed or missing reply is decided in one place.
"""
from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.superlink.grid import InMemoryGrid

from fedrec.shared.protocol import refusal_of


class ClientFailure(RuntimeError):
    """A ClientApp raised: a bug on our side, so the run stops with the client's message."""


def record_bytes(content: RecordDict) -> int:
    """Payload size of a message's records (arrays, metrics, config), as Flower counts them."""
    return int(sum(record.count_bytes() for record in content.values()))


@dataclass
class Exchange:
    replies: dict[int, RecordDict] = field(default_factory=dict)  # node -> reply content
    bytes_down: int = 0
    bytes_up: int = 0
    failed: list[str] = field(default_factory=list)              # why nodes gave no usable reply
    refusals: dict[int, RecordDict] = field(default_factory=dict)  # node -> its refusal


# Errors the SuperLink writes for a node that went away (killed, offline, its reply lost): a
# dropout the protocol recovers from, never a bug in the ClientApp to stop the run for.
GONE = (ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE)


def _answering_node(reply: Message, messages: list[Message]) -> int:
    """The node a reply answers for. In deployment, when a node is gone, the SuperLink answers in its
    place with an error from its own id: such a reply is matched to its message (ids are set when
    the grid pushed the messages)."""
    node = reply.metadata.src_node_id
    if reply.has_error():
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        node = sent.get(reply.metadata.reply_to_message_id, node)
    return node


# Waits between two pulls for replies: short at first, then longer while nothing arrives. Flower's
# own send_and_receive waits a fixed 0.1 s in simulation and 3 s in deployment between pulls; a
# secure round is four exchanges, so that wait alone was a large part of a short round.
FIRST_POLL_S, LONGEST_POLL_S = 0.005, 0.2

# Messages one exchange keeps outstanding in Flower's simulation. Its in-memory LinkState checks every
# stored message for every node on each 0.1 s sweep (nodes x messages, holding the lock and the GIL):
# sent to all 943 ML-100K devices at once, each sweep took seconds and starved the ClientApp actors
# (py-spy: 78% of the driver in that sweep, each actor 32% busy). So the window follows Little's law:
# what the actors answer in REFILL_S at the rate measured so far, between the two bounds. A cheap
# step (register, confirm) then keeps many out, a heavy one (the counts round's 5.7 MB masked
# vectors) few; a 25-client training round goes at once. Measured on ML-100K's counts round:
# docs/federated.md "Where the time goes". Deployment has no such sweep (each SuperNode pulls its
# own messages): there every message goes at once.
MOST_IN_FLIGHT, FEWEST_IN_FLIGHT, REFILL_S = 64, 8, 0.3
# A message unanswered this long (or four times the recent replies' median wait, if longer) stops
# holding a place in the window (its reply is still taken): nodes that went silent must not keep
# the rest from being asked until the step's deadline.
STALE_S = 5.0


def in_flight_limit(grid: Grid) -> int | None:
    """The most messages an exchange keeps outstanding on this grid (None: all at once)."""
    return MOST_IN_FLIGHT if is_simulation(grid) else None


def is_simulation(grid: Grid) -> bool:
    """Flower's simulation engine (its in-memory grid), where the ServerApp runs beside the ClientApps."""
    return isinstance(grid, InMemoryGrid)


def fewest_in_flight() -> int:
    """The window's floor: two messages per simulated ClientApp actor (one per core), at least 8."""
    return max(FEWEST_IN_FLIGHT, 2 * (os.cpu_count() or 1))


def window_for(answered: int, seconds: float, most: int, fewest: int = FEWEST_IN_FLIGHT) -> int:
    """Outstanding messages to keep: `answered` replies in `seconds` so far, refilled for REFILL_S."""
    if answered < fewest or seconds <= 0:
        return most   # no rate yet
    return max(min(fewest, most), min(most, math.ceil(answered / seconds * REFILL_S)))


def send_and_receive(grid: Grid, messages: list[Message], timeout: float, in_flight: int | None = None
                     ) -> Iterator[Message]:
    """`grid.send_and_receive` with our own polling: push (with `in_flight`, at most that many
    outstanding, fewer as `window_for` says; the next as replies come), then pull the replies as they
    come (public Grid calls only), until all have answered or `timeout` passes. A message the grid did
    not store (no id, or an empty one) is not waited for: its node counts as not answering."""
    pending = list(messages)
    most = len(pending) if in_flight is None else max(1, in_flight)
    fewest = fewest_in_flight()
    waiting: dict[str, float] = {}   # message id -> when it was pushed
    recent: deque[float] = deque([time.monotonic()], maxlen=MOST_IN_FLIGHT)   # when the latest replies came
    waits: deque[float] = deque(maxlen=MOST_IN_FLIGHT)                        # their push-to-reply seconds
    deadline, pause = recent[0] + timeout, FIRST_POLL_S
    while pending or waiting:
        now = time.monotonic()
        if pending:
            # The rate of late: a slow start (actors warming up) must not keep the window small.
            stale = max(STALE_S, 4 * float(np.median(waits))) if waits else STALE_S
            held = sum(now - pushed < stale for pushed in waiting.values())
            room = window_for(len(recent) - 1, now - recent[0], most, fewest) - held
            if room > 0:
                waiting.update(dict.fromkeys((i for i in grid.push_messages(pending[:room]) if i), now))
                pending = pending[room:]
        replies = list(grid.pull_messages(set(waiting)))
        for reply in replies:
            pushed = waiting.pop(reply.metadata.reply_to_message_id, None)
            if pushed is not None:
                waits.append(time.monotonic() - pushed)
            yield reply
        recent.extend([time.monotonic()] * len(replies))
        if not (pending or waiting) or time.monotonic() >= deadline:
            return
        pause = FIRST_POLL_S if replies else min(2 * pause, LONGEST_POLL_S)
        if replies and pending:
            continue   # room in the window: push the next at once
        time.sleep(min(pause, max(0.0, deadline - time.monotonic())))


def exchange(grid: Grid, message_type: str, contents: dict[int, RecordDict], timeout: float,
             fail_on_error: bool) -> Exchange:
    """Send `contents[node]` to each node as `message_type`; collect what comes back in `timeout`.
    A client error raises ClientFailure when `fail_on_error`, else the node counts as failed."""
    messages = [Message(content=c, message_type=message_type, dst_node_id=node) for node, c in contents.items()]
    out = Exchange(bytes_down=sum(record_bytes(m.content) for m in messages))
    for reply in send_and_receive(grid, messages, timeout, in_flight_limit(grid)):
        node = _answering_node(reply, messages)
        if node not in contents or node in out.replies:
            out.failed.append(f"node {node}: {'unasked' if node not in contents else 'duplicate'} reply to "
                              f"{message_type!r}; dropped")
            continue
        if reply.has_error():
            reason = f"node {node}: client error in {message_type!r}: {reply.error.reason}"
            if reply.error.code in GONE:
                reason = f"node {node}: gone during {message_type!r} (dropped): {reply.error.reason}"
            elif fail_on_error:
                raise ClientFailure(reason)
            out.failed.append(reason)
            continue
        out.bytes_up += record_bytes(reply.content)
        refusal = refusal_of(reply.content)
        if refusal is not None:
            # A client refusing a request an honest client must refuse: dropped, never a crash.
            out.failed.append(f"node {node}: refused {message_type!r}: {refusal}")
            out.refusals[node] = reply.content
            continue
        out.replies[node] = reply.content
    missing = len(contents) - len(out.replies) - len(out.failed)
    if missing:
        out.failed.append(f"{missing} node(s) did not answer {message_type!r} in time")
    return out
