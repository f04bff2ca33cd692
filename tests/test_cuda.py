"""The model and the search on a CUDA GPU against the same on the CPU (skipped without a GPU)."""

import pytest
import torch

from models.decoding import DecodingOptions, decode
from tests.helpers import caption_batch, random_features, tiny_captioner

pytestmark = pytest.mark.cuda


def test_training_step_under_bf16_autocast_gives_every_decoder_weight_a_gradient():
    model = tiny_captioner().cuda()
    features = random_features(model, 4).cuda()
    tokens, lengths = caption_batch([5, 3, 4, 2], model.config.vocab_size)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        output = model(features, tokens.cuda(), lengths.cuda())
    targets = tokens[:, 1:].cuda().unsqueeze(2)  # (B, T, 1); padded steps have logprobs 0
    loss = -output.logprobs.float().gather(2, targets).sum() / lengths.sum()
    loss.backward()
    assert torch.isfinite(loss)
    for name, parameter in model.decoder.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name


def test_beam_search_on_the_gpu_finds_the_cpu_captions():
    model = tiny_captioner().eval()
    features = random_features(model, 3)
    options = DecodingOptions(beam_size=3, max_length=8)
    on_cpu = decode(model, features, options)
    on_gpu = decode(model.cuda(), features.cuda(), options)  # float32: the same arithmetic, another device
    assert [r.best.tokens for r in on_gpu] == [r.best.tokens for r in on_cpu]
    for gpu, cpu in zip(on_gpu, on_cpu, strict=True):
        assert gpu.best.sum_logprob == pytest.approx(cpu.best.sum_logprob, abs=1e-3)
