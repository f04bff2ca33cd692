"""The model's data config: one resize filter (bilinear) and one normalisation, from the checkpoint, everywhere.

References: Pillow's own ``Image.resize`` and torchvision's ``transforms.functional`` (``resize`` with the named
``InterpolationMode``, ``to_tensor`` + ``normalize``), on the same pictures.
"""

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from models.data import DataConfig, image_to_tensor, resize
from satcli.captioning.loading import ImageFiles
from satcli.core.errors import SatcliError
from satcli.data.features import encode_split
from satcli.data.vocab import SPECIALS, Vocabulary
from satcli.formats.checkpoint import checkpoint_dict, load_captioner, read_checkpoint, save_checkpoint
from tests.helpers import tiny_captioner

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def blocky_picture(width=150, height=97, seed=0) -> Image.Image:
    """Sharp-edged blocks: bilinear and bicubic give visibly different pixels when it is resized."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (height // 6 + 1, width // 6 + 1, 3), dtype=np.uint8)
    return Image.fromarray(np.kron(blocks, np.ones((6, 6, 1), np.uint8))[:height, :width])


def _pillow_bilinear(image: Image.Image, size: int) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.resize((size, size), Image.Resampling.BILINEAR)).copy()).permute(2, 0, 1)


def test_a_pil_picture_is_resized_as_pillow_and_torchvision_resize_it_bilinear():
    image, data = blocky_picture(), DataConfig(64, MEAN, STD)
    pixels = resize(image, data)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 64, 64)
    assert torch.equal(pixels, _pillow_bilinear(image, 64))
    assert torch.equal(pixels, TF.pil_to_tensor(TF.resize(image, [64, 64], InterpolationMode.BILINEAR)))
    bicubic = TF.pil_to_tensor(TF.resize(image, [64, 64], InterpolationMode.BICUBIC))
    assert not torch.equal(pixels, bicubic)  # the test image tells the filters apart


def test_a_tensor_is_resized_as_torchvision_resizes_it_and_within_rounding_of_pillow():
    image, data = blocky_picture(seed=1), DataConfig(64, MEAN, STD)
    tensor = TF.pil_to_tensor(image)
    pixels = resize(tensor, data)
    reference = TF.resize(tensor, [64, 64], InterpolationMode.BILINEAR, antialias=True)
    assert (pixels.int() - reference.int()).abs().max() <= 1
    assert (pixels.int() - _pillow_bilinear(image, 64).int()).abs().float().mean() < 2.0


def test_image_to_tensor_is_torchvisions_to_tensor_and_normalize_of_the_bilinear_picture():
    image, data = blocky_picture(seed=2), DataConfig(48, MEAN, STD)
    expected = TF.normalize(TF.to_tensor(image.resize((48, 48), Image.Resampling.BILINEAR)), list(MEAN), list(STD))
    torch.testing.assert_close(image_to_tensor(image, data), expected, rtol=0, atol=1e-5)
    tensor = TF.pil_to_tensor(image)
    resized = TF.resize(tensor, [48, 48], InterpolationMode.BILINEAR, antialias=True)
    expected = TF.normalize(resized.float() / 255, list(MEAN), list(STD))
    one_grey_level = 1 / 255 / min(STD)
    torch.testing.assert_close(image_to_tensor(tensor, data), expected, rtol=0, atol=one_grey_level + 1e-5)


def test_a_stored_filter_is_used_and_a_checkpoint_without_one_gets_bilinear(tmp_path):
    model = tiny_captioner(image_size=64)
    vocab = Vocabulary([*SPECIALS, *(f"w{i}" for i in range(model.config.vocab_size - len(SPECIALS)))])
    path = save_checkpoint(tmp_path / "new.pt", model, vocab)
    assert read_checkpoint(path)["preprocessing"]["interpolation"] == "bilinear"
    old = checkpoint_dict(model, vocab)
    del old["preprocessing"]["interpolation"]  # checkpoints written before the filter was stored
    torch.save(old, tmp_path / "old.pt")
    assert load_captioner(tmp_path / "old.pt").preprocessing == DataConfig(64, model.encoder.spec.mean,
                                                                            model.encoder.spec.std, "bilinear")
    bicubic = checkpoint_dict(model, vocab)
    bicubic["preprocessing"]["interpolation"] = "bicubic"
    torch.save(bicubic, tmp_path / "bicubic.pt")
    assert load_captioner(tmp_path / "bicubic.pt").preprocessing.interpolation == "bicubic"
    odd = checkpoint_dict(model, vocab)
    odd["preprocessing"]["interpolation"] = "lanczos"
    torch.save(odd, tmp_path / "odd.pt")
    with pytest.raises(SatcliError, match="interpolation 'lanczos' is not one of bicubic, bilinear"):
        load_captioner(tmp_path / "odd.pt")


def test_captioning_loads_pictures_with_the_models_bilinear_filter(tmp_path):
    image = blocky_picture(seed=3)
    image.save(tmp_path / "p.png")
    files = ImageFiles([str(tmp_path / "p.png")], DataConfig(64, MEAN, STD), None)
    _, pixels, width, height, error = files.load(0)
    assert error is None and (width, height) == (150, 97)
    assert torch.equal(pixels, _pillow_bilinear(image, 64))  # was bicubic: not what the model learnt on


class OneImageStore:
    """The part of a StoredDataset that :func:`encode_split` reads: one stored 96-pixel JPEG."""

    def __init__(self, image: Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=95)
        self.data = buffer.getvalue()

    def n_images(self, split):
        return 1

    def iter_batches(self, split, batch_size, columns):
        yield pa.record_batch([pa.array([self.data], pa.binary())], names=["image"])

    decode_image = staticmethod(lambda data: Image.open(io.BytesIO(data)).convert("RGB"))


def test_feature_caching_encodes_pictures_with_the_bilinear_filter():
    store = OneImageStore(blocky_picture(96, 96, seed=4))
    model = tiny_captioner(image_size=64)
    seen = []
    model.encode = lambda images: seen.append(images) or torch.zeros(len(images), 4, 8)
    list(encode_split(store, "val", model, torch.device("cpu")))
    stored = store.decode_image(store.data)
    spec = model.encoder.spec
    expected = TF.normalize(TF.to_tensor(stored.resize((64, 64), Image.Resampling.BILINEAR)), list(spec.mean),
                            list(spec.std))
    torch.testing.assert_close(seen[0][0], expected, rtol=0, atol=1e-5)
