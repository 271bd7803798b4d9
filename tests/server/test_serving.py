"""The recommendation service on loopback, as a client would use it: its answers, its error codes
(never a stack trace), the health service, bundle reload without restart, GetBundle, and what a
device's two-stage request puts on the wire (no history)."""
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedrec.client.recommend import CANDIDATES, fetch_bundle, service_candidates, two_stage
from fedrec.server.serving import start_server
from fedrec.shared.bundle import load_bundle, write_bundle
from fedrec.shared.proto import recommend_pb2 as pb
from fedrec.shared.proto import recommend_pb2_grpc as pb_grpc
from fedrec.shared.recommend import Recommender

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def service(trained_run, tmp_path):
    folder = tmp_path / "bundle"
    shutil.copytree(trained_run / "bundle", folder)
    server, watcher, port = start_server(folder, port=0, reload_interval_s=0.2)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield pb_grpc.RecommendStub(channel), watcher, folder, channel
    channel.close()
    watcher.stop()
    server.stop(grace=None)


def test_recommend_by_vector_is_the_bundles_top_k(service):
    stub, watcher, _, _ = service
    rec = watcher.current
    vector = rec.user_vectors([rec.indices(rec.item_ids[:5])])[0]
    reply = stub.Recommend(pb.RecommendRequest(user_vector=vector.tolist(), k=10))
    assert reply.model_version == rec.version and len(reply.items) == 10
    expected = rec.top(rec.by_vector(vector[None])[0], 10)
    assert [i.item_id for i in reply.items] == [str(rec.item_ids[i - 1]) for i in expected]
    assert all(i.title for i in reply.items)
    demo = stub.Recommend(pb.RecommendRequest(recent_items=list(rec.item_ids[:3]), k=5, exclude=[rec.item_ids[9]]))
    ids = [i.item_id for i in demo.items]
    assert ids == [r.item_id for r in rec.recommend(list(rec.item_ids[:3]), 5, exclude=[rec.item_ids[9]])]
    similar = stub.SimilarItems(pb.SimilarItemsRequest(item_id=rec.item_ids[0], k=3))
    assert len(similar.items) == 3 and rec.item_ids[0] not in [i.item_id for i in similar.items]


@pytest.mark.parametrize("request_fields, code, words", [
    ({"k": 0, "recent_items": ["1"]}, "INVALID_ARGUMENT", "k: must be"),
    ({"k": 5}, "INVALID_ARGUMENT", "exactly one of"),
    ({"k": 5, "recent_items": ["1"], "user_vector": [0.0] * 16}, "INVALID_ARGUMENT", "exactly one of"),
    ({"k": 5, "user_vector": [0.0] * 3}, "INVALID_ARGUMENT", "width is 16, got 3"),
    ({"k": 5, "user_vector": [float("nan")] * 16}, "INVALID_ARGUMENT", "NaN"),
    ({"k": 5, "recent_items": ["no-such-item"]}, "INVALID_ARGUMENT", "recent_items: item 'no-such-item'"),
    ({"k": 5, "recent_items": ["1"], "exclude": ["zz"]}, "INVALID_ARGUMENT", "exclude: item 'zz'"),
    ({"k": 5, "recent_items": ["1"], "diversity": 2.0}, "INVALID_ARGUMENT", "diversity"),
    ({"k": 5, "recent_items": ["1"], "model_version": "v0"}, "NOT_FOUND", "'v0' is not served"),
])
def test_bad_requests_get_a_status_and_a_message_never_a_traceback(service, request_fields, code, words):
    stub = service[0]
    with pytest.raises(grpc.RpcError) as caught:
        stub.Recommend(pb.RecommendRequest(**request_fields))
    assert caught.value.code() == getattr(grpc.StatusCode, code)
    assert words in caught.value.details() and "Traceback" not in caught.value.details()


