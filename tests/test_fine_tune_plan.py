"""Encoder fine-tuning encodes every training picture once per epoch: its batches hold all the captions of
each of their pictures (a batch of shuffled captions holds nearly as many pictures as captions)."""

import torch

from satcli.training.batches import image_batch_plan


def test_each_picture_is_in_exactly_one_batch_with_all_its_captions():
    image = torch.tensor([p for p in range(23) for _ in range(5)] + [23, 23, 23])  # 5 captions each, one with 3
    plan = image_batch_plan(image, 16, seed=2, epoch=1)
    everything = torch.cat(plan)
    assert sorted(everything.tolist()) == list(range(len(image)))  # every caption once
    for batch in plan:
        assert len(batch) <= 16
    seen: dict[int, int] = {}
    for n, batch in enumerate(plan):
        for picture in image[batch].unique().tolist():
            assert picture not in seen, "a picture in two batches would be encoded twice"
            seen[picture] = n
            assert int((image[batch] == picture).sum()) == int((image == picture).sum())
    assert len(seen) == 24
    again = image_batch_plan(image, 16, seed=2, epoch=1)
    later = image_batch_plan(image, 16, seed=2, epoch=2)
    assert all(torch.equal(a, b) for a, b in zip(plan, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(plan, later, strict=False))


def test_a_fine_tuning_epoch_decodes_each_picture_once(tmp_path, monkeypatch):
    from satcli.commands.preprocess import run as preprocess
    from satcli.data.preprocess import PreprocessOptions
    from satcli.data.store import DatasetKind, StoredDataset
    from satcli.training import TrainOptions
    from satcli.training import train as run

    monkeypatch.setenv("SATCLI_STATE_DIR", str(tmp_path / "state"))
    data = tmp_path / "data"
    preprocess(PreprocessOptions(dataset=DatasetKind.shapes, data_root=data, n_train=24, n_val=4, n_test=0,
                                 image_size=64, min_word_freq=1))
    decoded = []
    original = StoredDataset.decode_image

    def counting(data):
        decoded.append(data)
        return original(data)

    monkeypatch.setattr(StoredDataset, "decode_image", staticmethod(counting))
    run(TrainOptions(dataset="shapes", data_root=data, out=tmp_path / "run", epochs=1, image_size=64,
                     embed_dim=16, attention_dim=16, decoder_dim=24, dropout=0.0, batch_size=16,
                     fine_tune_encoder=True, fine_tune_blocks=1))
    assert len(decoded) == 24 + 4  # each training picture once, then each validation picture once
    assert len(set(decoded)) == 28
