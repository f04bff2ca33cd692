"""satcli's version: the installed distribution's, or ``0.0.0+unknown`` in a source tree that was not installed."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("satcli")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
