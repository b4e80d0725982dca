"""One kernel for an expansion on a large map and the stride-2 depthwise convolution it feeds (x86, AVX-512).

MobileNetV2's second block expands 16 channels to 96 at 112x112 with a 1x1 convolution, then a 3x3 depthwise
convolution with stride 2 reads the expanded map back: 4.8 MB between two kernels, beyond a core's L2, so the
depthwise kernel reads it from L3 or memory. Here the pair becomes one kernel: per band of output rows, the
expanded rows the band's taps read (its halo rows computed twice) and then the depthwise convolution on them
while they are still in L2. On an AMD Zen 4 (1 MB of L2), built against the same logs without it and timed in
one process in both load orders, V2 ran 0.964 and 0.953x, V3-Large (16 to 64 channels, ReLU) 0.941 and 0.955x;
on an Intel Xeon with 2 MB of L2 the V2 pair alone took 0.83x in model order (bench/README.md items 33 and 48).
Smaller maps and wider inputs lost or did not gain (:data:`MIN_ROWS`, :data:`MAX_INPUTS`).

The kernel's schedule is fixed (:func:`schedule_expand`; tiles searched by MetaSchedule did no better in the
model). The pass runs on the fused module before tuned records are applied, so the two kernels' records simply
no longer apply. Each pair is checked numerically against the two kernels it replaces before it is fused, with
each activation of :data:`EPILOGUES` in turn, so a pair with any other (MobileNetV3's HardSwish) stays as it
was."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te

from .prefetch import replace_calls
from .targets import vector_isa

MIN_ROWS = 112
"""Pairs whose input map has fewer rows stay two kernels. In V2's model order on the Zen 4, every pair at 56x56
and below ran 1.1-1.7x slower fused; V2-0.5-160's 80x80 pair ran 0.87-0.90x, but the whole model only 0.997 and
0.983x, undecided (bench/README.md item 48)."""
MAX_INPUTS = 16
"""Expansions reading more channels stay two kernels: V1's 32->64 pair at 112x112 (ReLU) ran 0.94x fused in model
order, but V1 as a whole 1.030 and 0.981x, then 1.005 and 0.996x; V2's 16->96 and V3-Large's 16->64 pairs won
3.6-4.7% and 4.5-5.9% of their models (item 48)."""
STRIDE = 2
TILE = (4, 6, 7)
"""Output rows per band, pixels per register tile of the 1x1 part, pixels per tile of the depthwise part (the
sizes ``separable_fusion.py`` measured; vectors per 1x1 tile: :func:`vectors_per_tile`)."""
FUSED_PREFIX = "fused_expand_depthwise"
CHECK_TOLERANCE = 1e-4


def applies_to(target: tvm.target.Target) -> bool:
    """x86 CPUs with AVX-512, the only ones where the fused kernel was measured."""
    return vector_isa(target) == "avx512f"


EPILOGUES = (6.0, None)
"""The activations a pair may have, as the upper bound of a ReLU: ReLU6 (MobileNetV2), plain ReLU (MobileNetV1
and some of V3's blocks)."""


def _relu(x, upper: float | None):
    return te.max(x, 0.0) if upper is None else te.min(te.max(x, 0.0), upper)


def define_expand(height: int, width: int, inputs: int, channels: int, stride: int,
                  upper: float | None = 6.0) -> tvm.tirx.PrimFunc:
    """NHWC 1x1 from ``inputs`` to ``channels`` + bias + ReLU (capped at ``upper`` unless None), then depthwise
    3x3 (pad 1, ``stride``) + bias + the same ReLU. The 1x1 runs over the padded grid and its epilogue zeroes the
    border, so the taps need no bounds checks and the epilogue stays in the 1x1's register tile."""
    out_h, out_w = height // stride, width // stride
    data = te.placeholder((1, height, width, inputs), name="data")
    pw_weight = te.placeholder((inputs, channels), name="pw_weight")
    pw_bias = te.placeholder((channels,), name="pw_bias")
    dw_weight = te.placeholder((3, 3, channels), name="dw_weight")
    dw_bias = te.placeholder((channels,), name="dw_bias")

    def inside(h, w):
        return tvm.tirx.all(h >= 1, h <= height, w >= 1, w <= width)

    pad = te.compute((1, height + 2, width + 2, inputs),
                     lambda n, h, w, c: tvm.tirx.if_then_else(inside(h, w), data[n, h - 1, w - 1, c], 0.0), name="pad")
    rc = te.reduce_axis((0, inputs), "rc")
    pw = te.compute((1, height + 2, width + 2, channels),
                    lambda n, h, w, c: te.sum(pad[n, h, w, rc] * pw_weight[rc, c], axis=rc), name="pw")
    mid = te.compute((1, height + 2, width + 2, channels), lambda n, h, w, c: tvm.tirx.if_then_else(
        inside(h, w), _relu(pw[n, h, w, c] + pw_bias[c], upper), 0.0), name="mid")
    out = te.compute((1, out_h, out_w, channels), lambda n, h, w, c: _relu(sum(
        mid[n, h * stride + ry, w * stride + rx, c] * dw_weight[ry, rx, c] for ry in range(3) for rx in range(3))
        + dw_bias[c], upper), name="out")
    return te.create_prim_func([data, pw_weight, pw_bias, dw_weight, dw_bias, out])


def vector_lanes(channels: int) -> int:
    return 16 if channels % 16 == 0 else 8


def vectors_per_tile(channels: int) -> int:
    return 2 if channels % 32 == 0 else 1


def schedule_expand(sch, rows, pw_width, pw_blocks, dw_width) -> None:
    """Parallel over bands of ``rows`` output rows; per band, the padded input rows and the 1x1 over the rows
    the band's taps read, in register tiles of ``pw_width`` pixels by ``pw_blocks`` vectors of channels with
    the epilogue inside the tile, then the depthwise in tiles of ``dw_width`` pixels by one vector. The sizes
    are ints or sampled variables (``bench/separable_fusion.py --trials`` searches them)."""
    out, mid, pw, pad = (sch.get_sblock(name) for name in ("out", "mid", "pw", "pad"))
    n, h, w, c = sch.get_loops(out)
    vector = vector_lanes(int(sch.get(c).extent))
    h0, h1 = sch.split(h, [None, rows])
    w0, w1 = sch.split(w, [None, dw_width])
    c0, c1 = sch.split(c, [None, vector])
    sch.reorder(h0, h1, w0, c0, w1, c1)
    sch.parallel(sch.fuse(n, h0))
    sch.unroll(w1)
    sch.vectorize(c1)
    band = sch.get_loops(out)[0]
    for block in (mid, pw, pad):
        sch.compute_at(block, band)
    _band, ph, pw_w, pc, prc = sch.get_loops(pw)
    pw_w0, pw_w1 = sch.split(pw_w, [None, pw_width])
    pc0, pc1, pc2 = sch.split(pc, [None, pw_blocks, vector])
    sch.reorder(ph, pw_w0, pc0, prc, pw_w1, pc1, pc2)
    sch.unroll(pw_w1)
    sch.unroll(pc1)
    sch.vectorize(pc2)
    sch.reverse_compute_at(mid, pc0)
    sch.decompose_reduction(pw, prc)
    sch.vectorize(sch.get_loops(mid)[-1])
    sch.vectorize(sch.get_loops(pad)[-1])


def fused_kernel(height: int, width: int, inputs: int, channels: int, upper: float | None) -> tvm.tirx.PrimFunc:
    """The scheduled kernel for one pair, marked scheduled so that tuned records leave it alone."""
    from tvm.s_tir import Schedule

    from .pipeline import SCHEDULED_ATTRS

    sch = Schedule(define_expand(height, width, inputs, channels, STRIDE, upper))
    rows, pw_width, dw_width = TILE
    schedule_expand(sch, rows, pw_width, vectors_per_tile(channels), dw_width)
    func = sch.mod["main"]
    for key in SCHEDULED_ATTRS:
        func = func.with_attr(key, True)
    return func


def _shape(expr: relax.Expr) -> tuple[int, ...] | None:
    """The static shape of a float32 tensor, else None."""
    from .pipeline import static_dims

    dims = static_dims(getattr(expr.ty, "shape", None)) if getattr(expr.ty, "dtype", None) == "float32" else None
    return None if dims is None else tuple(dims)


def _pair_shape(first: relax.Call, second: relax.Call) -> tuple[int, int, int, int] | None:
    """(height, width, inputs, channels) where ``first`` is a 1x1 NHWC convolution with constant OHWI weights and
    a (1, 1, 1, C) bias and ``second`` a 3x3 depthwise one with stride 2 on its output, on a map of at least
    MIN_ROWS rows from at most MAX_INPUTS channels; None otherwise. Shapes only: :func:`_same_results` checks
    what the kernels compute."""
    if len(first.args[1].fields) != 3 or len(second.args[1].fields) != 3:
        return None
    x, w1, b1 = first.args[1].fields
    _y, w2, b2 = second.args[1].fields
    if not all(isinstance(c, tvm.ir.expr.Constant) for c in (w1, b1, w2, b2)):
        return None
    shapes = [_shape(e) for e in (x, w1, b1, w2, b2)] + [_shape(first), _shape(second)]
    if None in shapes or len(shapes[0]) != 4:
        return None
    (n, height, width, inputs), w1s, b1s, w2s, b2s, mid, out = shapes
    channels = w1s[0]
    if (n, w1s, b1s, w2s, b2s, mid) != (1, (channels, 1, 1, inputs), (1, 1, 1, channels), (channels, 3, 3, 1),
                                        (1, 1, 1, channels), (1, height, width, channels)):
        return None
    if out != (1, height // STRIDE, width // STRIDE, channels) or height % STRIDE or width % STRIDE:
        return None
    return (height, width, inputs, channels) if height >= MIN_ROWS and inputs <= MAX_INPUTS else None


def _constants(call: relax.Call) -> list[np.ndarray]:
    return [field.value.numpy() for field in call.args[1].fields[1:]]


def _fused_weights(first: relax.Call, second: relax.Call) -> list[np.ndarray]:
    """The pair's constants in the fused kernel's layouts: (inputs, C), (C,), (3, 3, C), (C,)."""
    (w1, b1), (w2, b2) = _constants(first), _constants(second)
    channels = w1.shape[0]
    return [np.ascontiguousarray(w1.reshape(channels, -1).T), b1.reshape(channels),
            np.ascontiguousarray(w2.reshape(channels, 3, 3).transpose(1, 2, 0)), b2.reshape(channels)]


def _same_results(mod: tvm.IRModule, first: relax.Call, second: relax.Call, fused: tvm.tirx.PrimFunc,
                  weights: list[np.ndarray], shape: tuple[int, int, int, int]) -> bool:
    """Whether the fused kernel computes what the two kernels compute, on a seeded input large enough to drive
    the expansion past its activation's bounds. Compiled for a generic CPU: what matters is the arithmetic."""
    height, width, inputs, channels = shape
    host = tvm.target.Target({"kind": "llvm"})

    def run(func: tvm.tirx.PrimFunc, arrays: list[np.ndarray], out_shape: tuple[int, ...]) -> np.ndarray:
        out = tvm.runtime.tensor(np.zeros(out_shape, "float32"))
        kernel = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=host)
        kernel["main"](*(tvm.runtime.tensor(a) for a in arrays), out)
        return out.numpy()

    data = (np.random.default_rng(0).standard_normal((1, height, width, inputs)) * 4).astype("float32")
    out_shape = (1, height // STRIDE, width // STRIDE, channels)
    mid = run(mod[first.args[0]], [data, *_constants(first)], (1, height, width, channels))
    want = run(mod[second.args[0]], [mid, *_constants(second)], out_shape)
    got = run(fused, [data, *weights], out_shape)
    return bool(np.allclose(got, want, rtol=CHECK_TOLERANCE, atol=CHECK_TOLERANCE))


def fuse_expand_pairs(mod: tvm.IRModule, target: tvm.target.Target) -> tuple[tvm.IRModule, list[str]]:
    """``mod`` (fused, not yet scheduled) with each qualifying expansion and the stride-2 depthwise convolution
    it feeds replaced by one scheduled kernel, and the names of those kernels."""
    if not applies_to(target) or "main" not in [gv.name_hint for gv in mod.get_global_vars()]:
        return mod, []
    call_tir = tvm.ir.Op.get("relax.call_tir")
    producers: dict[relax.Var, relax.Call] = {}
    uses: dict[relax.Var, int] = {}
    pairs: list[tuple[relax.Call, relax.Call]] = []

    def count(expr: relax.Expr) -> None:
        if isinstance(expr, relax.Var):
            uses[expr] = uses.get(expr, 0) + 1

    relax.analysis.post_order_visit(mod["main"].body, count)
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Call) and value.op.same_as(call_tir) and isinstance(value.args[1], relax.Tuple):
                producers[binding.var] = value
                source = value.args[1].fields[0] if value.args[1].fields else None
                if source in producers and uses.get(source) == 1:
                    pairs.append((producers[source], value))
    builder = relax.BlockBuilder(mod)
    replacements: list[tuple[relax.Call, relax.Call]] = []
    for first, second in pairs:
        shape = _pair_shape(first, second)
        if shape is None:
            continue
        weights = _fused_weights(first, second)
        kernel = next((k for k in (fused_kernel(*shape, upper) for upper in EPILOGUES)
                       if _same_results(mod, first, second, k, weights, shape)), None)
        if kernel is None:
            continue
        gv = builder.add_func(kernel, f"{FUSED_PREFIX}{len(replacements)}")
        fields = relax.Tuple([first.args[1].fields[0], *(relax.const(w) for w in weights)])
        replacements.append((second, relax.Call(second.op, [gv, fields, *second.args[2:]], second.attrs,
                                                second.ty_args)))
    if not replacements:
        return mod, []
    return replace_calls(builder.get(), replacements), sorted(new.args[0].name_hint for _old, new in replacements)
