"""satcli on Ray Data and Spark, real ones: a local Ray cluster (``ray.init(num_cpus=2)``), Spark ``local[2,2]``
and WebDataset shards on the S3 server on 127.0.0.1 give the rows ``satcli caption`` gives; a killed actor or
task is retried by the engine and every key is written once; a rerun redoes only unfinished shards; the
recipes of docs/scale.md run as written. ``make test-engines`` runs them (``-m engines``)."""

import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from satcli.captioning.options import CaptionOptions
from satcli.captioning.sources import Shard
from satcli.cli import app
from satcli.commands.caption import run as caption
from satcli.core.errors import SatcliError
from satcli.engines import require
from satcli.engines.ray import SatcliCaptioner
from tests import engine_faults
from tests.helpers import picture_sensitive_checkpoint

REPO = Path(__file__).resolve().parents[1]
SCALE = (REPO / "docs" / "scale.md").read_text()
N_SHARDS, PER_SHARD = 3, 4
SHARDS = "{00000..00002}.tar"
BROKEN_KEY = "000020002"  # its .jpg member is not an image
# Every column a user reads; ``path`` is left out where the engine names samples its own way.
COMPARED = ("key", "shard", "caption", "tokens", "sum_logprob", "token_logprobs", "attention", "grid_height",
            "grid_width", "image_width", "image_height", "error")
runner = CliRunner()


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path, monkeypatch):
    monkeypatch.setenv("SATCLI_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("SATCLI_MODEL", raising=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return picture_sensitive_checkpoint(tmp_path_factory.mktemp("model"))


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def tar_shards(tmp_path_factory) -> Path:
    """Three WebDataset shards of four samples (a .jpg and a .json each); one sample's .jpg is no image."""
    folder = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    for s in range(N_SHARDS):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(PER_SHARD):
                key = f"{s:05d}{i:04d}"
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
                _member(tar, f"{key}.jpg", b"not a jpeg" if key == BROKEN_KEY else buffer.getvalue())
                _member(tar, f"{key}.json", json.dumps({"url": f"http://example.com/{key}.jpg"}).encode())
    return folder


@pytest.fixture(scope="module")
def s3_shards(s3_server, tar_shards) -> str:
    """The shards in a bucket of the local S3 server: their brace pattern."""
    bucket = s3_server.bucket("engines")
    for shard in sorted(tar_shards.glob("*.tar")):
        s3_server.put(f"{bucket}/shards/{shard.name}", shard.read_bytes())
    return f"s3://{bucket}/shards/{SHARDS}"


def _options(inputs: str, output, model: Path, storage: dict | None = None, **overrides) -> CaptionOptions:
    return CaptionOptions(inputs=(inputs,), model=model, output=output, storage_options=dict(storage or {}),
                          batch_size=3, progress=False, **overrides)


@pytest.fixture(scope="module")
def reference(s3_server, s3_shards, checkpoint, tmp_path_factory) -> dict[str, pa.Table]:
    """``satcli caption`` itself (no engine) over the S3 shards: shard → its results table. With one torch thread,
    as each engine actor runs: float32 sums on several threads round in their own order, and the rows must be
    identical."""
    import torch

    folder = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        caption(_options(s3_shards, str(folder), checkpoint, s3_server.options))
    finally:
        torch.set_num_threads(threads)
    return {path.name: pq.read_table(path) for path in sorted(folder.glob("*.parquet"))}


def _by_key(table: pa.Table, columns=COMPARED) -> dict[str, dict]:
    rows = table.select(list(columns)).to_pylist()
    keys = [row["key"] for row in rows]
    assert len(keys) == len(set(keys)), "a key appears twice"
    return {row["key"]: row for row in rows}


def _all_reference_rows(reference, columns=COMPARED) -> dict[str, dict]:
    return _by_key(pa.concat_tables(reference.values()), columns)


def _close(a: dict, b: dict) -> None:
    """Two rows of the same image: the same words exactly, the numbers to float32 rounding (another batch cut)."""
    assert a["caption"] == b["caption"] and a["tokens"] == b["tokens"] and a["error"] == b["error"]
    if a["error"] is None:
        assert np.allclose(np.asarray(a["attention"], np.float32), np.asarray(b["attention"], np.float32), atol=1e-4)
        assert a["sum_logprob"] == pytest.approx(b["sum_logprob"], rel=1e-5, abs=1e-4)  # threads sum in their own order


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A local Ray cluster of 2 CPUs; its workers import this checkout and see ``$SATCLI_TEST_FAULTS``."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    faults = tmp_path_factory.mktemp("ray-faults")
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "SATCLI_TEST_FAULTS")}
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), saved["PYTHONPATH"]) if p)
    os.environ["SATCLI_TEST_FAULTS"] = str(faults)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield faults
    finally:
        ray.shutdown()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


