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

from fedrec.client import secure
from fedrec.client.store import write_credentials
from fedrec.server.secure import SecureConfig
from fedrec.shared.protocol import (SharesRequest, pack_abort_request, pack_register_request, pack_shares_request,
                             refusal_of)
from fedrec.shared.secagg.client import SecAggClient, identity_public, new_identity_key
from fedrec.shared.secagg.fixed_point import quantisation_error_bound
from fedrec.shared.secagg.identity import EnrolmentCA, IdentityRecord, identity_record, view_message
from fedrec.shared.secagg.params import ProtocolViolation, SecAggParams, default_params
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
    # Declares k = 2, t = 3 (all of 3 holders) but hands the victim 4 neighbours: t is then no
    # two-thirds majority of its 5 actual holders.
    (SecAggParams(neighbours=2, threshold=3, clip=1.0, max_clients=3), 4, "more than the round.s|outside this round.s graph"),
])
def test_server_chosen_parameters_below_the_clients_floors_are_refused(params, neighbours, message):
    devices = {u: CA.enrol() for u in range(1, 6)}
    keys = {u: new_identity_key() for u in devices}
    records = {u: identity_record(devices[u], identity_public(keys[u])).to_bytes() for u in devices}
    with pytest.raises(ProtocolViolation, match=message):
        client = SecAggClient(1, params, b"r", keys[1], CA.public, devices[1].device_public)
        client.share_keys({v: records[v] for v in range(2, 2 + neighbours)})


def _masked_round(n, params, round_id, inbox_of=None):
    """Steps 1 and 2 in process; `inbox_of(u, inbox)` lets the server withhold part of an inbox."""
    clients, server, records = start_round(n, params, round_id)
    inbox = server.route_shares({u: clients[u].share_keys(records[u]) for u in records})
    rng = np.random.default_rng(0)
    for u in clients:
        clients[u].masked_input(np.full(10, 0.01 * u), inbox_of(u, inbox[u]) if inbox_of else inbox[u], rng)
    return clients, server


def test_split_views_with_a_colluder_reveal_neither_secret():
    """The server shows holders {1, 2} a view with client 1 alive (for its self-mask seed) and
    holders {3, 4} one with it dropped (for its mask key); colluder 5 signs both. With t above
    two thirds of the 5 holders (t = 4), neither side gathers t signatures. (With a majority,
    t = 3, both would: the attack the reviewer ran on a majority threshold.)"""
    params = SecAggParams(neighbours=4, threshold=4, clip=1.0, max_clients=5)
    clients, server = _masked_round(5, params, b"split")
    alive_view, dropped_view = ([1, 2, 3, 4, 5], []), ([2, 3, 4, 5], [1])
    signed_a = {u: clients[u].confirm(*alive_view, clients[u].credentials) for u in (1, 2)}
    signed_b = {u: clients[u].confirm(*dropped_view, clients[u].credentials) for u in (3, 4)}
    colluder = clients[5].credentials
    signed_a[5] = colluder.sign(view_message(b"split", *alive_view, (5, 4), 5, b""))
    signed_b[5] = colluder.sign(view_message(b"split", *dropped_view, (5, 4), 5, b""))
    for u, view, signed in [(1, alive_view, signed_a), (2, alive_view, signed_a),
                            (3, dropped_view, signed_b), (4, dropped_view, signed_b)]:
        with pytest.raises(ProtocolViolation, match="fewer than the threshold"):
            clients[u].unmask_shares(*view, signed)


