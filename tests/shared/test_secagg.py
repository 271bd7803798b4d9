"""Secure aggregation without Flower: correctness, dropouts, aborts, and what the server sees."""
import secrets

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedrec.shared.secagg.client import SecAggClient, identity_public, new_identity_key
from fedrec.shared.secagg.fixed_point import quantisation_error_bound
from fedrec.shared.secagg.identity import EnrolmentCA, identity_record
from fedrec.shared.secagg.params import ProtocolViolation, RoundAborted, SecAggParams, default_params, neighbour_graph
from fedrec.shared.secagg.primitives import PRIME, SHARE_BYTES, prg, shamir_combine, shamir_split
from fedrec.shared.secagg.server import SecAggServer


class Transcript:
    """Everything the server receives in one round, kept to check what it could learn."""

    def __init__(self):
        self.keys, self.sealed, self.masked, self.answers = {}, {}, {}, {}


CA = EnrolmentCA.new()


def start_round(n, params, round_id):
    """Clients 1..n, each an enrolled device with a registered identity record, and the server
    holding those records. Returns (clients, server, each client's neighbours' records); each
    client's credentials are in `client.credentials` (the test's own handle on them)."""
    identities = {u: new_identity_key() for u in range(1, n + 1)}
    devices = {u: CA.enrol() for u in identities}
    clients = {u: SecAggClient(u, params, round_id, identities[u], CA.public, devices[u].device_public)
               for u in identities}
    for u, client in clients.items():
        client.credentials = devices[u]
    server = SecAggServer(n, params, round_id)
    records = {u: identity_record(devices[u], identity_public(k)).to_bytes() for u, k in identities.items()}
    return clients, server, server.receive_identities(records)


def confirm_and_unmask(clients, server, view, holders=None):
    """Steps 3 and 4 for the clients in `holders` (default: every alive one)."""
    alive, dropped = view
    holders = alive if holders is None else holders
    signatures = {u: clients[u].confirm(alive, dropped, clients[u].credentials) for u in holders}
    answers = {}
    for u, held in server.signatures_for(signatures).items():
        try:
            answers[u] = clients[u].unmask_shares(alive, dropped, held)
        except ProtocolViolation:
            pass   # too few of its holders signed: it refuses, as client/secure.py answers then
    return answers


def run_round(n, params, vectors, *, drop_before_masking=(), drop_after_masking=(), seed=0,
              transcript=None):
    """One full round in process; returns (decoded sum, count)."""
    rng = np.random.default_rng(seed)
    round_id = secrets.token_bytes(8)
    clients, server, neighbour_keys = start_round(n, params, round_id)
    sealed = {u: clients[u].share_keys(neighbour_keys[u]) for u in neighbour_keys}
    inbox = server.route_shares(sealed)
    keys = dict(server.keys)
    masked = {u: clients[u].masked_input(vectors[u], inbox[u], rng)
              for u in inbox if u not in drop_before_masking}
    view = server.receive_masked(masked)
    answers = confirm_and_unmask(clients, server, view, [u for u in view[0] if u not in drop_after_masking])
    if transcript is not None:
        transcript.keys, transcript.sealed, transcript.masked, transcript.answers = keys, sealed, masked, answers
        transcript.server, transcript.clients = server, clients
    return server.unmask(answers)


def random_vectors(n, d, bound, seed=0):
    rng = np.random.default_rng(seed)
    return {u: rng.uniform(-bound, bound, d) / np.sqrt(d) for u in range(1, n + 1)}


@pytest.mark.parametrize("n", [3, 4, 10, 50, 200])
def test_sum_equals_plain_sum_within_quantisation_bound(n):
    params = default_params(n, clip=1.0)
    vectors = random_vectors(n, 500, 1.0, seed=n)
    total, count = run_round(n, params, vectors)
    assert count == n
    plain = sum(vectors.values())
    assert np.abs(total - plain).max() <= quantisation_error_bound(params, n)
    assert np.abs(total - plain).max() > 0  # it really went through the fixed-point ring


def test_dropouts_after_masking_are_recovered():
    """30% vanish after sending their masked input: their inputs count, their shares are missed."""
    n = 60
    params = default_params(n, clip=1.0, dropout=0.3)
    vectors = random_vectors(n, 300, 1.0, seed=1)
    gone = set(np.random.default_rng(2).choice(np.arange(1, n + 1), size=18, replace=False).tolist())
    total, count = run_round(n, params, vectors, drop_after_masking=gone)
    assert count == n
    assert np.abs(total - sum(vectors.values())).max() <= quantisation_error_bound(params, n)


