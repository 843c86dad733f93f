"""A numpy reference interpreter for the MIL ops edgecompile emits, so a saved .mlpackage can be executed and
verified on Linux, where Core ML itself cannot run (coremltools' Linux wheel has no libcoremlpython).

precision="fp32" computes every op in float32 and ignores fp16 casts: it proves the graph.
precision="fp16" follows the program's own dtypes: each op computes in float32 and its result is rounded to the
dtype the program declares for it, so ops the package keeps in fp32 (the timestep features) stay fp32, casts
are honoured, and fp16 ops store fp16 values, as the ANE/GPU do (fp16 storage, wider accumulation).

Ops are strict: each implementation's signature is the list of attributes it handles, and a program whose op
carries any other attribute is refused by name before anything runs (an ignored dilation or pad mode would
compute a silently wrong answer).
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import numpy as np
import torch

from edgecompile.choices import Precision
from edgecompile.coremltools_loader import mil_types, unpack_bits
from edgecompile.errors import EdgeCompileError

OPS: dict[str, Callable[..., Any]] = {}
FP16_MAX = 65504.0  # the largest finite fp16 value
OP_TYPE = "_op_type"  # passed to implementations that serve several op types and declare it


def op(*names: str):
    def register(fn):
        for n in names:
            OPS[n] = fn
        return fn

    return register


def handled_attributes(op_type: str) -> set[str]:
    """The MIL inputs an implementation handles: its signature's parameters."""
    return {p for p in inspect.signature(OPS[op_type]).parameters if p != OP_TYPE}


# ---- elementwise --------------------------------------------------------------------------------------
for _name, _fn in {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "real_div": np.divide, "maximum": np.maximum,
    "minimum": np.minimum, "pow": np.power, "greater": np.greater, "greater_equal": np.greater_equal, "less": np.less,
    "less_equal": np.less_equal, "equal": np.equal, "not_equal": np.not_equal, "logical_and": np.logical_and,
    "logical_or": np.logical_or,
}.items():
    OPS[_name] = (lambda f: lambda x, y: f(x, y))(_fn)

for _name, _fn in {
    "sin": np.sin, "cos": np.cos, "exp": np.exp, "sqrt": np.sqrt, "tanh": np.tanh, "abs": np.abs,
    "relu": lambda x: np.maximum(x, 0), "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
    "silu": lambda x: x / (1.0 + np.exp(-x)), "square": np.square, "identity": lambda x: x,
}.items():
    OPS[_name] = (lambda f: lambda x: f(x))(_fn)


@op("select")
def _select(cond, a, b):
    return np.where(np.asarray(cond).astype(bool), a, b)


@op("gather")
def _gather(x, indices, axis=0, batch_dims=0, validate_indices=False):
    if batch_dims:
        raise ValueError("gather with batch_dims is not implemented")
    return np.take(x, np.asarray(indices).astype(np.int64), axis=int(axis))


@op("gather_along_axis")
def _gather_along_axis(x, indices, axis=0, validate_indices=False):
    return np.take_along_axis(x, np.asarray(indices).astype(np.int64), axis=int(axis))


@op("one_hot")
def _one_hot(indices, one_hot_vector_size, axis=-1, on_value=1.0, off_value=0.0):
    idx = np.asarray(indices).astype(np.int64)
    out = np.where(np.arange(int(one_hot_vector_size)) == idx[..., None], on_value, off_value)
    return np.moveaxis(out, -1, int(axis)) if int(axis) != -1 else out


@op("reduce_argmax")
def _reduce_argmax(x, axis=-1, keep_dims=False, output_dtype="int32"):
    out = np.argmax(x, axis=int(axis))
    return (np.expand_dims(out, int(axis)) if keep_dims else out).astype(np.int32)


@op("upsample_nearest_neighbor")
def _upsample_nearest(x, scale_factor_height=1, scale_factor_width=1):
    sh, sw = float(scale_factor_height), float(scale_factor_width)
    if sh != int(sh) or sw != int(sw):
        raise ValueError("fractional nearest-neighbour scales are not implemented")
    return np.repeat(np.repeat(x, int(sh), axis=-2), int(sw), axis=-1)


@op("clip")
def _clip(x, alpha, beta):
    return np.clip(x, alpha, beta)


@op("rsqrt")
def _rsqrt(x, epsilon=1e-12):
    return 1.0 / np.sqrt(x + epsilon)


