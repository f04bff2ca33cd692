"""Folders satcli fills with its own pictures (``--overlays``, a report's ``_files``) carry a hidden marker, so
that a caption run walking an input folder that holds them never takes satcli's pictures for photos.

Only names of satcli's pattern (``NAME-XXXXXXXX.png``/``.gif``/``.jpg``, eight hex digits of the image's path
hash, see :func:`satcli.pictures.overlays.overlay_name`) in a marked folder are skipped: a user's own photos
beside them are still captioned.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from satcli.core.atomic import write_text

PICTURES_MARK = ".satcli-pictures"
_OWN_PICTURE = re.compile(r"^.+-[0-9a-f]{8}\.(png|gif|jpg)$")


def mark_pictures_folder(folder: Path, what: str) -> None:
    """Leave the marker in ``folder`` (once): it holds satcli's ``what`` (e.g. "attention pictures")."""
    mark = folder / PICTURES_MARK
    if not mark.exists():
        write_text(mark, f"satcli writes {what} here; satcli caption skips them (NAME-XXXXXXXX.png/.gif/.jpg) when "
                         "it walks this folder for images.\n")


def is_own_picture(directory: str, name: str) -> bool:
    """Whether ``name`` in ``directory`` is one of satcli's pictures: satcli's name, in a folder it marked."""
    return bool(_OWN_PICTURE.match(name)) and os.path.isfile(os.path.join(directory, PICTURES_MARK))
