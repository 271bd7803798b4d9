"""Registry resolution and the checked downloader (against a local HTTP server)."""
import hashlib
import http.server
import io
import threading
import zipfile
from dataclasses import replace

import pytest

from fedrec.shared.data import datasets
from fedrec.shared.data.datasets import REGISTRY, download, load_dataset, locate
from fedrec.shared.data.schema import DataError
from tests.test_readers_data import U_DATA, U_ITEM


def _zip_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("ml-100k/u.data", U_DATA)
        zf.writestr("ml-100k/u.item", U_ITEM.encode("latin-1"))
    return buffer.getvalue()


@pytest.fixture
def http_server(tmp_path):
    (tmp_path / "ml-100k.zip").write_bytes(_zip_bytes())
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **k)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_download_checks_sha256_and_unpacks(http_server, monkeypatch):
    good = replace(REGISTRY["ml-100k"], sha256=hashlib.sha256(_zip_bytes()).hexdigest())
    folder = download(good, base_url=http_server, log=lambda m: None)
    assert (folder / "u.data").read_text() == U_DATA
    monkeypatch.setattr(datasets, "_recbole_ml100k", lambda: None)
    assert locate("ml-100k", allow_download=False) == folder     # found in the cache next time


def test_download_with_wrong_checksum_is_refused_and_discarded(http_server):
    with pytest.raises(DataError, match="checksum mismatch .* the download was discarded"):
        download(REGISTRY["ml-100k"], base_url=http_server, log=lambda m: None)
    assert not (datasets.cache_dir() / "datasets" / "ml-100k").exists()


def test_no_network_message_says_what_to_do(monkeypatch):
    monkeypatch.setattr(datasets, "_recbole_ml100k", lambda: None)
    with pytest.raises(DataError, match="cannot download .*--data-dir"):
        locate("ml-latest-small", base_url="http://127.0.0.1:9", log=lambda m: None)


def test_unknown_name():
    with pytest.raises(DataError, match="unknown dataset 'ml-7'; known: ml-100k"):
        load_dataset("ml-7")


def test_data_dir_is_used_first(tmp_path):
    """A folder the user names wins over the copy the project installs (RecBole's ML-100K)."""
    (tmp_path / "ml-100k").mkdir()
    (tmp_path / "ml-100k" / REGISTRY["ml-100k"].marker).write_text("")
    assert locate("ml-100k", tmp_path) == tmp_path / "ml-100k"
    assert locate("ml-100k", tmp_path / "ml-100k") == tmp_path / "ml-100k"
    assert locate("ml-100k", allow_download=False) == datasets._recbole_ml100k()


def test_recbole_wheel_copy_is_found_offline():
    folder = datasets._recbole_ml100k()
    if folder is None:
        pytest.skip("recbole not installed")
    ds = load_dataset("ml-100k", allow_download=False)
    assert len(ds.interactions) == 100_000 and len(ds.catalog) == 1682


@pytest.mark.parametrize("name,events,users,items", [("ml-100k", 100_000, 943, 1682),
                                                      ("ml-latest-small", 100_836, 610, 9742)])
def test_real_movielens_load(name, events, users, items):
    """ML-100K from ../shared/datasets or else the copy the project installs; ml-latest-small
    only where ../shared/datasets has it (nothing the project installs carries it)."""
    from tests.conftest import SHARED_DATASETS
    data_dir = SHARED_DATASETS if (SHARED_DATASETS / name).is_dir() else None
    if data_dir is None and name != "ml-100k":
        pytest.skip(f"../shared/datasets/{name} not present")
    ds = load_dataset(name, data_dir, allow_download=False)
    assert len(ds.interactions) == events and ds.interactions.n_users == users
    assert len(ds.catalog) == items
