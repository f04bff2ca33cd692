"""Inputs where the data lives: WebDataset tar shards and Parquet files, local and on a real S3 server (moto on
127.0.0.1), give the rows `satcli caption` gives on the same pictures as local JPEG files; one results file per
input shard, resumed by shard after a kill; bad shards, buckets and endpoints as rows or one-line errors."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from satcli.captioning.options import CaptionOptions
from satcli.captioning.sources import find_inputs
from satcli.cli import app
from satcli.commands.caption import run
from tests.helpers import picture_sensitive_checkpoint

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
MAX_LENGTH = 6
N_PICTURES = 12
COMPARED = ("caption", "tokens", "grid_height", "grid_width", "image_width", "image_height", "finished", "error")
NUMBERS = ("sum_logprob", "token_logprobs", "attention")  # bit-identical when the batches are the same


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path, monkeypatch):
    monkeypatch.setenv("SATCLI_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("SATCLI_MODEL", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return picture_sensitive_checkpoint(tmp_path_factory.mktemp("model"))


def jpeg(rng: np.random.Generator, width: int = 64, height: int = 48) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> dict[str, bytes]:
    """key → JPEG bytes: the same pictures as local files, tar members and Parquet cells."""
    rng = np.random.default_rng(3)
    return {f"{i:06d}": jpeg(rng) for i in range(N_PICTURES)}


@pytest.fixture(scope="module")
def local_rows(pictures, checkpoint, tmp_path_factory) -> dict[str, dict]:
    """`satcli caption` over the pictures as a folder of JPEG files: key → row."""
    folder = tmp_path_factory.mktemp("jpegs")
    for key, data in pictures.items():
        (folder / f"{key}.jpg").write_bytes(data)
    output = folder.parent / "local.parquet"
    run(CaptionOptions(inputs=(str(folder),), model=checkpoint, output=output, root=folder, batch_size=4,
                       max_length=MAX_LENGTH, workers=0, progress=False))
    rows = {row["path"].removesuffix(".jpg"): row for row in pq.read_table(output).to_pylist()}
    assert len({row["caption"] for row in rows.values()}) > 1, "the captions must tell the pictures apart"
    return rows


def tar_shard(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def webdataset(pictures: dict[str, bytes], n_shards: int) -> list[bytes]:
    """The pictures as WebDataset shards: KEY.jpg, KEY.json and KEY.txt per sample, dealt in order."""
    keys = sorted(pictures)
    per = -(-len(keys) // n_shards)
    return [tar_shard([m for key in keys[i * per:(i + 1) * per] for m in (
        (f"{key}.jpg", pictures[key]), (f"{key}.json", json.dumps({"id": key}).encode()),
        (f"{key}.txt", f"caption of {key}".encode()))]) for i in range(n_shards)]


def read_folder(fs, folder: str) -> dict[str, list[dict]]:
    """Results file name → rows, for every .parquet file in a folder of the S3 server."""
    return {Path(p).name: pq.read_table(io.BytesIO(fs.cat_file(p))).to_pylist()
            for p in sorted(fs.ls(folder, detail=False)) if p.endswith(".parquet")}


def assert_same(row: dict, expected: dict, exact: bool = False) -> None:
    """The same caption, words, sizes and error; the same scores and attention, bit for bit when ``exact`` (the
    same batches as the local run), else to float32 rounding (other batch sizes change the sums' order)."""
    for column in COMPARED:
        assert row[column] == expected[column], column
    for column in NUMBERS:
        if exact or expected[column] is None:
            assert row[column] == expected[column], column
        else:
            np.testing.assert_allclose(np.array(row[column], np.float64), np.array(expected[column], np.float64),
                                       rtol=1e-4, atol=1e-5, err_msg=column)  # torch threads sum in their own order


def test_tar_shards_on_s3_give_the_rows_of_the_same_local_jpegs(s3_server, pictures, local_rows, checkpoint):
    bucket = s3_server.bucket()
    for i, shard in enumerate(webdataset(pictures, 3)):
        s3_server.put(f"{bucket}/shards/{i:05d}.tar", shard)
    result = runner.invoke(app, [
        "caption", f"s3://{bucket}/shards/{{00000..00002}}.tar", "-o", f"s3://{bucket}/captions", "--model",
        str(checkpoint), "--batch-size", "4", "--max-length", str(MAX_LENGTH), *s3_server.cli_options])
    assert result.exit_code == 0, result.output
    written = read_folder(s3_server.fs, f"{bucket}/captions")
    assert sorted(written) == ["00000.parquet", "00001.parquet", "00002.parquet"]
    keys = []
    for name, rows in written.items():
        for row in rows:
            keys.append(row["key"])
            assert row["shard"] == name.replace(".parquet", ".tar")
            assert row["path"] == f"s3://{bucket}/shards/{row['shard']}#{row['key']}.jpg"
            assert json.loads(row["source_meta"]) == {"json": {"id": row["key"]}, "txt": f"caption of {row['key']}"}
            assert_same(row, local_rows[row["key"]], exact=True)  # shards of 4, batches of 4: as the local run
    assert keys == sorted(pictures)  # every sample once, in shard order
    assert "3" in result.output and "shards" in result.output  # the summary counts the shards


def test_local_shards_glob_and_the_output_folder_name_each_file_after_its_shard(pictures, local_rows, checkpoint,
                                                                                 tmp_path):
    (tmp_path / "shards").mkdir()
    for i, shard in enumerate(webdataset(pictures, 2)):
        (tmp_path / "shards" / f"part-{i}.tar").write_bytes(shard)
    summary = run(CaptionOptions(inputs=(str(tmp_path / "shards" / "*.tar"),), model=checkpoint,
                                 output=tmp_path / "out", batch_size=4, max_length=MAX_LENGTH, progress=False))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["part-0.parquet", "part-1.parquet"]
    assert summary.n_shards == 2 and summary.n_captioned == N_PICTURES and summary.n_errors == 0
    for name in ("part-0.parquet", "part-1.parquet"):
        for row in pq.read_table(tmp_path / "out" / name).to_pylist():
            assert_same(row, local_rows[row["key"]])
    again = run(CaptionOptions(inputs=(str(tmp_path / "shards" / "*.tar"),), model=checkpoint,
                               output=tmp_path / "out", batch_size=4, max_length=MAX_LENGTH, progress=False))
    assert again.n_shards_resumed == 2 and again.n_processed == 0  # complete shards are not redone


def test_parquet_inputs_bytes_hf_struct_and_a_column_of_urls(s3_server, pictures, local_rows, checkpoint, tmp_path):
    bucket = s3_server.bucket()
    keys = sorted(pictures)
    img2dataset = pa.table({"key": keys, "jpg": [pictures[k] for k in keys], "caption": [f"c{k}" for k in keys]})
    hf = pa.table({"image": [{"bytes": pictures[k], "path": f"{k}.jpg"} for k in keys]})
    for key in keys:
        s3_server.put(f"{bucket}/images/{key}.jpg", pictures[key])
    urls = pa.table({"url": [f"s3://{bucket}/images/{k}.jpg" for k in keys]})
    for name, table in (("img2dataset", img2dataset), ("hf", hf), ("urls", urls)):
        sink = io.BytesIO()
        pq.write_table(table, sink)
        s3_server.put(f"{bucket}/{name}.parquet", sink.getvalue())
    for name, extra in (("img2dataset", []), ("hf", []), ("urls", ["--column", "url"])):
        result = runner.invoke(app, [
            "caption", f"s3://{bucket}/{name}.parquet", "-o", str(tmp_path / name), "--model", str(checkpoint),
            "--batch-size", "4", "--max-length", str(MAX_LENGTH), *extra, *s3_server.cli_options])
        assert result.exit_code == 0, result.output
        rows = pq.read_table(tmp_path / name / f"{name}.parquet").to_pylist()
        assert len(rows) == N_PICTURES
        for i, row in enumerate(rows):
            assert_same(row, local_rows[keys[i]])
    img2dataset_rows = pq.read_table(tmp_path / "img2dataset" / "img2dataset.parquet").to_pylist()
    assert [r["key"] for r in img2dataset_rows] == keys
    assert json.loads(img2dataset_rows[0]["source_meta"]) == {"caption": f"c{keys[0]}"}


def test_images_under_an_s3_prefix_go_to_one_results_file(s3_server, pictures, local_rows, checkpoint, tmp_path):
    bucket = s3_server.bucket()
    for key in sorted(pictures):
        s3_server.put(f"{bucket}/photos/{key}.jpg", pictures[key])
    s3_server.put(f"{bucket}/photos/notes.txt", b"not a picture")
    output = tmp_path / "captions.parquet"
    result = runner.invoke(app, ["caption", f"s3://{bucket}/photos/", "-o", str(output), "--model", str(checkpoint),
                                 "--batch-size", "4", "--max-length", str(MAX_LENGTH), "--workers", "0",
                                 *s3_server.cli_options])
    assert result.exit_code == 0, result.output
    rows = pq.read_table(output).to_pylist()
    assert [r["path"] for r in rows] == [f"s3://{bucket}/photos/{k}.jpg" for k in sorted(pictures)]
    for row in rows:
        assert_same(row, local_rows[Path(row["path"]).stem])


def test_a_killed_run_redoes_only_the_unfinished_shards(s3_server, pictures, local_rows, checkpoint, tmp_path):
    """Shard 3 is a pipe that gives half its bytes and then waits: the run is killed, deterministically, with
    shards 0–2 written and shard 3 half read; the rerun leaves 0–2 as they are and captions 3–5."""
    bucket = s3_server.bucket()
    shards = webdataset(pictures, 6)
    folder = tmp_path / "shards"
    folder.mkdir()
    for i, data in enumerate(shards):
        if i != 3:
            (folder / f"{i:05d}.tar").write_bytes(data)
    os.mkfifo(folder / "00003.tar")
    out = f"s3://{bucket}/out"
    command = [sys.executable, "-m", "satcli", "caption", str(folder / "{00000..00005}.tar"), "-o", out, "--model",
               str(checkpoint), "--batch-size", "1", "--max-length", str(MAX_LENGTH), *s3_server.cli_options]
    env = {**os.environ, "PYTHONPATH": str(REPO), "SATCLI_STATE_DIR": str(tmp_path / "state")}
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    pipe = os.open(folder / "00003.tar", os.O_RDWR)  # never blocks; the reader sees no end while it is open
    try:
        os.write(pipe, shards[3][: len(shards[3]) // 2])
        deadline = time.monotonic() + 120
        while len([p for p in s3_server.fs.ls(f"{bucket}/out", refresh=True, detail=False)
                   if p.endswith(".parquet")] if s3_server.fs.exists(f"{bucket}/out") else []) < 3:
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "shards 0-2 were not written"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        os.close(pipe)
        if process.poll() is None:
            process.kill()
            process.wait()
    before = read_folder(s3_server.fs, f"{bucket}/out")
    assert sorted(before) == ["00000.parquet", "00001.parquet", "00002.parquet"]
    etags = {p: s3_server.fs.info(p)["ETag"] for p in s3_server.fs.ls(f"{bucket}/out", detail=False)}
    (folder / "00003.tar").unlink()
    (folder / "00003.tar").write_bytes(shards[3])
    resumed = run(CaptionOptions(inputs=(str(folder / "{00000..00005}.tar"),), model=checkpoint, output=out,
                                 batch_size=1, max_length=MAX_LENGTH, progress=False,
                                 storage_options=s3_server.options))
    assert resumed.n_shards_resumed == 3 and resumed.n_processed == N_PICTURES // 2
    assert all(s3_server.fs.info(p)["ETag"] == tag for p, tag in etags.items())  # the finished ones untouched
    after = read_folder(s3_server.fs, f"{bucket}/out")
    keys = [row["key"] for rows in after.values() for row in rows]
    assert keys == sorted(pictures)  # every key exactly once
    for rows in after.values():
        for row in rows:
            assert_same(row, local_rows[row["key"]])


def test_skip_existing_leaves_out_keys_captioned_in_earlier_results(pictures, checkpoint, tmp_path):
    keys = sorted(pictures)
    first, recut = tmp_path / "first.tar", tmp_path / "recut.tar"
    first.write_bytes(tar_shard([(f"{k}.jpg", pictures[k]) for k in keys[:6]]))
    recut.write_bytes(tar_shard([(f"{k}.jpg", pictures[k]) for k in keys[3:]]))  # 3 keys again, 6 new
    options = dict(model=checkpoint, output=tmp_path / "out", batch_size=4, max_length=MAX_LENGTH, progress=False)
    run(CaptionOptions(inputs=(str(first),), **options))
    summary = run(CaptionOptions(inputs=(str(recut),), skip_existing=True, **options))
    assert summary.n_duplicates == 3
    assert [r["key"] for r in pq.read_table(tmp_path / "out" / "recut.parquet").to_pylist()] == keys[6:]


def test_a_corrupt_member_is_an_error_row_and_a_truncated_shard_keeps_its_rows(pictures, local_rows, checkpoint,
                                                                               tmp_path):
    keys = sorted(pictures)
    broken = pictures[keys[1]][: len(pictures[keys[1]]) // 2]  # a member whose JPEG stops halfway
    whole = tar_shard([(f"{keys[0]}.jpg", pictures[keys[0]]), (f"{keys[1]}.jpg", bytes(broken)),
                       (f"{keys[2]}.json", b"{}"), (f"{keys[3]}.jpg", pictures[keys[3]]),
                       (f"{keys[4]}.jpg", pictures[keys[4]])])
    with tarfile.open(fileobj=io.BytesIO(whole)) as archive:
        last = archive.getmembers()[-1]
    cut = last.offset_data + last.size // 2  # inside the last member's data
    (tmp_path / "s.tar").write_bytes(whole[:cut])
    result = runner.invoke(app, ["caption", str(tmp_path / "s.tar"), "-o", str(tmp_path / "out"), "--model",
                                 str(checkpoint), "--max-length", str(MAX_LENGTH)])
    assert result.exit_code == 0, result.output
    rows = pq.read_table(tmp_path / "out" / "s.parquet").to_pylist()
    assert [r["key"] for r in rows] == [keys[0], keys[1], keys[2], keys[3], keys[4], None]
    assert_same(rows[0], local_rows[keys[0]])
    assert_same(rows[3], local_rows[keys[3]])
    assert rows[1]["error"].startswith("truncated:") and rows[1]["path"].endswith(f"s.tar#{keys[1]}.jpg")
    assert rows[2]["error"].startswith("no-image:") and keys[2] in rows[2]["error"] and "s.tar" in rows[2]["error"]
    assert rows[4]["error"].startswith("truncated:") and f"member {keys[4]}.jpg of s.tar" in rows[4]["error"]
    assert rows[5]["error"].startswith(f"truncated-shard: s.tar stops at member {keys[4]}.jpg (byte {last.offset:,})")
    assert "after 4 complete samples" in rows[5]["error"]


def test_missing_bucket_and_unreachable_endpoint_are_one_line_errors(s3_server, checkpoint, tmp_path):
    args = ["--model", str(checkpoint), "-o", str(tmp_path / "out")]
    result = runner.invoke(app, ["caption", "s3://no-such-bucket/shards/{0..1}.tar", *args, *s3_server.cli_options])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "s3://no-such-bucket" in result.output and "bucket" in result.output
    result = runner.invoke(app, ["caption", "s3://no-such-bucket/photos/", *args, *s3_server.cli_options])
    assert result.exit_code == 1 and "no such" in result.output and result.output.count("\n") == 1
    (tmp_path / "a.tar").write_bytes(tar_shard([("k.jpg", b"")]))
    result = runner.invoke(app, ["caption", str(tmp_path / "a.tar"), "--model", str(checkpoint), "-o",
                                 "s3://no-such-bucket/out", *s3_server.cli_options])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "s3://no-such-bucket/out: no such bucket" in result.output
    from tests.s3 import free_port

    closed = f"http://127.0.0.1:{free_port()}"
    result = runner.invoke(app, ["caption", "s3://bucket/a.tar", *args, "--storage-option", f"endpoint_url={closed}",
                                 "--storage-option", "key=k", "--storage-option", "secret=s",
                                 "--storage-option", 'config_kwargs={"retries": {"max_attempts": 1}}'])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "s3://bucket/a.tar: cannot reach the endpoint" in result.output


def test_wrong_credentials_are_one_line_errors(tmp_path, checkpoint):
    """A second moto server that checks credentials (INITIAL_NO_AUTH_ACTION_COUNT=0): unknown keys are refused."""
    from tests.s3 import free_port

    pytest.importorskip("moto.server")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "moto's server did not start"
                time.sleep(0.1)
        result = runner.invoke(app, ["caption", "s3://bucket/shards/{0..1}.tar", "-o", str(tmp_path / "out"),
                                     "--model", str(checkpoint), "--storage-option", f"endpoint_url=http://127.0.0.1:{port}",
                                     "--storage-option", "key=wrong", "--storage-option", "secret=wrong"])
    finally:
        server.terminate()
        server.wait()
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert "s3://bucket/shards/0.tar: access denied: check the credentials" in result.output


def test_a_missing_extra_is_named_in_one_line(monkeypatch, checkpoint, tmp_path):
    monkeypatch.setitem(sys.modules, "fsspec", None)
    monkeypatch.setitem(sys.modules, "fsspec.core", None)
    result = runner.invoke(app, ["caption", "s3://bucket/photos/", "--model", str(checkpoint)])
    assert result.exit_code == 1 and "pip install 'satcli[cloud]'" in result.output
    monkeypatch.setitem(sys.modules, "braceexpand", None)
    result = runner.invoke(app, ["caption", str(tmp_path / "{0..3}.tar"), "--model", str(checkpoint)])
    assert result.exit_code == 1 and "braceexpand" in result.output and "satcli[cloud]" in result.output


def test_shards_need_an_output_folder_and_do_not_mix_with_images(pictures, tmp_path, checkpoint):
    (tmp_path / "a.tar").write_bytes(webdataset(pictures, 1)[0])
    (tmp_path / "a.jpg").write_bytes(pictures["000000"])
    result = runner.invoke(app, ["caption", str(tmp_path / "a.tar"), "--model", str(checkpoint)])
    assert result.exit_code == 1 and "-o names a folder" in result.output
    result = runner.invoke(app, ["caption", str(tmp_path / "a.tar"), str(tmp_path / "a.jpg"), "-o", "out",
                                 "--model", str(checkpoint)])
    assert result.exit_code == 1 and "mix image files with tar/Parquet shards" in result.output
    result = runner.invoke(app, ["caption", str(tmp_path / "{0..1}.tar"), "-o", "out", "--model", str(checkpoint)])
    assert result.exit_code == 1 and "0.tar: no such shard" in result.output
    result = runner.invoke(app, ["caption", str(tmp_path / "a.tar"), "-o", str(tmp_path / "out"), "--overlays",
                                 str(tmp_path / "pictures"), "--model", str(checkpoint)])
    assert result.exit_code == 1 and "--overlays draws over image files" in result.output


def test_exclude_and_the_count_of_files_skipped_by_extension(pictures, tmp_path):
    for name in ("a.jpg", "b.jpg", "raw/c.jpg", "d.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(pictures["000000"])
    for name in ("notes.txt", "more.txt", "data.csv", "Makefile"):
        (tmp_path / name).write_text("x")
    found = find_inputs([str(tmp_path)], tmp_path, exclude=("raw/*", "*.png"))
    assert [s.path for s in found.images] == ["a.jpg", "b.jpg"]
    assert found.skipped == {".txt": 2, ".csv": 1, "": 1} and found.n_excluded == 2
