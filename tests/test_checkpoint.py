import os

import pytest
import torch

from models.decoding import decode
from models.encoders import DEFAULT_ENCODER
from satcli.core.errors import SatcliError
from satcli.data.vocab import Vocabulary
from satcli.formats.checkpoint import load_captioner, read_checkpoint, save_checkpoint
from tests.helpers import random_features, tiny_captioner


def _vocab(n=24):
    return Vocabulary(["<pad>", "<start>", "<end>", "<unk>", *(f"w{i}" for i in range(n - 4))])


def test_round_trip_gives_identical_decoding(tmp_path):
    model = tiny_captioner().eval()
    features = random_features(model, 3)
    before = decode(model, features, beam_size=3, max_length=12)
    path = save_checkpoint(tmp_path / "run" / "best.pt", model, _vocab(), train_options={"epochs": 3},
                           metrics={"bleu4": 0.25})
    loaded = load_captioner(path)
    after = decode(loaded.model, features, beam_size=3, max_length=12)
    assert [r.tokens for r in after] == [r.tokens for r in before]
    assert [r.sum_logprob for r in after] == [r.sum_logprob for r in before]
    assert loaded.vocab.words == _vocab().words
    assert loaded.preprocessing.image_size == 224 and loaded.preprocessing.mean == (0.5, 0.5, 0.5)
    assert loaded.metrics == {"bleu4": 0.25} and loaded.train_options == {"epochs": 3}
    assert not loaded.model.training
    assert [p.name for p in path.parent.iterdir()] == ["best.pt"]  # no temp file left behind


def test_checkpoint_is_a_plain_dict_loadable_with_weights_only(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", tiny_captioner(), _vocab())
    payload = torch.load(path, weights_only=True)
    assert set(payload) >= {"format_version", "config", "state_dict", "vocab", "preprocessing",
                            "train_options", "metrics"}
    assert payload["config"]["encoder"] == DEFAULT_ENCODER


def test_checkpoint_keys_have_no_wrapper_prefixes(tmp_path):
    model = tiny_captioner()
    wrapped = torch.nn.Module()
    wrapped.module = model  # what DistributedDataParallel looks like
    path = save_checkpoint(tmp_path / "m.pt", wrapped, _vocab())
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in read_checkpoint(path)["state_dict"])


def test_a_file_from_another_program_is_refused(tmp_path):
    path = tmp_path / "resnet.pt"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, path)
    with pytest.raises(SatcliError, match="resnet.pt: not a satcli checkpoint"):
        load_captioner(path)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(SatcliError, match="notes.txt: not a readable checkpoint"):
        load_captioner(text)


def test_a_truncated_checkpoint_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", tiny_captioner(), _vocab())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SatcliError, match="truncated or corrupt"):
        load_captioner(path)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_checkpoint_carrying_code_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        torch.save({"format": "satcli-checkpoint", "payload": _Exploit()}, f)
    with pytest.raises(SatcliError, match="evil.pt: not a satcli checkpoint"):
        load_captioner(path)
    assert not (tmp_path / "pwned").exists()


def test_missing_file_names_it(tmp_path):
    with pytest.raises(SatcliError, match="nope.pt: no such checkpoint file"):
        load_captioner(tmp_path / "nope.pt")


def test_vocabulary_and_model_must_agree(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", tiny_captioner(), _vocab())
    payload = torch.load(path, weights_only=True)
    payload["vocab"] = payload["vocab"][:-1]
    torch.save(payload, path)
    with pytest.raises(SatcliError, match="vocabulary has 23 words but the model 24"):
        load_captioner(path)
