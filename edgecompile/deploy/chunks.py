"""`--chunks N`: the deploy graph cut at block boundaries into N graphs that run one after another.

Why: the Neural Engine refuses a package whose weight file exceeds 2 GiB (coremltools issue 2554, PR 2593), and
iOS keeps less of a large model resident; apple/ml-stable-diffusion's `--chunk-unet` cuts its U-Net in two for the
same reason. Here a cut falls between two transformer blocks, chosen to balance weight bytes.

What crosses a cut is the Carry of deploy/dit.py, as named Float32 tensors:
- chunk 1 takes the package inputs (latent, timestep, text); every later chunk takes the text again and the
  carried tensors it reads, bound by name to earlier chunks' outputs: chunk k's output `hidden_states_k` is read
  by chunk k+1 under that name, and `timestep_modulation_1`, computed once by chunk 1, by every later chunk;
- the last chunk returns `denoiser_output`, so the chain computes exactly the unchunked graph.
A chunk holds the deploy graph's own modules under their own names: layer names, palettes and distilled
parameters carry over unchanged, and the traced program holds only the weights its blocks use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from edgecompile.deploy.contract import LATENT, OUTPUT, TEXT, TIMESTEP
from edgecompile.deploy.dit import Carry, DeployDiT
from edgecompile.errors import EdgeCompileError

HIDDEN = "hidden_states"  # (B, D, H', W') in the deploy graph's block layout
MODULATION = "timestep_modulation"  # (B, 6D, 1, 1): adaLN-single's t0, read by every block
TIME_EMBEDDING = "timestep_embedding"  # (B, D, 1, 1): read by the final layer
STAGE_SKIP = "stage_skip"  # (B, D, H', W'): the down stage's output, added back after upsampling
MIDDLE_SKIP = "middle_skip_"  # + stack index: U-ViT long skips of the middle stage still to be read

CARRY_DOC = {
    HIDDEN: "hidden state between two blocks, channel-first block layout, float32",
    MODULATION: "timestep modulation (adaLN-single t0) shared by all blocks, (B, 6D, 1, 1) float32",
    TIME_EMBEDDING: "timestep embedding read by the final layer, (B, D, 1, 1) float32",
    STAGE_SKIP: "down-stage output waiting for the up stage, float32",
    MIDDLE_SKIP + "<i>": "middle-stage long skip number i (a stack: the highest index is read first), float32",
}


def carried_doc(name: str) -> str:
    """The meaning of a carried tensor's name `<key>_<k>` (see cut_name)."""
    key, _, k = name.rpartition("_")
    doc = CARRY_DOC.get(key) or CARRY_DOC[MIDDLE_SKIP + "<i>"]
    return f"{doc}; computed by chunk {k}"


def carry_to_named(carry: Carry) -> dict[str, torch.Tensor]:
    named = {HIDDEN: carry.x, MODULATION: carry.t0, TIME_EMBEDDING: carry.temb}
    if carry.hi_res is not None:
        named[STAGE_SKIP] = carry.hi_res
    named.update({f"{MIDDLE_SKIP}{i}": s for i, s in enumerate(carry.skips)})
    return named


def carry_from_named(named: dict[str, torch.Tensor | None], alive: list[str]) -> Carry:
    """The Carry of the `alive` names; those missing from `named` (not read by this chunk) are None."""
    skips = [named.get(k) for k in alive if k.startswith(MIDDLE_SKIP)]
    return Carry(x=named[HIDDEN], t0=named[MODULATION], temb=named.get(TIME_EMBEDDING), hi_res=named.get(STAGE_SKIP), skips=skips)


def block_weight_counts(deploy: DeployDiT) -> list[int]:
    """Parameters of each block in flat order (what a cut balances)."""
    return [sum(p.numel() for p in getattr(deploy, b.stage)[b.index].parameters()) for b in deploy.plan.blocks]


def check_chunks(config, n: int) -> None:
    """A cut falls between blocks: at most one chunk per block."""
    blocks = config.depth_down + config.depth_middle + config.depth_up
    if not 1 <= n <= blocks:
        raise EdgeCompileError(f"--chunks {n}: this model has {blocks} blocks, so use 1 to {blocks} chunks")


