"""The encoder-feature cache: with a frozen encoder, every image is encoded once, stored on disk next to the
dataset (keyed by encoder, input size, grid and a hash of the encoder's weights), and reused by every later
training run and evaluation of a model with that very encoder. A fine-tuned encoder has other weights, so its
features live in a folder of their own and never mix with the pretrained encoder's.

``data/NAME/features/<encoder>-<size>px[-grid<G>]-<weights hash>/<split>.npy`` holds a
float16 array (n_images, n_pixels, dim) in the split's row order; a ``<split>.json`` beside it says what made it
(the full hash and the resize filter included: a cache made otherwise is recomputed). Both are written through
:mod:`satcli.core.atomic`, the array first, so a killed run never leaves a cache that looks finished.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from rich.progress import Progress

from models.captioner import Captioner
from models.data import DataConfig, image_to_tensor
from satcli.core.atomic import atomic_path, remove_stale_temps, write_text
from satcli.core.console import make_progress
from satcli.core.errors import SatcliError
from satcli.data.store import StoredDataset
from satcli.data.views import AUGMENT, FLIP_VIEW, augment, view_generator, view_name

log = logging.getLogger(__name__)
CACHE_VERSION = 2  # 2: encoded through encode_images (channels-last, one precision policy)


def encoder_sha256(model: Captioner) -> str:
    """SHA-256 of the encoder's weights and buffers (names, shapes, dtypes and values, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.encoder.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                      if tensor.numel() else b"")
    return digest.hexdigest()


def cache_dir(dataset: StoredDataset, model: Captioner, weights_sha256: str) -> Path:
    c = model.config
    key = f"{c.encoder}-{c.image_size}px" + (f"-grid{c.grid_size}" if c.grid_size else "")
    return dataset.root / "features" / f"{key}-{weights_sha256[:12]}"


def _describe(dataset: StoredDataset, model: Captioner, split: str, weights_sha256: str, data: DataConfig,
              view: int = 0) -> dict:
    c = model.config
    described = {"version": CACHE_VERSION, "encoder": c.encoder, "encoder_sha256": weights_sha256,
                 "image_size": c.image_size, "interpolation": data.interpolation, "grid_size": c.grid_size,
                 "split": split, "n_images": dataset.n_images(split), "store_created": dataset.meta.get("created"),
                 "shape": [dataset.n_images(split), model.grid_shape[0] * model.grid_shape[1], model.encoder.spec.dim]}
    if view == FLIP_VIEW:
        described.update(view="flip")
    elif view:
        described.update(view=view, augment=AUGMENT.describe())
    return described


def cached_features(dataset: StoredDataset, split: str, model: Captioner, device: torch.device,
                    batch_size: int = 64, progress: Progress | None = None,
                    data: DataConfig | None = None, view: int = 0) -> np.ndarray:
    """(n_images, n_pixels, dim) float16 features of ``split``, memory-mapped; computed on first use.
    ``data``: how to prepare the images (a loaded checkpoint's); default: the model config's. ``view`` 1, 2, ...
    are the pictures augmented (satcli.data.views), ``FLIP_VIEW`` the pictures mirrored left-right, each view a
    cache of its own."""
    data = data or DataConfig.for_config(model.config)
    weights = encoder_sha256(model)  # hashing the weights once, for the folder and the description alike
    folder = cache_dir(dataset, model, weights)
    name = f"{split}.{view_name(view)}" if view else split
    array_path, info_path = folder / f"{name}.npy", folder / f"{name}.json"
    expected = _describe(dataset, model, split, weights, data, view)
    if info_path.is_file() and array_path.is_file():
        cached = _cached_array(array_path, info_path, expected)
        if cached is not None:
            return cached
    remove_stale_temps(array_path)  # left by a run killed while encoding
    shape = tuple(expected["shape"])
    with atomic_path(array_path) as tmp, open(tmp, "wb") as out:
        _start_array(out, shape)
        row = 0
        description = f"encoding {dataset.name}/{split}" + (f" ({view_name(view)})" if view else "")
        for features in encode_split(dataset, split, model, device, batch_size, progress, description, data, view):
            out.write(features.to(torch.float16).cpu().numpy().tobytes())  # rows in order: one sequential write
            row += len(features)
        if row != shape[0]:
            raise SatcliError(f"the {split} split gave {row} images, not the {shape[0]} its table holds", dataset.root)
    write_text(info_path, json.dumps(expected))
    return np.load(array_path, mmap_mode="r")


