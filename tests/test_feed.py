"""Feeding the device: JPEG bytes decoded in batches on the model's device, with the CPU loader as fallback.

The GPU decoder's dispatch runs here with torchvision's CPU decoder standing in for nvJPEG; the CUDA tests at
the end run the real thing where a GPU is present.
"""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import satcli.captioning.pipeline
import satcli.data.feed
from models.data import DataConfig
from satcli.captioning.loading import ImageFiles, collate
from satcli.commands.caption import run
from satcli.data.feed import decode_jpegs, default_workers, images_on_device, read_jpeg
from satcli.data.images import ImageError
from tests import test_caption
from tests.test_caption import _options

# The caption tests' mixed folder (every image mode, every kind of bad file), model and reference run.
_isolated_state = test_caption._isolated_state
photos, checkpoint, reference = test_caption.photos, test_caption.checkpoint, test_caption.reference

CPU = torch.device("cpu")


def _size(size: int) -> DataConfig:
    """Images squashed to ``size`` with the models' filter (mean and std play no part in decoding)."""
    return DataConfig(size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def _photo(path, width=160, height=120, seed=0, **save):
    rng = np.random.default_rng(seed)
    smooth = np.kron(rng.integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8), np.ones((8, 8, 1),
                                                                                                   np.uint8))
    Image.fromarray(smooth).save(path, "JPEG", quality=95, **save)
    return path


def _pillow(path, size):
    """The reference: Pillow's full decode and (antialiased) bilinear resize, the models' filter."""
    with Image.open(path) as im:
        image = im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def test_batched_jpeg_decoding_matches_pillow(tmp_path):
    files = [_photo(tmp_path / f"p{i}.jpg", 160 + 16 * i, 120, seed=i) for i in range(3)]
    data = [read_jpeg(str(f), None).data for f in files]
    decoded = decode_jpegs(data, _size(64), CPU)
    for file, image in zip(files, decoded, strict=True):
        assert image.shape == (3, 64, 64) and image.dtype == torch.uint8
        difference = (image.int() - _pillow(file, 64).int()).abs().float().mean()
        assert difference < 2.0  # grey levels of 255: same picture, only rounding apart


def test_only_plain_complete_jpegs_skip_the_cpu_loader(tmp_path):
    plain = _photo(tmp_path / "plain.jpg")
    grey = tmp_path / "grey.jpg"
    Image.new("L", (40, 30), 90).save(grey, "JPEG")
    raw = read_jpeg(str(plain), None)
    assert (raw.width, raw.height) == (160, 120) and bytes(raw.data.numpy()) == plain.read_bytes()
    assert read_jpeg(str(grey), None) is not None
    exif = Image.Exif()
    exif[0x0112] = 6
    doubtful = {
        "rotated.jpg": lambda p: _photo(p, exif=exif.tobytes()),
        "cmyk.jpg": lambda p: Image.new("CMYK", (50, 40), (0, 200, 100, 20)).save(p, "JPEG"),
        "png-named.jpg": lambda p: Image.new("RGB", (20, 20)).save(p, "PNG"),
        "truncated.jpg": lambda p: p.write_bytes(plain.read_bytes()[:1500]),
        "notes.jpg": lambda p: p.write_text("not a picture"),
        "zero.jpg": lambda p: p.write_bytes(b""),
    }
    for name, make in doubtful.items():
        make(tmp_path / name)
        assert read_jpeg(str(tmp_path / name), None) is None, name
    assert read_jpeg(str(tmp_path / "missing.jpg"), None) is None
    with pytest.raises(ImageError, match="too-large"):
        read_jpeg(str(plain), 160 * 120 - 1)


def test_a_jpeg_the_decoder_refuses_is_loaded_on_the_cpu_in_batch_order(tmp_path):
    good = [_photo(tmp_path / f"good{i}.jpg", seed=i) for i in range(2)]
    broken = tmp_path / "broken.jpg"  # looks like a JPEG to the worker, but its data is garbage
    broken.write_bytes(b"\xff\xd8\xff" + bytes(500) + b"\xff\xd9")
    png = tmp_path / "picture.png"
    Image.new("RGB", (30, 30), (200, 10, 10)).save(png)
    files = [str(good[0]), str(broken), str(png), str(good[1])]
    dataset = ImageFiles(files, _size(32), None, jpeg_bytes=True)
    items = [dataset[0], (1, satcli.data.feed.JpegBytes(torch.frombuffer(bytearray(broken.read_bytes()),
                                                                  dtype=torch.uint8), 9, 9), 9, 9, None),
             dataset[2], dataset[3]]
    batch = collate(items)
    assert sorted(batch.jpegs) == [0, 1, 3]  # the PNG was decoded by the "worker"
    images = images_on_device(batch, _size(32), CPU, dataset.load)
    reference = [dataset.load(i) for i in range(4)]
    assert batch.loaded == [True, False, True, True]
    assert batch.errors[1] == reference[1][4] and batch.errors[1].startswith(("not-an-image", "truncated"))
    assert images.shape == (3, 3, 32, 32)
    assert torch.equal(images[1], reference[2][1])  # the PNG, from the workers, in its place
    for got, i in ((images[0], 0), (images[2], 3)):
        assert (got.int() - reference[i][1].int()).abs().float().mean() < 3.0


