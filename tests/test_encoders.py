import pytest
import torch
import torch.nn.functional as F
from skimage import data

from models.encoders import ENCODERS, Conv2dSame, Encoder, PretrainedWeightsUnavailable, load_efficientnet_lite

CAT_CLASSES = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def _imagenet_input(image, size):
    x = torch.from_numpy(image).permute(2, 0, 1).float().div(255).unsqueeze(0)
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x - 0.5) / 0.5


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_efficientnet_lite_weights_classify_real_photos(variant):
    net = load_efficientnet_lite(variant).eval()
    size = ENCODERS[f"efficientnet-lite{variant}"].image_size
    with torch.no_grad():
        cat = net(_imagenet_input(data.chelsea(), size)).softmax(-1)[0]
        coffee = net(_imagenet_input(data.coffee(), size)).softmax(-1)[0]
    assert int(cat.argmax()) in CAT_CLASSES
    assert float(cat[list(CAT_CLASSES)].sum()) > 0.5
    assert int(coffee.argmax()) == ESPRESSO


def test_tf_same_padding_matches_tensorflow_arithmetic():
    conv = Conv2dSame(1, 1, 3, stride=2, bias=False)
    torch.nn.init.ones_(conv.weight)
    x = torch.ones(1, 1, 4, 4)
    y = conv(x)
    # out = ceil(4/2) = 2; total padding 1, all of it after: the first window sees no padding.
    assert y.shape[-2:] == (2, 2)
    assert y[0, 0, 0, 0] == 9 and y[0, 0, 1, 1] == 4


def test_encoder_gives_a_grid_of_feature_vectors():
    enc = Encoder("efficientnet-lite0").eval()
    with torch.no_grad():
        features = enc(torch.randn(2, 3, 224, 224))
    assert features.shape == (2, 7 * 7, 1280)
    assert enc.grid_shape(224, 224) == (7, 7)
    assert enc.grid_shape(256, 256) == (8, 8)


@pytest.mark.parametrize("name, size, grid, dim", [("resnet50", 96, (3, 3), 2048), ("vgg16", 96, (6, 6), 512)])
def test_torchvision_backbones_random_init(name, size, grid, dim):
    enc = Encoder(name).eval()
    with torch.no_grad():
        features = enc(torch.randn(1, 3, size, size))
    assert features.shape == (1, grid[0] * grid[1], dim)
    assert enc.grid_shape(size, size) == grid


def test_resnet101_and_152_are_in_the_table():
    for name in ("resnet101", "resnet152"):
        assert ENCODERS[name].dim == 2048


def test_adaptive_pooling_to_the_papers_14x14_grid():
    enc = Encoder("efficientnet-lite0", grid_size=14).eval()
    with torch.no_grad():
        assert enc(torch.randn(1, 3, 224, 224)).shape == (1, 196, 1280)
    assert enc.grid_shape(224, 224) == (14, 14)


def test_pretrained_torchvision_offline_names_the_offline_encoders(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(PretrainedWeightsUnavailable, match="efficientnet-lite0"):
        Encoder("resnet101", pretrained=True)


def test_frozen_by_default_and_stays_in_eval_mode():
    enc = Encoder("efficientnet-lite0")
    enc.train()
    assert enc.frozen
    assert not any(m.training for m in enc.trunk.modules())


def test_fine_tune_top_blocks_only():
    enc = Encoder("efficientnet-lite0", fine_tune_blocks=2)
    enc.train()
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert any("_conv_head" in n for n in trainable)
    assert any("_blocks.15." in n for n in trainable)
    assert not any("_blocks.14." in n or "_conv_stem" in n for n in trainable)
    assert enc._tuned[-1].training and not enc.trunk.net._bn0.training
    features = enc(torch.randn(2, 3, 64, 64))
    features.sum().backward()
    assert all(p.grad is not None for n, p in enc.named_parameters() if n in trainable)


def test_unknown_encoder_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown encoder 'resnet9'.*efficientnet-lite0"):
        Encoder("resnet9")


def test_cpu_chunking_gives_the_same_features_as_one_call(monkeypatch):
    import models.encoders as encoders

    encoder = Encoder("efficientnet-lite0", pretrained=False).eval()
    images = torch.randn(7, 3, 64, 64)
    with torch.no_grad():
        chunked = encoder(images)
        monkeypatch.setattr(encoders, "CPU_CHUNK", 100)
        whole = encoder(images)
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-5)


def test_fine_tuned_batchnorm_sees_the_whole_batch(monkeypatch):
    import models.encoders as encoders

    calls = []
    encoder = Encoder("efficientnet-lite0", pretrained=False, fine_tune_blocks=1).train()
    monkeypatch.setattr(encoder, "_forward", lambda x: calls.append(len(x)) or torch.zeros(len(x), 1, 1))
    encoder(torch.randn(encoders.CPU_CHUNK + 3, 3, 64, 64))
    assert calls == [encoders.CPU_CHUNK + 3]  # one call: BatchNorm statistics over the whole batch
    encoder.eval()(torch.randn(encoders.CPU_CHUNK + 3, 3, 64, 64))
    assert calls[1:] == [encoders.CPU_CHUNK, 3]


@pytest.mark.parametrize("variant, stage, blocks_before, channels, stride",
                         [(0, 6, 15, 192, 32), (2, 6, 20, 208, 32), (0, 5, 11, 112, 16)])
def test_stage_encoder_is_the_network_cut_after_that_stage(variant, stage, blocks_before, channels, stride):
    # The reference: EfficientNet-B0's stage table (repeats 1, 2, 2, 3, 3, 4 before the last stage; Lite2 scales
    # the middle ones by 1.2, rounding up: 1, 3, 3, 4, 4, 5) run block by block on the full pretrained network.
    name = f"efficientnet-lite{variant}-stage{stage}"
    size = ENCODERS[name].image_size
    x = _imagenet_input(data.chelsea(), size)
    net = load_efficientnet_lite(variant).eval()
    with torch.no_grad():
        y = F.relu6(net._bn0(net._conv_stem(x)))
        for block in net._blocks[:blocks_before]:
            y = block(y)
        features = Encoder(name, pretrained=True).eval()(x)
    grid = -(-size // stride)
    assert y.shape == (1, channels, grid, grid)
    assert ENCODERS[name].dim == channels
    torch.testing.assert_close(features, y.flatten(2).transpose(1, 2))


def test_stage6_encoder_has_no_head_and_fine_tunes_its_own_top_blocks():
    enc = Encoder("efficientnet-lite0-stage6")
    names = {name for name, _ in enc.named_parameters()}
    assert not any("_conv_head" in n or "_fc" in n for n in names)
    enc.set_fine_tuning(1)
    tuned = {name for name, p in enc.named_parameters() if p.requires_grad}
    assert tuned and all(name.startswith("trunk.net._blocks.14.") for name in tuned)
