"""satcli: batch image captioning with Show, Attend and Tell.

From Python: ``satcli.load("runs/x/best.pt").caption(["a.jpg", "b.png"], beam_size=3)`` (see :mod:`satcli.api`).
"""

from satcli.core.version import __version__

__all__ = ["__version__", "load"]


def __getattr__(name: str):
    if name == "load":  # imported on first use: `import satcli` stays light for the CLI
        from satcli.api import load

        return load
    raise AttributeError(f"module 'satcli' has no attribute {name!r}")