def test_vector_diversity_exclude_limits_and_a_huge_vector(service):
    stub, watcher, _, _ = service
    rec = watcher.current
    vector = rec.user_vectors([rec.indices(rec.item_ids[:5])])[0]
    excluded = list(rec.item_ids[:20])
    reply = stub.Recommend(pb.RecommendRequest(user_vector=vector.tolist(), k=10, exclude=excluded, diversity=0.5))
    assert len(reply.items) == 10 and not {i.item_id for i in reply.items} & set(excluded)
    huge = stub.Recommend(pb.RecommendRequest(user_vector=(vector * 1e37).tolist(), k=10))
    plain = stub.Recommend(pb.RecommendRequest(user_vector=vector.tolist(), k=10))
    assert [i.item_id for i in huge.items] == [i.item_id for i in plain.items]
    assert all(np.isfinite(i.score) for i in huge.items)
    for request, words in (({"k": 300, "user_vector": vector.tolist(), "diversity": 0.3}, "with diversity"),
                           ({"k": 5, "user_vector": vector.tolist(), "exclude": ["1"] * 10_001}, "at most")):
        with pytest.raises(grpc.RpcError) as caught:
            stub.Recommend(pb.RecommendRequest(**request))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in caught.value.details()


def test_the_service_searches_an_ann_index_past_its_threshold(trained_run, tmp_path, monkeypatch):
    from fedrec.shared import recommend as shared_recommend
    monkeypatch.setattr(shared_recommend, "ANN_FROM_ITEMS", 50)
    server, watcher, port = start_server(trained_run / "bundle", port=0)
    try:
        rec = watcher.current
        assert rec.index_for_vectors.info["kind"] == "ivf"
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.RecommendStub(channel)
            vectors = rec.user_vectors([rec.indices(rec.item_ids[i:i + 5]) for i in range(0, 100, 5)])
            recall = []
            for v in vectors:
                got = {i.item_id for i in stub.Recommend(pb.RecommendRequest(user_vector=v.tolist(), k=50)).items}
                truth = {str(rec.item_ids[i - 1]) for i in rec.top(rec.by_vector(v[None])[0], 50)}
                recall.append(len(got & truth) / 50)
        assert np.mean(recall) >= 0.9
    finally:
        watcher.stop()
        server.stop(grace=None)


def test_a_bundle_that_does_not_load_leaves_the_old_one_serving(service, caplog):
    stub, watcher, folder, _ = service
    old = load_bundle(folder)
    cfg = type(old.model_config)(**{**old.model_config.to_dict(), "dim": old.model_config.dim * 2})
    write_bundle(folder, model_config=cfg, weights=old.weights, item_vectors=old.item_vectors, catalog=old.catalog,
                 blend=old.blend, item_models=old.item_models)
    assert not watcher.check() and watcher.current.version == old.version
    assert "do not fit the model" in caplog.text
    assert next(iter(stub.GetBundle(pb.GetBundleRequest(include_files=True)))).version == old.version
    assert sum(1 for _ in stub.GetBundle(pb.GetBundleRequest(include_files=True))) >= 4   # its files still stream


class _HostileServer:
    """A service (or anyone on the channel) sending what it likes to a device fetching a bundle."""

    def __init__(self, chunks):
        self.chunks = chunks

    def GetBundle(self, request):
        return iter(self.chunks)


def test_a_device_refuses_a_hostile_bundle_download(service, tmp_path):
    from fedrec.shared.bundle import BundleError, model_hash
    stub, watcher, _, _ = service
    honest = list(stub.GetBundle(pb.GetBundleRequest(include_files=True)))
    manifest = json.loads(honest[0].manifest_json)
    device = tmp_path / "device"
    fetch_bundle(stub, device)
    before = (device / "manifest.json").read_text()

    def renamed(name):
        bad = json.loads(json.dumps(manifest))
        bad["files"]["weights"]["name"] = name
        bad["content_hash"] = model_hash(bad)
        return [pb.BundleChunk(manifest_json=json.dumps(bad))] + honest[1:]
    attacks = {
        "a path": renamed("../../.bashrc"),
        "a file a bundle does not have": renamed("sitecustomize.py"),
        "an extra file": honest + [pb.BundleChunk(file_name="numpy.py", data=b"import os", last=True)],
        "a file that is not what the manifest says": [honest[0]] + [
            pb.BundleChunk(file_name=c.file_name, offset=c.offset, data=c.data[:-1] + b"x", last=c.last)
            for c in honest[1:]],
        "files missing": honest[:2],
        "an edited manifest": [pb.BundleChunk(manifest_json=json.dumps(
            {**manifest, "blend": {"parts": [["popular", 1.0]], "encoder": True}}))] + honest[1:],
    }
    for what, chunks in attacks.items():
        with pytest.raises(BundleError):
            fetch_bundle(_HostileServer(chunks), device)
        assert (device / "manifest.json").read_text() == before, what         # the old bundle stays
        assert sorted(p.name for p in device.iterdir() if not p.name.endswith(".npz")) == ["manifest.json"], what
    assert not (tmp_path / ".bashrc").exists()
    Recommender.load(device)
    stub = service[0]
    for request, words in (({"item_id": "zz", "k": 3}, "item_id: item 'zz'"), ({"item_id": "1", "k": 5000}, "k:")):
        with pytest.raises(grpc.RpcError) as caught:
            stub.SimilarItems(pb.SimilarItemsRequest(**request))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in caught.value.details()


