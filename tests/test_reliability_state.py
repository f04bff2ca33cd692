"""Symlinks and state folders, concurrent runs, interrupted merges, inputs that hold satcli's own outputs, names
that print alike and a checkpoint replaced while it loads (issue 22, part 2).

Real symlinks, hard links, files and processes throughout. Where two runs must meet at one moment, the test
makes that moment happen (a process waits on a pipe, a function runs the next step) instead of hoping a sleep
lands there.
"""

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from models.captioner import Captioner
from satcli.captioning.state import RunState
from satcli.cli import app
from satcli.commands.caption import run
from satcli.commands.merge import MergeOptions
from satcli.commands.merge import run as merge
from satcli.data.vocab import SPECIALS, Vocabulary
from satcli.formats.checkpoint import checkpoint_sha256, save_checkpoint
from satcli.pictures.overlays import overlay_name
from tests.helpers import five_photos, one_line_error, small_caption_cli, small_caption_options, tiny_config

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path, monkeypatch):
    monkeypatch.setenv("SATCLI_STATE_DIR", str(tmp_path / "state"))
    for name in ("SATCLI_MODEL", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)


def _save_model(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = Captioner(tiny_config(image_size=32))
    vocab = Vocabulary([*SPECIALS, *(f"word{i}" for i in range(model.config.vocab_size - len(SPECIALS)))])
    return save_checkpoint(folder / f"tiny-{seed}.pt", model, vocab)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return _save_model(tmp_path_factory.mktemp("model"), 0)


@pytest.fixture
def photos(tmp_path) -> Path:
    return five_photos(tmp_path / "photos")




def _captions(path: Path) -> dict[str, str | None]:
    return {row["path"]: row["caption"] for row in pq.read_table(path, columns=["path", "caption"]).to_pylist()}


# -- 1. links inside a real .partial folder -----------------------------------------------------------------------


def test_a_lock_symlink_in_the_sidecar_is_refused_and_its_target_kept(photos, checkpoint, tmp_path):
    precious = tmp_path / "thesis.tex"
    precious.write_text("years of work")
    output = tmp_path / "c.parquet"
    sidecar = tmp_path / "c.parquet.partial"
    sidecar.mkdir()
    (sidecar / "lock").symlink_to(precious)
    for extra in ((), ("--overwrite",)):
        result = small_caption_cli(photos, checkpoint, output, *extra)
        one_line_error(result, "lock", "symbolic link")
        assert precious.read_text() == "years of work"
        assert (sidecar / "lock").is_symlink() and not output.exists()  # the link is left, as the user made it


def test_a_lock_hard_linked_to_a_file_leaves_that_file_whole(photos, checkpoint, tmp_path):
    precious = tmp_path / "thesis.tex"
    precious.write_text("years of work")
    output = tmp_path / "c.parquet"
    sidecar = tmp_path / "c.parquet.partial"
    sidecar.mkdir()
    os.link(precious, sidecar / "lock")  # same inode: opening "lock" for writing would empty thesis.tex
    summary = run(small_caption_options(photos, checkpoint, output))
    assert summary.n_captioned == 5 and not sidecar.exists()
    assert precious.read_text() == "years of work"


def test_a_planted_chunk_symlink_is_refused_not_merged(photos, checkpoint, tmp_path):
    straight = tmp_path / "straight.parquet"
    run(small_caption_options(photos, checkpoint, straight))
    planted = tmp_path / "planted.parquet"  # a satcli results file with other captions for the same images
    table = pq.read_table(straight)
    table = table.set_column(table.schema.get_field_index("caption"), "caption",
                             pa.array(["planted"] * table.num_rows))
    pq.write_table(table.replace_schema_metadata(table.schema.metadata), planted)
    before = planted.read_bytes()
    output = tmp_path / "c.parquet"
    sidecar = tmp_path / "c.parquet.partial"
    sidecar.mkdir()
    (sidecar / "chunk-000000.parquet").symlink_to(planted)
    result = small_caption_cli(photos, checkpoint, output)
    one_line_error(result, "chunk-000000.parquet", "symbolic link")
    assert planted.read_bytes() == before and not output.exists()
    assert (sidecar / "chunk-000000.parquet").is_symlink()


# -- 3. the end-of-run lock race ----------------------------------------------------------------------------------

_LOCKER = """
import fcntl, sys
from pathlib import Path
from satcli.captioning.state import RunState
from satcli.core.errors import SatcliError

print("ready", flush=True)
sys.stdin.readline()  # imports take seconds: the test starts every run at once, then tells each when to lock
if sys.argv[2] == "pause":  # stop after opening the lock file, before locking it, until the test says go
    paused = []
    def hold(real):
        def call(fd, operation, *rest):
            if not paused and operation & fcntl.LOCK_EX:
                paused.append(1)
                print("opened", flush=True)
                sys.stdin.readline()
            return real(fd, operation, *rest)
        return call
    fcntl.flock, fcntl.lockf = hold(fcntl.flock), hold(fcntl.lockf)
try:
    RunState(Path(sys.argv[1])).lock()
    print("locked", flush=True)
except SatcliError:
    print("refused", flush=True)
sys.stdin.readline()  # hold the lock until the test lets go
"""


class _Run:
    """Another satcli process that takes the lock of ``output``'s sidecar when told to; it answers on a pipe."""

    def __init__(self, output: Path, pause: bool = False):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        self.process = subprocess.Popen([sys.executable, "-c", _LOCKER, str(output), "pause" if pause else "-"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def lock(self) -> str:
        """Tell it to lock; what it says: ``locked``, ``refused``, or ``opened`` (paused before locking)."""
        assert self._answer() == "ready"
        return self.resume()

    def resume(self) -> str:
        """Let it go on (a paused run locks now); what it says next."""
        self.process.stdin.write("\n")
        self.process.stdin.flush()
        return self._answer()

    def _answer(self) -> str:
        return self.process.stdout.readline().strip()

    def end(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(BrokenPipeError):
                self.process.stdin.write("\n\n\n")
                self.process.stdin.close()
        self.process.wait(timeout=120)


def test_a_run_that_locks_just_as_another_finishes_keeps_a_third_out(tmp_path):
    output = tmp_path / "c.parquet"
    first = RunState(output)
    first.start({"model_sha256": "x"}, overwrite=False)
    refused, second, third = runs = [_Run(output) for _ in range(3)]
    try:
        assert refused.lock() == "refused"  # the lock holds across processes
        release, answers = first.unlock, []

        def release_then_let_the_next_run_in() -> None:
            release()
            if not answers:  # the first release, at the end of the run: the next run takes the lock now
                answers.append(second.lock())

        first.unlock = release_then_let_the_next_run_in
        first.remove()
        assert answers == ["locked"]
        assert third.lock() == "refused", "two runs hold the lock of one output at once"
    finally:
        for other in runs:
            other.end()


def test_a_run_that_opened_the_lock_before_another_finished_keeps_a_third_out(tmp_path):
    output = tmp_path / "c.parquet"
    first = RunState(output)
    first.start({"model_sha256": "x"}, overwrite=False)
    second, third = runs = [_Run(output, pause=True), _Run(output)]
    try:
        assert second.lock() == "opened"  # it has the lock file open and waits
        first.remove()  # the first run finishes: its lock file goes
        assert second.resume() == "locked"
        assert third.lock() == "refused", "two runs hold the lock of one output at once"
    finally:
        for other in runs:
            other.end()


# -- 2. report thumbnails and attention pictures over planted links ------------------------------------------------


def test_report_and_overlays_replace_planted_links_and_keep_their_targets(photos, checkpoint, tmp_path):
    results = tmp_path / "c.parquet"
    run(small_caption_options(photos, checkpoint, results))
    names = [overlay_name(path) for path in _captions(results)]
    thumbs, pictures = tmp_path / "r_files", tmp_path / "ov"
    thumbs.mkdir()
    pictures.mkdir()
    precious = []
    for i, name in enumerate(names):
        for link in (thumbs / f"{name}.jpg", pictures / f"{name}.png", pictures / f"{name}.gif"):
            target = tmp_path / f"precious-{i}-{link.suffix[1:]}.txt"
            target.write_text(f"years of work {i}")
            link.symlink_to(target)
            precious.append(target)
    result = runner.invoke(app, ["report", str(results), "-o", str(tmp_path / "r.html"), "--image-root",
                                 str(tmp_path), "--overlays", str(pictures)])
    assert result.exit_code == 0, result.output
    assert [p.read_bytes() for p in precious] == [f"years of work {i}".encode() for i in range(len(names))
                                                  for _ in range(3)]
    for name in names:  # each name now holds the picture itself
        assert not (thumbs / f"{name}.jpg").is_symlink() and Image.open(thumbs / f"{name}.jpg").format == "JPEG"
        assert not (pictures / f"{name}.png").is_symlink() and Image.open(pictures / f"{name}.png").format == "PNG"


# -- 7. a checkpoint replaced while it loads ---------------------------------------------------------------------


def test_a_checkpoint_replaced_during_its_load_is_recorded_as_the_model_that_captioned(photos, checkpoint, tmp_path,
                                                                                       monkeypatch):
    import satcli.captioning.pipeline

    other = _save_model(tmp_path, 1)
    model = tmp_path / "model.pt"
    model.write_bytes(checkpoint.read_bytes())
    loaded_bytes, replaced = [], threading.Event()
    real_load = torch.load

    def load_then_replace(source, *args, **kwargs):  # the user's next training run renames its new model over it
        data = Path(source).read_bytes() if isinstance(source, str | Path) else source.read()
        loaded_bytes.append(data)
        if not replaced.is_set():
            os.replace(tmp_path / "next.pt", model)
            replaced.set()
        return real_load(io.BytesIO(data), *args, **kwargs)

    def hash_after_the_replacement(path):  # however the run hashes the file, it does so after the rename
        assert replaced.wait(60)
        return checkpoint_sha256(path)

    (tmp_path / "next.pt").write_bytes(other.read_bytes())
    with monkeypatch.context() as patch:
        patch.setattr(torch, "load", load_then_replace)
        patch.setattr(satcli.captioning.pipeline, "checkpoint_sha256", hash_after_the_replacement, raising=False)
        run(small_caption_options(photos, checkpoint=model, output=tmp_path / "c.parquet"))
    assert loaded_bytes == [checkpoint.read_bytes()] and model.read_bytes() == other.read_bytes()
    output = tmp_path / "c.parquet"
    recorded = json.loads(pq.read_schema(output).metadata[b"satcli.fingerprint"])["model_sha256"]
    assert recorded == hashlib.sha256(checkpoint.read_bytes()).hexdigest()  # the model that wrote the captions
    before = output.read_bytes()
    (photos / "new.jpg").write_bytes((photos / "img0.jpg").read_bytes())
    result = small_caption_cli(photos, model, output)  # now the other model: it must not add its captions to these
    one_line_error(result, "different model")
    assert output.read_bytes() == before


# -- 4. a merge --remove-parts that was killed ------------------------------------------------------------------


def test_a_merge_killed_while_removing_parts_finishes_when_run_again(photos, checkpoint, tmp_path, monkeypatch):
    output = tmp_path / "c.parquet"
    parts = [run(small_caption_options(photos, checkpoint, output, shard=(k, 2))).output for k in range(2)]
    original = Path.unlink

    def killed_after_the_first(self, *args, **kwargs):  # SIGKILL between the two unlinks, as in the issue
        if self == parts[1]:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(Path, "unlink", killed_after_the_first)
        merge(MergeOptions(output=output, remove_parts=True))
    assert not parts[0].exists() and parts[1].exists()
    merged = output.read_bytes()
    assert len(_captions(output)) == 5
    result = runner.invoke(app, ["merge", "-o", str(output), "--remove-parts"])
    assert result.exit_code == 0, result.output
    assert output.read_bytes() == merged and not parts[1].exists()  # the output kept, the leftover part removed
    assert "5" in result.output


def test_a_leftover_part_the_output_does_not_hold_still_needs_its_missing_part(photos, checkpoint, tmp_path):
    output = tmp_path / "c.parquet"
    parts = [run(small_caption_options(photos, checkpoint, output, shard=(k, 2))).output for k in range(2)]
    assert runner.invoke(app, ["merge", "-o", str(output)]).exit_code == 0
    (photos / "new.jpg").write_bytes((photos / "img0.jpg").read_bytes())
    parts[0].unlink()
    # part 1 now holds an image more
    run(small_caption_options(photos, checkpoint, output, shard=(1, 2), overwrite=True))
    before = parts[1].read_bytes()
    one_line_error(runner.invoke(app, ["merge", "-o", str(output), "--remove-parts"]), "part 0 of 2 is missing")
    assert parts[1].read_bytes() == before


# -- 6. a Latin-1 name that prints like a UTF-8 one --------------------------------------------------------------


def test_a_latin1_name_that_prints_like_a_utf8_name_still_gets_its_row(photos, checkpoint, tmp_path):
    picture = (photos / "img0.jpg").read_bytes()
    with open(os.fsencode(photos) + b"/caf\xe9.jpg", "wb") as f:  # Latin-1 "café": shown as caf\xe9.jpg
        f.write(picture)
    (photos / "caf\\xe9.jpg").write_bytes(picture)  # a UTF-8 name that reads exactly like that
    output = tmp_path / "c.parquet"
    summary = run(small_caption_options(photos, checkpoint, output))
    rows = {row["path"]: row for row in pq.read_table(output).to_pylist()}
    assert len(rows) == 7 and summary.n_captioned == 6
    assert rows["photos/caf\\xe9.jpg"]["error"] is None  # the UTF-8 file keeps its own name, and a caption
    bad = rows["photos/caf\\xe9.jpg (not UTF-8)"]
    assert bad["caption"] is None and bad["error"].startswith("bad-name:")
    assert run(small_caption_options(photos, checkpoint, output)).n_processed == 0  # a rerun sees the same seven names


# -- 5. outputs inside the input folder ----------------------------------------------------------------------------


def test_outputs_written_inside_the_input_folder_are_not_captioned_on_the_next_run(photos, checkpoint, tmp_path,
                                                                                    monkeypatch):
    monkeypatch.chdir(tmp_path)
    output = photos / "c.parquet"
    command = ["caption", "photos", "--model", str(checkpoint), "-o", str(output), "--batch-size", "2",
               "--max-length", "4", "--workers", "0", "--overlays", str(photos / "ov")]
    assert runner.invoke(app, command).exit_code == 0
    assert runner.invoke(app, ["report", str(output), "-o", str(photos / "r.html")]).exit_code == 0
    assert len(list((photos / "ov").glob("*.png"))) == 5 and len(list((photos / "r_files").glob("*.jpg"))) == 5
    unfinished = photos / "old.parquet.partial"  # an unfinished run's state folder, with a stray picture in it
    unfinished.mkdir()
    (unfinished / "run.json").write_text("{}")
    (unfinished / "stray.jpg").write_bytes((photos / "img0.jpg").read_bytes())
    (photos / "ov" / "holiday.jpg").write_bytes((photos / "img1.jpg").read_bytes())  # the user's own photo
    for _ in range(2):
        result = runner.invoke(app, command)
        assert result.exit_code == 0, result.output
        assert sorted(_captions(output)) == ["photos/img0.jpg", "photos/img1.jpg", "photos/img2.jpg",
                                             "photos/img3.jpg", "photos/img4.jpg", "photos/ov/holiday.jpg"]
    globbed = runner.invoke(app, ["caption", "photos/**/*.*", "--model", str(checkpoint), "-o",
                                  str(tmp_path / "g.parquet"), "--max-length", "4", "--workers", "0"])
    assert globbed.exit_code == 0, globbed.output
    assert len(_captions(tmp_path / "g.parquet")) == 6