# ---------------------------------------------------------------------------------------------------------------
# The callable class on its own (no cluster): every batch format, same rows, same order, bad pictures as rows
# ---------------------------------------------------------------------------------------------------------------


def _samples(tar_shards: Path) -> list:
    return [s for shard in sorted(tar_shards.glob("*.tar")) for s in Shard(str(shard), "tar").samples()]


def test_the_ray_captioner_takes_numpy_pandas_and_pyarrow_batches_and_keeps_rows_and_order(checkpoint, tar_shards,
                                                                                           reference):
    samples = _samples(tar_shards)[::-1]  # an order of our own: it must come back as given
    keys = [s.key for s in samples]
    jpgs = [s.data if s.data is not None else b"not a jpeg" for s in samples]
    captioner = SatcliCaptioner(checkpoint, batch_size=3)
    batches = {"numpy": {"key": np.array(keys, dtype=object), "jpg": np.array(jpgs, dtype=object)},
               "pandas": __import__("pandas").DataFrame({"key": keys, "jpg": jpgs}),
               "pyarrow": pa.table({"key": keys, "jpg": pa.array(jpgs, pa.binary())})}
    expected = _all_reference_rows(reference)
    for form, batch in batches.items():
        table = captioner(batch)
        assert table.schema.names[:3] == ["path", "caption", "tokens"], form
        assert table.column("key").to_pylist() == keys, form
        for row in table.select(list(COMPARED)).to_pylist():
            if row["key"] == BROKEN_KEY:
                assert row["error"].startswith("not-an-image") and row["caption"] is None, form
            else:
                _close(row, expected[row["key"]])


def test_a_missing_engine_is_one_line_naming_the_extra(monkeypatch, tmp_path, checkpoint, tar_shards):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "pyspark", None)
    with pytest.raises(SatcliError, match=r"pip install 'satcli\[ray\]'"):
        require("ray.data")
    with pytest.raises(SatcliError, match=r"pip install 'satcli\[spark\]'"):
        require("pyspark.sql")
    result = runner.invoke(app, ["caption", str(tar_shards / "00000.tar"), "-o", str(tmp_path / "out"),
                                 "--model", str(checkpoint), "--engine", "ray"])
    assert result.exit_code == 1
    assert "satcli[ray]" in result.output and "Traceback" not in result.output


# ---------------------------------------------------------------------------------------------------------------
# Ray
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.engines
def test_satcli_caption_engine_ray_over_s3_shards_writes_the_rows_of_satcli_caption(ray_cluster, s3_server,
                                                                                    s3_shards, checkpoint, reference):
    output = f"s3://{s3_server.bucket('ray-out')}/captions"
    result = runner.invoke(app, ["caption", s3_shards, "-o", output, "--model", str(checkpoint), "--batch-size", "3",
                                 "--engine", "ray", "--actors", "2", *s3_server.cli_options])
    assert result.exit_code == 0, result.output
    for name, expected in reference.items():
        with s3_server.fs.open(f"{output}/{name}", "rb") as file:
            written = pq.read_table(file)
        assert written.select(["path", *COMPARED]).to_pylist() == expected.select(["path", *COMPARED]).to_pylist()
    assert sorted(reference) == [f"{i:05d}.parquet" for i in range(N_SHARDS)]


@pytest.mark.engines
def test_a_ray_actor_killed_mid_shard_is_retried_and_every_key_is_written_once(ray_cluster, tar_shards, checkpoint,
                                                                               reference, tmp_path):
    from satcli.engines.ray_job import caption_with_ray

    summary = caption_with_ray(_options(str(tar_shards / SHARDS), str(tmp_path / "out"), checkpoint, actors=2),
                               captioner=engine_faults.DyingShardCaptioner)
    assert (ray_cluster / f"killed-shard-{engine_faults.VICTIM_SHARD}").exists()  # it did die once
    written = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "out").glob("*.parquet"))])
    assert summary.n_processed == written.num_rows == N_SHARDS * PER_SHARD
    assert _by_key(written) == _all_reference_rows(reference)  # every key once, each with satcli caption's row