def test_health_service_says_serving(service):
    channel = service[3]
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "fedrec.v1.Recommend"):
        assert health.Check(health_pb2.HealthCheckRequest(service=name)).status == \
            health_pb2.HealthCheckResponse.SERVING


def _wait_for(condition, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_a_newly_published_bundle_is_served_without_a_restart(service):
    stub, watcher, folder, _ = service
    old = load_bundle(folder)
    manifest = write_bundle(folder, model_config=old.model_config, weights=old.weights,
                            item_vectors=old.item_vectors[:, ::-1].copy(), catalog=old.catalog, blend=old.blend,
                            item_models=old.item_models)
    assert manifest["version"] != old.version
    served = lambda: next(iter(stub.GetBundle(pb.GetBundleRequest()))).version
    _wait_for(lambda: served() == manifest["version"])
    with pytest.raises(grpc.RpcError) as caught:
        stub.Recommend(pb.RecommendRequest(model_version=old.version, recent_items=["1"], k=3))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    (folder / "manifest.json").write_text("{ torn")           # a broken publish: the last good one keeps serving
    assert not watcher.check() and served() == manifest["version"]


def test_a_device_fetches_the_bundle_and_recommends_alone(service, tmp_path):
    stub, watcher, _, _ = service
    manifest = fetch_bundle(stub, tmp_path / "device")
    assert manifest["content_hash"] == watcher.current.bundle.content_hash
    local = Recommender.load(tmp_path / "device")
    history = list(local.item_ids[:4])
    assert [r.item_id for r in local.recommend(history, 5)] == [r.item_id for r in watcher.current.recommend(history, 5)]


class _Recorder(grpc.UnaryUnaryClientInterceptor):
    """Every request message the device sends, as the server would receive it."""

    def __init__(self):
        self.sent = []

    def intercept_unary_unary(self, continuation, details, request):
        self.sent.append(pb.RecommendRequest.FromString(request.SerializeToString()))
        return continuation(details, request)


def test_the_two_stage_device_path_sends_its_vector_never_its_history(service):
    stub, watcher, _, channel = service
    recorder = _Recorder()
    watched = pb_grpc.RecommendStub(grpc.intercept_channel(channel, recorder))
    rec = watcher.current
    short, long = list(rec.item_ids[:3]), list(rec.item_ids[20:60])
    for history in (short, long, short):
        got = two_stage(rec, history, 10, service_candidates(watched, rec), noise_std=0.05, noise_key=b"device secret")
        assert len(got) == 10 and not {r.item_id for r in got} & set(history)
    assert two_stage(rec, [], 5, service_candidates(watched, rec))         # no history: nothing to send
    assert len(recorder.sent) == 3
    for request in recorder.sent:
        assert list(request.recent_items) == [] and list(request.exclude) == []
        assert request.k == CANDIDATES                       # the same for a short and a long history
        assert len(request.user_vector) == rec.bundle.item_vectors.shape[1]
        fields = {f.name for f, _ in request.ListFields()}
        assert fields <= {"model_version", "user_vector", "k"}
    exact = [np.asarray(r.user_vector) for r in recorder.sent]
    assert exact[0].tolist() == exact[2].tolist()            # the same history, the same noise: nothing to average
    clean = rec.user_vectors([rec.indices(short)])[0]
    assert abs(np.linalg.norm(exact[0]) - np.linalg.norm(exact[1])) < 1.0       # lengths say little
    assert not np.allclose(exact[0], clean / np.linalg.norm(clean), atol=1e-3)  # noised


def test_the_two_stage_path_survives_a_new_bundle_on_the_service(service):
    stub, watcher, folder, _ = service
    rec = Recommender.load(folder)                        # what the device holds
    old = load_bundle(folder)
    new = write_bundle(folder, model_config=old.model_config, weights=old.weights,
                       item_vectors=old.item_vectors * 2, catalog=old.catalog, blend=old.blend,
                       item_models=old.item_models)
    _wait_for(lambda: watcher.current.version == new["version"])
    history = list(rec.item_ids[:5])
    got = two_stage(rec, history, 5, service_candidates(stub, rec))      # NOT_FOUND: ranked on the device
    assert [r.item_id for r in got] == [r.item_id for r in rec.recommend(history, 5)]


def test_generated_grpc_code_is_in_step_with_the_proto(tmp_path):
    tools = pytest.importorskip("grpc_tools.protoc")
    staged = tmp_path / "fedrec" / "shared" / "proto"   # the module it imports as (fedrec.shared.proto)
    staged.mkdir(parents=True)
    shutil.copy(ROOT / "shared" / "proto" / "recommend.proto", staged)   # the source only: protoc must write the rest
    code = tools.main(["protoc", f"-I{tmp_path}", f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}",
                       str(staged / "recommend.proto")])
    assert code == 0
    for name in ("recommend_pb2.py", "recommend_pb2_grpc.py"):
        assert (staged / name).read_text() == (ROOT / "shared" / "proto" / name).read_text(), \
            f"regenerate shared/proto/{name} (see recommend.proto)"


