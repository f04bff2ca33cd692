"""Options from a TOML file: ``satcli train --config run.toml``, and ``--print-config`` to write one.

The file's keys are the command's option names (``decoder-lr`` or ``decoder_lr``), flat or under a ``[train]``
table. Its values become the defaults of this invocation, so options on the command line still win. An unknown
key or a value of the wrong type is one line naming the file and the key.
"""

from __future__ import annotations

import difflib
import json
import sys
from pathlib import Path
from typing import Any

import click

from satcli.core.errors import SatcliError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

NOT_FROM_FILE = ("config", "print_config", "dry_run", "as_json")  # the switches of one invocation, not a run's


def read_config(path: Path, command: click.Command, section: str) -> dict[str, Any]:
    """The file's values by parameter name, checked against ``command``'s parameters."""
    try:
        values = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise SatcliError(f"cannot read the config file ({error.strerror})", path) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise SatcliError(f"not a valid TOML file ({error})", path) from None
    if isinstance(values.get(section), dict) and len(values) == 1:
        values = values[section]
    names = {p.name for p in command.params if p.name and p.name not in NOT_FROM_FILE}
    options: dict[str, Any] = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in names:
            close = difflib.get_close_matches(name, sorted(names), n=1)
            hint = f" (did you mean {close[0].replace('_', '-')!r}?)" if close else ""
            raise SatcliError(f"unknown option {key!r} for satcli {section}{hint}", path)
        if isinstance(value, dict | list):
            raise SatcliError(f"option {key!r} must be a single value, not a {type(value).__name__}", path)
        options[name] = value
    return options


def config_callback(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    """An eager ``--config``: the file's values become this invocation's defaults before the other options."""
    if value is not None:
        ctx.default_map = {**(ctx.default_map or {}), **read_config(value, ctx.command, ctx.info_name or "")}
    return value


def to_toml(values: dict[str, Any], section: str) -> str:
    """Flat options as a TOML table ``[section]``; None (not set: the built-in default) as a comment."""
    lines = [f"[{section}]"]
    for key, value in values.items():
        name = key.replace("_", "-")
        if value is None:
            lines.append(f"# {name} = (not set)")
        elif isinstance(value, bool):
            lines.append(f"{name} = {'true' if value else 'false'}")
        elif isinstance(value, int | float):
            lines.append(f"{name} = {value!r}")
        else:
            lines.append(f"{name} = {json.dumps(str(value), ensure_ascii=False)}")
    return "\n".join(lines) + "\n"
