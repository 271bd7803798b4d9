from pathlib import Path

import pytest

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@pytest.fixture
def datasets_dir() -> Path:
    """../shared/datasets beside the project (real MovieLens); tests skip where it is absent."""
    if not (SHARED_DATASETS / "ml-100k" / "u.data").is_file():
        pytest.skip("../shared/datasets not present")
    return SHARED_DATASETS


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Downloads and feature caches go to the test's own temp folder, never ~/.cache."""
    monkeypatch.setenv("FEDREC_CACHE", str(tmp_path / "fedrec-cache"))
    monkeypatch.delenv("FEDREC_DATA_DIR", raising=False)


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A small centralized run (synthetic data, the default blend) and its published bundle, OUT/bundle;
    trained once for every test that reads a bundle."""
    import os
    from fedrec.cli import main
    out = tmp_path_factory.mktemp("trained-run")
    os.environ.setdefault("FEDREC_CACHE", str(out / "cache"))
    code = main(["train", "--dataset", "synthetic:300x200", "--epochs", "6", "--text-encoder", "none", "--dim", "16",
                 "--max-len", "20", "--eval-every", "2", "--batch-size", "64", "--quiet", "--out", str(out)])
    assert code == 0
    return out


# Tests that leave gRPC's (or faiss's) threads running in this process: they run last. A process with
# such threads that later forks and runs Python in the child (Ray starts its GCS server with a
# preexec_fn) can deadlock that child before exec: seen as Ray's "Timed out waiting for file
# .../gcs_server_port_..." in the simulation tests that followed them.
THREADS_LEFT_BEHIND = ("tests/server/test_serving.py", "test_bench_serve", "test_the_ann_index")


def pytest_collection_modifyitems(config, items):
    late = [item for item in items if any(key in item.nodeid for key in THREADS_LEFT_BEHIND)]
    items[:] = [item for item in items if item not in late] + late
