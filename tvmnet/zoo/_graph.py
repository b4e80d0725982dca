"""The layer builder every zoo family shares.

Each block emits ONNX nodes *and* runs the same computation in float64 numpy on a small random
calibration batch. Batch-norm running statistics are then the real statistics of that batch, so
every conv+BN output has about unit variance whatever the family, depth, width or seed. Plain
random weights drift to huge or vanishing activations over ~50 layers, which would make the
1e-4-relative comparisons against a compiler meaningless.

Initializer names follow torchvision's ``state_dict`` keys (``features.3.conv.1.0.weight``), so
real torchvision weights can be loaded through an ``.npz`` for the ``fold_bn=False`` models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INPUT_NAME = "input"
OUTPUT_NAME = "logits"

Activation = Literal["relu", "relu6", "hardswish"] | None

_HARD_SIGMOID_ALPHA = 1.0 / 6.0  # torchvision's Hardsigmoid is relu6(x + 3) / 6; ONNX's default is 0.2
_HARD_SWISH_OPSET = 14  # first opset with a HardSwish operator


@dataclass(frozen=True)
class Value:
    """A tensor of the graph being built, with its activations on the calibration batch."""

    name: str
    calib: np.ndarray  # float64, NCHW (or NC after flattening)

    @property
    def channels(self) -> int:
        return int(self.calib.shape[1])


def _f32(array: np.ndarray) -> np.ndarray:
    return np.asarray(array, dtype=np.float32)


def _conv_reference(x: np.ndarray, w: np.ndarray, stride: int, groups: int) -> np.ndarray:
    """Float64 "same"-padded conv for the calibration pass; only dense or depthwise, as the zoo needs."""
    k = w.shape[-1]
    pad = (k - 1) // 2
    n, _, h, wd = x.shape
    ho, wo = (h + 2 * pad - k) // stride + 1, (wd + 2 * pad - k) // stride + 1
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad))) if pad else x
    y = np.zeros((n, w.shape[0], ho, wo))
    for i in range(k):
        for j in range(k):
            patch = xp[:, :, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride]
            if groups == 1:  # batched matmul keeps NCHW contiguous (tensordot would not)
                y += np.matmul(np.ascontiguousarray(w[:, :, i, j]), patch.reshape(n, -1, ho * wo)).reshape(y.shape)
            else:
                y += patch * w[:, 0, i, j][None, :, None, None]
    return y


def _hard_sigmoid(x: np.ndarray) -> np.ndarray:
    return np.clip(x * _HARD_SIGMOID_ALPHA + 0.5, 0.0, 1.0)


def _activation_reference(x: np.ndarray, act: Activation) -> np.ndarray:
    if act == "relu":
        return np.maximum(x, 0.0)
    if act == "relu6":
        return np.clip(x, 0.0, 6.0)
    if act == "hardswish":
        return x * _hard_sigmoid(x)
    return x


class GraphBuilder:
    """Accumulates nodes and initializers; draws every weight from one seeded generator, in order."""

    def __init__(
        self, *, opset: int, fold_bn: bool, bn_eps: float, rng: np.random.Generator, calib: np.ndarray
    ) -> None:
        self.opset = opset
        self.fold_bn = fold_bn
        self.bn_eps = bn_eps
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._names: set[str] = {INPUT_NAME}
        self.input = Value(INPUT_NAME, calib)

    # -- low level ---------------------------------------------------------------------------

    def _claim(self, name: str) -> str:
        if name in self._names:
            raise ValueError(f"duplicate name {name!r} in zoo graph (a bug in the family's layer table)")
        self._names.add(name)
        return name

    def _param(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(_f32(array), self._claim(name)))
        return name

    def _shared_scalar(self, name: str, value: float) -> str:
        """One initializer per constant (e.g. Clip bounds), shared by every node that uses it."""
        if name not in self._names:
            self._param(name, np.array(value, dtype=np.float32))
        return name

    def _emit(self, op: str, inputs: list[str], name: str, output: str | None = None, **attrs: object) -> str:
        """Add a node; its output tensor has the node's (unique, readable) name unless given."""
        out = self._claim(output or name)
        if output is not None:
            self._claim(name)
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def _he_normal(self, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        return _f32(self.rng.standard_normal(shape) * np.sqrt(2.0 / fan_in))

    def _small_bias(self, n: int) -> np.ndarray:
        """Non-zero so a compiler that drops a bias shows up in the numbers."""
        return _f32(self.rng.normal(0.0, 0.1, n))

    # -- blocks ------------------------------------------------------------------------------

    def activation(self, x: Value, act: Activation, name: str) -> Value:
        """ReLU / ReLU6 (Clip with min/max inputs) / hard-swish (HardSwish op from opset 14)."""
        if act is None:
            return x
        calib = _activation_reference(x.calib, act)
        if act == "relu":
            return Value(self._emit("Relu", [x.name], f"{name}.relu"), calib)
        if act == "relu6":
            bounds = [self._shared_scalar("const.relu6.min", 0.0), self._shared_scalar("const.relu6.max", 6.0)]
            return Value(self._emit("Clip", [x.name, *bounds], f"{name}.relu6"), calib)
        if self.opset >= _HARD_SWISH_OPSET:
            return Value(self._emit("HardSwish", [x.name], f"{name}.hardswish"), calib)
        gate = self._emit(
            "HardSigmoid", [x.name], f"{name}.hardswish.gate", alpha=_HARD_SIGMOID_ALPHA, beta=0.5
        )
        return Value(self._emit("Mul", [x.name, gate], f"{name}.hardswish"), calib)

    def conv_bn_act(
        self,
        x: Value,
        out_channels: int,
        *,
        name: str,
        act: Activation,
        kernel: int = 1,
        stride: int = 1,
        depthwise: bool = False,
        conv_key: str | None = None,
        bn_key: str | None = None,
    ) -> Value:
        """Conv (no bias) + BatchNorm + activation, i.e. torchvision's ``Conv2dNormActivation``.

        ``name`` is the module path used for node names; weights live under ``conv_key`` and
        ``bn_key`` (default ``name.0`` / ``name.1`` as in torchvision). With ``fold_bn`` the BN
        is folded into the conv's weight and bias, computed from the same draws, so both forms
        are the same function.
        """
        cin = x.channels
        groups = cin if depthwise else 1
        if depthwise and out_channels != cin:
            raise ValueError(f"{name}: a depthwise conv keeps its {cin} channels")
        conv_key = conv_key or f"{name}.0"
        bn_key = bn_key or f"{name}.1"

        w = self._he_normal((out_channels, cin // groups, kernel, kernel), fan_in=cin // groups * kernel * kernel)
        gamma = _f32(self.rng.uniform(0.5, 1.5, out_channels))
        beta = _f32(self.rng.normal(0.0, 0.2, out_channels))
        y = _conv_reference(x.calib, w.astype(np.float64), stride, groups)
        mean = _f32(y.mean(axis=(0, 2, 3)))
        var = y.var(axis=(0, 2, 3))
        var = _f32(np.maximum(var, 0.01 * var.mean()))  # a near-constant channel must not get a huge gain
        scale = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + self.bn_eps)
        shift = beta.astype(np.float64) - mean.astype(np.float64) * scale
        calib = y * scale[None, :, None, None] + shift[None, :, None, None]

        kind = "dw" if depthwise else ("pw" if kernel == 1 else "conv")
        pad = (kernel - 1) // 2
        attrs = dict(kernel_shape=[kernel, kernel], strides=[stride, stride], pads=[pad] * 4, group=groups)
        if self.fold_bn:
            inputs = [
                x.name,
                self._param(f"{conv_key}.weight", w.astype(np.float64) * scale[:, None, None, None]),
                self._param(f"{conv_key}.bias", shift),
            ]
            out = self._emit("Conv", inputs, f"{name}.{kind}", **attrs)
        else:
            conv = self._emit("Conv", [x.name, self._param(f"{conv_key}.weight", w)], f"{name}.{kind}", **attrs)
            bn_inputs = [
                conv,
                self._param(f"{bn_key}.weight", gamma),
                self._param(f"{bn_key}.bias", beta),
                self._param(f"{bn_key}.running_mean", mean),
                self._param(f"{bn_key}.running_var", var),
            ]
            out = self._emit("BatchNormalization", bn_inputs, f"{name}.bn", epsilon=self.bn_eps)
        return self.activation(Value(out, calib), act, name)

    def _conv1x1_bias(self, x: Value, out_channels: int, name: str) -> Value:
        """1x1 conv with bias and no BN (the SE block's fc layers, as in torchvision)."""
        w = self._he_normal((out_channels, x.channels, 1, 1), fan_in=x.channels)
        b = self._small_bias(out_channels)
        inputs = [x.name, self._param(f"{name}.weight", w), self._param(f"{name}.bias", b)]
        calib = _conv_reference(x.calib, w.astype(np.float64), 1, 1) + b[None, :, None, None]
        return Value(self._emit("Conv", inputs, name, kernel_shape=[1, 1]), calib)

    def squeeze_excite(self, x: Value, squeeze_channels: int, name: str) -> Value:
        """SE block: pool -> 1x1 conv -> ReLU -> 1x1 conv -> HardSigmoid -> rescale ``x``."""
        pooled_name = self._emit("GlobalAveragePool", [x.name], f"{name}.avgpool")
        pooled = Value(pooled_name, x.calib.mean(axis=(2, 3), keepdims=True))
        hidden = self.activation(self._conv1x1_bias(pooled, squeeze_channels, f"{name}.fc1"), "relu", name)
        logit = self._conv1x1_bias(hidden, x.channels, f"{name}.fc2")
        gate_name = self._emit("HardSigmoid", [logit.name], f"{name}.hardsigmoid", alpha=_HARD_SIGMOID_ALPHA, beta=0.5)
        gate = _hard_sigmoid(logit.calib)
        return Value(self._emit("Mul", [x.name, gate_name], f"{name}.scale"), x.calib * gate)

    def add(self, a: Value, b: Value, name: str) -> Value:
        """Residual connection."""
        return Value(self._emit("Add", [a.name, b.name], name), a.calib + b.calib)

    def pool_flatten(self, x: Value) -> Value:
        """GlobalAveragePool + Flatten: the classifier's input."""
        pooled = self._emit("GlobalAveragePool", [x.name], "avgpool")
        return Value(self._emit("Flatten", [pooled], "flatten", axis=1), x.calib.mean(axis=(2, 3)))

    def linear(self, x: Value, out_features: int, key: str, *, output: str | None = None) -> Value:
        """Gemm with torchvision's ``Linear`` layout (weight ``[out, in]``, ``transB=1``)."""
        w = self._he_normal((out_features, x.channels), fan_in=x.channels)
        b = self._small_bias(out_features)
        inputs = [x.name, self._param(f"{key}.weight", w), self._param(f"{key}.bias", b)]
        out = self._emit("Gemm", inputs, f"{key}.gemm", output=output, transB=1)
        return Value(out, x.calib @ w.astype(np.float64).T + b)

    # -- result ------------------------------------------------------------------------------

    def graph(self, logits: Value, *, name: str, resolution: int, batch: int | None) -> onnx.GraphProto:
        """Wrap the nodes into a graph with ``input`` [batch,3,H,W] and ``logits`` [batch,classes]."""
        if logits.name != OUTPUT_NAME:
            raise ValueError(f"the last layer must write {OUTPUT_NAME!r}, not {logits.name!r}")
        batch_dim: int | str = "batch" if batch is None else batch
        inputs = [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [batch_dim, 3, resolution, resolution])]
        outputs = [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [batch_dim, logits.channels])]
        return helper.make_graph(self.nodes, name, inputs, outputs, self.initializers)
