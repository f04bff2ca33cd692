"""``satcli train --feature-flips``: the mirrored pictures' cached features, with left/right swapped in words."""

import numpy as np
import torch

from satcli.data.vocab import Vocabulary
from satcli.training.batches import FeatureFlips, flip_table


def test_flipped_captions_read_the_mirrored_pictures_features_and_say_right_for_left():
    vocab = Vocabulary.build([["a", "red", "circle", "left", "of", "a", "blue", "square", "right"]], min_freq=1)
    swap = flip_table(vocab)
    cells, dim, n, n_images = 6, 4, 64, 10
    plain = torch.arange(n_images * cells * dim, dtype=torch.float32).view(n_images, cells, dim)
    mirrored = -plain.numpy()  # stands for the flip view's cache
    rows = np.arange(n) % n_images
    sentence = [vocab.id(w) for w in ["red", "left", "of", "blue", "right"]]
    tokens = torch.tensor([sentence] * n)
    flips = FeatureFlips.for_epoch(mirrored, swap, n_captions=1000, seed=3, epoch=1)
    captions = torch.arange(100, 100 + n)
    out_grids, out_tokens = flips(plain[rows], tokens, captions, rows)

    chosen = flips.chosen[captions]
    assert 0 < int(chosen.sum()) < n  # some, not all
    for i in range(n):
        expected = torch.from_numpy(mirrored[rows[i]]) if chosen[i] else plain[rows[i]]
        assert torch.equal(out_grids[i], expected)
        said = [vocab.words[t] for t in out_tokens[i].tolist()]
        assert said == (["red", "right", "of", "blue", "left"] if chosen[i] else ["red", "left", "of", "blue", "right"])
    # The choice depends on (seed, epoch) only: the same for a resumed run, different next epoch.
    again = FeatureFlips.for_epoch(mirrored, swap, n_captions=1000, seed=3, epoch=1)
    later = FeatureFlips.for_epoch(mirrored, swap, n_captions=1000, seed=3, epoch=2)
    assert torch.equal(again.chosen, flips.chosen) and not torch.equal(later.chosen, flips.chosen)
    assert 400 < int(flips.chosen.sum()) < 600


def test_cli_feature_flips_reach_training(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from satcli.cli import app
    from satcli.commands.preprocess import run as preprocess
    from satcli.data.preprocess import PreprocessOptions
    from satcli.data.store import DatasetKind
    from satcli.formats.checkpoint import read_checkpoint

    monkeypatch.setenv("SATCLI_STATE_DIR", str(tmp_path / "state"))
    data = tmp_path / "data"
    preprocess(PreprocessOptions(dataset=DatasetKind.shapes, data_root=data, n_train=40, n_val=4, n_test=0,
                                 image_size=64, min_word_freq=1))
    states = {}
    for name, extra in (("plain", []), ("flips", ["--feature-flips"])):
        result = CliRunner().invoke(app, ["train", "--dataset", "shapes", "--data-root", str(data), "--out",
                                          str(tmp_path / name), "--epochs", "1", "--image-size", "64",
                                          "--embed-dim", "16", "--attention-dim", "16", "--decoder-dim", "24",
                                          "--dropout", "0", "--batch-size", "16", *extra])
        assert result.exit_code == 0, result.output
        checkpoint = read_checkpoint(tmp_path / name / "last.pt")
        assert checkpoint["train_options"]["feature_flips"] == (name == "flips")
        states[name] = checkpoint["state_dict"]
    # Same seed, same batches: only the flipped grids and words can make the weights differ.
    assert any(not torch.equal(states["plain"][k], states["flips"][k]) for k in states["plain"])


def test_feature_shifts_move_the_grid_by_at_most_a_cell_with_edges_repeated():
    from satcli.training.batches import FeatureShifts

    height, width, dim, n = 3, 4, 2, 40
    grids = torch.randn(n, height * width, dim)
    shifts = FeatureShifts.for_epoch((height, width), n_captions=n, seed=0, epoch=0)
    captions = torch.arange(n)
    moved = shifts(grids, captions)
    assert {tuple(o) for o in shifts.offsets.tolist()} == {(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
    for i in range(n):  # reference: cell (y, x) shows cell (y - dy, x - dx), clamped to the grid
        dy, dx = shifts.offsets[i].tolist()
        for y in range(height):
            for x in range(width):
                source = min(max(y - dy, 0), height - 1) * width + min(max(x - dx, 0), width - 1)
                assert torch.equal(moved[i, y * width + x], grids[i, source])
