"""``satcli train --feature-views K``: the training pictures also encoded K times augmented (turned, zoomed,
relit), each view cached; every caption reads one view per epoch."""

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

from satcli.data.views import FeatureViews, ViewAugment, augment


def _only(**changes) -> ViewAugment:
    still = dict(rotation=(0.0, 0.0), scale=(1.0, 1.0), brightness=(1.0, 1.0), saturation=(1.0, 1.0))
    return ViewAugment(**{**still, **changes})


def test_a_quarter_turn_is_torch_rot90_clockwise_and_no_change_is_the_picture():
    picture = torch.rand(3, 8, 8)
    unit = ((0.0,) * 3, (1.0,) * 3)  # mean, std: the picture as it is
    turned = augment(picture, *unit, torch.Generator(), _only(rotation=(90.0, 90.0)))
    assert torch.allclose(turned, torch.rot90(picture, -1, (1, 2)), atol=1e-5)  # clockwise on screen
    back = augment(picture, *unit, torch.Generator(), _only(rotation=(-90.0, -90.0)))
    assert torch.allclose(back, torch.rot90(picture, 1, (1, 2)), atol=1e-5)
    normalised = picture * 2 - 1
    same = augment(normalised, (0.5,) * 3, (0.5,) * 3, torch.Generator(), _only())
    assert torch.allclose(same, normalised, atol=1e-6)


def test_relighting_is_torchvision_brightness_then_saturation_and_keeps_the_normalisation():
    picture = torch.rand(3, 16, 16)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    normalised = (picture - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    out = augment(normalised, mean, std, torch.Generator(), _only(brightness=(1.3, 1.3), saturation=(0.5, 0.5)))
    expected = TF.adjust_saturation(TF.adjust_brightness(picture, 1.3), 0.5)
    assert torch.allclose(out * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1), expected, atol=1e-5)


def test_each_caption_reads_its_picture_from_its_chosen_view():
    n_images, cells, dim, n_views = 10, 4, 3, 2
    arrays = [np.random.default_rng(v).standard_normal((n_images, cells, dim)).astype(np.float16)
              for v in range(n_views + 1)]
    views = FeatureViews.for_epoch(n_views, n_captions=50, seed=1, epoch=0)
    captions = torch.arange(20, 44)
    rows = np.random.default_rng(5).integers(0, n_images, len(captions))
    got = views.gather(arrays, rows, captions)
    for i, (caption, row) in enumerate(zip(captions.tolist(), rows.tolist(), strict=True)):  # slow and obvious
        assert torch.equal(got[i], torch.from_numpy(arrays[int(views.chosen[caption])][row].astype(np.float32)))
    assert set(views.chosen.tolist()) == {0, 1, 2}  # the plain picture stays one of the choices
    again, later = (FeatureViews.for_epoch(n_views, 50, seed=1, epoch=e) for e in (0, 1))
    assert torch.equal(again.chosen, views.chosen) and not torch.equal(later.chosen, views.chosen)


def test_cli_feature_views_cache_each_view_once_and_change_training(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from satcli.cli import app
    from satcli.commands.preprocess import run as preprocess
    from satcli.data.preprocess import PreprocessOptions
    from satcli.data.store import DatasetKind
    from satcli.formats.checkpoint import read_checkpoint

    monkeypatch.setenv("SATCLI_STATE_DIR", str(tmp_path / "state"))
    data = tmp_path / "data"
    preprocess(PreprocessOptions(dataset=DatasetKind.shapes, data_root=data, n_train=24, n_val=4, n_test=0,
                                 image_size=64, min_word_freq=1))

    def train(name: str, *extra: str):
        result = CliRunner().invoke(app, ["train", "--dataset", "shapes", "--data-root", str(data), "--out",
                                          str(tmp_path / name), "--epochs", "1", "--image-size", "64",
                                          "--embed-dim", "16", "--attention-dim", "16", "--decoder-dim", "24",
                                          "--dropout", "0", "--batch-size", "16", *extra])
        assert result.exit_code == 0, result.output
        return read_checkpoint(tmp_path / name / "last.pt")

    plain = train("plain")
    viewed = train("views", "--feature-views", "2")
    assert viewed["train_options"]["feature_views"] == 2
    (folder,) = (data / "shapes" / "features").iterdir()
    files = {p.name: p for p in folder.glob("train*.npy")}
    assert set(files) == {"train.npy", "train.view1.npy", "train.view2.npy"}
    plain_grid, view1, view2 = (np.load(files[n]) for n in ("train.npy", "train.view1.npy", "train.view2.npy"))
    assert plain_grid.shape == view1.shape == view2.shape
    assert not np.array_equal(plain_grid, view1) and not np.array_equal(view1, view2)
    # Same seed, same batches: only the views can make the weights differ.
    assert any(not torch.equal(plain["state_dict"][k], viewed["state_dict"][k]) for k in plain["state_dict"])
    # A second run reads the cached views: the files are not rewritten.
    stamps = {n: p.stat().st_mtime_ns for n, p in files.items()}
    train("views-again", "--feature-views", "2")
    assert {n: p.stat().st_mtime_ns for n, p in files.items()} == stamps