def test_jpegs_decoded_on_the_device_give_the_same_rows(photos, checkpoint, reference, tmp_path, monkeypatch):
    """The whole caption run with JPEGs decoded in the main process (the CPU standing in for the GPU): every
    file once, the same error rows, the same sizes, and identical captions for what the workers decoded."""
    monkeypatch.setattr(satcli.captioning.pipeline, "jpeg_decode_device", lambda device: device)
    calls = []
    real = satcli.captioning.pipeline.images_on_device
    monkeypatch.setattr(satcli.captioning.pipeline, "images_on_device",
                        lambda batch, *args: calls.append(sorted(batch.jpegs)) or real(batch, *args))
    broken = tmp_path / "broken.jpg"  # a JPEG to the worker, garbage to the decoder
    broken.write_bytes(b"\xff\xd8\xff" + bytes(500) + b"\xff\xd9")
    output = tmp_path / "device.parquet"
    summary = run(_options(photos, checkpoint, output, workers=1, inputs=(str(photos), str(broken))))
    assert calls, "no batch carried JPEG bytes"
    rows = {r["path"]: r for r in pq.read_table(output).to_pylist()}
    expected = {r["path"]: r for r in pq.read_table(reference).to_pylist()}
    assert set(rows) == set(expected) | {str(broken)}
    assert rows.pop(str(broken))["error"].split(":")[0] in ("not-an-image", "truncated")
    assert summary.n_images == len(rows) + 1
    for path, row in expected.items():
        got = rows[path]
        assert (got["error"], got["image_width"], got["image_height"]) == \
            (row["error"], row["image_width"], row["image_height"]), path
        if not path.endswith(".jpg") or path in ("cmyk.jpg", "rotated.jpg", "png-named.jpg"):
            assert got["caption"] == row["caption"], path  # decoded by the workers exactly as before
        elif row["error"] is None:
            assert got["caption"], path


def test_more_decode_workers_when_the_model_is_on_a_gpu(monkeypatch):
    monkeypatch.setattr(satcli.data.feed, "n_cpus", lambda: 16)
    assert default_workers(torch.device("cuda", 0)) == 8
    assert default_workers(CPU) == default_workers() == 4
    monkeypatch.setattr(satcli.data.feed, "n_cpus", lambda: 2)
    assert default_workers(torch.device("cuda", 0)) == 2


def test_gpu_jpeg_decoding_only_on_cuda_and_can_be_turned_off(monkeypatch):
    cuda = torch.device("cuda", 0)
    assert satcli.data.feed.jpeg_decode_device(CPU) is None
    assert satcli.data.feed.jpeg_decode_device(cuda) == cuda
    monkeypatch.setenv("SATCLI_GPU_JPEG", "0")
    assert satcli.data.feed.jpeg_decode_device(cuda) is None


@pytest.mark.cuda
def test_nvjpeg_batch_matches_the_cpu_decoder(tmp_path):
    files = [_photo(tmp_path / f"p{i}.jpg", 320, 240, seed=i) for i in range(4)]
    data = [read_jpeg(str(f), None).data for f in files]
    on_gpu = decode_jpegs(data, _size(64), torch.device("cuda"))
    on_cpu = decode_jpegs(data, _size(64), CPU)
    for gpu, cpu in zip(on_gpu, on_cpu, strict=True):
        assert gpu.is_cuda
        assert (gpu.cpu().int() - cpu.int()).abs().float().mean() < 2.0


@pytest.mark.cuda
def test_cuda_batches_arrive_pinned_and_bad_jpegs_are_error_rows(photos, checkpoint, reference, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff" + bytes(500) + b"\xff\xd9")
    output = tmp_path / "cuda.parquet"
    run(_options(photos, checkpoint, output, device="cuda", workers=2, inputs=(str(photos), str(broken))))
    rows = {r["path"]: r for r in pq.read_table(output).to_pylist()}
    expected = {r["path"]: r for r in pq.read_table(reference).to_pylist()}
    assert set(rows) == set(expected) | {str(broken)}
    assert rows[str(broken)]["error"] is not None
    for path, row in expected.items():
        assert (rows[path]["error"] is None) == (row["error"] is None), path
    dataset = ImageFiles([str(photos / "rgb.jpg"), str(photos / "grey.png")], _size(64), None)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate, pin_memory=True)
    assert next(iter(loader)).images.is_pinned()
