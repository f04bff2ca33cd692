"""Small builders shared by the tests."""

import torch

from models.captioner import Captioner, CaptionerConfig


def tiny_config(**overrides) -> CaptionerConfig:
    values = dict(vocab_size=24, embed_dim=12, attention_dim=10, decoder_dim=14, dropout=0.0)
    values.update(overrides)
    return CaptionerConfig(**values)


def tiny_captioner(**overrides) -> Captioner:
    return Captioner(tiny_config(**overrides))


def random_features(model: Captioner, n_images: int) -> torch.Tensor:
    rows, cols = model.grid_shape
    return torch.randn(n_images, rows * cols, model.encoder.spec.dim)


def caption_batch(lengths: list[int], vocab_size: int, pad_to: int | None = None):
    """tokens (B, T+1) = <start> words <end> <pad>…, with lengths = words + 1."""
    T = max(lengths) if pad_to is None else pad_to
    tokens = torch.zeros(len(lengths), T + 1, dtype=torch.long)
    for i, n in enumerate(lengths):
        tokens[i, 0] = 1
        tokens[i, 1:n] = torch.randint(4, vocab_size, (n - 1,))
        tokens[i, n] = 2
    return tokens, torch.tensor(lengths)


def peaked_attention(n_tokens: int, height: int, width: int, peaks: list[tuple[int, int]], seed: int = 0):
    """(n_tokens, height, width) float32 grids that sum to 1, token t's largest weight at ``peaks[t]``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    grids = rng.uniform(0.0, 0.3, size=(n_tokens, height, width)).astype(np.float32)
    for t, (row, col) in enumerate(peaks):
        grids[t, row, col] = 1.0
    return grids / grids.sum(axis=(1, 2), keepdims=True)


def write_results_file(path, rows, metadata=None):
    """CaptionRows → a results Parquet at ``path`` (the real writer)."""
    from satcli.formats.results import write_results

    return write_results(path, rows, metadata)


def picture_sensitive_checkpoint(folder):
    """A tiny captioner checkpoint whose captions depend on the picture: a random-init encoder maps every image to
    nearly the same features, so this one has the real EfficientNet-Lite0 weights with their head (whose 1280
    channels spread pictures further apart than stage 6's 192 do under a random decoder: with those, most captions
    of random pictures come out empty or alike) and a decoder with larger weights. Written to
    ``folder / "tiny.pt"``; returns that path."""
    from satcli.data.vocab import SPECIALS, Vocabulary
    from satcli.formats.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = Captioner(tiny_config(image_size=64, encoder="efficientnet-lite0"), pretrained_encoder=True)
    with torch.no_grad():
        for parameter in model.decoder.parameters():
            parameter.mul_(2.0)
    vocab = Vocabulary([*SPECIALS, *(f"word{i}" for i in range(model.config.vocab_size - len(SPECIALS)))])
    return save_checkpoint(folder / "tiny.pt", model, vocab)


def jpeg_bytes(rng, width: int = 40, height: int = 30) -> bytes:
    """A JPEG of random pixels, as bytes."""
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def one_line_error(result, *words: str) -> None:
    """Exit 1 and a single error line naming every one of ``words``; no traceback."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    for word in words:
        assert word in errors[0], result.output


def five_photos(folder):
    """``folder`` with five small random JPEGs, img0.jpg … img4.jpg (the reliability tests' inputs)."""
    import numpy as np

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        (folder / f"img{i}.jpg").write_bytes(jpeg_bytes(rng))
    return folder


def small_caption_options(photos, checkpoint, output, **changes):
    """CaptionOptions of a quick in-process caption run over ``photos`` (batches of 2, 4 words, no workers)."""
    from satcli.captioning.options import CaptionOptions

    values = dict(inputs=(str(photos),), model=checkpoint, output=output, root=photos.parent, batch_size=2,
                  max_length=4, workers=0, progress=False)
    values.update(changes)
    return CaptionOptions(**values)


def small_caption_cli(photos, checkpoint, output, *extra: str):
    """The same run through ``satcli caption`` (Typer's CliRunner), with ``extra`` options."""
    from typer.testing import CliRunner

    from satcli.cli import app

    return CliRunner().invoke(app, ["caption", str(photos), "--model", str(checkpoint), "-o", str(output),
                                    "--root", str(photos.parent), "--batch-size", "2", "--max-length", "4",
                                    "--workers", "0", *extra])


def tiny_shapes_store(root):
    """A preprocessed shapes dataset under ``root`` small enough for evaluate tests: 16 / 4 / 6 pictures of 64 px,
    every word in the vocabulary. Returns ``root``."""
    from satcli.commands.preprocess import run as preprocess
    from satcli.data.preprocess import PreprocessOptions
    from satcli.data.store import DatasetKind

    preprocess(PreprocessOptions(dataset=DatasetKind.shapes, data_root=root, n_train=16, n_val=4, n_test=6,
                                 image_size=64, min_word_freq=1))
    return root
