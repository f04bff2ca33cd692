"""Nothing lost, nothing written outside the output, one line for every fault (issue 17).

Tests run as root, where read-only folders do not stop writes, so disk faults are injected: the write, open,
rename or mkdir raises ``OSError(ENOSPC / EROFS / EACCES)``. Each check is what a user would see: the earlier
output byte-identical, one line naming the path and the cause, exit code 1.
"""

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import satcli.formats.results
from models.captioner import Captioner
from satcli.cli import app
from satcli.commands.caption import run
from satcli.core.atomic import remove_stale_temps, temp_path, write_bytes
from satcli.core.errors import SatcliError
from satcli.data.vocab import SPECIALS, Vocabulary
from satcli.formats.checkpoint import save_checkpoint
from tests.helpers import five_photos, jpeg_bytes, one_line_error, small_caption_cli, small_caption_options, tiny_config

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path, monkeypatch):
    monkeypatch.setenv("SATCLI_STATE_DIR", str(tmp_path / "state"))
    for name in ("SATCLI_MODEL", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = Captioner(tiny_config(image_size=32))
    vocab = Vocabulary([*SPECIALS, *(f"word{i}" for i in range(model.config.vocab_size - len(SPECIALS)))])
    return save_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt", model, vocab)


@pytest.fixture
def photos(tmp_path) -> Path:
    return five_photos(tmp_path / "photos")




# -- 1. merge into one of its own parts ------------------------------------------------------------------------


def test_merge_refuses_an_output_that_is_one_of_the_parts(photos, checkpoint, tmp_path):
    output = tmp_path / "c.parquet"
    parts = [run(small_caption_options(photos, checkpoint, output, shard=(k, 2))).output for k in range(2)]
    before = [p.read_bytes() for p in parts]
    result = runner.invoke(app, ["merge", str(parts[0]), str(parts[1]), "-o", str(parts[0]), "--remove-parts"])
    one_line_error(result, "one of the parts")
    assert [p.read_bytes() for p in parts] == before  # both parts still there, untouched
    # through another spelling of the same file
    alias = tmp_path / "alias.parquet"
    alias.symlink_to(parts[1])
    result = runner.invoke(app, ["merge", str(parts[0]), str(parts[1]), "-o", str(alias), "--remove-parts"])
    one_line_error(result, "one of the parts")
    assert [p.read_bytes() for p in parts] == before


# -- 2. a symlinked sidecar --------------------------------------------------------------------------------------


def test_a_symlinked_sidecar_is_refused_and_its_target_left_untouched(photos, checkpoint, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    (precious / "chunk-000000.parquet").write_bytes(b"not ours either")
    output = tmp_path / "out" / "c.parquet"
    output.parent.mkdir()
    sidecar = output.with_name("c.parquet.partial")
    sidecar.symlink_to(precious, target_is_directory=True)
    for extra in ((), ("--overwrite",)):
        result = small_caption_cli(photos, checkpoint, output, *extra)
        one_line_error(result, "c.parquet.partial", "symbolic link")
        assert sorted(p.name for p in precious.iterdir()) == ["chunk-000000.parquet", "thesis.tex"]
        assert (precious / "thesis.tex").read_text() == "years of work"
        assert not output.exists()


def test_overwrite_and_finish_delete_only_the_files_the_run_wrote(photos, checkpoint, tmp_path, monkeypatch):
    output = tmp_path / "c.parquet"
    sidecar = tmp_path / "c.parquet.partial"
    sidecar.mkdir()
    (sidecar / "notes.txt").write_text("mine")
    (sidecar / "chunk-000007.parquet").write_bytes(b"a torn chunk")  # satcli's name: unreadable, recaptioned
    run(small_caption_options(photos, checkpoint, output, overwrite=True))
    assert pq.read_table(output).num_rows == 5
    assert [p.name for p in sidecar.iterdir()] == ["notes.txt"]  # kept, with the folder around it


# -- 3. a file name that is not UTF-8 ----------------------------------------------------------------------------


def test_a_non_utf8_file_name_gets_an_error_row_and_the_rest_are_captioned(photos, checkpoint, tmp_path):
    raw = os.fsencode(photos) + b"/caf\xe9.jpg"  # Latin-1 "café", as a ZIP or Samba share leaves it
    with open(raw, "wb") as f:
        f.write((photos / "img0.jpg").read_bytes())
    output = tmp_path / "c.parquet"
    summary = run(small_caption_options(photos, checkpoint, output))
    rows = {row["path"]: row for row in pq.read_table(output).to_pylist()}
    assert len(rows) == 6 and summary.n_captioned == 5
    bad = rows["photos/caf\\xe9.jpg"]  # the bytes spelled out, so the user can find the file
    assert bad["caption"] is None and bad["error"].startswith("bad-name:")
    assert all(rows[f"photos/img{i}.jpg"]["error"] is None for i in range(5))


# -- 4. resume on a dataset with another vocabulary; 9. malformed training state -----------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A shapes store and a one-epoch run on it."""
    from satcli.commands.preprocess import run as preprocess
    from satcli.data.preprocess import PreprocessOptions
    from satcli.data.store import DatasetKind
    from satcli.training import TrainOptions, train

    root = tmp_path_factory.mktemp("data")
    preprocess(PreprocessOptions(dataset=DatasetKind.shapes, data_root=root, n_train=24, n_val=4, n_test=4,
                                 image_size=32, min_word_freq=1))
    out = tmp_path_factory.mktemp("run") / "run"
    train(TrainOptions(dataset="shapes", data_root=root, out=out, epochs=1, image_size=32, embed_dim=8,
                       attention_dim=8, decoder_dim=8, dropout=0.0, batch_size=8, val_max_length=4,
                       pretrained=False))
    return root, out


def _resume(root: Path, out: Path):
    return runner.invoke(app, ["train", "--dataset", "shapes", "--data-root", str(root), "--out", str(out),
                               "--resume"])


def _edited_copy(out: Path, tmp_path: Path, edit) -> Path:
    """A copy of the run folder whose last.pt has been changed by ``edit(payload)``."""
    copy = tmp_path / "copy"
    copy.mkdir()
    payload = torch.load(out / "last.pt", weights_only=True)
    edit(payload)
    torch.save(payload, copy / "last.pt")
    return copy


def test_resume_refuses_a_dataset_with_other_words(trained, tmp_path):
    root, out = trained

    def swap_two_words(payload):  # as a store preprocessed again: same size, other word ids
        vocab = payload["vocab"]
        vocab[-1], vocab[-2] = vocab[-2], vocab[-1]

    copy = _edited_copy(out, tmp_path, swap_two_words)
    before = (copy / "last.pt").read_bytes()
    one_line_error(_resume(root, copy), "last.pt", "vocabulary", "'shapes'")
    assert (copy / "last.pt").read_bytes() == before

    other = tmp_path / "other"
    other.mkdir()
    payload = torch.load(out / "last.pt", weights_only=True)
    payload["vocab"] = payload["vocab"][:-1]
    payload["config"]["vocab_size"] -= 1
    payload["state_dict"] = {}
    torch.save(payload, other / "last.pt")
    one_line_error(_resume(root, other), "vocabulary")


@pytest.mark.parametrize("edit, words", [
    (lambda p: p.pop("train_state"), "no training state"),
    (lambda p: p["train_state"].pop("optimizer"), "no training state"),
    (lambda p: p["train_state"]["options"].update(epochs="many"), "epochs"),
    (lambda p: p["train_state"].update(options=[1, 2]), "train options"),
])
def test_resume_with_a_malformed_training_state_is_one_line(trained, tmp_path, edit, words):
    root, out = trained
    one_line_error(_resume(root, _edited_copy(out, tmp_path, edit)), "last.pt", words)


@pytest.mark.parametrize("edit, words", [
    (lambda p: p["preprocessing"].update(image_size=0), "image_size 0"),
    (lambda p: p["preprocessing"].update(image_size=60000), "image_size 60000"),
    (lambda p: p["preprocessing"].update(std=[0.0, 1.0, 1.0]), "std"),
    (lambda p: p["preprocessing"].pop("mean"), "mean"),
    (lambda p: p.update(preprocessing="224"), "preprocessing"),
    (lambda p: p["config"].update(embed_dim=-3), "embed_dim"),
    (lambda p: p["config"].update(encoder="resnet9000"), "malformed config"),
    (lambda p: p.update(config=[1]), "config"),
    (lambda p: p.update(train_options="fast"), "train_options"),
    (lambda p: p.update(vocab=[1, 2, 3]), "vocabulary"),
])
def test_checkpoints_with_malformed_values_are_refused_in_one_line(checkpoint, photos, tmp_path, edit, words):
    payload = torch.load(checkpoint, weights_only=True)
    edit(payload)
    bad = tmp_path / "bad.pt"
    torch.save(payload, bad)
    output = tmp_path / "c.parquet"
    one_line_error(small_caption_cli(photos, bad, output), "bad.pt", words)
    assert not output.exists()


# -- 5. a FIFO where an image should be; 9. attention that does not fit its grid ----------------------------------


def _results_with(tmp_path: Path, rows) -> Path:
    from tests.helpers import write_results_file

    return write_results_file(tmp_path / "r.parquet", rows, {"satcli.images": {"root": str(tmp_path)}})


def test_report_and_overlays_finish_when_an_image_path_is_a_fifo(tmp_path):
    from satcli.formats.results import CaptionRow
    from tests.helpers import peaked_attention

    os.mkfifo(tmp_path / "pipe.jpg")  # nothing ever writes into it: opening it to read would wait forever
    rows = [CaptionRow("pipe.jpg", "a pipe", ["a", "pipe"], -1.0, True, peaked_attention(2, 3, 3, [(0, 0), (1, 1)]),
                       30, 30)]
    results = _results_with(tmp_path, rows)
    command = [sys.executable, "-m", "satcli", "report", str(results), "-o", str(tmp_path / "r.html"), "--overlays",
               str(tmp_path / "ov")]
    try:
        done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    except subprocess.TimeoutExpired:
        pytest.fail("satcli report hangs on a FIFO")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "r.html").is_file() and len(list((tmp_path / "ov").glob("*.png"))) == 1
    assert "1 image could not be read" in done.stderr  # drawn grey, like a moved image


def test_attention_that_does_not_fit_its_grid_is_one_line(tmp_path):
    from satcli.formats.results import CaptionRow, to_table
    from tests.helpers import peaked_attention

    rows = [CaptionRow("a.jpg", "a b", ["a", "b"], -1.0, True, peaked_attention(2, 3, 3, [(0, 0), (1, 1)]), 9, 9)]
    table = to_table(rows)
    table = table.set_column(table.schema.get_field_index("grid_height"), "grid_height",
                             pa_array([4], "int32"))  # 2 grids of 9 cells claimed to be 4 × 3
    pq.write_table(table, tmp_path / "r.parquet")
    for command in (["report", str(tmp_path / "r.parquet"), "-o", str(tmp_path / "r.html")],
                    ["report", str(tmp_path / "r.parquet"), "-o", str(tmp_path / "r2.html"), "--overlays",
                     str(tmp_path / "ov")]):
        one_line_error(runner.invoke(app, command), "r.parquet", "a.jpg", "does not fit")


def pa_array(values, type_name):
    import pyarrow as pa

    return pa.array(values, getattr(pa, type_name)())


# -- 6. an empty caption list; 9. JSON that Python cannot hold ----------------------------------------------------


def _preprocess_jsonl(tmp_path: Path, text: str):
    images = tmp_path / "imgs"
    images.mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    for name in ("a.jpg", "b.jpg"):
        (images / name).write_bytes(jpeg_bytes(rng))
    captions = tmp_path / "captions.jsonl"
    captions.write_text(text, encoding="utf-8")
    return runner.invoke(app, ["preprocess", "--dataset", "captions-csv", "--images", str(images), "--captions",
                               str(captions), "--data-root", str(tmp_path / "data"), "--name", "mine"])


def test_an_empty_caption_list_is_refused_at_preprocess(tmp_path):
    text = '{"image": "a.jpg", "captions": ["a red square"]}\n{"image": "b.jpg", "captions": []}\n'
    one_line_error(_preprocess_jsonl(tmp_path, text), "captions.jsonl", "line 2", "captions list is empty")
    assert not (tmp_path / "data" / "mine").exists()


@pytest.mark.parametrize("text, words", [
    ('{"image": "a.jpg", "caption": ' + "[" * 100_000 + "]" * 100_000 + "}\n", "nested too deeply"),
    ('{"image": "a.jpg", "caption": "x", "n": ' + "9" * 5000 + "}\n", "not readable JSON"),
    ('{"image": "a.jpg", "caption": "a \\ud800 square"}\n', "lone surrogate"),
    ('{"image": "\\udc80.jpg", "caption": "a square"}\n', "lone surrogate"),
])
def test_json_python_cannot_hold_is_one_line_naming_the_file(tmp_path, text, words):
    one_line_error(_preprocess_jsonl(tmp_path, text), "captions.jsonl", "line 1", words)


def test_a_karpathy_json_nested_too_deeply_is_one_line(tmp_path):
    from satcli.data.datasets.readers import read_karpathy

    path = tmp_path / "dataset_x.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(SatcliError, match="dataset_x.json: top level: not readable JSON"):
        read_karpathy(path)
    path.write_text('{"images": [], "n": ' + "1" * 5000 + "}")
    with pytest.raises(SatcliError, match="dataset_x.json: top level: not readable JSON"):
        read_karpathy(path)


# -- 7. full disks and read-only folders: one line, earlier output untouched -------------------------------------


def _fault(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class _FullDisk:
    """A ParquetWriter whose writes fail as on a full disk, for files named ``target``."""

    def __init__(self, monkeypatch, target: str, code: int = errno.ENOSPC):
        original = satcli.formats.results.pq.ParquetWriter
        outer = self

        original_temp_path = getattr(satcli.formats.results, "temp_path", None)

        class Writer(original):
            def write_table(self, table, *args, **kwargs):
                if outer.target in str(self.temp):
                    raise _fault(outer.code)
                return super().write_table(table, *args, **kwargs)

            def __init__(self, where, *args, **kwargs):
                # the file behind ``where``: a path, or a pyarrow stream opened on the latest temporary name
                self.temp = where if isinstance(where, str | os.PathLike) else outer.last_temp
                super().__init__(where, *args, **kwargs)

        def recording_temp_path(target):
            outer.last_temp = original_temp_path(target)
            return outer.last_temp

        self.target, self.code, self.last_temp = target, code, None
        monkeypatch.setattr(satcli.formats.results.pq, "ParquetWriter", Writer)
        monkeypatch.setattr(satcli.formats.results, "temp_path", recording_temp_path, raising=False)


def _add_photo(photos: Path) -> None:
    (photos / "new.jpg").write_bytes((photos / "img0.jpg").read_bytes())


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize("code, cause", [(errno.ENOSPC, "ENOSPC"), (errno.EROFS, "EROFS")])
def test_caption_final_merge_on_a_full_or_read_only_disk(photos, checkpoint, tmp_path, monkeypatch, code, cause):
    output = tmp_path / "c.parquet"
    run(small_caption_options(photos, checkpoint, output))
    before = output.read_bytes()
    _add_photo(photos)
    _FullDisk(monkeypatch, "/.c.parquet.", code)  # the chunks write; the final merge does not
    one_line_error(small_caption_cli(photos, checkpoint, output), "c.parquet", cause)
    assert output.read_bytes() == before and _leftovers(tmp_path) == []
    monkeypatch.undo()
    monkeypatch.setenv("SATCLI_STATE_DIR", str(tmp_path / "state"))
    summary = run(small_caption_options(photos, checkpoint, output))  # with space again, the rerun only merges
    assert summary.n_processed == 0 and pq.read_table(output).num_rows == 6


def test_caption_sidecar_that_cannot_be_created(photos, checkpoint, tmp_path, monkeypatch):
    output = tmp_path / "c.parquet"
    run(small_caption_options(photos, checkpoint, output))
    before = output.read_bytes()
    _add_photo(photos)
    original = Path.mkdir

    def read_only(self, *args, **kwargs):
        if self.name.endswith(".partial"):
            raise _fault(errno.EROFS)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    one_line_error(small_caption_cli(photos, checkpoint, output), "c.parquet.partial", "EROFS")
    assert output.read_bytes() == before


def test_caption_chunk_write_on_a_full_disk(photos, checkpoint, tmp_path, monkeypatch):
    _FullDisk(monkeypatch, ".chunk-")
    one_line_error(small_caption_cli(photos, checkpoint, tmp_path / "c.parquet"), "c.parquet.partial", "ENOSPC")
    assert not (tmp_path / "c.parquet").exists()


def test_merge_on_a_full_disk_and_parts_on_a_read_only_one(photos, checkpoint, tmp_path, monkeypatch):
    output = tmp_path / "c.parquet"
    parts = [run(small_caption_options(photos, checkpoint, output, shard=(k, 2))).output for k in range(2)]
    output.write_bytes(b"an older merge")
    before = [p.read_bytes() for p in parts]
    with monkeypatch.context() as patch:
        _FullDisk(patch, "/.c.parquet.")
        result = runner.invoke(app, ["merge", "-o", str(output), "--remove-parts"])
    one_line_error(result, "c.parquet", "ENOSPC")
    assert output.read_bytes() == b"an older merge" and [p.read_bytes() for p in parts] == before
    assert _leftovers(tmp_path) == []

    original = Path.unlink

    def read_only(self, *args, **kwargs):
        if ".part-" in self.name:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", read_only)
    result = runner.invoke(app, ["merge", "-o", str(output), "--remove-parts"])
    one_line_error(result, "c.part-0-of-2.parquet", "EROFS")
    assert pq.read_table(output).num_rows == 5 and all(p.is_file() for p in parts)


def test_report_and_overlays_on_a_full_disk(tmp_path, monkeypatch):
    from satcli.formats.results import CaptionRow
    from tests.helpers import peaked_attention

    Image.new("RGB", (30, 30), (200, 30, 30)).save(tmp_path / "red.png")
    rows = [CaptionRow("red.png", "red", ["red"], -1.0, True, peaked_attention(1, 3, 3, [(0, 0)]), 30, 30)]
    results = _results_with(tmp_path, rows)
    page = tmp_path / "r.html"
    assert runner.invoke(app, ["report", str(results), "-o", str(page)]).exit_code == 0
    before = page.read_bytes()
    original = Path.write_bytes

    def full(self, data):
        if ".satcli-" in self.name:
            raise _fault(errno.ENOSPC)
        return original(self, data)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_bytes", full)
        one_line_error(runner.invoke(app, ["report", str(results), "-o", str(page)]), "r.html", "ENOSPC")
    assert page.read_bytes() == before and _leftovers(tmp_path) == []

    original_save = Image.Image.save

    def full_for(image_format):
        def save(self, fp, *args, **kwargs):
            if kwargs.get("format") == image_format:
                raise _fault(errno.ENOSPC)
            return original_save(self, fp, *args, **kwargs)
        return save

    with monkeypatch.context() as patch:  # the report's thumbnails
        patch.setattr(Image.Image, "save", full_for("JPEG"))
        one_line_error(runner.invoke(app, ["report", str(results), "-o", str(page)]), "r_files", "ENOSPC")
    with monkeypatch.context() as patch:  # the attention pictures
        patch.setattr(Image.Image, "save", full_for("PNG"))
        result = runner.invoke(app, ["report", str(results), "-o", str(page), "--overlays", str(tmp_path / "ov")])
        one_line_error(result, str(tmp_path / "ov"), ".png", "ENOSPC")
    assert page.read_bytes() == before and _leftovers(tmp_path / "ov") == []

    original_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if self.name == "ov":
            raise _fault(errno.EROFS)
        return original_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    result = runner.invoke(app, ["report", str(results), "-o", str(tmp_path / "t.html"), "--overlays",
                                 str(tmp_path / "ov")])
    one_line_error(result, "ov", "EROFS")


def test_a_checkpoint_write_on_a_full_disk_keeps_the_old_one(checkpoint, tmp_path, monkeypatch):
    target = tmp_path / "last.pt"
    target.write_bytes(checkpoint.read_bytes())
    loaded = torch.load(checkpoint, weights_only=True)
    model = Captioner(tiny_config(image_size=32))
    original = torch.save

    def full(obj, f, *args, **kwargs):
        original(obj, f, *args, **kwargs)  # most of it lands, then the disk is full
        raise _fault(errno.ENOSPC)

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(SatcliError) as caught:
        save_checkpoint(target, model, Vocabulary(loaded["vocab"]))
    assert str(caught.value).startswith(f"{target}: cannot write (") and "ENOSPC" in str(caught.value)
    assert "\n" not in str(caught.value)
    assert target.read_bytes() == checkpoint.read_bytes() and _leftovers(tmp_path) == []


def test_other_os_errors_are_not_hidden(tmp_path, monkeypatch):
    """Only disk faults become one line: a bug keeps its traceback."""
    import satcli.commands.merge

    def broken(options):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(satcli.commands.merge, "run", broken)
    result = runner.invoke(app, ["merge", "-o", str(tmp_path / "x.parquet")])
    assert isinstance(result.exception, OSError) and result.exception.errno == errno.EBADF


# -- 8. temporary files a kill left behind ------------------------------------------------------------------------


def _killed_while_writing(target: Path) -> Path:
    """Run a process that starts an atomic write of ``target`` and is SIGKILLed in the middle of it; return the
    temporary file it left."""
    script = ("import os, signal, sys\n"
              "from satcli.core.atomic import write_with\n"
              "def half(tmp):\n"
              "    tmp.write_bytes(b'half a file')\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n"
              "write_with(sys.argv[1], half)\n")
    done = subprocess.run([sys.executable, "-c", script, str(target)], env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == -signal.SIGKILL
    (left,) = [p for p in target.parent.iterdir() if p.name.endswith(".tmp")]
    assert left.name.startswith(f".{target.name}.satcli-")
    return left


def test_stale_temporary_files_of_a_killed_merge_or_checkpoint_are_removed(photos, checkpoint, tmp_path):
    output = tmp_path / "c.parquet"
    left = _killed_while_writing(output)
    mine = temp_path(output)  # a write of this very process, still going: not stale
    mine.write_bytes(b"")
    foreign = tmp_path / ".c.parquet.something.tmp"  # not satcli's pattern: not ours to delete
    foreign.write_bytes(b"")
    run(small_caption_options(photos, checkpoint, output))
    assert not left.exists() and mine.exists() and foreign.exists()
    assert pq.read_table(output).num_rows == 5

    last = tmp_path / "run" / "last.pt"
    last.parent.mkdir()
    left = _killed_while_writing(last)
    loaded = torch.load(checkpoint, weights_only=True)
    save_checkpoint(last, Captioner(tiny_config(image_size=32)), Vocabulary(loaded["vocab"]))
    assert not left.exists() and _leftovers(last.parent) == []


def test_the_atomic_helper_writes_bytes_and_cleans_only_dead_writers(tmp_path):
    target = tmp_path / "f.bin"
    write_bytes(target, b"one")
    write_bytes(target, b"two")
    assert target.read_bytes() == b"two" and _leftovers(tmp_path) == []
    left = _killed_while_writing(target)
    assert remove_stale_temps(target) == [left] and target.read_bytes() == b"two"
    assert remove_stale_temps(tmp_path / "other") == []


# -- 10. a slow disk holds the device back ------------------------------------------------------------------------


def test_a_slow_disk_never_leaves_more_than_two_batches_unsaved():
    import threading

    from satcli.captioning.writer import UNSAVED_BATCHES, CaptionedBatch, ChunkWriter

    release = threading.Event()
    written = []

    class SlowDisk:
        directory = Path("sidecar")

        def write_chunk(self, rows, metadata):
            release.wait()
            written.append([row.path for row in rows])

    metadata = {"satcli.decoding": {"n_best": 1}}
    writer = ChunkWriter(SlowDisk(), metadata, words=[])
    batches = [CaptionedBatch([f"img{i}"], [1], [1], ["empty: x"], [None]) for i in range(4)]
    captioned = []

    def caption_all():  # the captioning loop of satcli.captioning.pipeline
        for batch in batches:
            writer.reserve()
            captioned.append(batch)
            writer.put(batch)

    loop = threading.Thread(target=caption_all, daemon=True)
    loop.start()
    loop.join(timeout=1.0)
    assert loop.is_alive() and len(captioned) == UNSAVED_BATCHES == 2  # a kill now loses these two only
    release.set()
    loop.join(timeout=30)
    writer.close()
    assert written == [["img0"], ["img1"], ["img2"], ["img3"]]


@pytest.fixture
def full_tmpfs(tmp_path):
    """A 1 MiB tmpfs (root only; skipped where mounting is not allowed), to be filled by the test."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=False)  # a handle still open: detach it anyway


def _fill(folder: Path) -> None:
    with open(folder / "filler", "wb", buffering=0) as f, pytest.raises(OSError) as caught:
        while True:
            f.write(b"\0" * 4096)
    assert caught.value.errno == errno.ENOSPC


def test_a_real_full_disk_merge_and_checkpoint(photos, checkpoint, tmp_path, full_tmpfs):
    output = tmp_path / "c.parquet"
    parts = [run(small_caption_options(photos, checkpoint, output, shard=(k, 2))).output for k in range(2)]
    target = full_tmpfs / "c.parquet"
    target.write_bytes(b"an older merge")
    last = full_tmpfs / "last.pt"
    last.write_bytes(b"an older checkpoint")
    _fill(full_tmpfs)
    result = runner.invoke(app, ["merge", str(parts[0]), str(parts[1]), "-o", str(target)])
    one_line_error(result, str(target), "No space left on device", "ENOSPC")
    loaded = torch.load(checkpoint, weights_only=True)
    with pytest.raises(SatcliError, match="last.pt: cannot write .No space left on device, ENOSPC"):
        save_checkpoint(last, Captioner(tiny_config(image_size=32)), Vocabulary(loaded["vocab"]))
    assert target.read_bytes() == b"an older merge" and last.read_bytes() == b"an older checkpoint"
    assert _leftovers(full_tmpfs) == []
    held = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{fd}")]
    assert not [h for h in held if h.startswith(str(full_tmpfs))]  # no file left open there
