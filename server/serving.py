"""The recommendation service: gRPC over one published bundle (shared/bundle.py), reloaded when a
newer bundle is published in its folder, with the standard gRPC health service.

  Recommend      by a user vector (what a device computed from its own history: the server
                 never sees the history) or by recent item ids (a demo path: it sees them)
  SimilarItems   nearest items by item vector
  GetBundle      the served version, and with include_files the bundle's files in chunks (a device
                 fetches with client/recommend.py: fetch_bundle)

Errors a client causes are INVALID_ARGUMENT with a message that names the field; a model version
that is not served is NOT_FOUND; the client never gets a stack trace (it goes to the log).
The messages are in shared/proto/recommend.proto.
"""
from __future__ import annotations

import json
import logging
import math
import os
import threading
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedrec.shared.bundle import BundleError, read_manifest
from fedrec.shared.proto import recommend_pb2 as pb
from fedrec.shared.proto import recommend_pb2_grpc as pb_grpc
from fedrec.shared.recommend import CANDIDATE_POOL, Recommender, UnknownItem

log = logging.getLogger("fedrec.serve")
SERVICE = "fedrec.v1.Recommend"
MAX_K = 1000
MAX_K_DIVERSE = CANDIDATE_POOL   # MMR's cost grows with k x pool
MAX_RECENT = 1000        # recent_items per request
MAX_EXCLUDE = 10_000     # exclude per request
MAX_REQUEST_BYTES = 1 << 20
BUNDLE_STREAMS = 2       # GetBundle streams at once: a client that stops reading holds a worker thread
CHUNK = 1 << 20          # GetBundle's chunk: well under gRPC's 4 MB default message limit


class ServedBundle:
    """A loaded Recommender and open handles on its files: a GetBundle stream reads from these, so a
    newer bundle's publication (which deletes the old files) does not cut it short."""

    def __init__(self, folder: Path):
        self.rec = Recommender.load(folder)
        self.rec.index_for_vectors         # built before it serves, not during a request
        self.files = {}
        for entry in self.rec.bundle.manifest["files"].values():
            self.files[entry["name"]] = os.open(folder / entry["name"], os.O_RDONLY)

    def read(self, name: str, offset: int, size: int) -> bytes:
        return os.pread(self.files[name], size, offset)

    def size(self, name: str) -> int:
        return os.fstat(self.files[name]).st_size

    def __del__(self):
        for fd in getattr(self, "files", {}).values():
            os.close(fd)


class BadRequest(ValueError):
    """A request the client must change: INVALID_ARGUMENT with this message."""


class BundleWatcher:
    """The bundle being served, and a thread that loads a newer one when the folder's manifest
    changes. A bundle that fails to load is logged and the old one kept serving."""

    def __init__(self, folder: Path, interval_s: float = 1.0, on_change=None):
        self.folder, self.interval_s, self.on_change = Path(folder), interval_s, on_change
        self.served = ServedBundle(self.folder)           # BundleError: nothing to serve
        self._failed: str | None = None                    # a content hash that did not load
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="bundle-watcher", daemon=True)

    def start(self) -> "BundleWatcher":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    @property
    def current(self) -> Recommender:
        return self.served.rec

    def check(self) -> bool:
        """Load the folder's bundle if it is not the one served; True when it changed. Whatever goes
        wrong, the bundle being served keeps serving (and one that failed is not retried until the
        manifest changes again)."""
        try:
            content_hash = read_manifest(self.folder)["content_hash"]
            if content_hash in (self.current.bundle.content_hash, self._failed):
                return False
            fresh = ServedBundle(self.folder)
        except BundleError as err:       # mid-publish or broken: retried once the manifest changes
            log.warning("not reloading %s: %s", self.folder, err)
            self._failed = locals().get("content_hash")
            return False
        except Exception:                # anything else, e.g. weights that do not fit: logged, not fatal
            log.exception("not reloading %s", self.folder)
            self._failed = locals().get("content_hash")
            return False
        old, self.served = self.current.version, fresh
        log.info("serving bundle %s (was %s)", fresh.rec.version, old)
        if self.on_change:
            self.on_change(fresh.rec)
        return True

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception:            # the watcher must outlive any one bad publication
                log.exception("bundle watcher")


def _items(rec: Recommender, ids, field: str) -> np.ndarray:
    try:
        return rec.indices(list(ids))
    except UnknownItem as err:
        raise BadRequest(f"{field}: {err}") from None


def _k(k: int) -> int:
    if not 1 <= k <= MAX_K:
        raise BadRequest(f"k: must be 1..{MAX_K}, got {k}")
    return k


