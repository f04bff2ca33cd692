import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from models.decoding import decode
from satcli.commands.preprocess import run as preprocess
from satcli.core.errors import SatcliError
from satcli.data.preprocess import PreprocessOptions
from satcli.data.store import DatasetKind, StoredDataset
from satcli.formats.checkpoint import load_captioner, read_checkpoint
from satcli.training import TrainOptions
from satcli.training import train as run
from satcli.training.batches import FLIP_PAIRS, batch_plan, flip_table

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(image_size=64, embed_dim=16, attention_dim=16, decoder_dim=24, dropout=0.0, batch_size=16,
            decoder_lr=3e-3, val_max_length=12)


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    preprocess(PreprocessOptions(dataset=DatasetKind.shapes, data_root=root, n_train=120, n_val=12, n_test=12,
                                 image_size=64, min_word_freq=1))
    return root


def _options(root: Path, out: Path, **overrides) -> TrainOptions:
    return TrainOptions(dataset="shapes", data_root=root, out=out, **{**TINY, **overrides})


def _train_cli(root: Path, out: Path, epochs: int, *extra: str) -> list[str]:
    return ["train", "--dataset", "shapes", "--data-root", str(root), "--out", str(out), "--epochs", str(epochs),
            "--image-size", "64", "--embed-dim", "16", "--attention-dim", "16", "--decoder-dim", "24",
            "--dropout", "0", "--batch-size", "16", "--decoder-lr", "3e-3", *extra]


def test_training_writes_loadable_checkpoints_and_metrics(shapes_root, tmp_path, monkeypatch):
    monkeypatch.setenv("SATCLI_STATE_DIR", str(tmp_path / "state"))
    result = run(_options(shapes_root, tmp_path / "run", epochs=2))
    assert result.epochs == 2
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]
    assert all(0.0 <= line["val_bleu4"] <= 1.0 and line["samples_per_s"] > 0 for line in lines)
    assert lines[1]["loss"] < lines[0]["loss"]
    loaded = load_captioner(result.best)
    assert loaded.metrics["val_bleu4"] == result.best_bleu4
    features = torch.randn(2, *loaded.model.grid_shape, loaded.model.encoder.spec.dim).flatten(1, 2)
    assert len(decode(loaded.model, features, beam_size=2, max_length=5)) == 2
    # the feature cache was written once and is reused
    cache = list((shapes_root / "shapes" / "features").glob("*/train.npy"))
    assert len(cache) == 1


