"""fedrec: federated, privacy-preserving recommendations (README.md)."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fedrec")
except PackageNotFoundError:   # a source tree that was never installed
    __version__ = "unknown (not installed)"
