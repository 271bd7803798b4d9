"""Secure aggregation attacked as a malicious server would (issue #15), with the real protocol
code: each attack is refused by the clients or ends the round with nothing revealed.

At 4b8af3e each of these worked: an empty inbox, server-chosen parameters and split views
let the server read one client's update; a replayed round id got old shares accepted; a
substituted identity key got shares sealed to the server; one bad share crashed the round;
an aborted round left its secrets on the device (see the closing note of that session)."""
import secrets

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client import secure
from client.store import write_credentials
from server.secure import SecureConfig
from shared.protocol import (SharesRequest, pack_abort_request, pack_register_request, pack_shares_request,
                             refusal_of)
from shared.secagg.client import SecAggClient, identity_public, new_identity_key
from shared.secagg.fixed_point import quantisation_error_bound
from shared.secagg.identity import EnrolmentCA, IdentityRecord, identity_record
from shared.secagg.params import ProtocolViolation, SecAggParams, default_params
from tests.shared.test_secagg import CA, confirm_and_unmask, random_vectors, start_round


def test_an_empty_inbox_is_refused_so_the_self_mask_alone_never_hides_an_update():
    n = 10
    params = default_params(n, clip=1.0)
    clients, server, records = start_round(n, params, b"withheld")
    inbox = server.route_shares({u: clients[u].share_keys(records[u]) for u in records})
    victim = clients[1]
    with pytest.raises(ProtocolViolation, match="senders in the inbox"):
        victim.masked_input(np.full(20, 0.1), {}, np.random.default_rng(0))
    few = dict(list(inbox[1].items())[:params.threshold - 2])   # one sender short of t - 1
    with pytest.raises(ProtocolViolation, match="senders in the inbox"):
        victim.masked_input(np.full(20, 0.1), few, np.random.default_rng(0))


@pytest.mark.parametrize("params,neighbours,message", [
    (SecAggParams(neighbours=0, threshold=1, clip=1.0, max_clients=10), 0, "below this client's floor"),
    (SecAggParams(neighbours=1, threshold=2, clip=1.0, max_clients=10), 1, "below this client's floor"),
    # Declares k = 2, t = 2 (a majority of 3) but hands the victim 4 neighbours: t is then no
    # majority of its 5 actual holders, so two disjoint groups could rebuild both its secrets.
    (SecAggParams(neighbours=2, threshold=2, clip=1.0, max_clients=3), 4, "more than the round's"),
])
def test_server_chosen_parameters_below_the_clients_floors_are_refused(params, neighbours, message):
    devices = {u: CA.enrol() for u in range(1, 6)}
    keys = {u: new_identity_key() for u in devices}
    records = {u: identity_record(devices[u], identity_public(keys[u])).to_bytes() for u in devices}
    with pytest.raises(ProtocolViolation, match=message):
        client = SecAggClient(1, params, b"r", keys[1], CA.public)
        client.share_keys({v: records[v] for v in range(2, 2 + neighbours)})


def test_split_views_reveal_at_most_one_kind_of_secret_of_a_client():
    """The server tells holders {1, 2, 3} that client 1 is alive (to get its self-mask seed) and
    holders {4, 5} that it dropped (to get its mask key). Each signs the view it is shown; a
    client reveals only when t of its holders signed the same view, so one side refuses."""
    n = 5
    params = SecAggParams(neighbours=4, threshold=3, clip=1.0, max_clients=n)
    clients, server, records = start_round(n, params, b"split")
    inbox = server.route_shares({u: clients[u].share_keys(records[u]) for u in records})
    rng = np.random.default_rng(0)
    for u in clients:
        clients[u].masked_input(np.zeros(10), inbox[u], rng)
    alive_view, dropped_view = ([1, 2, 3, 4, 5], []), ([2, 3, 4, 5], [1])
    signed = {u: clients[u].confirm(*alive_view, clients[u].credentials) for u in (1, 2, 3)}
    signed |= {u: clients[u].confirm(*dropped_view, clients[u].credentials) for u in (4, 5)}
    revealed = {}
    for u, view in [(2, alive_view), (3, alive_view), (4, dropped_view), (5, dropped_view)]:
        try:
            revealed[u] = clients[u].unmask_shares(*view, signed)
        except ProtocolViolation:
            pass
    kinds = {share[:1] for answer in revealed.values() for owner, share in answer.items() if owner == 1}
    assert kinds == {b"b"}                      # the side with t signatures; never the s key too
    assert set(revealed) == {2, 3}


