"""What a training epoch feeds the model, in which order: caption tables, batch plans, cached-feature batches
(with their flips and shifts), image batches for encoder fine-tuning, and SCST's image batches.

Every plan and every random choice here is a function of (seed, epoch) alone, so every rank and every resumed run
sees the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from models.data import DataConfig, normalise, resize
from satcli.core.errors import SatcliError
from satcli.data.store import StoredDataset
from satcli.data.views import FeatureViews
from satcli.data.vocab import Vocabulary
from satcli.training.distributed import Ranks


@dataclass
class CaptionTable:
    """Every caption of a split as one padded tensor: row i is caption i of image ``image[i]``."""

    image: torch.Tensor  # (n_captions,) row of the image in the split
    tokens: torch.Tensor  # (n_captions, T+1) <start> … <end> <pad>…
    lengths: torch.Tensor  # (n_captions,) words + 1

    @classmethod
    def from_store(cls, dataset: StoredDataset, split: str) -> CaptionTable:
        rows = dataset.token_ids(split)
        pairs = [(i, ids) for i, captions in enumerate(rows) for ids in captions if len(ids) >= 2]
        if not pairs:
            raise SatcliError(f"the {split} split has no captions to train on", dataset.root)
        width = max(len(ids) for _, ids in pairs)
        tokens = torch.zeros(len(pairs), width, dtype=torch.long)
        for n, (_, ids) in enumerate(pairs):
            tokens[n, : len(ids)] = torch.tensor(ids)
        lengths = torch.tensor([len(ids) - 1 for _, ids in pairs])
        return cls(torch.tensor([i for i, _ in pairs]), tokens, lengths)

    def __len__(self) -> int:
        return len(self.lengths)


def batch_plan(lengths: torch.Tensor, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """Caption indices per batch for one epoch: shuffled, then sorted by length inside chunks of 32 batches so
    each batch holds captions of similar length, then the batches shuffled. A function of (seed, epoch) alone,
    so every rank and every resumed run sees the same plan."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator)
    batches: list[torch.Tensor] = []
    chunk = batch_size * 32
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        part = part[lengths[part].argsort(descending=True, stable=True)]
        batches.extend(part.split(batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=generator)]


