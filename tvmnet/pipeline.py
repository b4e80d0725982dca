"""The one Relax pass pipeline that tuning and building share.

MetaSchedule keys tuning records by the TIR workload of each fused function, so ``tune`` must extract
tasks from exactly the module that ``compile`` schedules: both call :func:`fuse`. Nothing else in
tvmnet defines a pass list.

On CPUs, convolutions run in NHWC with prepacked weights. ``ConvertLayout`` turns the ONNX model's NCHW
convolutions into NHWC ones (one transpose at the input, one before the classifier), and the weights of
every fused kernel are marked layout-free, so MetaSchedule's ``RewriteLayout`` may store each weight in
the order its schedule reads it; :func:`schedule` then folds that reordering into the constants. A 1x1
convolution then vectorizes over output channels instead of over the 7x7 or 14x14 pixels of MobileNet's
late layers: bench/README.md has the measurements. GPU targets keep NCHW: their DLight fallbacks expect it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import tvm
from tvm import relax

from .manifest import TVM_ALIGNMENT
from .expand_fusion import fuse_expand_pairs
from .prefetch import copied_from, prefetch_weights
from .search_space import MIN_SPLIT_ROWS

GPU_DEVICES = ("cuda", "opencl")


@dataclass
class ScheduleReport:
    """Which fused functions got a tuned schedule from the database, which fell back, and which kernels replace
    two of them with a fixed schedule (:mod:`tvmnet.expand_fusion`)."""

    tuned: list[str] = field(default_factory=list)
    fallback: list[str] = field(default_factory=list)
    fused: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.tuned) + len(self.fallback) + len(self.fused)

    def to_json(self) -> dict[str, object]:
        return {"tuned": sorted(self.tuned), "fallback": sorted(self.fallback), "fused": sorted(self.fused),
                "total": self.total}


CONV_LAYOUTS = {"NCHW": ["NCHW", "OIHW"], "NHWC": ["NHWC", "OHWI"]}
"""Convolution data and weight layouts :func:`fuse` can set (the ONNX model's is NCHW)."""


def _is_gpu(target: tvm.target.Target) -> bool:
    return "gpu" in target.keys


def conv_layout(target: tvm.target.Target) -> tuple[str, bool]:
    """The convolution layout :func:`fuse` uses for ``target`` and whether it prepacks weights."""
    return ("NCHW", False) if _is_gpu(target) else ("NHWC", True)


def _rewrite_relax_functions(mutator: relax.PyExprMutator, mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with each Relax function replaced by ``mutator``'s rewrite of it (its builder holds ``mod``)."""
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()


@relax.expr_functor.mutator
class _ClipAsMaxMin(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.clip = tvm.ir.Op.get("relax.clip")

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        if call.op != self.clip:
            return call
        x, low, high = call.args
        dtype = x.ty.dtype
        if not str(dtype).startswith("float"):
            return call
        result = x
        for op, bound, unbounded in ((relax.op.maximum, low, -math.inf), (relax.op.minimum, high, math.inf)):
            if float(bound.value) != unbounded:
                if result is not x:
                    result = self.builder_.emit(result)
                result = op(result, relax.const(float(bound.value), dtype))
        return result


def clip_as_max_min(mod: tvm.IRModule) -> tvm.IRModule:
    """Rewrite ``relax.clip`` on float tensors (ONNX Clip, HardSigmoid and HardSwish import as it) to
    ``maximum`` with the lower bound, then ``minimum`` with the upper, skipping infinite bounds.

    ConvertLayout has no layout rule for clip and would wrap every one in a pair of transposes, which
    also keeps MobileNetV3's HardSwish out of its convolution's fused kernel. The order is ONNX's and
    onnxruntime's: crossed bounds (lower > upper) give the upper one, where topi's clip would give the
    lower."""
    return _rewrite_relax_functions(_ClipAsMaxMin(mod), mod)


def fuse(mod: tvm.IRModule, target: tvm.target.Target, *, layout: str | None = None,
         prepack: bool | None = None) -> tvm.IRModule:
    """Simplify for inference, set the convolution layout, legalize to TIR and fuse: the module tasks are
    extracted from. ``layout`` ("NCHW" or "NHWC") and ``prepack`` (mark weights layout-free) default to
    NHWC with prepacking on CPUs and NCHW without on GPUs; bench/layout_lever.py sets them to compare."""
    default_layout, default_prepack = conv_layout(target)
    layout = layout or default_layout
    if layout not in CONV_LAYOUTS:
        raise ValueError(f"unknown convolution layout {layout!r}; choose from {', '.join(CONV_LAYOUTS)}")
    prepack = default_prepack if prepack is None else prepack
    mod = clip_as_max_min(mod)
    if layout != "NCHW":  # first: ConvertLayout fails on what DecomposeOpsForInference leaves
        try:
            mod = relax.transform.ConvertLayout({"relax.nn.conv2d": CONV_LAYOUTS[layout]})(mod)
        except RuntimeError:  # an op ConvertLayout cannot re-layout: the model keeps its NCHW (slower, correct)
            pass
    passes = [
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        relax.backend.DispatchSampling(),
        relax.backend.DispatchSortScan(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
        *([relax.transform.AttachAttrLayoutFreeBuffers()] if prepack else []),
    ]
    with target:
        return tvm.transform.Sequential(passes)(mod)


def _prim_func_names(mod: tvm.IRModule) -> list[str]:
    return [gv.name_hint for gv, func in mod.functions.items() if isinstance(func, tvm.tirx.PrimFunc)]


SCHEDULED_ATTRS = ("tirx.is_scheduled", "tir.is_scheduled")
"""MetaScheduleApplyDatabase marks the functions it scheduled with ``tirx.is_scheduled`` in TVM 0.27
(``tir.is_scheduled`` in older TVMs)."""


def _scheduled(mod: tvm.IRModule) -> set[str]:
    return {
        gv.name_hint
        for gv, func in mod.functions.items()
        if isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None
        and any(key in func.attrs and bool(func.attrs[key]) for key in SCHEDULED_ATTRS)
    }


def schedule(mod: tvm.IRModule, target: tvm.target.Target, database=None) -> tuple[tvm.IRModule, ScheduleReport]:
    """Fuse the pairs :mod:`tvmnet.expand_fusion` takes, apply tuned records where the database has them; GPU
    functions left over get DLight defaults."""
    mod, fused = fuse_expand_pairs(mod, target)
    before = _scheduled(mod)
    if database is not None:
        with target, database:
            mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
    tuned = _scheduled(mod) - before
    names = _prim_func_names(mod)
    if database is not None and conv_layout(target)[1]:
        # the weight reorderings tuned schedules asked for become their own functions on constants: fold
        # them; CanonicalizeBindings then drops the tuples of folded weights the split leaves behind, each
        # of which would otherwise cost the VM a make_tuple, two tuple_getitems and a kill per inference
        with target:
            mod = tvm.transform.Sequential([relax.transform.SplitLayoutRewritePreproc(),
                                            relax.transform.FoldConstant(),
                                            relax.transform.CanonicalizeBindings(),
                                            relax.transform.DeadCodeElimination()])(mod)
    if _is_gpu(target):
        from tvm.s_tir import dlight

        with target:
            mod = dlight.ApplyDefaultSchedule(
                dlight.gpu.Matmul(),
                dlight.gpu.GEMV(),
                dlight.gpu.Reduction(),
                dlight.gpu.GeneralReduction(),
                dlight.gpu.Fallback(),
            )(mod)
    return mod, ScheduleReport(tuned=sorted(tuned), fallback=sorted(set(names) - tuned - set(fused)), fused=fused)


PREPACKED_SUFFIX = "_prepacked"
"""SplitLayoutRewritePreproc builds a fused function whose weights it reordered as ``<name>_prepacked``."""


def fused_name(kernel: str) -> str:
    """The fused function (a tuning task's name) a kernel of the built module comes from."""
    return copied_from(kernel).removesuffix(PREPACKED_SUFFIX)


def static_dims(shape: relax.Expr) -> list[int] | None:
    """The dimensions of a ShapeExpr whose dimensions are all constants, else None."""
    if not isinstance(shape, relax.ShapeExpr) or not all(isinstance(d, tvm.tirx.IntImm) for d in shape.values):
        return None
    return [int(d) for d in shape.values]


@relax.expr_functor.mutator
class _CentreRowBands(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.alloc_storage = tvm.ir.Op.get("relax.memory.alloc_storage")
        self.alloc_tensor = tvm.ir.Op.get("relax.memory.alloc_tensor")
        self.storage_bytes: dict[relax.Var, int] = {}
        self.offset_tensors: list[relax.Var] = []  # variables bound to a tensor moved off its storage's start
        self.offset_params: dict[str, set[int]] = {}  # kernel -> positions that receive such a tensor
        self.uses_seen = 0  # uses of those variables: as a kernel's argument or a new name
        self.moved = False

    def _is_offset(self, expr: relax.Expr) -> bool:
        return isinstance(expr, relax.Var) and any(expr.same_as(var) for var in self.offset_tensors)

    def uses_in(self, mod: tvm.IRModule) -> int:
        """How often ``mod``'s Relax functions refer to a moved tensor: :attr:`uses_seen` if all are accounted."""
        uses = 0

        def count(expr: relax.Expr) -> None:
            nonlocal uses
            uses += self._is_offset(expr)

        for func in mod.functions.values():
            if isinstance(func, relax.Function):
                relax.analysis.post_order_visit(func.body, count)
        return uses

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        value = binding.value
        if isinstance(value, relax.Call) and value.op == self.alloc_storage:
            if (dims := static_dims(value.args[0])) is not None:
                self.storage_bytes[binding.var] = math.prod(dims)
        self.moved = False
        super().visit_var_binding_(binding)
        if self.moved or self._is_offset(value):  # the tensor itself, or a name the VM code gives it
            self.uses_seen += not self.moved
            self.offset_tensors.append(binding.var)

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        if isinstance(call.op, relax.GlobalVar):
            for position, arg in enumerate(call.args):
                if self._is_offset(arg):
                    self.offset_params.setdefault(call.op.name_hint, set()).add(position)
                    self.uses_seen += 1
        if call.op != self.alloc_tensor or call.args[0] not in self.storage_bytes:
            return call
        storage, offset, shape, dtype, device = call.args
        dims = static_dims(shape)
        if (dims is None or len(dims) != 4 or dims[1] < MIN_SPLIT_ROWS or not isinstance(offset, tvm.tirx.IntImm)
                or int(offset.value) != 0):
            return call
        nbytes = math.prod(dims) * tvm.runtime.DataType(dtype.value).itemsize
        centred = (self.storage_bytes[storage] - nbytes) // 2 // TVM_ALIGNMENT * TVM_ALIGNMENT
        if not centred:
            return call
        self.moved = True
        return relax.Call(call.op, [storage, relax.prim_value(tvm.tirx.IntImm("int64", centred)), shape, dtype, device],
                          call.attrs, call.ty_args)


def centre_row_bands(mod: tvm.IRModule) -> tvm.IRModule:
    """After ``StaticPlanBlockMemory``: place each planned 4-D tensor of :data:`MIN_SPLIT_ROWS` rows or more
    (its second dimension: rows in the NHWC layout of the CPU pipeline) with its middle at its storage's
    middle, and let the kernels that take one accept it at that offset.

    On such maps each of two threads writes one half of the rows, so one half of the tensor's bytes
    (:class:`search_space.SplitRows`). The planner puts tensors of different sizes in one storage at its
    start, so the boundary between the threads' bytes moved from layer to layer, and a core wrote lines the
    other core held: V1's 28x28 depthwise convolution took 82 µs in model order writing the storage a
    28x28x128 and a 56x56x128 tensor had used, 43 µs writing a buffer of its own. Centred, the boundary stays
    at the storage's middle, and the storage stays the one the planner chose, still in cache. Smaller maps
    stay at the start: most split columns or channels, and where 14x14 ones split rows, centring them gained
    nothing (bench/README.md items 42-43).

    TVM's kernels take tensors at offset 0 only; the ones that receive a centred tensor take it at any
    multiple of 64 bytes instead. Only those: a 14x14 kernel whose input could move slowed down 2.2x. A
    centred tensor used any other way (a VM builtin's view of it would keep the offset) leaves ``mod`` as
    the planner made it."""
    centring = _CentreRowBands(mod)
    centred = _rewrite_relax_functions(centring, mod)
    if centring.uses_in(centred) != centring.uses_seen:
        return mod
    mod = centred
    for gv, func in list(mod.functions.items()):
        if isinstance(func, tvm.tirx.PrimFunc) and gv.name_hint in centring.offset_params:
            for position in sorted(centring.offset_params[gv.name_hint]):
                func = with_param_buffer(func, position, any_offset=True) or func
            mod.update_func(gv, func)
    return mod


def lower(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Leave dataflow form and plan memory (on CPUs, with :func:`centre_row_bands`): what the VM code
    generator takes."""
    planning = [
        relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
        relax.transform.StaticPlanBlockMemory(),
    ]
    lowering = [
        *([relax.transform.RewriteCUDAGraph()] if target.kind.name == "cuda" else []),
        relax.transform.LowerAllocTensor(),
        relax.transform.KillAfterLastUse(),
        relax.transform.LowerRuntimeBuiltin(),
        relax.transform.ComputePrimValue(),
        relax.transform.VMShapeLower(),
        relax.transform.AttachGlobalSymbol(),
    ]
    with target:
        mod = tvm.transform.Sequential(planning)(mod)
        if not _is_gpu(target):
            mod = centre_row_bands(mod)
        return tvm.transform.Sequential(lowering)(mod)


INPUT_CHECKS = ("vm.builtin.check_tensor_info", "vm.builtin.match_shape")
"""The VM builtins the lowered ``main`` calls on an input besides its kernels: they read shape and dtype only."""


def _input_uses(mod: tvm.IRModule) -> dict[int, list[tuple[relax.GlobalVar, int]]] | None:
    """For each input of the lowered ``main``, the (kernel, argument position) pairs it is handed to
    directly; None if any input is used any other way (a view, a tuple, a subroutine, returned as is)."""
    params = list(mod["main"].params)
    kernels: dict[int, list[tuple[relax.GlobalVar, int]]] = {i: [] for i in range(len(params))}
    seen = [0] * len(params)
    accounted = [0] * len(params)

    def position(expr: relax.Expr) -> int | None:
        return next((i for i, param in enumerate(params) if expr.same_as(param)), None)

    def visit(expr: relax.Expr) -> None:
        if isinstance(expr, relax.Var) and (i := position(expr)) is not None:
            seen[i] += 1
        elif isinstance(expr, relax.Call):
            kernel = isinstance(expr.op, relax.GlobalVar) and isinstance(mod[expr.op], tvm.tirx.PrimFunc)
            check = isinstance(expr.op, relax.ExternFunc) and expr.op.global_symbol in INPUT_CHECKS
            for arg_index, arg in enumerate(expr.args):
                if (i := position(arg)) is not None and (kernel or check):
                    accounted[i] += 1
                    if kernel:
                        kernels[i].append((expr.op, arg_index))

    relax.analysis.post_order_visit(mod["main"].body, visit)
    return kernels if seen == accounted else None


def with_param_buffer(func: tvm.tirx.PrimFunc, index: int, *, alignment: int | None = None,
                      any_offset: bool = False) -> tvm.tirx.PrimFunc | None:
    """``func`` with parameter ``index``'s buffer declared ``alignment``-byte aligned, or (``any_offset``)
    taking the tensor at a byte offset, a multiple of 64 (None if that parameter is not a buffer). TVM's
    API cannot re-type a buffer variable (``specialize`` refuses another alignment), so this edits the
    serialized IR, where the parameter and every use of it share one type node."""
    graph = json.loads(tvm.ir.save_json(func))
    nodes = graph["nodes"]
    params = nodes[nodes[graph["root_index"]]["data"]["params"]]["data"]
    if index >= len(params):
        return None
    buffer_type = nodes[nodes[params[index]]["data"]["ty"]]
    if buffer_type["type"] != "tirx.BufferType":
        return None
    if alignment is not None:
        buffer_type["data"]["data_alignment"] = alignment
    offset = nodes[buffer_type["data"]["elem_offset"]]
    if any_offset and offset["type"] == "ir.IntImm":  # a constant 0: make it a variable the call binds
        itemsize = tvm.runtime.DataType(nodes[buffer_type["data"]["dtype"]]["data"]["dtype"]).itemsize
        nodes.append({"type": "ffi.String", "data": "elem_offset"})
        nodes.append({"type": "ir.Var", "data": {"span": 0, "ty": offset["data"]["ty"], "name": len(nodes) - 1}})
        buffer_type["data"]["elem_offset"] = len(nodes) - 1
        buffer_type["data"]["offset_factor"] = max(1, TVM_ALIGNMENT // itemsize)
    return tvm.ir.load_json(json.dumps(graph))


def accept_unaligned_inputs(mod: tvm.IRModule, target: tvm.target.Target) -> tuple[tvm.IRModule, int]:
    """Let the kernels that read the model's inputs take them at any address aligned to their element size;
    return the lowered module and the alignment in bytes the inputs now need (the manifest records it).

    TVM's kernels assume 64-byte aligned tensors and may use aligned vector loads: an input 16 bytes past a
    64-byte boundary, where numpy puts large arrays, crashed the first kernel of tiny MobileNetV2 and of
    tuned V3-Large here. So the runtime copied almost every caller's array into a tensor of its own. Declaring the input buffers of the
    kernels ``main`` hands the inputs to as element-aligned lets it pass the caller's array as it is. That
    is safe only if those kernels are the only readers: when an input is used any other way, or on GPU
    targets (whose inputs are copied to the device anyway), the module stays as it is and 64 is returned."""
    params = list(mod["main"].params)
    if _is_gpu(target) or not params or not all(isinstance(p.ty, relax.TensorType) for p in params):
        return mod, TVM_ALIGNMENT
    uses = _input_uses(mod)
    if uses is None:
        return mod, TVM_ALIGNMENT
    itemsizes = [tvm.runtime.DataType(str(param.ty.dtype)).itemsize for param in params]
    relaxed: dict[relax.GlobalVar, tvm.tirx.PrimFunc] = {}
    for i, kernels in uses.items():
        for gv, index in kernels:
            func = with_param_buffer(relaxed.get(gv, mod[gv]), index, alignment=itemsizes[i])
            if func is None:
                return mod, TVM_ALIGNMENT
            relaxed[gv] = func
    for gv, func in relaxed.items():
        mod.update_func(gv, func)
    return mod, max(itemsizes)


@dataclass
class Built:
    """A VM executable, which fused functions got tuned schedules, and the input alignment its kernels need."""

    executable: relax.Executable
    schedules: ScheduleReport
    input_alignment: int


def build(mod: tvm.IRModule, target: tvm.target.Target, database=None) -> Built:
    """Fused module -> VM executable, with tuned schedules applied where available and, on x86, the
    prefetches of large weights that :mod:`tvmnet.prefetch` adds to them."""
    scheduled, report = schedule(mod, target, database)
    scheduled, _ = prefetch_weights(scheduled, target)
    lowered, alignment = accept_unaligned_inputs(lower(scheduled, target), target)
    executable = relax.build(lowered, target=target, relax_pipeline=None)
    return Built(executable=executable, schedules=report, input_alignment=alignment)