def chunk_boundaries(deploy: DeployDiT, n: int) -> list[tuple[int, int]]:
    """N contiguous block ranges [start, end) whose weights are as even as the block sizes allow (the embedding
    goes with the first range, the final layer with the last)."""
    check_chunks(deploy.config, n)
    blocks = block_weight_counts(deploy)
    total = sum(p.numel() for p in deploy.parameters())
    head = total - sum(blocks)
    # cumulative weight at each cut position, the embedding and head split evenly between the ends
    cum = [head / 2]
    for b in blocks:
        cum.append(cum[-1] + b)
    cuts = [0]
    for k in range(1, n):
        target = total * k / n
        # the nearest cut after the previous one that leaves at least one block for each later chunk
        lo, hi = cuts[-1] + 1, len(blocks) - (n - k)
        cuts.append(min(range(lo, hi + 1), key=lambda c: abs(cum[c] - target)))
    cuts.append(len(blocks))
    return list(zip(cuts[:-1], cuts[1:]))


class DeployChunk(nn.Module):
    """Blocks [start, end) of a DeployDiT as a graph of its own (chunk `index` of `count`, 1-based).

    The deploy graph's top-level modules, parameters and buffers are registered here under the same names (shared,
    not copied), so tracing names weights exactly as for the whole graph; the trace keeps only those it reads."""

    def __init__(self, deploy: DeployDiT, start: int, end: int, index: int, count: int):
        super().__init__()
        self.start, self.end, self.index, self.count = start, end, index, count
        self.config, self.latent_hw = deploy.config, deploy.latent_hw
        for name, module in deploy.named_children():
            self.add_module(name, module)
        for name, param in deploy.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buf in deploy.named_buffers(recurse=False):
            self.register_buffer(name, buf, persistent=False)
        object.__setattr__(self, "_deploy", deploy)  # not a submodule: its code, not a second set of names
        # set by split_deploy: the carried keys alive at this chunk's start, those it reads (and which of its carried
        # inputs holds each: two keys can name one tensor), and those it produces
        self.alive_in: list[str] = []
        self.reads: list[str] = []
        self.read_inputs: list[int] = []
        self.produces: list[str] = []

    @property
    def first(self) -> bool:
        return self.index == 1

    @property
    def last(self) -> bool:
        return self.index == self.count

    def module_prefixes(self) -> list[str]:
        """The module names whose weights this chunk reads (palettes and per-chunk weights are selected by them)."""
        d = self._deploy
        names = [b.name for b in d.plan.blocks[self.start:self.end]]
        if self.first:
            names += ["patch_embed", "t_mlp1", "t_mlp2", "t_block"]
        if d.config.caption_projection:
            # every chunk projects the text it is fed (a small MLP, duplicated rather than carried)
            names += ["caption_proj1", "caption_proj2"]
        # a stage transition runs with the block at its position (or with the head when no block follows)
        for name, at in (("downsample", d.plan.downsample_at), ("upsample", d.plan.upsample_at)):
            if at is not None and (self.start <= at < self.end or (self.last and at == d.n_blocks)):
                names.append(name)
        if self.last:
            names += ["final_norm", "final"]
        return names

    def owns(self, layer: str) -> bool:
        return any(layer == p or layer.startswith(p + ".") for p in self.module_prefixes())

    def forward(self, *inputs: torch.Tensor):
        """First chunk: (latent, timestep, text); later ones: (text, *the carried tensors it reads, once each).
        Returns the carried tensors it produces (a tuple in `produces` order), or the denoiser output if last."""
        d = self._deploy
        if self.first:
            latent, timestep, text = inputs
            carry = d.embed(latent, timestep)
        else:
            text, *rest = inputs
            carry = carry_from_named({key: rest[i] for key, i in zip(self.reads, self.read_inputs)}, self.alive_in)
        carry = d.run_blocks(carry, d.project_text(text), self.start, self.end)
        if self.last:
            return d.head(carry)
        named = carry_to_named(carry)
        return tuple(named[k] for k in self.produces)

    def carried_reads(self) -> list[str]:
        """Which of the carried tensors alive at the start this chunk's blocks read. Mirrors DeployDiT.run_blocks:
        every block reads the hidden state and the modulation, the head the embedding, the up transition the stage
        skip, and a skip-fusing block the top of the skip stack."""
        d = self._deploy
        reads = [HIDDEN, MODULATION] + ([TIME_EMBEDDING] if self.last else [])
        up_at = d.plan.upsample_at
        if STAGE_SKIP in self.alive_in and up_at is not None and (self.start <= up_at < self.end or (self.last and up_at == d.n_blocks)):
            reads.append(STAGE_SKIP)
        stack: list[str | None] = [k for k in self.alive_in if k.startswith(MIDDLE_SKIP)]
        for b in d.plan.blocks[self.start:self.end]:
            if b.reads_skip and (top := stack.pop()) is not None:
                reads.append(top)
            if b.writes_skip:
                stack.append(None)  # pushed inside this chunk
        return reads