@op("gelu")
def _gelu(x, mode="EXACT"):
    if mode == "SIGMOID_APPROXIMATION":
        return x / (1 + np.exp(-1.702 * x))
    # torch's kernel, the same formulas in float32: scipy's erf took 0.54 s a call on a paper-scale FFN (36 s of a
    # 173 s verify); torch's is vectorised and threaded
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return torch.nn.functional.gelu(t, approximate="tanh" if mode == "TANH_APPROXIMATION" else "none").numpy()


@op("softmax")
def _softmax(x, axis=-1):
    # torch's kernel (max-subtracted, float32): numpy's three passes took 7.9 s of a paper-scale verify's 63 s run
    with torch.no_grad():
        return torch.softmax(_t(x), dim=int(axis)).numpy()


@op("layer_norm")
def _layer_norm(x, axes, gamma=None, beta=None, epsilon=1e-5):
    axes = tuple(int(a) for a in np.atleast_1d(axes))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    out = (x - mean) / np.sqrt(var + epsilon)
    shape = [1] * x.ndim
    for a in axes:
        shape[a] = x.shape[a]
    if gamma is not None:
        out = out * gamma.reshape(shape)
    if beta is not None:
        out = out + beta.reshape(shape)
    return out


def _per_channel(v, ndim):
    return None if v is None else np.asarray(v).reshape((1, -1) + (1,) * (ndim - 2))


@op("batch_norm")
def _batch_norm(x, mean, variance, gamma=None, beta=None, epsilon=1e-5):
    """Inference batch norm over axis 1 (coremltools folds per-channel mul+add constants into it)."""
    out = (x - _per_channel(mean, x.ndim)) / np.sqrt(_per_channel(variance, x.ndim) + epsilon)
    if gamma is not None:
        out = out * _per_channel(gamma, x.ndim)
    if beta is not None:
        out = out + _per_channel(beta, x.ndim)
    return out


