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
