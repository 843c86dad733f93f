"""The pipeline's other components as Core ML packages (text encoders, VAE decoder and encoder): conversion with
fp16 overflow found and kept in fp32, and verification of the package against its fp32 torch graph.

fp16 islands. A component converted to fp16 is run in the interpreter's faithful fp16 emulation on calibration
inputs; every op whose result overflows fp16 there (finite in fp32, infinite once stored in fp16) is converted
again in fp32, and the check repeats until no op overflows (at most MAX_ISLAND_ROUNDS rounds, then the whole
component in fp32). `ComponentResult` records the islands and the verification before and after them.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from dataclasses import dataclass, field

import numpy as np
import torch

from edgecompile.coreml.interpreter import MILInterpreter
from edgecompile.coreml.palettize import PALETTIZE_PASS, check_palettized, palettization_config
from edgecompile.coremltools_loader import import_coremltools, quiet_coremltools
from edgecompile.errors import EdgeCompileError
from edgecompile.jsonutil import finite_or_none
from edgecompile.metrics import psnr_db

MAX_ISLAND_ROUNDS = 6
FP16_SUFFIX = "_cast_fp16"  # what coremltools' fp16 pass appends to the name of each op it moves to fp16
DEFAULT_MIN_PSNR_DB = 60.0


def _feeds(args: tuple[torch.Tensor, ...], names) -> dict[str, np.ndarray]:
    return {n: (a.numpy().astype(np.int32) if not a.is_floating_point() else a.numpy().astype(np.float32)) for n, a in zip(names, args)}


def convert_component(graph: torch.nn.Module, target: str = "iOS17", fp32_ops: frozenset[str] = frozenset(), fp32_everywhere: bool = False,
                      palettes: dict | None = None):
    """Trace `graph` (with `input_names`, `output_names` and `example()`) and convert it; returns the in-memory model.
    Ops named in `fp32_ops` stay fp32 (islands); the rest compute in fp16. `palettes` (layer -> Palette, the
    weights of `graph` already decoded from them) are written as LUTs, as for the denoiser (coreml/palettize.py)."""
    ct = import_coremltools()
    example = graph.example()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # static shapes are the contract
        traced = torch.jit.trace(graph.eval(), example, check_trace=False)
    if fp32_everywhere:
        precision = ct.precision.FLOAT32
    else:
        precision = ct.transform.FP16ComputePrecision(op_selector=lambda op: op.name not in fp32_ops)
    inputs = [ct.TensorType(name=n, shape=tuple(x.shape), dtype=np.float32 if x.is_floating_point() else np.int32)
              for n, x in zip(graph.input_names, example)]
    pipeline = ct.PassPipeline.DEFAULT
    if palettes:
        pipeline.append_pass(PALETTIZE_PASS)
        pipeline.set_options(PALETTIZE_PASS, {"config": palettization_config(ct, palettes)})
    with quiet_coremltools():
        try:
            ml = ct.convert(traced, inputs=inputs, outputs=[ct.TensorType(name=n, dtype=np.float32) for n in graph.output_names],
                            convert_to="mlprogram", minimum_deployment_target=getattr(ct.target, target), compute_precision=precision,
                            pass_pipeline=pipeline)
        except NotImplementedError as e:
            raise EdgeCompileError(f"{type(graph).__name__} does not convert to Core ML ({str(e).splitlines()[0]})") from None
    if palettes:
        check_palettized(ml, palettes)
    return ml


def overflowing_ops(ml, inputs: list[tuple[torch.Tensor, ...]], names) -> list[str]:
    """The ops of the converted model that overflow fp16 on these inputs (in the faithful fp16 emulation), named as
    the converter's fp16 pass knows them (it appends `_cast_fp16` to the ops it moves to fp16); a cast it inserted
    (an fp32 value that overflows on its way into fp16) stands for the ops that read it."""
    found: dict[str, None] = {}
    interpreter = MILInterpreter(ml._mil_program, precision="fp16")
    for args in inputs:
        found.update(dict.fromkeys(interpreter.find_overflows(_feeds(args, names))))
    ops = {o.name: o for o in ml._mil_program.functions["main"].operations}
    readers: dict[str, list[str]] = {}
    for o in ops.values():
        for v in o.inputs.values():
            for var in v if isinstance(v, (list, tuple)) else [v]:
                readers.setdefault(var.name, []).append(o.name)
    named: dict[str, None] = {}
    for name in found:
        o = ops[name]
        names_ = [r for out in o.outputs for r in readers.get(out.name, [])] if o.op_type == "cast" else [name]
        named.update(dict.fromkeys(n.removesuffix(FP16_SUFFIX) for n in names_))
    return list(named)


@dataclass
class ComponentResult:
    """A component's conversion and verification: the package against its fp32 torch graph, in fp16 emulation."""

    kind: str
    psnr_db: float  # worst output and input, after the islands
    per_input_psnr_db: list[float]
    non_finite_outputs: int
    min_psnr_db: float = DEFAULT_MIN_PSNR_DB
    fp32_islands: list[str] = field(default_factory=list)  # ops kept in fp32 because fp16 overflowed there
    fp32_everywhere: bool = False
    overflowing_ops_without_islands: list[str] = field(default_factory=list)
    psnr_without_islands_db: float | None = None  # the same verification of the plain fp16 conversion
    non_finite_without_islands: int = 0
    bits: int = 16  # palette bits of every palettized layer (16: fp16 weights)
    psnr_vs_unquantized_db: float | None = None  # the palettized simulation against the fp32 unquantized graph
    runtime: str = "mil-interpreter (fp16)"

    @property
    def passed(self) -> bool:
        return self.non_finite_outputs == 0 and math.isfinite(self.psnr_db) and self.psnr_db >= self.min_psnr_db

    @property
    def problem(self) -> str | None:
        if self.non_finite_outputs:
            return f"{self.non_finite_outputs} outputs hold NaN or infinite values"
        if not self.passed:
            return f"PSNR {self.psnr_db:.1f} dB against the fp32 torch graph is below the {self.min_psnr_db:g} dB bar"
        return None

    def to_dict(self) -> dict:
        return finite_or_none({**self.__dict__, "passed": self.passed, "problem": self.problem})