def _cached_array(array_path: Path, info_path: Path, expected: dict) -> np.ndarray | None:
    """The cached array when its description is ``expected`` and the array is what that description says
    (shape and dtype: a cache whose array was replaced or cut would fail deep inside training); else None."""
    try:
        if json.loads(info_path.read_text()) == expected:
            array = np.load(array_path, mmap_mode="r")
            if array.shape == tuple(expected["shape"]) and array.dtype == np.float16:
                return array
            log.warning("feature cache %s holds a %s array of shape %s, not the float16 %s its description "
                        "gives; recomputing it", array_path, array.dtype, tuple(array.shape),
                        tuple(expected["shape"]))
            return None
    except (OSError, ValueError, RecursionError):
        pass
    log.info("feature cache %s is stale; recomputing", array_path.parent)
    return None


def _start_array(out: BinaryIO, shape: tuple[int, ...]) -> None:
    """Write the .npy header of a float16 array of ``shape`` and reserve the disk space of its data.

    The array is then written with ordinary writes, never through a memory map: writing into a mapped sparse
    file kills the process with SIGBUS when the disk fills, where a write raises ENOSPC (an OSError, which
    :func:`~satcli.core.atomic.atomic_path` turns into one line and a removed temporary file). Reserving the
    space first makes a disk too small fail now, not after an hour of encoding.
    """
    np.lib.format.write_array_header_1_0(out, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)),
                                               "fortran_order": False, "shape": shape})
    out.flush()
    size = out.tell() + math.prod(shape) * np.dtype(np.float16).itemsize
    try:
        os.posix_fallocate(out.fileno(), 0, size)
    except OSError as error:
        if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # file systems that cannot reserve
            raise
    except AttributeError:  # no posix_fallocate on this platform (macOS): the writes report a full disk alike
        pass


def cache_bytes(n_images: int, grid: tuple[int, int], dim: int) -> int:
    """Bytes of the feature array of ``n_images`` (float16, (n_images, cells, dim)), without the .npy header."""
    return n_images * grid[0] * grid[1] * dim * 2


@torch.inference_mode()
def encode_split(dataset: StoredDataset, split: str, model: Captioner, device: torch.device, batch_size: int = 64,
                 progress: Progress | None = None, description: str = "encoding", data: DataConfig | None = None,
                 view: int = 0):
    """Yield (B, n_pixels, dim) encoder features for ``split`` in row order, decoding images in a thread pool
    while the encoder runs. ``data``: how to prepare the images; default: the model config's. ``view`` > 0: the
    pictures augmented as satcli.data.views describes; ``FLIP_VIEW``: mirrored left-right."""
    data = data or DataConfig.for_config(model.config)
    was_training = model.training
    model.eval()
    own = progress is None
    progress = progress or make_progress()
    if own:
        progress.start()
    task = progress.add_task(description, total=dataset.n_images(split), unit="images")

    def load(batch, first_row: int) -> torch.Tensor:
        images = torch.stack([image_to_tensor(dataset.decode_image(b), data)
                              for b in batch.column("image").to_pylist()])
        if view == FLIP_VIEW:
            return images.flip(-1)
        if view:  # each picture's own random stream: the same view whatever the batch size
            images = torch.stack([augment(image, data.mean, data.std, view_generator(view, first_row + i))
                                  for i, image in enumerate(images)])
        return images

    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            pending, first_row = None, 0
            for batch in dataset.iter_batches(split, batch_size, columns=["image"]):
                future = pool.submit(load, batch, first_row)
                first_row += batch.num_rows
                if pending is not None:
                    yield _encode(model, pending.result(), device, progress, task)
                pending = future
            if pending is not None:
                yield _encode(model, pending.result(), device, progress, task)
    finally:
        progress.remove_task(task)
        if own:
            progress.stop()
        model.train(was_training)


def _encode(model: Captioner, images: torch.Tensor, device: torch.device, progress: Progress, task) -> torch.Tensor:
    features = encode_images(model, images.to(device, non_blocking=True))
    progress.advance(task, len(images))
    return features


def inference_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """The encoder's precision at inference: autocast to bfloat16 on CUDA (float16 where the GPU has no bfloat16),
    full precision elsewhere."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)


def encode_images(model: Captioner, images: torch.Tensor) -> torch.Tensor:
    """Normalised images (B, 3, S, S) on the model's device → (B, n_pixels, dim) float32 features, the one
    precision policy of every decoding path: the encoder under :func:`inference_autocast` on channels-last
    images (the faster convolutions, whose sums round differently from the default layout's), its output rounded
    to float16 as the feature cache stores it; the decoder and beam search then run in float32. ``caption``,
    ``evaluate``, validation and the cache all encode through here, so the same picture gets the same features,
    and the same caption, from each of them."""
    with inference_autocast(images.device):
        features = model.encode(images.contiguous(memory_format=torch.channels_last))
    return features.to(torch.float16).float()