def test_a_second_run_into_the_same_folder_is_refused_without_resume_or_overwrite(shapes_root, tmp_path):
    run(_options(shapes_root, tmp_path / "run", epochs=1))
    with pytest.raises(SatcliError, match="already holds a training run"):
        run(_options(shapes_root, tmp_path / "run", epochs=1))
    with pytest.raises(SatcliError, match="nothing to resume"):
        run(_options(shapes_root, tmp_path / "other", epochs=1, resume=True))


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(shapes_root, tmp_path):
    env = {**os.environ, "SATCLI_STATE_DIR": str(tmp_path / "state"), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "satcli", *_train_cli(shapes_root, tmp_path / "killed", 3, "--batch-size", "4")]
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "killed" / "last.pt"
    deadline = time.time() + 240
    while not last.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert last.exists(), "the first epoch never finished"
    time.sleep(0.5)  # well inside epoch 2
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert read_checkpoint(last)["train_state"]["epoch"] == 0  # killed before epoch 2 was saved
    resumed = subprocess.run([sys.executable, "-m", "satcli", *_train_cli(shapes_root, tmp_path / "killed", 3,
                                                                       "--batch-size", "4", "--resume")],
                             env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    straight = run(_options(shapes_root, tmp_path / "straight", epochs=3, batch_size=4))
    killed_state = read_checkpoint(last)
    assert killed_state["train_state"]["epoch"] == 2
    history = killed_state["train_state"]["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert [round(h["loss"], 5) for h in history] == [round(h["loss"], 5) for h in straight.history]
    straight_state = read_checkpoint(straight.last)["state_dict"]
    for key, value in straight_state.items():
        assert torch.allclose(value.float(), killed_state["state_dict"][key].float(), atol=1e-6), key


def test_ddp_two_cpu_processes_train_the_same_checkpoint_format(shapes_root, tmp_path):
    env = {**os.environ, "SATCLI_STATE_DIR": str(tmp_path / "state"), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "satcli", *_train_cli(shapes_root, out, 1, "--device", "cpu")]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    single = run(_options(shapes_root, tmp_path / "single", epochs=1))
    ddp_state = read_checkpoint(out / "last.pt")
    assert ddp_state["train_state"]["history"][0]["ranks"] == 2
    # the same global batches and a loss normalised by the global batch: the one-process run's numbers
    assert ddp_state["train_state"]["history"][0]["loss"] == pytest.approx(single.history[0]["loss"], rel=1e-3)
    loaded = load_captioner(out / "best.pt")
    features = torch.randn(1, 4, loaded.model.encoder.spec.dim)
    assert decode(loaded.model, features, beam_size=2, max_length=5)[0].tokens is not None
    assert not any(k.startswith("module.") for k in ddp_state["state_dict"])


def test_batch_plan_buckets_by_length_and_depends_only_on_seed_and_epoch():
    lengths = torch.randint(3, 30, (1000,))
    plan = batch_plan(lengths, 32, seed=1, epoch=4)
    assert sorted(torch.cat(plan).tolist()) == list(range(1000))
    assert all((a == b).all() for a, b in zip(plan, batch_plan(lengths, 32, seed=1, epoch=4), strict=True))
    assert not all((a == b).all() for a, b in zip(plan, batch_plan(lengths, 32, seed=1, epoch=5), strict=True))
    padded = sum(int(lengths[b].max()) * len(b) for b in plan)
    assert padded < 1.1 * int(lengths.sum())  # bucketing leaves under 10% padding
    random_padded = sum(int(lengths[b].max()) * len(b) for b in torch.randperm(1000).split(32))
    assert random_padded > 1.5 * int(lengths.sum())


def test_flip_augmentation_swaps_left_and_right(shapes_root):
    vocab = StoredDataset.open(shapes_root, "shapes").vocab
    table = flip_table(vocab)
    pairs = [(a, b) for a, b in FLIP_PAIRS if a in vocab and b in vocab]
    assert pairs, "shapes captions use left and right"
    for a, b in pairs:
        assert table[vocab.id(a)] == vocab.id(b) and table[vocab.id(b)] == vocab.id(a)
    others = [i for i, w in enumerate(vocab.words) if w not in {x for p in pairs for x in p}]
    assert all(table[i] == i for i in others)


def test_fine_tuning_the_encoder_trains_it(shapes_root, tmp_path):
    options = _options(shapes_root, tmp_path / "ft", epochs=1, fine_tune_encoder=True, fine_tune_blocks=1,
                       encoder_lr=1e-2)
    before = {k: v.clone() for k, v in
              __import__("models.captioner", fromlist=["Captioner"]).Captioner(
                  options.model_config(len(StoredDataset.open(shapes_root, "shapes").vocab)),
                  pretrained_encoder=True).encoder.state_dict().items()}
    result = run(options)
    after = read_checkpoint(result.last)["state_dict"]
    changed = [k for k, v in before.items() if not torch.equal(v, after["encoder." + k])]
    # the default efficientnet-lite0-stage6 ends with block 14 (the B0 table: 1 + 2 + 2 + 3 + 3 + 4 blocks)
    assert changed and all(".net._blocks.14." in k for k in changed)


def test_hard_attention_trains_from_the_cli(shapes_root, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import satcli.training.supervised as training
    from satcli.cli import app

    # The baseline moves at every step where some caption sampled its locations (half of them, drawn at random:
    # a small last batch can draw none). Count those steps as they happen.
    steps_with_samples = []
    real_loss = training.hard_attention_loss

    def counting_loss(model, output, tokens, *args, **kwargs):
        steps_with_samples.append(bool(output.sampled.any()))
        return real_loss(model, output, tokens, *args, **kwargs)

    monkeypatch.setattr(training, "hard_attention_loss", counting_loss)
    monkeypatch.setenv("SATCLI_STATE_DIR", str(tmp_path / "state"))
    out = tmp_path / "hard"
    result = CliRunner().invoke(app, _train_cli(shapes_root, out, 1, "--attention", "hard"))
    assert result.exit_code == 0, result.output
    checkpoint = read_checkpoint(out / "last.pt")
    assert checkpoint["config"]["attention"] == "hard"
    assert len(steps_with_samples) == -(-120 * 5 // 16)  # one REINFORCE term per training step
    assert int(checkpoint["state_dict"]["reward_baseline_updates"]) == sum(steps_with_samples) > 0.8 * 38
    assert torch.isfinite(checkpoint["state_dict"]["reward_baseline"])
    line = json.loads((out / "metrics.jsonl").read_text())
    assert torch.isfinite(torch.tensor(line["loss"])) and 0.0 <= line["val_bleu4"] <= 1.0
    loaded = load_captioner(out / "last.pt").model
    assert all(torch.isfinite(p).all() for p in loaded.parameters())
    features = torch.randn(2, *loaded.grid_shape, loaded.encoder.spec.dim).flatten(1, 2)
    assert len(decode(loaded, features, beam_size=2, max_length=6)) == 2


def test_the_training_step_loss_is_caption_loss_at_the_same_lambda():
    # The step's loss is normalised by the global batch (for DDP); on one process it must be caption_loss itself,
    # so λ means the same in both (the paper's regulariser averaged over cells, see doubly_stochastic_penalties).
    from models.captioner import caption_loss
    from satcli.training import TrainOptions
    from satcli.training.distributed import Ranks
    from satcli.training.supervised import Stepper
    from tests.helpers import caption_batch, random_features, tiny_captioner

    torch.manual_seed(0)
    model = tiny_captioner()
    model.eval()  # no dropout: the step and the reference see the same forward
    features = random_features(model, 4)
    tokens, lengths = caption_batch([5, 3, 7, 4], 24)
    with torch.no_grad():
        out = model(features, tokens, lengths)
        expected, _ = caption_loss(out.logprobs, out.alphas, tokens, lengths, doubly_stochastic=1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    step = Stepper(model, model, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                   TrainOptions(dataset="x", doubly_stochastic=1.0), Ranks(), torch.device("cpu"))
    loss = step(features, tokens, lengths, global_n=4, global_tokens=int(lengths.sum()))
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_the_demo_trains_with_the_default_lambda():
    from satcli.commands.demo import DemoOptions, demo_train_options
    from satcli.training import TrainOptions

    assert demo_train_options(DemoOptions()).doubly_stochastic == TrainOptions(dataset="x").doubly_stochastic == 1.0


@pytest.mark.parametrize("lr_patience", [1, 3])
def test_lr_patience_n_decays_after_exactly_n_epochs_without_improvement(lr_patience):
    from satcli.training.run import plateau_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = plateau_scheduler(optimizer, TrainOptions(dataset="x", lr_patience=lr_patience, lr_decay=0.5))
    scheduler.step(0.5)  # the first epoch sets the best
    for _ in range(lr_patience - 1):
        scheduler.step(0.4)
        assert optimizer.param_groups[0]["lr"] == 1.0
    scheduler.step(0.4)  # the N-th epoch without improvement
    assert optimizer.param_groups[0]["lr"] == 0.5


def test_lr_patience_below_one_is_refused():
    from satcli.training.run import plateau_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(SatcliError, match="lr-patience"):
        plateau_scheduler(optimizer, TrainOptions(dataset="x", lr_patience=0))


def test_resume_with_more_epochs_trains_exactly_one_more_and_names_ignored_options(shapes_root, tmp_path,
                                                                                    monkeypatch):
    from typer.testing import CliRunner

    from satcli.cli import app

    monkeypatch.setenv("SATCLI_STATE_DIR", str(tmp_path / "state"))
    runner = CliRunner()
    out = tmp_path / "run"
    first = runner.invoke(app, _train_cli(shapes_root, out, 1))
    assert first.exit_code == 0, first.output
    more = runner.invoke(app, [*_train_cli(shapes_root, out, 2), "--resume", "--seed", "5"])
    assert more.exit_code == 0, more.output
    history = read_checkpoint(out / "last.pt")["train_state"]["history"]
    assert [h["epoch"] for h in history] == [1, 2]  # exactly one more epoch
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    # the ignored option is named, with both values (the CLI's own log handler writes it to stderr)
    assert "ignored: --seed 5 (the run's: 0)" in " ".join(more.output.split()), more.output
    state = read_checkpoint(out / "last.pt")["train_state"]
    assert state["options"]["seed"] == 0
    assert "scaler" in state  # the mixed-precision loss scale goes on from where it was (empty on a CPU)


def test_fine_tuning_by_default_trains_the_top_blocks_and_keeps_the_stem_frozen():
    from tests.helpers import tiny_captioner

    encoder = tiny_captioner().encoder
    encoder.set_fine_tuning(TrainOptions(dataset="x", fine_tune_encoder=True).fine_tune_blocks)
    stem, head = encoder._blocks[0], encoder._blocks[-1]
    assert not any(p.requires_grad for p in stem.parameters())
    assert all(p.requires_grad for p in head.parameters())
    assert 0 < sum(p.requires_grad for p in encoder.parameters()) < len(list(encoder.parameters()))


_DDP_WORKER = """
import os, sys
from pathlib import Path

import torch

import satcli.training as train
from satcli.training.supervised import Stepper

last = {}
step = Stepper.__call__


def recording(self, *args, **kwargs):  # every rank's encoder after each of its steps
    loss = step(self, *args, **kwargs)
    last["encoder"] = {k: v.detach().clone() for k, v in self.model.encoder.state_dict().items()}
    return loss


Stepper.__call__ = recording
root, out = Path(sys.argv[1]), Path(sys.argv[2])
train.train(train.TrainOptions(dataset="shapes", data_root=root, out=out, epochs=1, fine_tune_encoder=True,
                             fine_tune_blocks=2, device="cpu", image_size=64, embed_dim=16, attention_dim=16,
                             decoder_dim=24, dropout=0.0, batch_size=16, decoder_lr=3e-3, val_max_length=12))
torch.save(last["encoder"], out / f"encoder-rank{os.environ['RANK']}.pt")
"""


def test_ddp_fine_tuning_keeps_the_encoder_identical_on_every_rank(shapes_root, tmp_path):
    env = {**os.environ, "SATCLI_STATE_DIR": str(tmp_path / "state"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    worker = tmp_path / "worker.py"
    worker.write_text(_DDP_WORKER)
    out = tmp_path / "ddp-ft"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(worker), str(shapes_root), str(out)]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (torch.load(out / f"encoder-rank{r}.pt", weights_only=True) for r in (0, 1))
    tuned = read_checkpoint(out / "last.pt")["state_dict"]  # rank 0 saves
    for key, value in rank0.items():
        assert torch.equal(value, rank1[key]), key  # the ranks trained one encoder, not two
        assert torch.equal(value.float(), tuned[f"encoder.{key}"].float()), key
    # --resume gives every rank its own random stream back, not rank 0's
    rng = read_checkpoint(out / "last.pt")["train_state"]["rng_ranks"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])


def test_the_feature_cache_never_serves_one_encoders_features_to_another(shapes_root):
    # --scst --init of a fine-tuned model must not train on the pretrained encoder's cached features (nor the
    # fine-tuned model leave its features where later frozen runs would read them)
    import numpy as np

    from models.captioner import Captioner
    from satcli.data.features import cached_features, encode_split

    dataset = StoredDataset.open(shapes_root, "shapes")
    config = _options(shapes_root, None).model_config(len(dataset.vocab))
    pretrained, tuned = Captioner(config, pretrained_encoder=True), Captioner(config, pretrained_encoder=True)
    with torch.no_grad():
        for parameter in tuned.encoder.parameters():
            parameter.mul_(1.05)
    cpu = torch.device("cpu")
    first = np.asarray(cached_features(dataset, "val", pretrained, cpu), np.float32)
    second = np.asarray(cached_features(dataset, "val", tuned, cpu), np.float32)
    own = torch.cat(list(encode_split(dataset, "val", tuned, cpu))).numpy()
    np.testing.assert_allclose(second, own, rtol=1e-2, atol=1e-2)  # float16 in the cache
    assert not np.allclose(first, second, rtol=1e-2, atol=1e-2)
    again = np.asarray(cached_features(dataset, "val", pretrained, cpu), np.float32)
    np.testing.assert_array_equal(first, again)


def test_a_grid_finer_than_the_encoders_is_refused_and_names_the_image_size_that_gives_it(shapes_root, tmp_path):
    from models.captioner import Captioner

    # EfficientNet-Lite0 at 64 px has a 2×2 grid; 4×4 would be each cell copied 2×2
    with pytest.raises(SatcliError, match="--image-size 128"):
        run(_options(shapes_root, tmp_path / "grid", epochs=1, grid_size=4))
    config = _options(shapes_root, None, image_size=128).model_config(10)
    assert Captioner(config).grid_shape == (4, 4)  # the way named: a real 4×4 grid


def test_resume_with_json_and_quiet_continues_the_run(shapes_root, tmp_path, monkeypatch):
    # --json and -q steer the output, not the run: --resume must not take them for training options
    from typer.testing import CliRunner

    from satcli.cli import app

    monkeypatch.setenv("SATCLI_STATE_DIR", str(tmp_path / "state"))
    runner = CliRunner()
    out = tmp_path / "run"
    assert runner.invoke(app, _train_cli(shapes_root, out, 1)).exit_code == 0
    more = runner.invoke(app, [*_train_cli(shapes_root, out, 2), "--resume", "--json", "-q"])
    assert more.exit_code == 0, more.output
    assert [line["epoch"] for line in json.loads(more.stdout)["history"]] == [1, 2]
