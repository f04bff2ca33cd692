"""Kept so that ``from satcli.captioning.inputs import find_images`` still works: local files are now one of the
sources in :mod:`satcli.captioning.sources` (``sources/local.py``)."""

from satcli.captioning.sources.local import (  # noqa: F401
    BAD_NAME,
    ImageSource,
    find_images,
    printable_path,
    search_images,
    utf8_name,
)