@pytest.mark.engines
def test_a_rerun_after_a_stopped_ray_run_redoes_only_the_unfinished_shards(ray_cluster, tar_shards, checkpoint,
                                                                           reference, tmp_path):
    import ray

    from satcli.engines.ray_job import caption_with_ray

    output = tmp_path / "out"
    # The stopped run is a job of its own (a driver that ends, as a killed `ray job` does): Ray frees its actors.
    first = subprocess.run([sys.executable, "-m", "tests.engine_faults", str(tar_shards / SHARDS), str(checkpoint),
                            str(output)], cwd=REPO, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address})
    assert first.returncode == 1 and "injected failure" in first.stdout, first.stderr[-3000:]
    assert "run the same command again" in first.stdout
    options = _options(str(tar_shards / SHARDS), str(output), checkpoint, actors=2)
    finished = {p.name: p.stat().st_ino for p in output.glob("*.parquet")}
    assert sorted(finished) == ["00000.parquet", "00001.parquet"]
    summary = caption_with_ray(options)
    assert summary.n_shards_resumed == len(finished)
    assert summary.n_processed == (N_SHARDS - len(finished)) * PER_SHARD  # only the unfinished shards again
    assert {p.name: p.stat().st_ino for p in output.glob("*.parquet") if p.name in finished} == finished
    written = pa.concat_tables([pq.read_table(p) for p in sorted(output.glob("*.parquet"))])
    assert _by_key(written) == _all_reference_rows(reference)


@pytest.mark.engines
def test_a_mistake_found_inside_a_ray_actor_is_one_line_not_a_traceback(ray_cluster, checkpoint, tmp_path):
    pq.write_table(pa.table({"key": ["a"], "width": [3]}), tmp_path / "00000.parquet")  # no image column
    result = runner.invoke(app, ["caption", str(tmp_path / "00000.parquet"), "-o", str(tmp_path / "out"),
                                 "--model", str(checkpoint), "--engine", "ray"])
    assert result.exit_code == 1
    assert "has no image column" in result.output and "Traceback" not in result.output


@pytest.mark.engines
def test_a_ray_actor_killed_mid_batch_is_retried_by_ray_data_and_every_key_comes_back_once(ray_cluster, tar_shards,
                                                                                           checkpoint, reference):
    import ray

    items = [{"key": s.key, "jpg": s.data or b"", "shard": s.shard} for s in _samples(tar_shards)]
    dataset = ray.data.from_items(items, override_num_blocks=4).map_batches(
        engine_faults.DyingCaptioner, fn_constructor_kwargs={"model": str(checkpoint), "batch_size": 3},
        batch_size=3, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=2), num_cpus=1)
    rows = dataset.take_all()
    assert (ray_cluster / f"killed-batch-{engine_faults.VICTIM_KEY}").exists()
    assert sorted(r["key"] for r in rows) == sorted(i["key"] for i in items)  # none missing, none twice
    expected = _all_reference_rows(reference)
    for row in rows:
        if row["key"] == BROKEN_KEY:
            assert row["error"].startswith(("not-an-image", "no-image"))
        else:
            _close(row, expected[row["key"]])


def _code_block(heading: str, language: str) -> str:
    section = SCALE.split(f"## {heading}", 1)[1]
    return re.search(rf"```{language}\n(.*?)```", section, re.S).group(1)


@pytest.mark.engines
def test_the_ray_job_script_of_the_docs_runs_and_gives_satcli_captions(ray_cluster, s3_server, s3_shards, checkpoint,
                                                                       reference, tmp_path):
    import ray

    script = tmp_path / "caption_job.py"
    script.write_text(_code_block("A Ray job script", "python"))
    bucket = s3_shards.split("/")[2]
    env = {**os.environ, "SHARDS": f"{bucket}/shards/", "OUTPUT": f"{bucket}/job-captions/", "MODEL": str(checkpoint),
           "S3_ENDPOINT": s3_server.endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "RAY_ADDRESS": ray.get_runtime_context().gcs_address}  # joins the test's cluster, as under ray job submit
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    files = s3_server.fs.glob(f"{bucket}/job-captions/*.parquet")
    written = pa.concat_tables([pq.read_table(s3_server.fs.open(f, "rb")) for f in files])
    expected = _all_reference_rows(reference)
    rows = _by_key(written)
    assert sorted(rows) == sorted(expected)
    for key, row in rows.items():
        if key == BROKEN_KEY:
            assert row["error"].startswith("not-an-image")
        else:
            _close(row, expected[key])


