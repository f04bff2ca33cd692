"""Which model ``satcli caption`` uses when none is named: ``SATCLI_MODEL``, else the last one trained here.

``satcli train`` calls :func:`remember_model` with the checkpoint it wrote; the absolute path goes into a small
file under ``$SATCLI_STATE_DIR``, else the platform's user state folder (platformdirs): ``$XDG_STATE_HOME/satcli``
or ``~/.local/state/satcli`` on Linux, ``~/Library/Application Support/satcli`` on macOS,
``%LOCALAPPDATA%\\satcli`` on Windows.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

from satcli.core.atomic import write_text
from satcli.core.errors import SatcliError

MODEL_ENV = "SATCLI_MODEL"
STATE_ENV = "SATCLI_STATE_DIR"
_LAST_MODEL_FILE = "last-model"

_HOW_TO_GET_ONE = ("train one with `satcli demo` (minutes on a CPU) or `satcli train --dataset NAME`, "
                   f"or name one with --model CKPT or {MODEL_ENV}")


def state_dir() -> Path:
    """Where satcli keeps small state between runs."""
    if os.environ.get(STATE_ENV):
        return Path(os.environ[STATE_ENV]).expanduser()
    return Path(platformdirs.user_state_dir("satcli", appauthor=False))


def remember_model(path: str | Path) -> Path:
    """Record ``path`` (made absolute) as the model of the most recent training run. Returns the state file."""
    return write_text(state_dir() / _LAST_MODEL_FILE, str(Path(path).expanduser().absolute()) + "\n")


def default_model() -> Path:
    """The model to use when ``--model`` is not given. Raises SatcliError saying how to get one."""
    from_env = os.environ.get(MODEL_ENV)
    if from_env:
        return Path(from_env).expanduser()
    state = state_dir() / _LAST_MODEL_FILE
    try:
        remembered = state.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise SatcliError(f"no model given and none trained yet: {_HOW_TO_GET_ONE}") from None
    except OSError as error:
        raise SatcliError(f"cannot read the remembered model ({error.strerror}); {_HOW_TO_GET_ONE}", state) \
            from error
    if not remembered:
        raise SatcliError(f"no model given and none trained yet: {_HOW_TO_GET_ONE}")
    path = Path(remembered)
    if not path.is_file():
        raise SatcliError(f"the most recently trained model is gone; {_HOW_TO_GET_ONE}", path)
    return path
