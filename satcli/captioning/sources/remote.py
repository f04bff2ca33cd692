"""URLs through fsspec (``s3://``, ``gs://``, ``hf://``, ``http(s)://``, ``file://``): which filesystem, what a
prefix or glob lists, reading and writing objects, and one-line errors naming the URL and the problem.

fsspec and its protocol packages (s3fs, gcsfs, huggingface_hub ...) are the optional ``satcli[cloud]`` extra:
without them a URL gets one line naming the extra to install. ``storage_options`` (``--storage-option
key=value``) go to the filesystem as keyword arguments, e.g. ``endpoint_url`` for an S3-compatible server
(endpoint environment variables are not honoured everywhere, so an explicit option is the reliable way).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from satcli.core.errors import SatcliError, first_line

URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
EXTRA = "pip install 'satcli[cloud]'"


def is_url(text: str) -> bool:
    """Whether ``text`` is a URL (``scheme://...``) rather than a local path."""
    return URL.match(text) is not None


def parse_storage_options(pairs: Iterable[str]) -> dict[str, Any]:
    """``["endpoint_url=http://127.0.0.1:9000", "anon=true"]`` → keyword arguments for the filesystem. A value
    that reads as JSON (``true``, ``3``, ``{"region_name": "x"}``) is taken as that JSON, else as text."""
    options: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise SatcliError(f"--storage-option must look like key=value (e.g. endpoint_url=http://...); got {pair!r}")
        try:
            options[name.strip()] = json.loads(value)
        except ValueError:
            options[name.strip()] = value
    return options


def filesystem(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """The fsspec filesystem of ``url`` and the path inside it; one-line errors for a missing extra."""
    try:
        import fsspec.core
    except ImportError:
        raise SatcliError(f"reading URLs needs fsspec: {EXTRA}", url) from None
    try:
        return fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    except ImportError as error:  # fsspec names the package of the protocol (s3fs, gcsfs, ...)
        raise SatcliError(f"{first_line(error)}; the cloud extra has the common ones: {EXTRA}", url) from None
    except ValueError as error:
        raise SatcliError(f"not a URL fsspec knows ({first_line(error)})", url) from None
    except Exception as error:
        raise remote_error(error, url) from error


def unstrip(fs: Any, path: str) -> str:
    """A path as a filesystem lists it → the URL naming it (``bucket/a.tar`` → ``s3://bucket/a.tar``)."""
    return fs.unstrip_protocol(path)


def list_url(url: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """The files a URL names, sorted: itself, everything under a prefix (recursively), or a glob's matches.
    Raises one-line SatcliErrors: nothing there, a missing bucket, no access, no connection."""
    fs, path = filesystem(url, storage_options)
    try:
        if any(c in path for c in "*?["):
            found = [p for p in fs.glob(path) if not fs.isdir(p)]
            if not found:
                raise SatcliError("the pattern matches no files", url)
        elif fs.isfile(path):
            found = [path]
        elif fs.isdir(path):
            found = fs.find(path)
        else:
            raise SatcliError("no such file, folder or prefix", url)
    except SatcliError:
        raise
    except Exception as error:
        raise remote_error(error, url) from error
    return sorted(unstrip(fs, p) for p in found)


def open_url(url: str, storage_options: Mapping[str, Any] | None = None, mode: str = "rb") -> Any:
    """An open file object for ``url`` (read by the caller, closed by it)."""
    fs, path = filesystem(url, storage_options)
    try:
        return fs.open(path, mode)
    except Exception as error:
        raise remote_error(error, url) from error


def read_url(url: str, storage_options: Mapping[str, Any] | None = None) -> bytes:
    """The whole content of ``url``."""
    fs, path = filesystem(url, storage_options)
    try:
        return fs.cat_file(path)
    except Exception as error:
        raise remote_error(error, url) from error


def remote_error(error: BaseException, url: str) -> SatcliError:
    """An fsspec / botocore / aiohttp failure → one line naming ``url`` and the problem in a user's words."""
    name = type(error).__name__
    text = first_line(error) or name
    lowered = f"{name} {text}".lower()
    if "nosuchbucket" in lowered or "bucket does not exist" in lowered or "specified bucket" in lowered:
        reason = "no such bucket"
    elif isinstance(error, FileNotFoundError):
        reason = "no such file, folder or bucket"
    elif isinstance(error, PermissionError) or any(w in lowered for w in (
            "accessdenied", "access denied", "forbidden", "invalidaccesskeyid", "signaturedoesnotmatch",
            "credentials")):
        reason = f"access denied: check the credentials ({text})"
    elif any(w in lowered for w in ("connect", "timeout", "timed out", "name or service", "unreachable")):
        reason = f"cannot reach the endpoint ({text})"
    else:
        reason = f"{name}: {text}"
    return SatcliError(reason, url)
