"""Dataset registry: a name (`ml-100k`) becomes a loaded `Dataset`, found without surprises.

Where a dataset is looked for, in this order:
  1. the directory the user gives (`--data-dir`), either the dataset folder itself or a parent
     holding `<name>/`;
  2. `$FEDREC_DATA_DIR/<name>/`;
  3. the download cache, `$FEDREC_CACHE/datasets/<name>/` (default `~/.cache/fedrec`);
  4. for ML-100K only, the copy that the `recbole==1.2.1` wheel ships (offline, no network);
  5. a download of the official GroupLens archive, checked against its sha256 before it is
     unpacked (only when `allow_download`; a machine with no network fails here with a message
     saying where to put the files).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fedrec.shared.data.readers import read_ml100k, read_ml1m, read_movielens_csv, read_recbole
from fedrec.shared.data.schema import Catalog, DataError, Dataset, Interactions, check_items_known

GROUPLENS = "https://files.grouplens.org/datasets/movielens"


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    marker: str  # a file whose presence identifies the dataset folder
    reader: Callable[[Path], tuple[Interactions, Catalog]]
    archive: str  # file name of the official zip
    sha256: str   # from the archive's published checksum (TFDS url_checksums/movielens.txt)
    size: int


REGISTRY: dict[str, DatasetSpec] = {spec.name: spec for spec in [
    DatasetSpec("ml-100k", "u.data", read_ml100k, "ml-100k.zip",
                "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229", 4924029),
    DatasetSpec("ml-latest-small", "ratings.csv", read_movielens_csv, "ml-latest-small.zip",
                "696d65a3dfceac7c45750ad32df2c259311949efec81f0f144fdfb91ebc9e436", 978202),
    DatasetSpec("ml-1m", "ratings.dat", read_ml1m, "ml-1m.zip",
                "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20", 5917549),
    DatasetSpec("ml-20m", "ratings.csv", read_movielens_csv, "ml-20m.zip",
                "96f243c338a8665f6bcc89c53edf6ee39162a846940de6b7c8c48aeada765ff3", 198702078),
    DatasetSpec("ml-25m", "ratings.csv", read_movielens_csv, "ml-25m.zip",
                "8b21cfb7eb1706b4ec0aac894368d90acf26ebdfb6aced3ebd4ad5bd1eb9c6aa", 261978986),
]}


def cache_dir() -> Path:
    return Path(os.environ.get("FEDREC_CACHE", Path.home() / ".cache" / "fedrec"))


def _recbole_ml100k() -> Path | None:
    """The folder of RecBole's bundled ML-100K atomic files, found without importing recbole."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-100k"
    return folder if (folder / "ml-100k.inter").is_file() else None


def _candidates(spec: DatasetSpec, data_dir: Path | None) -> list[Path]:
    roots = []
    if data_dir is not None:
        roots += [Path(data_dir), Path(data_dir) / spec.name]
    if os.environ.get("FEDREC_DATA_DIR"):
        roots.append(Path(os.environ["FEDREC_DATA_DIR"]) / spec.name)
    roots.append(cache_dir() / "datasets" / spec.name)
    return roots


def locate(name: str, data_dir: Path | None = None, *, allow_download: bool = True,
           base_url: str = GROUPLENS, log: Callable[[str], None] = print) -> Path:
    """The folder holding dataset `name`, downloading it if nothing local has it."""
    spec = _spec(name)
    for folder in _candidates(spec, data_dir):
        if (folder / spec.marker).is_file():
            return folder
    if name == "ml-100k" and (bundled := _recbole_ml100k()) is not None:
        return bundled
    if data_dir is not None and not allow_download:
        raise DataError(f"no {name} here: expected {spec.marker} in it or in {name}/", file=data_dir)
    if not allow_download:
        raise DataError(f"{name} not found locally; pass --data-dir or set FEDREC_DATA_DIR")
    return download(spec, base_url=base_url, log=log)


def download(spec: DatasetSpec, *, base_url: str = GROUPLENS,
             log: Callable[[str], None] = print) -> Path:
    """Fetch the official archive into the cache, check its sha256, then unpack it."""
    target = cache_dir() / "datasets" / spec.name
    url = f"{base_url.rstrip('/')}/{spec.archive}"
    log(f"downloading {url} ({spec.size / 1e6:.1f} MB)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        archive = Path(tmp) / spec.archive
        digest = hashlib.sha256()
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as out:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
        except (urllib.error.URLError, OSError) as err:
            raise DataError(f"cannot download {url}: {err}. With no network, put the files in a "
                            f"folder and pass --data-dir (or set FEDREC_DATA_DIR)") from None
        if digest.hexdigest() != spec.sha256:
            raise DataError(f"checksum mismatch for {url}: got sha256 {digest.hexdigest()}, "
                            f"expected {spec.sha256}; the download was discarded")
        with zipfile.ZipFile(archive) as zf:
            unpacked = Path(tmp) / "unpacked"
            zf.extractall(unpacked)
        marker = next(unpacked.rglob(spec.marker), None)
        if marker is None:
            raise DataError(f"archive {url} has no {spec.marker}")
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(marker.parent), target)  # rename is atomic: no half-unpacked cache
    return target


def _spec(name: str) -> DatasetSpec:
    if name not in REGISTRY:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(REGISTRY)} "
                        f"(or give a path to your own files)")
    return REGISTRY[name]


def load_dataset(name: str, data_dir: Path | None = None, *, allow_download: bool = True,
                 base_url: str = GROUPLENS) -> Dataset:
    """Load a registered dataset by name, validated: every interaction names a known item."""
    folder = locate(name, data_dir, allow_download=allow_download, base_url=base_url,
                    log=lambda m: print(m, file=sys.stderr))
    if (folder / "ml-100k.inter").is_file():  # RecBole's copy
        interactions, catalog = read_recbole(folder / "ml-100k.inter", folder / "ml-100k.item")
    else:
        interactions, catalog = _spec(name).reader(folder)
    check_items_known(interactions, catalog)
    return Dataset(name, interactions, catalog)
