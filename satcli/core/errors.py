"""The one error type for user mistakes: bad files, bad options, missing data.

Raised anywhere in satcli; only ``satcli.cli`` turns it into a red one-line message and exit code 1.
"""

from __future__ import annotations

from pathlib import Path


class SatcliError(Exception):
    """A problem the user can fix. The message is one line and names the file when there is one."""

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = None if path is None else Path(path)
        super().__init__(f"{path}: {message}" if path is not None else message)


def first_line(error: BaseException, limit: int = 200, empty: str | None = None) -> str:
    """The first line of ``error``'s message, at most ``limit`` characters, for a one-line report; ``empty``
    (default: the exception's type name) when the message is blank."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else (empty or type(error).__name__)