def test_a_substituted_identity_key_gets_no_shares_sealed_to_it():
    """The server swaps neighbour 5's identity record for one of its own (unenrolled device, or
    an enrolled device's certificate over a key that device never signed)."""
    params = SecAggParams(neighbours=4, threshold=3, clip=1.0, max_clients=5)
    clients, server, records = start_round(5, params, b"swap")
    servers_key = new_identity_key()
    rogue = EnrolmentCA.new().enrol()           # the server's own "CA"
    honest = IdentityRecord.from_bytes(records[1][5])
    forgeries = [identity_record(rogue, identity_public(servers_key)).to_bytes(),
                 IdentityRecord(identity_public(servers_key), honest.device_public, honest.certificate,
                                honest.signature).to_bytes()]
    for forged in forgeries:
        client = SecAggClient(1, params, secrets.token_bytes(8), new_identity_key(), CA.public)
        with pytest.raises(ProtocolViolation, match="below this client's floor|no strict majority"):
            client.share_keys({**records[1], 5: forged})   # 3 real neighbours left: below the floor of 4
    # With room to spare the client goes on without the forged neighbour: nothing sealed to it.
    big = default_params(12, clip=1.0)
    clients, server, records = start_round(12, big, b"swap12")
    victim = max(records[1])
    _, _, sealed = clients[1].share_keys({**records[1], victim: forgeries[0]})
    assert victim not in sealed and len(sealed) == len(records[1]) - 1


@pytest.fixture
def node(tmp_path, monkeypatch):
    """A real ClientApp handler's view: a Flower Context with this device's credentials."""
    from flwr.supercore.task_identity import TaskIdentity
    for name, value in (("run_id", 1), ("node_id", 0), ("task_id", 1)):
        monkeypatch.setattr(TaskIdentity, f"_{name}", value)
    write_credentials(tmp_path / "device", CA.enrol())
    return Context(run_id=1, node_id=1, node_config={"device-credentials": str(tmp_path / "device")},
                   state=RecordDict(), run_config={})


def _message(content: RecordDict, step: str) -> Message:
    return Message(content=content, dst_node_id=1, message_type=f"train.secagg_{step}")


def _shares_request(node: Context, round_id: bytes) -> Message:
    own = secure.handle_register(_message(pack_register_request(), "register"), node, {})
    record = bytes(own.content["secagg"]["identity"])
    others = {v: identity_record(CA.enrol(), identity_public(new_identity_key())).to_bytes() for v in range(2, 6)}
    return _message(pack_shares_request(SharesRequest(round_id, 1, 4, 3, 1.0, 5, record, others)), "shares")


def test_a_replayed_round_id_is_refused(node):
    round_id = secrets.token_bytes(24)
    first = secure.handle_shares(_shares_request(node, round_id), node, {})
    assert refusal_of(first.content) is None and "shares" in first.content
    replay = secure.handle_shares(_shares_request(node, round_id), node, {})
    assert "used before" in refusal_of(replay.content)
    assert secure.STATE_KEY not in node.state    # and the refused round's secrets are gone


def test_an_aborted_round_leaves_no_secrets_on_the_device(node):
    round_id = secrets.token_bytes(24)
    secure.handle_shares(_shares_request(node, round_id), node, {})
    assert isinstance(node.state.get(secure.STATE_KEY), ConfigRecord)
    secure.handle_abort(_message(pack_abort_request(round_id), "abort"), node)
    assert secure.STATE_KEY not in node.state


def test_bad_shares_are_dropped_and_surplus_ones_finish_the_round():
    n = 10
    params = default_params(n, clip=1.0)            # complete graph: 10 holders, t = 6
    vectors = random_vectors(n, 200, 1.0)
    clients, server, records = start_round(n, params, b"bad-shares")
    inbox = server.route_shares({u: clients[u].share_keys(records[u]) for u in records})
    rng = np.random.default_rng(0)
    masked = {u: clients[u].masked_input(vectors[u], inbox[u], rng) for u in inbox}
    answers = confirm_and_unmask(clients, server, server.receive_masked(masked))
    wrong = bytearray(answers[2][5])
    wrong[-1] ^= 1
    answers[2][5] = bytes(wrong)                    # off the polynomial
    answers[3][6] = answers[3][6][:-3]              # too short
    answers[4][7] = b"s" + answers[4][7][1:]        # the other kind
    answers[9]["x"] = b"junk"                       # not even an owner
    total, count = server.unmask(answers)
    assert count == n and np.abs(total - sum(vectors.values())).max() <= quantisation_error_bound(params, n)
    dropped = {u for u, _ in server.rejected}
    assert dropped == {2, 3, 4, 9}


def test_server_settings_that_do_not_fit_a_round_are_adjusted_not_fatal():
    config = SecureConfig(enabled=True, neighbours=0, threshold=16)
    params = config.params(5, 1.0)                  # a Poisson round drew 5 clients
    assert params.neighbours == 4 and params.threshold == 5
    odd = SecureConfig(enabled=True, neighbours=5).params(20, 1.0)
    assert odd.neighbours == 6                      # the ring graph needs an even degree
