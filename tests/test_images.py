"""Image loading: every mode becomes the right 8-bit RGB, EXIF orientation applies, bad files give reasons."""

import io

import numpy as np
import pytest
from PIL import Image

from models.data import DataConfig, resize
from satcli.data.images import ImageError, load_image


def _save(path, image, **kwargs):
    image.save(path, **kwargs)
    return path


def _pixel(loaded, x, y):
    return loaded.image.getpixel((x, y))


def test_rgb_jpeg_keeps_its_size_and_colour(tmp_path):
    path = _save(tmp_path / "red.jpg", Image.new("RGB", (50, 30), (200, 10, 10)), quality=95)
    loaded = load_image(path)
    assert loaded.image.mode == "RGB" and (loaded.width, loaded.height) == (50, 30)
    assert np.allclose(_pixel(loaded, 25, 15), (200, 10, 10), atol=4)


def test_exif_orientation_is_applied(tmp_path):
    # Stored 80 wide × 40 high, left half red, right half blue; orientation 6 means "rotate 90° clockwise to
    # display", so the viewer sees 40 × 80 with red on top.
    stored = Image.new("RGB", (80, 40), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 40, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(tmp_path / "phone.jpg", stored, exif=exif.tobytes(), quality=95)
    loaded = load_image(path)
    assert (loaded.width, loaded.height) == (40, 80)
    assert loaded.image.size == (40, 80)
    assert np.allclose(_pixel(loaded, 20, 10), (255, 0, 0), atol=30)  # top: red
    assert np.allclose(_pixel(loaded, 20, 70), (0, 0, 255), atol=30)  # bottom: blue


def test_grayscale_and_bilevel_become_grey_rgb(tmp_path):
    grey = load_image(_save(tmp_path / "grey.png", Image.new("L", (8, 8), 77)))
    assert grey.image.mode == "RGB" and _pixel(grey, 3, 3) == (77, 77, 77)
    bilevel = load_image(_save(tmp_path / "bw.png", Image.new("1", (8, 8), 1)))
    assert _pixel(bilevel, 3, 3) == (255, 255, 255)


def test_rgba_and_la_are_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (4, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (255, 0, 0, 255))
    rgba.putpixel((2, 0), (0, 0, 0, 128))
    loaded = load_image(_save(tmp_path / "rgba.png", rgba))
    assert _pixel(loaded, 0, 0) == (255, 255, 255)  # fully transparent → white, not black
    assert _pixel(loaded, 1, 0) == (255, 0, 0)
    assert all(120 <= v <= 135 for v in _pixel(loaded, 2, 0))  # half-transparent black → mid grey
    la = load_image(_save(tmp_path / "la.png", Image.new("LA", (4, 4), (0, 0))))
    assert _pixel(la, 1, 1) == (255, 255, 255)


def test_palette_with_transparency_uses_white_and_gif_takes_the_first_frame(tmp_path):
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([10, 200, 10] + [0, 0, 255] * 255)
    palette.putpixel((2, 2), 1)
    loaded = load_image(_save(tmp_path / "p.png", palette, transparency=0))
    assert _pixel(loaded, 0, 0) == (255, 255, 255) and _pixel(loaded, 2, 2) == (0, 0, 255)

    frames = [Image.new("RGB", (6, 6), (255, 0, 0)), Image.new("RGB", (6, 6), (0, 0, 255))]
    gif = tmp_path / "anim.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100)
    first = load_image(gif)
    red, green, blue = _pixel(first, 3, 3)
    assert red > 200 and blue < 50


def test_cmyk_jpeg_converts_to_rgb(tmp_path):
    path = _save(tmp_path / "cmyk.jpg", Image.new("CMYK", (16, 16), (255, 0, 0, 0)), quality=95)  # pure cyan
    loaded = load_image(path)
    red, green, blue = _pixel(loaded, 8, 8)
    assert red < 40 and green > 215 and blue > 215


@pytest.mark.parametrize("suffix", ["png", "tiff"])
def test_16_bit_images_are_scaled_not_clipped(tmp_path, suffix):
    values = np.array([[0, 257 * 64, 32896, 65535]], dtype=np.uint16)
    path = _save(tmp_path / f"deep.{suffix}", Image.fromarray(values))
    assert Image.open(path).mode.startswith("I")
    loaded = load_image(path)
    assert [_pixel(loaded, x, 0)[0] for x in range(4)] == [0, 64, 128, 255]


def test_webp_and_bmp_load(tmp_path):
    for name in ("a.webp", "a.bmp"):
        loaded = load_image(_save(tmp_path / name, Image.new("RGB", (10, 12), (0, 128, 0))))
        assert (loaded.width, loaded.height) == (10, 12)


def test_large_jpeg_decodes_reduced_but_reports_the_original_size(tmp_path):
    rng = np.random.default_rng(0)
    path = _save(tmp_path / "big.jpg", Image.fromarray(rng.integers(0, 255, (1200, 1600, 3), dtype=np.uint8)))
    loaded = load_image(path, min_size=224)
    assert (loaded.width, loaded.height) == (1600, 1200)
    assert min(loaded.image.size) >= 224 and loaded.image.size[0] < 1600
    assert resize(loaded.image, DataConfig(224, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))).shape == (3, 224, 224)


@pytest.mark.parametrize(("name", "content", "kind"), [
    ("empty.jpg", b"", "empty"),
    ("notes.jpg", b"these are my holiday notes, not a picture\n", "not-an-image"),
])
def test_unusable_files_raise_a_kind_and_reason(tmp_path, name, content, kind):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageError) as caught:
        load_image(path)
    assert caught.value.kind == kind
    assert str(caught.value).startswith(f"{kind}: ")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_files_are_refused(tmp_path, fmt):
    rng = np.random.default_rng(1)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageError) as caught:
        load_image(path)
    assert caught.value.kind == "truncated"


def test_pixel_limit_refuses_before_decoding_and_reports_the_size(tmp_path):
    path = _save(tmp_path / "huge.png", Image.new("RGB", (300, 200)))
    with pytest.raises(ImageError) as caught:
        load_image(path, max_pixels=10_000)
    assert caught.value.kind == "too-large"
    assert "60,000 pixels" in str(caught.value) and "10,000" in str(caught.value)
    assert (caught.value.width, caught.value.height) == (300, 200)
    assert load_image(path, max_pixels=60_000).width == 300  # at the limit is fine


def test_missing_file_is_unreadable(tmp_path):
    with pytest.raises(ImageError) as caught:
        load_image(tmp_path / "gone.jpg")
    assert caught.value.kind == "unreadable"
