"""fedrec: federated, privacy-preserving recommendations (README.md).

The folders server/, client/, shared/ and simulation/ beside this one are the packages
fedrec.server, fedrec.client, fedrec.shared and fedrec.simulation: an installed wheel puts
them under fedrec/ (pyproject.toml's package-dir); a source tree or a Flower app bundle
keeps them beside it, so there the project root joins this package's search path.
"""
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if not (_HERE / "shared").is_dir() and (_HERE.parent / "shared" / "protocol.py").is_file():
    __path__.append(str(_HERE.parent))

try:
    __version__ = version("fedrec")
except PackageNotFoundError:   # a source tree that was never installed
    __version__ = "unknown (not installed)"

_API = ("train", "load", "Model")


def __getattr__(name: str):
    """fedrec.train / fedrec.load / fedrec.Model (fedrec/api.py), imported on first use so that
    `fedrec --help` stays fast."""
    if name in _API:
        from fedrec import api
        return getattr(api, "Model").load if name == "load" else getattr(api, name)
    raise AttributeError(f"module 'fedrec' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
