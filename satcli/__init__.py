"""satcli: batch image captioning with Show, Attend and Tell.

From Python: ``satcli.load("runs/x/best.pt").caption(["a.jpg", "b.png"], beam_size=3)`` (see :mod:`satcli.api`).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("satcli")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__", "load"]


def __getattr__(name: str):
    if name == "load":  # imported on first use: `import satcli` stays light for the CLI
        from satcli.api import load

        return load
    raise AttributeError(f"module 'satcli' has no attribute {name!r}")
