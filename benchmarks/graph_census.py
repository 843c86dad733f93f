"""Layout ops (transpose/reshape) per transformer block: edgecompile's ANE-layout package versus a
straightforward Core ML conversion of the reference (B, L, D) model at the same width.

    python benchmarks/graph_census.py [--checkpoint CKPT] [--width 0.5] [--output DIR]
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

import _common  # noqa: F401  (puts the repo on sys.path)
import torch
from rich.console import Console
from rich.table import Table

from edgecompile.coremltools_loader import import_coremltools, quiet_coremltools
from edgecompile.deploy.contract import example_inputs, text_from_package, text_to_package
from edgecompile.deploy.rewrite import deploy_model
from edgecompile.model.checkpoint import load_checkpoint
from edgecompile.model.elastic import extract_width


class ReferenceForTrace(torch.nn.Module):
    """The reference model with the package's input layout, converted as-is (no rewrite)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, latent, t, text):
        return self.model(latent, t, text_from_package(text))


def convert(module, example) -> dict[str, int]:
    """Convert a module as-is and count its MIL ops."""
    ct = import_coremltools()
    with torch.no_grad():
        module.eval()(*example)  # warm constant caches (BNA mask, positions) so the trace sees constants
        traced = torch.jit.trace(module, example, check_trace=False)
    with quiet_coremltools():
        ml = ct.convert(traced, inputs=[ct.TensorType(shape=tuple(e.shape)) for e in example], convert_to="mlprogram",
                        minimum_deployment_target=ct.target.iOS17)
    return dict(collections.Counter(o.op_type for o in ml._mil_program.functions["main"].operations))


class RefBlock(torch.nn.Module):
    def __init__(self, block, d, grid):
        super().__init__()
        self.block, self.d, self.grid = block, d, grid

    def forward(self, x, t0, text, *skip):
        return self.block(x, t0, text, self.d, self.grid, skip[0] if skip else None)


def block_examples(dense, deploy):
    """(name, reference block module + inputs, deploy block module + inputs) for every transformer block."""
    c = dense.config
    d = c.dims(1.0)
    h, w = deploy.grid_hw
    mh, mw = c.middle_grid(*deploy.latent_hw)
    lay = deploy.layout
    t0_ref, t0_dep = torch.randn(1, 6 * d.hidden), torch.randn(1, 6 * d.hidden, 1, 1)
    text_ref = torch.randn(1, c.text_len, c.text_dim)
    text_dep = text_to_package(text_ref)
    for stage in ("down", "middle", "up"):
        for i, (rb, db) in enumerate(zip(getattr(dense, stage), getattr(deploy, stage))):
            gh, gw = (mh, mw) if stage == "middle" else (h, w)
            dep_hw = (gh * gw // (lay.bw if lay and lay.grid and stage != "middle" else gw), lay.bw if lay and lay.grid and stage != "middle" else gw)
            if stage == "middle" and lay and lay.grid:
                dep_hw = (gh * gw // (lay.bw // 2), lay.bw // 2)
            x_ref, x_dep = torch.randn(1, gh * gw, d.hidden), torch.randn(1, d.hidden, *dep_hw)
            skip = rb.skip_fuse is not None
            ref_in = (x_ref, t0_ref, text_ref) + ((torch.randn_like(x_ref),) if skip else ())
            dep_in = (x_dep, t0_dep, text_dep) + ((torch.randn_like(x_dep),) if skip else ())
            yield f"{stage}.{i}", (RefBlock(rb, d, (gh, gw)), ref_in), (db, dep_in)


def layout_count(ops: dict[str, int]) -> int:
    return sum(ops.get(k, 0) for k in ("transpose", "reshape"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--checkpoint")
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--output")
    args = ap.parse_args()
    ckpt = load_checkpoint(args.checkpoint)
    dense = extract_width(ckpt.model, args.width)
    deploy = deploy_model(dense)
    rows = []
    table = Table(title=f"layout ops (transpose + reshape) per block, {ckpt.config.name} width {args.width:g}")
    for col in ("block", "reference (B,L,D) conversion", "edgecompile ANE layout", "ratio"):
        table.add_column(col, justify="right")
    for name, (rmod, rin), (dmod, din) in block_examples(dense, deploy):
        r_ops, d_ops = convert(rmod, rin), convert(dmod, din)
        r, o = layout_count(r_ops), layout_count(d_ops)
        rows.append({"block": name, "reference": {k: r_ops.get(k, 0) for k in ("transpose", "reshape")},
                     "edgecompile": {k: d_ops.get(k, 0) for k in ("transpose", "reshape")}, "ratio": r / o if o else None})
        table.add_row(name, str(r), str(o), f"{r / o:.1f}x" if o else "-")
    ex = example_inputs(deploy)
    whole_ref, whole_dep = convert(ReferenceForTrace(dense), ex), convert(deploy, ex)
    tot_r, tot_o = layout_count(whole_ref), layout_count(whole_dep)
    table.add_row("whole model", str(tot_r), str(tot_o), f"{tot_r / tot_o:.1f}x" if tot_o else "-")
    Console().print(table)
    path = _common.write_result("graph_census", {
        "config": ckpt.config.name, "width": args.width, "latent": list(deploy.latent_hw), "blocks": rows,
        "whole_model": {"reference": tot_r, "edgecompile": tot_o, "ratio": tot_r / tot_o if tot_o else None,
                        "reference_ops": whole_ref, "edgecompile_ops": whole_dep},
    }, Path(args.output) if args.output else None)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