def verify_component_model(ml, graph: torch.nn.Module, inputs: list[tuple[torch.Tensor, ...]], precision: str = "fp16"
                           ) -> tuple[list[float], int]:
    """(per-input worst PSNR over outputs, non-finite outputs) of the converted model against the torch graph."""
    interpreter = MILInterpreter(ml._mil_program, precision=precision)
    per, bad = [], 0
    for args in inputs:
        with torch.no_grad():
            want = graph(*args)
        want = want if isinstance(want, tuple) else (want,)
        got = interpreter.run(_feeds(args, graph.input_names))
        worst = math.inf
        for name, w in zip(graph.output_names, want):
            g = np.asarray(got[name], dtype=np.float32)
            if not np.isfinite(g).all():
                bad += 1
                worst = float("nan")
                continue
            worst = min(worst, psnr_db(w.float().numpy(), g))
        per.append(worst)
    return per, bad


def worst(values: list[float]) -> float:
    return float("nan") if any(math.isnan(v) for v in values) else min(values)


def convert_with_islands(graph: torch.nn.Module, kind: str, inputs: list[tuple[torch.Tensor, ...]], target: str = "iOS17",
                         min_psnr_db: float = DEFAULT_MIN_PSNR_DB, palettes: dict | None = None):
    """(model, ComponentResult): the fp16 conversion, its overflowing ops found on `inputs` and kept in fp32 until
    none overflows; verified against the fp32 torch graph before and after (for a palettized graph: its simulation,
    the graph with the palettes' decoded weights)."""
    ml = convert_component(graph, target, palettes=palettes)
    first = overflowing_ops(ml, inputs, graph.input_names)
    per0, bad0 = verify_component_model(ml, graph, inputs)
    islands: set[str] = set()
    found, everywhere = first, False
    for _ in range(MAX_ISLAND_ROUNDS):
        if not found:
            break
        islands.update(found)
        ml = convert_component(graph, target, frozenset(islands), palettes=palettes)
        found = overflowing_ops(ml, inputs, graph.input_names)
    else:
        if found:  # names that do not map back through the converter's passes: the whole component in fp32
            everywhere = True
            ml = convert_component(graph, target, fp32_everywhere=True)
    per, bad = verify_component_model(ml, graph, inputs)
    result = ComponentResult(kind=kind, psnr_db=worst(per), per_input_psnr_db=per, non_finite_outputs=bad, min_psnr_db=min_psnr_db,
                             fp32_islands=sorted(islands) if first else [], fp32_everywhere=everywhere,
                             overflowing_ops_without_islands=first, psnr_without_islands_db=worst(per0), non_finite_without_islands=bad0)
    return ml, result