def image_batch_plan(image: torch.Tensor, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """Caption indices per batch for an epoch that runs the encoder: the pictures shuffled, and each batch filled
    with *all* the captions of as many pictures as fit in ``batch_size``, so every picture is encoded once per
    epoch (a batch of shuffled captions holds nearly as many pictures as captions: each picture would be
    encoded once per caption). A function of (seed, epoch) alone, like :func:`batch_plan`."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 53)
    order = image.argsort(stable=True)
    pictures, counts = torch.unique_consecutive(image[order], return_counts=True)
    groups = list(order.split(counts.tolist()))
    batches: list[torch.Tensor] = []
    current: list[torch.Tensor] = []
    size = 0
    for g in torch.randperm(len(pictures), generator=generator).tolist():
        if current and size + len(groups[g]) > batch_size:
            batches.append(torch.cat(current))
            current, size = [], 0
        current.append(groups[g])
        size += len(groups[g])
    if current:
        batches.append(torch.cat(current))
    return batches


def prefetch(items: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Run an iterator ``depth`` items ahead in a thread, so loading overlaps compute."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        queue = []
        for _ in range(depth):
            queue.append(pool.submit(next, items, None))
        while True:
            item = queue.pop(0).result()
            if item is None:
                return
            queue.append(pool.submit(next, items, None))
            yield item


def feature_batches(features: np.ndarray, table: CaptionTable, plan: list[torch.Tensor], ranks: Ranks,
                    flips: FeatureFlips | None = None, shifts: FeatureShifts | None = None,
                    views: tuple[list[np.ndarray], FeatureViews] | None = None
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]]:
    """(features, tokens, lengths, global captions, global tokens) of this rank's share of each batch; with
    ``flips``, half the captions see the mirrored picture's features and say right for left;
    with ``shifts``, grids move by up to a cell; with ``views`` (the cached views, and which one each caption
    reads this epoch), a caption may see its picture augmented."""
    for batch in plan:
        if len(batch) < ranks.world:
            continue
        global_tokens = int(table.lengths[batch].sum())
        mine = batch.tensor_split(ranks.world)[ranks.rank]
        lengths = table.lengths[mine]
        tokens = table.tokens[mine, : int(lengths.max()) + 1]
        rows = table.image[mine].numpy()
        if views is not None:
            grids = views[1].gather(views[0], rows, mine)
        else:
            grids = torch.from_numpy(np.asarray(features[rows], dtype=np.float32))
        if flips is not None:
            grids, tokens = flips(grids, tokens, mine, rows)
        if shifts is not None:
            grids = shifts(grids, mine)
        yield grids, tokens, lengths, len(batch), global_tokens


# Words a horizontal flip turns into each other. A flip that would contradict a caption is never made:
# the words are swapped along with the pixels.
FLIP_PAIRS = (("left", "right"), ("leftmost", "rightmost"))


def flip_table(vocab: Vocabulary) -> torch.Tensor:
    mapping = torch.arange(len(vocab))
    for a, b in FLIP_PAIRS:
        if a in vocab and b in vocab:
            mapping[vocab.id(a)], mapping[vocab.id(b)] = vocab.id(b), vocab.id(a)
    return mapping


@dataclass
class FeatureFlips:
    """For a seeded half of the captions, the features of the mirrored picture (the cached flip view,
    ``satcli.data.views.FLIP_VIEW``) in place of the picture's, and ``left``/``right`` swapped in the words: the
    flip that encoder fine-tuning applies to pixels, from the cache."""

    mirrored: np.ndarray  # (n_images, H*W, D): the flip view of the training split
    swap: torch.Tensor  # vocabulary id → id after a flip
    chosen: torch.Tensor  # (n_captions,) bool: which captions see the mirrored picture this epoch

    @classmethod
    def for_epoch(cls, mirrored: np.ndarray, swap: torch.Tensor, n_captions: int, seed: int,
                  epoch: int) -> FeatureFlips:
        # A function of (seed, epoch) alone, so every rank and every resumed run flips the same captions.
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 17)
        return cls(mirrored, swap, torch.rand(n_captions, generator=generator) < 0.5)

    def __call__(self, grids: torch.Tensor, tokens: torch.Tensor, captions: torch.Tensor, rows: np.ndarray
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """grids (B, H*W, D), tokens (B, T+1), captions (B,) their index in the caption table, rows (B,) their
        pictures' rows in the split."""
        flipped = self.chosen[captions]
        if not flipped.any():
            return grids, tokens
        grids, tokens = grids.clone(), tokens.clone()
        picked = flipped.numpy()
        grids[flipped] = torch.from_numpy(np.asarray(self.mirrored[rows[picked]], dtype=np.float32))
        tokens[flipped] = self.swap[tokens[flipped]]
        return grids, tokens


@dataclass
class FeatureShifts:
    """Translate cached (B, H*W, D) feature grids by up to one cell each way, edge cells repeated: what a small
    random crop does to the grid. Left stays left of right, so captions need no change."""

    grid_shape: tuple[int, int]
    offsets: torch.Tensor  # (n_captions, 2) long: (dy, dx) in {-1, 0, 1} per caption this epoch

    @classmethod
    def for_epoch(cls, grid_shape: tuple[int, int], n_captions: int, seed: int, epoch: int) -> FeatureShifts:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 29)
        return cls(grid_shape, torch.randint(-1, 2, (n_captions, 2), generator=generator))

    def __call__(self, grids: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        """grids (B, H*W, D), captions (B,) their index in the caption table."""
        height, width = self.grid_shape
        n, _, dim = grids.shape
        dy, dx = self.offsets[captions].unbind(1)
        rows = (torch.arange(height)[None, :] - dy[:, None]).clamp(0, height - 1)  # (B, H): cell y shows y - dy
        cols = (torch.arange(width)[None, :] - dx[:, None]).clamp(0, width - 1)  # (B, W)
        moved = grids.view(n, height, width, dim)[torch.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
        return moved.reshape(n, height * width, dim)


def image_batches(dataset: StoredDataset, table: CaptionTable, plan: list[torch.Tensor], ranks: Ranks,
                   preprocessing: DataConfig, flip: torch.Tensor, seed: int, epoch: int
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int]]:
    """For encoder fine-tuning: (images, image index per caption, tokens, lengths, global captions, tokens).

    Images are read from the store by row, decoded, jittered a little in scale and position, and flipped
    left-right half of the time together with the words ``left``/``right``. No colour jitter: colours are
    words in captions.
    """
    file = pq.ParquetFile(dataset.path("train"))
    group_of = np.cumsum([file.metadata.row_group(g).num_rows for g in range(file.num_row_groups)])
    cache: dict[int, list[bytes]] = {}
    generator = torch.Generator().manual_seed(seed * 7919 + epoch)

    def image_bytes(row: int) -> bytes:
        group = int(np.searchsorted(group_of, row, side="right"))
        if group not in cache:
            if len(cache) > 8:
                cache.pop(next(iter(cache)))
            cache[group] = file.read_row_group(group, columns=["image"]).column("image").to_pylist()
        start = 0 if group == 0 else int(group_of[group - 1])
        return cache[group][row - start]

    size = preprocessing.image_size
    for batch in plan:
        if len(batch) < ranks.world:
            continue
        global_tokens = int(table.lengths[batch].sum())
        mine = batch.tensor_split(ranks.world)[ranks.rank]
        rows, per_caption = table.image[mine].unique(return_inverse=True)
        pictures = []
        flips = torch.rand(len(rows), generator=generator) < 0.5
        for row, flipped in zip(rows.tolist(), flips.tolist(), strict=True):
            pixels = resize(dataset.decode_image(image_bytes(row)), preprocessing)
            scale = 1.0 + 0.1 * (float(torch.rand(1, generator=generator)) - 0.5)
            shift = ((torch.rand(2, generator=generator) - 0.5) * 0.08 * size).round().int().tolist()
            pixels = jitter(pixels, scale, shift)
            pictures.append(pixels.flip(-1) if flipped else pixels)
        lengths = table.lengths[mine]
        tokens = table.tokens[mine, : int(lengths.max()) + 1].clone()
        flipped_caption = flips[per_caption]
        tokens[flipped_caption] = flip[tokens[flipped_caption]]
        yield (normalise(torch.stack(pictures), preprocessing), per_caption, tokens, lengths, len(batch),
               global_tokens)


def jitter(pixels: torch.Tensor, scale: float, shift: list[int]) -> torch.Tensor:
    """Zoom by ``scale`` about the centre and translate by ``shift`` pixels, edge pixels repeated."""
    size = pixels.shape[-1]
    theta = torch.tensor([[1 / scale, 0, -2 * shift[0] / size], [0, 1 / scale, -2 * shift[1] / size]])
    grid = F.affine_grid(theta.unsqueeze(0), [1, 3, size, size], align_corners=False)
    out = F.grid_sample(pixels.unsqueeze(0).float(), grid, mode="bilinear", padding_mode="border",
                        align_corners=False)
    return out[0].round().clamp(0, 255).to(torch.uint8)


def image_plan(n_images: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """Image rows per batch for one SCST epoch: a shuffle that is a function of (seed, epoch) alone."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return list(torch.randperm(n_images, generator=generator).split(batch_size))


def image_features(array: np.ndarray, rows: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached features of image ``rows`` (sorted) on ``device``, and the sorted rows."""
    order = np.sort(rows.numpy())  # sorted reads from the memory map; the batch order does not matter
    return torch.from_numpy(np.asarray(array[order], dtype=np.float32)).to(device), torch.from_numpy(order)