# ---------------------------------------------------------------------------------------------------------------
# Spark
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spark(tmp_path_factory):
    """Spark ``local[2,2]``: two cores, and a task may fail once and be retried."""
    sql = pytest.importorskip("pyspark.sql")
    faults = tmp_path_factory.mktemp("spark-faults")
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "SATCLI_TEST_FAULTS", "PYSPARK_PYTHON")}
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), saved["PYTHONPATH"]) if p)
    os.environ["SATCLI_TEST_FAULTS"] = str(faults)
    os.environ["PYSPARK_PYTHON"] = sys.executable
    session = (sql.SparkSession.builder.master("local[2,2]").appName("satcli-tests")
               .config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", "2").getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    try:
        yield session, faults
    finally:
        session.stop()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _s3_frame(session, s3_server, s3_shards):
    """The S3 shards' samples as a DataFrame (key, shard, jpg), read through satcli's own WebDataset source."""
    from satcli.captioning.sources import find_inputs

    found = find_inputs([s3_shards], storage_options=s3_server.options)
    rows = [(s.key, s.shard, s.data) for shard in found.shards for s in shard.samples()]
    return session.createDataFrame(rows, "key string, shard string, jpg binary").repartition(3)


@pytest.mark.engines
def test_spark_map_in_arrow_over_s3_shards_gives_the_rows_of_satcli_caption(spark, s3_server, s3_shards, checkpoint,
                                                                            reference):
    from satcli.engines.spark import caption_arrow, results_schema

    session, _ = spark
    frame = _s3_frame(session, s3_server, s3_shards)
    rows = frame.mapInArrow(caption_arrow(str(checkpoint), batch_size=3), results_schema()).collect()
    expected = _all_reference_rows(reference)
    got = {r["key"]: r.asDict() for r in rows}
    assert len(rows) == len(got) == len(expected)
    for key, row in got.items():
        if key == BROKEN_KEY:
            assert row["error"].startswith("not-an-image")
        else:
            _close(row, expected[key])


@pytest.mark.engines
def test_a_spark_task_killed_mid_batch_is_retried_and_every_key_comes_back_once(spark, tar_shards, checkpoint,
                                                                               reference):
    from satcli.engines.spark import results_schema

    session, faults = spark
    rows = [(s.key, s.shard, s.data or b"") for s in _samples(tar_shards)]
    frame = session.createDataFrame(rows, "key string, shard string, jpg binary").repartition(3)
    out = frame.mapInArrow(engine_faults.dying_caption_arrow(str(checkpoint), batch_size=3), results_schema())
    keys = [r["key"] for r in out.select("key").collect()]
    assert (faults / f"killed-task-{engine_faults.VICTIM_KEY}").exists()
    assert sorted(keys) == sorted(r[0] for r in rows)  # none missing, none twice


@pytest.mark.engines
def test_the_spark_snippet_of_the_docs_runs_and_its_udf_agrees(spark, tar_shards, checkpoint, reference, tmp_path):
    from satcli.engines.spark import caption_udf

    session, _ = spark
    images = tmp_path / "images.parquet"  # img2dataset's layout: key, jpg, caption
    samples = _samples(tar_shards)
    pq.write_table(pa.table({"key": [s.key for s in samples], "jpg": [s.data or b"" for s in samples],
                             "caption": ["alt text"] * len(samples)}), images)
    captions = tmp_path / "captions"
    exec(_code_block("A Spark snippet", "python"), {"spark": session, "IMAGES": str(images),  # noqa: S102
                                                    "MODEL": str(checkpoint), "CAPTIONS": str(captions)})
    written = _by_key(pq.read_table(captions, columns=list(COMPARED)))
    expected = _all_reference_rows(reference)
    assert sorted(written) == sorted(expected)
    udf = caption_udf(str(checkpoint), batch_size=3)
    frame = session.read.parquet(str(images)).withColumn("satcli", udf("jpg")).select("key", "satcli.*")
    for row in frame.collect():
        if row["key"] == BROKEN_KEY:
            assert row["error"].startswith("not-an-image") and row["caption"] is None
        else:
            _close(written[row["key"]], expected[row["key"]])
            assert row["caption"] == expected[row["key"]]["caption"]


# ---------------------------------------------------------------------------------------------------------------
# A Slurm array over --shard K/N (no Slurm here: the script's body, once per array task)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.engines
def test_the_slurm_array_of_the_docs_captions_every_shard_once(tar_shards, checkpoint, reference, tmp_path):
    script = tmp_path / "caption.sbatch"
    script.write_text(_code_block("A Slurm array over `--shard K/N`", "bash"))
    output = tmp_path / "captions"
    bin_dir = str(Path(sys.executable).parent)
    for task in range(2):
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SHARDS": str(tar_shards / SHARDS),
               "OUTPUT": str(output), "MODEL": str(checkpoint), "SLURM_ARRAY_TASK_ID": str(task),
               "SLURM_ARRAY_TASK_COUNT": "2", "PYTHONPATH": os.pathsep.join(
                   p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
        done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in output.glob("*.parquet")) == sorted(reference)
    written = pa.concat_tables([pq.read_table(p) for p in sorted(output.glob("*.parquet"))])
    # batches of 32 here against 3 in the reference: the same words, the numbers to float32 rounding
    expected = _all_reference_rows(reference)
    for key, row in _by_key(written).items():
        _close(row, expected[key])
    assert sorted(_by_key(written)) == sorted(expected)