def test_a_view_that_calls_the_victims_mask_partners_dropped_is_refused():
    """The server lets client 1 hear only from clients 2, 3 and 4 (t - 1 = 3 senders), then
    calls them dropped and 5 alive: with their mask keys and 1's seed it would strip every mask
    from 1's vector. Client 1 refuses to sign a view that does not match its own masking, and
    the holders left cannot reach t without it."""
    params = SecAggParams(neighbours=4, threshold=4, clip=1.0, max_clients=5)
    withhold = lambda u, inbox: {v: e for v, e in inbox.items() if v != 5} if u == 1 else inbox
    clients, server = _masked_round(5, params, b"partners", withhold)
    view = ([1, 5], [2, 3, 4])
    with pytest.raises(ProtocolViolation, match="called alive but sent this client no shares"):
        clients[1].confirm(*view, clients[1].credentials)
    signatures = {5: clients[5].confirm(*view, clients[5].credentials)}
    with pytest.raises(ProtocolViolation, match="fewer than the threshold"):
        clients[5].unmask_shares(*view, signatures)


def test_self_mask_shares_need_the_signed_view_even_when_nobody_dropped():
    """Why the consistency round runs in every round (session 8 looked at skipping it when no one
    dropped): were self-mask shares revealed for an unsigned all-alive view, the server could get
    the victim's seed that way from its holders, and each neighbour j's mask key from j's holders
    signing a view in which j dropped, and strip every mask off the victim's vector. A holder asked
    for self-mask shares alone, with no signatures, refuses."""
    params = SecAggParams(neighbours=4, threshold=4, clip=1.0, max_clients=5)
    clients, server = _masked_round(5, params, b"unsigned")
    everyone_alive = ([1, 2, 3, 4, 5], [])
    for u in (2, 3, 4, 5):
        with pytest.raises(ProtocolViolation, match="only for the view this client signed"):
            clients[u].unmask_shares(*everyone_alive, {})
    signed = {u: clients[u].confirm(*everyone_alive, clients[u].credentials) for u in (1, 2, 3, 4, 5)}
    assert clients[2].unmask_shares(*everyone_alive, signed)      # signed by t holders: answered


def test_one_device_listed_as_several_neighbours_is_refused():
    """A colluder's valid record under every neighbour number would collect t shares of each of
    the victim's secrets; listing the victim's own record back to it likewise."""
    params = SecAggParams(neighbours=4, threshold=4, clip=1.0, max_clients=5)
    clients, server, records = start_round(5, params, b"dupes")
    colluder = records[1][5]
    for listed in ({v: colluder for v in (2, 3, 4, 5)}, {**records[1], 4: records[2][1]}):
        with pytest.raises(ProtocolViolation, match="repeat a device or an identity key"):
            clients[1].share_keys(listed)


def test_a_substituted_identity_key_gets_no_shares_sealed_to_it():
    """The server swaps neighbour 5's identity record for one of its own (unenrolled device, or
    an enrolled device's certificate over a key that device never signed)."""
    params = SecAggParams(neighbours=4, threshold=4, clip=1.0, max_clients=5)
    clients, server, records = start_round(5, params, b"swap")
    servers_key = new_identity_key()
    rogue = EnrolmentCA.new().enrol()           # the server's own "CA"
    honest = IdentityRecord.from_bytes(records[1][5])
    forgeries = [identity_record(rogue, identity_public(servers_key)).to_bytes(),
                 IdentityRecord(identity_public(servers_key), honest.device_public, honest.certificate,
                                honest.signature).to_bytes()]
    for forged in forgeries:
        client = SecAggClient(1, params, secrets.token_bytes(8), new_identity_key(), CA.public,
                              CA.enrol().device_public)
        with pytest.raises(ProtocolViolation, match="below this client's floor"):
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


def _shares_request(node: Context, round_id: bytes, threshold: int = 4) -> Message:
    own = secure.handle_register(_message(pack_register_request(), "register"), node, {})
    record = bytes(own.content["secagg"]["identity"])
    others = {v: identity_record(CA.enrol(), identity_public(new_identity_key())).to_bytes() for v in range(2, 6)}
    return _message(pack_shares_request(SharesRequest(round_id, 1, 4, threshold, 1.0, 5, record, others)), "shares")