def test_fedrec_serve_starts_answers_and_stops(trained_run):
    process = subprocess.Popen([sys.executable, "-m", "fedrec.cli", "serve", "--bundle", str(trained_run / "bundle"),
                                "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = process.stdout.readline()                     # printed once it listens
        assert "serving bundle" in line, (line, process.stderr.read() if process.poll() is not None else "")
        port = int(line.split(" on ")[1].split(" ")[0].rsplit(":", 1)[1])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = pb_grpc.RecommendStub(channel).Recommend(pb.RecommendRequest(recent_items=["1", "2"], k=3))
        assert len(reply.items) == 3
    finally:
        process.send_signal(__import__("signal").SIGINT)
        process.wait(timeout=60)
    assert process.returncode == 0, process.stderr.read()


def test_fedrec_recommend_prints_titles_and_reasons(trained_run, capsys):
    from fedrec.cli import main
    bundle = json.loads((trained_run / "bundle" / "manifest.json").read_text())
    assert bundle["format"] == "fedrec-bundle/1"
    assert main(["recommend", "--bundle", str(trained_run / "bundle"), "--history", "1,2,3", "-k", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("because:") >= 1 and "recent history (3 items" in out
    with pytest.raises(SystemExit) as exit_:
        main(["recommend", "--bundle", str(trained_run / "bundle"), "--history", "1,zz"])
    assert exit_.value.code == 2 and "item 'zz' is not in the catalog" in capsys.readouterr().err


def test_cli_edges_empty_history_busy_port_and_keyless_noise(trained_run, service, capsys):
    from fedrec.cli import main
    assert main(["recommend", "--bundle", str(trained_run / "bundle"), "--history", ",", "-k", "3"]) == 0
    assert "no history yet: the most popular items" in capsys.readouterr().out
    stub, watcher, folder, _ = service
    server, other, port = start_server(folder, port=0)
    try:
        with pytest.raises(OSError, match="in use"):
            start_server(folder, port=port)
    finally:
        other.stop()
        server.stop(grace=None)
    rec = watcher.current
    with pytest.raises(ValueError, match="noise_key"):
        two_stage(rec, list(rec.item_ids[:3]), 5, service_candidates(stub, rec), noise_std=0.1)


def test_a_device_update_removes_the_previous_bundle_files(service, tmp_path):
    stub, watcher, folder, _ = service
    fetch_bundle(stub, tmp_path / "device")
    old = load_bundle(folder)
    write_bundle(folder, model_config=old.model_config, weights=old.weights, item_vectors=old.item_vectors * 3,
                 catalog=old.catalog, blend=old.blend, item_models=old.item_models)
    _wait_for(lambda: watcher.current.bundle.content_hash != old.content_hash)
    manifest = fetch_bundle(stub, tmp_path / "device")
    kept = {p.name for p in (tmp_path / "device").iterdir()}
    assert kept == {"manifest.json", *(f["name"] for f in manifest["files"].values())}