def convert_for_core_ai(graph: torch.nn.Module, kind: str, inputs: list[tuple[torch.Tensor, ...]],
                        min_psnr_db: float = DEFAULT_MIN_PSNR_DB, palettes: dict | None = None):
    """(asset, ComponentResult): the component as a Core AI program, executed by Core AI's runtime on `inputs`
    against the fp32 torch graph (for a palettized graph: its simulation), the gate Core ML's components pass in
    fp16 emulation. fp16 compute first, as Core ML's; where the fp16 asset overflows or misses the gate, the whole
    component computes in fp32 (a Core AI program takes its dtypes from the exported graph: its islands are
    whole graphs), and the result keeps what fp16 measured."""
    from edgecompile.coreai.convert import ComponentAsset, Float16Plan, build_program

    fp16 = build_program(graph, inputs[0], list(graph.input_names), list(graph.output_names), palettes=palettes, fp16=Float16Plan())
    per16, bad16 = run_component_asset(fp16, graph, kind, inputs)
    if bad16 == 0 and math.isfinite(worst(per16)) and worst(per16) >= min_psnr_db:
        result = ComponentResult(kind=kind, psnr_db=worst(per16), per_input_psnr_db=per16, non_finite_outputs=0, min_psnr_db=min_psnr_db,
                                 runtime="coreai-runtime (fp16)")
        return ComponentAsset(fp16), result
    program = build_program(graph, inputs[0], list(graph.input_names), list(graph.output_names), palettes=palettes)
    per, bad = run_component_asset(program, graph, kind, inputs)
    result = ComponentResult(kind=kind, psnr_db=worst(per), per_input_psnr_db=per, non_finite_outputs=bad, min_psnr_db=min_psnr_db,
                             fp32_everywhere=True, psnr_without_islands_db=worst(per16), non_finite_without_islands=bad16,
                             runtime="coreai-runtime (fp32)")
    return ComponentAsset(program), result


def run_component_asset(program, graph: torch.nn.Module, kind: str, inputs: list[tuple[torch.Tensor, ...]]) -> tuple[list[float], int]:
    """A component's program saved to a scratch asset and run by Core AI's runtime on `inputs`: the worst PSNR per
    input against the fp32 torch graph, and how many outputs were not finite."""
    import tempfile

    from edgecompile.coreai.convert import component_outputs, save_program
    from edgecompile.coreai.runtime import AIModelRunner

    per, bad = [], 0
    with tempfile.TemporaryDirectory(prefix="component-") as scratch:
        path = Path(scratch) / f"{kind}.aimodel"
        save_program(program, path, {})
        runner = AIModelRunner(path)
        try:
            for args in inputs:
                want = component_outputs(graph, args)
                got = runner({n: a.numpy() for n, a in zip(graph.input_names, args)})
                outs = [np.asarray(got[n], np.float32) for n in graph.output_names]
                bad += sum(not np.isfinite(o).all() for o in outs)
                per.append(min(psnr_db(w.numpy(), o) for w, o in zip(want, outs)))
        finally:
            runner.close()
    return per, bad