def test_a_replayed_round_id_is_refused(node):
    round_id = secrets.token_bytes(24)
    first = secure.handle_shares(_shares_request(node, round_id), node, {})
    assert refusal_of(first.content) is None and "shares" in first.content
    replay = secure.handle_shares(_shares_request(node, round_id), node, {})
    assert "used before" in refusal_of(replay.content)
    assert secure.STATE_KEY not in node.state    # and the refused round's secrets are gone


def test_a_majority_threshold_is_refused_by_the_client(node):
    """t = 3 of 5 holders is a majority: enough, with one colluder signing two views, for two
    groups to rebuild both of a client's secrets (test_split_views_with_a_colluder_... shows the
    two-thirds t = 4 holding). The client refuses the server's majority itself."""
    refused = secure.handle_shares(_shares_request(node, secrets.token_bytes(24), threshold=3), node, {})
    assert "two thirds" in refusal_of(refused.content)
    accepted = secure.handle_shares(_shares_request(node, secrets.token_bytes(24), threshold=4), node, {})
    assert refusal_of(accepted.content) is None


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


def test_a_graph_other_than_the_rounds_is_refused():
    """Found by the session-8 review: a server that declared a round of 20 but gave 5 clients only
    each other as neighbours (disjoint groups) could unmask each group's sum on its own, with a
    fifth of the noise shares. The graph now follows from the round id; clients check theirs."""
    params = SecAggParams(neighbours=4, threshold=4, clip=1.0, max_clients=20)
    clients, server, records = start_round(5, params, b"cliques")       # the server's 5-clique
    with pytest.raises(ProtocolViolation, match="outside this round's graph"):
        clients[1].share_keys(records[1])


def test_an_alive_list_padded_or_cut_does_not_thin_the_noise():
    """Distributed DP noise, m counted on: each alive input needs a witness (enrolled record +
    signature of the view under its own number, distinct devices), and only inputs connected to
    this client through alive neighbours count. Made-up witnesses fail the sampled check; calling
    two pairs of ring neighbours dropped, which cuts the round in two, leaves each part short."""
    import hashlib
    params = SecAggParams(neighbours=4, threshold=4, clip=1.0, max_clients=20)
    clients, server = _masked_round(20, params, b"padded")
    everyone = (list(range(1, 21)), [])
    signed = {u: clients[u].confirm(*everyone, clients[u].credentials) for u in clients}
    real = {u: server.identities[u] + signed[u] for u in clients}
    for client in clients.values():
        client.min_alive = 20
    rogue = EnrolmentCA.new()                          # the server's own devices: not enrolled by our CA
    fakes = {}
    for u in range(6, 21):
        device = rogue.enrol()
        fakes[u] = (identity_record(device, identity_public(new_identity_key())).to_bytes()
                    + device.sign(view_message(b"padded", *everyone, (20, 4), u, b"")))
    with pytest.raises(ProtocolViolation, match="no enrolled device's signature"):
        clients[3].unmask_shares(*everyone, signed, {**real, **fakes})
    with pytest.raises(ProtocolViolation, match="witnessed inputs"):
        clients[4].unmask_shares(*everyone, signed, {u: real[u] for u in range(1, 19)})
    assert clients[5].unmask_shares(*everyone, signed, real)          # the honest round is answered
    # The cut: ring positions 0, 1 and 10, 11 "dropped" leave two arcs of 8 (the graph's order is
    # public: it follows from the round id).
    clients, server = _masked_round(20, params, b"cut")
    order = np.random.default_rng(np.frombuffer(hashlib.sha256(b"cut").digest(), dtype=np.uint32)).permutation(20) + 1
    dropped = sorted(int(order[i]) for i in (0, 1, 10, 11))
    view = ([u for u in range(1, 21) if u not in dropped], dropped)
    signed = {u: clients[u].confirm(*view, clients[u].credentials) for u in view[0]}
    for client in clients.values():
        client.min_alive = 10                          # 16 alive in all, but 8 in each part
    middle = int(order[5])
    with pytest.raises(ProtocolViolation, match="in this client's part of the round"):
        clients[middle].unmask_shares(*view, signed, {u: server.identities[u] + signed[u] for u in view[0]})


