"""The one decode-and-score loop (satcli.scoring.decode): chunked decoding is decoding the whole split at once."""

import numpy as np
import pytest
import torch

from models.decoding import DecodingOptions, decode
from satcli.scoring.decode import decode_split, feature_chunks
from tests.helpers import random_features, tiny_captioner


def test_chunked_decoding_of_a_split_equals_decoding_it_in_one_batch_at_every_option():
    torch.manual_seed(0)
    model = tiny_captioner().eval()
    features = random_features(model, 7)
    cached = features.numpy().astype(np.float16)  # as the feature cache stores them
    options = [DecodingOptions(beam_size=1, max_length=6), DecodingOptions(beam_size=3, max_length=6)]
    advanced = []
    outputs = decode_split(model, feature_chunks(cached, 3), options, torch.device("cpu"), advanced.append)
    assert advanced == [3, 3, 1]  # one progress step per chunk, every image counted once
    whole = torch.from_numpy(cached.astype(np.float32))
    for option, output in zip(options, outputs, strict=True):
        reference = decode(model, whole, option)  # the slow obvious way: the whole split in one batch
        assert [r.tokens for r in output.results] == [r.tokens for r in reference]
        for got, expected in zip(output.results, reference, strict=True):
            torch.testing.assert_close(got.attention, expected.attention)
            assert got.best.sum_logprob == pytest.approx(expected.best.sum_logprob, abs=1e-5)
