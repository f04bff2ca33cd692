"""Attention pictures: where the model looked for each word, drawn over the image.

For each captioned image :func:`write_overlays` writes two files into the overlay folder:

- ``<name>.png``: a contact sheet. The caption on top, then the image and one panel per word: that word's
  attention upsampled smoothly (bicubic) over the image in a perceptual colour map (matplotlib's ``inferno``,
  whose lightness rises monotonically, so the brightest place is where the model looked hardest), the word with
  its probability given the words before it (files written before the ``token_logprobs`` column: the word
  alone) and the attention's peak weight under the panel.
- ``<name>.gif``: an animation, one frame per word, in which the gaze moves over the image as the caption is
  written (the current word highlighted).

Pictures are thumbnail-sized (panels of ``panel`` pixels, :data:`PANEL` = 160 by default) so that thousands
of images stay cheap.
``<name>`` is the image's result path made safe as a file name, plus a short hash of the full path so that two
images never share a name and no path can point outside the folder.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from satcli.core.atomic import atomic_path, make_folder
from satcli.core.console import counted, make_progress
from satcli.core.errors import SatcliError
from satcli.core.marks import mark_pictures_folder
from satcli.core.printing import word_probability
from satcli.data.images import open_image_file
from satcli.formats.results import count_rows, recorded_image_root
from satcli.formats.results_rows import checked_rows

log = logging.getLogger(__name__)

COLORMAP = "inferno"
PANEL = 160  # pixels a side of one panel in the contact sheet
FRAME = 192  # pixels a side of the animation's picture
FRAME_MS = 700  # how long the animation rests on each word
MAX_COLUMNS = 6  # panels per row of the contact sheet
MAX_ASPECT = 8  # no picture is drawn more than 8 times longer than wide, whatever the image's shape
# Words and paths are cut to this many characters before they are measured: a panel shows about 20, the title
# about 170, and measuring a 20,000-character word over and over took minutes.
MAX_LABEL_CHARS = 200
# A pixel shows ``(1 - w) · image + w · colour`` with ``w = BLEND_FLOOR + BLEND_GAIN · heat``: the image stays
# visible everywhere, dimmed where the model did not look, and the colour takes over where it did.
BLEND_FLOOR = 0.5
BLEND_GAIN = 0.3
_BACKGROUND = (250, 250, 250)
_INK = (20, 20, 20)
_MUTED = (110, 110, 110)
_HIGHLIGHT = (200, 60, 20)
_MISSING = (60, 60, 60)


# ---------------------------------------------------------------------------------------------------------------
# Heatmaps
# ---------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def colormap_lut(name: str = COLORMAP) -> np.ndarray:
    """The 256-entry RGB lookup table of a matplotlib colour map, uint8 (256, 3)."""
    from matplotlib import colormaps  # imported here: only pictures need it, and it costs ~0.2 s

    try:
        cmap = colormaps[name].resampled(256)
    except KeyError:
        raise SatcliError(f"unknown colour map {name!r}") from None
    return (cmap(np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)


def upsample(grid: np.ndarray, width: int, height: int) -> np.ndarray:
    """One attention grid (grid_height, grid_width) → a smooth heat map (height, width), float32 in [0, 1].

    Scaled so the grid's largest weight is 1 (every word gets the full colour range), then upsampled bicubically
    with cell ``(i, j)`` covering the pixels ``[i·height/grid_height, (i+1)·height/grid_height)`` (and likewise
    for columns), the same geometry as the model's view of the squashed image.
    """
    grid = np.asarray(grid, dtype=np.float32)
    peak = float(grid.max()) if grid.size else 0.0
    if not np.isfinite(peak) or peak <= 0:
        return np.zeros((height, width), np.float32)
    heat = Image.fromarray(grid / peak, mode="F").resize((width, height), Image.BICUBIC)
    return np.clip(np.asarray(heat, dtype=np.float32), 0.0, 1.0)


def blend(image: np.ndarray, heat: np.ndarray, lut: np.ndarray | None = None) -> np.ndarray:
    """RGB uint8 (H, W, 3) and heat (H, W) in [0, 1] → the heat drawn over the image, RGB uint8 (H, W, 3)."""
    lut = colormap_lut() if lut is None else lut
    colour = lut[np.rint(heat * 255).astype(np.intp)].astype(np.float32)
    weight = (BLEND_FLOOR + BLEND_GAIN * heat)[..., None]
    return np.rint(image.astype(np.float32) * (1 - weight) + colour * weight).astype(np.uint8)


def heat_panel(thumbnail: Image.Image, grid: np.ndarray) -> Image.Image:
    """One word's attention over a thumbnail (same size as the thumbnail)."""
    rgb = np.asarray(thumbnail.convert("RGB"))
    return Image.fromarray(blend(rgb, upsample(grid, thumbnail.width, thumbnail.height)))


