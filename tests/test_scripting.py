"""Output people script: captions on stdout, --json lines, progress lines in logs, -q, -h, completion, --strict,
devices, and the one-call Python API (the README's snippet runs here as written)."""

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

import satcli
import satcli.cli
import satcli.cli.output
from satcli.cli import app
from satcli.core.console import LineProgress
from satcli.core.device import resolve_device
from satcli.core.errors import SatcliError
from satcli.formats.results import read_attention
from tests.helpers import picture_sensitive_checkpoint

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path, monkeypatch):
    monkeypatch.setenv("SATCLI_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("SATCLI_MODEL", raising=False)
    monkeypatch.delenv("SATCLI_PROGRESS_INTERVAL", raising=False)
    yield
    satcli.core.console.set_quiet(False)  # -q sets a process-wide flag; later tests expect the default


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return picture_sensitive_checkpoint(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Three pictures and one file that is no image."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for name in ("a.jpg", "b.png", "c.png"):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / name)
    (root / "broken.jpg").write_text("not a picture")
    return root


def _satcli(*args: str, cwd: Path, stderr=subprocess.PIPE, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO), "SATCLI_STATE_DIR": str(cwd / "state"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "satcli", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=stderr,
                          text=True, env=environment, timeout=300)


def _parquet_captions(path: Path) -> dict[str, str | None]:
    table = pq.read_table(path, columns=["path", "caption"])
    return dict(zip(table["path"].to_pylist(), table["caption"].to_pylist(), strict=True))


# ---------------------------------------------------------------------------------------------------------------
# stdout / stderr as a shell sees them
# ---------------------------------------------------------------------------------------------------------------


def test_one_image_piped_prints_its_caption_and_progress_goes_to_the_log(model_path, photos, tmp_path):
    shutil.copy(photos / "a.jpg", tmp_path / "one.jpg")
    with open(tmp_path / "log", "w") as log:  # `satcli caption one.jpg --model M 2> log | cat`
        done = _satcli("caption", "one.jpg", "--model", str(model_path), "--workers", "0", cwd=tmp_path,
                       stderr=log)
    assert done.returncode == 0
    caption = _parquet_captions(tmp_path / "captions.parquet")["one.jpg"]
    assert caption and done.stdout == caption + "\n"  # the caption alone: no table, no progress on stdout
    log_text = (tmp_path / "log").read_text()
    assert re.search(r"captioning: 1/1 images \(100%\), [\d.,]+ images/s", log_text), log_text
    assert "captioned" in log_text  # the summary table went to stderr


def test_json_lines_on_stdout_one_per_image(model_path, photos, tmp_path):
    done = _satcli("caption", str(photos), "--model", str(model_path), "--workers", "0", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]  # every stdout line is JSON (`| jq` works)
    expected = _parquet_captions(tmp_path / "captions.parquet")
    assert {r["path"]: r["caption"] for r in records} == expected and len(records) == 4
    broken = next(r for r in records if r["path"].endswith("broken.jpg"))
    assert broken["caption"] is None and broken["error"].startswith("not-an-image")
    good = next(r for r in records if r["error"] is None)
    table = pq.read_table(tmp_path / "captions.parquet")
    row = table["path"].to_pylist().index(good["path"])
    assert good["words"] == table["tokens"][row].as_py()
    assert good["word_probs"] == pytest.approx(np.exp(table["token_logprobs"][row].as_py()), rel=1e-6)


def test_a_few_images_give_path_caption_lines_many_give_the_summary_alone(model_path, photos, tmp_path,
                                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["caption", str(photos), "--model", str(model_path), "--workers", "0"])
    assert result.exit_code == 0, result.output
    expected = _parquet_captions(tmp_path / "captions.parquet")
    lines = result.stdout.splitlines()
    assert sorted(lines) == sorted(f"{p} → {c}" for p, c in expected.items() if c is not None)
    assert "broken.jpg: not-an-image" in result.stderr and "captioned" in result.stderr

    monkeypatch.setattr(satcli.cli.output, "FEW_IMAGES", 2)
    result = runner.invoke(app, ["caption", str(photos), "--model", str(model_path), "--workers", "0"])
    assert result.exit_code == 0 and result.stdout == "" and "captioned" in result.stderr


def test_strict_exits_non_zero_when_images_failed(model_path, photos, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["caption", str(photos), "--model", str(model_path), "--workers", "0"]
    assert runner.invoke(app, args).exit_code == 0
    result = runner.invoke(app, [*args, "--strict"])
    assert result.exit_code == satcli.cli.EXIT_FAILED_IMAGES == 3
    assert "1 of 4 images could not be captioned" in result.stderr
    result = runner.invoke(app, ["caption", str(photos / "a.jpg"), "--model", str(model_path), "--strict",
                                 "-o", "good.parquet", "--workers", "0"])
    assert result.exit_code == 0


def test_quiet_keeps_results_and_drops_the_rest(model_path, photos, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for args in (["-q", "caption", str(photos / "a.jpg")], ["caption", str(photos / "a.jpg"), "--quiet"]):
        result = runner.invoke(app, [*args, "--model", str(model_path), "--workers", "0", "--overwrite"])
        assert result.exit_code == 0, result.output
        assert result.stdout.strip() == _parquet_captions(tmp_path / "captions.parquet")[str(photos / "a.jpg")]
        assert result.stderr == ""
        satcli.core.console.set_quiet(False)


@pytest.mark.parametrize("command", ["caption", "train", "evaluate", "preprocess", "report", "merge", "demo",
                                     "encoders"])
def test_dash_h_is_help(command):
    result = runner.invoke(app, [command, "-h"])
    assert result.exit_code == 0 and "Usage" in result.output
    assert runner.invoke(app, ["-h"]).exit_code == 0


def test_shell_completion_script_and_completions(monkeypatch):
    monkeypatch.setattr("typer.completion._get_shell_name", lambda: "bash")  # as if run from bash (CI runs none)
    result = runner.invoke(app, ["--show-completion"])
    assert result.exit_code == 0 and "complete" in result.output and "_SATCLI_COMPLETE" in result.output
    env = {**os.environ, "PYTHONPATH": str(REPO), "_SATCLI_COMPLETE": "complete_bash", "COMP_WORDS": "satcli ca",
           "COMP_CWORD": "1"}
    done = subprocess.run([sys.executable, "-c", "from satcli.cli import app; app(prog_name='satcli')"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert "caption" in done.stdout.split()


def test_evaluate_and_train_json_go_to_stdout(monkeypatch, tmp_path):
    import satcli.commands.evaluate
    import satcli.commands.train
    from satcli.scoring.evaluate import BeamResult, EvaluateResult
    from satcli.training import TrainResult

    report = tmp_path / "report.json"
    report.write_text(json.dumps({"beams": {"3": {"bleu4": 0.25}}, "split": "test"}))
    monkeypatch.setattr(satcli.commands.evaluate, "run", lambda options: EvaluateResult(
        report, [BeamResult(3, {"bleu1": 0.5, "bleu4": 0.25}, predictions=tmp_path / "p.parquet")], 12))
    result = runner.invoke(app, ["evaluate", "--dataset", "shapes", "--model", "m.pt", "--bleu", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == json.loads(report.read_text())  # only the JSON: the table is on stderr
    assert "report:" in result.stderr

    history = [{"epoch": 1, "loss": 2.5, "val_bleu4": 0.1}]
    monkeypatch.setattr(satcli.commands.train, "run", lambda options: TrainResult(
        tmp_path, tmp_path / "best.pt", tmp_path / "last.pt", 1, 0.1, history))
    result = runner.invoke(app, ["train", "--dataset", "shapes", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"out": str(tmp_path), "best": str(tmp_path / "best.pt"),
                                         "last": str(tmp_path / "last.pt"), "epochs": 1, "best_val_bleu4": 0.1,
                                         "history": history}


# ---------------------------------------------------------------------------------------------------------------
# Progress lines when stderr is a file
# ---------------------------------------------------------------------------------------------------------------


def test_progress_lines_carry_count_rate_and_eta_when_not_a_terminal(monkeypatch):
    clock = iter([0.0, 10.0, 20.0, 30.0, 40.0])  # add_task, then one tick per advance
    monkeypatch.setattr("satcli.core.console.time.monotonic", lambda: next(clock))
    stream = io.StringIO()
    progress = LineProgress(console=Console(file=stream, width=200), interval=15.0)
    with progress:
        task = progress.add_task("captioning", total=100, completed=20, unit="images")  # 20 done before: resumed
        progress.advance(task, 10)  # t=10: within the interval, no line
        progress.advance(task, 10)  # t=20: 20 images in 20 s → 1.0 images/s, 60 left → 1 minute
        progress.advance(task, 60)  # t=30: done
    lines = stream.getvalue().splitlines()
    assert lines == ["captioning: 40/100 images (40%), 1.0 images/s, ETA 0:01:00",
                     "captioning: 100/100 images (100%), 2.7 images/s, done in 0:00:30"]


# ---------------------------------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------------------------------


def test_devices_that_are_not_there_fail_clearly(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SatcliError, match="--device cuda:1 was asked for, but no CUDA GPU"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(SatcliError, match=r"cuda:2 names a GPU that is not there: this machine has 2 \(cuda:0 to"):
        resolve_device("cuda:2")
    monkeypatch.setattr("satcli.core.device._mps_available", lambda: False)
    with pytest.raises(SatcliError, match="Metal \\(MPS\\) backend is not available"):
        resolve_device("mps")
    monkeypatch.setattr("satcli.core.device._mps_available", lambda: True)
    assert resolve_device("mps") == torch.device("mps")
    with pytest.raises(SatcliError, match="unknown device 'gpu'; use auto, cpu, cuda, cuda:N or mps"):
        resolve_device("gpu")


def test_the_cli_passes_cuda_n_and_mps_through(monkeypatch, tmp_path):
    import satcli.commands.caption

    seen = []
    monkeypatch.setattr(satcli.commands.caption, "run", lambda options: seen.append(options) or
                        satcli.commands.caption.CaptionSummary(options.output, 0))
    for device in ("cuda:1", "mps"):
        assert runner.invoke(app, ["caption", "x.jpg", "--device", device]).exit_code == 0
    assert [o.device for o in seen] == ["cuda:1", "mps"]


@pytest.mark.cuda
def test_cuda_n_runs_on_that_gpu(model_path, photos):
    index = torch.cuda.device_count() - 1
    captioner = satcli.load(model_path, device=f"cuda:{index}")
    assert next(captioner.model.parameters()).device == torch.device("cuda", index)
    assert captioner.caption([photos / "a.jpg"])[0]["caption"]


# ---------------------------------------------------------------------------------------------------------------
# Python
# ---------------------------------------------------------------------------------------------------------------


def test_load_caption_matches_the_cli_results(model_path, photos, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = [str(photos / n) for n in ("a.jpg", "broken.jpg", "c.png")]
    results = satcli.load(model_path, device="cpu").caption(paths, beam_size=3)
    assert [r["path"] for r in results] == paths  # the order given
    assert runner.invoke(app, ["caption", *paths, "--model", str(model_path), "--workers", "0"]).exit_code == 0
    table = pq.read_table(tmp_path / "captions.parquet")
    for result in results:
        row = table["path"].to_pylist().index(result["path"])
        assert result["caption"] == table["caption"][row].as_py()
        assert result["error"] == table["error"][row].as_py()
        if result["error"] is None:
            assert result["words"] == result["caption"].split()
            assert result["attention"].shape == (len(result["words"]), 2, 2)  # 64 px → a 2×2 grid
            np.testing.assert_allclose(result["attention"], read_attention(table, row), atol=1e-6)
            assert np.prod(result["word_probs"]) == pytest.approx(np.exp(table["token_logprobs"][row].as_py()).prod(),
                                                                  rel=1e-5)
        else:
            assert result["caption"] is None and result["attention"] is None
    with pytest.raises(SatcliError, match="beam_size"):
        satcli.load(model_path).caption(paths, beam_size=0)


def test_python_one_liner(model_path, photos):
    code = f"import satcli; print(satcli.load({str(model_path)!r}).caption([{str(photos / 'a.jpg')!r}])[0]['caption'])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == satcli.load(model_path).caption([photos / "a.jpg"])[0]["caption"]


def test_readme_python_snippet_runs_as_written(model_path, photos, tmp_path, monkeypatch, capsys):
    readme = (REPO / "README.md").read_text()
    snippet = next(block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "satcli.load" in block)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "shapes-demo").mkdir(parents=True)
    shutil.copy(model_path, tmp_path / "runs" / "shapes-demo" / "best.pt")
    for name in re.findall(r'"([\w-]+\.(?:jpg|png))"', snippet):
        shutil.copy(photos / "a.jpg", tmp_path / name)
    exec(compile(snippet, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert printed and "(" in printed  # the snippet prints each path, caption and attention shape
