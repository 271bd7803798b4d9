"""One exchange with a set of nodes: send one message each, collect the replies, count bytes.

Every step of a round (a plain round's train, evaluation, each secure-aggregation step) goes
through `exchange`, so what counts as a failed or missing reply is decided in one place.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

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

# Messages one exchange keeps in Flower's simulation at a time. Its in-memory LinkState checks every
# stored message for every node on each 0.1 s sweep (nodes x messages, holding the lock and the GIL),
# so a step sent to all 943 ML-100K devices at once made each sweep take seconds and starved the
# ClientApp actors (py-spy: 78% of the driver in that sweep, each actor 32% busy). A window of a few
# times the actors keeps them fed at a fraction of the cost (docs/federated.md "Where the time goes").
# Deployment has no such sweep (each SuperNode pulls its own messages): there every message goes at once.
SIMULATION_IN_FLIGHT = 32


def in_flight_limit(grid: Grid) -> int | None:
    """How many messages an exchange keeps outstanding on this grid (None: all at once)."""
    return SIMULATION_IN_FLIGHT if isinstance(grid, InMemoryGrid) else None


def send_and_receive(grid: Grid, messages: list[Message], timeout: float, in_flight: int | None = None
                     ) -> Iterator[Message]:
    """`grid.send_and_receive` with our own polling: push (at most `in_flight` outstanding at a time,
    the next as each reply comes), then pull the replies as they come (public Grid calls only), until
    all have answered or `timeout` passes."""
    pending = list(messages)
    window = len(pending) if in_flight is None else max(1, in_flight)
    waiting: set[str] = set()
    deadline, pause = time.monotonic() + timeout, FIRST_POLL_S
    while pending or waiting:
        if pending and len(waiting) < window:
            batch, pending = pending[:window - len(waiting)], pending[window - len(waiting):]
            waiting.update(grid.push_messages(batch))
        replies = list(grid.pull_messages(waiting))
        for reply in replies:
            waiting.discard(reply.metadata.reply_to_message_id)
            yield reply
        if not (pending or waiting) or time.monotonic() >= deadline:
            return
        if replies and pending:
            continue   # room in the window: push the next at once
        pause = FIRST_POLL_S if replies else min(2 * pause, LONGEST_POLL_S)
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