def recommend(rec: Recommender, request: pb.RecommendRequest) -> list[tuple[int, float]]:
    """The request's top-k as (item index, score); BadRequest names what is wrong with it."""
    k = _k(request.k)
    if not (math.isfinite(request.diversity) and 0.0 <= request.diversity <= 1.0):
        raise BadRequest(f"diversity: must be in [0, 1], got {request.diversity}")
    if request.diversity > 0 and k > MAX_K_DIVERSE:
        raise BadRequest(f"k: at most {MAX_K_DIVERSE} with diversity > 0, got {k}")
    if len(request.exclude) > MAX_EXCLUDE or len(request.recent_items) > MAX_RECENT:
        raise BadRequest(f"exclude: at most {MAX_EXCLUDE} items; recent_items: at most {MAX_RECENT}")
    exclude = _items(rec, request.exclude, "exclude")
    if bool(len(request.user_vector)) == bool(len(request.recent_items)):
        raise BadRequest("give exactly one of user_vector and recent_items")
    if len(request.user_vector):
        vector = np.asarray(request.user_vector, dtype=np.float32)
        width = rec.bundle.item_vectors.shape[1]
        if vector.shape != (width,):
            raise BadRequest(f"user_vector: the model's width is {width}, got {vector.size} values")
        if not np.isfinite(vector).all():
            raise BadRequest("user_vector: NaN or infinite values")
        norm = float(np.linalg.norm(vector.astype(np.float64)))
        if norm > 0:   # the ranking is the same at any positive scale; unit length cannot overflow
            vector = (vector.astype(np.float64) / norm).astype(np.float32)
        if request.diversity == 0:          # the index's top-k: exact, or IVF for a large catalog
            found, scores = rec.nearest(vector, k, exclude=exclude)
            return list(zip(found.tolist(), scores.tolist()))
        pool, pool_scores = rec.nearest(vector, max(k, CANDIDATE_POOL), exclude=exclude)
        scores = np.full(rec.n_items + 1, -np.inf)
        scores[pool] = pool_scores
    else:
        history = _items(rec, request.recent_items, "recent_items")
        scores = rec.scores([history])[0]
        exclude = np.concatenate([exclude, history])
    top = rec.top(scores, k, exclude=exclude, diversity=float(request.diversity))
    return [(int(i), float(scores[i])) for i in top]


class RecommendService(pb_grpc.RecommendServicer):
    def __init__(self, watcher: BundleWatcher):
        self.watcher = watcher
        self.streams = threading.BoundedSemaphore(BUNDLE_STREAMS)

    def _served(self, version: str, context) -> ServedBundle:
        served = self.watcher.served   # one bundle for the whole request, even if a reload lands
        if version and version != served.rec.version:
            context.abort(grpc.StatusCode.NOT_FOUND, f"model version {version!r} is not served; "
                                                     f"this server has {served.rec.version!r}")
        return served

    def _reply(self, rec: Recommender, scored) -> pb.RecommendReply:
        return pb.RecommendReply(model_version=rec.version, items=[
            pb.ScoredItem(item_id=str(rec.item_ids[i - 1]), title=rec.title(i), score=s) for i, s in scored])

    def _guarded(self, context, work):
        try:
            return work()
        except BadRequest as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except grpc.RpcError:
            raise
        except Exception:
            log.exception("request failed")
            context.abort(grpc.StatusCode.INTERNAL, "the server failed on this request; see its log")

    def Recommend(self, request, context):
        rec = self._served(request.model_version, context).rec
        return self._guarded(context, lambda: self._reply(rec, recommend(rec, request)))

    def SimilarItems(self, request, context):
        rec = self._served(request.model_version, context).rec

        def work():
            _k(request.k)
            _items(rec, [request.item_id], "item_id")
            similar = rec.similar_items(request.item_id, request.k)
            return pb.RecommendReply(model_version=rec.version, items=[
                pb.ScoredItem(item_id=r.item_id, title=r.title, score=r.score) for r in similar])
        return self._guarded(context, work)

    def GetBundle(self, request, context):
        served = self._served(request.model_version, context)   # its open files outlive a newer publication
        rec = served.rec
        manifest = rec.bundle.manifest
        yield pb.BundleChunk(version=rec.version, content_hash=rec.bundle.content_hash,
                             manifest_json=json.dumps(manifest))
        if not request.include_files:
            return
        if not self.streams.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{BUNDLE_STREAMS} bundle downloads are running; "
                                                               "try again shortly")
        try:
            for entry in manifest["files"].values():
                size = served.size(entry["name"])
                for offset in range(0, max(size, 1), CHUNK):
                    yield pb.BundleChunk(file_name=entry["name"], offset=offset,
                                         data=served.read(entry["name"], offset, CHUNK), last=offset + CHUNK >= size)
        except OSError:
            log.exception("GetBundle")
            context.abort(grpc.StatusCode.INTERNAL, "the server failed to read the bundle; see its log")
        finally:
            self.streams.release()


def start_server(bundle: Path, *, host: str = "127.0.0.1", port: int = 0, workers: int = 8,
                 reload_interval_s: float = 1.0) -> tuple[grpc.Server, BundleWatcher, int]:
    """A started gRPC server on host:port (0: any free port) serving `bundle`; returns the server,
    the watcher and the port bound. BundleError when there is no usable bundle."""
    health_service = health.HealthServicer()
    watcher = BundleWatcher(bundle, reload_interval_s).start()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), maximum_concurrent_rpcs=16 * workers,
                         options=[("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
                                  ("grpc.so_reuseport", 0)])   # a second server on the same port fails
    pb_grpc.add_RecommendServicer_to_server(RecommendService(watcher), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_service, server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        bound = 0
    if not bound:
        watcher.stop()
        raise OSError(f"cannot listen on {host}:{port} (in use?)")
    server.start()
    for name in ("", SERVICE):
        health_service.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, watcher, bound