def test_dropouts_before_masking_leave_the_survivors_sum():
    """30% vanish after sharing keys but before masking: their pairwise masks are rebuilt
    from their mask keys, and the result is the survivors' sum."""
    n = 60
    params = default_params(n, clip=1.0, dropout=0.3)
    vectors = random_vectors(n, 300, 1.0, seed=3)
    gone = set(np.random.default_rng(4).choice(np.arange(1, n + 1), size=18, replace=False).tolist())
    total, count = run_round(n, params, vectors, drop_before_masking=gone)
    survivors = [u for u in vectors if u not in gone]
    assert count == len(survivors)
    assert np.abs(total - sum(vectors[u] for u in survivors)).max() <= quantisation_error_bound(params, n)


@pytest.mark.parametrize("gone_before,gone_after", [((), ()), ((3, 17, 30), ()), ((), (5, 11, 40))])
def test_exact_counts_sum_exactly_on_the_16_bit_ring(gone_before, gone_after):
    """Whole counts (0 or 1) go onto Z_2^16 as they are: the decoded sum is the exact integer sum,
    survivors only when some drop before masking; each masked vector is half the 32-bit size."""
    n, d = 48, 2_000
    params = SecAggParams(**{**vars(default_params(n, clip=30.0, dropout=0.2)), "exact": True})
    assert params.ring_bits == 16 and params.scale == 1.0
    rng = np.random.default_rng(7)
    vectors = {u: (rng.random(d) < 0.2).astype(np.float64) for u in range(1, n + 1)}
    transcript = Transcript()
    total, count = run_round(n, params, vectors, drop_before_masking=gone_before, drop_after_masking=gone_after,
                             transcript=transcript)
    survivors = [u for u in vectors if u not in gone_before]
    assert count == len(survivors)
    assert np.array_equal(total, sum(vectors[u] for u in survivors))
    assert all(m.dtype == np.uint16 and m.nbytes == 2 * d for m in transcript.masked.values())


def test_the_exact_ring_holds_its_population_and_takes_only_counts():
    """16 bits while max_clients ones cannot wrap the signed half (2^15 - 1 of them), 32 past that;
    anything but 0s and 1s is refused (it would be neither exact nor bounded)."""
    from fedrec.shared.secagg.fixed_point import dequantise, quantise
    assert SecAggParams(4, 4, 1.0, 32_767, exact=True).ring_bits == 16
    assert SecAggParams(4, 4, 1.0, 32_768, exact=True).ring_bits == 32
    assert SecAggParams(4, 4, 1.0, 100).ring_bits == 32
    params = SecAggParams(4, 4, 1.0, 32_767, exact=True)
    ones = quantise(np.ones(3), params, np.random.default_rng(0))
    assert dequantise(ones * np.uint16(32_767), params, 32_767).tolist() == [32_767.0] * 3   # the most: no wrap
    assert dequantise(np.array([0xFFFF, 0x8000], np.uint16), params, 1).tolist() == [-1.0, -32_768.0]  # signed
    assert prg(b"k" * 32, 5, params.dtype).dtype == np.uint16 and prg(b"k" * 32, 5).dtype == np.uint32
    for bad in ([0.5, 1.0], [2.0], [-1.0]):
        with pytest.raises(ValueError, match="only 0s and 1s"):
            quantise(np.array(bad), params, np.random.default_rng(0))


def test_too_many_dropouts_abort_the_round():
    n = 20
    params = SecAggParams(neighbours=8, threshold=7, clip=1.0, max_clients=n)
    vectors = random_vectors(n, 100, 1.0)
    with pytest.raises(RoundAborted):
        run_round(n, params, vectors, drop_after_masking=set(range(1, 15)))
    with pytest.raises(RoundAborted):
        run_round(n, params, vectors, drop_before_masking=set(range(1, 17)))


def test_no_individual_update_is_recoverable_from_what_the_server_receives():
    n = 30
    params = default_params(n, clip=1.0)
    # One client's update is large and structured: it must still not show through.
    vectors = {u: np.zeros(4000) for u in range(1, n + 1)}
    vectors[7] = np.where(np.arange(4000) < 2000, 0.015, 0.0)  # L2 norm 0.67 < clip
    t = Transcript()
    total, _ = run_round(n, params, vectors, drop_after_masking={3, 11}, transcript=t)

    # Masked vectors look uniform on the ring: bytes are flat (chi-square, 255 dof) and the
    # masked vector of the structured update is uncorrelated with it.
    for u in (7, 8):
        counts = np.bincount(t.masked[u].view(np.uint8), minlength=256)
        expected = counts.sum() / 256
        chi2 = ((counts - expected) ** 2 / expected).sum()
        assert chi2 < 340, (u, chi2)  # p ~ 0.0003 for 255 degrees of freedom
    high = (t.masked[7] >> 31).astype(float)
    assert abs(np.corrcoef(high, vectors[7] > 0.01)[0, 1]) < 0.08
    assert abs(high.mean() - 0.5) < 0.03

    # The server never holds enough of both secrets of any client, nor any secret in clear.
    for owner in range(1, n + 1):
        kinds = [share[:1] for answers in t.answers.values() for o, share in answers.items() if o == owner]
        assert not (kinds.count(b"b") >= params.threshold and kinds.count(b"s") >= params.threshold)
        assert not ({b"b", b"s"} <= set(kinds)), f"both kinds of share of client {owner} were sent"
    # Step 1 carries public keys, seed commitments and AES-GCM ciphertexts only: no client's
    # seed, mask key, or any share of them appears in it in clear.
    everything = b"".join([b"".join(k) for k in t.keys.values()] +
                          [s_public + commitment + b"".join(boxes.values())
                           for s_public, commitment, boxes in t.sealed.values()])
    for client in t.clients.values():
        secrets_in_clear = [client.self_seed, client.s_private] + [
            part for bundle in client.held.values() for part in (bundle[:SHARE_BYTES], bundle[SHARE_BYTES:])]
        assert not any(secret in everything for secret in secrets_in_clear)


