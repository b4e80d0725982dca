"""Layer tables of the four MobileNet families.

V2 and V3 follow torchvision's reference implementation layer for layer (channels, kernels,
strides, SE placement, activations, ``_make_divisible`` rounding, last-channel rules), so their
parameter counts equal torchvision's and its weights load by name. V1 follows the paper's Table 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from ._graph import OUTPUT_NAME, Activation, GraphBuilder, Value

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ZooEntry:
    """What a family is, where it comes from, and the preprocessing its (ImageNet) weights expect."""

    name: str
    description: str
    paper: str
    default_mean: tuple[float, float, float] = IMAGENET_MEAN
    default_std: tuple[float, float, float] = IMAGENET_STD
    num_classes: int = 1000


def make_divisible(value: float, divisor: int = 8) -> int:
    """torchvision's ``_make_divisible``: nearest multiple of ``divisor``, never 10% below ``value``."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


# -- MobileNet V1 ---------------------------------------------------------------------------

# (output channels, stride) of the 13 depthwise-separable blocks, paper Table 1. The paper lists
# the 13th depthwise conv with stride 2 but its output stays 7x7: every implementation uses 1.
_V1_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)) + ((512, 1),) * 5 + ((1024, 2), (1024, 1))


def _build_v1(g: GraphBuilder, alpha: float, num_classes: int) -> Value:
    """Stem conv, 13 x (3x3 depthwise + 1x1 pointwise), each with BN + ReLU, pool, classifier."""
    x = g.conv_bn_act(g.input, make_divisible(32 * alpha), name="features.0", kernel=3, stride=2, act="relu")
    for i, (channels, stride) in enumerate(_V1_BLOCKS, start=1):
        x = g.conv_bn_act(x, x.channels, name=f"features.{i}.dw", kernel=3, stride=stride, depthwise=True, act="relu")
        x = g.conv_bn_act(x, make_divisible(channels * alpha), name=f"features.{i}.pw", act="relu")
    return g.linear(g.pool_flatten(x), num_classes, "classifier", output=OUTPUT_NAME)


# -- MobileNet V2 ---------------------------------------------------------------------------

# (expansion t, output channels c, repeats n, first stride s), paper Table 2 / torchvision.
_V2_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _build_v2(g: GraphBuilder, alpha: float, num_classes: int) -> Value:
    """Inverted residuals with linear bottlenecks and ReLU6; the 1280-wide head only grows (alpha > 1)."""
    x = g.conv_bn_act(g.input, make_divisible(32 * alpha), name="features.0", kernel=3, stride=2, act="relu6")
    index = 1
    for t, c, n, s in _V2_SETTING:
        out_channels = make_divisible(c * alpha)
        for repeat in range(n):
            block_input, prefix = x, f"features.{index}.conv"
            layer = 0
            if t != 1:
                x = g.conv_bn_act(x, int(round(block_input.channels * t)), name=f"{prefix}.{layer}", act="relu6")
                layer += 1
            stride = s if repeat == 0 else 1
            x = g.conv_bn_act(
                x, x.channels, name=f"{prefix}.{layer}", kernel=3, stride=stride, depthwise=True, act="relu6"
            )
            # The linear projection is a bare conv + BN in torchvision (two sibling modules).
            x = g.conv_bn_act(
                x, out_channels, name=f"{prefix}.{layer + 1}", act=None,
                conv_key=f"{prefix}.{layer + 1}", bn_key=f"{prefix}.{layer + 2}",
            )  # fmt: skip
            if stride == 1 and block_input.channels == out_channels:
                x = g.add(block_input, x, f"features.{index}.add")
            index += 1
    last_channel = make_divisible(1280 * max(1.0, alpha))
    x = g.conv_bn_act(x, last_channel, name=f"features.{index}", act="relu6")
    # torchvision: classifier = Dropout (index 0, omitted at inference) + Linear (index 1).
    return g.linear(g.pool_flatten(x), num_classes, "classifier.1", output=OUTPUT_NAME)


# -- MobileNet V3 ---------------------------------------------------------------------------


class _Bneck(NamedTuple):
    """One row of the V3 paper's Tables 1/2 (torchvision's ``InvertedResidualConfig``, unscaled)."""

    in_ch: int
    kernel: int
    expanded: int
    out_ch: int
    se: bool
    act: Activation
    stride: int