@op("instance_norm")
def _instance_norm(x, gamma=None, beta=None, epsilon=1e-5):
    axes = tuple(range(2, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    out = (x - mean) / np.sqrt(((x - mean) ** 2).mean(axis=axes, keepdims=True) + epsilon)
    if gamma is not None:
        out = out * _per_channel(gamma, x.ndim)
    if beta is not None:
        out = out + _per_channel(beta, x.ndim)
    return out


@op("reduce_mean", "reduce_sum", "reduce_max")
def _reduce(x, axes=None, keep_dims=False, _op_type="reduce_mean"):
    fn = {"reduce_mean": np.mean, "reduce_sum": np.sum, "reduce_max": np.max}[_op_type]
    return fn(x, axis=None if axes is None else tuple(int(a) for a in np.atleast_1d(axes)), keepdims=bool(keep_dims))


# ---- shape ----------------------------------------------------------------------------------------------
@op("reshape")
def _reshape(x, shape):
    shape = [x.shape[i] if s == 0 else int(s) for i, s in enumerate(np.atleast_1d(shape))]
    return x.reshape(shape)


@op("transpose")
def _transpose(x, perm):
    return np.transpose(x, [int(p) for p in perm])


@op("expand_dims")
def _expand_dims(x, axes):
    for a in sorted(int(v) for v in np.atleast_1d(axes)):
        x = np.expand_dims(x, a)
    return x


@op("squeeze")
def _squeeze(x, axes=None):
    return np.squeeze(x, axis=None if axes is None else tuple(int(a) for a in np.atleast_1d(axes)))


@op("pad")
def _pad(x, pad, mode="constant", constant_val=0.0):
    """MIL pad: `pad` holds (before, after) pairs for the last len(pad) / 2 axes (diffusers' Downsample2D pads (0, 1, 0, 1))."""
    pairs = np.asarray(pad, dtype=np.int64).reshape(-1, 2)
    widths = [(0, 0)] * (x.ndim - len(pairs)) + [tuple(int(v) for v in p) for p in pairs]
    mode = str(mode)
    if mode == "constant":
        return np.pad(x, widths, mode="constant", constant_values=np.asarray(constant_val, dtype=x.dtype))
    if mode in ("reflect", "replicate"):
        return np.pad(x, widths, mode="reflect" if mode == "reflect" else "edge")
    raise EdgeCompileError(f"the MIL interpreter does not support pad(mode={mode!r})")


@op("concat")
def _concat(values, axis, interleave=False):
    if interleave:
        raise EdgeCompileError("the MIL interpreter does not support concat(interleave=True)")
    if all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in values):  # torch's copy is threaded (7.0 s -> less)
        return torch.cat([_t(v) for v in values], dim=int(axis)).numpy()
    return np.concatenate(values, axis=int(axis))


@op("split")
def _split(x, axis, num_splits=None, split_sizes=None):
    axis = int(axis)
    if split_sizes is None:
        return np.split(x, int(num_splits), axis=axis)
    return np.split(x, np.cumsum(split_sizes)[:-1], axis=axis)


@op("slice_by_index")
def _slice_by_index(x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    idx = []
    for i in range(x.ndim):
        b = None if begin_mask is not None and begin_mask[i] else int(begin[i])
        e = None if end_mask is not None and end_mask[i] else int(end[i])
        s = 1 if stride is None else int(stride[i])
        if squeeze_mask is not None and squeeze_mask[i]:
            idx.append(int(begin[i]))
        else:
            idx.append(slice(b, e, s))
    return x[tuple(idx)]


@op("tile")
def _tile(x, reps):
    return np.tile(x, [int(r) for r in reps])


@op("pixel_shuffle")
def _pixel_shuffle(x, upscale_factor):
    r = int(upscale_factor)
    n, c, h, w = x.shape
    return x.reshape(n, c // (r * r), r, r, h, w).transpose(0, 1, 4, 2, 5, 3).reshape(n, c // (r * r), h * r, w * r)


@op("cast")
def _cast(x, dtype):
    """Float casts keep float32 here: the interpreter rounds the result to the cast's declared dtype (fp16 mode)."""
    if dtype in ("fp16", "fp32"):
        return np.asarray(x, dtype=np.float32)
    return np.asarray(x).astype({"int32": np.int32, "bool": bool, "int16": np.int16, "int8": np.int8, "uint8": np.uint8}[dtype])


# ---- linear algebra, in float32 like every other op -------------------------------------------------------------
# numpy has no fast convolution (a 2x2 stride-2 conv of 720 channels took 8.3 s against torch's 34 ms) and its
# einsum is slow on split-einsum attention's shapes: those run on torch's CPU kernels. Matrix products (linear,
# matmul, 1x1 convs) stay on numpy's BLAS, which was faster there (benchmarks/interpreter_kernels.py).
def _t(x) -> torch.Tensor:
    """x as a float32 torch tensor, sharing numpy's memory where it can: a transposed view goes in as strides
    (torch's kernels read them) instead of a copy (6 s of copies in a paper-scale verify)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim and min(x.strides) >= 0 and all(st % x.itemsize == 0 for st in x.strides):
        return torch.from_numpy(x)
    return torch.from_numpy(np.ascontiguousarray(x))


@op("einsum")
def _einsum(values, equation):
    with torch.no_grad():
        return torch.einsum(equation, *(_t(v) for v in values)).numpy()


@op("matmul")
def _matmul(x, y, transpose_x=False, transpose_y=False):
    if transpose_x:
        x = np.swapaxes(x, -1, -2)
    if transpose_y:
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


@op("linear")
def _linear(x, weight, bias=None):
    out = x @ weight.T
    return out if bias is None else out + bias


def _pads(pad_type, pad, kernel, strides, dilations, in_hw):
    if pad_type == "valid":
        return [0, 0, 0, 0]
    if pad_type == "custom":
        return [int(p) for p in pad]
    if pad_type in ("same", "same_lower"):
        out = []
        for k, s, d, n in zip(kernel, strides, dilations, in_hw):
            total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
            lo = total // 2 if pad_type == "same" else total - total // 2
            out += [lo, total - lo]
        return out
    raise EdgeCompileError(f"the MIL interpreter does not support conv pad_type {pad_type!r}")


@op("conv")
def _conv(x, weight, bias=None, strides=(1, 1), pad_type="valid", pad=(0, 0, 0, 0), dilations=(1, 1), groups=1):
    if x.ndim != 4:
        raise EdgeCompileError(f"the MIL interpreter supports 2-D conv only (got rank {x.ndim})")
    groups = int(groups)
    cout, cin_g, kh, kw = weight.shape
    sh, sw = (int(s) for s in strides)
    dh, dw = (int(d) for d in dilations)
    t, b, l, r = _pads(pad_type, pad, (kh, kw), (sh, sw), (dh, dw), x.shape[2:])
    if kh == kw == 1 and groups == 1 and sh == sw == 1 and not (t or b or l or r):  # a matrix product: numpy's BLAS
        n, cin, h, w = x.shape
        out = np.matmul(weight[:, :, 0, 0], x.reshape(n, cin, h * w)).reshape(n, cout, h, w)
        return out if bias is None else out + bias.reshape(1, -1, 1, 1)
    xt = _t(x)
    if t or b or l or r:
        xt = torch.nn.functional.pad(xt, (l, r, t, b))
    with torch.no_grad():
        return torch.nn.functional.conv2d(xt, _t(weight), None if bias is None else _t(bias), stride=(sh, sw), dilation=(dh, dw),
                                          groups=groups).numpy()


@op("conv_transpose")
def _conv_transpose(x, weight, bias=None, strides=(1, 1), pad_type="valid", pad=(0, 0, 0, 0), dilations=(1, 1),
                    groups=1, output_shape=None):
    if int(groups) != 1 or any(int(d) != 1 for d in dilations):
        raise EdgeCompileError("the MIL interpreter supports conv_transpose with groups=1 and dilation 1 only")
    sh, sw = (int(s) for s in strides)
    with torch.no_grad():  # MIL's conv_transpose weight is (C_in, C_out / groups, kh, kw), as torch's
        full = torch.nn.functional.conv_transpose2d(_t(x), _t(weight), stride=(sh, sw)).numpy()
    t, b, l, r = [int(p) for p in pad] if pad_type == "custom" else [0, 0, 0, 0]
    out = full[:, :, t : full.shape[2] - b, l : full.shape[3] - r]
    if output_shape is not None:
        out = out[:, :, : int(output_shape[2]), : int(output_shape[3])]
    if bias is not None:
        out = out + bias.reshape(1, -1, 1, 1)
    return out


# ---- compressed weights ----------------------------------------------------------------------------------------
@op("constexpr_lut_to_dense")
def _lut_to_dense(indices=None, lut=None, shape=None, vector_axis=None):
    """iOS18: indices (uint, weight shape) + lut (..., 2^n, vector) with per-group broadcasting; iOS16/17:
    packed uint8 indices + flat lut + shape. Either way each weight element is lut[group][index]."""
    if shape is not None:  # iOS16/17 form
        nbits = int(math.log2(lut.shape[-1]))
        idx = unpack_bits(indices, nbits, int(np.prod(shape)))
        return lut[idx].reshape([int(s) for s in shape])
    rank = indices.ndim
    lut_groups = lut.shape[:rank]
    out = np.empty(indices.shape, dtype=lut.dtype)
    block = [indices.shape[i] // lut_groups[i] for i in range(rank)]
    for g in np.ndindex(*lut_groups):
        sl = tuple(slice(g[i] * block[i], (g[i] + 1) * block[i]) for i in range(rank))
        out[sl] = lut[g][..., 0][indices[sl]]
    return out


def _dtype_name(var) -> str:
    try:
        return mil_types().builtin_to_string(var.dtype)
    except Exception:  # non-tensor types (tuples, strings) carry no float dtype
        return ""


class MILInterpreter:
    """Executes one function of a pymil Program with numpy (`function`: default 'main')."""

    def __init__(self, program, precision: str = "fp32", function: str = "main"):
        precision = Precision.parse(precision, "--precision").value
        if function not in program.functions:
            raise EdgeCompileError(f"the package has no function {function!r} (functions: {', '.join(program.functions)})")
        self.function = program.functions[function]
        self.precision = precision
        self.overflows: list[str] | None = None  # fp16 mode: the ops whose fp16 result overflowed (find_overflows)
        ops = [o for o in self.function.operations if o.op_type != "const"]
        unknown = sorted({o.op_type for o in ops if o.op_type not in OPS})
        if unknown:
            raise EdgeCompileError(
                f"the package uses MIL op(s) the reference interpreter does not implement: {', '.join(unknown)} "
                "(verify it on macOS with Core ML, or export without the option that introduced them)"
            )
        handled = {t: handled_attributes(t) for t in {o.op_type for o in ops}}
        for o in ops:
            extra = sorted(set(o.inputs) - handled[o.op_type])
            if extra:
                raise EdgeCompileError(
                    f"op {o.name} ({o.op_type}) has attribute(s) {', '.join(extra)} that the reference interpreter does not handle: "
                    "it refuses rather than compute a wrong answer (verify on macOS with Core ML)"
                )
        self._wants_op_type = {t for t in handled if OP_TYPE in inspect.signature(OPS[t]).parameters}
        # the dtype each value is stored in: fp16-declared values are rounded in the faithful (fp16) mode only
        self._fp16 = {v.name for o in self.function.operations for v in o.outputs if _dtype_name(v) == "fp16"}
        # values dropped after their last reader, so that memory holds the live values only (at 1024² the whole
        # program's values, decoded weights included, do not fit a laptop)
        last_reader: dict[str, int] = {}
        for i, o in enumerate(self.function.operations):
            for out in o.outputs:
                last_reader[out.name] = i  # an output nobody reads goes right after its op
            for v in o.inputs.values():
                for var in v if isinstance(v, (list, tuple)) else [v]:
                    last_reader[var.name] = i
        outputs = {v.name for v in self.function.outputs}
        self._release_after: dict[int, list[str]] = {}
        for name, i in last_reader.items():
            if name not in outputs:
                self._release_after.setdefault(i, []).append(name)

    def _store(self, name: str, v):
        """A value as the program stores it: float32 arithmetic, rounded to fp16 where the program says fp16."""
        if isinstance(v, np.ndarray) and v.dtype.kind == "f":
            v = v.astype(np.float32, copy=False)  # a copy only where the dtype changes (23 s of copies in a paper-scale verify)
            if self.precision == "fp16" and name in self._fp16:  # round to fp16 and back: torch's cast, vectorised
                return torch.from_numpy(np.ascontiguousarray(v)).half().float().numpy()  # (numpy's is elementwise in C)
            return v
        if isinstance(v, (np.floating, float)) and not isinstance(v, bool):
            return np.float32(np.float16(v)) if self.precision == "fp16" and name in self._fp16 else np.float32(v)
        return v

    def find_overflows(self, inputs: dict[str, np.ndarray]) -> list[str]:
        """The ops whose result, finite in fp32, overflows fp16 where the program stores it in fp16: where an fp16
        package turns to inf on these inputs (fp16 mode only). In program order, each op once."""
        if self.precision != "fp16":
            raise ValueError("overflows are found in the fp16 emulation: MILInterpreter(program, precision='fp16')")
        self.overflows = []
        try:
            self.run(inputs)
            return list(dict.fromkeys(self.overflows))
        finally:
            self.overflows = None

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Overflow to inf and NaN are what a broken package computes on device too: verification counts non-finite
        # outputs and fails them, so numpy's warnings would only repeat it on stderr.
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return self._run(inputs)

    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        env: dict[str, Any] = {}
        for name in self.function.inputs:
            if name not in inputs:
                raise EdgeCompileError(f"missing input {name!r} for the package (inputs: {', '.join(self.function.inputs)})")
            env[name] = self._store(name, np.asarray(inputs[name]))

        def value(v):
            if isinstance(v, (list, tuple)):
                return [value(x) for x in v]
            if v.name in env:
                return env[v.name]
            if v.val is not None:
                env[v.name] = self._store(v.name, v.val)
                return env[v.name]
            raise EdgeCompileError(f"MIL interpreter: no value for variable {v.name}")

        for i, o in enumerate(self.function.operations):
            if o.op_type == "const":
                continue  # read when an op needs it (value() stores it until its last reader)
            kwargs = {k: value(v) for k, v in o.inputs.items()}
            if o.op_type in self._wants_op_type:
                kwargs[OP_TYPE] = o.op_type
            try:
                result = OPS[o.op_type](**kwargs)
            except EdgeCompileError:
                raise
            except Exception as e:  # a broken graph or an op variant we do not know: say which op
                raise EdgeCompileError(f"MIL interpreter failed on op {o.name} ({o.op_type}): {e}") from None
            results = result if isinstance(result, list) else [result]
            for var, val in zip(o.outputs, results):
                val = np.asarray(val)
                if self.overflows is not None and var.name in self._fp16 and val.dtype.kind == "f" and val.size \
                        and np.isfinite(val).all() and float(np.abs(val).max()) > FP16_MAX:
                    self.overflows.append(o.name)  # finite in fp32, infinite once stored in fp16
                env[var.name] = self._store(var.name, val)
            for name in self._release_after.get(i, ()):
                env.pop(name, None)
        return {v.name: np.asarray(value(v)).astype(np.float32) for v in self.function.outputs}