def test_client_refuses_requests_that_would_unmask_someone():
    params = SecAggParams(neighbours=4, threshold=4, clip=1.0, max_clients=5)
    clients, server, nk = start_round(5, params, b"r")
    inbox = server.route_shares({u: clients[u].share_keys(nk[u]) for u in nk})
    rng = np.random.default_rng(0)
    for u in clients:
        clients[u].masked_input(np.zeros(10), inbox[u], rng)
    view = server.receive_masked({u: np.zeros(10, np.uint32) for u in clients})
    with pytest.raises(ProtocolViolation, match="signed"):
        clients[1].unmask_shares(*view, {})                          # no view signed yet
    with pytest.raises(ProtocolViolation, match="both alive and dropped"):
        clients[1].confirm([1, 2, 3], [3, 4], clients[1].credentials)
    signatures = {u: clients[u].confirm(*view, clients[u].credentials) for u in clients}
    with pytest.raises(ProtocolViolation, match="second, different view"):
        clients[1].confirm([1, 2, 3], [4, 5], clients[1].credentials)
    with pytest.raises(ProtocolViolation, match="view this client signed"):
        clients[1].unmask_shares([1, 2, 3], [4, 5], signatures)      # not the view it signed
    with pytest.raises(ProtocolViolation, match="fewer than the threshold"):
        clients[1].unmask_shares(*view, {2: signatures[2], 3: signatures[3]})   # 3 of its holders signed, t = 4
    forged = {**signatures, 2: signatures[3], 4: signatures[5]}      # signatures of other clients
    with pytest.raises(ProtocolViolation, match="fewer than the threshold"):
        clients[1].unmask_shares(*view, {v: forged[v] for v in (2, 4)})
    clients[2].unmask_shares(*view, signatures)
    with pytest.raises(ProtocolViolation, match="once per round"):
        clients[2].unmask_shares(*view, signatures)                  # a second answer


def test_tampered_shares_are_rejected():
    params = SecAggParams(neighbours=2, threshold=3, clip=1.0, max_clients=3)
    clients, server, nk = start_round(3, params, b"r")
    inbox = server.route_shares({u: clients[u].share_keys(nk[u]) for u in nk})
    box, s_public = inbox[1][2]
    tampered = bytearray(box)
    tampered[-1] ^= 1
    with pytest.raises(ProtocolViolation):
        clients[1].masked_input(np.zeros(5), {**inbox[1], 2: (bytes(tampered), s_public)}, np.random.default_rng(0))
    # A server that swaps client 2's mask key for one it made is caught the same way.
    swapped = identity_public(new_identity_key())
    with pytest.raises(ProtocolViolation):
        clients[1].masked_input(np.zeros(5), {**inbox[1], 2: (box, swapped)}, np.random.default_rng(0))


