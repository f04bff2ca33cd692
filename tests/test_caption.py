"""``satcli caption`` and ``satcli merge``: every input once, errors as rows, resume after SIGKILL, shards, schema."""

import io
import itertools
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import satcli.captioning.state
import satcli.commands.caption
from satcli.captioning.inputs import find_images
from satcli.captioning.options import CaptionOptions, CaptionSummary
from satcli.captioning.shards import find_parts, part_number, part_path, partial_dir
from satcli.cli import app
from satcli.commands.caption import run
from satcli.core.defaults import default_model, remember_model
from satcli.core.errors import SatcliError
from satcli.formats.results import SCHEMA, CaptionRow, read_attention, read_metadata, write_results
from satcli.formats.results_merge import merge_results
from tests.helpers import picture_sensitive_checkpoint

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
MAX_LENGTH = 6
BOMB_LIMIT = 40_000  # pixels: the "decompression bomb" below has 250,000


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path, monkeypatch):
    monkeypatch.setenv("SATCLI_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("SATCLI_MODEL", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return picture_sensitive_checkpoint(tmp_path_factory.mktemp("model"))


def _jpeg_bytes(rng, width=96, height=72) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


GOOD = {
    "rgb.jpg", "grey.png", "palette.gif", "transparent.png", "rgba.png", "cmyk.jpg", "deep16.png", "deep16.tif",
    "photo.webp", "rotated.jpg", "bitmap.bmp", "nested/deeper/inner.PNG", "png-named.jpg",
}
BAD = {"zero.jpg": "empty", "truncated.jpg": "truncated", "notes.jpg": "not-an-image", "bomb.png": "too-large"}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Every image mode, every kind of bad file, and things that must be skipped."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    (root / "rgb.jpg").write_bytes(_jpeg_bytes(rng))
    Image.fromarray(rng.integers(0, 255, (40, 50), dtype=np.uint8)).save(root / "grey.png")
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).convert("P").save(root / "palette.gif")
    palette = Image.new("P", (30, 30), 0)
    palette.putpalette([0, 0, 0] + [200, 50, 50] * 255)
    palette.paste(1, (10, 10, 20, 20))
    palette.save(root / "transparent.png", transparency=0)
    Image.fromarray(rng.integers(0, 255, (40, 50, 4), dtype=np.uint8), "RGBA").save(root / "rgba.png")
    Image.new("CMYK", (50, 40), (0, 200, 100, 20)).save(root / "cmyk.jpg")
    deep = (rng.integers(0, 65535, (40, 50))).astype(np.uint16)
    Image.fromarray(deep).save(root / "deep16.png")
    Image.fromarray(deep).save(root / "deep16.tif")
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(root / "photo.webp")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 80 × 40, shown rotated: 40 × 80
    Image.fromarray(rng.integers(0, 255, (40, 80, 3), dtype=np.uint8)).save(root / "rotated.jpg", exif=exif.tobytes())
    Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(root / "bitmap.bmp")
    (root / "nested" / "deeper").mkdir(parents=True)
    Image.new("RGB", (20, 20), (9, 9, 9)).save(root / "nested" / "deeper" / "inner.PNG")
    Image.new("RGB", (20, 20), (90, 9, 9)).save(root / "png-named.jpg", format="PNG")  # readable, wrongly named
    (root / "zero.jpg").write_bytes(b"")
    (root / "truncated.jpg").write_bytes(_jpeg_bytes(rng, 200, 150)[:1500])
    (root / "notes.jpg").write_text("not a picture at all\n")
    Image.new("RGB", (500, 500), (1, 2, 3)).save(root / "bomb.png")  # tiny file, 250,000 pixels
    # skipped: hidden files and folders, other extensions; a symlink loop must be harmless
    (root / ".hidden.jpg").write_bytes(_jpeg_bytes(rng))
    (root / ".cache").mkdir()
    (root / ".cache" / "thumb.jpg").write_bytes(_jpeg_bytes(rng))
    (root / "README.txt").write_text("holiday photos")
    (root / "nested" / "deeper" / "loop").symlink_to(root / "nested", target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def reference(photos, checkpoint, tmp_path_factory) -> Path:
    """One uninterrupted run over the mixed folder, shared by the tests that compare against it."""
    output = tmp_path_factory.mktemp("reference") / "captions.parquet"
    run(_options(photos, checkpoint, output))
    return output


def _options(photos: Path, checkpoint: Path, output: Path, **changes) -> CaptionOptions:
    values = dict(inputs=(str(photos),), model=checkpoint, output=output, root=photos, batch_size=4,
                  max_length=MAX_LENGTH, workers=0, max_pixels=BOMB_LIMIT, progress=False)
    values.update(changes)
    return CaptionOptions(**values)


def _by_path(path: Path) -> dict[str, dict]:
    rows = pq.read_table(path).to_pylist()
    paths = [row["path"] for row in rows]
    assert len(paths) == len(set(paths)), "an image appears twice"
    return {row["path"]: row for row in rows}


def test_every_file_once_with_errors_as_rows(reference):
    rows = _by_path(reference)
    assert set(rows) == GOOD | set(BAD)  # hidden files, README.txt and the symlink loop are not inputs
    for name in GOOD:
        row = rows[name]
        assert row["error"] is None, (name, row["error"])
        assert row["caption"] == " ".join(row["tokens"]) and row["tokens"]
        assert len(row["attention"]) == len(row["tokens"])
        assert (row["grid_height"], row["grid_width"]) == (2, 2)
        assert row["image_width"] > 0 and row["image_height"] > 0
    assert len({rows[name]["caption"] for name in GOOD}) > 1, "captions must depend on the picture"
    for name, kind in BAD.items():
        row = rows[name]
        assert row["error"].startswith(kind + ": "), (name, row["error"])
        assert row["caption"] is None and row["tokens"] is None and row["attention"] is None
    assert (rows["bomb.png"]["image_width"], rows["bomb.png"]["image_height"]) == (500, 500)
    assert (rows["rotated.jpg"]["image_width"], rows["rotated.jpg"]["image_height"]) == (40, 80)
    assert (rows["rgb.jpg"]["image_width"], rows["rgb.jpg"]["image_height"]) == (96, 72)


def test_schema_metadata_and_attention_helper(reference, checkpoint, photos):
    table = pq.read_table(reference)
    assert table.schema.remove_metadata().equals(SCHEMA)
    metadata = read_metadata(reference)
    assert metadata["satcli.decoding"] == {"beam_size": 3, "max_length": MAX_LENGTH, "length_penalty": 0.0,
                                           "n_best": 1, "no_repeat_ngram_size": 0, "min_length": 0,
                                           "banned_ids": [3]}
    assert table.column("alternatives").null_count == table.num_rows  # no runners-up asked for
    assert metadata["satcli.model"]["path"] == str(checkpoint)
    assert metadata["satcli.model"]["encoder"] == "efficientnet-lite0"
    assert metadata["satcli.model"]["preprocessing"]["image_size"] == 64
    assert metadata["satcli.version"]
    assert metadata["satcli.images"]["root"] == str(photos)  # where report and overlays look for the images
    for row in table.to_pylist():
        if row["error"] is not None:
            assert row["token_logprobs"] is None
            continue
        assert len(row["token_logprobs"]) == len(row["tokens"]) and all(lp <= 0 for lp in row["token_logprobs"])
        end = row["sum_logprob"] - sum(row["token_logprobs"])  # the log-probability of <end>, 0 if never written
        assert (end < 0) if row["finished"] else end == pytest.approx(0, abs=1e-4)
    index = table.column("path").to_pylist().index("rgb.jpg")
    row = table.to_pylist()[index]
    grids = read_attention(table, index)
    assert grids.shape == (len(row["tokens"]), 2, 2) and grids.dtype == np.float32
    np.testing.assert_allclose(grids.sum(axis=(1, 2)), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(read_attention(row), grids)  # a row dict gives the same
    error_index = table.column("path").to_pylist().index("zero.jpg")
    assert read_attention(table, error_index).shape == (0, 0, 0)


def test_n_best_runners_up_share_the_row_of_their_image(reference, photos, checkpoint, tmp_path):
    output = tmp_path / "n_best.parquet"
    run(_options(photos, checkpoint, output, n_best=3, no_repeat_ngram_size=2, min_length=2))
    rows, expected = _by_path(output), _by_path(reference)
    assert list(rows) == list(expected)  # still one row per image
    for row in rows.values():
        if row["error"] is not None:
            assert row["alternatives"] is None
            continue
        captions = [row["caption"], *(a["caption"] for a in row["alternatives"])]
        assert len(row["alternatives"]) == 2 and len(set(captions)) == 3
        ranks = [(row["finished"], row["sum_logprob"]),
                 *((a["finished"], a["sum_logprob"]) for a in row["alternatives"])]
        assert ranks == sorted(ranks, reverse=True)  # finished first, then by log-probability (no length penalty)
        for caption in captions:
            words = caption.split()
            assert len(words) >= 2 and len(set(itertools.pairwise(words))) == len(words) - 1
    assert read_metadata(output)["satcli.decoding"]["n_best"] == 3


def test_results_written_before_the_alternatives_column_still_merge(reference, tmp_path):
    old = tmp_path / "old.parquet"
    pq.write_table(pq.read_table(reference).drop_columns(["alternatives"]), old)
    merged = tmp_path / "merged.parquet"
    merge_results([old], merged)
    table = pq.read_table(merged)
    assert table.num_rows == pq.read_table(reference).num_rows
    assert table.column("alternatives").null_count == table.num_rows


def test_token_logprobs_round_trip_and_older_files_read_them_null(tmp_path):
    rows = [CaptionRow("a.jpg", "a dog", ["a", "dog"], -1.5, True, np.full((2, 2, 2), 0.25, np.float32), 8, 8,
                       token_logprobs=[-0.25, -0.75]),
            CaptionRow("b.jpg", error="empty: the file has 0 bytes")]
    path = write_results(tmp_path / "new.parquet", rows)
    assert pq.read_table(path).column("token_logprobs").to_pylist() == [[-0.25, -0.75], None]
    old = tmp_path / "old.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["token_logprobs", "alternatives"]), old)
    merged = merge_results([old], tmp_path / "merged.parquet")
    assert merged["rows"] == 2
    assert pq.read_table(tmp_path / "merged.parquet").column("token_logprobs").to_pylist() == [None, None]


def test_results_do_not_depend_on_workers_and_rerun_does_nothing(reference, photos, checkpoint, tmp_path):
    output = tmp_path / "with-workers.parquet"
    summary = run(_options(photos, checkpoint, output, workers=2))
    assert summary.n_processed == len(GOOD) + len(BAD)
    assert summary.errors == dict.fromkeys(BAD.values(), 1)
    assert pq.read_table(output).equals(pq.read_table(reference))
    modified = output.stat().st_mtime_ns
    again = run(_options(photos, checkpoint, output))
    assert again.n_processed == 0 and again.n_resumed == len(GOOD) + len(BAD)
    assert output.stat().st_mtime_ns == modified  # nothing to do: the finished file is left alone


def test_new_images_extend_a_finished_output_without_redoing_others(photos, checkpoint, tmp_path):
    folder = tmp_path / "grow"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(3):
        (folder / f"a{i}.jpg").write_bytes(_jpeg_bytes(rng))
    output = tmp_path / "grow.parquet"
    first = run(_options(folder, checkpoint, output))
    assert first.n_processed == 3
    (folder / "a10.jpg").write_bytes(_jpeg_bytes(rng))
    (folder / "a1.jpg").unlink()
    second = run(_options(folder, checkpoint, output))
    assert second.n_processed == 1  # only the new image went through the model
    # no row is lost without a word: the removed image's row stays, counted as kept (--overwrite drops it)
    assert second.n_kept == 1
    assert pq.read_table(output).column("path").to_pylist() == ["a0.jpg", "a1.jpg", "a10.jpg", "a2.jpg"]


def test_other_model_or_options_are_refused_unless_overwrite(reference, photos, checkpoint, tmp_path):
    output = tmp_path / "captions.parquet"
    output.write_bytes(reference.read_bytes())
    with pytest.raises(SatcliError, match="beam_size 3 → 2.*--overwrite"):
        run(_options(photos, checkpoint, output, beam_size=2))
    summary = run(_options(photos, checkpoint, output, beam_size=2, overwrite=True))
    assert summary.n_processed == len(GOOD) + len(BAD)
    assert read_metadata(output)["satcli.decoding"]["beam_size"] == 2


def test_sigkill_then_rerun_gives_every_image_once_and_the_same_captions(checkpoint, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    rng = np.random.default_rng(7)
    for i in range(40):
        (folder / f"img{i:03d}.jpg").write_bytes(_jpeg_bytes(rng, 64, 48))
    output = tmp_path / "captions.parquet"
    sidecar = tmp_path / "captions.parquet.partial"
    command = [sys.executable, "-m", "satcli", "caption", str(folder), "--model", str(checkpoint), "-o",
               str(output), "--batch-size", "2", "--max-length", str(MAX_LENGTH), "--workers", "1"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while len(list(sidecar.glob("chunk-*.parquet"))) < 2:
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "no chunks were written"
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not output.exists() and sidecar.is_dir()
    n_chunks = len(list(sidecar.glob("chunk-*.parquet")))
    assert n_chunks < 20, "the run finished before it was killed"

    resumed = run(CaptionOptions(inputs=(str(folder),), model=checkpoint, output=output, root=tmp_path, batch_size=2,
                                 max_length=MAX_LENGTH, workers=0, progress=False))
    assert resumed.n_resumed >= 2 * n_chunks and resumed.n_processed == 40 - resumed.n_resumed
    assert not sidecar.exists()
    straight = tmp_path / "straight.parquet"
    run(CaptionOptions(inputs=(str(folder),), model=checkpoint, output=straight, root=tmp_path, batch_size=2,
                       max_length=MAX_LENGTH, workers=0, progress=False))
    got, expected = _by_path(output), _by_path(straight)
    assert list(got) == [f"many/img{i:03d}.jpg" for i in range(40)]
    assert len({row["caption"] for row in expected.values()}) > 1
    assert got == expected  # bit-identical: a resumed run sees the same batches


def test_two_shards_together_equal_the_unsharded_run(reference, photos, checkpoint, tmp_path):
    output = tmp_path / "captions.parquet"
    for k in range(2):
        summary = run(_options(photos, checkpoint, output, shard=(k, 2)))
        assert summary.output == tmp_path / f"captions.part-{k}-of-2.parquet"
    parts = sorted(tmp_path.glob("captions.part-*.parquet"))
    assert ds.dataset(parts).count_rows() == len(GOOD) + len(BAD)  # the parts read as one dataset
    assert not output.exists()
    result = runner.invoke(app, ["merge", "-o", str(output)])
    assert result.exit_code == 0, result.output
    merged, expected = _by_path(output), _by_path(reference)
    assert list(merged) == list(expected)  # every image once, in the same order
    for path, row in merged.items():
        # Shards batch images differently, so numbers may differ in the last bits; the words may not.
        want = expected[path]
        assert (row["caption"], row["tokens"], row["error"]) == (want["caption"], want["tokens"], want["error"])
        assert (row["image_width"], row["image_height"]) == (want["image_width"], want["image_height"])
        if row["error"] is None:
            assert row["sum_logprob"] == pytest.approx(want["sum_logprob"], abs=1e-4)
            np.testing.assert_allclose(read_attention(row), read_attention(want), atol=1e-5)
    assert read_metadata(output)["satcli.shard"]["merged_from"] == 2
    assert read_metadata(output)["satcli.fingerprint"] == read_metadata(reference)["satcli.fingerprint"]


def test_torchrun_rank_picks_the_shard(photos, checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    summary = run(_options(photos, checkpoint, tmp_path / "c.parquet"))
    everything = [s.path for s in find_images([str(photos)], photos)]
    assert summary.output.name == "c.part-2-of-3.parquet"
    assert pq.read_table(summary.output).column("path").to_pylist() == everything[2::3]


def test_the_checkpoint_is_read_once_per_run(photos, checkpoint, tmp_path, monkeypatch):
    """A caption run reads its checkpoint file (a torch.load of the whole model) once, not once for the fingerprint
    and again for the model; the rerun that finds nothing to do reads it once as well."""
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: loads.append(args[0]) or real_load(*args, **kwargs))
    options = _options(photos, checkpoint, tmp_path / "c.parquet")
    run(options)
    assert len(loads) == 1  # the file's bytes, read once: hashed and loaded from the same read
    run(options)
    assert len(loads) == 2


def test_every_part_name_is_made_and_read_by_one_rule(tmp_path):
    """The part a shard writes is the one merge finds and numbers; other files beside it are not parts."""
    for output in (tmp_path / "captions.parquet", tmp_path / "run.v2.parquet", tmp_path / "plain"):
        parts = [part_path(output, k, 3) for k in range(3)]
        assert [part_number(p) for p in parts] == [(0, 3), (1, 3), (2, 3)]
        for part in parts:
            part.write_bytes(b"")
        (tmp_path / f"other.part-0-of-3{output.suffix}").write_bytes(b"")
        assert find_parts(output) == parts
        assert part_path(output, 0, 1) == output and part_number(output) is None
        assert partial_dir(parts[1]).name == parts[1].name + ".partial"


def test_merge_refuses_a_missing_part(photos, checkpoint, tmp_path):
    run(_options(photos, checkpoint, tmp_path / "c.parquet", shard=(0, 2)))
    result = runner.invoke(app, ["merge", "-o", str(tmp_path / "c.parquet")])
    assert result.exit_code == 1
    assert "part 1 of 2 is missing" in result.output and "Traceback" not in result.output


def test_merge_refuses_parts_made_with_other_options(photos, checkpoint, tmp_path):
    run(_options(photos, checkpoint, tmp_path / "c.parquet", shard=(0, 2)))
    run(_options(photos, checkpoint, tmp_path / "c.parquet", shard=(1, 2), beam_size=2))
    result = runner.invoke(app, ["merge", "-o", str(tmp_path / "c.parquet")])
    assert result.exit_code == 1 and "c.part-1-of-2.parquet: made with a different model or options" in result.output
    assert not (tmp_path / "c.parquet").exists()


def test_a_lost_chunk_is_never_finished_over(photos, checkpoint, tmp_path, monkeypatch):
    written = []
    original = satcli.captioning.state.RunState.write_chunk

    def lose_the_second(self, rows, metadata):
        written.append(rows)
        if len(written) == 2:
            return None  # as if the chunk had vanished from the disk
        return original(self, rows, metadata)

    monkeypatch.setattr(satcli.captioning.state.RunState, "write_chunk", lose_the_second)
    output = tmp_path / "c.parquet"
    with pytest.raises(SatcliError, match="4 images are missing"):  # the second batch of 4
        run(_options(photos, checkpoint, output))
    assert not output.exists() and (tmp_path / "c.parquet.partial").is_dir()
    monkeypatch.undo()
    monkeypatch.setenv("SATCLI_STATE_DIR", str(tmp_path / "state"))
    summary = run(_options(photos, checkpoint, output))
    assert summary.n_processed == len(written[1])
    assert set(_by_path(output)) == GOOD | set(BAD)


def test_cli_end_to_end_and_default_model(photos, checkpoint, tmp_path, monkeypatch):
    (tmp_path / "pics" / "sub").mkdir(parents=True)
    (tmp_path / "pics" / "a.jpg").write_bytes((photos / "rgb.jpg").read_bytes())
    (tmp_path / "pics" / "sub" / "b.png").write_bytes((photos / "grey.png").read_bytes())
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["caption", "pics"])
    assert result.exit_code == 1
    assert "satcli demo" in result.output and "satcli train --dataset" in result.output and "--model" in result.output

    remember_model(checkpoint)
    assert default_model() == checkpoint
    result = runner.invoke(app, ["caption", "./pics", "--max-length", "4", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "captioned" in result.output and "images/s" in result.output
    assert set(_by_path(tmp_path / "captions.parquet")) == {"pics/a.jpg", "pics/sub/b.png"}  # default -o

    monkeypatch.setenv("SATCLI_MODEL", str(tmp_path / "elsewhere.pt"))
    result = runner.invoke(app, ["caption", "pics", "-o", "other.parquet"])
    assert result.exit_code == 1 and "elsewhere.pt: no such checkpoint file" in result.output


def test_bad_arguments_are_one_line_errors(tmp_path, checkpoint):
    result = runner.invoke(app, ["caption", str(tmp_path / "nope"), "--model", str(checkpoint)])
    assert result.exit_code == 1 and "nope: no such file or directory" in result.output
    result = runner.invoke(app, ["caption", str(tmp_path), "--model", str(checkpoint)])
    assert result.exit_code == 1 and "no images found" in result.output
    result = runner.invoke(app, ["caption", str(tmp_path), "--shard", "2/2", "--model", str(checkpoint)])
    assert result.exit_code == 1 and "shard 2/2" in result.output


def test_cli_wiring(monkeypatch, tmp_path):
    seen = {}

    def fake_run(options):
        seen["options"] = options
        return CaptionSummary(options.output, 0)

    monkeypatch.setattr(satcli.commands.caption, "run", fake_run)
    result = runner.invoke(app, [
        "caption", "a.jpg", "photos", "*.png", "--model", "m.pt", "-o", "out.parquet", "--beam-size", "5",
        "--batch-size", "7", "--max-length", "12", "--length-penalty", "0.5", "--workers", "3", "--device", "cpu",
        "--shard", "1/4", "--root", str(tmp_path), "--max-pixels", "1000", "--overwrite", "--n-best", "2",
        "--no-repeat-ngram", "3", "--min-length", "4", "--allow-unk"])
    assert result.exit_code == 0, result.output
    assert seen["options"] == CaptionOptions(
        inputs=("a.jpg", "photos", "*.png"), model=Path("m.pt"), output=Path("out.parquet"), overwrite=True,
        batch_size=7, beam_size=5, max_length=12, length_penalty=0.5, workers=3, device="cpu", shard=(1, 4),
        root=tmp_path, max_pixels=1000, n_best=2, no_repeat_ngram_size=3, min_length=4, allow_unk=True)
    runner.invoke(app, ["caption", "x"])
    assert replace(seen["options"], inputs=("a.jpg", "photos", "*.png")) == CaptionOptions(
        inputs=("a.jpg", "photos", "*.png"))  # the CLI's defaults are the run's defaults


def test_find_images_paths_and_globs(photos):
    found = [s.path for s in find_images([str(photos / "*.jpg"), str(photos / "nested")], photos)]
    assert found == sorted(found)
    assert "nested/deeper/inner.PNG" in found and "rgb.jpg" in found and ".hidden.jpg" not in found
    assert not any(p.startswith(("/", "..")) for p in found)


@pytest.mark.cuda
def test_cuda_run_with_autocast_gives_a_row_per_image(reference, photos, checkpoint, tmp_path):
    output = tmp_path / "cuda.parquet"
    summary = run(_options(photos, checkpoint, output, device="cuda", workers=2))
    assert summary.device.startswith("cuda")
    rows, expected = _by_path(output), _by_path(reference)
    assert list(rows) == list(expected)
    for path, row in rows.items():
        assert (row["error"] is None) == (expected[path]["error"] is None)
        if row["error"] is None:
            np.testing.assert_allclose(read_attention(row).sum(axis=(1, 2)), 1.0, atol=2e-2)  # bfloat16 softmax


def test_unk_is_never_written_unless_allowed():
    from models.decoding import decode
    from satcli.captioning.options import decoding_options
    from satcli.data.vocab import UNK_ID
    from tests.helpers import random_features, tiny_captioner

    model = tiny_captioner().eval()
    with torch.no_grad():
        model.decoder.out.bias[UNK_ID] = 50.0  # a model that would rather say <unk> than anything else
    features = random_features(model, 2)
    banned = decoding_options(CaptionOptions(inputs=("x",), max_length=6))
    allowed = decoding_options(CaptionOptions(inputs=("x",), max_length=6, allow_unk=True))
    assert all(UNK_ID not in r.tokens for r in decode(model, features, banned))
    assert all(UNK_ID in r.tokens for r in decode(model, features, allowed))