@dataclass
class ChunkIO:
    """One chunk's binding: the names of its inputs and outputs, in the order its graph takes and returns them,
    and every one's shape."""

    inputs: list[str]
    outputs: list[str]
    shapes: dict[str, list[int]]


def cut_name(name: str, cut: int) -> str:
    """A carried tensor's name at cut `cut` (1-based): the output of chunk `cut` and the input of chunk `cut + 1`.
    A program may not use one name as both input and output, hence the cut number."""
    return f"{name}_{cut}"


def split_deploy(deploy: DeployDiT, n: int, example: tuple[torch.Tensor, ...]) -> tuple[list[DeployChunk], list[ChunkIO]]:
    """The N chunks of `deploy` and their I/O names, from one run of the graph on `example` (the package inputs).

    A carried tensor is an output of the chunk that computes it, named for that chunk (`cut_name`), and an input of
    each later chunk that reads it; one a chunk passes through unchanged is not output again. So the app keeps one
    dictionary of the package inputs and every chunk output so far, and feeds each chunk its inputs from it."""
    latent, timestep, text = example
    chunks, io = [], []
    public: dict[str, str] = {}  # carried key -> the name of its current value
    values = dict(zip([LATENT, TIMESTEP, TEXT], example))  # every value by name, for the shapes
    with torch.no_grad():
        carry = deploy.embed(latent, timestep)
        text = deploy.project_text(text)
        before: dict[str, torch.Tensor] = {}
        for k, (start, end) in enumerate(chunk_boundaries(deploy, n), start=1):
            chunk = DeployChunk(deploy, start, end, k, n)
            if k > 1:
                chunk.alive_in = list(carry_to_named(carry))
                chunk.reads = chunk.carried_reads()
                before = carry_to_named(carry)
            carry = deploy.run_blocks(carry, text, start, end)
            read_names = [public[key] for key in chunk.reads]
            chunk.read_inputs = [list(dict.fromkeys(read_names)).index(n) for n in read_names]
            inputs = [LATENT, TIMESTEP, TEXT] if chunk.first else [TEXT, *dict.fromkeys(read_names)]
            after = carry_to_named(carry)
            public_in = dict(public)
            chunk.produces = []
            for key, t in after.items():
                # A value can sit under two keys (a skip saves the very tensor of the hidden state, the stage skip
                # may be the chunk's input): a value that came in, or that this chunk already outputs, keeps its
                # name; only a new value is a new output.
                came_in = next((b for b, v in before.items() if v is t), None)
                output = next((p for p in chunk.produces if after[p] is t), None)
                if came_in is not None:
                    public[key] = public_in[came_in]
                elif output is not None:
                    public[key] = public[output]
                else:
                    chunk.produces.append(key)
                    public[key] = cut_name(key, k)
            outputs = [OUTPUT] if chunk.last else [public[key] for key in chunk.produces]
            values.update({public[key]: after[key] for key in chunk.produces})
            chunks.append(chunk)
            io.append(ChunkIO(inputs=inputs, outputs=outputs, shapes={n: list(values[n].shape) for n in inputs + outputs
                                                                        if n != OUTPUT} | ({OUTPUT: list(latent.shape)} if chunk.last else {})))
    return chunks, io


def chunk_example(chunks: list[DeployChunk], io: list[ChunkIO], example: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, ...]]:
    """Each chunk's example inputs: the package inputs run through the chunks before it, bound by name."""
    values = dict(zip([LATENT, TIMESTEP, TEXT], example))
    out = []
    with torch.no_grad():
        for chunk, names in zip(chunks, io):
            args = tuple(values[n] for n in names.inputs)
            out.append(args)
            result = chunk(*args)
            values.update(zip(names.outputs, result if isinstance(result, tuple) else (result,)))
    return out