def test_client_state_survives_a_restart_between_steps():
    n = 6
    params = default_params(n, clip=1.0)
    vectors = random_vectors(n, 50, 1.0)
    clients, server, nk = start_round(n, params, b"r9")
    devices = {u: c.credentials for u, c in clients.items()}
    restart = lambda: {u: SecAggClient.from_state(c.state()) for u, c in clients.items()}
    sealed = {u: clients[u].share_keys(nk[u]) for u in nk}
    clients = restart()
    inbox = server.route_shares(sealed)
    rng = np.random.default_rng(0)
    masked = {u: clients[u].masked_input(vectors[u], inbox[u], rng) for u in inbox}
    clients = restart()
    alive, dropped = server.receive_masked(masked)
    signatures = {u: clients[u].confirm(alive, dropped, devices[u]) for u in alive}
    clients = restart()
    total, _ = server.unmask({u: clients[u].unmask_shares(alive, dropped, held)
                              for u, held in server.signatures_for(signatures).items()})
    assert np.abs(total - sum(vectors.values())).max() <= quantisation_error_bound(params, n)
    exact = SecAggParams(**{**vars(params), "exact": True})
    client = start_round(n, exact, b"r10")[0][1]
    assert SecAggClient.from_state(client.state()).params == exact   # a restart keeps the ring


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_shamir_any_threshold_shares_rebuild_and_fewer_do_not(data):
    holders = data.draw(st.integers(1, 60), label="holders")
    threshold = data.draw(st.integers(1, holders), label="threshold")
    ids = data.draw(st.lists(st.integers(1, 10_000), min_size=holders, max_size=holders, unique=True))
    secret = data.draw(st.binary(min_size=32, max_size=32))
    shares = shamir_split(secret, threshold, ids)
    subset = data.draw(st.lists(st.sampled_from(ids), min_size=threshold, max_size=holders, unique=True))
    assert shamir_combine({i: shares[i] for i in subset}) == secret
    if threshold > 1:
        fewer = {i: shares[i] for i in subset[:threshold - 1]}
        try:
            assert shamir_combine(fewer) != secret
        except ValueError:
            pass  # interpolated outside 32 bytes: also "no"
    assert all(int.from_bytes(s, "big") < PRIME for s in shares.values())


def test_graph_is_regular_symmetric_and_connected():
    for n, k in [(10, 4), (100, 18), (200, 18), (7, 6)]:
        graph = neighbour_graph(n, k, secrets.token_bytes(16))
        assert all(len(vs) == min(k, n - 1) for vs in graph.values())
        assert all(u in graph[v] for u, vs in graph.items() for v in vs)
        seen, frontier = {1}, [1]
        while frontier:
            frontier = [v for u in frontier for v in graph[u] if v not in seen]
            seen.update(frontier)
        assert len(seen) == n


def test_prg_is_deterministic_per_seed_and_differs_across_seeds():
    a, b = secrets.token_bytes(32), secrets.token_bytes(32)
    assert np.array_equal(prg(a, 100), prg(a, 100))
    assert not np.array_equal(prg(a, 100), prg(b, 100))


def test_distributed_noise_shares_survive_masking_and_sum_to_the_full_noise():
    """Ten of twelve clients reach the sum, each with a zero update plus its noise share
    (m = 10): the unmasked sum carries the full noise std, as the privacy guarantee needs."""
    from fedrec.client.secure import add_noise_share
    n, m, full, d = 12, 10, 0.5, 20_000
    share = full / np.sqrt(m)
    params = default_params(n, clip=1.0 + 10 * share)
    vectors = {u: np.clip(add_noise_share(np.zeros(d), share), -params.bound, params.bound) for u in range(1, n + 1)}
    total, count = run_round(n, params, vectors, drop_before_masking=(11, 12))
    assert count == m
    assert total.std() == pytest.approx(full, rel=0.03)
    assert np.abs(total - sum(vectors[u] for u in range(1, m + 1))).max() <= quantisation_error_bound(params, m)


def _ring_graph_reference(n, k, seed):
    """The neighbour graph as first written (a loop over the ring): every device and the server
    must derive the same graph, whatever fedrec version each runs."""
    import hashlib
    if k >= n - 1:
        return {u: [v for v in range(1, n + 1) if v != u] for u in range(1, n + 1)}
    order = np.random.default_rng(np.frombuffer(hashlib.sha256(seed).digest(), dtype=np.uint32)).permutation(n) + 1
    graph = {int(u): set() for u in order}
    for pos, u in enumerate(order):
        for step in range(1, k // 2 + 1):
            v = int(order[(pos + step) % n])
            graph[int(u)].add(v)
            graph[v].add(int(u))
    return {u: sorted(vs) for u, vs in sorted(graph.items())}


@pytest.mark.parametrize("n,k", [(5, 2), (10, 5), (25, 24), (30, 6), (943, 54), (1000, 61)])
def test_the_neighbour_graph_is_the_one_every_version_derives(n, k):
    for seed in (b"a", secrets.token_bytes(24)):
        assert neighbour_graph(n, k, seed) == _ring_graph_reference(n, k, seed)


def test_a_view_naming_a_client_number_outside_32_bits_is_refused_not_a_crash():
    """A server may put any integer in the alive or dropped list it shows; the view cannot be packed,
    and the client must refuse (ValueError -> ProtocolViolation), not fail with an OverflowError."""
    from fedrec.shared.secagg.identity import view_message
    for bad in ([2 ** 32], [-1], [2 ** 70]):
        with pytest.raises(ValueError, match="outside 0..2"):
            view_message(b"r" * 16, bad, [], (3, 2), 1, b"")
        with pytest.raises(ValueError, match="outside 0..2"):
            view_message(b"r" * 16, [1, 2], bad, (3, 2), 1, b"")