def test_a_short_inbox_is_refused_before_the_device_trains_or_spends(node):
    """A server (or a peer whose shares never arrive) that gives a device too few senders gets a
    refusal, and the device's training step (which charges its ledger and records once-only
    contributions) never runs: nobody can make it spend for a round that cannot go through."""
    from flwr.app import ArrayRecord
    from fedrec.shared.model.config import ModelHyper
    from fedrec.shared.protocol import LocalConfig, MaskedRequest, PrivacyRound, RoundConfig, pack_masked_request, \
        pack_round_config
    round_id = secrets.token_bytes(24)
    assert refusal_of(secure.handle_shares(_shares_request(node, round_id), node, {}).content) is None
    config = RoundConfig(1, 0, LocalConfig(), ModelHyper(), PrivacyRound())
    trained = []
    request = pack_masked_request(ArrayRecord(), pack_round_config(config),
                                  MaskedRequest(round_id, "uniform", 1.0, {}, {}))
    reply = secure.handle_masked(_message(request, "masked"), node, lambda: trained.append(1), config)
    assert "fewer than threshold" in refusal_of(reply.content) and trained == []



def test_a_device_refuses_to_unmask_when_its_holders_and_witnesses_did_another_task():
    """The mixed-task attack of the session-17 review, by a malicious server: it asks one device for
    its counts and every other for a training update it weighs at ~0 (an "examples" cap of 1e300),
    so the sum is that device's counts, while the others' signatures of the same alive list vouched
    for it as holders and as witnesses of the floor. The task is now in the view each signs
    (shared/protocol.py: task_digest): theirs name another task, and the device refuses."""
    from fedrec.shared.model.config import ModelHyper
    from fedrec.shared.privacy.cooccurrence import COUNTS_STAGE
    from fedrec.shared.protocol import LocalConfig, RoundConfig, pack_round_config, task_digest
    from flwr.app import Array, ArrayRecord
    from fedrec.shared.protocol import inputs_digest
    def config(stage=""):
        return {"config": pack_round_config(RoundConfig(1, 0, LocalConfig(), ModelHyper(), stage=stage))}
    counts = task_digest("uniform", 1.0, 1.0, True, 12, inputs_digest(config(COUNTS_STAGE)))
    training = task_digest("examples", 1e300, 1.0, False, 12, inputs_digest(config()))
    assert counts != training and inputs_digest(config(COUNTS_STAGE)) != inputs_digest(config())   # the stage alone
    # The inputs count too (the blend round's encoder and counts): other weights, another task.
    weights = {"arrays": ArrayRecord({"w": Array(np.zeros(3, np.float32))}), "secagg": ArrayRecord()}
    other = {"arrays": ArrayRecord({"w": Array(np.ones(3, np.float32))}), "secagg": ArrayRecord()}
    assert inputs_digest(weights) != inputs_digest(other)
    assert inputs_digest(weights) == inputs_digest({"arrays": weights["arrays"]})   # per-client records left out
    params = SecAggParams(neighbours=4, threshold=4, clip=1.0, max_clients=10)
    everyone = (list(range(1, 11)), [])
    for mixed in (True, False):
        clients, server = _masked_round(10, params, b"mixed" if mixed else b"same")
        for u, client in clients.items():
            client.task, client.min_alive = (counts if u == 1 or not mixed else training), 10
        signed = {u: clients[u].confirm(*everyone, clients[u].credentials) for u in clients}
        witnesses = {u: server.identities[u] + signed[u] for u in clients}
        holders = {v: signed[v] for v in [*server.graph[1], 1]}
        if mixed:
            with pytest.raises(ProtocolViolation, match="fewer than the threshold"):
                clients[1].unmask_shares(*everyone, holders, witnesses)
        else:
            assert clients[1].unmask_shares(*everyone, holders, witnesses)   # the same task: answered
