"""dllama: convert, validate and run distributed-llama models (README.md, docs/ARCHITECTURE.md)."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dllama")  # the one version: pyproject.toml's, as installed
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