_RE, _HS = "relu", "hardswish"
_V3_LARGE = tuple(
    _Bneck(*row)
    for row in (
        (16, 3, 16, 16, False, _RE, 1),
        (16, 3, 64, 24, False, _RE, 2),
        (24, 3, 72, 24, False, _RE, 1),
        (24, 5, 72, 40, True, _RE, 2),
        (40, 5, 120, 40, True, _RE, 1),
        (40, 5, 120, 40, True, _RE, 1),
        (40, 3, 240, 80, False, _HS, 2),
        (80, 3, 200, 80, False, _HS, 1),
        (80, 3, 184, 80, False, _HS, 1),
        (80, 3, 184, 80, False, _HS, 1),
        (80, 3, 480, 112, True, _HS, 1),
        (112, 3, 672, 112, True, _HS, 1),
        (112, 5, 672, 160, True, _HS, 2),
        (160, 5, 960, 160, True, _HS, 1),
        (160, 5, 960, 160, True, _HS, 1),
    )
)
_V3_SMALL = tuple(
    _Bneck(*row)
    for row in (
        (16, 3, 16, 16, True, _RE, 2),
        (16, 3, 72, 24, False, _RE, 2),
        (24, 3, 88, 24, False, _RE, 1),
        (24, 5, 96, 40, True, _HS, 2),
        (40, 5, 240, 40, True, _HS, 1),
        (40, 5, 240, 40, True, _HS, 1),
        (40, 5, 120, 48, True, _HS, 1),
        (48, 5, 144, 48, True, _HS, 1),
        (48, 5, 288, 96, True, _HS, 2),
        (96, 5, 576, 96, True, _HS, 1),
        (96, 5, 576, 96, True, _HS, 1),
    )
)


def _build_v3(
    g: GraphBuilder, alpha: float, num_classes: int, *, setting: tuple[_Bneck, ...], last_channel: int
) -> Value:
    """Bnecks with optional SE, then 1x1 conv to 6x, pool, Linear + hard-swish, Linear.

    As in torchvision, every width including ``last_channel`` is scaled by alpha (the TF
    reference keeps the head at 1280/1024 for alpha < 1; torchvision is the one we match).
    """

    def scaled(channels: int) -> int:
        return make_divisible(channels * alpha)

    x = g.conv_bn_act(g.input, scaled(setting[0].in_ch), name="features.0", kernel=3, stride=2, act=_HS)
    for index, cfg in enumerate(setting, start=1):
        block_input, prefix = x, f"features.{index}.block"
        expanded, out_channels = scaled(cfg.expanded), scaled(cfg.out_ch)
        layer = 0
        if expanded != x.channels:
            x = g.conv_bn_act(x, expanded, name=f"{prefix}.{layer}", act=cfg.act)
            layer += 1
        x = g.conv_bn_act(
            x, expanded, name=f"{prefix}.{layer}", kernel=cfg.kernel, stride=cfg.stride, depthwise=True, act=cfg.act
        )
        layer += 1
        if cfg.se:
            x = g.squeeze_excite(x, make_divisible(expanded // 4), f"{prefix}.{layer}")
            layer += 1
        x = g.conv_bn_act(x, out_channels, name=f"{prefix}.{layer}", act=None)
        if cfg.stride == 1 and block_input.channels == out_channels:
            x = g.add(block_input, x, f"features.{index}.add")
    x = g.conv_bn_act(x, 6 * x.channels, name=f"features.{len(setting) + 1}", act=_HS)
    # torchvision: Linear (0), Hardswish (1), Dropout (2, omitted at inference), Linear (3).
    hidden = g.activation(g.linear(g.pool_flatten(x), scaled(last_channel), "classifier.0"), _HS, "classifier.1")
    return g.linear(hidden, num_classes, "classifier.3", output=OUTPUT_NAME)


def _build_v3_large(g: GraphBuilder, alpha: float, num_classes: int) -> Value:
    return _build_v3(g, alpha, num_classes, setting=_V3_LARGE, last_channel=1280)


def _build_v3_small(g: GraphBuilder, alpha: float, num_classes: int) -> Value:
    return _build_v3(g, alpha, num_classes, setting=_V3_SMALL, last_channel=1024)


# -- registry -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """A zoo entry plus how to build it."""

    entry: ZooEntry
    build: Callable[[GraphBuilder, float, int], Value]
    bn_eps: float  # torchvision: 1e-5 for V2 (PyTorch default), 1e-3 for V3


FAMILIES: dict[str, Family] = {
    family.entry.name: family
    for family in (
        Family(
            ZooEntry(
                "mobilenet_v1",
                "MobileNet V1: depthwise-separable convolutions with BN + ReLU",
                "Howard et al., MobileNets: Efficient Convolutional Neural Networks for Mobile Vision "
                "Applications, arXiv:1704.04861 (2017)",
            ),
            _build_v1,
            1e-5,
        ),
        Family(
            ZooEntry(
                "mobilenet_v2",
                "MobileNet V2: inverted residuals with linear bottlenecks and ReLU6",
                "Sandler et al., MobileNetV2: Inverted Residuals and Linear Bottlenecks, CVPR 2018, "
                "arXiv:1801.04381",
            ),
            _build_v2,
            1e-5,
        ),
        Family(
            ZooEntry(
                "mobilenet_v3_large",
                "MobileNet V3-Large: NAS-found bnecks with squeeze-excite and hard-swish",
                "Howard et al., Searching for MobileNetV3, ICCV 2019, arXiv:1905.02244",
            ),
            _build_v3_large,
            1e-3,
        ),
        Family(
            ZooEntry(
                "mobilenet_v3_small",
                "MobileNet V3-Small: the low-resource V3 variant with squeeze-excite and hard-swish",
                "Howard et al., Searching for MobileNetV3, ICCV 2019, arXiv:1905.02244",
            ),
            _build_v3_small,
            1e-3,
        ),
    )
}