def thumbnail(image: Image.Image | None, size: int, aspect: tuple[int, int] | None = None) -> Image.Image:
    """The picture fitted inside ``size`` × ``size``; a dark placeholder (of ``aspect`` = (w, h)) if it is None.

    No side is drawn shorter than ``size`` / :data:`MAX_ASPECT`: a 1 × 100000 image becomes a 20 × 160 strip (the
    model, too, sees it squashed), not a picture 0 pixels wide."""
    if image is not None:
        return image.convert("RGB").resize(drawn_size(image.width, image.height, size), Image.LANCZOS)
    width, height = aspect if aspect and all(aspect) else (size, size)
    return Image.new("RGB", drawn_size(width, height, size), _MISSING)


def drawn_size(width: int, height: int, size: int) -> tuple[int, int]:
    """``width`` × ``height`` scaled to fit ``size`` × ``size``, each side at least ``size`` / MAX_ASPECT."""
    scale = size / max(width, height, 1)
    shortest = max(1, -(-size // MAX_ASPECT))
    return max(shortest, min(size, round(width * scale))), max(shortest, min(size, round(height * scale)))


# ---------------------------------------------------------------------------------------------------------------
# The contact sheet and the animation
# ---------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _text_width(text: str, font) -> int:
    left, _, right, _ = font.getbbox(text)
    return int(right - left)


def _wrap(words: Sequence[str], font, width: int) -> list[str]:
    """``words`` (each already fitted to ``width``) in lines of at most ``width`` pixels."""
    lines: list[str] = []
    line = ""
    for word in words:
        candidate = f"{line} {word}".strip()
        if line and (len(candidate) > MAX_LABEL_CHARS or _text_width(candidate, font) > width):
            lines.append(line)
            line = word
        else:
            line = candidate
    return [*lines, line] if line else lines


def _fit(text: str, font, width: int) -> str:
    """``text`` cut with an ellipsis to fit ``width`` pixels: at most :data:`MAX_LABEL_CHARS` characters are ever
    measured, and the cut is found by bisection (a few measurements, whatever the length)."""
    cut = len(text) > MAX_LABEL_CHARS
    text = text[:MAX_LABEL_CHARS]
    if not cut and _text_width(text, font) <= width:
        return text
    low, high = 0, len(text)  # the longest prefix that fits with the ellipsis lies in [low, high]
    while low < high:
        middle = (low + high + 1) // 2
        if _text_width(text[:middle] + "…", font) <= width:
            low = middle
        else:
            high = middle - 1
    return text[:low] + "…"


def render_sheet(image: Image.Image | None, tokens: Sequence[str], attention: np.ndarray, title: str = "",
                 panel: int = PANEL, aspect: tuple[int, int] | None = None,
                 token_logprobs: Sequence[float | None] | None = None) -> Image.Image:
    """The contact sheet: ``title`` and the caption, the image, then one heat panel per token.

    ``attention`` is (n_tokens, grid_height, grid_width); ``image`` None draws a placeholder of ``aspect``.
    ``token_logprobs`` (one per token, or None): each word's probability is written after it, as ``dog 0.83``.
    """
    if len(tokens) != attention.shape[0]:
        raise ValueError(f"{len(tokens)} tokens but {attention.shape[0]} attention grids")
    if token_logprobs is not None and len(token_logprobs) != len(tokens):
        raise ValueError(f"{len(tokens)} tokens but {len(token_logprobs)} log-probabilities")
    thumb = thumbnail(image, panel, aspect)
    gap, label_height = 8, 38
    word_font, small_font, title_font = _font(15), _font(12), _font(16)
    n_panels = len(tokens) + 1
    columns = min(n_panels, MAX_COLUMNS)
    rows = -(-n_panels // columns)
    cell_w, cell_h = thumb.width + gap, thumb.height + label_height
    width = max(columns * cell_w + gap, 320)
    words = [_fit(word, title_font, width - 2 * gap) for token in tokens for word in token.split()]
    caption_lines = _wrap(words or ["(empty caption)"], title_font, width - 2 * gap)
    header = gap + (18 if title else 0) + 22 * len(caption_lines) + gap
    sheet = Image.new("RGB", (width, header + rows * cell_h + gap), _BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    y = gap
    if title:
        draw.text((gap, y), _fit(title, small_font, width - 2 * gap), fill=_MUTED, font=small_font)
        y += 18
    for line in caption_lines:
        draw.text((gap, y), line, fill=_INK, font=title_font)
        y += 22
    for k in range(n_panels):
        x0 = gap + (k % columns) * cell_w
        y0 = header + (k // columns) * cell_h
        probability = ""
        if k == 0:
            picture, word, note = thumb, "image", ""
        else:
            grid = attention[k - 1]
            picture, word, note = heat_panel(thumb, grid), tokens[k - 1], f"peak {float(grid.max()):.0%} of gaze"
            probability = _probability(None if token_logprobs is None else token_logprobs[k - 1])
        sheet.paste(picture, (x0, y0))
        room = thumb.width - (_text_width(probability, word_font) if probability else 0)
        word = _fit(word, word_font, max(room, 1))
        draw.text((x0, y0 + thumb.height + 3), word, fill=_INK, font=word_font)
        if probability:
            draw.text((x0 + _text_width(word, word_font), y0 + thumb.height + 3), probability, fill=_HIGHLIGHT,
                      font=word_font)
        if note:
            draw.text((x0, y0 + thumb.height + 21), note, fill=_MUTED, font=small_font)
    return sheet


def _probability(logprob: float | None) -> str:
    """`` 0.83``: a word's probability as written after it, or "" when unknown."""
    probability = word_probability(logprob)
    return "" if probability is None else f" {probability:.2f}"


def render_frames(image: Image.Image | None, tokens: Sequence[str], attention: np.ndarray, size: int = FRAME,
                  aspect: tuple[int, int] | None = None) -> list[Image.Image]:
    """The animation: one frame per token, its attention over the image and the caption with it highlighted."""
    if len(tokens) != attention.shape[0]:
        raise ValueError(f"{len(tokens)} tokens but {attention.shape[0]} attention grids")
    thumb = thumbnail(image, size, aspect)
    font, gap, line_height = _font(14), 6, 18
    width = max(thumb.width, 160)
    tokens = [_fit(token, font, width - 2 * gap) for token in tokens]  # a word longer than the frame is cut
    # Lay the caption out once: every frame has the same lines, only the highlighted word changes.
    placed: list[tuple[int, int]] = []
    x, y, space = gap, 0, _text_width(" ", font) + 2
    for token in tokens:
        w = _text_width(token, font)
        if x > gap and x + w > width - gap:
            x, y = gap, y + line_height
        placed.append((x, y))
        x += w + space
    text_height = (y + line_height if tokens else 0) + 2 * gap
    frames = []
    for t, token in enumerate(tokens):
        frame = Image.new("RGB", (width, thumb.height + text_height), _BACKGROUND)
        frame.paste(heat_panel(thumb, attention[t]), ((width - thumb.width) // 2, 0))
        draw = ImageDraw.Draw(frame)
        for k, (word, (px, py)) in enumerate(zip(tokens, placed, strict=True)):
            colour = _HIGHLIGHT if k == t else (_INK if k < t else _MUTED)
            draw.text((px, thumb.height + gap + py), word, fill=colour, font=font)
        draw.line([(placed[t][0], thumb.height + gap + placed[t][1] + line_height - 1),
                   (placed[t][0] + _text_width(token, font), thumb.height + gap + placed[t][1] + line_height - 1)],
                  fill=_HIGHLIGHT, width=2)
        frames.append(frame)
    return frames


def save_animation(frames: Sequence[Image.Image], path: Path, frame_ms: int = FRAME_MS) -> None:
    """Frames → a looping GIF (one adaptive palette per frame)."""
    if not frames:
        raise ValueError("an animation needs at least one frame")
    paletted = [f.convert("P", palette=Image.Palette.ADAPTIVE, colors=255) for f in frames]
    with atomic_path(path) as tmp:
        paletted[0].save(tmp, format="GIF", save_all=True, append_images=paletted[1:], duration=frame_ms, loop=0,
                         disposal=1, optimize=False)


# ---------------------------------------------------------------------------------------------------------------
# From a results file to a folder of pictures
# ---------------------------------------------------------------------------------------------------------------


def overlay_name(path: str) -> str:
    """A result path → a safe, unique file stem: ``photos/cat.jpg`` → ``photos_cat-1a2b3c4d``."""
    stem = os.path.splitext(path)[0]
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")[-80:] or "image"
    return f"{safe}-{hashlib.sha1(path.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"


def resolve_image(path: str, image_root: Path | None) -> Path:
    """Where the image of a result row lies: absolute paths as they are, relative ones under ``image_root``."""
    return Path(path) if os.path.isabs(path) or image_root is None else Path(image_root) / path


def dataset_images(data_root: Path, name: str) -> Path | None:
    """The folder the image paths of a preprocessed dataset (and of ``satcli evaluate``'s results) start from."""
    from satcli.data.store import StoredDataset

    images = (StoredDataset.open(data_root, name).meta.get("source") or {}).get("images")
    return Path(images) if images else None


def open_image(file: Path) -> Image.Image | None:
    """The picture, EXIF orientation applied, or None when it cannot be read (it may have moved).

    Only regular files are opened: a FIFO or device under an image's name would block or never end.
    """
    try:
        if not stat.S_ISREG(os.stat(file).st_mode):
            return None
        with open_image_file(file) as image:  # the allowed formats only: an EPS file would run Ghostscript
            image.draft("RGB", (2 * PANEL, 2 * PANEL))  # JPEG: decode at a reduced scale, much faster
            return ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):  # Pillow's decoders' errors
        return None


@dataclass
class OverlaySummary:
    """What :func:`write_overlays` did."""

    directory: Path
    n_written: int = 0
    n_errors: int = 0  # rows without a caption: nothing to draw
    n_missing_images: int = 0  # drawn over a grey placeholder: the image file could not be read

    @property
    def files(self) -> list[Path]:
        return sorted(self.directory.glob("*.png"))


_COLUMNS = ["path", "tokens", "attention", "grid_height", "grid_width", "image_width", "image_height", "error",
            "token_logprobs"]


def write_overlays(results: str | Path, image_root: str | Path | None, out_dir: str | Path, limit: int | None = None,
                   panel: int = PANEL, progress: bool = True) -> OverlaySummary:
    """Write ``<name>.png`` and ``<name>.gif`` into ``out_dir`` for every captioned row of ``results``.

    Relative paths in the file are looked up under ``image_root`` (None: the folder the file records, see
    :func:`recorded_image_root`, else the current directory). Rows with an
    error are skipped; an image that cannot be read any more is drawn as a grey placeholder (and counted).
    ``limit`` stops after that many pictures.
    """
    results, out_dir = Path(results), Path(out_dir)
    make_folder(out_dir, "the overlay folder is a file")
    mark_pictures_folder(out_dir, "attention pictures")
    root = Path(image_root) if image_root is not None else recorded_image_root(results)
    summary = OverlaySummary(out_dir)
    n_rows = count_rows(results)
    total = n_rows if limit is None else min(limit, n_rows)
    bar = make_progress()
    bar.disable = not progress
    with bar:
        task = bar.add_task("attention pictures", total=total, unit="images")
        for row in checked_rows(results, _COLUMNS):
            if limit is not None and summary.n_written >= limit:
                break
            if row["error"] is not None or not row["tokens"]:
                summary.n_errors += 1
                continue
            image = open_image(resolve_image(row["path"], root))
            if image is None:
                summary.n_missing_images += 1
            aspect = (row["image_width"], row["image_height"])
            attention = row["attention"]
            name = overlay_name(row["path"])
            sheet = render_sheet(image, row["tokens"], attention, title=row["path"], panel=panel, aspect=aspect,
                                 token_logprobs=row["token_logprobs"])
            with atomic_path(out_dir / f"{name}.png") as tmp:
                # A 256-colour palette keeps a sheet of photos about 3× smaller than true colour.
                sheet.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(
                    tmp, format="PNG", optimize=True)
            save_animation(render_frames(image, row["tokens"], attention, aspect=aspect), out_dir / f"{name}.gif")
            summary.n_written += 1
            bar.advance(task)
    if summary.n_missing_images:
        log.warning("%s could not be read (drawn grey); relative paths are looked up under %s",
                    counted(summary.n_missing_images, "image"), (root or Path(".")).absolute())
    return summary
